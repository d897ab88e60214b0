"""Apache Beam engine: the same partitions and the same ``run_partition`` inside a DoFn.

Locally (no ``--runner``, or ``--runner=DirectRunner``) the pipeline runs on
Beam's in-process portable runner (``FnApiRunner``, the Fn API runner the
DirectRunner itself uses for batch pipelines). Since Beam 2.6x the
DirectRunner first tries the Go ``PrismRunner``, whose binary it downloads
from GitHub, and logs an exception before falling back
(``apache_beam/runners/direct/direct_runner.py``): we skip that, so a local
run makes no network attempt. ``--direct_num_workers=N
--direct_running_mode=multi_processing`` still apply.

Standard pipeline options (``--runner``, ``--project``, ``--region``,
``--temp_location``, ``--setup_file`` ...) select Dataflow, Flink or Spark;
``setup.py`` at the repository root ships the code *and* its configs to the
workers (README "Running on a cluster"). Outputs must then be a URL every
worker and the launcher can reach (``gs://``, ``s3://``): the launcher reads
the partition markers back through :mod:`pipelines.io.fs`. Counters go to Beam
metrics (``<stage>/written``, ``<stage>/dropped/<reason>``,
``<stage>/failed/<class>``); the manifest is rebuilt from the markers, exactly
as for the other engines.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipelines.core.runner import PartitionResult, results_from_markers, run_partition
from pipelines.core.stage import Partition, Stage
from pipelines.io import fs
from pipelines.io.fs import AnyPath

LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner")

log = logging.getLogger(__name__)


def local_runner(options: list[str]) -> Any | None:
    """The in-process runner for a local run (no runner named or DirectRunner), else ``None``."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    name = PipelineOptions(options).view_as(StandardOptions).runner
    if name is not None and name.rsplit(".", 1)[-1] not in LOCAL_RUNNERS:
        return None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def run_on_beam(
    stage: Stage, parts: list[Partition], out: AnyPath, kwargs: dict[str, Any], options: list[str]
) -> list[PartitionResult]:
    import apache_beam as beam
    from apache_beam.metrics import Metrics
    from apache_beam.options.pipeline_options import PipelineOptions

    class RunPartition(beam.DoFn):
        def __init__(self, stage: Stage, out_dir: str, kwargs: dict[str, Any]) -> None:
            self.stage = stage
            self.out_dir = out_dir
            self.kwargs = kwargs

        def setup(self) -> None:
            self.stage.setup()

        def teardown(self) -> None:
            self.stage.teardown()

        def process(self, item: tuple[str, str]):
            pid, payload = item
            res = run_partition(self.stage, Partition(pid, json.loads(payload)), fs.as_path(self.out_dir), **self.kwargs)
            ns = self.stage.name
            if not res.skipped:
                Metrics.counter(ns, "written").inc(res.written)
                for reason, n in res.dropped.items():
                    Metrics.counter(ns, f"dropped/{reason}").inc(n)
                for cls, n in res.failed.items():
                    Metrics.counter(ns, f"failed/{cls}").inc(n)
            if res.error:
                Metrics.counter(ns, "crashed_partitions").inc()
            yield pid

    if not parts:
        return []
    opts = PipelineOptions(options)
    runner = local_runner(options)
    if runner is None and not fs.is_url(out):
        log.warning(
            "beam: writing to the local path %s; on a distributed runner the workers' writes land on "
            "their own disks and this launcher cannot see them (use gs://... or s3://...)",
            out,
        )
    items = [(p.id, json.dumps(dict(p.payload), sort_keys=True)) for p in parts]
    with beam.Pipeline(runner=runner, options=opts) as pipeline:
        _ = (
            pipeline
            | "Partitions" >> beam.Create(items)
            | "Reshuffle" >> beam.Reshuffle()
            | "Run" >> beam.ParDo(RunPartition(stage, fs.to_str(out), kwargs))
        )
    return results_from_markers(out, [p.id for p in parts])

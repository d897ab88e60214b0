"""Apache Beam engine: the same partitions and the same ``run_partition`` inside a DoFn.

Runs on the DirectRunner by default; standard pipeline options (``--runner``,
``--project``, ``--region``, ``--temp_location``, ``--setup_file`` ...) select
Dataflow, Flink or Spark. Counters go to Beam metrics (``<stage>/written``,
``<stage>/dropped/<reason>``, ``<stage>/failed/<class>``); the manifest is
rebuilt from the partition markers, exactly as for the other engines.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipelines.core.runner import PartitionResult, results_from_markers, run_partition
from pipelines.core.stage import Partition, Stage

log = logging.getLogger(__name__)


def run_on_beam(
    stage: Stage, parts: list[Partition], out: Path, kwargs: dict[str, Any], options: list[str]
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
            res = run_partition(self.stage, Partition(pid, json.loads(payload)), Path(self.out_dir), **self.kwargs)
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
    opts = PipelineOptions(options or ["--runner=DirectRunner"])
    items = [(p.id, json.dumps(dict(p.payload), sort_keys=True)) for p in parts]
    with beam.Pipeline(options=opts) as pipeline:
        _ = (
            pipeline
            | "Partitions" >> beam.Create(items)
            | "Reshuffle" >> beam.Reshuffle()
            | "Run" >> beam.ParDo(RunPartition(stage, str(out), kwargs))
        )
    return results_from_markers(out, [p.id for p in parts])

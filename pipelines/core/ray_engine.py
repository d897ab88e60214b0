"""Ray Data engine: partitions become rows of a Ray dataset mapped by a pool of stage workers.

Each worker (a Ray actor made from :class:`_PartitionWorker`) calls
``stage.setup()`` once and then runs whole partitions with
:func:`~pipelines.core.runner.run_partition`, writing shards and markers
itself; only the small per-partition results travel back to the driver.
``RAY_ADDRESS`` (or an already initialised Ray) selects a cluster; otherwise a
local Ray is started with the machine's CPUs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pipelines.core.runner import PartitionResult, run_partition
from pipelines.core.stage import Partition, Stage
from pipelines.io.fs import as_path

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray (quietly)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)


class _PartitionWorker:
    def __init__(self, stage: Stage, out_dir: str, kwargs: dict[str, Any]) -> None:
        self.stage = stage
        self.out_dir = as_path(out_dir)  # keeps s3://, gs:// URLs intact
        self.kwargs = kwargs
        stage.setup()

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        part = Partition(row["id"], json.loads(row["payload"]))
        res = run_partition(self.stage, part, self.out_dir, **self.kwargs)
        return {"result": json.dumps({**res.to_json(), "skipped": res.skipped})}

    def __del__(self) -> None:  # Ray gives actors no teardown hook in map(); best effort
        try:
            self.stage.teardown()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def run_on_ray(
    stage: Stage, parts: list[Partition], out: Path, kwargs: dict[str, Any], num_workers: int | None
) -> list[PartitionResult]:
    import ray

    ensure_ray()
    if not parts:
        return []
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = max(1, min(num_workers or cpus, len(parts)))
    items = [{"id": p.id, "payload": json.dumps(dict(p.payload), sort_keys=True)} for p in parts]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    mapped = ds.map(
        _PartitionWorker,
        fn_constructor_args=(stage, str(out), kwargs),
        concurrency=workers,
        num_cpus=1,
    )
    results = []
    for row in mapped.iter_rows():
        d = json.loads(row["result"])
        results.append(PartitionResult(**d))
    return results

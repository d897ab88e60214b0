"""Stages that Ray workers of the test clusters import by module name (tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import os
import time

import pyarrow as pa

from pipelines.core.stage import Partition, Stage

SCHEMA = pa.schema([("sample_id", pa.string()), ("value", pa.int64())])


class HeartbeatStage(Stage):
    """Slow partitions that append one line per row to ``beat_file`` (a worker's visible side effect)."""

    name = "heartbeat"
    output_schema = SCHEMA

    def __init__(self, beat_file: str, n_parts: int = 4, per_part: int = 400, delay: float = 0.05) -> None:
        self.beat_file, self.n_parts, self.per_part, self.delay = beat_file, n_parts, per_part, delay

    def partitions(self):
        return [Partition(f"p{i}") for i in range(self.n_parts)]

    def process(self, partition):
        for j in range(self.per_part):
            with open(self.beat_file, "a") as fh:
                fh.write(f"{os.getpid()} {partition.id} {j}\n")
            time.sleep(self.delay)
            yield {"sample_id": f"{partition.id}/{j}", "value": j}

"""The stage framework: counts add up, resume skips finished work, engines agree."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipelines.core.runner import StageMismatchError, run_stage
from pipelines.core.shards import list_shards, read_table
from pipelines.core.stage import Drop, Fail, Partition, Stage

SCHEMA = pa.schema([("sample_id", pa.string()), ("value", pa.int64())])


class ToyStage(Stage):
    name = "toy"
    output_schema = SCHEMA

    def __init__(self, n_parts: int = 3, per_part: int = 7, crash_on: str | None = None, scale: int = 1):
        self.n_parts, self.per_part, self.crash_on, self.scale = n_parts, per_part, crash_on, scale

    def config_dict(self):
        return {"scale": self.scale}

    def partitions(self):
        return [Partition(f"p{i}", {"base": i * 100}) for i in range(self.n_parts)]

    def process(self, partition):
        for j in range(self.per_part):
            sid = f"toy/{partition.id}/{j}"
            if partition.id == self.crash_on and j == 3:
                raise OSError("disk on fire")
            if j % 5 == 4:
                yield Drop(sid, "too_boring")
            elif j == 6:
                yield Fail(sid, "BadValue", "value 6 is cursed", file=f"{partition.id}.bin")
            else:
                yield {"sample_id": sid, "value": (partition.payload["base"] + j) * self.scale}


def test_local_counts_add_up_and_shards_are_bounded(tmp_path):
    summary = run_stage(ToyStage(), tmp_path, max_rows=2, progress=False)
    assert summary.seen == 21
    assert summary.written == 15 and summary.dropped == {"too_boring": 3} and summary.failed == {"BadValue": 3}
    assert len(list_shards(tmp_path)) == 3 * 3  # 5 rows per partition, 2 per shard
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["written"] == 15
    table = read_table(tmp_path)
    assert table.column("sample_id").to_pylist()[:2] == ["toy/p0/0", "toy/p0/1"]


def test_rerun_skips_done_and_redoes_crashed_partition(tmp_path):
    first = run_stage(ToyStage(crash_on="p1"), tmp_path, progress=False)
    assert not first.ok and [p.partition for p in first.crashed] == ["p1"]
    assert not list(tmp_path.glob("shards/p1-*"))  # crashed partition leaves no rows
    second = run_stage(ToyStage(), tmp_path, progress=False)
    assert second.ok
    assert [p.skipped for p in second.partitions] == [True, False, True]
    run_stage(ToyStage(), tmp_path / "fresh", progress=False)
    assert read_table(tmp_path).equals(read_table(tmp_path / "fresh"))


def test_rerun_with_other_config_is_refused(tmp_path):
    run_stage(ToyStage(), tmp_path, progress=False)
    with pytest.raises(StageMismatchError, match="different toy config"):
        run_stage(ToyStage(scale=2), tmp_path, progress=False)


def test_ray_and_beam_engines_match_local(tmp_path, ray_session):
    local = run_stage(ToyStage(), tmp_path / "local", progress=False)
    ray_sum = run_stage(ToyStage(), tmp_path / "ray", engine="ray")
    beam_sum = run_stage(ToyStage(), tmp_path / "beam", engine="beam")
    for s in (ray_sum, beam_sum):
        assert (s.written, s.dropped, s.failed) == (local.written, local.dropped, local.failed)
    assert read_table(tmp_path / "ray").equals(read_table(tmp_path / "local"))
    assert read_table(tmp_path / "beam").equals(read_table(tmp_path / "local"))

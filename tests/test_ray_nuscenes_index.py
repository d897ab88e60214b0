"""Issue 12 item 6: nuScenes workers hold one scene's records, never the release's devkit tables."""

from __future__ import annotations

import pytest
from _shipping import shipped

from pipelines.config import load_config
from pipelines.core.runner import run_partition, run_stage
from pipelines.core.shards import read_table
from pipelines.sources.base import ExtractConfig
from pipelines.stages.extract import ExtractStage


@pytest.fixture()
def stage(sample_data):
    cfg = load_config(ExtractConfig, "configs/extract/nuscenes.yaml", [f"input={sample_data.nuscenes}"])
    return ExtractStage(cfg)


def test_units_carry_only_their_scene(stage):
    parts = stage.partitions()
    assert len(parts) == 2  # one scene per partition in the tiny sample data
    seen: set[str] = set()
    for p in parts:
        (unit,) = p.payload["units"]
        tables = unit["payload"]["tables"]
        assert list(tables["scene"]) == [unit["payload"]["scene_token"]]
        samples = tables["sample"].values()
        assert {s["scene_token"] for s in samples} == {unit["payload"]["scene_token"]}
        anns = tables["sample_annotation"].values()
        assert anns and {a["sample_token"] for a in anns} <= set(tables["sample"])
        assert not seen & set(tables["sample"])  # no record of another scene
        seen |= set(tables["sample"])


def test_worker_never_loads_the_devkit_and_output_is_unchanged(stage, tmp_path, monkeypatch):
    from nuscenes.nuscenes import NuScenes

    parts = stage.partitions()  # the driver: loads the devkit once
    ref = run_stage(stage, tmp_path / "ref", engine="local", progress=False)
    assert ref.ok and ref.written > 0

    def refuse(*a, **k):
        raise AssertionError("a worker loaded the full nuScenes devkit tables")

    monkeypatch.setattr(NuScenes, "__init__", refuse)
    worker = shipped(stage)  # as shipped to a Ray/Beam worker
    worker.setup()
    for p in parts:
        r = run_partition(worker, p, tmp_path / "worker")
        assert r.error is None, r.error
    worker.teardown()
    assert read_table(tmp_path / "worker").equals(read_table(tmp_path / "ref"))


def test_box_velocity_matches_the_devkit(stage, sample_data):
    import numpy as np
    from nuscenes.nuscenes import NuScenes

    from pipelines.sources.nuscenes import SceneTables

    nusc = NuScenes(version=sample_data.nuscenes_version, dataroot=str(sample_data.nuscenes), verbose=False)
    for p in stage.partitions():
        tables = SceneTables(p.payload["units"][0]["payload"]["tables"])
        for tok in tables.tables["sample_annotation"]:
            np.testing.assert_array_equal(tables.box_velocity(tok), nusc.box_velocity(tok))

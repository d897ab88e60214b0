"""``drivevla demo`` end to end on the tiny sample data: every stage, the card, loading, idempotent rerun."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow.parquet as pq

from pipelines.card.plots import future_on_camera
from pipelines.cli import main
from pipelines.core.shards import list_shards
from pipelines.stages.build import shard_split_and_dataset


def test_demo_tiny_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    assert main(["demo", "--out", str(out), "--size", "tiny"]) == 0
    first = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert "drivevla demo finished" in printed and "loaded back with datasets" in printed

    shards = list_shards(out / "build")
    assert shards
    stats = json.loads((out / "build" / "stats.json").read_text())
    counts: dict = {}
    rows = []
    for p in shards:
        split, ds = shard_split_and_dataset(p)
        t = pq.read_table(p)
        counts.setdefault(ds, {"train": 0, "validation": 0})[split] += t.num_rows
        rows += t.to_pylist()
    assert set(counts) == {"waymo_e2e", "nuscenes", "nuplan", "bench2drive"}
    for ds, c in counts.items():  # the card's counts are the shards' counts
        assert {s: stats["stats"]["counts"][ds][s] for s in c} == c
        assert not stats["stats"]["scene_overlap"][ds]
    card = (out / "build" / "README.md").read_text()
    assert "## Counts" in card and "## Action codebook" in card and (out / "build" / "plots" / "distributions.png").is_file()
    # the datasets cache of the load step stays out of build/, the folder `drivevla push` uploads (issue 14 item 16)
    assert (out / ".hf_cache").is_dir() and not (out / "build" / ".hf_cache").exists()

    modes = {r["think_mode"] for r in rows}
    assert modes == {"slow", "fast"}
    for r in rows:
        answer = r["messages"][2]["content"]
        assert answer.startswith("<think>" if r["think_mode"] == "slow" else "<answer>")
        assert answer.count("<action_") == 10
        if r["annotated_think_mode"] == "slow" and r["think_mode"] == "fast":
            assert r["filter_reasons"]  # demoted samples say why

    # the future projects onto the road ahead in the front camera of the sample data
    checked = {}
    for r in rows:
        fut = np.asarray(r["future"])
        far = fut[:, 0] > 8.0
        if far.sum() < 3 or np.abs(fut[:, 1]).max() > 3.0:
            continue
        proj = future_on_camera(r)
        h = next(c for c in r["cameras"] if c["name"] == "front")["height"]
        uv = proj["uv"][far[proj["visible"]]]
        assert proj["inside"][far[proj["visible"]]].all(), r["sample_id"]
        assert (uv[:, 1] > h / 2).all(), r["sample_id"]
        checked[r["dataset"]] = checked.get(r["dataset"], 0) + 1
    assert set(checked) == {"waymo_e2e", "nuscenes", "nuplan", "bench2drive"}

    # a second run reuses every finished stage
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    t1 = time.perf_counter()
    assert main(["demo", "--out", str(out), "--size", "tiny"]) == 0
    second = time.perf_counter() - t1
    assert {p.name: p.stat().st_mtime_ns for p in list_shards(out / "build")} == mtimes
    assert second < first

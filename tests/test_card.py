"""Dataset card: front matter, counts equal to the shards, reasons, plots, trajectory overlay."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import yaml
from test_build import FRONT_EXTRINSICS, INTRINSICS, H, W, annotated_row, build_fixture

from pipelines.card import write_card
from pipelines.card.plots import future_on_camera, project_ego_points
from pipelines.core.shards import list_shards
from pipelines.stages.build import shard_split_and_dataset
from pipelines.stages.filter import write_filter_stats


def _card(tmp_path):
    build_fixture(tmp_path)
    fdirs = {ds: tmp_path / "filter" / ds for ds in ("nuscenes", "waymo_e2e")}
    for d in fdirs.values():
        write_filter_stats(d)
    codebook = tmp_path / "codebook"
    codebook.mkdir()
    (codebook / "codebook.json").write_text(json.dumps({"k": 64, "tol": 0.05, "seed": 0, "coverage": 0.97}))
    meta = {"schema_version": "1.0.0", "build_version": "1.0.0", "prompt_version": "1.0.0", "notes": "synthetic"}
    return write_card(tmp_path / "build", fdirs, codebook, meta)


def test_card_front_matter_counts_and_reasons(tmp_path):
    card = _card(tmp_path)
    text = card.read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["license"] == "other"
    files = {f["split"]: f["path"] for f in header["configs"][0]["data_files"]}
    assert files == {"train": "shards/train-*.parquet", "validation": "shards/validation-*.parquet"}
    assert header["drivevla"]["schema_version"] == "1.0.0" and header["drivevla"]["num_action_tokens"] == 64

    # counts in the card == counts in the shards
    truth: dict = {}
    for p in list_shards(tmp_path / "build"):
        split, ds = shard_split_and_dataset(p)
        truth.setdefault(ds, {"train": 0, "validation": 0})[split] += pq.read_metadata(p).num_rows
    stats = json.loads((tmp_path / "build" / "stats.json").read_text())["stats"]
    for ds, c in truth.items():
        assert {s: stats["counts"][ds][s] for s in c} == c
        assert f"| {ds} | {c['train']} | {c['validation']} | {c['train'] + c['validation']} |" in text
    assert stats["scene_overlap"] == {"nuscenes": [], "waymo_e2e": []}
    # licences, rejection reasons, codebook, loading and schema sections
    for needle in ("CC BY-NC-SA 4.0", "Waymo Open Dataset License Agreement", "action_mismatch 1",
                   "annotation_failed 1", "no_action_tokens", "| k | 64 |", 'load_dataset("parquet"',
                   "`messages`", "`action_tokens` | `fixed_size_list<element: int16>[10]`", "synthetic"):
        assert needle in text, needle
    assert stats["demoted_to_fast"]["nuscenes"] == {"action_mismatch": 1, "annotation_failed": 1}
    plots = sorted(p.name for p in (tmp_path / "build" / "plots").glob("*.png"))
    assert "distributions.png" in plots and sum(p.startswith("example_") for p in plots) == 4
    assert all(f"]({'plots/' + p})" in text for p in plots)
    # the card's configs make the folder itself loadable, as on the Hub
    import datasets

    ds = datasets.load_dataset(str(tmp_path / "build"), cache_dir=str(tmp_path / "hf_cache"))
    assert {s: len(ds[s]) for s in ds} == {s: sum(c[s] for c in truth.values()) for s in ("train", "validation")}


def test_projection_puts_the_future_on_the_road_ahead():
    # a point straight ahead on the ground projects below the image centre, on the centre column
    uv, depth = project_ego_points(np.array([[10.0, 0.0, 0.0], [10.0, 0.0, 1.6]]), INTRINSICS, FRONT_EXTRINSICS)
    assert depth[0] == depth[1] == 8.5
    assert np.allclose(uv[0], [W / 2, H / 2 + 160 * 1.6 / 8.5]) and np.allclose(uv[1], [W / 2, H / 2])
    # a point to the left (y > 0) lands left of the centre
    uv, _ = project_ego_points(np.array([[10.0, 2.0, 0.0]]), INTRINSICS, FRONT_EXTRINSICS)
    assert uv[0, 0] < W / 2
    row = annotated_row(4)  # 8 m/s: future from 4 m to 40 m ahead
    proj = future_on_camera(row)
    assert proj["visible"].all()
    far = np.asarray(row["future"])[:, 0] > 6.0  # nearer points fall below the image's bottom edge
    assert proj["inside"][far].all() and not proj["inside"][0]
    assert (proj["uv"][:, 1] > H / 2).all()  # lower half: the road


def test_card_configs_per_source_task_categories_and_thumbnail(tmp_path):
    """Issue 14 item 15: a config per source (different licences), task_categories, a top-level thumbnail."""
    import datasets

    card = _card(tmp_path)
    header = yaml.safe_load(card.read_text().split("---\n")[1])
    assert header["task_categories"] == ["robotics", "image-text-to-text"]
    configs = {c["config_name"]: c["data_files"] for c in header["configs"]}
    assert list(configs)[0] == "default" and set(configs) == {"default", "nuscenes", "waymo_e2e"}
    assert {f["split"]: f["path"] for f in configs["waymo_e2e"]}["train"] == "shards/train-waymo_e2e-*.parquet"
    # each source config loads exactly that source's rows
    ds = datasets.load_dataset(str(tmp_path / "build"), "waymo_e2e", cache_dir=str(tmp_path / "hf_cache"))
    assert set(ds["train"]["dataset"]) == {"waymo_e2e"}
    row = ds["train"][0]
    # the thumbnail is decoded as an image at the top level: the front camera's current frame
    front = next(c for c in row["cameras"] if c["name"] == "front")["frames"][-1]["image"]
    assert ds["train"].features["thumbnail"] == datasets.Image()
    assert row["thumbnail"].size == front.size and row["thumbnail"].tobytes() == front.tobytes()

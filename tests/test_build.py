"""Build stage: joins, demotion/drop of rejected reasoning, split by scene, loadable shards."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from annotators.schema import ANNOTATION_FIELDS
from pipelines.core.runner import run_stage
from pipelines.core.shards import list_shards, write_table_atomic
from pipelines.stages.build import (
    BuildConfig,
    BuildStage,
    DatasetInputs,
    format_critical_objects,
    shard_split_and_dataset,
    validation_scenes,
)
from pipelines.stages.filter import FilterStage, FilterStageConfig
from schemas.sample import schema_with

K = 64
W, H = 320, 180
# Front camera 1.5 m ahead of the rear axle, 1.6 m up, looking forward (OpenCV axes -> ego).
FRONT_EXTRINSICS = np.array(
    [[0, 0, 1, 1.5], [-1, 0, 0, 0], [0, -1, 0, 1.6], [0, 0, 0, 1]], dtype=np.float64
)
INTRINSICS = np.array([[160.0, 0, W / 2], [0, 160.0, H / 2], [0, 0, 1]])
# pyarrow 25 cannot read back a null in a top-level fixed_size_list column ("Expected all lists to be of
# size=10 but index i had size=0"), so the fixture stores action_tokens as a variable-length list here.
ANNOTATED_SCHEMA = schema_with(pa.field("action_tokens", pa.list_(pa.int16())), *ANNOTATION_FIELDS)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.zeros((H, W, 3), np.uint8)
    arr[H // 2 :] = 90  # "road" in the lower half
    arr[: H // 2] = (rng.random(3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _camera(name: str, i: int, t0: int) -> dict:
    yaw = {"front": 0.0, "front_left": 0.9, "front_right": -0.9, "back": np.pi}[name]
    rot = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    ext = FRONT_EXTRINSICS.copy()
    ext[:3, :3] = rot @ FRONT_EXTRINSICS[:3, :3]
    return {
        "name": name, "width": W, "height": H,
        "intrinsics": INTRINSICS.reshape(-1).tolist(), "extrinsics": ext.reshape(-1).tolist(),
        "frames": [{"image": {"bytes": _jpeg(i * 10 + k), "path": None}, "timestamp_us": t0 - (1 - k) * 500_000}
                   for k in range(2)],
    }  # fmt: skip


def annotated_row(i: int, dataset: str = "nuscenes", slow: bool = True, scene_size: int = 3, **kw) -> dict:
    """A valid annotated row: unified sample + action tokens + annotation columns."""
    t0 = 1_000_000 * (i + 10)
    scene = f"scene-{i // scene_size:03d}"
    speed = 4.0 + i % 5
    row = {
        "sample_id": f"{dataset}/{scene}/{i}", "dataset": dataset, "split": "train", "scene_id": scene,
        "timestamp_us": t0, "cameras": [_camera(c, i, t0) for c in ("front", "front_left", "front_right", "back")],
        "history": [[-speed * 0.5 * k, 0.0, 0.0] for k in range(4, 0, -1)],
        "future": [[speed * 0.5 * k, 0.02 * k * k, 0.004 * k] for k in range(1, 11)],
        "velocity": [speed, 0.0], "acceleration": [0.0, 0.0], "command": "straight",
        "meta_lateral": "move forward", "meta_longitudinal": "constant speed",
        "history_meta_lateral": "move forward", "history_meta_longitudinal": "constant speed",
        "preference_trajectories": [[[1.0, 0.0], [2.0, 0.0]]] if dataset == "waymo_e2e" else None,
        "preference_scores": [8.0] if dataset == "waymo_e2e" else None,
        "objects": [{"category": "car", "x": 12.0, "y": 0.2, "heading": 0.0, "length": 4.6, "width": 1.9,
                     "vx": 3.0, "vy": 0.0, "track_id": "t1"}],
        "drivelm_qa": None, "source_files": ["synthetic"], "extractor_version": "test",
        "action_tokens": [(i * 7 + k) % K for k in range(10)],
        "think_mode": "slow" if slow else "fast", "think_reasons": ["close_object:car@12.0m"] if slow else [],
        "think_score": 1.5 if slow else 0.0,
        "annotation_status": "ok" if slow else "skipped_fast", "annotation_error": None,
        "annotation_provenance": None,
        "reasoning_scene": None, "reasoning_objects": None, "reasoning_intent": None,
        "reasoning_action_lateral": None, "reasoning_action_longitudinal": None,
    }  # fmt: skip
    if slow:
        row.update(
            reasoning_scene=f"A straight two-lane road number {i} in daylight with parked cars along the right kerb "
            f"and a bus stop {i * 3 % 17 + 5} metres ahead.",
            reasoning_objects=[{"name": f"silver sedan {i}", "location": "front camera, centre part",
                                "behaviour": f"driving {i % 4 + 1} m/s slower in the ego lane",
                                "why": "it sets the safe following distance"}],
            reasoning_intent=f"The lane ahead is clear apart from the sedan, which keeps a steady gap of about "
            f"{10 + i} metres, so the ego vehicle holds its lane and its speed (case {i}).",
            reasoning_action_lateral="keep lane", reasoning_action_longitudinal="maintain speed",
        )  # fmt: skip
    row.update(kw)
    return row


def write_annotated(root, dataset: str, shards: list[list[dict]]):
    d = root / "annotate" / dataset
    for k, rows in enumerate(shards):
        write_table_atomic(pa.Table.from_pylist(rows, schema=ANNOTATED_SCHEMA), d / "shards" / f"part-{k:05d}.parquet")
    return d


def build_fixture(tmp_path, cfg: BuildConfig | None = None):
    """Two datasets, with a rejected reasoning, a failed annotation and a row without tokens."""
    cfg = cfg or BuildConfig(val_fraction=0.3)
    nus = [annotated_row(i, slow=i % 2 == 0) for i in range(18)]
    nus[2]["reasoning_action_lateral"] = "turn left"  # rejected: action mismatch
    nus[4].update(annotation_status="failed", annotation_error="Timeout: gave up",
                  reasoning_scene=None, reasoning_objects=None, reasoning_intent=None)  # fmt: skip
    nus[5]["action_tokens"] = None  # no future / not tokenized
    nus[5]["future"] = None
    way = [annotated_row(i, dataset="waymo_e2e", slow=i % 3 == 0) for i in range(9)]
    write_annotated(tmp_path, "nuscenes", [nus[:9], nus[9:]])
    write_annotated(tmp_path, "waymo_e2e", [way])
    inputs = []
    for ds in ("nuscenes", "waymo_e2e"):
        fs = run_stage(FilterStage(tmp_path / "annotate" / ds, FilterStageConfig(), few_shot=[]),
                       tmp_path / "filter" / ds, progress=False)  # fmt: skip
        assert fs.ok
        inputs.append(DatasetInputs(ds, str(tmp_path / "annotate" / ds), str(tmp_path / "filter" / ds)))
    summary = run_stage(BuildStage(inputs, cfg, K), tmp_path / "build", progress=False, max_rows=5)
    return summary, nus, way


def _read_build(tmp_path):
    rows = []
    for p in list_shards(tmp_path / "build"):
        split, ds = shard_split_and_dataset(p)
        for r in pq.read_table(p).to_pylist():
            r["_split"] = split
            rows.append(r)
    return rows


def test_build_counts_demotion_and_split_by_scene(tmp_path):
    summary, nus, way = build_fixture(tmp_path)
    assert summary.ok and summary.seen == len(nus) + len(way)
    assert summary.dropped == {"no_action_tokens": 1} and summary.failed == {}
    rows = {r["sample_id"]: r for r in _read_build(tmp_path)}
    assert len(rows) == summary.written == 26
    rejected = rows["nuscenes/scene-000/2"]
    assert rejected["think_mode"] == "fast" and rejected["annotated_think_mode"] == "slow"
    assert rejected["filter_reasons"][0].startswith("action_mismatch") and rejected["reasoning_scene"] is None
    assert rejected["messages"][2]["content"].startswith("<answer>")
    failed = rows["nuscenes/scene-001/4"]
    assert failed["think_mode"] == "fast" and failed["filter_reasons"] == ["annotation_failed: Timeout: gave up"]
    slow = rows["nuscenes/scene-000/0"]
    assert slow["think_mode"] == "slow" and slow["filter_reasons"] == []
    assert slow["reasoning_objects"].startswith("silver sedan 0 (front camera, centre part): driving")
    assert slow["critical_objects"][0]["name"] == "silver sedan 0"
    assistant = slow["messages"][2]["content"]
    assert assistant.startswith("<think>") and assistant.count("<action_") == 10
    assert slow["messages"][1]["content"].count("<|video_pad|>") == 4
    # split by scene: no scene in both splits, and both splits used
    split_of: dict = {}
    for r in rows.values():
        assert split_of.setdefault((r["dataset"], r["scene_id"]), r["_split"]) == r["_split"]
    assert {r["_split"] for r in rows.values()} == {"train", "validation"}
    # deterministic: a rebuild elsewhere gives the same bytes of content
    again, _, _ = build_fixture(tmp_path / "again")
    assert [p.name for p in list_shards(tmp_path / "build")] == [p.name for p in list_shards(tmp_path / "again" / "build")]
    for a, b in zip(list_shards(tmp_path / "build"), list_shards(tmp_path / "again" / "build"), strict=True):
        assert pq.read_table(a).drop(["annotation_provenance"]).equals(pq.read_table(b).drop(["annotation_provenance"]))


def test_on_rejected_drop_counts_by_reason(tmp_path):
    summary, _, _ = build_fixture(tmp_path, BuildConfig(val_fraction=0.3, on_rejected="drop"))
    assert summary.dropped == {
        "no_action_tokens": 1,
        "rejected_reasoning:action_mismatch": 1,
        "rejected_reasoning:annotation_failed": 1,
    }


def test_validation_scenes_threshold_and_top_up():
    scenes = [f"s{i}" for i in range(200)]
    val = validation_scenes("nuplan", scenes, BuildConfig(val_fraction=0.1))
    assert 8 <= len(val) <= 35
    assert validation_scenes("nuplan", scenes + ["new"], BuildConfig(val_fraction=0.1)) - {"new"} == val  # stable
    tiny = validation_scenes("nuplan", ["a", "b"], BuildConfig(val_fraction=0.01))
    assert len(tiny) == 1
    assert validation_scenes("nuplan", ["a"], BuildConfig()) == set()
    assert validation_scenes("nuplan", ["a", "b"], BuildConfig(val_fraction=0.0)) == set()


def test_shards_load_with_datasets_and_pyarrow(tmp_path):
    import datasets

    build_fixture(tmp_path)
    shard_dir = tmp_path / "build" / "shards"
    files = {"train": str(shard_dir / "train-*.parquet"), "validation": str(shard_dir / "validation-*.parquet")}
    ds = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf_cache"))
    n_pq = {s: sum(pq.read_metadata(p).num_rows for p in shard_dir.glob(f"{s}-*.parquet")) for s in files}
    assert {s: len(ds[s]) for s in files} == n_pq
    row = ds["train"][0]
    img = row["cameras"][0]["frames"][-1]["image"]
    assert isinstance(img, Image.Image) and img.size == (W, H)
    assert row["messages"][0]["role"] == "system" and len(row["action_tokens"]) == 10
    table = pq.read_table(shard_dir)  # plain pyarrow: images are {bytes, path}
    assert table.num_rows == sum(n_pq.values())
    assert table.column("cameras")[0].as_py()[0]["frames"][0]["image"]["bytes"][:2] == b"\xff\xd8"


def test_messages_tokenize_with_a_qwen_style_processor(tmp_path):
    pytest.importorskip("transformers")
    from annotators.training_prompt import ACTION_TOKEN_FORMAT, model_inputs_from_row
    from training.tiny import build_tiny_qwen25vl
    from training.vision import ClipProcessor

    build_fixture(tmp_path)
    proc = ClipProcessor.from_pretrained(build_tiny_qwen25vl(tmp_path / "tiny", num_action_tokens=K))
    rows = [r for r in _read_build(tmp_path) if r["think_mode"] == "slow"][:2]
    rows += [r for r in _read_build(tmp_path) if r["think_mode"] == "fast"][:1]
    action_ids = set(proc.tokenizer.convert_tokens_to_ids([ACTION_TOKEN_FORMAT.format(i) for i in range(K)]))
    for row in rows:
        out = model_inputs_from_row(row, proc, num_action_tokens=K)
        ids, labels, start = out["input_ids"], out["labels"], out["prompt_length"]
        where = [j for j, t in enumerate(ids.tolist()) if t in action_ids]
        assert len(where) == 10 and min(where) >= start  # all 10 action tokens in the assistant span
        assert [ids[j] for j in where] == [proc.tokenizer.convert_tokens_to_ids(f"<action_{t}>") for t in row["action_tokens"]]
        assert (labels[:start] == -100).all() and (labels[where] == ids[where]).all()


def test_format_critical_objects():
    assert format_critical_objects(None) is None
    assert format_critical_objects("already text") == "already text"
    text = format_critical_objects([{"name": "bus", "location": "front", "behaviour": "stopping.", "why": "blocks"}])
    assert text == "bus (front): stopping; blocks."


def test_stages_pickle_for_ray_and_beam_workers(tmp_path):
    from _shipping import shipped

    build_fixture(tmp_path)
    inputs = [DatasetInputs("nuscenes", str(tmp_path / "annotate" / "nuscenes"), str(tmp_path / "filter" / "nuscenes"))]
    for stage in (BuildStage(inputs, BuildConfig(), K), FilterStage(tmp_path / "annotate" / "nuscenes", FilterStageConfig())):
        clone = shipped(stage)
        assert clone.fingerprint() == stage.fingerprint()
        assert [p.id for p in clone.partitions()] == [p.id for p in stage.partitions()]


def test_build_command_help_and_changed_config_refusal(tmp_path, capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["build", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for opt in ("--on-rejected", "--val-fraction", "--datasets", "--set", "--engine", "--overwrite", "--judge"):
        assert opt in help_text
    import shutil

    build_fixture(tmp_path)  # leaves build/ made with on_rejected=fast, val_fraction=0.3
    shutil.rmtree(tmp_path / "filter")  # made with other few-shot texts; the command refilters
    (tmp_path / "codebook").mkdir()
    (tmp_path / "codebook" / "codebook.json").write_text('{"k": 64}')
    argv = ["build", "--data", str(tmp_path), "--val-fraction", "0.3", "--skip-card"]
    assert main(argv + ["--on-rejected", "drop"]) == 2  # would mix configs: refused, not a traceback
    assert "different build config" in capsys.readouterr().out
    assert main(argv + ["--on-rejected", "drop", "--overwrite"]) == 0

"""The unified sample schema: record round trip, Arrow/datasets types, and validator errors naming the field."""

from __future__ import annotations

import copy
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from schemas.sample import (
    ACTION_TOKENS_FIELD,
    SAMPLE_SCHEMA,
    SCHEMA_VERSION,
    CameraClip,
    CameraFrame,
    Object,
    Sample,
    SchemaError,
    make_sample_id,
    sample_features,
    sample_id_to_filename,
    schema_with,
    table_from_rows,
    validate_row,
)


def _jpeg(w: int = 16, h: int = 12, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sample(split: str = "train") -> Sample:
    frames = tuple(CameraFrame(_jpeg(), 1_000_000 + 500_000 * i) for i in range(3))
    cams = tuple(
        CameraClip(name, 16, 12, np.array([[10.0, 0, 8], [0, 10, 6], [0, 0, 1]]), np.eye(4), frames)
        for name in ("front", "back")
    )
    fut = np.stack([np.arange(1, 11) * 2.0, np.zeros(10), np.zeros(10)], axis=1)
    return Sample(
        sample_id=make_sample_id("nuscenes", "scene-0061", "abc123"),
        dataset="nuscenes",
        split=split,
        scene_id="scene-0061",
        timestamp_us=2_000_000,
        cameras=cams,
        history=np.array([[-8.0, 0, 0], [-6, 0, 0], [-4, 0, 0], [-2, 0, 0]]),
        future=None if split == "test" else fut,
        velocity=np.array([4.0, 0.0]),
        acceleration=np.array([0.1, -0.2]),
        command="straight",
        meta_lateral=None if split == "test" else "move forward",
        meta_longitudinal=None if split == "test" else "constant speed",
        history_meta_lateral="move forward",
        history_meta_longitudinal="constant speed",
        preference_trajectories=[fut[:, :2], fut[:, :2] * 0.5],
        preference_scores=[9.0, 3.5],
        objects=(Object("vehicle", 12.0, 3.5, 0.1, 4.6, 1.9, -5.0, 0.0, "t1"),),
        source_files=("v1.0-mini/sample.json",),
        extractor_version="test",
    )


def test_record_roundtrip_through_arrow():
    s = _sample()
    row = s.to_record()
    validate_row(row)
    table = table_from_rows([row])
    assert table.schema.equals(SAMPLE_SCHEMA, check_metadata=True)
    assert table.schema.metadata[b"schema_version"] == SCHEMA_VERSION.encode()
    back = Sample.from_record(table.to_pylist()[0])
    assert back.sample_id == s.sample_id and back.command == s.command and back.extras == {}
    np.testing.assert_allclose(back.history, s.history)
    np.testing.assert_allclose(back.future, s.future)
    np.testing.assert_allclose(back.velocity, s.velocity, rtol=1e-6)
    assert [c.name for c in back.cameras] == ["front", "back"]
    assert back.cameras[0].frames[2].jpeg == s.cameras[0].frames[2].jpeg
    np.testing.assert_allclose(back.cameras[0].intrinsics, s.cameras[0].intrinsics)
    (o,), (o0,) = back.objects, s.objects  # float32 storage: equal up to float32 rounding
    assert (o.category, o.track_id) == (o0.category, o0.track_id)
    for key in ("x", "y", "heading", "length", "width", "vx", "vy"):
        assert getattr(o, key) == pytest.approx(getattr(o0, key), rel=1e-6)
    np.testing.assert_allclose(back.preference_trajectories[1], s.preference_trajectories[1])
    assert list(back.preference_scores) == [9.0, 3.5]
    validate_row(back.to_record())


def test_object_rows_hold_every_field_of_object():
    # to_record builds each object's dict by hand (asdict is slow): it must stay in step with Object and
    # OBJECT_TYPE when a field is added to either.
    from dataclasses import asdict, fields, replace

    from schemas.sample import OBJECT_TYPE

    objs = (
        Object("vehicle", 12.0, 3.5, 0.1, 4.6, 1.9, -5.0, 0.0, "t1"),
        Object("traffic_light", 30.0, -2.0, 3.1, 0.5, 0.5, None, None, "tl7", state="red"),
    )
    rows = replace(_sample(), objects=objs).to_record()["objects"]
    assert rows == [asdict(o) for o in objs]
    assert list(rows[0]) == [f.name for f in fields(Object)] == [f.name for f in OBJECT_TYPE]


def test_test_split_needs_no_future_and_extras_survive():
    s = _sample("test")
    row = s.to_record()
    validate_row(row)
    row["action_tokens"] = list(range(10))
    schema = schema_with(ACTION_TOKENS_FIELD)
    assert schema.metadata == SAMPLE_SCHEMA.metadata and schema.names[-1] == "action_tokens"
    table = table_from_rows([row], schema)
    back = Sample.from_record(table.to_pylist()[0])
    assert back.future is None and back.extras == {"action_tokens": list(range(10))}
    assert back.to_record()["action_tokens"] == list(range(10))


def test_features_decode_images():
    import datasets

    features = sample_features()
    assert isinstance(features["cameras"].feature["frames"].feature["image"], datasets.Image)
    ds = datasets.Dataset.from_list([_sample().to_record()], features=features)
    img = ds[0]["cameras"][0]["frames"][0]["image"]
    assert img.size == (16, 12)


def test_sample_ids_are_safe():
    sid = make_sample_id("waymo_e2e", "seg/ment 1", "abc-007")
    assert sid == "waymo_e2e/seg_ment_1/abc-007"
    assert "/" not in sample_id_to_filename(sid)
    with pytest.raises(ValueError):
        make_sample_id("nuplan", "///", "x")


def _mutations():
    def nan_history(r):
        r["history"][1][0] = float("nan")

    def nan_velocity(r):
        r["velocity"] = [float("nan"), 0.0]

    def short_future(r):
        r["future"] = r["future"][:9]

    def flat_future(r):
        r["future"] = [v for p in r["future"] for v in p]

    def unknown_command(r):
        r["command"] = "north"

    def decreasing_timestamps(r):
        frames = r["cameras"][0]["frames"]
        frames[1]["timestamp_us"] = frames[0]["timestamp_us"] - 1

    def missing_future(r):
        r["future"] = None

    def bad_score(r):
        r["preference_scores"] = [11.0, 3.5]

    def not_jpeg(r):
        r["cameras"][1]["frames"][0]["image"]["bytes"] = b"\x89PNG...."

    def bad_camera(r):
        r["cameras"][1]["name"] = "CAM_FRONT"

    def wrong_tokens(r):
        r["action_tokens"] = [1, 2, 3]

    def bad_id(r):
        r["sample_id"] = "nuplan/scene-0061/abc123"

    def bad_lateral(r):
        r["meta_lateral"] = "sideways"

    def nan_object(r):
        r["objects"][0]["vx"] = float("inf")

    return [
        (nan_history, "history", "non-finite"),
        (nan_velocity, "velocity", "non-finite"),
        (short_future, "future", "shape"),
        (flat_future, "future", "shape"),
        (unknown_command, "command", "north"),
        (decreasing_timestamps, "cameras[front].frames[1].timestamp_us", "not after"),
        (missing_future, "future", "missing"),
        (bad_score, "preference_scores[0]", "outside"),
        (not_jpeg, "cameras[back].frames[0].image", "JPEG"),
        (bad_camera, "cameras[1].name", "CAM_FRONT"),
        (wrong_tokens, "action_tokens", "10"),
        (bad_id, "sample_id", "dataset"),
        (bad_lateral, "meta_lateral", "sideways"),
        (nan_object, "objects[0].vx", "finite"),
    ]


@pytest.mark.parametrize(
    ("mutate", "field", "reason"), _mutations(), ids=lambda v: getattr(v, "__name__", None)
)
def test_validator_names_the_field(mutate, field, reason):
    row = copy.deepcopy(_sample().to_record())
    mutate(row)
    with pytest.raises(SchemaError) as info:
        validate_row(row)
    assert info.value.field == field
    assert reason in info.value.reason
    assert field in str(info.value) and row["sample_id"] in str(info.value)


def test_arrow_rejects_wrong_fixed_sizes():
    row = _sample().to_record()
    row["velocity"] = [1.0, 2.0, 3.0]
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, ValueError)):
        table_from_rows([row])

"""Building blocks of extraction: images, the restricted unpickler, the TFRecord index, headings."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from pipelines.io.images import (
    ImageConfig,
    ImageError,
    read_jpeg_file,
    resize_jpeg,
    scale_intrinsics,
    target_size,
)
from pipelines.io.safe_pickle import safe_load, safe_loads
from pipelines.io.tfrecord import write_records
from pipelines.sources.waymo_e2e import context_name, index_file, split_context_name, track_headings


def _jpeg(w, h, seed=0):
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    arr[:, : w // 2] = 0  # a vertical edge at the middle column
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(1920, 1280), (1600, 900), (320, 200), (64, 40), (1000, 3000)])
def test_target_size_respects_budget_aspect_and_multiple(size):
    w, h = target_size(*size, max_pixels=448 * 448, multiple=28)
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 448 * 448
    assert w <= size[0] + 14 and h <= size[1] + 14  # never upscaled beyond rounding
    tol = 0.15 if min(size) >= 150 else 0.3  # rounding to 28 px distorts tiny images more
    assert abs(np.log((w / h) / (size[0] / size[1]))) < tol


def test_resize_uses_draft_and_keeps_geometry():
    data = _jpeg(1920, 1280)
    cfg = ImageConfig()
    out = resize_jpeg(data, cfg)
    assert (out.source_width, out.source_height) == (1920, 1280)
    assert (out.width, out.height) == target_size(1920, 1280, cfg.max_pixels, cfg.multiple)
    img = Image.open(io.BytesIO(out.jpeg))
    assert img.format == "JPEG" and img.size == (out.width, out.height)
    # the edge stays at the middle column (no shift from draft scaling or resizing)
    row = np.asarray(img.convert("L"), dtype=float).mean(axis=0)
    edge = int(np.argmax(np.diff(row)))
    assert abs(edge + 0.5 - out.width / 2) <= 1.5
    same = resize_jpeg(data, ImageConfig(draft=False))
    assert (same.width, same.height) == (out.width, out.height)


def test_draft_decode_maps_source_edges_exactly_for_odd_sizes():
    """libjpeg's 1/8 output is ceil(W/8) wide; the resize must use the source's exact extent."""
    from pipelines.io.images import decode_resized

    # not a multiple of the DCT scale: the last draft pixel is partly padding
    w, h = 8 * 300 + 1, 8 * 200 + 1
    arr = np.zeros((h, w), np.uint8)
    arr[:, 2000:] = 255  # a sharp edge on a block boundary
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=100)
    for draft in (True, False):
        im, src = decode_resized(
            buf.getvalue(), ImageConfig(max_pixels=60_000, multiple=4, draft=draft)
        )
        assert src == (w, h) and im.size == (296, 200)
        row = np.asarray(im.convert("L"), dtype=float).mean(axis=0)
        j = int(np.argmax(row > 127.5))
        crossing = j - 1 + (127.5 - row[j - 1]) / (row[j] - row[j - 1])
        # pixel-centre coordinates, as scale_intrinsics assumes (the old draft path was 0.65 px off)
        assert abs(crossing - (2000 * im.size[0] / w - 0.5)) < 0.2, draft


def test_scaled_intrinsics_project_like_the_original():
    k = np.array([[1000.0, 0, 959.5], [0, 1000.0, 639.5], [0, 0, 1]])
    k2 = scale_intrinsics(k, (1920, 1280), (588, 392))
    point = np.array([2.0, -1.0, 10.0])
    u, v, w = k @ point
    u2, v2, w2 = k2 @ point
    assert u2 / w2 == pytest.approx((u / w + 0.5) * 588 / 1920 - 0.5)
    assert v2 / w2 == pytest.approx((v / w + 0.5) * 392 / 1280 - 0.5)
    assert k2[0, 2] == pytest.approx(587 / 2) and k2[1, 2] == pytest.approx(
        391 / 2
    )  # centre stays centre


def test_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="missing.jpg"):
        read_jpeg_file(str(tmp_path / "missing.jpg"), ImageConfig())
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8not a jpeg")
    with pytest.raises(ImageError, match="bad.jpg"):
        read_jpeg_file(str(bad), ImageConfig())


def test_safe_pickle_reads_navsim_like_data_and_refuses_code(tmp_path):
    frames = [
        {
            "token": "abc",
            "timestamp": 1,
            "ego2global_translation": np.array([1.0, 2.0, 0.0]),
            "driving_command": np.array([0, 1, 0, 0], dtype=np.int64),
            "anns": {
                "gt_names": np.array(["vehicle"], dtype="<U16"),
                "ids": ["t"],
                "flag": np.bool_(True),
            },
            "misc": (1, 2.5, None, {"x"}, np.float32(3)),
        }
    ]
    for proto in range(2, 6):
        back = safe_loads(pickle.dumps(frames, protocol=proto))
        np.testing.assert_array_equal(
            back[0]["ego2global_translation"], frames[0]["ego2global_translation"]
        )
        assert back[0]["anns"]["gt_names"][0] == "vehicle" and back[0]["misc"][3] == {"x"}

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "log.pkl"
    path.write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(
        pickle.UnpicklingError, match=r"log\.pkl: refused to load global (posix|os)\.system"
    ):
        safe_load(path)
    path.write_bytes(pickle.dumps(frames)[:-20])
    with pytest.raises(pickle.UnpicklingError, match="log.pkl"):
        safe_load(path)


def test_tfrecord_index_reads_names_and_stops_at_truncation(tmp_path):
    from waymo_open_dataset.protos import end_to_end_driving_data_pb2 as e2e_pb2

    records = []
    for i in range(3):
        f = e2e_pb2.E2EDFrame()
        f.frame.context.name = f"seg-a-{i * 5:03d}"
        f.frame.images.add(name=1, image=os.urandom(5000))
        f.past_states.pos_x.extend([0.0] * 16)
        records.append(f.SerializeToString())
    assert context_name(records[0][:64]) == "seg-a-000"
    assert split_context_name("seg-a-005") == ("seg-a", 5) and split_context_name("nodash") is None
    path = tmp_path / "training_0000.tfrecord-00000-of-00001"
    write_records(path, records)
    idx = index_file(path)
    assert [n for n, _ in idx.frames] == [
        "seg-a-000",
        "seg-a-005",
        "seg-a-010",
    ] and idx.error is None
    os.truncate(path, path.stat().st_size - 10)
    idx = index_file(path)
    assert len(idx.frames) == 2 and "truncated" in str(idx.error) and path.name in str(idx.error)


def test_track_headings_follow_an_arc_and_hold_when_static():
    # a circle of radius 10 m driven at 5 m/s, 4 Hz, ego at index 15 heading 0
    t = (np.arange(36) - 15) * 0.25
    ang = 5.0 * t / 10.0
    xy = np.stack([10 * np.sin(ang), 10 * (1 - np.cos(ang))], axis=1)
    h = track_headings(xy, 15, 0.2)
    np.testing.assert_allclose(h, ang, atol=2e-3)  # central differences are exact on arcs
    vel = np.stack([5 * np.cos(ang), 5 * np.sin(ang)], axis=1)
    np.testing.assert_allclose(track_headings(xy, 15, 0.2, vel), ang, atol=1e-9)
    static = np.zeros((36, 2))
    assert (track_headings(static, 15, 0.2) == 0).all()


def _future(speeds, y=None):
    """A future (10,3) along +x whose 0.5 s steps have the given speeds, with optional lateral offsets."""
    x = np.cumsum(np.asarray(speeds, dtype=float) * 0.5)
    y = np.zeros_like(x) if y is None else np.asarray(y, dtype=float)
    return np.stack([x, y, np.zeros_like(x)], axis=1)


@pytest.mark.parametrize(
    "speeds, want",
    [
        ([0.1] * 10, "stop"),
        ([5.0] * 9 + [0.2], "deceleration to zero"),
        ([5.0] * 9 + [5.7], "constant speed"),
        # first and last speed only, not the mean
        ([1.0] + [9.0] * 8 + [3.0], "quick acceleration"),
        ([5.0] * 9 + [7.0], "acceleration"),
        ([6.0] * 9 + [2.0], "quick deceleration"),
        ([6.0] * 9 + [4.0], "deceleration"),
        ([0.2] * 9 + [1.5], "quick acceleration"),  # v0 stopped, v1 moving
    ],
)
def test_longitudinal_meta_action_follows_design_section_5(speeds, want):
    from pipelines.meta_actions import future_meta_action

    lat, lon = future_meta_action(_future(speeds))
    assert lon.value == want
    assert (lat.value == "none") == (want == "stop")  # lateral is not used only when stopped


@pytest.mark.parametrize(
    "y, want",
    [
        ([0.0] * 9 + [1.9], "move forward"),
        ([0.0] * 8 + [3.0, 4.5], "turn left"),
        ([0.0] * 8 + [-3.0, -4.5], "turn right"),
        ([0.0] * 8 + [2.5, 3.5], "change lane to left"),
        ([0.0] * 5 + [-2.5] * 5, "change lane to right"),
        ([0.0] * 4 + [-2.5] * 5 + [0.5], "change lane to left"),  # by the sign of the final y
    ],
)
def test_lateral_meta_action_follows_design_section_5(y, want):
    from pipelines.meta_actions import future_meta_action

    lat, _ = future_meta_action(_future([8.0] * 10, y))
    assert lat.value == want


def test_history_meta_action_runs_from_the_oldest_pose_to_now():
    from pipelines.meta_actions import history_meta_action

    # oldest .. newest at 2 Hz, ending 0.5 s before the origin: speeds 2 (oldest step) .. 6 (into now)
    hist = np.array([[-7.5, 0, 0], [-6.5, 0, 0], [-5.0, 0, 0], [-3.0, 0, 0]])
    lat, lon = history_meta_action(hist)
    assert (lat.value, lon.value) == ("move forward", "quick acceleration")  # v0 = 2, v1 = 6
    # heading north, then east: in the oldest pose's frame the track ends 6 m to the right
    turn = np.array(
        [[-6.0, -6.0, np.pi / 2], [-6.0, -2.0, np.pi / 2], [-4.0, 0.0, 0.0], [-2.0, 0.0, 0.0]]
    )
    lat, _ = history_meta_action(turn)
    assert lat.value == "turn right"  # now is 6 m right of where the track started
    assert history_meta_action(np.zeros((0, 3))) == (None, None)

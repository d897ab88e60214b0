"""Bench2Drive source: rows validate and match the simulator; left-handed frames, cameras and objects converted."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from _extract_util import assert_counts_add_up, extract
from PIL import Image

from pipelines.geometry import poses_to_local, vectors_to_local
from pipelines.sample_data.bench2drive import CAMERAS as RIG
from pipelines.sample_data.bench2drive import _clip_scene, carla_transform
from pipelines.sample_data.common import SIZES
from pipelines.sample_data.render import Renderer, make_camera
from pipelines.sources.bench2drive import camera_extrinsics, command_of
from schemas.sample import validate_row


@pytest.fixture(scope="module")
def b2d(sample_data, tmp_path_factory):
    summary, rows = extract("bench2drive", sample_data.bench2drive, tmp_path_factory.mktemp("b2d"))
    return summary, rows


def _gt_pose(by_frame: dict, scene: str, i: int) -> np.ndarray:
    """World pose of the simulator at frame ``i`` of clip ``scene``."""
    r = by_frame[(scene, f"{i:05d}")]
    return np.array([r["x"], r["y"], r["yaw"]])


def _all_gt(sample_data) -> list[dict]:
    lines = sample_data.ground_truth.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["dataset"] == "bench2drive"]


def test_rows_validate_and_match_the_simulator(sample_data, b2d):
    summary, rows = b2d
    assert_counts_add_up(summary)
    assert summary.failed == {} and set(summary.dropped) == {"window_too_short"}
    assert len(rows) == 6 and {r["split"] for r in rows} == {"train"}
    gt = {(r["scene"], r["frame"]): r for r in _all_gt(sample_data)}
    for row in rows:
        validate_row(row)
        scene, c = row["scene_id"], int(row["sample_id"].split("/")[-1])
        assert row["timestamp_us"] == c * 100_000
        origin = _gt_pose(gt, scene, c)
        fut = poses_to_local(np.stack([_gt_pose(gt, scene, c + 5 * k) for k in range(1, 11)]), origin)
        hist = poses_to_local(np.stack([_gt_pose(gt, scene, c + 5 * k) for k in range(-4, 0)]), origin)
        for got, want in ((row["future"], fut), (row["history"], hist)):
            got = np.asarray(got)
            assert np.abs(got[:, :2] - want[:, :2]).max() < 0.01, row["sample_id"]  # 1 cm
            assert np.abs(np.angle(np.exp(1j * (got[:, 2] - want[:, 2])))).max() < 0.01  # 0.01 rad
        g = gt[(scene, f"{c:05d}")]
        v = vectors_to_local(np.array([g["vx"], g["vy"]]), origin[2])
        a = vectors_to_local(np.array([g["ax"], g["ay"]]), origin[2])
        assert np.abs(np.asarray(row["velocity"]) - v).max() < 0.05
        assert np.abs(np.asarray(row["acceleration"]) - a).max() < 0.5  # +-0.1 s differences vs 0.01 s
        assert row["command"] == g["command"]
        cams = {c["name"]: c for c in row["cameras"]}
        assert list(cams) == ["front", "front_left", "front_right", "back"]
        assert all(len(c["frames"]) == 4 for c in cams.values())
        assert [f["timestamp_us"] for f in cams["front"]["frames"]] == [(c - d) * 100_000 for d in (15, 10, 5, 0)]


def test_a_left_turn_has_positive_y_in_the_future(b2d):
    _, rows = b2d
    turning = [r for r in rows if r["scene_id"].startswith("NonSignalizedJunctionLeftTurn")]
    assert turning, "the first generated clip is steered into a left turn"
    for r in turning:
        fut = np.asarray(r["future"])
        assert r["command"] == "left" and r["meta_lateral"] == "turn left"
        assert fut[-1, 1] > 2.0 and fut[-1, 2] > 0.5, fut[-1]  # left of the ego, heading turned CCW


def test_pose_comes_from_world2ego_not_gnss(sample_data, tmp_path):
    """Anno x/y are GNSS 1.4 m behind the origin with noise: garbage there must not change the rows."""
    data = shutil.copytree(sample_data.bench2drive, tmp_path / "b2d")
    gt = {(r["scene"], r["frame"]): r for r in _all_gt(sample_data)}
    offsets = []
    for path in sorted(data.rglob("anno/*.json.gz")):
        anno = json.loads(gzip.decompress(path.read_bytes()))
        scene = "_".join(path.relative_to(data).parts[:2])
        g = gt[(scene, path.name[:5])]
        behind = np.array([g["x"], g["y"]]) - 1.4 * np.array([np.cos(g["yaw"]), np.sin(g["yaw"])])
        offsets.append(np.hypot(anno["x"] - behind[0], -anno["y"] - behind[1]))
        anno["x"], anno["y"], anno["theta"] = anno["x"] + 50.0, 1e6, None
        path.write_bytes(gzip.compress(json.dumps(anno).encode()))
    assert 0.1 < float(np.median(offsets)) < 2.0  # GNSS noise around the antenna position
    base, base_rows = extract("bench2drive", sample_data.bench2drive, tmp_path / "o1")
    summary, rows = extract("bench2drive", data, tmp_path / "o2")
    assert summary.written == base.written
    for a, b in zip(rows, base_rows, strict=True):
        assert a["future"] == b["future"] and a["velocity"] == b["velocity"]


def test_camera_extrinsics_match_the_renderers_camera():
    for cid, xyz, yaw, fov in RIG:
        ours = camera_extrinsics(carla_transform(xyz, yaw))
        cam = make_camera(cid, 160, 90, fov, (xyz[0], -xyz[1], xyz[2]), -yaw)
        np.testing.assert_allclose(ours, cam.cam_to_ego, atol=1e-12)
    assert command_of(1, {"LEFT": "left"}) == "left" and command_of(None, {}) == "unknown"
    assert command_of(99, {"LEFT": "left"}) == "unknown"


def test_projected_object_lands_on_its_rendered_box(sample_data, b2d):
    """The extracted car, projected with the extracted front calibration, covers its rendered pixels (1 px)."""
    _, rows = b2d
    spec = SIZES["tiny"]
    scene, start = _clip_scene(0, 0, spec.bench2drive_duration_s, left_turn=True)
    checked = 0
    for row in (r for r in rows if r["scene_id"].startswith("NonSignalizedJunctionLeftTurn")):
        c = int(row["sample_id"].split("/")[-1])
        t = start + 0.1 * c
        pose = scene.pose(t)
        front = next(cam for cam in row["cameras"] if cam["name"] == "front")
        k = np.asarray(front["intrinsics"]).reshape(3, 3)
        ext = np.asarray(front["extrinsics"]).reshape(4, 4)
        w, h = front["width"], front["height"]
        boxes = {b.track_id: b for b in scene.boxes(t, max_range=100.0)}
        for obj in row["objects"]:
            if obj["category"] != "vehicle" or not 6.0 < obj["x"] < 40.0:
                continue
            # the simulator's box with this position (track ids are hashed in the annotation)
            box = min(boxes.values(), key=lambda b: np.hypot(*poses_to_local(np.array([[b.x, b.y, b.yaw]]), pose)[0, :2] - [obj["x"], obj["y"]]))
            if box.category != "car":
                continue
            corners = _corners_ego(obj, box.z, box.height)
            pc = (np.linalg.inv(ext) @ np.c_[corners, np.ones(8)].T)[:3]
            if (pc[2] < 0.5).any():
                continue
            uv = (k @ pc)[:2] / pc[2]
            lo, hi = uv.min(axis=1), uv.max(axis=1)
            if lo[0] < 0 or lo[1] < 0 or hi[0] > w or hi[1] > h or (hi - lo).min() < 3:
                continue
            # render that one box at the stored resolution with the generator's own camera
            gen_cam = make_camera("front", w, h, RIG[0][3], (RIG[0][1][0], 0.0, RIG[0][1][2]), 0.0)
            img = np.asarray(Renderer(scene).render(gen_cam, pose, [box])).astype(int)
            red = (img[..., 0] > 100) & (img[..., 0] > 2 * img[..., 1]) & (img[..., 0] > 2 * img[..., 2])
            ys, xs = np.nonzero(red)
            assert len(xs), row["sample_id"]
            assert abs(xs.min() - lo[0]) <= 1 and abs(xs.max() + 1 - hi[0]) <= 1, (xs.min(), xs.max(), lo, hi)
            assert abs(ys.min() - lo[1]) <= 1 and abs(ys.max() + 1 - hi[1]) <= 1, (ys.min(), ys.max(), lo, hi)
            # and the stored frame shows the car there too (JPEG quality 20, resized: its centre)
            stored = np.asarray(Image.open(io.BytesIO(front["frames"][-1]["image"]["bytes"])).convert("RGB")).astype(int)
            cu, cv = int((lo[0] + hi[0]) / 2), int((lo[1] + hi[1]) / 2)
            px = stored[cv, cu]
            assert px[0] > px[1] + 40 and px[0] > px[2] + 40, px
            checked += 1
    assert checked >= 1


def _corners_ego(obj: dict, z: float, height: float) -> np.ndarray:
    c, s = np.cos(obj["heading"]), np.sin(obj["heading"])
    out = []
    for dx in (-0.5, 0.5):
        for dy in (-0.5, 0.5):
            for dz in (-0.5, 0.5):
                lx, ly = dx * obj["length"], dy * obj["width"]
                out.append([obj["x"] + c * lx - s * ly, obj["y"] + s * lx + c * ly, z + dz * height])
    return np.asarray(out)


def test_objects_quirks_static_vehicles_pedestrians_lights(b2d):
    _, rows = b2d
    spec = SIZES["tiny"]
    scene, start = _clip_scene(0, 0, spec.bench2drive_duration_s, left_turn=True)
    row = next(r for r in rows if r["scene_id"].startswith("NonSignalizedJunctionLeftTurn"))
    t = start + 0.1 * int(row["sample_id"].split("/")[-1])
    pose = scene.pose(t)
    sim = scene.boxes(t, max_range=100.0)
    local = poses_to_local(np.array([[b.x, b.y, b.yaw] for b in sim]), pose)
    cats = {o["category"] for o in row["objects"]}
    assert {"vehicle", "pedestrian", "traffic_light"} <= cats
    for obj in row["objects"]:
        if obj["category"] in ("traffic_light", "traffic_sign"):
            assert obj["vx"] == 0 and obj["state"]
            if obj["category"] == "traffic_light":
                assert obj["state"] in ("red", "yellow", "green")
            continue
        j = int(np.argmin(np.hypot(local[:, 0] - obj["x"], local[:, 1] - obj["y"])))
        b = sim[j]
        assert np.hypot(local[j, 0] - obj["x"], local[j, 1] - obj["y"]) < 0.01  # incl. static vehicles
        assert abs(np.angle(np.exp(1j * (local[j, 2] - obj["heading"])))) < 0.01
        assert abs(obj["length"] - b.length) < 1e-4 and abs(obj["width"] - b.width) < 1e-4  # HALF extents x2
        v = vectors_to_local(np.array([b.vx, b.vy]), pose[2])
        tol = 0.1 if b.category == "pedestrian" else 0.05  # pedestrians: differenced (their speed is 0)
        assert np.abs(np.array([obj["vx"], obj["vy"]]) - v).max() < tol, (b.track_id, obj, v)
    assert any(o["category"] == "pedestrian" and np.hypot(o["vx"], o["vy"]) > 0.5 for o in row["objects"])
    assert any(":parked" in b.track_id for b in sim)


def test_release_archives_from_object_storage_match_directories(sample_data, b2d, tmp_path):
    """The released per-clip .tar.gz, read through fsspec (memory://) without unpacking, gives the same rows."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = sample_data.bench2drive
    for clip in sorted(p.parent for p in root.rglob("anno")):
        name = "_".join(clip.relative_to(root).parts)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(clip, arcname=name)
        fs.pipe(f"/h17b2d/{name}.tar.gz", buf.getvalue())
    fs.pipe("/h17b2d/bench2drive_base_train_val_split.json", (root / "bench2drive_base_train_val_split.json").read_bytes())
    try:
        summary, rows = extract("bench2drive", "memory://h17b2d", tmp_path / "out")
    finally:
        fs.rm("/h17b2d", recursive=True)
    _, base_rows = b2d
    assert_counts_add_up(summary)
    assert [r["sample_id"] for r in rows] == [r["sample_id"] for r in base_rows]
    for a, b in zip(rows, base_rows, strict=True):
        assert a["future"] == b["future"] and a["objects"] == b["objects"]
        assert a["cameras"][0]["frames"][-1]["image"]["bytes"] == b["cameras"][0]["frames"][-1]["image"]["bytes"]
        assert "!" in a["source_files"][0]  # archive!member

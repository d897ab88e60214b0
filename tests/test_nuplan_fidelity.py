"""NAVSIM/OpenScene fidelity (issue 14 items 1, 2, 5, 9) and the lens-distortion schema fields."""

from __future__ import annotations

import io
import pickle
import shutil

import numpy as np
import pytest
from _extract_util import assert_counts_add_up, extract, extract_config
from PIL import Image

from pipelines.geometry import (
    distort_normalized,
    project_points,
    pyquaternion_yaw,
    rotation_from_quaternion,
    yaw_from_quaternion,
)
from pipelines.io.safe_pickle import safe_load
from pipelines.sources import SourceError
from pipelines.sources.nuplan import frame_pose
from pipelines.stages.extract import ExtractStage
from schemas.sample import SchemaError, sample_features, validate_row

# Colours of the sample renderer (pipelines/sample_data/render.py OBJECT_COLOURS), with shading.
CENTRE_Z = 0.8  # m: inside every rendered box (cars 1.6 m, trucks 3.2 m, pedestrians 1.75 m tall)


def _hits(px: np.ndarray, category: str) -> bool:
    r, g, b = (int(v) for v in px[:3])
    if category == "vehicle":  # red car or blue truck
        return (r > 100 and r > 2 * g and r > 2 * b) or (b > 100 and b > 2 * r and b > 1.5 * g)
    return r > 170 and 80 < g < 210 and b < 90  # pedestrian: orange


@pytest.fixture(scope="module")
def navsim(tmp_path_factory):
    """NAVSIM logs written like OpenScene's converter, at a resolution where boxes cover pixels."""
    from pipelines.sample_data import generate

    data = generate(tmp_path_factory.mktemp("navsim"), seed=1, datasets=("nuplan",), image_size=(320, 200))
    summary, rows = extract("nuplan", data.nuplan, tmp_path_factory.mktemp("navsim_out"))
    assert_counts_add_up(summary)
    return data, summary, rows


def _hit_rate(rows: list[dict], wrong_lidar: np.ndarray | None = None) -> tuple[int, int]:
    ok = total = 0
    for r in rows:
        for cam in r["cameras"]:
            ext = np.asarray(cam["extrinsics"], np.float64).reshape(4, 4)
            if wrong_lidar is not None:
                ext = wrong_lidar @ ext  # the old reading: lidar2ego @ sensor2lidar
            img = np.asarray(Image.open(io.BytesIO(cam["frames"][-1]["image"]["bytes"])).convert("RGB"))
            h, w = img.shape[:2]
            objs = r["objects"] or []
            if not objs:
                continue
            pts = np.array([[o["x"], o["y"], CENTRE_Z] for o in objs])
            uv, depth = project_points(pts, cam["intrinsics"], ext, cam["distortion_model"], cam["distortion"])
            fx = np.asarray(cam["intrinsics"]).reshape(3, 3)[0, 0]
            best = None
            for j, o in enumerate(objs):
                size_px = fx * min(o["length"], o["width"]) / max(depth[j], 1e-6)
                if depth[j] > 2.0 and size_px >= 4 and 2 <= uv[j, 0] < w - 2 and 2 <= uv[j, 1] < h - 2:
                    if best is None or depth[j] < depth[best]:
                        best = j
            if best is not None:
                total += 1
                ok += _hits(img[int(uv[best, 1]), int(uv[best, 0])], objs[best]["category"])
    return ok, total


def test_nuplan_extrinsics_are_sensor2lidar_and_objects_land_on_their_boxes(navsim):
    """Item 1: camera-to-ego is sensor2lidar_* as written (OpenScene), not lidar2ego @ sensor2lidar."""
    data, _, rows = navsim
    assert rows
    log = sorted((data.nuplan / "navsim_logs").glob("*/*.pkl"))[0]
    frames = {f["token"]: f for f in safe_load(log)}
    l2e = None
    for r in rows:
        f = frames.get(r["sample_id"].split("/")[-1])
        if f is None:
            continue
        l2e = np.asarray(f["lidar2ego"], np.float64)
        front = next(c for c in r["cameras"] if c["name"] == "front")
        ext = np.asarray(front["extrinsics"], np.float64).reshape(4, 4)
        np.testing.assert_allclose(ext[:3, :3], f["cams"]["CAM_F0"]["sensor2lidar_rotation"], atol=1e-6)
        np.testing.assert_allclose(ext[:3, 3], f["cams"]["CAM_F0"]["sensor2lidar_translation"], atol=1e-5)
    assert l2e is not None and not np.allclose(l2e, np.eye(4))  # the logs have a real lidar extrinsic
    ok, total = _hit_rate(rows)
    assert total >= 20 and ok >= 0.9 * total, f"{ok}/{total} objects project onto their rendered box"
    # The same check catches the old double composition on these logs.
    bad_ok, bad_total = _hit_rate(rows, wrong_lidar=l2e)
    assert bad_ok < 0.5 * max(bad_total, 1)


def test_nuplan_objects_velocity_rotated_from_the_lidar_frame(navsim):
    """gt_velocity_3d is in the lidar frame (OpenScene); rotated to ego it runs along each car's heading."""
    _, _, rows = navsim
    moving = [
        o
        for r in rows
        for o in (r["objects"] or [])
        if o["category"] == "vehicle" and np.hypot(o["vx"], o["vy"]) > 1.0
    ]
    assert len(moving) >= 10
    for o in moving:  # a car moves where it points (box yaw is in the ego frame)
        diff = np.angle(np.exp(1j * (np.arctan2(o["vy"], o["vx"]) - o["heading"])))
        assert abs(diff) < 0.1, o


def test_nuplan_lens_distortion_stored_and_used(navsim, tmp_path):
    """Item 2: nuPlan's per-camera `distortion` is kept (model + coefficients) and projection applies it."""
    data, _, rows = navsim
    for r in rows:
        for cam in r["cameras"]:
            assert cam["distortion_model"] == "opencv" and len(cam["distortion"]) == 5
    # Non-zero coefficients in a log reach the row unchanged.
    root = tmp_path / "nuplan"
    shutil.copytree(data.nuplan, root)
    log = sorted((root / "navsim_logs").glob("*/*.pkl"))[0]
    frames = safe_load(log)
    coeffs = np.array([-0.35, 0.12, 0.001, -0.002, -0.02])
    for f in frames:
        f["cams"]["CAM_F0"]["distortion"] = coeffs
        if len(f["anns"]["gt_velocity_3d"]):  # and one broken object velocity per frame: counted, not silent
            f["anns"]["gt_velocity_3d"][0, 0] = np.nan
    log.write_bytes(pickle.dumps(frames, protocol=4))
    for other in log.parent.glob("*.pkl"):
        if other != log:
            other.unlink()
    summary, rows2 = extract("nuplan", root, tmp_path / "out")
    with_objects = {f["token"] for f in frames if len(f["anns"]["gt_velocity_3d"])}
    written = [r for r in rows2 if r["sample_id"].split("/")[-1] in with_objects]
    assert written and summary.noted == {"objects_non_finite_box_or_velocity": len(written)}
    front = next(c for c in rows2[0]["cameras"] if c["name"] == "front")
    np.testing.assert_allclose(front["distortion"], coeffs, rtol=1e-6)
    # The card's projection uses it: the same future lands elsewhere with the lens model than without.
    from pipelines.card.plots import future_on_camera

    row = dict(rows2[0])
    with_lens = future_on_camera(row)["uv"]
    row["cameras"] = [dict(c, distortion_model=None, distortion=None) for c in row["cameras"]]
    pinhole = future_on_camera(row)["uv"]
    assert np.abs(with_lens - pinhole).max() > 1.0


def test_distortion_matches_opencv():
    cv2 = pytest.importorskip("cv2", reason="opencv-python comes with nuscenes-devkit")
    rng = np.random.default_rng(0)
    pts_cam = np.column_stack([rng.uniform(-4, 4, 50), rng.uniform(-2, 2, 50), rng.uniform(3, 40, 50)])
    k = np.array([[800.0, 0, 640], [0, 780.0, 360], [0, 0, 1]])
    ext = np.eye(4)  # camera frame = ego frame here: the lens is what is tested
    for coeffs in ([-0.3, 0.1, 0.001, -0.002, -0.03], [0.1, -0.05, 0.0, 0.0], [0.2, 0.1, 0.0, 0.0, 0.01, 0.05, 0.0, 0.01]):
        want, _ = cv2.projectPoints(pts_cam, np.zeros(3), np.zeros(3), k, np.asarray(coeffs))
        uv, depth = project_points(pts_cam, k, ext, "opencv", np.asarray(coeffs))
        np.testing.assert_allclose(uv, want.reshape(-1, 2), atol=1e-6)
        np.testing.assert_allclose(depth, pts_cam[:, 2])
    # No model: plain pinhole.
    np.testing.assert_allclose(distort_normalized(np.array([[0.3, -0.2]]), None, None), [[0.3, -0.2]])
    with pytest.raises(ValueError, match="unknown distortion model"):
        distort_normalized(np.zeros((1, 2)), "fisheye", np.zeros(4))


def test_schema_distortion_fields_validate_and_reach_the_features(navsim):
    _, _, rows = navsim
    row = rows[0]
    validate_row(row)
    cams = [dict(c) for c in row["cameras"]]
    for bad, field in (
        ({"distortion_model": "fisheye"}, "distortion_model"),
        ({"distortion": [0.1, 0.2, 0.3]}, "distortion"),
        ({"distortion_model": None}, "distortion"),
    ):
        broken = dict(row, cameras=[dict(cams[0], **bad), *cams[1:]])
        with pytest.raises(SchemaError, match=field):
            validate_row(broken)
    # null model and coefficients (rectified images, other sources) stay valid
    validate_row(dict(row, cameras=[dict(c, distortion_model=None, distortion=None) for c in cams]))
    cam_feature = sample_features()["cameras"]
    cam_feature = cam_feature.feature if hasattr(cam_feature, "feature") else cam_feature[0]
    assert {"distortion_model", "distortion"} <= set(cam_feature)


def test_nuplan_yaw_is_pyquaternion_yaw_pitch_roll():
    """Item 5: NAVSIM/OpenScene headings are pyquaternion's yaw_pitch_roll[0], also on pitched poses."""
    pyq = pytest.importorskip("pyquaternion", reason="pyquaternion comes with nuscenes-devkit")
    rng = np.random.default_rng(3)
    worst_old = 0.0
    for _ in range(200):
        yaw, pitch, roll = rng.uniform(-np.pi, np.pi), np.radians(rng.uniform(3, 6)), np.radians(rng.uniform(-3, 3))
        q = pyq.Quaternion(axis=[0, 0, 1], angle=yaw) * pyq.Quaternion(axis=[0, 1, 0], angle=pitch)
        q = q * pyq.Quaternion(axis=[1, 0, 0], angle=roll)
        arr = np.array(q.elements) * rng.uniform(0.5, 2.0)  # not normalised, as a log may hold
        want = pyq.Quaternion(arr).yaw_pitch_roll[0]
        assert float(pyquaternion_yaw(arr)) == pytest.approx(want, abs=1e-12)
        pose = frame_pose({"ego2global_translation": [1.0, 2.0, 0.0], "ego2global_rotation": arr})
        assert pose[2] == pytest.approx(want, abs=1e-12)
        worst_old = max(worst_old, abs(float(yaw_from_quaternion(arr / np.linalg.norm(arr))) - want))
    assert worst_old > 1e-3  # the former formula differs on pitched poses (the 5-17 cm at 40 m)
    # Pure yaw rotations agree with the rotation matrix.
    q = np.array([np.cos(0.4), 0, 0, np.sin(0.4)])
    r = rotation_from_quaternion(q)
    assert float(pyquaternion_yaw(q)) == pytest.approx(np.arctan2(r[1, 0], r[0, 0]))


def test_nuplan_every_frame_counted_with_a_reason(navsim):
    """Item 9: frames before the first window centre appear in the counts (one outcome per frame)."""
    data, summary, rows = navsim
    assert summary.seen == data.counts["nuplan"]
    n_logs = len(list((data.nuplan / "navsim_logs").glob("*/*.pkl")))
    assert summary.dropped["before_first_window"] == 4 * n_logs  # num_history_frames - 1 per log
    first_tokens = {f[0]["token"] for f in (safe_load(p) for p in (data.nuplan / "navsim_logs").glob("*/*.pkl"))}
    assert not first_tokens & {r["sample_id"].split("/")[-1] for r in rows}
    # non-overlapping windows: frames between centres are counted too
    s2, rows2 = extract(
        "nuplan", data.nuplan, data.root / "nonoverlap", ("options.scene_filter.frame_interval=null",)
    )
    assert s2.seen == data.counts["nuplan"] and s2.dropped["not_window_centre"] > 0
    assert_counts_add_up(s2)


def test_nuplan_futureless_filter_on_a_train_split_refused_at_config_time(navsim):
    """Item 9: num_future_frames=0 with logs mapped to train fails before any work, saying what to do."""
    data, _, _ = navsim
    with pytest.raises(SourceError, match=r"num_future_frames=0.*mini -> train.*splits=\[test\]"):
        ExtractStage(extract_config("nuplan", data.nuplan, ("options.scene_filter.num_future_frames=0",)))
    # On a test split it is the normal NAVSIM test setting.
    cfg = extract_config(
        "nuplan",
        data.nuplan,
        ("options.scene_filter.num_future_frames=0", "splits=[test]", "options.split_map={mini: test}"),
    )
    ExtractStage(cfg)


def test_nuplan_no_logs_for_the_selected_splits_fails_before_work(navsim, tmp_path):
    """Item 6 (NAVSIM): an input without logs for the selected splits names what the directory holds."""
    data, _, _ = navsim
    with pytest.raises(SourceError, match=r"no log \(\*\.pkl\) of splits \['test'\].*'mini': 2"):
        ExtractStage(extract_config("nuplan", data.nuplan, ("splits=[test]",)))

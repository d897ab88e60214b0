"""nuPlan-via-NAVSIM writer: ``navsim_logs/<split>/<log>.pkl`` plus ``sensor_blobs``.

Each log pickle is a list of 2 Hz frame dicts with the keys the OpenScene
converter writes and NAVSIM reads (token, timestamp, log_name, scene_token,
map_location, roadblock_ids, ego2global_* with quaternions w first,
``ego_dynamic_state`` [vx, vy, ax, ay] in the ego frame, one-hot
``driving_command`` (left, straight, right, unknown), ``cams`` with
``sensor2lidar_*``, ``cam_intrinsic`` and ``distortion``, ``lidar2ego_*``,
``lidar_path`` and ``anns``). As in the converter
(``DriveEngine/process_data/`` in OpenDriveLab/OpenScene): ``sensor2lidar_*``
hold the camera-to-EGO transform (nuPlan's ``camera.rotation/translation``
copied as they are), ``lidar2ego`` is a real, non-identity lidar extrinsic
(here the roof lidar turned by -90 deg about z), ``gt_boxes`` centres are in
the ego frame, box yaw is the global yaw minus the ego yaw (not wrapped) and
``gt_velocity_3d`` is rotated into the lidar frame. A reader that composes
``lidar2ego @ sensor2lidar`` is off by metres on these logs, as on real ones. Only numpy arrays, dicts, lists,
str, int, float and None are pickled (protocol 4), so a restricted
unpickler that admits numpy's array reconstruction reads the logs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Final

import numpy as np

from pipelines.geometry import (
    quaternion_from_rotation,
    quaternion_from_yaw,
    rotation_from_quaternion,
    transform_matrix,
)
from pipelines.sample_data.common import SizeSpec, gt_record, simulate, token
from pipelines.sample_data.render import PinholeCamera, encode_jpeg, make_camera
from pipelines.sample_data.world import Scene

DATASET: Final = "nuplan"
EPOCH_US: Final = 1_620_857_000_000_000
FRAME_DT: Final = 0.5  # s, NAVSIM logs are 2 Hz
SCENE_FRAMES: Final = 20  # frames per nuPlan scene (scene_token changes every 10 s)
ANN_RANGE: Final = 50.0  # m
MAP_LOCATIONS: Final = (
    "us-nv-las-vegas-strip",
    "us-pa-pittsburgh-hazelwood",
    "us-ma-boston",
    "sg-one-north",
)
COMMANDS: Final = ("left", "straight", "right", "unknown")  # driving_command one-hot order
NAMES: Final = {"car": "vehicle", "truck": "vehicle", "pedestrian": "pedestrian"}
LIDAR2EGO_TRANSLATION: Final = (
    1.5,
    0.0,
    1.9,
)  # MergedPointCloud origin on the roof
LIDAR2EGO_YAW: Final = -np.pi / 2  # lidar x points to the ego's right: a non-identity rotation, as in nuPlan
# channel, position (m, ego frame), yaw (deg), horizontal FOV (deg)
CAMERAS: Final = (
    ("CAM_F0", (1.80, 0.0, 1.60), 0.0, 70.0),
    ("CAM_L0", (1.70, 0.45, 1.60), 55.0, 70.0),
    ("CAM_L1", (1.20, 0.50, 1.60), 100.0, 70.0),
    ("CAM_L2", (0.40, 0.50, 1.60), 145.0, 70.0),
    ("CAM_R0", (1.70, -0.45, 1.60), -55.0, 70.0),
    ("CAM_R1", (1.20, -0.50, 1.60), -100.0, 70.0),
    ("CAM_R2", (0.40, -0.50, 1.60), -145.0, 70.0),
    ("CAM_B0", (-0.80, 0.0, 1.60), 180.0, 70.0),
)


def camera_rig(spec: SizeSpec) -> list[tuple[str, PinholeCamera]]:
    """The 8 NAVSIM cameras at the configured resolution."""
    w, h = spec.image_size
    return [(ch, make_camera(ch, w, h, fov, xyz, yaw)) for ch, xyz, yaw, fov in CAMERAS]


def lidar2ego() -> np.ndarray:
    """4x4 lidar -> ego transform (roof translation, turned by ``LIDAR2EGO_YAW`` about z)."""
    rot = rotation_from_quaternion(quaternion_from_yaw(LIDAR2EGO_YAW))
    return transform_matrix(rot, np.asarray(LIDAR2EGO_TRANSLATION))


def _pcd(rng: np.random.Generator, n: int = 64) -> bytes:
    """A tiny binary PCD v0.7 (x y z intensity ring lidar_info) like nuPlan's MergedPointCloud."""
    ang, rad = rng.uniform(-np.pi, np.pi, n), rng.uniform(4.0, 25.0, n)
    pts = np.stack(
        [
            rad * np.cos(ang),
            rad * np.sin(ang),
            np.full(n, -LIDAR2EGO_TRANSLATION[2]),
            rng.uniform(0, 100, n),
            np.arange(n) % 32,
            np.zeros(n),
        ],
        axis=1,
    ).astype(np.float32)
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS x y z intensity ring lidar_info\n"
        f"SIZE 4 4 4 4 4 4\nTYPE F F F F F F\nCOUNT 1 1 1 1 1 1\nWIDTH {n}\nHEIGHT 1\n"
        f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA binary\n"
    )
    return header.encode() + pts.tobytes()


def _log_name(rng: np.random.Generator) -> str:
    month, day, hh, mm, ss = (
        int(rng.integers(lo, hi)) for lo, hi in ((5, 11), (1, 29), (8, 20), (0, 60), (0, 60))
    )
    veh = int(rng.choice([12, 26, 35, 47]))
    a = int(rng.integers(100, 5000))
    return f"2021.{month:02d}.{day:02d}.{hh:02d}.{mm:02d}.{ss:02d}_veh-{veh}_{a:05d}_{a + 510:05d}"


def write_nuplan(root: Path, seed: int, spec: SizeSpec) -> list[dict[str, Any]]:
    """Write the NAVSIM sample under ``root``; return the ground-truth records."""
    rig = camera_rig(spec)
    l2e = lidar2ego()
    cam_calib = {}
    for ch, cam in rig:
        # OpenScene writes nuPlan's camera-to-ego transform under the name sensor2lidar_* (see docstring).
        cam_calib[ch] = (cam.cam_to_ego[:3, :3].copy(), cam.cam_to_ego[:3, 3].copy(), cam.K.copy())
    gt: list[dict[str, Any]] = []
    index = 0
    for split, n_logs in spec.nuplan_logs.items():
        for _ in range(n_logs):
            rng = np.random.default_rng([seed, index, 13])
            log_name = _log_name(rng)
            frames = _write_log(
                root, split, seed, spec, index, log_name, rig, cam_calib, l2e, rng, gt
            )
            path = root / "navsim_logs" / split / f"{log_name}.pkl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps(frames, protocol=4))
            index += 1
    return gt


def _write_log(
    root: Path,
    split: str,
    seed: int,
    spec: SizeSpec,
    index: int,
    log_name: str,
    rig: list,
    cam_calib: dict,
    l2e: np.ndarray,
    rng: np.random.Generator,
    gt: list,
) -> list[dict[str, Any]]:
    duration = (spec.nuplan_frames - 1) * FRAME_DT
    scene, renderer = simulate(seed, DATASET, index, log_name, duration)
    blobs = root / "sensor_blobs" / split
    base_us = EPOCH_US + index * 3_600_000_000
    map_location = MAP_LOCATIONS[index % len(MAP_LOCATIONS)]
    vehicle = log_name.split("_")[1]
    tokens = [token(seed, DATASET, log_name, k, length=16) for k in range(spec.nuplan_frames)]
    frames: list[dict[str, Any]] = []
    for k in range(spec.nuplan_frames):
        t = k * FRAME_DT
        ts = base_us + int(round(t * 1e6))
        e = scene.ego(t)
        yaw = float(e["yaw"])
        quat = quaternion_from_yaw(yaw)
        c, s = np.cos(yaw), np.sin(yaw)
        v_ego = [float(c * e["vx"] + s * e["vy"]), float(-s * e["vx"] + c * e["vy"])]
        a_ego = [float(c * e["ax"] + s * e["ay"]), float(-s * e["ax"] + c * e["ay"])]
        can_bus = np.array(
            [
                float(e["x"]),
                float(e["y"]),
                0.0,
                *quat.tolist(),
                a_ego[0],
                a_ego[1],
                0.0,
                0.0,
                0.0,
                0.0,
                v_ego[0],
                v_ego[1],
                0.0,
                0.0,
                0.0,
            ]
        )
        e2g = transform_matrix(quat, can_bus[:3])
        command = scene.command(t)
        chunk = k // SCENE_FRAMES
        pose = scene.pose(t)
        boxes = scene.boxes(t, max_range=90.0)
        cams = {}
        for ch, cam in rig:
            rel = f"{log_name}/{ch}/{token(seed, DATASET, 'img', log_name, ch, k, length=16)}.jpg"
            path = blobs / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_jpeg(renderer.render(cam, pose, boxes), spec.jpeg_quality))
            rot, trans, K = cam_calib[ch]
            cams[ch] = {
                "data_path": rel,
                "sensor2lidar_rotation": rot.copy(),
                "sensor2lidar_translation": trans.copy(),
                "cam_intrinsic": K.copy(),
                "distortion": np.zeros(5),
            }
        lidar_rel = f"{log_name}/MergedPointCloud/{tokens[k]}.pcd"
        (blobs / lidar_rel).parent.mkdir(parents=True, exist_ok=True)
        (blobs / lidar_rel).write_bytes(_pcd(rng))
        frames.append(
            {
                "token": tokens[k],
                "frame_idx": k % SCENE_FRAMES,
                "timestamp": ts,
                "log_name": log_name,
                "log_token": token(seed, DATASET, "log", log_name, length=16),
                "scene_name": f"log-{index + 1:04d}-scene-{chunk:04d}",
                "scene_token": token(seed, DATASET, "scene", log_name, chunk, length=16),
                "map_location": map_location,
                "roadblock_ids": [
                    str(10000 + 100 * index + j) for j in range(len(scene.route.turns) + 1)
                ],
                "vehicle_name": vehicle,
                "can_bus": can_bus,
                "lidar_path": lidar_rel,
                "lidar2ego_translation": np.asarray(LIDAR2EGO_TRANSLATION, dtype=np.float64),
                "lidar2ego_rotation": quaternion_from_rotation(l2e[:3, :3]).tolist(),
                "ego2global_translation": can_bus[:3].copy(),
                "ego2global_rotation": can_bus[3:7].copy(),
                "ego_dynamic_state": v_ego + a_ego,
                "traffic_lights": [],
                "driving_command": np.array(
                    [int(command == c_) for c_ in COMMANDS], dtype=np.int64
                ),
                "cams": cams,
                "sample_prev": tokens[k - 1] if k > 0 else None,
                "sample_next": tokens[k + 1] if k + 1 < spec.nuplan_frames else None,
                "ego2global": e2g,
                "lidar2ego": l2e.copy(),
                "lidar2global": e2g @ l2e,
                "anns": _annotations(seed, log_name, k, scene, t, pose, l2e),
            }
        )
        gt.append(gt_record(DATASET, split, log_name, tokens[k], ts, scene, t))
    return frames


def _annotations(
    seed: int, log_name: str, k: int, scene: Scene, t: float, pose: np.ndarray, l2e: np.ndarray
) -> dict[str, Any]:
    boxes = scene.boxes(t, max_range=ANN_RANGE)
    c, s = np.cos(pose[2]), np.sin(pose[2])
    rows, vel = [], []
    for b in boxes:
        dx, dy = b.x - pose[0], b.y - pose[1]
        # Centres in the ego frame, yaw = global yaw - ego yaw (the converter does not wrap it).
        rows.append(
            [
                c * dx + s * dy,
                -s * dx + c * dy,
                b.z,
                b.length,
                b.width,
                b.height,
                b.yaw - float(pose[2]),
            ]
        )
        v_ego = np.array([c * b.vx + s * b.vy, -s * b.vx + c * b.vy, 0.0])
        vel.append((l2e[:3, :3].T @ v_ego).tolist())  # velocities are expressed in the lidar frame
    return {
        "gt_boxes": np.asarray(rows, dtype=np.float64).reshape(-1, 7),
        "gt_names": np.array([NAMES[b.category] for b in boxes], dtype="<U16"),
        "gt_velocity_3d": np.asarray(vel, dtype=np.float64).reshape(-1, 3),
        "instance_tokens": [
            token(seed, DATASET, "box", log_name, k, b.track_id, length=16) for b in boxes
        ],
        "track_tokens": [token(seed, DATASET, "track", b.track_id, length=16) for b in boxes],
    }

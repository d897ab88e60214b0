"""WOD-E2E writer: shuffled TFRecords of ``E2EDFrame`` protos with 8 JPEG cameras.

Faithful to the real layout (DESIGN.md section 12): only ``context.name``
(``<segment>-<NNN>``, NNN the 10 Hz index), ``context.camera_calibrations``,
``timestamp_micros`` and ``images`` of the inner frame are filled;
``past_states`` (16 at 4 Hz over (-4 s, 0]) and ``future_states`` (20 at 4 Hz
over (0, 5 s]) are in the ego frame at t0 (rear axle, x forward, y left);
validation frames carry 3 rater ``preference_trajectories``; the test split
has no future. Frames are shuffled across the files of a split.

Camera extrinsics are vehicle <- camera with Waymo's camera axes (x forward,
y left, z up), intrinsics ``[f_u, f_v, c_u, c_v, k1, k2, p1, p2, k3]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

import numpy as np
from waymo_open_dataset import dataset_pb2
from waymo_open_dataset.protos import end_to_end_driving_data_pb2 as e2e_pb2

from pipelines.geometry import poses_to_local, vectors_to_local
from pipelines.io.tfrecord import write_records
from pipelines.sample_data.common import SizeSpec, gt_record, simulate, token
from pipelines.sample_data.render import PinholeCamera, encode_jpeg, make_camera
from pipelines.sample_data.world import Scene

log = logging.getLogger(__name__)

DATASET: Final = "waymo_e2e"
EPOCH_US: Final = 1_650_000_000_000_000
STATE_DT: Final = 0.25  # s, 4 Hz past/future states
PAST_STEPS: Final = 16
FUTURE_STEPS: Final = 20
INTENT: Final = {
    "unknown": e2e_pb2.EgoIntent.UNKNOWN,
    "straight": e2e_pb2.EgoIntent.GO_STRAIGHT,
    "left": e2e_pb2.EgoIntent.GO_LEFT,
    "right": e2e_pb2.EgoIntent.GO_RIGHT,
}
# name enum, position (m, ego frame), yaw (deg), horizontal FOV (deg), height factor (side cameras are shorter)
CAMERAS: Final = (
    (dataset_pb2.CameraName.FRONT, (1.55, 0.0, 2.10), 0.0, 60.0, 1.0),
    (dataset_pb2.CameraName.FRONT_LEFT, (1.50, 0.10, 2.10), 45.0, 60.0, 1.0),
    (dataset_pb2.CameraName.FRONT_RIGHT, (1.50, -0.10, 2.10), -45.0, 60.0, 1.0),
    (dataset_pb2.CameraName.SIDE_LEFT, (1.30, 0.15, 2.10), 90.0, 60.0, 0.7),
    (dataset_pb2.CameraName.SIDE_RIGHT, (1.30, -0.15, 2.10), -90.0, 60.0, 0.7),
    (dataset_pb2.CameraName.REAR_LEFT, (0.20, 0.30, 2.10), 135.0, 60.0, 1.0),
    (dataset_pb2.CameraName.REAR, (-0.50, 0.0, 2.10), 180.0, 60.0, 1.0),
    (dataset_pb2.CameraName.REAR_RIGHT, (0.20, -0.30, 2.10), -135.0, 60.0, 1.0),
)
# OpenCV camera axes (x right, y down, z forward) from Waymo's (x forward, y left, z up).
CV_FROM_WAYMO: Final = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


def camera_rig(spec: SizeSpec) -> list[tuple[int, PinholeCamera]]:
    """The 8 cameras with their Waymo name enums, at the configured resolution."""
    w, h = spec.image_size
    return [
        (
            name,
            make_camera(
                dataset_pb2.CameraName.Name.Name(name), w, max(16, round(h * hf)), fov, xyz, yaw
            ),
        )
        for name, xyz, yaw, fov, hf in CAMERAS
    ]


def waymo_extrinsic(camera: PinholeCamera) -> np.ndarray:
    """Vehicle <- camera transform in Waymo's camera axes (what ``CameraCalibration.extrinsic`` stores)."""
    out = camera.cam_to_ego.copy()
    out[:3, :3] = camera.cam_to_ego[:3, :3] @ CV_FROM_WAYMO
    return out


def _calibration(name: int, camera: PinholeCamera) -> dataset_pb2.CameraCalibration:
    k = camera.K
    cal = dataset_pb2.CameraCalibration(name=name, width=camera.width, height=camera.height)
    cal.intrinsic.extend([k[0, 0], k[1, 1], k[0, 2], k[1, 2], 0.0, 0.0, 0.0, 0.0, 0.0])
    cal.extrinsic.transform.extend(waymo_extrinsic(camera).reshape(16).tolist())
    return cal


def _states(
    msg: e2e_pb2.EgoTrajectoryStates, scene: Scene, t0: float, times: np.ndarray
) -> np.ndarray:
    """Fill ``msg`` with the ego states at ``times`` in the ego frame at ``t0``; return the positions."""
    origin = scene.pose(t0)
    e = scene.ego(times)
    local = poses_to_local(np.stack([e["x"], e["y"], e["yaw"]], axis=1), origin)
    vel = vectors_to_local(np.stack([e["vx"], e["vy"]], axis=1), origin[2])
    acc = vectors_to_local(np.stack([e["ax"], e["ay"]], axis=1), origin[2])
    msg.pos_x.extend(local[:, 0].tolist())
    msg.pos_y.extend(local[:, 1].tolist())
    msg.pos_z.extend([0.0] * len(times))
    msg.vel_x.extend(vel[:, 0].tolist())
    msg.vel_y.extend(vel[:, 1].tolist())
    msg.accel_x.extend(acc[:, 0].tolist())
    msg.accel_y.extend(acc[:, 1].tolist())
    return local[:, :2]


def _preferences(frame: e2e_pb2.E2EDFrame, future_xy: np.ndarray, rng: np.random.Generator) -> None:
    """Three rater trajectories: near the truth (high score), a lateral deviation, a hesitant one."""
    ramp = np.linspace(0.0, 1.0, len(future_xy))[:, None]
    good = future_xy + rng.normal(0.0, 0.15, future_xy.shape) * ramp
    lateral = future_xy + np.stack(
        [np.zeros(len(ramp)), ramp[:, 0] ** 2 * rng.choice([-1, 1]) * rng.uniform(2.0, 3.5)], axis=1
    )
    slow = future_xy * rng.uniform(0.55, 0.75)
    cands = [
        (good, rng.uniform(8.5, 10.0)),
        (lateral, rng.uniform(4.0, 6.5)),
        (slow, rng.uniform(1.0, 4.0)),
    ]
    for i in rng.permutation(3):
        xy, score = cands[i]
        traj = frame.preference_trajectories.add()
        traj.pos_x.extend(xy[:, 0].tolist())
        traj.pos_y.extend(xy[:, 1].tolist())
        traj.preference_score = round(float(score), 1)


def write_waymo(out_dir: Path, seed: int, spec: SizeSpec) -> list[dict[str, Any]]:
    """Write the WOD-E2E sample under ``out_dir``; return the ground-truth records."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rig = camera_rig(spec)
    calibrations = [_calibration(name, cam) for name, cam in rig]
    gt: list[dict[str, Any]] = []
    scene_index = 0
    for split, n_segments in spec.waymo_segments.items():
        duration = spec.waymo_test_duration_s if split == "test" else spec.waymo_duration_s
        records: list[bytes] = []
        for _ in range(n_segments):
            segment = token(seed, DATASET, "segment", scene_index)
            scene, renderer = simulate(seed, DATASET, scene_index, segment, duration)
            rng = np.random.default_rng([seed, scene_index, 7])
            base_us = EPOCH_US + scene_index * 3_600_000_000
            scene_index += 1
            for idx in range(0, int(round(duration * 10)) + 1, spec.waymo_stride):
                t = idx / 10.0
                ts = base_us + int(round(t * 1e6))
                frame = e2e_pb2.E2EDFrame()
                frame.frame.context.name = f"{segment}-{idx:03d}"
                frame.frame.context.camera_calibrations.extend(calibrations)
                frame.frame.timestamp_micros = ts
                pose, boxes = scene.pose(t), scene.boxes(t, max_range=90.0)
                for name, cam in rig:
                    img = renderer.render(cam, pose, boxes)
                    frame.frame.images.add(name=name, image=encode_jpeg(img, spec.jpeg_quality))
                _states(frame.past_states, scene, t, t + STATE_DT * np.arange(-(PAST_STEPS - 1), 1))
                if split != "test":
                    fut = _states(
                        frame.future_states, scene, t, t + STATE_DT * np.arange(1, FUTURE_STEPS + 1)
                    )
                    if split == "validation":
                        _preferences(frame, fut, rng)
                command = scene.command(t)
                frame.intent = INTENT[command]
                records.append(frame.SerializeToString())
                gt.append(
                    gt_record(DATASET, split, segment, frame.frame.context.name, ts, scene, t)
                )
        _write_shuffled(
            out_dir,
            split,
            records,
            spec.waymo_files[split],
            np.random.default_rng([seed, 99, len(gt)]),
        )
    return gt


def _write_shuffled(
    out_dir: Path, split: str, records: list[bytes], n_files: int, rng: np.random.Generator
) -> None:
    """Shuffle a split's frames (as the real data is) and spread them over ``n_files`` files."""
    order = rng.permutation(len(records))
    chunks = np.array_split(order, n_files)
    for k, chunk in enumerate(chunks):
        path = out_dir / f"{split}_0000.tfrecord-{k:05d}-of-{n_files:05d}"
        write_records(path, (records[i] for i in chunk))
    log.info("wrote %d %s frames in %d files to %s", len(records), split, n_files, out_dir)

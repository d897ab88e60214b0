"""nuScenes writer: a v1.0-mini-style database that ``nuscenes-devkit`` loads.

Writes the 13 table JSONs under ``<dataroot>/v1.0-mini/``, keyframe JPEGs for
the 6 cameras, LIDAR_TOP keyframes and sweeps as ``.pcd.bin`` (float32 x, y,
z, intensity, ring), a map mask PNG per location and 50 Hz CAN-bus poses.
Conventions as in the real data: calibrated_sensor rotations are quaternions
(w, x, y, z) sensor -> ego; camera axes x right, y down, z forward; the
LIDAR_TOP frame is the ego frame turned -90 degrees about z; every
sample_data has its own ego_pose (z = 0); annotation sizes are [w, l, h] and
translations/rotations are global. Scene names come from the devkit's
``mini_train`` / ``mini_val`` lists so its split helpers work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import numpy as np
from PIL import Image

from pipelines.geometry import quaternion_from_rotation, quaternion_from_yaw
from pipelines.sample_data.common import SizeSpec, gt_record, simulate, token
from pipelines.sample_data.render import PinholeCamera, encode_jpeg, make_camera
from pipelines.sample_data.world import Box, Scene

DATASET: Final = "nuscenes"
VERSION: Final = "v1.0-mini"
EPOCH_US: Final = 1_532_402_927_000_000
SAMPLE_DT: Final = 0.5  # s, keyframes at 2 Hz
CAN_HZ: Final = 50
ANN_RANGE: Final = 50.0  # m, annotate agents this close to the ego
MINI_TRAIN: Final = (
    "scene-0061",
    "scene-0553",
    "scene-0655",
    "scene-0757",
    "scene-0796",
    "scene-1077",
    "scene-1094",
    "scene-1100",
)
MINI_VAL: Final = ("scene-0103", "scene-0916")
LOCATIONS: Final = ("singapore-onenorth", "boston-seaport")
# channel, position (m, ego frame), yaw (deg), horizontal FOV (deg), trigger delay after the lidar (s)
CAMERAS: Final = (
    ("CAM_FRONT", (1.70, 0.02, 1.51), 0.0, 64.0, 0.012),
    ("CAM_FRONT_RIGHT", (1.55, -0.49, 1.49), -55.0, 64.0, 0.020),
    ("CAM_FRONT_LEFT", (1.52, 0.49, 1.51), 55.0, 64.0, 0.004),
    ("CAM_BACK", (0.03, 0.01, 1.57), 180.0, 100.0, 0.037),
    ("CAM_BACK_LEFT", (1.04, 0.48, 1.56), 110.0, 64.0, 0.029),
    ("CAM_BACK_RIGHT", (1.04, -0.48, 1.56), -110.0, 64.0, 0.045),
)
LIDAR_TRANSLATION: Final = (0.943713, 0.0, 1.84023)
LIDAR_YAW: Final = -np.pi / 2  # LIDAR_TOP x points to the ego's right, y forward
CATEGORIES: Final = {  # our category -> nuScenes category
    "car": "vehicle.car",
    "truck": "vehicle.truck",
    "pedestrian": "human.pedestrian.adult",
}
ALL_CATEGORIES: Final = (
    "human.pedestrian.adult",
    "human.pedestrian.child",
    "vehicle.car",
    "vehicle.truck",
    "vehicle.bus.rigid",
    "vehicle.bicycle",
    "vehicle.motorcycle",
    "movable_object.barrier",
    "movable_object.trafficcone",
)
ATTRIBUTES: Final = (
    "vehicle.moving",
    "vehicle.stopped",
    "vehicle.parked",
    "cycle.with_rider",
    "cycle.without_rider",
    "pedestrian.sitting_lying_down",
    "pedestrian.standing",
    "pedestrian.moving",
)
VISIBILITY: Final = (("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100"))


def camera_rig(spec: SizeSpec) -> list[tuple[str, PinholeCamera, float]]:
    """The 6 cameras (channel, camera, trigger delay) at the configured resolution."""
    w, h = spec.image_size
    return [(ch, make_camera(ch, w, h, fov, xyz, yaw), dt) for ch, xyz, yaw, fov, dt in CAMERAS]


def _tok(seed: int, *parts: Any) -> str:
    return token(seed, DATASET, *parts)


def _pose(scene: Scene, t: float) -> tuple[list[float], list[float]]:
    p = scene.pose(t)
    return [float(p[0]), float(p[1]), 0.0], quaternion_from_yaw(p[2]).tolist()


def _lidar_points(rng: np.random.Generator, n: int = 64) -> bytes:
    """A small ground ring in the LIDAR_TOP frame: float32 (N,5) x, y, z, intensity, ring."""
    ang = rng.uniform(-np.pi, np.pi, n)
    rad = rng.uniform(4.0, 25.0, n)
    pts = np.stack(
        [
            rad * np.cos(ang),
            rad * np.sin(ang),
            np.full(n, -LIDAR_TRANSLATION[2]),
            rng.uniform(0, 100, n),
            np.arange(n) % 32,
        ],
        axis=1,
    )
    return pts.astype(np.float32).tobytes()


class _Tables:
    """The 13 tables as lists of records, in insertion order."""

    NAMES: Final = (
        "category",
        "attribute",
        "visibility",
        "instance",
        "sensor",
        "calibrated_sensor",
        "ego_pose",
        "log",
        "scene",
        "sample",
        "sample_data",
        "sample_annotation",
        "map",
    )

    def __init__(self) -> None:
        for name in self.NAMES:
            setattr(self, name, [])

    def dump(self, table_dir: Path) -> None:
        table_dir.mkdir(parents=True, exist_ok=True)
        for name in self.NAMES:
            (table_dir / f"{name}.json").write_text(
                json.dumps(getattr(self, name), indent=1, sort_keys=True)
            )


def _link(records: list[dict[str, Any]]) -> None:
    """Set prev/next tokens along a time-ordered chain."""
    for i, rec in enumerate(records):
        rec["prev"] = records[i - 1]["token"] if i > 0 else ""
        rec["next"] = records[i + 1]["token"] if i + 1 < len(records) else ""


def write_nuscenes(dataroot: Path, seed: int, spec: SizeSpec) -> list[dict[str, Any]]:
    """Write the nuScenes sample under ``dataroot``; return the ground-truth records."""
    if spec.nuscenes_train_scenes > len(MINI_TRAIN) or spec.nuscenes_val_scenes > len(MINI_VAL):
        raise ValueError(f"v1.0-mini has {len(MINI_TRAIN)} train and {len(MINI_VAL)} val scenes")
    names = [(n, "mini_train") for n in MINI_TRAIN[: spec.nuscenes_train_scenes]]
    names += [(n, "mini_val") for n in MINI_VAL[: spec.nuscenes_val_scenes]]
    writer = _Writer(dataroot, seed, spec)
    gt: list[dict[str, Any]] = []
    for i, (scene_name, split) in enumerate(names):
        gt.extend(writer.scene(i, scene_name, split))
    writer.finish()
    return gt


class _Writer:
    """Fills the tables scene by scene, writing sensor files as it goes."""

    def __init__(self, dataroot: Path, seed: int, spec: SizeSpec) -> None:
        self.root, self.seed, self.spec = dataroot, seed, spec
        self.rig = camera_rig(spec)
        self.tb = tb = _Tables()
        # Category/attribute/sensor tokens do not depend on the seed, as in the real releases.
        self.cat_tok = {n: token(0, DATASET, "category", n) for n in ALL_CATEGORIES}
        tb.category = [
            {"token": self.cat_tok[n], "name": n, "description": n.replace(".", " "), "index": i}
            for i, n in enumerate(ALL_CATEGORIES)
        ]
        self.attr_tok = {n: token(0, DATASET, "attribute", n) for n in ATTRIBUTES}
        tb.attribute = [
            {"token": self.attr_tok[n], "name": n, "description": n.replace(".", " ")}
            for n in ATTRIBUTES
        ]
        tb.visibility = [
            {
                "token": t,
                "level": lvl,
                "description": f"visibility of whole object is between {lvl[1:].replace('-', ' and ')} %",
            }
            for t, lvl in VISIBILITY
        ]
        channels = [ch for ch, _, _ in self.rig] + ["LIDAR_TOP"]
        self.sensor_tok = {ch: token(0, DATASET, "sensor", ch) for ch in channels}
        tb.sensor = [
            {
                "token": self.sensor_tok[ch],
                "channel": ch,
                "modality": "lidar" if ch == "LIDAR_TOP" else "camera",
            }
            for ch in channels
        ]
        self.logs_by_location: dict[str, list[str]] = {loc: [] for loc in LOCATIONS}

    def finish(self) -> None:
        """Write one map mask per location in use, then the 13 tables."""
        (self.root / "maps").mkdir(parents=True, exist_ok=True)
        for loc in LOCATIONS:
            if not self.logs_by_location[loc]:
                continue
            map_tok = token(self.seed, DATASET, "map", loc)
            mask = np.zeros((64, 64), np.uint8)
            mask[16:48, :] = 255  # a drivable band: the devkit only needs a readable mask
            Image.fromarray(mask).save(self.root / "maps" / f"{map_tok}.png")
            self.tb.map.append(
                {
                    "token": map_tok,
                    "category": "semantic_prior",
                    "filename": f"maps/{map_tok}.png",
                    "log_tokens": self.logs_by_location[loc],
                }
            )
        self.tb.dump(self.root / VERSION)

    def _calibrations(self, scene_name: str) -> dict[str, str]:
        """One calibrated_sensor per channel and scene (the real data has one per log)."""
        calib: dict[str, str] = {}
        for ch, cam, _ in self.rig:
            calib[ch] = _tok(self.seed, "calib", scene_name, ch)
            self.tb.calibrated_sensor.append(
                {
                    "token": calib[ch],
                    "sensor_token": self.sensor_tok[ch],
                    "translation": cam.cam_to_ego[:3, 3].tolist(),
                    "rotation": quaternion_from_rotation(cam.cam_to_ego[:3, :3]).tolist(),
                    "camera_intrinsic": cam.K.tolist(),
                }
            )
        calib["LIDAR_TOP"] = _tok(self.seed, "calib", scene_name, "LIDAR_TOP")
        self.tb.calibrated_sensor.append(
            {
                "token": calib["LIDAR_TOP"],
                "sensor_token": self.sensor_tok["LIDAR_TOP"],
                "translation": list(LIDAR_TRANSLATION),
                "rotation": quaternion_from_yaw(LIDAR_YAW).tolist(),
                "camera_intrinsic": [],
            }
        )
        return calib

    def scene(self, index: int, scene_name: str, split: str) -> list[dict[str, Any]]:
        """Simulate and write one scene; return its ground-truth records."""
        seed, spec, tb = self.seed, self.spec, self.tb
        duration = (spec.nuscenes_samples - 1) * SAMPLE_DT
        scene, renderer = simulate(seed, DATASET, index, scene_name, duration)
        rng = np.random.default_rng([seed, index, 11])
        base_us = EPOCH_US + index * 3_600_000_000
        location = LOCATIONS[index % len(LOCATIONS)]
        logfile = f"n015-2018-07-{24 + index:02d}-11-22-45+0800"
        log_tok = _tok(seed, "log", scene_name)
        scene_tok = _tok(seed, "scene", scene_name)
        tb.log.append(
            {
                "token": log_tok,
                "logfile": logfile,
                "vehicle": "n015",
                "date_captured": f"2018-07-{24 + index:02d}",
                "location": location,
            }
        )
        self.logs_by_location[location].append(log_tok)
        calib = self._calibrations(scene_name)
        chains: dict[str, list[dict[str, Any]]] = {ch: [] for ch in calib}

        def add(
            ch: str, t: float, sample_tok: str, key: bool, data: bytes, w: int = 0, h: int = 0
        ) -> None:
            """A sample_data record with its own ego pose, and its file."""
            ts = base_us + int(round(t * 1e6))
            sd_tok = _tok(seed, "sd", scene_name, ch, ts)
            trans, rot = _pose(scene, t)
            tb.ego_pose.append(
                {"token": sd_tok, "timestamp": ts, "translation": trans, "rotation": rot}
            )
            folder = "samples" if key else "sweeps"
            ext = "pcd.bin" if ch == "LIDAR_TOP" else "jpg"
            filename = f"{folder}/{ch}/{logfile}__{ch}__{ts}.{ext}"
            chains[ch].append(
                {
                    "token": sd_tok,
                    "sample_token": sample_tok,
                    "ego_pose_token": sd_tok,
                    "calibrated_sensor_token": calib[ch],
                    "timestamp": ts,
                    "fileformat": "pcd" if ch == "LIDAR_TOP" else "jpg",
                    "is_key_frame": key,
                    "height": h,
                    "width": w,
                    "filename": filename,
                }
            )
            _write(self.root / filename, data)

        samples: list[dict[str, Any]] = []
        tracks: dict[str, list[dict[str, Any]]] = {}
        gt = []
        for k in range(spec.nuscenes_samples):
            t = k * SAMPLE_DT
            ts = base_us + int(round(t * 1e6))
            s_tok = _tok(seed, "sample", scene_name, k)
            samples.append({"token": s_tok, "timestamp": ts, "scene_token": scene_tok})
            if k > 0:  # lidar sweeps since the previous keyframe belong to this sample
                n = spec.nuscenes_lidar_sweeps
                for j in range(1, n + 1):
                    add(
                        "LIDAR_TOP",
                        t - SAMPLE_DT + j * SAMPLE_DT / (n + 1),
                        s_tok,
                        False,
                        _lidar_points(rng),
                    )
            add("LIDAR_TOP", t, s_tok, True, _lidar_points(rng))  # the sample time is the lidar's
            for ch, cam, delay in self.rig:
                img = renderer.render(
                    cam, scene.pose(t + delay), scene.boxes(t + delay, max_range=90.0)
                )
                add(
                    ch,
                    t + delay,
                    s_tok,
                    True,
                    encode_jpeg(img, spec.jpeg_quality),
                    cam.width,
                    cam.height,
                )
            ego = scene.pose(t)
            for box in scene.boxes(t, max_range=ANN_RANGE):
                ann = _annotation(seed, s_tok, box, ego, self.attr_tok)
                tracks.setdefault(box.track_id, []).append(ann)
            gt.append(gt_record(DATASET, split, scene_tok, s_tok, ts, scene, t))
        _link(samples)
        tb.sample.extend(samples)
        for chain in chains.values():
            _link(chain)
            tb.sample_data.extend(chain)
        for track_id, anns in tracks.items():
            inst_tok = _tok(seed, "instance", track_id)
            category = CATEGORIES[anns[0]["_category"]]
            for a in anns:
                del a["_category"]
                a["instance_token"] = inst_tok
            _link(anns)
            tb.sample_annotation.extend(anns)
            tb.instance.append(
                {
                    "token": inst_tok,
                    "category_token": self.cat_tok[category],
                    "nbr_annotations": len(anns),
                    "first_annotation_token": anns[0]["token"],
                    "last_annotation_token": anns[-1]["token"],
                }
            )
        tb.scene.append(
            {
                "token": scene_tok,
                "log_token": log_tok,
                "nbr_samples": len(samples),
                "first_sample_token": samples[0]["token"],
                "last_sample_token": samples[-1]["token"],
                "name": scene_name,
                "description": _describe(scene, duration),
            }
        )
        _write_can_bus(self.root / "can_bus" / f"{scene_name}_pose.json", scene, base_us, duration)
        return gt


def _annotation(
    seed: int, sample_tok: str, box: Box, ego: np.ndarray, attr_tok: dict[str, str]
) -> dict[str, Any]:
    dist = float(np.hypot(box.x - ego[0], box.y - ego[1]))
    speed = float(np.hypot(box.vx, box.vy))
    if box.category == "pedestrian":
        attr = "pedestrian.moving" if speed > 0.3 else "pedestrian.standing"
    else:
        attr = (
            "vehicle.parked"
            if "parked" in box.track_id
            else ("vehicle.moving" if speed > 0.5 else "vehicle.stopped")
        )
    vis = "4" if dist < 15 else "3" if dist < 30 else "2" if dist < 40 else "1"
    return {
        "token": _tok(seed, "ann", sample_tok, box.track_id),
        "sample_token": sample_tok,
        "_category": box.category,
        "visibility_token": vis,
        "attribute_tokens": [attr_tok[attr]],
        "translation": [box.x, box.y, box.z],
        "size": [box.width, box.length, box.height],
        "rotation": quaternion_from_yaw(box.yaw).tolist(),
        "num_lidar_pts": int(max(1, 4000 / (dist * dist + 10))),
        "num_radar_pts": 0 if box.category == "pedestrian" else 2,
    }


def _describe(scene: Scene, duration: float) -> str:
    """A scene description in the style of nuScenes' short comma-separated notes."""
    s0, s1 = float(scene.ego(0.0)["s"]), float(scene.ego(duration)["s"])
    parts = [f"turn {kind}" for a, b, kind in scene.route.turns if a < s1 and b > s0]
    parts += ["lane change" for a, b, _, _ in scene.route.lane_changes if a < s1 and b > s0]
    v = scene.ego(np.arange(0.0, duration, 0.5))["v"]
    if (v < 0.3).any():
        parts.append("wait")
    return "Synthetic drive, " + (", ".join(parts) if parts else "straight road")


def _write_can_bus(path: Path, scene: Scene, base_us: int, duration: float) -> None:
    """``<scene>_pose.json``: 50 Hz messages with global pos/orientation and ego-frame vel/accel."""
    times = np.arange(0.0, duration + 1e-9, 1.0 / CAN_HZ)
    e = scene.ego(times)
    c, s = np.cos(e["yaw"]), np.sin(e["yaw"])
    vel = np.stack(
        [c * e["vx"] + s * e["vy"], -s * e["vx"] + c * e["vy"]], axis=1
    )  # world -> ego frame
    acc = np.stack([c * e["ax"] + s * e["ay"], -s * e["ax"] + c * e["ay"]], axis=1)
    yaw_rate = np.gradient(np.unwrap(e["yaw"]), times)
    quats = quaternion_from_yaw(e["yaw"])
    msgs = [
        {
            "utime": base_us + int(round(t * 1e6)),
            "pos": [float(e["x"][i]), float(e["y"][i]), 0.0],
            "orientation": quats[i].tolist(),
            "vel": [float(vel[i, 0]), float(vel[i, 1]), 0.0],
            "accel": [
                float(acc[i, 0]),
                float(acc[i, 1]),
                9.81,
            ],  # z: gravity, as the IMU reports it
            "rotation_rate": [0.0, 0.0, float(yaw_rate[i])],
        }
        for i, t in enumerate(times.tolist())
    ]
    _write(path, json.dumps(msgs, sort_keys=True).encode())


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)

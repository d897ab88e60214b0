"""Bench2Drive writer: 10 Hz CARLA-style clips with ``anno/NNNNN.json.gz`` and six RGB cameras.

Layout, as Bench2Drive's ``docs/anno.md`` draws it::

    <root>/<Scenario>/<TownNN>_Route<N>_Weather<N>/anno/00000.json.gz
    <root>/<Scenario>/<TownNN>_Route<N>_Weather<N>/camera/rgb_{front,...,back_right}/00000.jpg
    <root>/bench2drive_base_train_val_split.json   (Bench2DriveZoo's split file format)

(The released archives are ``<Scenario>_<Town>_<Route>_<Weather>.tar.gz``, one
per clip; tests pack these directories that way.) Everything is written the
way ``tools/data_collect.py`` records it, in CARLA's LEFT-handed frames
(x forward, y right, z up; yaw in degrees, clockwise seen from above):

* ``x``/``y`` are GNSS-derived: the antenna sits 1.4 m behind the vehicle origin
  (``sensor.other.gnss`` at x=-1.4) and noise is added (lat/lon stddev 5e-6 deg,
  about 0.55 m); the exact pose is ``bounding_boxes[0].world2ego`` (the inverse
  of the actor transform). ``theta`` is the IMU compass (CARLA yaw + pi/2, in
  [0, 2 pi)); ``speed`` the forward speed; ``acceleration`` the IMU reading
  (left-handed, gravity included); ``angular_velocity`` the gyroscope.
* Quirks of the real data (``docs/anno.md``): pedestrian ``speed`` is 0; static
  vehicles' ``location``/``rotation`` are wrong (``center``/``extent``/
  ``world2vehicle`` are right); ``speed`` and ``theta`` are None on some frames;
  ``extent`` holds HALF sizes.
* Cameras: ``intrinsic`` f = w / (2 tan(fov/2)) with the principal point at the
  centre (``tools/utils.py`` build_projection_matrix); ``cam2ego`` is the CARLA
  transform of the sensor spec (Unreal camera axes x forward, y right, z up),
  ``world2cam`` the inverse of the sensor's world transform. JPEG quality 20.
  The images are rendered by real projection with a camera built independently
  by :func:`~pipelines.sample_data.render.make_camera` from the same mount.

Traffic lights and a speed-limit sign are annotated (not drawn). No lidar,
radar, depth/semantic images or expert_assessment files are written.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any, Final

import numpy as np

from pipelines.sample_data.common import SizeSpec, gt_record, scene_rng, token
from pipelines.sample_data.render import PinholeCamera, Renderer, encode_jpeg, make_camera
from pipelines.sample_data.world import ROAD_RIGHT, Box, Scene

DATASET: Final = "bench2drive"
FRAME_DT: Final = 0.1  # s: data_collect.py Env_Manager.frame_rate = 10.0
JPEG_QUALITY: Final = 20  # data_collect.py: cv2.IMWRITE_JPEG_QUALITY, 20
GNSS_X: Final = -1.4  # m: GNSS and IMU mount, behind the vehicle origin (data_collect.py sensors())
GNSS_NOISE_M: Final = 0.000005 * 111_000.0  # lat/lon stddev 5e-6 deg in metres
GRAVITY: Final = 9.81
SPLIT_FILE: Final = "bench2drive_base_train_val_split.json"
# RoadOption values (CARLA agents/navigation/local_planner.py)
ROAD_OPTION: Final = {"left": 1, "right": 2, "straight": 4}  # straight on a lane: LANEFOLLOW
# Sensor mounts of data_collect.py sensors(): id, (x, y, z) in the CARLA ego frame (y right), yaw deg, fov deg
CAMERAS: Final = (
    ("CAM_FRONT", (0.80, 0.0, 1.60), 0.0, 70.0),
    ("CAM_FRONT_LEFT", (0.27, -0.55, 1.60), -55.0, 70.0),
    ("CAM_FRONT_RIGHT", (0.27, 0.55, 1.60), 55.0, 70.0),
    ("CAM_BACK", (-2.0, 0.0, 1.60), 180.0, 110.0),
    ("CAM_BACK_LEFT", (-0.32, -0.55, 1.60), -110.0, 70.0),
    ("CAM_BACK_RIGHT", (-0.32, 0.55, 1.60), 110.0, 70.0),
)
SCENARIOS: Final = ("NonSignalizedJunctionLeftTurn", "ParkedObstacle", "HardBreakRoute", "Accident")
TOWNS: Final = ("Town03", "Town05", "Town10HD", "Town12", "Town13")
# (state, seconds): green, yellow, red as CARLA rpc::TrafficLightState ints (Red 0, Yellow 1, Green 2)
TL_CYCLE: Final = ((2, 6.0), (1, 2.0), (0, 6.0))
TYPE_IDS: Final = {"car": "vehicle.lincoln.mkz_2020", "truck": "vehicle.carlamotors.carlacola"}


def carla_transform(location: Any, yaw_deg: float) -> np.ndarray:
    """4x4 matrix of a CARLA transform with pitch = roll = 0 (the simulated world is flat).

    For pitch = roll = 0 CARLA's ``Transform.get_matrix()`` is a plain rotation
    by ``yaw`` about z (numerically the usual matrix; the frame is left-handed).
    """
    c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
    m = np.eye(4)
    m[:2, :2] = [[c, -s], [s, c]]
    m[:3, 3] = location
    return m


def rigid_inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform (what ``Transform.get_inverse_matrix()`` returns)."""
    out = np.eye(4)
    out[:3, :3] = m[:3, :3].T
    out[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return out


def to_carla(x: float, y: float, z: float = 0.0) -> list[float]:
    """A point of the (right-handed) simulated world in CARLA's left-handed world: y flips."""
    return [float(x), float(-y), float(z)]


def carla_yaw_deg(yaw: float) -> float:
    """A CCW yaw (rad) of the simulated world as CARLA's clockwise yaw in degrees."""
    return float(-np.degrees(yaw))


def intrinsic(width: int, height: int, fov_deg: float) -> np.ndarray:
    """tools/utils.py build_projection_matrix: f = w / (2 tan(fov/2)), principal point at the centre."""
    f = width / (2.0 * np.tan(np.radians(fov_deg) / 2.0))
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def image_size(spec: SizeSpec) -> tuple[int, int]:
    """Bench2Drive frames are 1600x900: the configured width at that 16:9 aspect."""
    w = spec.image_size[0]
    return w, max(16, int(round(w * 9 / 16)))


def render_rig(width: int, height: int) -> list[tuple[str, PinholeCamera]]:
    """The six cameras for the renderer, built from the mounts by the project's own camera model."""
    return [
        (cid, make_camera(cid, width, height, fov, (x, -y, z), -yaw))
        for cid, (x, y, z), yaw, fov in CAMERAS
    ]


def _clip_scene(seed: int, index: int, duration: float, left_turn: bool) -> tuple[Scene, float]:
    """A scene and the clip's start time; ``left_turn`` asks for a left turn ~1.5 s after the 3rd second."""
    long = duration + 30.0
    for attempt in range(40):
        k = index * 1000 + attempt
        scene = Scene(scene_rng(seed, DATASET, k), f"clip{k}", -1.0, long + 1.0)
        if not left_turn:
            return scene, 0.0
        for s0, _, kind in scene.route.turns:
            if kind != "left":
                continue
            reached = np.flatnonzero(scene.s >= s0)
            if not len(reached):
                continue
            start = float(scene.t[reached[0]]) - 4.5
            if 0.0 <= start <= long - duration and float(scene.ego(start + 2.0)["v"]) > 2.0:
                return scene, round(start, 1)
    raise RuntimeError(f"{DATASET}: no simulated scene with a left turn for clip {index}")


def write_bench2drive(root: Path, seed: int, spec: SizeSpec) -> list[dict[str, Any]]:
    """Write the Bench2Drive sample under ``root``; return the ground-truth records."""
    w, h = image_size(spec)
    rig = render_rig(w, h)
    gt: list[dict[str, Any]] = []
    names = []
    n = spec.bench2drive_clips
    for i in range(n):
        scene, start = _clip_scene(seed, i, spec.bench2drive_duration_s, left_turn=i == 0)
        scenario = SCENARIOS[i % len(SCENARIOS)]
        rel = f"{scenario}/{TOWNS[i % len(TOWNS)]}_Route{100 + 7 * i}_Weather{(3 * i) % 21}"
        names.append(rel)
        split = "val" if n > 2 and i == n - 1 else "train"
        writer = _ClipWriter(root / rel, seed, rel.replace("/", "_"), scene, Renderer(scene), rig, (w, h))
        gt.extend(writer.write(start, spec.bench2drive_duration_s, split))
    # Bench2DriveZoo's data/splits/bench2drive_base_train_val_split.json: {"train": [...], "val": [...]}
    splits = {"train": [], "val": []}
    for i, rel in enumerate(names):
        splits["val" if n > 2 and i == n - 1 else "train"].append(f"v1/{rel.replace('/', '_')}")
    (root / SPLIT_FILE).write_text(json.dumps(splits, indent=2, sort_keys=True))
    return gt


class _ClipWriter:
    """One clip: frames every 0.1 s from ``start``, annotations and six JPEGs per frame."""

    def __init__(
        self,
        out: Path,
        seed: int,
        name: str,
        scene: Scene,
        renderer: Renderer,
        rig: list[tuple[str, PinholeCamera]],
        size: tuple[int, int],
    ) -> None:
        self.out, self.seed, self.name, self.scene = out, seed, name, scene
        self.renderer, self.rig, self.size = renderer, rig, size
        self.rng = np.random.default_rng([seed, int(token(seed, DATASET, name, length=8), 16)])
        self.lights, self.signs = self._roadside()

    def write(self, start: float, duration: float, split: str) -> list[dict[str, Any]]:
        frames = int(round(duration / FRAME_DT)) + 1
        (self.out / "anno").mkdir(parents=True, exist_ok=True)
        for cid, _, _, _ in CAMERAS:
            (self.out / "camera" / f"rgb_{cid[4:].lower()}").mkdir(parents=True, exist_ok=True)
        gt = []
        for k in range(frames):
            t = start + k * FRAME_DT
            pose = self.scene.pose(t)
            boxes = self.scene.boxes(t, max_range=100.0)
            anno = self._anno(k, t, pose, boxes)
            buf = io.BytesIO()
            with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:  # mtime 0: same seed, same bytes
                gz.write(json.dumps(anno).encode())  # data_collect.py indents by 4; same content
            (self.out / "anno" / f"{k:05d}.json.gz").write_bytes(buf.getvalue())
            for cid, cam in self.rig:
                jpg = encode_jpeg(self.renderer.render(cam, pose, boxes), JPEG_QUALITY)
                (self.out / "camera" / f"rgb_{cid[4:].lower()}" / f"{k:05d}.jpg").write_bytes(jpg)
            rec = gt_record(DATASET, split, self.name, f"{k:05d}", k * 100_000, self.scene, t)
            gt.append(rec)
        return gt

    # ------------------------------------------------------------------ annotation

    def _anno(self, k: int, t: float, pose: np.ndarray, boxes: list[Box]) -> dict[str, Any]:
        e = self.scene.ego(t)
        yaw = float(pose[2])
        c, s = np.cos(yaw), np.sin(yaw)
        v_fwd = float(c * e["vx"] + s * e["vy"])
        a_ego = (float(c * e["ax"] + s * e["ay"]), float(-s * e["ax"] + c * e["ay"]))
        dt = 0.05
        yaw_rate = float(np.angle(np.exp(1j * (self.scene.pose(t + dt)[2] - self.scene.pose(t - dt)[2])))) / (2 * dt)
        ego_m = carla_transform(to_carla(pose[0], pose[1]), carla_yaw_deg(yaw))
        gnss = pose[:2] + GNSS_X * np.array([c, s]) + self.rng.normal(0.0, GNSS_NOISE_M, 2)
        compass = float((np.radians(carla_yaw_deg(yaw)) + np.pi / 2) % (2 * np.pi))
        imu_acc = [a_ego[0], -a_ego[1], GRAVITY] + self.rng.normal(0.0, [0.001, 0.001, 0.015])
        command = ROAD_OPTION[self.scene.command(t)]
        near = self._route_point(float(e["s"]) + 20.0)
        far = self._route_point(float(e["s"]) + 50.0)
        anno: dict[str, Any] = {
            "x": float(gnss[0]),
            "y": float(-gnss[1]),
            "throttle": 0.5 if a_ego[0] > 0 else 0.0,
            "steer": float(np.clip(-yaw_rate / 0.7, -1.0, 1.0)),  # CARLA steer > 0 turns right
            "brake": 1.0 if a_ego[0] < -1.0 else 0.0,
            "reverse": False,
            # Quirks (docs/anno.md): the speedometer and the compass may be None.
            "theta": None if k % 41 == 17 else compass,
            "speed": None if k % 37 == 11 else v_fwd,
            "x_command_far": far[0],
            "y_command_far": far[1],
            "command_far": command,
            "x_command_near": near[0],
            "y_command_near": near[1],
            "command_near": command,
            "should_brake": 0,
            "only_ap_brake": 0,
            "x_target": near[0],
            "y_target": near[1],
            "next_command": command,
            "weather": {"cloudiness": 10.0, "precipitation": 0.0, "sun_altitude_angle": 45.0},
            "acceleration": [float(v) for v in imu_acc],
            "angular_velocity": [0.0, 0.0, -yaw_rate],  # left-handed: a CCW turn is negative about z
            "sensors": self._sensors(ego_m),
            "bounding_boxes": [self._ego_box(pose, ego_m, v_fwd)],
        }
        for b in boxes:
            anno["bounding_boxes"].append(self._box(b, pose))
        anno["bounding_boxes"] += self._roadside_boxes(t, pose)
        return anno

    def _route_point(self, s: float) -> list[float]:
        xy, _ = self.scene.route.point(np.array([s]), np.array([0.0]))
        return to_carla(xy[0, 0], xy[0, 1])[:2]

    def _sensors(self, ego_m: np.ndarray) -> dict[str, Any]:
        w, h = self.size
        out: dict[str, Any] = {}
        for cid, xyz, yaw, fov in CAMERAS:
            cam2ego = carla_transform(xyz, yaw)
            cam_world = ego_m @ cam2ego
            ego_yaw = float(np.degrees(np.arctan2(ego_m[1, 0], ego_m[0, 0])))
            out[cid] = {
                "location": cam_world[:3, 3].tolist(),
                "rotation": [0.0, 0.0, ego_yaw + yaw],  # pitch, roll, yaw (data_collect.py order)
                "intrinsic": intrinsic(w, h, fov).tolist(),
                "world2cam": rigid_inverse(cam_world).tolist(),
                "cam2ego": cam2ego.tolist(),
                "fov": fov,
                "image_size_x": w,
                "image_size_y": h,
            }
        lidar2ego = carla_transform((-0.39, 0.0, 1.84), -90.0)
        out["LIDAR_TOP"] = {
            "location": (ego_m @ lidar2ego)[:3, 3].tolist(),
            "rotation": [0.0, 0.0, 0.0],
            "world2lidar": rigid_inverse(ego_m @ lidar2ego).tolist(),
            "lidar2ego": lidar2ego.tolist(),
        }
        return out

    def _ego_box(self, pose: np.ndarray, ego_m: np.ndarray, v_fwd: float) -> dict[str, Any]:
        return {
            "class": "ego_vehicle",
            "id": "1",
            "type_id": "vehicle.lincoln.mkz_2020",
            "base_type": "car",
            "location": to_carla(pose[0], pose[1]),
            "rotation": [0.0, 0.0, carla_yaw_deg(pose[2])],
            "bbx_loc": [0.0, 0.0, 0.8],
            "center": to_carla(pose[0], pose[1], 0.8),
            "extent": [2.45, 1.05, 0.8],  # HALF sizes
            "speed": v_fwd,
            "brake": 0.0,
            "world2ego": rigid_inverse(ego_m).tolist(),
        }

    def _actor_id(self, track: str) -> str:
        return str(100 + int(token(self.seed, DATASET, self.name, track, length=6), 16) % 90000)

    def _box(self, b: Box, pose: np.ndarray) -> dict[str, Any]:
        loc = to_carla(b.x, b.y)
        rot = carla_yaw_deg(b.yaw)
        m = carla_transform(loc, rot)
        out: dict[str, Any] = {
            "id": self._actor_id(b.track_id),
            "location": loc,
            "rotation": [0.0, 0.0, rot],
            "bbx_loc": [0.0, 0.0, b.height / 2.0],
            "center": to_carla(b.x, b.y, b.z),
            "extent": [b.length / 2.0, b.width / 2.0, b.height / 2.0],  # HALF sizes (docs/anno.md)
            "distance": float(np.hypot(b.x - pose[0], b.y - pose[1])),
            "num_points": 50,
        }
        if b.category == "pedestrian":
            out |= {"class": "walker", "type_id": "walker.pedestrian.0001", "speed": 0.0,  # API quirk
                    "world2ped": rigid_inverse(m).tolist()}  # fmt: skip
            return out
        fwd_speed = float(np.cos(b.yaw) * b.vx + np.sin(b.yaw) * b.vy)
        if ":parked" in b.track_id:
            # Static vehicles: the API's location/rotation are wrong (docs/anno.md); center/extent and
            # world2vehicle are right. Model the bug as a shifted origin and a quarter-turn.
            out |= {"class": "vehicle", "state": "static", "type_id": "/Game/Carla/Static/Car/SM_Parked",
                    "location": [loc[0] + 3.0, loc[1] - 2.0, 0.0], "rotation": [0.0, 0.0, rot + 90.0],
                    "speed": 0.0, "world2vehicle": rigid_inverse(m).tolist()}  # fmt: skip
            return out
        out |= {"class": "vehicle", "state": "dynamic", "type_id": TYPE_IDS[b.category],
                "base_type": b.category, "speed": fwd_speed, "light_state": "NONE",
                "world2vehicle": rigid_inverse(m).tolist()}  # fmt: skip
        return out

    # ------------------------------------------------------------------ lights and signs

    def _roadside(self) -> tuple[list[tuple[np.ndarray, float]], list[tuple[np.ndarray, float]]]:
        """A traffic light before each turn and a speed-limit sign near the start, right of the road."""
        route = self.scene.route
        lights = []
        for s0, _, _ in route.turns:
            xy, hd = route.point(np.array([max(s0 - 4.0, 0.0)]), np.array([ROAD_RIGHT - 1.0]))
            lights.append((xy[0], float(hd[0])))
        xy, hd = route.point(np.array([40.0]), np.array([ROAD_RIGHT - 1.5]))
        return lights, [(xy[0], float(hd[0]))]

    def _roadside_boxes(self, t: float, pose: np.ndarray) -> list[dict[str, Any]]:
        out = []
        period = sum(d for _, d in TL_CYCLE)
        for i, (xy, hd) in enumerate(self.lights):
            dist = float(np.hypot(*(xy - pose[:2])))
            if dist > 100.0:
                continue
            phase = (t + 3.0 * i) % period
            state = next(st for st, d in _cumulative(TL_CYCLE) if phase < d)
            loc = to_carla(xy[0], xy[1], 2.5)
            yaw = carla_yaw_deg(hd + np.pi)  # facing the approaching traffic
            out.append({
                "class": "traffic_light", "id": self._actor_id(f"light{i}"), "location": loc,
                "rotation": [0.0, 0.0, yaw], "center": loc, "extent": [0.3, 0.3, 1.2],
                "type_id": "traffic.traffic_light", "distance": dist,
                "state": state,  # json.dump of carla.TrafficLightState writes its int value
                "affects_ego": True, "trigger_volume_location": to_carla(xy[0], xy[1]),
                "trigger_volume_rotation": [0.0, 0.0, 0.0],  # relative to the parent (docs/anno.md)
                "trigger_volume_extent": [2.0, 3.0, 1.0],
            })  # fmt: skip
        for i, (xy, hd) in enumerate(self.signs):
            dist = float(np.hypot(*(xy - pose[:2])))
            if dist > 100.0:
                continue
            loc = to_carla(xy[0], xy[1], 1.5)
            m = carla_transform(loc, carla_yaw_deg(hd + np.pi))
            out.append({
                "class": "traffic_sign", "id": self._actor_id(f"sign{i}"), "location": loc,
                "rotation": [0.0, 0.0, carla_yaw_deg(hd + np.pi)], "center": loc,
                "extent": [0.1, 0.4, 0.4], "type_id": "traffic.speed_limit.30", "distance": dist,
                "affects_ego": False, "world2sign": rigid_inverse(m).tolist(),
            })  # fmt: skip
        return out


def _cumulative(cycle: tuple[tuple[int, float], ...]) -> list[tuple[int, float]]:
    out, acc = [], 0.0
    for state, d in cycle:
        acc += d
        out.append((state, acc))
    return out

"""Bench2Drive (CARLA expert drives): 10 Hz clips of ``anno/*.json.gz`` + six cameras -> unified samples.

Facts used, with where they come from (Thinklab-SJTU/Bench2Drive ``docs/anno.md``,
``tools/data_collect.py``, ``tools/utils.py``; Thinklab-SJTU/Bench2DriveZoo
``mmcv/datasets/prepare_B2D.py``, which converts the data to nuScenes'
right-handed convention; CARLA's Python API docs):

* Frames are saved at 10 Hz (``data_collect.py`` ``Env_Manager.frame_rate = 10.0``;
  the file name is the frame counter) and carry no timestamp, so the frame
  index is the clock: ``timestamp_us = index * 100 000`` from the clip start.
  A 2 Hz model step is ``options.frame_rate_hz * 0.5`` = 5 frames.
* Every position, rotation and matrix is in CARLA's LEFT-handed frames: x forward,
  y right, z up, yaw clockwise seen from above (``prepare_B2D.py``: "All data in
  the Bench2Drive dataset are in the left-handed coordinate system"). Ours is
  x forward, y left, headings CCW: a transform M becomes F M F with
  F = diag(1, -1, 1, 1), a point (x, y, z) becomes (x, -y, z).
* The ego pose is taken from ``bounding_boxes[0].world2ego`` (the inverse of the
  ego actor's transform, ``data_collect.py``), NOT from anno ``x``/``y``: those
  are GNSS readings (``sensor.other.gnss`` mounted at x = -1.4 m, i.e. 1.4 m
  behind the vehicle origin, with lat/lon noise stddev 5e-6 deg ~ 0.55 m), so
  they are off by 1.4 m along the heading plus noise; ``theta`` is the IMU
  compass (CARLA yaw + pi/2) and may be None (``docs/anno.md``).
* Velocity/acceleration: central differences of the exact positions over +-1
  frame (0.1 s), in the current ego frame. ``speed`` is only the forward speed
  (speedometer; may be None) and the IMU ``acceleration`` is left-handed,
  includes gravity and is measured 1.4 m behind the origin, so both are
  fallbacks for a missing neighbour frame: velocity (speed, 0); acceleration
  the IMU reading minus gravity rotated by the exact attitude, y flipped.
* Command: ``command_near`` is a CARLA ``RoadOption`` (agents/navigation/
  local_planner.py: VOID -1, LEFT 1, RIGHT 2, STRAIGHT 3, LANEFOLLOW 4,
  CHANGELANELEFT 5, CHANGELANERIGHT 6), mapped by ``options.command_map``:
  LEFT/CHANGELANELEFT -> left, RIGHT/CHANGELANERIGHT -> right, STRAIGHT/
  LANEFOLLOW -> straight, VOID -> unknown.
* Cameras ``CAM_FRONT, CAM_FRONT_LEFT, CAM_FRONT_RIGHT, CAM_BACK, CAM_BACK_LEFT,
  CAM_BACK_RIGHT`` in ``camera/rgb_<name>/``: ``intrinsic`` is
  f = w / (2 tan(fov/2)) with the principal point at the centre
  (``utils.py`` build_projection_matrix) for ``image_size_x/y``, scaled to the
  stored size; ``cam2ego`` maps Unreal camera axes (x forward, y right, z up)
  to the left-handed ego frame (``utils.py`` get_image_point swaps
  (x, y, z) -> (y, -z, x) to project), so camera(OpenCV) -> ego is
  F @ cam2ego @ CV_TO_UE (prepare_B2D.py does the same with
  ``left2right @ cam2ego @ stand_to_ue4_rotate``).
* Objects: ``center`` (world) and ``extent`` (HALF sizes: ``docs/anno.md``) with
  the actor matrix ``world2vehicle`` / ``world2ped`` / ``world2sign`` for the
  heading; static vehicles' ``location``/``rotation`` are wrong and never used.
  Vehicle ``speed`` is the forward speed (``_get_forward_speed``); pedestrian
  ``speed`` is always 0 (API quirk), so their velocity is differenced from the
  same id in the neighbour frames. Traffic lights keep their state
  (``carla.TrafficLightState`` int Red 0, Yellow 1, Green 2, Off 3, Unknown 4, or
  the colour name), signs their ``type_id`` in ``state``; both have zero velocity.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import orjson

from pipelines.config import ConfigError, from_dict
from pipelines.core.stage import Fail
from pipelines.geometry import vectors_to_local, wrap_angle
from pipelines.sources.b2d_io import ArchiveError, ClipFiles, clip_name, find_clips, open_root
from pipelines.sources.base import (
    Outcome,
    Source,
    SourceError,
    WorkUnit,
)
from schemas.enums import Camera, Command, Dataset, Split
from schemas.sample import MODEL_DT, Object, sanitize_id_part

log = logging.getLogger(__name__)

DATASET: Final = Dataset.BENCH2DRIVE.value
CAMERAS: Final[dict[str, str]] = {  # canonical camera -> anno sensors key (folder: rgb_<lower suffix>)
    Camera.FRONT.value: "CAM_FRONT",
    Camera.FRONT_LEFT.value: "CAM_FRONT_LEFT",
    Camera.FRONT_RIGHT.value: "CAM_FRONT_RIGHT",
    Camera.BACK.value: "CAM_BACK",
    Camera.BACK_LEFT.value: "CAM_BACK_LEFT",
    Camera.BACK_RIGHT.value: "CAM_BACK_RIGHT",
}
ROAD_OPTIONS: Final[dict[int, str]] = {
    -1: "VOID", 1: "LEFT", 2: "RIGHT", 3: "STRAIGHT", 4: "LANEFOLLOW", 5: "CHANGELANELEFT", 6: "CHANGELANERIGHT",
}  # fmt: skip
TRAFFIC_LIGHT_STATES: Final[dict[int, str]] = {0: "red", 1: "yellow", 2: "green", 3: "off", 4: "unknown"}
FLIP: Final = np.diag([1.0, -1.0, 1.0, 1.0])  # left-handed <-> right-handed (y flips); its own inverse
# OpenCV camera axes (x right, y down, z forward) -> Unreal camera axes (x forward, y right, z up)
CV_TO_UE: Final = np.array([[0.0, 0, 1, 0], [1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
GRAVITY: Final = 9.81
ACTOR_MATRIX_KEYS: Final = ("world2vehicle", "world2ped", "world2sign")


def image_dir(camera: str) -> str:
    """``CAM_FRONT_LEFT`` -> ``rgb_front_left`` (data_collect.py save())."""
    return "rgb_" + CAMERAS[camera][4:].lower()


@dataclass(frozen=True, slots=True)
class Bench2DriveOptions:
    """``options:`` of the Bench2Drive config."""

    frame_rate_hz: float = 10.0  # data_collect.py frame_rate; the frame index is the clock
    sample_every: int = 5  # frames between two samples' current frames (5 = 2 Hz)
    # JSON {"train": [...], "val": [...]} of clip names (Bench2DriveZoo format, "v1/<clip>"), relative to
    # the input root or a full URL; clips it does not list, or every clip when the file is absent, go
    # to default_split (logged).
    split_file: str | None = "bench2drive_base_train_val_split.json"
    default_split: str = "train"
    command_map: dict[str, str] = field(
        default_factory=lambda: {
            "VOID": "unknown",
            "LEFT": "left",
            "RIGHT": "right",
            "STRAIGHT": "straight",
            "LANEFOLLOW": "straight",
            "CHANGELANELEFT": "left",
            "CHANGELANERIGHT": "right",
        }
    )

    def __post_init__(self) -> None:
        step = self.frame_rate_hz * MODEL_DT
        if self.frame_rate_hz <= 0 or abs(step - round(step)) > 1e-9:
            raise ValueError(f"frame_rate_hz {self.frame_rate_hz} must give a whole number of frames per 0.5 s")
        if self.sample_every < 1:
            raise ValueError("sample_every must be >= 1")
        if self.default_split not in Split.values():
            raise ValueError(f"default_split {self.default_split!r} is not one of {list(Split.values())}")
        bad = {k: v for k, v in self.command_map.items() if k not in ROAD_OPTIONS.values() or v not in Command.values()}
        if bad:
            raise ValueError(f"command_map {bad}: keys are RoadOption names {sorted(ROAD_OPTIONS.values())}, "
                             f"values one of {list(Command.values())}")  # fmt: skip

    @property
    def step(self) -> int:
        """Frames per 2 Hz model step."""
        return int(round(self.frame_rate_hz * MODEL_DT))


class Bench2DriveSource(Source):
    """Bench2Drive clips (directories or released archives, local or object storage) -> samples."""

    name = DATASET
    Options = Bench2DriveOptions

    def __init__(self, cfg: Any) -> None:
        # The base class checks a local Path; inputs here are fsspec URLs, so this does the same checks.
        if cfg.dataset != self.name:
            raise ConfigError(f"config is for dataset {cfg.dataset!r}, source is {self.name!r}")
        self.cfg = cfg
        self.url = cfg.input or f"data/sample/{DATASET}"
        self.root = self.url
        self.options: Bench2DriveOptions = from_dict(self.Options, cfg.options, "options")
        missing = [c for c in cfg.cameras if c not in CAMERAS]
        if missing:
            raise SourceError(f"{DATASET}: camera(s) {missing} do not exist; Bench2Drive has {sorted(CAMERAS)}")
        fs, path = open_root(self.url)
        if not fs.exists(path):
            raise SourceError(
                f"{self.name}: input {self.url!r} does not exist (pass --input PATH or URL, or run "
                f"`drivevla generate --out data/sample` for the sample data)"
            )

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "url": self.url, "root": self.root, "options": self.options}

    def work_units(self) -> list[WorkUnit]:
        fs, root = open_root(self.url)
        clips = find_clips(fs, root)
        if not clips:
            log.warning("%s: no clip (a directory with anno/, or a .tar.gz archive) under %s", DATASET, self.url)
        splits = self._splits(fs, root)
        units, seen = [], {}
        for kind, rel in clips:
            name = sanitize_id_part(clip_name(rel) if rel else clip_name(root.rsplit("/", 1)[-1]))
            if name in seen:
                raise SourceError(f"{DATASET}: clips {seen[name]!r} and {rel!r} have the same name {name!r}")
            seen[name] = rel
            split = splits.get(name, self.options.default_split)
            if split in self.cfg.splits:
                units.append(WorkUnit(f"{split}/{name}", split, {"kind": kind, "rel": rel, "clip": name}))
        return sorted(units, key=lambda u: u.key)

    def _splits(self, fs: Any, root: str) -> dict[str, str]:
        name = self.options.split_file
        if not name:
            return {}
        sfs, path = open_root(name) if "://" in name or name.startswith("/") else (fs, f"{root}/{name}")
        if not sfs.exists(path):
            log.warning("%s: split file %s not found; every clip is %r", DATASET, name, self.options.default_split)
            return {}
        try:
            data = json.loads(sfs.cat_file(path))
            out = {
                sanitize_id_part(clip_name(str(c).rsplit("/", 1)[-1])): key
                for key, clips in data.items()
                for c in clips
            }
        except (ValueError, AttributeError, TypeError) as exc:
            raise SourceError(f"{DATASET}: split file {name}: expected {{split: [clip, ...]}} ({exc})") from None
        bad = sorted(set(out.values()) - set(Split.values()))
        if bad:
            raise SourceError(f"{DATASET}: split file {name}: splits {bad} are not in {list(Split.values())}")
        return out

    def iter_unit(self, unit: WorkUnit) -> Iterator[Outcome]:
        fs, root = open_root(self.url)  # fsspec caches filesystem instances: cheap per clip
        dirs = {image_dir(c) for c in self.cfg.cameras}
        try:
            files = ClipFiles.open(fs, root, unit.payload["kind"], unit.payload["rel"], dirs)
        except ArchiveError as exc:
            yield Fail(None, "ArchiveError", str(exc), unit.payload["rel"])
            return
        from pipelines.sources.b2d_clip import ClipReader  # the per-clip logic lives next door

        yield from ClipReader(self, unit, files).run()


@dataclass
class Frame:
    """What a sample needs of one annotation file, converted to right-handed values."""

    index: int
    pose: np.ndarray  # (3,) x, y, heading in the right-handed world
    world2ego: np.ndarray  # (4,4) right-handed
    speed: float | None
    imu: np.ndarray | None  # (3,) left-handed, gravity included
    command: int | None
    sensors: dict[str, Any]
    boxes: list[dict[str, Any]]
    _centres: dict[str, np.ndarray] | None = None

    def centre(self, actor: str) -> np.ndarray | None:
        """The right-handed world (x, y) of actor ``actor``'s box centre in this frame."""
        if self._centres is None:
            self._centres = {
                str(b.get("id")): np.array([b["center"][0], -b["center"][1]], np.float64)
                for b in self.boxes
                if isinstance(b.get("center"), list) and len(b["center"]) >= 2
            }
        return self._centres.get(actor)


class FrameError(ValueError):
    """An annotation file is missing, corrupt or lacks the ego pose; the message names the file."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def parse_frame(index: int, data: bytes, where: str) -> Frame:
    """Decode one ``anno/NNNNN.json.gz``; raise :class:`FrameError` naming ``where`` and the cause."""
    try:
        text = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise FrameError("CorruptAnnotation", f"{where}: not a valid gzip file ({exc})") from None
    try:
        anno = orjson.loads(text)  # the same values as json.loads, several times faster
    except orjson.JSONDecodeError as exc:
        raise FrameError("CorruptAnnotation", f"{where}: not valid JSON ({exc})") from None
    if not isinstance(anno, dict):
        raise FrameError("CorruptAnnotation", f"{where}: expected a JSON object")
    boxes = anno.get("bounding_boxes") or []
    ego = next((b for b in boxes if isinstance(b, dict) and b.get("class") == "ego_vehicle"), None)
    try:
        w2e_left = np.asarray(ego["world2ego"], dtype=np.float64).reshape(4, 4)  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise FrameError("MissingEgoPose", f"{where}: no ego_vehicle box with a 4x4 world2ego") from None
    if not np.isfinite(w2e_left).all():
        raise FrameError("MissingEgoPose", f"{where}: the ego's world2ego is not finite")
    w2e = FLIP @ w2e_left @ FLIP
    # Rigid inverse in closed form: ego -> world rotation R^T, position -R^T t (np.linalg.inv costs
    # ~10x more per 4x4 and is the largest non-image cost per sample).
    rot_t = w2e[:3, :3].T
    position = -rot_t @ w2e[:3, 3]
    pose = np.array([position[0], position[1], float(np.arctan2(rot_t[1, 0], rot_t[0, 0]))])
    speed = anno.get("speed")
    imu = anno.get("acceleration")
    cmd = anno.get("command_near")
    return Frame(
        index=index,
        pose=pose,
        world2ego=w2e,
        speed=float(speed) if isinstance(speed, (int, float)) and np.isfinite(speed) else None,
        imu=np.asarray(imu, np.float64) if isinstance(imu, list) and len(imu) == 3 else None,
        command=int(cmd) if isinstance(cmd, (int, float)) and np.isfinite(cmd) else None,
        sensors=anno.get("sensors") or {},
        boxes=[b for b in boxes if isinstance(b, dict) and b is not ego],
    )


def camera_extrinsics(cam2ego_left: Any) -> np.ndarray:
    """Camera(OpenCV axes) -> ego(right-handed) from Bench2Drive's ``cam2ego`` (Unreal camera axes)."""
    m = np.asarray(cam2ego_left, dtype=np.float64).reshape(4, 4)
    return FLIP @ m @ CV_TO_UE


def command_of(option: int | None, mapping: dict[str, str]) -> str:
    """The Command value of a RoadOption int (unknown for None or an unlisted value)."""
    name = ROAD_OPTIONS.get(option) if option is not None else None
    return mapping.get(name, Command.UNKNOWN.value) if name else Command.UNKNOWN.value


def ego_kinematics(
    prev: Frame | None, cur: Frame, nxt: Frame | None, dt: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Velocity and acceleration (2-vectors, ego frame at ``cur``), or None when nothing gives them."""
    heading = float(cur.pose[2])
    if prev is not None and nxt is not None:
        v = (nxt.pose[:2] - prev.pose[:2]) / (2 * dt)
        a = (nxt.pose[:2] - 2 * cur.pose[:2] + prev.pose[:2]) / (dt * dt)
        return vectors_to_local(v, heading), vectors_to_local(a, heading)
    if cur.speed is None or cur.imu is None:
        return None
    # IMU fallback: specific force = a + g (world +z), in the sensor (= ego, left-handed) axes.
    w2e_left = FLIP @ cur.world2ego @ FLIP
    a_left = cur.imu - GRAVITY * w2e_left[:3, 2]
    return np.array([cur.speed, 0.0]), np.array([a_left[0], -a_left[1]])


def to_ego_objects(
    cur: Frame, prev: Frame | None, nxt: Frame | None, dt: float, left_out: Counter[str]
) -> tuple[Object, ...]:
    """The boxes of ``cur`` in its ego frame (right-handed), with velocities in the ego frame.

    Plain float arithmetic per box (a few dozen boxes per frame; numpy's per-call overhead on 3-vectors
    would cost more than the arithmetic).
    """
    (e00, e01, e02, t0), (e10, e11, e12, t1) = cur.world2ego[:2].tolist()
    heading = float(cur.pose[2])
    ch, sh = math.cos(heading), math.sin(heading)
    neighbours = [(f, sign) for f, sign in ((prev, -1), (nxt, 1)) if f is not None]
    out = []
    for b in cur.boxes:
        cls = b.get("class")
        try:
            cx, cy, cz = (float(v) for v in b["center"][:3])
            cy = -cy  # left-handed world -> right-handed
            hl, hw = float(b["extent"][0]), float(b["extent"][1])  # HALF sizes
            x = e00 * cx + e01 * cy + e02 * cz + t0
            y = e10 * cx + e11 * cy + e12 * cz + t1
            yaw = _box_yaw(b, (e00, e01, e02, e10, e11, e12), heading)
        except (KeyError, TypeError, ValueError, IndexError):
            left_out[f"{cls}_without_center_extent_or_rotation"] += 1
            continue
        state = None
        if cls == "vehicle":
            base = str(b.get("base_type") or "")
            category = "cyclist" if base in ("bicycle", "motorcycle") else "vehicle"
            speed = b.get("speed")
            if not isinstance(speed, (int, float)):
                left_out["vehicle_without_speed"] += 1
                continue
            vx, vy = speed * math.cos(yaw), speed * math.sin(yaw)  # forward speed along its heading
        elif cls == "walker":
            category = "pedestrian"
            vel = _differenced_velocity(str(b.get("id")), neighbours, cur, dt)  # their speed is always 0
            if vel is None:
                left_out["pedestrian_without_neighbour_frame"] += 1
                continue
            vx, vy = ch * vel[0] + sh * vel[1], -sh * vel[0] + ch * vel[1]
        elif cls in ("traffic_light", "traffic_sign"):
            category = str(cls)
            raw = b.get("state") if cls == "traffic_light" else b.get("type_id")
            state = TRAFFIC_LIGHT_STATES.get(raw, str(raw)) if isinstance(raw, int) else (str(raw) if raw else None)
            vx = vy = 0.0
        else:
            left_out[f"class_{cls}"] += 1
            continue
        if not all(math.isfinite(v) for v in (x, y, yaw, hl, hw, vx, vy)):
            left_out["non_finite"] += 1
            continue
        out.append(
            Object(
                category=category,
                x=x,
                y=y,
                heading=float(wrap_angle(yaw)),
                length=2.0 * hl,
                width=2.0 * hw,
                vx=float(vx),
                vy=float(vy),
                track_id=str(b.get("id")),
                state=state,
            )
        )
    return tuple(out)


def _box_yaw(b: dict[str, Any], ego_rows: tuple[float, ...], ego_heading: float) -> float:
    """Heading in the ego frame: from the actor matrix when there is one, else ``rotation`` yaw.

    ``ego_rows`` are the first two rows of the right-handed world->ego rotation. The actor's
    right-handed world->actor rotation is F L F (L the stored left-handed one); the actor->ego
    rotation is R_e @ (F L F)^T, of which only column 0 is needed.
    """
    key = next((k for k in ACTOR_MATRIX_KEYS if k in b), None)
    if key is not None:
        row0 = b[key][0]  # first row of the 4x4 (list of lists, as json.dump writes a matrix)
        a0, a1, a2 = float(row0[0]), -float(row0[1]), float(row0[2])  # row 0 of F L F
        e00, e01, e02, e10, e11, e12 = ego_rows
        return math.atan2(e10 * a0 + e11 * a1 + e12 * a2, e00 * a0 + e01 * a1 + e02 * a2)
    world_yaw = -math.radians(float(b["rotation"][2]))  # (pitch, roll, yaw) deg, clockwise -> CCW
    return world_yaw - ego_heading


def _differenced_velocity(
    actor: str, neighbours: list[tuple[Frame, int]], cur: Frame, dt: float
) -> np.ndarray | None:
    """World velocity (right-handed) of an actor from its centre in the neighbour frames."""
    here = cur.centre(actor)
    pts = {sign: f.centre(actor) for f, sign in neighbours}
    pts = {s: p for s, p in pts.items() if p is not None}
    if here is None or not pts:
        return None
    if -1 in pts and 1 in pts:
        return (pts[1] - pts[-1]) / (2 * dt)
    sign, p = next(iter(pts.items()))
    return (p - here) / dt * sign


__all__ = ["Bench2DriveSource", "Frame", "FrameError", "camera_extrinsics", "parse_frame"]


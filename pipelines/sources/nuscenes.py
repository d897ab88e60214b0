"""nuScenes source through ``nuscenes-devkit``: one sample per keyframe with full history and future.

* Keyframes (``sample``) are 2 Hz; the ego pose of a keyframe is that of its
  LIDAR_TOP sample_data (``pose_channel``). History and future are the
  previous/next keyframes' poses expressed in the ego frame at t0 (nuScenes'
  ego frame is x forward, y left, z up, like ours; its LIDAR_TOP frame is not
  and is never used for geometry here).
* Camera clips are the previous keyframes' images of each channel. The
  extrinsics map camera axes (nuScenes cameras are OpenCV-like already) to the
  ego frame at t0 through the camera's own ego pose: cameras fire up to ~50 ms
  after the lidar, so ``calibrated_sensor`` alone would be off by that motion.
* Velocity/acceleration: the CAN bus ``pose`` messages (ego frame, 50 Hz,
  interpolated) when the scene has them, else central differences of the
  keyframe poses around t0 (the three-point derivative, exact for constant
  acceleration; a backward difference lags half a step). The row's
  ``velocity_source`` says which (``can_bus`` / ``pose_central_difference``)
  and the run summary counts the fallback (``velocity_from_poses``).
* Command: from the route — the lateral offset of the ego pose
  ``command_horizon_s`` ahead (or the last pose of the scene before it) beyond
  ``command_lateral_m`` is left/right, else straight (the reference uses 8 s
  and 2 m).
* Objects: the keyframe's annotations in the ego frame; velocity from
  ``box_velocity`` rotated into the ego frame. An object whose velocity
  cannot be estimated (annotated in one keyframe only: a static obstacle,
  say) is kept with ``vx``/``vy`` null and counted in the run summary
  (``objects_velocity_unknown``), as are annotations left out for too few
  lidar points (``objects_too_few_lidar_points``).
* The dataroot is checked up front: the 13 tables the devkit loads, a
  non-empty ``map.json`` whose map files exist and cover every log, so an
  incomplete download fails naming what is missing, not with a devkit
  traceback.
* DriveLM-nuScenes QA is joined by sample token when ``drivelm_path`` is set.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson

from pipelines.core.stage import Drop, Fail, Note
from pipelines.geometry import (
    poses_to_local,
    rotation_from_quaternion,
    transform_matrix,
    wrap_angle,
)
from pipelines.io.fs import is_url
from pipelines.io.images import ImageError
from pipelines.sources.base import (
    EXTRACTOR_VERSION,
    ImageCache,
    Outcome,
    Source,
    SourceError,
    WorkUnit,
    finite,
    label_sample,
    make_clip,
    read_image_file,
)
from schemas.enums import Camera, Command, Dataset
from schemas.sample import MODEL_DT, Object, Sample, make_sample_id

log = logging.getLogger(__name__)

DATASET: Final = Dataset.NUSCENES.value
CHANNELS: Final[dict[str, str]] = {  # canonical camera -> nuScenes channel
    Camera.FRONT.value: "CAM_FRONT",
    Camera.FRONT_LEFT.value: "CAM_FRONT_LEFT",
    Camera.FRONT_RIGHT.value: "CAM_FRONT_RIGHT",
    Camera.BACK.value: "CAM_BACK",
    Camera.BACK_LEFT.value: "CAM_BACK_LEFT",
    Camera.BACK_RIGHT.value: "CAM_BACK_RIGHT",
}
# devkit split lists per version -> our split
DEVKIT_SPLITS: Final[dict[str, dict[str, str]]] = {
    "v1.0-mini": {"mini_train": "train", "mini_val": "val"},
    "v1.0-trainval": {"train": "train", "val": "val"},
    "v1.0-test": {"test": "test"},
}
# The 13 tables NuScenes(version, dataroot) loads (nuscenes-devkit 1.2.0, NuScenes.__init__).
REQUIRED_TABLES: Final = (
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


def check_dataroot(root: Path, version: str) -> None:
    """Raise :class:`SourceError` naming every table or map file the devkit would miss."""
    tables = root / version
    absent = [f"{t}.json" for t in REQUIRED_TABLES if not (tables / f"{t}.json").is_file()]
    if absent:
        raise SourceError(
            f"{DATASET}: {tables} lacks table(s) {absent} (is --input the nuScenes dataroot "
            f"and options.version={version!r} right?)"
        )
    try:
        maps = json.loads((tables / "map.json").read_text())
        logs = json.loads((tables / "log.json").read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{DATASET}: cannot read {tables}/map.json or log.json: {exc}") from None
    if not maps:
        raise SourceError(f"{DATASET}: {tables}/map.json is empty; the devkit needs the map records")
    missing = sorted({m.get("filename", "?") for m in maps if not (root / str(m.get("filename", ""))).is_file()})
    if missing:
        raise SourceError(f"{DATASET}: map file(s) {missing} listed in map.json are missing under {root}")
    mapped = {t for m in maps for t in m.get("log_tokens", ())}
    unmapped = sorted(lg.get("logfile") or lg["token"] for lg in logs if lg["token"] not in mapped)
    if unmapped:
        raise SourceError(f"{DATASET}: log(s) {unmapped[:5]} are in no map's log_tokens in {tables}/map.json")


def object_category(name: str) -> str:
    """nuScenes category name -> vehicle / pedestrian / cyclist / other."""
    if name in ("vehicle.bicycle", "vehicle.motorcycle"):
        return "cyclist"
    if name.startswith("vehicle."):
        return "vehicle"
    if name.startswith("human.pedestrian"):
        return "pedestrian"
    return "other"


@dataclass(frozen=True, slots=True)
class NuScenesOptions:
    """``options:`` of the nuScenes config."""

    version: str = "v1.0-mini"
    # devkit split -> our split; empty = by version (mini_train/mini_val, train/val, test)
    split_map: dict[str, str] = field(default_factory=dict)
    pose_channel: str = "LIDAR_TOP"  # whose keyframe ego pose is "the" ego pose of a sample
    velocity_source: str = "auto"  # auto (CAN bus when present, else poses) | can_bus | poses
    command_horizon_s: float = 8.0
    command_lateral_m: float = 2.0
    min_lidar_points: int = 0  # keep annotations with at least this many lidar points
    drivelm_path: str | None = None  # DriveLM-nuScenes v1.1 JSON (train), joined by sample token

    def __post_init__(self) -> None:
        if self.velocity_source not in ("auto", "can_bus", "poses"):
            raise ValueError(
                f"options.velocity_source {self.velocity_source!r}: use auto, can_bus or poses"
            )
        if self.command_horizon_s <= 0 or self.command_lateral_m <= 0:
            raise ValueError("options.command_horizon_s and options.command_lateral_m must be > 0")


def route_command(future_xy: np.ndarray, lateral_m: float) -> str:
    """Command from the lateral offset of the last pose considered (ego frame, y left)."""
    if len(future_xy) == 0:
        return Command.UNKNOWN.value
    y = float(future_xy[-1, 1])
    if y > lateral_m:
        return Command.LEFT.value
    if y < -lateral_m:
        return Command.RIGHT.value
    return Command.STRAIGHT.value


def drivelm_qa(entry: dict[str, Any]) -> list[dict[str, str]]:
    """DriveLM key-frame entry -> [{category, question, answer}] (categories in file order)."""
    out = []
    for category, items in (entry.get("QA") or {}).items():
        for qa in items or ():
            out.append(
                {
                    "category": str(category),
                    "question": str(qa.get("Q", "")),
                    "answer": str(qa.get("A", "")),
                }
            )
    return out


class CanBus:
    """A scene's CAN-bus ``pose`` messages: ego-frame velocity/acceleration at any time (interpolated)."""

    def __init__(self, path: Path) -> None:
        # orjson: the same values as json.loads, several times faster; a scene's pose messages
        # (50 Hz) were the largest per-row cost of extract beyond the images (bench/extract.py --profile)
        msgs = sorted(orjson.loads(path.read_bytes()), key=lambda m: m["utime"])
        self.path = path
        self.t = [int(m["utime"]) for m in msgs]
        self.vel = np.array([m["vel"][:2] for m in msgs], dtype=np.float64)
        self.acc = np.array([m["accel"][:2] for m in msgs], dtype=np.float64)

    def at(self, t_us: int, max_gap_us: int = 100_000) -> tuple[np.ndarray, np.ndarray] | None:
        i = bisect.bisect_left(self.t, t_us)
        if i == 0 or i == len(self.t):
            j = 0 if i == 0 else len(self.t) - 1
            if abs(self.t[j] - t_us) > max_gap_us:
                return None
            return self.vel[j], self.acc[j]
        t0, t1 = self.t[i - 1], self.t[i]
        if t1 - t0 > max_gap_us:
            return None
        w = (t_us - t0) / (t1 - t0)
        return (1 - w) * self.vel[i - 1] + w * self.vel[i], (1 - w) * self.acc[
            i - 1
        ] + w * self.acc[i]


class NuScenesSource(Source):
    """nuScenes keyframes -> unified samples (one per keyframe with full history, clip and future)."""

    name = DATASET
    Options = NuScenesOptions

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        missing = [c for c in cfg.cameras if c not in CHANNELS]
        if missing:
            raise SourceError(f"{DATASET}: no camera {missing} (nuScenes has {sorted(CHANNELS)})")
        if is_url(self.root):  # nuscenes-devkit opens its tables and images from a local dataroot
            raise SourceError(
                f"{DATASET}: input {self.root} is an object-store URL, but nuscenes-devkit reads a local "
                "dataroot; copy the dataset to local disk or mount the bucket (e.g. gcsfuse, mountpoint-s3) "
                "and pass that path as --input (outputs may still be s3:// or gs://)"
            )
        check_dataroot(self.root, self.options.version)
        if self.options.drivelm_path and not Path(self.options.drivelm_path).is_file():
            raise SourceError(
                f"{DATASET}: options.drivelm_path {self.options.drivelm_path!r} does not exist"
            )

    def _split_map(self) -> dict[str, str]:
        if self.options.split_map:
            return dict(self.options.split_map)
        if self.options.version not in DEVKIT_SPLITS:
            raise SourceError(
                f"{DATASET}: unknown version {self.options.version!r}; set options.split_map"
            )
        return DEVKIT_SPLITS[self.options.version]

    def work_units(self) -> list[WorkUnit]:
        from nuscenes.utils.splits import create_splits_scenes

        lists = create_splits_scenes()
        scene_split: dict[str, str] = {}
        for devkit_split, ours in self._split_map().items():
            for name in lists.get(devkit_split, ()):
                scene_split.setdefault(name, ours)
        scenes = json.loads((self.root / self.options.version / "scene.json").read_text())
        units, unknown = [], []
        nusc = None
        for sc in scenes:
            split = scene_split.get(sc["name"])
            if split is None:
                unknown.append(sc["name"])
            elif split in self.cfg.splits:
                if nusc is None:  # the full devkit tables: loaded once, here on the driver only
                    from nuscenes.nuscenes import NuScenes

                    nusc = NuScenes(version=self.options.version, dataroot=str(self.root), verbose=False)
                units.append(
                    WorkUnit(
                        f"{split}/{sc['name']}",
                        split,
                        {"scene_token": sc["token"], "scene": sc["name"], "tables": scene_tables(nusc, sc["token"])},
                    )
                )
        del nusc
        if unknown:
            log.warning(
                "%s: %d scenes are in no split of %s and are skipped: %s",
                DATASET,
                len(unknown),
                sorted(self._split_map()),
                unknown[:5],
            )
        return sorted(units, key=lambda u: u.key)

    def open(self) -> None:
        # Workers never load the devkit tables: each unit carries its scene's records (scene_tables).
        if getattr(self, "_drivelm", None) is not None:
            return
        self._drivelm: dict[str, list[dict[str, str]]] = {}
        if self.options.drivelm_path:
            data = json.loads(Path(self.options.drivelm_path).read_text())
            for scene in data.values():
                for token, entry in (scene.get("key_frames") or {}).items():
                    self._drivelm[token] = drivelm_qa(entry)

    def close(self) -> None:
        self._drivelm = None

    def iter_unit(self, unit: WorkUnit) -> Iterator[Outcome]:
        self.open()
        yield from _SceneReader(self, unit).run()


def scene_tables(nusc: Any, scene_token: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The devkit records one scene needs, by table and token (a slim per-scene index).

    Built on the driver from the loaded devkit (so records carry the devkit's reverse
    index: ``sample['data']``/``['anns']``, ``sample_annotation['category_name']``);
    a worker then holds one scene's records instead of every table of the release.
    Annotation ``prev``/``next`` links stay inside a scene, so velocities need nothing more.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {
        t: {} for t in ("scene", "sample", "sample_data", "ego_pose", "calibrated_sensor", "sample_annotation")
    }
    out["scene"][scene_token] = nusc.get("scene", scene_token)
    tok = out["scene"][scene_token]["first_sample_token"]
    while tok:
        s = nusc.get("sample", tok)
        out["sample"][tok] = s
        for sd_token in s["data"].values():
            sd = nusc.get("sample_data", sd_token)
            out["sample_data"][sd_token] = sd
            out["ego_pose"][sd["ego_pose_token"]] = nusc.get("ego_pose", sd["ego_pose_token"])
            cs = sd["calibrated_sensor_token"]
            out["calibrated_sensor"][cs] = nusc.get("calibrated_sensor", cs)
        for ann in s["anns"]:
            out["sample_annotation"][ann] = nusc.get("sample_annotation", ann)
        tok = s["next"]
    return out


class SceneTables:
    """The devkit calls the scene reader makes (``get``, ``box_velocity``) over one scene's records."""

    def __init__(self, tables: dict[str, dict[str, dict[str, Any]]]) -> None:
        self.tables = tables

    def get(self, table: str, token: str) -> dict[str, Any]:
        try:
            return self.tables[table][token]
        except KeyError:
            raise KeyError(f"{DATASET}: {table} record {token} is not in this scene's index") from None

    def box_velocity(self, sample_annotation_token: str, max_time_diff: float = 1.5) -> np.ndarray:
        from nuscenes.nuscenes import NuScenes

        # the devkit's own estimate; it reads annotations and samples through self.get only
        return NuScenes.box_velocity(self, sample_annotation_token, max_time_diff)  # type: ignore[arg-type]


class _SceneReader:
    """One scene's keyframes -> outcomes, decoding each camera frame once."""

    def __init__(self, src: NuScenesSource, unit: WorkUnit) -> None:
        self.src, self.cfg, self.opts = src, src.cfg, src.options
        if "tables" not in unit.payload:
            raise SourceError(f"{DATASET}: work unit {unit.key} carries no scene tables (made by an older version?)")
        self.nusc = SceneTables(unit.payload["tables"])
        self.split = unit.split
        self.scene_name: str = unit.payload["scene"]
        scene = self.nusc.get("scene", unit.payload["scene_token"])
        self.samples = []
        tok = scene["first_sample_token"]
        while tok:
            s = self.nusc.get("sample", tok)
            self.samples.append(s)
            tok = s["next"]
        self.t = np.array([s["timestamp"] for s in self.samples], dtype=np.int64)
        self.mats = [self._ego_matrix(s["data"][self.opts.pose_channel]) for s in self.samples]
        self.poses = np.array([[m[0, 3], m[1, 3], np.arctan2(m[1, 0], m[0, 0])] for m in self.mats])
        self.images = ImageCache(self.cfg.image)
        clip = self.cfg.clip
        self.span = [k * clip.step for k in range(clip.frames - 1, -1, -1)]
        self.can: CanBus | None = None
        can_path = src.root / "can_bus" / f"{self.scene_name}_pose.json"
        if self.opts.velocity_source != "poses" and can_path.is_file():
            self.can = CanBus(can_path)
        self.left_out: Counter[str] = Counter()
        self.tables = f"{self.opts.version}/"
        self.root = str(src.root)

    def _ego_matrix(self, sd_token: str) -> np.ndarray:
        ep = self.nusc.get("ego_pose", self.nusc.get("sample_data", sd_token)["ego_pose_token"])
        return transform_matrix(
            np.asarray(ep["rotation"], dtype=np.float64),
            np.asarray(ep["translation"], dtype=np.float64),
        )

    def run(self) -> Iterator[Outcome]:
        n = len(self.samples)
        need_past = max(
            self.cfg.history, self.span[0], 1 if self.opts.velocity_source != "can_bus" else 0
        )
        for k, s in enumerate(self.samples):
            sid = make_sample_id(DATASET, self.scene_name, s["token"])
            if k < need_past:
                yield Drop(sid, "insufficient_history", self.tables)
            elif k + self.cfg.future >= n:
                yield Drop(sid, "insufficient_future", self.tables)
            else:
                yield self._sample(k, sid)
            self.images.retain(lambda key, k=k: key[0] >= k + 1 - self.span[0])
        if self.left_out:
            log.info("%s %s: notes: %s", DATASET, self.scene_name, dict(self.left_out))
        for key, count in sorted(self.left_out.items()):
            yield Note(key, count)

    def _sample(self, k: int, sid: str) -> Outcome:
        s = self.samples[k]
        window = self.poses[max(0, k - max(self.cfg.history, 1)) : k + self.cfg.future + 1]
        if not finite(window, self.mats[k]):
            return Fail(
                sid,
                "InvalidPose",
                f"{self.tables}ego_pose.json: non-finite ego pose near sample {s['token']}",
                self.tables + "ego_pose.json",
            )
        origin = self.poses[k]
        history = poses_to_local(self.poses[k - self.cfg.history : k], origin)
        future = poses_to_local(self.poses[k + 1 : k + 1 + self.cfg.future], origin)
        ahead = min(len(self.samples) - 1, k + int(round(self.opts.command_horizon_s / MODEL_DT)))
        command = route_command(
            poses_to_local(self.poses[ahead : ahead + 1], origin)[:, :2],
            self.opts.command_lateral_m,
        )
        motion = self._motion(k)
        if motion is None:
            return Fail(
                sid,
                "MissingCanBus",
                f"can_bus/{self.scene_name}_pose.json: no CAN-bus pose at "
                f"{int(self.t[k])} (options.velocity_source=can_bus)",
                f"can_bus/{self.scene_name}_pose.json",
            )
        try:
            cameras, files = self._cameras(k)
        except ImageError as exc:
            return Fail(
                sid, "ImageError", str(exc), getattr(exc, "file", None) or str(exc).split(":")[0]
            )
        return Sample(
            sample_id=sid,
            dataset=DATASET,
            split=self.split,
            scene_id=self.scene_name,
            timestamp_us=int(s["timestamp"]),
            cameras=cameras,
            history=history,
            future=future,
            velocity=motion[0],
            acceleration=motion[1],
            velocity_source=motion[2],
            command=command,
            objects=self._objects(s, self.mats[k]),
            drivelm_qa=self.src._drivelm.get(s["token"]) if self.src._drivelm else None,
            source_files=(self.tables, *files),
            extractor_version=EXTRACTOR_VERSION,
            **label_sample(history, future, self.cfg.meta_actions),
        )

    def _motion(self, k: int) -> tuple[np.ndarray, np.ndarray, str] | None:
        """Velocity, acceleration (ego frame at t0) and their source: CAN bus, else pose differences."""
        if self.can is not None:
            got = self.can.at(int(self.t[k]))
            if got is not None:
                return got[0], got[1], "can_bus"
        if self.opts.velocity_source == "can_bus":
            return None
        self.left_out["velocity_from_poses"] += 1
        vel, acc = central_difference(self.t[k - 1 : k + 2] / 1e6, self.poses[k - 1 : k + 2, :2])
        yaw = self.poses[k, 2]
        c, sn = np.cos(yaw), np.sin(yaw)
        rot = np.array([[c, sn], [-sn, c]])  # world -> ego
        return rot @ vel, rot @ acc, "pose_central_difference"

    def _cameras(self, k: int) -> tuple[tuple[Any, ...], list[str]]:
        clips, files = [], []
        ego0_inv = _rigid_inverse(self.mats[k])
        for cam in self.cfg.cameras:
            ch = CHANNELS[cam]
            frames, rels = [], []
            for d in self.span:
                sd = self.nusc.get("sample_data", self.samples[k - d]["data"][ch])
                rel = sd["filename"]
                img = self.images.get(
                    (k - d, ch),
                    lambda rel=rel: read_image_file(os.path.join(self.root, rel), rel),
                    rel,
                )
                frames.append((img, int(sd["timestamp"])))
                rels.append(rel)
            sd = self.nusc.get("sample_data", self.samples[k]["data"][ch])
            files.append(sd["filename"])
            cs = self.nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            cam_to_egocam = transform_matrix(
                np.asarray(cs["rotation"], np.float64), np.asarray(cs["translation"], np.float64)
            )
            # camera -> ego at capture -> global -> ego at t0 (the lidar keyframe time)
            extrinsic = ego0_inv @ self._ego_matrix(sd["token"]) @ cam_to_egocam
            k_mat = np.asarray(cs["camera_intrinsic"], dtype=np.float64)
            clips.append(
                make_clip(
                    cam, frames, k_mat, (int(sd["width"]), int(sd["height"])), extrinsic, rels
                )
            )
        return tuple(clips), files

    def _objects(self, s: dict[str, Any], ego: np.ndarray) -> tuple[Object, ...]:
        rot0_t = ego[:3, :3].T
        out = []
        for tok in s["anns"]:
            ann = self.nusc.get("sample_annotation", tok)
            if ann.get("num_lidar_pts", 0) < self.opts.min_lidar_points:
                self.left_out["objects_too_few_lidar_points"] += 1
                continue
            centre = rot0_t @ (np.asarray(ann["translation"], np.float64) - ego[:3, 3])
            rel = rot0_t @ rotation_from_quaternion(np.asarray(ann["rotation"], np.float64))
            vel = self.nusc.box_velocity(tok)  # NaN when annotated in one keyframe only
            if np.isfinite(vel[:2]).all():
                v = rot0_t @ np.asarray(vel, np.float64)
                vx, vy = float(v[0]), float(v[1])
            else:  # kept: a static obstacle seen once is still an obstacle
                self.left_out["objects_velocity_unknown"] += 1
                vx = vy = None
            out.append(
                Object(
                    category=object_category(ann["category_name"]),
                    x=float(centre[0]),
                    y=float(centre[1]),
                    heading=float(wrap_angle(np.arctan2(rel[1, 0], rel[0, 0]))),
                    length=float(ann["size"][1]),
                    width=float(ann["size"][0]),
                    vx=vx,
                    vy=vy,
                    track_id=ann["instance_token"],
                )
            )
        return tuple(out)


def central_difference(t: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Velocity and acceleration at the middle of three timed points ``t (3,)``, ``xy (3,2)``.

    The derivatives of the parabola through the points (exact for constant
    acceleration; for unequal steps too), unlike a backward difference, which
    gives the velocity half a step earlier.
    """
    h0, h1 = float(t[1] - t[0]), float(t[2] - t[1])
    d0, d1 = xy[1] - xy[0], xy[2] - xy[1]
    denom = h0 * h1 * (h0 + h1)
    vel = (h0 * h0 * d1 + h1 * h1 * d0) / denom
    acc = 2.0 * (h0 * d1 - h1 * d0) / denom
    return vel, acc


def _rigid_inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a rotation + translation (cheaper and exact, unlike a general LAPACK inverse)."""
    out = np.eye(4)
    out[:3, :3] = m[:3, :3].T
    out[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return out

"""nuPlan via NAVSIM/OpenScene: 2 Hz log pickles + sensor blobs -> unified samples.

* Logs (``navsim_logs/<split>/<log>.pkl``) are read with the restricted
  unpickler (:mod:`pipelines.io.safe_pickle`); images from
  ``sensor_blobs/<split>/<data_path>``.
* Scenes follow NAVSIM's ``SceneFilter``: windows of ``num_history_frames``
  (NAVSIM counts the current frame among them) + ``num_future_frames`` frames
  start every ``frame_interval`` frames (None = non-overlapping); the current
  frame is index ``num_history_frames - 1``. Every frame of a log is one
  outcome: the first ``num_history_frames - 1`` frames are only ever history
  (``before_first_window``), frames between window centres (interval > 1)
  are ``not_window_centre``, windows cut by the end of the log are dropped
  (``window_too_short``), as are frames without a route (``has_route``) or
  outside a token list. Our history H is the last H of the
  ``num_history_frames - 1`` past frames: NAVSIM's default 4 gives H = 3, so
  the shipped config uses 5 to get H = 4 like the other datasets.
* Poses: ``ego2global`` translation + quaternion (w first) into the ego frame
  at t0, the yaw taken as pyquaternion's ``yaw_pitch_roll[0]`` like NAVSIM and
  OpenScene (:func:`~pipelines.geometry.pyquaternion_yaw`);
  velocity/acceleration: ``ego_dynamic_state`` (already ego frame);
  command: the one-hot ``driving_command`` (left, straight, right, unknown).
* Cameras: extrinsics = ``sensor2lidar_rotation/translation`` as they are.
  Despite the name they are camera-to-EGO: OpenScene's converter
  (``DriveEngine/process_data/helpers/nuplan_cameras_utils.py``) copies
  nuPlan's ``camera.rotation/translation`` (relative to the ego frame) into
  them, and NAVSIM projects ego-frame boxes with them alone
  (``navsim/visualization/camera.py``); ``lidar2ego`` is nuPlan's real lidar
  extrinsic and must not be composed in. Camera axes are OpenCV-like. Lens:
  ``distortion`` (nuPlan's OpenCV coefficients k1, k2, p1, p2, k3) is kept as
  ``distortion_model="opencv"``: the sensor blobs are not rectified. Logs
  carry no image size, so the calibration size is the decoded image's.
* Objects: ``anns.gt_boxes`` (x, y, z, l, w, h, yaw; ego frame; yaw not wrapped
  by the converter), ``gt_velocity_3d`` in the lidar frame, rotated to ego.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from pipelines.core.stage import Drop, Fail, Note
from pipelines.geometry import poses_to_local, pyquaternion_yaw, transform_matrix, wrap_angle
from pipelines.io.images import ImageError
from pipelines.io.safe_pickle import safe_load
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
from schemas.sample import Object, Sample, make_sample_id, sanitize_id_part

log = logging.getLogger(__name__)

DATASET: Final = Dataset.NUPLAN.value
LOGS_DIR: Final = "navsim_logs"
BLOBS_DIR: Final = "sensor_blobs"
CHANNELS: Final[dict[str, str]] = {  # canonical camera -> NAVSIM channel
    Camera.FRONT.value: "CAM_F0",
    Camera.FRONT_LEFT.value: "CAM_L0",
    Camera.FRONT_RIGHT.value: "CAM_R0",
    Camera.SIDE_LEFT.value: "CAM_L1",
    Camera.SIDE_RIGHT.value: "CAM_R1",
    Camera.BACK_LEFT.value: "CAM_L2",
    Camera.BACK_RIGHT.value: "CAM_R2",
    Camera.BACK.value: "CAM_B0",
}
COMMANDS: Final = (Command.LEFT, Command.STRAIGHT, Command.RIGHT, Command.UNKNOWN)  # one-hot order
CATEGORIES: Final[dict[str, str]] = {
    "vehicle": "vehicle",
    "pedestrian": "pedestrian",
    "bicycle": "cyclist",
}


@dataclass(frozen=True, slots=True)
class SceneFilter:
    """NAVSIM's scene selection (``navsim.common.dataclasses.SceneFilter`` semantics)."""

    num_history_frames: int = 5  # including the current frame (NAVSIM default 4 -> H = 3)
    num_future_frames: int = 10  # 0 on test logs without futures
    frame_interval: int | None = 1  # None: non-overlapping windows
    has_route: bool = True  # drop frames whose roadblock_ids are empty
    tokens: list[str] | None = None  # keep only these current-frame tokens
    log_names: list[str] | None = None  # keep only these logs

    @property
    def num_frames(self) -> int:
        return self.num_history_frames + self.num_future_frames

    @property
    def interval(self) -> int:
        return self.frame_interval or self.num_frames


@dataclass(frozen=True, slots=True)
class NuPlanOptions:
    """``options:`` of the nuPlan/NAVSIM config."""

    # NAVSIM split directory -> our split
    split_map: dict[str, str] = field(
        default_factory=lambda: {
            "mini": "train",
            "trainval": "train",
            "test": "test",
            "private_test_e2e": "test",
        }
    )
    scene_filter: SceneFilter = SceneFilter()


def command_from_onehot(onehot: Any) -> str:
    """NAVSIM one-hot (left, straight, right, unknown) -> Command value."""
    v = np.asarray(onehot, dtype=np.float64).reshape(-1)
    if v.size == 0 or not np.isfinite(v).all() or v.max() <= 0:
        return Command.UNKNOWN.value
    i = int(v.argmax())
    return COMMANDS[i].value if i < len(COMMANDS) else Command.UNKNOWN.value


def frame_pose(frame: dict[str, Any]) -> np.ndarray:
    """World ``(x, y, yaw)`` of a log frame's ego."""
    t = np.asarray(frame["ego2global_translation"], dtype=np.float64)
    q = np.asarray(frame["ego2global_rotation"], dtype=np.float64)
    return np.array([t[0], t[1], float(pyquaternion_yaw(q))])


def lidar2ego(frame: dict[str, Any]) -> np.ndarray:
    if "lidar2ego" in frame:
        return np.asarray(frame["lidar2ego"], dtype=np.float64).reshape(4, 4)
    return transform_matrix(
        np.asarray(frame["lidar2ego_rotation"], np.float64),
        np.asarray(frame["lidar2ego_translation"], np.float64),
    )


def lens(info: dict[str, Any]) -> tuple[str | None, np.ndarray | None]:
    """A ``cams`` entry's lens: ("opencv", coefficients) from ``distortion``, (None, None) without one."""
    raw = info.get("distortion")
    if raw is None:
        return None, None
    coeffs = np.asarray(raw, np.float64).reshape(-1)
    if coeffs.size == 0:
        return None, None
    if coeffs.size not in (4, 5, 8) or not finite(coeffs):
        raise ValueError(f"distortion {coeffs.tolist()} is not 4, 5 or 8 finite OpenCV coefficients")
    return "opencv", coeffs


class NuPlanSource(Source):
    """NAVSIM logs -> unified samples, one per SceneFilter window."""

    name = DATASET
    Options = NuPlanOptions

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        sf = self.options.scene_filter
        if sf.num_history_frames < cfg.history + 1:
            raise SourceError(
                f"{DATASET}: options.scene_filter.num_history_frames={sf.num_history_frames} includes the current "
                f"frame, so it must be >= history + 1 = {cfg.history + 1}"
            )
        if sf.num_future_frames not in (0,) and sf.num_future_frames < cfg.future:
            raise SourceError(
                f"{DATASET}: options.scene_filter.num_future_frames must be 0 or >= {cfg.future}"
            )
        if sf.num_future_frames == 0:
            self._check_futureless_splits(cfg)
        if sf.frame_interval is not None and sf.frame_interval < 1:
            raise SourceError(
                f"{DATASET}: options.scene_filter.frame_interval must be >= 1 or null"
            )
        missing = [c for c in cfg.cameras if c not in CHANNELS]
        if missing:
            raise SourceError(f"{DATASET}: unknown camera(s) {missing}")
        if not (self.root / LOGS_DIR).is_dir():
            raise SourceError(
                f"{DATASET}: {self.root / LOGS_DIR} does not exist (is --input the OpenScene root?)"
            )
        if not self.work_units():  # cheap (a directory listing): no silent empty run
            logs = self.root / LOGS_DIR
            held = {p.name: len(list(p.glob("*.pkl"))) for p in sorted(logs.iterdir()) if p.is_dir()}
            raise SourceError(
                f"{DATASET}: no log (*.pkl) of splits {list(cfg.splits)} under {logs}: its split directories "
                f"(with their .pkl counts) are {held or 'none'}, options.split_map is "
                f"{self.options.split_map}, options.scene_filter.log_names is {sf.log_names}"
            )

    def _check_futureless_splits(self, cfg: Any) -> None:
        """num_future_frames=0 only suits test splits: a future is required everywhere else."""
        logs = self.root / LOGS_DIR
        present = sorted(p.name for p in logs.iterdir() if p.is_dir()) if logs.is_dir() else []
        bad = [
            f"{d} -> {self.options.split_map[d]}"
            for d in present
            if self.options.split_map.get(d) in cfg.splits and self.options.split_map[d] != "test"
        ]
        if bad:
            raise SourceError(
                f"{DATASET}: options.scene_filter.num_future_frames=0 but navsim_logs/ split(s) {bad} map to a "
                "split that needs a 10-pose future; extract only the test split (--set splits=[test]) or set "
                f"num_future_frames >= {cfg.future}"
            )

    def work_units(self) -> list[WorkUnit]:
        units = []
        wanted = set(self.options.scene_filter.log_names or ())
        for split_dir in sorted(p for p in (self.root / LOGS_DIR).iterdir() if p.is_dir()):
            split = self.options.split_map.get(split_dir.name)
            if split is None:
                log.warning(
                    "%s: %s is not in options.split_map %s; skipped",
                    DATASET,
                    split_dir,
                    sorted(self.options.split_map),
                )
                continue
            if split not in self.cfg.splits:
                continue
            for path in sorted(split_dir.glob("*.pkl")):
                if wanted and path.stem not in wanted:
                    continue
                rel = str(path.relative_to(self.root))
                units.append(
                    WorkUnit(
                        f"{split}/{split_dir.name}/{sanitize_id_part(path.stem)}",
                        split,
                        {"log": rel, "split_dir": split_dir.name},
                    )
                )
        return sorted(units, key=lambda u: u.key)

    def iter_unit(self, unit: WorkUnit) -> Iterator[Outcome]:
        rel = unit.payload["log"]
        try:
            frames = safe_load(self.root / rel)
        except (pickle.UnpicklingError, OSError) as exc:
            yield Fail(None, type(exc).__name__, str(exc).replace(str(self.root) + "/", ""), rel)
            return
        if not isinstance(frames, list) or not all(isinstance(f, dict) for f in frames):
            yield Fail(
                None,
                "BadLog",
                f"{rel}: expected a list of frame dicts, got {type(frames).__name__}",
                rel,
            )
            return
        yield from _LogReader(self, unit, frames).run()


class _LogReader:
    """One log's windows -> outcomes, decoding each camera frame once."""

    def __init__(self, src: NuPlanSource, unit: WorkUnit, frames: list[dict[str, Any]]) -> None:
        self.src, self.cfg, self.sf = src, src.cfg, src.options.scene_filter
        self.split = unit.split
        self.rel: str = unit.payload["log"]
        self.blobs_rel = f"{BLOBS_DIR}/{unit.payload['split_dir']}"
        self.blobs = str(src.root / self.blobs_rel)
        self.frames = frames
        # The log file's stem is the log name in NAVSIM (frames repeat it); it is unique per file.
        self.log_name = unit.key.rsplit("/", 1)[-1]
        self.images = ImageCache(self.cfg.image)
        clip = self.cfg.clip
        self.span = [k * clip.step for k in range(clip.frames - 1, -1, -1)]
        self.tokens = set(self.sf.tokens) if self.sf.tokens is not None else None
        self.left_out: Counter[str] = Counter()
        self._poses: dict[int, np.ndarray] = {}

    def _sid(self, c: int) -> str:
        return make_sample_id(DATASET, self.log_name, str(self.frames[c]["token"]))

    def run(self) -> Iterator[Outcome]:
        """One outcome per frame of the log, so every frame is accounted for in the counts."""
        n, first = len(self.frames), self.sf.num_history_frames - 1
        for c in range(n):
            sid = self._sid(c)
            start = c - first  # the window whose current frame c would be
            if start < 0:  # NAVSIM never makes these a scene's current frame: history only
                yield Drop(sid, "before_first_window", self.rel)
                continue
            if start % self.sf.interval:
                yield Drop(sid, "not_window_centre", self.rel)
                continue
            if start + self.sf.num_frames > n:
                yield Drop(sid, "window_too_short", self.rel)
                continue
            frame = self.frames[c]
            if self.sf.has_route and len(frame.get("roadblock_ids") or ()) == 0:
                yield Drop(sid, "no_route", self.rel)
            elif self.tokens is not None and frame["token"] not in self.tokens:
                yield Drop(sid, "not_in_token_list", self.rel)
            elif c - self.span[0] < 0:
                yield Drop(sid, "clip_incomplete", self.rel)
            else:
                yield self._sample(c, sid)
            self.images.retain(lambda key, c=c: key[0] >= c + self.sf.interval - self.span[0])
        if self.left_out:
            log.info("%s %s: objects left out: %s", DATASET, self.rel, dict(self.left_out))
        for key, count in sorted(self.left_out.items()):  # counted in the run summary too
            yield Note(f"objects_{key}", count)

    def _pose(self, i: int) -> np.ndarray:
        """World pose of frame ``i``, computed once per log (windows overlap)."""
        pose = self._poses.get(i)
        if pose is None:
            pose = self._poses[i] = frame_pose(self.frames[i])
        return pose

    def _sample(self, c: int, sid: str) -> Outcome:
        cfg = self.cfg
        nf = cfg.future if self.sf.num_future_frames else 0
        window = self.frames[c - cfg.history : c + 1 + nf]
        try:
            poses = np.array([self._pose(i) for i in range(c - cfg.history, c + 1 + nf)])
            dyn = np.asarray(self.frames[c]["ego_dynamic_state"], dtype=np.float64).reshape(-1)
        except (KeyError, ValueError, TypeError) as exc:
            return Fail(
                sid, "BadLog", f"{self.rel}: frame {self.frames[c].get('token')}: {exc!r}", self.rel
            )
        if not finite(poses):
            bad = next(f["token"] for f, p in zip(window, poses, strict=True) if not finite(p))
            return Fail(
                sid,
                "InvalidPose",
                f"{self.rel}: frame {bad} has a non-finite ego2global pose",
                self.rel,
            )
        if dyn.size < 4 or not finite(dyn[:4]):
            return Fail(
                sid,
                "InvalidPose",
                f"{self.rel}: frame {self.frames[c]['token']} has a bad ego_dynamic_state",
                self.rel,
            )
        origin = poses[cfg.history]
        history = poses_to_local(poses[: cfg.history], origin)
        future = poses_to_local(poses[cfg.history + 1 :], origin) if nf else None
        frame = self.frames[c]
        try:
            cameras, files = self._cameras(c)
        except ImageError as exc:
            return Fail(sid, "ImageError", str(exc), str(exc).split(":")[0])
        except (KeyError, ValueError, TypeError) as exc:
            return Fail(
                sid, "BadLog", f"{self.rel}: frame {frame['token']} camera data: {exc!r}", self.rel
            )
        return Sample(
            sample_id=sid,
            dataset=DATASET,
            split=self.split,
            scene_id=self.log_name,
            timestamp_us=int(frame["timestamp"]),
            cameras=cameras,
            history=history,
            future=future,
            velocity=dyn[:2],
            acceleration=dyn[2:4],
            velocity_source="dataset",
            command=command_from_onehot(frame.get("driving_command", ())),
            objects=self._objects(frame),
            source_files=(self.rel, *files),
            extractor_version=EXTRACTOR_VERSION,
            **label_sample(history, future, cfg.meta_actions),
        )

    def _cameras(self, c: int) -> tuple[tuple[Any, ...], list[str]]:
        clips, files = [], []
        frame = self.frames[c]
        for cam in self.cfg.cameras:
            ch = CHANNELS[cam]
            stored, rels = [], []
            for d in self.span:
                f = self.frames[c - d]
                data_path = f["cams"][ch]["data_path"]
                rel = f"{self.blobs_rel}/{data_path}"
                img = self.images.get(
                    (c - d, ch),
                    lambda p=f"{self.blobs}/{data_path}", rel=rel: read_image_file(p, rel),
                    rel,
                )
                stored.append((img, int(f["timestamp"])))
                rels.append(rel)
            info = frame["cams"][ch]
            files.append(f"{self.blobs_rel}/{info['data_path']}")
            # camera -> EGO despite the name (module docstring: OpenScene converter, NAVSIM camera.py)
            cam_to_ego = transform_matrix(
                np.asarray(info["sensor2lidar_rotation"], np.float64).reshape(3, 3),
                np.asarray(info["sensor2lidar_translation"], np.float64),
            )
            model, coeffs = lens(info)
            current = stored[-1][0]
            clips.append(
                make_clip(
                    cam,
                    stored,
                    np.asarray(info["cam_intrinsic"], np.float64).reshape(3, 3),
                    (current.source_width, current.source_height),
                    cam_to_ego,
                    rels,
                    model,
                    coeffs,
                )
            )
        return tuple(clips), files

    def _objects(self, frame: dict[str, Any]) -> tuple[Object, ...]:
        anns = frame.get("anns") or {}
        boxes = np.asarray(anns.get("gt_boxes", np.zeros((0, 7))), dtype=np.float64).reshape(-1, 7)
        names = list(anns.get("gt_names", ()))
        vel = np.asarray(anns.get("gt_velocity_3d", np.zeros((0, 3))), dtype=np.float64).reshape(
            -1, 3
        )
        tracks = list(anns.get("track_tokens", ()))
        if not (len(names) == len(vel) == len(tracks) == len(boxes)):
            self.left_out["inconsistent_annotations"] += len(boxes)
            return ()
        rot = lidar2ego(frame)[:3, :3]
        out = []
        for box, name, v, track in zip(boxes, names, vel, tracks, strict=True):
            v_ego = rot @ v
            if not (finite(box) and finite(v_ego[:2])):
                self.left_out["non_finite_box_or_velocity"] += 1
                continue
            out.append(
                Object(
                    category=CATEGORIES.get(str(name), "other"),
                    x=float(box[0]),
                    y=float(box[1]),
                    heading=float(wrap_angle(box[6])),
                    length=float(box[3]),
                    width=float(box[4]),
                    vx=float(v_ego[0]),
                    vy=float(v_ego[1]),
                    track_id=str(track),
                )
            )
        return tuple(out)

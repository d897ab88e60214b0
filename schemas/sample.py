"""The unified sample: one row per (dataset, scene, current frame).

Conventions (DESIGN.md section 2), binding for every source and stage:

* Units are metres, seconds and radians. The model runs at 2 Hz (0.5 s steps).
* The ego frame is the vehicle frame at the current time t0: x forward, y left,
  z up. Headings are counter-clockwise from +x, wrapped to [-pi, pi).
  nuScenes' LIDAR_TOP and camera frames are *not* this frame; sources convert
  explicitly.
* ``history`` holds poses at 2 Hz *before* now (default 4 = 2 s), oldest first;
  ``future`` holds 10 poses at 0.5 s .. 5.0 s. Both are ``(x, y, heading)`` in
  the ego frame at t0. The current pose (0, 0, 0) is in neither.
* ``velocity`` and ``acceleration`` are 2-vectors in the ego frame at t0.
* ``command`` is one of :class:`~schemas.enums.Command`.
* Camera names are canonical (:class:`~schemas.enums.Camera`). Each camera
  carries a clip of T frames, oldest first, ending at t0, stored as JPEG bytes
  already resized to the configured pixel budget; its intrinsics are for the
  stored resolution and its extrinsics map camera coordinates (OpenCV: x right,
  y down, z forward) to the ego frame.
* ``sample_id`` is ``<dataset>/<scene or log>/<frame token or index>`` built by
  :func:`make_sample_id`, stable across runs and safe as a file name component
  once ``/`` is replaced (see :func:`sample_id_to_filename`).

The Arrow schema is explicit (:data:`SAMPLE_SCHEMA`); :func:`sample_features`
returns the matching ``datasets.Features`` with camera frames as ``Image`` so
the Hub viewer shows them. :func:`validate_row` checks a row dict and raises
:class:`SchemaError` naming the field and the reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.enums import Camera, Command, Dataset, Lateral, Longitudinal, Split

# 1.1.0: per-camera lens distortion (distortion_model, distortion), velocity_source, objects' vx/vy nullable
SCHEMA_VERSION = "1.1.0"
FUTURE_STEPS = 10  # 0.5 s .. 5.0 s at 2 Hz
MODEL_DT = 0.5  # seconds between poses of history and future

_ID_PART = re.compile(r"[^A-Za-z0-9._-]+")


class SchemaError(ValueError):
    """A row does not match the unified schema; ``field`` names the culprit."""

    def __init__(self, field_name: str, reason: str, sample_id: str | None = None) -> None:
        self.field = field_name
        self.reason = reason
        self.sample_id = sample_id
        where = f" in sample {sample_id!r}" if sample_id else ""
        super().__init__(f"field {field_name!r}{where}: {reason}")


def sanitize_id_part(part: str) -> str:
    """Return ``part`` reduced to ``[A-Za-z0-9._-]`` (other runs become ``_``)."""
    cleaned = _ID_PART.sub("_", str(part)).strip("._")
    if not cleaned:
        raise ValueError(f"id part {part!r} is empty after sanitising")
    return cleaned


def make_sample_id(dataset: str, scene: str, frame: str | int) -> str:
    """Build ``<dataset>/<scene>/<frame>`` from sanitised parts."""
    return "/".join(sanitize_id_part(p) for p in (dataset, scene, str(frame)))


def sample_id_to_filename(sample_id: str) -> str:
    """A sample id as one safe path component (``/`` becomes ``__``)."""
    parts = sample_id.split("/")
    return "__".join(sanitize_id_part(p) for p in parts)


# --------------------------------------------------------------------------- Arrow schema

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image storage

FRAME_TYPE = pa.struct(
    [
        ("image", IMAGE_TYPE),  # JPEG bytes at the stored resolution
        ("timestamp_us", pa.int64()),  # capture time, microseconds
    ]
)

CAMERA_TYPE = pa.struct(
    [
        ("name", pa.string()),  # canonical Camera value
        ("width", pa.int32()),  # stored image width, px
        ("height", pa.int32()),  # stored image height, px
        ("intrinsics", pa.list_(pa.float32(), 9)),  # (3,3) row-major, for the stored resolution
        ("extrinsics", pa.list_(pa.float32(), 16)),  # (4,4) row-major, camera(OpenCV) -> ego at t0
        # Lens model of the stored (unrectified) images: null = pinhole / already rectified (nuScenes,
        # CARLA); "opencv" = OpenCV coefficients (k1, k2, p1, p2[, k3[, k4, k5, k6]]) (nuPlan, WOD).
        ("distortion_model", pa.string()),
        ("distortion", pa.list_(pa.float32())),  # the model's coefficients; null with the model
        ("frames", pa.list_(FRAME_TYPE)),  # T frames, oldest first, last at t0
    ]
)

POSE_TYPE = pa.list_(pa.float32(), 3)  # (x m, y m, heading rad) in the ego frame at t0
XY_TYPE = pa.list_(pa.float32(), 2)

OBJECT_TYPE = pa.struct(
    [
        ("category", pa.string()),  # e.g. vehicle, pedestrian, cyclist
        ("x", pa.float32()),  # box centre, m, ego frame at t0
        ("y", pa.float32()),
        ("heading", pa.float32()),  # rad, ego frame
        ("length", pa.float32()),  # m
        ("width", pa.float32()),  # m
        ("vx", pa.float32()),  # m/s, ego frame; null = unknown (e.g. a nuScenes object annotated once)
        ("vy", pa.float32()),
        ("track_id", pa.string()),
        ("state", pa.string()),  # traffic-light state / sign type where the dataset has one, else null
    ]
)

QA_TYPE = pa.struct([("category", pa.string()), ("question", pa.string()), ("answer", pa.string())])

SAMPLE_FIELDS: list[pa.Field] = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),  # Dataset value
    pa.field("split", pa.string(), nullable=False),  # Split value
    pa.field("scene_id", pa.string(), nullable=False),
    pa.field("timestamp_us", pa.int64(), nullable=False),  # t0
    pa.field("cameras", pa.list_(CAMERA_TYPE), nullable=False),
    pa.field("history", pa.list_(POSE_TYPE), nullable=False),  # (H,3) oldest first, before t0
    pa.field("future", pa.list_(POSE_TYPE)),  # (10,3) 0.5..5 s; null on test splits
    pa.field("velocity", XY_TYPE, nullable=False),  # (2,) m/s, ego frame
    pa.field("acceleration", XY_TYPE, nullable=False),  # (2,) m/s^2, ego frame
    # where velocity/acceleration come from: VELOCITY_SOURCES (null: not recorded by the source)
    pa.field("velocity_source", pa.string()),
    pa.field("command", pa.string(), nullable=False),  # Command value
    pa.field("meta_lateral", pa.string()),  # Lateral of the future (null without future)
    pa.field("meta_longitudinal", pa.string()),  # Longitudinal of the future
    pa.field("history_meta_lateral", pa.string()),  # Lateral of the history (+ current pose)
    pa.field("history_meta_longitudinal", pa.string()),
    pa.field("preference_trajectories", pa.list_(pa.list_(XY_TYPE))),  # WOD-E2E: (R,P,2) x,y ego frame, native 4 Hz
    pa.field("preference_scores", pa.list_(pa.float32())),  # WOD-E2E: (R,) in [0,10]
    pa.field("objects", pa.list_(OBJECT_TYPE)),  # nuScenes/nuPlan/Bench2Drive objects at t0
    pa.field("drivelm_qa", pa.list_(QA_TYPE)),  # optional DriveLM-nuScenes QA
    pa.field("source_files", pa.list_(pa.string()), nullable=False),  # provenance
    pa.field("extractor_version", pa.string(), nullable=False),
]

SAMPLE_SCHEMA = pa.schema(SAMPLE_FIELDS, metadata={b"schema_version": SCHEMA_VERSION.encode()})

# Values of ``velocity_source``: the dataset's own ego state (WOD-E2E states, NAVSIM ego_dynamic_state),
# nuScenes' CAN bus, or a central difference of keyframe ego poses (nuScenes scenes without CAN bus).
VELOCITY_SOURCES = ("dataset", "can_bus", "pose_central_difference")

# Lens models of ``distortion_model`` (pipelines.geometry.distort_normalized implements them).
DISTORTION_MODELS = ("opencv",)

# Columns added by later stages (DESIGN.md section 3). Each stage appends its own.
ACTION_TOKENS_FIELD = pa.field("action_tokens", pa.list_(pa.int16(), FUTURE_STEPS))  # (10,) codebook ids
THINK_MODE_FIELD = pa.field("think_mode", pa.string())  # ThinkMode value
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def sample_features(schema: pa.Schema = SAMPLE_SCHEMA) -> Any:
    """The ``datasets.Features`` matching ``schema`` (default :data:`SAMPLE_SCHEMA`), frames as ``Image``.

    Later stages pass their extended schema; any schema with the ``cameras``
    column of :data:`CAMERA_TYPE` works.
    """
    import datasets  # imported here: heavy, and not every stage needs it

    from_arrow = datasets.Features.from_arrow_schema(schema)
    # Replace each frame's image struct by an Image feature so it decodes.
    cams = from_arrow["cameras"]
    cam_feat = cams.feature if hasattr(cams, "feature") else cams[0]
    frames = cam_feat["frames"]
    frame_feat = frames.feature if hasattr(frames, "feature") else frames[0]
    frame_feat["image"] = datasets.Image()
    return from_arrow


# --------------------------------------------------------------------------- record types


@dataclass(frozen=True, slots=True)
class CameraFrame:
    jpeg: bytes  # JPEG at the stored resolution
    timestamp_us: int


@dataclass(frozen=True, slots=True)
class CameraClip:
    name: str  # Camera value
    width: int
    height: int
    intrinsics: np.ndarray  # (3,3) for the stored resolution
    extrinsics: np.ndarray  # (4,4) camera(OpenCV) -> ego at t0
    frames: tuple[CameraFrame, ...]  # oldest first, last at t0
    distortion_model: str | None = None  # None: pinhole (rectified images); else DISTORTION_MODELS
    distortion: np.ndarray | None = None  # the model's coefficients (None with the model)


@dataclass(frozen=True, slots=True)
class Object:
    category: str
    x: float
    y: float
    heading: float
    length: float
    width: float
    vx: float | None  # None: velocity unknown
    vy: float | None
    track_id: str
    state: str | None = None  # traffic-light state (red, yellow, green, off, unknown) or sign type


def _object_record(o: Object) -> dict[str, Any]:
    # The row dict of one object: ``dataclasses.asdict`` gives the same dict but deep-copies each
    # value through a generic walk (about 0.3 ms a row with a few dozen objects in the extract profile).
    return {
        "category": o.category,
        "x": o.x,
        "y": o.y,
        "heading": o.heading,
        "length": o.length,
        "width": o.width,
        "vx": o.vx,
        "vy": o.vy,
        "track_id": o.track_id,
        "state": o.state,
    }


@dataclass(frozen=True, slots=True)
class Sample:
    """A unified sample as Python values; ``to_record`` gives the Arrow row dict."""

    sample_id: str
    dataset: str
    split: str
    scene_id: str
    timestamp_us: int
    cameras: tuple[CameraClip, ...]
    history: np.ndarray  # (H,3) x m, y m, heading rad; ego frame at t0; oldest first
    future: np.ndarray | None  # (10,3) x m, y m, heading rad; ego frame at t0
    velocity: np.ndarray  # (2,) m/s, ego frame at t0
    acceleration: np.ndarray  # (2,) m/s^2, ego frame at t0
    command: str
    velocity_source: str | None = None  # VELOCITY_SOURCES value
    meta_lateral: str | None = None
    meta_longitudinal: str | None = None
    history_meta_lateral: str | None = None
    history_meta_longitudinal: str | None = None
    preference_trajectories: list[np.ndarray] | None = None  # each (P,2)
    preference_scores: Sequence[float] | None = None
    objects: tuple[Object, ...] | None = None
    drivelm_qa: list[dict[str, str]] | None = None
    source_files: tuple[str, ...] = ()
    extractor_version: str = ""
    extras: dict[str, Any] = field(default_factory=dict)  # columns of later stages

    def to_record(self) -> dict[str, Any]:
        """The row dict for :data:`SAMPLE_SCHEMA` (plus ``extras``)."""
        row: dict[str, Any] = {
            "sample_id": self.sample_id,
            "dataset": self.dataset,
            "split": self.split,
            "scene_id": self.scene_id,
            "timestamp_us": int(self.timestamp_us),
            "cameras": [
                {
                    "name": c.name,
                    "width": int(c.width),
                    "height": int(c.height),
                    "intrinsics": np.asarray(c.intrinsics, np.float32).reshape(9).tolist(),
                    "extrinsics": np.asarray(c.extrinsics, np.float32).reshape(16).tolist(),
                    "distortion_model": c.distortion_model,
                    "distortion": None
                    if c.distortion is None
                    else np.asarray(c.distortion, np.float32).reshape(-1).tolist(),
                    "frames": [
                        {"image": {"bytes": f.jpeg, "path": None}, "timestamp_us": int(f.timestamp_us)}
                        for f in c.frames
                    ],
                }
                for c in self.cameras
            ],
            "history": np.asarray(self.history, np.float32).reshape(-1, 3).tolist(),
            "future": None if self.future is None else np.asarray(self.future, np.float32).tolist(),
            "velocity": np.asarray(self.velocity, np.float32).reshape(2).tolist(),
            "acceleration": np.asarray(self.acceleration, np.float32).reshape(2).tolist(),
            "command": self.command,
            "velocity_source": self.velocity_source,
            "meta_lateral": self.meta_lateral,
            "meta_longitudinal": self.meta_longitudinal,
            "history_meta_lateral": self.history_meta_lateral,
            "history_meta_longitudinal": self.history_meta_longitudinal,
            "preference_trajectories": None
            if self.preference_trajectories is None
            else [np.asarray(t, np.float32).reshape(-1, 2).tolist() for t in self.preference_trajectories],
            "preference_scores": None
            if self.preference_scores is None
            else [float(s) for s in self.preference_scores],
            "objects": None if self.objects is None else [_object_record(o) for o in self.objects],
            "drivelm_qa": self.drivelm_qa,
            "source_files": list(self.source_files),
            "extractor_version": self.extractor_version,
        }
        row.update(self.extras)
        return row

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> Sample:
        """Inverse of :meth:`to_record` (unknown columns go to ``extras``)."""
        known = {f.name for f in SAMPLE_FIELDS}
        cams = tuple(
            CameraClip(
                name=c["name"],
                width=c["width"],
                height=c["height"],
                intrinsics=np.asarray(c["intrinsics"], np.float32).reshape(3, 3),
                extrinsics=np.asarray(c["extrinsics"], np.float32).reshape(4, 4),
                frames=tuple(CameraFrame(f["image"]["bytes"], f["timestamp_us"]) for f in c["frames"]),
                distortion_model=c.get("distortion_model"),
                distortion=None if c.get("distortion") is None else np.asarray(c["distortion"], np.float32),
            )
            for c in row["cameras"]
        )
        fut = row.get("future")
        prefs = row.get("preference_trajectories")
        objs = row.get("objects")
        return cls(
            sample_id=row["sample_id"],
            dataset=row["dataset"],
            split=row["split"],
            scene_id=row["scene_id"],
            timestamp_us=row["timestamp_us"],
            cameras=cams,
            history=np.asarray(row["history"], np.float32).reshape(-1, 3),
            future=None if fut is None else np.asarray(fut, np.float32).reshape(-1, 3),
            velocity=np.asarray(row["velocity"], np.float32),
            acceleration=np.asarray(row["acceleration"], np.float32),
            command=row["command"],
            velocity_source=row.get("velocity_source"),
            meta_lateral=row.get("meta_lateral"),
            meta_longitudinal=row.get("meta_longitudinal"),
            history_meta_lateral=row.get("history_meta_lateral"),
            history_meta_longitudinal=row.get("history_meta_longitudinal"),
            preference_trajectories=None
            if prefs is None
            else [np.asarray(t, np.float32).reshape(-1, 2) for t in prefs],
            preference_scores=row.get("preference_scores"),
            objects=None if objs is None else tuple(Object(**o) for o in objs),
            drivelm_qa=row.get("drivelm_qa"),
            source_files=tuple(row.get("source_files") or ()),
            extractor_version=row.get("extractor_version", ""),
            extras={k: v for k, v in row.items() if k not in known},
        )


# --------------------------------------------------------------------------- validation


def _array(row: Mapping[str, Any], name: str, sid: str | None, shape: tuple[int | None, ...]) -> np.ndarray:
    value = row.get(name)
    if value is None:
        raise SchemaError(name, "is missing", sid)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SchemaError(name, f"is not a numeric array ({exc})", sid) from None
    if arr.ndim != len(shape) or any(e is not None and e != a for e, a in zip(shape, arr.shape, strict=False)):
        want = "x".join("N" if e is None else str(e) for e in shape)
        raise SchemaError(name, f"has shape {arr.shape}, expected ({want})", sid)
    if arr.size and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise SchemaError(name, f"has a non-finite value at index {bad}", sid)
    return arr


def _enum(row: Mapping[str, Any], name: str, allowed: Sequence[str], sid: str | None, nullable: bool) -> None:
    value = row.get(name)
    if value is None:
        if nullable:
            return
        raise SchemaError(name, "is missing", sid)
    if value not in allowed:
        raise SchemaError(name, f"value {value!r} is not one of {sorted(allowed)}", sid)


def validate_row(row: Mapping[str, Any], *, future_required: bool | None = None) -> None:
    """Check a row dict against the unified schema; raise :class:`SchemaError` on the first fault.

    Checks presence, shapes, finite numbers, enum values, monotonic frame
    timestamps and wrapped headings. ``future_required`` defaults to "unless
    the split is test".
    """
    sid = row.get("sample_id")
    if not isinstance(sid, str) or not sid:
        raise SchemaError("sample_id", "is missing or empty")
    parts = sid.split("/")
    if len(parts) != 3 or any(p != sanitize_id_part(p) for p in parts):
        raise SchemaError("sample_id", f"{sid!r} is not '<dataset>/<scene>/<frame>' of safe parts", sid)
    _enum(row, "dataset", Dataset.values(), sid, nullable=False)
    _enum(row, "split", Split.values(), sid, nullable=False)
    if parts[0] != row["dataset"]:
        raise SchemaError("sample_id", f"starts with {parts[0]!r} but dataset is {row['dataset']!r}", sid)
    if not row.get("scene_id"):
        raise SchemaError("scene_id", "is missing or empty", sid)
    ts = row.get("timestamp_us")
    if not isinstance(ts, (int, np.integer)) or ts < 0:
        raise SchemaError("timestamp_us", f"must be a non-negative integer, got {ts!r}", sid)
    _enum(row, "command", Command.values(), sid, nullable=False)

    hist = _array(row, "history", sid, (None, 3))
    if future_required is None:
        future_required = row.get("split") != Split.TEST.value
    if row.get("future") is None:
        if future_required:
            raise SchemaError("future", "is missing (required outside the test split)", sid)
    else:
        fut = _array(row, "future", sid, (FUTURE_STEPS, 3))
        _check_headings("future", fut, sid)
    _check_headings("history", hist, sid)
    _array(row, "velocity", sid, (2,))
    _array(row, "acceleration", sid, (2,))
    _enum(row, "velocity_source", VELOCITY_SOURCES, sid, nullable=True)
    _enum(row, "meta_lateral", Lateral.values(), sid, nullable=True)
    _enum(row, "meta_longitudinal", Longitudinal.values(), sid, nullable=True)
    _enum(row, "history_meta_lateral", Lateral.values(), sid, nullable=True)
    _enum(row, "history_meta_longitudinal", Longitudinal.values(), sid, nullable=True)

    _validate_cameras(row, sid)
    _validate_preferences(row, sid)
    for i, obj in enumerate(row.get("objects") or ()):
        for key in ("x", "y", "heading", "length", "width", "vx", "vy"):
            v = obj.get(key)
            if v is None and key in ("vx", "vy") and obj.get("vx") is None and obj.get("vy") is None:
                continue  # unknown velocity: both null
            if v is None or not math.isfinite(float(v)):
                raise SchemaError(f"objects[{i}].{key}", f"must be a finite number, got {v!r}", sid)
    if "action_tokens" in row and row["action_tokens"] is not None:
        toks = np.asarray(row["action_tokens"])
        if toks.shape != (FUTURE_STEPS,) or not np.issubdtype(toks.dtype, np.integer) or (toks < 0).any():
            raise SchemaError("action_tokens", f"must be {FUTURE_STEPS} non-negative ints, got {toks.tolist()}", sid)


def _check_headings(name: str, poses: np.ndarray, sid: str | None) -> None:
    if poses.size and ((poses[:, 2] < -math.pi - 1e-5) | (poses[:, 2] > math.pi + 1e-5)).any():
        raise SchemaError(name, "heading outside [-pi, pi]", sid)


def _validate_cameras(row: Mapping[str, Any], sid: str | None) -> None:
    cams = row.get("cameras")
    if not cams:
        raise SchemaError("cameras", "is missing or empty", sid)
    seen: set[str] = set()
    for i, cam in enumerate(cams):
        where = f"cameras[{i}]"
        name = cam.get("name")
        if name not in Camera.values():
            raise SchemaError(f"{where}.name", f"value {name!r} is not one of {list(Camera.values())}", sid)
        if name in seen:
            raise SchemaError(f"{where}.name", f"camera {name!r} appears twice", sid)
        seen.add(name)
        where = f"cameras[{name}]"
        if not (isinstance(cam.get("width"), (int, np.integer)) and cam["width"] > 0):
            raise SchemaError(f"{where}.width", f"must be a positive integer, got {cam.get('width')!r}", sid)
        if not (isinstance(cam.get("height"), (int, np.integer)) and cam["height"] > 0):
            raise SchemaError(f"{where}.height", f"must be a positive integer, got {cam.get('height')!r}", sid)
        for key, n in (("intrinsics", 3), ("extrinsics", 4)):
            mat = _array(cam, key, sid, (None,) * np.ndim(cam.get(key)))
            if mat.size != n * n:
                raise SchemaError(f"{where}.{key}", f"has {mat.size} values, expected {n}x{n}", sid)
        _validate_distortion(cam, where, sid)
        frames = cam.get("frames")
        if not frames:
            raise SchemaError(f"{where}.frames", "has no frames", sid)
        prev = None
        for j, fr in enumerate(frames):
            img = fr.get("image") or {}
            data = img.get("bytes") if isinstance(img, Mapping) else None
            if not data or not bytes(data[:2]) == b"\xff\xd8":
                raise SchemaError(f"{where}.frames[{j}].image", "is not JPEG bytes", sid)
            fts = fr.get("timestamp_us")
            if not isinstance(fts, (int, np.integer)):
                raise SchemaError(f"{where}.frames[{j}].timestamp_us", f"must be an integer, got {fts!r}", sid)
            if prev is not None and fts <= prev:
                raise SchemaError(
                    f"{where}.frames[{j}].timestamp_us", f"{fts} is not after the previous frame's {prev}", sid
                )
            prev = fts


def _validate_distortion(cam: Mapping[str, Any], where: str, sid: str | None) -> None:
    model, coeffs = cam.get("distortion_model"), cam.get("distortion")
    if model is None:
        if coeffs is not None:
            raise SchemaError(f"{where}.distortion", "has coefficients but no distortion_model", sid)
        return
    if model not in DISTORTION_MODELS:
        raise SchemaError(f"{where}.distortion_model", f"value {model!r} is not one of {list(DISTORTION_MODELS)}", sid)
    arr = _array(cam, "distortion", sid, (None,)) if coeffs is not None else None
    if arr is None or arr.size not in (4, 5, 8):
        raise SchemaError(f"{where}.distortion", f"model {model!r} needs 4, 5 or 8 coefficients", sid)


def _validate_preferences(row: Mapping[str, Any], sid: str | None) -> None:
    trajs = row.get("preference_trajectories")
    scores = row.get("preference_scores")
    if trajs is None and scores is None:
        return
    if trajs is None or scores is None or len(trajs) != len(scores):
        raise SchemaError("preference_scores", "must have one score per preference trajectory", sid)
    for i, (t, s) in enumerate(zip(trajs, scores, strict=True)):
        if len(t):
            _array({f"preference_trajectories[{i}]": t}, f"preference_trajectories[{i}]", sid, (None, 2))
        if not (0.0 <= float(s) <= 10.0):
            raise SchemaError(f"preference_scores[{i}]", f"{s} is outside [0, 10]", sid)


def table_from_rows(rows: Sequence[Mapping[str, Any]], schema: pa.Schema = SAMPLE_SCHEMA) -> pa.Table:
    """Rows to an Arrow table of ``schema`` (extra columns must be in ``schema``)."""
    return pa.Table.from_pylist(list(rows), schema=schema)


def schema_with(*extra: pa.Field, base: pa.Schema = SAMPLE_SCHEMA) -> pa.Schema:
    """``base`` plus the columns of later stages, keeping the version metadata."""
    out = base
    for f in extra:
        if f.name in out.names:
            out = out.set(out.get_field_index(f.name), f)
        else:
            out = out.append(f)
    return out.with_metadata(base.metadata)

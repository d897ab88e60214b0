"""WOD-E2E source: ``E2EDFrame`` protos read straight from TFRecords (no TensorFlow).

Frames are stored *shuffled* inside the TFRecords (DESIGN.md section 12), so
the source works in two passes:

1. :meth:`WaymoE2ESource.work_units` indexes every file (threads, one per file):
   it reads only each record's 12-byte header (length CRC checked) and the
   first bytes of its data, where ``frame.context.name`` sits, and seeks past
   the rest. Frames are grouped by segment (``<segment>-<NNN>``) into units
   that list ``(index, file, offset)``. A truncated or corrupt file stops
   its index at the bad record and is reported as a failure with its name.
2. :meth:`WaymoE2ESource.iter_unit` reads one segment's frames by offset in
   index order (data CRC checked), decodes each needed camera frame once and
   keeps only the frames a later clip still needs.

Trajectories: ``past_states`` (16 at 4 Hz over (-4, 0]) and ``future_states``
(20 at 4 Hz over (0, 5]) are positions in the ego frame at t0. History is
every other past point (oldest first), future the 2 Hz points 0.5 .. 5 s.
Headings are not stored: they are the direction of the states' velocity
vectors where present, else of the 4 Hz track (central differences, exact
for constant-curvature motion, where a one-sided 2 Hz difference would lag by
half a step's turn); a nearly static vehicle keeps its heading. A direction
of motion is the heading h or, reversing, h + pi: walking out from t0
(heading 0, so the sign of the longitudinal velocity decides there) each
point takes whichever of the two is continuous with its neighbour's heading.

An intent value outside the proto's enum is kept as ``unknown`` and counted
(``intent_value_not_in_enum``; an absent intent: ``intent_missing``); selected splits whose file globs match
nothing in the input directory fail before any work, listing the globs tried
and the directory's files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import struct
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from google.protobuf.message import DecodeError

from pipelines.core.stage import Drop, Fail, Note
from pipelines.io.images import ImageError
from pipelines.io.tfrecord import (
    FOOTER_SIZE,
    HEADER_SIZE,
    TFRecordError,
    masked_crc32c,
    read_record_at,
)
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
)
from schemas.enums import Camera, Command, Dataset, Split
from schemas.sample import CameraClip, Sample, make_sample_id, sanitize_id_part

log = logging.getLogger(__name__)

DATASET: Final = Dataset.WAYMO_E2E.value
STATE_HZ: Final = 4  # past/future states
PAST_STATES: Final = 16  # over (-4 s, 0], the last one at t0
FUTURE_STATES: Final = 20  # over (0, 5 s]
STEP: Final = 2  # 4 Hz -> 2 Hz
# CameraName enum of dataset_pb2 -> canonical name.
CAMERAS: Final[dict[int, Camera]] = {
    1: Camera.FRONT,
    2: Camera.FRONT_LEFT,
    3: Camera.FRONT_RIGHT,
    4: Camera.SIDE_LEFT,
    5: Camera.SIDE_RIGHT,
    6: Camera.BACK_LEFT,
    7: Camera.BACK,
    8: Camera.BACK_RIGHT,
}
CAMERA_IDS: Final[dict[str, int]] = {cam.value: i for i, cam in CAMERAS.items()}
INTENTS: Final[dict[int, Command]] = {
    0: Command.UNKNOWN,
    1: Command.STRAIGHT,
    2: Command.LEFT,
    3: Command.RIGHT,
}
# Waymo camera axes (x forward, y left, z up) <- OpenCV axes (x right, y down, z forward).
WAYMO_FROM_CV: Final = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
# enough for frame.context.name when it is serialised first (as Waymo's writers do)
NAME_PREFIX_BYTES: Final = 256
_HEADER = struct.Struct("<QI")


@dataclass(frozen=True, slots=True)
class WaymoOptions:
    """``options:`` of the WOD-E2E config."""

    # our split -> file name globs (names differ between releases and mirrors)
    files: dict[str, list[str]] = field(
        default_factory=lambda: {
            "train": ["training_*.tfrecord*", "training.tfrecord*"],
            "val": ["validation_*.tfrecord*", "validation.tfrecord*", "val_*.tfrecord*"],
            "test": ["test_*.tfrecord*", "testing_*.tfrecord*", "test.tfrecord*"],
        }
    )
    # m per 0.5 s: below this the vehicle counts as static and keeps its heading
    min_heading_chord: float = 0.2
    # "velocity": headings from the states' velocity vectors where every state has one, else positions;
    # "positions": always from the 4 Hz positions (central differences)
    headings: str = "velocity"
    index_threads: int = 8

    def __post_init__(self) -> None:
        if self.headings not in ("velocity", "positions"):
            raise ValueError(
                f"options.headings must be 'velocity' or 'positions', got {self.headings!r}"
            )


# --------------------------------------------------------------------------- index pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise IndexError("varint runs past the buffer")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def context_name(buf: bytes) -> str | None:
    """``frame.context.name`` of a serialised ``E2EDFrame`` by a wire-format scan (no full parse).

    Returns None when ``buf`` (possibly a prefix of the record) does not reach the name.
    """
    pos, end = 0, len(buf)
    try:
        for depth in range(3):  # E2EDFrame.frame(1) -> Frame.context(1) -> Context.name(1)
            while True:
                if pos >= end:
                    return None
                tag, pos = _varint(buf, pos)
                num, wire = tag >> 3, tag & 7
                if wire == 2:
                    n, pos = _varint(buf, pos)
                    if num == 1:
                        if depth == 2:
                            return buf[pos : pos + n].decode() if pos + n <= end else None
                        end = min(end, pos + n)
                        break
                    pos += n
                elif wire == 0:
                    _, pos = _varint(buf, pos)
                elif wire == 1:
                    pos += 8
                elif wire == 5:
                    pos += 4
                else:
                    raise ValueError(f"unsupported wire type {wire}")
    except (IndexError, ValueError, UnicodeDecodeError):
        return None
    return None


@dataclass
class FileIndex:
    """The frames of one TFRecord file: ``(context name, byte offset)`` and the error that ended it."""

    path: Path
    frames: list[tuple[str, int]]
    error: TFRecordError | None = None
    unnamed: list[int] = field(default_factory=list)  # offsets of records without a readable name


def index_file(path: Path) -> FileIndex:
    """Index one TFRecord file reading headers and name prefixes only (length CRC checked)."""
    size = path.stat().st_size
    out = FileIndex(path, [])
    with path.open("rb") as fh:  # Path or UPath (gs://, s3://)
        offset = 0
        while offset < size:
            header = fh.read(HEADER_SIZE)
            if len(header) < HEADER_SIZE:
                out.error = TFRecordError(
                    path, offset, f"truncated header ({len(header)} of {HEADER_SIZE} bytes)"
                )
                break
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                out.error = TFRecordError(
                    path, offset, "CRC mismatch in the length field (corrupt file?)"
                )
                break
            end = offset + HEADER_SIZE + length + FOOTER_SIZE
            if end > size:
                out.error = TFRecordError(
                    path, offset, f"truncated record ({size - offset} of {end - offset} bytes)"
                )
                break
            name = context_name(fh.read(min(length, NAME_PREFIX_BYTES)))
            if name is None:  # name not serialised first: scan the whole record
                fh.seek(offset + HEADER_SIZE)
                name = context_name(fh.read(length))
            if name is None:
                out.unnamed.append(offset)
            else:
                out.frames.append((name, offset))
            offset = end
            fh.seek(offset)
    return out


INDEX_CACHE_VERSION = 1  # bump when FileIndex or index_file changes meaning


def index_cache_dir() -> Path | None:
    """Where file indexes are kept between runs: ``$DRIVEVLA_CACHE_DIR/wod_e2e_index`` (default
    ``$XDG_CACHE_HOME/drivevla`` or ``~/.cache/drivevla``); ``DRIVEVLA_CACHE_DIR=off`` disables it."""
    base = os.environ.get("DRIVEVLA_CACHE_DIR")
    if base and base.lower() in ("off", "0", "none"):
        return None
    root = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "drivevla"
    return root / "wod_e2e_index"


def _cache_key(path: Path) -> str:
    st = path.stat()  # a file changed in place gets a new size, mtime or ctime, hence a new key
    blob = f"{INDEX_CACHE_VERSION}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def index_file_cached(path: Path, cache_dir: Path | None = None) -> FileIndex:
    """:func:`index_file` reused across runs: cached as JSON keyed by the file's path, size and mtime.

    The cache holds offsets and names only (plain JSON, never pickled); an unreadable
    entry is ignored and rewritten. Without a cache dir this is :func:`index_file`.
    """
    if cache_dir is None:
        return index_file(path)
    entry = cache_dir / f"{_cache_key(path)}.json"
    try:
        d = json.loads(entry.read_text())
        err = d["error"]
        return FileIndex(
            path,
            [(str(n), int(o)) for n, o in d["frames"]],
            TFRecordError(path, int(err[0]), str(err[1])) if err else None,
            [int(o) for o in d["unnamed"]],
        )
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        log.warning("%s: ignoring unreadable index cache entry %s (%s)", DATASET, entry, exc)
    fi = index_file(path)
    err = [fi.error.offset, fi.error.cause] if fi.error is not None else None
    blob = json.dumps({"path": str(path), "frames": fi.frames, "error": err, "unnamed": fi.unnamed})
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(blob)
        os.replace(tmp, entry)  # concurrent runs write the same content; last one wins
    except OSError as exc:  # a read-only cache only costs the re-index next time
        log.warning("%s: cannot write index cache %s: %s", DATASET, entry, exc)
    return fi


def split_context_name(name: str) -> tuple[str, int] | None:
    """``<segment>-<NNN>`` -> (segment, NNN); None if the name has another form."""
    segment, sep, idx = name.rpartition("-")
    if not sep or not segment or not idx.isdigit():
        return None
    return segment, int(idx)


# --------------------------------------------------------------------------- trajectories


def track_headings(
    xy: np.ndarray, current: int, min_chord: float, velocity: np.ndarray | None = None
) -> np.ndarray:
    """Headings along a 4 Hz track ``(N,2)`` whose point ``current`` is the ego origin (heading 0).

    Where ``velocity`` ``(N,2)`` is given, a moving point's heading is its
    velocity direction (the ego origin is the rear axle, which does not slip
    sideways). Otherwise interior points use the chord from the previous to
    the next point (the tangent at the middle point for constant curvature and
    speed) and end points extrapolate the last two chords (second order).
    Walking outwards from ``current``, a point slower than ``min_chord`` per
    0.5 s keeps its neighbour's heading.
    """
    n = len(xy)
    out = np.zeros(n)
    min_speed = min_chord / (STEP / STATE_HZ)

    def chord(a: int, b: int) -> float | None:
        d = xy[b] - xy[a]
        return float(np.arctan2(d[1], d[0])) if float(np.hypot(d[0], d[1])) >= min_chord else None

    def motion(i: int, direction: int) -> float | None:
        if velocity is not None:
            vx, vy = velocity[i]
            return float(np.arctan2(vy, vx)) if float(np.hypot(vx, vy)) >= min_speed else None
        if 0 < i < n - 1:
            return chord(i - 1, i + 1)
        inner = i - direction  # the neighbour towards `current`
        far = inner - direction
        if not 0 <= far < n:
            return chord(min(i, inner), max(i, inner))
        h1, h0 = chord(min(i, inner), max(i, inner)), chord(min(inner, far), max(inner, far))
        if h1 is None or h0 is None:
            return h1
        return h1 + 0.5 * float(np.angle(np.exp(1j * (h1 - h0))))

    def estimate(i: int, direction: int, prev: float) -> float | None:
        # The direction of motion is the heading when driving forward and heading + pi when
        # reversing: take the one continuous with the neighbour's heading (no car turns 90 deg
        # in 0.25 s). At t0's neighbours prev = 0, i.e. the sign of the longitudinal velocity.
        h = motion(i, direction)
        if h is None:
            return None
        flip = abs(float(np.angle(np.exp(1j * (h - prev))))) > np.pi / 2
        return h + np.pi if flip else h

    for direction in (1, -1):
        prev = 0.0
        i = current + direction
        while 0 <= i < n:
            h = estimate(i, direction, prev)
            prev = prev if h is None else h
            out[i] = prev
            i += direction
    return np.asarray((out + np.pi) % (2 * np.pi) - np.pi)


def _velocities(states: Any, n: int) -> np.ndarray | None:
    """The states' (vel_x, vel_y) when every point has one, else None."""
    if len(states.vel_x) != n or len(states.vel_y) != n:
        return None
    return np.stack(
        [np.asarray(states.vel_x, np.float64), np.asarray(states.vel_y, np.float64)], axis=1
    )


def _xy(states: Any) -> np.ndarray:
    return np.stack(
        [np.asarray(states.pos_x, np.float64), np.asarray(states.pos_y, np.float64)], axis=1
    )


# --------------------------------------------------------------------------- the source


class WaymoE2ESource(Source):
    """WOD-E2E ``E2EDFrame`` TFRecords -> unified samples (one per frame with a complete clip)."""

    name = DATASET
    Options = WaymoOptions

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._check_globs()
        max_history = (PAST_STATES - 1) // STEP  # 2 Hz poses strictly inside (-4 s, 0)
        if cfg.history > max_history:
            # Checked here, not per frame: every sample would be dropped as insufficient_history.
            raise SourceError(
                f"{DATASET}: history={cfg.history} but past_states (16 at 4 Hz over (-4 s, 0]) "
                f"hold at most {max_history} poses at 2 Hz before t0"
            )

    def _check_globs(self) -> None:
        """Fail before any work when no selected split's globs match a file (a typo'd --input or glob)."""
        if any(self._files(split) for split in self.cfg.splits):
            return
        root = self.root if self.root.is_dir() else self.root.parent
        held = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        tried = {split: self.options.files.get(split, []) for split in self.cfg.splits}
        shown = held[:20] + ([f"... {len(held) - 20} more"] if len(held) > 20 else [])
        raise SourceError(
            f"{DATASET}: no input file matches the globs of splits {list(self.cfg.splits)} under "
            f"{self.root}: tried {tried} (set options.files.<split>); the directory holds "
            f"{shown or 'nothing'}"
        )

    def _files(self, split: str) -> list[Path]:
        globs = self.options.files.get(split, [])
        root = self.root
        names = (
            sorted(p.name for p in root.iterdir() if p.is_file()) if root.is_dir() else [root.name]
        )
        base = root if root.is_dir() else root.parent
        picked = [
            n for n in names if any(fnmatch.fnmatch(n, g) for g in globs) and not n.endswith(".tmp")
        ]
        return [base / n for n in picked]

    def work_units(self) -> list[WorkUnit]:
        units: list[WorkUnit] = []
        for split in self.cfg.splits:
            files = self._files(split)
            if not files:
                log.warning(
                    "%s: no %s files matching %s under %s",
                    DATASET,
                    split,
                    self.options.files.get(split),
                    self.root,
                )
                continue
            with ThreadPoolExecutor(max(1, min(self.options.index_threads, len(files)))) as pool:
                indexes = list(pool.map(index_file_cached, files, [index_cache_dir()] * len(files)))
            units.extend(self._group(split, indexes))
        return sorted(units, key=lambda u: u.key)

    def _group(self, split: str, indexes: list[FileIndex]) -> list[WorkUnit]:
        base = self.root if self.root.is_dir() else self.root.parent
        segments: dict[str, list[list[Any]]] = {}
        problems: list[dict[str, Any]] = []
        for fi in indexes:
            rel = str(fi.path.relative_to(base))
            for name, offset in fi.frames:
                parsed = split_context_name(name)
                if parsed is None:
                    problems.append(
                        {
                            "kind": "fail",
                            "class": "BadContextName",
                            "file": rel,
                            "message": f"{rel}@{offset}: context name {name!r} is not <segment>-<NNN>",
                        }
                    )
                    continue
                segments.setdefault(parsed[0], []).append([parsed[1], rel, offset])
            for offset in fi.unnamed:
                problems.append(
                    {
                        "kind": "fail",
                        "class": "ProtoDecodeError",
                        "file": rel,
                        "message": f"{rel}@{offset}: record has no frame.context.name",
                    }
                )
            if fi.error is not None:
                problems.append(
                    {
                        "kind": "fail",
                        "class": "TFRecordError",
                        "file": rel,
                        "message": str(fi.error).replace(str(fi.path), rel),
                    }
                )
        units = []
        for seg, frames in segments.items():
            frames.sort()
            unique: list[list[Any]] = []
            for fr in frames:
                if (
                    unique and unique[-1][0] == fr[0]
                ):  # the same frame twice (e.g. overlapping files)
                    problems.append(
                        {
                            "kind": "drop",
                            "reason": "duplicate_frame",
                            "file": fr[1],
                            "sample_id": make_sample_id(DATASET, seg, f"{fr[0]:03d}"),
                        }
                    )
                    continue
                unique.append(fr)
            units.append(
                WorkUnit(
                    f"{split}/{sanitize_id_part(seg)}", split, {"segment": seg, "frames": unique}
                )
            )
        if problems:
            units.append(WorkUnit(f"{split}/~problems", split, {"problems": problems}))
        return units

    # ------------------------------------------------------------------ per segment

    def iter_unit(self, unit: WorkUnit) -> Iterator[Outcome]:
        if "problems" in unit.payload:
            for p in unit.payload["problems"]:
                if p["kind"] == "drop":
                    yield Drop(p["sample_id"], p["reason"], p["file"])
                else:
                    yield Fail(None, p["class"], p["message"], p["file"])
            return
        yield from _SegmentReader(self, unit).run()


class _SegmentReader:
    """Reads one segment's frames in index order, decoding each needed camera frame once."""

    def __init__(self, source: WaymoE2ESource, unit: WorkUnit) -> None:
        self.src = source
        self.cfg = source.cfg
        self.split = unit.split
        self.segment: str = unit.payload["segment"]
        self.base = source.root if source.root.is_dir() else source.root.parent
        self.frames = {int(i): (f, int(o)) for i, f, o in unit.payload["frames"]}
        self.images = ImageCache(self.cfg.image)
        self.raw: dict[int, Any] = {}  # index -> parsed frame or the error reading it
        clip = self.cfg.clip
        self.span = [
            k * clip.step for k in range(clip.frames - 1, -1, -1)
        ]  # offsets back from t0, oldest first
        self.last_use: dict[int, int] = {}  # frame index -> last current index that needs it
        self.notes: Counter[str] = Counter()  # data counts for the run summary (Note outcomes)

    def run(self) -> Iterator[Outcome]:
        order = sorted(self.frames)
        complete = {i for i in order if all(i - d in self.frames for d in self.span)}
        for i in sorted(complete):
            for d in self.span:
                self.last_use[i - d] = max(self.last_use.get(i - d, -1), i)
        for i in order:
            file = self.frames[i][0]
            sid = make_sample_id(DATASET, self.segment, f"{i:03d}")
            if i not in complete:
                yield Drop(sid, "clip_incomplete", file)
            else:
                yield self._sample(i, sid)
            self.images.retain(lambda key, i=i: self.last_use.get(key[0], -1) > i)
            for j in [j for j in self.raw if self.last_use.get(j, -1) <= i]:
                del self.raw[j]
        for key, count in sorted(self.notes.items()):
            yield Note(key, count)

    def _read(self, i: int) -> Any:
        if i not in self.raw:
            from waymo_open_dataset.protos import end_to_end_driving_data_pb2 as e2e_pb2

            rel, offset = self.frames[i]
            try:
                msg = e2e_pb2.E2EDFrame()
                msg.ParseFromString(read_record_at(self.base / rel, offset))
                self.raw[i] = msg
            except TFRecordError as exc:
                self.raw[i] = Fail(
                    None, "TFRecordError", str(exc).replace(str(self.base / rel), rel), rel
                )
            except DecodeError as exc:
                self.raw[i] = Fail(None, "ProtoDecodeError", f"{rel}@{offset}: {exc}", rel)
        return self.raw[i]

    def _sample(self, i: int, sid: str) -> Outcome:
        rel, offset = self.frames[i]
        frame = self._read(i)
        if isinstance(frame, Fail):
            return Fail(sid, frame.error_class, frame.message, frame.file)
        expected = f"{self.segment}-{i:03d}"
        if frame.frame.context.name != expected:
            return Fail(
                sid,
                "IndexMismatch",
                f"{rel}@{offset}: holds {frame.frame.context.name!r}, not {expected!r}",
                rel,
            )
        traj = self._trajectories(frame, sid, rel)
        if not isinstance(traj, dict):
            return traj
        try:
            cameras = self._cameras(i, frame)
        except ImageError as exc:
            return Fail(sid, "ImageError", str(exc), rel)
        except _ClipFrameError as exc:
            return Fail(sid, exc.fail.error_class, f"clip frame: {exc.fail.message}", exc.fail.file)
        files = sorted({f"{self.frames[i - d][0]}@{self.frames[i - d][1]}" for d in self.span})
        return Sample(
            sample_id=sid,
            dataset=DATASET,
            split=self.split,
            scene_id=self.segment,
            timestamp_us=int(frame.frame.timestamp_micros),
            cameras=cameras,
            command=self._command(frame, sid),
            source_files=tuple(files),
            extractor_version=EXTRACTOR_VERSION,
            **traj,
        )

    def _command(self, frame: Any, sid: str) -> str:
        """The frame's intent as a Command; a value outside the enum becomes unknown and is counted.

        ``intent`` is a closed (proto2) enum: protobuf parses a value it does not know (from a newer
        proto) into the unknown fields and reads the field as UNKNOWN, so look there too.
        """
        if frame.HasField("intent"):
            cmd = INTENTS.get(int(frame.intent))
            if cmd is not None:
                return cmd.value
            raw: Any = int(frame.intent)
        else:
            from google.protobuf.unknown_fields import UnknownFieldSet

            number = frame.DESCRIPTOR.fields_by_name["intent"].number
            raw = next((f.data for f in UnknownFieldSet(frame) if f.field_number == number), None)
            if raw is None:
                self.notes["intent_missing"] += 1
                return Command.UNKNOWN.value
        self.notes["intent_value_not_in_enum"] += 1
        log.warning("%s: %s has intent %s, not in %s; using unknown", DATASET, sid, raw, sorted(INTENTS))
        return Command.UNKNOWN.value

    def _trajectories(self, frame: Any, sid: str, rel: str) -> dict[str, Any] | Outcome:
        past = _xy(frame.past_states)
        if len(past) != PAST_STATES:
            return Drop(sid, "insufficient_history", rel)
        # oldest first; >= 1 since WaymoE2ESource checks history against PAST_STATES
        hist_idx = [PAST_STATES - 1 - STEP * k for k in range(self.cfg.history, 0, -1)]
        future_xy = None
        if self.split != Split.TEST.value:
            future_xy = _xy(frame.future_states)
            if len(future_xy) != FUTURE_STATES:
                return Drop(sid, "insufficient_future", rel)
        dense = past if future_xy is None else np.vstack([past, future_xy])
        last = frame.past_states
        vel = np.array([last.vel_x[-1], last.vel_y[-1]]) if len(last.vel_x) else None
        acc = np.array([last.accel_x[-1], last.accel_y[-1]]) if len(last.accel_x) else None
        if vel is None or acc is None:
            return Drop(sid, "missing_ego_state", rel)
        if not finite(dense, vel, acc):
            return Fail(
                sid, "InvalidPose", f"{rel}: non-finite past/future state in frame {sid}", rel
            )
        vel_track = None
        if self.src.options.headings == "velocity":
            parts = [_velocities(frame.past_states, PAST_STATES)]
            if future_xy is not None:
                parts.append(_velocities(frame.future_states, FUTURE_STATES))
            if all(p is not None and finite(p) for p in parts):
                vel_track = np.vstack(parts)
        heads = track_headings(
            dense, PAST_STATES - 1, self.src.options.min_heading_chord, vel_track
        )
        poses = np.column_stack([dense, heads])
        history = poses[hist_idx]
        future = None
        if future_xy is not None:
            fut_idx = [PAST_STATES - 1 + STEP * k for k in range(1, self.cfg.future + 1)]
            future = poses[fut_idx]
        out = {
            "history": history,
            "future": future,
            "velocity": vel,
            "acceleration": acc,
            "velocity_source": "dataset",
            **label_sample(history, future, self.cfg.meta_actions),
        }
        prefs = [
            (float(t.preference_score), _xy(t))
            for t in frame.preference_trajectories
            if len(t.pos_x) and len(t.pos_x) == len(t.pos_y) and 0.0 <= t.preference_score <= 10.0
        ]
        prefs = [(s, xy) for s, xy in prefs if finite(xy)]
        if prefs:
            out["preference_trajectories"] = [xy for _, xy in prefs]
            out["preference_scores"] = [s for s, _ in prefs]
        return out

    def _cameras(self, i: int, frame: Any) -> tuple[CameraClip, ...]:
        calibs = {c.name: c for c in frame.frame.context.camera_calibrations}
        clips = []
        for cam in self.cfg.cameras:
            cid = CAMERA_IDS[cam]
            cal = calibs.get(cid)
            if cal is None or len(cal.intrinsic) < 4 or len(cal.extrinsic.transform) != 16:
                raise ImageError(
                    f"{self.frames[i][0]}: frame {self.segment}-{i:03d} has no calibration for {cam}"
                )
            fu, fv, cu, cv = cal.intrinsic[:4]
            k = np.array([[fu, 0.0, cu], [0.0, fv, cv], [0.0, 0.0, 1.0]])
            ext = np.asarray(cal.extrinsic.transform, np.float64).reshape(4, 4).copy()
            # camera axes to OpenCV (x right, y down, z forward)
            ext[:3, :3] = ext[:3, :3] @ WAYMO_FROM_CV
            stored = [self._image(i - d, cid, cam) for d in self.span]
            where = [f"{self.frames[i - d][0]}@{self.frames[i - d][1]}" for d in self.span]
            # intrinsic = [f_u, f_v, c_u, c_v, k1, k2, p1, p2, k3] (dataset.proto); WOD images are not
            # rectified (waymo-open-dataset issue #53), so the lens coefficients travel with the clip.
            coeffs = np.asarray(cal.intrinsic[4:9], np.float64) if len(cal.intrinsic) >= 9 else None
            model = "opencv" if coeffs is not None and finite(coeffs) else None
            clips.append(
                make_clip(
                    cam,
                    stored,
                    k,
                    (int(cal.width), int(cal.height)),
                    ext,
                    where,
                    model,
                    coeffs if model else None,
                )
            )
        return tuple(clips)

    def _image(self, j: int, cid: int, cam: str) -> tuple[Any, int]:
        fr = self._read(j)
        if isinstance(fr, Fail):
            raise _ClipFrameError(fr)
        rel, offset = self.frames[j]
        source = f"{rel}@{offset} frame {self.segment}-{j:03d} camera {cam}"

        def load() -> bytes:
            for img in fr.frame.images:
                if img.name == cid:
                    return img.image
            raise ImageError(f"{source}: no image for this camera")

        return self.images.get((j, cid), load, source), int(fr.frame.timestamp_micros)


class _ClipFrameError(Exception):
    def __init__(self, fail: Fail) -> None:
        super().__init__(fail.message)
        self.fail = fail

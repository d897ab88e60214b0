"""One Bench2Drive clip -> outcomes: a sample every ``options.sample_every`` frames.

The current frame ``c`` of a sample needs the annotations of ``c + k * step``
for k in [-H, 10] (``step`` = frames per 0.5 s), of ``c - 1`` and ``c + 1`` for
the ego kinematics and pedestrian velocities (optional: fallbacks exist), and
the camera frames ``c - d`` of the clip span. Candidates start at the first
frame with a full history. A candidate whose future runs past the last frame
is dropped (``window_too_short``); a clip with no complete window at all gives
one ``clip_too_short`` drop. A missing or corrupt annotation fails exactly the
samples that need it (``MissingFrame`` / ``CorruptAnnotation`` /
``MissingEgoPose``, naming the file). Annotations are parsed once and images
decoded once per clip, and both are forgotten once no later sample needs them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipelines.core.stage import Drop, Fail
from pipelines.geometry import poses_to_local
from pipelines.io.images import ImageError
from pipelines.sources.b2d_io import ClipFiles
from pipelines.sources.base import (
    EXTRACTOR_VERSION,
    ImageCache,
    Outcome,
    WorkUnit,
    label_sample,
    make_clip,
)
from pipelines.sources.bench2drive import (
    CAMERAS,
    DATASET,
    Bench2DriveSource,
    Frame,
    FrameError,
    camera_extrinsics,
    command_of,
    ego_kinematics,
    image_dir,
    parse_frame,
    to_ego_objects,
)
from schemas.sample import Sample, make_sample_id

log = logging.getLogger(__name__)


class ClipReader:
    """The samples of one clip, in frame order."""

    def __init__(self, src: Bench2DriveSource, unit: WorkUnit, files: ClipFiles) -> None:
        self.cfg, self.opt, self.files = src.cfg, src.options, files
        self.clip: str = unit.payload["clip"]
        self.split = unit.split
        self.step = self.opt.step
        self.dt = 1.0 / self.opt.frame_rate_hz
        self.present = set(files.anno_index)
        self.images = ImageCache(self.cfg.image)
        self.span = [k * self.cfg.clip.step for k in range(self.cfg.clip.frames - 1, -1, -1)]
        self.left_out: Counter[str] = Counter()
        self._frames: dict[int, Frame | FrameError] = {}

    def _ts(self, i: int) -> int:
        return int(round(i * 1e6 / self.opt.frame_rate_hz))

    def frame(self, i: int) -> Frame:
        """The parsed annotation of frame ``i``; raises :class:`FrameError` (cached) when unusable."""
        item = self._frames.get(i)
        if item is None:
            where = self.files.anno_path(i)
            try:
                if i not in self.present:
                    raise FileNotFoundError(i)
                item = parse_frame(i, self.files.anno(i), where)
            except FileNotFoundError:
                lo, hi = min(self.present), max(self.present)
                item = FrameError("MissingFrame", f"{where}: missing (the clip has frames {lo}..{hi})")
            except OSError as exc:
                item = FrameError("MissingFrame", f"{where}: cannot read ({exc})")
            except FrameError as exc:
                item = exc
            self._frames[i] = item
        if isinstance(item, FrameError):
            raise item
        return item

    def optional(self, i: int) -> Frame | None:
        try:
            return self.frame(i)
        except FrameError:
            return None

    def run(self) -> Iterator[Outcome]:
        if not self.present:
            yield Fail(None, "EmptyClip", f"{self.files.rel}: no anno/NNNNN.json.gz files", self.files.rel)
            return
        first, last = min(self.present), max(self.present)
        h, f = self.cfg.history, self.cfg.future
        c0 = first + h * self.step
        if c0 + f * self.step > last:
            yield Drop(self._sid(c0), "clip_too_short", self.files.rel)
            return
        for c in range(c0, last + 1, self.opt.sample_every):
            if c + f * self.step > last:
                yield Drop(self._sid(c), "window_too_short", self.files.rel)
                continue
            yield self._sample(c)
            nxt = c + self.opt.sample_every
            keep_from = min(nxt - h * self.step, nxt - self.span[0]) - 1
            self._frames = {i: v for i, v in self._frames.items() if i >= keep_from}
            self.images.retain(lambda key, lo=nxt - self.span[0]: key[1] >= lo)
        if self.left_out:
            log.info("%s %s: objects left out: %s", DATASET, self.files.rel, dict(self.left_out))

    def _sid(self, c: int) -> str:
        return make_sample_id(DATASET, self.clip, f"{c:05d}")

    def _sample(self, c: int) -> Outcome:
        sid = self._sid(c)
        cfg = self.cfg
        h = cfg.history
        try:
            frames = [self.frame(c + k * self.step) for k in range(-h, cfg.future + 1)]
        except FrameError as exc:
            return Fail(sid, exc.kind, str(exc), str(exc).split(": ")[0])
        cur = frames[h]
        poses = np.stack([fr.pose for fr in frames])
        history = poses_to_local(poses[:h], cur.pose)
        future = poses_to_local(poses[h + 1 :], cur.pose)
        prev, nxt = self.optional(c - 1), self.optional(c + 1)
        kin = ego_kinematics(prev, cur, nxt, self.dt)
        where = self.files.anno_path(c)
        if kin is None:
            return Fail(sid, "NoKinematics", f"{where}: frames {c - 1}/{c + 1} unusable and speed or "
                        "acceleration missing", where)  # fmt: skip
        try:
            cameras, files = self._cameras(c, cur)
        except ImageError as exc:
            return Fail(sid, "ImageError", str(exc), str(exc).split(": ")[0])
        except (KeyError, TypeError, ValueError) as exc:
            return Fail(sid, "BadCalibration", f"{where}: camera calibration: {exc!r}", where)
        return Sample(
            sample_id=sid,
            dataset=DATASET,
            split=self.split,
            scene_id=self.clip,
            timestamp_us=self._ts(c),
            cameras=cameras,
            history=history,
            future=future,
            velocity=kin[0],
            acceleration=kin[1],
            command=command_of(cur.command, self.opt.command_map),
            objects=to_ego_objects(cur, prev, nxt, self.dt, self.left_out),
            source_files=(where, *files),
            extractor_version=EXTRACTOR_VERSION,
            **label_sample(history, future, cfg.meta_actions),
        )

    def _cameras(self, c: int, cur: Frame) -> tuple[tuple[Any, ...], list[str]]:
        clips, files = [], []
        for cam in self.cfg.cameras:
            key, folder = CAMERAS[cam], image_dir(cam)
            info = cur.sensors[key]
            stored, rels = [], []
            for d in self.span:
                i = c - d
                rel = self.files.image_path(folder, i)
                img = self.images.get((cam, i), lambda i=i, folder=folder: self.files.image(folder, i), rel)
                stored.append((img, self._ts(i)))
                rels.append(rel)
            files.append(rels[-1])
            size = (int(info["image_size_x"]), int(info["image_size_y"]))
            k = np.asarray(info["intrinsic"], np.float64).reshape(3, 3)
            clips.append(make_clip(cam, stored, k, size, camera_extrinsics(info["cam2ego"]), rels))
        return tuple(clips), files

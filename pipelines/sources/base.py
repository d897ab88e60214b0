"""What every dataset source shares: the extraction config, the unit of work, the base class.

A source turns one dataset on disk into unified :class:`~schemas.sample.Sample`
values. It lists its *work units* (a WOD-E2E segment, a nuScenes scene, a
NAVSIM log) cheaply in the driver, and turns one unit into outcomes on a
worker: a ``Sample``, a :class:`~pipelines.core.stage.Drop` (with a reason) or
a :class:`~pipelines.core.stage.Fail` (with the file and cause). The extract
stage groups units into partitions, validates and writes rows; sources know
nothing about runners or shards.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipelines.config import ConfigError, from_dict
from pipelines.core.stage import Drop, Fail, Note
from pipelines.io.fs import as_path, open_file
from pipelines.io.images import ImageConfig, ImageError, StoredImage, resize_jpeg, scale_intrinsics
from pipelines.meta_actions import MetaActionConfig, future_meta_action, history_meta_action
from schemas.enums import Camera, Dataset, Split
from schemas.sample import FUTURE_STEPS, CameraClip, CameraFrame, Sample

log = logging.getLogger(__name__)

EXTRACTOR_VERSION = "1.0.0"


class SourceError(RuntimeError):
    """A dataset cannot be read at all (missing path, missing tables); raised before any work starts."""


@dataclass(frozen=True, slots=True)
class ClipConfig:
    """Which earlier frames make a camera clip: ``frames`` of them, ``step`` source frames apart."""

    frames: int = 4  # T frames per camera, oldest first, the last at t0
    # source-frame index step (WOD-E2E at 10 Hz: 10 = 1 Hz; keyframes at 2 Hz: 1 = 2 Hz)
    step: int = 1

    def __post_init__(self) -> None:
        if self.frames < 1 or self.step < 1:
            raise ValueError(
                f"clip.frames ({self.frames}) and clip.step ({self.step}) must be >= 1"
            )


@dataclass(frozen=True, slots=True)
class ExtractConfig:
    """Settings of one extraction run (``configs/extract/<dataset>.yaml`` + ``--set`` overrides)."""

    dataset: str
    # dataset root; empty = data/sample/<dataset>; relative to the working directory
    input: str = ""
    splits: tuple[str, ...] = ("train", "val", "test")  # our Split values to extract
    # canonical camera names, in output order
    cameras: tuple[str, ...] = ("front", "front_left", "front_right", "back")
    clip: ClipConfig = ClipConfig()
    image: ImageConfig = ImageConfig()
    history: int = 4  # H poses at 2 Hz before t0
    future: int = FUTURE_STEPS  # poses at 2 Hz after t0 (the schema fixes 10)
    meta_actions: MetaActionConfig = MetaActionConfig()
    # segments / scenes / logs per partition (a partition is the unit of parallelism and resume)
    units_per_partition: int = 1
    # dataset-specific settings, parsed by the source's Options dataclass
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dataset not in Dataset.values():
            raise ValueError(f"dataset {self.dataset!r} is not one of {list(Dataset.values())}")
        bad = [s for s in self.splits if s not in Split.values()]
        if bad or not self.splits:
            raise ValueError(
                f"splits {list(self.splits)}: each must be one of {list(Split.values())}"
            )
        bad = [c for c in self.cameras if c not in Camera.values()]
        if bad or not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise ValueError(
                f"cameras {list(self.cameras)}: distinct names from {list(Camera.values())}"
            )
        if self.future != FUTURE_STEPS:
            raise ValueError(
                f"future must be {FUTURE_STEPS} (0.5 .. 5.0 s at 2 Hz), got {self.future}"
            )
        if self.history < 1:
            raise ValueError(f"history must be >= 1, got {self.history}")
        if self.units_per_partition < 1:
            raise ValueError("units_per_partition must be >= 1")

    @property
    def input_path(self) -> Path:
        """The input root: a local ``Path``, or a ``UPath`` for ``s3://`` / ``gs://`` (scheme kept)."""
        return as_path(self.input or f"data/sample/{self.dataset}")


@dataclass(frozen=True, slots=True)
class WorkUnit:
    """One segment/scene/log: ``key`` is unique and stable; ``payload`` is JSON-serialisable."""

    key: str
    split: str
    payload: Mapping[str, Any]


Outcome = Sample | Drop | Fail | Note  # Note: a data count, not a sample (e.g. objects kept without velocity)


class Source(ABC):
    """Base class of a dataset source (one per dataset, looked up by name in the registry).

    Subclasses set ``name``, an ``Options`` dataclass for ``options:`` in the
    config, and implement :meth:`work_units` and :meth:`iter_unit`. The
    constructor checks the input exists so a bad path fails before any work.
    Instances are pickled to workers: keep heavy resources for :meth:`open`.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = type(None)

    def __init__(self, cfg: ExtractConfig) -> None:
        if cfg.dataset != self.name:
            raise ConfigError(f"config is for dataset {cfg.dataset!r}, source is {self.name!r}")
        self.cfg = cfg
        self.root = cfg.input_path
        self.options: Any = from_dict(self.Options, cfg.options, "options")
        if not self.root.exists():
            raise SourceError(
                f"{self.name}: input path {str(self.root)!r} does not exist "
                f"(pass --input PATH, or run `drivevla generate --out data/sample` for the sample data)"
            )

    @abstractmethod
    def work_units(self) -> list[WorkUnit]:
        """The units of the selected splits, in a deterministic order (cheap: runs in the driver)."""

    @abstractmethod
    def iter_unit(self, unit: WorkUnit) -> Iterator[Outcome]:
        """One outcome per sample of ``unit``, in a deterministic order."""

    def open(self) -> None:
        """Create per-worker resources (e.g. a devkit instance)."""
        return None

    def close(self) -> None:
        """Release what :meth:`open` made."""
        return None

    def __getstate__(self) -> dict[str, Any]:
        # Workers receive the config only; resources are rebuilt by open().
        return {"cfg": self.cfg, "root": self.root, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def label_sample(
    history: np.ndarray, future: np.ndarray | None, cfg: MetaActionConfig
) -> dict[str, str | None]:
    """Meta-action labels of the future and the history (section 5), as Sample keyword arguments."""
    out: dict[str, str | None] = {
        "meta_lateral": None,
        "meta_longitudinal": None,
        "history_meta_lateral": None,
        "history_meta_longitudinal": None,
    }
    if future is not None:
        lat, lon = future_meta_action(future, cfg)
        out["meta_lateral"], out["meta_longitudinal"] = lat.value, lon.value
    hlat, hlon = history_meta_action(history, cfg)
    if hlat is not None and hlon is not None:
        out["history_meta_lateral"], out["history_meta_longitudinal"] = hlat.value, hlon.value
    return out


def finite(*arrays: np.ndarray | None) -> bool:
    """True when every given array is all finite (None entries are skipped)."""
    return all(
        a is None or bool(np.isfinite(np.asarray(a, dtype=np.float64)).all()) for a in arrays
    )


class ImageCache:
    """Resized frames by key, so a frame shared by several clips is decoded once.

    Failures are cached too: every sample that needs a broken frame fails with
    the same message, without re-reading the file.
    """

    def __init__(self, cfg: ImageConfig) -> None:
        self.cfg = cfg
        self._items: dict[Any, StoredImage | ImageError] = {}

    def get(self, key: Any, load: Callable[[], bytes], source: str) -> StoredImage:
        """The stored frame for ``key``; ``load`` returns the original encoded bytes."""
        item = self._items.get(key)
        if item is None:
            try:
                item = resize_jpeg(load(), self.cfg, source)
            except (ImageError, OSError) as exc:
                item = exc if isinstance(exc, ImageError) else ImageError(f"{source}: {exc}")
            self._items[key] = item
        if isinstance(item, ImageError):
            raise item
        return item

    def retain(self, keep: Callable[[Any], bool]) -> None:
        """Forget every frame whose key ``keep`` rejects (bounded memory while streaming)."""
        for k in [k for k in self._items if not keep(k)]:
            del self._items[k]

    def __len__(self) -> int:
        return len(self._items)


def read_image_file(path: str, rel: str) -> bytes:
    """The bytes of an image file; a missing/unreadable one raises ``ImageError`` naming ``rel``."""
    try:
        with open_file(path, "rb") as fh:  # local path or object-store URL
            return fh.read()
    except OSError as exc:
        raise ImageError(f"{rel}: cannot read camera image ({exc.strerror or exc})") from None


def make_clip(
    camera: str,
    frames: list[tuple[StoredImage, int]],
    intrinsics: np.ndarray,
    calib_size: tuple[int, int],
    extrinsics: np.ndarray,
    sources: Sequence[str] | None = None,
    distortion_model: str | None = None,
    distortion: np.ndarray | None = None,
) -> CameraClip:
    """A camera clip from stored frames (oldest first) and calibration at the original resolution.

    ``calib_size`` is the ``(width, height)`` the intrinsics refer to; every
    frame must have been decoded from that size, else the intrinsics would be
    wrong for it (raises :class:`~pipelines.io.images.ImageError` whose
    message starts with that frame's entry of ``sources``, its file).
    ``distortion_model``/``distortion`` describe the lens of unrectified
    images (None: pinhole); the coefficients act on normalised coordinates,
    so resizing leaves them unchanged.
    """
    first = frames[-1][0]
    for n, (img, _) in enumerate(frames):
        if (img.source_width, img.source_height) != tuple(calib_size):
            where = sources[n] if sources is not None else f"camera {camera}"
            raise ImageError(
                f"{where}: {camera} image is {img.source_width}x{img.source_height} but its "
                f"calibration is for {calib_size[0]}x{calib_size[1]}"
            )
    k = scale_intrinsics(intrinsics, calib_size, (first.width, first.height))
    return CameraClip(
        name=camera,
        width=first.width,
        height=first.height,
        intrinsics=k,
        extrinsics=np.asarray(extrinsics, dtype=np.float64).reshape(4, 4),
        frames=tuple(CameraFrame(img.jpeg, int(ts)) for img, ts in frames),
        distortion_model=distortion_model,
        distortion=None if distortion is None else np.asarray(distortion, np.float64).reshape(-1),
    )

"""Sizes, deterministic tokens and ground-truth records shared by the three writers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np

from pipelines.sample_data.render import Renderer
from pipelines.sample_data.world import Scene

PAST_MARGIN_S: Final = (
    4.5  # s simulated before a scene's first frame (WOD-E2E past states reach -4 s)
)
FUTURE_MARGIN_S: Final = 5.5  # s simulated after its last frame (futures reach +5 s)


@dataclass(frozen=True)
class SizeSpec:
    """How much to generate. ``image_size`` is (width, height) of the main cameras."""

    image_size: tuple[int, int]
    jpeg_quality: int = 90
    # WOD-E2E: segments per split, TFRecord files per split, segment length, 10 Hz index stride.
    waymo_segments: dict[str, int] = field(
        default_factory=lambda: {"training": 2, "validation": 1, "test": 1}
    )
    waymo_files: dict[str, int] = field(
        default_factory=lambda: {"training": 2, "validation": 1, "test": 1}
    )
    waymo_duration_s: float = 10.0
    waymo_test_duration_s: float = 4.0
    waymo_stride: int = (
        5  # write every 5th 10 Hz frame (2 Hz), as clip builders need earlier frames
    )
    # nuScenes: scenes (taken from v1.0-mini's train/val scene names), 2 Hz samples per scene.
    nuscenes_train_scenes: int = 1
    nuscenes_val_scenes: int = 1
    nuscenes_samples: int = 24
    nuscenes_lidar_sweeps: int = 2  # LIDAR_TOP sweeps between keyframes
    # NAVSIM: logs per split directory, 2 Hz frames per log.
    nuplan_logs: dict[str, int] = field(default_factory=lambda: {"mini": 2})
    nuplan_frames: int = 30
    # Bench2Drive: 10 Hz clips (the first one steered into a left turn), seconds per clip.
    bench2drive_clips: int = 2
    bench2drive_duration_s: float = 8.0


SIZES: Final[dict[str, SizeSpec]] = {
    "tiny": SizeSpec(image_size=(64, 40)),
    "default": SizeSpec(
        image_size=(320, 200),
        waymo_segments={"training": 5, "validation": 2, "test": 1},
        waymo_files={"training": 4, "validation": 2, "test": 1},
        waymo_duration_s=15.0,
        waymo_test_duration_s=8.0,
        nuscenes_train_scenes=4,
        nuscenes_val_scenes=1,
        nuscenes_samples=30,
        nuscenes_lidar_sweeps=4,
        nuplan_logs={"trainval": 3, "test": 1},
        nuplan_frames=40,
        bench2drive_clips=3,
        bench2drive_duration_s=15.0,
    ),
    # Benchmarks: several hundred rows per dataset, so a run's fixed costs (input listing, markers,
    # manifest) weigh per row about as little as at real scale; ~5x "default" on disk.
    "bench": SizeSpec(
        image_size=(320, 200),
        waymo_segments={"training": 20, "validation": 4, "test": 1},
        waymo_files={"training": 8, "validation": 2, "test": 1},
        waymo_duration_s=20.0,
        waymo_test_duration_s=8.0,
        nuscenes_train_scenes=8,
        nuscenes_val_scenes=2,
        nuscenes_samples=40,
        nuscenes_lidar_sweeps=4,
        nuplan_logs={"trainval": 12, "test": 1},
        nuplan_frames=80,
        bench2drive_clips=10,
        bench2drive_duration_s=20.0,
    ),
}


def size_spec(size: str, image_size: tuple[int, int] | None = None) -> SizeSpec:
    """The named size, optionally with another image resolution."""
    if size not in SIZES:
        raise ValueError(f"unknown sample-data size {size!r}; valid: {sorted(SIZES)}")
    spec = SIZES[size]
    if image_size is not None:
        w, h = (int(v) for v in image_size)
        if w < 16 or h < 16:
            raise ValueError(f"image size {image_size} is too small (min 16x16)")
        spec = replace(spec, image_size=(w, h))
    return spec


def token(seed: int, *parts: Any, length: int = 32) -> str:
    """A stable hex token from the seed and any identifying parts."""
    text = "/".join(str(p) for p in (seed, *parts))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def scene_rng(seed: int, dataset: str, index: int) -> np.random.Generator:
    """The random generator of one scene: independent across datasets and scenes, fixed by the seed."""
    salt = int(hashlib.sha256(dataset.encode()).hexdigest()[:8], 16)
    return np.random.default_rng([seed, salt, index])


def simulate(
    seed: int, dataset: str, index: int, name: str, duration_s: float
) -> tuple[Scene, Renderer]:
    """A scene whose frames span [0, duration_s], simulated with margins for past and future states."""
    scene = Scene(
        scene_rng(seed, dataset, index), name, -PAST_MARGIN_S, duration_s + FUTURE_MARGIN_S
    )
    return scene, Renderer(scene)


def gt_record(
    dataset: str, split: str, scene_name: str, frame: str, timestamp_us: int, scene: Scene, t: float
) -> dict[str, Any]:
    """One ground-truth line: world ego pose at the ego origin (rear axle), world velocity/acceleration, command."""
    e = scene.ego(t)
    return {
        "dataset": dataset,
        "split": split,
        "scene": scene_name,
        "frame": frame,
        "timestamp_us": int(timestamp_us),
        "x": round(float(e["x"]), 6),
        "y": round(float(e["y"]), 6),
        "z": 0.0,
        "yaw": round(float(e["yaw"]), 6),
        "vx": round(float(e["vx"]), 6),
        "vy": round(float(e["vy"]), 6),
        "ax": round(float(e["ax"]), 6),
        "ay": round(float(e["ay"]), 6),
        "command": scene.command(t),
    }

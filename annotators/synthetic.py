"""Small synthetic sample rows for annotation tests and the benchmark (no extraction needed).

Rows follow :data:`schemas.sample.SAMPLE_SCHEMA` (built with
:class:`schemas.sample.Sample`), with real JPEG frames made by PIL and
futures whose meta-actions are computed by :mod:`pipelines.meta_actions`.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from pipelines.geometry import headings_from_positions
from pipelines.meta_actions import future_meta_action, history_meta_action
from schemas.enums import Camera, Command
from schemas.sample import CameraClip, CameraFrame, Object, Sample, make_sample_id

_CAM_YAW = {
    Camera.FRONT: 0.0,
    Camera.FRONT_LEFT: 0.9,
    Camera.FRONT_RIGHT: -0.9,
    Camera.BACK: math.pi,
}


def jpeg(width: int, height: int, seed: int, quality: int = 80) -> bytes:
    """A small noisy JPEG (noise so that sizes are realistic, seed so that bytes are stable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.linspace(40, 200, width, dtype=np.float32)[None, :, None]
    img = np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _extrinsics(yaw: float) -> np.ndarray:
    """Camera (OpenCV: x right, y down, z forward) -> ego, looking along ``yaw`` at 1.6 m height."""
    fwd = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2] = right, down, fwd
    m[:3, 3] = (1.5 * math.cos(yaw), 1.5 * math.sin(yaw), 1.6)
    return m


def make_row(
    i: int,
    dataset: str = "nuscenes",
    width: int = 64,
    height: int = 48,
    frames: int = 4,
    hz: float = 2.0,
    cameras: tuple[Camera, ...] = (
        Camera.FRONT,
        Camera.FRONT_LEFT,
        Camera.FRONT_RIGHT,
        Camera.BACK,
    ),
    with_objects: bool = True,
) -> dict[str, Any]:
    """Sample row ``i``: a deterministic mix of straight, turning, braking and stopped scenes."""
    kind = i % 4
    t = np.arange(1, 11) * 0.5
    speed = 8.0 + (i % 3)
    if kind == 0:  # straight, constant speed
        x, y = speed * t, np.zeros_like(t)
        cmd = Command.STRAIGHT
    elif kind == 1:  # left turn
        r = 12.0
        ang = speed * t / r * 0.8
        x, y = r * np.sin(ang), r * (1 - np.cos(ang))
        cmd = Command.LEFT
    elif kind == 2:  # braking to a stop
        v = np.maximum(speed - 1.8 * t, 0.0)  # uniform braking (the speed after each step)
        x = np.cumsum(v * 0.5)
        y = np.zeros_like(t)
        cmd = Command.STRAIGHT
    else:  # stopped
        x, y = np.zeros_like(t), np.zeros_like(t)
        cmd = Command.UNKNOWN
        speed = 0.0
    xy = np.stack([x, y], axis=1)
    future = np.column_stack([xy, headings_from_positions(np.vstack([[0.0, 0.0], xy]))[1:]])
    history = np.column_stack([-speed * np.arange(4, 0, -1) * 0.5, np.zeros(4), np.zeros(4)])
    lat, lon = future_meta_action(future)
    hlat, hlon = history_meta_action(history)
    t0 = 1_000_000_000 + i * 10_000_000
    clips = []
    for c_i, cam in enumerate(cameras):
        fr = tuple(
            CameraFrame(
                jpeg(width, height, seed=i * 1000 + c_i * 10 + k),
                t0 - int((frames - 1 - k) * 1e6 / hz),
            )
            for k in range(frames)
        )
        f = width / 2 / math.tan(math.radians(35))
        K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]])
        clips.append(
            CameraClip(cam.value, width, height, K, _extrinsics(_CAM_YAW.get(cam, 0.0)), fr)
        )
    objects = None
    if with_objects:
        objects = (
            Object("vehicle", 15.0 + i % 5, 0.3, 0.0, 4.5, 1.9, speed * 0.8, 0.0, f"car{i}"),
            Object(
                "pedestrian", 8.0, -4.0 + (i % 2), 1.57, 0.6, 0.6, 0.0, 1.2 * (i % 2), f"ped{i}"
            ),
        )
    s = Sample(
        sample_id=make_sample_id(dataset, f"scene{i // 10}", i),
        dataset=dataset,
        split="train",
        scene_id=f"scene{i // 10}",
        timestamp_us=t0,
        cameras=tuple(clips),
        history=history,
        future=future,
        velocity=np.array([speed, 0.0]),
        acceleration=np.array([-1.8 if kind == 2 else 0.0, 0.0]),
        command=cmd.value,
        meta_lateral=lat.value,
        meta_longitudinal=lon.value,
        history_meta_lateral=None if hlat is None else hlat.value,
        history_meta_longitudinal=None if hlon is None else hlon.value,
        objects=objects,
        source_files=("synthetic",),
        extractor_version="synthetic",
    )
    return s.to_record()


def make_rows(n: int, **kwargs: Any) -> list[dict[str, Any]]:
    return [make_row(i, **kwargs) for i in range(n)]

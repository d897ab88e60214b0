"""Simulated ego futures with realistic variety, for tests and benchmarks (no data needed).

A kinematic unicycle integrated at 10 Hz and sampled at 2 Hz: a mixture of
stopped, slow urban and highway speeds, accelerations and braking, gentle
curves, intersection turns, lane changes, and a little pose noise (as in
logged data, which makes most segments distinct).
"""

from __future__ import annotations

import numpy as np

from pipelines.geometry import wrap_angle
from schemas.sample import FUTURE_STEPS, MODEL_DT

_SUB = 5  # integration substeps per 0.5 s


def simulate_futures(n: int, seed: int = 0, noise: float = 0.02) -> np.ndarray:
    """``n`` futures ``(n,10,3)`` float32 (x, y, heading; ego frame at t0)."""
    rng = np.random.default_rng(seed)
    steps = FUTURE_STEPS * _SUB
    dt = MODEL_DT / _SUB
    kind = rng.choice(4, size=n, p=[0.1, 0.45, 0.3, 0.15])  # stopped, urban, highway, turning
    v0 = np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3],
        [
            np.zeros(n),
            rng.uniform(0.5, 15.0, n),
            rng.uniform(15.0, 33.0, n),
            rng.uniform(2.0, 10.0, n),
        ],
    )
    accel = np.where(kind == 0, 0.0, rng.normal(0.0, 1.2, n))
    brake = rng.random(n) < 0.1  # hard braking to a stop
    accel = np.where(brake & (kind != 0), -rng.uniform(2.0, 5.0, n), accel)
    t = (np.arange(steps) + 1) * dt
    v = np.clip(v0[:, None] + accel[:, None] * t, 0.0, 40.0)
    # road curvature shrinks with speed (highways are straighter than side streets)
    curvature = (rng.normal(0.0, 0.02, n) / (v0 + 5.0))[:, None] * np.ones(steps)
    turn = kind == 3
    turn_k = rng.choice([-1.0, 1.0], n) * rng.uniform(0.05, 0.15, n)
    turn_start = rng.uniform(0.0, 2.5, n)
    curvature = np.where(
        turn[:, None] & (t > turn_start[:, None]) & (t < turn_start[:, None] + 2.5),
        turn_k[:, None],
        curvature,
    )
    lane = (rng.random(n) < 0.15) & (kind != 0)  # lane change: an S of yaw rate over ~3 s
    amp = rng.choice([-1.0, 1.0], n) * rng.uniform(0.08, 0.2, n)
    phase = np.clip((t[None, :] - 0.5) / 3.0, 0.0, 1.0)
    yaw_rate = curvature * v + np.where(
        lane[:, None], amp[:, None] * np.sin(2 * np.pi * phase) * (phase < 1), 0.0
    )
    heading = np.cumsum(yaw_rate * dt, axis=1)
    x = np.cumsum(v * np.cos(heading) * dt, axis=1)
    y = np.cumsum(v * np.sin(heading) * dt, axis=1)
    pick = np.arange(_SUB - 1, steps, _SUB)
    fut = np.stack([x[:, pick], y[:, pick], heading[:, pick]], axis=-1)
    moving = (v[:, pick] > 0.05)[..., None]  # stopped cars do not jitter in logs
    fut += moving * rng.normal(0.0, 1.0, fut.shape) * np.array([noise, noise, noise / 4])
    fut[..., 2] = wrap_angle(fut[..., 2])
    return fut.astype(np.float32)

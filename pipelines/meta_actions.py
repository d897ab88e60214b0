"""Meta-action labels of a trajectory (DESIGN.md section 5).

Computed once at extraction for the future and the history; thresholds come
from :class:`MetaActionConfig` and are recorded in dataset metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipelines.geometry import poses_to_local
from schemas.enums import Lateral, Longitudinal


@dataclass(frozen=True, slots=True)
class MetaActionConfig:
    stop_speed: float = 0.3  # m/s: below this counts as stopped
    constant_speed_delta: float = 0.8  # m/s: |v1 - v0| below this is constant speed
    quick_ratio: float = 2.0  # v1 > ratio * v0 is "quick acceleration" (and vice versa)
    lane_keep_y: float = 2.0  # m: every |y| below this is "move forward"
    turn_y: float = 4.0  # m: |y_final| above this is a turn, else a lane change
    dt: float = 0.5  # s between poses

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def speeds(poses: np.ndarray, dt: float, start: np.ndarray | None = None) -> np.ndarray:
    """Speeds by finite differences of consecutive positions (``start`` prepended if given)."""
    xy = np.asarray(poses, dtype=np.float64)[:, :2]
    if start is not None:
        xy = np.vstack([np.asarray(start, dtype=np.float64)[None, :2], xy])
    return np.linalg.norm(np.diff(xy, axis=0), axis=1) / dt


def longitudinal(v0: float, v1: float, cfg: MetaActionConfig = MetaActionConfig()) -> Longitudinal:
    """Section 5's longitudinal rule from the first (``v0``) and last (``v1``) speed, in order."""
    if v0 < cfg.stop_speed and v1 < cfg.stop_speed:
        return Longitudinal.STOP
    if v1 < cfg.stop_speed:
        return Longitudinal.DECEL_TO_ZERO
    if abs(v1 - v0) < cfg.constant_speed_delta:
        return Longitudinal.CONSTANT
    if v1 > cfg.quick_ratio * v0:
        return Longitudinal.QUICK_ACCEL
    if v1 > v0:
        return Longitudinal.ACCEL
    if v0 > cfg.quick_ratio * v1:
        return Longitudinal.QUICK_DECEL
    return Longitudinal.DECEL


def lateral(y: np.ndarray, cfg: MetaActionConfig = MetaActionConfig()) -> Lateral:
    """Section 5's lateral rule from the lateral offsets ``y`` (ego frame, +y left) of a moving trajectory."""
    y = np.asarray(y, dtype=np.float64)
    if (np.abs(y) < cfg.lane_keep_y).all():
        return Lateral.MOVE_FORWARD
    left = y[-1] > 0
    if abs(y[-1]) > cfg.turn_y:
        return Lateral.TURN_LEFT if left else Lateral.TURN_RIGHT
    return Lateral.CHANGE_LANE_LEFT if left else Lateral.CHANGE_LANE_RIGHT


def future_meta_action(
    future: np.ndarray, cfg: MetaActionConfig = MetaActionConfig()
) -> tuple[Lateral, Longitudinal]:
    """Labels of a future ``(T,3)`` in the ego frame (speeds from the origin onwards)."""
    v = speeds(future, cfg.dt, start=np.zeros(3))
    lon = longitudinal(float(v[0]), float(v[-1]), cfg)
    lat = Lateral.NONE if lon is Longitudinal.STOP else lateral(np.asarray(future)[:, 1], cfg)
    return lat, lon


def history_meta_action(
    history: np.ndarray, cfg: MetaActionConfig = MetaActionConfig()
) -> tuple[Lateral, Longitudinal] | tuple[None, None]:
    """Labels of the history ``(H,3)`` plus the current pose, expressed from the oldest pose.

    The history is re-expressed in the frame of its oldest pose so that the
    lateral rule ("offset relative to where the motion started") means the
    same as for the future: v0 is the oldest step's speed, v1 the last one's
    (into the current pose). Returns ``(None, None)`` for an empty history.
    """
    h = np.asarray(history, dtype=np.float64).reshape(-1, 3)
    if len(h) < 1:
        return None, None
    track = np.vstack([h, np.zeros((1, 3))])  # oldest .. now
    local = poses_to_local(track, track[0])[1:]
    return future_meta_action(local, cfg)

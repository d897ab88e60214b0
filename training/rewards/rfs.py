"""WOD-E2E Rater Feedback Score (RFS) as a reward.

Definition (our own implementation, checked against):

* Waymo Open Dataset, ``src/waymo_open_dataset/wdl_limited/e2e_driving/metrics/
  rater_feedback_utils.py`` (``get_rater_feedback_score``, Apache-2.0) and the
  challenge page https://waymo.com/open/challenges/2025/e2e-driving/;
* R. Xu et al., "WOD-E2E: Waymo Open Dataset for End-to-End Driving in
  Challenging Long-tail Scenarios", arXiv:2510.26125.

For each scene, up to 3 rater trajectories with scores in [0, 10]:

1. Raters are padded to 3 (duplicating the last one) and each trajectory to
   20 waypoints at 4 Hz over (0, 5 s] (duplicating its last waypoint).
2. Per step t the longitudinal axis is the direction of the rater's
   displacement from step t-1 to t (the origin prepended; a zero step keeps
   the previous direction; the first defaults to +x); the lateral axis is it
   rotated by +90 degrees.
3. The prediction-minus-rater error at 3 s and 5 s (steps 11 and 19 at 4 Hz)
   is projected on both axes; thresholds are lateral (1.0, 1.8) m and
   longitudinal 4x that, both scaled by
   clip(0.5 + 0.5 (v0 - 1.4) / (11 - 1.4), 0.5, 1.0), v0 = current speed.
4. norm = max(|lat| / thr_lat, |lon| / thr_lon); pair score =
   rater_score * 0.1 ** max(norm - 1, 0); best over raters per horizon, the
   horizons averaged.
5. A prediction that is not inside some rater's trust region at *both*
   horizons is floored: score = max(4.0, score). (As in Waymo's code, a
   prediction inside the region of a rater scored below 4 keeps that lower
   score; the floor only lifts predictions outside every region.)

Resampling: our predictions are 10 poses at 2 Hz (0.5 .. 5.0 s); WOD-E2E
preference trajectories are stored at their native 4 Hz. Both are put on
the 4 Hz scoring grid by linear interpolation in time from the origin at
t = 0 (times past a trajectory's end repeat its last point, which is the
same as Waymo's padding). The scored instants 3 s and 5 s coincide with
predicted poses 6 and 10, so the prediction's error there is exact; the
rater's axes come from its own 4 Hz steps. ``rater_hz`` says at what rate a
row's preference trajectories are stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.rewards.base import RewardError, RewardItem, current_speed


@dataclass(frozen=True, slots=True)
class RFSConfig:
    """Constants of the Rater Feedback Score (defaults = Waymo's)."""

    horizons_s: tuple[float, ...] = (3.0, 5.0)  # instants scored
    base_thresholds: tuple[float, ...] = (1.0, 1.8)  # m, one per horizon, before multipliers
    lat_multiplier: float = 1.0
    lon_multiplier: float = 4.0
    decay: float = 0.1  # pair score = rating * decay ** max(norm - 1, 0)
    floor: float = 4.0  # minimum score of a prediction outside every trust region
    speed_low: float = 1.4  # m/s: threshold scale 0.5 at or below
    speed_high: float = 11.0  # m/s: threshold scale 1.0 at or above
    scale_min: float = 0.5
    scale_max: float = 1.0
    num_raters: int = 3  # raters padded/truncated to this many
    grid_hz: float = 4.0  # scoring grid
    length_s: float = 5.0
    rater_hz: float = 4.0  # rate of the stored preference trajectories (WOD-E2E: 4 Hz)
    prediction_dt: float = 0.5  # s between predicted poses (model rate 2 Hz)
    max_score: float = 10.0

    def __post_init__(self) -> None:
        if len(self.base_thresholds) != len(self.horizons_s):
            raise ValueError("rfs: base_thresholds needs one value per horizon")
        if max(self.horizons_s) > self.length_s:
            raise ValueError("rfs: a horizon lies beyond length_s")


def speed_scale(v0: np.ndarray | float, cfg: RFSConfig = RFSConfig()) -> np.ndarray:
    """Threshold multiplier from the current speed ``v0`` (m/s)."""
    frac = (np.asarray(v0, dtype=np.float64) - cfg.speed_low) / (cfg.speed_high - cfg.speed_low)
    return np.clip(cfg.scale_min + (cfg.scale_max - cfg.scale_min) * frac, cfg.scale_min, cfg.scale_max)


def resample(xy: np.ndarray, dt: float, hz: float, length_s: float) -> np.ndarray:
    """Positions ``(T,2)`` sampled every ``dt`` from ``dt`` on -> ``(length_s*hz, 2)`` at ``hz``.

    Linear in time with the origin at t = 0; past the last point it repeats.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    n = int(round(length_s * hz))
    src_t = np.arange(len(xy) + 1) * dt
    pts = np.vstack([np.zeros((1, 2)), xy])
    dst_t = np.arange(1, n + 1) / hz
    if len(xy) == n and abs(dt * hz - 1.0) < 1e-9:
        return xy.copy()
    return np.stack([np.interp(dst_t, src_t, pts[:, k]) for k in range(2)], axis=-1)


def rater_axes(raters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit longitudinal and lateral axes ``(P,T,2)`` of rater trajectories ``(P,T,2)``."""
    padded = np.concatenate([np.zeros_like(raters[:, :1]), raters], axis=1)
    lon = np.diff(padded, axis=1)
    moving = np.linalg.norm(lon, axis=-1) > 0.0
    lon[:, 0][~moving[:, 0]] = (1.0, 0.0)
    for t in range(1, lon.shape[1]):  # T = 20: carrying the previous direction is a short scan
        lon[:, t][~moving[:, t]] = lon[:, t - 1][~moving[:, t]]
    lon = lon / np.linalg.norm(lon, axis=-1, keepdims=True)
    lat = np.stack([-lon[..., 1], lon[..., 0]], axis=-1)
    return lon, lat


def rater_feedback_score(
    predictions: np.ndarray,
    raters: np.ndarray,
    scores: np.ndarray,
    v0: float,
    cfg: RFSConfig = RFSConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """RFS of predictions ``(I,T,2)`` against raters ``(P,T,2)`` rated ``scores (P,)``.

    All trajectories on the scoring grid (``cfg.grid_hz``, ``cfg.length_s``).
    Returns ``(score (I,), inside (I,))`` where ``inside`` says whether the
    prediction lies in some rater's trust region at every horizon.
    """
    lon_ax, lat_ax = rater_axes(raters)
    idx = np.array([int(round(h * cfg.grid_hz)) - 1 for h in cfg.horizons_s])
    err = predictions[None, :, idx, :] - raters[:, None, idx, :]  # (P,I,H,2)
    d_lon = np.abs(np.sum(err * lon_ax[:, None, idx, :], axis=-1))  # (P,I,H)
    d_lat = np.abs(np.sum(err * lat_ax[:, None, idx, :], axis=-1))
    scale = float(speed_scale(v0, cfg))
    base = np.asarray(cfg.base_thresholds, dtype=np.float64)
    thr_lat = scale * cfg.lat_multiplier * base  # (H,)
    thr_lon = scale * cfg.lon_multiplier * base
    norm = np.maximum(d_lat / thr_lat, d_lon / thr_lon)  # (P,I,H)
    inside = np.any(np.all(norm <= 1.0, axis=2), axis=0)  # (I,)
    pair = scores[:, None, None] * cfg.decay ** np.maximum(norm - 1.0, 0.0)
    score = pair.max(axis=0).mean(axis=-1)  # best rater per horizon, horizons averaged
    score = np.where(inside, score, np.maximum(score, cfg.floor))
    return score, inside


def prepare_raters(
    trajectories: Sequence[Any], scores: Sequence[float], cfg: RFSConfig = RFSConfig()
) -> tuple[np.ndarray, np.ndarray] | None:
    """Valid raters of a row on the scoring grid, padded to ``cfg.num_raters``; None if none.

    Invalid raters (empty trajectory, score < 0; WOD-E2E marks them -1) are dropped first.
    Raises ValueError for anything else a valid rater cannot be: a score that is NaN or
    above ``cfg.max_score``, or a trajectory with non-finite points.
    """
    if len(trajectories) != len(scores):
        raise ValueError(f"{len(trajectories)} preference trajectories but {len(scores)} scores")
    keep = []
    for j, (t, s) in enumerate(zip(trajectories, scores, strict=True)):
        if t is None or not len(t) or s is None or float(s) < 0.0:
            continue
        traj, score = np.asarray(t, dtype=np.float64).reshape(-1, 2), float(s)
        if not score <= cfg.max_score:  # NaN fails too
            raise ValueError(f"preference score {j} is {score}, expected -1 (invalid) or 0..{cfg.max_score}")
        if not np.isfinite(traj).all():
            raise ValueError(f"preference trajectory {j} holds NaN/inf points")
        keep.append((traj, score))
    if not keep:
        return None
    keep = keep[: cfg.num_raters]
    keep += [keep[-1]] * (cfg.num_raters - len(keep))
    trajs = np.stack([resample(t, 1.0 / cfg.rater_hz, cfg.grid_hz, cfg.length_s) for t, _ in keep])
    return trajs, np.array([s for _, s in keep])


@dataclass(frozen=True, slots=True)
class RaterFeedbackReward:
    """RFS of each completion's trajectory, divided by 10 so it lies in [0, 1].

    NaN (not applicable) for rows without valid preference trajectories and for
    malformed completions (the format term scores those).
    """

    config: RFSConfig = RFSConfig()
    name: str = "rfs"
    columns: tuple[str, ...] = ("sample_id", "velocity", "preference_trajectories", "preference_scores")

    def __call__(self, items: Sequence[RewardItem]) -> np.ndarray:
        cfg = self.config
        out = np.full(len(items), np.nan)
        cache: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}  # G items share one row
        for i, (row, comp) in enumerate(items):
            if comp.trajectory is None:
                continue
            key = id(row)
            if key not in cache:
                cache[key] = _row_raters(row, cfg)
            prepared = cache[key]
            if prepared is None:
                continue
            raters, scores = prepared
            pred = resample(np.asarray(comp.trajectory)[:, :2], cfg.prediction_dt, cfg.grid_hz, cfg.length_s)
            score, _ = rater_feedback_score(pred[None], raters, scores, current_speed(row), cfg)
            out[i] = float(score[0]) / cfg.max_score
        return out


def _row_raters(row: Mapping[str, Any], cfg: RFSConfig) -> tuple[np.ndarray, np.ndarray] | None:
    trajs, scores = row.get("preference_trajectories"), row.get("preference_scores")
    if trajs is None or scores is None:
        return None
    try:
        return prepare_raters(trajs, scores, cfg)
    except ValueError as exc:
        raise RewardError(f"rfs: sample {row.get('sample_id')!r}: {exc}") from None

"""Open-loop planning metrics computed the way each benchmark computes them.

Inputs: per sample the predicted trajectory ``(10,3)`` (x, y, heading at
0.5 s steps, ego frame at t0; None when the output was malformed), the
logged future ``(10,3)`` and the row's labelled ``objects``.

nuScenes open-loop planning (L2 and collision at 1/2/3 s), two conventions:

* **UniAD** (OpenDriveLab/UniAD,
  ``projects/mmdet3d_plugin/uniad/dense_heads/planning_head_plugin/planning_metrics.py``):
  per future step, L2 = ||pred_xy - gt_xy|| and a box-collision flag;
  ``compute()`` divides the per-step sums by the number of samples and the
  reported "at t" value is the step at t (1 s = step 2 of 0.5 s steps).
  Steps where the *logged* trajectory itself collides are not counted
  (``m2 = ~gt_box_coll``), and the sum is still divided by all samples.
* **ST-P3** (OpenDriveLab/ST-P3, the same ``PlanningMetric``; the table
  averages the per-step values over every step up to t: "L2 (avg)" / "Col.
  (avg)", as VAD/GenAD report ``plan_L2_stp3``): value at t = mean of the
  per-step values of steps 1..t.

Shortcut, stated: UniAD/ST-P3 test collision on BEV occupancy rasters of the
ground-truth future (0.5 m cells) with a 4.084 m x 1.85 m ego box 0.5 m
ahead of the origin; we test oriented boxes of the labelled objects moved at
constant velocity (``training.rewards.trajectory``) with the same ego box.
Rows without ``objects`` (e.g. WOD-E2E) have no collision figure.

WOD-E2E: RFS with ``training.rewards.rfs.rater_feedback_score`` (matches
Waymo's code) on rows with rater trajectories; ADE at 3 s / 5 s (mean L2 over
the steps up to t).

Malformed outputs have no trajectory: they are counted in the format rate and
left out of the trajectory metrics (reported as ``n`` per metric).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from schemas.sample import MODEL_DT

NUSCENES_HORIZONS_S = (1, 2, 3)
WOD_HORIZONS_S = (3, 5)
# UniAD's PlanningMetric ego box: W = 1.85 m, H = 4.084 m, centre 0.5 m ahead of the origin.
UNIAD_EGO_LENGTH = 4.084
UNIAD_EGO_WIDTH = 1.85
UNIAD_EGO_OFFSET = 0.5


def step_index(seconds: float) -> int:
    """Number of 0.5 s steps in ``seconds`` (1 s -> 2)."""
    return int(round(seconds / MODEL_DT))


def l2_per_step(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``(T,)`` position errors (m)."""
    p = np.asarray(pred, np.float64).reshape(-1, 3)[:, :2]
    g = np.asarray(gt, np.float64).reshape(-1, 3)[:, :2]
    return np.linalg.norm(p - g, axis=1)


def collision_per_step(traj: np.ndarray, objects: Sequence[Mapping[str, Any]], dt: float = MODEL_DT) -> np.ndarray:
    """``(T,)`` bool: the UniAD-sized ego box at step t overlaps an object's box at step t."""
    from pipelines.geometry import box_corners
    from training.rewards.trajectory import boxes_overlap, object_boxes

    t = np.asarray(traj, np.float64).reshape(-1, 3).copy()
    if not len(objects):
        return np.zeros(len(t), bool)
    times = dt * np.arange(1, len(t) + 1)
    t[:, 0] += UNIAD_EGO_OFFSET * np.cos(t[:, 2])
    t[:, 1] += UNIAD_EGO_OFFSET * np.sin(t[:, 2])
    ego = box_corners(t, UNIAD_EGO_LENGTH, UNIAD_EGO_WIDTH)  # (T,4,2)
    hit = boxes_overlap(ego[None], object_boxes(objects, times))  # (N,T)
    return hit.any(0)


def nuscenes_planning(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """L2 and collision rate at 1/2/3 s, UniAD (at t) and ST-P3 (average up to t) conventions.

    ``samples``: dicts with ``pred`` (10,3), ``future`` (10,3) and ``objects`` (list or None).
    """
    l2 = np.stack([l2_per_step(s["pred"], s["future"]) for s in samples]) if samples else np.zeros((0, 10))
    out: dict[str, Any] = {"n": len(samples)}
    with_obj = [s for s in samples if s.get("objects") is not None]
    col = np.zeros((len(with_obj), l2.shape[1]))
    for i, s in enumerate(with_obj):
        gt_col = collision_per_step(s["future"], s["objects"])
        col[i] = collision_per_step(s["pred"], s["objects"]) & ~gt_col  # UniAD: m2 = ~gt_box_coll
    out["n_collision"] = len(with_obj)
    for h in NUSCENES_HORIZONS_S:
        t = step_index(h)
        out[f"l2_{h}s_uniad"] = float(l2[:, t - 1].mean()) if len(l2) else None
        out[f"l2_{h}s_stp3"] = float(l2[:, :t].mean()) if len(l2) else None
        out[f"collision_{h}s_uniad"] = float(col[:, t - 1].mean()) if len(col) else None
        out[f"collision_{h}s_stp3"] = float(col[:, :t].mean()) if len(col) else None
    for conv in ("uniad", "stp3"):
        vals = [out[f"l2_{h}s_{conv}"] for h in NUSCENES_HORIZONS_S]
        out[f"l2_avg_{conv}"] = float(np.mean(vals)) if len(l2) else None
        cols = [out[f"collision_{h}s_{conv}"] for h in NUSCENES_HORIZONS_S]
        out[f"collision_avg_{conv}"] = float(np.mean(cols)) if len(col) else None
    return out


def _completion(pred: Any) -> Any:
    from training.rewards.base import Completion

    return Completion(text="", think_mode="fast", reasoning="", action_ids=None,
                      trajectory=np.asarray(pred, np.float64), format_error=None, num_tokens=0, truncated=False)


def wod_e2e(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """RFS on the 0-10 scale (rows with rater trajectories) and ADE at 3 s / 5 s.

    ``samples``: dicts with ``pred``, ``future`` and ``row`` (velocity + preference columns).
    """
    from training.rewards.rfs import RaterFeedbackReward

    out: dict[str, Any] = {"n": len(samples)}
    l2 = np.stack([l2_per_step(s["pred"], s["future"]) for s in samples]) if samples else np.zeros((0, 10))
    for h in WOD_HORIZONS_S:
        out[f"ade_{h}s"] = float(l2[:, : step_index(h)].mean()) if len(l2) else None
    reward = RaterFeedbackReward()
    vals = np.asarray(reward([(s["row"], _completion(s["pred"])) for s in samples]), np.float64) \
        if samples else np.zeros(0)
    ok = ~np.isnan(vals)
    out["n_rfs"] = int(ok.sum())
    out["rfs"] = float(vals[ok].mean() * reward.config.max_score) if ok.any() else None  # Waymo's 0-10 scale
    return out


def navsim_pdms(samples: Sequence[Mapping[str, Any]], metric_cache: str) -> dict[str, Any]:
    """NAVSIM PDM score through ``navsim`` (``MissingDependencyError`` naming what is missing otherwise)."""
    from training.rewards.navsim_pdm import NavsimPDMReward

    reward = NavsimPDMReward(metric_cache=metric_cache)
    vals = np.asarray(reward([(s["row"], _completion(s["pred"])) for s in samples]), np.float64) \
        if samples else np.zeros(0)
    ok = ~np.isnan(vals)
    return {"n": int(ok.sum()), "pdms": float(vals[ok].mean()) if ok.any() else None}

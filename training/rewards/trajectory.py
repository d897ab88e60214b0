"""Rewards from the logged future and the labelled objects: L2/ADE and collision.

Collision test: the ego box (4.8 m x 2.0 m, centred on the predicted pose,
as the codebook contour) at each predicted step against every labelled
object's box extrapolated at constant velocity from t0 (heading kept), by
the separating-axis theorem on oriented rectangles. The ego pose convention
(box centred on the pose) is the codebook's; objects are boxes centred on
their (x, y).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.geometry import VEHICLE_LENGTH, VEHICLE_WIDTH, box_corners
from training.rewards.base import RewardError, RewardItem

# Rear axle (the datasets' ego origin) to the centre of a 4.8 m car with a ~2.9 m wheelbase.
EGO_CENTER_OFFSET = 1.4  # m



@dataclass(frozen=True, slots=True)
class ADEReward:
    """Reward from the average displacement error to the logged future.

    ``mode="exp"``: exp(-ADE / scale); ``mode="linear"``: 1 - clip(ADE / max_ade, 0, 1).
    NaN for rows without a future (test splits) and malformed completions.
    """

    mode: str = "exp"
    scale: float = 2.0  # m
    max_ade: float = 5.0  # m
    name: str = "ade"
    columns: tuple[str, ...] = ("sample_id", "future")

    def __post_init__(self) -> None:
        if self.mode not in ("exp", "linear"):
            raise ValueError(f"ade: mode must be 'exp' or 'linear', got {self.mode!r}")

    def __call__(self, items: Sequence[RewardItem]) -> np.ndarray:
        out = np.full(len(items), np.nan)
        for i, (row, comp) in enumerate(items):
            fut = row.get("future")
            if comp.trajectory is None or fut is None:
                continue
            gt = np.asarray(fut, dtype=np.float64).reshape(-1, 3)[:, :2]
            pred = np.asarray(comp.trajectory, dtype=np.float64)[:, :2]
            if pred.shape != gt.shape:
                raise RewardError(
                    f"ade: sample {row.get('sample_id')!r}: prediction has {len(pred)} poses, future {len(gt)}"
                )
            ade = float(np.linalg.norm(pred - gt, axis=-1).mean())
            if self.mode == "exp":
                out[i] = float(np.exp(-ade / self.scale))
            else:
                out[i] = 1.0 - min(ade / self.max_ade, 1.0)
        return out


def boxes_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Separating-axis test of oriented rectangles ``a (...,4,2)`` vs ``b (...,4,2)`` (broadcast).

    True where the boxes intersect (touching counts). Axes: the two edge
    normals of each rectangle.
    """
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    axes = np.concatenate([_edge_normals(a), _edge_normals(b)], axis=-2)  # (...,4,2)
    pa = np.einsum("...kd,...ad->...ak", a, axes)  # (...,4 axes,4 corners)
    pb = np.einsum("...kd,...ad->...ak", b, axes)
    separated = (pa.max(-1) < pb.min(-1)) | (pb.max(-1) < pa.min(-1))
    return ~separated.any(-1)


def _edge_normals(c: np.ndarray) -> np.ndarray:
    e = np.stack([c[..., 1, :] - c[..., 0, :], c[..., 3, :] - c[..., 0, :]], axis=-2)  # two edges
    return np.stack([-e[..., 1], e[..., 0]], axis=-1)


def object_boxes(objects: Sequence[Mapping[str, Any]], times: np.ndarray) -> np.ndarray:
    """Corners ``(N,T,4,2)`` of objects moved at constant velocity to ``times (T,)`` seconds."""
    n = len(objects)
    out = np.empty((n, len(times), 4, 2))
    for j, o in enumerate(objects):
        # Unknown velocity (vx = vy = null, e.g. a nuScenes object annotated once): held static.
        vx, vy = (0.0, 0.0) if o.get("vx") is None and o.get("vy") is None else (o["vx"], o["vy"])
        vals = [o["x"], o["y"], vx, vy, o["heading"], o["length"], o["width"]]
        if any(v is None or not np.isfinite(float(v)) for v in vals):
            # NaN boxes are never separated by SAT, so they would count as a collision
            raise RewardError(f"object {j} ({o.get('category')!r}, track {o.get('track_id')!r}) has a null/NaN box field")
        x = float(o["x"]) + float(vx) * times
        y = float(o["y"]) + float(vy) * times
        poses = np.stack([x, y, np.full_like(times, float(o["heading"]))], axis=-1)
        out[j] = box_corners(poses, float(o["length"]), float(o["width"]))
    return out


def collides(
    trajectory: np.ndarray,
    objects: Sequence[Mapping[str, Any]],
    dt: float = 0.5,
    ego_length: float = VEHICLE_LENGTH,
    ego_width: float = VEHICLE_WIDTH,
    center_offset: float = EGO_CENTER_OFFSET,
) -> bool:
    """Whether the ego box along ``trajectory (T,3)`` overlaps any object's box at the same step.

    Poses are of the ego origin (the rear axle in WOD-E2E, nuScenes and nuPlan);
    the box centre lies ``center_offset`` metres ahead of it along the heading.
    """
    if not len(objects):
        return False
    traj = np.asarray(trajectory, dtype=np.float64).reshape(-1, 3).copy()
    times = dt * np.arange(1, len(traj) + 1)
    traj[:, 0] += center_offset * np.cos(traj[:, 2])
    traj[:, 1] += center_offset * np.sin(traj[:, 2])
    ego = box_corners(traj, ego_length, ego_width)  # (T,4,2)
    return bool(boxes_overlap(ego[None], object_boxes(objects, times)).any())


@dataclass(frozen=True, slots=True)
class CollisionReward:
    """1.0 when the predicted trajectory hits no labelled object, else 0.0.

    NaN for rows without an ``objects`` column (e.g. WOD-E2E) and malformed
    completions. Use it as a weighted term or as a gate (see the runner).
    ``categories`` limits the objects considered (empty = all).
    """

    dt: float = 0.5
    ego_length: float = VEHICLE_LENGTH
    ego_width: float = VEHICLE_WIDTH
    center_offset: float = EGO_CENTER_OFFSET
    categories: tuple[str, ...] = ()
    name: str = "collision"
    columns: tuple[str, ...] = ("sample_id", "objects")

    def __call__(self, items: Sequence[RewardItem]) -> np.ndarray:
        out = np.full(len(items), np.nan)
        for i, (row, comp) in enumerate(items):
            objs = row.get("objects")
            if comp.trajectory is None or objs is None:
                continue
            if self.categories:
                objs = [o for o in objs if o.get("category") in self.categories]
            try:
                hit = collides(comp.trajectory, objs, self.dt, self.ego_length, self.ego_width, self.center_offset)
            except (RewardError, KeyError, TypeError, ValueError) as exc:
                raise RewardError(f"collision: sample {row.get('sample_id')!r}: {exc!r}") from exc
            out[i] = 0.0 if hit else 1.0
        return out

"""Which samples get slow thinking: a complexity score with reasons (DESIGN.md section 6).

Each reason adds a weight to the score. ``mode: threshold`` marks samples
with ``score >= threshold`` slow; ``mode: fraction`` marks the top
``slow_fraction`` of a whole dataset slow, which needs one cheap pass over the
label columns first (:func:`fit_cutoff`). Ties are broken by a hash of the
sample id, so the decision is deterministic and independent of row order and
partitioning.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from annotators.config import SelectionConfig
from schemas.enums import Command, Lateral, Longitudinal, ThinkMode

# Columns the scorer reads (no images), for a cheap first pass.
SELECTION_COLUMNS = (
    "sample_id",
    "command",
    "meta_lateral",
    "meta_longitudinal",
    "future",
    "velocity",
    "acceleration",
    "objects",
)

_WEIGHTS = {
    "lateral": 1.0,
    "longitudinal": 1.0,
    "command": 1.0,
    "close_object": 0.5,
    "conflict": 1.5,
    "curvature": 1.0,
    "braking": 1.0,
    "hard_scenario": 2.0,
}
_TRIVIAL_LON = {Longitudinal.CONSTANT.value, Longitudinal.STOP.value}


@dataclass(frozen=True, slots=True)
class Complexity:
    score: float
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Cutoff:
    """Samples ranked at or above ``(score, tiebreak)`` are slow."""

    score: float
    tiebreak: float

    def is_slow(self, score: float, sample_id: str) -> bool:
        return (score, tiebreak(sample_id)) >= (self.score, self.tiebreak)


def tiebreak(sample_id: str) -> float:
    """A stable pseudo-random number in [0, 1) per sample id."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2.0**64


def score_complexity(row: Mapping[str, Any], cfg: SelectionConfig) -> Complexity:
    """Score one sample; each reason is ``kind:detail`` (e.g. ``close_object:pedestrian@6.1m``)."""
    reasons: list[str] = []
    lat, lon = row.get("meta_lateral"), row.get("meta_longitudinal")
    if lat and lat not in (Lateral.MOVE_FORWARD.value, Lateral.NONE.value):
        reasons.append(f"lateral:{lat}")
    if lon and lon not in _TRIVIAL_LON:
        reasons.append(f"longitudinal:{lon}")
    cmd = row.get("command")
    if cmd and cmd not in (Command.STRAIGHT.value, Command.UNKNOWN.value):
        reasons.append(f"command:{cmd}")

    future = row.get("future")
    fut = None if future is None else np.asarray(future, dtype=np.float64).reshape(-1, 3)
    if fut is not None and len(fut):
        turn = abs(math.remainder(float(fut[-1, 2]), 2 * math.pi))
        if turn > cfg.curvature_rad:
            reasons.append(f"curvature:{turn:.2f}rad")
        decel = _max_decel(fut)
        if decel > cfg.braking_mps2:
            reasons.append(f"braking:{decel:.1f}mps2")
    acc = row.get("acceleration")
    if (
        acc is not None
        and -float(acc[0]) > cfg.braking_mps2
        and not any(r.startswith("braking") for r in reasons)
    ):
        reasons.append(f"braking:{-float(acc[0]):.1f}mps2")

    reasons.extend(_object_reasons(row.get("objects") or (), fut, cfg))
    scenario = row.get(cfg.scenario_column)
    if scenario and str(scenario).lower() in cfg.hard_scenarios:
        reasons.append(f"hard_scenario:{str(scenario).lower()}")
    score = sum(_WEIGHTS[r.split(":", 1)[0]] for r in reasons)
    return Complexity(score=float(score), reasons=tuple(reasons))


def _max_decel(fut: np.ndarray) -> float:
    """Largest mean deceleration over 1 s windows of the 2 Hz future.

    Speeds come from the future alone (segments from the origin on), not from
    ``velocity``: mixing a sensor speed with chord speeds fakes braking on curves.
    """
    xy = np.vstack([np.zeros((1, 2)), fut[:, :2]])
    speed = np.linalg.norm(np.diff(xy, axis=0), axis=1) / 0.5
    if len(speed) < 3:
        return 0.0
    return float(np.max(speed[:-2] - speed[2:]) / 1.0)


def _object_reasons(
    objects: Iterable[Mapping[str, Any]], fut: np.ndarray | None, cfg: SelectionConfig
) -> list[str]:
    close: tuple[float, str] | None = None
    conflict: tuple[float, str] | None = None
    times = np.arange(1, 11) * 0.5
    times = times[times <= cfg.conflict_horizon_s + 1e-9]
    for obj in objects:
        x, y = float(obj["x"]), float(obj["y"])
        dist = math.hypot(x, y)
        cat = str(obj.get("category") or "object")
        if dist < cfg.close_distance_m and (close is None or dist < close[0]):
            close = (dist, cat)
        if fut is None or len(fut) < len(times):
            continue
        ox = x + float(obj.get("vx") or 0.0) * times
        oy = y + float(obj.get("vy") or 0.0) * times
        gap = np.hypot(ox - fut[: len(times), 0], oy - fut[: len(times), 1])
        k = int(np.argmin(gap))
        if gap[k] < cfg.conflict_distance_m and (conflict is None or times[k] < conflict[0]):
            conflict = (float(times[k]), cat)
    out = []
    if close is not None:
        out.append(f"close_object:{close[1]}@{close[0]:.1f}m")
    if conflict is not None:
        out.append(f"conflict:{conflict[1]}@{conflict[0]:.1f}s")
    return out


def fit_cutoff(scored: Iterable[tuple[str, float]], cfg: SelectionConfig) -> Cutoff:
    """The cutoff for ``cfg`` over all ``(sample_id, score)`` pairs of a dataset."""
    if cfg.mode == "threshold":
        return Cutoff(cfg.threshold, 0.0)
    ranked = sorted(((s, tiebreak(sid)) for sid, s in scored), reverse=True)
    n_slow = int(round(cfg.slow_fraction * len(ranked)))
    if n_slow == 0:
        return Cutoff(math.inf, 0.0)
    return Cutoff(*ranked[n_slow - 1])


def decide(
    row: Mapping[str, Any], cfg: SelectionConfig, cutoff: Cutoff
) -> tuple[str, list[str], float]:
    """``(think_mode, think_reasons, score)`` for one row.

    Fast samples keep their (sub-threshold) reasons too; a slow sample without any reason cannot happen in threshold mode and, in
    fraction mode, is labelled ``rank:fraction`` so the record says why.
    """
    c = score_complexity(row, cfg)
    slow = cutoff.is_slow(c.score, row["sample_id"])
    reasons = list(c.reasons)
    if slow and not reasons:
        reasons = ["rank:fraction"]
    return (ThinkMode.SLOW.value if slow else ThinkMode.FAST.value), reasons, c.score

"""The reward interface: a named, batched, pure function of (row, completion) pairs.

A reward is any object with a ``name``, the ``columns`` of the sample row it
reads, and ``__call__(items) -> np.ndarray`` returning one float per item.
Conventions every reward follows:

* Driving rewards are in [0, 1], higher is better.
* ``NaN`` means *not applicable* (the row lacks what the reward needs, e.g. no
  preference trajectories on a nuScenes row). It is not a failure: the
  combination in :mod:`training.rewards.runner` re-weights over the rewards
  that apply.
* A failure is an exception. The runner catches it, isolates the failing
  items, counts them and marks their total reward invalid (excluded from the
  loss); it never turns a failure into a score.

Rewards must be picklable (plain dataclasses) so a process pool can run them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from schemas.enums import ThinkMode

# Columns of the unified sample any reward may read; rows handed to reward
# workers are cut down to these so images never cross a process boundary.
REWARD_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "dataset",
    "future",
    "velocity",
    "acceleration",
    "command",
    "preference_trajectories",
    "preference_scores",
    "objects",
)


@dataclass(frozen=True, slots=True)
class Completion:
    """One sampled completion, parsed and decoded for scoring.

    ``trajectory`` is ``None`` exactly when the completion is malformed
    (``format_error`` says why); driving rewards then do not score it and the
    format term penalises it.
    """

    text: str  # the generated text (special tokens kept)
    think_mode: str  # ThinkMode value: "slow" when a reasoning part is present
    reasoning: str  # the chain of thought ("" for fast thinking)
    action_ids: tuple[int, ...] | None  # codebook indices after the answer tag
    trajectory: np.ndarray | None  # (10,3) x m, y m, heading rad; ego frame at t0; decoded ids
    format_error: str | None  # None when exactly 10 valid action tokens follow the answer tag
    num_tokens: int  # generated tokens (special tokens included)
    truncated: bool  # generation hit max_new_tokens without end of sequence

    @property
    def is_slow(self) -> bool:
        return self.think_mode == ThinkMode.SLOW.value


RewardItem = tuple[Mapping[str, Any], Completion]


@runtime_checkable
class Reward(Protocol):
    """A batched reward: ``reward(items)`` -> ``(len(items),)`` float array."""

    name: str
    columns: tuple[str, ...]

    def __call__(self, items: Sequence[RewardItem]) -> np.ndarray: ...


class RewardError(RuntimeError):
    """A reward could not score an item; the message names the reward, sample and cause."""


class RewardBudgetExceeded(RuntimeError):
    """More reward failures than the configured budget allows."""


def slim_row(row: Mapping[str, Any], columns: Sequence[str] = REWARD_COLUMNS) -> dict[str, Any]:
    """The subset of ``row`` rewards read (missing columns become ``None``)."""
    return {c: row.get(c) for c in columns}


def current_speed(row: Mapping[str, Any]) -> float:
    """|velocity| of the ego at t0, m/s."""
    v = row.get("velocity")
    if v is None:
        raise RewardError(f"sample {row.get('sample_id')!r}: no 'velocity' column")
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    if v.shape != (2,) or not np.isfinite(v).all():
        # a NaN speed would make every score NaN, which reads as "not applicable"
        raise RewardError(f"sample {row.get('sample_id')!r}: velocity {v.tolist()} is not a finite 2-vector")
    return float(np.hypot(v[0], v[1]))

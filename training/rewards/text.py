"""Rewards on the completion text: the format term and the chain-of-thought length penalty."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.rewards.base import RewardItem


@dataclass(frozen=True, slots=True)
class FormatReward:
    """0 when exactly 10 valid action tokens follow the answer tag, else ``-penalty``.

    Malformed outputs are never padded or truncated into a trajectory; the
    parser's reason is logged by the trainer (``format_error``).
    """

    penalty: float = 1.0
    name: str = "format"
    columns: tuple[str, ...] = ("sample_id",)

    def __call__(self, items: Sequence[RewardItem]) -> np.ndarray:
        return np.array([0.0 if c.format_error is None else -self.penalty for _, c in items])


@dataclass(frozen=True, slots=True)
class CoTPenalty:
    """Length penalty for slow-thinking completions: weight * sigmoid(coef * (length - center)).

    Fast-thinking completions get 0. ``unit="chars"`` measures the reasoning
    text in characters (AutoVLA's reference: weight 0.3, coef 0.002, center
    400); ``unit="tokens"`` uses the completion's generated token count.
    Returned as a positive number; the runner subtracts it.
    """

    weight: float = 0.3
    coef: float = 0.002
    center: float = 400.0
    unit: str = "chars"
    name: str = "cot_penalty"
    columns: tuple[str, ...] = ("sample_id",)

    def __post_init__(self) -> None:
        if self.unit not in ("chars", "tokens"):
            raise ValueError(f"cot_penalty: unit must be 'chars' or 'tokens', got {self.unit!r}")

    def __call__(self, items: Sequence[RewardItem]) -> np.ndarray:
        out = np.zeros(len(items))
        for i, (_, c) in enumerate(items):
            if not c.is_slow:
                continue
            length = len(c.reasoning) if self.unit == "chars" else c.num_tokens
            out[i] = self.weight / (1.0 + math.exp(-self.coef * (length - self.center)))
        return out

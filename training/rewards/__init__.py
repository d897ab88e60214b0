"""Rewards for GRPO: one batched interface, run in a CPU worker pool, failures counted.

Public API:

* :class:`Reward` (protocol), :class:`Completion`, :class:`RewardError`,
  :class:`RewardBudgetExceeded` - the interface (``base``);
* :class:`RaterFeedbackReward` / :func:`rater_feedback_score` - WOD-E2E RFS (``rfs``);
* :class:`ADEReward`, :class:`CollisionReward`, :func:`collides` (``trajectory``);
* :class:`NavsimPDMReward`, :class:`MissingDependencyError` (``navsim_pdm``);
* :class:`FormatReward`, :class:`CoTPenalty` (``text``);
* :class:`RewardsConfig`, :class:`RewardRunner`, :class:`RewardResult`,
  :func:`register_reward` (plug in a reward by name), :func:`build_rewards` (``runner``).
"""

from training.rewards.base import (
    Completion,
    Reward,
    RewardBudgetExceeded,
    RewardError,
    RewardItem,
)
from training.rewards.navsim_pdm import MissingDependencyError, NavsimPDMReward
from training.rewards.rfs import RaterFeedbackReward, RFSConfig, rater_feedback_score
from training.rewards.runner import (
    REGISTRY,
    RewardResult,
    RewardRunner,
    RewardsConfig,
    build_rewards,
    register_reward,
)
from training.rewards.text import CoTPenalty, FormatReward
from training.rewards.trajectory import ADEReward, CollisionReward, boxes_overlap, collides

__all__ = [
    "REGISTRY",
    "ADEReward",
    "CoTPenalty",
    "CollisionReward",
    "Completion",
    "FormatReward",
    "MissingDependencyError",
    "NavsimPDMReward",
    "RFSConfig",
    "RaterFeedbackReward",
    "Reward",
    "RewardBudgetExceeded",
    "RewardError",
    "RewardItem",
    "RewardResult",
    "RewardRunner",
    "RewardsConfig",
    "boxes_overlap",
    "build_rewards",
    "collides",
    "rater_feedback_score",
    "register_reward",
]

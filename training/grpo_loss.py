"""GRPO objective: group-normalised advantages and the clipped, token-level loss.

* Advantages: per scene, the G rewards minus their mean, divided by their
  standard deviation (``scale_by_std=True``, GRPO) or not (Dr. GRPO,
  arXiv:2503.20783). Failed rewards (NaN) are left out of the group statistics
  and of the loss.
* Zero-spread policy (documented, as TRL's GRPOTrainer does it): a group whose
  valid rewards have no spread (or fewer than two valid members) gets
  advantage 0 but is *kept*: its completions stay in the token normaliser and
  in the KL term (with ``kl_beta`` > 0 they still pull towards the reference),
  they only carry no policy-gradient signal. ``zero_spread_groups`` counts
  them; the trainer logs ``sequences_trained`` (in the loss) and
  ``sequences_with_signal`` (non-zero advantage), the effective batch.
* Loss: PPO's clipped surrogate per token with the ratio to the stored old
  log-probs (``num_iterations`` updates per rollout batch), optional
  ``beta * KL`` to the reference policy with the k3 estimator
  (exp(ref - logp) - (ref - logp) - 1, Schulman 2020), summed over every valid
  completion token of the batch and divided by their count (token-level
  normalisation, as in DAPO, arXiv:2503.14476), so long completions are not
  down-weighted per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0


@dataclass(frozen=True)
class GroupAdvantages:
    advantages: np.ndarray  # (N,) 0 where not valid or in a zero-spread group
    valid: np.ndarray  # (N,) bool: completion enters the loss (valid reward; zero-spread groups included)
    signal: np.ndarray  # (N,) bool: valid and in a group with reward spread (non-zero advantage)
    zero_spread_groups: int  # groups without reward spread (or < 2 valid rewards): advantage 0, kept
    num_groups: int


def group_advantages(
    rewards: np.ndarray, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-6
) -> GroupAdvantages:
    """Advantages of ``rewards (N,)`` laid out as consecutive groups of ``group_size``."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or len(r) % group_size:
        raise ValueError(f"{len(r)} rewards do not split into groups of {group_size}")
    groups = r.reshape(-1, group_size)
    ok = ~np.isnan(groups)
    count = ok.sum(1)
    filled = np.where(ok, groups, 0.0)
    mean = filled.sum(1) / np.maximum(count, 1)
    var = np.where(ok, (groups - mean[:, None]) ** 2, 0.0).sum(1) / np.maximum(count - 1, 1)
    std = np.sqrt(var)
    spread = np.where(ok, groups, -np.inf).max(1) - np.where(ok, groups, np.inf).min(1)
    keep = (count >= 2) & (spread > eps)
    adv = groups - mean[:, None]
    if scale_by_std:
        adv = adv / (std[:, None] + eps)
    signal = ok & keep[:, None]
    adv = np.where(signal, adv, 0.0)
    return GroupAdvantages(adv.reshape(-1), ok.reshape(-1), signal.reshape(-1), int((~keep).sum()), len(groups))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position from ``logits (N,T,V)`` and ``targets (N,T)``; fp32, row by row.

    Row by row so the (T, V) fp32 log-softmax of a 150k-entry vocabulary is
    never held for the whole batch at once.
    """
    out = []
    for lg, tg in zip(logits, targets, strict=True):
        lg = lg.float()
        out.append(lg.gather(-1, tg.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.stack(out)


@dataclass(frozen=True)
class LossConfig:
    """``loss:`` section of the RFT config."""

    clip_low: float = 0.2  # ratio lower bound 1 - clip_low
    clip_high: float = 0.2  # ratio upper bound 1 + clip_high (DAPO's clip-higher uses 0.28)
    kl_beta: float = 0.0  # weight of the k3 KL to the reference (LoRA adapter disabled)
    scale_by_std: bool = True  # False = Dr. GRPO (no division by the group std)
    mask_truncated: bool = True  # completions that hit max_new_tokens do not enter the loss
    num_iterations: int = 1  # policy updates per rollout batch (>1 uses the stored old log-probs)
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.num_iterations < 1:
            raise ValueError(f"loss.num_iterations must be >= 1, got {self.num_iterations}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError("loss.clip_low must be in [0, 1) and loss.clip_high >= 0")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    ref_logp: torch.Tensor | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO loss over completion tokens.

    ``logp``, ``old_logp``, ``ref_logp`` and ``mask`` are ``(N,T)``;
    ``advantages`` is ``(N,)``. ``num_tokens`` is the normaliser (the valid
    token count of the *whole* optimisation batch when the batch is split
    into micro-batches or ranks; default: ``mask.sum()`` here). Returns the
    loss and detached sums for logging (divide by the token count).
    """
    mask = mask.to(logp.dtype)
    denom = torch.as_tensor(num_tokens if num_tokens is not None else mask.sum().clamp(min=1.0))
    adv = advantages.to(logp.dtype)[:, None]
    # Clamps as EasyR1 (verl/trainer/core_algos.py): the log-ratio to [-20, 20] before exp
    # (no inf/NaN gradients), the k3 term's log-ratio to [-20, 20] and k3 itself to [-10, 10].
    ratio = torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped = torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    stats: dict[str, torch.Tensor] = {}
    if cfg.kl_beta > 0:
        if ref_logp is None:
            raise ValueError("loss.kl_beta > 0 needs the reference log-probs")
        d = torch.clamp(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.clamp(torch.exp(d) - d - 1.0, -KL_CLAMP, KL_CLAMP)
        per_token = per_token + cfg.kl_beta * kl
        stats["kl_sum"] = (kl * mask).sum().detach()
    loss = (per_token * mask).sum() / denom
    with torch.no_grad():
        low = (ratio < 1.0 - cfg.clip_low) & (adv < 0)  # tokens where clipping removes the gradient
        high = (ratio > 1.0 + cfg.clip_high) & (adv > 0)
        stats["clip_low_sum"] = (low.to(mask.dtype) * mask).sum()
        stats["clip_high_sum"] = (high.to(mask.dtype) * mask).sum()
        stats["ratio_sum"] = (ratio * mask).sum()
        stats["tokens"] = mask.sum()
    return loss, stats

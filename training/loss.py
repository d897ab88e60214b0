"""SFT loss: weighted token CE on the assistant span + lambda_a * weighted CE on the action tokens.

Exact normalisation. For one optimizer step let the *global batch* be every
micro-batch on every rank in that step (``grad_accum * world_size``
micro-batches). Sample ``i`` has weight ``w_i`` (``slow_weight`` if its target
is slow thinking, else 1), assistant-span tokens ``S_i`` (the labelled
positions: the assistant text plus ``<|im_end|>``) and action tokens
``A_i`` (labelled positions whose target is an ``<action_k>`` id). With
``ce_it`` the next-token cross entropy at position ``t``::

    L = sum_i w_i sum_{t in S_i} ce_it / sum_i w_i |S_i|
        + lambda_a * sum_i w_i sum_{t in A_i} ce_it / sum_i w_i |A_i|

both sums over the whole global batch. Each micro-batch contributes its
numerators divided by the *global* denominators (computed from the labels of
all micro-batches of the step and all-reduced across ranks before the first
forward), so the accumulated gradient is the gradient of ``L`` regardless of
how samples are split across micro-batches and ranks. DDP/FSDP average
gradients over ranks, so the trainer multiplies each micro-batch loss by
``world_size`` to turn the average back into the sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class Denominators:
    """Global ``sum_i w_i |S_i|`` and ``sum_i w_i |A_i|`` of one optimizer step."""

    lm: float
    action: float


def sample_weights(is_slow: torch.Tensor, slow_weight: float) -> torch.Tensor:
    return torch.where(is_slow, torch.tensor(float(slow_weight)), torch.tensor(1.0))


def action_mask(labels: torch.Tensor, first_action_id: int, num_action_tokens: int) -> torch.Tensor:
    return (labels >= first_action_id) & (labels < first_action_id + num_action_tokens)


def local_denominators(
    batches: Sequence[dict[str, Any]], slow_weight: float, first_action_id: int, num_action_tokens: int
) -> torch.Tensor:
    """``[sum w|S|, sum w|A|]`` over this rank's micro-batches (all-reduce it for the global value)."""
    tot = torch.zeros(2, dtype=torch.float64)
    for b in batches:
        lab = b["labels"]
        w = sample_weights(b["is_slow"], slow_weight).double()
        tot[0] += (w * (lab != IGNORE).sum(1)).sum()
        tot[1] += (w * action_mask(lab, first_action_id, num_action_tokens).sum(1)).sum()
    return tot


def keep_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (B, L): positions whose *next* token is labelled (pass as ``logits_to_keep``)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    is_slow: torch.Tensor,
    denom: Denominators,
    *,
    slow_weight: float,
    action_weight: float,
    first_action_id: int,
    num_action_tokens: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Micro-batch contribution to ``L`` and its unnormalised parts (for logging).

    ``logits`` is either full ``(B, L, V)`` or the flattened ``(N, V)`` kept
    at :func:`keep_positions` (the trainer computes only those, saving the
    vocab projection over the prompt).
    """
    keep = keep_positions(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    if logits.dim() == 3:
        logits = logits[keep]
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} kept logits for {targets.shape[0]} labelled targets")
    rows = keep.nonzero()[:, 0]
    w = sample_weights(is_slow, slow_weight).to(logits.device)[rows]
    ce = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")
    act = action_mask(targets, first_action_id, num_action_tokens).to(logits.device)
    lm_sum = (w * ce).sum()
    act_sum = (w * ce * act).sum()
    loss = lm_sum / max(denom.lm, 1e-12)
    if denom.action > 0:
        loss = loss + action_weight * act_sum / denom.action
    with torch.no_grad():
        pred = logits.argmax(-1)
        correct = (pred == targets.to(pred.device)).float()
        parts = {
            "lm_sum": lm_sum.detach(),
            "act_sum": act_sum.detach(),
            "tokens": torch.tensor(float(targets.numel())),
            "action_tokens": act.sum().float(),
            "action_correct": (correct * act).sum(),
        }
    return loss, parts

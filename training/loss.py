"""SFT loss: weighted CE on the assistant span + lambda_a * weighted CE on the action tokens.

Two weightings (``loss.weighting``), both exactly normalised over the global
batch. For one optimizer step let the *global batch* be every micro-batch on
every rank in that step (``grad_accum * world_size`` micro-batches). Sample
``i`` has weight ``w_i`` (``slow_weight`` if its target is slow thinking,
else 1), assistant-span tokens ``S_i`` (the labelled positions: the
assistant text plus ``<|im_end|>``) and action tokens ``A_i`` (labelled
positions whose target is an ``<action_k>`` id); ``ce_it`` is the next-token
cross entropy at position ``t``.

``sample`` (default; DESIGN.md section 9 and AutoVLA weight each *sample's*
loss): each sample's mean token loss, times ``w_i``, averaged over the
samples of the global batch (``N``; ``N_A`` = samples with action tokens)::

    L = 1/N sum_i w_i mean_{t in S_i} ce_it + lambda_a * 1/N_A sum_i w_i mean_{t in A_i} ce_it

A long slow-thinking sample then weighs ``w_i`` times a fast one, whatever
its length (on the demo shards slow samples carry ~92% of the LM weight).

``token`` (the earlier behaviour; selectable): every token weighted by its
sample's ``w_i``, normalised by the weighted token count, so long samples
weigh more (on the demo shards slow samples carry ~99.6% of the LM weight)::

    L = sum_i w_i sum_{t in S_i} ce_it / sum_i w_i |S_i|
        + lambda_a * sum_i w_i sum_{t in A_i} ce_it / sum_i w_i |A_i|

Each micro-batch contributes its numerators divided by the *global*
denominators (computed from the labels of all micro-batches of the step and
all-reduced across ranks before the first forward), so the accumulated
gradient is the gradient of ``L`` regardless of how samples are split across
micro-batches and ranks. DDP/FSDP average gradients over ranks, so the
trainer multiplies each micro-batch loss by ``world_size`` to turn the
average back into the sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
WEIGHTINGS = ("sample", "token")


@dataclass
class Denominators:
    """Global normalisers of one optimizer step: ``N`` and ``N_A`` (``sample``) or
    ``sum_i w_i |S_i|`` and ``sum_i w_i |A_i|`` (``token``)."""

    lm: float
    action: float


def sample_weights(is_slow: torch.Tensor, slow_weight: float) -> torch.Tensor:
    return torch.where(is_slow, torch.tensor(float(slow_weight)), torch.tensor(1.0))


def action_mask(labels: torch.Tensor, first_action_id: int, num_action_tokens: int) -> torch.Tensor:
    return (labels >= first_action_id) & (labels < first_action_id + num_action_tokens)


def local_denominators(
    batches: Sequence[dict[str, Any]], slow_weight: float, first_action_id: int, num_action_tokens: int,
    weighting: str = "sample",
) -> torch.Tensor:
    """This rank's ``[N, N_A]`` (``sample``) or ``[sum w|S|, sum w|A|]`` (``token``); all-reduce for the global."""
    _check_weighting(weighting)
    tot = torch.zeros(2, dtype=torch.float64)
    for b in batches:
        lab = b["labels"]
        n_s = (lab != IGNORE).sum(1)
        n_a = action_mask(lab, first_action_id, num_action_tokens).sum(1)
        if weighting == "sample":
            tot[0] += float((n_s > 0).sum())
            tot[1] += float((n_a > 0).sum())
        else:
            w = sample_weights(b["is_slow"], slow_weight).double()
            tot[0] += (w * n_s).sum()
            tot[1] += (w * n_a).sum()
    return tot


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss.weighting must be one of {WEIGHTINGS}, got {weighting!r}")


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
    weighting: str = "sample",
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
    _check_weighting(weighting)
    rows = keep.nonzero()[:, 0].to(logits.device)
    w = sample_weights(is_slow, slow_weight).to(logits.device)[rows]
    ce = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")
    act = action_mask(targets, first_action_id, num_action_tokens).to(logits.device)
    w_lm, w_act = w, w
    if weighting == "sample":  # token weight w_i / |S_i| (resp. / |A_i|): each sample's mean, times w_i
        n_s = torch.bincount(rows, minlength=labels.shape[0]).float()
        n_a = torch.bincount(rows, weights=act.float(), minlength=labels.shape[0])
        w_lm = w / n_s[rows]
        w_act = w / n_a[rows].clamp(min=1.0)
    lm_sum = (w_lm * ce).sum()
    act_sum = (w_act * ce * act).sum()
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

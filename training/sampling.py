"""Token sampling for rollouts: per-row seeded uniforms made on the device, nucleus without a full sort.

Each completion ``(scene, g)`` owns a 63-bit seed (``training.rollout.sample_seed``).
Decode step ``t`` of that row uses one uniform ``u = U(seed, t)`` from a
counter-based hash (murmur3's 32-bit finaliser chained over seed halves and
``t``), computed with int64 tensor ops on whatever device the logits live on:
no per-row ``torch.Generator``, no host->device copy per step, and a row's
draws never depend on its batch neighbours.

The token is the inverse CDF of the sampling distribution at ``u``:

- ``top_p == 1``: cumulative sum in vocabulary order (no sort at all);
- ``top_p < 1``: ``torch.topk`` of a growing ``k`` (64, x4 ...) until every
  row's top-k mass reaches ``top_p``, then the nucleus is the smallest sorted
  prefix with mass >= ``top_p``: the tokens and probabilities of a full sort,
  from a partial one.

:class:`SeededSampler` is the pre-issue-16 sampler (full sort, one CPU
``torch.Generator`` per row), kept as the reference the tests and
``bench/rollout.py`` compare against. With the same uniforms and ``top_p < 1``
:func:`sample_from_logprobs` picks exactly its token; with ``top_p == 1`` the
two map a uniform to different tokens of the same distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``(h * c) mod 2**32`` for ``0 <= h < 2**32``, exact in int64 (no signed overflow)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser: a bijection on [0, 2**32) with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def seed_tensor(seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(N, 2)`` int64 halves (high 31 bits, low 32 bits) of 63-bit seeds, on ``device``."""
    return torch.tensor([[int(s) >> 32 & 0x7FFFFFFF, int(s) & _M32] for s in seeds], dtype=torch.long, device=device)


def device_uniforms(seeds: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1): ``(N,)`` for decode step ``t``, or ``(N, T)`` for a tensor of steps ``(T,)``.

    Entry ``(n, t)`` is a function of ``(seed_n, t)`` only. 24 bits (float32
    resolution; an exact float32 grid point, so every device gives the same value).
    """
    steps = torch.as_tensor(t, dtype=torch.long).to(seeds.device)
    step = _fmix32(_mul32(steps.reshape(1, -1) + 1, 0x9E3779B9))  # (1, T)
    hi, lo = seeds[:, :1], seeds[:, 1:]
    h = _fmix32(lo ^ _fmix32(hi ^ step))
    h = _fmix32(h ^ _mul32(step, 0x27D4EB2F))
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return u[:, 0] if steps.dim() == 0 else u


def processed_logprobs(logits: torch.Tensor, temperature: float, banned_ids: Sequence[int] = ()) -> torch.Tensor:
    """log-softmax of ``logits / temperature`` with ``banned_ids`` removed: the policy's sampling distribution.

    The same transform as ``training.rollout.completion_logprobs`` applies in the learner.
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    if banned_ids:
        x = x.index_fill(-1, torch.as_tensor(list(banned_ids), device=x.device), float("-inf"))
    return torch.log_softmax(x, -1)


def sample_from_logprobs(logp: torch.Tensor, u: torch.Tensor, top_p: float, start_k: int = 64) -> torch.Tensor:
    """Tokens ``(N,)`` by inverse CDF at ``u (N,)``; nucleus ``top_p`` via partial top-k (see module doc)."""
    probs = logp.exp()
    v = probs.shape[-1]
    if top_p >= 1.0:
        cdf = probs.cumsum(-1)
        pos = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1), right=True)
        return pos.clamp(max=v - 1).squeeze(-1)
    k = min(start_k, v)
    while True:
        vals, idx = probs.topk(k, dim=-1, sorted=True)
        csum = vals.cumsum(-1)
        if k >= v or bool((csum[:, -1] >= top_p).all()):
            break
        k = min(k * 4, v)
    keep = (csum - vals) < top_p  # the smallest sorted prefix with mass >= top_p
    cdf = (vals * keep).cumsum(-1)
    pos = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1), right=True)
    return idx.gather(-1, pos.clamp(max=k - 1)).squeeze(-1)


class SeededSampler:
    """Reference logits processor (pre-issue-16): full sort, one CPU ``torch.Generator`` per row.

    Used with greedy ``generate``: it leaves only the sampled token finite.
    """

    def __init__(
        self, seeds: Sequence[int], temperature: float, top_p: float, banned_ids: Sequence[int] = ()
    ) -> None:
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.banned = list(banned_ids)

    def uniforms(self) -> torch.Tensor:
        """The next uniform of every row's generator (what ``__call__`` consumes per step)."""
        return torch.stack([torch.rand((), generator=g) for g in self.gens])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        if self.banned:
            logits[:, self.banned] = float("-inf")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        if self.top_p < 1.0:  # nucleus: keep the smallest prefix with mass >= top_p
            keep = (probs.cumsum(-1) - probs) < self.top_p
            probs = probs * keep
        cdf = probs.cumsum(-1)
        u = self.uniforms().to(cdf.device, cdf.dtype)
        pos = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)
        pos = pos.clamp(max=cdf.shape[-1] - 1)
        token = order.gather(-1, pos)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token, 0.0)

"""Encode futures to action-token ids and back; the ``<action_i>`` text tokens.

Encoding is rollout-aware greedy (DESIGN.md section 4): the state starts at
the origin; at each of the 10 steps every token's end contour is placed
relative to the current state, the token whose contour has the smallest summed
corner distance to the ground-truth contour wins, and the state advances to
the *chosen token's* pose, so errors do not accumulate. Placing tokens at the
state equals expressing the ground truth in the state's frame (distances are
rigid-invariant), which lets one KD-tree over the tokens serve every step.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.sample import FUTURE_STEPS
from tokenizer.codebook import Codebook
from tokenizer.nearest import TokenIndex
from tokenizer.segments import check_futures, compose_poses, relative_poses

ACTION_TOKEN_FORMAT = "<action_{}>"
_ACTION_RE = re.compile(r"<action_([^<>\s]*)>")
_ACTION_ID_RE = re.compile(r"0|[1-9][0-9]*", re.ASCII)


class ActionTokenizer:
    """Batch encode/decode of futures ``(B,10,3)`` with a :class:`Codebook`."""

    def __init__(
        self, codebook: Codebook, batch_size: int = 65536, workers: int | None = None
    ) -> None:
        self.codebook = codebook
        self.tokens = np.asarray(codebook.tokens, np.float64)
        self.k = len(self.tokens)
        self.batch_size = batch_size
        self.workers = workers if workers is not None else (os.cpu_count() or 1)
        self.index = TokenIndex(
            self.tokens, codebook.meta.vehicle_length, codebook.meta.vehicle_width, self.workers
        )

    def encode(self, futures: np.ndarray) -> np.ndarray:
        """Token ids ``(B,10)`` int64 of futures ``(B,10,3)`` (x, y, heading; ego frame at t0)."""
        fut = check_futures(futures)
        ids = np.empty(fut.shape[:2], np.int64)
        # One thread per worker, each on its own slice: numpy and the KD-tree release the
        # GIL, so this keeps every core busy (the tree alone would leave them idle half the time).
        step = min(self.batch_size, -(-len(fut) // self.workers))
        slices = [slice(a, a + step) for a in range(0, len(fut), step)]
        if len(slices) == 1 or self.workers == 1:
            for sl in slices:
                ids[sl] = self._encode_chunk(fut[sl], self.workers)
            return ids
        with ThreadPoolExecutor(self.workers) as pool:
            for sl, out in zip(
                slices, pool.map(lambda sl: self._encode_chunk(fut[sl], 1), slices), strict=True
            ):
                ids[sl] = out
        return ids

    def _encode_chunk(self, fut: np.ndarray, workers: int) -> np.ndarray:
        state = np.zeros((len(fut), 3))
        ids = np.empty(fut.shape[:2], np.int64)
        for t in range(fut.shape[1]):
            ids[:, t], _ = self.index.nearest(relative_poses(state, fut[:, t]), workers=workers)
            state = compose_poses(state, self.tokens[ids[:, t]])
        return ids

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Futures ``(B,T,3)`` float64 rolled out from the origin by token ids ``(B,T)``."""
        arr = np.asarray(ids)
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"ids: shape {arr.shape}, expected a non-empty (B, T) array")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ids: dtype {arr.dtype}, expected integers")
        bad = (arr < 0) | (arr >= self.k)
        if bad.any():
            b, t = np.argwhere(bad)[0]
            raise ValueError(
                f"ids: {int(bad.sum())} ids outside [0, {self.k}), first {int(arr[b, t])} at [{b}, {t}]"
            )
        out = np.empty((*arr.shape, 3))
        state = np.zeros((arr.shape[0], 3))
        for t in range(arr.shape[1]):
            state = compose_poses(state, self.tokens[arr[:, t]])
            out[:, t] = state
        return out


# --------------------------------------------------------------------------- text tokens


def action_token_strings(k: int) -> list[str]:
    """``["<action_0>", ..., "<action_{k-1}>"]``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return [ACTION_TOKEN_FORMAT.format(i) for i in range(k)]


def register_action_tokens(hf_tokenizer: Any, k: int) -> int:
    """Add ``<action_0..k-1>`` to a Hugging Face tokenizer as special tokens; return the id of ``<action_0>``.

    Ids are read back from the tokenizer (never assumed) and must be
    contiguous, so ``id(<action_i>) == first_id + i``. Calling it again on the
    same tokenizer adds nothing and returns the same id.
    """
    strings = action_token_strings(k)
    hf_tokenizer.add_tokens(strings, special_tokens=True)
    ids = hf_tokenizer.convert_tokens_to_ids(strings)
    unk = getattr(hf_tokenizer, "unk_token_id", None)
    if any(i is None or (unk is not None and i == unk) for i in ids):
        raise ValueError("register_action_tokens: the tokenizer did not accept the action tokens")
    first = int(ids[0])
    if list(ids) != list(range(first, first + k)):
        raise ValueError(
            f"register_action_tokens: action token ids are not contiguous (first {first}, "
            f"e.g. <action_{k - 1}> -> {ids[-1]}); the tokenizer already held some of them"
        )
    return first


def format_action_tokens(ids: Sequence[int]) -> str:
    """Token ids as text, e.g. ``<action_12><action_7>...``."""
    return "".join(ACTION_TOKEN_FORMAT.format(int(i)) for i in ids)


@dataclass(frozen=True)
class ParseResult:
    """Action ids found in a text, in order, and everything that was wrong (empty when ``ok``)."""

    ids: list[int]
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def parse_action_tokens(text: str, k: int, expected: int = FUTURE_STEPS) -> ParseResult:
    """Find ``<action_i>`` tokens in ``text``; report unknown, malformed, missing and extra ones.

    ``ids`` holds only valid ids (``0 <= i < k``), in order; nothing is padded
    or replaced, so callers decide what a faulty answer is worth.
    """
    ids: list[int] = []
    errors: list[str] = []
    found = 0
    for m in _ACTION_RE.finditer(text):
        found += 1
        body = m.group(1)
        # ASCII only: str.isdigit() also accepts e.g. '²' (int() fails) and '٣' (int() gives 3)
        if not _ACTION_ID_RE.fullmatch(body):
            errors.append(f"malformed action token {m.group(0)!r} at character {m.start()}")
        elif int(body) >= k:
            errors.append(
                f"unknown action token {m.group(0)!r} at character {m.start()} (codebook has K={k})"
            )
        else:
            ids.append(int(body))
    if found < expected:
        errors.append(f"missing action tokens: found {found}, expected {expected}")
    elif found > expected:
        errors.append(f"extra action tokens: found {found}, expected {expected}")
    return ParseResult(ids, errors)

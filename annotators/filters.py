"""Quality filters for slow-thinking reasoning (DESIGN.md section 7).

Each filter looks at one annotated row and returns ``True`` (keep) or
``(False, reason)`` in the datatrove style. ``reason`` is ``"<key>: <detail>"``;
the key before the colon is what counters and the dataset card group by.
:func:`filter_reasons` runs every per-row filter and returns all reasons (not
just the first), so a rejected row says everything that is wrong with it.

Dataset-wide duplicates (exact after normalisation, and near-duplicates by
MinHash over word shingles) need every text at once: :class:`Deduplicator`
takes ``(sample_id, text)`` pairs and returns the reasons of the duplicates,
keeping the first of each group in sample-id order so the decision does not
depend on how rows are sharded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from annotators.parsing import ParseError, normalize_lateral, normalize_longitudinal
from schemas.enums import Lateral, Longitudinal, ThinkMode

FilterResult = bool | tuple[bool, str]

PARTS = ("reasoning_scene", "reasoning_objects", "reasoning_intent")
ACTION_PARTS = ("reasoning_action_lateral", "reasoning_action_longitudinal")

DEFAULT_REFUSALS: tuple[str, ...] = (
    r"\bI (?:cannot|can ?not|can't|am unable to|am not able to)\b",
    r"\bas an AI\b",
    r"\b(?:language|vision[- ]language) model\b",
    r"\bI'?m sorry\b",
    r"\bI apologi[sz]e\b",
    r"\bunable to (?:see|view|determine|analy[sz]e) the (?:image|video|camera)",
    r"\bno (?:image|images|video) (?:was|were|is|are) (?:provided|attached)\b",
)

# Phrases a VLM writes for the fixed vocabularies, beyond those the answer parser accepts.
_EXTRA_LATERAL = {
    "keep straight": Lateral.MOVE_FORWARD, "continue straight": Lateral.MOVE_FORWARD,
    "go forward": Lateral.MOVE_FORWARD, "keep the lane": Lateral.MOVE_FORWARD,
    "stay in lane": Lateral.MOVE_FORWARD, "follow the lane": Lateral.MOVE_FORWARD,
    "lane follow": Lateral.MOVE_FORWARD, "go straight ahead": Lateral.MOVE_FORWARD,
    "change to the left lane": Lateral.CHANGE_LANE_LEFT, "change lanes to the left": Lateral.CHANGE_LANE_LEFT,
    "change to the right lane": Lateral.CHANGE_LANE_RIGHT, "change lanes to the right": Lateral.CHANGE_LANE_RIGHT,
    "turn to the left": Lateral.TURN_LEFT, "turn to the right": Lateral.TURN_RIGHT,
    "no lateral movement": Lateral.NONE, "stationary": Lateral.NONE,
}  # fmt: skip
_EXTRA_LONGITUDINAL = {
    "brake to a stop": Longitudinal.DECEL_TO_ZERO, "brake to stop": Longitudinal.DECEL_TO_ZERO,
    "slow to a stop": Longitudinal.DECEL_TO_ZERO, "slow down to a stop": Longitudinal.DECEL_TO_ZERO,
    "decelerate to stop": Longitudinal.DECEL_TO_ZERO, "stop gradually": Longitudinal.DECEL_TO_ZERO,
    "keep stopped": Longitudinal.STOP, "remain stationary": Longitudinal.STOP, "hold": Longitudinal.STOP,
    "keep constant": Longitudinal.CONSTANT, "cruise": Longitudinal.CONSTANT, "keep current speed": Longitudinal.CONSTANT,
    "maintain current speed": Longitudinal.CONSTANT, "maintain constant speed": Longitudinal.CONSTANT,
    "speed up quickly": Longitudinal.QUICK_ACCEL, "accelerate hard": Longitudinal.QUICK_ACCEL,
    "brake": Longitudinal.DECEL, "braking": Longitudinal.DECEL, "slow": Longitudinal.DECEL,
    "slow down quickly": Longitudinal.QUICK_DECEL, "brake sharply": Longitudinal.QUICK_DECEL,
    "emergency braking": Longitudinal.QUICK_DECEL,
}  # fmt: skip


def _norm_phrase(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z/ ]+", " ", str(s).lower())).strip()


def normalize_action(value: str | None, kind: str) -> str | None:
    """A lateral/longitudinal phrase mapped to its vocabulary value, or ``None`` if unknown.

    Accepts the vocabulary values, the answer parser's synonyms and a few more
    (``go straight`` / ``keep lane`` -> ``move forward``, ``slow down`` ->
    ``deceleration``, ``brake to a stop`` -> ``deceleration to zero``).
    """
    if value is None or not str(value).strip():
        return None
    if kind not in ("lateral", "longitudinal"):
        raise ValueError(f"kind must be 'lateral' or 'longitudinal', got {kind!r}")
    try:
        return (normalize_lateral if kind == "lateral" else normalize_longitudinal)(str(value))
    except ParseError:
        extra = _EXTRA_LATERAL if kind == "lateral" else _EXTRA_LONGITUDINAL
        got = extra.get(_norm_phrase(value))
        return None if got is None else got.value


@dataclass(frozen=True, slots=True)
class LengthBounds:
    """Bounds on the reasoning text (scene + objects + intent), in characters and words."""

    min_chars: int = 80
    max_chars: int = 4000
    min_words: int = 15
    max_words: int = 700
    min_part_chars: int = 8  # each of scene / objects / intent


@dataclass(frozen=True, slots=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    shingle_words: int = 5  # word n-gram size of a shingle
    num_perm: int = 128  # MinHash permutations
    bands: int = 32  # LSH bands (num_perm / bands rows each)
    threshold: float = 0.8  # word-shingle Jaccard at or above this is a near-duplicate
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_perm % self.bands:
            raise ValueError(f"dedup.num_perm ({self.num_perm}) must be a multiple of dedup.bands ({self.bands})")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"dedup.threshold must be in (0, 1], got {self.threshold}")


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """Settings of the reasoning filters (``filter:`` section of ``configs/build.yaml``)."""

    check_action: bool = True
    length: LengthBounds = field(default_factory=LengthBounds)
    refusal_patterns: tuple[str, ...] = DEFAULT_REFUSALS
    copy_ngram: int = 8  # word n-grams compared against the few-shot examples
    copy_max_overlap: float = 0.2  # share of the reasoning's n-grams found in one example
    few_shot_version: str = "v1"  # annotators/templates/<version>/few_shot.json
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def __post_init__(self) -> None:
        if self.copy_ngram < 2:
            raise ValueError(f"filter.copy_ngram must be >= 2, got {self.copy_ngram}")
        for p in self.refusal_patterns:
            re.compile(p)


# --------------------------------------------------------------------------- text of a row


def objects_text(value: Any) -> str:
    """The critical-objects part as text (the column is a list of structs; a plain string is accepted)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    pieces = []
    for obj in value:
        if isinstance(obj, Mapping):
            pieces.append(" ".join(str(v).strip() for v in obj.values() if v))
        else:
            pieces.append(str(obj))
    return " ".join(p for p in pieces if p)


def reasoning_text(row: Mapping[str, Any]) -> str:
    """Scene, objects and intent as one string (what the length, copy and dedup filters read)."""
    return " ".join(
        t
        for t in (
            str(row.get("reasoning_scene") or "").strip(),
            objects_text(row.get("reasoning_objects")),
            str(row.get("reasoning_intent") or "").strip(),
        )
        if t
    )


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation and spacing ignored)."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


# --------------------------------------------------------------------------- per-row filters


def check_structure(row: Mapping[str, Any]) -> FilterResult:
    """All four parts present and non-empty (objects: at least one named object)."""
    missing = []
    for key in ("reasoning_scene", "reasoning_intent", *ACTION_PARTS):
        if not str(row.get(key) or "").strip():
            missing.append(key.removeprefix("reasoning_"))
    if not objects_text(row.get("reasoning_objects")):
        missing.append("objects")
    if missing:
        return False, f"structure: missing or empty {', '.join(missing)}"
    return True


def check_action(row: Mapping[str, Any]) -> FilterResult:
    """The reasoning's final action equals the ground-truth meta-action after synonym normalisation.

    When the ground truth is stopped (lateral ``none``), any lateral answer is
    accepted: the lateral action is not defined for a stopped vehicle.
    """
    problems = []
    for kind, got_key, gt_key in (
        ("lateral", "reasoning_action_lateral", "meta_lateral"),
        ("longitudinal", "reasoning_action_longitudinal", "meta_longitudinal"),
    ):
        gt = row.get(gt_key)
        if gt is None:
            problems.append(f"no ground-truth {kind}")
            continue
        if kind == "lateral" and gt == Lateral.NONE.value:
            continue
        raw = row.get(got_key)
        got = normalize_action(raw, kind)
        if got is None:
            problems.append(f"{kind} {raw!r} is not in the vocabulary")
        elif got != gt:
            problems.append(f"{kind} {got!r} != ground truth {gt!r}")
    if problems:
        return False, "action_mismatch: " + "; ".join(problems)
    return True


def check_length(row: Mapping[str, Any], bounds: LengthBounds) -> FilterResult:
    text = reasoning_text(row)
    n_chars, n_words = len(text), len(words(text))
    if n_chars < bounds.min_chars or n_words < bounds.min_words:
        return False, f"too_short: {n_chars} chars, {n_words} words (min {bounds.min_chars}, {bounds.min_words})"
    if n_chars > bounds.max_chars or n_words > bounds.max_words:
        return False, f"too_long: {n_chars} chars, {n_words} words (max {bounds.max_chars}, {bounds.max_words})"
    short = [
        k.removeprefix("reasoning_")
        for k, v in (
            ("reasoning_scene", str(row.get("reasoning_scene") or "")),
            ("reasoning_objects", objects_text(row.get("reasoning_objects"))),
            ("reasoning_intent", str(row.get("reasoning_intent") or "")),
        )
        if len(v.strip()) < bounds.min_part_chars
    ]
    if short:
        return False, f"too_short: part(s) {', '.join(short)} under {bounds.min_part_chars} chars"
    return True


class RefusalFilter:
    """Rejects texts that refuse or talk about being a model ("I cannot", "as an AI", ...)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    def __call__(self, row: Mapping[str, Any]) -> FilterResult:
        text = reasoning_text(row)
        for p in self.patterns:
            m = p.search(text)
            if m:
                return False, f"refusal: {m.group(0)!r}"
        return True


class CopyFilter:
    """Rejects reasoning that copies a few-shot example: share of its word n-grams found in one example."""

    def __init__(self, examples: Sequence[str], n: int, max_overlap: float) -> None:
        self.n = n
        self.max_overlap = max_overlap
        self.examples = [ngrams(words(t), n) for t in examples]

    def __call__(self, row: Mapping[str, Any]) -> FilterResult:
        grams = ngrams(words(reasoning_text(row)), self.n)
        if not grams:
            return True
        for i, ex in enumerate(self.examples, 1):
            share = len(grams & ex) / len(grams)
            if share > self.max_overlap:
                return False, f"few_shot_copy: {share:.0%} of {self.n}-grams from example {i}"
        return True


class RowFilters:
    """Every per-row filter of a :class:`FilterConfig`, in a fixed order."""

    def __init__(self, cfg: FilterConfig, few_shot: Sequence[str] | None = None) -> None:
        if few_shot is None:
            from annotators.prompts import few_shot_texts

            few_shot = few_shot_texts(cfg.few_shot_version)
        self.cfg = cfg
        self.refusal = RefusalFilter(cfg.refusal_patterns)
        self.copy = CopyFilter(few_shot, cfg.copy_ngram, cfg.copy_max_overlap)

    def reasons(self, row: Mapping[str, Any]) -> list[str]:
        """All reasons to reject ``row``'s reasoning (empty: keep)."""
        structure = check_structure(row)
        out = [] if structure is True else [structure[1]]
        checks = [self.refusal, self.copy, lambda r: check_length(r, self.cfg.length)]
        if self.cfg.check_action:
            checks.insert(0, check_action)
        for check in checks:
            res = check(row)
            if res is not True:
                out.append(res[1])
        return out


def needs_filter(row: Mapping[str, Any]) -> bool:
    """Only slow-thinking rows carry reasoning to filter."""
    return row.get("think_mode") == ThinkMode.SLOW.value


def reason_key(reason: str) -> str:
    """The counter key of a reason (``"action_mismatch: ..."`` -> ``"action_mismatch"``)."""
    return reason.split(":", 1)[0].strip()


# --------------------------------------------------------------------------- dataset-wide duplicates

_MERSENNE = np.uint64((1 << 61) - 1)


def normalized_hash(text: str) -> str:
    """Hash of the text with case, punctuation and spacing removed (exact-duplicate key)."""
    return hashlib.sha256(" ".join(words(text)).encode()).hexdigest()


def _shingle_hashes(text: str, k: int) -> np.ndarray:
    toks = words(text)
    if len(toks) < k:
        toks = toks + [""] * (k - len(toks))
    grams = {" ".join(toks[i : i + k]) for i in range(len(toks) - k + 1)}
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") >> 3 for g in grams),
        dtype=np.uint64,
        count=len(grams),
    )


class MinHasher:
    """MinHash signatures with universal hashing ``(a*x + b) mod p`` over 61-bit shingle hashes."""

    def __init__(self, num_perm: int, shingle_words: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        # Shingle hashes are reduced to 32 bits and a, b < 2^28, so a*x + b < 2^61 never overflows uint64.
        self.a = rng.integers(1, 1 << 28, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 28, size=num_perm, dtype=np.uint64)
        self.k = shingle_words

    def signature(self, text: str) -> np.ndarray:
        x = _shingle_hashes(text, self.k) % np.uint64(1 << 32)
        vals = (np.outer(x, self.a) + self.b) % _MERSENNE
        return vals.min(axis=0)


def jaccard(a: str, b: str, k: int) -> float:
    """Exact Jaccard similarity of two texts' word k-shingle sets."""
    sa, sb = set(_shingle_hashes(a, k).tolist()), set(_shingle_hashes(b, k).tolist())
    return len(sa & sb) / max(1, len(sa | sb))


class Deduplicator:
    """Exact and near-duplicate detection over a whole dataset's reasoning texts.

    Candidate pairs come from MinHash LSH banding; each candidate is confirmed
    with the exact shingle Jaccard, so the threshold is exact, not estimated.
    The first sample of a group (sample-id order) is kept.
    """

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.hasher = MinHasher(cfg.num_perm, cfg.shingle_words, cfg.seed)

    def duplicates(self, items: Iterable[tuple[str, str]]) -> dict[str, str]:
        """``{sample_id: reason}`` for every duplicate among ``(sample_id, text)`` pairs."""
        ordered = sorted(items)
        out: dict[str, str] = {}
        kept: list[tuple[str, str]] = []
        if self.cfg.exact:
            first: dict[str, str] = {}
            for sid, text in ordered:
                h = normalized_hash(text)
                if h in first:
                    out[sid] = f"duplicate: same text as {first[h]}"
                else:
                    first[h] = sid
                    kept.append((sid, text))
        else:
            kept = ordered
        if self.cfg.near and len(kept) > 1:
            out.update(self._near(kept))
        return out

    def _near(self, items: list[tuple[str, str]]) -> dict[str, str]:
        rows = self.cfg.num_perm // self.cfg.bands
        sigs = np.stack([self.hasher.signature(t) for _, t in items])
        buckets: dict[tuple[int, bytes], list[int]] = {}
        for i in range(len(items)):
            for b in range(self.cfg.bands):
                key = (b, sigs[i, b * rows : (b + 1) * rows].tobytes())
                buckets.setdefault(key, []).append(i)
        out: dict[str, str] = {}
        removed: set[int] = set()
        candidates: dict[int, set[int]] = {}
        for members in buckets.values():
            for j in members[1:]:
                candidates.setdefault(j, set()).update(m for m in members if m < j)
        for j in sorted(candidates):
            for i in sorted(candidates[j]):
                if i in removed:
                    continue  # compare against kept texts only, so chains do not cascade
                sim = jaccard(items[i][1], items[j][1], self.cfg.shingle_words)
                if sim >= self.cfg.threshold:
                    out[items[j][0]] = f"near_duplicate: Jaccard {sim:.2f} with {items[i][0]}"
                    removed.add(j)
                    break
        return out

"""Run the configured rewards over a batch in a CPU worker pool and combine them.

Total reward = driving reward - CoT penalty + format term, where the driving
reward is the weighted mean of the driving rewards that apply to the row
(NaN = not applicable), multiplied by the gate rewards (e.g. collision), and
a malformed completion gets ``invalid_driving`` (it has no trajectory).

Failures: a reward that raises is re-run item by item to isolate the
culprits; each failed item gets a NaN total (the trainer excludes it from the
loss) and is counted and logged with the reward, sample and cause. More than
``max_failures`` failures over the run raises :class:`RewardBudgetExceeded`.
A failure is never scored as 0.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.rewards.base import (
    Completion,
    Reward,
    RewardBudgetExceeded,
    RewardItem,
    slim_row,
)
from training.rewards.navsim_pdm import NavsimPDMReward
from training.rewards.rfs import RaterFeedbackReward, RFSConfig
from training.rewards.text import CoTPenalty, FormatReward
from training.rewards.trajectory import ADEReward, CollisionReward

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ADEConfig:
    mode: str = "exp"  # exp: exp(-ADE/scale); linear: 1 - clip(ADE/max_ade)
    scale: float = 2.0  # m
    max_ade: float = 5.0  # m


@dataclass(frozen=True)
class CollisionConfig:
    dt: float = 0.5  # s between predicted poses
    categories: tuple[str, ...] = ()  # object categories considered; empty = all
    center_offset: float = 1.4  # m from the ego origin (rear axle) forward to the box centre


@dataclass(frozen=True)
class PDMConfig:
    metric_cache: str = ""  # NAVSIM metric cache directory


@dataclass(frozen=True)
class CoTConfig:
    weight: float = 0.3
    coef: float = 0.002
    center: float = 400.0
    unit: str = "chars"  # chars (of the reasoning) or tokens (of the completion)


@dataclass(frozen=True)
class RewardsConfig:
    """Which rewards to compute and how to combine them (``rewards:`` in the RFT YAML)."""

    weights: dict[str, float] = field(default_factory=lambda: {"rfs": 1.0, "ade": 1.0})
    gates: tuple[str, ...] = ()  # rewards multiplying the driving reward, e.g. [collision]
    invalid_driving: float = 0.0  # driving reward of a completion without a valid trajectory
    format_penalty: float = 1.0  # subtracted when the 10 action tokens are not there
    cot: CoTConfig = CoTConfig()
    rfs: RFSConfig = RFSConfig()
    ade: ADEConfig = ADEConfig()
    collision: CollisionConfig = CollisionConfig()
    pdm: PDMConfig = PDMConfig()
    executor: str = "thread"  # inline | thread | process
    workers: int = 2
    chunk_size: int = 64  # items per worker task
    max_failures: int = 16  # failed items tolerated over the whole run

    def __post_init__(self) -> None:
        known = set(REGISTRY)
        bad = sorted((set(self.weights) | set(self.gates)) - known)
        if bad:
            raise ValueError(f"rewards: unknown reward(s) {bad}; valid: {sorted(known)}")
        if self.executor not in ("inline", "thread", "process"):
            raise ValueError(f"rewards.executor must be inline, thread or process, got {self.executor!r}")
        if any(w < 0 for w in self.weights.values()) or not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"rewards.weights must be >= 0 with at least one > 0, got {self.weights}")

    @property
    def active(self) -> tuple[str, ...]:
        """Driving rewards that are computed (weighted or gating), in a stable order."""
        names = [n for n, w in self.weights.items() if w > 0] + list(self.gates)
        return tuple(dict.fromkeys(names))


RewardFactory = Callable[["RewardsConfig"], Reward]

# name -> factory(config). Plug in a reward with register_reward(); the names
# are what ``rewards.weights`` and ``rewards.gates`` refer to.
REGISTRY: dict[str, RewardFactory] = {
    "rfs": lambda cfg: RaterFeedbackReward(cfg.rfs),
    "ade": lambda cfg: ADEReward(cfg.ade.mode, cfg.ade.scale, cfg.ade.max_ade),
    "collision": lambda cfg: CollisionReward(
        dt=cfg.collision.dt,
        categories=tuple(cfg.collision.categories),
        center_offset=cfg.collision.center_offset,
    ),
    "pdm": lambda cfg: NavsimPDMReward(cfg.pdm.metric_cache),
}


def register_reward(name: str, factory: RewardFactory) -> None:
    """Make a driving reward available to ``rewards.weights``/``rewards.gates`` under ``name``."""
    if name in ("driving", "format", "cot_penalty", "total"):
        raise ValueError(f"reward name {name!r} is reserved")
    REGISTRY[name] = factory


def build_rewards(cfg: RewardsConfig) -> list[Reward]:
    """The configured driving rewards (optional dependencies are checked here)."""
    return [REGISTRY[name](cfg) for name in cfg.active]


@dataclass
class RewardResult:
    """Scores of one batch: ``total`` is NaN exactly where ``failed``."""

    total: np.ndarray  # (N,)
    components: dict[str, np.ndarray]  # name -> (N,): each driving reward, driving, format, cot_penalty
    failed: np.ndarray  # (N,) bool
    failures: Counter  # reward name -> failed items in this batch


def _run_chunk(reward: Reward, items: Sequence[RewardItem]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Score a chunk; on an exception, re-score item by item. Returns (values, [(index, error)])."""
    try:
        return _checked(reward, items), []
    except Exception:  # isolate which items fail; each one's error is reported below
        pass
    values = np.full(len(items), np.nan)
    errors: list[tuple[int, str]] = []
    for i, item in enumerate(items):
        try:
            values[i] = _checked(reward, [item])[0]
        except Exception as exc:  # a reward bug or bad row: counted by the runner, never scored
            errors.append((i, f"{type(exc).__name__}: {exc}"))
    return values, errors


def _checked(reward: Reward, items: Sequence[RewardItem]) -> np.ndarray:
    out = np.asarray(reward(items), dtype=np.float64)
    if out.shape != (len(items),):
        raise ValueError(f"reward {reward.name!r} returned shape {out.shape} for {len(items)} items")
    if np.isinf(out).any():
        raise ValueError(f"reward {reward.name!r} returned an infinite value")
    return out


class RewardRunner:
    """Scores (row, completion) batches with the configured rewards; counts failures over the run."""

    def __init__(self, cfg: RewardsConfig) -> None:
        self.cfg = cfg
        self.rewards: list[Reward] = build_rewards(cfg)
        self.format = FormatReward(cfg.format_penalty)
        self.cot = CoTPenalty(cfg.cot.weight, cfg.cot.coef, cfg.cot.center, cfg.cot.unit)
        self.columns = tuple(dict.fromkeys(c for r in self.rewards for c in r.columns))
        self.failures_total: Counter = Counter()
        self._pool: Executor | None = None

    # ------------------------------------------------------------------ pool
    def _executor(self) -> Executor | None:
        if self.cfg.executor == "inline":
            return None
        if self._pool is None:
            if self.cfg.executor == "thread":
                self._pool = ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="reward")
            else:  # spawn: forking a process that holds torch/CUDA state is unsafe
                ctx = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self.cfg.workers, mp_context=ctx)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ scoring
    def score(self, rows: Sequence[Mapping[str, Any]], completions: Sequence[Completion]) -> RewardResult:
        """Score ``completions[i]`` against ``rows[i]``."""
        if len(rows) != len(completions):
            raise ValueError(f"{len(rows)} rows but {len(completions)} completions")
        slim: dict[int, dict[str, Any]] = {}
        items = []
        for row, comp in zip(rows, completions, strict=True):
            key = id(row)  # G completions share a row: slim it (and pickle it) once
            if key not in slim:
                slim[key] = slim_row(row, self.columns)
            items.append((slim[key], comp))

        values, failed, failures = self._run_all(items)
        comps: dict[str, np.ndarray] = dict(values)
        driving, unscorable = self._combine(values, completions)
        for i in np.flatnonzero(unscorable & ~failed):
            self._log_failure("driving", items[i][0], "no driving reward applies to this row")
            failures["driving"] += 1
        failed |= unscorable
        comps["format"] = self.format(items)
        comps["cot_penalty"] = self.cot(items)
        comps["driving"] = driving
        total = driving - comps["cot_penalty"] + comps["format"]
        total[failed] = np.nan
        self.failures_total.update(failures)
        spent = sum(self.failures_total.values())
        if spent > self.cfg.max_failures:
            raise RewardBudgetExceeded(
                f"{spent} reward failures over the run exceed rewards.max_failures={self.cfg.max_failures} "
                f"(by reward: {dict(self.failures_total)}); see the warnings above for samples and causes"
            )
        return RewardResult(total=total, components=comps, failed=failed, failures=failures)

    def _run_all(self, items: list[RewardItem]) -> tuple[dict[str, np.ndarray], np.ndarray, Counter]:
        n = len(items)
        size = max(1, self.cfg.chunk_size)
        chunks = [(s, items[s : s + size]) for s in range(0, n, size)]
        pool = self._executor()
        jobs = []
        for reward in self.rewards:
            for start, chunk in chunks:
                job = pool.submit(_run_chunk, reward, chunk) if pool else _run_chunk(reward, chunk)
                jobs.append((reward.name, start, chunk, job))
        values = {r.name: np.full(n, np.nan) for r in self.rewards}
        failed = np.zeros(n, dtype=bool)
        failures: Counter = Counter()
        for name, start, chunk, job in jobs:
            try:
                vals, errors = job.result() if pool else job
            except Exception as exc:  # the worker itself died (e.g. a crashed process)
                vals, errors = np.full(len(chunk), np.nan), [(i, f"worker failed: {exc!r}") for i in range(len(chunk))]
            values[name][start : start + len(chunk)] = vals
            for i, msg in errors:
                failed[start + i] = True
                failures[name] += 1
                self._log_failure(name, chunk[i][0], msg)
        return values, failed, failures

    def _combine(self, values: dict[str, np.ndarray], completions: Sequence[Completion]) -> tuple[np.ndarray, np.ndarray]:
        n = len(completions)
        num = np.zeros(n)
        den = np.zeros(n)
        for name, w in self.cfg.weights.items():
            if w <= 0 or name not in values:
                continue
            v = values[name]
            ok = ~np.isnan(v)
            num[ok] += w * v[ok]
            den[ok] += w
        valid = np.array([c.trajectory is not None for c in completions], dtype=bool)
        driving = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
        for name in self.cfg.gates:
            g = values.get(name)
            if g is not None:
                driving = np.where(np.isnan(g), driving, driving * g)
        unscorable = valid & (den == 0)
        driving = np.where(valid, driving, self.cfg.invalid_driving)
        return driving, unscorable

    def _log_failure(self, reward: str, row: Mapping[str, Any], msg: str) -> None:
        log.warning("reward %r failed on sample %r: %s", reward, row.get("sample_id"), msg)

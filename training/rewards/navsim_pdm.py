"""NAVSIM PDM score as a reward (optional: needs ``navsim`` and a metric cache).

The dependency is checked when the reward is built, never in the middle of a
run: a missing ``navsim`` package or metric cache raises
:class:`MissingDependencyError` naming what is missing and how to get it.

Scoring follows NAVSIM v1's ``navsim.evaluate.pdm_score.pdm_score``: the
first 8 predicted poses (4 s at 2 Hz; NAVSIM's horizon) are simulated by the
PDM simulator against the cached scene of the row's frame token (the last
part of a ``nuplan/<log>/<token>`` sample id). Rows of other datasets are
not applicable (NaN). This path is not exercised by the test suite (navsim
is not installed there); only the missing-dependency error is.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.rewards.base import RewardError, RewardItem

NAVSIM_POSES = 8  # NAVSIM scores 4 s at 2 Hz
NAVSIM_INSTALL_HINT = (
    "install navsim (https://github.com/autonomousvision/navsim, with its nuplan-devkit) and build "
    "a metric cache with navsim's run_metric_caching.py, then set rewards.pdm.metric_cache to it"
)


class MissingDependencyError(RuntimeError):
    """An optional reward was asked for but its package or data is not available."""


@dataclass
class NavsimPDMReward:
    """PDM score (in [0, 1]) of the predicted trajectory on a nuPlan/NAVSIM row."""

    metric_cache: str = ""
    name: str = "pdm"
    columns: tuple[str, ...] = ("sample_id", "dataset")
    _scorer: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        missing = []
        if importlib.util.find_spec("navsim") is None:
            missing.append("the 'navsim' package")
        if not self.metric_cache:
            missing.append("a metric cache path (rewards.pdm.metric_cache is empty)")
        elif not Path(self.metric_cache).is_dir():
            missing.append(f"the metric cache directory {self.metric_cache!r}")
        if missing:
            raise MissingDependencyError(
                f"reward 'pdm' (NAVSIM PDM score) needs {' and '.join(missing)}: {NAVSIM_INSTALL_HINT}"
            )

    def __getstate__(self) -> dict[str, Any]:  # the navsim objects stay in the worker that made them
        return {"metric_cache": self.metric_cache, "name": self.name, "columns": self.columns, "_scorer": None}

    def _setup(self) -> Any:
        from navsim.common.dataclasses import Trajectory
        from navsim.evaluate.pdm_score import pdm_score
        from navsim.planning.metric_caching.metric_cache_loader import MetricCacheLoader
        from navsim.planning.simulation.planner.pdm_planner.scoring.pdm_scorer import PDMScorer
        from navsim.planning.simulation.planner.pdm_planner.simulation.pdm_simulator import (
            PDMSimulator,
        )
        from nuplan.planning.simulation.trajectory.trajectory_sampling import TrajectorySampling

        proposal = TrajectorySampling(num_poses=40, interval_length=0.1)
        return {
            "loader": MetricCacheLoader(Path(self.metric_cache)),
            "simulator": PDMSimulator(proposal),
            "scorer": PDMScorer(proposal),
            "pdm_score": pdm_score,
            "Trajectory": Trajectory,
            "sampling": TrajectorySampling(num_poses=NAVSIM_POSES, interval_length=0.5),
        }

    def __call__(self, items: Sequence[RewardItem]) -> np.ndarray:
        if self._scorer is None:
            self._scorer = self._setup()
        s = self._scorer
        out = np.full(len(items), np.nan)
        for i, (row, comp) in enumerate(items):
            if comp.trajectory is None or row.get("dataset") != "nuplan":
                continue
            sid = str(row.get("sample_id"))
            token = sid.rsplit("/", 1)[-1]
            try:
                cache = s["loader"].get_from_token(token)
            except Exception as exc:  # navsim raises bare errors; name the sample and re-raise
                raise RewardError(f"pdm: sample {sid!r}: no metric cache entry for token {token!r}: {exc}") from exc
            poses = np.asarray(comp.trajectory, dtype=np.float32)[:NAVSIM_POSES]
            result = s["pdm_score"](
                metric_cache=cache,
                model_trajectory=s["Trajectory"](poses, s["sampling"]),
                future_sampling=s["simulator"].proposal_sampling,
                simulator=s["simulator"],
                scorer=s["scorer"],
            )
            out[i] = float(result.score)
        return out

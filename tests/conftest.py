"""Shared fixtures: one local Ray session and one generated sample-data set per test run."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Caches reused across runs (WOD-E2E file indexes) stay private to this test session.
os.environ.setdefault("DRIVEVLA_CACHE_DIR", tempfile.mkdtemp(prefix="drivevla-cache-"))


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs Ray (2 CPUs, no dashboard)."""
    import ray

    # Ray workers import test modules (stages defined in tests) by name.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (tests_dir, os.environ.get("PYTHONPATH", "")) if p
    )
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """Tiny sample data in the three real formats (generated once per session)."""
    from pipelines.sample_data import generate

    return generate(tmp_path_factory.mktemp("sample_data"), seed=0, size="tiny")


@pytest.fixture(scope="module")
def torch_one_thread():
    """One intra-op thread for a test module of tiny models (``pytestmark = pytest.mark.usefixtures(...)``).

    Their ops are too small to split; on a loaded 2-core machine extra threads only wait on each other.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

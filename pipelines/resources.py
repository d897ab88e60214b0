"""Where the shipped configs are: the checkout's ``configs/`` or, installed, the ``drivevla_configs`` package.

A source checkout (``pip install -e .``, or ``PYTHONPATH``) reads
``<repo>/configs``. A wheel (``pip install .``, Beam's ``--setup_file`` /
Dataflow workers, a container) has no repository around the package, so
``setup.py`` also installs ``configs/`` as the data-only package
``drivevla_configs``; this module finds it through :mod:`importlib.resources`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

CHECKOUT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_PACKAGE = "drivevla_configs"


def config_dir() -> Path:
    """The directory of the shipped YAML configs (checkout first, then the installed package)."""
    if CHECKOUT_CONFIGS.is_dir():
        return CHECKOUT_CONFIGS
    spec = importlib.util.find_spec(CONFIG_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return CHECKOUT_CONFIGS  # absent: callers report the missing file (and --config)


def config_path(*parts: str) -> Path:
    """``config_dir() / parts...`` (e.g. ``config_path("extract", "nuplan.yaml")``)."""
    return config_dir().joinpath(*parts)

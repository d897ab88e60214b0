"""Issue 12 item 3: what Beam ships to Dataflow/Flink workers (``--setup_file=./setup.py``) carries the configs.

Beam's launcher builds an sdist of the project with
``apache_beam.runners.portability.stager.Stager._build_setup_package`` and each
worker pip-installs it; we do the same (offline: no build isolation, no
dependencies) into a private directory and run ``extract``'s config lookup
there, away from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("pipelines", "tokenizer", "annotators", "schemas", "training", "configs", "setup.py", "pyproject.toml", "README.md")


def test_setup_file_sdist_installs_code_and_default_configs(tmp_path):
    from apache_beam.runners.portability.stager import Stager

    src = tmp_path / "src"
    src.mkdir()
    for name in SHIPPED:
        s = ROOT / name
        if s.is_dir():
            shutil.copytree(s, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(s, src / name)
    dist = tmp_path / "dist"
    dist.mkdir()
    sdist = Stager._build_setup_package(str(src / "setup.py"), str(dist))  # what --setup_file runs
    target = tmp_path / "worker_site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), sdist],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    probe = (
        "import pipelines.commands.extract as e, pipelines.resources as r, pipelines.commands.build as b;"
        "print(e.default_config('waymo_e2e'));"
        "print(all(e.default_config(d).is_file() for d in ('waymo_e2e', 'nuscenes', 'nuplan')));"
        "print(b.DEFAULT_CONFIG.is_file(), r.config_path('train', 'sft_tiny.yaml').is_file())"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env={**env, "PYTHONPATH": str(target)}, cwd=tmp_path,
        capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    assert out[0].startswith(str(target / "drivevla_configs")), out
    assert out[1:3] == ["True", "True True"], out

"""Issue 12: the pipeline with input and output in a ``gs://`` bucket, against a GCS emulator, on the Ray engine.

WOD-E2E is distributed from a GCS bucket, so ``gs://`` is the path users meet
first. ``gcp-storage-emulator`` (a dev dependency: pure Python, serves the
JSON API on 127.0.0.1) stands in for GCS; the code under test finds it only
through ``STORAGE_EMULATOR_HOST``, the variable gcsfs and Google's clients
read. Every step runs as a separate CLI process, as a user would, with the
emulator's environment:

* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs >= 2026 asks each bucket's
  storage layout over gRPC (Storage Control API) before using it, which the
  emulator does not serve; the lookup then times out after 60 s per call and
  is not cached (``gcsfs/extended_gcsfs.py``, ``_get_bucket_type``). Real GCS
  answers it, so users need no such setting.
* no credentials: gcsfs falls back to anonymous access, which the emulator accepts.

extract (on the Ray engine: local Ray workers write the shards and markers to
the bucket) -> tokenize -> annotate (rules) -> build must give the same rows
as the same commands on a local directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _net import free_port

from pipelines.cli import main as cli
from pipelines.core.shards import list_shards, read_table

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EMULATOR = Path(sys.executable).with_name("gcp-storage-emulator")
BUCKET = "drivevla-gcs-test"
STAGES = ["extract/waymo_e2e", "tokenize/waymo_e2e", "annotate/waymo_e2e", "build"]

if not EMULATOR.exists():
    pytest.skip("gcp-storage-emulator (dev extra) is not installed", allow_module_level=True)


def _steps(data: str, engine: str) -> list[list[str]]:
    return [
        ["extract", "--dataset", "waymo_e2e", "--out", data, "--engine", engine, "--set", "units_per_partition=1"],
        ["tokenize", "--data", data, "--datasets", "waymo_e2e", "--engine", "local"],
        ["annotate", "--dataset", "waymo_e2e", "--data", data, "--annotator", "rules", "--engine", "local"],
        ["build", "--data", data, "--datasets", "waymo_e2e", "--skip-card", "--engine", "local"],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def gcs_env():
    port = free_port()
    proc = subprocess.Popen([str(EMULATOR), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the GCS emulator did not start (exit code {proc.poll()})") from None
                time.sleep(0.2)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "RAY_ADDRESS"))}
        env.update({
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
            "RAY_USAGE_STATS_ENABLED": "0",
        })  # fmt: skip
        yield env
    finally:
        proc.kill()
        proc.wait()


def _py(env: dict[str, str], code: str, *args: str) -> None:
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]


PUT = ("import fsspec,sys; f=fsspec.filesystem('gs'); f.exists(sys.argv[2]) or f.mkdir(sys.argv[2]);"
       "f.put(sys.argv[1] + '/', sys.argv[3], recursive=True)")
GET = "import fsspec,sys; fsspec.filesystem('gs').get(sys.argv[1], sys.argv[2], recursive=True)"


@pytest.fixture(scope="module")
def runs(gcs_env, sample_data, tmp_path_factory):
    """The same commands on a local directory (in-process) and on the bucket (CLI processes)."""
    local = tmp_path_factory.mktemp("gcs_local")
    steps = _steps(str(local), "local")
    assert cli([*steps[0], "--input", str(sample_data.waymo_e2e)]) == 0
    assert cli(["codebook", "--data", str(local), "--k", "64", "--datasets", "waymo_e2e"]) == 0
    for argv in steps[1:]:
        assert cli(argv) == 0, argv[0]

    data = f"gs://{BUCKET}/data"
    _py(gcs_env, PUT, str(sample_data.waymo_e2e), BUCKET, f"{BUCKET}/input/waymo_e2e/")
    logs = {}
    steps = _steps(data, "ray")
    steps[0] += ["--input", f"gs://{BUCKET}/input/waymo_e2e", "--workers", "2"]
    for k, argv in enumerate(steps):
        if k == 1:  # the local run's codebook (a fit is compared elsewhere), copied into the bucket
            _py(gcs_env, PUT, str(local / "codebook"), BUCKET, f"{BUCKET}/data/codebook/")
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], env=gcs_env, cwd=ROOT,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, f"{argv[0]} on gs:// failed:\n{r.stderr[-4000:]}"
        logs[argv[0]] = r.stdout + r.stderr
    copy = tmp_path_factory.mktemp("gcs_copy")
    for stage in STAGES:
        (copy / stage).parent.mkdir(parents=True, exist_ok=True)
        _py(gcs_env, GET, f"{BUCKET}/data/{stage}", str(copy / stage))
    yield local, copy, logs
    shutil.rmtree(copy, ignore_errors=True)


def test_ray_engine_wrote_extract_to_the_bucket(runs):
    _, copy, logs = runs
    assert "Ray workers" in logs["extract"], logs["extract"][-2000:]
    # object-store commits: per-attempt prefixes, listed by markers
    shards = list_shards(copy / "extract" / "waymo_e2e")
    assert shards and all(len(p.parent.name) == 12 for p in shards)


@pytest.mark.parametrize("stage", STAGES)
def test_bucket_output_identical_to_local(runs, stage):
    local, copy, _ = runs
    remote, here = read_table(copy / stage), read_table(local / stage)
    assert remote.num_rows == here.num_rows > 0
    assert remote.equals(here)

"""Issue 12: the whole pipeline with input and output in an S3 bucket, against a real S3-compatible server.

moto's server mode runs on 127.0.0.1 (a free port) in this process; the code
under test finds it only through the standard environment (``AWS_ENDPOINT_URL``
and dummy ``AWS_*`` credentials), exactly as it would find MinIO or S3.
extract (SIGKILLed mid-run in a subprocess, then rerun) -> codebook ->
tokenize -> annotate (rules) -> build must give the same rows as the same
commands on a local directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _net import free_port

pytest.importorskip("moto.server", reason="moto[server] (dev extra) runs the S3-compatible test server")

from pipelines.cli import main as cli  # noqa: E402
from pipelines.core.shards import list_shards, read_table, stored_shards  # noqa: E402
from pipelines.io import fs  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "drivevla-test"
EXTRACT_SET = ["--set", "units_per_partition=1"]  # several partitions, so a kill lands between commits


@pytest.fixture(scope="module")
def s3(sample_data):
    """A moto S3 server on 127.0.0.1 with the WOD-E2E sample uploaded to s3://BUCKET/input/waymo_e2e."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import fsspec
        import s3fs as s3fs_mod

        # instances are cached with the endpoint they were made with (another test's server)
        s3fs_mod.S3FileSystem.clear_instance_cache()
        s3fs = fsspec.filesystem("s3", skip_instance_cache=True)
        s3fs.mkdir(BUCKET)
        for ds in ("waymo_e2e", "nuplan"):
            s3fs.put(str(getattr(sample_data, ds)) + "/", f"{BUCKET}/input/{ds}/", recursive=True)
        yield {"env": env, "input": f"s3://{BUCKET}/input/waymo_e2e", "data": f"s3://{BUCKET}/data"}
    server.stop()
    s3fs_mod.S3FileSystem.clear_instance_cache()


def _steps(data: str) -> list[list[str]]:
    return [
        ["codebook", "--data", data, "--k", "64", "--datasets", "waymo_e2e"],
        ["tokenize", "--data", data, "--datasets", "waymo_e2e", "--engine", "local"],
        ["annotate", "--dataset", "waymo_e2e", "--data", data, "--annotator", "rules", "--engine", "local"],
        ["build", "--data", data, "--datasets", "waymo_e2e", "--skip-card", "--engine", "local"],
    ]


def _extract(data: str, input_: str, dataset: str = "waymo_e2e") -> list[str]:
    return ["extract", "--dataset", dataset, "--input", input_, "--out", data, "--engine", "local", *EXTRACT_SET]


@pytest.fixture(scope="module")
def local_run(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("local_pipeline")
    assert cli(_extract(str(root), str(sample_data.waymo_e2e))) == 0
    assert cli(_extract(str(root), str(sample_data.nuplan), "nuplan")) == 0
    for argv in _steps(str(root)):
        assert cli(argv) == 0, argv[0]
    return root


@pytest.fixture(scope="module")
def s3_run(s3, local_run):
    """Extract in a subprocess killed with SIGKILL after its first commit, rerun, then the rest in-process."""
    data = s3["data"]
    env = {**os.environ, **s3["env"], "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = fs.join(data, "extract", "waymo_e2e", "_done")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *_extract(data, s3["input"])],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if fs.glob(done, "*.json"):
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = {"committed": len(fs.glob(done, "*.json")), "returncode": proc.returncode}
    stage_dir = fs.join(data, "extract", "waymo_e2e")
    killed["has_manifest"] = fs.exists(fs.join(stage_dir, "manifest.json"))
    # downstream refuses the interrupted stage (markers but no manifest)
    killed["tokenize_rc"] = cli(["tokenize", "--data", data, "--datasets", "waymo_e2e", "--engine", "local"])
    # a stray object of an attempt that never committed: the rerun must not read it and must delete it
    stray = fs.join(stage_dir, "shards", "0123456789ab", "00000-stray-00000.parquet")
    fs.write_bytes(stray, b"not parquet")
    assert cli(_extract(data, s3["input"])) == 0
    killed["stray_left"] = fs.exists(stray)
    # Fit a codebook in the bucket (reads shards, writes tensors/JSON/report/plots there). The fit is
    # not yet bit-reproducible run to run (issue 14, separate work), so the downstream stages use
    # the local run's codebook, copied into the bucket, to compare like with like.
    fit = _steps(data)[0]
    assert cli([*fit, "--out", f"{data}/codebook_fit"]) == 0
    for name in ("codebook.safetensors", "codebook.json"):
        fs.write_bytes(fs.join(data, "codebook", name), (local_run / "codebook" / name).read_bytes())
    for argv in _steps(data)[1:]:
        assert cli(argv) == 0, argv[0]
    # a second source read from the bucket (NAVSIM logs + sensor blobs)
    assert cli(_extract(data, f"s3://{BUCKET}/input/nuplan", "nuplan")) == 0
    return data, killed


def test_kill_then_rerun_commits_everything_once(s3_run):
    data, killed = s3_run
    assert killed["returncode"] == -signal.SIGKILL and not killed["has_manifest"]
    assert killed["tokenize_rc"] == 2
    assert not killed["stray_left"]
    stage_dir = fs.join(data, "extract", "waymo_e2e")
    manifest = json.loads(fs.read_bytes(fs.join(stage_dir, "manifest.json")))
    assert manifest["complete"] and manifest["missing_partitions"] == []
    listed = sorted(str(p) for p in list_shards(stage_dir))
    assert listed == sorted(str(fs.join(stage_dir, "shards", n)) for n in stored_shards(stage_dir))


@pytest.mark.parametrize(
    "stage", ["extract/waymo_e2e", "tokenize/waymo_e2e", "annotate/waymo_e2e", "build", "extract/nuplan"]
)
def test_bucket_output_identical_to_local(s3_run, local_run, stage):
    data, _ = s3_run
    remote, local = read_table(fs.join(data, stage)), read_table(local_run / stage)
    assert remote.num_rows == local.num_rows > 0
    assert remote.equals(local)
    assert [p.name for p in list_shards(fs.join(data, stage))] == [p.name for p in list_shards(local_run / stage)]


def test_codebook_fitted_in_bucket(s3_run, local_run):
    from tokenizer.codebook import load_codebook

    data, _ = s3_run
    remote = load_codebook(f"{data}/codebook_fit")  # validated read through the fs layer
    local = load_codebook(local_run / "codebook")
    assert remote.meta.segment_count == local.meta.segment_count > 0  # same data read from the bucket
    assert remote.meta.datasets == local.meta.datasets and remote.k > 0
    report = json.loads(fs.read_bytes(fs.join(data, "codebook_fit", "report.json")))
    assert all(fs.is_file(fs.join(data, "codebook_fit", p)) for p in report["plots"])


def test_driver_sees_markers_written_by_other_processes(s3):
    """s3fs caches listings per process: a driver must not miss markers that workers wrote since."""
    import fsspec

    from pipelines.core.shards import committed_shards

    stage = f"s3://{BUCKET}/cache_check"
    fs.write_bytes(fs.join(stage, "_done", "a.json"), json.dumps({"shards": ["a-00000.parquet"]}).encode())
    assert list(committed_shards(stage)) == ["a"]  # lists (and caches) _done/
    other = fsspec.filesystem("s3", skip_instance_cache=True)  # another worker's client
    other.pipe(f"{BUCKET}/cache_check/_done/b.json", json.dumps({"shards": ["b-00000.parquet"]}).encode())
    assert sorted(committed_shards(stage)) == ["a", "b"]

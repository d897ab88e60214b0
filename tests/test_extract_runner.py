"""The extract stage on the engines: resume after SIGKILL, Ray/Beam equal local, the CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from _extract_util import REPO, assert_counts_add_up, extract

from pipelines.core.shards import read_table


def _replicated_nuplan(src, dst, copies):
    """A NAVSIM root with each log copied ``copies`` times (images shared through a symlink)."""
    for pkl in src.glob("navsim_logs/*/*.pkl"):
        target = dst / "navsim_logs" / pkl.parent.name
        target.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            shutil.copy(pkl, target / f"{pkl.stem}-{k:02d}.pkl")
    (dst / "sensor_blobs").symlink_to(src / "sensor_blobs")
    return dst


def test_sigkill_then_rerun_gives_the_uninterrupted_rows(sample_data, tmp_path):
    data = _replicated_nuplan(sample_data.nuplan, tmp_path / "nuplan", copies=12)  # 24 partitions
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "extract",
        "--dataset",
        "nuplan",
        "--input",
        str(data),
        "--out",
        str(out),
        "--engine",
        "local",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / "extract" / "nuplan" / "_done"
    deadline = time.monotonic() + 120
    while not (done.is_dir() and any(done.glob("*.json"))):
        assert proc.poll() is None, "the run ended before any partition finished"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(done.glob("*.json")))
    assert 0 < finished < 24, "the kill must land in the middle of the run"

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "24 partitions" in rerun.stdout and f"{finished} already done" in rerun.stdout
    summary, rows = extract("nuplan", data, tmp_path / "clean")
    assert_counts_add_up(summary)
    resumed = read_table(out / "extract" / "nuplan")
    assert resumed.equals(read_table(tmp_path / "clean"))
    assert len(set(resumed.column("sample_id").to_pylist())) == resumed.num_rows == len(rows)
    assert not list((out / "extract" / "nuplan" / "shards").glob(".*tmp"))


def test_ray_and_beam_engines_give_the_local_table(sample_data, tmp_path, ray_session):
    local, _ = extract("nuplan", sample_data.nuplan, tmp_path / "local")
    for engine in ("ray", "beam"):
        summary, _ = extract("nuplan", sample_data.nuplan, tmp_path / engine, engine=engine)
        assert (summary.written, summary.dropped, summary.failed) == (
            local.written,
            local.dropped,
            local.failed,
        )
        assert read_table(tmp_path / engine).equals(read_table(tmp_path / "local")), engine


def test_cli_writes_config_manifest_and_resumes(sample_data, tmp_path, capsys):
    from pipelines.cli import main

    args = [
        "extract",
        "--dataset",
        "waymo_e2e",
        "--input",
        str(sample_data.waymo_e2e),
        "--out",
        str(tmp_path),
        "--engine",
        "local",
        "--set",
        "units_per_partition=1",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    out = tmp_path / "extract" / "waymo_e2e"
    assert (out / "config.yaml").is_file() and (out / "manifest.json").is_file()
    assert "written" in first and "clip_incomplete" in first
    assert main(args) == 0
    assert "0 already done" not in capsys.readouterr().out
    with pytest.raises(Exception, match="different extract config"):
        main([*args, "--set", "image.quality=50"])
    assert main([*args, "--set", "image.quality=50", "--overwrite"]) == 0
    assert os.path.isdir(out / "shards")

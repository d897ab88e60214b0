"""Issue 12: one filesystem layer, the object-store commit protocol, completeness, Beam without a download.

Object-store behaviour is exercised on fsspec's in-memory filesystem
(``memory://``: no rename, like S3/GCS, and no server); the real
S3-compatible server test is ``tests/test_s3_pipeline.py``.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from test_core_runner import ToyStage

from pipelines.commands.common import exit_code
from pipelines.core import runner
from pipelines.core.runner import IncompleteInputError, check_complete, run_stage
from pipelines.core.shards import list_shards, read_table
from pipelines.io import fs


@pytest.fixture
def mem_url():
    url = f"memory://h12fs-{uuid.uuid4().hex}/out"
    yield url
    fs.remove_tree(url)


# --------------------------------------------------------------------------- the layer


def test_urls_keep_their_scheme_where_pathlib_would_collapse_it():
    assert str(Path("gs://bucket/wod")) == "gs:/bucket/wod"  # the bug of issue 12 item 2
    p = fs.as_path("gs://bucket/wod")
    assert fs.is_url(p) and str(p) == "gs://bucket/wod"
    assert str(fs.join("s3://bucket/data", "extract", "nuplan")) == "s3://bucket/data/extract/nuplan"
    assert str(p / "shards" / "a.parquet") == "gs://bucket/wod/shards/a.parquet"
    assert isinstance(fs.as_path("data/sample"), Path) and not fs.is_url("data/sample")
    assert fs.as_path("file:///tmp/x") == Path("/tmp/x")
    from pipelines.sources.base import ExtractConfig

    assert str(ExtractConfig(dataset="waymo_e2e", input="gs://bucket/wod").input_path) == "gs://bucket/wod"


def test_cli_path_arguments_keep_urls():
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["tokenize", "--data", "gs://bucket/root"])
    assert str(args.data) == "gs://bucket/root" and str(args.data / "extract") == "gs://bucket/root/extract"


def test_write_read_glob_remove_on_memory_fs(mem_url):
    fs.write_bytes(fs.join(mem_url, "a", "x.json"), b"{}")
    fs.write_parquet(pa.table({"v": [1, 2]}), fs.join(mem_url, "a", "t.parquet"))
    assert [p.name for p in fs.glob(fs.join(mem_url, "a"), "*.parquet")] == ["t.parquet"]
    assert fs.read_parquet(fs.join(mem_url, "a", "t.parquet")).column("v").to_pylist() == [1, 2]
    assert fs.cat_many([fs.join(mem_url, "a", "x.json"), fs.join(mem_url, "a", "nope.json")]) == [b"{}", None]
    fs.remove_tree(fs.join(mem_url, "a"))
    assert not fs.exists(fs.join(mem_url, "a", "x.json"))


# --------------------------------------------------------------------------- commit protocol


def test_object_store_run_uses_unique_names_and_matches_local(tmp_path, mem_url):
    local = run_stage(ToyStage(), tmp_path, max_rows=2, progress=False)
    remote = run_stage(ToyStage(), mem_url, max_rows=2, progress=False)
    assert (remote.written, remote.dropped, remote.failed) == (local.written, local.dropped, local.failed)
    shards = list_shards(mem_url)
    assert [p.name for p in shards] == [p.name for p in list_shards(tmp_path)]  # names stay deterministic
    assert len({p.parent.name for p in shards}) == 3  # one unique attempt prefix per partition
    assert all(len(p.parent.name) == 12 and p.parent.parent.name == "shards" for p in shards)
    assert read_table(mem_url).equals(read_table(tmp_path))
    manifest = json.loads(fs.read_bytes(fs.join(mem_url, "manifest.json")))
    assert manifest["complete"] and manifest["missing_partitions"] == []


def test_readers_trust_markers_only_and_rerun_collects_garbage(mem_url):
    first = run_stage(ToyStage(crash_on="p1"), mem_url, progress=False)
    assert [p.partition for p in first.crashed] == ["p1"]
    # objects of a killed attempt (no marker) and a stray object: present, but not trusted
    junk = [fs.join(mem_url, "shards", n) for n in ("0123456789ab/p1-00000.parquet", "ffffffffffff/p0-00000.parquet")]
    for j in junk:
        fs.write_parquet(pa.table({"sample_id": ["ghost"], "value": [0]}), j)
    assert not {str(j) for j in junk} & {str(p) for p in list_shards(mem_url)}
    assert "ghost" not in read_table(mem_url).column("sample_id").to_pylist()
    with pytest.raises(IncompleteInputError, match="p1"):
        check_complete(mem_url)
    second = run_stage(ToyStage(), mem_url, progress=False)
    assert second.ok and [p.skipped for p in second.partitions] == [True, False, True]
    assert not any(fs.exists(j) for j in junk)  # garbage-collected by the rerun
    from pipelines.core.shards import stored_shards

    listed = {str(p) for p in list_shards(mem_url)}
    assert {str(fs.join(mem_url, "shards", n)) for n in stored_shards(mem_url)} == listed
    assert check_complete(mem_url)["complete"]


def test_partition_crash_removes_its_own_objects(mem_url):
    run_stage(ToyStage(crash_on="p2", per_part=7), mem_url, max_rows=1, progress=False)
    from pipelines.core.shards import stored_shards

    assert not [n for n in stored_shards(mem_url) if n.split("/")[-1].startswith("p2-")]


# --------------------------------------------------------------------------- completeness


def test_markers_the_driver_cannot_see_make_the_run_fail(tmp_path, monkeypatch, capsys):
    """Workers without a shared file system: markers land on their own disks, not the driver's."""
    elsewhere = tmp_path / "worker_disk"
    real_write = runner.write_marker

    def write_marker(out_dir, pid, payload):
        real_write(elsewhere if pid == "p1" else out_dir, pid, payload)

    monkeypatch.setattr(runner, "write_marker", write_marker)
    summary = run_stage(ToyStage(), tmp_path / "out", progress=False)
    assert summary.missing == ["p1"] and not summary.ok
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["missing_partitions"] == ["p1"]
    assert exit_code(summary) == 1
    printed = capsys.readouterr().out
    assert "p1" in printed and "shared file system" in printed
    with pytest.raises(IncompleteInputError, match=r"p1.*shared file system"):
        check_complete(tmp_path / "out")
    assert check_complete(tmp_path / "out", allow_incomplete=True)["complete"] is False


def test_interrupted_stage_without_manifest_is_refused(tmp_path):
    run_stage(ToyStage(), tmp_path, progress=False)
    (tmp_path / "manifest.json").unlink()  # driver killed after the partitions, before the manifest
    with pytest.raises(IncompleteInputError, match="interrupted"):
        check_complete(tmp_path)


def test_downstream_command_refuses_incomplete_input_unless_allowed(tmp_path):
    from test_codebook_stage import write_extract

    from pipelines.cli import main

    write_extract(tmp_path, "waymo_e2e", 120, seed=3)
    d = tmp_path / "extract" / "waymo_e2e"
    (d / "_done").mkdir()
    for shard in sorted((d / "shards").glob("*.parquet")):  # committed partitions; one never arrived
        (d / "_done" / f"{shard.name.split('-')[0]}.json").write_text(json.dumps({"shards": [shard.name]}))
    (d / "manifest.json").write_text(json.dumps({"stage": "extract", "complete": False, "missing_partitions": ["seg-7"]}))
    argv = ["codebook", "--data", str(tmp_path), "--k", "16", "--out", str(tmp_path / "cb")]
    assert main(argv) == 2 and not (tmp_path / "cb").exists()
    assert main([*argv, "--allow-incomplete"]) == 0
    assert (tmp_path / "cb" / "codebook.json").is_file()


# --------------------------------------------------------------------------- Beam, locally, offline


def test_beam_local_run_makes_no_network_attempt_and_logs_no_error(tmp_path, monkeypatch, caplog):
    from apache_beam.runners.portability import prism_runner

    def no_prism(*a, **k):
        raise AssertionError("PrismRunner must not be tried (it downloads a binary)")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", no_prism)
    real_connect = socket.socket.connect

    def loopback_only(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
            raise AssertionError(f"network attempt to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    caplog.set_level(logging.INFO)
    local = run_stage(ToyStage(), tmp_path / "local", progress=False)
    for opts in ([], ["--runner=DirectRunner"]):
        out = tmp_path / f"beam{len(opts)}"
        beam = run_stage(ToyStage(), out, engine="beam", beam_options=opts)
        assert beam.ok and read_table(out).equals(read_table(tmp_path / "local"))
        assert beam.written == local.written
    noisy = [r.getMessage() for r in caplog.records if "prism" in r.getMessage().lower()
             or "falling back" in r.getMessage().lower() or r.levelno >= logging.ERROR]  # fmt: skip
    assert noisy == []


def test_nuscenes_from_a_url_is_refused_with_the_reason():
    from pipelines.sources import SourceError
    from pipelines.sources.base import ExtractConfig
    from pipelines.sources.nuscenes import NuScenesSource

    cfg = ExtractConfig(dataset="nuscenes", input="memory://h12fs-nus/dataroot")
    fs.write_bytes("memory://h12fs-nus/dataroot/v1.0-mini/scene.json", b"[]")
    try:
        with pytest.raises(SourceError, match="local dataroot"):
            NuScenesSource(cfg)
    finally:
        fs.remove_tree("memory://h12fs-nus")


def test_beam_launcher_reads_markers_through_the_fs_layer(tmp_path, mem_url):
    """Output at a URL (an in-memory object store here): the launcher finds the workers' markers there."""
    local = run_stage(ToyStage(), tmp_path, progress=False)
    beam = run_stage(ToyStage(), mem_url, engine="beam")
    assert beam.ok and not beam.missing and beam.written == local.written
    assert read_table(mem_url).equals(read_table(tmp_path))
    assert json.loads(fs.read_bytes(fs.join(mem_url, "manifest.json")))["complete"]

"""The VLM annotation cache on an object store (moto's S3 server on 127.0.0.1, s3fs via fsspec).

S3 has no append: every flush batch becomes one immutable object. What must hold
there as on a local disk: every sample exactly once, no committed answer re-sent
after a SIGKILL, and the resumed output equal to an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from annotators.cache import ResultCache, encode_line, iter_records
from annotators.testserver import FakeVLMServer, FaultConfig
from pipelines.core.shards import read_table
from pipelines.io import fs
from tests.test_annotate_stage import COMPARE, MODEL, _cli, write_extract

server_mod = pytest.importorskip("moto.server", reason="moto[server] (dev extra) runs the S3 test server")
s3fs = pytest.importorskip("s3fs", reason="s3fs (dev extra) not installed")

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "annotate-cache"


@pytest.fixture(scope="module")
def s3():
    srv = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        # fsspec caches filesystem instances with their endpoint (maybe another test's server)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            s3fs.S3FileSystem().mkdir(BUCKET)
            yield s3fs.S3FileSystem()
        finally:
            srv.stop()
            s3fs.S3FileSystem.clear_instance_cache()


def test_segments_are_immutable_objects_merged_on_load(s3):
    url = f"s3://{BUCKET}/unit/_cache/p000"
    a, b = ResultCache(url), ResultCache(url)  # two writers
    a.append("k1", {"status": "failed", "error": "ServerError: x"})
    b.append("k1", {"status": "ok", "n": 1})
    a.append("k1", {"status": "ok", "n": 2})
    b.append("k2", {"status": "failed", "error": "Timeout: y"})
    a.close(), b.close()
    objs = sorted(s3.ls(f"{BUCKET}/unit/_cache/p000"))
    assert len(objs) == 4 and all(o.endswith(".jsonl") for o in objs)  # one object per batch
    assert str(a.segment).startswith("s3://") and not Path("s3:").exists()  # no local "s3:/..." dir
    got, stats = ResultCache(url).load()
    assert stats.segments == 4 and stats.lines == 4
    # as locally: segments in writer-creation order (a first), batches in write order
    assert got["k1"] == {"status": "ok", "n": 2} and got["k2"]["status"] == "failed"

    # concurrent async commits share one object (one PUT) per flush
    c = ResultCache(url)

    async def many() -> None:
        await asyncio.gather(*(c.commit(f"c{i}", {"status": "ok", "i": i}) for i in range(20)))

    asyncio.run(many())
    c.close()
    assert len(s3.ls(f"{BUCKET}/unit/_cache/p000")) < 4 + 20
    got, _ = ResultCache(url).load()
    assert all(got[f"c{i}"]["i"] == i for i in range(20))

    # an object with a corrupt line (written by hand) is skipped line by line, like a local segment
    bad = encode_line("k3", {"status": "ok"}).replace(b'"ok"', b'"OK"')
    s3.pipe(f"{BUCKET}/unit/_cache/p000/zzz.jsonl", bad + encode_line("k4", {"status": "ok"}))
    got, stats = ResultCache(url).load()
    assert "k3" not in got and got["k4"] == {"status": "ok"} and stats.corrupt == 1


def _put_extract(s3, tmp: Path, data_url: str) -> None:
    in_dir = write_extract(tmp, 48, 12)
    s3.put(str(in_dir) + "/", data_url.removeprefix("s3://") + "/extract/nuscenes/", recursive=True)


def _committed(cache_url: str) -> set[str]:
    return {
        k for d in fs.listdir(cache_url) for k, v in iter_records(d) if v["status"] == "ok"
    }  # fmt: skip


@pytest.mark.slow
def test_vlm_annotate_on_s3_sigkill_then_rerun(s3, tmp_path):
    """`annotate --data s3://...` with the vlm annotator: cache in the bucket, kill, exact resume."""
    a, b = f"s3://{BUCKET}/a", f"s3://{BUCKET}/b"
    _put_extract(s3, tmp_path / "a", a)
    _put_extract(s3, tmp_path / "b", b)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cache = f"{a}/annotate/nuscenes/_cache"
    with FakeVLMServer(FaultConfig(model=MODEL, latency_s=0.1)) as srv:
        proc = subprocess.Popen(_cli(a, srv.base_url, "--max-in-flight", "3"), cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if len(_committed(cache)) >= 8:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        committed = _committed(cache)
        assert 8 <= len(committed) < 48, "kill came too late or too early to test resume"
        n_before = len(srv.log)
        rerun = subprocess.run(_cli(a, srv.base_url, "--max-in-flight", "8"), cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=180)  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        resent = srv.keys()[n_before:]
        assert not (set(resent) & committed), "rerun re-sent requests whose results were committed"
        assert len(resent) == len(set(resent)) == 48 - len(committed)
        clean = subprocess.run(_cli(b, srv.base_url, "--max-in-flight", "8"), cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=180)  # fmt: skip
        assert clean.returncode == 0, clean.stderr[-2000:]
    assert not (tmp_path / "s3:").exists()  # nothing went to a local "s3:/bucket/..." directory
    assert len(_committed(cache)) == 48  # every answer is in the bucket's cache
    got = read_table(f"{a}/annotate/nuscenes", columns=COMPARE).sort_by("sample_id")
    want = read_table(f"{b}/annotate/nuscenes", columns=COMPARE).sort_by("sample_id")
    assert got.num_rows == 48 and len(set(got.column("sample_id").to_pylist())) == 48
    assert got.equals(want)

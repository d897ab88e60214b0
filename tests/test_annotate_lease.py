"""The output lease of `drivevla annotate` (issue 13 item 2) on a local and an S3 file system."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from annotators.lease import LEASE_DIR, LeaseHeld, OutputLease


def _contend(url: str, n: int) -> tuple[list[OutputLease], list[str]]:
    """``n`` contenders start at the same moment; returns the winners and the refusals."""
    barrier = threading.Barrier(n)
    won: list[OutputLease] = []
    refused: list[str] = []

    def one() -> None:
        lease = OutputLease(url, ttl_s=30)
        barrier.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won, refused


def test_one_holder_among_simultaneous_contenders(tmp_path):
    url = str(tmp_path / "out")
    for _ in range(3):
        won, refused = _contend(url, 4)
        assert len(won) == 1 and len(refused) == 3
        assert all("another annotate run is writing to" in r for r in refused)
        won[0].release()
    assert not (tmp_path / "out" / LEASE_DIR).exists()  # released: nothing left behind


def test_lease_of_a_killed_process_is_taken_over_at_once(tmp_path):
    url = str(tmp_path / "out")
    code = (
        "import sys, time; from annotators.lease import OutputLease; "
        f"OutputLease({url!r}, ttl_s=600).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeld, match=f"pid {proc.pid}"):
        OutputLease(url, tries=2).acquire()
    proc.kill()
    proc.wait()
    OutputLease(url).acquire().release()  # the dead process's lease is stale right away


def test_expired_lease_of_another_machine_is_removed(tmp_path):
    d = tmp_path / "out" / LEASE_DIR
    d.mkdir(parents=True)
    alive = {"host": "other-node", "pid": 1, "started": time.time(), "expires": time.time() + 60,
             "held": True}  # fmt: skip
    (d / "a.json").write_text(json.dumps(alive))
    with pytest.raises(LeaseHeld, match="host other-node"):
        OutputLease(str(tmp_path / "out")).acquire()
    (d / "a.json").write_text(json.dumps(dict(alive, expires=time.time() - 1)))
    lease = OutputLease(str(tmp_path / "out")).acquire()
    assert [p.name for p in d.iterdir()] == [f"{lease.id}.json"]
    lease.release()


def test_held_lease_is_renewed(tmp_path):
    lease = OutputLease(str(tmp_path / "out"), ttl_s=0.4).acquire()
    try:
        time.sleep(1.0)  # longer than the ttl: only renewal keeps it live
        with pytest.raises(LeaseHeld):
            OutputLease(str(tmp_path / "out"), tries=2).acquire()
    finally:
        lease.release()


def test_lease_on_s3(monkeypatch):
    """The same protocol on an object store (moto's S3 server, s3fs via fsspec)."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] (dev extra) not installed")
    s3fs = pytest.importorskip("s3fs", reason="s3fs (dev extra) not installed")
    srv = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                     "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("leases")
        url = "s3://leases/data/annotate/nuscenes"
        won, refused = _contend(url, 3)
        assert len(won) == 1 and len(refused) == 2 and "s3://leases" in refused[0]
        won[0].release()
        OutputLease(url).acquire().release()  # free again after release
    finally:
        srv.stop()
        # fsspec caches filesystem instances with the endpoint they were made with: drop them,
        # so later tests with another S3 endpoint do not talk to this stopped server
        s3fs.S3FileSystem.clear_instance_cache()

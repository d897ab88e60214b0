"""Ray Client connection retries in pipelines.core.ray_engine (the loop alone; the real proxy is in test_ray_cluster.py).

The errors are the ones Ray's client raises (ray/util/client/worker.py, ``_server_init``) with the
messages its proxy sends (ray/util/client/server/proxier.py, ``Datapath``).
"""

from __future__ import annotations

import logging

import pytest
import ray

from pipelines.core import ray_engine

START_FAILED = (
    "Initialization failure from server:\nTraceback (most recent call last):\n"
    "RuntimeError: Starting Ray client server failed. See ray_client_server_23000.err for detailed logs.\n"
)
NO_BACKEND = (
    "Initialization failure from server:\nTraceback (most recent call last):\n"
    "RuntimeError: Proxy failed to Connect to backend! Check `ray_client_server.err` and "
    "`ray_client_server_23000.err` on the head node of the cluster for the relevant logs.\n"
)


@pytest.fixture
def fake_init(monkeypatch):
    """``ray.init`` answering from a script of errors (None: connected); records each address."""
    calls: list[str] = []
    script: list[BaseException | None] = []

    def init(address=None, **kwargs):
        calls.append(address)
        outcome = script.pop(0)
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(ray, "init", init)
    return calls, script


@pytest.mark.parametrize("message", [START_FAILED, NO_BACKEND])
def test_a_client_server_that_failed_to_start_is_retried(fake_init, caplog, message):
    calls, script = fake_init
    script += [ConnectionAbortedError(message), None]
    with caplog.at_level(logging.WARNING, logger="pipelines.core.ray_engine"):
        ray_engine._connect("ray://head:10001", backoff_s=0)
    assert calls == ["ray://head:10001"] * 2
    assert "attempt 1 of 3" in caplog.text and "ray://head:10001" in caplog.text


def test_retries_end_with_the_proxys_error(fake_init, caplog):
    calls, script = fake_init
    script += [ConnectionAbortedError(START_FAILED)] * 3
    with caplog.at_level(logging.WARNING, logger="pipelines.core.ray_engine"):
        with pytest.raises(ConnectionAbortedError, match="Starting Ray client server failed"):
            ray_engine._connect("ray://head:10001", backoff_s=0)
    assert len(calls) == ray_engine.CLIENT_CONNECT_ATTEMPTS == 3
    assert "attempt 2 of 3" in caplog.text and "attempt 3 of 3" not in caplog.text


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ("head:6379", ConnectionAbortedError(START_FAILED)),  # not Ray Client: nothing of this kind to retry
        ("ray://head:10001", ConnectionAbortedError("Initialization failure from server:\nversion mismatch")),
        ("ray://head:10001", ConnectionError("ray client connection timeout")),
    ],
)
def test_other_connection_errors_are_raised_at_once(fake_init, address, error):
    calls, script = fake_init
    script += [error]
    with pytest.raises(type(error)):
        ray_engine._connect(address, backoff_s=0)
    assert calls == [address]

"""The async client against the local test server: error classes, retries, AIMD, pre-flight, secrets."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import pytest

from annotators.client import AnnotationError, PreflightError, VLMClient
from annotators.config import ClientConfig, PromptConfig
from annotators.parsing import parse_answer
from annotators.prompts import build_prompt
from annotators.request import build_chat_request
from annotators.synthetic import make_rows
from annotators.testserver import FakeVLMServer, FaultConfig

MODEL = "test-model"


@pytest.fixture(scope="module")
def prompts():
    return [build_prompt(r, PromptConfig()) for r in make_rows(8, width=32, height=24)]


def _cfg(*urls: str, **kw) -> ClientConfig:
    base = dict(
        endpoints=urls, model=MODEL, max_in_flight=8, backoff_base_s=0.01, backoff_max_s=0.05,
        timeout_base_s=2.0, timeout_per_token_s=0.0, connect_timeout_s=2.0, latency_tolerance=0.0,
    )  # fmt: skip
    base.update(kw)
    return ClientConfig(**base)


def _run(cfg: ClientConfig, reqs, parse=parse_answer):
    async def go():
        async with VLMClient(cfg) as c:
            out = await asyncio.gather(
                *(c.complete(r, parse) for r in reqs), return_exceptions=True
            )
            return out, c

    return asyncio.run(go())


def test_ok_answer_matches_hint_and_reports_usage(prompts):
    with FakeVLMServer(FaultConfig(model=MODEL)) as srv:
        cfg = _cfg(srv.base_url)
        (res,), _ = _run(cfg, [build_chat_request(prompts[1], cfg)])
    comp, parsed = res
    assert (parsed.lateral, parsed.longitudinal) == prompts[1].hint
    assert comp.finish_reason == "stop" and comp.attempts == 1 and comp.completion_tokens > 0
    assert comp.server == srv.base_url


@pytest.mark.parametrize(
    ("script", "cls", "attempts"),
    [
        (("500", "503", "ok"), None, 3),
        (("429", "ok"), None, 2),
        (("malformed_body", "ok"), None, 2),
        (("context",), "ContextTooLong", 1),
        (("malformed_content", "malformed_content"), "MalformedAnswer", 2),
        (("malformed_content", "ok"), None, 2),
        (("length", "length"), "LengthExceeded", 2),
        (("500",) * 10, "ServerError", 4),
    ],
)
def test_error_classes_and_retries(prompts, script, cls, attempts):
    cfg0 = _cfg("http://x", max_attempts=4)
    req = build_chat_request(prompts[0], cfg0)
    with FakeVLMServer(
        FaultConfig(model=MODEL, script={req.key: script}, retry_after_s=0.01)
    ) as srv:
        cfg = dataclasses.replace(cfg0, endpoints=(srv.base_url,))
        (res,), _ = _run(cfg, [req])
        got = [r.fault for r in srv.log if r.key == req.key]
    assert len(got) == attempts
    if cls is None:
        assert res[0].attempts == attempts
    else:
        assert (
            isinstance(res, AnnotationError) and res.error_class == cls and res.attempts == attempts
        )


def test_length_retried_once_with_larger_budget(prompts):
    cfg0 = _cfg("http://x", max_tokens=300, length_retry_factor=2.0)
    req = build_chat_request(prompts[0], cfg0)
    with FakeVLMServer(FaultConfig(model=MODEL, script={req.key: ("length", "ok")})) as srv:
        (res,), _ = _run(dataclasses.replace(cfg0, endpoints=(srv.base_url,)), [req])
        budgets = [r.max_tokens for r in srv.log]
    assert budgets == [300, 600] and res[0].max_tokens == 600


def test_hang_times_out_and_is_retried(prompts):
    cfg0 = _cfg("http://x", timeout_base_s=0.3)
    req = build_chat_request(prompts[0], cfg0)
    with FakeVLMServer(FaultConfig(model=MODEL, script={req.key: ("hang", "ok")})) as srv:
        t = time.perf_counter()
        (res,), client = _run(dataclasses.replace(cfg0, endpoints=(srv.base_url,)), [req])
    assert res[0].attempts == 2 and client.stats.errors["Timeout"] == 1
    assert time.perf_counter() - t < 3


def test_retry_after_is_honoured(prompts):
    cfg0 = _cfg("http://x")
    req = build_chat_request(prompts[0], cfg0)
    with FakeVLMServer(
        FaultConfig(model=MODEL, script={req.key: ("429", "ok")}, retry_after_s=0.4)
    ) as srv:
        _run(dataclasses.replace(cfg0, endpoints=(srv.base_url,)), [req])
        t = [r.t for r in srv.log]
    assert t[1] - t[0] >= 0.38


def test_backoff_releases_the_slot(prompts):
    """With one slot, a request sleeping in backoff must not block another request."""
    cfg0 = _cfg("http://x", max_in_flight=1, backoff_base_s=0.5, backoff_max_s=0.5)
    a, b = (build_chat_request(p, cfg0) for p in prompts[:2])
    faults = FaultConfig(model=MODEL, latency_s=0.01, script={a.key: ("500", "ok")})
    with FakeVLMServer(faults) as srv:
        _run(dataclasses.replace(cfg0, endpoints=(srv.base_url,)), [a, b])
        order = [(r.key, r.status) for r in srv.log]
    # b is served while a sleeps (>= 0.25 s of jittered backoff) between its two attempts
    assert order == [(a.key, 500), (b.key, 200), (a.key, 200)]


def test_aimd_shrinks_under_429_and_recovers(prompts):
    cfg0 = _cfg(
        "http://x", max_in_flight=32, max_attempts=50, backoff_base_s=0.005, backoff_max_s=0.02
    )
    reqs = [
        dataclasses.replace(build_chat_request(prompts[i % 8], cfg0), key=f"k{i:04d}")
        for i in range(400)
    ]
    faults = FaultConfig(model=MODEL, latency_s=0.02, capacity=6, retry_after_s=None)
    with FakeVLMServer(faults) as srv:
        cfg = dataclasses.replace(cfg0, endpoints=(srv.base_url,))

        async def go():
            async with VLMClient(cfg) as c:
                first = await asyncio.gather(*(c.complete(r, parse_answer) for r in reqs[:200]))
                low = c.dispatcher.limit
                srv.set_faults(capacity=None)  # the server recovers
                second = await asyncio.gather(*(c.complete(r, parse_answer) for r in reqs[200:]))
                return first + second, low, c.dispatcher.limit, c.stats

        results, low, high, stats = asyncio.run(go())
    assert len(results) == 400 and stats.errors["RateLimited"] > 0
    assert low <= 12, f"limit did not shrink under 429s: {low}"
    assert high > low + 4, f"limit did not recover: {low} -> {high}"


def test_load_spreads_over_endpoints(prompts):
    cfg0 = _cfg("http://x", max_in_flight=8)
    reqs = [
        dataclasses.replace(build_chat_request(prompts[i % 8], cfg0), key=f"s{i:03d}")
        for i in range(40)
    ]
    with (
        FakeVLMServer(FaultConfig(model=MODEL, latency_s=0.02)) as s1,
        FakeVLMServer(FaultConfig(model=MODEL, latency_s=0.02)) as s2,
    ):
        out, _ = _run(dataclasses.replace(cfg0, endpoints=(s1.base_url, s2.base_url)), reqs)
        n1, n2 = len(s1.log), len(s2.log)
    assert all(not isinstance(r, Exception) for r in out)
    assert n1 + n2 == 40 and min(n1, n2) >= 12


def test_preflight_fails_fast_with_instructions():
    with FakeVLMServer(FaultConfig(model="other-model")) as srv:
        cfg = _cfg(srv.base_url)

        async def go():
            async with VLMClient(cfg) as c:
                await c.preflight()

        with pytest.raises(PreflightError) as err:
            asyncio.run(go())
    msg = str(err.value)
    assert "other-model" in msg and "vllm serve" in msg and "--annotator rules" in msg
    with pytest.raises(PreflightError, match="no answer"):
        asyncio.run(_preflight_unreachable())


async def _preflight_unreachable():
    async with VLMClient(_cfg("http://127.0.0.1:9/v1", connect_timeout_s=0.5)) as c:
        await c.preflight()


def test_api_key_sent_but_never_logged(prompts, monkeypatch, caplog):
    secret = "sk-test-SECRET-0123456789"
    monkeypatch.setenv("DRIVEVLA_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    cfg0 = _cfg("http://x", api_key_env="DRIVEVLA_TEST_KEY", max_attempts=2)
    req = build_chat_request(prompts[0], cfg0)
    bad = dataclasses.replace(req, key="bad")
    with FakeVLMServer(
        FaultConfig(model=MODEL, api_key=secret, script={"bad": ("500", "500")})
    ) as srv:
        cfg = dataclasses.replace(cfg0, endpoints=(srv.base_url,))
        (ok, failed), client = _run(cfg, [req, bad])
        text = repr(client) + str(failed)
    assert not isinstance(ok, Exception)  # the key was sent (the server checks it)
    assert isinstance(failed, AnnotationError)
    assert secret not in caplog.text and secret not in text
    assert any(r.name.startswith("annotators") for r in caplog.records)  # we did log something


def test_wrong_api_key_is_a_permanent_auth_error(prompts, monkeypatch):
    monkeypatch.setenv("DRIVEVLA_TEST_KEY", "wrong")
    cfg0 = _cfg("http://x", api_key_env="DRIVEVLA_TEST_KEY")
    req = build_chat_request(prompts[0], cfg0)
    with FakeVLMServer(FaultConfig(model=MODEL, api_key="right")) as srv:
        (res,), _ = _run(dataclasses.replace(cfg0, endpoints=(srv.base_url,)), [req])
    assert isinstance(res, AnnotationError) and res.error_class == "AuthError" and len(srv.log) == 0


@pytest.mark.parametrize("status", [401, 500])
def test_key_echoed_at_every_offset_never_leaks(prompts, monkeypatch, status):
    """Issue 13 item 4: the server quotes the key at offsets 0..299 of its error body, so
    some quotes straddle the 200-character snippet cut; no prefix of the key may survive."""
    secret = "sk-test-ECHOED-0123456789abcdef"
    monkeypatch.setenv("DRIVEVLA_TEST_KEY", secret)
    cfg0 = _cfg("http://x", api_key_env="DRIVEVLA_TEST_KEY", max_attempts=1, max_in_flight=16)
    base = build_chat_request(prompts[0], cfg0)
    reqs = [dataclasses.replace(base, key=f"echo{i:04d}") for i in range(300)]
    faults = FaultConfig(model=MODEL, echo_key_error=True, always_status=status)
    with FakeVLMServer(faults) as srv:
        out, _ = _run(dataclasses.replace(cfg0, endpoints=(srv.base_url,)), reqs)
    assert all(isinstance(e, AnnotationError) for e in out)
    assert {e.error_class for e in out} == {"AuthError" if status == 401 else "ServerError"}
    prefix = secret[:8]  # "sk-test-": any leaked start of the key contains it
    leaks = [e.message for e in out if prefix in e.message or prefix in str(e)]
    assert not leaks, leaks[:2]
    assert sum("***" in e.message for e in out) > 100  # the quotes inside the snippet were masked


def test_preflight_401_says_the_key_was_refused(monkeypatch):
    monkeypatch.setenv("DRIVEVLA_TEST_KEY", "wrong-key-0123456789")
    with FakeVLMServer(FaultConfig(model=MODEL, api_key="right")) as srv:
        cfg = _cfg(srv.base_url, api_key_env="DRIVEVLA_TEST_KEY")

        async def go():
            async with VLMClient(cfg) as c:
                await c.preflight()

        with pytest.raises(PreflightError) as err:
            asyncio.run(go())
        monkeypatch.delenv("DRIVEVLA_TEST_KEY")
        with pytest.raises(PreflightError) as err2:
            asyncio.run(go())
    msg = str(err.value)
    assert "API key was refused" in msg and "$DRIVEVLA_TEST_KEY" in msg and "HTTP 401" in msg
    assert "start an OpenAI-compatible server" not in msg.lower() and "wrong-key" not in msg
    assert "DRIVEVLA_TEST_KEY is not set" in str(err2.value)


def test_dead_endpoint_leaves_rotation_and_is_probed_back(prompts):
    """One of two endpoints answers 503 to everything: it leaves the rotation after a few
    failures (requests go to the live one), is probed while dead, and returns once healthy."""
    cfg0 = _cfg("http://x", max_in_flight=8, max_attempts=4, endpoint_down_after=3,
                endpoint_probe_s=0.15, endpoint_probe_max_s=0.3)  # fmt: skip
    reqs = [
        dataclasses.replace(build_chat_request(prompts[i % 8], cfg0), key=f"d{i:04d}")
        for i in range(240)
    ]
    with (
        FakeVLMServer(FaultConfig(model=MODEL, latency_s=0.02)) as live,
        FakeVLMServer(FaultConfig(model=MODEL, latency_s=0.0, always_status=503,
                                  retry_after_s=None)) as dead,  # fmt: skip
    ):
        cfg = dataclasses.replace(cfg0, endpoints=(live.base_url, dead.base_url))

        async def go():
            async with VLMClient(cfg) as c:
                first = await asyncio.gather(
                    *(c.complete(r, parse_answer) for r in reqs[:120]), return_exceptions=True
                )
                n_dead = len(dead.log)
                live_eps = c.dispatcher.live_endpoints
                dead.set_faults(always_status=None)  # the dead server comes back
                await asyncio.sleep(0.4)
                second = await asyncio.gather(
                    *(c.complete(r, parse_answer) for r in reqs[120:]), return_exceptions=True
                )
                return first, second, n_dead, live_eps, c.dispatcher.live_endpoints

        first, second, n_dead, live_mid, live_end = asyncio.run(go())
        back = [r for r in dead.log if r.status == 200]
    assert not [r for r in first + second if isinstance(r, Exception)]
    assert live_mid == [live.base_url]  # out of rotation while dead
    # 120 requests over ~0.3 s: without the breaker the instantly answering dead endpoint
    # would draw about half of all attempts; here a few before it is taken out, then probes.
    assert 3 <= n_dead <= 30, n_dead
    assert live_end == [live.base_url, dead.base_url] and len(back) >= 10


def test_httpx_request_logs_are_quiet_at_info(prompts, caplog):
    import annotators.client as client_mod

    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    logging.getLogger().setLevel(logging.INFO)
    caplog.set_level(logging.INFO)  # what the CLI sets up without -v
    client_mod.quiet_http_logs()
    with FakeVLMServer(FaultConfig(model=MODEL)) as srv:
        cfg = _cfg(srv.base_url)
        reqs = [dataclasses.replace(build_chat_request(prompts[0], cfg), key=f"q{i}") for i in range(5)]
        out, _ = _run(cfg, reqs)
    assert all(not isinstance(r, Exception) for r in out)
    assert not [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]


def test_proxy_from_the_environment_is_used(prompts, monkeypatch):
    """HTTP_PROXY is honoured (the test server also answers proxy-form requests)."""
    with FakeVLMServer(FaultConfig(model=MODEL)) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        cfg = _cfg("http://annotation-upstream.invalid:8000/v1")  # only reachable via the proxy
        (res,), _ = _run(cfg, [build_chat_request(prompts[3], cfg)])
    assert not isinstance(res, Exception), res
    assert proxy.proxied == 1 and res[1].lateral == prompts[3].hint[0]

"""Async OpenAI-compatible chat client: several endpoints, adaptive concurrency, classified retries.

Error classes (DESIGN.md section 6):

* permanent, not retried: 400/413/422 (``ContextTooLong`` when the body says
  so, else ``BadRequest``), 401/403 (``AuthError``), 404 (``NotFound``);
* transient, retried up to ``max_attempts`` with jittered exponential backoff
  (the slot is released while sleeping; ``Retry-After`` honoured): 429
  (``RateLimited``), 5xx (``ServerError``), timeouts (``Timeout``), connection
  failures (``ConnectionError``), an unreadable response body
  (``MalformedResponse``);
* ``finish_reason=length``: retried once with ``max_tokens * length_retry_factor``
  (then ``LengthExceeded``);
* an answer the parser rejects: retried once (then ``MalformedAnswer``).

The API key comes from the environment variable named in the config and only
ever travels in the ``Authorization`` header; nothing here logs headers, and
error texts are redacted before they are cut to a snippet.

Several endpoints share the load (:mod:`annotators.aimd`); one that keeps
failing leaves the rotation and is probed back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from annotators.aimd import ERROR, NEUTRAL, OK, OVERLOAD, AIMDDispatcher
from annotators.config import ClientConfig
from annotators.parsing import ParseError
from annotators.request import ChatRequest

log = logging.getLogger(__name__)
T = TypeVar("T")
KEY_HEADER = "X-Request-Key"  # lets servers and tests correlate requests; carries no secret
_CONTEXT_HINTS = (
    "context length",
    "context_length",
    "maximum context",
    "too long",
    "max_model_len",
)
# The transport is aiohttp's client (aio-libs): TLS, proxies from the environment
# (HTTP(S)_PROXY, NO_PROXY with trust_env), chunked and compressed bodies, keep-alive
# pools. Chosen over httpx, also well kept, because it costs 3-4x less client CPU
# per request (0.28 vs 1.08 ms in the same run, 256 in flight, 137 KiB bodies), and
# at 256 requests in flight that CPU decides whether the client keeps up with the
# server (bench/annotate.py; README "Performance").
SNIPPET_CHARS = 200


class AnnotationError(Exception):
    """A request that ended without a usable answer; ``error_class`` is the counter key."""

    def __init__(self, error_class: str, message: str, attempts: int = 0) -> None:
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class
        self.message = message
        self.attempts = attempts


class PreflightError(RuntimeError):
    """No configured endpoint serves the configured model."""


@dataclass
class Completion:
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    attempts: int
    server: str
    max_tokens: int


@dataclass
class ClientStats:
    ok: int = 0
    failed: int = 0
    attempts: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # per attempt, by class


@dataclass
class _Reply:
    """A whole HTTP response (status, headers, body), read before the connection is reused."""

    status: int
    headers: Any  # case-insensitive mapping
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def _retry_after(resp: _Reply) -> float:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else 0.0
    except ValueError:
        return 0.0  # HTTP-date form: fall back to our own backoff


def _env_proxy(url: str) -> tuple[Any, Any] | None:
    """The proxy (and its credentials) the environment sets for ``url``; None: direct."""
    from aiohttp.helpers import get_env_proxy_for_url
    from yarl import URL

    try:
        return get_env_proxy_for_url(URL(url))
    except LookupError:
        return None


def redact(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` masked (servers may echo a rejected key in their error body)."""
    return text.replace(secret, "***") if secret else text


def _snippet(resp: _Reply, secret: str | None) -> str:
    """The start of the body for an error message: redacted FIRST, then cut (a cut key
    straddling the limit would no longer match and leak its first characters)."""
    return " ".join(redact(resp.text, secret)[:SNIPPET_CHARS].split())


def quiet_http_logs() -> None:
    """httpx (used by other libraries here, e.g. huggingface_hub) logs every request at INFO;
    keep that out of normal runs (DEBUG still shows it)."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("httpx", "httpcore"):
            lg = logging.getLogger(name)
            if lg.level == logging.NOTSET:
                lg.setLevel(logging.WARNING)


class VLMClient:
    """One client per worker; use as ``async with VLMClient(cfg) as c: await c.complete(req, parse)``."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.urls = tuple(u.rstrip("/") for u in cfg.endpoints)
        self.dispatcher = AIMDDispatcher(
            self.urls,
            max_total=cfg.max_in_flight,
            min_per_endpoint=cfg.min_in_flight,
            initial_total=cfg.initial_in_flight or None,
            latency_tolerance=cfg.latency_tolerance,
            down_after=cfg.endpoint_down_after,
            probe_s=cfg.endpoint_probe_s,
            probe_max_s=cfg.endpoint_probe_max_s,
        )
        quiet_http_logs()
        self.stats = ClientStats()
        self._headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._secret = key or None  # only for masking it in error messages
        self._session: aiohttp.ClientSession | None = None  # made in the loop that uses it
        # Proxies from the environment (HTTP(S)_PROXY, NO_PROXY), looked up once per endpoint:
        # aiohttp's trust_env would look them (and ~/.netrc) up per request, in a thread.
        self._proxy = {u: _env_proxy(u) for u in self.urls}
        self._rng = random.Random()

    def __repr__(self) -> str:  # no headers: they hold the key
        return f"VLMClient(endpoints={list(self.urls)}, model={self.cfg.model!r})"

    async def __aenter__(self) -> VLMClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.cfg.max_in_flight + len(self.urls),  # the dispatcher bounds requests
                limit_per_host=0,
                ssl=ssl.create_default_context(),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                trust_env=False,  # proxies: self._proxy
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def timeout(self, max_tokens: int) -> aiohttp.ClientTimeout:
        """Connect timeout, and a read timeout scaled to the completion budget."""
        read = self.cfg.timeout_base_s + max_tokens * self.cfg.timeout_per_token_s
        return aiohttp.ClientTimeout(
            # a hard cap too: sock_read does not cover a server that stops reading the body
            total=self.cfg.connect_timeout_s + 2 * read,
            sock_connect=self.cfg.connect_timeout_s,
            sock_read=read,
        )

    async def _send(
        self, method: str, base: str, path: str, timeout: aiohttp.ClientTimeout, **kw: Any
    ) -> _Reply:
        """One request to endpoint ``base``; the whole body is read before returning."""
        proxy, proxy_auth = self._proxy.get(base) or (None, None)
        url = base + path
        async with self._http().request(
            method, url, timeout=timeout, proxy=proxy, proxy_auth=proxy_auth, **kw
        ) as resp:
            body = await resp.read()
            return _Reply(resp.status, resp.headers, body)

    # ------------------------------------------------------------------ pre-flight

    async def preflight(self) -> dict[str, list[str]]:
        """Check every endpoint answers ``GET /models`` and serves the model; else raise PreflightError."""
        served: dict[str, list[str]] = {}
        problems: list[str] = []
        auth_only = True
        key_env = self.cfg.api_key_env
        for url in self.urls:
            try:
                wait = self.cfg.connect_timeout_s
                resp = await self._send(
                    "GET", url, "/models", aiohttp.ClientTimeout(sock_connect=wait, sock_read=wait)
                )
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                auth_only = False
                problems.append(f"{url}: no answer to GET /models ({type(exc).__name__}: {exc})")
                continue
            if resp.status in (401, 403):
                why = (
                    f"the server refused the API key from ${key_env}"
                    if self._secret
                    else f"the server wants an API key, but ${key_env or '(client.api_key_env)'} is not set"
                )
                problems.append(
                    f"{url}: HTTP {resp.status} to GET /models: {why} "
                    f"({_snippet(resp, self._secret)})"
                )
                continue
            auth_only = False
            try:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                served[url] = [m.get("id", "") for m in resp.json().get("data", [])]
            except (ValueError, AttributeError) as exc:
                problems.append(
                    f"{url}: no usable answer to GET /models (HTTP {resp.status}: "
                    f"{type(exc).__name__}; {_snippet(resp, self._secret)})"
                )
                continue
            if self.cfg.model not in served[url]:
                problems.append(
                    f"{url}: serves {served[url]}, not the configured model {self.cfg.model!r}"
                )
        if problems and auth_only:
            raise PreflightError(
                "annotation pre-flight failed: the API key was refused\n  "
                + redact("\n  ".join(problems), self._secret)
                + f"\nExport the key the server expects in ${key_env} (the variable named by "
                "client.api_key_env); it is sent as 'Authorization: Bearer ...' and never logged."
            )
        if problems:
            raise PreflightError(
                "annotation pre-flight failed:\n  "
                + redact("\n  ".join(problems), self._secret)
                + "\nStart an OpenAI-compatible server first, e.g.\n"
                f"  vllm serve {self.cfg.model} --tensor-parallel-size 8 --port 8000 "
                "--limit-mm-per-prompt image=16 --max-model-len 32768\n"
                f"  python -m sglang.launch_server --model-path {self.cfg.model} --tp 8 --port 8000\n"
                "then pass --endpoint http://HOST:8000/v1 (repeat for several servers) and --model NAME,\n"
                "or choose the deterministic labels-only annotator with --annotator rules."
            )
        return served

    # ------------------------------------------------------------------ one request

    def _backoff(self, n: int, retry_after: float) -> float:
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (n - 1))
        return max(retry_after, base * self._rng.uniform(0.5, 1.0))

    async def complete(self, req: ChatRequest, parse: Callable[[str], T]) -> tuple[Completion, T]:
        """Send ``req`` until it yields an answer ``parse`` accepts; raise AnnotationError otherwise."""
        cfg = self.cfg
        attempts = transient = 0
        max_tokens = req.max_tokens
        length_retried = parse_retried = False
        headers = {KEY_HEADER: req.key}
        while True:
            ep = await self.dispatcher.acquire()
            attempts += 1
            self.stats.attempts += 1
            outcome, retry_after, err, alive = NEUTRAL, 0.0, None, True
            start = time.perf_counter()
            try:
                resp = await self._send(
                    "POST",
                    ep.url,
                    "/chat/completions",
                    self.timeout(max_tokens),
                    data=req.body(max_tokens),
                    headers=headers,
                )
                latency = time.perf_counter() - start
                status = resp.status
                if status == 200:
                    try:
                        data = resp.json()
                        choice = data["choices"][0]
                        content = choice["message"]["content"] or ""
                        finish = choice.get("finish_reason") or ""
                        usage = data.get("usage") or {}
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        outcome, alive = ERROR, False
                        err = (
                            "MalformedResponse",
                            f"unreadable response body ({exc}): {_snippet(resp, self._secret)}",
                        )
                    else:
                        outcome = OK
                elif status in (429, 503):
                    outcome, retry_after = OVERLOAD, _retry_after(resp)
                    alive = status == 429  # a 429 is a busy server, a 503 may be a dead one
                    err = (
                        "RateLimited" if status == 429 else "ServerError",
                        f"HTTP {status} from {ep.url}",
                    )
                elif status >= 500 or status == 408:
                    outcome, alive = ERROR, False
                    err = (
                        "ServerError",
                        f"HTTP {status} from {ep.url}: {_snippet(resp, self._secret)}",
                    )
                else:
                    text = resp.text.lower()
                    if status in (400, 413, 422) and any(h in text for h in _CONTEXT_HINTS):
                        cls = "ContextTooLong"
                    else:
                        cls = {401: "AuthError", 403: "AuthError", 404: "NotFound"}.get(
                            status, "BadRequest"
                        )
                    self.stats.errors[cls] += 1
                    self.stats.failed += 1
                    raise AnnotationError(
                        cls,
                        redact(
                            f"HTTP {status} from {ep.url}: {_snippet(resp, self._secret)}",
                            self._secret,
                        ),
                        attempts,
                    )
            except asyncio.TimeoutError as exc:  # aiohttp's ServerTimeoutError included
                alive = False
                outcome, err = (
                    OVERLOAD,
                    (
                        "Timeout",
                        f"{type(exc).__name__} after {time.perf_counter() - start:.1f} s from {ep.url}",
                    ),
                )
            except aiohttp.ClientPayloadError as exc:  # body cut short or undecodable
                alive = False
                outcome, err = (
                    ERROR,
                    ("ConnectionError", f"{type(exc).__name__} reading from {ep.url}: {exc}"),
                )
            except (aiohttp.ClientError, OSError) as exc:  # refused, reset, disconnected, TLS
                alive = False
                outcome, err = (
                    OVERLOAD,
                    ("ConnectionError", f"{type(exc).__name__} talking to {ep.url}: {exc}"),
                )
            finally:
                # Exactly one release per acquire, before any backoff sleep.
                self.dispatcher.release(
                    ep,
                    outcome,
                    latency=time.perf_counter() - start,
                    retry_after=retry_after,
                    alive=alive,
                )

            if err is None:
                if finish == "length":
                    if not length_retried and max_tokens < cfg.max_tokens_cap:
                        length_retried = True
                        max_tokens = min(
                            cfg.max_tokens_cap, int(max_tokens * cfg.length_retry_factor)
                        )
                        self.stats.retries += 1
                        self.stats.errors["LengthExceeded"] += 1
                        continue
                    self.stats.failed += 1
                    raise AnnotationError(
                        "LengthExceeded", f"answer cut at max_tokens={max_tokens}", attempts
                    )
                try:
                    parsed = parse(content)
                except ParseError as exc:
                    self.stats.errors["MalformedAnswer"] += 1
                    if not parse_retried:
                        parse_retried = True
                        self.stats.retries += 1
                        continue
                    self.stats.failed += 1
                    raise AnnotationError("MalformedAnswer", str(exc), attempts) from None
                comp = Completion(
                    content=content,
                    finish_reason=finish,
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                    latency_s=latency,
                    attempts=attempts,
                    server=ep.url,
                    max_tokens=max_tokens,
                )
                self.stats.ok += 1
                self.stats.prompt_tokens += comp.prompt_tokens
                self.stats.completion_tokens += comp.completion_tokens
                return comp, parsed

            cls, msg = err
            msg = redact(msg, self._secret)
            self.stats.errors[cls] += 1
            transient += 1
            if transient >= cfg.max_attempts:
                self.stats.failed += 1
                raise AnnotationError(cls, f"{msg} (gave up after {attempts} attempts)", attempts)
            self.stats.retries += 1
            delay = self._backoff(transient, retry_after)
            log.debug("request %s: %s, retry %d in %.2f s", req.key[:12], cls, transient, delay)
            await asyncio.sleep(delay)

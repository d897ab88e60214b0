"""A local OpenAI-compatible test server with scripted faults (tests and bench only).

A minimal asyncio HTTP/1.1 server (keep-alive, Content-Length bodies) on
127.0.0.1 and an ephemeral port, serving ``GET /v1/models`` and
``POST /v1/chat/completions``. Answers are schema-valid JSON (or markdown)
that agree with the ground-truth hint in the prompt, deterministic per
request key. Faults are drawn per (request key, attempt number) from a seeded
hash, so a run's fault pattern does not depend on timing, or scripted per key:

* ``429`` (with ``Retry-After``), ``500``, ``503``;
* ``slow`` (answers after ``slow_s``), ``hang`` (never answers);
* ``malformed_body`` (truncated HTTP body), ``malformed_content`` (truncated
  answer JSON), ``length`` (``finish_reason=length``);
* ``capacity``: requests beyond this many in flight get 429 (an overloaded
  server, for the AIMD tests).

Like vLLM and SGLang, the body is validated as JSON and unknown top-level
fields are ignored, not rejected (vLLM's request model allows extra fields
and only logs them; SGLang's drops them); :attr:`RequestRecord.ignored`
lists them. Only a schema request the real servers honour constrains the
answer: ``response_format`` ``{type: json_schema, json_schema: {schema}}``
or vLLM's ``structured_outputs: {json: schema}``. Without one (e.g. only the
removed ``guided_json``) the answer is unconstrained: by default markdown
whose critical objects are bare names (``unconstrained_answer``), which the
parser must reject.

Every chat request is logged (:attr:`FakeVLMServer.log`) with its request key
(``X-Request-Key`` header), attempt, fault and status. Run in a background
thread (:meth:`FakeVLMServer.start`) or as a process for the benchmark::

    python -m annotators.testserver --latency 0.5   # prints "PORT <n>", serves until stdin closes
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

_HINT = re.compile(r'lateral = "([^"]+)"; longitudinal = "([^"]+)"')

try:  # the bench's server must not be the bottleneck: parse bodies fast where orjson exists
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - same result, more CPU
    _loads = json.loads


def _texts(body: dict[str, Any]) -> list[str]:
    """The text parts of the messages, in order (images skipped)."""
    out = []
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text"]
    return out
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip
FAULTS = (
    "429",
    "500",
    "503",
    "hang",
    "slow",
    "malformed_body",
    "malformed_content",
    "length",
    "context",
)


@dataclass(frozen=True)
class FaultConfig:
    latency_s: float = 0.01
    p_429: float = 0.0
    retry_after_s: float | None = 0.05  # None: no Retry-After header
    p_500: float = 0.0
    p_503: float = 0.0
    p_hang: float = 0.0
    hang_s: float = 3600.0
    p_slow: float = 0.0
    slow_s: float = 1.0
    p_malformed_body: float = 0.0
    p_malformed_content: float = 0.0
    p_length: float = 0.0
    capacity: int | None = None
    # What an unconstrained request gets: "names_only" (markdown, objects without
    # location/behaviour/why), "markdown" (all sections filled) or "json".
    unconstrained_answer: str = "names_only"
    always_status: int | None = None  # answer every request with this status (a dead server)
    echo_key_error: bool = False  # 401s quote the received key, padded to every offset
    model: str = "test-model"
    api_key: str | None = None  # when set, requests must carry "Authorization: Bearer <key>"
    seed: int = 0
    script: dict[str, tuple[str, ...]] = field(
        default_factory=dict
    )  # key -> fault per attempt ("ok" = none)

    def draw(self, key: str, attempt: int) -> str:
        """The fault for the ``attempt``-th request (1-based) with ``key``; ``ok`` if none."""
        if key in self.script:
            seq = self.script[key]
            return seq[attempt - 1] if attempt <= len(seq) else "ok"
        h = hashlib.sha256(f"{self.seed}:{key}:{attempt}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2.0**64
        for name, p in (("429", self.p_429), ("500", self.p_500), ("503", self.p_503), ("hang", self.p_hang),
                        ("slow", self.p_slow), ("malformed_body", self.p_malformed_body),
                        ("malformed_content", self.p_malformed_content), ("length", self.p_length)):  # fmt: skip
            if u < p:
                return name
            u -= p
        return "ok"


@dataclass(frozen=True)
class RequestRecord:
    key: str
    attempt: int
    fault: str
    status: int
    max_tokens: int
    t: float
    constrained: bool = False  # the request asked for the schema in a way servers honour
    ignored: tuple[str, ...] = ()  # unknown top-level fields (ignored, as real servers do)


# Top-level request fields this server understands; the rest are ignored like vLLM/SGLang do.
KNOWN_FIELDS = frozenset(
    {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
     "stream", "seed", "stop", "response_format", "structured_outputs"}
)  # fmt: skip


def schema_requested(body: dict[str, Any]) -> bool | str:
    """True if ``body`` asks for a JSON schema the real servers honour; an error text if malformed."""
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            return "response_format.type must be text, json_object or json_schema"
        if rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                return "response_format.json_schema.schema must be an object"
            return True
    so = body.get("structured_outputs")
    return isinstance(so, dict) and isinstance(so.get("json"), (dict, str))


def make_answer(key: str, lateral: str, longitudinal: str, fmt: str = "json") -> str:
    """A deterministic, schema-valid answer agreeing with the hint."""
    tag = key[:8]
    scene = f"A test road scene ({tag}) with light traffic in daylight."
    objs = [
        {"name": "grey car", "location": "front camera, centre part, 20 m ahead",
         "behaviour": "driving ahead in the ego lane", "why": f"it sets the safe speed ({tag})"},
        {"name": "pedestrian", "location": "front right camera, right part",
         "behaviour": "waiting at the kerb", "why": "it may step onto the road"},
    ]  # fmt: skip
    intent = (
        f"Given the route and traffic the ego vehicle should {lateral} with {longitudinal} ({tag})."
    )
    if fmt in ("markdown", "names_only"):
        lines = ["## Scene", scene, "", "## Critical objects"]
        lines += [
            f"- {o['name']}"
            if fmt == "names_only"
            else f"- {o['name']} (location: {o['location']}); behaviour: {o['behaviour']}; why: {o['why']}"
            for o in objs
        ]
        lines += [
            "",
            "## Intent",
            intent,
            "",
            "## Action",
            f"Lateral: {lateral}",
            f"Longitudinal: {longitudinal}",
        ]
        return "\n".join(lines)
    answer = {"scene": scene, "critical_objects": objs, "intent": intent,
              "action": {"lateral": lateral, "longitudinal": longitudinal}}  # fmt: skip
    return json.dumps(answer)


class FakeVLMServer:
    """The server; ``with FakeVLMServer(FaultConfig(...)) as srv: srv.base_url``."""

    def __init__(
        self,
        faults: FaultConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        responder: Callable[[dict[str, Any]], tuple[int, dict[str, Any]]] | None = None,
    ) -> None:
        self.faults = faults or FaultConfig()
        # Answers chat requests instead of the built-in annotator: body -> (status, JSON reply).
        self.responder = responder
        self.host, self.port = host, port
        self.log: list[RequestRecord] = []
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self._attempts: dict[str, int] = {}
        self._echoed = 0
        self.proxied = 0  # requests received in proxy (absolute-URI) form
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def set_faults(self, **changes: Any) -> None:
        """Change the fault configuration while running."""
        self.faults = replace(self.faults, **changes)

    def keys(self, status: int | None = None) -> list[str]:
        """Request keys received (optionally only those answered with ``status``), in order."""
        return [r.key for r in list(self.log) if status is None or r.status == status]

    # ------------------------------------------------------------------ lifecycle

    async def serve(self) -> None:
        """Start listening on the running loop (for callers with their own loop)."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> FakeVLMServer:
        """Serve from a background thread; returns once listening."""
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.serve())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=main, name="fake-vlm-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("test server did not start within 10 s")
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FakeVLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    break
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0"))
                body = await reader.readexactly(n) if n else b""
                if path.startswith(("http://", "https://")):  # absolute form: we are the proxy
                    self.proxied += 1
                    path = "/" + path.split("://", 1)[1].split("/", 1)[-1]
                status, extra, payload = await self._route(method, path, headers, body)
                if status < 0:  # malformed body: promise more bytes than sent, then close
                    writer.write(self._response(200, {}, payload, length=len(payload) + 50))
                    await writer.drain()
                    break
                writer.write(self._response(status, extra, payload))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # server shutting down: end quietly
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    @staticmethod
    def _response(
        status: int, extra: dict[str, str], payload: bytes, length: int | None = None
    ) -> bytes:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "Content-Type: application/json",
                f"Content-Length: {len(payload) if length is None else length}"]  # fmt: skip
        head += [f"{k}: {v}" for k, v in extra.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + payload

    async def _route(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        f = self.faults
        if f.echo_key_error and method == "POST":
            # Some servers quote the received key in their error text; pad it to every offset.
            got = headers.get("authorization", "").removeprefix("Bearer ")
            n, self._echoed = self._echoed, self._echoed + 1
            msg = "x" * (n % 300) + f"Incorrect API key provided: {got}. Check your key."
            self.log.append(RequestRecord(headers.get("x-request-key", ""), 1, "echo",
                                          f.always_status or 401, 0, time.monotonic()))  # fmt: skip
            return f.always_status or 401, {}, json.dumps({"error": {"message": msg}}).encode()
        if f.api_key is not None and headers.get("authorization") != f"Bearer {f.api_key}":
            return 401, {}, b'{"error": {"message": "invalid api key"}}'
        if method == "GET" and path.rstrip("/") == "/v1/models":
            data = {
                "object": "list",
                "data": [{"id": f.model, "object": "model", "owned_by": "test"}],
            }
            return 200, {}, json.dumps(data).encode()
        if method == "POST" and path.rstrip("/") == "/v1/chat/completions":
            self.in_flight += 1
            self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
            try:
                return await self._chat(headers, body)
            finally:
                self.in_flight -= 1
        return 404, {}, b'{"error": {"message": "not found"}}'

    async def _chat(
        self, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        f = self.faults
        key = headers.get("x-request-key") or hashlib.sha256(raw).hexdigest()
        attempt = self._attempts[key] = self._attempts.get(key, 0) + 1
        try:
            body = _loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ValueError("body must be an object with a messages list")
        except ValueError as exc:
            self.log.append(RequestRecord(key, attempt, "invalid", 400, 0, time.monotonic()))
            return 400, {}, json.dumps({"error": {"message": f"invalid request: {exc}"}}).encode()
        if self.responder is not None:
            self.log.append(RequestRecord(key, attempt, "responder", 0, 0, time.monotonic()))
            status, reply = self.responder(body)
            return status, {}, json.dumps(reply).encode()
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
        constrained = schema_requested(body)
        ignored = tuple(sorted(set(body) - KNOWN_FIELDS))
        fault = (
            "429"
            if f.capacity is not None and self.in_flight > f.capacity
            else f.draw(key, attempt)
        )
        if f.always_status is not None:
            fault = str(f.always_status)
        status = {"429": 429, "500": 500, "503": 503, "context": 400}.get(fault, 200)
        if isinstance(constrained, str):
            fault, status = "invalid", 400
        if f.always_status is not None:
            status = f.always_status
        self.log.append(RequestRecord(key, attempt, fault, status, max_tokens, time.monotonic(),
                                      constrained is True, ignored))  # fmt: skip
        if isinstance(constrained, str):
            return 400, {}, json.dumps({"error": {"message": constrained}}).encode()
        model = body.get("model")
        if model != f.model:
            return (
                404,
                {},
                json.dumps({"error": {"message": f"model {model!r} not served"}}).encode(),
            )
        if f.always_status is not None:
            return f.always_status, {}, b'{"error": {"message": "unavailable"}}'
        if fault == "429":
            extra = {} if f.retry_after_s is None else {"Retry-After": f"{f.retry_after_s:g}"}
            return 429, extra, b'{"error": {"message": "rate limited"}}'
        if fault == "context":
            return (
                400,
                {},
                b'{"error": {"message": "This model\'s maximum context length is 32768 tokens"}}',
            )
        await asyncio.sleep({"hang": f.hang_s, "slow": f.slow_s}.get(fault, f.latency_s))
        if status != 200:
            return status, {}, b'{"error": {"message": "server error"}}'
        hints = [h for t in _texts(body) for h in _HINT.findall(t)]
        if not hints:
            return 400, {}, b'{"error": {"message": "no hint in prompt"}}'
        lat, lon = hints[-1]  # the last one: few-shot examples come first
        content = make_answer(key, lat, lon, "json" if constrained else f.unconstrained_answer)
        finish = "stop"
        if fault == "malformed_content":
            content = content[: len(content) // 2]
        elif fault == "length":
            content, finish = content[: len(content) // 3], "length"
        resp = {
            "id": f"chatcmpl-{key[:16]}-{attempt}",
            "object": "chat.completion",
            "model": f.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(raw) // 4, "completion_tokens": len(content) // 4,
                      "total_tokens": len(raw) // 4 + len(content) // 4},
        }  # fmt: skip
        payload = json.dumps(resp).encode()
        if fault == "malformed_body":
            return -1, {}, payload[: len(payload) // 2]
        return 200, {}, payload


def main(argv: list[str] | None = None) -> int:
    """Serve in this process until stdin closes (for the benchmark)."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--latency", type=float, default=0.5, help="fixed answer latency in seconds")
    ap.add_argument("--model", default="test-model")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    srv = FakeVLMServer(FaultConfig(latency_s=args.latency, model=args.model), port=args.port)

    async def run() -> None:
        await srv.serve()
        print(f"PORT {srv.port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await srv._shutdown()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A lean HTTP/1.1 keep-alive transport for ``httpx.AsyncClient`` (plain ``http://`` endpoints).

Why: httpx's default transport (httpcore + anyio + h11) costs about 1 ms of
CPU per request, and its connection pool rescans every connection on each
request and release (quadratic in the pool size), so at 256 requests in
flight one core saturates before the server does. Annotation servers are
vLLM/SGLang on the cluster network, spoken to over plain HTTP/1.1 with JSON
bodies; this transport does exactly that on asyncio streams at ~0.1 ms per
request, behind the same ``httpx.AsyncClient`` API (timeouts, headers,
``httpx`` exceptions). ``https://`` URLs are delegated to httpx's own transport.

Supported: ``Content-Length`` and ``chunked`` response bodies, bodies
delimited by connection close, keep-alive reuse (LIFO), a retry on a fresh
connection when a reused one turns out to be closed before any response byte.
"""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict
from typing import Any

import httpx

_STREAM_LIMIT = 1 << 20  # StreamReader buffer: fewer wake-ups for large bodies
MAX_IDLE_PER_ORIGIN = 1024

if sys.version_info >= (3, 11):
    _timeout = asyncio.timeout
else:  # pragma: no cover - 3.10

    class _timeout:  # minimal stand-in: cancel the current task after `delay`
        def __init__(self, delay: float | None) -> None:
            self.delay = delay

        async def __aenter__(self) -> None:
            task = asyncio.current_task()
            self._handle = (
                None
                if self.delay is None
                else asyncio.get_running_loop().call_later(self.delay, task.cancel)
            )  # type: ignore[union-attr]
            self._expired = False

        async def __aexit__(self, et: Any, exc: Any, tb: Any) -> bool:
            if self._handle is not None:
                self._handle.cancel()
            if (
                et is asyncio.CancelledError
                and self._handle is not None
                and self._handle.when() <= asyncio.get_running_loop().time()
            ):
                raise TimeoutError from exc
            return False


class _Conn:
    __slots__ = ("reader", "writer", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def usable(self) -> bool:
        return not (self.writer.is_closing() or self.reader.at_eof())

    def close(self) -> None:
        self.writer.close()


class _StaleConnection(Exception):
    """A reused connection was closed by the server before it sent anything."""


class FastHTTPTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio streams; one request per connection at a time, connections reused."""

    def __init__(self) -> None:
        self._idle: defaultdict[tuple[str, int], list[_Conn]] = defaultdict(list)
        self._tls: httpx.AsyncHTTPTransport | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            if self._tls is None:
                self._tls = httpx.AsyncHTTPTransport()
            return await self._tls.handle_async_request(request)
        timeouts = request.extensions.get("timeout") or {}
        body = await request.aread()
        url = request.url
        target = url.raw_path.decode("ascii")
        lines = [f"{request.method} {target} HTTP/1.1"]
        lines += [f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in request.headers.raw]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        origin = (url.host, url.port or 80)
        for attempt in range(2):
            # The retry after a stale connection takes a fresh one: after a server restart
            # every idle connection may be dead, and popping another would fail the same way.
            conn = await self._get(origin, timeouts.get("connect"), request, fresh=attempt > 0)
            try:
                return await self._exchange(conn, origin, head, body, timeouts, request)
            except _StaleConnection:
                continue
        raise httpx.RemoteProtocolError(
            "server closed two connections without answering", request=request
        )

    async def _get(
        self,
        origin: tuple[str, int],
        timeout: float | None,
        request: httpx.Request,
        fresh: bool = False,
    ) -> _Conn:
        idle = None if fresh else self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable():
                conn.reused = True
                return conn
            conn.close()
        try:
            async with _timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    origin[0], origin[1], limit=_STREAM_LIMIT
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"connecting to {origin[0]}:{origin[1]} timed out", request=request
            ) from None
        except OSError as exc:
            raise httpx.ConnectError(
                f"cannot connect to {origin[0]}:{origin[1]}: {exc}", request=request
            ) from None
        return _Conn(reader, writer)

    async def _exchange(
        self,
        conn: _Conn,
        origin: tuple[str, int],
        head: bytes,
        body: bytes,
        timeouts: dict[str, float | None],
        request: httpx.Request,
    ) -> httpx.Response:
        got_bytes = False
        keep = False
        try:
            try:
                async with _timeout(timeouts.get("write")):
                    conn.writer.write(head + body)  # one send: a copy is cheaper than a syscall
                    await conn.writer.drain()
            except TimeoutError:
                raise httpx.WriteTimeout("sending the request timed out", request=request) from None
            try:
                async with _timeout(timeouts.get("read")):
                    while True:
                        status_head = await conn.reader.readuntil(b"\r\n\r\n")
                        got_bytes = True
                        status, headers, keep = _parse_head(status_head, request)
                        # 1xx (e.g. 100 Continue, 103 Early Hints) are interim: the real
                        # response follows on the same connection; returning the interim one
                        # would leave the final response in the buffer for the next request.
                        if not 100 <= status < 200 or status == 101:
                            break
                    content, delimited = await _read_body(conn.reader, headers, status, request)
                    keep = keep and delimited
            except TimeoutError:
                raise httpx.ReadTimeout(
                    "waiting for the response timed out", request=request
                ) from None
        except asyncio.IncompleteReadError as exc:
            conn.close()
            if conn.reused and not got_bytes and not exc.partial:
                raise _StaleConnection from None
            raise httpx.RemoteProtocolError(
                f"connection closed mid-response ({exc})", request=request
            ) from None
        except (ConnectionError, OSError) as exc:
            conn.close()
            if conn.reused and not got_bytes:
                raise _StaleConnection from None
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from None
        except asyncio.LimitOverrunError:
            conn.close()
            raise httpx.RemoteProtocolError("response head too large", request=request) from None
        except ValueError as exc:  # unparsable status code, Content-Length or chunk size
            conn.close()
            raise httpx.RemoteProtocolError(
                f"malformed response framing ({exc})", request=request
            ) from None
        except BaseException:  # timeouts, cancellation: the connection state is unknown
            conn.close()
            raise
        if keep and not self._closed and len(self._idle[origin]) < MAX_IDLE_PER_ORIGIN:
            conn.reused = False
            self._idle[origin].append(conn)
        else:
            conn.close()
        return httpx.Response(
            status, headers=headers, content=content, extensions={"http_version": b"HTTP/1.1"}
        )

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
        if self._tls is not None:
            await self._tls.aclose()


def _parse_head(
    raw: bytes, request: httpx.Request | None = None
) -> tuple[int, list[tuple[str, str]], bool]:
    text = raw.decode("latin-1")
    first, _, rest = text.partition("\r\n")
    parts = first.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"bad status line {first!r}", request=request)
    headers = []
    keep = parts[0] == "HTTP/1.1"
    for line in rest.split("\r\n"):
        if not line:
            continue
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        headers.append((k, v))
        if k.lower() == "connection":
            keep = v.lower() == "keep-alive" or (keep and v.lower() != "close")
    return int(parts[1]), headers, keep


async def _read_body(
    reader: asyncio.StreamReader,
    headers: list[tuple[str, str]],
    status: int,
    request: httpx.Request,
) -> tuple[bytes, bool]:
    """The body, and whether its end was marked (False: delimited by closing the connection)."""
    if status in (204, 304) or 100 <= status < 200 or request.method == "HEAD":
        return b"", True
    lower = {k.lower(): v for k, v in headers}
    if "chunked" in lower.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks), True
            chunks.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise ValueError(f"chunk of {size} bytes not followed by CRLF")
    if "content-length" in lower:
        n = int(lower["content-length"])
        if n < 0:
            raise ValueError(f"negative Content-Length {n}")
        return (await reader.readexactly(n) if n else b""), True
    return await reader.read(), False

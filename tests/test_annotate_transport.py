"""The lean HTTP/1.1 transport: framing variants, keep-alive reuse, stale connections, errors."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from annotators import transport as transport_mod
from annotators.transport import FastHTTPTransport

RESPONSES = {
    "/length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=1\r\nlo\r\n0\r\n\r\n",
    "/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello",
    "/status": b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 2\r\n\r\nno",
    # an interim 1xx response precedes the real one on the same connection
    "/interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
    "/badchunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhel\r\n0\r\n\r\n",
}


async def _serve(connections: list[int], close_after_one: bool):
    async def handle(reader, writer):
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                n = int(
                    next(
                        (
                            ln.split(b":")[1]
                            for ln in head.split(b"\r\n")
                            if ln.lower().startswith(b"content-length")
                        ),
                        b"0",
                    )
                )
                await reader.readexactly(n)
                writer.write(RESPONSES[path])
                await writer.drain()
                if path == "/close" or close_after_one:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("close_after_one", [False, True])
def test_framing_and_reuse(close_after_one):
    async def go():
        conns: list[int] = []
        server, port = await _serve(conns, close_after_one)
        async with httpx.AsyncClient(
            transport=FastHTTPTransport(), base_url=f"http://127.0.0.1:{port}"
        ) as c:
            out = []
            for path in ("/length", "/chunked", "/close", "/length", "/status"):
                r = await c.post(path, content=b"x" * 100)
                out.append((r.status_code, r.text, r.headers.get("retry-after")))
        server.close()
        return out, len(conns)

    out, n_conns = asyncio.run(go())
    assert out[:4] == [(200, "hello", None)] * 4
    assert out[4] == (429, "no", "2")
    # keep-alive: /length and /chunked share one connection; /close ends it
    assert n_conns == (5 if close_after_one else 2)


def test_connect_error_and_timeout_map_to_httpx_exceptions():
    async def go():
        async def hang(reader, writer):
            await asyncio.sleep(5)

        server = await asyncio.start_server(hang, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with httpx.AsyncClient(transport=FastHTTPTransport()) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post(
                    f"http://127.0.0.1:{port}/x", content=b"{}", timeout=httpx.Timeout(0.2)
                )
            with pytest.raises(httpx.ConnectError):
                await c.get("http://127.0.0.1:9/x", timeout=1.0)
        server.close()

    asyncio.run(go())


def test_interim_response_is_skipped_and_bad_framing_is_a_protocol_error():
    async def go():
        conns: list[int] = []
        server, port = await _serve(conns, close_after_one=False)
        async with httpx.AsyncClient(
            transport=FastHTTPTransport(), base_url=f"http://127.0.0.1:{port}"
        ) as c:
            first = await c.post("/interim", content=b"{}")
            # the same (kept-alive) connection must not hand the next request a leftover response
            second = await c.post("/length", content=b"{}")
            with pytest.raises(httpx.RemoteProtocolError, match="framing"):
                await c.post("/badchunk", content=b"{}")
            third = await c.post("/length", content=b"{}")  # a broken connection is not reused
        server.close()
        return [(r.status_code, r.text) for r in (first, second, third)], len(conns)

    out, n_conns = asyncio.run(go())
    assert out == [(200, "final"), (200, "hello"), (200, "hello")]
    assert n_conns == 2


def test_dead_idle_connections_fall_back_to_a_fresh_one(monkeypatch):
    # Every pooled connection looks alive but is dead on use (as after a server restart whose
    # FINs were not processed yet): the retry must open a fresh connection, not pop another.
    monkeypatch.setattr(transport_mod._Conn, "usable", lambda self: True)

    async def go():
        conns: list[int] = []
        server, port = await _serve(conns, close_after_one=False)
        transport = FastHTTPTransport()
        async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{port}") as c:
            await asyncio.gather(*(c.post("/length", content=b"{}") for _ in range(3)))
            idle = transport._idle[("127.0.0.1", port)]
            assert len(idle) == 3
            for conn in idle:
                conn.writer.transport.abort()
            r = await c.post("/length", content=b"{}")
        server.close()
        return r.text, len(conns)

    text, n_conns = asyncio.run(go())
    assert text == "hello" and n_conns == 4

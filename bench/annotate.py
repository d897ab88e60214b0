"""Annotation client throughput against a local OpenAI-compatible server with fixed latency.

Target (DESIGN.md section 11): at up to 256 requests in flight the client
sustains >= 90% of in_flight / latency, with < 2 ms client CPU per request
beyond image encoding. The server (:mod:`annotators.testserver`) runs in a
separate process so its CPU is not counted; the client's CPU is
``time.process_time`` over the timed phase, which sends pre-encoded requests
(base64 + JSON of the images is timed separately and reported as
``image_encoding_ms_per_request``). Baseline in the same run: a sequential
one-request-at-a-time client (the reference's batch-size-1 loop).

The client's transport is aiohttp (``aiohttp.ClientSession``); ``--compare-httpx``
also measures a plain httpx client sending the same bodies at the same concurrency
(no AIMD, no parsing: a lower bound on httpx's cost), the reason for the choice.

    python bench/annotate.py [--latency 1.0] [--waves 4] [--in-flight 64 256]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from annotators.client import VLMClient
from annotators.config import ClientConfig, PromptConfig
from annotators.parsing import parse_answer
from annotators.prompts import build_prompt
from annotators.request import ChatRequest, build_chat_request
from annotators.synthetic import make_rows

MODEL = "bench-model"


def start_server(latency: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "annotators.testserver",
            "--latency",
            str(latency),
            "--model",
            MODEL,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"test server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of another process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prepare(
    n_distinct: int, width: int, height: int, cfg: ClientConfig
) -> tuple[list[ChatRequest], float]:
    """Distinct pre-encoded requests and the image-encoding time per request (s)."""
    rows = make_rows(n_distinct, width=width, height=height)
    prompts = [build_prompt(r, PromptConfig()) for r in rows]
    t = time.process_time()
    reqs = [build_chat_request(p, cfg) for p in prompts]
    return reqs, (time.process_time() - t) / n_distinct


async def run_concurrent(base: list[ChatRequest], n: int, cfg: ClientConfig) -> dict[str, float]:
    reqs = [
        dataclasses.replace(base[i % len(base)], key=f"{base[i % len(base)].key[:48]}{i:016d}")
        for i in range(n)
    ]
    async with VLMClient(cfg) as client:
        # Warm the connection pool with one wave so the timed phase measures steady state.
        await asyncio.gather(*(client.complete(r, parse_answer) for r in reqs[: cfg.max_in_flight]))
        timed = reqs[cfg.max_in_flight :]
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = await asyncio.gather(
            *(client.complete(r, parse_answer) for r in timed), return_exceptions=True
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    errors = sum(isinstance(r, Exception) for r in results)
    return {"n": len(timed), "wall_s": wall, "cpu_s": cpu, "errors": errors}


async def run_plain_httpx(base: list[ChatRequest], url: str, c: int, n: int) -> dict[str, float]:
    """A bare httpx client (pools of 4 connections, as httpcore's pool scales badly beyond
    that) posting the same bodies at concurrency ``c``: what httpx costs, for comparison."""
    import httpx

    pools = [
        httpx.AsyncClient(limits=httpx.Limits(max_connections=4, max_keepalive_connections=4), timeout=None)
        for _ in range(-(-c // 4))
    ]
    free = [p for _ in range(4) for p in pools]
    sem = asyncio.Semaphore(c)

    async def one(i: int) -> None:
        async with sem:
            http = free.pop()
            try:
                r = await http.post(f"{url}/chat/completions", content=base[i % len(base)].body(),
                                    headers={"Content-Type": "application/json", "X-Request-Key": f"h{i}"})  # fmt: skip
                parse_answer(r.json()["choices"][0]["message"]["content"])
            finally:
                free.append(http)

    await asyncio.gather(*(one(i) for i in range(c)))  # warm-up wave
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(c, c + n)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for p in pools:
        await p.aclose()
    return {"n": n, "wall_s": wall, "cpu_s": cpu}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--latency", type=float, default=1.0, help="server latency per request, s")
    ap.add_argument("--in-flight", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--waves", type=int, default=4, help="timed requests = waves x in_flight")
    ap.add_argument("--image-size", default="160x90", help="WxH of each of the 16 prompt frames")
    ap.add_argument("--baseline-requests", type=int, default=8)
    ap.add_argument("--compare-httpx", action="store_true",
                    help="also measure a bare httpx client at the largest --in-flight (if httpx is installed)")  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    width, height = (int(v) for v in args.image_size.split("x"))

    proc, url = start_server(args.latency)
    try:
        runs = []
        # The shipped client defaults (AIMD on, latency tolerance on); no retries so errors show.
        base_cfg = ClientConfig(endpoints=(url,), model=MODEL, max_attempts=1)
        reqs, enc_s = prepare(16, width, height, base_cfg)
        for c in args.in_flight:
            cfg = dataclasses.replace(base_cfg, max_in_flight=c)
            srv0 = proc_cpu_s(proc.pid)
            r = asyncio.run(run_concurrent(reqs, c * (args.waves + 1), cfg))
            srv_cpu = proc_cpu_s(proc.pid) - srv0
            rps = r["n"] / r["wall_s"]
            ideal = c / args.latency
            runs.append(
                {
                    "in_flight": c,
                    "requests": r["n"],
                    "errors": r["errors"],
                    "requests_per_s": round(rps, 1),
                    "ideal_requests_per_s": round(ideal, 1),
                    "efficiency": round(rps / ideal, 3),
                    "client_cpu_ms_per_request": round(1e3 * r["cpu_s"] / r["n"], 3),
                    # the server's CPU over warm-up + timed phase (diagnostic: on a
                    # 2-core machine client and server compete for the cores)
                    "server_cpu_ms_per_request": round(1e3 * srv_cpu / (r["n"] + c), 3),
                }
            )
        httpx_run = None
        if args.compare_httpx:
            c = args.in_flight[-1]
            h = asyncio.run(run_plain_httpx(reqs, url, c, c * args.waves))
            httpx_run = {
                "in_flight": c,
                "efficiency": round(h["n"] / h["wall_s"] / (c / args.latency), 3),
                "client_cpu_ms_per_request": round(1e3 * h["cpu_s"] / h["n"], 3),
            }
        seq_cfg = dataclasses.replace(base_cfg, max_in_flight=1)
        b = asyncio.run(run_concurrent(reqs, args.baseline_requests + 1, seq_cfg))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    top = runs[-1]
    out = {
        "bench": "annotate",
        **top,
        "baseline": "sequential one-at-a-time client (max_in_flight=1)",
        "baseline_requests_per_s": round(b["n"] / b["wall_s"], 2),
        "speedup_vs_baseline": round(top["requests_per_s"] / (b["n"] / b["wall_s"]), 1),
        "latency_s": args.latency,
        "transport": f"aiohttp {aiohttp.__version__}",
        "image_encoding_ms_per_request": round(1e3 * enc_s, 3),
        "body_kib": round(len(reqs[0].body()) / 1024, 1),
        "runs": runs,
        **({"bare_httpx_client": httpx_run} if httpx_run else {}),
        "targets": {"efficiency_at_256": 0.9, "client_cpu_ms_per_request": 2.0},
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

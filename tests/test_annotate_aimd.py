"""AIMD dispatcher: additive growth, multiplicative shrink (once per round trip), latency growth, Retry-After."""

from __future__ import annotations

import asyncio
import time

from annotators.aimd import OK, OVERLOAD, AIMDDispatcher


def test_grows_additively_and_shrinks_once_per_round_trip():
    async def go():
        d = AIMDDispatcher(["a"], max_total=64, initial_total=8, latency_tolerance=0)
        for _ in range(16):  # two rounds of successes at limit 8: about +2
            d.release(await d.acquire(), OK, latency=0.05)
        grown = d.limit
        eps = [await d.acquire() for _ in range(5)]
        for ep in eps:  # one wave of 429s counts once
            d.release(ep, OVERLOAD)
        once = d.limit
        await asyncio.sleep(0.06)  # a round trip later another overload shrinks again
        d.release(await d.acquire(), OVERLOAD)
        return grown, once, d.limit

    grown, once, twice = asyncio.run(go())
    assert grown == 9 and once == 4 and twice == 2


def test_latency_growth_shrinks_the_limit():
    async def go():
        d = AIMDDispatcher(["a"], max_total=32, latency_tolerance=2.0)
        for _ in range(50):
            d.release(await d.acquire(), OK, latency=0.01)
        before = d.endpoints[0].limit
        for _ in range(200):
            d.release(await d.acquire(), OK, latency=0.2)
            await asyncio.sleep(0)
        return before, d.endpoints[0].limit, d.endpoints[0].decreases

    before, after, decreases = asyncio.run(go())
    assert decreases > 0 and after < before


def test_fifo_handoff_and_retry_after_blocks_the_endpoint():
    async def go():
        d = AIMDDispatcher(["a", "b"], max_total=2, latency_tolerance=0)
        a = await d.acquire()
        b = await d.acquire()
        assert {a.url, b.url} == {"a", "b"}  # least in flight: one each
        order = []

        async def waiter(i):
            ep = await d.acquire()
            order.append((i, ep.url, time.monotonic()))
            d.release(ep, OK, latency=0.01)

        tasks = [asyncio.ensure_future(waiter(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        d.release(a, OVERLOAD, retry_after=0.2)  # endpoint a blocked for 0.2 s
        d.release(b, OK, latency=0.01)
        await asyncio.gather(*tasks)
        return order, t0

    order, t0 = asyncio.run(go())
    assert [i for i, _, _ in order] == [0, 1, 2]  # first in, first out
    for _, url, t in order:
        assert url == "b" or t - t0 >= 0.19

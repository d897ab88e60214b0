"""Adaptive concurrency over several endpoints: AIMD limits and least-in-flight dispatch.

Each endpoint has its own limit on requests in flight (a server that answers
429 throttles only its own share). On success a limit grows additively (+1
per limit's worth of successes, i.e. about +1 per round trip); on overload
(429/503, timeouts, connection errors) it shrinks multiplicatively, at most
once per observed round-trip time so that one burst of 429s from the same
wave of requests counts once. A growing latency (EWMA above ``tolerance``
times the best recent EWMA) also shrinks it, gently. The sum over endpoints
is further capped by ``max_total``.

Waiters are served first in, first out: a released slot is handed straight to
the oldest waiter (no thundering herd), on the endpoint with the fewest
requests in flight relative to its limit. A ``Retry-After`` blocks an
endpoint until that time.

Dead endpoints (a circuit breaker): after ``down_after`` failed attempts in a
row (5xx, timeouts, connection errors; a 429 means busy, not dead) an
endpoint leaves the rotation. After ``probe_s`` it takes one request again
(the probe); success brings it back, failure doubles the wait (up to
``probe_max_s``). The last endpoint in rotation is never taken out (with
all of them dead, requests fail by their retry budget). Without this, a dead endpoint answering 503 at once would
look least loaded and draw most requests.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)
OK, OVERLOAD, ERROR, NEUTRAL = "ok", "overload", "error", "neutral"


@dataclass
class Endpoint:
    url: str
    limit: float
    in_flight: int = 0
    blocked_until: float = 0.0
    ewma_latency: float | None = None
    baseline_latency: float | None = None
    last_decrease: float = -1e9
    decreases: int = 0
    fails_in_row: int = 0
    down: bool = False  # out of rotation (dead); probed again at down_until
    down_until: float = 0.0
    probe_wait: float = 0.0
    times_down: int = 0

    def capacity(self) -> int:
        return max(int(self.limit) - self.in_flight, 0)


class AIMDDispatcher:
    """Hands out endpoint slots; call :meth:`release` exactly once per :meth:`acquire`."""

    def __init__(
        self,
        urls: list[str] | tuple[str, ...],
        max_total: int,
        min_per_endpoint: int = 1,
        initial_total: int | None = None,
        decrease: float = 0.5,
        latency_tolerance: float = 3.0,
        down_after: int = 5,
        probe_s: float = 5.0,
        probe_max_s: float = 60.0,
    ) -> None:
        if not urls:
            raise ValueError("need at least one endpoint")
        initial = initial_total or max_total
        share = max(initial / len(urls), min_per_endpoint)
        self.endpoints = [Endpoint(u, float(share)) for u in urls]
        self.max_total = max_total
        self.min_limit = float(min_per_endpoint)
        self.decrease = decrease
        self.latency_tolerance = latency_tolerance
        self.down_after = down_after
        self.probe_s = probe_s
        self.probe_max_s = max(probe_max_s, probe_s)
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[Endpoint]] = collections.deque()

    @property
    def limit(self) -> int:
        """The current total limit (what the adaptation allows now)."""
        return min(self.max_total, sum(int(e.limit) for e in self.endpoints))

    def _pick(self, now: float) -> Endpoint | None:
        if self.in_flight >= self.max_total:
            return None
        best = None
        best_load = 2.0
        for e in self.endpoints:
            if e.in_flight >= int(e.limit) or e.blocked_until > now:
                continue
            if e.down and (e.down_until > now or e.in_flight > 0):
                continue  # dead: no requests until its probe, then one at a time
            load = e.in_flight / e.limit
            if load < best_load:
                best, best_load = e, load
        return best

    async def acquire(self) -> Endpoint:
        """Wait for a slot; returns the endpoint to send to."""
        if not self._waiters:
            ep = self._pick(time.monotonic())
            if ep is not None:
                ep.in_flight += 1
                self.in_flight += 1
                return ep
        fut: asyncio.Future[Endpoint] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # a slot was handed over as we were cancelled
                self.release(fut.result(), NEUTRAL)
            raise

    def release(
        self,
        ep: Endpoint,
        outcome: str,
        latency: float | None = None,
        retry_after: float = 0.0,
        alive: bool = True,
    ) -> None:
        """Return a slot and adapt ``ep``'s limit to the outcome.

        ``alive=False``: the attempt failed in a way a dead server fails (5xx, timeout,
        connection error); ``down_after`` of those in a row take ``ep`` out of rotation.
        """
        ep.in_flight -= 1
        self.in_flight -= 1
        now = time.monotonic()
        if outcome == OK:
            ep.fails_in_row = 0
            if ep.down:
                ep.down, ep.probe_wait = False, 0.0
                log.warning("endpoint %s answers again: back in rotation", ep.url)
        elif not alive:
            ep.fails_in_row += 1
            if ep.down or ep.fails_in_row >= self.down_after:
                self._take_down(ep, now)
        if outcome == OK:
            # Grow only while latency is normal: a growing queue on the server means it is saturated.
            if latency is None or not self._observe_latency(ep, latency, now):
                ep.limit = min(float(self.max_total), ep.limit + 1.0 / ep.limit)
        elif outcome == OVERLOAD:
            self._shrink(ep, self.decrease, now)
        if retry_after > 0:
            ep.blocked_until = max(ep.blocked_until, now + retry_after)
            asyncio.get_running_loop().call_later(retry_after + 1e-3, self._wake)
        self._wake()

    def _take_down(self, ep: Endpoint, now: float) -> None:
        if not ep.down:
            if not any(e is not ep and not e.down for e in self.endpoints):
                return  # the last live endpoint stays: requests fail by their own retry budget
            ep.down, ep.probe_wait = True, self.probe_s
            ep.times_down += 1
            log.warning(
                "endpoint %s failed %d attempts in a row: out of rotation, probing it again in %.1f s",
                ep.url, ep.fails_in_row, ep.probe_wait,
            )  # fmt: skip
        elif ep.down_until <= now:  # a probe failed: wait longer
            ep.probe_wait = min(self.probe_max_s, ep.probe_wait * 2)
            log.info("endpoint %s still failing; next probe in %.1f s", ep.url, ep.probe_wait)
        else:
            return  # a request sent before it went down
        ep.down_until = now + ep.probe_wait
        asyncio.get_running_loop().call_later(ep.probe_wait + 1e-3, self._wake)

    @property
    def live_endpoints(self) -> list[str]:
        return [e.url for e in self.endpoints if not e.down]

    def _observe_latency(self, ep: Endpoint, latency: float, now: float) -> bool:
        """Track latency; shrink and return True when it has grown past the tolerance."""
        ep.ewma_latency = (
            latency if ep.ewma_latency is None else 0.9 * ep.ewma_latency + 0.1 * latency
        )
        if ep.baseline_latency is None or ep.ewma_latency < ep.baseline_latency:
            ep.baseline_latency = ep.ewma_latency
        else:  # let the baseline follow a lasting change slowly
            ep.baseline_latency += (ep.ewma_latency - ep.baseline_latency) * 1e-3
        if (
            self.latency_tolerance > 0
            and ep.ewma_latency > self.latency_tolerance * ep.baseline_latency
        ):
            self._shrink(ep, 0.9, now)
            return True
        return False

    def _shrink(self, ep: Endpoint, factor: float, now: float) -> None:
        rtt = ep.ewma_latency if ep.ewma_latency is not None else 0.1
        if now - ep.last_decrease < max(rtt, 0.01):
            return
        ep.last_decrease = now
        ep.limit = max(self.min_limit, ep.limit * factor)
        ep.decreases += 1

    def _wake(self) -> None:
        now = time.monotonic()
        while self._waiters:
            fut = self._waiters[0]
            if fut.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            ep = self._pick(now)
            if ep is None:
                return
            self._waiters.popleft()
            ep.in_flight += 1
            self.in_flight += 1
            fut.set_result(ep)

"""How often one client may ask: per-client token buckets over the expensive routes.

Two limits, each a token bucket per client (a token's subject, an API key's name, or without
auth the peer address: :attr:`pipeline.service.auth.Principal.client`):

    analyses   POST /v1/analyses                              MOODSTREAM_ANALYSES_PER_MINUTE, _BURST
    queries    GET /v1/tracks, GET /v1/tracks/{id}/similar    MOODSTREAM_QUERIES_PER_SECOND, _BURST

A client's bucket holds up to ``burst`` tokens and refills at ``rate``; a request takes one, and
a client with none left gets 429 ``rate_limited`` with ``Retry-After`` (seconds until its next
token) while other clients are served. This sits in front of the process-wide bound on
analyses in flight (``MOODSTREAM_MAX_ANALYSES_IN_FLIGHT``, 503 ``busy``): the bound protects the
process, the buckets keep one client from taking all of it. Buckets are per process (each
replica counts on its own) and at most :data:`MAX_CLIENTS` are kept, least recently seen
forgotten first (a forgotten client starts again with a full bucket).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from pipeline import metrics
from pipeline.service.problems import Problem
from pipeline.settings import Settings

ANALYSES = "analyses"
QUERIES = "queries"
LIMITS = (ANALYSES, QUERIES)
#: Most clients whose buckets one process keeps.
MAX_CLIENTS = 10_000


class TokenBuckets:
    """One limit's buckets: ``rate_per_s`` tokens a second, up to ``burst``, per client."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """Take one of ``client``'s tokens: 0.0 when it had one, else the seconds until it will."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate_per_s
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait


class Limits:
    """The service's limits from its settings; a limit whose rate is 0 is off."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.buckets: dict[str, TokenBuckets] = {}
        if settings.analyses_per_minute > 0:
            self.buckets[ANALYSES] = TokenBuckets(
                settings.analyses_per_minute / 60.0, settings.analyses_burst, clock=clock
            )
        if settings.queries_per_second > 0:
            self.buckets[QUERIES] = TokenBuckets(settings.queries_per_second, settings.queries_burst, clock=clock)

    def take(self, limit: str, client: str) -> None:
        """Count one request of ``client`` against ``limit``; a 429 Problem when it is over."""
        buckets = self.buckets.get(limit)
        if buckets is None:
            return
        wait = buckets.take(client)
        metrics.RATE_LIMIT_CLIENTS.labels(limit).set(len(buckets))
        if wait > 0:
            metrics.RATE_LIMITED.labels(limit).inc()
            per = f"{buckets.rate_per_s * 60:g} a minute" if limit == ANALYSES else f"{buckets.rate_per_s:g} a second"
            raise Problem(
                429,
                "rate_limited",
                f"this client is over its {limit} limit ({per}, bursts of {buckets.burst}); try again in {wait:.1f} s",
                retry_after_s=max(1, math.ceil(wait)),
            )

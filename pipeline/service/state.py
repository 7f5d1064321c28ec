"""What the service's routes share: the settings, the scorer, the process pool, who may ask and
how often, the catalog."""

from __future__ import annotations

import asyncio
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from pipeline.contracts import events
from pipeline.service.auth import Authenticator
from pipeline.service.catalog import CatalogStore
from pipeline.service.limits import Limits
from pipeline.service.neighbours import NeighbourIndex
from pipeline.service.problems import Problem
from pipeline.settings import Settings
from pipeline.stages import storage
from pipeline.stages.scoring import Scorer
from pipeline.stages.taxonomy import Taxonomy

#: How long the service waits between attempts to reach the catalog or the broker, in seconds.
RECONNECT_S = 5.0


@dataclass
class State:
    """What the routes share; the catalog and index appear once the store answers."""

    settings: Settings
    scorer: Scorer
    taxonomy: Taxonomy
    model: events.ModelRef
    network: str  # whose embeddings /similar compares
    pool: ProcessPoolExecutor
    auth: Authenticator  # who may ask (pipeline/service/auth.py)
    limits: Limits  # how often each client may (pipeline/service/limits.py)
    catalog: CatalogStore | None = None
    index: NeighbourIndex | None = None
    in_flight: int = 0
    follower: str = "off"  # the catalog consumer's state, for /readyz
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _s3: Any = None

    def s3(self) -> Any:
        """The S3 client the audio route reads tracks with, made on first use."""
        if self._s3 is None:
            self._s3 = storage.make_s3_client(self.settings.s3_max_attempts)
        return self._s3

    def need_catalog(self) -> tuple[CatalogStore, NeighbourIndex]:
        if self.catalog is None or self.index is None:
            raise Problem(503, "unavailable", "the catalog does not answer yet", retry_after_s=int(RECONNECT_S))
        return self.catalog, self.index


def state_of(request: Request) -> State:
    """The service's state, from a request."""
    return request.app.state.moodstream

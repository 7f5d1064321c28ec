"""``moodstream serve``: the web page and HTTP API over uploads and the tagged catalog.

The app (:func:`create_app`) wires the routes (:mod:`pipeline.service.routes`), the problem
responses (:mod:`pipeline.service.problems`) and the HTTP metrics, and runs two things for its
lifetime: the decoding process pool that uploads go through (:mod:`pipeline.service.uploads`),
and the catalog — opened when the store answers, with its similar-tracks index, filled by a
consumer of the output topic running inside the service (:func:`pipeline.service.catalog.follow`,
own consumer group; with ``MOODSTREAM_CATALOG_FOLLOW=false`` the service serves a catalog
another replica fills).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from pipeline import metrics
from pipeline.contracts import events
from pipeline.errors import ConfigError, ServiceUnavailable
from pipeline.kafka import kafka_options
from pipeline.service.catalog import REFRESH_S, CatalogStore, follow
from pipeline.service.neighbours import NeighbourIndex
from pipeline.service.problems import add_error_handlers
from pipeline.service.routes import WEB_DIR, router
from pipeline.service.state import RECONNECT_S, State
from pipeline.settings import Settings
from pipeline.stages.scoring import Scorer, open_scorer
from pipeline.stages.taxonomy import load_taxonomy
from pipeline.worker import pool

log = logging.getLogger(__name__)

#: How often the similar-tracks index is written to disk while it changes, in seconds.
INDEX_SAVE_S = 60.0


def create_app(settings: Settings, *, catalog: CatalogStore | None = None, scorer: Scorer | None = None) -> FastAPI:
    """The ASGI app. ``catalog`` and ``scorer`` replace the configured ones (tests); the app
    closes only what it opened itself."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_scorer = scorer is None
        the_scorer = scorer or await open_scorer(settings)
        meta = the_scorer.meta
        network = settings.similar_network or meta.networks[0].name
        if network not in {n.name for n in meta.networks}:
            raise ConfigError(
                f"MOODSTREAM_SIMILAR_NETWORK={network!r} is not a network of {meta.name} ({', '.join(n.name for n in meta.networks)})"
            )
        state = State(
            settings=settings,
            scorer=the_scorer,
            taxonomy=load_taxonomy(meta, settings.moods_file),
            model=events.ModelRef(meta.name, meta.served_version, tuple((n.name, n.version) for n in meta.networks)),
            network=network,
            pool=pool.make_pool(settings.max_analyses_in_flight),
        )
        app.state.moodstream = state
        metrics.MODEL_INFO.labels(state.model.name, state.model.version).set(1)
        await pool.warm_up(state.pool, settings.max_analyses_in_flight)
        tasks = [asyncio.create_task(_open_catalog(state, catalog))]
        log.info(
            "moodstream serve: %s v%s, similar tracks by %s, page at http://%s:%d/",
            meta.name,
            meta.served_version,
            network,
            settings.service_host,
            settings.service_port,
        )
        try:
            yield
        finally:
            state.stop.set()
            for task in tasks:
                with suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 10)
            if state.index is not None:
                await asyncio.to_thread(state.index.save, settings.index_dir)
            if state.catalog is not None and catalog is None:
                state.catalog.close()
            state.pool.shutdown(wait=False, cancel_futures=True)
            if own_scorer:
                await the_scorer.close()

    app = FastAPI(
        title="moodstream",
        summary="Mood tags for every track: upload a song, look up, rank and find similar tracks in the tagged catalog.",
        version="1",
        lifespan=lifespan,
    )
    add_error_handlers(app)
    _add_metrics_middleware(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB_DIR, check_dir=False), name="static")
    return app


async def _open_catalog(state: State, given: CatalogStore | None) -> None:
    """Open the catalog (waiting for it to answer), load or build the index, then follow the
    output topic until the service stops."""
    s = state.settings
    while state.catalog is None and not state.stop.is_set():
        try:
            opened = (
                given
                if given is not None
                else await asyncio.to_thread(CatalogStore.open, s.catalog_url.get_secret_value())
            )
            state.index = await asyncio.to_thread(NeighbourIndex.load_or_build, s.index_dir, opened, state.network)
            state.catalog = opened
        except ServiceUnavailable as exc:
            log.warning("waiting for the catalog: %s", exc)
            await _sleep_unless_stopped(state, RECONNECT_S)
    if state.catalog is None or state.index is None:
        return
    catalog, index = state.catalog, state.index
    metrics.CATALOG_TRACKS.set(await asyncio.to_thread(catalog.count))
    saver = asyncio.create_task(_save_index_while_running(state, index))
    try:
        if s.catalog_follow:
            await _follow_forever(state, catalog, index)
        else:
            await _refresh_forever(state, catalog, index)
    finally:
        saver.cancel()


async def _refresh_forever(state: State, catalog: CatalogStore, index: NeighbourIndex) -> None:
    """Without a consumer of its own, catch the index up on what other replicas store."""
    while not state.stop.is_set():
        try:
            await asyncio.to_thread(index.refresh, catalog)
            metrics.CATALOG_TRACKS.set(await asyncio.to_thread(catalog.count))
        except ServiceUnavailable as exc:
            log.warning("the similar-tracks index cannot catch up: %s", exc)
        await _sleep_unless_stopped(state, REFRESH_S)


async def _follow_forever(state: State, catalog: CatalogStore, index: NeighbourIndex) -> None:
    """The catalog's consumer of the output topic; a broker or store outage is waited out."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError

    s = state.settings
    while not state.stop.is_set():
        consumer = AIOKafkaConsumer(
            s.output_topic,
            group_id=s.catalog_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(s.kafka_session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.kafka_heartbeat_interval_s * 1000),
            **kafka_options(s),
        )
        try:
            state.follower = "connecting"
            await consumer.start()
            state.follower = "following"
            await follow(consumer, catalog, index, stop=state.stop)
        except (KafkaError, ServiceUnavailable, OSError) as exc:
            state.follower = f"waiting: {type(exc).__name__}"
            log.warning("catalog consumer of %s stopped (%s); reconnecting in %.0f s", s.output_topic, exc, RECONNECT_S)
            await _sleep_unless_stopped(state, RECONNECT_S)
        finally:
            with suppress(Exception):
                await consumer.stop()
    state.follower = "stopped"


async def _save_index_while_running(state: State, index: NeighbourIndex) -> None:
    saved = index.seq
    while True:
        await asyncio.sleep(INDEX_SAVE_S)
        if index.seq != saved:
            saved = index.seq
            await asyncio.to_thread(index.save, state.settings.index_dir)


async def _sleep_unless_stopped(state: State, seconds: float) -> None:
    with suppress(asyncio.TimeoutError):
        await asyncio.wait_for(state.stop.wait(), seconds)


def _add_metrics_middleware(app: FastAPI) -> None:
    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", None) or (
                "/static" if request.url.path.startswith("/static/") else "unmatched"
            )
            metrics.HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
            metrics.HTTP_SECONDS.labels(route).observe(time.perf_counter() - start)


# --- running it ------------------------------------------------------------------------------------


def serve(settings: Settings) -> int:
    """Run the service until SIGTERM/SIGINT; uvicorn finishes the requests in flight first."""
    import uvicorn

    config = uvicorn.Config(
        create_app(settings),
        host=settings.service_host,
        port=settings.service_port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=int(settings.analysis_timeout_s) + 5,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    server.run()
    # uvicorn logs a failed start-up (a ConfigError in the lifespan) and returns without serving.
    return 0 if server.started else 2

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
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import start_http_server

from pipeline import metrics
from pipeline.contracts import events
from pipeline.errors import ConfigError, ServiceUnavailable
from pipeline.kafka import kafka_options
from pipeline.service.auth import Authenticator
from pipeline.service.catalog import REFRESH_S, CatalogStore, follow
from pipeline.service.headers import add_headers
from pipeline.service.limits import Limits
from pipeline.service.neighbours import NeighbourIndex
from pipeline.service.problems import PROBLEM_SCHEMA, add_error_handlers
from pipeline.service.routes import WEB_DIR, mood_names, router
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
            auth=Authenticator(settings),
            limits=Limits(settings),
        )
        app.state.moodstream = state
        metrics.MODEL_INFO.labels(state.model.name, state.model.version).set(1)
        await pool.warm_up(state.pool, settings.max_analyses_in_flight)
        tasks = [asyncio.create_task(_open_catalog(state, catalog))]
        metrics_server = None
        if settings.service_metrics_port:
            metrics_server, _ = start_http_server(settings.service_metrics_port, addr=settings.service_host)
        log.info(
            "moodstream serve: %s v%s, similar tracks by %s, page at http://%s:%d/, %s",
            meta.name,
            meta.served_version,
            network,
            settings.service_host,
            settings.service_port,
            _auth_summary(state.auth),
        )
        try:
            yield
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
            state.stop.set()
            for task in tasks:
                with suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 10)
            if state.index is not None:
                await asyncio.to_thread(state.index.try_save, settings.index_dir)
            if state.catalog is not None and catalog is None:
                state.catalog.close()
            # Joined, not left behind: shutdown(wait=False) returned before its processes were told
            # to stop, and they outlived the service (each a decoding process of ~350 MB).
            await asyncio.to_thread(state.pool.shutdown, wait=True, cancel_futures=True)
            if own_scorer:
                await the_scorer.close()

    app = FastAPI(
        title="moodstream",
        summary="Mood tags for every track: upload a song, look up, rank and find similar tracks in the tagged catalog.",
        version="1",
        lifespan=lifespan,
        # Swagger UI and ReDoc load scripts from a CDN and run inline ones, which the page's
        # Content-Security-Policy forbids: the document is at /openapi.json for any viewer.
        docs_url=None,
        redoc_url=None,
    )
    add_error_handlers(app)
    _add_metrics_middleware(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB_DIR, check_dir=False), name="static")
    add_headers(app, settings)
    app.openapi = lambda: _openapi(app, settings)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's document, told what the service really answers: its errors are problem
    documents (400 for a bad parameter, not FastAPI's 422 body), the mood families are the
    model's, and the security schemes are required only where auth is on."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes, description=app.description
    )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    state = getattr(app.state, "moodstream", None)
    for path in document["paths"].values():
        for operation in path.values():
            responses = operation.get("responses", {})
            invalid = responses.pop("422", None)
            if invalid is not None and "HTTPValidationError" not in json.dumps(invalid):
                responses["422"] = invalid  # the route's own 422 (an upload that is not audio)
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "mood" and state is not None and mood_names(state):
                    parameter["schema"] = {"type": "string", "enum": mood_names(state)}
            if not settings.auth_enabled:
                operation.pop("security", None)
                for status in ("401", "403"):
                    responses.pop(status, None)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if not settings.auth_enabled:
        components.pop("securitySchemes", None)
    app.openapi_schema = document
    return document


def _auth_summary(auth: Authenticator) -> str:
    if not auth.enabled:
        return "authentication OFF (MOODSTREAM_AUTH_ENABLED=false: anyone who reaches the port is served)"
    kinds = [f"tokens of {auth.issuer} for {auth.audience}"] if auth.jwks is not None else []
    if auth.keys:
        kinds.append("API keys")
    return "authentication: " + " and ".join(kinds)


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
        current = index.seq
        if current != saved and await asyncio.to_thread(index.try_save, state.settings.index_dir):
            saved = current


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

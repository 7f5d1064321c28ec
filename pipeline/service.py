"""``moodstream serve``: the web page and HTTP API over uploads and the tagged catalog.

    POST /v1/analyses                    an upload -> the record a track gets on tracks.moods
    GET  /v1/tracks?mood=relaxed&limit=50   the catalog ranked for a feed (also valence=, arousal=, quadrant=)
    GET  /v1/tracks/{track_id}           a track's latest record
    GET  /v1/tracks/{track_id}/similar   nearest tracks by audio embedding
    GET  /v1/moods                       the mood families and quadrants one can rank by
    GET  /  /static/…                    the page (pipeline/web/)
    GET  /healthz  /readyz  /metrics  /docs

An upload goes through the worker's own stages (:func:`pipeline.tagging.analyse` in a process
pool, the configured scorer, :func:`pipeline.tagging.track_moods`), so it gets the same record a
catalog track gets. Uploads are bounded three ways: ``MOODSTREAM_MAX_UPLOAD_BYTES`` (read as a
stream and cut off there: 413), ``MOODSTREAM_ANALYSIS_TIMEOUT_S`` (504) and
``MOODSTREAM_MAX_ANALYSES_IN_FLIGHT`` (beyond: 503 with ``Retry-After``, answered before the
body is read, so memory stays bounded whatever the number of clients).

Every error is ``application/problem+json`` (RFC 9457) with a ``reason``: the dead-letter reason
codes for what is wrong with the audio (``too_large``, ``undecodable``, ``too_short``,
``inference_failed``, ``not_found``), and ``bad_request``, ``busy``, ``timeout``,
``unavailable``, ``method_not_allowed``, ``internal`` for the rest.

The catalog is filled by a consumer of the output topic running inside the service
(:func:`pipeline.catalog.follow`, own consumer group); with ``MOODSTREAM_CATALOG_FOLLOW=false``
the service serves a catalog another replica fills.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException

from pipeline import audio, events, metrics
from pipeline.catalog import REFRESH_S, Catalog, embedding_of, follow
from pipeline.errors import ConfigError, InferenceFailed, ServiceUnavailable, TrackError
from pipeline.neighbours import NeighbourIndex
from pipeline.scoring import Scorer, open_scorer
from pipeline.settings import REPO_ROOT, Settings
from pipeline.tagging import Analysis, analyse_file, finite, track_moods
from pipeline.taxonomy import QUADRANTS, Taxonomy, load_taxonomy
from pipeline.worker import warm_process

log = logging.getLogger(__name__)

WEB_DIR = REPO_ROOT / "pipeline" / "web"
#: Multipart framing around the file (boundaries, part headers) allowed beyond the upload cap.
_FORM_OVERHEAD_BYTES = 64 * 1024
#: How long a refused client is told to wait (503), in seconds: about one short track's analysis.
RETRY_AFTER_S = 5
#: How often the similar-tracks index is written to disk while it changes, in seconds.
INDEX_SAVE_S = 60.0
#: How long the service waits between attempts to reach the catalog or the broker, in seconds.
RECONNECT_S = 5.0


class Problem(Exception):
    """An answer other than success: becomes an ``application/problem+json`` response."""

    def __init__(self, status: int, reason: str, detail: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail, self.retry_after_s = status, reason, detail, retry_after_s


_TITLES = {
    "too_large": "The upload is too large",
    "undecodable": "The upload is not audio this service can decode",
    "too_short": "The audio is too short to analyse",
    "inference_failed": "The model could not score this audio",
    "not_found": "Not found",
    "bad_request": "The request is malformed",
    "busy": "Too many analyses in flight",
    "timeout": "The analysis took too long",
    "unavailable": "A service this answer needs is unavailable",
    "method_not_allowed": "Method not allowed",
    "internal": "Internal error",
}


def problem_response(status: int, reason: str, detail: str, *, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    body = {"type": f"urn:moodstream:problem:{reason}", "title": _TITLES.get(reason, reason), "status": status, "detail": detail, "reason": reason}
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


@dataclass
class _State:
    """What the routes share; the catalog and index appear once the store answers."""

    settings: Settings
    scorer: Scorer
    taxonomy: Taxonomy
    model: events.ModelRef
    network: str  # whose embeddings /similar compares
    pool: ProcessPoolExecutor
    catalog: Catalog | None = None
    index: NeighbourIndex | None = None
    in_flight: int = 0
    follower: str = "off"  # the catalog consumer's state, for /readyz
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def need_catalog(self) -> tuple[Catalog, NeighbourIndex]:
        if self.catalog is None or self.index is None:
            raise Problem(503, "unavailable", "the catalog does not answer yet", retry_after_s=int(RECONNECT_S))
        return self.catalog, self.index


def create_app(settings: Settings, *, catalog: Catalog | None = None, scorer: Scorer | None = None) -> FastAPI:
    """The ASGI app. ``catalog`` and ``scorer`` replace the configured ones (tests); the app
    closes only what it opened itself."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_scorer = scorer is None
        the_scorer = scorer or await open_scorer(settings)
        meta = the_scorer.meta
        network = settings.similar_network or meta.networks[0].name
        if network not in {n.name for n in meta.networks}:
            raise ConfigError(f"MOODSTREAM_SIMILAR_NETWORK={network!r} is not a network of {meta.name} ({', '.join(n.name for n in meta.networks)})")
        state = _State(
            settings=settings,
            scorer=the_scorer,
            taxonomy=load_taxonomy(meta, settings.moods_file),
            model=events.ModelRef(meta.name, meta.served_version, tuple((n.name, n.version) for n in meta.networks)),
            network=network,
            pool=_make_pool(settings.max_analyses_in_flight),
        )
        app.state.moodstream = state
        metrics.MODEL_INFO.labels(state.model.name, state.model.version).set(1)
        await _warm_up(state.pool, settings.max_analyses_in_flight)
        tasks = [asyncio.create_task(_open_catalog(state, catalog))]
        log.info("moodstream serve: %s v%s, similar tracks by %s, page at http://%s:%d/", meta.name, meta.served_version, network, settings.service_host, settings.service_port)
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
    _add_error_handlers(app)
    _add_metrics_middleware(app)
    _add_routes(app)
    app.mount("/static", StaticFiles(directory=WEB_DIR, check_dir=False), name="static")
    return app


# --- start-up -------------------------------------------------------------------------------------


def _make_pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: the parent runs an event loop and gRPC threads that must not be copied.
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


async def _warm_up(pool: ProcessPoolExecutor, workers: int) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(pool, warm_process) for _ in range(workers)))


async def _open_catalog(state: _State, given: Catalog | None) -> None:
    """Open the catalog (waiting for it to answer), load or build the index, then follow the
    output topic until the service stops."""
    s = state.settings
    while state.catalog is None and not state.stop.is_set():
        try:
            opened = given or await asyncio.to_thread(Catalog.open, s.catalog_url.get_secret_value())
            state.index = await asyncio.to_thread(NeighbourIndex.load_or_build, s.index_dir, opened, state.network)
            state.catalog = opened
        except ServiceUnavailable as exc:
            log.warning("waiting for the catalog: %s", exc)
            await _sleep_unless_stopped(state, RECONNECT_S)
    if state.catalog is None:
        return
    metrics.CATALOG_TRACKS.set(await asyncio.to_thread(state.catalog.count))
    saver = asyncio.create_task(_save_index_while_running(state))
    try:
        if s.catalog_follow:
            await _follow_forever(state)
        else:
            await _refresh_forever(state)
    finally:
        saver.cancel()


async def _refresh_forever(state: _State) -> None:
    """Without a consumer of its own, catch the index up on what other replicas store."""
    while not state.stop.is_set():
        try:
            await asyncio.to_thread(state.index.refresh, state.catalog)
            metrics.CATALOG_TRACKS.set(await asyncio.to_thread(state.catalog.count))
        except ServiceUnavailable as exc:
            log.warning("the similar-tracks index cannot catch up: %s", exc)
        await _sleep_unless_stopped(state, REFRESH_S)


async def _follow_forever(state: _State) -> None:
    """The catalog's consumer of the output topic; a broker or store outage is waited out."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError

    from pipeline.publish import kafka_options

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
            await follow(consumer, state.catalog, state.index, stop=state.stop)
        except (KafkaError, ServiceUnavailable, OSError) as exc:
            state.follower = f"waiting: {type(exc).__name__}"
            log.warning("catalog consumer of %s stopped (%s); reconnecting in %.0f s", s.output_topic, exc, RECONNECT_S)
            await _sleep_unless_stopped(state, RECONNECT_S)
        finally:
            with suppress(Exception):
                await consumer.stop()
    state.follower = "stopped"


async def _save_index_while_running(state: _State) -> None:
    saved = state.index.seq
    while True:
        await asyncio.sleep(INDEX_SAVE_S)
        if state.index.seq != saved:
            saved = state.index.seq
            await asyncio.to_thread(state.index.save, state.settings.index_dir)


async def _sleep_unless_stopped(state: _State, seconds: float) -> None:
    with suppress(asyncio.TimeoutError):
        await asyncio.wait_for(state.stop.wait(), seconds)


# --- errors and metrics ------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.reason, exc.detail, retry_after_s=exc.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return problem_response(400, "bad_request", detail)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return problem_response(exc.status_code, reason, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return problem_response(500, "internal", f"{type(exc).__name__} (logged)")


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
            route = getattr(request.scope.get("route"), "path", None) or ("/static" if request.url.path.startswith("/static/") else "unmatched")
            metrics.HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
            metrics.HTTP_SECONDS.labels(route).observe(time.perf_counter() - start)


# --- routes --------------------------------------------------------------------------------------


def _state(request: Request) -> _State:
    return request.app.state.moodstream


def _add_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.post(
        "/v1/analyses",
        summary="Tag an uploaded audio file",
        description="Multipart form with the audio in the field `file` (or the audio itself as the body, with an audio/* or application/octet-stream type). The answer is the record a catalog track gets on tracks.moods; the track_id is `upload-` and the first 16 hex digits of the file's SHA-256.",
        responses={413: {"description": "larger than MOODSTREAM_MAX_UPLOAD_BYTES"}, 415: {"description": "not an audio container"}, 422: {"description": "audio, but undecodable or too short"}, 503: {"description": "busy (Retry-After) or the scorer is unavailable"}, 504: {"description": "longer than MOODSTREAM_ANALYSIS_TIMEOUT_S"}},
    )
    async def analyses(request: Request) -> Response:
        state = _state(request)
        s = state.settings
        if state.in_flight >= s.max_analyses_in_flight:
            metrics.ANALYSES.labels("busy").inc()
            raise Problem(503, "busy", f"{state.in_flight} analyses in flight, the most this service takes at once", retry_after_s=RETRY_AFTER_S)
        state.in_flight += 1
        metrics.ANALYSES_IN_FLIGHT.set(state.in_flight)
        job = _Job()
        try:
            record = await asyncio.wait_for(_tag_upload(request, state, job), s.analysis_timeout_s)
        except asyncio.TimeoutError:
            metrics.ANALYSES.labels("timeout").inc()
            raise Problem(504, "timeout", f"the analysis took longer than {s.analysis_timeout_s:g} s (MOODSTREAM_ANALYSIS_TIMEOUT_S)") from None
        except Problem as exc:
            metrics.ANALYSES.labels(exc.reason).inc()
            raise
        finally:
            _release_when_done(state, job)
        metrics.ANALYSES.labels("tagged").inc()
        return Response(record, media_type="application/json")

    @app.get("/v1/tracks", summary="The catalog ranked for a feed")
    async def tracks(
        request: Request,
        mood: str | None = Query(None, description="rank by this mood family's score (GET /v1/moods lists them); without it, newest first"),
        valence: str | None = Query(None, description="only tracks whose valence lies in low,high (within [-1, 1])", examples=["0.2,1"]),
        arousal: str | None = Query(None, description="only tracks whose arousal lies in low,high (within [-1, 1])", examples=["-1,0"]),
        quadrant: str | None = Query(None, description="only tracks in this quadrant of the mood plane: " + ", ".join(QUADRANTS)),
        limit: int = Query(50, ge=1, le=500),
    ) -> dict[str, Any]:
        state = _state(request)
        the_catalog, _ = state.need_catalog()
        moods = _mood_names(state)
        if mood is not None and mood not in moods:
            raise Problem(400, "bad_request", f"unknown mood {mood!r}; one of: {', '.join(moods) or '(this model has no mood families)'}")
        if quadrant is not None and quadrant not in QUADRANTS:
            raise Problem(400, "bad_request", f"unknown quadrant {quadrant!r}; one of: {', '.join(QUADRANTS)}")
        region = {"valence": _range(valence, "valence"), "arousal": _range(arousal, "arousal")}
        found = await _read(the_catalog.ranked, mood=mood, quadrant=quadrant, limit=limit, **region)
        return {"tracks": found, "count": len(found), "mood": mood}

    # Track ids may hold '/': the similar route comes first so its suffix is not read as one.
    @app.get("/v1/tracks/{track_id:path}/similar", summary="Tracks that sound like this one (nearest audio embeddings)")
    async def similar(request: Request, track_id: str, limit: int = Query(20, ge=1, le=200)) -> dict[str, Any]:
        state = _state(request)
        the_catalog, index = state.need_catalog()
        if track_id not in index:
            record = await _read(the_catalog.track, track_id)
            if record is None:
                raise Problem(404, "not_found", f"no track {track_id!r} in the catalog")
            if embedding_of(record, index.network) is None:
                raise Problem(404, "not_found", f"track {track_id!r} has no {index.network} embedding (tagged with MOODSTREAM_EMBEDDINGS off?)")
            # Stored a moment ago (by this replica's consumer or another): catch up now.
            await _read(index.refresh, the_catalog)
        try:
            pairs = await asyncio.to_thread(index.similar, track_id, limit)
        except KeyError:
            raise Problem(404, "not_found", f"track {track_id!r} has an embedding the index could not take (logged)") from None
        summaries = await _read(the_catalog.summaries, [other for other, _ in pairs])
        near = [{**summaries[other], "distance": round(distance, 6)} for other, distance in pairs if other in summaries]
        return {"track_id": track_id, "network": index.network, "similar": near}

    @app.get("/v1/tracks/{track_id:path}", summary="A track's latest record")
    async def track(request: Request, track_id: str) -> Response:
        the_catalog, _ = _state(request).need_catalog()
        record = await _read(the_catalog.track, track_id)
        if record is None:
            raise Problem(404, "not_found", f"no track {track_id!r} in the catalog")
        return JSONResponse(record)

    @app.get("/v1/moods", summary="Mood families and quadrants the catalog can be ranked by")
    async def moods(request: Request) -> dict[str, Any]:
        state = _state(request)
        return {"moods": _mood_names(state), "quadrants": list(QUADRANTS), "source": state.taxonomy.source, "model": {"name": state.model.name, "version": state.model.version}}

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the scorer and the catalog answer")
    async def readyz(request: Request) -> JSONResponse:
        state = _state(request)
        checks = {"scorer": "ok", "catalog": "ok", "follower": state.follower if state.settings.catalog_follow else "off"}
        ready = getattr(state.scorer, "ready", None)
        if ready is not None and not await ready():
            checks["scorer"] = "not ready"
        if state.catalog is None:
            checks["catalog"] = "not open"
        else:
            try:
                await asyncio.to_thread(state.catalog.count)
            except ServiceUnavailable as exc:
                checks["catalog"] = str(exc)
        ok = checks["scorer"] == "ok" and checks["catalog"] == "ok"
        return JSONResponse({"status": "ready" if ok else "not ready", **checks}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _mood_names(state: _State) -> list[str]:
    if state.taxonomy.families:
        return [f.name for f in state.taxonomy.families]
    return list(QUADRANTS) if state.taxonomy.source == "classes" else []


def _range(text: str | None, name: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise Problem(400, "bad_request", f"{name} must be low,high (two numbers in [-1, 1]), got {text!r}") from None
    if not -1 <= low <= high <= 1:
        raise Problem(400, "bad_request", f"{name} must satisfy -1 <= low <= high <= 1, got {text!r}")
    return low, high


async def _read(call: Any, *args: Any, **kwargs: Any) -> Any:
    """A catalog read off the event loop; an unreachable store is a 503, not a 500."""
    try:
        return await asyncio.to_thread(call, *args, **kwargs)
    except ServiceUnavailable as exc:
        raise Problem(503, "unavailable", str(exc), retry_after_s=int(RECONNECT_S)) from None


# --- an upload ---------------------------------------------------------------------------------


@dataclass
class _Job:
    """One upload's resources: its spooled file and its decoding future, which may outlive a
    timeout (the process cannot be interrupted); both are let go only when it ends."""

    spool: _Spool | None = None
    future: asyncio.Future | None = None


async def _tag_upload(request: Request, state: _State, job: _Job) -> bytes:
    """Read, analyse and score one upload; returns the record's JSON."""
    s = state.settings
    started = time.perf_counter()
    job.spool = spool = await read_upload(request, s.max_upload_bytes)
    kind = audio.sniff(spool.head)
    if kind is None:
        detail = "the upload is empty" if not spool.size else "its first bytes are no audio container's (MP3, Ogg, FLAC, WAV, AIFF, MP4/M4A, WebM/Matroska, …)"
        raise Problem(415, "undecodable", detail)
    received = time.perf_counter()
    loop = asyncio.get_running_loop()
    task = functools.partial(analyse_file, str(spool.path), max_duration_s=s.max_duration_s, min_duration_s=s.min_duration_s, excerpts=s.excerpts, excerpt_s=s.excerpt_s)
    try:
        future = loop.run_in_executor(state.pool, task)
    except BrokenProcessPool:
        state.pool = _make_pool(s.max_analyses_in_flight)
        future = loop.run_in_executor(state.pool, task)
    job.future = future
    try:
        result: Analysis = await asyncio.shield(future)
    except TrackError as exc:
        raise Problem(422, exc.reason, str(exc)) from None
    except BrokenProcessPool:
        # A decoder crash (or the kernel's OOM killer) took the pool; the next upload gets a new one.
        state.pool = _make_pool(s.max_analyses_in_flight)
        raise Problem(500, "internal", "the decoding process died on this file") from None
    decoded = time.perf_counter()
    try:
        outputs = finite(await state.scorer.score(result.patches.patches))
    except InferenceFailed as exc:
        raise Problem(502, "inference_failed", str(exc)) from None
    except ServiceUnavailable as exc:
        raise Problem(503, "unavailable", str(exc), retry_after_s=RETRY_AFTER_S) from None
    done = time.perf_counter()
    latency_ms = {"upload": _ms(received - started), "decode": _ms(result.decode_s), "features": _ms(result.features_s), "analysis": _ms(decoded - received), "inference": _ms(done - decoded), "total": _ms(done - started)}
    record = track_moods(
        result, outputs, state.taxonomy,
        track_id="upload-" + spool.sha256[:16], model=state.model,
        processed_at=datetime.now(timezone.utc), latency_ms=latency_ms,
        top_moods=s.top_moods, segment_s=s.timeline_segment_s, embeddings=s.embeddings,
    )
    return record.to_json()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _release_when_done(state: _State, job: _Job) -> None:
    def release(*_: object) -> None:
        state.in_flight -= 1
        metrics.ANALYSES_IN_FLIGHT.set(state.in_flight)
        if job.spool is not None:
            job.spool.discard()

    if job.future is not None and not job.future.done():
        job.future.add_done_callback(release)
    else:
        release()


async def read_upload(request: Request, limit: int) -> _Spool:
    """The uploaded file from a multipart form (field ``file``) or a raw audio body, spooled to
    a temporary file as it streams in and refused (413) as soon as it passes ``limit`` bytes.
    The file name a client sends is never used: not for a path, not for the type. The caller
    owns the spool (:meth:`_Spool.discard`); on an error it is gone already."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + _FORM_OVERHEAD_BYTES:
        raise Problem(413, "too_large", f"the upload is {int(declared)} bytes; the most is {limit} (MOODSTREAM_MAX_UPLOAD_BYTES)")
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise Problem(400, "bad_request", "a multipart upload needs a boundary")
        form = _FilePart(limit)
        try:
            parser = MultipartParser(boundary, form.callbacks(), max_size=limit + _FORM_OVERHEAD_BYTES)
            await _feed(request, parser.write, limit + _FORM_OVERHEAD_BYTES)
            parser.finalize()
            if form.spool is None:
                raise Problem(400, "bad_request", "no form field named 'file' (the audio)" if not form.malformed else "the multipart body is malformed")
        except BaseException:
            form.discard()
            raise
        form.spool.close()
        return form.spool
    if kind.startswith(b"audio/") or kind == b"application/octet-stream":
        spool = _Spool(limit)
        try:
            await _feed(request, spool.write, limit)
        except BaseException:
            spool.discard()
            raise
        spool.close()
        return spool
    raise Problem(415, "bad_request", f"send multipart/form-data with the audio in 'file', or the audio as the body (audio/* or application/octet-stream); got {kind.decode(errors='replace') or 'no Content-Type'}")


async def _feed(request: Request, write: Any, limit: int) -> None:
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise Problem(413, "too_large", f"the upload passed {limit} bytes (MOODSTREAM_MAX_UPLOAD_BYTES)")
            write(chunk)
    except Problem:
        raise
    except Exception as exc:  # the client went away mid-body, or the framing broke
        if type(exc).__name__ in ("ClientDisconnect", "MultipartParseError", "QuerystringParseError", "DecodeError"):
            raise Problem(400, "bad_request", f"the upload broke off or is malformed ({type(exc).__name__})") from None
        raise


class _Spool:
    """An upload on its way to a temporary file, hashed (SHA-256) as it passes; ``head`` keeps
    its first bytes for sniffing the container."""

    HEAD_BYTES = 64

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.head = b""
        self._hash = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix="moodstream-upload-")
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise Problem(413, "too_large", f"the file passed {self.limit} bytes (MOODSTREAM_MAX_UPLOAD_BYTES)")
        if len(self.head) < self.HEAD_BYTES:
            self.head += chunk[: self.HEAD_BYTES - len(self.head)]
        self._hash.update(chunk)
        self._file.write(chunk)

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class _FilePart:
    """Spools the first part named ``file`` of a multipart body; other fields are ignored."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spool: _Spool | None = None  # the file part, once it ended
        self.malformed = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._current: _Spool | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._add("_header_field", data[start:end]),
            "on_header_value": lambda data, start, end: self._add("_header_value", data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._end,
        }

    def discard(self) -> None:
        for spool in (self._current, self.spool):
            if spool is not None:
                spool.discard()

    def _add(self, name: str, chunk: bytes) -> None:
        setattr(self, name, getattr(self, name) + chunk)

    def _begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._header_field.strip().lower()] = self._header_value.strip()
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if params.get(b"name") == b"file" and self.spool is None and self._current is None:
            self._current = _Spool(self.limit)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.write(data[start:end])

    def _end(self) -> None:
        if self._current is not None:
            self.spool, self._current = self._current, None


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

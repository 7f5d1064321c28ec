"""The service's routes: thin, each one reads the request, calls what does the work and answers.

POST /v1/analyses                    an upload -> the record a track gets on tracks.moods
GET  /v1/tracks?mood=relaxed&limit=50   the catalog ranked for a feed (also valence=, arousal=, quadrant=,
                                     audio features: tempo=120,128&key=9&mode=0&sort=-energy)
GET  /v1/tracks/{track_id}           a track's latest record
GET  /v1/tracks/{track_id}/features  its audio features in Spotify's audio-features shape
GET  /v1/tracks/{track_id}/audio     its audio as announced, for the page's player
GET  /v1/tracks/{track_id}/similar   nearest tracks by audio embedding
GET  /v1/moods                       the mood families and quadrants one can rank by
GET  /                               the page (``web/``; its assets under /static)
GET  /healthz  /readyz  /metrics

Who may call which (``MOODSTREAM_AUTH_ENABLED``, :mod:`pipeline.service.auth`): the catalog and
the moods need the scope moods:read, uploads moods:analyse, /metrics on this port moods:admin;
the page, its assets, /healthz, /readyz and /openapi.json are open. Uploads and the expensive
queries also take a token of their client's bucket (:mod:`pipeline.service.limits`).
"""

from __future__ import annotations

import asyncio
import re
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import metrics
from pipeline.errors import ServiceUnavailable, TooLarge, TrackError
from pipeline.service.auth import ADMIN, ANALYSE, READ, allow
from pipeline.service.catalog import EXACT_FEATURES, FEATURES, embedding_of
from pipeline.service.limits import ANALYSES, QUERIES
from pipeline.service.problems import Problem, documented
from pipeline.service.state import RECONNECT_S, State, state_of
from pipeline.service.uploads import RETRY_AFTER_S, Job, release_when_done, tag_upload
from pipeline.stages import storage
from pipeline.stages.audio import sniff
from pipeline.stages.taxonomy import QUADRANTS

#: The page's assets (package data, read through importlib.resources).
WEB_DIR = Path(str(resources.files("pipeline.service").joinpath("web")))

router = APIRouter()

#: The upload's body as the OpenAPI document describes it (the route reads the stream itself).
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "the audio"}},
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "audio/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
#: A region of the mood plane's axis: low,high.
_RANGE = r"^-?(\d+\.?\d*|\.\d+),-?(\d+\.?\d*|\.\d+)$"
#: Each audio feature's bounds: a filter's low,high lies within them.
_FEATURE_BOUNDS = {"tempo": (0.0, 1000.0), "loudness": (-100.0, 20.0)}
_UNIT = (0.0, 1.0)
_EXACT_BOUNDS = {"key": (-1, 11), "mode": (-1, 1), "time_signature": (-1, 7)}
_SORTS = [f"{sign}{name}" for name in (*FEATURES, *EXACT_FEATURES) for sign in ("", "-")]


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


@router.post(
    "/v1/analyses",
    summary="Tag an uploaded audio file",
    description="Multipart form with the audio in the field `file` (or the audio itself as the body, with an audio/* or application/octet-stream type). The answer is the record a catalog track gets on tracks.moods; the track_id is `upload-` and the first 16 hex digits of the file's SHA-256.",
    dependencies=[allow(ANALYSE, limit=ANALYSES)],
    responses=documented(400, 401, 403, 413, 415, 422, 429, 502, 503, 504),
    openapi_extra=_UPLOAD_BODY,
)
async def analyses(request: Request) -> Response:
    state = state_of(request)
    s = state.settings
    if state.in_flight >= s.max_analyses_in_flight:
        metrics.ANALYSES.labels("busy").inc()
        raise Problem(
            503,
            "busy",
            f"{state.in_flight} analyses in flight, the most this service takes at once",
            retry_after_s=RETRY_AFTER_S,
        )
    state.in_flight += 1
    metrics.ANALYSES_IN_FLIGHT.set(state.in_flight)
    job = Job()
    try:
        record = await asyncio.wait_for(tag_upload(request, state, job), s.analysis_timeout_s)
    except TimeoutError:
        metrics.ANALYSES.labels("timeout").inc()
        raise Problem(
            504, "timeout", f"the analysis took longer than {s.analysis_timeout_s:g} s (MOODSTREAM_ANALYSIS_TIMEOUT_S)"
        ) from None
    except Problem as exc:
        metrics.ANALYSES.labels(exc.reason).inc()
        raise
    finally:
        release_when_done(state, job)
    metrics.ANALYSES.labels("tagged").inc()
    return Response(record, media_type="application/json")


@router.get(
    "/v1/tracks",
    summary="The catalog ranked for a feed",
    dependencies=[allow(READ, limit=QUERIES)],
    responses=documented(400, 401, 403, 429, 503),
)
async def tracks(
    request: Request,
    mood: str | None = Query(
        None, description="rank by this mood family's score (GET /v1/moods lists them); without it, newest first"
    ),
    valence: str | None = Query(
        None,
        description="only tracks whose valence lies in low,high (-1 <= low <= high <= 1)",
        examples=["0.2,1"],
        json_schema_extra={"pattern": _RANGE},
    ),
    arousal: str | None = Query(
        None,
        description="only tracks whose arousal lies in low,high (-1 <= low <= high <= 1)",
        examples=["-1,0"],
        json_schema_extra={"pattern": _RANGE},
    ),
    quadrant: str | None = Query(
        None,
        description="only tracks in this quadrant of the mood plane: " + ", ".join(QUADRANTS),
        json_schema_extra={"enum": list(QUADRANTS)},
    ),
    tempo: str | None = Query(
        None,
        description="only tracks whose tempo (BPM) lies in low,high",
        examples=["120,128"],
        json_schema_extra={"pattern": _RANGE},
    ),
    loudness: str | None = Query(
        None,
        description="integrated loudness (LUFS) in low,high",
        examples=["-14,-6"],
        json_schema_extra={"pattern": _RANGE},
    ),
    energy: str | None = Query(
        None, description="energy (0-1) in low,high", examples=["0.7,1"], json_schema_extra={"pattern": _RANGE}
    ),
    danceability: str | None = Query(
        None, description="danceability (0-1) in low,high", json_schema_extra={"pattern": _RANGE}
    ),
    acousticness: str | None = Query(
        None, description="acousticness (0-1) in low,high", json_schema_extra={"pattern": _RANGE}
    ),
    instrumentalness: str | None = Query(
        None, description="instrumentalness (0-1) in low,high", json_schema_extra={"pattern": _RANGE}
    ),
    speechiness: str | None = Query(
        None, description="speechiness (0-1) in low,high", json_schema_extra={"pattern": _RANGE}
    ),
    liveness: str | None = Query(None, description="liveness (0-1) in low,high", json_schema_extra={"pattern": _RANGE}),
    key: int | None = Query(None, ge=-1, le=11, description="pitch class of the key, 0 = C (-1: no key)"),
    mode: int | None = Query(None, ge=-1, le=1, description="1 major, 0 minor"),
    time_signature: int | None = Query(None, ge=-1, le=7, description="beats per bar"),
    sort: str | None = Query(
        None,
        description="order by an audio feature, highest first with a leading '-' (e.g. -energy)",
        json_schema_extra={"enum": _SORTS},
    ),
    limit: int = Query(50, ge=1, le=500),
) -> dict[str, Any]:
    state = state_of(request)
    the_catalog, _ = state.need_catalog()
    moods = mood_names(state)
    asked = {
        "tempo": tempo,
        "loudness": loudness,
        "energy": energy,
        "danceability": danceability,
        "acousticness": acousticness,
        "instrumentalness": instrumentalness,
        "speechiness": speechiness,
        "liveness": liveness,
    }
    ranges = {
        name: _range(text, name, _FEATURE_BOUNDS.get(name, _UNIT)) for name, text in asked.items() if text is not None
    }
    exact = {
        name: value
        for name, value in (("key", key), ("mode", mode), ("time_signature", time_signature))
        if value is not None
    }
    if sort is not None and sort not in _SORTS:
        raise Problem(
            400, "bad_request", f"sort must be an audio feature, optionally after '-': one of {', '.join(_SORTS)}"
        )
    if mood is not None and mood not in moods:
        raise Problem(
            400,
            "bad_request",
            f"unknown mood {mood!r}; one of: {', '.join(moods) or '(this model has no mood families)'}",
        )
    if quadrant is not None and quadrant not in QUADRANTS:
        raise Problem(400, "bad_request", f"unknown quadrant {quadrant!r}; one of: {', '.join(QUADRANTS)}")
    region = {"valence": _range(valence, "valence"), "arousal": _range(arousal, "arousal")}
    found = await _read(
        the_catalog.ranked, mood=mood, quadrant=quadrant, ranges=ranges, exact=exact, sort=sort, limit=limit, **region
    )
    return {"tracks": found, "count": len(found), "mood": mood, "sort": sort}


# Track ids may hold '/': the similar route comes first so its suffix is not read as one.
@router.get(
    "/v1/tracks/{track_id:path}/similar",
    summary="Tracks that sound like this one (nearest audio embeddings)",
    dependencies=[allow(READ, limit=QUERIES)],
    responses=documented(400, 401, 403, 404, 429, 503),
)
async def similar(request: Request, track_id: str, limit: int = Query(20, ge=1, le=200)) -> dict[str, Any]:
    state = state_of(request)
    the_catalog, index = state.need_catalog()
    if track_id not in index:
        record = await _read(the_catalog.track, track_id)
        if record is None:
            raise Problem(404, "not_found", f"no track {track_id!r} in the catalog")
        if embedding_of(record, index.network) is None:
            raise Problem(
                404,
                "not_found",
                f"track {track_id!r} has no {index.network} embedding (tagged with MOODSTREAM_EMBEDDINGS off?)",
            )
        # Stored a moment ago (by this replica's consumer or another): catch up now.
        await _read(index.refresh, the_catalog)
    try:
        pairs = await asyncio.to_thread(index.similar, track_id, limit)
    except KeyError:
        raise Problem(
            404, "not_found", f"track {track_id!r} has an embedding the index could not take (logged)"
        ) from None
    summaries = await _read(the_catalog.summaries, [other for other, _ in pairs])
    near = [{**summaries[other], "distance": round(distance, 6)} for other, distance in pairs if other in summaries]
    return {"track_id": track_id, "network": index.network, "similar": near}


@router.get(
    "/v1/tracks/{track_id:path}/features",
    summary="A track's audio features, in the shape of Spotify's audio-features object",
    dependencies=[allow(READ)],
    responses=documented(401, 403, 404, 503),
)
async def features(request: Request, track_id: str) -> dict[str, Any]:
    the_catalog, _ = state_of(request).need_catalog()
    record = await _read(the_catalog.track, track_id)
    if record is None:
        raise Problem(404, "not_found", f"no track {track_id!r} in the catalog")
    found = record.get("audio_features")
    if not found:
        raise Problem(
            404,
            "not_found",
            f"track {track_id!r} has no audio features (tagged with MOODSTREAM_AUDIO_FEATURES off, or before schema 3)",
        )
    return spotify_features(track_id, found, request.url_for("track", track_id=track_id).path)


#: Media types of the containers the audio route may hand to a browser, by sniffed container.
_AUDIO_TYPES = {
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "flac": "audio/flac",
    "mp4": "audio/mp4",
    "aac": "audio/aac",
    "wav": "audio/wav",
    "matroska": "audio/webm",
    "aiff": "audio/aiff",
}


@router.get(
    "/v1/tracks/{track_id:path}/audio",
    summary="A track's audio, from where its announcement said it is (for the page's player)",
    dependencies=[allow(READ, limit=QUERIES)],
    responses=documented(401, 403, 404, 413, 429, 503),
    response_class=Response,
)
async def audio_of(request: Request, track_id: str) -> Response:
    state = state_of(request)
    the_catalog, _ = state.need_catalog()
    record = await _read(the_catalog.track, track_id)
    if record is None:
        raise Problem(404, "not_found", f"no track {track_id!r} in the catalog")
    uri = record.get("audio_uri")
    if not uri:
        raise Problem(
            404, "not_found", f"track {track_id!r} has no audio to play (an upload, or a record before schema 3)"
        )
    s = state.settings
    try:
        # The record's URI passes the worker's own checks again: a record is no licence to read
        # outside the allowed buckets.
        ref = storage.parse_uri(uri, allowed_buckets=s.allowed_buckets, allow_file_uris=s.allow_file_uris)
        data = await storage.fetch_async(ref, client=await asyncio.to_thread(state.s3), max_bytes=s.max_object_bytes)
    except TooLarge as exc:
        raise Problem(413, "too_large", str(exc)) from None
    except TrackError as exc:
        raise Problem(404, "not_found", f"track {track_id!r}: its audio cannot be read ({exc.reason})") from None
    except ServiceUnavailable as exc:
        raise Problem(503, "unavailable", str(exc), retry_after_s=RETRY_AFTER_S) from None
    kind = sniff(data[:64])
    return Response(
        data,
        media_type=_AUDIO_TYPES.get(kind or "", "application/octet-stream"),
        headers={"Cache-Control": "private, max-age=300", "Accept-Ranges": "none"},
    )


@router.get(
    "/v1/tracks/{track_id:path}",
    summary="A track's latest record",
    dependencies=[allow(READ)],
    responses=documented(401, 403, 404, 503),
)
async def track(request: Request, track_id: str) -> Response:
    the_catalog, _ = state_of(request).need_catalog()
    record = await _read(the_catalog.track, track_id)
    if record is None:
        raise Problem(404, "not_found", f"no track {track_id!r} in the catalog")
    return JSONResponse(record)


@router.get(
    "/v1/moods",
    summary="Mood families and quadrants the catalog can be ranked by",
    dependencies=[allow(READ)],
    responses=documented(401, 403),
)
async def moods(request: Request) -> dict[str, Any]:
    state = state_of(request)
    return {
        "moods": mood_names(state),
        "quadrants": list(QUADRANTS),
        "source": "heads" if state.taxonomy.heads is not None else state.taxonomy.source,
        "model": {"name": state.model.name, "version": state.model.version},
    }


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: the scorer and the catalog answer",
    responses={503: {"description": "not ready: which of the scorer and the catalog does not answer"}},
)
async def readyz(request: Request) -> JSONResponse:
    state = state_of(request)
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


@router.get("/metrics", include_in_schema=False, dependencies=[allow(ADMIN)])
async def prometheus(request: Request) -> Response:
    port = state_of(request).settings.service_metrics_port
    if port:
        raise Problem(404, "not_found", f"the metrics are served on port {port} (MOODSTREAM_SERVICE_METRICS_PORT)")
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def mood_names(state: State) -> list[str]:
    """The mood families one can rank by (the model's classes' quadrants for a class model)."""
    heads = state.taxonomy.heads
    if heads is not None:
        return list(heads.families.labels) if heads.families is not None else list(QUADRANTS)
    if state.taxonomy.families:
        return [f.name for f in state.taxonomy.families]
    return list(QUADRANTS) if state.taxonomy.source == "classes" else []


def spotify_features(track_id: str, found: dict[str, Any], href: str) -> dict[str, Any]:
    """A record's ``audio_features`` as Spotify's audio-features object: the same field names,
    types and ranges, so code written against it reads it unchanged. Spotify's fields are never
    null: a track without a pulse has tempo 0 and time_signature 4 (Spotify's default meter),
    silence loudness -60 dB, and a model-derived field that no tag could give reads 0."""

    def number(name: str, default: float) -> float:
        value = found.get(name)
        return float(default if value is None else value)

    return {
        "acousticness": number("acousticness", 0.0),
        "analysis_url": href,
        "danceability": number("danceability", 0.0),
        "duration_ms": round(number("duration_s", 0.0) * 1000),
        "energy": number("energy", 0.0),
        "id": track_id,
        "instrumentalness": number("instrumentalness", 0.0),
        "key": int(found.get("key", -1)),
        "liveness": number("liveness", 0.0),
        "loudness": number("loudness", -60.0),
        "mode": max(0, int(found.get("mode", 0))),  # Spotify's mode is 0 or 1; no key reads minor
        "speechiness": number("speechiness", 0.0),
        "tempo": number("tempo", 0.0),
        "time_signature": int(found["time_signature"]) if found.get("time_signature", -1) >= 3 else 4,
        "track_href": href,
        "type": "audio_features",
        "uri": f"moodstream:track:{track_id}",
        "valence": number("valence", 0.5),
    }


def _range(text: str | None, name: str, bounds: tuple[float, float] = (-1.0, 1.0)) -> tuple[float, float] | None:
    if text is None:
        return None
    lowest, highest = bounds
    try:
        if not re.fullmatch(_RANGE, text):
            raise ValueError(text)
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise Problem(
            400, "bad_request", f"{name} must be low,high (two numbers in [{lowest:g}, {highest:g}]), got {text!r}"
        ) from None
    if not lowest <= low <= high <= highest:
        raise Problem(400, "bad_request", f"{name} must satisfy {lowest:g} <= low <= high <= {highest:g}, got {text!r}")
    return low, high


async def _read(call: Any, *args: Any, **kwargs: Any) -> Any:
    """A catalog read off the event loop; an unreachable store is a 503, not a 500."""
    try:
        return await asyncio.to_thread(call, *args, **kwargs)
    except ServiceUnavailable as exc:
        raise Problem(503, "unavailable", str(exc), retry_after_s=int(RECONNECT_S)) from None

"""An upload: streamed to a temporary file under a size cap, then through the worker's own stages
(:func:`pipeline.stages.analysis.analyse_file` in the process pool, the configured scorer,
:func:`pipeline.stages.analysis.track_moods`), so it gets the record a catalog track gets.

Uploads are bounded three ways: ``MOODSTREAM_MAX_UPLOAD_BYTES`` (read as a stream and cut off
there: 413), ``MOODSTREAM_ANALYSIS_TIMEOUT_S`` (504) and ``MOODSTREAM_MAX_ANALYSES_IN_FLIGHT``
(beyond: 503 with ``Retry-After``, answered before the body is read, so memory stays bounded
whatever the number of clients).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from pipeline import metrics
from pipeline.errors import InferenceFailed, ServiceUnavailable, TrackError
from pipeline.service.problems import Problem
from pipeline.service.state import State
from pipeline.stages import audio
from pipeline.stages.analysis import Analysis, analyse_file, finite, track_moods
from pipeline.worker import pool

#: Multipart framing around the file (boundaries, part headers) allowed beyond the upload cap.
_FORM_OVERHEAD_BYTES = 64 * 1024
#: How long a refused client is told to wait (503), in seconds: about one short track's analysis.
RETRY_AFTER_S = 5


@dataclass
class Job:
    """One upload's resources: its spooled file and its decoding future, which may outlive a
    timeout (the process cannot be interrupted); both are let go only when it ends."""

    spool: _Spool | None = None
    future: asyncio.Future | None = None


async def tag_upload(request: Request, state: State, job: Job) -> bytes:
    """Read, analyse and score one upload; returns the record's JSON."""
    s = state.settings
    started = time.perf_counter()
    job.spool = spool = await read_upload(request, s.max_upload_bytes)
    kind = audio.sniff(spool.head)
    if kind is None:
        detail = (
            "the upload is empty"
            if not spool.size
            else "its first bytes are no audio container's (MP3, Ogg, FLAC, WAV, AIFF, MP4/M4A, WebM/Matroska, …)"
        )
        raise Problem(415, "undecodable", detail)
    received = time.perf_counter()
    loop = asyncio.get_running_loop()
    task = functools.partial(
        analyse_file,
        str(spool.path),
        max_duration_s=s.max_duration_s,
        min_duration_s=s.min_duration_s,
        excerpts=s.excerpts,
        excerpt_s=s.excerpt_s,
        audio_features_segment_s=s.timeline_segment_s if s.audio_features else None,
    )
    try:
        future = loop.run_in_executor(state.pool, task)
    except BrokenProcessPool:
        state.pool = pool.make_pool(s.max_analyses_in_flight)
        future = loop.run_in_executor(state.pool, task)
    job.future = future
    try:
        result: Analysis = await asyncio.shield(future)
    except TrackError as exc:
        raise Problem(422, exc.reason, str(exc)) from None
    except BrokenProcessPool:
        # A decoder crash (or the kernel's OOM killer) took the pool; the next upload gets a new one.
        state.pool = pool.make_pool(s.max_analyses_in_flight)
        raise Problem(500, "internal", "the decoding process died on this file") from None
    decoded = time.perf_counter()
    try:
        outputs = finite(await state.scorer.score(result.patches.patches))
    except InferenceFailed as exc:
        raise Problem(502, "inference_failed", str(exc)) from None
    except ServiceUnavailable as exc:
        raise Problem(503, "unavailable", str(exc), retry_after_s=RETRY_AFTER_S) from None
    done = time.perf_counter()
    latency_ms = {
        "upload": _ms(received - started),
        "decode": _ms(result.decode_s),
        "features": _ms(result.features_s),
        "analysis": _ms(decoded - received),
        "inference": _ms(done - decoded),
        "total": _ms(done - started),
    }
    record = track_moods(
        result,
        outputs,
        state.taxonomy,
        track_id="upload-" + spool.sha256[:16],
        model=state.model,
        processed_at=datetime.now(UTC),
        latency_ms=latency_ms,
        top_moods=s.top_moods,
        segment_s=s.timeline_segment_s,
        embeddings=s.embeddings,
    )
    return record.to_json()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def release_when_done(state: State, job: Job) -> None:
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
        raise Problem(
            413, "too_large", f"the upload is {int(declared)} bytes; the most is {limit} (MOODSTREAM_MAX_UPLOAD_BYTES)"
        )
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise Problem(400, "bad_request", "a multipart upload needs a boundary")
        form = _FilePart(limit)
        try:
            parser = MultipartParser(boundary, form.callbacks(), max_size=limit + _FORM_OVERHEAD_BYTES)  # type: ignore[arg-type]
            await _feed(request, parser.write, limit + _FORM_OVERHEAD_BYTES)
            parser.finalize()
            if form.spool is None:
                raise Problem(
                    400,
                    "bad_request",
                    "no form field named 'file' (the audio)"
                    if not form.malformed
                    else "the multipart body is malformed",
                )
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
    raise Problem(
        415,
        "bad_request",
        f"send multipart/form-data with the audio in 'file', or the audio as the body (audio/* or application/octet-stream); got {kind.decode(errors='replace') or 'no Content-Type'}",
    )


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

"""One batch of ingestion events through every stage: the worker's logic, without Faust.

    raw events ─ parse ─► per track, all tracks at once:
                 fetch (S3) ─► decode + patches (process pool) ─► score (Triton / onnxruntime)
               ─► publish outputs and dead letters
               ─► return: the caller (the Faust agent) may now commit the batch's offsets

Each track is scored as soon as its patches are ready, so inference of the first tracks
overlaps decoding of the others and both kinds of work keep the cores busy; Triton's dynamic
batcher merges the concurrent requests of a batch's tracks into model batches.

Every per-track failure becomes a dead-letter record (errors are data); nothing raised by one
track stops the others. An outage of S3 or Triton is not a per-track failure: the batch waits,
retrying with capped backoff, until the service answers again, so good tracks are never
dead-lettered because a server was down. While it waits the agent takes no new events, which
pauses consumption; offsets do not move.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pipeline import metrics
from pipeline.contracts import events
from pipeline.errors import InferenceFailed, ServiceUnavailable, TrackError, Undecodable
from pipeline.stages import storage
from pipeline.stages.analysis import Analysis, analyse, finite, track_moods
from pipeline.stages.scoring import Outputs, Scorer
from pipeline.stages.taxonomy import Taxonomy
from pipeline.worker import handoff

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """Sends one record and returns once the broker acknowledged it."""

    async def __call__(self, topic: str, key: bytes | None, value: bytes) -> None: ...


@dataclass(frozen=True)
class WorkerConfig:
    """The settings the batch logic needs, as plain values (see pipeline.settings)."""

    output_topic: str
    dlq_topic: str
    allowed_buckets: tuple[str, ...]
    allow_file_uris: bool
    max_object_bytes: int
    max_duration_s: float
    min_duration_s: float
    top_moods: int
    timeline_segment_s: float
    embeddings: bool = True  # the track's audio embedding per network in the output
    excerpts: int = 0  # 0: the whole track
    excerpt_s: float = 15.0
    audio_features: bool = True  # tempo, key, loudness... beside the moods
    outage_backoff_max_s: float = 10.0  # a service that is back is noticed within this long


@dataclass
class _Track:
    event: events.TrackIngested
    started: float = field(default_factory=time.perf_counter)
    data: bytes | None = None
    crashed: bool = False  # its decoding process died (a decoder crash, or killed for memory)
    analysis: Analysis | None = None
    shared: handoff.SharedPatches | None = None  # the block the analysis's patches are mapped from
    outputs: Outputs | None = None  # every network's scores and embeddings, per patch
    error: TrackError | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchResult:
    outputs: int
    dead_letters: dict[str, int]  # reason -> count


class BatchWorker:
    """Holds the long-lived clients a batch needs; :meth:`process` is the whole stage chain."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        scorer: Scorer,
        taxonomy: Taxonomy,
        s3_client: Any,
        make_pool: Callable[[], Executor],
        publish: Publisher,
    ) -> None:
        self.config = config
        self.scorer = scorer
        self.taxonomy = taxonomy
        self.s3 = s3_client
        self._make_pool = make_pool
        self.pool = make_pool()
        self.publish = publish
        meta = scorer.meta
        self.model = events.ModelRef(meta.name, meta.served_version, tuple((n.name, n.version) for n in meta.networks))
        metrics.MODEL_INFO.labels(self.model.name, self.model.version).set(1)

    async def process(self, raws: Sequence[bytes]) -> BatchResult:
        """Tag a batch of raw ``tracks.ingested`` values; return once every record is acked."""
        metrics.EVENTS_CONSUMED.inc(len(raws))
        metrics.BATCH_TRACKS.observe(len(raws))
        metrics.TRACKS_IN_FLIGHT.set(len(raws))
        dead: list[tuple[bytes, TrackError, str | None]] = []
        tracks: list[_Track] = []
        for raw in raws:
            try:
                tracks.append(
                    _Track(
                        events.parse_ingested(
                            raw,
                            allow_file_uris=self.config.allow_file_uris,
                            allowed_buckets=self.config.allowed_buckets,
                        )
                    )
                )
            except TrackError as exc:
                dead.append((raw, exc, events.track_id_of(raw)))

        await asyncio.gather(*(self._fetch_analyse_score(t) for t in tracks))
        crashed = [t for t in tracks if t.crashed]
        await self._retry_crashed(crashed)
        await asyncio.gather(*(self._score(t) for t in crashed if t.error is None))

        sends: list[Awaitable[None]] = [self._publish_output(t) for t in tracks if t.error is None]
        outputs = len(sends)
        for track in tracks:
            if track.error is not None:
                dead.append((track.event.raw, track.error, track.event.track_id))
        sends += [self._publish_dead(raw, err, track_id) for raw, err, track_id in dead]
        start = time.perf_counter()
        await asyncio.gather(*sends)
        metrics.STAGE_SECONDS.labels("publish").observe(time.perf_counter() - start)
        metrics.TRACKS_IN_FLIGHT.set(0)
        reasons: dict[str, int] = {}
        for _, err, _ in dead:
            reasons[err.reason] = reasons.get(err.reason, 0) + 1
        return BatchResult(outputs=outputs, dead_letters=reasons)

    async def _fetch_analyse_score(self, track: _Track) -> None:
        await self._fetch_and_analyse(track)
        if track.error is None and not track.crashed:
            await self._score(track)

    async def _fetch_and_analyse(self, track: _Track) -> None:
        start = time.perf_counter()
        try:
            ref = track.event.ref
            track.data = await _until_available(
                "s3",
                lambda: storage.fetch_async(ref, client=self.s3, max_bytes=self.config.max_object_bytes),
                self.config.outage_backoff_max_s,
            )
            fetched = time.perf_counter()
            track.latency_ms["fetch"] = round((fetched - start) * 1000, 1)
            metrics.STAGE_SECONDS.labels("fetch").observe(fetched - start)
        except TrackError as exc:
            track.error = exc
            return
        await self._analyse(track)

    async def _analyse(self, track: _Track) -> None:
        loop = asyncio.get_running_loop()
        if track.data is None:
            raise RuntimeError(f"track {track.event.track_id} is analysed before it is fetched")
        try:
            with handoff.send(track.data) as data:
                analysis, track.shared = await loop.run_in_executor(self.pool, _analyse_job, data, self.config)
            track.analysis = handoff.receive(analysis, track.shared)
        except TrackError as exc:
            track.error = exc
            return
        except BrokenProcessPool:
            track.crashed = True
            return
        except Exception as exc:
            log.exception("analysing %s failed", track.event.track_id)
            track.error = TrackError(f"internal error while decoding: {exc!r}")
            return
        track.crashed = False
        track.data = None  # the patches are all that is needed from here on
        # Measured inside the decoding process: time spent waiting for a free process is not
        # either stage's (it shows in the end-to-end latency).
        for stage, seconds in (
            ("decode", track.analysis.decode_s),
            ("features", track.analysis.features_s),
            ("audio_features", track.analysis.audio_features_s),
        ):
            track.latency_ms[stage] = round(seconds * 1000, 1)
            metrics.STAGE_SECONDS.labels(stage).observe(seconds)

    async def _retry_crashed(self, tracks: list[_Track]) -> None:
        """A dead pool process fails every track that was in the pool; find the culprit by
        decoding each again alone in a fresh pool, and dead-letter only a track that kills it
        again."""
        if not tracks:
            return
        self._renew_pool()
        for track in tracks:
            await self._analyse(track)
            if track.crashed:
                self._renew_pool()
                track.error = Undecodable("the decoding process died on this file (decoder crash or out of memory)")

    def _renew_pool(self) -> None:
        log.warning("a decoding process died; starting a new pool")
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._make_pool()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)

    async def _score(self, track: _Track) -> None:
        """Every network's outputs for the track's patches into ``track.outputs``, or its error."""
        if track.analysis is None:
            raise RuntimeError(f"track {track.event.track_id} is scored before it is analysed")
        patches = track.analysis.patches.patches
        shm_key = track.shared.key if track.shared is not None else None
        metrics.BATCH_PATCHES.observe(len(patches))
        start = time.perf_counter()
        try:
            outputs = await _until_available(
                "triton", lambda: self.scorer.score(patches, shm_key=shm_key), self.config.outage_backoff_max_s
            )
        except InferenceFailed as exc:
            track.error = exc
            return
        finally:
            if track.shared is not None:  # scored or failed, nothing opens the block by name again
                track.shared.release()
                track.shared = None
        elapsed = time.perf_counter() - start
        metrics.STAGE_SECONDS.labels("inference").observe(elapsed)
        track.latency_ms["inference"] = round(elapsed * 1000, 1)
        try:
            track.outputs = finite(outputs)
        except InferenceFailed as exc:
            track.error = exc

    async def _publish_output(self, track: _Track) -> None:
        event, analysis, outputs = track.event, track.analysis, track.outputs
        if analysis is None or outputs is None:
            raise RuntimeError(f"track {event.track_id} has no error, yet no analysis or outputs")
        track.latency_ms["total"] = round((time.perf_counter() - track.started) * 1000, 1)
        record = track_moods(
            analysis,
            outputs,
            self.taxonomy,
            track_id=event.track_id,
            model=self.model,
            processed_at=_now(),
            latency_ms=track.latency_ms,
            top_moods=self.config.top_moods,
            segment_s=self.config.timeline_segment_s,
            embeddings=self.config.embeddings,
            correlation_id=event.correlation_id,
            ingested_at=event.ingested_at,
            title=event.title,
            artist=event.artist,
            audio_uri=event.audio_uri,
        )
        await self.publish(self.config.output_topic, event.track_id.encode(), record.to_json())
        metrics.OUTPUTS.labels(self.model.name, self.model.version).inc()
        metrics.AUDIO_SECONDS.inc(analysis.patches.analysed_s)
        for mood, score in record.analysis["moods"].items():
            metrics.MOOD_SCORE.labels(self.model.name, mood).observe(score)
        metrics.observe_audio_features(record.analysis.get("audio_features"))
        if event.ingested_at is not None:
            metrics.END_TO_END_SECONDS.observe(max(0.0, time.time() - event.ingested_at.timestamp()))

    async def _publish_dead(self, raw: bytes, error: TrackError, track_id: str | None) -> None:
        record = events.dead_letter(raw, error, attempts=1, model=self.model, track_id=track_id)
        await self.publish(self.config.dlq_topic, track_id.encode() if track_id else None, record)
        metrics.DEAD_LETTERS.labels(error.reason).inc()
        log.info("dead letter %s: %s: %s", track_id, error.reason, error)


def _analyse_job(
    data: bytes | handoff.SharedBytes, config: WorkerConfig
) -> tuple[Analysis, handoff.SharedPatches | None]:
    """Runs in a pool process; TrackErrors pickle back to the event loop as they are. The file
    comes in and the patches go back through shared memory (pipeline/worker/handoff.py)."""
    with handoff.opened(data) as source:
        analysis = analyse(
            source,
            max_duration_s=config.max_duration_s,
            min_duration_s=config.min_duration_s,
            excerpts=config.excerpts,
            excerpt_s=config.excerpt_s,
            audio_features_segment_s=config.timeline_segment_s if config.audio_features else None,
        )
    return handoff.share(analysis)


async def _until_available(service: str, call: Callable[[], Awaitable[Any]], backoff_max_s: float) -> Any:
    """Await ``call()``; while it raises ServiceUnavailable, wait (capped exponential backoff)
    and try again. The batch stays in flight meanwhile, so its offsets are not committed."""
    delay = 1.0
    while True:
        try:
            result = await call()
        except ServiceUnavailable as exc:
            metrics.SERVICE_ERRORS.labels(service).inc()
            metrics.SERVICE_DOWN.labels(service).set(1)
            log.warning("%s unavailable, batch paused; retrying in %.0f s: %s", service, delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff_max_s)
            continue
        metrics.SERVICE_DOWN.labels(service).set(0)
        return result


def _now() -> datetime:
    return datetime.now(UTC)

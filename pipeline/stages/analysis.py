"""One track through the CPU stages, with no Kafka and no server: bytes -> patches -> mood view.

``analyse`` is what the worker runs in its process pool and what ``moodstream tag`` runs
inline; ``describe`` turns the model outputs of one track's patches into the fields of an output
event. Keeping both here means the CLI, the worker and the benchmarks cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import torch

from pipeline.contracts import events
from pipeline.errors import InferenceFailed, Undecodable
from pipeline.stages import audio, frontend
from pipeline.stages.scoring import Outputs
from pipeline.stages.taxonomy import Taxonomy, summarise


@dataclass(frozen=True)
class Analysis:
    """The model input of one track, plus what the output event reports about its audio."""

    patches: frontend.TrackPatches
    decoder: str  # "pyav" or "soundfile"
    duration_s: float  # decoded audio, capped at max_duration_s
    truncated: bool  # the stream broke after some audio (a partial upload)
    decode_s: float  # seconds spent decoding and resampling (inside the chunk iterator)
    features_s: float  # seconds spent on log-mel and patching: the rest of analyse()


def analyse(
    data: audio.Source,
    *,
    max_duration_s: float,
    min_duration_s: float,
    excerpts: int = 0,
    excerpt_s: float = 15.0,
    hop_frames: int = frontend.PATCH_FRAMES,
) -> Analysis:
    """Decode ``data`` and compute its patches; raises the stage's TrackError subclasses.

    ``excerpts`` > 0 analyses only that many evenly spread excerpts of ``excerpt_s`` seconds
    when the track is longer than they are together (see :func:`audio.decode_excerpts`).
    """
    # One thread per decoding process: parallelism comes from the process pool, and torch's
    # own thread pool would fight it for the same cores.
    torch.set_num_threads(1)
    start = time.perf_counter()
    decoding = [0.0]  # decoding and the frontend interleave chunk by chunk; time each side
    plan = (
        audio.decode_excerpts(data, count=excerpts, excerpt_s=excerpt_s, max_duration_s=max_duration_s)
        if excerpts > 0
        else None
    )
    if plan is not None:
        decoding[0] = time.perf_counter() - start
        patches = frontend.patches_from_excerpts(_nonempty(plan.parts, decoding), hop_frames)
        if len(patches.patches):
            features_s = time.perf_counter() - start - decoding[0]
            return Analysis(
                patches, plan.decoder, round(min(plan.duration_s, max_duration_s), 3), False, decoding[0], features_s
            )
        # The container overstated its duration: fall through to decoding the whole track.
    stream = audio.decode(data, max_duration_s=max_duration_s, min_duration_s=min_duration_s)
    decoding[0] = time.perf_counter() - start
    patches = frontend.patches_from_chunks(_timed(stream.chunks, decoding), hop_frames, stream.expected_s)
    decode_s = decoding[0]
    return Analysis(
        patches=patches,
        decoder=stream.decoder,
        duration_s=round(stream.stats["duration_s"], 3),
        truncated=bool(stream.stats.get("truncated")),
        decode_s=decode_s,
        features_s=max(0.0, time.perf_counter() - start - decode_s),
    )


def analyse_file(path: str, **options: Any) -> Analysis:
    """:func:`analyse` of the file at ``path`` (an upload the HTTP service spooled to disk, a file
    ``moodstream tag`` was given): read as decoding goes, in the decoding process, so the file
    is never held in memory whole."""
    with open(path, "rb") as f:
        return analyse(f, **options)


def _nonempty(
    parts: Iterator[tuple[float, Iterator[np.ndarray]]], total_s: list[float]
) -> Iterator[tuple[float, list[np.ndarray]]]:
    """Excerpts that hold audio (one past the real end of the stream is skipped), decoded;
    the seconds spent decoding are added to ``total_s[0]``."""
    for start_s, chunks in parts:
        started = time.perf_counter()
        try:
            got = list(chunks)
        except Undecodable:
            continue
        finally:
            total_s[0] += time.perf_counter() - started
        yield start_s, got


def _timed(chunks: Iterator[np.ndarray], total_s: list[float]) -> Iterator[np.ndarray]:
    """Yield ``chunks``, adding the seconds spent producing them to ``total_s[0]``."""
    while True:
        start = time.perf_counter()
        chunk = next(chunks, None)
        total_s[0] += time.perf_counter() - start
        if chunk is None:
            return
        yield chunk


def describe(
    analysis: Analysis,
    outputs: Outputs,
    taxonomy: Taxonomy,
    *,
    top_moods: int = 3,
    segment_s: float = 30.0,
    embeddings: bool = True,
) -> dict[str, Any]:
    """outputs: every network's results for ``analysis.patches`` -> the analysis fields of an
    output (see :func:`pipeline.stages.taxonomy.summarise` and the v2 schema)."""
    view = summarise(
        outputs,
        taxonomy,
        patch_starts_s=analysis.patches.patch_starts_s,
        top_n=top_moods,
        segment_s=segment_s,
        embeddings=embeddings,
    )
    return {
        "duration_s": analysis.duration_s,
        "analysed_s": round(analysis.patches.analysed_s, 3),
        "patches": len(analysis.patches.patches),
        "decoder": analysis.decoder,
        **view,
    }


def finite(outputs: Outputs) -> Outputs:
    """``outputs`` unchanged; InferenceFailed when the model returned NaN or infinity."""
    if all(np.isfinite(o.scores).all() and np.isfinite(o.embedding).all() for o in outputs.values()):
        return outputs
    raise InferenceFailed("the model returned non-finite scores")


def track_moods(
    analysis: Analysis,
    outputs: Outputs,
    taxonomy: Taxonomy,
    *,
    track_id: str,
    model: events.ModelRef,
    processed_at: datetime,
    latency_ms: dict[str, float],
    top_moods: int = 3,
    segment_s: float = 30.0,
    embeddings: bool = True,
    correlation_id: str | None = None,
    ingested_at: datetime | None = None,
) -> events.TrackMoods:
    """The ``tracks.moods`` record of one analysed and scored track: what the worker publishes
    and what the HTTP service answers for an upload."""
    return events.TrackMoods(
        track_id=track_id,
        model=model,
        correlation_id=correlation_id,
        ingested_at=ingested_at,
        processed_at=processed_at,
        latency_ms=latency_ms,
        analysis=describe(analysis, outputs, taxonomy, top_moods=top_moods, segment_s=segment_s, embeddings=embeddings),
    )

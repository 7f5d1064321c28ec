"""One track through the CPU stages, with no Kafka and no server: bytes -> patches -> mood view.

``analyse`` is what the worker runs in its process pool and what ``moodstream tag`` runs
inline: the decoder's blocks feed the frontend (log-mel patches, mono at 16 kHz) and, as
decoded, the audio-features stage (tempo, key, loudness…; every channel at the source rate).
``describe`` turns the model outputs of one track's patches into the fields of an output event.
Keeping both here means the CLI, the worker and the benchmarks cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import logging
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
from pipeline.stages.audio_features import AudioFeatures, AudioFeatureStream
from pipeline.stages.scoring import Outputs
from pipeline.stages.taxonomy import Taxonomy, summarise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analysis:
    """The model input of one track, plus what the output event reports about its audio."""

    patches: frontend.TrackPatches
    decoder: str  # "pyav" or "soundfile"
    duration_s: float  # decoded audio, capped at max_duration_s
    truncated: bool  # the stream broke after some audio (a partial upload)
    decode_s: float  # seconds spent decoding and resampling (inside the chunk iterator)
    features_s: float  # seconds spent on log-mel and patching: the rest of analyse()
    audio_features: AudioFeatures | None = None  # None when not asked for, or when the stage failed
    audio_features_s: float = 0.0  # seconds spent in the audio-features stage
    excerpted: bool = False  # only excerpts were decoded (the analysis window setting)


def analyse(
    data: audio.Source,
    *,
    max_duration_s: float,
    min_duration_s: float,
    excerpts: int = 0,
    excerpt_s: float = 15.0,
    hop_frames: int = frontend.PATCH_FRAMES,
    audio_features_segment_s: float | None = None,
) -> Analysis:
    """Decode ``data`` and compute its patches; raises the stage's TrackError subclasses.

    ``excerpts`` > 0 analyses only that many evenly spread excerpts of ``excerpt_s`` seconds
    when the track is longer than they are together (see :func:`audio.decode_excerpts`).
    ``audio_features_segment_s`` (the timeline's segment length) asks for the audio features too,
    with a section per segment; from excerpts they describe the excerpts, without beats or
    sections (their times would not be the track's).
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
        tap = _FeatureTap.attach(plan.taps, plan.source_rate, plan.channels, audio_features_segment_s)
        decoding[0] = time.perf_counter() - start
        patches = frontend.patches_from_excerpts(_nonempty(plan.parts, decoding), hop_frames)
        if len(patches.patches):
            features_s = time.perf_counter() - start - decoding[0]
            found = tap.finish(excerpted=True) if tap else None
            return Analysis(
                patches,
                plan.decoder,
                round(min(plan.duration_s, max_duration_s), 3),
                False,
                max(0.0, decoding[0] - (tap.pushed_s if tap else 0.0)),
                features_s,
                found,
                tap.seconds if tap else 0.0,
                excerpted=True,
            )
        # The container overstated its duration: fall through to decoding the whole track.
        start = time.perf_counter()
        decoding = [0.0]
    stream = audio.decode(data, max_duration_s=max_duration_s, min_duration_s=min_duration_s)
    tap = _FeatureTap.attach(stream.taps, stream.source_rate, stream.channels, audio_features_segment_s)
    decoding[0] = time.perf_counter() - start
    patches = frontend.patches_from_chunks(_timed(stream.chunks, decoding), hop_frames, stream.expected_s)
    found = tap.finish() if tap else None
    tapped_s = tap.seconds if tap else 0.0
    # The taps' pushes ran inside the decoder's iterator, their finish after it.
    decode_s = max(0.0, decoding[0] - (tap.pushed_s if tap else 0.0))
    return Analysis(
        patches=patches,
        decoder=stream.decoder,
        duration_s=round(stream.stats["duration_s"], 3),
        truncated=bool(stream.stats.get("truncated")),
        decode_s=decode_s,
        features_s=max(0.0, time.perf_counter() - start - decode_s - tapped_s),
        audio_features=found,
        audio_features_s=tapped_s,
    )


class _FeatureTap:
    """The audio-features stage fed from the decoder's taps, its time kept apart. A failure of
    the stage costs the track its audio features, never its moods: the record carries them as
    null and the error is logged."""

    def __init__(self, rate: int, channels: int, segment_s: float) -> None:
        self.seconds = 0.0  # all of the stage's time
        self.pushed_s = 0.0  # the part spent inside the decoder's iterator
        self.failed = False
        self._stream = AudioFeatureStream(rate, channels, segment_s=segment_s)

    @classmethod
    def attach(cls, taps: list[audio.Tap], rate: int, channels: int, segment_s: float | None) -> _FeatureTap | None:
        if segment_s is None:
            return None
        tap = cls(rate, channels, segment_s)
        taps.append(tap)
        return tap

    def __call__(self, block: np.ndarray) -> None:
        if self.failed:
            return
        started = time.perf_counter()
        try:
            self._stream.push(block)
        except Exception:
            log.exception("the audio-features stage failed on a block; the track gets no audio features")
            self.failed = True
        finally:
            spent = time.perf_counter() - started
            self.seconds += spent
            self.pushed_s += spent

    def finish(self, *, excerpted: bool = False) -> AudioFeatures | None:
        if self.failed:
            return None
        started = time.perf_counter()
        try:
            found = self._stream.finish()
        except Exception:
            log.exception("the audio-features stage failed; the track gets no audio features")
            return None
        finally:
            self.seconds += time.perf_counter() - started
        if excerpted:
            # Beat and section times along the joined excerpts are not the track's.
            empty = np.empty(0, np.float64)
            found = dataclasses.replace(found, beats=empty, downbeats=empty, sections=[])
        return found


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
        "audio_features": audio_features(analysis, view),
    }


def audio_features(analysis: Analysis, view: dict[str, Any]) -> dict[str, Any] | None:
    """The record's ``audio_features``: the stage's fields, the model-derived ones from the
    track's tag scores, ``valence`` (the mood plane's, mapped from [-1, 1] to Spotify's 0-1) and
    what was analysed; None when the stage did not run (the setting) or failed."""
    found = analysis.audio_features
    if found is None:
        return None
    fields = found.with_tags(view["tags"]).to_dict()
    fields["valence"] = round((float(view["valence"]) + 1.0) / 2.0, 4)
    fields["analysed"] = "excerpts" if analysis.excerpted else "track"
    return fields


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
    title: str | None = None,
    artist: str | None = None,
    audio_uri: str | None = None,
) -> events.TrackMoods:
    """The ``tracks.moods`` record of one analysed and scored track: what the worker publishes
    and what the HTTP service answers for an upload."""
    return events.TrackMoods(
        track_id=track_id,
        model=model,
        correlation_id=correlation_id,
        ingested_at=ingested_at,
        title=title,
        artist=artist,
        audio_uri=audio_uri,
        processed_at=processed_at,
        latency_ms=latency_ms,
        analysis=describe(analysis, outputs, taxonomy, top_moods=top_moods, segment_s=segment_s, embeddings=embeddings),
    )


_KEYS = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def audio_line(record: dict[str, Any]) -> str:
    """One line saying a record's audio features: tempo and meter, key, loudness, descriptors."""
    found = record.get("audio_features")
    if not found:
        return "audio: no audio features (MOODSTREAM_AUDIO_FEATURES off, or the stage failed)"
    tempo = (
        f"{found['tempo']:.1f} BPM ({found['time_signature']}/4, confidence {found['tempo_confidence']:.2f})"
        if found["tempo"]
        else "no pulse"
    )
    key = f"{_KEYS[found['key']]} {'major' if found['mode'] == 1 else 'minor'}" if found["key"] >= 0 else "no key"
    loudness = (
        f"{found['loudness']:.1f} LUFS (range {found['loudness_range']:.1f} LU, peak {found['true_peak']:.1f} dBTP)"
        if found["loudness"] is not None
        else "silent"
    )
    shares = ", ".join(
        f"{name} {found[name]:.2f}"
        for name in ("energy", "danceability", "valence", "acousticness", "instrumentalness", "speechiness")
        if found.get(name) is not None
    )
    return f"audio: {tempo}; {key}; {loudness}; {shares}"

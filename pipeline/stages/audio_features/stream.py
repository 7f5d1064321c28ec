"""The streaming accumulator: decoder chunks in, :class:`AudioFeatures` out.

``AudioFeatureStream(rate, channels)`` takes float32 ``[channels, n]`` chunks at the decoder's
own rate (before any downmix), in order, of any size; ``finish()`` returns the features. Memory
does not grow with the track beyond its small envelopes (about 70 bytes per 100 ms of audio:
two onset envelopes at ~50 frames/s, chroma at ~3 frames/s, one energy per 100-ms block), so
the stage's peak allocation, the finish's work on them included, is 53 MB for a three-hour
stereo 44.1-kHz stream and 8.5 MB for four minutes (``python -m bench.audio_features``).

Chunks are gathered into batches of about twelve seconds before any work: the per-call cost of
the numpy calls, paid per decoder chunk (~0.7 s), was a third of the stage's CPU.
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import numpy as np

from pipeline.stages.audio_features import descriptors, loudness, rhythm, spectral, tonal
from pipeline.stages.audio_features.result import AudioFeatures, Section

#: Samples per channel gathered before processing (about 12 s at 44.1 kHz, 4 MB of stereo float32).
BATCH_SAMPLES = 524_288
DEFAULT_SEGMENT_S = 30.0


@lru_cache(maxsize=1)
def _blas():
    """threadpoolctl's controller of the loaded BLAS libraries, or None without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn here
        return None
    return ThreadpoolController()


def single_threaded() -> contextlib.AbstractContextManager:
    """BLAS on one thread for the duration: the stage's matrix products are small, and
    OpenBLAS's worker threads, woken per call, spun on the other core for longer than the
    products took (a matrix-vector product measured 5.8 against 3.8 ms per audio minute)."""
    controller = _blas()
    return controller.limit(limits=1, user_api="blas") if controller is not None else contextlib.nullcontext()


class AudioFeatureStream:
    """Accumulates one track's audio; see the module docstring."""

    def __init__(
        self,
        rate: int,
        channels: int,
        *,
        segment_s: float = DEFAULT_SEGMENT_S,
        channel_weights: np.ndarray | None = None,
    ) -> None:
        if rate <= 0 or channels <= 0:
            raise ValueError(f"rate and channels must be positive (got {rate}, {channels})")
        self.rate, self.channels = int(rate), int(channels)
        self.segment_s = float(segment_s)
        self._blocks = loudness.KWeightedBlocks(self.rate, self.channels, channel_weights)
        self._peak = loudness.TruePeak(self.rate, self.channels)
        if self._blocks.exact:
            # No whole-sample 100-ms block (11025 Hz and the like): the analyses get the mono
            # resampled by soxr instead of the box decimation.
            import soxr

            self._resampler = soxr.ResampleStream(self.rate, 11_025, 1, dtype="float32", quality="LQ")
            analysis_rate = 11_025.0
        else:
            self._resampler = None
            analysis_rate = self._blocks.analysis_rate
        self._analysis = spectral.LowRateAnalysis(analysis_rate)
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self.samples = 0
        self._finished = False

    def push(self, chunk: np.ndarray) -> None:
        """Add the next chunk: float32 [channels, n] (or [n] for mono) at ``rate``."""
        if self._finished:
            raise RuntimeError("push after finish")
        x = np.asarray(chunk)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[0] != self.channels:
            raise ValueError(f"expected [{self.channels}, n] samples, got shape {x.shape}")
        if x.shape[1] == 0:
            return
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        self._pending.append(x)
        self._pending_n += x.shape[1]
        if self._pending_n >= BATCH_SAMPLES:
            with single_threaded():
                self._process()

    def _process(self, last: bool = False) -> None:
        """The pending chunks' whole loudness blocks as one batch (the rest waits for the next
        chunk, so the meters read the batch in place); with ``last``, everything."""
        if not self._pending_n:
            return
        unit = self._blocks.block or 1
        whole = self._pending_n if last else self._pending_n // unit * unit
        if not whole:
            return
        rest: list[np.ndarray] = []
        if len(self._pending) == 1 and whole == self._pending_n:
            x = self._pending[0]
        else:
            x = np.empty((self.channels, whole), np.float32)
            at = 0
            for piece in self._pending:
                take = min(piece.shape[1], whole - at)
                if take:
                    x[:, at : at + take] = piece[:, :take]
                    at += take
                if take < piece.shape[1]:
                    rest.append(piece[:, take:].copy() if take else piece)
        self._pending = rest
        self._pending_n -= whole
        self.samples += whole
        mono = self._blocks.push(x)
        if self._blocks.sanitised:
            x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
        self._peak.push(x)
        if mono is None:
            mixed = x.mean(axis=0) if self.channels > 1 else x[0]
            mono = self._resampler.resample_chunk(mixed)
        self._analysis.push(mono)

    def finish(self) -> AudioFeatures:
        """The features of everything pushed; the stream cannot be used afterwards."""
        if self._finished:
            raise RuntimeError("finish called twice")
        with single_threaded():
            return self._finish()

    def _finish(self) -> AudioFeatures:
        self._process(last=True)
        self._finished = True
        if self._resampler is not None:
            self._analysis.push(self._resampler.resample_chunk(np.empty(0, np.float32), last=True))
        else:
            self._analysis.push(self._blocks.tail)
        self._analysis.flush()
        self._peak.finish()
        energies, lengths = self._blocks.finish()
        return summarise(self, energies, lengths)


def summarise(stream: AudioFeatureStream, energies: np.ndarray, lengths: np.ndarray) -> AudioFeatures:
    """Everything :meth:`AudioFeatureStream.finish` computes from the accumulated envelopes."""
    a = stream._analysis
    duration = stream.samples / stream.rate
    onset, low, chroma = a.envelopes()
    fps, chroma_fps = a.fps, a.chroma_fps

    integrated = loudness.integrated(energies, lengths)
    lra = loudness.loudness_range(energies, lengths)
    moment = loudness.momentary(energies, lengths)
    fade_in, fade_out = descriptors.fades(moment, integrated, duration)

    beat = rhythm.analyse(onset, low, chroma, fps, chroma_fps)
    key, mode, key_conf = tonal.key_of(tonal.mean_chroma(chroma))

    sections = []
    count = max(1, math.ceil(duration / stream.segment_s - 1e-9)) if duration > 0 else 0
    block_s = loudness.BLOCK_S
    for i in range(count):
        start = i * stream.segment_s
        end = min(duration, start + stream.segment_s)
        c = slice(int(round(start * chroma_fps)), int(round(end * chroma_fps)))
        b = slice(int(round(start / block_s)), int(round(end / block_s)))
        s_tempo, s_conf = rhythm.segment_tempo(beat, onset, fps, int(round(start * fps)), int(round(end * fps)))
        s_key, s_mode, s_key_conf = tonal.key_of(tonal.mean_chroma(chroma[c]))
        # The segment's gating blocks: its 100-ms steps plus the three after (a block is 400 ms).
        s_loud = (
            loudness.integrated(energies[b.start : b.stop + 3], lengths[b.start : b.stop + 3])
            if b.stop > b.start
            else None
        )
        sections.append(
            Section(
                start=start,
                duration=end - start,
                tempo=s_tempo,
                tempo_confidence=s_conf,
                key=s_key,
                mode=s_mode,
                key_confidence=s_key_conf,
                loudness=s_loud,
            )
        )

    shape = a.shape()
    energy = descriptors.energy(integrated, lra, onset, fps, shape)
    dance = descriptors.danceability(beat)
    speech = descriptors.speechiness(a.speech_windows)
    return AudioFeatures(
        duration_s=duration,
        sample_rate=stream.rate,
        channels=stream.channels,
        tempo=beat.tempo,
        tempo_confidence=beat.confidence,
        beats=beat.beats,
        downbeats=beat.downbeats,
        time_signature=beat.time_signature if beat.tempo is not None else -1,
        time_signature_confidence=beat.meter_confidence,
        key=key,
        mode=mode,
        key_confidence=key_conf,
        loudness=integrated,
        loudness_range=lra,
        true_peak=stream._peak.dbtp,
        fade_in_end_s=fade_in,
        fade_out_start_s=fade_out,
        energy=energy,
        danceability=dance,
        speechiness=speech,
        sections=sections,
    )

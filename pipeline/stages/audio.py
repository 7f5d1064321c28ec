"""Decoding: encoded bytes -> mono float32 chunks at the frontend's sample rate.

PyAV (FFmpeg) reads what catalogs hold (mp3, ogg/vorbis, opus, flac, wav, m4a/aac, …). Real
catalogs also hold files one decoder refuses and another reads, so when PyAV refuses a file
before giving any audio, libsndfile (``soundfile``) gets a try before the track is called
undecodable; the decoder that succeeded is reported with the result.

Channels are averaged to mono, then resampled with soxr at its HQ setting, as
``librosa.load`` does. Decoding is streaming: the caller receives chunks and decoding stops at
``max_duration_s``, so a tiny file that claims hours of audio costs no more than the cap.

A stage that needs the audio as decoded, every channel at the source rate (loudness reads the
channels, not their mean), adds a tap to the stream: each ``[channels, n]`` block reaches the
taps before the downmix, capped at ``max_duration_s`` like the rest.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import av
import numpy as np
import soundfile
import soxr

from pipeline.errors import TooShort, Undecodable
from pipeline.stages.frontend import SAMPLE_RATE

#: Frames read per libsndfile block (about 1.5 s at 44.1 kHz).
_SF_BLOCK = 65_536
#: Source samples downmixed and resampled per call (about 0.7 s at 48 kHz).
_GROUP_SAMPLES = 32_768

#: Receives every decoded block, float32 [channels, n] at the source rate, before the downmix.
Tap = Callable[[np.ndarray], None]

#: Encoded audio: the bytes themselves (an S3 object), or a seekable binary file opened by the
#: caller (a local file: read as decoding goes, so memory does not grow with the file's size).
Source = bytes | BinaryIO


def _reader(data: Source) -> BinaryIO:
    """A file object at the start of ``data``."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(data)
    data.seek(0)
    return data


def _is_empty(data: Source) -> bool:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return len(data) == 0
    return data.seek(0, io.SEEK_END) == 0


@dataclass
class DecodedStream:
    """Chunks of mono float32 audio at ``SAMPLE_RATE``; ``duration_s`` and ``decoder`` are
    final once the iterator is exhausted."""

    chunks: Iterator[np.ndarray]
    decoder: str  # "pyav" or "soundfile"
    source_rate: int  # Hz, before resampling
    channels: int
    stats: dict[str, float] = field(default_factory=dict)  # duration_s, truncated
    expected_s: float | None = None  # the duration the container states (capped), if any
    taps: list[Tap] = field(default_factory=list)  # add before reading ``chunks``


def decode(data: Source, *, max_duration_s: float, min_duration_s: float = 0.0) -> DecodedStream:
    """Open ``data`` as audio; raise :class:`Undecodable` if no decoder can.

    The returned chunks stop after ``max_duration_s`` seconds of audio. The iterator raises
    :class:`TooShort` at its end when less than ``min_duration_s`` seconds were decoded, and
    :class:`Undecodable` if the stream breaks before any audio came out.
    """
    source = decode_source(data)
    taps: list[Tap] = []
    chunks = _mono_resampled(source.blocks, source.rate, max_duration_s, min_duration_s, source.stats, taps)
    expected = min(source.stated_s, max_duration_s) if source.stated_s else None
    return DecodedStream(chunks, source.decoder, source.rate, source.channels, source.stats, expected, taps)


@dataclass
class SourceStream:
    """Audio as the file holds it: [channels, n] float32 blocks at ``rate``, every channel kept,
    nothing resampled (what a tool that re-encodes a user's files needs). ``stats["truncated"]``
    is 1.0 once the blocks are exhausted if the stream broke after giving audio."""

    blocks: Generator[np.ndarray, None, None]
    decoder: str  # "pyav" or "soundfile"
    rate: int
    channels: int
    stated_s: float | None  # the duration the container states, if any
    codec: str  # as the decoder names it: FFmpeg's codec ("vorbis", "mp3float"), libsndfile's subtype
    stats: dict[str, float] = field(default_factory=dict)


def decode_source(data: Source) -> SourceStream:
    """Open ``data`` with PyAV, or with libsndfile when PyAV refuses it before giving any audio;
    :class:`Undecodable` naming both refusals when neither can. The worker's decoder, for every
    command that reads a user's audio (:func:`decode` resamples it for the model)."""
    if _is_empty(data):
        raise Undecodable("empty object (0 bytes)")
    try:
        return _decode_pyav(data)
    except Undecodable as pyav_error:
        try:
            return _decode_soundfile(data)
        except Undecodable as sf_error:
            raise Undecodable(f"PyAV: {pyav_error}; libsndfile: {sf_error}") from None


@dataclass
class Excerpts:
    """Evenly spread excerpts of one track, decoded by seeking: ``parts`` yields
    ``(start_s, chunks)`` pairs in order, each ``chunks`` mono float32 at ``SAMPLE_RATE``; consume
    each part's chunks before asking for the next part (they share one demuxer)."""

    parts: Iterator[tuple[float, Iterator[np.ndarray]]]
    decoder: str
    duration_s: float  # the whole track's, from the container
    starts_s: list[float]
    source_rate: int  # Hz, before resampling
    channels: int
    taps: list[Tap] = field(default_factory=list)  # every excerpt's blocks, in order


def decode_excerpts(data: Source, *, count: int, excerpt_s: float, max_duration_s: float) -> Excerpts | None:
    """``count`` excerpts of ``excerpt_s`` seconds each, evenly spread over the track (capped at
    ``max_duration_s``), decoded by seeking in the container so the rest is never decoded.

    Returns None when the whole track should be decoded instead: it is not longer than the
    excerpts together, its container states no duration, or PyAV cannot open it (the caller's
    :func:`decode` then applies the usual fallback and errors).
    """
    try:
        container = av.open(_reader(data), mode="r")
    except (av.FFmpegError, ValueError, UnicodeDecodeError):
        return None
    stream = container.streams.audio[0] if container.streams.audio else None
    duration = _container_duration_s(container, stream)
    rate = (stream.codec_context.sample_rate or stream.rate) if stream else 0
    if stream is None or not rate or duration is None or min(duration, max_duration_s) <= count * excerpt_s:
        container.close()
        return None
    span = min(duration, max_duration_s)
    # Centred in ``count`` equal sections of the track.
    starts = [min(max(0.0, (i + 0.5) * span / count - excerpt_s / 2), span - excerpt_s) for i in range(count)]

    taps: list[Tap] = []

    def parts() -> Generator[tuple[float, Iterator[np.ndarray]], None, None]:
        try:
            for start in starts:
                stats: dict[str, float] = {}
                planar = _pyav_from(container, stream, start)
                yield start, _mono_resampled(planar, int(rate), excerpt_s, 0.0, stats, taps)
        finally:
            container.close()

    return Excerpts(parts(), "pyav", duration, starts, int(rate), int(stream.codec_context.channels or 1), taps)


def _container_duration_s(container: av.container.InputContainer, stream: av.AudioStream | None) -> float | None:
    if stream is not None and stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _pyav_from(
    container: av.container.InputContainer, stream: av.AudioStream, start_s: float
) -> Generator[np.ndarray, None, None]:
    """[channels, n] float32 blocks from ``start_s`` on: seek to the packet before it, then drop
    the decoded samples that precede it."""
    if stream.time_base is None:  # FFmpeg sets one on every audio stream it opens
        raise Undecodable("the audio stream has no time base")
    container.seek(int(start_s / stream.time_base), stream=stream, backward=True, any_frame=False)
    to_float = _FloatFrames()
    try:
        for frame in container.decode(stream):
            at = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else start_s
            for block in to_float(frame):
                skip = round((start_s - at) * frame.sample_rate)
                at += block.shape[1] / frame.sample_rate
                if skip >= block.shape[1]:
                    continue
                yield block[:, max(0, skip) :]
    except (av.FFmpegError, ValueError):
        return  # a broken stream ends the excerpt with what decoded


def decode_all(data: Source, *, max_duration_s: float, min_duration_s: float = 0.0) -> tuple[np.ndarray, DecodedStream]:
    """The whole decoded signal at once: ([n] float32 at SAMPLE_RATE, the stream's metadata)."""
    stream = decode(data, max_duration_s=max_duration_s, min_duration_s=min_duration_s)
    chunks = list(stream.chunks)
    wave = np.concatenate(chunks) if chunks else np.empty(0, np.float32)
    return wave, stream


def _decode_pyav(data: Source) -> SourceStream:
    try:
        container = av.open(_reader(data), mode="r")
    except (av.FFmpegError, ValueError, UnicodeDecodeError) as exc:
        raise Undecodable(_short(exc)) from None
    if not container.streams.audio:
        container.close()
        raise Undecodable("no audio stream")
    stream = container.streams.audio[0]
    rate = stream.codec_context.sample_rate or stream.rate
    channels = stream.codec_context.channels
    if not rate or not channels:
        container.close()
        raise Undecodable("audio stream without sample rate or channels")

    # Decode the first frame now so a refusal can still fall back to libsndfile.
    frames = _pyav_frames(container, stream)
    try:
        first = next(frames)
    except StopIteration:
        container.close()
        raise Undecodable("no audio frames") from None
    except (av.FFmpegError, ValueError) as exc:
        container.close()
        raise Undecodable(_short(exc)) from None

    stats: dict[str, float] = {}

    def planar() -> Generator[np.ndarray, None, None]:
        yield first
        try:
            yield from frames
        except (av.FFmpegError, ValueError):
            # A stream that breaks after giving audio (a truncated upload) keeps what decoded;
            # ``truncated`` says so in the result.
            stats["truncated"] = 1.0
        finally:
            container.close()

    stated = _container_duration_s(container, stream)
    return SourceStream(planar(), "pyav", int(rate), int(channels), stated, stream.codec_context.name, stats)


def _pyav_frames(container: av.container.InputContainer, stream: av.AudioStream) -> Iterator[np.ndarray]:
    """[channels, n] float32 arrays, one per decoded frame."""
    to_float = _FloatFrames()
    for frame in container.decode(stream):
        yield from to_float(frame)


class _FloatFrames:
    """Decoded frames -> [channels, n] C-contiguous float32 arrays, every channel kept: the
    downmix happens in numpy (mean), as librosa does, not with FFmpeg's -3 dB centre mix."""

    def __init__(self) -> None:
        self._planar: av.AudioResampler | None = None
        self._packed: av.AudioResampler | None = None

    def __call__(self, frame: av.AudioFrame) -> list[np.ndarray]:
        channels = frame.layout.nb_channels
        if channels >= 8:
            # Packed, not planar: PyAV's to_ndarray reads past the end of a planar frame of 8 or
            # more channels and crashes.
            self._packed = self._packed or av.AudioResampler(format="flt")
            return [np.ascontiguousarray(c.to_ndarray().reshape(-1, channels).T) for c in self._packed.resample(frame)]
        if frame.format.name == "fltp":
            return [frame.to_ndarray()]  # most decoders' own output: no conversion needed
        # Integer or packed samples (FLAC, WAV) become planar float in FFmpeg's converter: the
        # downmix then reads each channel in order (over a strided view of packed samples it
        # cost more CPU than decoding the FLAC did).
        self._planar = self._planar or av.AudioResampler(format="fltp")
        return [c.to_ndarray() for c in self._planar.resample(frame)]


def _decode_soundfile(data: Source) -> SourceStream:
    try:
        sf = soundfile.SoundFile(_reader(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise Undecodable(_short(exc)) from None
    if sf.samplerate <= 0 or sf.channels <= 0:
        sf.close()
        raise Undecodable("no sample rate or channels")

    stats: dict[str, float] = {}

    def planar() -> Generator[np.ndarray, None, None]:
        try:
            for block in sf.blocks(blocksize=_SF_BLOCK, dtype="float32", always_2d=True):
                yield block.T
        except (soundfile.LibsndfileError, RuntimeError):
            stats["truncated"] = 1.0
        finally:
            sf.close()

    stated = sf.frames / sf.samplerate if sf.frames > 0 else None
    return SourceStream(planar(), "soundfile", int(sf.samplerate), int(sf.channels), stated, sf.subtype.lower(), stats)


def _mono_resampled(
    planar: Generator[np.ndarray, None, None],
    rate: int,
    max_duration_s: float,
    min_duration_s: float,
    stats: dict[str, float],
    taps: list[Tap] | None = None,
) -> Iterator[np.ndarray]:
    """[channels, n] blocks at ``rate`` -> [m] float32 mono blocks at SAMPLE_RATE, capped; each
    block (capped too) goes to the ``taps`` first."""
    limit = int(max_duration_s * rate)  # source samples
    taken = 0
    resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    stats["truncated"] = 0.0
    for block in _grouped(planar):
        if taps:
            for tap in taps:
                tap(block[:, : limit - taken])
        mono = block.mean(axis=0, dtype=np.float32) if block.shape[0] > 1 else block[0]
        if not np.all(np.isfinite(mono)):
            # NaN/Inf samples (broken float WAVs) would poison every score of the track.
            mono = np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0)
        mono = mono[: limit - taken]
        taken += len(mono)
        out = resampler.resample_chunk(mono, last=False)
        if len(out):
            yield out
        if taken >= limit:
            stats["capped"] = 1.0
            break
    planar.close()  # releases the decoder now when the cap stopped the loop early
    tail = resampler.resample_chunk(np.empty(0, np.float32), last=True)
    if len(tail):
        yield tail
    stats["duration_s"] = taken / rate
    if taken == 0:
        raise Undecodable("the stream holds no audio samples")
    if taken / rate < min_duration_s:
        raise TooShort(f"{taken / rate:.3f} s of audio, less than the minimum {min_duration_s} s")


def _grouped(planar: Iterator[np.ndarray], min_samples: int = _GROUP_SAMPLES) -> Iterator[np.ndarray]:
    """[channels, n] blocks joined into blocks of at least ``min_samples`` (the last may be
    shorter): decoders hand out 20-ms frames, and the per-call cost of downmixing and
    resampling each one alone was a fifth of all the decoding time."""
    pending: list[np.ndarray] = []
    count = 0
    for block in planar:
        if pending and block.shape[0] != pending[0].shape[0]:  # the channel layout changed
            yield np.concatenate(pending, axis=1)
            pending, count = [], 0
        pending.append(block)
        count += block.shape[1]
        if count >= min_samples:
            yield np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
            pending, count = [], 0
    if pending:
        yield np.concatenate(pending, axis=1)


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --- what kind of file is this? ---------------------------------------------------------------

#: (offset, magic bytes, container) of the audio containers PyAV/libsndfile decode here.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"ID3", "mp3"),
    (0, b"OggS", "ogg"),
    (0, b"fLaC", "flac"),
    (4, b"ftyp", "mp4"),
    (0, b"\x1a\x45\xdf\xa3", "matroska"),
    (0, b"wvpk", "wavpack"),
    (0, b"MAC ", "ape"),
    (0, b"#!AMR", "amr"),
    (0, b"caff", "caf"),
    (0, b".snd", "au"),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "asf"),
)


def sniff(head: bytes) -> str | None:
    """The audio container ``head`` (the first bytes of a file, 12 at least) starts like, or
    None: file names and declared types are not trusted, the bytes are."""
    for offset, magic, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"RF64"):
        return "wav"
    if head[:4] in (b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        # An MPEG audio frame header: layer bits 00 mean ADTS (AAC), others MP1-3.
        return "aac" if head[1] & 0x06 == 0 else "mp3"
    return None

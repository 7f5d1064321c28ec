"""The bench's codec mix: the same tracks encoded as a catalog holds them, by the bench itself.

Every source track is read through the product's decoder (:func:`pipeline.stages.audio.decode_source`:
PyAV, else libsndfile, as the worker reads it) and written in each codec at a common catalog
setting; the files are cached under ``CACHE/codecs/<codec>/`` (encoding takes a while and the
copies are third-party audio: they stay outside the clone). :func:`readable` keeps the sources
that decoder reads and names the others with the reason, so a folder of real music with a file
no decoder reads is benchmarked without it.

=========  ==========================  ================================================
codec      container, rate             setting
=========  ==========================  ================================================
mp3        .mp3, 44.1 kHz stereo       LAME, 192 kb/s CBR (FFmpeg's libmp3lame)
vorbis     .ogg, 44.1 kHz stereo       libvorbis quality 0.5 (libsndfile; ~160 kb/s)
opus       .opus, 48 kHz stereo        libopus 128 kb/s (Opus has no 44.1 kHz mode)
flac       .flac, 44.1 kHz stereo      FLAC 16-bit, FFmpeg's default compression
aac        .m4a, 44.1 kHz stereo       FFmpeg's AAC-LC encoder, 192 kb/s
=========  ==========================  ================================================
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import soundfile

from pipeline.errors import TrackError
from pipeline.stages import audio

CODECS = ("mp3", "vorbis", "opus", "flac", "aac")
RATE_HZ = 44_100
OPUS_RATE_HZ = 48_000  # Opus encodes at 48 kHz only
_PYAV = {  # codec -> (suffix, container format, encoder, sample format, bit rate b/s)
    "mp3": (".mp3", "mp3", "libmp3lame", "fltp", 192_000),
    "opus": (".opus", "ogg", "libopus", "flt", 128_000),
    "flac": (".flac", "flac", "flac", "s16", 0),
    "aac": (".m4a", "mp4", "aac", "fltp", 192_000),
}


def readable(sources: list[Path]) -> tuple[list[Path], dict[Path, str]]:
    """(the sources the product's decoder reads to their end, {source: why not} for the others),
    each read whole once, with a progress line per file on stderr."""
    kept, skipped = [], {}
    for i, source in enumerate(sources, 1):
        print(f"# reading the sources: {i}/{len(sources)} {source.name}", file=sys.stderr, flush=True)
        try:
            with open(source, "rb") as f:
                stream = audio.decode_source(f)
                for _ in stream.blocks:
                    pass
            if stream.stats.get("truncated"):
                raise TrackError("the stream breaks before its end")
        except (TrackError, OSError) as exc:
            reason = exc.reason if isinstance(exc, TrackError) else "unreadable"
            skipped[source] = f"{reason}: {exc}"
            print(f"# skipped {source}: {skipped[source]}", file=sys.stderr, flush=True)
            continue
        kept.append(source)
    return kept, skipped


def transcoded(sources: list[Path], codec: str, cache: Path) -> list[Path]:
    """``sources`` encoded as ``codec`` (one file each, same stem order), made once into
    ``cache/codecs/<codec>/`` (a line on stderr for each file encoded now)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
    folder = cache / "codecs" / codec
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".ogg" if codec == "vorbis" else _PYAV[codec][0]
    out = []
    for i, source in enumerate(sources):
        path = folder / f"{i:03d}-{source.stem}{suffix}"
        if not path.exists():
            print(f"# encoding {codec}: {i + 1}/{len(sources)} {source.name}", file=sys.stderr, flush=True)
            part = path.with_name(path.name + ".part")
            _encode(source, part, codec)
            part.rename(path)
        out.append(path)
    return out


def stereo(source: Path, rate: int) -> Iterator[np.ndarray]:
    """[n, 2] float32 blocks of ``source`` at ``rate``, read through the product's decoder (mono
    is doubled; more than two channels are averaged first, as the worker's downmix does)."""
    with open(source, "rb") as f:
        stream = audio.decode_source(f)
        resampler = av.AudioResampler(format="flt", layout="stereo", rate=rate)
        for block in stream.blocks:
            if block.shape[0] > 2:
                block = block.mean(axis=0, keepdims=True)
            layout = "stereo" if block.shape[0] == 2 else "mono"
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block, np.float32), format="fltp", layout=layout)
            frame.sample_rate = stream.rate
            for out in resampler.resample(frame):
                yield out.to_ndarray().reshape(-1, 2)
        for out in resampler.resample(None):
            yield out.to_ndarray().reshape(-1, 2)


def _encode(source: Path, path: Path, codec: str) -> None:
    if codec == "vorbis":
        with soundfile.SoundFile(path, "w", RATE_HZ, 2, format="OGG", subtype="VORBIS", compression_level=0.5) as out:
            for block in stereo(source, RATE_HZ):
                out.write(block)
        return
    _, fmt, encoder, sample_format, bit_rate = _PYAV[codec]
    rate = OPUS_RATE_HZ if codec == "opus" else RATE_HZ
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(encoder, rate=rate, layout="stereo")
        stream.format = sample_format
        if bit_rate:
            stream.bit_rate = bit_rate
        # The encoder takes frames of its own size; FFmpeg's resampler re-frames for it.
        fit = av.AudioResampler(
            format=sample_format, layout="stereo", rate=rate, frame_size=stream.codec_context.frame_size or None
        )
        for block in stereo(source, rate):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(block).reshape(1, -1), format="flt", layout="stereo"
            )
            frame.sample_rate = rate
            for piece in fit.resample(frame):
                container.mux(stream.encode(piece))
        for piece in fit.resample(None):
            container.mux(stream.encode(piece))
        container.mux(stream.encode(None))

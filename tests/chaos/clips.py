"""The chaos run's audio: short clips cut from real music, and the few bad inputs.

Real music comes from the cache only (never the clone): Debian's music when fetched (``make
music``; its music folders, reference and distill roles: the reserved check set stays
untouched), else the suite's three clips (``make clips``, excerpts of the same music). Each source is read through the product's
decoder (:mod:`pipeline.stages.audio`, mono at 16 kHz) and cut into clips of ``clip_s``
seconds, encoded in turn as MP3, Ogg Vorbis, FLAC, Opus and AAC, so every decoder path the
worker has is taken. Clips are made once into ``~/.cache/moodstream/chaos-clips`` and reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile

from pipeline.errors import TrackError
from pipeline.stages import audio, storage
from pipeline.stages.frontend import SAMPLE_RATE
from training.data import debian_music

CACHE = Path(os.environ.get("MOODSTREAM_CACHE", Path.home() / ".cache" / "moodstream"))
SUITE_CLIPS = Path(os.environ.get("MOODSTREAM_TEST_CLIPS", CACHE / "clips"))
MUSIC = CACHE / "music"
FORMATS = ("mp3", "ogg", "flac", "opus", "m4a")
#: The marker the test-only sitecustomize (tests/faults/poison) crashes the decoder on.
POISON_MARKER = b"MOODSTREAM-TEST-SEGV"


@dataclass(frozen=True)
class Clip:
    key: str  # S3 key
    path: Path
    source: str
    start_s: float


def sources(music: Path = MUSIC, suite_clips: Path = SUITE_CLIPS) -> list[Path]:
    """The fetched Debian music (reference and distill roles), else the suite's clips."""
    found = [f for role in ("reference", "distill") for f in debian_music.audio_files(music, role)]
    if not found and suite_clips.is_dir():
        found = storage.local_audio_files(suite_clips)
    return found


def cut(count: int, clip_s: float, *, files: list[Path] | None = None, cache: Path | None = None) -> list[Clip]:
    """Up to ``count`` clips of ``clip_s`` seconds, spread over the sources (the first clips of
    every source before the second ones), made once into the cache."""
    files = sources() if files is None else files
    if not files:
        raise SystemExit(f"no music in {MUSIC} or {SUITE_CLIPS}: run `make clips` (and `make music` for more)")
    digest = hashlib.sha256(f"v2|{clip_s}|{[str(f) for f in files]}".encode()).hexdigest()[:12]
    folder = (cache or CACHE / "chaos-clips") / digest
    manifest = folder / "manifest.json"
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        made = [Clip(c["key"], folder / c["file"], c["source"], c["start_s"]) for c in saved["clips"]]
        if len(made) >= count or saved["exhausted"]:
            return made[:count]
    folder.mkdir(parents=True, exist_ok=True)
    per_source = -(-count // len(files))  # clips a source gives, evenly spread over it
    clips: list[Clip] = []
    rows = []
    for n, source in enumerate(files, 1):
        print(f"# cutting clips: {n}/{len(files)} {source.name}", file=sys.stderr, flush=True)
        windows = _windows(source, clip_s)
        picked = [windows[round(i)] for i in np.linspace(0, len(windows) - 1, min(per_source, len(windows)))]
        for start_s, wave in picked if windows else []:
            if len(clips) >= count:
                break
            fmt = FORMATS[len(clips) % len(FORMATS)]
            name = f"{len(clips):05d}-{source.stem[:40]}-{int(start_s)}.{fmt}"
            path = folder / name
            if not path.exists():
                path.write_bytes(encode(wave, fmt))
            clips.append(Clip(f"chaos/clips/{name}", path, source.name, start_s))
            rows.append({"key": f"chaos/clips/{name}", "file": name, "source": source.name, "start_s": start_s})
    manifest.write_text(json.dumps({"clips": rows, "exhausted": len(clips) < count}))
    return clips


def _windows(path: Path, clip_s: float) -> list[tuple[float, np.ndarray]]:
    """(start, [n] float32 at 16 kHz) of every ``clip_s`` window of ``path`` with sound in it;
    a file the product's decoder cannot read is skipped with its reason."""
    try:
        with open(path, "rb") as f:
            wave, _ = audio.decode_all(f, max_duration_s=3 * 3600)
    except (TrackError, OSError) as exc:
        print(f"# skipped {path.name}: {exc}", file=sys.stderr)
        return []
    size = int(clip_s * SAMPLE_RATE)
    out = []
    for start in range(0, len(wave) - size + 1, size):
        window = wave[start : start + size]
        if float(np.sqrt(np.mean(window**2))) > 1e-3:  # not silence
            out.append((start / SAMPLE_RATE, window))
    return out


def encode(wave: np.ndarray, fmt: str, rate: int = SAMPLE_RATE) -> bytes:
    """[n] float32 mono -> ``fmt`` (mp3, ogg = Vorbis, flac, opus, m4a = AAC) bytes."""
    wave = np.clip(wave, -1, 1).astype(np.float32)
    if fmt in ("ogg", "flac"):
        buf = io.BytesIO()
        subtype = "VORBIS" if fmt == "ogg" else "PCM_16"
        soundfile.write(buf, wave, rate, format="OGG" if fmt == "ogg" else "FLAC", subtype=subtype)
        return buf.getvalue()
    codec, container = {"mp3": ("libmp3lame", "mp3"), "opus": ("libopus", "ogg"), "m4a": ("aac", "ipod")}[fmt]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        fit = av.AudioResampler(
            format="fltp", layout="mono", rate=rate, frame_size=stream.codec_context.frame_size or None
        )
        frame = av.AudioFrame.from_ndarray(wave.reshape(1, -1), format="fltp", layout="mono")
        frame.sample_rate = rate
        for piece in [*fit.resample(frame), *fit.resample(None)]:
            out.mux(stream.encode(piece))
        out.mux(stream.encode(None))
    return buf.getvalue()


@dataclass(frozen=True)
class BadInput:
    """A bad announcement and the dead-letter reason it must get."""

    kind: str
    expected: str  # reason
    key: str | None  # S3 key to upload (None: nothing to upload)
    data: bytes | None  # the object's bytes


BAD_KINDS = ("garbage", "short", "missing", "bad_json", "bad_bucket", "segv")


def bad_object(kind: str, rng: np.random.Generator, clip: bytes) -> tuple[bytes | None, str]:
    """The S3 object of a bad input of ``kind`` (None: none is uploaded) and its expected reason."""
    if kind == "garbage":
        return rng.bytes(int(rng.integers(200, 20_000))), "undecodable"
    if kind == "short":
        return encode(np.sin(np.arange(int(0.4 * SAMPLE_RATE)) / 9).astype(np.float32) * 0.3, "flac"), "too_short"
    if kind == "segv":
        return POISON_MARKER + rng.bytes(2000), "undecodable"
    if kind == "missing":
        return None, "not_found"
    return None, "bad_event"

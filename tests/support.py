"""What the whole suite shares besides fixtures: the clone's root, the real music clips, synthesised
audio files. Imported by name (``from support import ...``): every test folder has a conftest.py,
so ``conftest`` names a different module in each."""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from training.data.debian_music import load_clips

REPO = Path(__file__).resolve().parent.parent
#: Real music: 30-s excerpts of Debian's drascula-music (training/data/debian_music.toml) that
#: `make clips` (run by `make test`) writes into the cache; never committed.
EXAMPLES = Path(os.environ.get("MOODSTREAM_TEST_CLIPS", Path.home() / ".cache" / "moodstream" / "clips"))
#: The suite's two clips, both mp3: a jazz excerpt and an ambient one (musicnn_msd's top tags).
CLIP_A, CLIP_B = (EXAMPLES / c.file for c in load_clips()[:2])


def real_clip(name: str) -> Path:
    """One of the clips `make clips` writes (in MOODSTREAM_TEST_CLIPS); the test fails without it."""
    path = EXAMPLES / name
    if not path.is_file():
        pytest.fail(f"real music clip {path} missing; `make clips` writes it (`make test` does it first)")
    return path


def tone(seconds: float, rate: int = 44_100, channels: int = 2, freq: float = 440.0) -> np.ndarray:
    """[channels, n] float32: a chord-like signal with some noise, deterministic."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    x = (
        0.3 * np.sin(2 * np.pi * freq * t)
        + 0.2 * np.sin(2 * np.pi * freq * 1.5 * t)
        + 0.02 * rng.standard_normal(len(t))
    )
    return np.stack([x * (1 - 0.2 * c) for c in range(channels)]).astype(np.float32)


#: container format -> (codec, sample format) used by encode()
CODECS = {
    "mp3": ("libmp3lame", "fltp"),
    "ogg": ("libopus", "fltp"),  # PyAV's FFmpeg has no Vorbis encoder; vorbis files come from libsndfile below
    "flac": ("flac", "s16"),
    "wav": ("pcm_s16le", "s16"),
    "m4a": ("aac", "fltp"),
}


def encode(signal: np.ndarray, fmt: str, rate: int = 44_100) -> bytes:
    """Encode [channels, n] float32 into ``fmt`` (a key of CODECS, or "vorbis") with PyAV."""
    if fmt == "vorbis":
        buf = io.BytesIO()
        soundfile.write(buf, signal.T, rate, format="OGG", subtype="VORBIS")
        return buf.getvalue()
    codec, sample_fmt = CODECS[fmt]
    if codec == "libopus":
        rate = 48_000
    buf = io.BytesIO()
    container_fmt = {"m4a": "ipod"}.get(fmt, fmt)
    with av.open(buf, mode="w", format=container_fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo" if signal.shape[0] == 2 else "mono")
        planar = signal if sample_fmt.endswith("p") else signal.T.reshape(1, -1)
        data = planar if sample_fmt == "fltp" else (planar * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=sample_fmt, layout=stream.layout.name)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()

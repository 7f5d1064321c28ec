"""Speech mixed into music at known ratios, for speechiness.

``espeak-ng`` reads a text (written here) into a WAV; the speech is resampled to the song's
rate, repeated to its length, and added to both channels at a speech-to-music loudness ratio
(the RMS of each, over the whole excerpt): ``None`` is the music alone, ``inf`` the speech
alone. Speechiness should grow with the ratio.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import soxr

from bench.ground_truth import CACHE

TEXT = (
    "Good evening, and welcome to the programme. Tonight we talk about the weather in the hills, "
    "the harvest that came late this year, and the small towns along the river. "
    "Our first guest has walked the old road from the coast to the mountains, twice. "
    "She tells us that the hardest part was not the climb, but the long flat stretch in the middle, "
    "where nothing changes for days. After the break, the news, and then the late film. "
    "Stay with us. "
)
#: Speech-to-music ratios of the benchmark, dB (None: music only; inf: speech only).
RATIOS_DB: tuple[float | None, ...] = (None, -20.0, -10.0, -5.0, 0.0, 5.0, 10.0, float("inf"))


def tools_missing() -> list[str]:
    return [] if shutil.which("espeak-ng") else ["espeak-ng"]


def speech(rate: int, cache: Path = CACHE, voice: str = "en") -> np.ndarray:
    """The text spoken by espeak-ng, mono float32 at ``rate`` (rendered once, cached)."""
    path = cache / "speech" / f"espeak-{voice}.wav"
    if not path.is_file():
        if tools_missing():
            raise RuntimeError("espeak-ng is missing (apt-get install espeak-ng)")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "speech.wav"
            subprocess.run(
                ["espeak-ng", "-v", voice, "-s", "160", "-w", str(out), TEXT], check=True, capture_output=True
            )
            shutil.move(out, path)
    x, source_rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = x.mean(axis=1)
    return soxr.resample(mono, source_rate, rate).astype(np.float32) if source_rate != rate else mono


def mix(music: np.ndarray, rate: int, ratio_db: float | None, cache: Path = CACHE) -> np.ndarray:
    """``music`` [channels, n] with speech added at ``ratio_db`` (speech RMS over music RMS)."""
    if ratio_db is None:
        return music
    voice = speech(rate, cache)
    reps = int(np.ceil(music.shape[1] / len(voice)))
    voice = np.tile(voice, reps)[: music.shape[1]]
    if np.isinf(ratio_db):
        level = np.sqrt(np.mean(music**2)) / np.sqrt(np.mean(voice**2))
        return np.tile(voice * level, (music.shape[0], 1)).astype(np.float32)
    gain = np.sqrt(np.mean(music**2)) / np.sqrt(np.mean(voice**2)) * 10 ** (ratio_db / 20)
    return (music + gain * voice[None, :]).astype(np.float32)

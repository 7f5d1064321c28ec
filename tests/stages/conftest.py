"""Fixtures of the stage tests: songs rendered by the test itself (mma + fluidsynth), synthetic
signals, and a helper that streams a signal through the audio-features stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from bench.ground_truth import songs
from pipeline.stages.audio_features import AudioFeatures, AudioFeatureStream

#: The regression songs: styles, meters, keys, rates and tempi the benchmark handles, short.
REGRESSION_SONGS = (
    songs.SongSpec("t-basicrock-Em-120", "BasicRock", 4, 120, 4, 0, 0, 12, 44_100, 11),
    songs.SongSpec("t-waltz-Ab-150", "Waltz", 3, 150, 8, 1, 2, 16, 48_000, 12),
    songs.SongSpec("t-swing-Bb-110", "Swing", 4, 110, 10, 1, 1, 10, 44_100, 13),
    songs.SongSpec("t-bossanova-F#m-128", "BossaNova", 4, 128, 6, 0, 3, 12, 48_000, 14),
    songs.SongSpec("t-popballad-D-70", "PopBallad", 4, 70, 2, 1, 0, 8, 44_100, 15),
)


def stream(x: np.ndarray, rate: int, chunk: int = 32_768, **options) -> AudioFeatures:
    """``x`` [channels, n] (or [n]) through the stage in ``chunk``-sample pieces."""
    x = np.asarray(x, np.float32)
    if x.ndim == 1:
        x = x[None, :]
    s = AudioFeatureStream(rate, x.shape[0], **options)
    for i in range(0, x.shape[1], chunk):
        s.push(x[:, i : i + chunk])
    return s.finish()


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> list[tuple[songs.SongSpec, Path, dict]]:
    """The regression songs rendered into the session's temporary folder (a few seconds)."""
    missing = songs.tools_missing()
    if missing:
        pytest.skip(
            f"rendering test songs needs Debian's mma, fluidsynth and fluid-soundfont-gm (`make tools`); missing: {', '.join(missing)}"
        )
    cache = tmp_path_factory.mktemp("ground-truth")
    return [(spec, *songs.render(spec, cache)) for spec in REGRESSION_SONGS]


def load(path: Path) -> tuple[np.ndarray, int]:
    x, rate = soundfile.read(path, dtype="float32", always_2d=True)
    return np.ascontiguousarray(x.T), rate


def chord_track(root: int, minor: bool, rate: int = 22_050, seconds_per_chord: float = 1.0) -> np.ndarray:
    """i-iv-V-i (or I-IV-V-I) of sine chords with a few harmonics and a bass, mono."""
    third = 3 if minor else 4
    progression = [(0, third), (5, 3 if minor else 4), (7, 4), (0, third)]  # (root offset, third)
    t = np.arange(int(seconds_per_chord * rate)) / rate
    out = []
    for offset, third_ in progression:
        base = 48 + root + offset  # MIDI C3 + ...
        notes = [base - 12, base, base + third_, base + 7, base + 12]
        x = np.zeros_like(t)
        for note in notes:
            f = 440.0 * 2 ** ((note - 69) / 12)
            for h in range(1, 5):
                if f * h < rate / 2:
                    x += np.sin(2 * np.pi * f * h * t) / h**1.5
        out.append(x * np.hanning(len(t)) ** 0.2)
    x = np.concatenate(out * 4)
    return (0.1 * x / np.abs(x).max()).astype(np.float32)


def click_track(bpm: float, seconds: float, rate: int = 44_100, meter: int = 4, accent: bool = True) -> np.ndarray:
    """Mono drum-like clicks every beat (a low thump on the bar's first beat when ``accent``),
    a hi-hat-like burst between beats."""
    n = int(seconds * rate)
    x = np.zeros(n)
    rng = np.random.default_rng(0)
    period = 60.0 / bpm
    burst = int(0.03 * rate)
    env = np.exp(-np.arange(burst) / (0.006 * rate))
    k = 0
    while k * period * rate < n - burst:
        at = int(round(k * period * rate))
        first = accent and k % meter == 0
        t = np.arange(burst) / rate
        thump = np.sin(2 * np.pi * (60 if first else 180) * t) * (1.0 if first else 0.5)
        x[at : at + burst] += env * (thump + 0.3 * rng.standard_normal(burst))
        half = int(round((k + 0.5) * period * rate))
        if half + burst < n:
            x[half : half + burst] += 0.1 * env * rng.standard_normal(burst)
        k += 1
    return (0.5 * x / np.abs(x).max()).astype(np.float32)

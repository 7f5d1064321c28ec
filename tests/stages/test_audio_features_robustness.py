"""Bad input never crashes: every field is defined for silence, a click, noise, a 2-s clip, an
empty stream, NaNs; and a 3-hour stream keeps its memory bounded."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from pipeline.stages.audio_features import DSP_FIELDS, AudioFeatures, AudioFeatureStream, loudness
from tests.stages.conftest import click_track, stream


def _defined(result: AudioFeatures) -> None:
    """Every field present, of its type, in its range."""
    record = result.to_dict()
    for name in DSP_FIELDS:
        assert name in record
    for name in (
        "tempo_confidence",
        "key_confidence",
        "energy",
        "danceability",
        "speechiness",
        "time_signature_confidence",
    ):
        assert 0.0 <= record[name] <= 1.0, name
    assert record["key"] in range(-1, 12) and record["mode"] in (-1, 0, 1)
    assert record["time_signature"] == -1 or 3 <= record["time_signature"] <= 7
    for name in ("tempo", "loudness", "loudness_range", "true_peak"):
        assert record[name] is None or math.isfinite(record[name]), name
    assert 0.0 <= record["fade_in_end_s"] <= record["fade_out_start_s"] <= record["duration_s"] + 1e-6


def _no_pulse(result: AudioFeatures) -> None:
    assert result.tempo is None and result.tempo_confidence == 0.0
    assert len(result.beats) == 0 and len(result.downbeats) == 0
    assert result.time_signature == -1
    assert result.danceability == 0.0


def test_silence():
    result = stream(np.zeros((2, 10 * 44_100), np.float32), 44_100)
    _defined(result)
    _no_pulse(result)
    assert (result.key, result.mode, result.key_confidence) == (-1, -1, 0.0)
    assert result.loudness is None and result.loudness_range is None and result.true_peak is None
    assert result.energy == 0.0 and result.speechiness == 0.0
    assert (result.fade_in_end_s, result.fade_out_start_s) == (0.0, 10.0)


def test_a_single_click():
    x = np.zeros((2, 10 * 48_000), np.float32)
    x[:, 48_000 * 3] = 0.9
    result = stream(x, 48_000)
    _defined(result)
    _no_pulse(result)
    assert result.key == -1
    assert result.true_peak == pytest.approx(20 * np.log10(0.9), abs=0.5)


def test_white_noise():
    x = (0.2 * np.random.default_rng(5).standard_normal((2, 20 * 44_100))).astype(np.float32)
    result = stream(x, 44_100)
    _defined(result)
    _no_pulse(result)
    assert result.key == -1
    # Two channels of white noise at 0.2 RMS, K-weighted: the mean of |H|^2 over the band.
    gain = loudness.k_power(44_100, np.linspace(0, 22_050, 4_096)).mean()
    assert result.loudness == pytest.approx(-0.691 + 10 * np.log10(2 * 0.04 * gain), abs=0.1)


def test_a_two_second_clip():
    rate = 44_100
    result = stream(click_track(120, 2.0, rate), rate)
    _defined(result)
    assert result.duration_s == pytest.approx(2.0)
    assert len(result.sections) == 1


@pytest.mark.parametrize("seconds", [0.0, 0.01, 0.3])
def test_next_to_nothing(seconds):
    s = AudioFeatureStream(44_100, 2)
    if seconds:
        s.push(np.full((2, int(seconds * 44_100)), 0.1, np.float32))
    result = s.finish()
    _defined(result)
    _no_pulse(result)
    assert len(result.sections) == (1 if seconds else 0)


def test_nan_and_infinity_are_replaced():
    rate = 44_100
    x = np.stack([click_track(120, 12.0, rate)] * 2)
    x[0, 1000:1200] = np.nan
    x[1, 50_000] = np.inf
    result = stream(x, rate)
    _defined(result)
    assert result.tempo == pytest.approx(120, rel=0.04)
    assert result.true_peak is not None and result.true_peak <= 0.5


def test_mono_input_and_odd_rates():
    for rate in (8_000, 11_025, 37_800):
        result = stream(click_track(100, 15.0, rate), rate)
        _defined(result)
        assert result.tempo == pytest.approx(100, rel=0.04), rate


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        AudioFeatureStream(0, 2)
    s = AudioFeatureStream(44_100, 2)
    with pytest.raises(ValueError):
        s.push(np.zeros((3, 100), np.float32))
    s.finish()
    with pytest.raises(RuntimeError):
        s.push(np.zeros((2, 100), np.float32))


def test_three_hours_stream_in_bounded_memory():
    """A 3-hour stream (mono at 8 kHz to keep the test short: what grows with the duration is
    the per-frame envelopes, the same at any rate; ``python -m bench.audio_features`` runs it
    in stereo at 44.1 kHz): the stage's peak allocation stays a few tens of MB (its envelopes,
    about 70 bytes per 100 ms, and the finish's work on them), not the audio (346 MB of float32
    here)."""
    rate, chunk = 8_000, 64_000
    loop = click_track(125, 12.0, rate)[None, :]
    total = 3 * 3600 * rate
    tracemalloc.start()
    try:
        s = AudioFeatureStream(rate, 1)
        pushed = 0
        while pushed < total:
            at = pushed % (loop.shape[1] - chunk)
            n = min(chunk, total - pushed)
            s.push(loop[:, at : at + n])
            pushed += n
        result = s.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _defined(result)
    assert result.duration_s == pytest.approx(pushed / rate)
    assert len(result.sections) == 360
    assert peak < 80 * 2**20, f"peak {peak / 2**20:.0f} MB"
    assert result.tempo == pytest.approx(125, rel=0.04)

"""Loudness, loudness range and true peak: the EBU test signals, the spec's calibration tone,
the Parseval path against the exact K-filter, and streaming invariance."""

from __future__ import annotations

import numpy as np
import pytest

from bench.ground_truth import ebu
from pipeline.stages.audio_features import loudness
from tests.stages.conftest import load, stream

CASES = ebu.cases()


def _blocks(x: np.ndarray, rate: int, chunk: int = 40_000, weights=None) -> tuple[np.ndarray, np.ndarray]:
    meter = loudness.KWeightedBlocks(rate, x.shape[0], weights)
    for i in range(0, x.shape[1], chunk):
        meter.push(x[:, i : i + chunk])
    return meter.finish()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ebu_cases_within_the_specifications_tolerance(case):
    result = stream(case.signal, case.rate, chunk=40_000)
    needs_blocks = {"short_term", "momentary"} & set(case.expected)
    energies, lengths = _blocks(case.signal, case.rate) if needs_blocks else (None, None)
    for measure, (value, minus, plus) in case.expected.items():
        if measure == "integrated":
            got = [result.loudness]
        elif measure == "loudness_range":
            got = [result.loudness_range]
        elif measure == "true_peak":
            got = [result.true_peak]
        elif measure == "short_term":
            got = loudness.short_term(energies, lengths)[30:]  # every window full of signal
        else:
            got = loudness.momentary(energies, lengths)[4:]
        got = np.asarray(got, float)
        assert np.all((got >= value - minus) & (got <= value + plus)), (
            f"{case.name} {measure}: {got.min():.3f}..{got.max():.3f}, expected {value} -{minus}/+{plus}"
        )


def test_full_scale_sine_on_one_channel_reads_minus_3_lufs():
    """BS.1770-4: a 0 dBFS 1 kHz sine on one channel reads -3.01 LKFS (997 Hz exactly)."""
    rate = 48_000
    t = np.arange(10 * rate) / rate
    x = np.sin(2 * np.pi * 997.0 * t).astype(np.float32)
    result = stream(x, rate)
    assert result.loudness == pytest.approx(-3.01, abs=0.02)
    assert result.true_peak == pytest.approx(0.0, abs=0.05)


@pytest.mark.parametrize("rate", [8_000, 11_025, 16_000, 22_050, 32_000, 44_100, 48_000, 88_200, 96_000, 192_000])
def test_every_rate_reads_the_calibration_tone(rate):
    """Stereo 1 kHz at -23 dBFS reads -23 LUFS at any rate; 11025 Hz (no whole-sample block)
    takes the exact time-domain path. Below 32 kHz the K-filter's bilinear warping near the
    band's top moves 1 kHz by up to 0.06 dB."""
    t = np.arange(int(12 * rate)) / rate
    tone = (10 ** (-23 / 20) * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    result = stream(np.stack([tone, tone]), rate)
    assert result.loudness == pytest.approx(-23.0, abs=0.1)
    assert result.true_peak == pytest.approx(-23.0, abs=0.1)


def _coloured(rate: int, seconds: float, seed: int = 3) -> np.ndarray:
    """Stereo, broadband, bass-heavy and changing: pink-ish noise, a 55 Hz bass, bursts."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    white = rng.standard_normal((2, n))
    spectrum = np.fft.rfft(white, axis=1)
    f = np.fft.rfftfreq(n, 1 / rate)
    spectrum /= np.sqrt(np.maximum(f, 20.0))
    noise = np.fft.irfft(spectrum, n=n, axis=1)
    noise /= noise.std()
    t = np.arange(n) / rate
    bass = np.sin(2 * np.pi * 55.0 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * t))
    gate = (np.sin(2 * np.pi * 2.0 * t) > 0.6).astype(float)
    x = 0.05 * noise * (0.3 + gate) + 0.2 * bass
    x[1] *= 0.7
    return x.astype(np.float32)


@pytest.mark.parametrize("rate", [44_100, 48_000])
def test_parseval_path_matches_the_exact_k_filter(rate):
    """The block-DFT K-weighting (module docstring) against scipy's sosfilt of the two biquads:
    integrated loudness and LRA within 0.05 LU, 95 % of the 400-ms blocks within 0.1 dB."""
    x = _coloured(rate, 40.0)
    energies, lengths = _blocks(x, rate)
    sq, _ = loudness.k_weighted_block_energies(x, rate)
    per_sample = sq.sum(axis=0)
    n = rate // 10
    blocks = len(energies)
    exact = per_sample[: blocks * n].reshape(blocks, n).sum(axis=1)
    exact_lengths = np.full(blocks, n)
    assert loudness.integrated(energies, lengths) == pytest.approx(loudness.integrated(exact, exact_lengths), abs=0.05)
    assert loudness.loudness_range(energies, lengths) == pytest.approx(
        loudness.loudness_range(exact, exact_lengths), abs=0.05
    )
    diff = np.abs(loudness.momentary(energies, lengths) - loudness.momentary(exact, exact_lengths))
    assert np.quantile(diff, 0.95) < 0.1


@pytest.mark.parametrize("freq", [25.0, 55.0, 100.0, 440.0, 1_000.0, 3_000.0, 6_000.0, 12_000.0])
@pytest.mark.parametrize("rate", [44_100, 48_000])
def test_parseval_path_matches_the_exact_k_filter_on_sines(rate, freq):
    """Sines across the band (the high-pass stage's slope, the shelf, the high band's mean
    gain) within 0.08 dB of the exact filter; the worst, 0.06 dB, is a tone just above the
    decimated band (6 kHz at 44.1 kHz), whose alias the box passes at -8 dB."""
    t = np.arange(6 * rate) / rate
    tone = (0.1 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    x = np.stack([tone, tone])
    energies, lengths = _blocks(x, rate)
    sq, _ = loudness.k_weighted_block_energies(x, rate)
    n = rate // 10
    exact = sq.sum(axis=0)[: len(energies) * n].reshape(len(energies), n).sum(axis=1)
    assert loudness.integrated(energies, lengths) == pytest.approx(
        loudness.integrated(exact, np.full(len(exact), n)), abs=0.08
    )


def test_parseval_path_on_rendered_music_matches_the_exact_filter(rendered):
    for spec, path, _ in rendered[:2]:
        x, rate = load(path)
        energies, lengths = _blocks(x, rate)
        sq, _ = loudness.k_weighted_block_energies(x, rate)
        n = rate // 10
        exact = sq.sum(axis=0)[: len(energies) * n].reshape(len(energies), n).sum(axis=1)
        assert loudness.integrated(energies, lengths) == pytest.approx(
            loudness.integrated(exact, np.full(len(exact), n)), abs=0.05
        ), spec.name


def test_results_do_not_depend_on_chunk_sizes():
    rate = 44_100
    x = _coloured(rate, 12.0)
    a = stream(x, rate, chunk=65_536)
    b = stream(x, rate, chunk=4_099)
    c = stream(x, rate, chunk=777)
    for other in (b, c):
        assert other.loudness == pytest.approx(a.loudness, abs=1e-6)
        assert other.loudness_range == pytest.approx(a.loudness_range, abs=1e-6)
        assert other.true_peak == pytest.approx(a.true_peak, abs=1e-6)


def test_true_peak_between_samples_and_across_chunk_edges():
    """A sine at fs/4 sampled at 45 degrees: samples at 0.707 of the peak, the true peak 3 dB
    above the sample peak, found whatever the chunking (tiny chunks put peaks at edges)."""
    rate = 48_000
    t = np.arange(rate // 4) / rate
    x = (0.5 * np.sin(2 * np.pi * rate / 4 * t + np.pi / 4)).astype(np.float32)
    ramp = np.linspace(0, 1, rate // 20, dtype=np.float32) ** 2
    x[: len(ramp)] *= ramp  # no step at either end: a step overshoots between samples
    x[-len(ramp) :] *= ramp[::-1]
    for chunk in (7, 4_096):
        meter = loudness.TruePeak(rate, 1)
        for i in range(0, len(x), chunk):
            meter.push(x[None, i : i + chunk])
        meter.finish()
        assert meter.dbtp == pytest.approx(20 * np.log10(0.5), abs=0.1), chunk
        assert 20 * np.log10(meter.sample_peak) == pytest.approx(20 * np.log10(0.5) - 3.01, abs=0.05)


def test_surround_weights_and_lfe():
    """5.1 (FFmpeg order L R C LFE Ls Rs): the LFE is left out, the surrounds weigh 1.41."""
    rate = 48_000
    t = np.arange(10 * rate) / rate
    tone = (10 ** (-30 / 20) * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    silent = np.zeros_like(tone)
    front = stream(np.stack([tone, silent, silent, silent, silent, silent]), rate).loudness
    lfe = stream(np.stack([silent, silent, silent, tone, silent, silent]), rate).loudness
    surround = stream(np.stack([silent, silent, silent, silent, tone, silent]), rate).loudness
    assert lfe is None
    assert surround - front == pytest.approx(10 * np.log10(1.41), abs=0.01)


def test_stereo_is_not_read_as_a_mono_downmix():
    """Uncorrelated channels: the mean of the channels would read 3 LU low."""
    rate = 44_100
    x = _coloured(rate, 10.0)
    x[1] = np.random.default_rng(9).permutation(x[1])
    both = stream(x, rate).loudness
    mono = stream(x.mean(axis=0, keepdims=True), rate).loudness
    assert both - mono > 2.5

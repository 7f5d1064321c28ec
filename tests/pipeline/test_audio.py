"""Decoding: formats, downmix, resampling, fallback to libsndfile, caps and refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from conftest import encode, tone
from pipeline import audio
from pipeline.errors import TooShort, Undecodable
from pipeline.features import SAMPLE_RATE


@pytest.mark.parametrize("fmt", ["mp3", "ogg", "vorbis", "flac", "wav", "m4a"])
def test_decodes_common_formats_to_mono_16k(fmt):
    data = encode(tone(3.0), fmt)
    wave, stream = audio.decode_all(data, max_duration_s=60)
    assert stream.decoder == "pyav" and stream.channels == 2
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) / SAMPLE_RATE == pytest.approx(stream.stats["duration_s"], abs=0.05)
    assert 0.05 < np.abs(wave).max() < 1.0


def test_downmix_is_the_channel_mean():
    signal = tone(1.0, rate=SAMPLE_RATE)
    data = encode(signal, "wav", rate=SAMPLE_RATE)
    wave, _ = audio.decode_all(data, max_duration_s=60)
    expected = (np.round(signal * 32767) / 32768).mean(axis=0)
    assert np.abs(wave - expected).max() < 1e-4


def test_falls_back_to_libsndfile_when_pyav_refuses():
    buf = io.BytesIO()
    soundfile.write(buf, tone(2.0).T, 44_100, format="MAT5", subtype="FLOAT")  # FFmpeg has no MATLAB demuxer
    wave, stream = audio.decode_all(buf.getvalue(), max_duration_s=60)
    assert stream.decoder == "soundfile"
    assert len(wave) == 2 * SAMPLE_RATE


def test_decoding_stops_at_the_duration_cap():
    data = encode(tone(10.0), "flac")
    wave, stream = audio.decode_all(data, max_duration_s=4.0)
    assert stream.stats["duration_s"] == pytest.approx(4.0)
    assert len(wave) == pytest.approx(4 * SAMPLE_RATE, abs=2)


@pytest.mark.parametrize("data", [b"", b"\x00" * 1000, b"not audio at all" * 100, b"RIFF\x24\x00\x00\x00WAVEfmt "])
def test_garbage_is_undecodable(data):
    with pytest.raises(Undecodable):
        audio.decode_all(data, max_duration_s=60)


def test_too_short_is_reported_after_decoding():
    with pytest.raises(TooShort):
        audio.decode_all(encode(tone(0.3), "wav"), max_duration_s=60, min_duration_s=1.0)


def test_truncated_file_keeps_what_decoded():
    data = encode(tone(6.0), "mp3")
    wave, stream = audio.decode_all(data[: len(data) // 2], max_duration_s=60)
    assert 2.0 < len(wave) / SAMPLE_RATE < 4.0


def test_nan_samples_are_zeroed():
    signal = tone(2.0, rate=SAMPLE_RATE)
    signal[:, 1000:2000] = np.nan
    buf = io.BytesIO()
    soundfile.write(buf, signal.T, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    wave, _ = audio.decode_all(buf.getvalue(), max_duration_s=60)
    assert np.isfinite(wave).all()


@pytest.mark.parametrize("channels", [6, 8, 12])
def test_many_channels_are_averaged(channels):
    # Planar frames of 8+ channels crashed PyAV's to_ndarray (a segfault in the decoding process).
    signal = tone(1.0, rate=SAMPLE_RATE, channels=channels)
    buf = io.BytesIO()
    soundfile.write(buf, signal.T, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    wave, stream = audio.decode_all(buf.getvalue(), max_duration_s=60)
    assert stream.decoder == "pyav" and stream.channels == channels
    np.testing.assert_allclose(wave, signal.mean(axis=0), atol=1e-3)

"""Decoding: formats, downmix, resampling, fallback to libsndfile, caps and refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
from support import encode, tone

from pipeline.errors import TooShort, Undecodable
from pipeline.stages import audio
from pipeline.stages.frontend import SAMPLE_RATE


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


@pytest.mark.parametrize("channels", [1, 3, 8])
def test_integer_samples_of_any_layout_downmix_to_the_channel_mean(channels):
    """16-bit samples go through FFmpeg's converter (planar float below 8 channels, packed from
    8 on, where PyAV cannot read planar frames)."""
    signal = (np.random.default_rng(channels).uniform(-0.5, 0.5, (channels, SAMPLE_RATE))).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, signal.T, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    wave, stream = audio.decode_all(buf.getvalue(), max_duration_s=60)
    assert stream.decoder == "pyav" and stream.channels == channels
    expected = (np.round(signal * 32767) / 32768).mean(axis=0)
    assert np.abs(wave - expected).max() < 1e-4


def test_falls_back_to_libsndfile_when_pyav_refuses():
    buf = io.BytesIO()
    soundfile.write(buf, tone(2.0).T, 44_100, format="MAT5", subtype="FLOAT")  # FFmpeg has no MATLAB demuxer
    wave, stream = audio.decode_all(buf.getvalue(), max_duration_s=60)
    assert stream.decoder == "soundfile"
    assert len(wave) == 2 * SAMPLE_RATE


@pytest.mark.parametrize("fmt", ["mp3", "m4a", "mat5"])
def test_a_file_decodes_as_its_bytes_do(fmt, tmp_path):
    """A file object is read as decoding goes (``moodstream tag``): same samples as its bytes,
    the libsndfile fallback included (MAT5: FFmpeg refuses it after reading from the file)."""
    if fmt == "mat5":
        buf = io.BytesIO()
        soundfile.write(buf, tone(2.0).T, 44_100, format="MAT5", subtype="FLOAT")
        data = buf.getvalue()
    else:
        data = encode(tone(3.0), fmt)
    path = tmp_path / f"clip.{fmt}"
    path.write_bytes(data)
    expected, from_bytes = audio.decode_all(data, max_duration_s=60)
    with open(path, "rb") as f:
        wave, from_file = audio.decode_all(f, max_duration_s=60)
    assert from_file.decoder == from_bytes.decoder == ("soundfile" if fmt == "mat5" else "pyav")
    np.testing.assert_array_equal(wave, expected)
    with open(tmp_path / "empty.mp3", "wb+") as f, pytest.raises(Undecodable, match="empty"):
        audio.decode(f, max_duration_s=60)


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
    wave, _stream = audio.decode_all(data[: len(data) // 2], max_duration_s=60)
    assert 2.0 < len(wave) / SAMPLE_RATE < 4.0


def test_nan_samples_are_zeroed():
    signal = tone(2.0, rate=SAMPLE_RATE)
    signal[:, 1000:2000] = np.nan
    buf = io.BytesIO()
    soundfile.write(buf, signal.T, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    wave, _ = audio.decode_all(buf.getvalue(), max_duration_s=60)
    assert np.isfinite(wave).all()


def _ramp_tone(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """[1, n] float32 whose pitch rises with time, so each moment of the signal is recognisable."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * (200 + 20 * t) * t)).astype(np.float32)[None]


def test_excerpts_are_the_same_samples_as_the_whole_decode():
    # 16 kHz FLAC: seeking is sample-exact and no resampling happens, so the excerpts must be
    # exactly the whole decode's samples at their start times.
    data = encode(_ramp_tone(60.0), "flac", rate=SAMPLE_RATE)
    whole, _ = audio.decode_all(data, max_duration_s=3600)
    plan = audio.decode_excerpts(data, count=3, excerpt_s=5.0, max_duration_s=3600)
    assert plan is not None and plan.duration_s == pytest.approx(60.0, abs=0.01)
    assert plan.starts_s == pytest.approx([7.5, 27.5, 47.5])
    for start, chunks in plan.parts:
        part = np.concatenate(list(chunks))
        at = round(start * SAMPLE_RATE)
        assert len(part) == 5 * SAMPLE_RATE
        assert np.abs(part - whole[at : at + len(part)]).max() < 1e-4


@pytest.mark.parametrize("fmt", ["mp3", "ogg", "vorbis"])
def test_excerpts_seek_into_compressed_streams(fmt):
    noise = np.random.default_rng(5).uniform(-0.3, 0.3, (2, 40 * 44_100)).astype(np.float32)
    data = encode(noise, fmt)
    whole, _ = audio.decode_all(data, max_duration_s=3600)
    plan = audio.decode_excerpts(data, count=2, excerpt_s=4.0, max_duration_s=3600)
    for start, chunks in plan.parts:
        part = np.concatenate(list(chunks))
        at = round(start * SAMPLE_RATE)
        # Lossy codecs seek to a packet and trim by timestamp; the excerpt must line up with
        # the whole decode to within 30 ms: the codec delay skipped at the start of a stream
        # is not skipped again after a seek (measured: MP3 25 ms, Opus 6.5 ms, Vorbis 0), a
        # shift no 3-second patch of a mood model can tell apart.
        margin = SAMPLE_RATE // 10
        window = whole[at - margin : at + len(part) + margin]
        corr = np.correlate(window, part[:SAMPLE_RATE], mode="valid")
        assert abs(int(np.argmax(corr)) - margin) <= 0.03 * SAMPLE_RATE
        assert len(part) >= 3.9 * SAMPLE_RATE


def test_no_excerpts_when_the_track_is_not_longer_than_them():
    data = encode(_ramp_tone(20.0), "flac", rate=SAMPLE_RATE)
    assert audio.decode_excerpts(data, count=2, excerpt_s=10.0, max_duration_s=3600) is None
    assert audio.decode_excerpts(b"not audio", count=2, excerpt_s=1.0, max_duration_s=3600) is None


@pytest.mark.parametrize("channels", [6, 8, 12])
def test_many_channels_are_averaged(channels):
    # Planar frames of 8+ channels crashed PyAV's to_ndarray (a segfault in the decoding process).
    signal = tone(1.0, rate=SAMPLE_RATE, channels=channels)
    buf = io.BytesIO()
    soundfile.write(buf, signal.T, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    wave, stream = audio.decode_all(buf.getvalue(), max_duration_s=60)
    assert stream.decoder == "pyav" and stream.channels == channels
    np.testing.assert_allclose(wave, signal.mean(axis=0), atol=1e-3)

"""The bench's codec mix: real music encoded in each codec decodes back to the same length."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from bench import codecs
from pipeline.stages import audio


@pytest.fixture(scope="module")
def short_clip(example_clips, tmp_path_factory):
    """The first 8 s of a real clip as stereo 16-bit WAV: the source the codecs are made from."""
    wave, _ = audio.decode_all(example_clips[0].read_bytes(), max_duration_s=8.0)
    path = tmp_path_factory.mktemp("source") / "clip.wav"
    soundfile.write(str(path), np.stack([wave, wave], axis=1), 16_000, subtype="PCM_16")
    return path


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_each_codec_decodes_to_the_source_length(codec, short_clip, tmp_path):
    (made,) = codecs.transcoded([short_clip], codec, tmp_path)
    assert made.parent == tmp_path / "codecs" / codec
    wave, stream = audio.decode_all(made.read_bytes(), max_duration_s=60)
    assert stream.decoder == "pyav" and stream.channels == 2
    assert stream.source_rate == (codecs.OPUS_RATE_HZ if codec == "opus" else codecs.RATE_HZ)
    assert len(wave) / 16_000 == pytest.approx(8.0, abs=0.06)  # encoder delay and padding aside
    assert 0.01 < np.abs(wave).max() <= 1.0
    mtime = made.stat().st_mtime_ns
    assert codecs.transcoded([short_clip], codec, tmp_path) == [made] and made.stat().st_mtime_ns == mtime  # made once


def test_unknown_codec_is_refused(short_clip, tmp_path):
    with pytest.raises(ValueError, match="unknown codec 'wma'"):
        codecs.transcoded([short_clip], "wma", tmp_path)

"""The bench's codec mix: real music encoded in each codec decodes back to the same length."""

from __future__ import annotations

import av
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


@pytest.fixture
def user_folder(short_clip, tmp_path):
    """A folder as a user has one: real music, an .ogg FFmpeg refuses and libsndfile reads (as
    some game music is; here a MATLAB file under that name), a file nothing reads, an empty one."""
    folder = tmp_path / "music"
    folder.mkdir()
    (folder / "a-real.wav").write_bytes(short_clip.read_bytes())
    wave, _ = audio.decode_all(short_clip.read_bytes(), max_duration_s=3.0)
    soundfile.write(str(folder / "b-libsndfile-only.ogg"), np.stack([wave, wave], axis=1), 16_000, format="MAT5")
    (folder / "c-garbage.ogg").write_bytes(b"OggS" + bytes(range(256)) * 8)
    (folder / "d-empty.mp3").write_bytes(b"")
    return folder


def test_sources_are_read_by_the_products_decoder_and_unreadable_ones_named(user_folder, capsys):
    from pipeline.stages.storage import local_audio_files

    files = local_audio_files(user_folder)
    kept, skipped = codecs.readable(files)
    assert [p.name for p in kept] == ["a-real.wav", "b-libsndfile-only.ogg"]
    assert {p.name: why.split(":")[0] for p, why in skipped.items()} == {
        "c-garbage.ogg": "undecodable",
        "d-empty.mp3": "undecodable",
    }
    err = capsys.readouterr().err
    assert "skipped" in err and "c-garbage.ogg" in err and "PyAV" in err and "libsndfile" in err
    assert "4/4" in err  # progress, file by file


def test_a_file_only_libsndfile_reads_is_encoded_through_the_fallback(user_folder, tmp_path):
    source = user_folder / "b-libsndfile-only.ogg"
    with pytest.raises(av.FFmpegError):  # what the bench did before: PyAV alone refuses it
        av.open(str(source)).close()
    (made,) = codecs.transcoded([source], "vorbis", tmp_path)
    wave, stream = audio.decode_all(made.read_bytes(), max_duration_s=60)
    assert stream.channels == 2 and len(wave) / 16_000 == pytest.approx(3.0, abs=0.06)


def test_more_channels_than_two_are_mixed_down(tmp_path):
    path = tmp_path / "six.wav"
    t = np.arange(16_000 * 2) / 16_000
    soundfile.write(str(path), np.stack([np.sin(2 * np.pi * 220 * t) * 0.2] * 6, axis=1), 16_000)
    blocks = list(codecs.stereo(path, codecs.RATE_HZ))
    total = sum(len(b) for b in blocks)
    assert all(b.shape[1] == 2 for b in blocks) and total == pytest.approx(2 * codecs.RATE_HZ, abs=64)

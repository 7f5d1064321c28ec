"""The frontend: parity with librosa on real music, streaming = whole, the patch rules."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from pipeline.stages import audio
from pipeline.stages import frontend as F


def _librosa_log_mel(wave: np.ndarray) -> np.ndarray:
    """What musicnn's extractor computes (but in float32, see pipeline.stages.frontend)."""
    mel = librosa.feature.melspectrogram(
        y=wave, sr=F.SAMPLE_RATE, hop_length=F.HOP_LENGTH, n_fft=F.N_FFT, n_mels=F.N_MELS
    )
    return np.log10(1 + 10000 * mel.T.astype(np.float32))


def test_torchaudio_features_equal_librosa_on_real_music(example_clips):
    for clip in example_clips:
        wave, _ = audio.decode_all(clip.read_bytes(), max_duration_s=3600)
        ours, ref = F.log_mel(wave), _librosa_log_mel(wave)
        assert ours.shape == ref.shape == (1 + len(wave) // F.HOP_LENGTH, F.N_MELS)
        assert np.abs(ours - ref).max() < 1e-3
        assert ref.max() > 1.0  # real music, not silence: the bound above means something


def test_decoding_matches_librosa_load_on_mp3(example_clips):
    """PyAV + soxr give the waveform librosa.load gives (same decoder family, same resampler)."""
    wave, stream = audio.decode_all(example_clips[0].read_bytes(), max_duration_s=3600)
    ref, _ = librosa.load(example_clips[0], sr=F.SAMPLE_RATE)
    assert stream.decoder == "pyav" and len(wave) == len(ref)
    assert np.abs(wave - ref).max() < 1e-4


@pytest.mark.parametrize("chunk", [1, 255, 256, 1000, 7777, 100_000])
def test_streaming_spectrogram_equals_whole_signal(chunk):
    rng = np.random.default_rng(1)
    wave = rng.standard_normal(F.SAMPLE_RATE * 7 + 123).astype(np.float32) * 0.1
    whole = F.log_mel(wave)
    stream = F.LogMelStream()
    parts = [stream.push(wave[i : i + chunk]) for i in range(0, len(wave), chunk)] + [stream.finish()]
    # Equal up to float32 rounding: the STFT runs on differently sized blocks.
    assert np.abs(np.concatenate(parts) - whole).max() < 1e-5


def test_patches_start_at_zero_and_drop_the_trailing_partial_patch():
    frames = np.arange(3 * F.PATCH_FRAMES + 50, dtype=np.float32)[:, None] * np.ones(F.N_MELS, np.float32)
    cut = F.PatchStream()
    patches = np.concatenate([cut.push(frames[:100]), cut.push(frames[100:]), cut.finish()])
    assert patches.shape == (3, F.PATCH_FRAMES, F.N_MELS)
    assert [p[0, 0] for p in patches] == [0, F.PATCH_FRAMES, 2 * F.PATCH_FRAMES]


def test_patch_hop_gives_overlapping_patches():
    frames = np.zeros((2 * F.PATCH_FRAMES, F.N_MELS), np.float32)
    assert F.PatchStream(hop_frames=93).push(frames).shape[0] == 1 + (2 * F.PATCH_FRAMES - F.PATCH_FRAMES) // 93


def test_short_clip_is_repeat_padded_to_one_patch():
    wave = np.random.default_rng(2).standard_normal(F.SAMPLE_RATE).astype(np.float32)  # 1 s
    result = F.patches_from_chunks([wave])
    assert result.patches.shape == (1, F.PATCH_FRAMES, F.N_MELS)
    n = 1 + len(wave) // F.HOP_LENGTH
    assert np.array_equal(result.patches[0, n : 2 * n], result.patches[0, :n])  # tiled, not zero


def test_loud_audio_does_not_overflow():
    """The original float16 cast overflowed on loud input; float32 stays finite."""
    loud = np.full(F.SAMPLE_RATE * 4, 30.0, np.float32)
    assert np.isfinite(F.patches(loud)).all()


def test_frontend_constants_are_consistent():
    c = F.frontend_constants()
    assert c["patch_frames"] * c["hop_length"] / c["sample_rate"] == pytest.approx(F.PATCH_SECONDS)
    assert pytest.approx(2.992) == F.PATCH_SECONDS


def test_log_expand_gives_back_the_power_log_compress_was_given():
    power = np.concatenate([[0.0], np.geomspace(1e-8, 1e3, 50)]).astype(np.float32)
    np.testing.assert_allclose(F.log_expand(F.log_compress(power)), power, rtol=1e-4, atol=1e-10)


def test_log_mel_max_bounds_the_loudest_signals():
    """Full-scale square waves and clipped noise (the most energy a [-1, 1] signal can put in a
    band) stay under the bound the inference form relies on, and come within a few units of it."""
    t = np.arange(F.SAMPLE_RATE) / F.SAMPLE_RATE
    loud = [np.sign(np.sin(2 * np.pi * f * t)) for f in (62.5, 440.0, 3000.0)]
    loud.append(np.clip(np.random.default_rng(0).normal(0, 10, len(t)), -1, 1))
    peak = max(float(F.log_mel(s.astype(np.float32)).max()) for s in loud)
    assert F.log_mel_max() - 2 < peak <= F.log_mel_max()


def test_the_filterbank_applied_by_blocks_of_bands_equals_the_whole_product():
    import torch

    window, fbank = F._mel_basis()
    blocks = F._mel_blocks()
    # Every non-zero filter weight lies in the bins its block spans.
    covered = torch.zeros_like(fbank, dtype=torch.bool)
    for i, (bins, filters) in enumerate(blocks):
        covered[bins, i * F._MEL_BLOCK : i * F._MEL_BLOCK + filters.shape[1]] = True
        assert bins.stop - bins.start < fbank.shape[0] // 2  # a block spans a part of the bins, not all
    assert not (fbank.ne(0) & ~covered).any()
    samples = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, 999 * F.HOP_LENGTH + F.N_FFT).astype(np.float32))
    spec = torch.fft.rfft(samples.unfold(0, F.N_FFT, F.HOP_LENGTH) * window)
    whole = (spec.abs() ** 2) @ fbank
    np.testing.assert_allclose(F._power_mel(samples).numpy(), whole.numpy(), rtol=1e-4, atol=1e-6 * float(whole.max()))

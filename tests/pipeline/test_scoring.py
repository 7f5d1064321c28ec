"""Guard for every speed-up of the serving path: scores stay within 1e-4 of a plain computation.

The served path decodes in a streaming way, buffers decoder chunks before the spectrogram,
runs onnxruntime one patch at a time (in process, or in Triton's CPU model behind its dynamic
batcher). The reference decodes the whole signal, computes one spectrogram over it with
torchaudio's own centre padding, and runs the eager PyTorch checkpoint on all patches at once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio

from conftest import REPO
from pipeline import audio
from pipeline import features as F
from pipeline.scoring import OnnxScorer, TritonScorer
from pipeline.stack import EmbeddedStack
from pipeline.tagging import analyse
from training.models import load_checkpoint

TOLERANCE = 1e-4  # the bound on what an optimisation may change in any score
MODEL = "musicnn_msd"


def reference_patches(data: bytes) -> np.ndarray:
    """[n, PATCH_FRAMES, N_MELS]: the whole signal, one spectrogram call, a plain reshape."""
    wave, _ = audio.decode_all(data, max_duration_s=3600)
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=F.SAMPLE_RATE, n_fft=F.N_FFT, hop_length=F.HOP_LENGTH, n_mels=F.N_MELS,
        f_min=0.0, f_max=F.SAMPLE_RATE / 2, power=2.0, center=True, pad_mode="constant", norm="slaney", mel_scale="slaney",
    )
    with torch.inference_mode():
        mel = transform(torch.from_numpy(wave)).T.numpy()
    logmel = np.log10(1 + F.LOG_SCALE * mel).astype(np.float32)
    n = len(logmel) // F.PATCH_FRAMES
    return logmel[: n * F.PATCH_FRAMES].reshape(n, F.PATCH_FRAMES, F.N_MELS)


def reference_scores(patches: np.ndarray) -> np.ndarray:
    model, _ = load_checkpoint(REPO / "training" / "weights" / f"{MODEL}.pt")
    with torch.inference_mode():
        return torch.sigmoid(model(torch.from_numpy(patches))[0]).numpy()


@pytest.fixture(scope="module")
def clips(example_clips):
    """(served patches, reference scores) per real clip."""
    out = []
    for clip in example_clips:
        data = clip.read_bytes()
        served = analyse(data, max_duration_s=3600, min_duration_s=1).patches.patches
        ref = reference_patches(data)
        assert served.shape == ref.shape
        assert np.abs(served - ref).max() < 1e-3  # float32 rounding of differently sized STFT blocks
        out.append((served, reference_scores(ref)))
    return out


def test_in_process_scores_equal_the_reference(clips):
    scorer = OnnxScorer(REPO / "triton_models", MODEL)  # the defaults the worker uses
    for served, expected in clips:
        assert np.abs(scorer.score_sync(served) - expected).max() <= TOLERANCE


@pytest.mark.integration
async def test_triton_cpu_model_scores_equal_the_reference(clips, tmp_path):
    with EmbeddedStack(model_repository=REPO / "triton_models", log_dir=tmp_path, models=[MODEL]) as stack:
        scorer = await TritonScorer.connect(stack.triton_grpc_url, MODEL)
        try:
            # All clips at once: the request is split and batched across tracks by the server.
            together = await scorer.score(np.concatenate([served for served, _ in clips]))
        finally:
            await scorer.close()
    expected = np.concatenate([e for _, e in clips])
    assert np.abs(together - expected).max() <= TOLERANCE

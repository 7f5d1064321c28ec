"""Guard for every speed-up of the serving path: scores stay within 1e-4 of a plain computation.

The served path decodes in a streaming way, buffers decoder chunks before the spectrogram,
runs onnxruntime one patch at a time (in process, or in Triton's CPU model behind its dynamic
batcher), and runs both networks in one graph (``musicnn``). The reference decodes the whole
signal, computes one spectrogram over it with torchaudio's own centre padding, and runs each
network's eager PyTorch checkpoint alone on all patches at once.
"""

from __future__ import annotations

import time
import urllib.request
from multiprocessing import shared_memory

import numpy as np
import pytest
import torch
import torchaudio
from support import REPO

from devstack import EmbeddedStack
from pipeline.stages import audio
from pipeline.stages import frontend as F
from pipeline.stages.analysis import analyse
from pipeline.stages.scoring import OnnxScorer, TritonScorer
from training.models import load_checkpoint

TOLERANCE = 1e-4  # the bound on what an optimisation may change in any score
NETWORKS = ("musicnn_msd", "musicnn_mtt")
MODELS = ("musicnn", *NETWORKS)  # the two-network model, and each network served alone


def reference_patches(data: bytes) -> np.ndarray:
    """[n, PATCH_FRAMES, N_MELS]: the whole signal, one spectrogram call, a plain reshape."""
    wave, _ = audio.decode_all(data, max_duration_s=3600)
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=F.SAMPLE_RATE,
        n_fft=F.N_FFT,
        hop_length=F.HOP_LENGTH,
        n_mels=F.N_MELS,
        f_min=0.0,
        f_max=F.SAMPLE_RATE / 2,
        power=2.0,
        center=True,
        pad_mode="constant",
        norm="slaney",
        mel_scale="slaney",
    )
    with torch.inference_mode():
        mel = transform(torch.from_numpy(wave)).T.numpy()
    logmel = np.log10(1 + F.LOG_SCALE * mel).astype(np.float32)
    n = len(logmel) // F.PATCH_FRAMES
    return logmel[: n * F.PATCH_FRAMES].reshape(n, F.PATCH_FRAMES, F.N_MELS)


def reference_outputs(patches: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """network -> (scores, embedding) of its checkpoint alone, eager PyTorch."""
    out = {}
    for network in NETWORKS:
        model, _ = load_checkpoint(REPO / "training" / "weights" / f"{network}.pt")
        with torch.inference_mode():
            logits, embedding = model(torch.from_numpy(patches))
        out[network] = (torch.sigmoid(logits).numpy(), embedding.numpy())
    return out


def max_diff(outputs, expected) -> float:
    """Largest |delta| over every network's scores and embedding the outputs hold."""
    return max(
        max(np.abs(out.scores - expected[name][0]).max(), np.abs(out.embedding - expected[name][1]).max())
        for name, out in outputs.items()
    )


@pytest.fixture(scope="module")
def clips(example_clips):
    """(served patches, reference outputs) per real clip."""
    out = []
    for clip in example_clips:
        data = clip.read_bytes()
        served = analyse(data, max_duration_s=3600, min_duration_s=1).patches.patches
        ref = reference_patches(data)
        assert served.shape == ref.shape
        assert np.abs(served - ref).max() < 1e-3  # float32 rounding of differently sized STFT blocks
        out.append((served, reference_outputs(ref)))
    return out


@pytest.mark.parametrize("model", MODELS)
def test_in_process_scores_equal_the_reference(clips, model):
    scorer = OnnxScorer(REPO / "triton_models", model)  # the defaults the worker uses
    for served, expected in clips:
        outputs = scorer.score_sync(served)
        assert set(outputs) == ({model} if model in NETWORKS else set(NETWORKS))
        assert max_diff(outputs, expected) <= TOLERANCE


def _requests_served(metrics_url: str, model: str) -> float:
    """Triton's count of successful requests to ``model``, once it stopped moving: the server
    counts a request after the client already has its answer, so a loaded machine reads a
    count that is still behind (seen once in CI: the same count before and after a request)."""
    previous, deadline = None, time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        lines = [
            line
            for line in text.splitlines()
            if line.startswith("nv_inference_request_success{") and f'model="{model}"' in line
        ]
        count = sum(float(line.rsplit(" ", 1)[1]) for line in lines)
        if count == previous or time.monotonic() > deadline:
            return count
        previous = count
        time.sleep(1.0)


@pytest.mark.integration
async def test_triton_cpu_model_scores_equal_the_reference_with_one_request_per_batch(clips, tmp_path):
    with EmbeddedStack(model_repository=REPO / "triton_models", log_dir=tmp_path, models=list(MODELS)) as stack:
        for model in MODELS:
            scorer = await TritonScorer.connect(stack.triton_grpc_url, model)
            try:
                # All clips at once: the request is split and batched across tracks by the server.
                together = await scorer.score(np.concatenate([served for served, _ in clips]))
                expected = {n: tuple(np.concatenate([e[n][i] for _, e in clips]) for i in (0, 1)) for n in clips[0][1]}
                assert max_diff(together, expected) <= TOLERANCE
                if model == "musicnn":
                    # One request carries a batch of patches once and brings both networks back.
                    before = _requests_served(stack.triton_metrics_url, model)
                    batch = clips[0][0][: scorer.max_batch]
                    one = await scorer.score(batch)
                    deadline = time.monotonic() + 10
                    while _requests_served(stack.triton_metrics_url, model) == before and time.monotonic() < deadline:
                        time.sleep(0.5)
                    assert _requests_served(stack.triton_metrics_url, model) - before == 1
                    assert set(one) == set(NETWORKS) and all(len(o.scores) == len(batch) for o in one.values())
            finally:
                await scorer.close()


@pytest.mark.integration
async def test_triton_reads_patches_from_shared_memory_and_falls_back_when_it_cannot(clips, tmp_path):
    served, expected = clips[0]
    block = shared_memory.SharedMemory(create=True, size=served.nbytes)
    try:
        np.ndarray(served.shape, np.float32, buffer=block.buf)[...] = served
        with EmbeddedStack(model_repository=REPO / "triton_models", log_dir=tmp_path, models=["musicnn"]) as stack:
            scorer = await TritonScorer.connect(stack.triton_grpc_url, "musicnn", max_patches=4)
            try:
                # The server reads the block: the array handed over only gives the shape.
                outputs = await scorer.score(np.zeros_like(served), shm_key="/" + block.name)
                assert max_diff(outputs, expected) <= TOLERANCE and scorer.shared_memory
                assert len(served) > scorer.max_batch  # several requests, each at its offset
                status = await scorer._client.get_system_shared_memory_status(as_json=True)
                assert not status.get("regions")  # unregistered once scored
                # A block the server cannot open (as on another host): the requests carry the
                # patches, from now on.
                outputs = await scorer.score(served, shm_key="/moodstream-no-such-block")
                assert max_diff(outputs, expected) <= TOLERANCE and not scorer.shared_memory
            finally:
                await scorer.close()
    finally:
        block.close()
        block.unlink()


STUDENT = "musicnn_student"  # the distilled CPU tier (training/distill.py), same outputs as musicnn


@pytest.mark.integration
async def test_the_student_serves_through_triton_as_in_process_with_calibrated_moods(clips, tmp_path):
    from pipeline.stages.taxonomy import load_taxonomy, mood_view

    local = OnnxScorer(REPO / "triton_models", STUDENT)
    taxonomy = load_taxonomy(local.meta)  # fails unless the student carries its own calibration
    with EmbeddedStack(model_repository=REPO / "triton_models", log_dir=tmp_path, models=[STUDENT]) as stack:
        scorer = await TritonScorer.connect(stack.triton_grpc_url, STUDENT)
        try:
            shared = []
            for served, expected in clips:
                remote = await scorer.score(served)
                assert set(remote) == set(NETWORKS) and scorer.meta.served_version == local.meta.served_version
                assert (
                    max_diff(remote, {n: (o.scores, o.embedding) for n, o in local.score_sync(served).items()})
                    <= TOLERANCE
                )
                # It imitates the teacher: of the teacher's top-5 tags of a clip, at least 3 are
                # in its own top 5, 4 on average (4.4 on held-out music, docs/training.md; the clips come
                # from a held-out package; a ranking that knew nothing of the teacher would
                # share 0.5 of 50 tags).
                for network in NETWORKS:
                    mine = set(np.argsort(-remote[network].scores.mean(axis=0))[:5])
                    teacher = set(np.argsort(-expected[network][0].mean(axis=0))[:5])
                    shared.append(len(mine & teacher))
                    assert shared[-1] >= 3, network
                view = mood_view(taxonomy, {n: o.scores.mean(axis=0) for n, o in remote.items()})
                assert taxonomy.source == "tags" and view.leading_mood["mood"] in view.moods
            assert np.mean(shared) >= 4, shared
        finally:
            await scorer.close()

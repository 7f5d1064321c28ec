"""The PyTorch port of musicnn against the original TensorFlow graph's outputs.

The fixture (tests/fixtures/musicnn_parity.npz) was written by ``moodstream-train
import-musicnn``: patches of real music and what the original graph, restored from musicnn's
checkpoints, computed for them. TensorFlow is not needed to run this test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.stages.frontend import log_mel_max
from training.models import build, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "musicnn_parity.npz"


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as f:
        return dict(f)


@pytest.mark.parametrize("name", ["musicnn_msd", "musicnn_mtt"])
def test_port_matches_the_original_graph_per_tag(fixture, name):
    model, meta = load_checkpoint(REPO / "training" / "weights" / f"{name}.pt")
    with torch.inference_mode():
        logits, embedding = model(torch.from_numpy(fixture["patches"]))
    probs = torch.sigmoid(logits).numpy()
    assert probs.shape == fixture[f"{name}/probs"].shape == (len(fixture["patches"]), 50)
    assert np.abs(probs - fixture[f"{name}/probs"]).max() <= 1e-4
    assert np.abs(embedding.numpy() - fixture[f"{name}/embedding"]).max() <= 1e-3
    assert len(meta["labels"]) == 50 and meta["task"] == "tags"


@pytest.mark.parametrize("name", ["musicnn_msd", "musicnn_mtt"])
def test_inference_form_computes_the_same_function(fixture, name):
    """``for_serving`` pools before ReLU and batch norm and flips the convolutions of the
    channels whose batch-norm scale is negative (both networks have such channels)."""
    model, _ = load_checkpoint(REPO / "training" / "weights" / f"{name}.pt")
    served = model.for_serving(log_mel_max())
    assert any((branch.sign < 0).any() for branch in served.frontend)
    assert any(branch.dead_value.shape[1] for branch in served.frontend)  # constant channels too
    patches = torch.from_numpy(fixture["patches"])
    with torch.inference_mode():
        for x in (patches, patches[:1, :50]):  # the trained length, and a short patch
            (want_logits, want_embedding), (logits, embedding) = model(x), served(x)
            assert (logits - want_logits).abs().max() <= 1e-4
            assert (embedding - want_embedding).abs().max() <= 1e-4
    assert model.frontend[0].conv.weight.shape[0] == 204  # the trained network is left as it was


def test_the_inference_form_convolves_only_the_filters_the_input_can_move(fixture):
    """The MSD network's weights are zero in most of its filters: those channels are the
    constant a * relu(bias) + c, exactly, for every input the frontend can give (the extremes
    included), and the served form convolves 23, 14, 3, 7 and 17 filters of 204, 204, 51, 51, 51."""
    model, _ = load_checkpoint(REPO / "training" / "weights" / "musicnn_msd.pt")
    served = model.for_serving(log_mel_max())
    assert [branch.channels for branch in served.frontend] == [23, 14, 3, 7, 17]
    extremes = torch.stack(
        [torch.zeros(187, 96), torch.full((187, 96), log_mel_max()), torch.from_numpy(fixture["patches"][0])]
    )
    with torch.inference_mode():
        (want, _), (got, _) = model(extremes), served(extremes)
    assert (got - want).abs().max() <= 1e-4


def test_checkpoint_rebuilds_itself_from_stored_dims():
    _, meta = load_checkpoint(REPO / "training" / "weights" / "musicnn_mtt.pt")
    model = build(meta["arch"], meta["dims"])
    assert model.dims.timbral_filters == 204 and model.dims.temporal_lengths == (128, 64, 32)
    n_params = sum(p.numel() for p in model.parameters())
    assert 700_000 < n_params < 900_000


def test_forward_accepts_any_number_of_frames():
    model = build("musicnn").eval()
    with torch.inference_mode():
        logits, embedding = model(torch.randn(2, 50, 96))
    assert logits.shape == (2, 50) and embedding.shape == (2, 200)

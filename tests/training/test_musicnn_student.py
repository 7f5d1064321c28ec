"""musicnn_student: the teacher's networks pruned and factorised, the CPU tier's student."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.models import build, load_checkpoint, save_checkpoint
from training.models.musicnn_student import freeze_filters, load_teachers

REPO = Path(__file__).resolve().parents[2]
FULL = [204, 204, 51, 51, 51]


@pytest.fixture(scope="module")
def teachers():
    return [load_checkpoint(REPO / "training" / "weights" / f"{name}.pt")[0] for name in ("musicnn_msd", "musicnn_mtt")]


@pytest.fixture(scope="module")
def patches():
    with np.load(REPO / "tests" / "fixtures" / "musicnn_parity.npz") as f:
        return torch.from_numpy(f["patches"])  # real music, [6, 187, 96]


def _teacher_outputs(teachers, x):
    with torch.inference_mode():
        outs = [t(x) for t in teachers]
    return torch.cat([o[0] for o in outs], dim=1), torch.cat([o[1] for o in outs], dim=1)


def test_with_every_filter_kept_it_is_the_teachers_function(teachers, patches):
    model = load_teachers(build("musicnn_student", {}), teachers, patches)
    want_logits, want_embedding = _teacher_outputs(teachers, patches)
    with torch.inference_mode():
        logits, embedding = model(patches)
    assert logits.shape == (6, 100) and embedding.shape == (6, 400)
    assert (logits - want_logits).abs().max() < 1e-4 and (embedding - want_embedding).abs().max() < 1e-4


def test_a_factorisation_of_full_rank_is_exact_and_a_low_one_is_not(teachers, patches):
    """A rank covering the filters' own (7 x 38 = 266 weights, 51 filters) loses nothing; a
    rank of 4 for the timbral filters approximates them."""
    want, _ = _teacher_outputs(teachers, patches)
    exact = load_teachers(build("musicnn_student", {"ranks": [[204, 204, 51, 51, 32]] * 2}), teachers, patches)
    rough = load_teachers(build("musicnn_student", {"ranks": [[4, 4, 0, 0, 0]] * 2}), teachers, patches)
    with torch.inference_mode():
        assert (exact(patches)[0] - want).abs().max() < 1e-3
        assert (rough(patches)[0] - want).abs().max() > 0.1


def test_pruned_filters_become_constants_folded_downstream(teachers, patches):
    """musicnn leaves most of its filters nearly silent on music: the MSD network keeps its
    scores with 48 of its 408 timbral filters (one patch kept aside from the sample)."""
    dims = {"channels": [[32, 16, 16, 16, 32], FULL]}
    model = load_teachers(build("musicnn_student", dims), teachers, patches[:5])
    want, _ = _teacher_outputs(teachers, patches)
    with torch.inference_mode():
        logits, _ = model(patches)
    assert model.nets[0].frontend[0].mix.weight.shape[0] == 32
    assert model.nets[0].midend[0].conv.weight.shape[1] == 112
    assert (torch.sigmoid(logits[:, :50]) - torch.sigmoid(want[:, :50])).abs().max() < 0.05
    assert (logits[:, 50:] - want[:, 50:]).abs().max() < 1e-4  # the MTT network as it was


def test_strided_filters_see_every_other_frame_and_band_and_keep_the_frames(teachers, patches):
    dims = {"channels": [[16, 16, 16, 16, 16], FULL], "frontend_stride": [2, 2]}
    strided = load_teachers(build("musicnn_student", dims), teachers, patches)
    exact = load_teachers(build("musicnn_student", {**dims, "frontend_stride": [1, 1]}), teachers, patches)
    want, _ = _teacher_outputs(teachers, patches)
    with torch.inference_mode():
        x = strided.nets[1].input_affine(patches.unsqueeze(1))
        branch = strided.nets[1].frontend[0]
        assert branch(x).shape == (6, 204, 187) and branch.mix(F.pad(x, (0, 0, 3, 3))).shape == (
            6,
            204,
            94,
            30,
        )  # of 187 frames, 59 bands
        close = (torch.sigmoid(exact(patches)[0]) - torch.sigmoid(want)).abs().mean()
        rough = (torch.sigmoid(strided(patches)[0]) - torch.sigmoid(want)).abs().mean()
    assert close < rough < 0.1  # an approximation of the teacher, before any training
    with pytest.raises(ValueError, match="frontend_stride"):
        build("musicnn_student", {"frontend_stride": [0, 2]})


def test_frozen_filters_take_no_gradient_and_the_rest_trains(teachers, patches):
    model = load_teachers(
        build("musicnn_student", {"channels": [[8, 8, 4, 4, 4]] * 2, "ranks": [[4, 0, 0, 0, 0]] * 2}), teachers, patches
    )
    freeze_filters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    logits, embedding = model(patches)
    (logits.square().mean() + embedding.square().mean()).backward()
    optimizer.step()
    after = model.state_dict()
    frozen = [k for k in after if ".mix." in k or ".basis." in k or "input_affine" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["nets.1.dense.weight"], after["nets.1.dense.weight"])
    assert not torch.equal(before["nets.0.frontend.0.affine.scale"], after["nets.0.frontend.0.affine.scale"])


def test_a_checkpoint_rebuilds_itself_from_its_dims(teachers, patches, tmp_path):
    dims = {"channels": [[16, 16, 16, 16, 16], [48, 32, 16, 16, 16]], "ranks": [[0, 0, 8, 0, 0], [0, 16, 0, 0, 0]]}
    model = load_teachers(build("musicnn_student", dims), teachers, patches)
    save_checkpoint(
        tmp_path / "lite.pt",
        model,
        arch="musicnn_student",
        labels=[f"t{i}" for i in range(100)],
        version="v",
        source="test",
    )
    again, ckpt = load_checkpoint(tmp_path / "lite.pt")
    assert ckpt["dims"]["channels"] == ((16, 16, 16, 16, 16), (48, 32, 16, 16, 16))
    with torch.inference_mode():
        assert torch.equal(again(patches)[0], model(patches)[0])


def test_bad_dims_are_refused(teachers, patches):
    with pytest.raises(ValueError, match="within"):
        build("musicnn_student", {"channels": [[300, 16, 16, 16, 16], FULL]})
    with pytest.raises(ValueError, match="one entry per front-end branch"):
        build("musicnn_student", {"channels": [[16, 16], FULL]})
    with pytest.raises(ValueError, match="one entry per imitated network"):
        build("musicnn_student", {"channels": [FULL]})
    with pytest.raises(ValueError, match="teacher networks"):
        load_teachers(build("musicnn_student", {}), teachers[:1], patches)

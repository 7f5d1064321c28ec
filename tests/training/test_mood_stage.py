"""The mood stage: the student learns the teacher's family scores on whole tracks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_distill import _distill_args
from torch import nn

from pipeline.contracts.model_meta import label_columns, read_meta
from pipeline.settings import DEFAULT_MODEL_REPOSITORY
from pipeline.stages.frontend import N_MELS, PATCH_FRAMES
from pipeline.stages.scoring import OnnxScorer
from pipeline.stages.taxonomy import cdf, family_scores, load_taxonomy
from training.cli import main
from training.config import from_dict
from training.distill.agreement import by_network
from training.distill.mood_stage import FamilyScores, TrackTarget, mood_loss, torch_cdf, tune_moods
from training.engine import DistillLoss
from training.models import load_checkpoint


@pytest.fixture(scope="module")
def served():
    meta = read_meta(DEFAULT_MODEL_REPOSITORY, "musicnn")
    return meta, load_taxonomy(meta)


def _mood_columns(meta, taxonomy) -> dict[int, str]:
    """Column (all networks' scores side by side) -> calibration key of each mood tag."""
    columns = label_columns(meta.networks)
    return {columns[m.network].start + m.column: m.key for f in taxonomy.families for m in f.members}


def test_torch_cdf_is_the_taxonomys_off_ties():
    quantiles = np.array([0.0, 0.0, 0.0, 0.1, 0.2, 0.2, 0.5, 0.9])
    x = np.array([-1.0, 0.01, 0.05, 0.1, 0.15, 0.3, 0.7, 0.9 - 1e-9, 1.0, 2.0])
    np.testing.assert_allclose(
        torch_cdf(torch.tensor(quantiles), torch.tensor(x)).numpy(), cdf(quantiles, x), atol=1e-12
    )


def test_family_scores_in_torch_are_the_taxonomys_and_have_gradients(served):
    meta, taxonomy = served
    n_labels = sum(len(n.labels) for n in meta.networks)
    x = np.random.default_rng(0).beta(0.4, 3.0, size=(500, n_labels))  # below, inside and above the curves
    scores = torch.tensor(x, requires_grad=True)
    out = FamilyScores(taxonomy, meta.networks)(scores)
    np.testing.assert_allclose(out.detach().numpy(), family_scores(taxonomy, by_network(x, meta)), atol=1e-12)
    out.sum().backward()
    moved = set(np.flatnonzero(scores.grad.abs().sum(dim=0).numpy()))
    assert moved == set(_mood_columns(meta, taxonomy))  # every mood tag steers its family, no other tag does


def test_the_mood_loss_weighs_the_order_at_the_top_most():
    teacher = torch.tensor([0.60, 0.58, 0.30, 0.10], dtype=torch.float64)
    assert mood_loss(teacher, teacher, 0.05) == pytest.approx(0.0, abs=1e-12)
    swapped_top = torch.tensor([0.58, 0.60, 0.30, 0.10], dtype=torch.float64)
    low_off = torch.tensor([0.60, 0.58, 0.30, 0.14], dtype=torch.float64)  # twice the error, far below
    assert mood_loss(swapped_top, teacher, 0.05) > 10 * mood_loss(low_off, teacher, 0.05)


class _Toy(nn.Module):
    """(logits [B, n_labels], embedding [B, 8]) from a patch's mean mel, through batch norm and
    a bottleneck of 4 (a student that cannot match every output of the teacher's)."""

    def __init__(self, n_labels: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.BatchNorm1d(N_MELS)
        self.bottleneck = nn.Linear(N_MELS, 4)
        self.head = nn.Linear(4, n_labels + 8)
        with torch.no_grad():  # scores of a few hundredths, as musicnn's
            self.head.bias.fill_(-3.0)
        self.n_labels = n_labels

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.bottleneck(self.norm(mel.mean(dim=1))))
        return out[:, : self.n_labels], out[:, self.n_labels :]


def test_tune_moods_brings_the_students_leading_moods_to_the_teachers_and_keeps_batch_norm(served):
    meta, taxonomy = served
    n_labels = sum(len(n.labels) for n in meta.networks)
    families = FamilyScores(taxonomy, meta.networks)
    curves = {column: taxonomy.calibration.tags[key] for column, key in _mood_columns(meta, taxonomy).items()}
    rng = np.random.default_rng(0)
    tracks, targets = [], []
    for _ in range(24):
        # a teacher that puts each mood tag of a track at its own share of the reference music,
        # on a track whose mels the student can tell apart from the others'
        scores = rng.uniform(0.01, 0.2, n_labels)
        for column, curve in curves.items():
            scores[column] = np.interp(rng.uniform(0.05, 0.95), np.linspace(0, 1, len(curve)), curve)
        target = torch.from_numpy(
            np.concatenate([np.log(scores / (1 - scores)), rng.normal(0, 1, 8)]).astype(np.float32)
        ).repeat(3, 1)
        mel = torch.from_numpy(rng.normal(rng.normal(0, 1, N_MELS), 0.3, (3, PATCH_FRAMES, N_MELS)).astype(np.float32))
        targets.append(target)
        tracks.append(TrackTarget(lambda mel=mel: mel, target, families(torch.from_numpy(scores))))
    assert len({int(t.families.argmax()) for t in tracks}) >= 4  # the leaders differ
    loss = DistillLoss(torch.cat(targets).numpy(), n_labels, 0.5)

    def leading_same(student: nn.Module) -> float:
        with torch.no_grad():
            return float(
                np.mean(
                    [
                        int(
                            families(torch.sigmoid(student(t.patches())[0]).mean(dim=0)).argmax() == t.families.argmax()
                        )
                        for t in tracks
                    ]
                )
            )

    def stage(weight: float) -> tuple[nn.Module, list[dict[str, float]]]:
        student, figures = _Toy(n_labels, 1), []
        tune_moods(
            student,
            tracks,
            loss,
            families,
            epochs=20,
            lr=0.05,
            weight=weight,
            temperature=0.05,
            tracks_per_step=4,
            weight_decay=0.0,
            grad_clip=5.0,
            seed=0,
            progress=False,
            on_epoch=lambda e, f: figures.append(f),
        )
        return student, figures

    assert leading_same(_Toy(n_labels, 1)) < 0.5
    student, figures = stage(1.0)
    assert len(figures) == 20 and leading_same(student) >= 0.7
    # the mood term does what the patch loss alone does not: the families' order, where the
    # student has to choose what to get right
    patch_only, patch_figures = stage(0.0)
    assert leading_same(patch_only) < 0.5 and figures[-1]["mood_loss"] < 0.3 * patch_figures[-1]["mood_loss"]
    # a batch of one track's patches never replaces the statistics the main loop learnt
    assert torch.equal(student.norm.running_mean, _Toy(n_labels, 1).norm.running_mean)


def test_the_mood_stage_options_are_checked():
    for bad in ({"mood_epochs": -1}, {"mood_temperature": 0}, {"mood_tracks_per_step": 0}, {"mood_lr": 0}):
        with pytest.raises(ValueError, match="the mood stage needs"):
            from_dict(bad)


def test_distill_with_a_mood_stage_exports_the_stages_model(unlabelled, mel_cache, repository, tmp_path):
    out = tmp_path / "student"
    assert (
        main(
            _distill_args(
                unlabelled,
                repository,
                out,
                "separable_student",
                mel_cache,
                mood_epochs=2,
                mood_lr=0.01,
                mood_tracks_per_step=2,
                version="",
            )
        )
        == 0
    )
    report = json.loads((out / "distill_report.json").read_text())
    assert [f["epoch"] for f in report["mood_stage"]] == [0, 1]
    assert all(np.isfinite(f[k]) for f in report["mood_stage"] for k in ("patch_loss", "mood_loss", "leading_same"))
    assert report["student"]["checkpoint"] == str(out / "mood.pt")
    stage, ckpt = load_checkpoint(out / "mood.pt")
    main_loop, _ = load_checkpoint(out / "best.pt")
    assert ckpt["mood_stage"] == report["mood_stage"]
    assert any(not torch.equal(a, b) for a, b in zip(stage.state_dict().values(), main_loop.state_dict().values()))
    # new weights, a new version: the served one is the stage's
    assert ckpt["version"] == torch.load(out / "best.pt", map_location="cpu", weights_only=False)["version"] + "-mood"
    assert {n.version for n in read_meta(repository, "musicnn_student").networks} == {ckpt["version"]}
    # the served graph is the stage's model
    x = np.random.default_rng(1).random((2, PATCH_FRAMES, N_MELS), np.float32)
    with torch.inference_mode():
        logits, _ = stage(torch.from_numpy(x))
    served = OnnxScorer(repository, "musicnn_student").score_sync(x)
    np.testing.assert_allclose(served["musicnn_msd"].scores, torch.sigmoid(logits[:, :50]).numpy(), atol=1e-5)

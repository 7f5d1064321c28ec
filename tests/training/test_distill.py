"""Distillation: a student learns the pretrained musicnn's scores on unlabelled audio."""

from __future__ import annotations

import json

import numpy as np
from conftest import TINY_DIMS

from pipeline.model_meta import read_meta
from pipeline.scoring import OnnxScorer
from pipeline.settings import REPO_ROOT
from training.cli import main
from training.distill import compare
from training.models import load_checkpoint

TEACHER = REPO_ROOT / "training" / "weights" / "musicnn_msd.pt"


def test_distill_trains_a_servable_student_and_reports_agreement(unlabelled, mel_cache, tmp_path):
    out = tmp_path / "student"
    args = ["distill", str(unlabelled), "--holdout", "0.3", "--set", "arch=convgruformer", "--set", "val_fraction=0.2", "--set", "epochs=2", "--set", "batch_size=8", "--set", f"cache_dir={mel_cache}", "--set", f"out_dir={out}", "--set", "progress=false", "--set", "name=student"]
    args += [a for k, v in TINY_DIMS["convgruformer"].items() for a in ("--set", f"dims.{k}={json.dumps(v)}")]
    assert main(args) == 0
    report = json.loads((out / "distill_report.json").read_text())
    assert report["tracks"] == {"train": 5, "validation": 2, "test": 3}
    assert report["patches"]["held_out"] >= 3 and report["epochs_run"] == 2
    for key in ("roc_auc_median", "roc_auc_top5", "pearson_r", "top5_overlap"):
        assert np.isfinite(report["held_out"][key]), key
    model, ckpt = load_checkpoint(out / "best.pt")
    _, teacher = load_checkpoint(TEACHER)
    assert ckpt["task"] == "tags" and ckpt["labels"] == teacher["labels"]

    repo = tmp_path / "models"
    assert main(["export", str(out / "best.pt"), "--repository", str(repo)]) == 0
    meta = read_meta(repo, "student")
    assert meta.labels == tuple(teacher["labels"]) and meta.version == ckpt["version"]
    outputs = OnnxScorer(repo, "student").score_sync(np.random.default_rng(0).random((3, 187, 96), np.float32))
    assert outputs["student"].scores.shape == (3, 50)


def test_compare_is_perfect_for_the_teacher_itself_and_chance_for_noise():
    rng = np.random.default_rng(0)
    teacher = rng.random((400, 50)).astype(np.float32)
    track_of = np.repeat(np.arange(40), 10)
    same = compare(teacher, teacher, track_of)
    # top-5 membership also depends on the other tags of the patch, so even the teacher is not
    # a perfect per-tag ranker of it
    assert same["roc_auc_median"] == 1.0 and same["top5_overlap"] == 1.0 and same["roc_auc_top5"] > 0.95
    assert abs(same["pearson_r"] - 1.0) < 1e-6
    noise = compare(rng.random((400, 50)).astype(np.float32), teacher, track_of)
    assert 0.4 < noise["roc_auc_median"] < 0.6 and abs(noise["pearson_r"]) < 0.1 and noise["top5_overlap"] < 0.3

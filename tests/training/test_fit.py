"""fit -> evaluate -> export -> served, for every architecture on the data set layout it was
designed for; plus resume, early stopping, seeding, config files and overrides."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_dims import TINY_DIMS

from pipeline.contracts import events
from pipeline.contracts.model_meta import read_meta
from pipeline.stages.analysis import analyse, describe
from pipeline.stages.frontend import N_MELS, PATCH_FRAMES
from pipeline.stages.scoring import OnnxScorer
from pipeline.stages.taxonomy import load_taxonomy
from training.cli import main
from training.config import FitConfig, from_dict, load_config
from training.engine import _scheduler, cosine_factor, make_loss, mixup, spec_augment
from training.evaluate import evaluate
from training.export import export
from training.fit import fit
from training.models import load_checkpoint

# architecture -> (data option, fixture, expected task)
CASES = {
    "musicnn": ("jamendo", "jamendo", "tags"),
    "convgruformer": ("jamendo", "jamendo", "tags"),
    "resnet_va": ("deam", "deam", "va"),
    "lstm_va": ("deam_dynamic", "deam", "va_steps"),
    "resnet18": ("folders", "class_folders", "classes"),
}


def config(arch: str, root: Path, cache: Path, out: Path, **over) -> FitConfig:
    data = CASES[arch][0]
    values = dict(
        arch=arch,
        dims=TINY_DIMS[arch],
        data=data,
        data_root=str(root / "data") if data == "jamendo" else str(root),
        audio_root=str(root / "audio") if data == "jamendo" else "",
        val_fraction=0.25,
        test_fraction=0.25,
        cache_dir=str(cache),
        out_dir=str(out),
        epochs=2,
        batch_size=8,
        patches_per_track=2,
        progress=False,
        version="test-1",
    )
    return from_dict({**values, **over})


@pytest.mark.parametrize("arch", sorted(CASES))
def test_fit_evaluate_export_and_serve(arch, request, mel_cache, tmp_path):
    data, fixture, task = CASES[arch]
    root = request.getfixturevalue(fixture)
    cfg = config(arch, root, mel_cache, tmp_path / "run")
    best = fit(cfg)

    model, ckpt = load_checkpoint(best)
    assert ckpt["task"] == task and ckpt["arch"] == arch and ckpt["version"] == "test-1"
    assert ckpt["config"]["data"] == data and "optimizer" in ckpt and ckpt["epoch"] in (0, 1)
    assert (tmp_path / "run" / "last.pt").is_file()
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))

    report = evaluate(best, tmp_path / "eval")
    assert (tmp_path / "eval" / "report.png").stat().st_size > 1000
    assert json.loads((tmp_path / "eval" / "report.json").read_text()) == json.loads(json.dumps(report))
    metrics = report["metrics"]
    if task == "tags":
        numbers = [metrics["roc_auc_macro"], metrics["pr_auc_macro"], metrics["f1_macro"]]
        assert metrics["tags_evaluated"] >= 3
        assert set(metrics["binary_tasks"]) <= {"relaxing_vs_energetic", "happy_vs_sad"}
        assert "relaxing_vs_energetic" in metrics["binary_tasks"]
    elif task == "classes":
        numbers = [metrics["accuracy"], metrics["f1_macro"]]
        cm = np.array(metrics["confusion_matrix"])
        assert cm.shape == (4, 4) and cm.sum() == report["tracks"]["test"]
    else:
        numbers = [metrics[t][k] for t in ("valence", "arousal") for k in ("pearson_r", "r2", "rmse")]
    assert all(isinstance(x, float) for x in numbers) and all(np.isfinite(numbers[:2]) | (task in ("va", "va_steps")))

    repo = tmp_path / "models"
    exported = export(best, None, repo)
    assert exported.directory == repo / arch  # the run's name, else the architecture
    meta = read_meta(repo, arch)
    assert meta.task == task and meta.labels == tuple(ckpt["labels"]) and meta.version == "test-1"

    # The worker's path: decode a file, cut patches, score with onnxruntime, build the event.
    scorer = OnnxScorer(repo, arch)
    audio = next(p for p in sorted(Path(root).rglob("*")) if p.suffix in (".mp3", ".wav", ".flac"))
    analysis = analyse(audio.read_bytes(), max_duration_s=600, min_duration_s=1.0)
    outputs = scorer.score_sync(analysis.patches.patches)
    scores = outputs[arch].scores
    assert scores.shape == (len(analysis.patches.patches), len(meta.labels))
    assert scores.min() >= 0 and scores.max() <= 1
    with torch.inference_mode():
        eager = (
            torch.sigmoid(model(torch.from_numpy(analysis.patches.patches))[0])
            if task != "classes"
            else torch.softmax(model(torch.from_numpy(analysis.patches.patches))[0], -1)
        )
    np.testing.assert_allclose(scores, eager.numpy(), atol=1e-5)
    fields = describe(analysis, outputs, load_taxonomy(meta))
    record = events.TrackMoods(
        track_id="t1",
        model=events.ModelRef(meta.name, meta.served_version, ((arch, meta.version),)),
        processed_at=datetime.now(UTC),
        latency_ms={"total": 1.0},
        analysis=fields,
    )
    doc = json.loads(record.to_json())
    events.jsonschema.Draft202012Validator(events.load_schema("track_moods.v3")).validate(doc)
    assert (
        doc["model"]["name"] == arch
        and doc["model"]["version"] == "test-1"
        and set(doc["tags"][arch]) == set(meta.labels)
    )
    # A DEAM regressor or a 4-class quadrant network fills the mood plane itself.
    expected_source = {"va": "valence_arousal", "va_steps": "valence_arousal", "classes": "classes"}.get(task, "none")
    assert doc["mood_source"] == expected_source
    if expected_source != "none":
        assert doc["quadrant"] in ("happy", "angry", "sad", "relaxed") and doc["leading_mood"]["mood"] is not None


def test_resume_continues_the_same_run(class_folders, mel_cache, tmp_path):
    cfg = config("resnet18", class_folders, mel_cache, tmp_path / "run", epochs=1, version="")
    fit(cfg)
    first = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert first["epoch"] == 0
    assert main(["fit", "--resume", str(tmp_path / "run" / "last.pt"), "--set", "epochs=2"]) == 0
    second = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert second["epoch"] == 1 and second["version"] == first["version"] != ""
    assert second["config"]["epochs"] == 2 and second["config"]["resume"].endswith("last.pt")
    assert second["optimizer"]["state"]  # Adam moments carried over and updated
    assert any(not torch.equal(second["state_dict"][k], first["state_dict"][k]) for k in first["state_dict"])
    assert main(["evaluate", str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["epoch"] == 1 and report["version"] == first["version"]


def test_early_stopping_when_validation_does_not_improve(class_folders, mel_cache, tmp_path, capsys):
    # No loss on 4 classes can drop by 10 after the first epoch: epochs 1 and 2 are stale.
    cfg = config("resnet18", class_folders, mel_cache, tmp_path / "run", epochs=6, min_delta=10.0, early_stopping=2)
    fit(cfg)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert last["epoch"] == 2 and last["stale_epochs"] == 2
    assert "early stopping" in capsys.readouterr().out


def test_same_seed_same_weights(class_folders, mel_cache, tmp_path):
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        fit(config("resnet18", class_folders, mel_cache, tmp_path / name, epochs=1, seed=seed))
        runs.append(torch.load(tmp_path / name / "last.pt", weights_only=False)["state_dict"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("options", [{"init": "runs/x/best.pt"}, {"init": "runs/x/best.pt", "epochs": 0}])
def test_fit_refuses_distills_further_runs(class_folders, mel_cache, tmp_path, options):
    with pytest.raises(ValueError, match="init and epochs = 0 are distill's"):
        fit(config("resnet18", class_folders, mel_cache, tmp_path / "run", **options))
    assert not (tmp_path / "run").exists()


def test_config_file_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('arch = "convgruformer"\nepochs = 3\nlr = 1\n[dims]\nd_model = 32\n')
    cfg = load_config(toml, ["epochs=5", "dims.heads=8", "schedule=cosine", "time_shift=false"])
    assert (cfg.arch, cfg.epochs, cfg.lr, cfg.schedule, cfg.time_shift) == ("convgruformer", 5, 1.0, "cosine", False)
    assert cfg.dims == {"d_model": 32, "heads": 8}
    yml = tmp_path / "run.yaml"
    yml.write_text("data: deam\nbatch_size: 4\n")
    assert load_config(yml).batch_size == 4
    with pytest.raises(ValueError, match="unknown options"):
        load_config(None, ["epoch=3"])
    with pytest.raises(ValueError, match="must be int"):
        load_config(None, ["epochs=many"])
    # YAML 1.1 reads an exponent without a dot as a string; a float option takes it as the number
    assert (load_config(None, ["lr=5e-5"]).lr, load_config(None, ["mood_lr=1E-4"]).mood_lr) == (5e-5, 1e-4)
    with pytest.raises(ValueError, match="lr must be float"):
        load_config(None, ["lr=fast"])
    with pytest.raises(ValueError, match="data must be"):
        load_config(None, ["data=imagenet"])
    with pytest.raises(ValueError, match="unfreeze_epoch must be >= 0"):
        load_config(None, ["unfreeze_epoch=-1"])
    with pytest.raises(ValueError, match="add up to epochs"):
        load_config(None, ["epochs=12", "cosine_cycles=[10, 3]"])
    with pytest.raises(ValueError, match="restart_lr_factor"):
        load_config(None, ["restart_lr_factor=0"])


def test_cosine_cycles_restart_lower_and_anneal_to_zero():
    f = [cosine_factor(e, [4, 2], 0.5) for e in range(7)]
    np.testing.assert_allclose(
        f, [1, (1 + np.cos(np.pi / 4)) / 2, 0.5, (1 + np.cos(3 * np.pi / 4)) / 2, 0.5, 0.25, 0], atol=1e-12
    )


def test_a_finished_cosine_run_resumed_with_a_cycle_more_restarts_it():
    """The shape of a resumed run: the optimizer state of the last epoch, a config with one
    cycle more; its first epoch runs at lr x restart_lr_factor, whatever the saved schedule."""
    cfg = FitConfig(schedule="cosine", epochs=4, lr=0.1)
    done = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    scheduler = _scheduler(cfg, done, 0)
    seen = []
    for _ in range(cfg.epochs):
        seen.append(done.param_groups[0]["lr"])
        done.param_groups[0]["params"][0].grad = torch.ones(2)
        done.step()
        scheduler.step()
    np.testing.assert_allclose(seen, [0.1 * cosine_factor(e, [4], 1.0) for e in range(4)])
    longer = FitConfig(schedule="cosine", epochs=6, lr=0.1, cosine_cycles=[4, 2], restart_lr_factor=0.3)
    resumed = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=longer.lr)
    resumed.load_state_dict(done.state_dict())
    _scheduler(longer, resumed, 4)
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.03)


def test_class_and_tag_weighting():
    classes = np.array([0, 0, 0, 1])
    loss = make_loss("classes", classes, 2, True, torch.device("cpu"))
    np.testing.assert_allclose(loss.weight.numpy(), [4 / 6, 4 / 2])
    tags = np.array([[1, 0], [1, 0], [1, 1], [0, 0]], np.float32)
    loss = make_loss("tags", tags, 2, True, torch.device("cpu"))
    np.testing.assert_allclose(loss.pos_weight.numpy(), [1.0, 3.0])  # rare tag counts 3x; floor 1
    assert make_loss("tags", tags, 2, False, torch.device("cpu")).pos_weight is None


def test_spec_augment_masks_bands_and_spans():
    cfg = FitConfig(freq_masks=1, freq_mask_bands=10, time_masks=1, time_mask_frames=30)
    torch.manual_seed(0)
    mel = torch.ones(64, PATCH_FRAMES, N_MELS)
    out = spec_augment(mel, cfg)
    zero_bands = (out == 0).all(dim=1).sum(dim=1)  # [B] bands masked over all frames
    zero_frames = (out == 0).all(dim=2).sum(dim=1)  # [B] frames masked over all bands
    assert zero_bands.max() <= 10 and zero_frames.max() <= 30
    assert zero_bands.float().mean() > 2 and zero_frames.float().mean() > 5
    assert torch.equal(mel, torch.ones_like(mel))  # the input is left alone


def test_mixup_blends_each_patch_and_its_target_by_the_same_weight():
    torch.manual_seed(0)
    # Patch i is constant i; its target is [i, 10 i]: a blend shows its two sources and weight.
    mel = torch.arange(8.0)[:, None, None].expand(8, PATCH_FRAMES, N_MELS)
    target = torch.stack([torch.arange(8.0), 10 * torch.arange(8.0)], dim=1)
    out, out_target = mixup(mel, target, alpha=0.4)
    assert out.shape == mel.shape and out_target.shape == target.shape
    assert torch.allclose(out[:, 0, 0], out_target[:, 0]) and torch.allclose(out_target[:, 1], 10 * out_target[:, 0])
    assert torch.allclose(out.std(dim=(1, 2)), torch.zeros(8))  # one weight per patch
    assert not torch.equal(out[:, 0, 0], mel[:, 0, 0])  # blended


def test_shipped_configs_load():
    shipped = sorted((Path(__file__).resolve().parents[2] / "training" / "configs").glob("*.toml"))
    assert len(shipped) == 5
    for path in shipped:
        cfg = load_config(path)
        if cfg.holdout_groups:  # a distillation recipe: `training distill`, not `fit`
            assert cfg.arch in ("separable_student", "musicnn_student") and cfg.validation_groups, path.name
            continue
        assert cfg.arch in CASES and CASES[cfg.arch][0] == cfg.data, path.name

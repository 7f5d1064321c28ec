"""``moodstream-train distill``: the run — the student made or loaded, the main loop, the mood and
mix stages, the export with its calibration (see :mod:`training.distill`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from pipeline.contracts.model_meta import read_meta
from pipeline.settings import DEFAULT_MODEL_REPOSITORY
from pipeline.stages.taxonomy import DEFAULT_MOODS_FILE, Calibration, family_scores, load_taxonomy
from training import REPO_ROOT
from training.config import FitConfig
from training.data import Track
from training.data.cache import FeatureCache
from training.data.sets import open_cache
from training.distill.agreement import (
    check_set,
    compare,
    group_agreement,
    held_out_rows,
    mood_agreement,
    sigmoid,
    student_track,
    teacher_track,
)
from training.distill.data import (
    DEBIAN,
    MixedPatches,
    TeacherPatches,
    distill_music,
    distillation_set,
    group_of,
    mood_tag_weights,
    split_by_group,
)
from training.distill.mood_stage import FamilyScores, TrackTarget, tune_moods
from training.distill.teacher import Teacher, teacher_outputs
from training.engine import DistillLoss, seed_everything, setup_runtime, tensorboard_writer, train
from training.models import build, load_checkpoint, save_checkpoint
from training.models.musicnn_student import freeze_filters, load_teachers

_SAME_TEACHER_TOL = 1e-3  # most a teacher checkpoint's score may differ from the served entry's


def made_from_teacher(
    cfg: FitConfig, patches: TeacherPatches, dims: dict[str, Any], n_labels: int, sample: int = 512
) -> nn.Module:
    """arch ``musicnn_student``: the student made from the teacher's own networks
    (``teacher_checkpoints``) on ``sample`` training patches spread over the tracks, after
    checking that those networks compute the served teacher's scores."""
    if not cfg.teacher_checkpoints:
        raise ValueError(
            "arch musicnn_student is made from the teacher's networks: set teacher_checkpoints (their PyTorch checkpoints, in the entry's network order)"
        )
    nets = [load_checkpoint(Path(p) if Path(p).is_absolute() else REPO_ROOT / p)[0] for p in cfg.teacher_checkpoints]
    index = np.linspace(0, len(patches) - 1, min(sample, len(patches))).astype(int)
    mel, target = (torch.stack(t) for t in zip(*(patches[i] for i in index)))
    with torch.no_grad():
        logits = torch.cat([net(mel)[0] for net in nets], dim=1)
    if logits.shape[1] != n_labels:
        raise ValueError(
            f"teacher_checkpoints {cfg.teacher_checkpoints} give {logits.shape[1]} scores, the served teacher {cfg.teacher} {n_labels}"
        )
    gap = float((torch.sigmoid(logits) - torch.sigmoid(target[:, :n_labels])).abs().max())
    if gap > _SAME_TEACHER_TOL:
        raise ValueError(
            f"teacher_checkpoints {cfg.teacher_checkpoints} do not compute the served teacher {cfg.teacher}'s scores (largest difference {gap:.2g} on {len(index)} patches)"
        )
    model = load_teachers(build(cfg.arch, dims), nets, mel)
    if cfg.frozen_filters:
        freeze_filters(model)
    return model


def student_from(path: Path, cfg: FitConfig, dims: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """(model, checkpoint) of the student saved at ``path``, to train on: its filters frozen
    again with ``frozen_filters``; refused unless it is a ``cfg.arch`` of ``dims``."""
    model, ckpt = load_checkpoint(path)
    if ckpt["arch"] != cfg.arch or json.dumps({k: ckpt["dims"].get(k) for k in dims}) != json.dumps(dims):
        raise ValueError(
            f"checkpoint {path} is a {ckpt['arch']} of dims {ckpt['dims']}, not the configured {cfg.arch} of dims {dims}"
        )
    if cfg.frozen_filters:
        freeze_filters(model)
    return model, ckpt


def initial_model(cfg: FitConfig, patches: TeacherPatches, dims: dict[str, Any], n_labels: int) -> nn.Module | None:
    """The student the main loop starts from: ``init``'s (:func:`student_from`), else for
    musicnn_student one made from the teacher, else None (a fresh ``cfg.arch``)."""
    if cfg.init:
        return student_from(Path(cfg.init), cfg, dims)[0]
    return made_from_teacher(cfg, patches, dims, n_labels) if cfg.arch == "musicnn_student" else None


# -- the run ---------------------------------------------------------------------------------


def distill(
    cfg: FitConfig, source: str = DEBIAN, *, repository: Path = DEFAULT_MODEL_REPOSITORY, export_to: Path | None = None
) -> dict[str, Any]:
    """Train ``cfg.arch`` on ``source`` against the served entry ``cfg.teacher``; returns (and
    writes) the report. With ``export_to`` (a model repository) the student is exported,
    calibrated and its moods compared (module doc)."""
    started = time.monotonic()
    rt = setup_runtime(cfg)
    cache = open_cache(cfg)
    teacher = Teacher.from_repository(repository, cfg.teacher)
    tracks = distillation_set(source)
    extra = distill_music(cfg, source)
    outputs, failed = teacher_outputs(
        [t.source for t in tracks + extra], cache, teacher, workers=cfg.teacher_workers, progress=cfg.progress
    )
    tracks = [t for t in tracks if t.source not in failed]
    splits = split_by_group(tracks, cfg)
    splits["train"] += [t for t in extra if t.source not in failed]
    meta = teacher.meta
    labels = tuple(f"{n.name}:{label}" for n in meta.networks for label in n.labels)
    train_ds = TeacherPatches(
        splits["train"] + (splits["validation"] if cfg.refit else []), cache, outputs, meta.outputs, grid_only=False
    )
    val_ds = TeacherPatches(splits["validation"], cache, outputs, meta.outputs, grid_only=True)
    # the loss scales each output by the teacher's spread over these patches; the mix stage keeps it
    loss_fn = DistillLoss(
        train_ds.all_targets(), len(labels), cfg.embedding_weight, mood_tag_weights(meta, cfg.mood_tag_weight)
    ).to(rt.device)
    score_names = [n.scores_output for n in meta.networks]
    n_labels = len(labels)

    def val_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
        track_of = np.repeat(np.arange(len(val_ds.targets)), [len(t) for t in val_ds.targets])
        m = compare(sigmoid(pred[:, :n_labels]), sigmoid(true[:, :n_labels]), track_of)
        return {k: m[k] for k in ("roc_auc_median", "spearman_track", "top5_overlap_track")}

    dims = {
        "label_counts": [len(n.labels) for n in meta.networks],
        "embedding_dims": [n.embedding_dim for n in meta.networks],
        **cfg.dims,
    }
    networks = [{"name": n.name, "labels": list(n.labels), "embedding_dim": n.embedding_dim} for n in meta.networks]

    def loop(run: FitConfig, train_set: Dataset, model: nn.Module | None) -> Path:
        """The main loop (:func:`~training.engine.train`) as ``run`` says, on ``train_set``."""
        return train(
            run, rt, "tags", labels, train_set, val_ds, loss_fn, source=f"distilled from {cfg.teacher} ({meta.served_version}) on {source}",
            with_embedding=True, metrics=val_metrics, extra={"networks": networks, "teacher": {"name": cfg.teacher, "version": meta.served_version, "onnx_sha256": teacher.tag}},
            model=model,
        )  # fmt: skip

    run = replace(cfg, dims=dims)
    start = initial_model(cfg, train_ds, {**dims, "n_classes": n_labels, "task": "tags"}, n_labels)
    # epochs = 0: the stages start from init, checked above like any start
    best = loop(run, train_ds, start) if cfg.epochs else Path(cfg.init)

    mood_figures: list[dict[str, float]] = []
    if cfg.mood_epochs:
        trained = splits["train"] + (splits["validation"] if cfg.refit else [])
        best, mood_figures = mood_stage(best, cfg, trained, tracks, cache, outputs, teacher, loss_fn)
    mixes = 0
    if cfg.mix_epochs:
        best, mixes = mix_stage(best, run, train_ds, teacher, loop)
    model, ckpt = load_checkpoint(best)
    s_rows, t_rows, track_of = held_out_rows(model, splits["test"], cache, outputs, score_names)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "source": source,
        "teacher": {"name": cfg.teacher, "version": meta.served_version},
        "student": {
            "checkpoint": str(best),
            "arch": cfg.arch,
            "dims": ckpt["dims"],
            "version": ckpt["version"],
            "best_epoch": ckpt["epoch"],
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "refit": cfg.refit,
        "distill_music": cfg.distill_music,
        "groups": {k: sorted({group_of(t) for t in v}) for k, v in splits.items()},
        "tracks": {k: len(v) for k, v in splits.items()},
        "patches": {"train": len(train_ds), "mixed": mixes, "validation": len(val_ds), "held_out": len(track_of)},
        "init": cfg.init,
        "skipped": failed,
        "mood_stage": mood_figures,
        "epochs_run": int(torch.load(Path(cfg.out_dir) / "last.pt", map_location="cpu", weights_only=False)["epoch"])
        + 1
        if cfg.epochs
        else 0,
        "mix_stage": {"epochs": cfg.mix_epochs, "mixes": mixes, "lr": cfg.mix_lr} if cfg.mix_epochs else None,
        "train_wall_s": round(time.monotonic() - started, 1),
        "held_out": compare(s_rows, t_rows, track_of),
    }
    if export_to is not None:
        report.update(
            export_student(best, cfg, splits, tracks, cache, outputs, teacher, export_to, check=source == DEBIAN)
        )
    (Path(cfg.out_dir) / "distill_report.json").write_text(json.dumps(report, indent=2))
    return report


def mood_stage(
    best: Path,
    cfg: FitConfig,
    tracks: list[Track],
    reference: list[Track],
    cache: FeatureCache,
    outputs: dict[str, dict[str, np.ndarray]],
    teacher: Teacher,
    loss_fn: nn.Module,
) -> tuple[Path, list[dict[str, float]]]:
    """The mood stage (:mod:`training.distill.mood_stage`) from checkpoint ``best`` over ``tracks``,
    the student's families through its own calibration over ``reference`` at the start:
    (<out_dir>/mood.pt, the figures of each of its epochs)."""
    model, ckpt = load_checkpoint(best)
    grid = TeacherPatches(tracks, cache, outputs, teacher.meta.outputs, grid_only=True)
    taxonomy = load_taxonomy(teacher.meta)
    _, calibration = student_calibration(model, teacher.meta, reference, cache, outputs)
    own = replace(taxonomy, calibration=Calibration.from_json(calibration))
    targets = [
        TrackTarget(partial(grid.track_patches, t), torch.from_numpy(grid.targets[t]), torch.from_numpy(family_scores(taxonomy, teacher_track(outputs[track.source], teacher.meta))))
        for t, track in enumerate(tracks)
    ]  # fmt: skip
    figures: list[dict[str, float]] = []
    writer = tensorboard_writer(Path(cfg.out_dir))

    def on_epoch(epoch: int, values: dict[str, float]) -> None:
        figures.append({"epoch": epoch, **{k: round(v, 5) for k, v in values.items()}})
        for key, value in values.items():
            writer.add_scalar(f"mood_stage/{key}", value, epoch)
        print(
            f"mood epoch {epoch}: patch loss {values['patch_loss']:.4f}, mood loss {values['mood_loss']:.4f}, leading mood as the teacher's on {values['leading_same']:.1%} of {len(targets)} training tracks (as trained)",
            flush=True,
        )

    tune_moods(
        model, targets, loss_fn.to("cpu"), FamilyScores(own, teacher.meta.networks), epochs=cfg.mood_epochs, lr=cfg.mood_lr, weight=cfg.mood_weight,
        temperature=cfg.mood_temperature, tracks_per_step=cfg.mood_tracks_per_step, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, seed=cfg.seed,
        progress=cfg.progress, on_epoch=on_epoch,
    )  # fmt: skip
    writer.close()
    path = Path(cfg.out_dir) / "mood.pt"
    named = ("arch", "dims", "labels", "task", "frontend", "version", "source", "optimizer", "scheduler", "scaler")
    # new weights, a new version (unless the run names one): every output event carries it
    version = cfg.version or f"{ckpt['version']}-mood"
    save_checkpoint(
        path,
        model.eval(),
        arch=ckpt["arch"],
        labels=ckpt["labels"],
        version=version,
        source=ckpt["source"],
        **{k: v for k, v in ckpt.items() if k not in named},
        mood_stage=figures,
    )
    return path, figures


def mix_stage(
    best: Path,
    cfg: FitConfig,
    patches: TeacherPatches,
    teacher: Teacher,
    loop: Callable[[FitConfig, Dataset, nn.Module], Path],
) -> tuple[Path, int]:
    """The mix stage (module doc) from checkpoint ``best``: ``loop`` (the main loop) over
    ``patches`` and ``cfg.mixed_patches`` mixes of them, for ``mix_epochs`` at ``mix_lr``, into
    <out_dir>/mix: (its best.pt, the number of mixes)."""
    mixed = MixedPatches(
        patches, cfg.mixed_patches, teacher, seed=cfg.seed, workers=cfg.teacher_workers, progress=cfg.progress
    )
    seed_everything(cfg.seed)  # the stage is the same run whatever ran before it in the process
    model, ckpt = student_from(best, cfg, cfg.dims)
    stage = replace(
        cfg,
        epochs=cfg.mix_epochs,
        lr=cfg.mix_lr,
        unfreeze_epoch=0,
        cosine_cycles=[],
        out_dir=str(Path(cfg.out_dir) / "mix"),
        version=cfg.version or f"{ckpt['version']}-mix",
    )
    return loop(stage, ConcatDataset([patches, mixed]), model), len(mixed)


# -- served like any model ---------------------------------------------------------------------


def export_student(
    best: Path,
    cfg: FitConfig,
    splits: dict[str, list[Track]],
    reference: list[Track],
    cache: FeatureCache,
    outputs: dict[str, dict[str, np.ndarray]],
    teacher: Teacher,
    repository: Path,
    *,
    check: bool,
) -> dict[str, Any]:
    """Export ``best`` as ``cfg.name``, calibrate its moods over ``reference`` (every group, as
    the teacher's calibration was made), and compare leading moods with the teacher's on the
    held-out groups and on the reserved check packages (when fetched)."""
    from training.calibrate import write_calibration
    from training.export import export

    exported = export(best, cfg.name or None, repository)
    name = exported.directory.name
    model, _ = load_checkpoint(best)
    meta = read_meta(repository, name)
    scores, calibration = student_calibration(model, meta, reference, cache, outputs)
    write_calibration(repository, name, calibration)

    result: dict[str, Any] = {
        "exported": {
            "name": name,
            "directory": str(
                exported.directory.relative_to(repository.parent)
                if exported.directory.is_relative_to(repository.parent)
                else exported.directory
            ),
            "parity_max_rel_diff": exported.max_rel_diff,
        }
    }
    student_tax = load_taxonomy(read_meta(repository, name))
    teacher_tax = load_taxonomy(teacher.meta)
    result["moods_held_out"] = mood_agreement(splits["test"], scores, outputs, teacher, student_tax, teacher_tax)
    check, check_outputs, _ = check_set(cfg, cache, teacher) if check else ([], {}, {})
    if check:
        figures, result["moods_check"] = group_agreement(
            model, meta, check, cache, check_outputs, teacher, student_tax, teacher_tax
        )
        result["check"] = {"packages": sorted({group_of(t) for t in check}), **figures}
    return result


def student_calibration(
    model: nn.Module, meta: Any, reference: list[Track], cache: FeatureCache, outputs: dict[str, dict[str, np.ndarray]]
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """({source: network -> [n_labels] track scores}, the calibration document) of ``model``
    (networks as ``meta``'s) over ``reference``, every group, as the teacher's was made."""
    from training.calibrate import TrackSet, calibration_for

    scores = {t.source: student_track(model, cache, t.source, outputs[t.source], meta) for t in reference}
    files = sorted(scores)
    trackset = TrackSet(
        files=files,
        scores={n.name: np.stack([scores[f][n.name] for f in files]) for n in meta.networks},
        embeddings={},
        patches=np.zeros(len(files), int),
    )
    uncalibrated = load_taxonomy(meta, DEFAULT_MOODS_FILE, calibrated=False)
    return scores, calibration_for(uncalibrated, trackset, sorted({group_of(t) for t in reference}))

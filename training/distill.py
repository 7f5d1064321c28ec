"""``moodstream-train distill``: a student learns the pretrained model's scores on unlabelled audio.

    unlabelled tracks (folder or s3:// prefix) -> mel cache
    -> teacher (musicnn_msd by default, in PyTorch) scores every patch on the serving grid:
       the soft targets, cached beside the mel frames (per teacher and audio content)
    -> tracks split by a stable hash: train / validation / held out (``--holdout``)
    -> the student (any architecture, task "tags" over the teacher's labels) trains with
       BCE against the soft targets, in the same loop as ``fit``; each epoch draws
       ``patches_per_track`` of every training track's patches at random
    -> student vs teacher on the held-out tracks' serving patches -> distill_report.json

How the report binarises the teacher (ROC-AUC needs 0/1 truth):

    roc_auc_median     per tag, a patch is positive when the teacher's score is above that tag's
                       median over the held-out patches (balanced classes for every tag: does
                       the student rank patches as the teacher does?); macro over tags
    roc_auc_top5       a patch is positive for the teacher's 5 highest tags on it (the tags a
                       listener would be shown); macro over tags with both classes
    roc_auc_median_track  as roc_auc_median on track scores (mean over patches)
    pearson_r          per tag, correlation of student and teacher patch scores; mean over tags
    top5_overlap       mean share of the teacher's top 5 tags that are in the student's top 5
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import Dataset

from pipeline.features import PATCH_FRAMES
from training.config import FitConfig
from training.data import Track, hash_split
from training.data.cache import FeatureCache
from training.data.folders import list_unlabelled
from training.data.patches import serving_patches
from training.evaluate import score
from training.export import _Serving
from training.fit import open_cache, prepare_tracks, setup_runtime, train
from training.models import load_checkpoint


class SoftTargets(Dataset):
    """(mel [PATCH_FRAMES, N_MELS], teacher scores [n_labels]): ``per_track`` grid patches of
    every track, drawn at random on each access (``shuffle``) or evenly spaced."""

    def __init__(self, tracks: list[Track], cache: FeatureCache, targets: dict[str, np.ndarray], *, per_track: int, shuffle: bool) -> None:
        self.cache = cache
        self.targets = targets
        self.shuffle = shuffle
        self.items = []  # (source, slot, slots)
        for t in tracks:
            n = min(per_track, len(targets[t.source]))
            self.items += [(t.source, k, n) for k in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        source, slot, slots = self.items[index]
        rows = self.targets[source]
        i = int(torch.randint(len(rows), ()).item()) if self.shuffle else slot * len(rows) // slots
        mel = np.array(self.cache.frames(source)[i * PATCH_FRAMES : (i + 1) * PATCH_FRAMES])  # grid patch i
        return torch.from_numpy(mel), torch.from_numpy(rows[i])


def teacher_targets(tracks: list[Track], cache: FeatureCache, teacher: Path, serving: torch.nn.Module, device: torch.device, progress: bool) -> dict[str, np.ndarray]:
    """source -> [n_serving_patches, n_labels] teacher scores on the patches the worker scores,
    cached per (teacher file, audio content)."""
    from tqdm import tqdm

    tag = hashlib.sha256(teacher.read_bytes()).hexdigest()[:12]
    folder = cache.dir / f"teacher-{tag}-hop{PATCH_FRAMES}"
    folder.mkdir(exist_ok=True)
    out = {}
    for track in tqdm(tracks, desc="teacher scores", unit="track", disable=not progress):
        path = folder / f"{cache.digest(track.source)}.npy"
        if not path.is_file():
            tmp = path.with_suffix(f".{os.getpid()}.npy")  # several torchrun ranks may race here
            np.save(tmp, score(serving, serving_patches(track, cache)[0], device).astype(np.float32))
            tmp.replace(path)
        out[track.source] = np.load(path)
    return out


def compare(student: np.ndarray, teacher: np.ndarray, track_of: np.ndarray) -> dict[str, float]:
    """The report's agreement figures (module doc). student, teacher: [n_patches, n_labels]."""
    n_labels = teacher.shape[1]
    median = teacher > np.median(teacher, axis=0, keepdims=True)
    top5 = np.zeros_like(median)
    np.put_along_axis(top5, np.argsort(-teacher, axis=1)[:, :5], True, axis=1)

    def macro_auc(truth: np.ndarray, pred: np.ndarray) -> float:
        aucs = [roc_auc_score(truth[:, i], pred[:, i]) for i in range(n_labels) if 0 < truth[:, i].sum() < len(truth)]
        return float(np.mean(aucs)) if aucs else float("nan")

    tracks = np.unique(track_of)
    s_track = np.stack([student[track_of == t].mean(axis=0) for t in tracks])
    t_track = np.stack([teacher[track_of == t].mean(axis=0) for t in tracks])
    r = [np.corrcoef(student[:, i], teacher[:, i])[0, 1] for i in range(n_labels) if student[:, i].std() > 0 and teacher[:, i].std() > 0]
    s_top5 = np.argsort(-student, axis=1)[:, :5]
    overlap = np.take_along_axis(top5, s_top5, axis=1).sum(axis=1) / 5
    return {
        "roc_auc_median": macro_auc(median, student),
        "roc_auc_top5": macro_auc(top5, student),
        "roc_auc_median_track": macro_auc(t_track > np.median(t_track, axis=0, keepdims=True), s_track),
        "pearson_r": float(np.mean(r)) if r else float("nan"),
        "top5_overlap": float(overlap.mean()),
    }


def distill(cfg: FitConfig, source: str, teacher: Path, *, holdout: float = 0.2) -> dict[str, Any]:
    """Train ``cfg.arch`` on ``source`` against ``teacher``; returns (and writes) the report."""
    started = time.monotonic()
    rt = setup_runtime(cfg)
    cache = open_cache(cfg)
    tracks = prepare_tracks(list_unlabelled(source), cache, rt, cfg.progress)
    split_of = hash_split([t.key for t in tracks], cfg.val_fraction, holdout)
    splits = {s: [t for t in tracks if split_of[t.key] == s] for s in ("train", "validation", "test")}
    if not all(splits.values()):
        raise ValueError(f"{source}: {len(tracks)} tracks give an empty split ({ {k: len(v) for k, v in splits.items()} }); add tracks or change the fractions")

    teacher_model, tckpt = load_checkpoint(teacher)
    if tckpt["task"] != "tags":
        raise ValueError(f"the teacher must be a tagger, {teacher} has task {tckpt['task']!r}")
    t_serving = _Serving([teacher_model]).eval().to(rt.device)
    targets = teacher_targets(splits["train"] + splits["validation"], cache, teacher, t_serving, rt.device, cfg.progress and rt.main)
    train_ds = SoftTargets(splits["train"], cache, targets, per_track=cfg.patches_per_track, shuffle=True)
    val_ds = SoftTargets(splits["validation"], cache, targets, per_track=cfg.patches_per_track, shuffle=False)
    loss_fn = torch.nn.BCEWithLogitsLoss()  # soft targets: the teacher's probabilities
    best = train(cfg, rt, "tags", tuple(tckpt["labels"]), train_ds, val_ds, loss_fn, source=f"distilled from {teacher.name} ({tckpt['version']}) on {source}")

    student_model, sckpt = load_checkpoint(best)
    s_serving = _Serving([student_model]).eval().to(rt.device)
    s_scores, t_scores, track_of = [], [], []
    for i, track in enumerate(splits["test"]):
        patches, _ = serving_patches(track, cache)
        s_scores.append(score(s_serving, patches, rt.device))
        t_scores.append(score(t_serving, patches, rt.device))
        track_of += [i] * len(patches)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "source": source,
        "teacher": {"checkpoint": str(teacher), "version": tckpt["version"]},
        "student": {"checkpoint": str(best), "arch": cfg.arch, "dims": sckpt["dims"], "version": sckpt["version"], "best_epoch": sckpt["epoch"]},
        "tracks": {k: len(v) for k, v in splits.items()},
        "patches": {"train": len(train_ds), "validation": len(val_ds), "held_out": len(track_of)},
        "epochs_run": int(torch.load(Path(cfg.out_dir) / "last.pt", map_location="cpu", weights_only=False)["epoch"]) + 1,
        "wall_s": round(time.monotonic() - started, 1),
        "held_out": compare(np.concatenate(s_scores), np.concatenate(t_scores), np.array(track_of)),
    }
    (Path(cfg.out_dir) / "distill_report.json").write_text(json.dumps(report, indent=2))
    return report

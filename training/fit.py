"""``moodstream-train fit``: one training run on a labelled set.

labelled set -> mel cache -> patch data sets -> model -> loss (weighted for imbalance)
-> the training engine (:func:`training.engine.train`)
"""

from __future__ import annotations

from pathlib import Path

from training.config import FitConfig
from training.data.patches import PatchDataset
from training.data.sets import load_labelled_set, open_cache
from training.engine import make_loss, prepare_tracks, setup_runtime, train


def fit(cfg: FitConfig) -> Path:
    """Train as ``cfg`` says; returns the best checkpoint's path."""
    if cfg.init:  # (epochs = 0 needs init: from_dict)
        raise ValueError(
            "init and epochs = 0 are distill's (a further run on a trained student); fit trains a fresh model for epochs >= 1"
        )
    rt = setup_runtime(cfg)
    labelled = load_labelled_set(cfg)
    cache = open_cache(cfg)
    train_tracks = prepare_tracks(labelled.splits["train"], cache, rt, cfg.progress)
    val_tracks = prepare_tracks(labelled.splits["validation"], cache, rt, cfg.progress)
    train_ds = PatchDataset(
        train_tracks, labelled.task, cache, patches_per_track=cfg.patches_per_track, time_shift=cfg.time_shift
    )
    val_ds = PatchDataset(val_tracks, labelled.task, cache, patches_per_track=cfg.patches_per_track, time_shift=False)
    if not len(train_ds) or not len(val_ds):
        raise ValueError(
            f"{cfg.data} at {cfg.data_root}: {len(train_ds)} training and {len(val_ds)} validation patches; need both"
        )
    targets = train_ds.targets() if labelled.task in ("tags", "classes") else None
    loss_fn = make_loss(labelled.task, targets, len(labelled.labels), cfg.class_weighting, rt.device)
    source = f"moodstream-train fit: {cfg.data} {cfg.data_root}"
    return train(cfg, rt, labelled.task, labelled.labels, train_ds, val_ds, loss_fn, source)

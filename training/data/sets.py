"""The labelled set and the mel cache a training configuration names."""

from __future__ import annotations

from pathlib import Path

from training.config import FitConfig
from training.data import LabelledSet
from training.data.cache import FeatureCache


def load_labelled_set(cfg: FitConfig) -> LabelledSet:
    """The labelled set ``cfg.data`` names, read from ``cfg.data_root``."""
    if not cfg.data_root:
        raise ValueError("data_root is not set (--set data_root=PATH)")
    if cfg.data == "jamendo":
        from training.data import jamendo

        return jamendo.load(Path(cfg.data_root), Path(cfg.audio_root) if cfg.audio_root else None, cfg.split)
    if cfg.data in ("deam", "deam_dynamic"):
        from training.data import deam

        load = deam.load_static if cfg.data == "deam" else deam.load_dynamic
        return load(Path(cfg.data_root), cfg.val_fraction, cfg.test_fraction)
    from training.data import folders

    return folders.load_classes(Path(cfg.data_root), cfg.val_fraction, cfg.test_fraction)


def open_cache(cfg: FitConfig) -> FeatureCache:
    """The mel cache at ``cfg.cache_dir``."""
    return FeatureCache(Path(cfg.cache_dir).expanduser(), max_duration_s=cfg.max_duration_s)

"""Training options: one dataclass, read from a TOML or YAML file, overridden on the command line.

    moodstream-train fit --config runs/jamendo.toml --set epochs=5 --set dims.d_model=64

Every field has a default, so a file only names what differs. ``--set key=value`` parses the
value as YAML (``8``, ``0.5``, ``true``, ``[64, 128]``, ``cosine``); ``dims.<name>`` sets one
architecture dimension. The resolved options are stored in every checkpoint (``config``) so a
run can be repeated, resumed and evaluated on the data it was trained on. The model code never
sees this object: :func:`training.models.build` gets only the dims.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DATASETS = ("jamendo", "deam", "deam_dynamic", "folders")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass
class FitConfig:
    # what to train, on what
    arch: str = "resnet18"  # a key of training.models.ARCHITECTURES
    dims: dict[str, Any] = field(default_factory=dict)  # overrides of the architecture's dims
    data: str = "folders"  # one of DATASETS
    data_root: str = ""  # Jamendo: the folder with autotagging_moodtheme.tsv; DEAM: the archive root
    audio_root: str = ""  # Jamendo only: where PATHs like 48/948.mp3 live (default: data_root)
    split: int = 0  # Jamendo: official split number
    val_fraction: float = 0.1  # DEAM and folders (no official split): hash-split fractions
    test_fraction: float = 0.1
    cache_dir: str = "~/.cache/moodstream/mel"  # log-mel frames, computed once per audio file
    max_duration_s: float = 600.0  # audio analysed per file
    # where the run goes and what it is called when served
    out_dir: str = "runs/model"  # checkpoints (last.pt, best.pt) and TensorBoard logs (tb/)
    name: str = ""  # model name for export (default: the architecture)
    version: str = ""  # model version carried into every output event (default: UTC time of the run)
    # optimisation
    seed: int = 0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 5.0  # max gradient norm (0: off)
    schedule: str = "plateau"  # "plateau" (ReduceLROnPlateau on validation loss) or "cosine"
    # cosine: cycles of these many epochs (summing to epochs), each a warm restart annealed to 0
    # (empty: one cycle of epochs); cycle k starts at lr x restart_lr_factor^k
    cosine_cycles: list[int] = field(default_factory=list)
    restart_lr_factor: float = 1.0
    plateau_patience: int = 2  # epochs
    plateau_factor: float = 0.5
    early_stopping: int = 6  # epochs without a better validation loss before stopping (0: off)
    min_delta: float = 0.0  # a validation loss counts as better when it beats the best by more
    time_limit_min: float = 0.0  # stop after the epoch that passes this many minutes (0: off)
    class_weighting: bool = True  # tags: positive weights; classes: inverse-frequency weights
    # data per epoch and augmentation
    patches_per_track: int = 8  # training patches per track per epoch
    time_shift: bool = True  # training patches start anywhere, not on the serving grid
    freq_masks: int = 2  # SpecAugment-style masks per patch
    freq_mask_bands: int = 12  # widest frequency mask, mel bands
    time_masks: int = 2
    time_mask_frames: int = 20  # widest time mask, frames (16 ms each)
    mixup: float = 0.0  # alpha of Beta(alpha, alpha) mixup of patches and targets (0: off; float targets)
    # distillation (``moodstream-train distill``)
    teacher: str = "musicnn"  # the served entry (model repository) whose outputs the student learns
    validation_groups: list[str] = field(default_factory=list)  # packages/albums for early stopping
    holdout_groups: list[str] = field(default_factory=list)  # packages/albums of the agreement report
    # the validation groups are trained on too, for exactly `epochs` (a count chosen on them in a
    # run without refit): the last epoch is the model, no early stopping; the validation figures
    # printed are then on music the student learns from
    refit: bool = False
    # source debian: the fetched packages of the `distill` role (training/data/debian_music.toml:
    # student training music only, never calibration) train too; they are never validation or held out
    distill_music: bool = False
    embedding_weight: float = 0.5  # weight of the embedding term against the logits term
    # weight of each tag that moods.toml makes a mood family member (the tags the leading mood is
    # read from) in the logits term, against 1 for every other tag
    mood_tag_weight: float = 1.0
    # a checkpoint whose weights the student starts from (fresh optimizer and schedule; "": made
    # from the teacher, or fresh); with epochs = 0 the stages after the main loop start from it
    init: str = ""
    # the mood stage after the main loop (training/mood_stage.py): epochs over whole training
    # tracks, the patch loss + mood_weight x a KL between the teacher's and the student's family
    # scores at mood_temperature (0 epochs: no stage)
    mood_epochs: int = 0
    mood_lr: float = 1e-4
    mood_weight: float = 1.0
    mood_temperature: float = 0.05
    mood_tracks_per_step: int = 4
    # the mix stage after the mood stage (training/distill.py): mix_epochs of the main loop at
    # mix_lr, filters frozen, over the training patches and mixed_patches mixes of two training
    # tracks' patches, each with the teacher's outputs on the mix (scored once, cached)
    mix_epochs: int = 0
    mix_lr: float = 1e-4
    mixed_patches: int = 0
    teacher_workers: int = 2  # processes computing the teacher's outputs
    # arch musicnn_student: the teacher's trained networks (PyTorch checkpoints, in the entry's
    # network order) it is made from, and whether their filters stay as they are
    teacher_checkpoints: list[str] = field(default_factory=list)
    frozen_filters: bool = False
    # from this epoch on every parameter trains, those frozen at the start too (0: never): the
    # frozen phase is cheap and gets the student near the teacher; the filters then adapt
    unfreeze_epoch: int = 0
    # machinery
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with scaling)
    num_workers: int = 0  # DataLoader worker processes
    resume: str = ""  # checkpoint to continue from (its weights, optimizer and epoch)
    progress: bool = True  # tqdm progress bars


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> FitConfig:
    """Defaults <- ``path`` (.toml, .yaml/.yml) <- ``overrides`` ("key=value", YAML values)."""
    values: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        values = tomllib.loads(text) if Path(path).suffix == ".toml" else (yaml.safe_load(text) or {})
    parsed = parse_overrides(overrides or [])
    values.setdefault("dims", {}).update(parsed.pop("dims", {}))
    return from_dict({**values, **parsed})


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["key=value", "dims.name=value", ...] -> {key: value, "dims": {name: value}}, values as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = key.strip(), yaml.safe_load(raw) if raw.strip() else ""
        if key.startswith("dims."):
            out.setdefault("dims", {})[key[5:]] = value
        else:
            out[key] = value
    return out


def from_dict(values: dict[str, Any]) -> FitConfig:
    known = {f.name: f for f in fields(FitConfig)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown options: {sorted(unknown)}; known: {sorted(known)}")
    cfg, defaults = FitConfig(**values), FitConfig()
    for f in fields(FitConfig):
        value = getattr(cfg, f.name)
        default = getattr(defaults, f.name)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{f.name} must be true or false, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
        elif isinstance(default, float) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            setattr(cfg, f.name, float(value))  # YAML reads 5e-5 (no dot) as a string
        elif isinstance(default, (int, float, str, dict, list)) and not isinstance(value, type(default)):
            raise ValueError(f"{f.name} must be {type(default).__name__}, got {value!r}")
    if cfg.data not in DATASETS:
        raise ValueError(f"data must be one of {DATASETS}, got {cfg.data!r}")
    if cfg.schedule not in ("plateau", "cosine"):
        raise ValueError(f"schedule must be plateau or cosine, got {cfg.schedule!r}")
    if cfg.cosine_cycles and (sum(cfg.cosine_cycles) != cfg.epochs or min(cfg.cosine_cycles) < 1):
        raise ValueError(
            f"cosine_cycles {cfg.cosine_cycles} must be epochs >= 1 each that add up to epochs ({cfg.epochs})"
        )
    if not 0 < cfg.restart_lr_factor <= 1:
        raise ValueError(f"restart_lr_factor must be in (0, 1], got {cfg.restart_lr_factor}")
    if cfg.mood_tag_weight <= 0:
        raise ValueError(
            f"mood_tag_weight must be > 0 (1: mood tags weigh as much as the others), got {cfg.mood_tag_weight}"
        )
    if (
        cfg.mood_epochs < 0
        or cfg.mood_tracks_per_step < 1
        or cfg.mood_temperature <= 0
        or cfg.mood_weight < 0
        or cfg.mood_lr <= 0
    ):
        raise ValueError(
            f"the mood stage needs mood_epochs >= 0, mood_tracks_per_step >= 1, mood_temperature > 0, mood_weight >= 0 and mood_lr > 0; got {cfg.mood_epochs}, {cfg.mood_tracks_per_step}, {cfg.mood_temperature}, {cfg.mood_weight}, {cfg.mood_lr}"
        )
    if cfg.refit and cfg.schedule != "cosine":
        raise ValueError(
            'refit trains on the validation groups, so no schedule may follow their loss: use schedule = "cosine"'
        )
    if cfg.mix_epochs < 0 or cfg.mix_lr <= 0 or (cfg.mix_epochs > 0) != (cfg.mixed_patches > 0):
        raise ValueError(
            f"the mix stage needs mix_epochs >= 0, mix_lr > 0 and mixed_patches > 0 exactly when mix_epochs > 0; got {cfg.mix_epochs}, {cfg.mix_lr}, {cfg.mixed_patches}"
        )
    if cfg.epochs < 0 or (cfg.epochs == 0 and not cfg.init):
        raise ValueError(
            f"epochs must be >= 1, or 0 with init (the checkpoint the stages start from); got {cfg.epochs}"
        )
    if cfg.init and cfg.resume:
        raise ValueError("init starts a new run from a checkpoint's weights, resume continues one: set one of them")
    if cfg.unfreeze_epoch < 0:
        raise ValueError(f"unfreeze_epoch must be >= 0 (0: frozen parameters stay frozen), got {cfg.unfreeze_epoch}")
    return cfg


def to_dict(cfg: FitConfig) -> dict[str, Any]:
    return asdict(cfg)

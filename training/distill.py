"""``moodstream-train distill``: a small student learns a served teacher's outputs on unlabelled music.

    unlabelled music: Debian's reference packages (``debian``, the default: the list in
    training/data/debian_music.toml, fetched by ``make music``), a folder or an s3:// prefix;
    with ``distill_music`` Debian's distill-role packages too, as training groups only (they
    are not the calibration reference)
    -> groups: the package (Debian) or the album (a folder's first-level subfolder); validation
       and held-out groups (``validation_groups``, ``holdout_groups``, else a hash split of the
       groups) are never trained on, so the held-out music is unlike the training music; with
       ``refit`` the validation groups are trained on too, for a fixed number of epochs
    -> mel cache and the teacher's outputs (every network's scores and embedding) on patches every
       ``TEACHER_HOP`` frames, computed once (:mod:`training.teacher`)
    -> the student (``arch``; ``student`` by default: every network's tags and embeddings from one
       trunk) trains in the loop ``fit`` uses on every training patch each epoch, with the loss
           MSE of the logits against the teacher's logits, each tag scaled by the teacher's spread
           (the tags moods.toml reads moods from weighted ``mood_tag_weight``, the others 1)
           + ``embedding_weight`` x MSE of the embeddings, each dimension likewise scaled
       (logit matching: a tag the teacher scores 0.001 to 0.02 is ranked as carefully as one it
       scores 0.1 to 0.9; a BCE on probabilities barely sees the former)
       With ``init`` the student starts from that checkpoint's weights (a fresh optimizer and
       schedule) instead of being made from the teacher; with ``epochs = 0`` as well, the stages
       below start from it directly.
    -> with ``mood_epochs``, the mood stage (:mod:`training.mood_stage`): epochs over whole
       training tracks that add the families' order to the loss; its model (``mood.pt``) goes on
       to the mix stage, or is the one reported and exported
    -> with ``mix_epochs``, the mix stage (:func:`mix_stage`): the main loop again, from the model
       so far with its filters frozen (``frozen_filters``), over the training patches and
       ``mixed_patches`` mixes of two training tracks' patches (power weights drawn from
       ``MIX_WEIGHTS``), each mix's target the teacher's outputs on the mix itself (computed once,
       :func:`~training.teacher.mixed_outputs`): inputs unlike any one track, and what the
       teacher says of exactly them; its model (``mix/best.pt``) is the one reported and exported
    -> agreement with the teacher on the held-out groups' serving patches -> distill_report.json

With ``--export`` the best checkpoint goes on into the model repository (named ``name``), its
mood calibration is computed over the same reference music as the teacher's (the student's own
track scores, from the cached frames) and the report adds the mood agreement, on the held-out
groups and on the reserved check packages when they are fetched (scored, never trained or
tuned on).

``moodstream-train agreement`` computes the same held-out and check figures for a student already
in the model repository (its served ONNX graph and calibration), without training or exporting.

Agreement figures (student against teacher; the goals are the CPU-tier issue's):

    roc_auc_median        per tag, a patch is positive when the teacher scores it above that
                          tag's median over the held-out patches; macro over tags   (>= 0.95)
    roc_auc_median_track  the same on track scores (mean over a track's patches)
    spearman_track        per tag, rank correlation of student and teacher track scores;
                          median over tags                                          (>= 0.9)
    top5_overlap_track    tags of the teacher's top 5 (track scores) in the student's top 5,
                          mean over tracks, of 5                                     (>= 4)
    top5_overlap          the same per patch, as a share
    pearson_r             per tag, correlation of patch scores; mean over tags
    leading_mood_same     share of tracks whose leading mood is the teacher's (>= 0.9; export)
    leading_mood_same_teacher_leads
                          the same on the tracks where the teacher's first mood leads its
                          second by at least ``NEAR_TIE`` (the rest are near-ties)
    teacher_shifted_same  the teacher against itself: its leading mood on the patches half a
                          patch off the serving grid, against the grid's
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from pipeline.features import PATCH_FRAMES
from pipeline.model_meta import label_columns, read_meta
from pipeline.settings import REPO_ROOT
from pipeline.taxonomy import DEFAULT_MOODS_FILE, Calibration, family_scores, load_taxonomy, mood_view
from training.config import FitConfig
from training.data import Track, debian_music, hash_split
from training.data.cache import FeatureCache
from training.data.folders import list_unlabelled
from training.data.patches import mix_frames
from training.fit import DistillLoss, open_cache, seed_everything, setup_runtime, tensorboard_writer, train
from training.models import build, load_checkpoint, save_checkpoint
from training.models.musicnn_lite import freeze_filters, load_teachers
from training.mood_stage import FamilyScores, TrackTarget, tune_moods
from training.teacher import TEACHER_HOP, Teacher, mixed_outputs, teacher_outputs

DEBIAN = "debian"
_P_CLIP = 1e-6  # teacher probabilities are clipped here before the logit
_SAME_TEACHER_TOL = 1e-3  # most a teacher checkpoint's score may differ from the served entry's
MIX_WEIGHTS = (0.2, 0.8)  # power weight of a mix's first patch: uniform in this range


# -- the music and its split -----------------------------------------------------------------


def distillation_set(source: str, *, role: str = "reference", music_dir: Path | None = None) -> list[Track]:
    """Tracks keyed "<group>/<path in group>": ``debian`` (the fetched packages of ``role``), a
    folder or an s3:// prefix (group: the first folder below it). Training sources never hold
    the reserved check packages (ValueError)."""
    if source == DEBIAN:
        music_dir = debian_music.DEFAULT_DEST if music_dir is None else music_dir
        files = debian_music.audio_files(music_dir, role)
        if not files:
            raise ValueError(f"no fetched Debian music of role {role!r} under {music_dir}; run `make music ROLE={role}`")
        return [Track(str(f.relative_to(music_dir / role)), str(f)) for f in files]
    tracks = list_unlabelled(source)
    if role == "reference":
        reserved = [t for t in tracks if set(Path(t.source).parts) & debian_music.RESERVED]
        if reserved:
            raise ValueError(f"{source}: {len(reserved)} files belong to packages reserved as the independent check ({sorted(debian_music.RESERVED)}), e.g. {reserved[0].source}")
    return tracks


def _distill_music(cfg: FitConfig, source: str) -> list[Track]:
    """The ``distill``-role packages' tracks when ``cfg.distill_music`` (training only: they are
    not the calibration reference, and never validation or held out)."""
    if not cfg.distill_music:
        return []
    if source != DEBIAN:
        raise ValueError(f"distill_music adds Debian's distill-role packages to the Debian reference music; source {source!r} is not {DEBIAN!r}")
    extra = distillation_set(source, role="distill")
    named = {group_of(t) for t in extra} & (set(cfg.validation_groups) | set(cfg.holdout_groups))
    if named:
        raise ValueError(f"{sorted(named)}: distill-role packages only train; name reference packages as validation or held-out groups")
    return extra


def group_of(track: Track) -> str:
    parts = Path(track.key).parts
    return parts[0] if len(parts) > 1 else track.key


def split_by_group(tracks: list[Track], cfg: FitConfig) -> dict[str, list[Track]]:
    """train / validation / test, whole groups each (see the module doc)."""
    groups = sorted({group_of(t) for t in tracks})
    named = set(cfg.validation_groups) | set(cfg.holdout_groups)
    if named:
        unknown = named - set(groups)
        if unknown:
            raise ValueError(f"validation/holdout groups {sorted(unknown)} are not in the music; its groups: {groups}")
        split_of = {g: "test" if g in cfg.holdout_groups else "validation" if g in cfg.validation_groups else "train" for g in groups}
    else:
        split_of = hash_split(groups, cfg.val_fraction, cfg.test_fraction)
    splits = {s: [t for t in tracks if split_of[group_of(t)] == s] for s in ("train", "validation", "test")}
    if not all(splits.values()):
        raise ValueError(f"{len(tracks)} tracks in {len(groups)} groups give an empty split ({ {k: len(v) for k, v in splits.items()} }); add music or name the groups")
    return splits


# -- targets, data set, loss -----------------------------------------------------------------


def mood_tag_weights(meta: Any, weight: float, moods_file: Path = DEFAULT_MOODS_FILE) -> np.ndarray:
    """[n_labels of all ``meta``'s networks, in order]: ``weight`` for each tag that
    ``moods_file`` makes a mood family member, 1 for the others."""
    members = {m.key for family in load_taxonomy(meta, moods_file, calibrated=False).families for m in family.members}
    return np.array([weight if f"{n.name}:{label}" in members else 1.0 for n in meta.networks for label in n.labels], np.float32)


def teacher_logits(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(probabilities, _P_CLIP, 1 - _P_CLIP)
    return np.log(p) - np.log1p(-p)


class TeacherPatches(Dataset):
    """(mel [PATCH_FRAMES, N_MELS], target [n_labels + embedding width]): the teacher's logits
    of every network, then its embeddings, for each patch the teacher scored (``grid_only``:
    the serving grid's patches only)."""

    def __init__(self, tracks: list[Track], cache: FeatureCache, outputs: dict[str, dict[str, np.ndarray]], meta_outputs: tuple[str, ...], *, grid_only: bool) -> None:
        self.cache = cache
        self.sources = [t.source for t in tracks]
        self.targets, self.items, self.starts = [], [], []
        for t, source in enumerate(self.sources):
            out = outputs[source]
            keep = out["starts"] % PATCH_FRAMES == 0 if grid_only else np.ones(len(out["starts"]), bool)
            self.targets.append(teacher_targets(out, meta_outputs)[keep])
            self.starts.append(out["starts"][keep])
            self.items += [(t, int(s), i) for i, s in enumerate(self.starts[t])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, _, row = self.items[index]
        return torch.from_numpy(self.mel(index)), torch.from_numpy(self.targets[t][row])

    def where(self, index: int) -> tuple[str, int]:
        """(source, first frame) of item ``index``'s patch."""
        t, start, _ = self.items[index]
        return self.sources[t], start

    def mel(self, index: int) -> np.ndarray:
        """[PATCH_FRAMES, N_MELS] float32: item ``index``'s patch."""
        return self.cache.patch(*self.where(index))

    def track_patches(self, t: int) -> torch.Tensor:
        """[n, PATCH_FRAMES, N_MELS]: every patch of track ``t``, in the order of its targets."""
        frames = self.cache.frames(self.sources[t])
        return torch.from_numpy(np.stack([frames[s : s + PATCH_FRAMES] for s in self.starts[t]]).astype(np.float32, copy=False))

    def all_targets(self) -> np.ndarray:
        return np.concatenate(self.targets)


def teacher_targets(out: dict[str, np.ndarray], meta_outputs: tuple[str, ...]) -> np.ndarray:
    """[n, n_labels + embedding width]: the teacher's logits of every network, then its
    embeddings, from its outputs on n patches."""
    scores = [o for o in meta_outputs if o.endswith("scores")]
    embeddings = [o for o in meta_outputs if o.endswith("embedding")]
    return np.concatenate([teacher_logits(out[s]) for s in scores] + [out[e] for e in embeddings], axis=1).astype(np.float32)


class MixedPatches(Dataset):
    """(mel [PATCH_FRAMES, N_MELS], target): mixes of two patches of ``patches``, each with the
    teacher's targets on the mix. ``count`` pairs are drawn (seeded); those from one track are
    dropped, so there are a little fewer."""

    def __init__(self, patches: TeacherPatches, count: int, teacher: Teacher, *, seed: int, workers: int = 2, progress: bool = True) -> None:
        rng = np.random.default_rng(seed)
        self.patches = patches
        first = rng.integers(len(patches.items), size=count)
        second = rng.integers(len(patches.items), size=count)
        other_track = np.array([patches.items[a][0] != patches.items[b][0] for a, b in zip(first, second)], bool)
        self.pairs = np.stack([first, second], axis=1)[other_track]
        if not len(self.pairs):
            raise ValueError(f"no mix of two tracks among {count} pairs drawn from {len(patches.sources)} track(s): mixes need patches of at least two tracks")
        self.weights = rng.uniform(*MIX_WEIGHTS, size=len(self.pairs)).astype(np.float32)
        described = [(*patches.where(a), *patches.where(b), float(w)) for (a, b), w in zip(self.pairs, self.weights)]
        self.targets = teacher_targets(mixed_outputs(described, patches.cache, teacher, workers=workers, progress=progress), teacher.meta.outputs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = (self.patches.mel(int(i)) for i in self.pairs[index])
        return torch.from_numpy(mix_frames(a, b, float(self.weights[index]))), torch.from_numpy(self.targets[index])


def made_from_teacher(cfg: FitConfig, patches: TeacherPatches, dims: dict[str, Any], n_labels: int, sample: int = 512) -> nn.Module:
    """arch ``musicnn_lite``: the student made from the teacher's own networks
    (``teacher_checkpoints``) on ``sample`` training patches spread over the tracks, after
    checking that those networks compute the served teacher's scores."""
    if not cfg.teacher_checkpoints:
        raise ValueError("arch musicnn_lite is made from the teacher's networks: set teacher_checkpoints (their PyTorch checkpoints, in the entry's network order)")
    nets = [load_checkpoint(Path(p) if Path(p).is_absolute() else REPO_ROOT / p)[0] for p in cfg.teacher_checkpoints]
    index = np.linspace(0, len(patches) - 1, min(sample, len(patches))).astype(int)
    mel, target = (torch.stack(t) for t in zip(*(patches[i] for i in index)))
    with torch.no_grad():
        logits = torch.cat([net(mel)[0] for net in nets], dim=1)
    if logits.shape[1] != n_labels:
        raise ValueError(f"teacher_checkpoints {cfg.teacher_checkpoints} give {logits.shape[1]} scores, the served teacher {cfg.teacher} {n_labels}")
    gap = float((torch.sigmoid(logits) - torch.sigmoid(target[:, :n_labels])).abs().max())
    if gap > _SAME_TEACHER_TOL:
        raise ValueError(f"teacher_checkpoints {cfg.teacher_checkpoints} do not compute the served teacher {cfg.teacher}'s scores (largest difference {gap:.2g} on {len(index)} patches)")
    model = load_teachers(build(cfg.arch, dims), nets, mel)
    if cfg.frozen_filters:
        freeze_filters(model)
    return model


def student_from(path: Path, cfg: FitConfig, dims: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """(model, checkpoint) of the student saved at ``path``, to train on: its filters frozen
    again with ``frozen_filters``; refused unless it is a ``cfg.arch`` of ``dims``."""
    model, ckpt = load_checkpoint(path)
    if ckpt["arch"] != cfg.arch or json.dumps({k: ckpt["dims"].get(k) for k in dims}) != json.dumps(dims):
        raise ValueError(f"checkpoint {path} is a {ckpt['arch']} of dims {ckpt['dims']}, not the configured {cfg.arch} of dims {dims}")
    if cfg.frozen_filters:
        freeze_filters(model)
    return model, ckpt


def initial_model(cfg: FitConfig, patches: TeacherPatches, dims: dict[str, Any], n_labels: int) -> nn.Module | None:
    """The student the main loop starts from: ``init``'s (:func:`student_from`), else for
    musicnn_lite one made from the teacher, else None (a fresh ``cfg.arch``)."""
    if cfg.init:
        return student_from(Path(cfg.init), cfg, dims)[0]
    return made_from_teacher(cfg, patches, dims, n_labels) if cfg.arch == "musicnn_lite" else None


# -- agreement -------------------------------------------------------------------------------


def compare(student: np.ndarray, teacher: np.ndarray, track_of: np.ndarray) -> dict[str, float]:
    """The report's agreement figures (module doc). student, teacher: [n_patches, n_labels]
    scores in [0, 1]; track_of: [n_patches] track index of each patch."""
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
    rho = [spearmanr(s_track[:, i], t_track[:, i])[0] for i in range(n_labels) if len(tracks) > 2]
    s_top5 = np.argsort(-student, axis=1)[:, :5]
    overlap = np.take_along_axis(top5, s_top5, axis=1).sum(axis=1) / 5
    track_overlap = [len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) for a, b in zip(s_track, t_track)]
    return {
        "roc_auc_median": macro_auc(median, student),
        "roc_auc_top5": macro_auc(top5, student),
        "roc_auc_median_track": macro_auc(t_track > np.median(t_track, axis=0, keepdims=True), s_track),
        "spearman_track": float(np.nanmedian(rho)) if rho else float("nan"),
        "pearson_r": float(np.mean(r)) if r else float("nan"),
        "top5_overlap": float(overlap.mean()),
        "top5_overlap_track": float(np.mean(track_overlap)),
    }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@torch.inference_mode()
def student_rows(model: nn.Module, frames: np.ndarray, starts: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(logits [n, n_labels], embedding [n, E]) of the patches starting at ``starts``."""
    logits, embeddings = [], []
    for i in range(0, len(starts), batch):
        patches = np.stack([frames[s : s + PATCH_FRAMES] for s in starts[i : i + batch]]).astype(np.float32)
        out, emb = model(torch.from_numpy(patches))
        logits.append(out.numpy())
        embeddings.append(emb.numpy())
    return np.concatenate(logits), np.concatenate(embeddings)


def held_out_rows(student: nn.Module | Any, tracks: list[Track], cache: FeatureCache, outputs: dict[str, dict[str, np.ndarray]], score_names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Student and teacher scores [n, n_labels] on the serving grid of ``tracks``, and each
    patch's track index. ``student``: a checkpoint's module, or a served model (an
    :class:`~pipeline.scoring.OnnxScorer`, its networks' scores side by side)."""
    s_rows, t_rows, track_of = [], [], []
    for i, track in enumerate(tracks):
        out = outputs[track.source]
        grid = out["starts"] % PATCH_FRAMES == 0
        frames, starts = cache.frames(track.source), out["starts"][grid]
        if isinstance(student, nn.Module):
            s_rows.append(_sigmoid(student_rows(student, frames, starts)[0]))
        else:
            scored = student.score_sync(np.stack([frames[s : s + PATCH_FRAMES] for s in starts]))  # float32, as cached
            s_rows.append(np.concatenate([scored[n.name].scores for n in student.meta.networks], axis=1))
        t_rows.append(np.concatenate([out[n][grid] for n in score_names], axis=1))
        track_of += [i] * int(grid.sum())
    return np.concatenate(s_rows), np.concatenate(t_rows), np.array(track_of)


# -- the run ---------------------------------------------------------------------------------


def distill(cfg: FitConfig, source: str = DEBIAN, *, repository: Path = REPO_ROOT / "triton_models", export_to: Path | None = None) -> dict[str, Any]:
    """Train ``cfg.arch`` on ``source`` against the served entry ``cfg.teacher``; returns (and
    writes) the report. With ``export_to`` (a model repository) the student is exported,
    calibrated and its moods compared (module doc)."""
    started = time.monotonic()
    rt = setup_runtime(cfg)
    cache = open_cache(cfg)
    teacher = Teacher.from_repository(repository, cfg.teacher)
    tracks = distillation_set(source)
    extra = _distill_music(cfg, source)
    outputs, failed = teacher_outputs([t.source for t in tracks + extra], cache, teacher, workers=cfg.teacher_workers, progress=cfg.progress)
    tracks = [t for t in tracks if t.source not in failed]
    splits = split_by_group(tracks, cfg)
    splits["train"] += [t for t in extra if t.source not in failed]
    meta = teacher.meta
    labels = tuple(f"{n.name}:{label}" for n in meta.networks for label in n.labels)
    train_ds = TeacherPatches(splits["train"] + (splits["validation"] if cfg.refit else []), cache, outputs, meta.outputs, grid_only=False)
    val_ds = TeacherPatches(splits["validation"], cache, outputs, meta.outputs, grid_only=True)
    # the loss scales each output by the teacher's spread over these patches; the mix stage keeps it
    loss_fn = DistillLoss(train_ds.all_targets(), len(labels), cfg.embedding_weight, mood_tag_weights(meta, cfg.mood_tag_weight)).to(rt.device)
    score_names = [n.scores_output for n in meta.networks]
    n_labels = len(labels)

    def val_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
        track_of = np.repeat(np.arange(len(val_ds.targets)), [len(t) for t in val_ds.targets])
        m = compare(_sigmoid(pred[:, :n_labels]), _sigmoid(true[:, :n_labels]), track_of)
        return {k: m[k] for k in ("roc_auc_median", "spearman_track", "top5_overlap_track")}

    dims = {
        "label_counts": [len(n.labels) for n in meta.networks],
        "embedding_dims": [n.embedding_dim for n in meta.networks],
        **cfg.dims,
    }
    networks = [{"name": n.name, "labels": list(n.labels), "embedding_dim": n.embedding_dim} for n in meta.networks]

    def loop(run: FitConfig, train_set: Dataset, model: nn.Module | None) -> Path:
        """The main loop (:func:`~training.fit.train`) as ``run`` says, on ``train_set``."""
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
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "source": source,
        "teacher": {"name": cfg.teacher, "version": meta.served_version},
        "student": {"checkpoint": str(best), "arch": cfg.arch, "dims": ckpt["dims"], "version": ckpt["version"], "best_epoch": ckpt["epoch"], "parameters": sum(p.numel() for p in model.parameters())},
        "refit": cfg.refit,
        "distill_music": cfg.distill_music,
        "groups": {k: sorted({group_of(t) for t in v}) for k, v in splits.items()},
        "tracks": {k: len(v) for k, v in splits.items()},
        "patches": {"train": len(train_ds), "mixed": mixes, "validation": len(val_ds), "held_out": len(track_of)},
        "init": cfg.init,
        "skipped": failed,
        "mood_stage": mood_figures,
        "epochs_run": int(torch.load(Path(cfg.out_dir) / "last.pt", map_location="cpu", weights_only=False)["epoch"]) + 1 if cfg.epochs else 0,
        "mix_stage": {"epochs": cfg.mix_epochs, "mixes": mixes, "lr": cfg.mix_lr} if cfg.mix_epochs else None,
        "train_wall_s": round(time.monotonic() - started, 1),
        "held_out": compare(s_rows, t_rows, track_of),
    }
    if export_to is not None:
        report.update(export_student(best, cfg, splits, tracks, cache, outputs, teacher, export_to, check=source == DEBIAN))
    (Path(cfg.out_dir) / "distill_report.json").write_text(json.dumps(report, indent=2))
    return report


def mood_stage(best: Path, cfg: FitConfig, tracks: list[Track], reference: list[Track], cache: FeatureCache, outputs: dict[str, dict[str, np.ndarray]], teacher: Teacher, loss_fn: nn.Module) -> tuple[Path, list[dict[str, float]]]:
    """The mood stage (:mod:`training.mood_stage`) from checkpoint ``best`` over ``tracks``,
    the student's families through its own calibration over ``reference`` at the start:
    (<out_dir>/mood.pt, the figures of each of its epochs)."""
    model, ckpt = load_checkpoint(best)
    grid = TeacherPatches(tracks, cache, outputs, teacher.meta.outputs, grid_only=True)
    taxonomy = load_taxonomy(teacher.meta)
    _, calibration = student_calibration(model, teacher.meta, reference, cache, outputs)
    own = replace(taxonomy, calibration=Calibration.from_json(calibration))
    targets = [
        TrackTarget(partial(grid.track_patches, t), torch.from_numpy(grid.targets[t]), torch.from_numpy(family_scores(taxonomy, _teacher_track(outputs[track.source], teacher.meta))))
        for t, track in enumerate(tracks)
    ]  # fmt: skip
    figures: list[dict[str, float]] = []
    writer = tensorboard_writer(Path(cfg.out_dir))

    def on_epoch(epoch: int, values: dict[str, float]) -> None:
        figures.append({"epoch": epoch, **{k: round(v, 5) for k, v in values.items()}})
        for key, value in values.items():
            writer.add_scalar(f"mood_stage/{key}", value, epoch)
        print(f"mood epoch {epoch}: patch loss {values['patch_loss']:.4f}, mood loss {values['mood_loss']:.4f}, leading mood as the teacher's on {values['leading_same']:.1%} of {len(targets)} training tracks (as trained)", flush=True)

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
    save_checkpoint(path, model.eval(), arch=ckpt["arch"], labels=ckpt["labels"], version=version, source=ckpt["source"], **{k: v for k, v in ckpt.items() if k not in named}, mood_stage=figures)
    return path, figures


def mix_stage(best: Path, cfg: FitConfig, patches: TeacherPatches, teacher: Teacher, loop: Callable[[FitConfig, Dataset, nn.Module], Path]) -> tuple[Path, int]:
    """The mix stage (module doc) from checkpoint ``best``: ``loop`` (the main loop) over
    ``patches`` and ``cfg.mixed_patches`` mixes of them, for ``mix_epochs`` at ``mix_lr``, into
    <out_dir>/mix: (its best.pt, the number of mixes)."""
    mixed = MixedPatches(patches, cfg.mixed_patches, teacher, seed=cfg.seed, workers=cfg.teacher_workers, progress=cfg.progress)
    seed_everything(cfg.seed)  # the stage is the same run whatever ran before it in the process
    model, ckpt = student_from(best, cfg, cfg.dims)
    stage = replace(cfg, epochs=cfg.mix_epochs, lr=cfg.mix_lr, unfreeze_epoch=0, cosine_cycles=[], out_dir=str(Path(cfg.out_dir) / "mix"), version=cfg.version or f"{ckpt['version']}-mix")
    return loop(stage, ConcatDataset([patches, mixed]), model), len(mixed)


# -- served like any model ---------------------------------------------------------------------


def export_student(best: Path, cfg: FitConfig, splits: dict[str, list[Track]], reference: list[Track], cache: FeatureCache, outputs: dict[str, dict[str, np.ndarray]], teacher: Teacher, repository: Path, *, check: bool) -> dict[str, Any]:
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

    result: dict[str, Any] = {"exported": {"name": name, "directory": str(exported.directory.relative_to(repository.parent) if exported.directory.is_relative_to(repository.parent) else exported.directory), "parity_max_rel_diff": exported.max_rel_diff}}
    student_tax = load_taxonomy(read_meta(repository, name))
    teacher_tax = load_taxonomy(teacher.meta)
    result["moods_held_out"] = mood_agreement(splits["test"], scores, outputs, teacher, student_tax, teacher_tax)
    check, check_outputs, _ = _check_set(cfg, cache, teacher) if check else ([], {}, {})
    if check:
        figures, result["moods_check"] = _group_agreement(model, meta, check, cache, check_outputs, teacher, student_tax, teacher_tax)
        result["check"] = {"packages": sorted({group_of(t) for t in check}), **figures}
    return result


def student_calibration(model: nn.Module, meta: Any, reference: list[Track], cache: FeatureCache, outputs: dict[str, dict[str, np.ndarray]]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """({source: network -> [n_labels] track scores}, the calibration document) of ``model``
    (networks as ``meta``'s) over ``reference``, every group, as the teacher's was made."""
    from training.calibrate import TrackSet, calibration_for

    scores = {t.source: _student_track(model, cache, t.source, outputs[t.source], meta) for t in reference}
    files = sorted(scores)
    trackset = TrackSet(files=files, scores={n.name: np.stack([scores[f][n.name] for f in files]) for n in meta.networks}, embeddings={}, patches=np.zeros(len(files), int))
    uncalibrated = load_taxonomy(meta, DEFAULT_MOODS_FILE, calibrated=False)
    return scores, calibration_for(uncalibrated, trackset, sorted({group_of(t) for t in reference}))


def _check_set(cfg: FitConfig, cache: FeatureCache, teacher: Teacher) -> tuple[list[Track], dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """The reserved check packages' tracks with the teacher's outputs, and those skipped (source
    -> reason); nothing when they are not fetched."""
    if not debian_music.audio_files(debian_music.DEFAULT_DEST, "check"):
        return [], {}, {}
    check = distillation_set(DEBIAN, role="check")
    outputs, failed = teacher_outputs([t.source for t in check], cache, teacher, workers=cfg.teacher_workers, progress=cfg.progress)
    return [t for t in check if t.source not in failed], outputs, failed


def _group_agreement(student: nn.Module | Any, meta: Any, group: list[Track], cache: FeatureCache, outputs: dict[str, dict[str, np.ndarray]], teacher: Teacher, student_tax: Any, teacher_tax: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tag figures, mood figures) of ``student`` (see :func:`held_out_rows`; ``meta`` its
    networks) against the teacher on ``group``."""
    s_rows, t_rows, track_of = held_out_rows(student, group, cache, outputs, [n.scores_output for n in teacher.meta.networks])
    scores = {t.source: _by_network(s_rows[track_of == i].mean(axis=0), meta) for i, t in enumerate(group)}
    return {"tracks": len(group), **compare(s_rows, t_rows, track_of)}, mood_agreement(group, scores, outputs, teacher, student_tax, teacher_tax)


def agreement(cfg: FitConfig, source: str = DEBIAN, *, repository: Path = REPO_ROOT / "triton_models") -> dict[str, Any]:
    """The served student ``cfg.name`` (the ONNX graph in ``repository`` that Triton and
    onnxruntime run, with its calibration) against its teacher ``cfg.teacher``, on the held-out
    groups of ``cfg``'s split and on the reserved check packages when they are fetched: the
    report's ``held_out``, ``moods_held_out``, ``check`` and ``moods_check``, without training or
    exporting anything. Mels and teacher outputs come from the cache (computed once if missing)."""
    from pipeline.scoring import OnnxScorer

    if not cfg.name or not (repository / cfg.name / "config.pbtxt").is_file():
        raise ValueError(f"agreement: no student {cfg.name!r} in {repository}; name an exported student with the config's `name` (e.g. --config training/configs/musicnn_student.toml)")
    cache = open_cache(cfg)
    teacher = Teacher.from_repository(repository, cfg.teacher)
    student = OnnxScorer(repository, cfg.name)
    tracks = distillation_set(source)
    outputs, failed = teacher_outputs([t.source for t in tracks], cache, teacher, workers=cfg.teacher_workers, progress=cfg.progress)
    splits = split_by_group([t for t in tracks if t.source not in failed], cfg)
    sets = {"held_out": (splits["test"], outputs)}
    check, check_outputs, check_failed = _check_set(cfg, cache, teacher) if source == DEBIAN else ([], {}, {})
    if check:
        sets["check"] = (check, check_outputs)
    student_tax, teacher_tax = load_taxonomy(student.meta), load_taxonomy(teacher.meta)
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "source": source,
        "teacher": {"name": cfg.teacher, "version": teacher.meta.served_version},
        "student": {"name": cfg.name, "version": student.meta.served_version, "onnx": str(student.path)},
        "skipped": {**failed, **check_failed},
    }
    for key, (group, outs) in sets.items():
        figures, report[f"moods_{key}"] = _group_agreement(student, student.meta, group, cache, outs, teacher, student_tax, teacher_tax)
        report[key] = {"groups": sorted({group_of(t) for t in group}), **figures}
    return report


def _student_track(model: nn.Module, cache: FeatureCache, source: str, out: dict[str, np.ndarray], meta: Any) -> dict[str, np.ndarray]:
    """network -> [n_labels] the student's track scores on ``source`` (mean over the serving grid)."""
    grid = out["starts"][out["starts"] % PATCH_FRAMES == 0]
    return _by_network(_sigmoid(student_rows(model, cache.frames(source), grid)[0]).mean(axis=0), meta)


def _by_network(scores: np.ndarray, meta: Any) -> dict[str, np.ndarray]:
    """[..., n_labels of all networks] -> network -> its [..., n_labels] (the networks' order in ``meta``)."""
    return {name: scores[..., columns] for name, columns in label_columns(meta.networks).items()}


def _teacher_track(out: dict[str, np.ndarray], meta: Any, phase: int = 0) -> dict[str, np.ndarray] | None:
    """network -> [n_labels] the teacher's track scores over its patches starting ``phase``
    frames after the serving grid's (0: the grid itself); None when it scored none there."""
    rows = out["starts"] % PATCH_FRAMES == phase
    if not rows.any():
        return None
    return {n.name: out[n.scores_output][rows].mean(axis=0) for n in meta.networks}


#: A teacher lead (its first mood's score minus its second's, on the 0-1 calibrated scale) under
#: this is a near-tie. Moving the patches by half a patch (1.5 s) changes the teacher's family
#: scores by up to 0.026-0.044 (90th percentile over the Debian packages' training, validation and
#: held-out tracks, 2026-12-05), and of the 17 tracks whose leading mood that shift changed, 16
#: had a lead under 0.05.
NEAR_TIE = 0.05


def mood_agreement(tracks: list[Track], student: dict[str, dict[str, np.ndarray]], outputs: dict[str, dict[str, np.ndarray]], teacher: Teacher, student_tax: Any, teacher_tax: Any) -> dict[str, Any]:
    """Leading mood and top moods of student and teacher on ``tracks`` (each through its own
    calibrated taxonomy), and what the leading-mood figure reads against: the agreement where
    the teacher leads by at least ``NEAR_TIE``, and the teacher's agreement with itself on its
    patches shifted by half a patch (``TEACHER_HOP``; None without such patches)."""
    same, clear_same, top_overlap, rows, leads, shifted_same, shifted_n = 0, 0, [], [], [], 0, 0
    for t in tracks:
        s = mood_view(student_tax, student[t.source])
        m = mood_view(teacher_tax, _teacher_track(outputs[t.source], teacher.meta))
        same += s.leading_mood["mood"] == m.leading_mood["mood"]
        clear_same += s.leading_mood["clear"] == m.leading_mood["clear"]
        top_s, top_t = {x["mood"] for x in s.top_moods}, {x["mood"] for x in m.top_moods}
        top_overlap.append(len(top_s & top_t) / max(1, len(top_s | top_t)))
        scores = sorted(m.moods.values(), reverse=True)
        leads.append(scores[0] - (scores[1] if len(scores) > 1 else 0.0))
        rows.append({"track": t.key, "teacher": m.leading_mood["mood"], "student": s.leading_mood["mood"], "teacher_lead": round(leads[-1], 4)})
        shifted = _teacher_track(outputs[t.source], teacher.meta, TEACHER_HOP)
        if shifted is not None:
            shifted_same += mood_view(teacher_tax, shifted).leading_mood["mood"] == m.leading_mood["mood"]
            shifted_n += 1
    n = max(1, len(tracks))
    led = [r for r, lead in zip(rows, leads) if lead >= NEAR_TIE]
    return {
        "tracks": len(tracks),
        "leading_mood_same": same / n,
        "leading_mood_same_teacher_leads": {"tracks": len(led), "same": sum(r["teacher"] == r["student"] for r in led) / max(1, len(led)), "lead_at_least": NEAR_TIE},
        "teacher_shifted_same": shifted_same / shifted_n if shifted_n else None,
        "clear_same": clear_same / n,
        "top_moods_jaccard": float(np.mean(top_overlap)) if top_overlap else float("nan"),
        "disagreements": [r for r in rows if r["teacher"] != r["student"]],
    }

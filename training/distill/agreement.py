"""How far a student agrees with its teacher: tag figures per patch and track, and the leading mood
(``moodstream-train agreement``, and the report of every distillation run)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn

from pipeline.contracts.model_meta import label_columns
from pipeline.settings import DEFAULT_MODEL_REPOSITORY
from pipeline.stages.frontend import PATCH_FRAMES
from pipeline.stages.taxonomy import load_taxonomy, mood_view
from training.config import FitConfig
from training.data import Track, debian_music
from training.data.cache import FeatureCache
from training.data.sets import open_cache
from training.distill.data import DEBIAN, distillation_set, group_of, split_by_group
from training.distill.teacher import TEACHER_HOP, Teacher, teacher_outputs

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
    r = [
        np.corrcoef(student[:, i], teacher[:, i])[0, 1]
        for i in range(n_labels)
        if student[:, i].std() > 0 and teacher[:, i].std() > 0
    ]
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


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@torch.inference_mode()
def student_rows(
    model: nn.Module, frames: np.ndarray, starts: np.ndarray, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [n, n_labels], embedding [n, E]) of the patches starting at ``starts``."""
    logits, embeddings = [], []
    for i in range(0, len(starts), batch):
        patches = np.stack([frames[s : s + PATCH_FRAMES] for s in starts[i : i + batch]]).astype(np.float32)
        out, emb = model(torch.from_numpy(patches))
        logits.append(out.numpy())
        embeddings.append(emb.numpy())
    return np.concatenate(logits), np.concatenate(embeddings)


def held_out_rows(
    student: nn.Module | Any,
    tracks: list[Track],
    cache: FeatureCache,
    outputs: dict[str, dict[str, np.ndarray]],
    score_names: list[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SeparableStudent and teacher scores [n, n_labels] on the serving grid of ``tracks``, and each
    patch's track index. ``student``: a checkpoint's module, or a served model (an
    :class:`~pipeline.stages.scoring.OnnxScorer`, its networks' scores side by side)."""
    s_rows, t_rows, track_of = [], [], []
    for i, track in enumerate(tracks):
        out = outputs[track.source]
        grid = out["starts"] % PATCH_FRAMES == 0
        frames, starts = cache.frames(track.source), out["starts"][grid]
        if isinstance(student, nn.Module):
            s_rows.append(sigmoid(student_rows(student, frames, starts)[0]))
        else:
            scored = student.score_sync(np.stack([frames[s : s + PATCH_FRAMES] for s in starts]))  # float32, as cached
            s_rows.append(np.concatenate([scored[n.name].scores for n in student.meta.networks], axis=1))
        t_rows.append(np.concatenate([out[n][grid] for n in score_names], axis=1))
        track_of += [i] * int(grid.sum())
    return np.concatenate(s_rows), np.concatenate(t_rows), np.array(track_of)


def check_set(
    cfg: FitConfig, cache: FeatureCache, teacher: Teacher
) -> tuple[list[Track], dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """The reserved check packages' tracks with the teacher's outputs, and those skipped (source
    -> reason); nothing when they are not fetched."""
    if not debian_music.audio_files(debian_music.DEFAULT_DEST, "check"):
        return [], {}, {}
    check = distillation_set(DEBIAN, role="check")
    outputs, failed = teacher_outputs(
        [t.source for t in check], cache, teacher, workers=cfg.teacher_workers, progress=cfg.progress
    )
    return [t for t in check if t.source not in failed], outputs, failed


def group_agreement(
    student: nn.Module | Any,
    meta: Any,
    group: list[Track],
    cache: FeatureCache,
    outputs: dict[str, dict[str, np.ndarray]],
    teacher: Teacher,
    student_tax: Any,
    teacher_tax: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tag figures, mood figures) of ``student`` (see :func:`held_out_rows`; ``meta`` its
    networks) against the teacher on ``group``."""
    s_rows, t_rows, track_of = held_out_rows(
        student, group, cache, outputs, [n.scores_output for n in teacher.meta.networks]
    )
    scores = {t.source: by_network(s_rows[track_of == i].mean(axis=0), meta) for i, t in enumerate(group)}
    return {"tracks": len(group), **compare(s_rows, t_rows, track_of)}, mood_agreement(
        group, scores, outputs, teacher, student_tax, teacher_tax
    )


def agreement(cfg: FitConfig, source: str = DEBIAN, *, repository: Path = DEFAULT_MODEL_REPOSITORY) -> dict[str, Any]:
    """The served student ``cfg.name`` (the ONNX graph in ``repository`` that Triton and
    onnxruntime run, with its calibration) against its teacher ``cfg.teacher``, on the held-out
    groups of ``cfg``'s split and on the reserved check packages when they are fetched: the
    report's ``held_out``, ``moods_held_out``, ``check`` and ``moods_check``, without training or
    exporting anything. Mels and teacher outputs come from the cache (computed once if missing)."""
    from pipeline.stages.scoring import OnnxScorer

    if not cfg.name or not (repository / cfg.name / "config.pbtxt").is_file():
        raise ValueError(
            f"agreement: no student {cfg.name!r} in {repository}; name an exported student with the config's `name` (e.g. --config training/configs/musicnn_student.toml)"
        )
    cache = open_cache(cfg)
    teacher = Teacher.from_repository(repository, cfg.teacher)
    student = OnnxScorer(repository, cfg.name)
    tracks = distillation_set(source)
    outputs, failed = teacher_outputs(
        [t.source for t in tracks], cache, teacher, workers=cfg.teacher_workers, progress=cfg.progress
    )
    splits = split_by_group([t for t in tracks if t.source not in failed], cfg)
    sets = {"held_out": (splits["test"], outputs)}
    check, check_outputs, check_failed = check_set(cfg, cache, teacher) if source == DEBIAN else ([], {}, {})
    if check:
        sets["check"] = (check, check_outputs)
    student_tax, teacher_tax = load_taxonomy(student.meta), load_taxonomy(teacher.meta)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "source": source,
        "teacher": {"name": cfg.teacher, "version": teacher.meta.served_version},
        "student": {"name": cfg.name, "version": student.meta.served_version, "onnx": str(student.path)},
        "skipped": {**failed, **check_failed},
    }
    for key, (group, outs) in sets.items():
        figures, report[f"moods_{key}"] = group_agreement(
            student, student.meta, group, cache, outs, teacher, student_tax, teacher_tax
        )
        report[key] = {"groups": sorted({group_of(t) for t in group}), **figures}
    return report


def student_track(
    model: nn.Module, cache: FeatureCache, source: str, out: dict[str, np.ndarray], meta: Any
) -> dict[str, np.ndarray]:
    """network -> [n_labels] the student's track scores on ``source`` (mean over the serving grid)."""
    grid = out["starts"][out["starts"] % PATCH_FRAMES == 0]
    return by_network(sigmoid(student_rows(model, cache.frames(source), grid)[0]).mean(axis=0), meta)


def by_network(scores: np.ndarray, meta: Any) -> dict[str, np.ndarray]:
    """[..., n_labels of all networks] -> network -> its [..., n_labels] (the networks' order in ``meta``)."""
    return {name: scores[..., columns] for name, columns in label_columns(meta.networks).items()}


def teacher_track(out: dict[str, np.ndarray], meta: Any, phase: int = 0) -> dict[str, np.ndarray] | None:
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


def mood_agreement(
    tracks: list[Track],
    student: dict[str, dict[str, np.ndarray]],
    outputs: dict[str, dict[str, np.ndarray]],
    teacher: Teacher,
    student_tax: Any,
    teacher_tax: Any,
) -> dict[str, Any]:
    """Leading mood and top moods of student and teacher on ``tracks`` (each through its own
    calibrated taxonomy), and what the leading-mood figure reads against: the agreement where
    the teacher leads by at least ``NEAR_TIE``, and the teacher's agreement with itself on its
    patches shifted by half a patch (``TEACHER_HOP``; None without such patches)."""
    same, clear_same, top_overlap, rows, leads, shifted_same, shifted_n = 0, 0, [], [], [], 0, 0
    for t in tracks:
        s = mood_view(student_tax, student[t.source])
        m = mood_view(teacher_tax, teacher_track(outputs[t.source], teacher.meta))
        same += s.leading_mood["mood"] == m.leading_mood["mood"]
        clear_same += s.leading_mood["clear"] == m.leading_mood["clear"]
        top_s, top_t = {x["mood"] for x in s.top_moods}, {x["mood"] for x in m.top_moods}
        top_overlap.append(len(top_s & top_t) / max(1, len(top_s | top_t)))
        scores = sorted(m.moods.values(), reverse=True)
        leads.append(scores[0] - (scores[1] if len(scores) > 1 else 0.0))
        rows.append(
            {
                "track": t.key,
                "teacher": m.leading_mood["mood"],
                "student": s.leading_mood["mood"],
                "teacher_lead": round(leads[-1], 4),
            }
        )
        shifted = teacher_track(outputs[t.source], teacher.meta, TEACHER_HOP)
        if shifted is not None:
            shifted_same += mood_view(teacher_tax, shifted).leading_mood["mood"] == m.leading_mood["mood"]
            shifted_n += 1
    n = max(1, len(tracks))
    led = [r for r, lead in zip(rows, leads) if lead >= NEAR_TIE]
    return {
        "tracks": len(tracks),
        "leading_mood_same": same / n,
        "leading_mood_same_teacher_leads": {
            "tracks": len(led),
            "same": sum(r["teacher"] == r["student"] for r in led) / max(1, len(led)),
            "lead_at_least": NEAR_TIE,
        },
        "teacher_shifted_same": shifted_same / shifted_n if shifted_n else None,
        "clear_same": clear_same / n,
        "top_moods_jaccard": float(np.mean(top_overlap)) if top_overlap else float("nan"),
        "disagreements": [r for r in rows if r["teacher"] != r["student"]],
    }

"""``moodstream-train evaluate``: a trained checkpoint on the validation and test tracks.

Scores come from the served form of the model (the export wrapper: sigmoid for tags and V/A,
softmax for classes) on the patches the worker would cut, and a track's score is the mean over
its patches, as the worker reports it. Metrics per task:

    tags      ROC-AUC and PR-AUC per tag and their macro mean over the tags with positives and
              negatives in the test set (the MediaEval "Emotion and Theme Recognition" convention);
              F1 per tag at the threshold that maximised it on validation, and its macro mean;
              the prototype's binary tasks (relaxing-vs-energetic, happy-vs-sad) on tracks with
              exactly one of the two tags, deciding by the larger score: F1 macro and accuracy
    classes   accuracy, macro F1 and the confusion matrix (rows: true class)
    va        Pearson r, R^2 and RMSE per target (targets and predictions on the [0, 1] scale)
    va_steps  the same over every 500 ms step of every test patch with annotations

``report.json`` holds the numbers and ``report.png`` the figure (per-tag ROC-AUC bars, the
confusion matrix, or predicted-vs-true scatter and error histograms).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn import metrics as skm

from training.config import from_dict
from training.data import LabelledSet, Track
from training.data.cache import FeatureCache
from training.data.patches import serving_patches, step_targets
from training.models import activation, load_checkpoint
from training.serving import ServingGraph

#: The prototype's binary tasks on Jamendo mood/theme tags.
BINARY_TASKS = (("relaxing", "energetic"), ("happy", "sad"))


# -- metrics ---------------------------------------------------------------------------------


def activate(task: str, out: np.ndarray) -> np.ndarray:
    """Raw outputs -> served scores (the export wrapper's activation), numpy."""
    return activation(task, torch.from_numpy(out)).numpy()


def tag_metrics(labels: tuple[str, ...], scores: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Per-tag and macro ROC-AUC / PR-AUC over tags with both classes present."""
    per_tag = {}
    for i, label in enumerate(labels):
        y = truth[:, i]
        if 0 < y.sum() < len(y):
            per_tag[label] = {
                "roc_auc": float(skm.roc_auc_score(y, scores[:, i])),
                "pr_auc": float(skm.average_precision_score(y, scores[:, i])),
                "positives": int(y.sum()),
            }
    return {
        "roc_auc_macro": float(np.mean([v["roc_auc"] for v in per_tag.values()])) if per_tag else float("nan"),
        "pr_auc_macro": float(np.mean([v["pr_auc"] for v in per_tag.values()])) if per_tag else float("nan"),
        "tags_evaluated": len(per_tag),
        "per_tag": per_tag,
    }


def f1_thresholds(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[n_labels] threshold maximising each tag's F1 (0.5 for a tag without positives)."""
    out = np.full(scores.shape[1], 0.5, np.float32)
    for i in range(scores.shape[1]):
        if truth[:, i].sum() == 0:
            continue
        precision, recall, thresholds = skm.precision_recall_curve(truth[:, i], scores[:, i])
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        out[i] = thresholds[int(np.argmax(f1[:-1]))]
    return out


def binary_tasks(labels: tuple[str, ...], scores: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    index = {label: i for i, label in enumerate(labels)}
    out = {}
    for a, b in BINARY_TASKS:
        if a not in index or b not in index:
            continue
        ia, ib = index[a], index[b]
        rows = truth[:, ia] != truth[:, ib]  # exactly one of the two tags
        if not rows.any():
            continue
        y = truth[rows, ia].astype(int)  # 1: a, 0: b
        pred = (scores[rows, ia] >= scores[rows, ib]).astype(int)
        out[f"{a}_vs_{b}"] = {
            "f1_macro": float(skm.f1_score(y, pred, average="macro", labels=[0, 1], zero_division=0)),
            "accuracy": float(skm.accuracy_score(y, pred)),
            "tracks": int(rows.sum()),
        }
    return out


def va_metrics(labels: tuple[str, ...], scores: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Pearson r, R^2 and RMSE per target; for va_steps the columns are grouped by target name."""
    out = {}
    for target in ("valence", "arousal"):
        cols = [i for i, label in enumerate(labels) if label.split("@")[0] == target]
        p, y = scores[:, cols].ravel(), truth[:, cols].ravel()
        r = float(np.corrcoef(p, y)[0, 1]) if len(p) > 1 and p.std() > 0 and y.std() > 0 else float("nan")
        out[target] = {
            "pearson_r": r,
            "r2": float(skm.r2_score(y, p)) if len(p) > 1 else float("nan"),
            "rmse": float(np.sqrt(np.mean((p - y) ** 2))),
            "n": len(p),
        }
    return out


def class_metrics(labels: tuple[str, ...], scores: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    pred = scores.argmax(axis=1)
    k = list(range(len(labels)))
    return {
        "accuracy": float(skm.accuracy_score(truth, pred)),
        "f1_macro": float(skm.f1_score(truth, pred, average="macro", labels=k, zero_division=0)),
        "confusion_matrix": skm.confusion_matrix(truth, pred, labels=k).tolist(),
        "labels": list(labels),
    }


def quick_metrics(task: str, labels: tuple[str, ...], scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """A few scalars per epoch (patch level) for the training log."""
    if task == "tags":
        m = tag_metrics(labels, scores, (truth > 0.5).astype(int))
        return {"roc_auc_macro": m["roc_auc_macro"], "pr_auc_macro": m["pr_auc_macro"]}
    if task == "classes":
        m = class_metrics(labels, scores, truth)
        return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}
    m = va_metrics(labels, scores, truth)
    return {f"{t}_{k}": m[t][k] for t in m for k in ("pearson_r", "r2")}


# -- figures ---------------------------------------------------------------------------------


def va_figure(labels: tuple[str, ...], scores: np.ndarray, truth: np.ndarray) -> plt.Figure:
    """Predicted-vs-true scatter and error histogram per target, Pearson r in the titles."""
    fig, axes = plt.subplots(2, 2, figsize=(8, 7))
    m = va_metrics(labels, scores, truth)
    for j, target in enumerate(("valence", "arousal")):
        cols = [i for i, label in enumerate(labels) if label.split("@")[0] == target]
        p, y = scores[:, cols].ravel(), truth[:, cols].ravel()
        ax = axes[0, j]
        ax.scatter(y, p, s=6, alpha=0.5)
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel=f"true {target}",
            ylabel=f"predicted {target}",
            title=f"{target}: r = {m[target]['pearson_r']:.3f}, R² = {m[target]['r2']:.3f}",
        )
        axes[1, j].hist(p - y, bins=30)
        axes[1, j].set(xlabel=f"{target} error (predicted - true)", ylabel="count")
    fig.tight_layout()
    return fig


def _figure(
    task: str, labels: tuple[str, ...], result: dict[str, Any], scores: np.ndarray, truth: np.ndarray
) -> plt.Figure:
    if task in ("va", "va_steps"):
        return va_figure(labels, scores, truth)
    if task == "classes":
        fig, ax = plt.subplots(figsize=(5, 4.5))
        cm = np.array(result["confusion_matrix"])
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center")
        ax.set(
            xticks=range(len(labels)),
            yticks=range(len(labels)),
            xticklabels=labels,
            yticklabels=labels,
            xlabel="predicted",
            ylabel="true",
            title=f"accuracy {result['accuracy']:.3f}",
        )
        fig.tight_layout()
        return fig
    per_tag = result["per_tag"]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(per_tag)), 4))
    names = sorted(per_tag, key=lambda t: -per_tag[t]["roc_auc"])
    ax.bar(range(len(names)), [per_tag[t]["roc_auc"] for t in names])
    ax.axhline(0.5, color="k", lw=1, ls="--")
    ax.set(
        xticks=range(len(names)),
        ylim=(0, 1),
        ylabel="ROC-AUC",
        title=f"ROC-AUC macro {result['roc_auc_macro']:.3f}, PR-AUC macro {result['pr_auc_macro']:.3f}",
    )
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    fig.tight_layout()
    return fig


# -- the command -----------------------------------------------------------------------------


@torch.inference_mode()
def score(
    serving: torch.nn.Module, patches: np.ndarray, device: torch.device | str = "cpu", batch: int = 64
) -> np.ndarray:
    """patches [n, PATCH_FRAMES, N_MELS] -> served scores [n, n_labels], ``batch`` patches a call."""
    return np.concatenate(
        [
            serving(torch.from_numpy(patches[i : i + batch]).to(device))[0].float().cpu().numpy()
            for i in range(0, len(patches), batch)
        ]
    )


@torch.inference_mode()
def predict(
    serving: torch.nn.Module, tracks: list[Track], task: str, cache: FeatureCache, batch: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, truth): per track (mean over its serving patches), or per annotated patch for va_steps."""
    scores, truth = [], []
    for track in tracks:
        patches, starts = serving_patches(track, cache)
        if task == "va_steps":
            keep = [i for i, s in enumerate(starts) if step_targets(track, int(s)) is not None]
            if not keep:
                continue
            patches = patches[keep]
            truth += [step_targets(track, int(starts[i])) for i in keep]
        out = score(serving, patches, batch=batch)
        if task == "va_steps":
            scores.append(out)
        else:
            scores.append(out.mean(axis=0, keepdims=True))
            truth.append(np.asarray(track.target))
    if not scores:
        return np.empty((0, 0), np.float32), np.empty((0,), np.float32)
    return np.concatenate(scores), np.stack(truth)


def evaluate(checkpoint: Path, out_dir: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on its data set (``overrides`` may move ``data_root`` etc.)."""
    from training.data.sets import load_labelled_set, open_cache

    model, ckpt = load_checkpoint(checkpoint)
    cfg = from_dict({**ckpt["config"], **(overrides or {}), "resume": ""})
    labelled: LabelledSet = load_labelled_set(cfg)
    if tuple(labelled.labels) != tuple(ckpt["labels"]):
        raise ValueError(f"{checkpoint} has labels {ckpt['labels'][:5]}..., the data set {labelled.labels[:5]}...")
    cache = open_cache(cfg)

    serving = ServingGraph([model]).eval()
    task, labels = ckpt["task"], tuple(ckpt["labels"])
    splits = {}
    for name in ("validation", "test"):
        failed = cache.prepare([t.source for t in labelled.splits[name]], progress=False)
        tracks = [t for t in labelled.splits[name] if t.source not in failed]
        splits[name] = (*predict(serving, tracks, task, cache), len(tracks))
    scores, truth, n_test = splits["test"]
    if not len(scores):
        raise ValueError("no test tracks to evaluate on")
    if task == "tags":
        result = tag_metrics(labels, scores, truth)
        val_scores, val_truth, _ = splits["validation"]
        thresholds = f1_thresholds(val_scores, val_truth) if len(val_scores) else np.full(len(labels), 0.5)
        f1 = skm.f1_score(truth, scores >= thresholds, average=None, zero_division=0)
        result["f1_macro"] = float(np.mean(f1))
        result["thresholds"] = {label: float(t) for label, t in zip(labels, thresholds)}
        for i, label in enumerate(labels):
            if label in result["per_tag"]:
                result["per_tag"][label]["f1"] = float(f1[i])
        result["binary_tasks"] = binary_tasks(labels, scores, truth)
    elif task == "classes":
        result = class_metrics(labels, scores, truth.astype(int))
    else:
        result = va_metrics(labels, scores, truth)
    report = {
        "checkpoint": str(checkpoint),
        "arch": ckpt["arch"],
        "task": task,
        "version": ckpt["version"],
        "epoch": ckpt.get("epoch"),
        "data": cfg.data,
        "tracks": {"validation": splits["validation"][2], "test": n_test},
        "metrics": result,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    fig = _figure(task, labels, result, scores, truth)
    fig.savefig(out_dir / "report.png", dpi=100)
    plt.close(fig)
    return report

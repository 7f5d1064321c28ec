"""Model architectures and the checkpoint format they share.

A checkpoint is a dict saved with ``torch.save``; it rebuilds its model on its own:

    arch        registry name ("musicnn", ...)
    dims        the architecture's dims dataclass as a dict
    state_dict  the weights
    labels      output names (tags, classes or targets), in output order
    task        "tags" (multi-label), "classes", "va" (valence/arousal) or "va_steps"
    frontend    pipeline.stages.frontend.frontend_constants() at training time
    version     model version string, carried into Triton and every output event
    source      where the weights came from (free text, for humans)

Training checkpoints add ``config``, ``epoch`` and ``optimizer``.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.stages.frontend import frontend_constants
from training.models.convgruformer import ConvGRUFormer, ConvGRUFormerDims
from training.models.lstm_va import LSTMVA, LSTMVADims
from training.models.musicnn import Musicnn, MusicnnDims
from training.models.musicnn_student import MusicnnStudent, MusicnnStudentDims
from training.models.resnet18 import ResNet18, ResNet18Dims
from training.models.resnet_va import ResNetVA, ResNetVADims
from training.models.separable_student import SeparableStudent, SeparableStudentDims

#: name -> (module, dims dataclass). Every module maps mel [B, PATCH_FRAMES, N_MELS] to
#: (outputs [B, dims.n_classes], embedding [B, E]) and has ``task`` (from its dims).
ARCHITECTURES: dict[str, tuple[type[nn.Module], type]] = {
    "musicnn": (Musicnn, MusicnnDims),
    "convgruformer": (ConvGRUFormer, ConvGRUFormerDims),
    "resnet_va": (ResNetVA, ResNetVADims),
    "lstm_va": (LSTMVA, LSTMVADims),
    "resnet18": (ResNet18, ResNet18Dims),
    "separable_student": (SeparableStudent, SeparableStudentDims),
    "musicnn_student": (MusicnnStudent, MusicnnStudentDims),
}
TASKS = ("tags", "classes", "va", "va_steps")


def activation(task: str, out: torch.Tensor) -> torch.Tensor:
    """Raw model outputs [B, n_labels] -> served scores: softmax for classes, sigmoid otherwise.
    V/A targets are trained scaled to [0, 1] through the same sigmoid, so every served score is
    in [0, 1] as the output event's schema requires."""
    return torch.softmax(out, dim=-1) if task == "classes" else torch.sigmoid(out)


def build(arch: str, dims: dict[str, Any] | None = None) -> nn.Module:
    """A fresh model of ``arch``; ``dims`` overrides the architecture's defaults."""
    try:
        cls, dims_cls = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}") from None
    known = {f.name for f in fields(dims_cls)}
    unknown = set(dims or {}) - known
    if unknown:
        raise ValueError(f"unknown dims for {arch}: {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in (dims or {}).items()}
    if values.get("task", "tags") not in TASKS:
        raise ValueError(f"unknown task {values['task']!r}; known: {TASKS}")
    return cls(dims_cls(**values))


def save_checkpoint(
    path: Path, model: nn.Module, *, arch: str, labels: list[str], version: str, source: str, **extra: Any
) -> None:
    """Write ``model`` with everything needed to rebuild and serve it (see module doc)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "arch": arch,
            "dims": asdict(model.dims),
            "state_dict": model.state_dict(),
            "labels": list(labels),
            "task": model.task,
            "frontend": frontend_constants(),
            "version": version,
            "source": source,
            **extra,
        },
        path,
    )


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, the checkpoint dict without its weights)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("frontend") != frontend_constants():
        raise ValueError(
            f"{path} was trained with frontend {ckpt.get('frontend')}, but this code computes {frontend_constants()}"
        )
    model = build(ckpt["arch"], ckpt["dims"])
    model.load_state_dict(ckpt.pop("state_dict"))
    return model.eval(), ckpt

"""The mood stage of a distillation (``mood_epochs``): the student learns the teacher's moods on whole tracks.

The patch loss (:class:`training.engine.DistillLoss`) matches each patch's logits and embedding,
but a track's leading mood is read from the track: the mean of its serving-grid patches'
scores, each mood tag through its calibration curve (an empirical CDF over the reference
music), each family's weighted mean through another (:mod:`pipeline.stages.taxonomy`). Near the top
two families often lie within a few hundredths of each other, and a small error where a curve
is steep turns the leader over. This stage follows the main loop with epochs over whole
training tracks:

    track   all its serving-grid patches (what the worker scores), forward and backward, the
            model in eval mode (batch norm keeps the main loop's statistics: a batch of one
            track's patches would normalise away what sets the track apart)
    loss    the patch loss on those patches
            + ``mood_weight`` x KL(softmax(teacher's families / T) || softmax(student's / T))
            each side's families as served: the teacher's through its calibration, the
            student's through its own (over the same reference music, from the stage's starting
            weights; export computes it again from the final ones). T = ``mood_temperature`` on
            the 0-1 family scale: a family a few hundredths from the leader counts, one far
            below hardly. (Through the teacher's calibration on both sides the student's track
            scores are pulled to the teacher's curves as a whole first: tried 2026-12-05, the
            leading moods of trained and held-out music both got worse.)
    step    ``mood_tracks_per_step`` tracks (gradients added one track at a time, so a long
            track costs no more memory than its own patches); AdamW at ``mood_lr``, annealed
            by a cosine to 0 over the stage

It runs on the CPU, whatever device the main loop used (about 9 min an epoch for 304 tracks on
2 cores).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.contracts.model_meta import Network, label_columns
from pipeline.stages.taxonomy import Taxonomy


def torch_cdf(quantiles: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:func:`pipeline.stages.taxonomy.cdf` in torch, differentiable in ``x``: quantiles [Q] (levels
    0..1), x [...] -> [...] in [0, 1]. The one difference: a value exactly on several equal
    quantiles gets the last one's level, not their middle (a student's mean of sigmoids never
    lands on one)."""
    n = len(quantiles)
    levels = torch.linspace(0.0, 1.0, n, dtype=x.dtype, device=x.device)
    j = (torch.searchsorted(quantiles, x.detach().contiguous(), right=True) - 1).clamp(0, n - 2)
    left, right = quantiles[j], quantiles[j + 1]
    width = right - left
    share = torch.where(width > 0, (x - left) / width.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
    out = levels[j] + share * (levels[j + 1] - levels[j])
    return torch.where(x > quantiles[-1], torch.ones_like(x), out).clamp(0.0, 1.0)


class FamilyScores:
    """A calibrated taxonomy's family scores in torch (float64, as the numpy original):
    track scores [..., n_labels of all ``networks`` side by side] -> [..., n_families]."""

    def __init__(self, taxonomy: Taxonomy, networks: tuple[Network, ...] | list[Network]) -> None:
        if taxonomy.calibration is None:
            raise ValueError(f"model {taxonomy.model}: the mood stage needs a calibrated taxonomy")
        columns = label_columns(networks)
        cal = taxonomy.calibration
        self.families = [
            (
                torch.tensor([columns[m.network].start + m.column for m in f.members]),
                torch.tensor([m.weight for m in f.members], dtype=torch.float64) / sum(m.weight for m in f.members),
                [torch.as_tensor(cal.tags[m.key], dtype=torch.float64) for m in f.members],
                torch.as_tensor(cal.families[f.name], dtype=torch.float64),
            )
            for f in taxonomy.families
        ]

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.double()
        out = []
        for columns, weights, tag_curves, family_curve in self.families:
            tags = torch.stack([torch_cdf(curve, scores[..., c]) for curve, c in zip(tag_curves, columns)], dim=-1)
            out.append(torch_cdf(family_curve, (tags * weights).sum(dim=-1)))
        return torch.stack(out, dim=-1)


@dataclass(frozen=True)
class TrackTarget:
    """One training track for the stage."""

    patches: Callable[[], torch.Tensor]  # -> its serving-grid patches [n, PATCH_FRAMES, N_MELS]
    target: torch.Tensor  # [n, n_labels + embedding width]: the patch loss's targets
    families: torch.Tensor  # [n_families]: the teacher's family scores (its calibration)


def mood_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)); student, teacher: [..., n_families]."""
    return F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="sum",
    ) / max(1, student[..., 0].numel())


def _track_step(
    model: nn.Module, track: TrackTarget, patch_loss: nn.Module, families: FamilyScores, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(patch loss, mood loss, the student's family scores [n_families]) of one track."""
    logits, embedding = model(track.patches())
    patch = patch_loss(torch.cat([logits, embedding], dim=-1), track.target)
    student = families(torch.sigmoid(logits).mean(dim=0))
    return patch, mood_loss(student, track.families, temperature), student


def tune_moods(
    model: nn.Module,
    tracks: list[TrackTarget],
    patch_loss: nn.Module,
    families: FamilyScores,
    *,
    epochs: int,
    lr: float,
    weight: float,
    temperature: float,
    tracks_per_step: int,
    weight_decay: float,
    grad_clip: float,
    seed: int,
    progress: bool,
    on_epoch: Callable[[int, dict[str, float]], None],
) -> None:
    """Train ``model`` in place for ``epochs`` over ``tracks`` (module doc). After each epoch
    ``on_epoch(epoch, figures)`` gets the epoch's mean patch loss, mood loss and the share of
    tracks whose leading family (through ``families``) was the teacher's, as trained."""
    from tqdm import tqdm

    model.eval()  # batch norm keeps its statistics; every parameter trains
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(tracks) / tracks_per_step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 + math.cos(math.pi * step / steps)) / 2)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(len(tracks))
        totals = np.zeros(3)
        bar = tqdm(
            range(0, len(order), tracks_per_step),
            desc=f"mood epoch {epoch}",
            unit="step",
            leave=False,
            disable=not progress,
        )
        for at in bar:
            batch = order[at : at + tracks_per_step]
            optimizer.zero_grad(set_to_none=True)
            for i in batch:
                track = tracks[i]
                patch, mood, student = _track_step(model, track, patch_loss, families, temperature)
                ((patch + weight * mood) / len(batch)).backward()
                totals += (patch.item(), mood.item(), float(student.argmax() == track.families.argmax()))
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
        on_epoch(epoch, dict(zip(("patch_loss", "mood_loss", "leading_same"), (totals / len(tracks)).tolist())))

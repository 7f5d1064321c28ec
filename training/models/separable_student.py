"""A small student for the CPU tier: depthwise-separable convolutions over the mel patch, one
trunk for every network it imitates.

    mel patch [B, T, 96] -> [B, 1, 96, T] (frequency as height)
      -> stem: conv 3x3 stride 2, BN, ReLU                                     -> [B, w0, 48, T/2]
      -> stages i = 1..: depthwise-separable blocks (dw 3x3 + BN + ReLU, pw 1x1 + BN + ReLU;
         identity shortcut where the shape allows), the first of each stage strided 2
                                                                               -> [B, wN, 96/2^(N+1), T']
      -> frequency kept (flattened into channels: where in the spectrum matters for timbre),
         mean and max over time                                              -> [B, 2 * wN * F']
      -> dense ``hidden`` + ReLU (the shared representation) -> dropout
      -> logits [B, n_classes]: every imitated network's tags, in order (``label_counts``)
      -> embedding [B, sum(embedding_dims)]: every network's embedding, predicted

The distillation (``moodstream-train distill``) trains the logits against the teacher's logits
and the embedding against its embeddings; export splits both per network (``label_counts``,
``embedding_dims``) so the served entry has the teacher's outputs, names and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.stages.frontend import N_MELS


@dataclass(frozen=True)
class SeparableStudentDims:
    n_classes: int = 100
    task: str = "tags"
    widths: tuple[int, ...] = (24, 48, 96, 160)  # stem, then one stage per further width
    blocks: tuple[int, ...] = (1, 2, 2)  # separable blocks per stage after the stem
    hidden: int = 384
    label_counts: tuple[int, ...] = (50, 50)  # per imitated network, summing to n_classes
    embedding_dims: tuple[int, ...] = (200, 200)  # per imitated network
    dropout: float = 0.1


def _bn_relu(c: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]


class SeparableBlock(nn.Module):
    """dw 3x3 (stride) -> BN -> ReLU -> pw 1x1 -> BN -> ReLU, plus x when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
            *_bn_relu(c_in),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            *_bn_relu(c_out),
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class SeparableStudent(nn.Module):
    def __init__(self, dims: SeparableStudentDims) -> None:
        super().__init__()
        if len(dims.blocks) != len(dims.widths) - 1:
            raise ValueError(f"blocks {dims.blocks} need one entry per width after the stem {dims.widths}")
        if sum(dims.label_counts) != dims.n_classes or len(dims.label_counts) != len(dims.embedding_dims):
            raise ValueError(
                f"label_counts {dims.label_counts} must sum to n_classes {dims.n_classes} and match embedding_dims {dims.embedding_dims}"
            )
        self.dims = dims
        self.task = dims.task
        layers: list[nn.Module] = [nn.Conv2d(1, dims.widths[0], 3, 2, 1, bias=False), *_bn_relu(dims.widths[0])]
        for c_in, c_out, n in zip(dims.widths, dims.widths[1:], dims.blocks):
            layers += [SeparableBlock(c_in if b == 0 else c_out, c_out, 2 if b == 0 else 1) for b in range(n)]
        self.trunk = nn.Sequential(*layers)
        freq = N_MELS
        for _ in dims.widths:
            freq = (freq + 1) // 2
        self.head = nn.Sequential(
            nn.Linear(2 * dims.widths[-1] * freq, dims.hidden), nn.ReLU(inplace=True), nn.Dropout(dims.dropout)
        )
        self.logits = nn.Linear(dims.hidden, dims.n_classes)
        self.embedding = nn.Linear(dims.hidden, sum(dims.embedding_dims))

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, T, N_MELS] -> (logits [B, n_classes], embedding [B, sum(embedding_dims)])."""
        x = self.trunk(mel.transpose(1, 2).unsqueeze(1))  # [B, C, F', T']
        x = x.flatten(1, 2)  # [B, C * F', T']
        h = self.head(torch.cat([x.mean(dim=-1), x.amax(dim=-1)], dim=1))
        return self.logits(h), self.embedding(h)

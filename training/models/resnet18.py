"""ResNet-18 (He et al., 2016) on one-channel mel patches, written out (no torchvision).

    mel patch [B, T, 96] -> [B, 1, T, 96]
      -> stem: conv 7x7 stride 2, batch norm, ReLU, max pool 3x3 stride 2     -> [B, w0, T/4, 24]
      -> four stages of BasicBlocks (two 3x3 convs + identity), blocks (2, 2, 2, 2),
         widths (64, 128, 256, 512); stages 2..4 halve time and frequency    -> [B, w3, T/32, 3]
      -> adaptive average pool (the embedding, [B, w3]) -> dropout -> dense n_classes

The prototype classified happy / angry / sad / relaxed (``task="classes"``); the same network
serves any task (tags as a distillation student, ``va`` regression).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ResNet18Dims:
    n_classes: int = 4
    task: str = "classes"
    widths: tuple[int, ...] = (64, 128, 256, 512)  # channels per stage
    blocks: tuple[int, ...] = (2, 2, 2, 2)  # BasicBlocks per stage
    dropout: float = 0.3


class BasicBlock(nn.Module):
    """x -> conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus a (projected) shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet_trunk(widths: tuple[int, ...], blocks: tuple[int, ...]) -> nn.Sequential:
    """Stem and residual stages: [B, 1, T, F] -> [B, widths[-1], T', F'] (shared with ResNetVA)."""
    layers: list[nn.Module] = [
        nn.Conv2d(1, widths[0], 7, 2, 3, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    c_in = widths[0]
    for stage, (width, n) in enumerate(zip(widths, blocks)):
        for b in range(n):
            layers.append(BasicBlock(c_in, width, 2 if stage > 0 and b == 0 else 1))
            c_in = width
    return nn.Sequential(*layers)


class ResNet18(nn.Module):
    """mel [B, T, 96] -> (logits [B, n_classes], embedding [B, widths[-1]])."""

    def __init__(self, dims: ResNet18Dims) -> None:
        super().__init__()
        self.dims = dims
        self.task = dims.task
        self.trunk = resnet_trunk(dims.widths, dims.blocks)
        self.dropout = nn.Dropout(dims.dropout)
        self.head = nn.Linear(dims.widths[-1], dims.n_classes)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.trunk(mel.unsqueeze(1)).mean(dim=(2, 3))  # adaptive average pool
        return self.head(self.dropout(embedding)), embedding

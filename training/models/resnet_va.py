"""The residual CNN that regressed static valence and arousal on DEAM.

    mel patch [B, T, 96] -> [B, 1, T, 96]
      -> stem: conv 7x7 stride 2, batch norm, ReLU, max pool
      -> four residual stages 64 -> 128 -> 256 -> 512 (one BasicBlock each)
      -> adaptive average pool (the embedding) -> dropout -> dense 2: (valence, arousal)

Targets are DEAM's ratings scaled to [0, 1] (see :mod:`training.data.deam`); the serving
wrapper applies a sigmoid, so served scores stay in [0, 1] like every other model's.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.models.resnet18 import ResNet18


@dataclass(frozen=True)
class ResNetVADims:
    n_classes: int = 2  # outputs: valence, arousal
    task: str = "va"
    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    dropout: float = 0.5


class ResNetVA(ResNet18):
    """mel [B, T, 96] -> (outputs [B, n_classes], embedding [B, widths[-1]]): the ResNet18 body
    with the prototype's one block per stage and a valence/arousal head."""

    def __init__(self, dims: ResNetVADims) -> None:
        super().__init__(dims)

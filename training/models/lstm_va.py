"""The LSTM that followed valence and arousal every 500 ms (DEAM's dynamic annotations).

    mel patch [B, T, 96]
      -> batch norm per mel band
      -> LSTM, two layers of 64 over the T frames                         -> [B, T, 64]
      -> mean over the frames of each 500 ms step (31.25 frames)          -> [B, n_steps, 64]
      -> dense per step: (valence, arousal)                               -> [B, n_steps, 2]
      -> flattened step-major: valence@0.0s, arousal@0.0s, valence@0.5s, ... [B, 2 * n_steps]

A 2.992 s patch holds six steps starting at 0.0, 0.5, ..., 2.5 s (the last is 0.492 s long).
Flattening keeps the serving contract (``scores`` [batch, n_labels]); the labels name the step
(``step_labels``). The embedding is the mean LSTM output over the patch, [B, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.stages.frontend import FRAMES_PER_SECOND, PATCH_FRAMES, PATCH_SECONDS

STEP_S = 0.5  # seconds per annotation step (DEAM's 2 Hz)
N_STEPS = int(PATCH_SECONDS // STEP_S) + (PATCH_SECONDS % STEP_S > 0)  # 6
TARGETS = ("valence", "arousal")


def step_labels(n_steps: int = N_STEPS) -> list[str]:
    """Output names in output order: ["valence@0.0s", "arousal@0.0s", "valence@0.5s", ...]."""
    return [f"{t}@{k * STEP_S:.1f}s" for k in range(n_steps) for t in TARGETS]


def step_bounds(n_steps: int = N_STEPS) -> list[tuple[int, int]]:
    """[(first frame, end frame)] of each step within a patch."""
    edges = [min(PATCH_FRAMES, round(k * STEP_S * FRAMES_PER_SECOND)) for k in range(n_steps + 1)]
    return list(zip(edges[:-1], edges[1:]))


@dataclass(frozen=True)
class LSTMVADims:
    n_classes: int = 2 * N_STEPS  # outputs: 2 targets per step
    task: str = "va_steps"
    n_mels: int = 96
    hidden: int = 64
    layers: int = 2
    dropout: float = 0.2


class LSTMVA(nn.Module):
    """mel [B, T, 96] -> (outputs [B, n_classes] step-major, embedding [B, hidden])."""

    def __init__(self, dims: LSTMVADims) -> None:
        super().__init__()
        if dims.task != "va_steps" or dims.n_classes != 2 * N_STEPS:
            raise ValueError(
                f"LSTMVA predicts {N_STEPS} steps of (valence, arousal): task va_steps, n_classes {2 * N_STEPS}"
            )
        self.dims = dims
        self.task = dims.task
        self.norm = nn.BatchNorm1d(dims.n_mels)
        self.lstm = nn.LSTM(
            dims.n_mels, dims.hidden, dims.layers, batch_first=True, dropout=dims.dropout if dims.layers > 1 else 0.0
        )
        self.head = nn.Linear(dims.hidden, len(TARGETS))
        self.bounds = step_bounds()

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = self.lstm(self.norm(mel.transpose(1, 2)).transpose(1, 2))  # [B, T, hidden]
        steps = torch.stack([h[:, a:b].mean(dim=1) for a, b in self.bounds], dim=1)  # [B, n_steps, hidden]
        return self.head(steps).flatten(1), h.mean(dim=1)

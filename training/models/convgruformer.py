"""ConvGRUFormer: convolutions shrink the mel sequence, then a GRU, then Transformer encoder layers.

    mel patch [B, T, 96] -> batch norm -> [B, 1, T, 96]
      -> conv blocks (3x3 conv, batch norm, ReLU, 2x2 max pool), channels (32, 64, 128)
                                                            -> [B, 128, T/8, 96/8]
      -> frequency folded into features, linear to d_model  -> [B, T/8, d_model]
      -> bidirectional GRU (d_model/2 per direction)         -> [B, T/8, d_model]
      -> Transformer encoder layers (pre-norm self-attention + feed-forward)
      -> mean over time (the embedding, [B, d_model]) -> dropout -> dense n_classes

The prototype tagged MTG-Jamendo mood/theme (``task="tags"``). Attention is written with
plain matmuls so TorchScript tracing and ONNX export see ordinary ops (PyTorch's fused
encoder fast path has no ONNX form).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ConvGRUFormerDims:
    n_classes: int = 56
    task: str = "tags"
    n_mels: int = 96
    conv_channels: tuple[int, ...] = (32, 64, 128)  # each block halves time and frequency
    d_model: int = 128
    heads: int = 4
    layers: int = 2  # Transformer encoder layers
    ff: int = 256  # feed-forward width
    dropout: float = 0.2


class _EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer: x + MHA(LN(x)), then x + FF(LN(x)). [B, S, D] -> [B, S, D]."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, d))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)  # [B, H, S, S]
        y = (att @ v).transpose(1, 2).reshape(b, s, d)
        x = x + self.dropout(self.proj(y))
        return x + self.dropout(self.ff(self.ln2(x)))


class ConvGRUFormer(nn.Module):
    """mel [B, T, n_mels] -> (logits [B, n_classes], embedding [B, d_model])."""

    def __init__(self, dims: ConvGRUFormerDims) -> None:
        super().__init__()
        if dims.d_model % dims.heads or dims.d_model % 2:
            raise ValueError("d_model must be even and divisible by heads")
        self.dims = dims
        self.task = dims.task
        self.input_bn = nn.BatchNorm2d(1)
        blocks: list[nn.Module] = []
        c_in, freq = 1, dims.n_mels
        for c in dims.conv_channels:
            blocks += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, freq = c, freq // 2
        self.convs = nn.Sequential(*blocks)
        self.to_model = nn.Linear(c_in * freq, dims.d_model)
        self.gru = nn.GRU(dims.d_model, dims.d_model // 2, batch_first=True, bidirectional=True)
        self.encoder = nn.ModuleList(
            _EncoderLayer(dims.d_model, dims.heads, dims.ff, dims.dropout) for _ in range(dims.layers)
        )
        self.ln = nn.LayerNorm(dims.d_model)
        self.dropout = nn.Dropout(dims.dropout)
        self.head = nn.Linear(dims.d_model, dims.n_classes)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.convs(self.input_bn(mel.unsqueeze(1)))  # [B, C, T', F']
        x = self.to_model(x.permute(0, 2, 1, 3).flatten(2))  # [B, T', d_model]
        x, _ = self.gru(x)
        for layer in self.encoder:
            x = layer(x)
        embedding = self.ln(x).mean(dim=1)
        return self.head(self.dropout(embedding)), embedding

"""musicnn (Pons & Serra, 2019) in PyTorch, layer for layer as the original TensorFlow graph.

    mel patch [B, T, 96]
      -> batch norm
      -> front-end: timbral convs 7x38 and 7x67 (204 filters each, "valid" in frequency)
                    temporal convs 128x1, 64x1, 32x1 (51 filters each, "same" in time)
                    each: ReLU, batch norm, max over frequency            -> [B, 561, T]
      -> mid-end:   three 7-wide convs over time with 64 filters, ReLU, batch norm;
                    the 2nd and 3rd residual; front-end and mid-end concatenated -> [B, 753, T]
      -> back-end:  max and mean over time (interleaved as the original flattens them),
                    batch norm, dense 200 + ReLU, batch norm (the embedding),
                    dense n_classes (logits; sigmoid gives tag probabilities)

Batch norms use TensorFlow's epsilon (1e-3) so converted weights give the original outputs.
The forward pass works on any number of frames T >= 1; the pretrained weights saw T = 187.

``Musicnn.for_serving()`` is the same function rearranged for inference (the exporter writes it):
each front-end branch pools over frequency before its ReLU and batch norm, which is exact
because both are monotone per channel (see ``_PooledBranch``), so they touch 1/59 of the values,
and channels that batch norm scales to nothing are constants, not convolutions; on a CPU that
and ONNX Runtime's blocked-layout pooling take a patch of both networks from 45 to 32 ms.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: tf.compat.v1.layers.batch_normalization's default epsilon.
_TF_BN_EPS = 1e-3


@dataclass(frozen=True)
class MusicnnDims:
    """Everything needed to rebuild the network; saved inside every checkpoint."""

    n_mels: int = 96
    n_classes: int = 50
    task: str = "tags"  # what the outputs mean (a distillation student is always "tags")
    timbral_filters: int = 204  # int(1.6 * 128)
    timbral_heights: tuple[float, ...] = (0.4, 0.7)  # kernel height as a fraction of n_mels
    timbral_width: int = 7  # frames
    temporal_filters: int = 51  # int(1.6 * 32)
    temporal_lengths: tuple[int, ...] = (128, 64, 32)  # frames
    midend_filters: int = 64
    midend_width: int = 7  # frames
    embedding_dim: int = 200
    dropout: float = 0.5  # training only; the original used 0.5 before both dense layers


class _Branch(nn.Module):
    """conv -> ReLU -> batch norm -> max over frequency: [B, 1, T, F] -> [B, C, T]."""

    def __init__(self, filters: int, kernel: tuple[int, int], time_pad: tuple[int, int]) -> None:
        super().__init__()
        self.time_pad = time_pad
        self.conv = nn.Conv2d(1, filters, kernel)
        self.bn = nn.BatchNorm2d(filters, eps=_TF_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, *self.time_pad))  # pads time only: frequency is pooled away
        return self.bn(F.relu(self.conv(x))).amax(dim=3)


class _PooledBranch(nn.Module):
    """``_Branch`` rearranged for inference, same outputs: [B, 1, T, F] -> [B, C, T].

    A branch computes max_f(a * relu(z) + c) per channel, z the convolution, (a, c) the batch
    norm's scale and shift. ReLU is monotone, so for a >= 0 that is a * relu(max_f z) + c, and
    for a < 0 it is a * relu(min_f z) + c = a * relu(-max_f(-z)) + c: the convolution of the
    a < 0 channels is negated and the sign s restores it after the max. The max is a MaxPool
    over the whole frequency axis with the filter count rounded up to a multiple of 16 (zero
    filters, cut off after): ONNX Runtime's CPU pooling keeps the convolution's blocked layout
    (16 channels a block) only for such counts, which saves reordering the largest tensor of
    the network. The time padding stays before the convolution, as in ``_Branch``.

    A channel the input cannot move (|a| times the most its weights can move z away from the
    bias for inputs within ``input_max`` < ``DEAD_TOLERANCE``) outputs a * relu(bias) + c
    whatever the input: it is not convolved, its constant is put back in its place. Training
    left most of musicnn's filters so: the MSD network's weights are zero in 180 of its 204 and
    190 of its 204 timbral filters (the batch norm's scale of many others is near zero too).
    """

    _CHANNEL_BLOCK = 16
    DEAD_TOLERANCE = 1e-7  # most a dropped channel can change its own output by

    def __init__(self, branch: _Branch, n_mels: int, input_max: float) -> None:
        super().__init__()
        bn, conv = branch.bn, branch.conv
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            # The most the input can move a channel's convolution away from its bias, and so
            # (ReLU and the max being 1-Lipschitz) the most it can move the channel's output.
            reach = scale.abs() * conv.weight.flatten(1).abs().sum(dim=1) * input_max
            moves = reach >= self.DEAD_TOLERANCE
            live, dead = moves.nonzero().flatten(), (~moves).nonzero().flatten()
            sign = torch.where(scale[live] < 0, -1.0, 1.0)
            self.channels = len(live)
            padded = -(-self.channels // self._CHANNEL_BLOCK) * self._CHANNEL_BLOCK
            self.conv = nn.Conv2d(1, padded, conv.kernel_size)
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[: self.channels] = conv.weight[live] * sign[:, None, None, None]
            self.conv.bias[: self.channels] = conv.bias[live] * sign
        self.time_pad = branch.time_pad
        self.freq_out = n_mels - conv.kernel_size[1] + 1  # "valid" in frequency
        self.register_buffer("sign", sign[None, :, None])
        self.register_buffer("scale", scale[live][None, :, None])
        self.register_buffer("shift", shift[live][None, :, None])
        # what a constant channel outputs: its batch norm of ReLU(bias), the input's part nil
        self.register_buffer(
            "dead_value", (scale[dead] * F.relu(conv.bias[dead]) + shift[dead]).detach()[None, :, None]
        )
        # Computed channels first, then the constant ones: this puts them back in order.
        self.register_buffer("order", torch.argsort(torch.cat([live, dead])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(F.pad(x, (0, 0, *self.time_pad)))  # [B, C_padded, T, F_out]
        peak = F.max_pool2d(z, (1, self.freq_out)).flatten(2)[:, : self.channels]  # [B, C_live, T]
        out = self.scale * F.relu(self.sign * peak) + self.shift
        if not self.dead_value.shape[1]:
            return out
        constant = self.dead_value.expand(out.shape[0], -1, out.shape[2])
        return torch.cat([out, constant], dim=1)[:, self.order]


class _MidendLayer(nn.Module):
    """7-wide conv over time -> ReLU -> batch norm: [B, C_in, T] -> [B, C_out, T]."""

    def __init__(self, c_in: int, c_out: int, width: int) -> None:
        super().__init__()
        self.pad = ((width - 1) // 2, width - 1 - (width - 1) // 2)
        self.conv = nn.Conv1d(c_in, c_out, width)
        self.bn = nn.BatchNorm1d(c_out, eps=_TF_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(F.pad(x, self.pad))))


class Musicnn(nn.Module):
    """mel [B, T, n_mels] -> (logits [B, n_classes], embedding [B, embedding_dim])."""

    def __init__(self, dims: MusicnnDims) -> None:
        super().__init__()
        self.dims = dims
        self.task = dims.task
        self.input_bn = nn.BatchNorm2d(1, eps=_TF_BN_EPS)
        w = dims.timbral_width
        timbral_pad = ((w - 1) // 2, w - 1 - (w - 1) // 2)
        branches = [_Branch(dims.timbral_filters, (w, int(h * dims.n_mels)), timbral_pad) for h in dims.timbral_heights]
        # TensorFlow's "same" padding puts the odd extra row at the end.
        branches += [
            _Branch(dims.temporal_filters, (k, 1), ((k - 1) // 2, k - 1 - (k - 1) // 2)) for k in dims.temporal_lengths
        ]
        self.frontend = nn.ModuleList(branches)
        front = dims.timbral_filters * len(dims.timbral_heights) + dims.temporal_filters * len(dims.temporal_lengths)
        m = dims.midend_filters
        self.midend = nn.ModuleList(
            [_MidendLayer(front, m, dims.midend_width)] + [_MidendLayer(m, m, dims.midend_width) for _ in range(2)]
        )
        pooled = 2 * (front + 3 * m)  # max and mean of every channel
        self.pool_bn = nn.BatchNorm1d(pooled, eps=_TF_BN_EPS)
        self.dense = nn.Linear(pooled, dims.embedding_dim)
        self.dense_bn = nn.BatchNorm1d(dims.embedding_dim, eps=_TF_BN_EPS)
        self.classifier = nn.Linear(dims.embedding_dim, dims.n_classes)
        self.dropout = nn.Dropout(dims.dropout)

    def for_serving(self, mel_max: float) -> Musicnn:
        """A copy for inference (eval mode) computing the same function with less work, for
        inputs in [0, ``mel_max``] (the frontend's bound, ``features.log_mel_max()``): see
        ``_PooledBranch``. Its outputs equal this network's to float rounding (export checks)."""
        served = copy.deepcopy(self).eval()
        with torch.no_grad():
            a = float(self.input_bn.weight[0] / torch.sqrt(self.input_bn.running_var[0] + self.input_bn.eps))
            b = float(self.input_bn.bias[0] - self.input_bn.running_mean[0] * a)
        input_max = max(abs(b), abs(a * mel_max + b))  # |x| after the input batch norm
        served.frontend = nn.ModuleList(
            [_PooledBranch(branch, self.dims.n_mels, input_max) for branch in self.frontend]
        )
        return served

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.input_bn(mel.unsqueeze(1))  # [B, 1, T, F]
        front = torch.cat([branch(x) for branch in self.frontend], dim=1)  # [B, 561, T]
        c1 = self.midend[0](front)
        c2 = self.midend[1](c1) + c1
        c3 = self.midend[2](c2) + c2
        features = torch.cat([front, c1, c2, c3], dim=1)  # [B, 753, T]
        # The original concatenates [max, mean] on a trailing axis and flattens, which
        # interleaves them: max_0, mean_0, max_1, mean_1, ...
        pooled = torch.stack([features.amax(dim=2), features.mean(dim=2)], dim=2).flatten(1)
        hidden = F.relu(self.dense(self.dropout(self.pool_bn(pooled))))
        embedding = self.dense_bn(hidden)
        return self.classifier(self.dropout(embedding)), embedding

"""The CPU tier's student: musicnn's own networks pruned and factorised, then distilled.

Per imitated network, musicnn's geometry (:class:`MusicnnDims`' defaults) with fewer and cheaper
front-end filters, which are where musicnn spends 90 % of its arithmetic:

    mel patch [B, T, 96] -> input affine (the teacher's input batch norm)
      -> front-end branch b (timbral 7x38, 7x67; temporal 128x1, 64x1, 32x1, as musicnn's):
           conv to ``ranks[b]`` basis maps, then 1x1 to ``channels[b]`` filters: a rank-r
           factorisation of the teacher's filters (rank 0: one conv straight to the filters),
           at every ``frontend_stride``-th frame and band             -> [B, C_b, T/s_t, F_b/s_f]
           max over frequency, signed ReLU, per-channel affine (the teacher's batch norm; see
           musicnn's ``_PooledBranch`` for why pooling first and the sign are exact), each
           frame taking its nearest computed one                      -> [B, C_b, T]
      -> mid-end: musicnn's three 7-wide convs over time (ReLU, affine), 2nd and 3rd residual
      -> back-end: max and mean over time -> dense 200 (the teacher's pooling batch norm folded
         in) -> ReLU -> affine (its dense batch norm: the embedding [B, 200]) -> dense (logits)
    all networks' logits and embeddings, concatenated:
         ([B, sum(label_counts)], [B, sum(embedding_dims)])

:func:`load_teachers` fills it from trained :class:`Musicnn` networks and real patches: each
branch keeps its ``channels[b]`` most important filters (a filter's spread of output on the music
times the weight of its paths downstream), the others become their mean on the music, folded
into the biases downstream, and the kept filters are factorised by an SVD weighted the same way.
With every filter kept and no factorisation the result is the teacher's function (tested);
``moodstream-train distill`` then trains it on the teacher's outputs. Batch norms are fixed
affine maps here, trainable but free of batch statistics, so fine-tuning starts from the
teacher's function instead of one renormalised by each batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.models.musicnn import Musicnn, MusicnnDims, _Branch

GEOMETRY = MusicnnDims()  # kernel sizes, filter counts of the teacher, mid-end and embedding width
_FULL = (GEOMETRY.timbral_filters,) * len(GEOMETRY.timbral_heights) + (GEOMETRY.temporal_filters,) * len(
    GEOMETRY.temporal_lengths
)


@dataclass(frozen=True)
class MusicnnStudentDims:
    n_classes: int = 100
    task: str = "tags"
    label_counts: tuple[int, ...] = (50, 50)  # per imitated network, summing to n_classes
    embedding_dims: tuple[int, ...] = (200, 200)  # per imitated network (musicnn's: 200)
    #: per network, per front-end branch (timbral 38, timbral 67, temporal 128, 64, 32): filters
    #: kept (at most musicnn's 204, 204, 51, 51, 51) and the rank of their factorisation (0: none)
    channels: tuple[tuple[int, ...], ...] = (_FULL, _FULL)
    ranks: tuple[tuple[int, ...], ...] = ((0,) * 5, (0,) * 5)
    #: (time, frequency) step of the front-end convolutions: (2, 2) computes a quarter of their
    #: positions (the max over frequency then looks at every other one, and every frame takes
    #: its nearest computed one)
    frontend_stride: tuple[int, int] = (1, 1)
    dropout: float = 0.0  # before the dense layers, training only


class _Affine(nn.Module):
    """x * scale + shift per channel (dim 1): a batch norm's inference map, trainable."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(view) + self.shift.view(view)

    def load_bn(self, bn: nn.modules.batchnorm._BatchNorm, index: torch.Tensor | slice = slice(None)) -> None:
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            self.scale.copy_(scale[index])
            self.shift.copy_((bn.bias - bn.running_mean * scale)[index])


class _LiteBranch(nn.Module):
    """[B, 1, T, F] (after the input affine) -> [B, channels, T]: conv (factorised when rank > 0),
    max over frequency, signed ReLU, affine."""

    def __init__(
        self, channels: int, rank: int, kernel: tuple[int, int], time_pad: tuple[int, int], stride: tuple[int, int]
    ) -> None:
        super().__init__()
        self.time_pad = time_pad
        self.time_stride = stride[0]
        self.freq_out = (GEOMETRY.n_mels - kernel[1]) // stride[1] + 1  # "valid" in frequency
        self.basis = nn.Conv2d(1, rank, kernel, stride, bias=False) if rank else None
        self.mix = nn.Conv2d(rank, channels, 1) if rank else nn.Conv2d(1, channels, kernel, stride)
        # -1 where the teacher's batch-norm scale is negative: the filter is negated so that the
        # max over frequency is its min, and the sign put back after it (musicnn._PooledBranch)
        self.register_buffer("sign", torch.ones(1, channels, 1))
        self.affine = _Affine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        x = F.pad(x, (0, 0, *self.time_pad))
        z = self.mix(self.basis(x)) if self.basis is not None else self.mix(x)  # [B, C, T / s_t, F_out]
        peak = F.max_pool2d(z, (1, self.freq_out)).flatten(2)  # [B, C, T / s_t]
        out = self.affine(F.relu(self.sign * peak))
        if self.time_stride > 1:  # every frame takes its nearest computed one
            out = F.interpolate(out, size=frames, mode="nearest")
        return out  # [B, C, T]


class _LiteMidend(nn.Module):
    """7-wide conv over time -> ReLU -> affine: [B, C_in, T] -> [B, C_out, T]."""

    def __init__(self, c_in: int, c_out: int, width: int) -> None:
        super().__init__()
        self.pad = ((width - 1) // 2, width - 1 - (width - 1) // 2)
        self.conv = nn.Conv1d(c_in, c_out, width)
        self.affine = _Affine(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(F.relu(self.conv(F.pad(x, self.pad))))


class LiteNetwork(nn.Module):
    """One imitated network: mel [B, T, 96] -> (logits [B, n_labels], embedding [B, 200])."""

    def __init__(
        self,
        channels: Sequence[int],
        ranks: Sequence[int],
        n_labels: int,
        embedding_dim: int,
        dropout: float,
        stride: tuple[int, int],
    ) -> None:
        super().__init__()
        g = GEOMETRY
        if len(channels) != len(_FULL) or len(ranks) != len(_FULL):
            raise ValueError(
                f"channels {tuple(channels)} and ranks {tuple(ranks)} need one entry per front-end branch ({len(_FULL)})"
            )
        w = g.timbral_width
        kernels = [((w, int(h * g.n_mels)), ((w - 1) // 2, w - 1 - (w - 1) // 2)) for h in g.timbral_heights]
        kernels += [((k, 1), ((k - 1) // 2, k - 1 - (k - 1) // 2)) for k in g.temporal_lengths]
        if any(not 1 <= c <= full for c, full in zip(channels, _FULL)):
            raise ValueError(f"channels {tuple(channels)} must be within 1..{_FULL} per branch")
        if any(not 0 <= r <= min(c, kt * kf) for r, c, ((kt, kf), _) in zip(ranks, channels, kernels)):
            raise ValueError(
                f"ranks {tuple(ranks)} must be within 0..min(filters, kernel size) per branch (0: not factorised)"
            )
        self.input_affine = _Affine(1)
        self.frontend = nn.ModuleList(
            [_LiteBranch(c, r, k, p, stride) for c, r, (k, p) in zip(channels, ranks, kernels)]
        )
        front, m = sum(channels), g.midend_filters
        self.midend = nn.ModuleList(
            [_LiteMidend(front, m, g.midend_width)] + [_LiteMidend(m, m, g.midend_width) for _ in range(2)]
        )
        self.dense = nn.Linear(2 * (front + 3 * m), embedding_dim)
        self.dense_affine = _Affine(embedding_dim)
        self.classifier = nn.Linear(embedding_dim, n_labels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.input_affine(mel.unsqueeze(1))  # [B, 1, T, F]
        front = torch.cat([branch(x) for branch in self.frontend], dim=1)  # [B, sum(channels), T]
        c1 = self.midend[0](front)
        c2 = self.midend[1](c1) + c1
        c3 = self.midend[2](c2) + c2
        features = torch.cat([front, c1, c2, c3], dim=1)
        pooled = torch.stack([features.amax(dim=2), features.mean(dim=2)], dim=2).flatten(1)  # interleaved, as musicnn
        embedding = self.dense_affine(F.relu(self.dense(self.dropout(pooled))))
        return self.classifier(self.dropout(embedding)), embedding


class MusicnnStudent(nn.Module):
    """mel [B, T, 96] -> (logits [B, n_classes], embedding [B, sum(embedding_dims)]): every
    imitated network's outputs, in order (``label_counts``, ``embedding_dims``)."""

    def __init__(self, dims: MusicnnStudentDims) -> None:
        super().__init__()
        channels = tuple(tuple(c) for c in dims.channels)
        ranks = tuple(tuple(r) for r in dims.ranks)
        counts = (len(dims.label_counts), len(dims.embedding_dims), len(channels), len(ranks))
        if len(set(counts)) != 1 or sum(dims.label_counts) != dims.n_classes:
            raise ValueError(
                f"label_counts {dims.label_counts} (summing to n_classes {dims.n_classes}), embedding_dims, channels and ranks need one entry per imitated network"
            )
        stride = tuple(dims.frontend_stride)
        if len(stride) != 2 or min(stride) < 1:
            raise ValueError(f"frontend_stride {stride} must be (time, frequency) steps >= 1")
        self.dims = MusicnnStudentDims(
            dims.n_classes,
            dims.task,
            tuple(dims.label_counts),
            tuple(dims.embedding_dims),
            channels,
            ranks,
            stride,
            dims.dropout,
        )
        self.task = dims.task
        self.nets = nn.ModuleList(
            [
                LiteNetwork(c, r, n, e, dims.dropout, stride)
                for c, r, n, e in zip(channels, ranks, dims.label_counts, dims.embedding_dims)
            ]
        )

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [net(mel) for net in self.nets]
        return torch.cat([o[0] for o in outs], dim=1), torch.cat([o[1] for o in outs], dim=1)


# -- made from the teacher ---------------------------------------------------------------------


@torch.no_grad()
def load_teachers(model: MusicnnStudent, teachers: Sequence[Musicnn], mel: torch.Tensor) -> MusicnnStudent:
    """Fill ``model`` from trained ``teachers`` (one per lite network, in order) and ``mel``
    [N, T, 96], real patches (a few hundred suffice): see the module doc. Returns ``model`` in
    eval mode. ValueError when the counts differ or a teacher is not of musicnn's geometry."""
    if len(teachers) != len(model.nets):
        raise ValueError(f"{len(teachers)} teacher networks for a student of {len(model.nets)}")
    for teacher, net in zip(teachers, model.nets):
        _compress(teacher.eval(), net, mel)
    return model.eval()


def freeze_filters(model: MusicnnStudent) -> None:
    """Keep the front-end filters (and the input affine before them) as they are: training
    then moves what follows the max over frequency. On a CPU the filters' gradients are 5/6 of
    a training step (the kernels are up to 128 frames long and read the whole patch)."""
    for net in model.nets:
        for module in [net.input_affine] + [
            nn.ModuleList([b.mix] + ([b.basis] if b.basis is not None else [])) for b in net.frontend
        ]:
            for p in module.parameters():
                p.requires_grad_(False)


def _compress(teacher: Musicnn, net: LiteNetwork, mel: torch.Tensor) -> None:
    g = teacher.dims
    if (g.n_mels, g.timbral_heights, g.timbral_width, g.temporal_lengths, g.midend_filters, g.timbral_filters, g.temporal_filters) != (
        GEOMETRY.n_mels, GEOMETRY.timbral_heights, GEOMETRY.timbral_width, GEOMETRY.temporal_lengths, GEOMETRY.midend_filters, GEOMETRY.timbral_filters, GEOMETRY.temporal_filters
    ):  # fmt: skip
        raise ValueError(f"musicnn_student is made from musicnn networks of the default geometry, not {g}")
    x = teacher.input_bn(mel.unsqueeze(1))
    outs = [branch(x) for branch in teacher.frontend]  # [N, C_b, T] each
    front = torch.cat(outs, dim=1)
    n_front, m = front.shape[1], g.midend_filters

    # Downstream weight of each front-end channel: through the first mid-end conv (scaled by the
    # batch norm after it) and through its max and mean features into the dense layer.
    pool_scale = teacher.pool_bn.weight / torch.sqrt(teacher.pool_bn.running_var + teacher.pool_bn.eps)
    dense_w = teacher.dense.weight * pool_scale  # [200, 2 * features], the pooling BN folded in
    mid0 = teacher.midend[0]
    mid_scale = mid0.bn.weight / torch.sqrt(mid0.bn.running_var + mid0.bn.eps)
    through_mid = (mid0.conv.weight * mid_scale[:, None, None]).square().sum(dim=(0, 2))  # [561]
    through_dense = dense_w[:, 0 : 2 * n_front : 2].square().sum(0) + dense_w[:, 1 : 2 * n_front : 2].square().sum(0)
    downstream = torch.sqrt(through_mid + through_dense)
    spread = front.std(dim=(0, 2))
    importance = spread * downstream

    kept, offset = [], 0
    for branch, lite in zip(teacher.frontend, net.frontend):
        n = branch.conv.out_channels
        order = torch.argsort(importance[offset : offset + n], descending=True)
        keep = torch.sort(order[: lite.affine.scale.numel()]).values
        _load_branch(lite, branch, keep, downstream[offset + keep])
        kept.append(keep + offset)
        offset += n
    kept_all = torch.cat(kept)
    dropped = torch.ones(n_front, dtype=torch.bool)
    dropped[kept_all] = False

    # The mid-end: its first conv reads the kept channels; the dropped ones, at their mean on
    # the music, join its bias (exact but for the 3 padded frames at each end).
    mean_series = front.mean(dim=(0, 2))
    net.input_affine.load_bn(teacher.input_bn)
    for lite_layer, layer in zip(net.midend, teacher.midend):
        lite_layer.conv.weight.copy_(layer.conv.weight[:, kept_all] if layer is mid0 else layer.conv.weight)
        lite_layer.conv.bias.copy_(layer.conv.bias)
        lite_layer.affine.load_bn(layer.bn)
    net.midend[0].conv.bias.add_((mid0.conv.weight[:, dropped].sum(dim=2) * mean_series[dropped]).sum(dim=1))

    # The back-end: dense reads [max, mean] of the kept channels and the mid-end; the dropped
    # channels' features at their means on the music join its bias, with the pooling BN's shift.
    pool_shift = teacher.pool_bn.bias - teacher.pool_bn.running_mean * pool_scale
    features = torch.cat([kept_all, n_front + torch.arange(3 * m)])
    columns = torch.stack([2 * features, 2 * features + 1], dim=1).flatten()
    dropped_idx = dropped.nonzero().flatten()
    dropped_columns = torch.stack([2 * dropped_idx, 2 * dropped_idx + 1], dim=1).flatten()
    dropped_values = torch.stack([front.amax(dim=2).mean(0), front.mean(dim=(0, 2))], dim=1).flatten()[dropped_columns]
    net.dense.weight.copy_(dense_w[:, columns])
    net.dense.bias.copy_(
        teacher.dense.bias + teacher.dense.weight @ pool_shift + dense_w[:, dropped_columns] @ dropped_values
    )
    net.dense_affine.load_bn(teacher.dense_bn)
    net.classifier.load_state_dict(teacher.classifier.state_dict())


def _load_branch(lite: _LiteBranch, branch: _Branch, keep: torch.Tensor, downstream: torch.Tensor) -> None:
    """Filters ``keep`` of ``branch``, signed, factorised to ``lite``'s rank by an SVD weighted by
    each filter's batch-norm scale times its downstream weight."""
    conv, bn = branch.conv, branch.bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps))[keep]
    sign = torch.where(scale < 0, -1.0, 1.0)
    weight = conv.weight[keep] * sign[:, None, None, None]  # [C, 1, kt, kf]
    bias = conv.bias[keep] * sign
    lite.sign.copy_(sign[None, :, None])
    lite.affine.load_bn(bn, keep)
    if lite.basis is None:
        lite.mix.weight.copy_(weight)
        lite.mix.bias.copy_(bias)
        return
    rank = lite.basis.out_channels
    w = (scale.abs() * downstream).clamp_min(1e-12)[:, None]
    u, s, vh = torch.linalg.svd(weight.flatten(1).double() * w, full_matrices=False)
    lite.basis.weight.copy_(vh[:rank].reshape(rank, *weight.shape[1:]).float())
    lite.mix.weight.copy_(((u[:, :rank] * s[:rank]) / w).float()[:, :, None, None])
    lite.mix.bias.copy_(bias)

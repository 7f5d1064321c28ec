"""The served graph: the trained networks and each task's output activation on one input, as an
export writes it into the model repository and as evaluation scores checkpoints.

    mel [batch, PATCH_FRAMES, N_MELS] -> (scores_1 [batch, n_labels_1], embedding_1 [batch, dim_1], ...)
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.stages.frontend import log_mel_max
from training.models import activation


class ServingGraph(nn.Module):
    """The trained networks plus each task's output activation, all on the same input:
    mel -> (scores_1, embedding_1, scores_2, embedding_2, ...).

    A model that imitates several networks at once (a distilled student, whose checkpoint
    lists ``networks``) gives one (scores, embedding) pair per network it imitates: its outputs
    are cut at ``splits`` [(n_labels, embedding_dim), ...]."""

    def __init__(self, models: list[nn.Module], splits: list[list[tuple[int, int]] | None] | None = None) -> None:
        super().__init__()
        self.nets = nn.ModuleList(models)
        self.tasks = [m.task for m in models]
        self.splits = splits or [None] * len(models)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = []
        for net, task, split in zip(self.nets, self.tasks, self.splits):
            out, embedding = net(mel)
            if split is None:
                outputs += [activation(task, out), embedding]
                continue
            a = e = 0
            for n_labels, width in split:
                outputs += [activation(task, out[:, a : a + n_labels]), embedding[:, e : e + width]]
                a, e = a + n_labels, e + width
        return tuple(outputs)


def inference_form(serving: ServingGraph) -> ServingGraph:
    """The same entry with each network in its inference form where it has one
    (``Musicnn.for_serving``: the same function with less work); others as they are."""
    nets = [net.for_serving(log_mel_max()) if hasattr(net, "for_serving") else net for net in serving.nets]
    return ServingGraph(nets, serving.splits).eval()

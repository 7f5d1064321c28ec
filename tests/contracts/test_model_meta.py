"""A served entry's metadata: where each network's labels lie when they sit side by side."""

from __future__ import annotations

from pipeline.contracts.model_meta import label_columns, read_meta
from pipeline.settings import DEFAULT_MODEL_REPOSITORY


def test_label_columns_put_each_networks_labels_after_the_ones_before():
    meta = read_meta(DEFAULT_MODEL_REPOSITORY, "musicnn")
    columns = label_columns(meta.networks)
    assert list(columns) == [n.name for n in meta.networks] == ["musicnn_msd", "musicnn_mtt"]
    assert columns["musicnn_msd"] == slice(0, 50) and columns["musicnn_mtt"] == slice(50, 100)
    assert label_columns(meta.networks[1:]) == {"musicnn_mtt": slice(0, 50)}

"""Export: eager = TorchScript = onnxruntime, a complete Triton entry, served by the onnx scorer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model_meta import read_config, read_meta
from pipeline.scoring import OnnxScorer
from training.export import PARITY_TOL, check_parity, export
from training.models import load_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    repo = tmp_path_factory.mktemp("models")
    return export(REPO / "training" / "weights" / "musicnn_mtt.pt", "mtt_copy", repo), repo


def test_export_writes_a_complete_triton_entry(exported):
    result, repo = exported
    entry = repo / "mtt_copy"
    for path in ["config.pbtxt", "configs/cpu.pbtxt", "1/model.onnx", "1/model.pt", "1/model.py"]:
        assert (entry / path).is_file(), path
    gpu, cpu = read_config(repo, "mtt_copy"), read_config(repo, "mtt_copy", "cpu")
    assert gpu.platform == "onnxruntime_onnx" and gpu.dynamic_batching.max_queue_delay_microseconds > 0
    assert cpu.backend == "python"
    assert [i.name for i in gpu.input] == [i.name for i in cpu.input] == ["mel"]
    assert list(gpu.input[0].dims) == [187, 96]
    assert all(v <= PARITY_TOL for v in result.max_rel_diff.values())


class _Perturbed(torch.nn.Module):
    """A graph with its outputs moved: ``out * scale + shift``."""

    def __init__(self, graph: torch.nn.Module, scale: float, shift: float):
        super().__init__()
        self.graph, self.scale, self.shift = graph, scale, shift

    def forward(self, x):
        return tuple(t * self.scale + self.shift for t in self.graph(x))


@pytest.fixture
def written(exported):
    """(version directory, its TorchScript graph, output names) of the exported entry."""
    _, repo = exported
    version_dir = repo / "mtt_copy" / "1"
    return version_dir, torch.jit.load(str(version_dir / "model.pt")), read_meta(repo, "mtt_copy").outputs


def test_parity_refuses_a_graph_off_by_more_than_the_tolerance(written):
    version_dir, graph, outputs = written
    with pytest.raises(RuntimeError, match="export parity failed"):
        check_parity(_Perturbed(graph, 1.0, 3 * PARITY_TOL), graph, version_dir, outputs)


def test_parity_is_relative_to_each_outputs_scale(written):
    """float32 rounding grows with the magnitude: an output scaled by 1 + 4e-6 passes whatever
    its size, where an absolute tolerance would refuse the embedding (scale about 4)."""
    version_dir, graph, outputs = written
    x = torch.rand(5, 187, 96, generator=torch.Generator().manual_seed(0)) * 3
    with torch.inference_mode():
        largest = max(float(t.abs().max()) for t in graph(x))
    assert largest * 4e-6 > PARITY_TOL  # in absolute terms the embedding moves by more than the tolerance
    diffs = check_parity(_Perturbed(graph, 1 + 4e-6, 0.0), graph, version_dir, outputs)
    assert 0 < diffs["onnxruntime"] <= PARITY_TOL


def test_the_committed_repository_serves_the_exporters_cpu_model():
    """triton_models/ is export's output: its CPU model files must not drift from the asset."""
    asset = (REPO / "training" / "export_assets" / "triton_cpu_model.py").read_text()
    copies = sorted((REPO / "triton_models").glob("*/[0-9]*/model.py"))
    assert copies and all(c.read_text() == asset for c in copies), [str(c) for c in copies if c.read_text() != asset]


def test_metadata_travels_with_the_model(exported):
    _, repo = exported
    meta = read_meta(repo, "mtt_copy")
    _, ckpt = load_checkpoint(REPO / "training" / "weights" / "musicnn_mtt.pt")
    assert meta.labels == tuple(ckpt["labels"]) and meta.version == ckpt["version"]
    meta.check_frontend()


def test_committed_repository_matches_the_committed_weights():
    """triton_models/ must be what exporting training/weights/ gives (no stale model files):
    each network alone, and both in the two-network entry."""
    x = torch.rand(4, 187, 96, generator=torch.Generator().manual_seed(3)) * 3
    both = OnnxScorer(REPO / "triton_models", "musicnn").score_sync(x.numpy())
    for name in ["musicnn_msd", "musicnn_mtt"]:
        model, _ = load_checkpoint(REPO / "training" / "weights" / f"{name}.pt")
        with torch.inference_mode():
            logits, embedding = model(x)
        for outputs in (OnnxScorer(REPO / "triton_models", name).score_sync(x.numpy()), both):
            assert np.abs(outputs[name].scores - torch.sigmoid(logits).numpy()).max() <= 1e-5
            assert np.abs(outputs[name].embedding - embedding.numpy()).max() <= 1e-4


def test_several_checkpoints_export_to_one_graph_with_named_networks(tmp_path):
    weights = REPO / "training" / "weights"
    result = export([weights / "musicnn_msd.pt", weights / "musicnn_mtt.pt"], "pair", tmp_path, network_names=["msd", "mtt"])
    meta = read_meta(tmp_path, "pair")
    assert [n.name for n in meta.networks] == ["msd", "mtt"] and meta.outputs == ("msd_scores", "msd_embedding", "mtt_scores", "mtt_embedding")
    assert [o.name for o in read_config(tmp_path, "pair", "cpu").output] == list(meta.outputs)
    assert all(v <= PARITY_TOL for v in result.max_rel_diff.values())
    with pytest.raises(ValueError, match="differ"):
        export([weights / "musicnn_msd.pt", weights / "musicnn_msd.pt"], "twice", tmp_path)

"""The GPU capacity script, checked without a GPU: the repository it prepares, and its client
against the embedded (CPU) Triton server."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from bench.gpu_capacity import FP16_SUFFIX, MODEL, measure, prepare
from conftest import REPO
from pipeline.stack import EmbeddedStack


def test_prepare_writes_an_fp32_and_a_tensorrt_fp16_entry(tmp_path):
    names = prepare(tmp_path)
    assert names == [MODEL, MODEL + FP16_SUFFIX]
    for name in names:
        config = text_format.Parse((tmp_path / name / "config.pbtxt").read_text(), pb.ModelConfig())
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
        assert (tmp_path / name / "1" / "model.onnx").stat().st_size > 1_000_000
        assert not (tmp_path / name / "1" / "model.py").exists()  # the CPU backend stays behind
    accelerators = text_format.Parse((tmp_path / names[1] / "config.pbtxt").read_text(), pb.ModelConfig()).optimization.execution_accelerators
    assert [(a.name, a.parameters["precision_mode"]) for a in accelerators.gpu_execution_accelerator] == [("tensorrt", "FP16")]
    assert not text_format.Parse((tmp_path / names[0] / "config.pbtxt").read_text(), pb.ModelConfig()).HasField("optimization")


@pytest.mark.integration
async def test_the_client_measures_a_real_server(tmp_path):
    with EmbeddedStack(model_repository=REPO / "triton_models", log_dir=tmp_path, models=[MODEL]) as stack:
        row = await measure(stack.triton_grpc_url, MODEL, batch=2, concurrency=2, seconds=1.0)
    assert row["batch"] == 2 and row["concurrency"] == 2
    assert row["patches_per_s"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]

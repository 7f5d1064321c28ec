"""The GPU capacity script, checked without a GPU: the repositories it prepares (both flavours),
the real-music sample it cuts, and its client against a real (CPU) Triton server, which also
serves the torch flavour's model with the CPU reference's scores."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from google.protobuf import text_format
from support import REPO
from tritonclient.grpc import model_config_pb2 as pb

from bench.gpu_capacity import (
    FP16_SUFFIX,
    MODEL,
    direct,
    make_sample,
    measure,
    model_config,
    model_shape,
    onnxruntime_engines,
    prepare,
    server_scores,
    torch_engines,
    worker_cpu_s_per_patch,
)
from devstack import EmbeddedStack


def _config(path) -> pb.ModelConfig:
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def test_prepare_writes_an_fp32_and_a_tensorrt_fp16_entry(tmp_path):
    names = prepare(tmp_path)
    assert names == [MODEL, MODEL + FP16_SUFFIX]
    for name in names:
        config = _config(tmp_path / name / "config.pbtxt")
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
        assert (tmp_path / name / "1" / "model.onnx").stat().st_size > 1_000_000
        assert sorted(p.name for p in (tmp_path / name / "1").iterdir()) == [
            "model.onnx"
        ]  # the CPU backend stays behind
    accelerators = _config(tmp_path / names[1] / "config.pbtxt").optimization.execution_accelerators
    assert [(a.name, a.parameters["precision_mode"]) for a in accelerators.gpu_execution_accelerator] == [
        ("tensorrt", "FP16")
    ]
    assert not _config(tmp_path / names[0] / "config.pbtxt").HasField("optimization")


def test_prepare_torch_flavour_keeps_the_gpu_config_for_the_python_backend(tmp_path):
    names = prepare(tmp_path, flavour="torch")
    gpu = model_config()
    for name, precision in zip(names, ["fp32", "fp16"]):
        config = _config(tmp_path / name / "config.pbtxt")
        assert config.backend == "python" and not config.platform and not config.default_model_filename
        assert config.parameters["precision"].string_value == precision
        # everything else is the exported GPU config: batching, shapes, warm-up, instances
        assert config.max_batch_size == gpu.max_batch_size and config.dynamic_batching == gpu.dynamic_batching
        assert config.input == gpu.input and config.output == gpu.output and config.instance_group == gpu.instance_group
        assert sorted(p.name for p in (tmp_path / name / "1").iterdir()) == ["base_model.py", "model.pt", "model.py"]


def test_prepare_refuses_an_unknown_flavour(tmp_path):
    with pytest.raises(ValueError, match="flavour"):
        prepare(tmp_path, flavour="tensorflow")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message given without a GPU")
def test_direct_says_it_needs_a_gpu():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        direct(MODEL, [1], 0.1, None, None)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
    reason="checks the message given without onnxruntime-gpu",
)
def test_onnxruntime_engine_says_it_needs_the_cuda_provider():
    with pytest.raises(SystemExit, match=r"CUDAExecutionProvider.*onnxruntime-gpu"):
        direct(MODEL, [1], 0.1, None, None, onnxruntime_engines(MODEL))


@pytest.mark.parametrize(
    "engines",
    [lambda: onnxruntime_engines(MODEL, provider="CPUExecutionProvider"), lambda: torch_engines(MODEL, device="cpu")],
    ids=["onnxruntime", "torch"],
)
def test_direct_measures_both_precisions_of_each_engine(sample, engines):
    """The in-process measurement, run on the CPU: the same loop and scores as on a GPU."""
    rows = direct(MODEL, [2], 0.2, sample[0], sample[1], engines())
    assert [(row["precision"], row["batch"]) for row in rows] == [("fp32", 2), ("fp16", 2)]
    assert all(row["patches_per_s"] > 0 and row["ms_per_batch"] > 0 for row in rows)
    assert rows[0]["max_abs_diff_vs_cpu"] < 1e-4  # FP32 is the CPU reference's computation
    assert 0 < rows[1]["max_abs_diff_vs_cpu"] < 1e-2  # FP16 really ran in half precision


def test_model_shape_comes_from_the_config():
    shape = model_shape(model_config())
    assert shape.patch == (187, 96) and shape.max_batch == 256
    assert shape.patch_s == pytest.approx(187 * 256 / 16_000)


def test_worker_cpu_per_patch_is_over_every_codec_of_the_bench(tmp_path):
    shape = model_shape(model_config())
    results = tmp_path / "results.json"
    assert worker_cpu_s_per_patch(results, shape) is None
    worker = {"mp3": (2.0, 600.0), "flac": (4.0, 600.0)}  # codec -> (worker CPU s, audio s)
    results.write_text(
        json.dumps(
            {
                "codecs": {
                    c: {"figures": {"worker_triton": {"cpu_s": cpu, "audio_s": s}}} for c, (cpu, s) in worker.items()
                }
            }
        )
    )
    assert worker_cpu_s_per_patch(results, shape) == pytest.approx(6.0 / (1200.0 / shape.patch_s))


@pytest.fixture(scope="module")
def sample(tmp_path_factory, example_clips):
    folder = tmp_path_factory.mktemp("clips")
    for clip in example_clips:
        (folder / clip.name).symlink_to(clip)
    path = folder.parent / "sample.npz"
    summary = make_sample(folder, path, count=6)
    assert summary == {"patches": 6, "files": 2, "path": str(path)}
    with np.load(path) as data:
        return data["patches"], data["scores"]


def test_sample_holds_real_patches_and_their_cpu_scores(sample):
    patches, scores = sample
    assert patches.shape == (6, 187, 96) and patches.dtype == np.float32
    assert scores.shape == (6, 100) and np.all((scores >= 0) & (scores <= 1))  # both networks, 50 tags each
    assert len({p.tobytes() for p in patches}) == 6  # distinct patches from both clips


@pytest.mark.integration
async def test_the_client_measures_a_real_server(tmp_path, sample):
    with EmbeddedStack(model_repository=REPO / "triton_models", log_dir=tmp_path, models=[MODEL]) as stack:
        row = await measure(stack.triton_grpc_url, MODEL, batch=2, concurrency=2, seconds=1.0, sample=sample[0])
        scores = await server_scores(stack.triton_grpc_url, MODEL, sample[0], batch=4)
    assert row["batch"] == 2 and row["concurrency"] == 2
    assert row["patches_per_s"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
    np.testing.assert_allclose(scores, sample[1], atol=1e-4)


@pytest.mark.integration
async def test_torch_flavour_serves_the_cpu_scores(tmp_path, sample):
    """The torch flavour's model on a KIND_CPU instance (no GPU here), in this environment
    (torch + numpy): FP32 gives the CPU reference's scores, FP16 stays close."""
    repository = tmp_path / "repo"
    names = prepare(repository, flavour="torch")
    for name in names:
        path = repository / name / "config.pbtxt"
        config = _config(path)
        config.instance_group[0].kind = pb.ModelInstanceGroup.KIND_CPU
        config.ClearField("model_warmup")  # 64 random patches through an FP16 CPU model is slow
        path.write_text(text_format.MessageToString(config))
    with EmbeddedStack(
        model_repository=repository, log_dir=tmp_path, models=names, triton_python_env=sys.prefix
    ) as stack:
        fp32 = await server_scores(stack.triton_grpc_url, names[0], sample[0], batch=4)
        fp16 = await server_scores(stack.triton_grpc_url, names[1], sample[0], batch=4)
    np.testing.assert_allclose(fp32, sample[1], atol=1e-4)
    assert np.abs(fp16 - sample[1]).max() < 1e-2

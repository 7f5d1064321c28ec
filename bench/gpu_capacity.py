"""GPU capacity: patches/s and latency of the mood model on a Triton server, by batch size and
concurrency, FP32 (onnxruntime CUDA) against FP16 (onnxruntime's TensorRT execution provider).

On a machine with an NVIDIA GPU and the Triton image (``deploy/docker/triton.Dockerfile``):

    python -m bench.gpu_capacity --prepare /tmp/gpu-repo        # the model twice: fp32 and fp16
    docker run --rm --gpus=1 -p 8001:8001 -v /tmp/gpu-repo:/models \\
        nvcr.io/nvidia/tritonserver:24.10-py3 tritonserver --model-repository=/models
    python -m bench.gpu_capacity --url localhost:8001 [--seconds 20] [--out bench/gpu.json]

``--prepare`` copies the model's GPU entry (``config.pbtxt``: onnxruntime, dynamic batching,
warm-up) and adds a second entry whose config turns on TensorRT in FP16. The client is the
equivalent of perf_analyzer's concurrency mode: ``C`` coroutines each keep one request of
``B`` random patches in flight for the measurement window; it prints a Markdown table and,
given the worker's CPU per patch from ``bench/results.json``, how many worker cores one GPU
can feed. ``--url`` also works against the embedded CPU server (``python -m pipeline.stack``)
to check the client, with CPU numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from pipeline.features import PATCH_SHAPE
from pipeline.settings import REPO_ROOT

MODEL = "musicnn_msd"
FP16_SUFFIX = "_trt_fp16"
BATCHES = (1, 16, 64, 128)
CONCURRENCIES = (1, 2, 4, 8)


def prepare(repository: Path, model: str = MODEL) -> list[str]:
    """Write ``repository`` with ``model`` (FP32) and ``model + FP16_SUFFIX`` (TensorRT FP16)."""
    source = REPO_ROOT / "triton_models" / model
    repository.mkdir(parents=True, exist_ok=True)
    names = [model, model + FP16_SUFFIX]
    for name in names:
        target = repository / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("configs", "model.py", "model.pt", "__pycache__"))
        config = text_format.Parse((source / "config.pbtxt").read_text().split("\n", 1)[1], pb.ModelConfig())
        config.name = name
        if name.endswith(FP16_SUFFIX):
            trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            trt.parameters["precision_mode"] = "FP16"
            trt.parameters["max_workspace_size_bytes"] = str(2 << 30)
        (target / "config.pbtxt").write_text(text_format.MessageToString(config))
    return names


async def measure(url: str, model: str, batch: int, concurrency: int, seconds: float) -> dict:
    """``concurrency`` loops, each with one request of ``batch`` patches in flight."""
    import tritonclient.grpc.aio as triton

    client = triton.InferenceServerClient(url)
    patches = np.random.default_rng(0).uniform(0, 3, (batch, *PATCH_SHAPE)).astype(np.float32)
    latencies: list[float] = []

    async def one() -> None:
        request = triton.InferInput("mel", list(patches.shape), "FP32")
        request.set_data_from_numpy(patches)
        start = time.perf_counter()
        await client.infer(model, [request], outputs=[triton.InferRequestedOutput("scores")])
        latencies.append(time.perf_counter() - start)

    async def loop(until: float) -> None:
        while time.perf_counter() < until:
            await one()

    try:
        await asyncio.gather(*(one() for _ in range(concurrency)))  # warm-up, not counted
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(loop(start + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    latencies.sort()
    return {
        "model": model,
        "batch": batch,
        "concurrency": concurrency,
        "patches_per_s": len(latencies) * batch / elapsed,
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p95_ms": 1000 * latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
    }


def worker_cores_fed(patches_per_s: float, results: Path) -> float | None:
    """GPU patches/s ÷ patches one worker core prepares per second (from ``make bench``)."""
    if not results.exists():
        return None
    worker = json.loads(results.read_text())["figures"]["worker_triton"]
    patches = worker["audio_s"] / (PATCH_SHAPE[0] * 256 / 16_000)  # patches analysed
    cpu_s_per_patch = worker["cpu_s"] / patches
    return patches_per_s * cpu_s_per_patch


async def main_async(args: argparse.Namespace) -> list[dict]:
    rows = []
    for model in args.models:
        for batch in args.batches:
            for concurrency in args.concurrencies:
                row = await measure(args.url, model, batch, concurrency, args.seconds)
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", type=Path, help="write a model repository with FP32 and FP16 entries, then exit")
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    parser.add_argument("--models", nargs="+", default=[MODEL, MODEL + FP16_SUFFIX])
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--concurrencies", nargs="+", type=int, default=list(CONCURRENCIES))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results.json", help="make bench's results, for the worker cores figure")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.prepare:
        print("\n".join(prepare(args.prepare)))
        return 0
    rows = asyncio.run(main_async(args))
    print("| model | batch | concurrency | patches/s | p50 ms | p95 ms | worker cores fed |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cores = worker_cores_fed(row["patches_per_s"], args.results)
        cores_text = f"{cores:.0f}" if cores is not None else "run make bench first"
        print(f"| {row['model']} | {row['batch']} | {row['concurrency']} | {row['patches_per_s']:.0f} | {row['latency_p50_ms']:.1f} | {row['latency_p95_ms']:.1f} | {cores_text} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU capacity: patches/s and latency of the mood model on a GPU, by batch size and
concurrency, FP32 against FP16, through a Triton server and in process (the ceiling).

Two server flavours, chosen by what the GPU machine has:

``onnxruntime`` (production: the official Triton image, ``deploy/docker/triton.Dockerfile``)
    the model's GPU entry (``config.pbtxt``: onnxruntime, dynamic batching, warm-up) as FP32,
    and a second entry that turns on onnxruntime's TensorRT execution provider in FP16;
``torch`` (a server with only the python backend, e.g. ``pip install nvidia-pytriton``)
    the same config served by ``bench/triton_torch_model.py``: the exported TorchScript file on
    the GPU in FP32 (TF32 off) and FP16, request handling shared with the CPU model.

    python -m bench.gpu_capacity --sample AUDIO_DIR --out-sample sample.npz   # any machine
    python -m bench.gpu_capacity --prepare /tmp/gpu-repo [--flavour torch]
    tritonserver --model-repository=/tmp/gpu-repo            # or: docker run … tritonserver …
    python -m bench.gpu_capacity --url localhost:8001 --sample-file sample.npz --out gpu.json
    python -m bench.gpu_capacity --direct --sample-file sample.npz          # torch on cuda:0
    python -m bench.gpu_capacity --direct --engine onnxruntime --sample-file sample.npz

``--sample`` cuts real patches from music with the serving frontend and stores them with the
CPU scores of the served ONNX model (onnxruntime), so the GPU's scores can be compared (max
|Δ score|) and the requests carry real data. The client is the equivalent of perf_analyzer's
concurrency mode: ``C`` coroutines each keep one request of ``B`` patches in flight for the
measurement window. It prints Markdown tables and, given the worker's CPU per patch from
``bench/results.json`` (``make bench``), how many worker cores one GPU can feed. ``--url`` also
works against the embedded CPU server (``python -m devstack.stack``) to check the client.

This module imports nothing from the pipeline at module level (``--sample`` does, lazily): the
model's shapes and frontend come from its ``config.pbtxt``, so a GPU machine needs only numpy,
tritonclient and, for ``--direct`` and the torch flavour, torch (``--direct --engine
onnxruntime``: onnx and onnxruntime-gpu instead).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from bench import REPO_ROOT

MODEL = "musicnn"  # both networks in one graph, as the worker serves them
FP16_SUFFIX = "_fp16"
FLAVOURS = ("onnxruntime", "torch")
BATCHES = (1, 16, 64, 128, 256)
CONCURRENCIES = (1, 2, 4, 8)
DIRECT_BATCHES = (1, 16, 64, 128, 256, 512)
TORCH_MODEL = Path(__file__).with_name("triton_torch_model.py")
CPU_MODEL = REPO_ROOT / "training" / "export_assets" / "triton_cpu_model.py"


@dataclass(frozen=True)
class ModelShape:
    """What the served model takes, read from its GPU ``config.pbtxt``."""

    patch: tuple[int, ...]  # one patch, e.g. (187, 96): mel frames × mel bands
    patch_s: float  # audio seconds one patch covers, from the frontend recorded at export
    max_batch: int


def model_config(model: str = MODEL, root: Path = REPO_ROOT / "triton_models") -> pb.ModelConfig:
    """The model's GPU config (the file's first line is a comment the parser accepts)."""
    return text_format.Parse((root / model / "config.pbtxt").read_text(), pb.ModelConfig())


def score_outputs(config: pb.ModelConfig) -> list[str]:
    """The outputs holding tag scores, one per network ("scores", or "<network>_scores"), in
    config order; what fidelity is measured on (the embeddings travel beside them)."""
    return [o.name for o in config.output if o.name == "scores" or o.name.endswith("_scores")]


def served_file(model: str, filename: str) -> Path:
    """``filename`` (model.onnx, model.pt) in the model's newest version directory."""
    versions = sorted(
        (p for p in (REPO_ROOT / "triton_models" / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
    return versions[-1] / filename


def model_shape(config: pb.ModelConfig) -> ModelShape:
    frontend = json.loads(config.parameters["moodstream"].string_value)["frontend"]
    return ModelShape(
        patch=tuple(config.input[0].dims),
        patch_s=frontend["patch_frames"] * frontend["hop_length"] / frontend["sample_rate"],
        max_batch=config.max_batch_size,
    )


def prepare(repository: Path, model: str = MODEL, flavour: str = "onnxruntime") -> list[str]:
    """Write ``repository`` with ``model`` (FP32) and ``model + FP16_SUFFIX`` (FP16).

    onnxruntime: the GPU config as exported, and FP16 through the TensorRT execution provider.
    torch: the same config for the python backend, ``model.pt`` + ``bench/triton_torch_model.py``
    (with the CPU model it builds on), precision as a config parameter.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, not {flavour!r}")
    source = REPO_ROOT / "triton_models" / model
    repository.mkdir(parents=True, exist_ok=True)
    names = [model, model + FP16_SUFFIX]
    keep = "model.onnx" if flavour == "onnxruntime" else "model.pt"
    for name in names:
        target = repository / name
        shutil.rmtree(target, ignore_errors=True)
        config = model_config(model)
        config.name = name
        fp16 = name.endswith(FP16_SUFFIX)
        for version in (p for p in source.iterdir() if p.name.isdigit()):
            (target / version.name).mkdir(parents=True)
            shutil.copy2(version / keep, target / version.name / keep)
            if flavour == "torch":
                shutil.copy2(TORCH_MODEL, target / version.name / "model.py")
                shutil.copy2(CPU_MODEL, target / version.name / "base_model.py")
        if flavour == "onnxruntime" and fp16:
            trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            trt.parameters["precision_mode"] = "FP16"
            trt.parameters["max_workspace_size_bytes"] = str(2 << 30)
        if flavour == "torch":
            config.ClearField("platform")
            config.ClearField("default_model_filename")
            config.backend = "python"
            config.parameters["precision"].string_value = "fp16" if fp16 else "fp32"
        (target / "config.pbtxt").write_text(text_format.MessageToString(config))
    return names


def make_sample(audio_dir: Path, path: Path, count: int = 96, model: str = MODEL) -> dict:
    """``count`` real patches (evenly from every file of ``audio_dir``) and the served ONNX
    model's CPU scores for them, saved as ``path`` (npz: ``patches`` [N, *patch], ``scores``
    [N, labels of every network, joined])."""
    from pipeline.errors import TrackError
    from pipeline.stages.analysis import analyse
    from pipeline.stages.scoring import OnnxScorer
    from pipeline.stages.storage import local_audio_files

    files = local_audio_files(audio_dir)
    if not files:
        raise SystemExit(f"no audio files in {audio_dir}")
    per_file = -(-count // len(files))
    parts = []
    for i, file in enumerate(files, 1):
        print(f"# sample patches: {i}/{len(files)} {file.name}", file=sys.stderr, flush=True)
        try:
            found = analyse(file.read_bytes(), max_duration_s=3600, min_duration_s=1).patches.patches
        except (TrackError, OSError) as exc:
            print(f"# skipped {file}: {getattr(exc, 'reason', 'unreadable')}: {exc}", file=sys.stderr, flush=True)
            continue
        parts.append(found[np.linspace(0, len(found) - 1, min(per_file, len(found))).astype(int)])
    if not parts:
        raise SystemExit(f"no audio file in {audio_dir} that moodstream's decoder reads")
    patches = np.concatenate(parts)[:count]
    outputs = OnnxScorer(REPO_ROOT / "triton_models", model).score_sync(patches)
    np.savez(path, patches=patches, scores=np.concatenate([o.scores for o in outputs.values()], axis=1))
    return {"patches": len(patches), "files": len(files), "path": str(path)}


def batch_of(sample: np.ndarray | None, batch: int, patch: tuple[int, ...]) -> np.ndarray:
    """``batch`` patches: the sample's, repeated as needed, or random log-mels when none."""
    if sample is None:
        return np.random.default_rng(0).uniform(0, 3, (batch, *patch)).astype(np.float32)
    return np.ascontiguousarray(np.resize(sample, (batch, *sample.shape[1:])), dtype=np.float32)


def _request(config: pb.ModelConfig, patches: np.ndarray) -> tuple[list, list]:
    """The inputs and requested outputs of one request carrying ``patches`` [B, *patch]."""
    import tritonclient.grpc.aio as triton

    request = triton.InferInput(config.input[0].name, list(patches.shape), "FP32")
    request.set_data_from_numpy(np.ascontiguousarray(patches))
    # Every output, as the worker asks for them: one request brings all networks back.
    return [request], [triton.InferRequestedOutput(o.name) for o in config.output]


async def measure(
    url: str, model: str, batch: int, concurrency: int, seconds: float, sample: np.ndarray | None = None
) -> dict:
    """``concurrency`` loops, each with one request of ``batch`` patches in flight."""
    import tritonclient.grpc.aio as triton

    client = triton.InferenceServerClient(url)
    config = (await client.get_model_config(model, as_json=False)).config
    patches = batch_of(sample, batch, tuple(config.input[0].dims))
    latencies: list[float] = []

    async def one() -> None:
        inputs, outputs = _request(config, patches)
        start = time.perf_counter()
        await client.infer(model, inputs, outputs=outputs)
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


async def server_scores(url: str, model: str, patches: np.ndarray, batch: int = 64) -> np.ndarray:
    """The server's scores for ``patches`` [N, *patch] → [N, labels of every network], ``batch`` per request."""
    import tritonclient.grpc.aio as triton

    client = triton.InferenceServerClient(url)
    try:
        config = (await client.get_model_config(model, as_json=False)).config
        parts = []
        for i in range(0, len(patches), batch):
            inputs, outputs = _request(config, patches[i : i + batch])
            result = await client.infer(model, inputs, outputs=outputs)
            parts.append(np.concatenate([result.as_numpy(name) for name in score_outputs(config)], axis=1))
    finally:
        await client.close()
    return np.concatenate(parts)


@dataclass(frozen=True)
class Engine:
    """One precision of the model on the GPU, in this process."""

    precision: str  # "fp32" or "fp16"
    score: Callable[[np.ndarray], np.ndarray]  # a batch [B, *patch] (host) → scores [B, labels] (host)
    launcher: Callable[[np.ndarray], Callable[[], None]]  # a batch → one inference on a device copy of it
    sync: Callable[[], None]  # waits for the device's queued work


def torch_engines(model: str, device: str = "cuda") -> Iterator[Engine]:
    """The exported TorchScript file, FP32 (TF32 off) then FP16."""
    import torch

    sync: Callable[[], None] = lambda: None
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--direct measures on a CUDA GPU; this torch ({torch.__version__}) sees none")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True  # batch sizes repeat, so the per-shape search pays
        sync = torch.cuda.synchronize
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        module = torch.jit.load(str(served_file(model, "model.pt")), map_location=device).to(dtype).eval()

        @torch.inference_mode()
        def score(batch: np.ndarray, module=module, dtype=dtype) -> np.ndarray:
            out = module(torch.from_numpy(batch).to(device, dtype))
            return torch.cat([t.float() for t in out[0::2]], dim=1).cpu().numpy()  # (scores, embedding) per network

        def launcher(batch: np.ndarray, module=module, dtype=dtype) -> Callable[[], None]:
            x = torch.from_numpy(batch).to(device, dtype)
            return torch.inference_mode()(lambda: module(x))

        yield Engine(precision, score, launcher, sync)


def onnxruntime_engines(model: str, provider: str = "CUDAExecutionProvider") -> Iterator[Engine]:
    """The exported ONNX file (what Triton's onnxruntime backend serves) on onnxruntime's CUDA
    execution provider: FP32 (TF32 off), then FP16 as onnxruntime's float16 converter writes it
    (inputs and outputs stay FP32, as the served config declares). Batches are bound on the
    device (I/O binding), so a launch copies nothing between host and GPU."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if provider not in ort.get_available_providers():
        raise SystemExit(
            f"--engine onnxruntime needs onnxruntime's {provider}; this onnxruntime ({ort.__version__}) has "
            f"{', '.join(ort.get_available_providers())} (install onnxruntime-gpu built for the machine's CUDA)"
        )
    config = model_config(model)
    mel, scores = config.input[0].name, score_outputs(config)
    device, options = (
        ("cuda", {"device_id": 0, "use_tf32": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"})
        if provider == "CUDAExecutionProvider"
        else ("cpu", {})
    )
    fp32 = onnx.load(served_file(model, "model.onnx"))
    for precision in ("fp32", "fp16"):
        graph = fp32 if precision == "fp32" else convert_float_to_float16(fp32, keep_io_types=True)
        session = ort.InferenceSession(graph.SerializeToString(), providers=[(provider, options)])

        def score(batch: np.ndarray, session=session) -> np.ndarray:
            return np.concatenate(session.run(scores, {mel: batch}), axis=1)

        def launcher(batch: np.ndarray, session=session) -> Callable[[], None]:
            binding = session.io_binding()
            binding.bind_ortvalue_input(mel, ort.OrtValue.ortvalue_from_numpy(batch, device, 0))
            for output in session.get_outputs():
                binding.bind_output(output.name, device)
            return lambda: session.run_with_iobinding(binding)

        yield Engine(precision, score, launcher, lambda: None)  # run_with_iobinding waits for its stream


ENGINES: dict[str, Callable[[str], Iterator[Engine]]] = {"torch": torch_engines, "onnxruntime": onnxruntime_engines}


def direct(
    model: str,
    batches: list[int],
    seconds: float,
    sample: np.ndarray | None,
    reference: np.ndarray | None,
    engines: Iterable[Engine] | None = None,
) -> list[dict]:
    """The model on the GPU in this process (default: the TorchScript file on ``cuda:0``), each
    precision: patches/s by batch size (the GPU's ceiling: no server, no transfers) and max
    |Δ score| against the CPU reference on the sample."""
    shape = model_shape(model_config(model))
    rows = []
    for engine in torch_engines(model) if engines is None else engines:
        diff = None
        if sample is not None and reference is not None:
            got = np.concatenate([engine.score(sample[i : i + 64]) for i in range(0, len(sample), 64)])
            diff = float(np.abs(got - reference).max())
        for batch in batches:
            launch = engine.launcher(batch_of(sample, batch, shape.patch))
            for _ in range(3):
                launch()
            engine.sync()
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                launch()
                runs += 1
                if runs % 8 == 0:
                    engine.sync()
            engine.sync()
            elapsed = time.perf_counter() - start
            rows.append(
                {
                    "precision": engine.precision,
                    "batch": batch,
                    "patches_per_s": runs * batch / elapsed,
                    "ms_per_batch": 1000 * elapsed / runs,
                    "max_abs_diff_vs_cpu": diff,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def worker_cpu_s_per_patch(results: Path, shape: ModelShape) -> float | None:
    """Worker CPU seconds (main process + decoding) per patch with remote inference, from
    ``make bench``'s results (over all its codecs: the same music in each), or None when there
    are none."""
    if not results.exists():
        return None
    workers = [c["figures"]["worker_triton"] for c in json.loads(results.read_text())["codecs"].values()]
    return sum(w["cpu_s"] for w in workers) / (sum(w["audio_s"] for w in workers) / shape.patch_s)


async def main_async(args: argparse.Namespace, sample: np.ndarray | None) -> list[dict]:
    rows = []
    for model in args.models:
        for batch in args.batches:
            for concurrency in args.concurrencies:
                row = await measure(args.url, model, batch, concurrency, args.seconds, sample)
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    return rows


def _print_server(rows: list[dict], cpu_per_patch: float | None, diffs: dict[str, float]) -> None:
    print("| model | batch | concurrency | patches/s | p50 ms | p95 ms | worker cores fed |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cores = f"{row['patches_per_s'] * cpu_per_patch:.0f}" if cpu_per_patch else "run make bench first"
        print(
            f"| {row['model']} | {row['batch']} | {row['concurrency']} | {row['patches_per_s']:.0f} | {row['latency_p50_ms']:.1f} | {row['latency_p95_ms']:.1f} | {cores} |"
        )
    for model, diff in diffs.items():
        print(f"{model}: max |Δ score| against the CPU reference on the sample: {diff:.2e}")


def _print_direct(rows: list[dict], cpu_per_patch: float | None) -> None:
    print("| precision | batch | patches/s | ms per batch | max abs Δ vs CPU | worker cores fed |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cores = f"{row['patches_per_s'] * cpu_per_patch:.0f}" if cpu_per_patch else "-"
        diff = f"{row['max_abs_diff_vs_cpu']:.1e}" if row["max_abs_diff_vs_cpu"] is not None else "-"
        print(
            f"| {row['precision']} | {row['batch']} | {row['patches_per_s']:.0f} | {row['ms_per_batch']:.2f} | {diff} | {cores} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", type=Path, help="write a model repository with FP32 and FP16 entries, then exit")
    parser.add_argument("--flavour", choices=FLAVOURS, default="onnxruntime", help="server flavour for --prepare")
    parser.add_argument(
        "--sample", type=Path, metavar="AUDIO_DIR", help="cut real patches from AUDIO_DIR into --out-sample, then exit"
    )
    parser.add_argument("--out-sample", type=Path, default=Path("gpu-sample.npz"))
    parser.add_argument("--sample-count", type=int, default=96, help="patches in the sample (72 kB each)")
    parser.add_argument("--sample-file", type=Path, help="npz from --sample: request data and CPU reference scores")
    parser.add_argument("--direct", action="store_true", help="measure the model on cuda:0 in this process")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="torch",
        help="for --direct: the TorchScript file with torch, or the ONNX file with onnxruntime's CUDA provider",
    )
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--models", nargs="+", help="served entries to measure (default: the model and its FP16 entry)")
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--concurrencies", nargs="+", type=int, default=list(CONCURRENCIES))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--results",
        type=Path,
        default=REPO_ROOT / "bench" / "results.json",
        help="make bench's results, for the worker cores figure",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.prepare:
        print("\n".join(prepare(args.prepare, args.model, args.flavour)))
        return 0
    if args.sample:
        print(json.dumps(make_sample(args.sample, args.out_sample, args.sample_count, args.model)))
        return 0
    sample = reference = None
    if args.sample_file:
        with np.load(args.sample_file) as data:
            sample, reference = data["patches"], data["scores"]
    cpu_per_patch = worker_cpu_s_per_patch(args.results, model_shape(model_config(args.model)))
    if args.direct:
        rows = direct(
            args.model,
            args.batches or list(DIRECT_BATCHES),
            args.seconds,
            sample,
            reference,
            ENGINES[args.engine](args.model),
        )
        _print_direct(rows, cpu_per_patch)
    else:
        args.models = args.models or [args.model, args.model + FP16_SUFFIX]
        args.batches = args.batches or list(BATCHES)
        diffs = {}
        if sample is not None:
            for model in args.models:
                diffs[model] = float(np.abs(asyncio.run(server_scores(args.url, model, sample)) - reference).max())
        rows = asyncio.run(main_async(args, sample))
        _print_server(rows, cpu_per_patch, diffs)
        rows = {"rows": rows, "max_abs_diff_vs_cpu": diffs}
    if cpu_per_patch:
        print(f"worker CPU per patch (make bench, remote inference): {1000 * cpu_per_patch:.2f} ms")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export checkpoints to the serving contract: a Triton model repository entry.

One checkpoint gives a single-network entry; several give one graph that runs every network on
the same input, so a single request brings all their outputs back (``musicnn``: the MSD and MTT
networks; measured against two separate models in the README's Models section):

    triton_models/<name>/
      config.pbtxt          GPU servers: onnxruntime platform, dynamic batching, warm-up
      configs/cpu.pbtxt     CPU servers (``tritonserver --model-config-name=cpu``): the python
                            backend running the same ONNX file with onnxruntime
      1/model.onnx          input "mel" [batch, PATCH_FRAMES, N_MELS] -> per network
                            "<network>_scores" [batch, n_labels] (probabilities for tags and
                            classes; valence and arousal scaled to [0, 1] for V/A) and
                            "<network>_embedding" [batch, embedding_dim]; a single network's
                            outputs are plainly "scores" and "embedding"
      1/model.pt            the same network as TorchScript (for a libtorch server)
      1/model.py            the python backend (CPU config only)

``config.pbtxt`` is the single source of truth: the ``moodstream`` parameter holds the networks
(name, labels, task, version, output names), the model version and the frontend constants as
JSON (see :mod:`pipeline.model_meta`), so the worker reads them from
the repository (onnx scorer) or from Triton itself (Triton scorer) and never hard-codes a tag
list. Export refuses to write an entry unless eager PyTorch, TorchScript and onnxruntime agree
to within ``PARITY_TOL`` of each output's scale (its largest magnitude, at least 1).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2 as pb

from pipeline.features import N_MELS, PATCH_FRAMES, log_mel_max
from pipeline.model_meta import EMBEDDING, META_PARAMETER, SCORES, ModelMeta, Network
from training.models import activation, load_checkpoint

#: Largest |Δ| allowed between eager PyTorch and an exported form, as a fraction of the output's
#: scale (its largest |value|, at least 1): float32 rounding grows with the magnitude, and
#: onnxruntime's kernels sum in a different order on different CPUs (an embedding of scale 3.9
#: differs by 1.1e-5 on an AMD EPYC host, 2.9e-6 of its scale).
PARITY_TOL = 1e-5
INPUT = "mel"
_CPU_MODEL = Path(__file__).with_name("export_assets") / "triton_cpu_model.py"
_OPSET = 17
#: Model instances in the CPU config (configs/cpu.pbtxt): the embedded stack's laptop default.
CPU_INSTANCES = 2


class _Serving(nn.Module):
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


def for_serving(serving: _Serving) -> _Serving:
    """The same entry with each network in its inference form where it has one
    (``Musicnn.for_serving``: the same function with less work); others as they are."""
    nets = [net.for_serving(log_mel_max()) if hasattr(net, "for_serving") else net for net in serving.nets]
    return _Serving(nets, serving.splits).eval()


def imitated_networks(ckpt: dict) -> list[dict] | None:
    """The networks a student checkpoint imitates ([{name, labels, embedding_dim}]), else None."""
    return ckpt.get("networks")


@dataclass(frozen=True)
class Exported:
    directory: Path
    max_rel_diff: dict[str, float]  # "inference_form" / "torchscript" / "onnxruntime" vs eager, see check_parity


def export(checkpoints: Path | list[Path], name: str | None, repository: Path, *, version: int = 1, network_names: list[str] | None = None, gpu_max_batch: int = 256, cpu_max_batch: int = 16) -> Exported:
    """Write ``repository/name`` from one checkpoint or several; return the parity figures.

    ``name`` defaults to the training run's ``name`` option, else the architecture (one
    checkpoint only). Each checkpoint's ``version`` string (set at training time) is what output
    events report for its network. ``network_names`` name the networks of a several-network
    entry (default: each run's ``name`` option, else the checkpoint file's stem).
    """
    paths = [checkpoints] if isinstance(checkpoints, Path) else list(checkpoints)
    loaded = [load_checkpoint(p) for p in paths]
    if len(paths) == 1 and imitated_networks(loaded[0][1]):
        return _export_student(loaded[0], name, repository, version=version, gpu_max_batch=gpu_max_batch, cpu_max_batch=cpu_max_batch)
    if len(paths) == 1:
        ckpt = loaded[0][1]
        name = name or ckpt.get("config", {}).get("name") or ckpt["arch"]
        names, outputs = [name], [(SCORES, EMBEDDING)]
    else:
        if not name:
            raise ValueError("an entry of several networks needs --name")
        names = network_names or [c.get("config", {}).get("name") or p.stem for p, (_, c) in zip(paths, loaded)]
        if len(set(names)) != len(names):
            raise ValueError(f"network names must differ, got {names}; name them NAME=CHECKPOINT")
        outputs = [(f"{n}_{SCORES}", f"{n}_{EMBEDDING}") for n in names]
    frontends = {json.dumps(c["frontend"], sort_keys=True) for _, c in loaded}
    if len(frontends) != 1:
        raise ValueError("the networks of one entry must share the frontend they were trained on")
    serving = _Serving([m for m, _ in loaded]).eval()
    dims = _embedding_dims(serving)
    networks = tuple(
        Network(name=n, version=str(c["version"]), task=c["task"], labels=tuple(c["labels"]), embedding_dim=d, scores_output=o[0], embedding_output=o[1])
        for n, (_, c), d, o in zip(names, loaded, dims, outputs)
    )
    versions = sorted({net.version for net in networks})
    meta = ModelMeta(name=name, version="-".join(versions), frontend=loaded[0][1]["frontend"], networks=networks)
    return _write_entry(serving, meta, repository, version=version, gpu_max_batch=gpu_max_batch, cpu_max_batch=cpu_max_batch)


def _export_student(loaded: tuple[nn.Module, dict], name: str | None, repository: Path, *, version: int, gpu_max_batch: int, cpu_max_batch: int) -> Exported:
    """A student imitating several networks: one entry with each network's outputs under the
    teacher's names (its moods.toml sections apply), each carrying the student's version."""
    model, ckpt = loaded
    imitated = imitated_networks(ckpt)
    name = name or ckpt.get("config", {}).get("name") or ckpt["arch"]
    serving = _Serving([model], [[(len(n["labels"]), n["embedding_dim"]) for n in imitated]]).eval()
    networks = tuple(
        Network(name=n["name"], version=str(ckpt["version"]), task=ckpt["task"], labels=tuple(n["labels"]), embedding_dim=n["embedding_dim"], scores_output=f"{n['name']}_{SCORES}", embedding_output=f"{n['name']}_{EMBEDDING}")
        for n in imitated
    )
    meta = ModelMeta(name=name, version=str(ckpt["version"]), frontend=ckpt["frontend"], networks=networks)
    return _write_entry(serving, meta, repository, version=version, gpu_max_batch=gpu_max_batch, cpu_max_batch=cpu_max_batch)


def _write_entry(trained: _Serving, meta: ModelMeta, repository: Path, *, version: int, gpu_max_batch: int, cpu_max_batch: int) -> Exported:
    name = meta.name
    serving = for_serving(trained)
    entry = repository / name
    version_dir = entry / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)

    example = torch.randn(3, PATCH_FRAMES, N_MELS)
    with torch.inference_mode():
        scripted = torch.jit.trace(serving, example)
    scripted.save(str(version_dir / "model.pt"))
    torch.onnx.export(
        serving,
        (example,),
        str(version_dir / "model.onnx"),
        input_names=[INPUT],
        output_names=list(meta.outputs),
        dynamic_axes={INPUT: {0: "batch"}, **{o: {0: "batch"} for o in meta.outputs}},
        opset_version=_OPSET,
        dynamo=False,
    )
    diffs = check_parity(trained, serving, version_dir, meta.outputs)
    shutil.copyfile(_CPU_MODEL, version_dir / "model.py")
    (entry / "configs").mkdir(exist_ok=True)
    (entry / "config.pbtxt").write_text(_config_text(meta, gpu=True, max_batch=gpu_max_batch))
    (entry / "configs" / "cpu.pbtxt").write_text(_config_text(meta, gpu=False, max_batch=cpu_max_batch))
    return Exported(entry, diffs)


def check_parity(trained: nn.Module, serving: nn.Module, version_dir: Path, outputs: tuple[str, ...], batch: int = 5) -> dict[str, float]:
    """Max |Δ| of the inference form (eager), TorchScript and onnxruntime against the trained
    networks in eager PyTorch, on random patches of ``batch`` (a batch size the exporter never
    saw, to exercise the dynamic axis); each output's |Δ| divided by its scale (its largest
    |value| in eager PyTorch, at least 1, so probabilities are held to |Δ| itself)."""
    x = torch.rand(batch, PATCH_FRAMES, N_MELS, generator=torch.Generator().manual_seed(0)) * 3
    with torch.inference_mode():
        eager = [t.numpy() for t in trained(x)]
        rearranged = [t.numpy() for t in serving(x)]
        scripted = [t.numpy() for t in torch.jit.load(str(version_dir / "model.pt"))(x)]
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx = session.run(list(outputs), {INPUT: x.numpy()})
    scales = [max(1.0, float(np.abs(e).max())) for e in eager]
    diffs = {
        form: max(float(np.abs(e - o).max()) / scale for e, o, scale in zip(eager, other, scales))
        for form, other in (("inference_form", rearranged), ("torchscript", scripted), ("onnxruntime", onnx))
    }
    bad = {k: v for k, v in diffs.items() if v > PARITY_TOL}
    if bad:
        raise RuntimeError(f"export parity failed (max |Δ| / output scale, tolerance {PARITY_TOL}): {bad}")
    return diffs


def _embedding_dims(serving: _Serving) -> list[int]:
    with torch.inference_mode():
        return [int(e.shape[-1]) for e in serving(torch.zeros(1, PATCH_FRAMES, N_MELS))[1::2]]


def _config_text(meta: ModelMeta, *, gpu: bool, max_batch: int) -> str:
    config = pb.ModelConfig(name=meta.name, max_batch_size=max_batch)
    if gpu:
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = "model.onnx"
        config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU, count=1)
        # Preferred sizes from the GPU capacity measurements; the queue delay bounds the
        # latency a lone request pays waiting for company.
        config.dynamic_batching.preferred_batch_size.extend([64, 128])
        config.dynamic_batching.max_queue_delay_microseconds = 2000
        warmup = config.model_warmup.add(name="random_patches", batch_size=min(64, max_batch))
        warmup.inputs[INPUT].data_type = pb.TYPE_FP32
        warmup.inputs[INPUT].dims.extend([PATCH_FRAMES, N_MELS])
        warmup.inputs[INPUT].random_data = True
    else:
        config.backend = "python"
        # Two single-threaded instances use two cores with no intra-op synchronisation
        # (measured: 26 ms of CPU a patch, against 30 ms for one instance on two threads).
        config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=CPU_INSTANCES)
        config.dynamic_batching.max_queue_delay_microseconds = 5000
        config.parameters["ort_intra_op_threads"].string_value = "1"
        # One patch per onnxruntime run is the cheapest on a CPU (see the backend's docstring).
        config.parameters["ort_run_batch"].string_value = "1"
    config.input.add(name=INPUT, data_type=pb.TYPE_FP32, dims=[PATCH_FRAMES, N_MELS])
    for network in meta.networks:
        config.output.add(name=network.scores_output, data_type=pb.TYPE_FP32, dims=[len(network.labels)])
        config.output.add(name=network.embedding_output, data_type=pb.TYPE_FP32, dims=[network.embedding_dim])
    config.version_policy.latest.num_versions = 1
    config.parameters[META_PARAMETER].string_value = json.dumps(meta.to_json(), sort_keys=True)
    header = "# Generated by `moodstream-train export`; edit the checkpoint or the exporter, not this file.\n"
    return header + text_format.MessageToString(config)

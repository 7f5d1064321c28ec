"""Triton python-backend model for the GPU capacity benchmark: the exported TorchScript file
(``model.pt``) on the instance's GPU, in FP32 or FP16.

Production GPU servers load ``model.onnx`` with Triton's onnxruntime backend (the official
image). A server that has only the python backend (e.g. the ``tritonserver`` inside the
nvidia-pytriton wheel) can still be measured on a GPU with this model: ``python -m
bench.gpu_capacity --prepare DIR --flavour torch`` copies it to ``<model>/1/model.py`` with the
serving CPU model beside it as ``base_model.py``. Request handling (one response per request,
errors per request, the config as the source of truth) is that model's; only the engine differs:

    parameters { key: "precision" value { string_value: "fp16" } }   # fp32 (default) or fp16

FP32 turns TF32 off so that a GPU's FP32 scores are comparable with the CPU's.
"""

import importlib.util
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

_spec = importlib.util.spec_from_file_location(
    "moodstream_base_model", os.path.join(os.path.dirname(__file__), "base_model.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


class TritonPythonModel(_base.TritonPythonModel):
    """TorchScript over ``<model dir>/<version>/model.pt`` on ``cuda:<instance device>`` (or the CPU for KIND_CPU)."""

    ENGINE = "torch"

    def _open(self, args, parameters):
        precision = parameters.get("precision", "fp32")
        if precision not in _PRECISIONS:
            raise ValueError(f"parameter precision must be one of {sorted(_PRECISIONS)}, not {precision!r}")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True  # batch sizes repeat, so the per-shape search pays
        # KIND_CPU instances exist so that the model can be checked on a machine without a GPU.
        gpu = args.get("model_instance_kind") == "GPU"
        self._device = torch.device("cuda", int(args["model_instance_device_id"])) if gpu else torch.device("cpu")
        self._dtype = _PRECISIONS[precision]
        path = os.path.join(args["model_repository"], args["model_version"], "model.pt")
        self._module = torch.jit.load(path, map_location=self._device).to(self._dtype).eval()
        if len(self._inputs) != 1:
            raise ValueError(f"{path} takes one input; the config names {[n for n, _ in self._inputs]}")

    @torch.inference_mode()
    def _infer(self, feed, batch):
        ((name, _),) = self._inputs
        x = torch.from_numpy(feed[name]).to(self._device, non_blocking=True).to(self._dtype)
        outputs = self._module(x)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        if len(outputs) != len(self._outputs):
            raise ValueError(
                f"the module returned {len(outputs)} tensors; the config names {len(self._outputs)} outputs"
            )
        return [t.float().cpu().numpy().astype(np.float32, copy=False) for t in outputs]

    # Tensors cross the stub through DLPack rather than numpy: the stub was built for numpy 1's
    # array layout, so with numpy 2 in its environment (as on GPU machines that have torch)
    # as_numpy() reads garbage and pb_utils.Tensor(name, array) comes back empty.
    def _array(self, tensor):
        return torch.from_dlpack(tensor.to_dlpack()).numpy()

    def _tensor(self, name, array):
        return pb_utils.Tensor.from_dlpack(name, torch.from_numpy(np.ascontiguousarray(array)))

    def finalize(self):
        self._module = None

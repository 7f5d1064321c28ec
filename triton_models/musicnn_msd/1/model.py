"""Triton python-backend model: runs the ``model.onnx`` beside this file with onnxruntime (CPU).

Copied into ``triton_models/<model>/<version>/model.py`` by ``moodstream-train export`` and used
by ``configs/cpu.pbtxt`` (``tritonserver --model-config-name=cpu``); GPU servers load the same
ONNX file with the onnxruntime backend instead. Tensor names and types come from the model
config, the single source of truth. It runs in the backend stub's Python environment, which
has numpy and onnxruntime only, so it imports nothing from moodstream.

All requests of one ``execute`` call (a dynamic batch) go through one onnxruntime run; each
request gets exactly one response, and a malformed request gets an error response of its own
without failing the others.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [(i["name"], [int(d) for d in i["dims"]]) for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.out_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        threads = int(config.get("parameters", {}).get("ort_intra_op_threads", {}).get("string_value", "0"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def _read(self, request):
        """The request's inputs as arrays, or an error message if they do not fit the config."""
        arrays = {}
        for name, dims in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return None, f"missing input {name!r}"
            array = tensor.as_numpy()
            if array.ndim != len(dims) + 1 or list(array.shape[1:]) != dims:
                return None, f"input {name!r} has shape {list(array.shape)}, expected [batch, {', '.join(map(str, dims))}]"
            arrays[name] = np.ascontiguousarray(array, dtype=np.float32)
        return arrays, None

    def execute(self, requests):
        responses = [None] * len(requests)
        good, arrays = [], []
        for i, request in enumerate(requests):
            data, error = self._read(request)
            if error:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
            else:
                good.append(i)
                arrays.append(data)
        if good:
            sizes = [len(next(iter(a.values()))) for a in arrays]
            feed = {name: np.concatenate([a[name] for a in arrays]) for name, _ in self.inputs}
            try:
                results = self.session.run(self.outputs, feed)
            except Exception as exc:  # noqa: BLE001 - every onnxruntime failure becomes a response
                for i in good:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime: {exc}"))
                return responses
            bounds = np.cumsum(sizes)[:-1]
            parts = [np.split(r, bounds) for r in results]
            for k, i in enumerate(good):
                tensors = [pb_utils.Tensor(name, part[k].astype(self.out_dtypes[name], copy=False)) for name, part in zip(self.outputs, parts)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self):
        self.session = None

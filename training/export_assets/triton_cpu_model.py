"""Triton python-backend model: runs the ``model.onnx`` beside this file with onnxruntime on CPU.

``moodstream-train export`` copies this file to ``triton_models/<model>/<version>/model.py``;
``configs/cpu.pbtxt`` (``tritonserver --model-config-name=cpu``) selects it, so a server without
a GPU serves the same ONNX file that GPU servers load with the onnxruntime backend.

The model config is the single source of truth: tensor names, data types, dims and whether the
first dimension is the batch (``max_batch_size > 0``) are read from it, never hard-coded. The
config parameter ``ort_intra_op_threads`` sets onnxruntime's intra-op threads (0: onnxruntime
decides); ``ort_run_batch`` (0: all at once) caps the patches per onnxruntime run, because on a CPU
a convolutional network's activations fall out of the caches as the batch grows (musicnn
measured here: 26 ms of CPU a patch one at a time, 31 ms at 16, 140 ms at 64).

Each ``execute`` call gets the requests the dynamic batcher gathered. Requests whose non-batch
shapes agree go through one onnxruntime run; if that run fails, its requests are retried one by
one so only the faulty one fails. Every request gets exactly one response, and a bad request
gets an error response of its own instead of an exception that would fail the whole batch.

It runs in the backend stub's Python environment (numpy and onnxruntime only), so it imports
nothing from moodstream.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """onnxruntime session over ``<model dir>/<version>/model.onnx``, shaped by the model config.

    The engine is ``_open`` and ``_infer``, and ``_array`` / ``_tensor`` say how tensors cross
    the stub; the request handling around them is engine-neutral, so a variant for another
    engine overrides just those (the GPU capacity benchmark's TorchScript model does).
    """

    ENGINE = "onnxruntime"

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self._batching = int(config.get("max_batch_size", 0)) > 0
        # (name, dims the model sees): reshape, when configured, is what reaches the backend
        self._inputs = [
            (t["name"], [int(d) for d in t.get("reshape", {"shape": t["dims"]}).get("shape", [])])
            for t in config["input"]
        ]
        self._outputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]]
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self._open(args, parameters)

    def _open(self, args, parameters):
        """The onnxruntime session (``parameters``: the config's parameters as strings)."""
        import onnxruntime as ort  # here, so that a variant for another engine does not need it

        threads = parameters.get("ort_intra_op_threads", "0")
        self._run_batch = int(parameters.get("ort_run_batch", "0"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        # Idle threads would otherwise spin waiting for the next run, taking CPU from the
        # decoding processes that share the machine (measured: 41 -> 30 ms of CPU a patch).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The arena keeps one run's activations (about 40 MB a patch) and reuses them; without
        # it every run mallocs them again and the heap fragments (measured on 12 tracks: the
        # server's RSS 499-642 MB without, 338-347 MB with). Grown by what is asked, it stays
        # at the largest run's size (ort_run_batch patches).
        options.enable_cpu_mem_arena = True
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        provider = ("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})
        self._session = ort.InferenceSession(path, options, providers=[provider])
        # A config naming tensors the ONNX file lacks should fail the load, not every request.
        for kind, wanted, present in (
            ("input", [n for n, _ in self._inputs], [i.name for i in self._session.get_inputs()]),
            ("output", [n for n, _ in self._outputs], [o.name for o in self._session.get_outputs()]),
        ):
            missing = sorted(set(wanted) - set(present))
            if missing:
                raise ValueError(f"config {kind}s {missing} are not in {path} (it has {present})")

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for index, request in enumerate(requests):
            try:
                feed = self._read(request)
            except ValueError as exc:
                responses[index] = _error(str(exc))
                continue
            # Without a batch dimension requests cannot be concatenated: each is its own group.
            key = tuple(a.shape[1:] for a in feed.values()) if self._batching else index
            groups.setdefault(key, []).append((index, feed))
        for members in groups.values():
            for (index, _), response in zip(members, self._run(members)):
                responses[index] = response
        return responses

    def finalize(self):
        self._session = None

    def _read(self, request):
        """The request's inputs by name; ValueError when they do not fit the config."""
        feed = {}
        for name, dims in self._inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name!r}")
            array = self._array(tensor)
            expected = [-1, *dims] if self._batching else dims
            if array.ndim != len(expected) or any(d not in (-1, n) for d, n in zip(expected, array.shape)):
                raise ValueError(f"input {name!r} has shape {list(array.shape)}, the config expects {expected}")
            feed[name] = array
        if self._batching and len({a.shape[0] for a in feed.values()}) > 1:
            raise ValueError(f"inputs disagree on the batch size: { {n: a.shape[0] for n, a in feed.items()} }")
        return feed

    def _run(self, members):
        """One response per (index, feed) member, from a single onnxruntime run when possible."""
        names = [n for n, _ in self._inputs]
        feed = members[0][1] if len(members) == 1 else {n: np.concatenate([f[n] for _, f in members]) for n in names}
        sizes = [f[names[0]].shape[0] for _, f in members] if self._batching else [None]
        try:
            results = self._infer(feed, sum(sizes) if self._batching else 0)
            if self._batching and any(r.ndim == 0 or r.shape[0] != sum(sizes) for r in results):
                raise ValueError(f"the model returned {[list(r.shape) for r in results]} for a batch of {sum(sizes)}")
        except Exception as exc:  # noqa: BLE001 - engines raise several types; each becomes a response
            if len(members) > 1:
                return [response for member in members for response in self._run([member])]
            return [_error(f"{self.ENGINE}: {exc}")]
        parts = [np.split(r, np.cumsum(sizes)[:-1]) for r in results] if self._batching else [[r] for r in results]
        responses = []
        for k in range(len(members)):
            tensors = [
                self._tensor(name, part[k].astype(dtype, copy=False))
                for (name, dtype), part in zip(self._outputs, parts)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def _array(self, tensor):
        """A request tensor's data as a numpy array."""
        return tensor.as_numpy()

    def _tensor(self, name, array):
        """An output tensor holding ``array``."""
        return pb_utils.Tensor(name, array)

    def _infer(self, feed, batch):
        """The session's outputs for ``feed``, in runs of at most ``ort_run_batch`` patches."""
        names = [n for n, _ in self._outputs]
        step = self._run_batch
        if not step or batch <= step:
            return self._session.run(names, feed)
        runs = [self._session.run(names, {n: a[i : i + step] for n, a in feed.items()}) for i in range(0, batch, step)]
        return [np.concatenate(parts) for parts in zip(*runs)]


def _error(message):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))

"""Scoring stage: model patches in, per-patch scores and embeddings out, per network, from
Triton or in-process onnxruntime.

Both scorers serve the same model file and read the same metadata (``config.pbtxt``, see
:mod:`pipeline.contracts.model_meta`); which one runs is the ``scorer`` setting. A served model may run
several networks on the same patches (``musicnn``: MSD and MTT tags); one request carries the
patches once and brings every network's outputs back. Patches of several tracks go in one call;
a call larger than the model's batch limit is split into requests that run concurrently, so
Triton's dynamic batcher sees a full queue.

When the patches lie in this host's shared memory (the worker's decoding processes put them
there, :mod:`pipeline.worker.handoff`) and the ``triton_shared_memory`` setting is on, the Triton
scorer registers the block with the server, whose requests then name a region of it instead of
carrying 72 kB a patch: no copy of the patches in the worker and no 4.5 MB message per
3-minute track to serialize, send and parse. A server that cannot open the block (on another
host, or in a container with a /dev/shm of its own) is found out on the first track, and from
then on the requests carry the patches.

Errors are translated here: an outage (server unreachable, deadline exceeded, overloaded) is
retried with exponential backoff and then raised as :class:`ServiceUnavailable`, which makes
the worker pause rather than dead-letter good tracks; a request the server rejects is
:class:`InferenceFailed` for the tracks in it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import InferenceServerException

from pipeline import metrics
from pipeline.contracts.model_meta import ModelMeta, from_config, read_meta
from pipeline.errors import ConfigError, InferenceFailed, ServiceUnavailable
from pipeline.settings import ScorerKind, Settings
from pipeline.stages.frontend import PATCH_SHAPE

log = logging.getLogger(__name__)

INPUT = "mel"
#: gRPC status codes that mean "the server, not this request": retry, then pause the worker.
_TRANSIENT = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.CANCELLED",
    "StatusCode.NOT_FOUND",
}


@dataclass(frozen=True)
class NetworkOutput:
    """One network's results for n patches."""

    scores: np.ndarray  # [n, n_labels] float32, served activation (probabilities, or V/A in [0, 1])
    embedding: np.ndarray  # [n, embedding_dim] float32


#: network name -> its outputs, in the order the model's metadata lists the networks
Outputs = dict[str, NetworkOutput]


class Scorer(Protocol):
    meta: ModelMeta

    async def score(self, patches: np.ndarray, *, shm_key: str | None = None) -> Outputs:
        """patches: [n, PATCH_FRAMES, N_MELS] float32 -> every network's outputs for them.
        ``shm_key``: the POSIX shared-memory block (``shm_open`` name) that holds exactly these
        patches from its first byte, for a scorer that can read them there."""

    async def close(self) -> None: ...


def empty_outputs(meta: ModelMeta) -> Outputs:
    return {
        n.name: NetworkOutput(np.empty((0, len(n.labels)), np.float32), np.empty((0, n.embedding_dim), np.float32))
        for n in meta.networks
    }


def outputs_from_tensors(meta: ModelMeta, tensors: dict[str, np.ndarray]) -> Outputs:
    """Output tensors by name -> per-network outputs (names from the model's metadata)."""
    return {n.name: NetworkOutput(tensors[n.scores_output], tensors[n.embedding_output]) for n in meta.networks}


def concat_outputs(meta: ModelMeta, parts: list[Outputs]) -> Outputs:
    """Join the outputs of consecutive chunks of patches."""
    if not parts:
        return empty_outputs(meta)
    return {
        n.name: NetworkOutput(
            np.concatenate([p[n.name].scores for p in parts]), np.concatenate([p[n.name].embedding for p in parts])
        )
        for n in meta.networks
    }


def _check_patches(patches: np.ndarray) -> np.ndarray:
    if patches.ndim != 3 or patches.shape[1:] != PATCH_SHAPE:
        raise ValueError(f"patches must be [n, {PATCH_SHAPE[0]}, {PATCH_SHAPE[1]}], got {patches.shape}")
    return np.ascontiguousarray(patches, dtype=np.float32)


def _chunks(patches: np.ndarray, size: int) -> list[np.ndarray]:
    return [patches[i : i + size] for i in range(0, len(patches), size)]


class OnnxScorer:
    """In-process onnxruntime on ``<repository>/<model>/<latest version>/model.onnx``."""

    def __init__(self, repository: Path, model: str, *, threads: int = 0, max_batch: int = 1) -> None:
        self.meta = read_meta(repository, model)
        self.meta.check_frontend()
        versions = sorted((int(p.name) for p in (repository / model).iterdir() if p.name.isdigit()), reverse=True)
        if not versions:
            raise ConfigError(f"model {model} in {repository} has no version directory")
        self.path = repository / model / str(versions[0]) / "model.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Spinning idle threads would take CPU from the decoding processes beside them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # onnxruntime's arena keeps one run's activations (~40 MB a patch) and reuses them. Without
        # it every run mallocs them again and glibc's heap fragments: peak RSS of tagging a
        # 60-minute track varied from 780 to 1,090 MB between identical runs (783-801 MB in ten
        # runs with it, at the same CPU). Growing by what is asked keeps it at the largest run's size.
        options.enable_cpu_mem_arena = True
        provider = ("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=[provider])
        except (ort.capi.onnxruntime_pybind11_state.Fail, OSError) as exc:
            raise ConfigError(f"cannot load {self.path}: {exc}") from None
        self.max_batch = max_batch
        self._lock = asyncio.Lock()

    def score_sync(self, patches: np.ndarray) -> Outputs:
        """Blocking form of :meth:`score`, for the CLI."""
        patches = _check_patches(patches)
        names = list(self.meta.outputs)
        parts = [
            outputs_from_tensors(self.meta, dict(zip(names, self._session.run(names, {INPUT: chunk}))))
            for chunk in _chunks(patches, self.max_batch)
        ]
        return concat_outputs(self.meta, parts)

    async def score(self, patches: np.ndarray, *, shm_key: str | None = None) -> Outputs:
        # One run at a time: concurrent tracks would each start onnxruntime's intra-op threads
        # and oversubscribe the cores the decoding processes need.
        async with self._lock:
            return await asyncio.to_thread(self.score_sync, patches)

    async def close(self) -> None:
        pass


class TritonScorer:
    """gRPC client of a Triton server serving ``model``; build it with :meth:`connect`."""

    def __init__(
        self,
        client: triton.InferenceServerClient,
        meta: ModelMeta,
        *,
        url: str,
        version: str,
        max_batch: int,
        timeout_s: float,
        max_attempts: int,
        shared_memory: bool = True,
    ) -> None:
        self._client = client
        # Inference requests go through a channel of their own, serialized by _infer_request.
        self._channel = grpc.aio.insecure_channel(
            url, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        )
        self._model_infer = self._channel.unary_unary(
            _MODEL_INFER, request_serializer=None, response_deserializer=service_pb2.ModelInferResponse.FromString
        )
        self.meta = meta
        self.url = url
        self.version = version
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        #: whether patches in shared memory are handed over by region (off for good once the
        #: server could not open a block)
        self.shared_memory = shared_memory

    @classmethod
    async def connect(
        cls,
        url: str,
        model: str,
        *,
        version: str = "",
        max_patches: int = 64,
        timeout_s: float = 30.0,
        max_attempts: int = 4,
        shared_memory: bool = True,
    ) -> TritonScorer:
        """Wait (with backoff, ``max_attempts`` tries) until the model is ready; read its metadata."""
        client = triton.InferenceServerClient(url)
        try:
            config = await _retry(
                lambda: _ready_config(client, model, version, timeout_s), max_attempts, f"Triton at {url}", model
            )
        except BaseException:
            await client.close()
            raise
        meta = from_config(config)
        meta.check_frontend()
        max_batch = min(max_patches, config.max_batch_size or max_patches)
        return cls(
            client,
            meta,
            url=url,
            version=version,
            max_batch=max_batch,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            shared_memory=shared_memory,
        )

    async def score(self, patches: np.ndarray, *, shm_key: str | None = None) -> Outputs:
        patches = _check_patches(patches)
        if shm_key and self.shared_memory and len(patches):
            outputs = await self._score_shared(patches, shm_key)
            if outputs is not None:
                return outputs
        return await self._infer_chunks(patches)

    async def ready(self) -> bool:
        """Whether the server and the model answer now (one quick call, no retries)."""
        try:
            return bool(await self._client.is_model_ready(self.meta.name, self.version, client_timeout=self.timeout_s))
        except InferenceServerException:
            return False

    async def _score_shared(self, patches: np.ndarray, key: str) -> Outputs | None:
        """The outputs of ``patches`` read by the server from the block ``key``; None when it
        cannot open the block (shared memory is then off for this scorer) or rejected a request
        naming it (a server restarted meanwhile has forgotten the region): the caller sends the
        patches in the requests instead."""
        region = "moodstream" + key.replace("/", "-")
        try:
            await _retry(
                lambda: self._client.register_system_shared_memory(
                    region, key, patches.nbytes, client_timeout=self.timeout_s
                ),
                self.max_attempts,
                f"Triton at {self.url}",
                self.meta.name,
            )
        except InferenceFailed as exc:
            self.shared_memory = False
            log.warning(
                "Triton at %s cannot read this host's shared memory (%s): the patches go in the requests from now on",
                self.url,
                exc,
            )
            return None
        try:
            return await self._infer_chunks(patches, region)
        except InferenceFailed as exc:
            log.warning(
                "Triton rejected a request naming shared-memory region %s (%s); sending the patches instead",
                region,
                exc,
            )
            return None
        finally:
            try:
                await self._client.unregister_system_shared_memory(region, client_timeout=self.timeout_s)
            except InferenceServerException as exc:  # a server gone or restarted holds no region
                log.debug("unregistering %s: %s", region, exc)

    async def _infer_chunks(self, patches: np.ndarray, region: str | None = None) -> Outputs:
        """``patches`` in requests of at most ``max_batch``, sent at once; with ``region`` (a
        registered shared-memory region holding them) each request names its part of it."""
        requests = [
            _infer_request(
                self.meta.name,
                self.version,
                self.meta.outputs,
                chunk,
                region=None if region is None else (region, start * chunk[0].nbytes),
            )
            for start, chunk in zip(range(0, len(patches), self.max_batch), _chunks(patches, self.max_batch))
        ]
        return concat_outputs(self.meta, list(await asyncio.gather(*(self._infer(r) for r in requests))))

    async def _infer(self, request: bytes) -> Outputs:
        """One serialized request (see :func:`_infer_request`): every network's outputs back."""

        async def once() -> Outputs:
            try:
                response = await self._model_infer(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise InferenceServerException(
                    msg=exc.details() or "", status=str(exc.code()), debug_details=exc.debug_error_string()
                ) from None
            result = InferResult(response)
            return outputs_from_tensors(self.meta, {name: result.as_numpy(name) for name in self.meta.outputs})

        return await _retry(once, self.max_attempts, f"Triton model {self.meta.name}", self.meta.name)

    async def close(self) -> None:
        await self._channel.close()
        await self._client.close()


_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
#: The wire tag of ModelInferRequest.raw_input_contents (a length-delimited field).
_RAW_INPUT_TAG = bytes([service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number << 3 | 2])


def _infer_request(
    model: str, version: str, outputs: tuple[str, ...], chunk: np.ndarray, *, region: tuple[str, int] | None = None
) -> bytes:
    """The serialized ModelInferRequest of ``chunk`` ([n, *PATCH_SHAPE] float32, contiguous).

    With ``region`` (a registered shared-memory region and the byte offset of ``chunk`` in it)
    the request names where the server reads the patches and carries none of them. Otherwise
    the small part (names, shape, outputs) is serialized by protobuf and the patches are
    appended as the raw_input_contents field, so their bytes are copied once on the way to the
    channel; tritonclient's ``infer`` copies them three times (``tobytes``, into the message,
    out of it in serialization), which was half of the worker's own CPU per track on cheap
    codecs.
    """
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name=INPUT, datatype="FP32", shape=list(chunk.shape))
    if region is not None:
        name, offset = region
        tensor.parameters["shared_memory_region"].string_param = name
        tensor.parameters["shared_memory_byte_size"].int64_param = chunk.nbytes
        tensor.parameters["shared_memory_offset"].int64_param = offset
    header = service_pb2.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=[tensor],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs],
    )
    if region is not None:
        return header.SerializeToString()
    data = chunk.data.cast("B")
    return b"".join((header.SerializeToString(), _RAW_INPUT_TAG, _varint(data.nbytes), data))


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint of ``n`` >= 0."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


async def _ready_config(client: triton.InferenceServerClient, model: str, version: str, timeout_s: float):
    if not await client.is_model_ready(model, version, client_timeout=timeout_s):
        raise InferenceServerException("model not ready", status="StatusCode.UNAVAILABLE")
    return (await client.get_model_config(model, version, client_timeout=timeout_s)).config


async def _retry(call, attempts: int, what: str, model: str, base_delay_s: float = 0.5):
    """Run ``call`` with exponential backoff and jitter on transient gRPC errors; every failed
    attempt and every retry is counted for ``model``."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except InferenceServerException as exc:
            status = str(exc.status())
            metrics.TRITON_ERRORS.labels(
                model, status.removeprefix("StatusCode.") if status.startswith("StatusCode.") else "unknown"
            ).inc()
            if status not in _TRANSIENT and "failed to connect" not in str(exc).lower():
                raise InferenceFailed(f"{what} rejected the request: {exc.message()}") from None
            if attempt == attempts:
                raise ServiceUnavailable(f"{what} unavailable after {attempts} attempts: {exc.message()}") from None
            delay = base_delay_s * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s: %s (attempt %d/%d), retrying in %.1f s", what, status, attempt, attempts, delay)
            metrics.TRITON_RETRIES.labels(model).inc()
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def open_scorer(s: Settings) -> Scorer:
    """The configured scorer; waits for Triton to come up rather than failing the caller."""
    if s.scorer is ScorerKind.onnx:
        return OnnxScorer(s.model_repository, s.model, threads=s.onnx_threads, max_batch=s.onnx_batch_patches)
    while True:
        try:
            return await TritonScorer.connect(
                s.triton_url,
                s.model,
                version=s.model_version,
                max_patches=s.max_patches_per_request,
                timeout_s=s.triton_timeout_s,
                max_attempts=s.triton_max_attempts,
                shared_memory=s.triton_shared_memory,
            )
        except ServiceUnavailable as exc:
            log.warning("waiting for Triton: %s", exc)
            await asyncio.sleep(5)

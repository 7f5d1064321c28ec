"""The embedded stack (Tansu, moto, CPU tritonserver) and the Triton python-backend model file.

The integration tests start the real services once for the module, with a tiny model repository
built here: an ONNX model ``mel`` [-1, 187, 96] -> ``tags`` [-1, 50] = sigmoid(mean over time @ W)
served by ``training/export_assets/triton_cpu_model.py``, exactly as the exporter lays it out.
``tiny_var`` serves the same file under a config that lets the time axis vary, so a request of
the wrong length passes Triton's own shape check and fails inside onnxruntime: the model's
per-request error path. The model-file unit tests at the end run it against a stand-in for
``triton_python_backend_utils``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import socket
import struct
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import REPO

from devstack import EmbeddedStack, StackError
from devstack.kafka_front import normalize_api_versions_response

MODEL_FILE = REPO / "training" / "export_assets" / "triton_cpu_model.py"
TIME, MELS, TAGS = 187, 96, 50

CONFIG = """
backend: "python"
max_batch_size: 16
input {{ name: "mel" data_type: TYPE_FP32 dims: [ {time}, {mels} ] }}
output {{ name: "tags" data_type: TYPE_FP32 dims: [ {tags} ] }}
instance_group {{ count: 1 kind: KIND_CPU }}
# A long queue delay makes requests sent together land in one execute() call.
dynamic_batching {{ max_queue_delay_microseconds: 100000 }}
parameters {{ key: "ort_intra_op_threads" value {{ string_value: "1" }} }}
"""


def tiny_onnx() -> onnx.ModelProto:
    weights = np.random.default_rng(0).standard_normal((MELS, TAGS)).astype(np.float32) / 4
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["mel"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "W"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["tags"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["batch", TIME, MELS])],
        [helper.make_tensor_value_info("tags", TensorProto.FLOAT, ["batch", TAGS])],
        [numpy_helper.from_array(weights, "W")],
    )
    # IR 8 / opset 17: loadable by any onnxruntime the stub environment may pin.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def add_model(repo: Path, name: str, time_dim: int) -> Path:
    """One repository entry laid out like the exporter's: ``1/model.{onnx,py}``, ``configs/cpu.pbtxt``."""
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "configs").mkdir()
    onnx.save(tiny_onnx(), repo / name / "1" / "model.onnx")
    shutil.copy(MODEL_FILE, repo / name / "1" / "model.py")
    (repo / name / "configs" / "cpu.pbtxt").write_text(CONFIG.format(time=time_dim, mels=MELS, tags=TAGS))
    return repo / name


def mel(batch: int, seed: int, time_len: int = TIME) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, time_len, MELS), dtype=np.float32)


def live_pids(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (zombies count as gone: they are only waiting for a reaper)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def descendants(root: int) -> dict[int, str]:
    """pid -> command name of every live process below ``root``, from /proc (psutil is not installed)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
        if rest[0] != "Z":
            children.setdefault(int(rest[1]), []).append(int(stat.parent.name))
            names[int(stat.parent.name)] = comm
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = names[child]
            todo.append(child)
    return found


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


# --- the stack ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    add_model(root, "tiny", TIME)
    add_model(root, "tiny_var", -1)
    return root


@pytest.fixture(scope="module")
def others() -> set[int]:
    """Processes already below this test process before the module's stack starts (stacks of
    other test packages): not this module's to stop."""
    return set(descendants(os.getpid()))


@pytest.fixture(scope="module")
def stack(repo, tmp_path_factory, others):
    with EmbeddedStack(
        model_repository=repo, log_dir=tmp_path_factory.mktemp("logs"), models=["tiny", "tiny_var"]
    ) as s:
        yield s


@pytest.fixture(scope="module")
def reference(repo):
    """The same ONNX file run in-process: what Triton must answer."""
    session = ort.InferenceSession(str(repo / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["tags"], {"mel": x})[0]


def triton_infer(client, model: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("mel", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("tags")]).as_numpy("tags")


@pytest.mark.integration
async def test_kafka_round_trip_with_aiokafka(stack):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    stack.create_topics(["stack.check"], partitions=2)
    stack.create_topics(["stack.check", "stack.other"])  # existing topics are left alone
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait("stack.check", b"hello", key=b"track-1", partition=1)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        "stack.check", bootstrap_servers=stack.kafka_bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        assert consumer.partitions_for_topic("stack.check") == {0, 1}
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()
    assert (record.key, record.value, record.partition) == (b"track-1", b"hello", 1)


@pytest.mark.integration
def test_kafka_round_trip_with_librdkafka(stack):
    """confluent-kafka (its wheel's librdkafka): admin, idempotent producer, group consumer."""
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    for future in admin.create_topics([NewTopic("stack.rdkafka", 2, 1)]).values():
        future.result(timeout=30)
    assert admin.list_topics(timeout=30).topics["stack.rdkafka"].partitions.keys() == {0, 1}
    delivered = []
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "enable.idempotence": True})
    producer.produce(
        "stack.rdkafka", b"hello", key=b"track-2", partition=1, on_delivery=lambda err, msg: delivered.append(err)
    )
    assert producer.flush(30) == 0 and delivered == [None]
    consumer = Consumer(
        {"bootstrap.servers": stack.kafka_bootstrap, "group.id": "stack-rdkafka", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe(["stack.rdkafka"])
    try:
        record = None
        for _ in range(60):
            record = consumer.poll(1.0)
            if record is not None:
                break
        assert record is not None and record.error() is None, record and record.error()
        assert (record.key(), record.value(), record.partition()) == (b"track-2", b"hello", 1)
        consumer.commit(record, asynchronous=False)
    finally:
        consumer.close()


@pytest.mark.integration
def test_api_versions_answer_reads_with_librdkafka_before_2_2(stack):
    """The raw ApiVersions v3 exchange that kcat on Debian 12 (librdkafka 2.0.2) starts with."""
    name, version = b"librdkafka", b"2.0.2"
    header = struct.pack(">hhih", 18, 3, 7, len(b"rdkafka")) + b"rdkafka" + b"\x00"
    body = bytes([len(name) + 1]) + name + bytes([len(version) + 1]) + version + b"\x00"
    host, port = stack.kafka_bootstrap.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(struct.pack(">i", len(header + body)) + header + body)
        stream = conn.makefile("rb")
        payload = stream.read(struct.unpack(">i", stream.read(4))[0])
    assert struct.unpack_from(">i", payload)[0] == 7
    apis = read_like_librdkafka_2_0(payload)
    assert {0, 1, 3, 18} <= {key for key, _, _ in apis}  # Produce, Fetch, Metadata, ApiVersions


@pytest.mark.integration
def test_s3_round_trip_through_env(stack, monkeypatch):
    import boto3

    for key, value in stack.env().items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")  # configured by the environment alone, as the worker's client is
    s3.create_bucket(Bucket="stack-check")
    s3.put_object(Bucket="stack-check", Key="a/b.bin", Body=b"\x00audio\xff")
    assert s3.get_object(Bucket="stack-check", Key="a/b.bin")["Body"].read() == b"\x00audio\xff"


@pytest.mark.integration
def test_triton_matches_onnxruntime(stack, reference):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(stack.triton_grpc_url)
    x = mel(4, seed=1)
    np.testing.assert_allclose(triton_infer(client, "tiny", x), reference(x), rtol=0, atol=1e-5)
    with urllib.request.urlopen(stack.triton_metrics_url, timeout=5) as response:
        assert b'nv_inference_count{model="tiny"' in response.read()


@pytest.mark.integration
async def test_concurrent_requests_are_batched_and_answered_separately(stack, reference):
    import tritonclient.grpc.aio as grpcaio

    def stats() -> dict:
        return http_json(f"{stack.triton_http_url}/v2/models/tiny/stats")["model_stats"][0]

    async def infer(client, x: np.ndarray) -> np.ndarray:
        inp = grpcaio.InferInput("mel", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return (await client.infer("tiny", [inp])).as_numpy("tags")

    batches = [mel(n, seed=10 + n) for n in (1, 2, 3)]
    before = stats()
    client = grpcaio.InferenceServerClient(stack.triton_grpc_url)
    try:
        results = await asyncio.gather(*(infer(client, x) for x in batches))
    finally:
        await client.close()
    for x, y in zip(batches, results):
        assert y.shape == (len(x), TAGS)
        np.testing.assert_allclose(y, reference(x), rtol=0, atol=1e-5)
    after = stats()
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["execution_count"] - before["execution_count"] < 3, "the dynamic batcher merged nothing"


@pytest.mark.integration
async def test_malformed_requests_get_errors_and_the_server_keeps_serving(stack, reference):
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(stack.triton_grpc_url)
    with pytest.raises(InferenceServerException, match="shape"):  # refused by Triton itself
        triton_infer(client, "tiny", mel(1, seed=2, time_len=100))
    with pytest.raises(InferenceServerException, match="onnxruntime"):  # reaches the model, fails there
        triton_infer(client, "tiny_var", mel(1, seed=2, time_len=100))

    async def infer(aio, x: np.ndarray) -> np.ndarray:
        inp = grpcaio.InferInput("mel", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return (await aio.infer("tiny_var", [inp])).as_numpy("tags")

    good = [mel(2, seed=3), mel(1, seed=4)]
    aio = grpcaio.InferenceServerClient(stack.triton_grpc_url)
    try:
        results = await asyncio.gather(
            infer(aio, good[0]), infer(aio, mel(1, seed=5, time_len=50)), infer(aio, good[1]), return_exceptions=True
        )
    finally:
        await aio.close()
    assert isinstance(results[1], InferenceServerException)
    for x, y in zip(good, [results[0], results[2]]):
        np.testing.assert_allclose(y, reference(x), rtol=0, atol=1e-5)
    x = mel(3, seed=6)
    np.testing.assert_allclose(triton_infer(client, "tiny", x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.integration
def test_triton_outage_and_restart(stack, reference):
    import tritonclient.grpc as grpcclient

    stack.stop_triton()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{stack.triton_http_url}/v2/health/live", timeout=2)
    stack.stop_triton()  # idempotent
    stack.start_triton()
    client = grpcclient.InferenceServerClient(stack.triton_grpc_url)  # same address as before
    x = mel(2, seed=7)
    np.testing.assert_allclose(triton_infer(client, "tiny", x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.integration
def test_a_service_that_fails_raises_with_its_log_and_leaves_nothing_running(repo, tmp_path):
    before = set(descendants(os.getpid()))
    with pytest.raises(StackError) as caught:
        EmbeddedStack(model_repository=repo, log_dir=tmp_path, models=["no_such_model"], startup_timeout_s=60).start()
    message = str(caught.value)
    assert message.startswith("triton ") and str(tmp_path / "triton.log") in message
    assert "no_such_model" in message  # the log tail says what went wrong
    assert set(descendants(os.getpid())) <= before


@pytest.mark.integration
def test_stop_leaves_no_process(stack, others):
    """Runs last in this module: it stops the module's stack."""
    running = {pid: name for pid, name in descendants(os.getpid()).items() if pid not in others}
    assert {"tansu", "tritonserver", "triton_python_b"} <= set(running.values()), running  # comm is cut at 15 chars
    stack.stop()
    assert not live_pids(set(running)), {p: running[p] for p in live_pids(set(running))}
    stack.stop()  # idempotent


def test_triton_addresses_need_a_model_repository(tmp_path):
    stack = EmbeddedStack(model_repository=None, log_dir=tmp_path, models=["ignored without a repository"])
    assert "MOODSTREAM_TRITON_URL" not in stack.env()
    assert stack.env()["AWS_ENDPOINT_URL_S3"] == stack.s3_endpoint
    with pytest.raises(StackError):
        stack.triton_grpc_url  # noqa: B018 - the property access is the test
    with pytest.raises(StackError):
        stack.start_triton()


@pytest.mark.parametrize(("cores", "workers"), [({0}, "1"), ({0, 1}, "1"), (set(range(8)), "4")])
def test_a_worker_beside_triton_decodes_on_half_the_cores(tmp_path, monkeypatch, cores, workers):
    monkeypatch.delenv("MOODSTREAM_DECODE_WORKERS", raising=False)
    monkeypatch.setattr("devstack.stack.os.sched_getaffinity", lambda pid: cores)
    assert EmbeddedStack(model_repository=tmp_path, log_dir=tmp_path).env()["MOODSTREAM_DECODE_WORKERS"] == workers


def test_decode_workers_set_by_the_user_win_and_without_triton_none_are_set(tmp_path, monkeypatch):
    monkeypatch.setenv("MOODSTREAM_DECODE_WORKERS", "3")
    assert EmbeddedStack(model_repository=tmp_path, log_dir=tmp_path).env()["MOODSTREAM_DECODE_WORKERS"] == "3"
    monkeypatch.delenv("MOODSTREAM_DECODE_WORKERS")
    assert "MOODSTREAM_DECODE_WORKERS" not in EmbeddedStack(model_repository=None, log_dir=tmp_path).env()


# --- the Kafka front's ApiVersions normalisation ------------------------------------------------

#: Tansu 0.6.0's ApiVersions v3 response (correlation id 1 on), as captured from the broker.
TANSU_API_VERSIONS_V3 = bytes.fromhex(
    "00000001000025000c000000040000030000000c00000100000011000009000000090000110000000100001000000005"
    "0000450000000000000f000000050000330000000000000200000009000024000000020000470000000000001e000000"
    "030000150000000200002c0000000100003c0000000100000e0000000500004b000000000000080000000900000b0000"
    "000900001c0000000400001a0000000400001300000007000020000000040000000000000b00002a0000000200003200"
    "0000000000120000000400002e0000000000000a00000006000019000000040000180000000500001d00000003000016"
    "000000050000140000000600000d000000050000000000"
    # tagged fields: 4 of them, each (tag, size, value) holding its default value
    "04"
    "00"
    "01"
    "01"
    "01"
    "08" + "ff" * 8 + "02"
    "01"
    "01"
    "03"
    "01"
    "00"
)


def read_like_librdkafka_2_0(payload: bytes) -> list[tuple[int, int, int]]:
    """(api key, min, max) of an ApiVersions v3 response, read as librdkafka before 2.2.0 reads
    it: it skips a tagged field's size minus one byte (fixed upstream in 2.2.0). EOFError where
    librdkafka reports "Read underflow"."""
    pos = 6  # correlation id, error code

    def uvarint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(payload):
                raise EOFError("Read underflow in a varint")
            value |= (payload[pos] & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if not payload[pos - 1] & 0x80:
                return value

    def skip(size: int) -> None:
        nonlocal pos
        if size > len(payload) - pos:
            raise EOFError(f"Read underflow: expected {size} bytes > {len(payload) - pos} remaining bytes")
        pos += size

    def skip_tags() -> None:
        for _ in range(uvarint()):
            uvarint()
            size = uvarint()
            if size > 1:
                skip(size - 1)

    apis = []
    for _ in range(uvarint() - 1):
        apis.append(struct.unpack_from(">hhh", payload, pos))
        skip(6)
        skip_tags()
    skip(4)  # throttle_time_ms
    skip_tags()
    return apis


def test_tansu_api_versions_answer_is_what_librdkafka_before_2_2_chokes_on():
    # the numbers kcat 1.7.1 (librdkafka 2.0.2) logs with -d protocol for this answer
    with pytest.raises(EOFError, match="expected 216172782113783806 bytes > 5 remaining"):
        read_like_librdkafka_2_0(TANSU_API_VERSIONS_V3)


def test_normalised_api_versions_answer_drops_default_tags_only():
    fixed = normalize_api_versions_response(TANSU_API_VERSIONS_V3)
    assert fixed == TANSU_API_VERSIONS_V3[:-20] + b"\x00"  # its 20 bytes of tagged fields: none
    assert len(read_like_librdkafka_2_0(fixed)) == 36
    assert normalize_api_versions_response(fixed) == fixed
    # a tag holding something else (a finalized features epoch of 5, an unknown tag 9) stays
    base = fixed[:-1]
    epoch, unknown = b"\x01\x08" + (5).to_bytes(8, "big"), b"\x09\x02ab"
    with_values = base + b"\x03" + b"\x00\x01\x01" + epoch + unknown
    assert normalize_api_versions_response(with_values) == base + b"\x02" + epoch + unknown


def test_api_versions_answers_that_are_not_normal_pass_or_raise():
    unsupported = bytes.fromhex("00000002002300000001001200000004")  # v0 layout, error 35
    assert normalize_api_versions_response(unsupported) == unsupported
    for broken in (TANSU_API_VERSIONS_V3[:-3], TANSU_API_VERSIONS_V3 + b"\x00", TANSU_API_VERSIONS_V3[:5]):
        with pytest.raises(ValueError):
            normalize_api_versions_response(broken)


# --- the model file, against a stand-in for triton_python_backend_utils ------------------------


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


def _fake_pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _Tensor
    pb.TritonError = lambda message: types.SimpleNamespace(message=lambda: message)
    pb.InferenceResponse = lambda output_tensors=(), error=None: types.SimpleNamespace(
        tensors={t.name: t.array for t in output_tensors}, error=error
    )
    pb.get_input_tensor_by_name = lambda request, name: next((t for t in request if t.name == name), None)
    pb.triton_string_to_numpy = {"TYPE_FP32": np.float32}.__getitem__
    return pb


@pytest.fixture
def python_model(tmp_path, monkeypatch):
    """The model file initialised on a ``tiny_var`` entry (time axis -1 in the config, 187 in the ONNX)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    entry = add_model(tmp_path, "tiny_var", -1)
    spec = importlib.util.spec_from_file_location("triton_cpu_model", entry / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = {
        "max_batch_size": 16,
        "input": [{"name": "mel", "data_type": "TYPE_FP32", "dims": [-1, MELS]}],
        "output": [{"name": "tags", "data_type": "TYPE_FP32", "dims": [TAGS]}],
        "parameters": {"ort_intra_op_threads": {"string_value": "1"}},
    }
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(entry), "model_version": "1"})
    runs = []
    real_run = model._session.run
    model._session = types.SimpleNamespace(
        run=lambda names, feed: runs.append(feed["mel"].shape[0]) or real_run(names, feed)
    )
    yield model, runs
    model.finalize()


def test_model_batches_compatible_requests_and_isolates_bad_ones(python_model, reference):
    model, runs = python_model
    good = [mel(2, seed=20), mel(1, seed=21), mel(3, seed=22)]
    requests = [
        [_Tensor("mel", good[0])],
        [_Tensor("mel", mel(1, seed=23, time_len=50))],  # passes the config (-1), fails in onnxruntime
        [_Tensor("mel", good[1])],
        [],  # no input at all
        [_Tensor("mel", mel(1, seed=24)[:, :, :10])],  # wrong mel count: refused before onnxruntime
        [_Tensor("mel", good[2])],
    ]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    for index, x in zip((0, 2, 5), good):
        assert responses[index].error is None
        np.testing.assert_allclose(responses[index].tensors["tags"], reference(x), rtol=0, atol=1e-6)
    assert "onnxruntime" in responses[1].error.message()
    assert "missing input 'mel'" in responses[3].error.message()
    assert "shape" in responses[4].error.message()
    assert sorted(runs) == [1, 6]  # the three good requests went through one run


def test_model_retries_a_failed_batch_request_by_request(python_model, reference):
    model, _ = python_model
    real_run = model._session.run

    def fails_on_big_batches(names, feed):
        if feed["mel"].shape[0] > 2:
            raise RuntimeError("simulated onnxruntime failure")
        return real_run(names, feed)

    model._session = types.SimpleNamespace(run=fails_on_big_batches)
    small, big = mel(1, seed=30), mel(3, seed=31)
    responses = model.execute([[_Tensor("mel", small)], [_Tensor("mel", big)]])
    np.testing.assert_allclose(responses[0].tensors["tags"], reference(small), rtol=0, atol=1e-6)
    assert "simulated onnxruntime failure" in responses[1].error.message()

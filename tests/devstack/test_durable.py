"""The embedded stack's fault machinery: a durable broker and S3 across kill -9, injected S3
errors, link faults per client process, and the broker's object store.

The stack here runs without Triton (``model_repository=None``); the chaos run uses all of it
with the workers (``tests/chaos``).
"""

from __future__ import annotations

import asyncio
import os

import botocore.exceptions
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from botocore.config import Config

from devstack import EmbeddedStack
from devstack.object_store import Store, _Request, handle

BUCKET = "durable-audio"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with EmbeddedStack(
        model_repository=None, log_dir=tmp_path_factory.mktemp("durable-logs"), durable=True, link_faults=True
    ) as s:
        yield s


def _s3(stack, attempts: int = 1):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=stack.s3_client_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(retries={"total_max_attempts": attempts, "mode": "standard"}, connect_timeout=2, read_timeout=3),
    )


async def _produce(stack, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, partition=0)
    finally:
        await producer.stop()


async def _read(stack, topic: str, expected: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    got: list[bytes] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        for _ in range(60):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got += [r.value for r in records]
            if len(got) >= expected:
                break
    finally:
        await consumer.stop()
    return got


@pytest.mark.integration
async def test_the_durable_broker_keeps_acknowledged_records_across_a_kill(stack):
    stack.create_topics(["durable"])
    await _produce(stack, "durable", [f"before-{i}".encode() for i in range(5)])
    await asyncio.to_thread(stack.restart_kafka)  # SIGKILL, then the same port
    assert await _read(stack, "durable", 5) == [f"before-{i}".encode() for i in range(5)]
    await _produce(stack, "durable", [b"after"])
    assert (await _read(stack, "durable", 6))[-1] == b"after"


@pytest.mark.integration
def test_the_durable_s3_keeps_its_objects_across_a_kill_and_injects_errors(stack):
    s3 = _s3(stack)
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="a/b.mp3", Body=b"x" * 1000)
    stack.restart_s3()
    assert s3.get_object(Bucket=BUCKET, Key="a/b.mp3")["Body"].read() == b"x" * 1000
    stack.s3_faults([{"match": "a/b", "status": 503, "code": "SlowDown", "every": 2}])
    outcomes = []
    for _ in range(4):
        try:
            s3.get_object(Bucket=BUCKET, Key="a/b.mp3")["Body"].read()
            outcomes.append("ok")
        except botocore.exceptions.ClientError as exc:
            outcomes.append(exc.response["Error"]["Code"])
    stack.s3_faults([])
    assert outcomes == ["ok", "SlowDown", "ok", "SlowDown"]


@pytest.mark.integration
def test_links_of_one_process_are_cut_stalled_and_slowed_and_heal(stack):
    s3 = _s3(stack)
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="link.bin", Body=b"y" * 100_000)
    control = stack.link_control("s3")
    control.send(op="clients", labels={"me": [os.getpid()]})
    try:
        control.send(op="rule", label="me", mode="cut")
        with pytest.raises(botocore.exceptions.BotoCoreError):
            _s3(stack).get_object(Bucket=BUCKET, Key="link.bin")["Body"].read()
        control.send(op="rule", label="me", mode="stall")
        with pytest.raises(botocore.exceptions.BotoCoreError):  # read timeout: nothing comes back
            _s3(stack).get_object(Bucket=BUCKET, Key="link.bin")["Body"].read()
        control.send(op="rule", label="me", delay_ms=50, rate_bps=1_000_000)
        assert _s3(stack).get_object(Bucket=BUCKET, Key="link.bin")["Body"].read() == b"y" * 100_000
        stats = control.send(op="stats")
        assert stats["applied"]["me"] == 3
    finally:
        control.send(op="heal", label="me")
    assert _s3(stack).get_object(Bucket=BUCKET, Key="link.bin")["Body"].read() == b"y" * 100_000


@pytest.mark.integration
def test_other_processes_pass_a_cut_untouched(stack):
    control = stack.link_control("s3")
    control.send(op="clients", labels={"someone-else": [1]})
    control.send(op="rule", label="someone-else", mode="cut")
    try:
        _s3(stack).list_buckets()
    finally:
        control.send(op="heal", label="someone-else")


# --- the broker's object store, in process ---------------------------------------------------------


def _call(store: Store, method: str, target: str, body: bytes = b"", **headers: str):
    return handle(store, _Request(method, target, {k.replace("_", "-"): v for k, v in headers.items()}, body))


def test_object_store_conditional_writes_and_reads():
    store = Store()
    status, headers, _ = _call(store, "PUT", "/b/k", b"one", if_none_match="*")
    assert status == 200
    etag = headers["ETag"]
    assert _call(store, "PUT", "/b/k", b"two", if_none_match="*")[0] == 412
    assert _call(store, "PUT", "/b/k", b"two", if_match='"stale"')[0] == 412
    status, headers, _ = _call(store, "PUT", "/b/k", b"two", if_match=etag)
    assert status == 200 and headers["ETag"] != etag
    assert _call(store, "GET", "/b/k", if_none_match=headers["ETag"])[0] == 304
    assert _call(store, "GET", "/b/k")[2] == b"two"
    assert _call(store, "GET", "/b/k", range="bytes=1-")[2] == b"wo"
    assert _call(store, "GET", "/b/missing")[0] == 404
    assert _call(store, "DELETE", "/b/k")[0] == 204 and _call(store, "HEAD", "/b/k")[0] == 404


def test_object_store_lists_by_prefix_in_pages_and_by_delimiter():
    store = Store()
    for i in range(2500):
        _call(store, "PUT", f"/b/t/p0/records/{i:020d}.batch", b"x")
    _call(store, "PUT", "/b/t/p0/watermark.json", b"{}")
    _call(store, "PUT", "/b/t/p1/records/00000000000000000000.batch", b"x")
    keys, token = [], ""
    while True:
        query = "?list-type=2&prefix=t/p0/records/" + (f"&continuation-token={token}" if token else "")
        _, _, body = _call(store, "GET", "/b" + query)
        text = body.decode()
        keys += [part.split("</Key>")[0] for part in text.split("<Key>")[1:]]
        if "<NextContinuationToken>" not in text:
            break
        token = text.split("<NextContinuationToken>")[1].split("<")[0]
    assert len(keys) == 2500 and keys == sorted(keys)
    _, _, body = _call(store, "GET", "/b?list-type=2&prefix=t/&delimiter=/")
    assert "<Prefix>t/p0/</Prefix>" in body.decode() and "<Prefix>t/p1/</Prefix>" in body.decode()

"""The Kafka clients a consumer of tracks.moods is likely to use, against the embedded stack with
the real worker: librdkafka through confluent-kafka (the wheel's own librdkafka) and through kcat
(the system's librdkafka: 2.0.2 on Debian 12). Each announces a real track on tracks.ingested and
reads the worker's record for it back from tracks.moods.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jsonschema
import pytest
from support import REPO

from devstack import EmbeddedStack
from pipeline.contracts import events
from pipeline.settings import load_settings
from pipeline.stages import storage

pytestmark = pytest.mark.integration
BUCKET = "moodstream-audio"
MODEL = "musicnn"
KCAT = shutil.which("kcat")
#: a track's record on a CPU Triton, with both cores shared, can take a while
WAIT_S = 180


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    settings = load_settings()
    with EmbeddedStack(
        log_dir=tmp_path_factory.mktemp("logs"), model_repository=settings.model_repository, models=[MODEL]
    ) as s:
        s.create_topics(["tracks.ingested", "tracks.moods", "tracks.moods.dlq"])
        with pytest.MonkeyPatch.context() as patch:
            for key, value in s.env().items():
                if key.startswith("AWS_"):
                    patch.setenv(key, value)
            yield s


@pytest.fixture(scope="module")
def audio_uri(stack, example_clips) -> str:
    s3 = storage.make_s3_client()
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(example_clips[1]), BUCKET, f"clients/{example_clips[1].name}")
    return f"s3://{BUCKET}/clients/{example_clips[1].name}"


@pytest.fixture(scope="module")
def worker(stack, audio_uri, tmp_path_factory):
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {
        **os.environ,
        **stack.env(),
        "MOODSTREAM_METRICS_PORT": "0",
        "MOODSTREAM_MODEL": MODEL,
        "MOODSTREAM_ALLOWED_BUCKETS": BUCKET,
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "worker"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.log = log
    yield proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def check_moods(value: bytes, track_id: str, worker: subprocess.Popen) -> None:
    record = json.loads(value)
    jsonschema.validate(record, events.load_schema("track_moods.v3"), format_checker=jsonschema.FormatChecker())
    assert record["track_id"] == track_id, worker.log.read_text(errors="replace")[-3000:]
    assert record["model"]["name"] == MODEL and [len(t) for t in record["tags"].values()] == [50, 50]
    assert record["leading_mood"]["mood"] is not None


def test_confluent_kafka_announces_a_track_and_reads_its_moods(stack, audio_uri, worker):
    from confluent_kafka import Consumer, Producer

    delivered = []
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "acks": "all"})
    producer.produce(
        "tracks.ingested",
        events.ingested_record(track_id="rdkafka-1", audio_uri=audio_uri),
        key=b"rdkafka-1",
        on_delivery=lambda err, msg: delivered.append(err),
    )
    assert producer.flush(30) == 0 and delivered == [None]

    consumer = Consumer(
        {"bootstrap.servers": stack.kafka_bootstrap, "group.id": "recommender-rdkafka", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe(["tracks.moods"])
    deadline = time.monotonic() + WAIT_S
    try:
        while time.monotonic() < deadline and worker.poll() is None:
            record = consumer.poll(1.0)
            if record is None:
                continue
            assert record.error() is None, record.error()
            if record.key() == b"rdkafka-1":
                break
        else:
            pytest.fail(
                f"no tracks.moods record for rdkafka-1; worker log:\n{worker.log.read_text(errors='replace')[-3000:]}"
            )
    finally:
        consumer.close()
    check_moods(record.value(), "rdkafka-1", worker)


@pytest.mark.skipif(KCAT is None, reason="kcat is not installed (Debian package kcat)")
def test_kcat_announces_a_track_and_reads_its_moods(stack, audio_uri, worker):
    version = subprocess.run([KCAT, "-V"], capture_output=True, text=True, check=True).stdout
    print(version.strip().splitlines()[-1])  # says which librdkafka it runs on
    value = events.ingested_record(track_id="kcat-1", audio_uri=audio_uri)
    subprocess.run(
        [KCAT, "-b", stack.kafka_bootstrap, "-P", "-t", "tracks.ingested", "-k", "kcat-1"],
        input=value + b"\n",
        check=True,
        timeout=60,
    )

    read = [
        KCAT,
        "-b",
        stack.kafka_bootstrap,
        "-C",
        "-t",
        "tracks.moods",
        "-o",
        "beginning",
        "-e",
        "-q",
        "-f",
        "%k\t%s\n",
    ]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and worker.poll() is None:
        lines = subprocess.run(read, capture_output=True, check=True, timeout=60).stdout.splitlines()
        found = [line.split(b"\t", 1)[1] for line in lines if line.startswith(b"kcat-1\t")]
        if found:
            break
        time.sleep(1)
    else:
        pytest.fail(f"no tracks.moods record for kcat-1; worker log:\n{worker.log.read_text(errors='replace')[-3000:]}")
    check_moods(found[0], "kcat-1", worker)

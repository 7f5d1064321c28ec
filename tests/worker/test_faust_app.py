"""The worker end to end on the real embedded stack: Tansu broker, moto S3, CPU tritonserver.

Good events, a missing object, a non-audio object and malformed events are announced
together; every good track must come out on tracks.moods (valid against the shipped schema)
and every bad one on the DLQ with its reason, while good events keep flowing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from support import REPO, encode, tone

from devstack import EmbeddedStack, free_ports
from pipeline.contracts import events
from pipeline.contracts.model_meta import read_meta
from pipeline.settings import load_settings
from pipeline.stages import storage
from pipeline.stages.analysis import analyse
from pipeline.stages.scoring import OnnxScorer, TritonScorer

pytestmark = pytest.mark.integration
BUCKET = "moodstream-audio"
MODEL = "musicnn"  # the default: both networks in one pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    settings = load_settings()
    with EmbeddedStack(
        log_dir=tmp_path_factory.mktemp("logs"), model_repository=settings.model_repository, models=[MODEL]
    ) as s:
        s.create_topics(["tracks.ingested", "tracks.moods", "tracks.moods.dlq"])
        os.environ.update({k: v for k, v in s.env().items() if k.startswith("AWS_")})
        storage.make_s3_client().create_bucket(Bucket=BUCKET)
        yield s


MOODSTREAM_WORKER = [sys.executable, "-m", "pipeline", "worker"]
FAUST_WORKER = [
    str(Path(sys.executable).with_name("faust")),
    "-A",
    "pipeline.worker.faust_app",
    "worker",
    "--without-web",
]


def start_worker(
    stack: EmbeddedStack, log_path: Path, command: list[str] = MOODSTREAM_WORKER, **settings: str
) -> subprocess.Popen:
    env = {**os.environ, **stack.env(), "MOODSTREAM_METRICS_PORT": "0", "MOODSTREAM_MODEL": MODEL, **settings}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_worker(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def collect(
    bootstrap: str, expected: int, timeout_s: float, worker: subprocess.Popen, prefix: str = "tracks"
) -> dict[str, list[dict]]:
    """Records on <prefix>.moods and <prefix>.moods.dlq until ``expected`` came (or timeout)."""
    topics = (f"{prefix}.moods", f"{prefix}.moods.dlq")
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    seen: dict[str, list[dict]] = {t: [] for t in topics}
    deadline = time.monotonic() + timeout_s
    try:
        while sum(map(len, seen.values())) < expected and time.monotonic() < deadline and worker.poll() is None:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                seen[tp.topic] += [json.loads(rec.value) for rec in records]
    finally:
        await consumer.stop()
    return seen


def private_topics(stack: EmbeddedStack, prefix: str) -> dict[str, str]:
    """Worker settings giving a test its own topics (<prefix>.ingested, .moods, .moods.dlq) and
    consumer group, created on the broker."""
    topics = {
        "MOODSTREAM_INPUT_TOPIC": f"{prefix}.ingested",
        "MOODSTREAM_OUTPUT_TOPIC": f"{prefix}.moods",
        "MOODSTREAM_DLQ_TOPIC": f"{prefix}.moods.dlq",
    }
    stack.create_topics(list(topics.values()))
    return {**topics, "MOODSTREAM_CONSUMER_GROUP": f"{prefix}-test"}


def announcements(track_ids: list[str], uri: str) -> list[tuple[bytes, bytes]]:
    """(key, tracks.ingested value) for each id, all naming the same audio."""
    return [(t.encode(), events.ingested_record(track_id=t, audio_uri=uri)) for t in track_ids]


async def produce(bootstrap: str, values: list[tuple[bytes | None, bytes]], topic: str = "tracks.ingested") -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in values:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def test_tracks_in_moods_out_and_bad_events_dead_lettered(stack, example_clips, tmp_path):
    s3 = storage.make_s3_client()
    good = {}
    for clip in example_clips:
        s3.upload_file(str(clip), BUCKET, f"it/{clip.name}")
        good[f"real-{clip.stem}"] = f"s3://{BUCKET}/it/{clip.name}"
    s3.put_object(Bucket=BUCKET, Key="it/tone.flac", Body=encode(tone(8.0), "flac"))
    good["tone-flac"] = f"s3://{BUCKET}/it/tone.flac"
    s3.put_object(Bucket=BUCKET, Key="it/readme.mp3", Body=b"this is not audio" * 50)

    def event(track_id: str, uri: str) -> tuple[bytes, bytes]:
        return track_id.encode(), events.ingested_record(track_id=track_id, audio_uri=uri)

    bad = [
        event("missing", f"s3://{BUCKET}/it/nothing-here.mp3"),
        event("not-audio", f"s3://{BUCKET}/it/readme.mp3"),
        event("other-bucket", "s3://someone-elses-bucket/a.mp3"),
        (b"garbage", b"{not json"),
    ]
    values = (
        bad[:2]
        + [event(t, u) for t, u in list(good.items())[:2]]
        + bad[2:]
        + [event(t, u) for t, u in list(good.items())[2:]]
    )
    asyncio.run(produce(stack.kafka_bootstrap, values))

    metrics_port = free_ports(1)[0]
    worker = start_worker(
        stack, tmp_path / "worker.log", MOODSTREAM_ALLOWED_BUCKETS=BUCKET, MOODSTREAM_METRICS_PORT=str(metrics_port)
    )
    try:
        seen = asyncio.run(collect(stack.kafka_bootstrap, len(values), 180, worker))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            exposition = response.read().decode()
    finally:
        stop_worker(worker)
    version = read_meta(REPO / "triton_models", MODEL).served_version
    assert f'moodstream_outputs_total{{model="{MODEL}",version="{version}"}} 3.0' in exposition
    assert 'moodstream_dead_letters_total{reason="bad_event"} 2.0' in exposition
    assert 'moodstream_stage_seconds_count{stage="inference"}' in exposition
    log = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]

    outputs = {r["track_id"]: r for r in seen["tracks.moods"]}
    assert set(outputs) == set(good), log
    schema = events.load_schema("track_moods.v3")
    for record in outputs.values():
        jsonschema.validate(record, schema, format_checker=jsonschema.FormatChecker())
        assert record["model"]["name"] == MODEL and record["model"]["version"] == version
        assert [len(record["tags"][n]) for n in ("musicnn_msd", "musicnn_mtt")] == [50, 50]
        assert record["leading_mood"]["mood"] is not None and set(record["embeddings"]) == {
            "musicnn_msd",
            "musicnn_mtt",
        }
    # musicnn_msd's top tags of the two excerpts, as `moodstream tag` gives them (0.62 and 0.42,
    # the next tag under 0.25): the worker path scores what the local path scores.
    assert [outputs[f"real-{c.stem}"]["top_tags"]["musicnn_msd"][0]["tag"] for c in example_clips] == [
        "jazz",
        "ambient",
    ]

    reasons = {r["track_id"]: r["reason"] for r in seen["tracks.moods.dlq"]}
    assert reasons == {
        "missing": "not_found",
        "not-audio": "undecodable",
        "other-bucket": "bad_event",
        None: "bad_event",
    }, log
    dlq_schema = events.load_schema("track_dead_letter.v1")
    for record in seen["tracks.moods.dlq"]:
        jsonschema.validate(record, dlq_schema)
    garbage = next(r for r in seen["tracks.moods.dlq"] if r["track_id"] is None)
    assert events.original_bytes(garbage) == b"{not json"


def test_triton_and_onnx_scorers_agree_on_real_audio(stack, example_clips):
    settings = load_settings()
    patches = np.concatenate(
        [analyse(c.read_bytes(), max_duration_s=60, min_duration_s=1).patches.patches for c in example_clips]
    )

    async def via_triton():
        scorer = await TritonScorer.connect(stack.triton_grpc_url, MODEL, max_patches=7)
        try:
            return await scorer.score(patches)
        finally:
            await scorer.close()

    remote = asyncio.run(via_triton())
    local = OnnxScorer(settings.model_repository, MODEL).score_sync(patches)
    assert set(remote) == set(local) == {"musicnn_msd", "musicnn_mtt"}
    for name in local:
        assert remote[name].scores.shape == local[name].scores.shape == (len(patches), 50)
        assert np.abs(remote[name].scores - local[name].scores).max() <= 1e-4
        assert np.abs(remote[name].embedding - local[name].embedding).max() <= 1e-4


def test_triton_outage_pauses_the_worker_and_loses_nothing(stack, example_clips, tmp_path):
    """Triton stops while tracks are announced; the worker waits, then tags them all."""
    topics = private_topics(stack, "outage")
    storage.make_s3_client().upload_file(str(example_clips[0]), BUCKET, "outage/a.mp3")
    uri = f"s3://{BUCKET}/outage/a.mp3"
    worker = start_worker(
        stack, tmp_path / "worker.log", MOODSTREAM_ALLOWED_BUCKETS=BUCKET, MOODSTREAM_TRITON_MAX_ATTEMPTS="2", **topics
    )
    try:
        asyncio.run(produce(stack.kafka_bootstrap, announcements(["before"], uri), "outage.ingested"))
        assert len(asyncio.run(collect(stack.kafka_bootstrap, 1, 120, worker, "outage"))["outage.moods"]) == 1
        stack.stop_triton()
        asyncio.run(
            produce(stack.kafka_bootstrap, announcements([f"during-{i}" for i in range(3)], uri), "outage.ingested")
        )
        time.sleep(15)  # the worker meets the outage: it must neither tag nor dead-letter
        assert sum(map(len, asyncio.run(collect(stack.kafka_bootstrap, 99, 3, worker, "outage")).values())) == 1
        stack.start_triton()
        seen = asyncio.run(collect(stack.kafka_bootstrap, 4, 180, worker, "outage"))
    finally:
        stop_worker(worker)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert {r["track_id"] for r in seen["outage.moods"]} == {"before", "during-0", "during-1", "during-2"}, log[-3000:]
    assert seen["outage.moods.dlq"] == []
    assert "triton unavailable, batch paused" in log


def test_a_worker_stopped_during_a_stuck_batch_commits_nothing(stack, example_clips, tmp_path):
    """A worker sent SIGTERM and then killed (its grace period over) while its batch waits for
    Triton must not have committed that batch: the next worker of the group tags the tracks."""
    topics = private_topics(stack, "stop")
    storage.make_s3_client().upload_file(str(example_clips[1]), BUCKET, "stop/a.mp3")
    uri = f"s3://{BUCKET}/stop/a.mp3"
    env = dict(
        MOODSTREAM_ALLOWED_BUCKETS=BUCKET, MOODSTREAM_TRITON_MAX_ATTEMPTS="2", MOODSTREAM_TRITON_TIMEOUT_S="3", **topics
    )
    first = start_worker(stack, tmp_path / "first.log", **env)
    try:
        asyncio.run(produce(stack.kafka_bootstrap, announcements(["warm"], uri), "stop.ingested"))
        assert len(asyncio.run(collect(stack.kafka_bootstrap, 1, 120, first, "stop"))["stop.moods"]) == 1
        stack.stop_triton()
        asyncio.run(produce(stack.kafka_bootstrap, announcements(["t0", "t1"], uri), "stop.ingested"))
        time.sleep(15)  # the worker takes the batch, which is stuck on the outage
        first.send_signal(signal.SIGTERM)
        time.sleep(8)  # still draining: the grace period runs out and the pod is killed
        first.kill()
        first.wait()
    finally:
        stack.start_triton()
    log = (tmp_path / "first.log").read_text(errors="replace")
    assert "triton unavailable, batch paused" in log and "Signal received: 15" in log
    second = start_worker(stack, tmp_path / "second.log", **env)
    try:
        seen = asyncio.run(collect(stack.kafka_bootstrap, 3, 120, second, "stop"))
    finally:
        stop_worker(second)
    assert sorted(r["track_id"] for r in seen["stop.moods"]) == ["t0", "t1", "warm"], log[-2000:]


def test_faust_command_line_runs_the_same_worker(stack, example_clips, tmp_path):
    """`faust -A pipeline.worker.faust_app worker` imports the app from the working directory only; its
    decoding processes must still find the package."""
    topics = private_topics(stack, "faustcli")
    storage.make_s3_client().upload_file(str(example_clips[1]), BUCKET, "faustcli/a.mp3")
    worker = start_worker(stack, tmp_path / "worker.log", FAUST_WORKER, MOODSTREAM_ALLOWED_BUCKETS=BUCKET, **topics)
    try:
        asyncio.run(
            produce(stack.kafka_bootstrap, announcements(["f1"], f"s3://{BUCKET}/faustcli/a.mp3"), "faustcli.ingested")
        )
        seen = asyncio.run(collect(stack.kafka_bootstrap, 1, 120, worker, "faustcli"))
    finally:
        stop_worker(worker)
    assert [r["track_id"] for r in seen["faustcli.moods"]] == ["f1"], (tmp_path / "worker.log").read_text(
        errors="replace"
    )[-3000:]


def test_the_services_catalog_follows_the_output_topic(stack, example_clips, tmp_path):
    """Worker -> <prefix>.moods -> the service's own consumer -> its catalog and index: feeds
    and similar tracks answer from what the topic carried, and a track announced twice (two
    records of the same audio) is one catalog track."""
    from serving import ServiceProcess

    topics = private_topics(stack, "cat")
    s3 = storage.make_s3_client()
    uris = []
    for clip in example_clips:
        s3.upload_file(str(clip), BUCKET, f"cat/{clip.name}")
        uris.append(f"s3://{BUCKET}/cat/{clip.name}")
    values = announcements(["cat-a"], uris[0]) + announcements(["cat-b"], uris[1]) + announcements(["cat-a"], uris[0])
    asyncio.run(produce(stack.kafka_bootstrap, values, topic=topics["MOODSTREAM_INPUT_TOPIC"]))
    worker = start_worker(stack, tmp_path / "worker.log", MOODSTREAM_ALLOWED_BUCKETS=BUCKET, **topics)
    service = ServiceProcess(
        tmp_path / "api",
        **stack.env(),
        **topics,
        MOODSTREAM_MODEL=MODEL,
        MOODSTREAM_CATALOG_FOLLOW="true",
        MOODSTREAM_CATALOG_GROUP="cat-catalog",
    )
    try:
        seen = asyncio.run(collect(stack.kafka_bootstrap, len(values), 180, worker, prefix="cat"))
        assert sorted(r["track_id"] for r in seen["cat.moods"]) == ["cat-a", "cat-a", "cat-b"], (
            tmp_path / "worker.log"
        ).read_text(errors="replace")[-3000:]
        with service:
            deadline = time.monotonic() + 60
            while service.metric("moodstream_catalog_records_total") < len(values) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert service.metric("moodstream_catalog_records_total") == len(values), service.log_tail()
            listed = requests_json(service.url + "/v1/tracks?limit=500")["tracks"]
            assert sorted(t["track_id"] for t in listed) == ["cat-a", "cat-b"]  # cat-a once
            latest = [r for r in seen["cat.moods"] if r["track_id"] == "cat-a"][-1]
            assert requests_json(service.url + "/v1/tracks/cat-a")["moods"] == latest["moods"]
            mood = latest["leading_mood"]["mood"]
            ranked = requests_json(service.url + f"/v1/tracks?mood={mood}&limit=10")["tracks"]
            assert {t["track_id"] for t in ranked} == {"cat-a", "cat-b"}
            scores = {t["track_id"]: t["score"] for t in ranked}
            assert [t["track_id"] for t in ranked] == sorted(scores, key=lambda t: -scores[t])
            near = requests_json(service.url + "/v1/tracks/cat-a/similar?limit=5")
            assert [t["track_id"] for t in near["similar"]] == ["cat-b"] and near["similar"][0]["distance"] > 0
            assert service.metric("moodstream_catalog_tracks") == 2
            # The page's player gets the announced audio through the service, from S3.
            played = urllib.request.urlopen(service.url + "/v1/tracks/cat-b/audio", timeout=30)
            assert played.headers["Content-Type"] == "audio/mpeg"
            assert played.read() == example_clips[1].read_bytes()
    finally:
        stop_worker(worker)


def requests_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())

"""A worker killed with SIGKILL while tracks are in flight, beside a second worker of the same
consumer group; then restarted. Every announced track must get an output; a track published
twice (the killed worker's uncommitted batch, redone by the other) carries the same key and the
same content. Recovery is the time from the kill until the killed worker's partition produces
outputs again, moved to the survivor after the session timeout (MOODSTREAM_KAFKA_SESSION_TIMEOUT_S).
"""

from __future__ import annotations

import time

import pytest

from pipeline.contracts import events
from pipeline.settings import load_settings
from pipeline.stages import storage

from .kit import BUCKET, Reader, WorkerProcess, private_topics, produce, same_content

pytestmark = pytest.mark.faults
TRACKS = 40  # 20 per partition
PARTITIONS = 2


def test_a_killed_worker_loses_nothing_and_its_partition_moves_in_seconds(stack, example_clips, tmp_path, summary):
    topics = private_topics(stack, "crash", partitions=PARTITIONS)
    storage.make_s3_client().upload_file(str(example_clips[0]), BUCKET, "crash/a.mp3")
    settings = dict(MOODSTREAM_BATCH_SIZE="2", MOODSTREAM_DECODE_WORKERS="1", **topics)
    reader = Reader(stack.kafka_bootstrap, "crash")
    a = WorkerProcess(stack, tmp_path / "a.log", **settings)
    b = WorkerProcess(stack, tmp_path / "b.log", **settings)
    workers = [a, b]
    try:
        for w in (a, b):
            assert w.wait_log(r"tagging crash\.ingested", 180), w.log()
        # Both members in the group before anything is announced (each rebalance stops the world).
        assert a.wait_log(r"Ready", 60) and b.wait_log(r"Ready", 60), a.log() + b.log()
        time.sleep(3)
        ids = [f"crash-{i:02d}" for i in range(TRACKS)]
        partition = {t: i % PARTITIONS for i, t in enumerate(ids)}
        produce(
            stack.kafka_bootstrap,
            topics["MOODSTREAM_INPUT_TOPIC"],
            [(t.encode(), events.ingested_record(track_id=t, audio_uri=f"s3://{BUCKET}/crash/a.mp3")) for t in ids],
            lambda i: i % PARTITIONS,
        )

        # Kill one worker as soon as both partitions are being worked on.
        assert reader.wait(lambda s: {partition[t] for t in s.output_ids()} == set(range(PARTITIONS)), 180, (a, b)), (
            a.log() + b.log()
        )
        killed_at = time.monotonic()
        a.kill9()
        done_before = set(reader.seen.seen_at)
        # Recovery: every partition that still has work produces an output after the kill.
        pending = {partition[t] for t in ids if t not in done_before}

        def recovered(s) -> bool:
            return pending <= {partition[t] for t, at in s.seen_at.items() if at > killed_at and t in partition}

        assert reader.wait(recovered, 120, (b,)), b.log()
        recovery_s = (
            max(
                min(at for t, at in reader.seen.seen_at.items() if at > killed_at and partition.get(t) == p)
                for p in pending
            )
            - killed_at
        )
        a = WorkerProcess(stack, tmp_path / "a-restarted.log", **settings)
        workers.append(a)
        complete = reader.wait(lambda s: s.output_ids() >= set(ids), 240, (a, b))
    finally:
        for w in workers:
            w.stop()
        seen = reader.close()
    assert complete, f"lost: {sorted(set(ids) - seen.output_ids())}\n{b.log()}\n{a.log()}"
    assert seen.dead == []
    # Duplicates: same key, same content (apart from the run's own fields).
    by_id: dict[str, list[dict]] = {}
    for record, key in zip(seen.outputs, seen.output_keys):
        assert key == record["track_id"].encode()
        by_id.setdefault(record["track_id"], []).append(record)
    for copies in by_id.values():
        assert all(same_content(copies[0], c) for c in copies[1:])
    lost = len(set(ids) - seen.output_ids())
    summary(
        announced=TRACKS,
        outputs=len(seen.outputs),
        dlq=len(seen.dead),
        duplicates=seen.duplicates(),
        recovery_s=recovery_s,
        lost=lost,
        session_timeout_s=load_settings().kafka_session_timeout_s,
    )
    # The survivor takes over after the session timeout, not after Kafka's default minute and a half.
    assert recovery_s < 60

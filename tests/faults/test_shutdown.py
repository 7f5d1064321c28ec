"""SIGTERM while a batch is in flight: the worker finishes that batch, commits its offsets and
exits within the grace period; a restarted worker tags the rest and redoes nothing.

The batch is held in flight by the S3 proxy, which delays every request of these tracks, so
the signal lands at a known point: after the batch's first S3 request, before its outputs.
"""

from __future__ import annotations

import time

import pytest
from support import encode, tone

from pipeline.contracts import events
from pipeline.stages import storage

from .kit import BUCKET, Fault, Reader, S3FaultProxy, WorkerProcess, private_topics, produce

pytestmark = pytest.mark.faults
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds
BATCH = 4


def test_sigterm_drains_the_batch_in_flight_commits_and_exits(stack, tmp_path, summary):
    topics = private_topics(stack, "term")
    storage.make_s3_client().put_object(Bucket=BUCKET, Key="term/a.mp3", Body=encode(tone(5.0), "mp3"))
    proxy = S3FaultProxy(stack.s3_endpoint)
    proxy.add(Fault("term/a.mp3", delay_s=4.0))
    settings = dict(MOODSTREAM_BATCH_SIZE=str(BATCH), MOODSTREAM_BATCH_WINDOW_S="2", **topics)
    ids = [f"term-{i}" for i in range(3 * BATCH)]
    # One track announced three times (a re-ingest), in different batches: its outputs must
    # come out in announcement order.
    values = [(t.encode(), events.ingested_record(track_id=t, audio_uri=f"s3://{BUCKET}/term/a.mp3")) for t in ids]
    for n, position in enumerate((1, BATCH + 1, 2 * BATCH + 1)):
        values.insert(
            position + n,
            (
                b"term-re",
                events.ingested_record(
                    track_id="term-re", audio_uri=f"s3://{BUCKET}/term/a.mp3", correlation_id=f"re-{n}"
                ),
            ),
        )
    reader = Reader(stack.kafka_bootstrap, "term")
    first = WorkerProcess(stack, tmp_path / "first.log", s3_endpoint=proxy.endpoint, **settings)
    second = None
    try:
        assert first.wait_log(r"tagging term\.ingested", 180), first.log()
        produce(stack.kafka_bootstrap, topics["MOODSTREAM_INPUT_TOPIC"], values)
        deadline = time.monotonic() + 60
        while not proxy.seen("term/a.mp3") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proxy.seen("term/a.mp3"), first.log()
        exit_s = first.terminate(timeout_s=GRACE_S)
        reader.wait(lambda s: len(s.outputs) >= BATCH, 10)
        drained = set(reader.seen.output_ids())
        proxy.faults.clear()  # the restarted worker need not be slow
        second = WorkerProcess(stack, tmp_path / "second.log", s3_endpoint=proxy.endpoint, **settings)
        restart_at = time.monotonic()
        complete = reader.wait(lambda s: len(s.outputs) >= len(values), 240, (second,))
        time.sleep(3)  # a redone batch would show up now
        recovery_s = time.monotonic() - restart_at - 3
    finally:
        first.stop()
        if second:
            second.stop()
        seen = reader.close()
        proxy.close()
    assert exit_s is not None, f"still running {GRACE_S} s after SIGTERM\n{first.log()}"
    assert first.proc.returncode == 0, first.log()
    # Faust's shutdown waits for the stream to finish its batch before it stops the agent.
    after_signal = first.log(100_000).partition("Signal received: 15")[2]
    assert f"batch of {BATCH}: {BATCH} outputs" in after_signal, first.log()
    # The batch in flight was finished: at least one whole batch.
    assert len(drained) >= BATCH, (drained, first.log())
    assert complete, second.log() if second else ""
    # Its offsets were committed: the restarted worker redid none of it.
    assert seen.duplicates() == 0 and seen.dead == []
    assert seen.output_ids() == set(ids) | {"term-re"}
    assert [r["correlation_id"] for r in seen.outputs if r["track_id"] == "term-re"] == ["re-0", "re-1", "re-2"]
    summary(
        announced=len(values),
        outputs=len(seen.outputs),
        dlq=len(seen.dead),
        duplicates=seen.duplicates(),
        recovery_s=recovery_s,
        exit_after_sigterm_s=round(exit_s, 1),
        drained=len(drained),
    )

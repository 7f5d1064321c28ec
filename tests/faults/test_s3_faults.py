"""S3 faults, injected by a real HTTP proxy between the worker and the S3 server.

Per-object faults end in a dead letter with the right reason (missing object: not_found;
denied: access_denied; over the size cap: too_large, without downloading it); transient ones (slow responses, throttling, 500s) are retried by the
client and the track is tagged; a persistent outage pauses the batch (no dead letter) until S3
answers again. Nothing is stuck: every track gets its record within the scenario's bound.
A dead letter is replayed by producing its original again (once the object exists).
"""

from __future__ import annotations

import re
import time

import pytest
from support import encode, tone

from devstack import free_ports
from pipeline.contracts import events
from pipeline.stages import storage

from .kit import BUCKET, Fault, Reader, S3FaultProxy, WorkerProcess, metric, private_topics, produce, scrape

pytestmark = pytest.mark.faults
MAX_OBJECT_BYTES = 1_000_000
LARGE_BYTES = 48_000_000


def test_s3_faults_are_retried_or_dead_lettered_never_stuck(stack, tmp_path, summary):
    topics = private_topics(stack, "s3f")
    s3 = storage.make_s3_client()
    clip = encode(tone(5.0), "mp3")
    keys = ["ok", "denied", "slow", "throttled-0", "throttled-1", "error500", "outage"]
    for key in keys:
        s3.put_object(Bucket=BUCKET, Key=f"s3f/{key}.mp3", Body=clip)
    # Far over the cap, and more than the sockets between proxy and worker buffer, so a body the
    # worker does not read cannot reach it whole.
    s3.put_object(Bucket=BUCKET, Key="s3f/large.mp3", Body=clip * (LARGE_BYTES // len(clip) + 1))
    proxy = S3FaultProxy(stack.s3_endpoint)
    proxy.add(Fault("s3f/denied.mp3", status=403, code="AccessDenied"))
    proxy.add(Fault("s3f/slow.mp3", delay_s=4.0))
    throttles = [proxy.add(Fault(f"s3f/throttled-{i}.mp3", status=503, code="SlowDown", first_n=2)) for i in range(2)]
    proxy.add(Fault("s3f/error500.mp3", status=500, code="InternalError", first_n=2))
    outage = proxy.add(Fault("s3f/outage.mp3", status=503, code="SlowDown"))  # every attempt, until removed

    port = free_ports(1)[0]
    worker = WorkerProcess(
        stack,
        tmp_path / "worker.log",
        s3_endpoint=proxy.endpoint,
        MOODSTREAM_METRICS_PORT=str(port),
        MOODSTREAM_S3_MAX_ATTEMPTS="3",
        MOODSTREAM_MAX_OBJECT_BYTES=str(MAX_OBJECT_BYTES),
        **topics,
    )
    reader = Reader(stack.kafka_bootstrap, "s3f")
    announce = lambda ids: produce(
        stack.kafka_bootstrap,
        topics["MOODSTREAM_INPUT_TOPIC"],
        [(t.encode(), events.ingested_record(track_id=t, audio_uri=f"s3://{BUCKET}/s3f/{t}.mp3")) for t in ids],
    )
    first = ["ok", "missing", "denied", "large", "slow", "throttled-0", "throttled-1", "error500"]
    try:
        start = time.monotonic()
        announce(first)
        assert reader.wait(lambda s: s.total >= len(first), 240, (worker,)), worker.log()
        per_track_s = time.monotonic() - start

        # A persistent outage: the batch waits, nothing is dead-lettered; then S3 recovers.
        announce(["outage"])
        assert not reader.wait(lambda s: s.total > len(first), 15, (worker,))
        paused_metric = metric(scrape(port), 'moodstream_service_down{service="s3"}')
        proxy.remove(outage)
        recovered_at = time.monotonic()
        assert reader.wait(lambda s: "outage" in s.output_ids(), 120, (worker,)), worker.log()
        recovery_s = time.monotonic() - recovered_at

        # Replay: once the missing object exists, its dead letter's original, produced to the
        # input topic again, gives the track its output.
        s3.put_object(Bucket=BUCKET, Key="s3f/missing.mp3", Body=clip)
        dead_missing = next(r for r in reader.seen.dead if r["track_id"] == "missing")
        produce(
            stack.kafka_bootstrap, topics["MOODSTREAM_INPUT_TOPIC"], [(b"missing", events.original_bytes(dead_missing))]
        )
        assert reader.wait(lambda s: "missing" in s.output_ids(), 120, (worker,)), worker.log()
    finally:
        worker.stop()
        seen = reader.close()
        proxy.close()
    reasons = {r["track_id"]: r["reason"] for r in seen.dead}
    assert reasons == {"missing": "not_found", "denied": "access_denied", "large": "too_large"}, worker.log()
    # Refused on its GET's headers: one request, and the worker hung up before the body's end.
    large = proxy.seen("s3f/large.mp3")
    assert [(method, action.split(" after ")[0]) for method, _, action in large] == [
        ("GET", "forward"),
        ("GET", "client hung up"),
    ], large
    sent, total = map(int, re.findall(r"\d+", large[1][2]))
    assert sent < total / 2, large
    assert seen.output_ids() == {"ok", "slow", "throttled-0", "throttled-1", "error500", "outage", "missing"}
    # The transient faults really happened and were retried by the S3 client.
    assert all(t.hits == 2 for t in throttles)
    assert [a for _, _, a in proxy.seen("s3f/error500.mp3")][:3] == [
        "500 InternalError",
        "500 InternalError",
        "forward",
    ]
    assert any(a.startswith("delay") for _, _, a in proxy.seen("s3f/slow.mp3"))
    outage_requests = [a for _, _, a in proxy.seen("s3f/outage.mp3")]
    assert (
        outage_requests.count("503 SlowDown") > 3 and outage_requests[-1] == "forward"
    )  # retried past the client's 3 attempts
    assert paused_metric == 1.0 and "s3 unavailable, batch paused" in worker.log(100_000)
    summary(
        announced=len(first) + 1,
        replayed=1,
        outputs=len(seen.outputs),
        dlq=len(seen.dead),
        duplicates=seen.duplicates(),
        recovery_s=recovery_s,
        per_track_faults_s=round(per_track_s, 1),
        outage_requests_refused=outage_requests.count("503 SlowDown"),
    )

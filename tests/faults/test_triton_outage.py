"""Triton stopped for more than 30 s mid-stream, then restarted on the same port.

No track may be lost or dead-lettered because of the outage; the worker stops taking events
while Triton is down and resumes by itself; its metrics show the outage while it lasts
(``moodstream_service_down{service="triton"}`` 1, ``moodstream_service_errors_total`` rising)
and its end.
"""

from __future__ import annotations

import time

import pytest

from devstack import free_ports
from pipeline.contracts import events
from pipeline.stages import storage

from .kit import BUCKET, Reader, WorkerProcess, metric, private_topics, produce, scrape

pytestmark = pytest.mark.faults
OUTAGE_S = 35
DOWN = 'moodstream_service_down{service="triton"}'
ERRORS = 'moodstream_service_errors_total{service="triton"}'


def test_triton_outage_pauses_and_resumes_without_losing_a_track(stack, example_clips, tmp_path, summary):
    topics = private_topics(stack, "tritonout")
    storage.make_s3_client().upload_file(str(example_clips[1]), BUCKET, "tritonout/a.mp3")
    uri = f"s3://{BUCKET}/tritonout/a.mp3"
    port = free_ports(1)[0]
    worker = WorkerProcess(
        stack,
        tmp_path / "worker.log",
        MOODSTREAM_BATCH_SIZE="4",
        MOODSTREAM_METRICS_PORT=str(port),
        MOODSTREAM_TRITON_MAX_ATTEMPTS="2",
        MOODSTREAM_TRITON_TIMEOUT_S="5",
        **topics,
    )
    reader = Reader(stack.kafka_bootstrap, "tritonout")
    announce = lambda ids: produce(
        stack.kafka_bootstrap,
        topics["MOODSTREAM_INPUT_TOPIC"],
        [(t.encode(), events.ingested_record(track_id=t, audio_uri=uri)) for t in ids],
    )
    before = [f"before-{i}" for i in range(4)]
    during = [f"during-{i}" for i in range(12)]
    triton_down = False
    try:
        announce(before)
        assert reader.wait(lambda s: s.output_ids() >= set(before), 180, (worker,)), worker.log()
        assert metric(scrape(port), DOWN) == 0.0

        stack.stop_triton()
        triton_down = True
        stopped_at = time.monotonic()
        announce(during)
        # Consumption pauses: nothing comes out, nothing is dead-lettered, the outage is visible.
        assert not reader.wait(lambda s: s.total > len(before), OUTAGE_S, (worker,))
        exposition = scrape(port)
        assert worker.alive(), worker.log()
        down_during, errors_during = metric(exposition, DOWN), metric(exposition, ERRORS)
        in_flight = metric(exposition, "moodstream_tracks_in_flight")
        consumed = metric(exposition, "moodstream_events_consumed_total")

        stack.start_triton()
        triton_down = False
        restarted_at = time.monotonic()
        complete = reader.wait(lambda s: s.output_ids() >= set(before + during), 240, (worker,))
        drained_s = time.monotonic() - restarted_at
        recovery_s = (
            min(reader.seen.seen_at[t] for t in during) - restarted_at if complete else None
        )  # first output after the restart
        down_after = metric(scrape(port), DOWN)
    finally:
        if triton_down:  # a failed assertion must not leave the rest of the suite without Triton
            stack.start_triton()
        worker.stop()
        seen = reader.close()
    assert complete, worker.log()
    assert seen.dead == []
    assert down_during == 1.0 and errors_during >= 1 and down_after == 0.0, (down_during, errors_during, down_after)
    # Paused: the batch in flight waits, no further events were taken from the topic.
    assert 0 < in_flight <= 4 and consumed <= len(before) + 4
    summary(
        announced=len(before + during),
        outputs=len(seen.outputs),
        dlq=len(seen.dead),
        duplicates=seen.duplicates(),
        recovery_s=recovery_s,
        all_outputs_s=round(drained_s, 1),
        outage_s=round(restarted_at - stopped_at),
        triton_restart_s=round(stack.startup_seconds["triton"], 1),
    )

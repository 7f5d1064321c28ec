"""The malformed-input corpus through one real worker on the real stack.

Over 200 bad audio objects and over 50 bad events (see corpus.py) are announced together with
good tracks. Each bad item must give a dead letter with its specific reason, or a normal output
where the audio is valid but odd; the worker never exits, its memory and that of its decoding
processes stays bounded (decoding stops at the duration cap, lowered here to keep CPU time
small), and good tracks keep flowing. The scorer is Triton, as in production.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from support import encode, tone

from pipeline.contracts import events
from pipeline.stages import storage

from .corpus import bad_audio, bad_events
from .kit import BUCKET, Reader, WorkerProcess, private_topics, produce

pytestmark = pytest.mark.faults
MAX_DURATION_S = 120  # the cap for this run; the hours-long file must stop there
PEAK_RSS_LIMIT_MB = 3000  # per process; measured peaks are in the summary line


def test_malformed_corpus_gives_a_reason_or_an_output_and_the_worker_survives(stack, tmp_path, summary):
    topics = private_topics(stack, "corpus")
    s3 = storage.make_s3_client()
    audio = bad_audio()
    for case in audio:
        s3.put_object(Bucket=BUCKET, Key=f"corpus/{case.name}.{case.ext}", Body=case.data)
    s3.put_object(Bucket=BUCKET, Key="corpus/good.mp3", Body=encode(tone(6.0), "mp3"))
    bad = list(bad_events(BUCKET, "corpus/good.mp3"))
    assert len(audio) >= 200 and len(bad) >= 50

    values = [
        (
            f"corpus-{c.name}".encode(),
            events.ingested_record(track_id=f"corpus-{c.name}", audio_uri=f"s3://{BUCKET}/corpus/{c.name}.{c.ext}"),
        )
        for c in audio
    ]
    values += [(e.name.encode(), e.value) for e in bad]
    # Good tracks spread through the stream: bad neighbours must not hold them up.
    goods = [f"good-{i}" for i in range(5)]
    for i, track_id in enumerate(goods):
        values.insert(
            i * len(values) // len(goods),
            (track_id.encode(), events.ingested_record(track_id=track_id, audio_uri=f"s3://{BUCKET}/corpus/good.mp3")),
        )
    produce(stack.kafka_bootstrap, topics["MOODSTREAM_INPUT_TOPIC"], values)

    reader = Reader(stack.kafka_bootstrap, "corpus")
    start = time.monotonic()
    worker = WorkerProcess(
        stack,
        tmp_path / "worker.log",
        MOODSTREAM_BATCH_SIZE="32",
        MOODSTREAM_MAX_DURATION_S=str(MAX_DURATION_S),
        **topics,
    )
    try:
        done = reader.wait(lambda seen: seen.total >= len(values), timeout_s=420, workers=(worker,))
        elapsed = time.monotonic() - start
        alive = worker.alive()
        peaks = worker.peak_rss_mb()
    finally:
        worker.stop()
        seen = reader.close()
    log = worker.log()
    assert done and alive, f"{seen.total}/{len(values)} records after {elapsed:.0f} s; worker alive: {alive}\n{log}"

    outputs = {r["track_id"]: r for r in seen.outputs}
    reasons = {r["track_id"]: r["reason"] for r in seen.dead if r["track_id"]}
    got = {c.name: ("output" if f"corpus-{c.name}" in outputs else reasons.get(f"corpus-{c.name}")) for c in audio}
    wrong = {c.name: (c.expected, got[c.name]) for c in audio if got[c.name] != c.expected}
    assert not wrong, f"expected vs got: {wrong}"
    assert outputs["corpus-hours-of-silence"]["duration_s"] == MAX_DURATION_S
    assert set(goods) <= set(outputs)

    # Every bad event: one dead letter, reason bad_event, its original kept byte for byte.
    audio_ids = {f"corpus-{c.name}" for c in audio}
    event_dead = [r for r in seen.dead if r["track_id"] not in audio_ids]
    assert Counter(r["reason"] for r in event_dead) == {"bad_event": len(bad)}
    sent = [e.value or b"" for e in bad]  # a record without a value is kept as empty text
    for record in event_dead:
        replay = events.original_bytes(record)
        if record["original_encoding"] == "json":  # an equivalent event: same values
            assert any(_same_json(replay, value) for value in sent), record
        else:  # text and base64 keep the exact bytes
            assert replay in sent, record
    assert seen.duplicates() == 0

    assert peaks and max(peaks.values()) < PEAK_RSS_LIMIT_MB, peaks
    expected = Counter(c.expected for c in audio)
    summary(
        announced=len(values),
        outputs=len(seen.outputs),
        dlq=len(seen.dead),
        duplicates=seen.duplicates(),
        seconds=round(elapsed),
        audio_cases=dict(expected),
        bad_events=len(bad),
        peak_rss_mb=round(max(peaks.values())),
    )


def _same_json(a: bytes, b: bytes) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        return False

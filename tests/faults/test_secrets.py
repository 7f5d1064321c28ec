"""Secrets stay secret, and events can only make a worker read the allowed bucket.

Workers run with a recognisable Kafka SASL password and AWS secret key in their environment
(the only place they are read from) at debug log level; neither may appear in their logs, in
``moodstream settings``, in a configuration error, or in any output or dead-letter record.
Events naming other buckets, other schemes or path tricks are dead-lettered as bad_event with
production settings (file:// off) and no request reaches S3 for them. The URI rules themselves
are unit-tested in tests/stages/test_storage.py and test_events.py.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time

import pytest
from support import REPO, encode, tone

from pipeline.contracts import events
from pipeline.stages import storage

from .kit import BUCKET, Reader, S3FaultProxy, WorkerProcess, private_topics, produce

pytestmark = pytest.mark.faults
SASL_PASSWORD = "sasl-" + secrets.token_hex(12)
AWS_SECRET = "aws-" + secrets.token_hex(12)
SECRET_ENV = {
    "MOODSTREAM_KAFKA_SASL_USERNAME": "moodstream",
    "MOODSTREAM_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
    "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
}
ESCAPING_URIS = [
    "file:///etc/passwd",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    f"https://{BUCKET}.s3.amazonaws.com/sec/a.mp3",
    "s3://another-bucket/sec/a.mp3",
    f"s3://{BUCKET}/../another-bucket/sec/a.mp3",
    f"s3://{BUCKET}/sec/%2e%2e/%2e%2e/another-bucket/a.mp3",
]


def _assert_clean(text: str, where: str) -> None:
    assert SASL_PASSWORD not in text and AWS_SECRET not in text, f"a secret leaked into {where}"


def test_secrets_never_leak_and_events_cannot_leave_the_allowed_bucket(stack, tmp_path, summary):
    topics = private_topics(stack, "sec")
    storage.make_s3_client().put_object(Bucket=BUCKET, Key="sec/a.mp3", Body=encode(tone(5.0), "mp3"))
    proxy = S3FaultProxy(stack.s3_endpoint)  # records every request the worker makes to S3
    announced = [("good", f"s3://{BUCKET}/sec/a.mp3"), ("missing", f"s3://{BUCKET}/sec/none.mp3")]
    announced += [(f"escape-{i}", uri) for i, uri in enumerate(ESCAPING_URIS)]
    values = [(t.encode(), events.ingested_record(track_id=t, audio_uri=uri)) for t, uri in announced]
    # An event trying to smuggle a secret-looking value through is kept as data, nothing more.
    values.append(
        (
            b"bad",
            json.dumps(
                {
                    "schema_version": 1,
                    "track_id": "bad",
                    "audio_uri": "s3://x/y",
                    "size_bytes": "${AWS_SECRET_ACCESS_KEY}",
                }
            ).encode(),
        )
    )
    produce(stack.kafka_bootstrap, topics["MOODSTREAM_INPUT_TOPIC"], values)

    reader = Reader(stack.kafka_bootstrap, "sec")
    worker = WorkerProcess(
        stack, tmp_path / "worker.log", s3_endpoint=proxy.endpoint, loglevel="debug", **SECRET_ENV, **topics
    )
    try:
        done = reader.wait(lambda s: s.total >= len(values), 180, (worker,))
    finally:
        worker.stop()
        seen = reader.close()
        proxy.close()
    assert done, worker.log()
    assert seen.output_ids() == {"good"}
    reasons = {r["track_id"]: r["reason"] for r in seen.dead}
    assert reasons == {
        "missing": "not_found",
        "bad": "bad_event",
        **{f"escape-{i}": "bad_event" for i in range(len(ESCAPING_URIS))},
    }
    # Only the allowed bucket's two announced objects were ever requested.
    assert {path.split("?")[0] for _, path, _ in proxy.requests} == {f"/{BUCKET}/sec/a.mp3", f"/{BUCKET}/sec/none.mp3"}

    log = worker.log_path.read_text(errors="replace")
    assert "DEBUG" in log  # the most talkative level was on
    _assert_clean(log, "the worker's log")
    for record in seen.outputs + seen.dead:
        _assert_clean(json.dumps(record), f"record {record.get('track_id')}")

    # The settings listing and a configuration error (which echoes the bad values) show no secret.
    env = {**worker.env, **SECRET_ENV}
    listing = subprocess.run(
        [sys.executable, "-m", "pipeline", "settings"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0 and "MOODSTREAM_KAFKA_SASL_PASSWORD" in listing.stdout
    _assert_clean(listing.stdout + listing.stderr, "moodstream settings")
    broken = subprocess.run(
        [sys.executable, "-m", "pipeline", "worker"],
        cwd=REPO,
        env={**env, "MOODSTREAM_BATCH_SIZE": "0", "MOODSTREAM_KAFKA_SASL_PASSWORD": SASL_PASSWORD},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert broken.returncode == 2 and "MOODSTREAM_BATCH_SIZE" in broken.stderr
    _assert_clean(broken.stdout + broken.stderr, "a configuration error")
    summary(
        announced=len(values),
        outputs=len(seen.outputs),
        dlq=len(seen.dead),
        duplicates=seen.duplicates(),
        s3_paths_requested=2,
    )


def test_sasl_credentials_are_not_logged_when_the_broker_refuses_them(stack, tmp_path, summary):
    """A worker configured for SASL against a broker that does not speak it (the embedded one)
    fails to connect; the errors it logs at debug level must not contain the password."""
    topics = private_topics(stack, "secsasl")
    worker = WorkerProcess(
        stack,
        tmp_path / "worker.log",
        loglevel="debug",
        MOODSTREAM_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        MOODSTREAM_KAFKA_SASL_MECHANISM="PLAIN",
        **SECRET_ENV,
        **topics,
    )
    try:
        time.sleep(20)  # long enough to try, fail and retry the connection
    finally:
        worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert "sasl" in log.lower(), log[-3000:]
    _assert_clean(log, "the log of a worker whose SASL login failed")
    summary(announced=0, outputs=0, dlq=0, duplicates=0)

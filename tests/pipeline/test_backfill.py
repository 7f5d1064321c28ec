"""`moodstream publish s3://bucket/prefix`: the backfill announces every audio object, stably."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from aiokafka import AIOKafkaConsumer
from support import REPO

from devstack import EmbeddedStack
from pipeline.backfill import track_id_for
from pipeline.contracts import events
from pipeline.stages import storage

pytestmark = pytest.mark.integration


async def announced(bootstrap: str, expected: int) -> list[tuple[str, dict]]:
    consumer = AIOKafkaConsumer(
        "tracks.ingested", bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[tuple[str, dict]] = []
    try:
        for _ in range(40):
            for records in (await consumer.getmany(timeout_ms=250)).values():
                out += [(r.key.decode(), json.loads(r.value)) for r in records]
            if len(out) >= expected:
                break
    finally:
        await consumer.stop()
    return out


def test_backfill_announces_each_audio_object_and_is_safe_to_rerun(tmp_path):
    with EmbeddedStack(model_repository=None, log_dir=tmp_path / "logs") as stack:
        stack.create_topics(["tracks.ingested"])
        os.environ.update({k: v for k, v in stack.env().items() if k.startswith("AWS_")})
        s3 = storage.make_s3_client()
        s3.create_bucket(Bucket="catalog")
        keys = ["2026/a.mp3", "2026/b b.flac", "2026/deep/c.ogg", "2026/cover.jpg", "other/d.mp3"]
        for key in keys:
            s3.put_object(Bucket="catalog", Key=key, Body=b"x")
        env = {**os.environ, **stack.env()}
        for _ in range(2):
            done = subprocess.run(
                [sys.executable, "-m", "pipeline", "publish", "s3://catalog/2026/", "--rate", "100"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            assert "3 tracks announced" in done.stderr
        records = asyncio.run(announced(stack.kafka_bootstrap, 6))

    assert len(records) == 6
    expected = {track_id_for("catalog", k) for k in keys[:3]}
    assert {key for key, _ in records} == expected
    for key, value in records:
        event = events.parse_ingested(json.dumps(value).encode(), allow_file_uris=False, allowed_buckets=["catalog"])
        assert event.track_id == key and event.ref.key in keys[:3]

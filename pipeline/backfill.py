"""``moodstream publish``: announce tracks on ``tracks.ingested`` — the backfill of a catalog,
and the demo's uploads.

    moodstream publish s3://bucket/prefix [--rate 200] [--dry-run]

Every audio object under the prefix is announced with a track id derived from its key, so a
re-run announces the same ids again and consumers (who deduplicate on track id and model
version) see no new tracks; the worker's outputs for them are identical.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from pipeline.contracts import events
from pipeline.kafka import kafka_options
from pipeline.settings import Settings
from pipeline.stages import storage


def track_id_for(bucket: str, key: str) -> str:
    """A stable track id for an object: re-announcing it yields the same id."""
    return "s3-" + hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()[:32]


def announcement(obj: storage.ListedObject, *, correlation_id: str | None = None) -> tuple[str, bytes]:
    """(track id, ``tracks.ingested`` record) for one listed object."""
    track_id = track_id_for(obj.bucket, obj.key)
    record = events.ingested_record(
        track_id=track_id,
        audio_uri=f"s3://{obj.bucket}/{obj.key}",
        size_bytes=obj.size,
        ingested_at=datetime.now(UTC),
        correlation_id=correlation_id,
    )
    return track_id, record


async def announce(
    producer: AIOKafkaProducer,
    topic: str,
    objects: Iterable[storage.ListedObject],
    *,
    rate_per_s: float = 0.0,
    correlation_id: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Announce each object (keyed by track id); returns the track ids in order. ``rate_per_s``
    caps announcements per second (0: no cap) so a backfill does not swamp the workers."""
    ids = []
    pending = []
    start = time.monotonic()
    bar = tqdm(desc="announced", unit="track", disable=not progress)
    for n, obj in enumerate(objects):
        if rate_per_s > 0:
            wait = start + n / rate_per_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        track_id, record = announcement(obj, correlation_id=correlation_id)
        pending.append(await producer.send(topic, record, key=track_id.encode()))
        ids.append(track_id)
        bar.update()
    await asyncio.gather(*pending)  # every announcement acknowledged by the broker
    bar.close()
    return ids


async def backfill(s: Settings, prefix_uri: str, *, rate_per_s: float, dry_run: bool) -> int:
    """List ``prefix_uri`` and announce every audio object under it; returns how many."""
    client = storage.make_s3_client(s.s3_max_attempts)
    objects = storage.list_audio(prefix_uri, client=client)
    if dry_run:
        count = 0
        for obj in objects:
            print(f"s3://{obj.bucket}/{obj.key}\t{obj.size}\t{track_id_for(obj.bucket, obj.key)}")
            count += 1
        return count
    producer = AIOKafkaProducer(acks="all", enable_idempotence=False, **kafka_options(s))
    await producer.start()
    try:
        ids = await announce(
            producer, s.input_topic, objects, rate_per_s=rate_per_s, correlation_id=f"backfill-{int(time.time())}"
        )
    finally:
        await producer.stop()
    return len(ids)

"""What the chaos run records while it runs, each as JSON lines in the run's folder:

    announced.jsonl   every announcement the broker acknowledged: track, correlation id, partition, offset
    seen.jsonl        every output and dead letter read back, with the time it was read
    fences.jsonl      committed-offset samples: the worker group's committed input offsets, then the
                      offset of a fence record written to every output and dead-letter partition
    catalog.jsonl     the catalog's track count over time
    faults.jsonl      every fault: kind, target, start, end, detail
    procs.jsonl       per process: resident and peak memory, file descriptors, threads, over time

A fence proves commit order without trusting any clock: a worker commits a batch only after its
outputs were acknowledged, so every output of an input below a sampled committed offset was
written before the sample, hence sits below the fence written after it in its partition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

log = logging.getLogger("chaos")
FENCE_KEY = b"__chaos_fence__"


class Journal:
    """An append-only JSON-lines file, flushed per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # open for the run's life

    def write(self, **entry: Any) -> None:
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Announcement:
    index: int
    track_id: str
    correlation_id: str
    key: bytes
    value: bytes
    expected: str  # "output" or a dead-letter reason
    kind: str  # "clip" or a bad kind


async def _retrying(what: str, call: Callable[[], Any], stop: asyncio.Event | None = None) -> Any:
    """``await call()`` until it succeeds (the broker restarts, links are cut)."""
    delay = 0.5
    while True:
        try:
            return await call()
        except (KafkaError, OSError, TimeoutError) as exc:
            if stop is not None and stop.is_set():
                raise
            log.debug("%s: %r; retrying in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class Producer:
    """Announces tracks at a steady rate, retrying each until the broker acknowledges it (a
    retry after a lost acknowledgement can announce a track twice: the same correlation id)."""

    def __init__(self, bootstrap: str, topic: str, journal: Journal) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.journal = journal
        self.acked = 0
        self._producer: AIOKafkaProducer | None = None

    async def _client(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, acks="all", request_timeout_ms=15_000, linger_ms=0
            )
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def send(self, a: Announcement) -> None:
        async def once() -> Any:
            producer = await self._client()
            try:
                return await asyncio.wait_for(producer.send_and_wait(self.topic, a.value, key=a.key), 30)
            except BaseException:
                self._producer = None
                await producer.stop()
                raise

        meta = await _retrying(f"announcing {a.track_id}", once)
        self.acked += 1
        self.journal.write(
            i=a.index,
            track=a.track_id,
            corr=a.correlation_id,
            p=meta.partition,
            o=meta.offset,
            t=time.time(),
            expected=a.expected,
            kind=a.kind,
        )

    async def run(self, announcements: list[Announcement], rate: Callable[[], float], stop: asyncio.Event) -> None:
        start = time.monotonic()
        sent = 0.0
        for a in announcements:
            if stop.is_set():
                return
            # Steady pace: the n-th announcement not before n / rate seconds (a backlog after
            # a broker restart is sent at once).
            sent += 1 / max(rate(), 1e-6)
            wait = start + sent - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.send(a)

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()


@dataclass
class Progress:
    """What the reader has seen, for the run's progress and its end."""

    done: set[str] = field(default_factory=set)  # correlation ids (or raw-text ids) with a result
    outputs: int = 0
    dead: int = 0
    last_seen: dict[int, float] = field(default_factory=dict)  # partition -> time of last record read


class Reader:
    """Reads the output and dead-letter topics from the start, for the whole run."""

    def __init__(self, bootstrap: str, topics: tuple[str, str], partitions: int, journal: Journal) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.partitions = partitions
        self.journal = journal
        self.progress = Progress()
        #: (topic, partition) -> next offset to read: kept across reconnections
        self.position: dict[tuple[str, int], int] = {}

    async def run(self, stop: asyncio.Event, original_id: Callable[[dict[str, Any]], str | None]) -> None:
        while not stop.is_set():
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_bytes=16 * 1024 * 1024,
                request_timeout_ms=15_000,
            )
            try:
                await consumer.start()
                tps = [TopicPartition(t, p) for t in self.topics for p in range(self.partitions)]
                consumer.assign(tps)
                for tp in tps:
                    if (tp.topic, tp.partition) in self.position:
                        consumer.seek(tp, self.position[(tp.topic, tp.partition)])
                    else:
                        await consumer.seek_to_beginning(tp)
                while not stop.is_set():
                    batches = await consumer.getmany(timeout_ms=500)
                    now = time.time()
                    for tp, records in batches.items():
                        for rec in records:
                            self.position[(tp.topic, tp.partition)] = rec.offset + 1
                            self._record(tp, rec, now, original_id)
            except (KafkaError, OSError) as exc:
                log.debug("reader: %r; reconnecting", exc)
                await asyncio.sleep(1)
            finally:
                await consumer.stop()

    def _record(self, tp: TopicPartition, rec: Any, now: float, original_id: Callable[[dict], str | None]) -> None:
        if rec.key == FENCE_KEY:
            return
        dead = tp.topic == self.topics[1]
        try:
            doc = json.loads(rec.value)
        except ValueError:
            doc = {}
        ident = (original_id(doc) if dead else doc.get("correlation_id")) or f"?{tp.topic}/{tp.partition}/{rec.offset}"
        self.journal.write(
            topic="dlq" if dead else "moods",
            p=tp.partition,
            o=rec.offset,
            t=now,
            track=doc.get("track_id"),
            id=ident,
            reason=doc.get("reason"),
        )
        self.progress.done.add(ident)
        if dead:
            self.progress.dead += 1
        else:
            self.progress.outputs += 1
        self.progress.last_seen[tp.partition] = now


class FenceSampler:
    """Every ``interval_s``: the worker group's committed offsets, then a fence in every output
    and dead-letter partition (see the module's docstring)."""

    def __init__(
        self, bootstrap: str, group: str, input_topic: str, outputs: tuple[str, str], partitions: int, journal: Journal
    ) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.input_topic = input_topic
        self.outputs = outputs
        self.partitions = partitions
        self.journal = journal
        self.samples = 0

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        admin: AIOKafkaAdminClient | None = None
        producer: AIOKafkaProducer | None = None
        n = 0
        while not stop.is_set():
            await asyncio.sleep(interval_s)
            try:
                if admin is None:
                    admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
                    await admin.start()
                if producer is None:
                    producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", request_timeout_ms=10_000)
                    await producer.start()
                t0 = time.time()
                # Naming the partitions: Tansu 0.6's answer for "all of the group's" does not parse.
                partitions = [TopicPartition(self.input_topic, p) for p in range(self.partitions)]
                offsets = await asyncio.wait_for(
                    admin.list_consumer_group_offsets(self.group, partitions=partitions), 15
                )
                committed = {
                    tp.partition: meta.offset
                    for tp, meta in offsets.items()
                    if tp.topic == self.input_topic and meta.offset >= 0
                }
                n += 1
                value = json.dumps({"chaos_fence": n, "at": t0}).encode()
                sends = [
                    await producer.send(topic, value, key=FENCE_KEY, partition=p)
                    for topic in self.outputs
                    for p in range(self.partitions)
                ]
                metas = await asyncio.wait_for(asyncio.gather(*sends), 15)
                fences = {f"{m.topic}/{m.partition}": m.offset for m in metas}
                self.journal.write(n=n, t=t0, committed=committed, fences=fences)
                self.samples += 1
            except (KafkaError, OSError, TimeoutError) as exc:
                log.debug("fence sample %d failed: %r", n, exc)
                for client in (admin, producer):
                    if client is not None:
                        try:
                            await client.close() if client is admin else await client.stop()  # type: ignore[union-attr]
                        except Exception:  # noqa: BLE001 - a broken client is dropped either way
                            pass
                admin = producer = None
        if admin is not None:
            await admin.close()
        if producer is not None:
            await producer.stop()


async def read_topic(bootstrap: str, topic: str, partitions: int, *, idle_s: float = 30.0) -> list[dict[str, Any]]:
    """Every record of ``topic`` from the start to its end offsets, read when nothing writes to
    it any more: partition, offset, key, value (bytes). Raises TimeoutError when no record came
    for ``idle_s`` before the end was reached."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        fetch_max_bytes=16 * 1024 * 1024,
        request_timeout_ms=30_000,
    )
    await _retrying(f"reading {topic}", consumer.start)
    records: list[dict[str, Any]] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        position = {tp: 0 for tp in tps}
        idle_since = time.monotonic()
        while any(position[tp] < ends[tp] for tp in tps):
            if time.monotonic() - idle_since > idle_s:
                raise TimeoutError(f"{topic}: read {position}, the end is {ends}")
            batches = await consumer.getmany(timeout_ms=1000)
            for tp, recs in batches.items():
                for r in recs:
                    records.append({"p": tp.partition, "o": r.offset, "key": r.key, "value": r.value})
                    position[tp] = r.offset + 1
                if recs:
                    idle_since = time.monotonic()
    finally:
        await consumer.stop()
    return records

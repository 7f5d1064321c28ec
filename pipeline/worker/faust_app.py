"""The Faust worker: thin wiring from ``tracks.ingested`` to :class:`pipeline.worker.batch.BatchWorker`.

Run it with ``moodstream worker`` or ``faust -A pipeline.worker.faust_app worker --without-web -l info``.

One agent, concurrency 1 (faust-streaming issue #606: concurrency > 1 can commit past an
event still in flight); parallelism comes from inside the batch (concurrent S3 fetches, a
process pool for decoding, one inference call for all patches). ``stream.take`` acknowledges a
batch's events only after the loop body returns, and the body returns only after every output
and dead-letter record was acknowledged by the broker: offsets never pass a track whose result
is not stored (at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable

import faust
from faust.types import ConsumerT
from prometheus_client import start_http_server

from pipeline import metrics
from pipeline.settings import Settings, load_settings
from pipeline.stages import storage
from pipeline.stages.scoring import open_scorer
from pipeline.stages.taxonomy import load_taxonomy
from pipeline.worker import pool
from pipeline.worker.batch import BatchResult, BatchWorker, WorkerConfig

log = logging.getLogger(__name__)

settings = load_settings()


def _credentials(s: Settings) -> faust.types.auth.CredentialsT | None:
    protocol = s.kafka_security_protocol
    context = ssl.create_default_context() if protocol.uses_ssl else None
    if not protocol.uses_sasl:
        return faust.SSLCredentials(context) if context else None
    return faust.SASLCredentials(
        username=s.kafka_sasl_username,
        password=s.kafka_sasl_password.get_secret_value(),
        mechanism=s.kafka_sasl_mechanism,
        ssl_context=context,
    )


app = faust.App(
    settings.consumer_group,
    broker=[f"kafka://{host.strip()}" for host in settings.kafka_bootstrap.split(",")],
    broker_credentials=_credentials(settings),
    value_serializer="raw",
    key_serializer="raw",
    producer_acks=-1,
    topic_allow_declare=True,
    topic_disable_leader=True,
    # Faust's defaults (60 s) make a crashed worker's partitions wait a minute or more.
    broker_session_timeout=settings.kafka_session_timeout_s,
    broker_heartbeat_interval=settings.kafka_heartbeat_interval_s,
    broker_rebalance_timeout=settings.kafka_rebalance_timeout_s,
    consumer_group_instance_id=settings.kafka_group_instance_id or None,
)
ingested = app.topic(settings.input_topic, key_type=bytes, value_type=bytes)
_outputs = {
    name: app.topic(name, key_type=bytes, value_type=bytes) for name in (settings.output_topic, settings.dlq_topic)
}


async def publish(topic: str, key: bytes | None, value: bytes) -> None:
    """Send one record and wait for the broker's acknowledgement."""
    pending = await _outputs[topic].send(key=key, value=value)
    await pending


def worker_config(s: Settings) -> WorkerConfig:
    return WorkerConfig(
        output_topic=s.output_topic,
        dlq_topic=s.dlq_topic,
        allowed_buckets=tuple(s.allowed_buckets),
        allow_file_uris=s.allow_file_uris,
        max_object_bytes=s.max_object_bytes,
        max_duration_s=s.max_duration_s,
        min_duration_s=s.min_duration_s,
        excerpts=s.excerpts,
        excerpt_s=s.excerpt_s,
        top_moods=s.top_moods,
        timeline_segment_s=s.timeline_segment_s,
        embeddings=s.embeddings,
        audio_features=s.audio_features,
    )


@app.agent(ingested, concurrency=1)
async def tag_tracks(stream: faust.StreamT) -> None:
    scorer = await open_scorer(settings)
    taxonomy = load_taxonomy(scorer.meta, settings.moods_file)
    worker = BatchWorker(
        worker_config(settings),
        scorer=scorer,
        taxonomy=taxonomy,
        s3_client=storage.make_s3_client(settings.s3_max_attempts),
        make_pool=lambda: pool.make_pool(settings.decode_workers),
        publish=publish,
    )
    await pool.warm_up(worker.pool, settings.decode_workers)
    pool.freeze_startup_objects()
    log.info(
        "tagging %s with %s v%s via %s",
        settings.input_topic,
        scorer.meta.name,
        scorer.meta.served_version,
        settings.scorer.value,
    )
    try:
        async for batch in stream.take(settings.batch_size, within=settings.batch_window_s):
            result = await _drained(_process_until_done(worker, batch))
            log.info(
                "batch of %d: %d outputs, dead letters %s", len(batch), result.outputs, result.dead_letters or "none"
            )
    finally:
        worker.close()
        await scorer.close()


async def _drained(work: Awaitable[BatchResult]) -> BatchResult:
    """Finish the batch in flight even when the agent is cancelled (SIGTERM): ``stream.take``
    acknowledges a batch's events when the loop is left, also by cancellation, so leaving
    before the outputs are stored would commit offsets of untagged tracks. If the batch cannot
    finish within the pod's grace period the process is killed first and nothing is committed."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        log.info("stopping: finishing the batch in flight first")
        await task
        raise


async def _process_until_done(worker: BatchWorker, batch: list[bytes]) -> BatchResult:
    """Faust acknowledges a batch whose agent raised, so an unexpected error (the broker refusing
    outputs, a bug) must not leave the loop: the batch is retried, its offsets stay put."""
    while True:
        try:
            return await worker.process(batch)
        except Exception:
            log.exception("batch of %d failed; retrying it in 5 s (offsets not committed)", len(batch))
            await asyncio.sleep(5)


@app.task
async def _serve_metrics() -> None:
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
        log.info("Prometheus metrics on :%d/metrics", settings.metrics_port)


#: How often the consumer lag gauge is refreshed (one ListOffsets request to the broker).
_LAG_INTERVAL_S = 5.0


@app.timer(_LAG_INTERVAL_S)
async def _report_lag() -> None:
    """Consumer lag of the input topic per partition assigned to this worker."""
    try:
        metrics.set_consumer_lag(await _partition_lag(app.consumer, settings.input_topic))
    except Exception as exc:  # noqa: BLE001 - a metrics refresh must never stop the worker
        log.warning("consumer lag not refreshed: %r", exc)


async def _partition_lag(consumer: ConsumerT, topic: str) -> dict[int, int]:
    partitions = [tp for tp in consumer.assignment() if tp.topic == topic]
    if not partitions:
        return {}
    ends = await consumer.highwaters(*partitions)
    # Faust keeps the offsets it committed (and those the group had at assignment) here; there
    # is no public accessor, and asking the broker every few seconds would cost a request more.
    committed = {tp.partition: consumer._committed_offset.get(tp) for tp in partitions}  # type: ignore[attr-defined]
    missing = [tp for tp in partitions if committed[tp.partition] is None]
    earliest = await consumer.earliest_offsets(*missing) if missing else {}
    return metrics.partition_lag(
        {tp.partition: end for tp, end in ends.items()},
        committed,
        {tp.partition: offset for tp, offset in earliest.items()},
    )

"""``moodstream demo [AUDIO_DIR] [--json]``: the whole product on one machine, no cloud.

Starts the embedded stack (Tansu Kafka broker, moto S3 server, CPU tritonserver), uploads the
folder to S3, announces each file on ``tracks.ingested``, runs a real worker process against
them, prints every record arriving on ``tracks.moods`` (and ``tracks.moods.dlq``), and stops
everything. Exit status 0 only if every announced track got an output or a dead letter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline import storage
from pipeline.publish import announce
from pipeline.settings import REPO_ROOT, load_settings
from pipeline.stack import EmbeddedStack
from pipeline.taxonomy import mood_line

#: Three 30-s excerpts of Debian's drascula-music (jazz, ambient, rock), written by `make clips`
#: (training/data/debian_music.toml): real music the project fetches itself, quick to tag.
DEFAULT_AUDIO_DIR = Path.home() / ".cache" / "moodstream" / "clips"
FETCH_HINT = "`make clips` writes the demo's clips there (Debian's drascula-music, 36 MB, once)"
BUCKET = "moodstream-audio"


@dataclass(frozen=True)
class DemoOptions:
    audio_dir: Path
    as_json: bool
    scorer: str  # "triton" or "onnx"
    model: str
    timeout_s: float
    log_dir: Path


def _say(opts: DemoOptions, text: str) -> None:
    # With --json, stdout carries only the output records; progress goes to stderr.
    print(text, file=sys.stderr if opts.as_json else sys.stdout, flush=True)


def audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in storage.AUDIO_EXTENSIONS)


def upload(stack: EmbeddedStack, files: list[Path], root: Path, *, bucket: str = BUCKET, prefix: str = "demo") -> list[storage.ListedObject]:
    """Put ``files`` into ``bucket`` on the stack's S3 server under ``prefix/<path below root>``."""
    env = stack.env()
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    client = storage.make_s3_client(3)
    client.create_bucket(Bucket=bucket)
    objects = []
    for path in files:
        key = f"{prefix}/{path.relative_to(root).as_posix()}"
        client.upload_file(str(path), bucket, key)
        objects.append(storage.ListedObject(bucket, key, path.stat().st_size))
    return objects


def _start_worker(stack: EmbeddedStack, opts: DemoOptions) -> subprocess.Popen:
    env = {
        **os.environ,
        **stack.env(),
        "MOODSTREAM_SCORER": opts.scorer,
        "MOODSTREAM_MODEL": opts.model,
        "MOODSTREAM_ALLOWED_BUCKETS": BUCKET,
        "MOODSTREAM_METRICS_PORT": "0",
    }
    log = open(opts.log_dir / "worker.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "pipeline", "worker"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _line(record: dict, names: dict[str, str]) -> str:
    name = names.get(record.get("track_id") or "", "?")
    if "reason" in record:
        return f"DLQ   {name}: {record['reason']}: {record['message']}"
    tags = "; ".join(f"{network}: " + ", ".join(t["tag"] for t in ranked[:4]) for network, ranked in record["top_tags"].items())
    return f"{name}: {mood_line(record)}\n      tags {tags}  ({record['duration_s']:.0f} s, {record['latency_ms'].get('total', 0):.0f} ms)"


async def run(opts: DemoOptions) -> int:
    files = audio_files(opts.audio_dir)
    if not files:
        _say(opts, f"no audio files in {opts.audio_dir}")
        return 2
    settings = load_settings()
    opts.log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _say(opts, f"starting the embedded stack (logs: {opts.log_dir}) ...")
    with EmbeddedStack(model_repository=settings.model_repository if opts.scorer == "triton" else None, log_dir=opts.log_dir, models=[opts.model]) as stack:
        stack.create_topics([settings.input_topic, settings.output_topic, settings.dlq_topic])
        objects = upload(stack, files, opts.audio_dir)
        _say(opts, f"stack ready in {time.monotonic() - started:.1f} s; uploaded {len(objects)} files to s3://{BUCKET}/demo/")
        worker = _start_worker(stack, opts)
        try:
            return await _announce_and_collect(stack, settings, objects, opts, worker, started)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()


async def _announce_and_collect(stack, settings, objects, opts: DemoOptions, worker: subprocess.Popen, started: float) -> int:
    consumer = AIOKafkaConsumer(settings.output_topic, settings.dlq_topic, bootstrap_servers=stack.kafka_bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    try:
        ids = await announce(producer, settings.input_topic, objects, correlation_id="demo", progress=False)
        names = {tid: Path(obj.key).name for tid, obj in zip(ids, objects)}
        pending = set(ids)
        outputs = dead = 0
        deadline = time.monotonic() + opts.timeout_s
        while pending and time.monotonic() < deadline:
            if worker.poll() is not None:
                _say(opts, f"the worker exited with status {worker.returncode}; see {opts.log_dir / 'worker.log'}")
                break
            batches = await consumer.getmany(timeout_ms=1000)
            for tp, records in batches.items():
                for rec in records:
                    record = json.loads(rec.value)
                    if record.get("track_id") not in pending:
                        continue  # a duplicate, or another run's record
                    pending.discard(record["track_id"])
                    if tp.topic == settings.dlq_topic:
                        dead += 1
                    else:
                        outputs += 1
                    if opts.as_json:
                        print(json.dumps(record, sort_keys=True), flush=True)
                    else:
                        _say(opts, _line(record, names))
        elapsed = time.monotonic() - started
        _say(opts, f"{len(ids)} tracks announced: {outputs} tagged, {dead} dead-lettered, {len(pending)} lost; {elapsed:.1f} s in all")
        return 0 if not pending else 1
    finally:
        await producer.stop()
        await consumer.stop()

"""``moodstream demo [AUDIO_DIR] [--json]``: the whole product on one machine, no cloud.

Starts the embedded stack (Tansu Kafka broker, moto S3 server, CPU tritonserver), uploads the
folder to S3, announces each file on ``tracks.ingested``, runs a real worker process against
them and prints every record arriving on ``tracks.moods`` (and ``tracks.moods.dlq``). Beside
the worker runs ``moodstream serve`` (the web page and HTTP API) with its SQLite catalog in the
log folder, following ``tracks.moods``: once the tracks are in its catalog the demo prints the
page's URL. With ``--hold`` (the default on a terminal) everything keeps running until Ctrl-C,
for the page; otherwise it all stops. Exit status 0 only if every announced track got an output
or a dead letter and the service's catalog holds every tagged track.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from devstack.stack import REPO_ROOT, EmbeddedStack
from devstack.supervisor import free_ports
from pipeline.backfill import announce
from pipeline.settings import load_settings
from pipeline.stages import storage
from pipeline.stages.taxonomy import mood_line

#: Three 30-s excerpts of Debian's drascula-music (jazz, ambient, rock), written by `make clips`
#: (training/data/debian_music.toml): real music the project fetches itself, quick to tag.
DEFAULT_AUDIO_DIR = Path.home() / ".cache" / "moodstream" / "clips"
FETCH_HINT = "`make clips` writes the demo's clips there (Debian's drascula-music, 36 MB, once)"
BUCKET = "moodstream-audio"
SERVICE_READY_TIMEOUT_S = 180.0
CATALOG_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DemoOptions:
    audio_dir: Path
    as_json: bool
    scorer: str  # "triton" or "onnx"
    model: str
    timeout_s: float
    log_dir: Path
    hold: bool = False  # keep the stack, worker and service running after tagging, until Ctrl-C
    port: int = 0  # the service's port; 0: MOODSTREAM_SERVICE_PORT if free, else any free one


def _say(opts: DemoOptions, text: str) -> None:
    # With --json, stdout carries only the output records; progress goes to stderr.
    print(text, file=sys.stderr if opts.as_json else sys.stdout, flush=True)


def upload(
    stack: EmbeddedStack, files: list[Path], root: Path, *, bucket: str = BUCKET, prefix: str = "demo"
) -> list[storage.ListedObject]:
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
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "worker"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _free_or_any(port: int) -> int:
    """``port`` when nothing listens on it here, else a free one (a second demo, a busy 8080)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return port
        except OSError:
            return free_ports(1)[0]


def _start_service(stack: EmbeddedStack, opts: DemoOptions, port: int) -> subprocess.Popen:
    """``moodstream serve`` with its catalog in the log folder, following the output topic."""
    env = {
        **os.environ,
        **stack.env(),
        "MOODSTREAM_SCORER": opts.scorer,
        "MOODSTREAM_MODEL": opts.model,
        "MOODSTREAM_SERVICE_HOST": "127.0.0.1",
        "MOODSTREAM_SERVICE_PORT": str(port),
        "MOODSTREAM_CATALOG_URL": f"sqlite:///{opts.log_dir / 'catalog.db'}",
        "MOODSTREAM_CATALOG_FOLLOW": "true",
        "MOODSTREAM_INDEX_DIR": str(opts.log_dir / "index"),
    }
    log = open(opts.log_dir / "service.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as answer:
            return json.loads(answer.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


async def _await_catalog(service: subprocess.Popen, url: str, expected: int, opts: DemoOptions) -> bool:
    """Wait until the service is ready and its catalog lists ``expected`` tracks."""
    deadline = time.monotonic() + SERVICE_READY_TIMEOUT_S + CATALOG_TIMEOUT_S
    while time.monotonic() < deadline:
        if service.poll() is not None:
            _say(opts, f"the service exited with status {service.returncode}; see {opts.log_dir / 'service.log'}")
            return False
        listed = _get_json(f"{url}v1/tracks?limit=500")
        if listed is not None and listed["count"] >= expected:
            return True
        await asyncio.sleep(0.5)
    _say(opts, f"the service's catalog did not reach {expected} tracks in time; see {opts.log_dir / 'service.log'}")
    return False


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _hold(opts: DemoOptions, worker: subprocess.Popen, service: subprocess.Popen) -> None:
    """Until Ctrl-C (or SIGTERM), or until the worker or the service exits."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set() and worker.poll() is None and service.poll() is None:
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    _say(opts, "stopping ...")


def _line(record: dict, names: dict[str, str]) -> str:
    name = names.get(record.get("track_id") or "", "?")
    if "reason" in record:
        return f"DLQ   {name}: {record['reason']}: {record['message']}"
    tags = "; ".join(
        f"{network}: " + ", ".join(t["tag"] for t in ranked[:4]) for network, ranked in record["top_tags"].items()
    )
    return f"{name}: {mood_line(record)}\n      tags {tags}  ({record['duration_s']:.0f} s, {record['latency_ms'].get('total', 0):.0f} ms)"


async def run(opts: DemoOptions) -> int:
    files = storage.local_audio_files(opts.audio_dir)
    if not files:
        _say(opts, f"no audio files in {opts.audio_dir}")
        return 2
    settings = load_settings()
    opts.log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _say(opts, f"starting the embedded stack (logs: {opts.log_dir}) ...")
    with EmbeddedStack(
        model_repository=settings.model_repository if opts.scorer == "triton" else None,
        log_dir=opts.log_dir,
        models=[opts.model],
    ) as stack:
        stack.create_topics([settings.input_topic, settings.output_topic, settings.dlq_topic])
        objects = upload(stack, files, opts.audio_dir)
        _say(
            opts,
            f"stack ready in {time.monotonic() - started:.1f} s; uploaded {len(objects)} files to s3://{BUCKET}/demo/",
        )
        worker = _start_worker(stack, opts)
        port = opts.port or _free_or_any(settings.service_port)
        service = _start_service(stack, opts, port)
        url = f"http://127.0.0.1:{port}/"
        try:
            status, tagged = await _announce_and_collect(stack, settings, objects, opts, worker, started)
            if status == 0 and not await _await_catalog(service, url, tagged, opts):
                status = 1
            if status == 0:
                _say(opts, f"the web page: {url}  ({tagged} tracks in its catalog; API docs at {url}docs)")
                if opts.hold:
                    _say(opts, "holding the stack, the worker and the service for the page; Ctrl-C stops them")
                    await _hold(opts, worker, service)
            return status
        finally:
            _stop(service)
            _stop(worker)


async def _announce_and_collect(
    stack, settings, objects, opts: DemoOptions, worker: subprocess.Popen, started: float
) -> tuple[int, int]:
    """(exit status, tracks tagged) once every announced track has an output or a dead letter."""
    consumer = AIOKafkaConsumer(
        settings.output_topic,
        settings.dlq_topic,
        bootstrap_servers=stack.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
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
        _say(
            opts,
            f"{len(ids)} tracks announced: {outputs} tagged, {dead} dead-lettered, {len(pending)} lost; {elapsed:.1f} s in all",
        )
        return (0 if not pending else 1), outputs
    finally:
        await producer.stop()
        await consumer.stop()

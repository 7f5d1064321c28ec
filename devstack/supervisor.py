"""Child processes of the embedded stack: each service in a process group of its own, logging to
one file, awaited until it answers and stopped with everything it started. A service that does not
come up raises :class:`StackError` with the error lines and the tail of its log (latest launch
only)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

_LOG_TAIL_LINES = 30
_LOG_ERROR_LINES = 10
# glog error lines (Triton), Rust/Python errors and tracebacks (Tansu, moto)
_LOG_ERROR = re.compile(r"^E\d{4} |error|traceback|exception|panic", re.IGNORECASE)
# logged by every Triton server without a GPU
_LOG_NOISE = re.compile(r"CudaDriverHelper has not been initialized|Failed to initialize NVML|DCGM")
_POLL_S = 0.1
_STOP_GRACE_S = 15.0
# Readiness probes talk to 127.0.0.1 and must not be sent to an HTTP proxy from the environment.
_LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_T = TypeVar("_T")


class StackError(RuntimeError):
    """A service of the embedded stack did not start, or is not part of this stack."""


class Service:
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
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
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

    def kill(self, sig: signal.Signals = signal.SIGKILL, timeout_s: float = _STOP_GRACE_S) -> None:
        """``sig`` to the group at once (SIGKILL: a crash, no shutdown of any kind), then SIGKILL
        to whatever is left of it once the leader is gone or ``timeout_s`` passed; reaped."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _signal_group(proc.pid, sig)
        _wait_unreaped(proc.pid, timeout_s)
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()

    def exited(self) -> int | None:
        """The exit status when the process ended by itself, else None (running or not started)."""
        return self._proc.poll() if self._proc is not None else None

    def excerpt(self) -> str:
        """The log of the latest launch, for an error message: its error lines, then its tail."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                lines = log.read().decode(errors="replace").splitlines()
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"
        # Triton prints tables of models and options after the cause, pushing it out of the tail.
        flagged = [line for line in lines if _LOG_ERROR.search(line) and not _LOG_NOISE.search(line)][
            -_LOG_ERROR_LINES:
        ]
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


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it (pytriton imports a lot)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise StackError(f"package {name!r} is not installed for {sys.executable}; run `make env`")
    return Path(next(iter(spec.submodule_search_locations)))


def http_ok(url: str) -> bool:
    try:
        with _LOCAL_HTTP.open(url, timeout=2) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False


def run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion from sync code, also when the caller is inside an event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()

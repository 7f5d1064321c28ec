"""The chaos run's product processes: worker slots and the catalog service, each restarted after
it is killed (as Kubernetes restarts a pod), and what is sampled from them: memory, file
descriptors, threads, Prometheus metrics."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from devstack.supervisor import free_ports

REPO = Path(__file__).resolve().parents[2]
POISON = REPO / "tests" / "faults" / "poison"
#: Debian's libfaketime (``make tools`` installs it), None when missing: no clock jumps then
LIBFAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))), None)
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Incarnation:
    """One process started in a slot."""

    popen: subprocess.Popen[bytes]
    started: float
    log: Path
    ended: float | None = None
    how: str = ""  # how it ended: "kill9", "sigterm", "exit <status>"


@dataclass
class Slot:
    """A long-lived role (``worker-0``, ``catalog``) that a supervisor keeps running."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_dir: Path
    metrics_port: int = 0
    incarnations: list[Incarnation] = field(default_factory=list)
    #: while set, the supervisor does not restart the slot (a kill in progress, a stop)
    held: bool = False

    @property
    def current(self) -> Incarnation | None:
        return self.incarnations[-1] if self.incarnations else None

    @property
    def pid(self) -> int | None:
        now = self.current
        return now.popen.pid if now is not None and now.popen.poll() is None else None

    def alive(self) -> bool:
        return self.pid is not None

    def start(self) -> Incarnation:
        log = self.log_dir / f"{self.name}.{len(self.incarnations)}.log"
        popen = subprocess.Popen(
            self.command,
            cwd=self.log_dir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        incarnation = Incarnation(popen, time.time(), log)
        self.incarnations.append(incarnation)
        return incarnation

    def kill(self, sig: signal.Signals, grace_s: float = 30.0) -> float | None:
        """``sig`` to the slot's process (SIGKILL: to its whole group, the decoding processes with
        it, as an OOM kill of the pod does); SIGTERM: to the process alone, then SIGKILL to the
        group after ``grace_s``, as Kubernetes does. Seconds until it exited, None if killed."""
        now = self.current
        if now is None or now.popen.poll() is not None:
            return None
        start = time.monotonic()
        if sig == signal.SIGKILL:
            _killpg(now.popen.pid, signal.SIGKILL)
            now.popen.wait()
            now.ended, now.how = time.time(), "kill9"
            return None
        now.popen.send_signal(sig)
        try:
            now.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _killpg(now.popen.pid, signal.SIGKILL)
            now.popen.wait()
            now.ended, now.how = time.time(), f"sigterm, killed after {grace_s:.0f} s"
            return None
        _killpg(now.popen.pid, signal.SIGKILL)  # decoding processes left behind, if any
        now.ended, now.how = time.time(), f"sigterm, exit {now.popen.returncode}"
        return time.monotonic() - start

    def reap(self) -> bool:
        """Whether the current process exited by itself (recorded as such)."""
        now = self.current
        if now is None or now.ended is not None or now.popen.poll() is None:
            return False
        _killpg(now.popen.pid, signal.SIGKILL)
        now.ended, now.how = time.time(), f"exit {now.popen.returncode}"
        return True

    def stop(self) -> None:
        self.held = True
        if self.alive():
            self.kill(signal.SIGTERM, grace_s=30)

    def metrics(self) -> str | None:
        if not self.metrics_port or not self.alive():
            return None
        try:
            with _LOCAL.open(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                return r.read().decode()
        except OSError:
            return None


def _killpg(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def worker_slot(
    index: int,
    *,
    base_env: dict[str, str],
    log_dir: Path,
    static: bool,
    clock_file: Path | None,
    poison: bool = True,
) -> Slot:
    """Worker ``index``: ``python -m pipeline worker`` with its own metrics port, static group
    membership when ``static``, its wall and monotonic clocks offset by ``clock_file`` (libfaketime,
    re-read every second; the offset only grows: a process that was frozen, or a clock stepped
    forward) and the test-only decoder crash on marked files when ``poison``."""
    (port,) = free_ports(1)
    env = {**base_env, "MOODSTREAM_METRICS_PORT": str(port)}
    if static:
        env["MOODSTREAM_KAFKA_GROUP_INSTANCE_ID"] = f"chaos-worker-{index}"
    paths = [str(POISON)] if poison else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO), *filter(None, [base_env.get("PYTHONPATH")])])
    if clock_file is not None and LIBFAKETIME is not None:
        clock_file.write_text("+0\n")
        env.update(
            LD_PRELOAD=str(LIBFAKETIME),
            FAKETIME_TIMESTAMP_FILE=str(clock_file),
            FAKETIME_CACHE_DURATION="1",
            FAKETIME_DONT_RESET="1",
        )
    return Slot(
        f"worker-{index}",
        [sys.executable, "-m", "pipeline", "worker", "--loglevel", "info"],
        env,
        log_dir,
        metrics_port=port,
    )


def catalog_slot(*, base_env: dict[str, str], log_dir: Path) -> Slot:
    """``moodstream serve``: the HTTP service, whose consumer fills the catalog."""
    (port,) = free_ports(1)
    env = {**base_env, "MOODSTREAM_SERVICE_PORT": str(port)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [base_env.get("PYTHONPATH")])])
    return Slot("catalog", [sys.executable, "-m", "pipeline", "serve"], env, log_dir, metrics_port=port)


# --- /proc sampling ---------------------------------------------------------------------------------


@dataclass
class ProcSample:
    rss_mb: float
    hwm_mb: float
    fds: int
    threads: int
    cpu_s: float


def sample(pid: int) -> ProcSample | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    cpu_s = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def kb(name: str) -> float:
        m = re.search(rf"^{name}:\s+(\d+) kB", status, re.M)
        return int(m.group(1)) / 1024 if m else 0.0

    m = re.search(r"^Threads:\s+(\d+)", status, re.M)
    return ProcSample(kb("VmRSS"), kb("VmHWM"), fds, int(m.group(1)) if m else 0, round(cpu_s, 2))


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found + [g for c in found for g in children(c)]

"""A stopped service or worker leaves no process behind (found while building the chaos run).

``moodstream serve`` stopped by SIGTERM finished ("Finished server process") and exited 0, but
its decoding processes and multiprocessing's resource tracker lived on, orphaned, each
decoding process holding about 350 MB: a host whose service is restarted now and then (a
systemd unit, a test suite, the chaos run's catalog service) piles them up. The service's pool
was shut down with ``wait=False``, which returned before its processes were told to stop, and a
pool process holds both ends of its own call queue, so it never sees its parent go. The service
now joins its pool on the way out. The worker, whose pool is joined already, is held to the
same rule.

Every process is a real one; "left behind" is a live process of the stopped one's process
group (each is started in a session of its own, so its group is exactly it and its children).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from serving import ServiceProcess

from .kit import WorkerProcess, private_topics

pytestmark = pytest.mark.faults


def _group(pgid: int) -> list[str]:
    """The live processes of process group ``pgid``: 'pid command' each."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(f"{stat.parent.name} {(stat.parent / 'cmdline').read_bytes()[:120]!r}")
        except (OSError, ValueError):
            continue
    return found


def _settled_group(pgid: int, wait_s: float = 10.0) -> list[str]:
    """The group's live processes once they had ``wait_s`` to exit after their parent."""
    deadline = time.monotonic() + wait_s
    while (left := _group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_the_service_stopped_by_sigterm_leaves_no_process_behind(tmp_path):
    service = ServiceProcess(tmp_path, MOODSTREAM_MAX_ANALYSES_IN_FLIGHT="2")
    with service:
        pid = service.proc.pid
        assert len(_group(pid)) >= 3, _group(pid)  # the service, its two decoding processes, the tracker
    # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is a clean stop too
    assert service.proc.returncode in (0, -signal.SIGTERM), (service.proc.returncode, service.log_tail())
    assert "Application shutdown complete" in service.log_tail(), service.log_tail()
    left = _settled_group(pid)
    for line in left:
        os.kill(int(line.split()[0]), signal.SIGKILL)
    assert not left, f"left behind by the service: {left}"


def test_the_worker_stopped_by_sigterm_leaves_no_process_behind(stack, tmp_path):
    topics = private_topics(stack, "leftovers")
    worker = WorkerProcess(stack, tmp_path / "worker.log", MOODSTREAM_DECODE_WORKERS="2", **topics)
    try:
        assert worker.wait_log(r"tagging leftovers\.ingested", 240), worker.log()
        assert len(_group(worker.pid)) >= 3, _group(worker.pid)
        assert worker.terminate(timeout_s=30) is not None, worker.log()
        left = _settled_group(worker.pid)
    finally:
        worker.stop()
    for line in left:
        os.kill(int(line.split()[0]), signal.SIGKILL)
    assert not left, f"left behind by the worker: {left}\n{worker.log()}"

"""The faults the chaos run injects, and the scheduler that draws them at random and lets them
overlap.

Each fault kind has a weight (how often it is drawn) and, for lasting faults, a duration range;
an instantaneous one (a kill, a restart, a clock jump) lasts until its target is back. Faults
arrive as a Poisson process and each runs in a task of its own, so they overlap; a kind whose
target is busy (the broker already restarting, no worker alive to kill) is drawn again. Every
kind is drawn once first, in a seeded order, so that a short run meets the rare ones too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .history import Journal

log = logging.getLogger("chaos")


@dataclass(frozen=True)
class Kind:
    name: str
    weight: float
    lasting: tuple[float, float] | None = None  # duration range in seconds; None: instantaneous
    #: what a recovery is measured on: "pipeline" (outputs per input partition) or "catalog"
    affects: str = "pipeline"


#: The mix (weights; a run draws each fault from them). Kills and restarts are about one fault in
#: seven: each costs a process start (10-30 s of CPU on 2 cores) or a rebalance of the group that
#: stops every worker for seconds; links to the broker are cut or stalled for less than the
#: session timeout as often as for more. S3, link, disk and clock faults cost next to nothing.
KINDS: tuple[Kind, ...] = (
    Kind("worker_kill9", 3),
    Kind("worker_sigterm", 3),
    Kind("catalog_kill9", 2.5, affects="catalog"),
    Kind("catalog_sigterm", 2.5, affects="catalog"),
    Kind("broker_restart", 1.5),
    Kind("triton_restart", 2),
    Kind("s3_restart", 2),
    Kind("db_restart", 1.5, affects="catalog"),
    Kind("s3_errors", 16, (4, 20)),
    Kind("s3_latency", 14, (4, 20)),
    Kind("cut_kafka", 4, (2, 12)),
    Kind("stall_kafka", 3, (2, 12)),
    Kind("slow_kafka", 5, (5, 30)),
    Kind("cut_s3", 6, (3, 20)),
    Kind("stall_s3", 5, (3, 20)),
    Kind("slow_s3", 6, (5, 30)),
    Kind("cut_triton", 6, (3, 20)),
    Kind("stall_triton", 5, (3, 20)),
    Kind("slow_triton", 6, (5, 30)),
    Kind("disk_full", 4, (5, 30), affects="catalog"),
    Kind("clock_jump", 4),
)


class Busy(Exception):
    """The fault's target is not available now; draw another."""


@dataclass
class Fault:
    id: int
    kind: Kind
    start: float = field(default_factory=time.time)
    end: float | None = None
    target: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class LinkRules:
    """The relays hold one rule per client label; faults on one link overlap, so the newest
    active fault's rule is the one applied, and healing one falls back to the one before."""

    def __init__(self, controls: dict[str, Any]) -> None:
        self.controls = controls  # relay name -> devstack.netfault.Control
        self.active: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
        self.applied = 0

    def register(self, labels: dict[str, list[int]]) -> None:
        for control in self.controls.values():
            control.send(op="clients", labels=labels)

    def add(self, relay: str, label: str, fault_id: int, rule: dict[str, Any]) -> None:
        self.active.setdefault((relay, label), []).append((fault_id, rule))
        self.controls[relay].send(op="rule", label=label, **rule)
        self.applied += 1

    def remove(self, relay: str, label: str, fault_id: int) -> None:
        stack = [r for r in self.active.get((relay, label), []) if r[0] != fault_id]
        self.active[(relay, label)] = stack
        if stack:
            self.controls[relay].send(op="rule", label=label, **stack[-1][1])
        else:
            self.controls[relay].send(op="heal", label=label)


class S3Rules:
    """Injected S3 errors and latency: the union of the active faults' rules, re-sent after an
    S3 restart (the server forgets them)."""

    def __init__(self, apply: Callable[[list[dict[str, Any]]], None]) -> None:
        self._apply = apply
        self.active: dict[int, dict[str, Any]] = {}

    def set(self, fault_id: int, rule: dict[str, Any] | None) -> None:
        if rule is None:
            self.active.pop(fault_id, None)
        else:
            self.active[fault_id] = rule
        self.reapply()

    def reapply(self) -> None:
        self._apply(list(self.active.values()))


class DiskFiller:
    """Fills the catalog's file system (a tmpfs of its own) while any disk fault lasts."""

    def __init__(self, mount: Path | None) -> None:
        self.mount = mount
        self.holders: set[int] = set()
        self._fill = mount / "chaos-filler" if mount else None

    def fill(self, fault_id: int) -> int:
        """Take every free byte; how many were taken (0 when another fault holds them)."""
        if self._fill is None or self.mount is None:
            raise Busy("no file system of its own for the catalog")
        self.holders.add(fault_id)
        if self._fill.exists():
            return 0
        fd = os.open(self._fill, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, shutil.disk_usage(self.mount).free)
            os.lseek(fd, 0, os.SEEK_END)
            for size in (65536, 4096):  # whatever fallocate left, to the last page
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
        finally:
            os.close(fd)
        return self._fill.stat().st_size

    def release(self, fault_id: int) -> None:
        self.holders.discard(fault_id)
        if not self.holders and self._fill is not None:
            self._fill.unlink(missing_ok=True)


Action = Callable[[Fault], Awaitable[None]]


class Scheduler:
    """Draws ``count`` faults over ``span_s`` seconds (Poisson arrivals), each from ``kinds`` by
    weight with the seeded ``rng``, and runs each with ``actions[kind.name]``."""

    def __init__(
        self,
        kinds: tuple[Kind, ...],
        actions: dict[str, Action],
        rng: random.Random,
        journal: Journal,
        *,
        cover: bool = True,
    ) -> None:
        self.kinds = [k for k in kinds if k.name in actions and k.weight > 0]
        self.actions = actions
        self.rng = rng
        self.journal = journal
        #: kinds not drawn yet, in a seeded order: with ``cover`` each is drawn once before the
        #: weights decide, so that a short run meets every kind (a rare kill or broker restart too)
        self.uncovered = rng.sample(self.kinds, len(self.kinds)) if cover else []
        self.faults: list[Fault] = []
        self.running: set[asyncio.Task[None]] = set()
        self.counts: dict[str, int] = {}

    def duration(self, kind: Kind) -> float:
        assert kind.lasting is not None
        return self.rng.uniform(*kind.lasting)

    async def run(self, count: int, span_s: float, stop: asyncio.Event) -> None:
        mean = span_s / max(count, 1)
        while len(self.faults) < count and not stop.is_set():
            await asyncio.sleep(self.rng.expovariate(1 / mean))
            fault = await self._first_uncovered()
            for _ in range(0 if fault else 20):
                kind = self.rng.choices(self.kinds, [k.weight for k in self.kinds])[0]
                fault = Fault(len(self.faults) + 1, kind)
                try:
                    await self._prepare(fault)
                except Busy:
                    fault = None
                    continue
                break
            if fault is None:
                continue
            kind = fault.kind
            self.faults.append(fault)
            self.counts[kind.name] = self.counts.get(kind.name, 0) + 1
            task = asyncio.create_task(self._run(fault))
            self.running.add(task)
            task.add_done_callback(self.running.discard)
        if self.running:
            await asyncio.gather(*self.running, return_exceptions=True)

    async def _first_uncovered(self) -> Fault | None:
        """A fault of the first kind not drawn yet whose target is available now, if any."""
        for kind in self.uncovered:
            fault = Fault(len(self.faults) + 1, kind)
            try:
                await self._prepare(fault)
            except Busy:
                continue
            self.uncovered.remove(kind)
            return fault
        return None

    async def _prepare(self, fault: Fault) -> None:
        """Raise Busy before the fault is counted when its target is unavailable."""
        check = getattr(self.actions[fault.kind.name], "available", None)
        if check is not None and not check():
            raise Busy(fault.kind.name)

    async def _run(self, fault: Fault) -> None:
        try:
            await self.actions[fault.kind.name](fault)
        except Busy as exc:
            fault.error = f"busy: {exc}"
        except Exception as exc:
            log.exception("fault %d %s failed", fault.id, fault.kind.name)
            fault.error = repr(exc)
        fault.end = fault.end or time.time()
        self.journal.write(
            id=fault.id,
            kind=fault.kind.name,
            affects=fault.kind.affects,
            lasting=fault.kind.lasting is not None,
            start=fault.start,
            end=fault.end,
            target=fault.target,
            detail=fault.detail,
            error=fault.error,
        )


def available(check: Callable[[], bool]) -> Callable[[Action], Action]:
    """Mark an action with the check the scheduler asks before drawing it."""

    def mark(action: Action) -> Action:
        action.available = check  # type: ignore[attr-defined]
        return action

    return mark


SIGNALS = {"kill9": signal.SIGKILL, "sigterm": signal.SIGTERM}

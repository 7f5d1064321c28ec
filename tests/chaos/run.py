"""The chaos run: the embedded stack on a durable broker, worker processes in one consumer group,
the catalog service on a real database, a producer announcing real-music clips and a few bad
inputs, a scheduler injecting overlapping faults, and everything recorded for the checker
(:mod:`tests.chaos.checker`). ``python -m tests.chaos --help`` lists the options.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devstack import EmbeddedPostgres, EmbeddedStack
from pipeline.contracts import events
from pipeline.settings import load_settings

from . import clips as clipmod
from . import procs
from .faults import KINDS, Busy, DiskFiller, Fault, Kind, LinkRules, S3Rules, Scheduler, available
from .history import Announcement, FenceSampler, Journal, Producer, Reader, read_topic

log = logging.getLogger("chaos")

BUCKET = "moodstream-audio"
MODEL = "musicnn_student"
INPUT, OUTPUT, DLQ = "tracks.ingested", "tracks.moods", "tracks.moods.dlq"
GROUP = "moodstream-worker"
CATALOG_GROUP = "moodstream-catalog"
_CORRELATION = re.compile(r'"correlation_id":\s*"([^"]+)"')


@dataclass
class Config:
    """One run's parameters; every random draw comes from ``seed``."""

    out: Path
    tracks: int = 10_000
    faults: int = 1_000
    seed: int = 1
    catalog: str = "sqlite"  # or "postgres"
    workers: int = 3
    static_workers: int = 2  # the first ones use static membership (group.instance.id)
    partitions: int = 4
    clip_s: float = 6.0
    distinct_clips: int = 1500
    bad_share: float = 0.01
    minutes: float = 45.0  # the span faults are spread over; the producer's over 80 % of it
    batch_size: int = 8
    sample_s: float = 3.0
    drain_timeout_s: float = 1200.0
    kinds: tuple[Kind, ...] = KINDS
    soak_hours: float = 0.0  # > 0: no faults, a steady rate for this long, sampling only
    soak_rate: float = 1.0  # tracks/s in a soak
    catalog_mb: int = 512  # size of the catalog's own file system (SQLite file, or the cluster)
    music: str = "auto"  # "auto": Debian's music when fetched, else the suite's clips; "suite": the clips

    @property
    def span_s(self) -> float:
        return self.soak_hours * 3600 if self.soak_hours else self.minutes * 60


@dataclass
class RunState:
    started: float = field(default_factory=time.time)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    faults_done: asyncio.Event = field(default_factory=asyncio.Event)
    producer_done: asyncio.Event = field(default_factory=asyncio.Event)
    catalog_count: int = 0
    notes: list[str] = field(default_factory=list)


def original_id(doc: dict[str, Any]) -> str | None:
    """The announcement a dead letter is for: its correlation id."""
    original = doc.get("original")
    if isinstance(original, dict):
        value = original.get("correlation_id")
        return value if isinstance(value, str) else None
    if isinstance(original, str):
        m = _CORRELATION.search(original)
        return m.group(1) if m else None
    return None


def plan(config: Config, clip_list: list[clipmod.Clip]) -> tuple[list[Announcement], dict[str, bytes]]:
    """The announcements (seeded order) and the bad objects to upload (key -> bytes)."""
    rng = np.random.default_rng(config.seed)
    bad_every = max(2, round(1 / config.bad_share)) if config.bad_share > 0 else 0
    announcements = []
    objects: dict[str, bytes] = {}
    for i in range(config.tracks):
        track_id = f"chaos-{config.seed}-{i:05d}"
        corr = f"c{i}"
        kind, expected = "clip", "output"
        if bad_every and i % bad_every == bad_every // 2:
            kind = clipmod.BAD_KINDS[(i // bad_every) % len(clipmod.BAD_KINDS)]
        if kind == "clip":
            clip = clip_list[int(rng.integers(len(clip_list)))]
            value = events.ingested_record(
                track_id=track_id, audio_uri=f"s3://{BUCKET}/{clip.key}", correlation_id=corr, ingested_at=None
            )
        else:
            data, expected = clipmod.bad_object(kind, rng, b"")
            key = f"chaos/bad/{track_id}.{'flac' if kind == 'short' else 'mp3'}"
            if data is not None:
                objects[key] = data
            bucket = "not-an-allowed-bucket" if kind == "bad_bucket" else BUCKET
            value = events.ingested_record(track_id=track_id, audio_uri=f"s3://{bucket}/{key}", correlation_id=corr)
            if kind == "bad_json":
                value = f'{{"schema_version": 1, "track_id": "{track_id}", "correlation_id": "{corr}", "audio_uri": '.encode()
        announcements.append(Announcement(i, track_id, corr, track_id.encode(), value, expected, kind))
    return announcements, objects


class Run:
    def __init__(self, config: Config) -> None:
        self.c = config
        self.rng = random.Random(config.seed)
        self.out = config.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = RunState()
        self.stack: EmbeddedStack | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.workers: list[procs.Slot] = []
        self.catalog: procs.Slot | None = None
        self.mount: Path | None = None
        self.catalog_url = ""
        self.clock_files: dict[str, Path] = {}
        self.clock_offsets: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.j = {
            name: Journal(self.out / f"{name}.jsonl")
            for name in ("announced", "seen", "fences", "catalog", "faults", "procs", "restarts")
        }

    # --- set-up ----------------------------------------------------------------------------

    def _mount_catalog_fs(self) -> Path | None:
        """A tmpfs of its own for the catalog's files, so that a disk-full fault hits it alone
        (root only; without it the run has no disk faults). Mounted in a temporary folder, not
        in the run's: as root, PostgreSQL runs as its own account, which must reach its cluster
        there (a run folder under a home of mode 700 it cannot)."""
        mount = Path(tempfile.mkdtemp(prefix="moodstream-chaos-catalog-"))
        mount.chmod(0o755)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.c.catalog_mb}m,mode=1777", "chaos-catalog", str(mount)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            mount.rmdir()
            self.state.notes.append(f"no disk-full faults: cannot mount a tmpfs ({done.stderr.strip()})")
            return None
        return mount

    def _start_stack(self) -> None:
        settings = load_settings()
        # Held before it starts: an interrupted start is stopped by close() all the same.
        self.stack = EmbeddedStack(
            model_repository=settings.model_repository,
            models=[MODEL],
            log_dir=self.out / "stack",
            durable=True,
            link_faults=True,
            startup_timeout_s=300,
        )
        self.stack.start()
        self.stack.create_topics([INPUT, OUTPUT, DLQ], partitions=self.c.partitions)

    def _base_env(self) -> dict[str, str]:
        assert self.stack is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOODSTREAM_")}
        env.update(self.stack.env())
        env.update(
            MOODSTREAM_MODEL=MODEL,
            MOODSTREAM_EXCERPTS="1",
            MOODSTREAM_EXCERPT_S="3",
            MOODSTREAM_BATCH_SIZE=str(self.c.batch_size),
            MOODSTREAM_DECODE_WORKERS="1",
            MOODSTREAM_ALLOWED_BUCKETS=BUCKET,
            MOODSTREAM_CONSUMER_GROUP=GROUP,
            FAUST_DATADIR=str(self.out / "faust" / "{conf.name}-data"),
        )
        return env

    def _upload(self, clip_list: list[clipmod.Clip], objects: dict[str, bytes]) -> None:
        from pipeline.stages import storage

        assert self.stack is not None
        os.environ.update({k: v for k, v in self.stack.env().items() if k.startswith("AWS_")})
        os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL_S3"] = self.stack.s3_endpoint
        s3 = storage.make_s3_client()
        s3.create_bucket(Bucket=BUCKET)
        for n, clip in enumerate(clip_list):
            s3.put_object(Bucket=BUCKET, Key=clip.key, Body=clip.path.read_bytes())
            if n % 100 == 0:
                print(f"\r# uploading clips {n}/{len(clip_list)}", end="", file=sys.stderr, flush=True)
        for key, data in objects.items():
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        print(file=sys.stderr)

    def _catalog_db(self) -> str:
        if self.c.catalog == "postgres":
            self.postgres = EmbeddedPostgres(log_dir=self.out / "stack", data_parent=self.mount, startup_timeout_s=120)
            self.postgres.start()
            return self.postgres.url
        folder = self.mount or (self.out / "catalog")
        folder.mkdir(exist_ok=True)
        return f"sqlite:///{folder / 'catalog.db'}"

    # --- processes ---------------------------------------------------------------------------

    def _register(self) -> None:
        labels = {s.name: [s.pid] for s in self.workers if s.pid is not None}
        with contextlib.suppress(OSError, ValueError):
            self.links.register(labels)

    def _start_slot(self, slot: procs.Slot) -> None:
        slot.start()
        self.j["restarts"].write(slot=slot.name, t=time.time(), n=len(slot.incarnations), pid=slot.pid)
        if slot in self.workers:
            self._register()

    async def supervise(self) -> None:
        """Restart a slot whose process ended (after a short delay, like a pod restart)."""
        pending: dict[str, float] = {}
        while not self.state.stop.is_set():
            await asyncio.sleep(0.5)
            for slot in [*self.workers, *([self.catalog] if self.catalog else [])]:
                if slot.held:
                    continue
                if slot.reap():
                    log.warning("%s exited by itself: %s", slot.name, slot.current.how if slot.current else "")
                if not slot.alive():
                    due = pending.setdefault(slot.name, time.monotonic() + self.rng.uniform(0.5, 3.0))
                    if time.monotonic() >= due:
                        pending.pop(slot.name)
                        self._start_slot(slot)
            if self.postgres is not None and self.postgres.exited() is not None:
                log.warning("postgresql exited by itself (status %s); restarting it", self.postgres.exited())
                await asyncio.to_thread(self.postgres.restart)

    # --- the faults --------------------------------------------------------------------------

    def _actions(self) -> dict[str, Any]:
        assert self.stack is not None
        stack = self.stack
        busy: set[str] = set()

        def alive_worker() -> procs.Slot:
            choices = [w for w in self.workers if w.alive() and not w.held]
            if not choices:
                raise Busy("no worker alive")
            return self.rng.choice(choices)

        def kill_slot(how: str, which: str) -> Any:
            async def act(f: Fault) -> None:
                slot = alive_worker() if which == "worker" else self.catalog
                if slot is None or not slot.alive() or slot.held:
                    raise Busy(f"{which} not running")
                f.target = slot.name
                slot.held = True
                try:
                    sig = signal.SIGKILL if how == "kill9" else signal.SIGTERM
                    f.detail["exit_s"] = await asyncio.to_thread(slot.kill, sig)
                    f.detail["how"] = slot.current.how if slot.current else ""
                    await asyncio.sleep(self.rng.uniform(0.5, 5.0))
                    self._start_slot(slot)
                finally:
                    slot.held = False
                f.end = time.time()

            return available(
                lambda: any(w.alive() and not w.held for w in self.workers) if which == "worker" else True
            )(act)

        def restart(service: str, call: Any) -> Any:
            async def act(f: Fault) -> None:
                if service in busy:
                    raise Busy(service)
                busy.add(service)
                f.target = service
                try:
                    f.detail["ready_s"] = round(await asyncio.to_thread(call), 1)
                    if service == "s3":
                        await asyncio.to_thread(self.s3_rules.reapply)
                finally:
                    busy.discard(service)
                f.end = time.time()

            return available(lambda: service not in busy)(act)

        def s3_rule(kind: str) -> Any:
            async def act(f: Fault) -> None:
                every = self.rng.randint(1, 4)
                if kind == "errors":
                    status, code = self.rng.choice(
                        [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable")]
                    )
                    rule: dict[str, Any] = {"match": "/chaos/", "status": status, "code": code, "every": every}
                else:
                    rule = {"match": "/chaos/", "delay_s": round(self.rng.uniform(0.2, 4.0), 2), "every": every}
                f.detail = rule
                try:
                    try:
                        await asyncio.to_thread(self.s3_rules.set, f.id, rule)
                    except OSError as exc:  # S3 restarting: the rule is applied when it is back
                        f.detail["applied_late"] = repr(exc)
                    await asyncio.sleep(self.scheduler.duration(f.kind))
                finally:
                    with contextlib.suppress(OSError):
                        await asyncio.to_thread(self.s3_rules.set, f.id, None)
                f.end = time.time()

            return act

        def link(mode: str, relay: str) -> Any:
            async def act(f: Fault) -> None:
                slot = alive_worker()
                f.target = f"{slot.name}->{relay}"
                if mode == "slow":
                    rule: dict[str, Any] = (
                        {"delay_ms": round(self.rng.uniform(20, 400))}
                        if self.rng.random() < 0.5
                        else {"rate_bps": self.rng.choice([20_000, 50_000, 200_000])}
                    )
                else:
                    rule = {"mode": mode}
                f.detail = rule
                try:
                    await asyncio.to_thread(self.links.add, relay, slot.name, f.id, rule)
                    await asyncio.sleep(self.scheduler.duration(f.kind))
                finally:
                    await asyncio.to_thread(self.links.remove, relay, slot.name, f.id)
                f.end = time.time()

            return available(lambda: any(w.alive() for w in self.workers))(act)

        async def disk_full(f: Fault) -> None:
            f.target = "catalog-fs"
            try:
                f.detail["filled_bytes"] = await asyncio.to_thread(self.disk.fill, f.id)
                await asyncio.sleep(self.scheduler.duration(f.kind))
            finally:
                await asyncio.to_thread(self.disk.release, f.id)
            f.end = time.time()

        async def clock_jump(f: Fault) -> None:
            slot = alive_worker()
            jump = round(self.rng.uniform(30, 3600))
            self.clock_offsets[slot.name] = self.clock_offsets.get(slot.name, 0) + jump
            self.clock_files[slot.name].write_text(f"+{self.clock_offsets[slot.name]}\n")
            f.target, f.detail = slot.name, {"jump_s": jump, "offset_s": self.clock_offsets[slot.name]}
            f.end = time.time()

        actions: dict[str, Any] = {
            "worker_kill9": kill_slot("kill9", "worker"),
            "worker_sigterm": kill_slot("sigterm", "worker"),
            "catalog_kill9": kill_slot("kill9", "catalog"),
            "catalog_sigterm": kill_slot("sigterm", "catalog"),
            "broker_restart": restart("kafka", stack.restart_kafka),
            "triton_restart": restart("triton", stack.restart_triton),
            "s3_restart": restart("s3", stack.restart_s3),
            "s3_errors": s3_rule("errors"),
            "s3_latency": s3_rule("latency"),
        }
        if self.clock_files:  # libfaketime is there
            actions["clock_jump"] = clock_jump
        if self.postgres is not None:
            actions["db_restart"] = restart("postgres", self.postgres.restart)
        if self.mount is not None:
            actions["disk_full"] = disk_full
        for mode in ("cut", "stall", "slow"):
            for relay in ("kafka", "s3", "triton"):
                actions[f"{mode}_{relay}"] = link(mode, relay)
        return actions

    # --- sampling ----------------------------------------------------------------------------

    def _catalog_count(self) -> int | None:
        try:
            if self.c.catalog == "postgres":
                import psycopg

                with psycopg.connect(self.catalog_url, connect_timeout=3) as db:
                    row = db.execute("SELECT COUNT(*) FROM track_latest").fetchone()
            else:
                path = self.catalog_url.removeprefix("sqlite:///")
                with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
                    row = db.execute("SELECT COUNT(*) FROM track_latest").fetchone()
            return int(row[0]) if row else 0
        except Exception:  # noqa: BLE001 - a catalog that does not answer yet, or a full disk
            return None

    async def sample_catalog(self) -> None:
        while not self.state.stop.is_set():
            count = await asyncio.to_thread(self._catalog_count)
            if count is not None:
                self.state.catalog_count = count
                self.j["catalog"].write(t=time.time(), count=count)
            await asyncio.sleep(2)

    def _processes(self) -> dict[str, int]:
        """role -> pid of every process to sample (children named after their parent)."""
        found: dict[str, int] = {}
        roots: dict[str, int] = {}
        for slot in [*self.workers, *([self.catalog] if self.catalog else [])]:
            if slot.pid is not None:
                roots[f"{slot.name}.{len(slot.incarnations) - 1}"] = slot.pid
        if self.stack is not None:
            roots.update(self.stack.pids())
        if self.postgres is not None and self.postgres.pid is not None:
            roots["postgresql"] = self.postgres.pid
        for name, pid in roots.items():
            found[name] = pid
            for n, child in enumerate(procs.children(pid)):
                found[f"{name}/child{n}"] = child
        return found

    async def sample_processes(self, interval_s: float) -> None:
        while not self.state.stop.is_set():
            now = time.time()
            for name, pid in self._processes().items():
                s = procs.sample(pid)
                if s is None:
                    continue
                role = _role(name)
                self.peaks[role] = max(self.peaks.get(role, 0.0), s.hwm_mb)
                self.j["procs"].write(t=now, name=name, role=role, pid=pid, **asdict(s))
            await asyncio.sleep(interval_s)

    async def scrape_metrics(self) -> None:
        folder = self.out / "metrics"
        folder.mkdir(exist_ok=True)
        while not self.state.stop.is_set():
            for slot in self.workers:
                text = await asyncio.to_thread(slot.metrics)
                if text:
                    (folder / f"{slot.name}.{len(slot.incarnations) - 1}.prom").write_text(text)
            await asyncio.sleep(10)

    async def report_progress(self, total: int) -> None:
        while not self.state.stop.is_set():
            await asyncio.sleep(15)
            self.print_progress(total)

    def print_progress(self, total: int) -> None:
        p = self.reader.progress
        alive = sum(w.alive() for w in self.workers)
        faults = len(self.scheduler.faults) if hasattr(self, "scheduler") else 0
        active = len(self.scheduler.running) if hasattr(self, "scheduler") else 0
        print(
            f"[{time.time() - self.state.started:7.0f} s] announced {self.producer.acked}/{total}  "
            f"done {len(p.done & self.expected_ids)}/{total}  outputs {p.outputs}  dead letters {p.dead}  "
            f"faults {faults} ({active} active)  workers alive {alive}/{len(self.workers)}  "
            f"catalog {self.state.catalog_count}  fences {self.fences.samples}  load {os.getloadavg()[0]:.1f}",
            flush=True,
        )

    # --- the run -----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        c = self.c
        (self.out / "config.json").write_text(
            json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(c).items() if k != "kinds"})
        )
        files = clipmod.sources() if c.music == "auto" else clipmod.sources(music=Path("/nonexistent"))
        clip_list = clipmod.cut(min(c.distinct_clips, c.tracks), c.clip_s, files=files)
        announcements, objects = plan(c, clip_list)
        self.expected_ids = {a.correlation_id for a in announcements}
        print(f"# {len(clip_list)} distinct clips of {c.clip_s:.0f} s, {len(announcements)} announcements", flush=True)
        self.mount = self._mount_catalog_fs()
        self.disk = DiskFiller(self.mount)
        await asyncio.to_thread(self._start_stack)
        assert self.stack is not None
        self.links = LinkRules({r: self.stack.link_control(r) for r in ("kafka", "s3", "triton")})
        self.s3_rules = S3Rules(self.stack.s3_faults)
        await asyncio.to_thread(self._upload, clip_list, objects)
        self.catalog_url = await asyncio.to_thread(self._catalog_db)
        base = self._base_env()
        (self.out / "faust").mkdir(exist_ok=True)
        logs = self.out / "logs"
        logs.mkdir(exist_ok=True)
        for i in range(c.workers):
            clock = None if c.soak_hours else self.out / f"clock-worker-{i}.txt"
            slot = procs.worker_slot(i, base_env=base, log_dir=logs, static=i < c.static_workers, clock_file=clock)
            if clock is not None and "LD_PRELOAD" in slot.env:
                self.clock_files[slot.name] = clock
            self.workers.append(slot)
        if not c.soak_hours and not self.clock_files:
            self.state.notes.append("no clock jumps: Debian's libfaketime is missing (make tools installs it)")
        self.catalog = procs.catalog_slot(
            base_env={
                **base,
                "MOODSTREAM_CATALOG_URL": self.catalog_url,
                "MOODSTREAM_CATALOG_GROUP": CATALOG_GROUP,
                "MOODSTREAM_INDEX_DIR": str((self.mount or self.out) / "index"),
                "MOODSTREAM_MAX_ANALYSES_IN_FLIGHT": "1",  # no uploads here: one decoding process
            },
            log_dir=logs,
        )
        for slot in [*self.workers, self.catalog]:
            self._start_slot(slot)
        await self._await_workers()

        self.producer = Producer(self.stack.kafka_bootstrap, INPUT, self.j["announced"])
        self.reader = Reader(self.stack.kafka_bootstrap, (OUTPUT, DLQ), c.partitions, self.j["seen"])
        self.fences = FenceSampler(
            self.stack.kafka_bootstrap, GROUP, INPUT, (OUTPUT, DLQ), c.partitions, self.j["fences"]
        )
        self.scheduler = Scheduler(c.kinds, self._actions(), self.rng, self.j["faults"])
        rate = len(announcements) / (c.span_s * (1.0 if c.soak_hours else 0.8))
        if c.soak_hours:
            rate = c.soak_rate
        stop = self.state.stop
        tasks = [
            asyncio.create_task(self.reader.run(stop, original_id)),
            asyncio.create_task(self.fences.run(stop, c.sample_s)),
            asyncio.create_task(self.sample_catalog()),
            asyncio.create_task(self.sample_processes(5.0 if not c.soak_hours else 30.0)),
            asyncio.create_task(self.scrape_metrics()),
            asyncio.create_task(self.supervise()),
            asyncio.create_task(self.report_progress(len(announcements))),
        ]
        started = time.time()
        producing = asyncio.create_task(self._produce(announcements, rate, c))
        faulting = asyncio.create_task(self._faults(c))
        await asyncio.gather(producing, faulting)
        self.print_progress(len(announcements))
        print("# faults done and every track announced: draining", flush=True)
        drained = await self._drain(announcements)
        self.print_progress(len(announcements))
        wall_s = time.time() - started
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Stopped together (each drains its batch in flight first, seconds each).
        await asyncio.gather(*(asyncio.to_thread(slot.stop) for slot in [*self.workers, self.catalog]))
        await self.producer.close()
        topics = {}
        for name, topic in (("input", INPUT), ("output", OUTPUT), ("dlq", DLQ)):
            print(f"# reading {topic} back", flush=True)
            topics[name] = await read_topic(self.stack.kafka_bootstrap, topic, c.partitions)
        rows = await asyncio.to_thread(self._catalog_rows)
        return {
            "wall_s": wall_s,
            "drained": drained,
            "topics": topics,
            "catalog_rows": rows,
            "peaks": self.peaks,
            "notes": self.state.notes,
            "fault_counts": self.scheduler.counts,
            "announcements": announcements,
        }

    async def _produce(self, announcements: list[Announcement], rate: float, c: Config) -> None:
        await self.producer.run(announcements, lambda: rate, self.state.stop)
        self.state.producer_done.set()

    async def _faults(self, c: Config) -> None:
        if c.soak_hours or c.faults <= 0:
            return
        await asyncio.sleep(10)  # the group settles first
        await self.scheduler.run(c.faults, c.span_s, self.state.stop)
        await self.heal_everything()

    async def heal_everything(self) -> None:
        """Every fault's effect undone, whatever its injection or healing met (a rule sent to an
        S3 server that was restarting, a relay's control connection broken)."""
        self.s3_rules.active.clear()
        for (relay, label), rules in list(self.links.active.items()):
            for fault_id, _ in list(rules):
                with contextlib.suppress(OSError, ValueError):
                    await asyncio.to_thread(self.links.remove, relay, label, fault_id)
        for control in self.links.controls.values():
            with contextlib.suppress(OSError, ValueError):
                await asyncio.to_thread(control.send, op="heal", label="*")
        for _ in range(30):  # S3 may be restarting still
            try:
                await asyncio.to_thread(self.s3_rules.reapply)
                break
            except OSError:
                await asyncio.sleep(2)
        for fault_id in list(self.disk.holders):
            self.disk.release(fault_id)

    async def _await_workers(self) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            ready = [w for w in self.workers if w.current and "tagging" in w.current.log.read_text(errors="replace")]
            if len(ready) == len(self.workers):
                return
            await asyncio.sleep(1)
        raise RuntimeError("the workers did not start within 10 minutes; see " + str(self.out / "logs"))

    async def _drain(self, announcements: list[Announcement]) -> bool:
        """Wait until every announcement has a result and the catalog holds every output's track."""
        deadline = time.monotonic() + self.c.drain_timeout_s
        want = {a.correlation_id for a in announcements}
        good = {a.track_id for a in announcements if a.expected == "output"}
        last = 0.0
        while time.monotonic() < deadline:
            done = want <= self.reader.progress.done
            if done and self.state.catalog_count >= len(good):
                return True
            if time.monotonic() - last > 15:
                last = time.monotonic()
                missing = len(want - self.reader.progress.done)
                print(
                    f"# draining: {missing} announcements without a result, catalog {self.state.catalog_count}/{len(good)}"
                )
            await asyncio.sleep(2)
        return False

    def _catalog_rows(self) -> dict[str, Any]:
        """The catalog's tables: records (track, model, version, record) and track_latest."""
        if self.c.catalog == "postgres":
            import psycopg

            with psycopg.connect(self.catalog_url) as db:
                records = db.execute("SELECT seq, track_id, model_name, model_version, record FROM records").fetchall()
                latest = db.execute("SELECT track_id, seq FROM track_latest").fetchall()
        else:
            path = self.catalog_url.removeprefix("sqlite:///")
            with contextlib.closing(sqlite3.connect(path)) as db:
                records = db.execute("SELECT seq, track_id, model_name, model_version, record FROM records").fetchall()
                latest = db.execute("SELECT track_id, seq FROM track_latest").fetchall()
        return {"records": [list(r) for r in records], "latest": [list(r) for r in latest]}

    def close(self) -> None:
        for slot in [*self.workers, *([self.catalog] if self.catalog else [])]:
            with contextlib.suppress(Exception):
                slot.held = True
                slot.kill(signal.SIGKILL)
        if self.stack is not None:
            self.stack.stop()
        if self.postgres is not None:
            self.postgres.stop()
        if self.mount is not None:
            subprocess.run(["umount", "-l", str(self.mount)], check=False)
            with contextlib.suppress(OSError):
                self.mount.rmdir()
        for journal in self.j.values():
            journal.close()


def _role(name: str) -> str:
    """``worker-1.3/child0`` -> ``worker decoding process``; stack services keep their name."""
    base, _, child = name.partition("/")
    base = re.sub(r"-\d+\.\d+$|\.\d+$", "", base)
    if child:
        return f"{base} child" if base != "worker" else "worker decoding process"
    return base

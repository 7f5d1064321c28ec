"""Network faults between the embedded stack's clients and its services: a TCP relay that can cut,
stall or slow the links of chosen client processes, like toxiproxy (which Debian does not ship).

    client ──► relay (127.0.0.1:PORT) ──► service (127.0.0.1:UPSTREAM)
                 ▲
                 └── control (127.0.0.1:CONTROL): one JSON command a line, one JSON answer a line

A fault applies to the links of one *label*, a set of client process ids the controller
registers (``{"op": "clients", "labels": {"w1": [pid, ...]}}``), or to every link (label
``"*"``). The relay finds the process behind an accepted connection on this host from
``/proc/net/tcp`` and the registered processes' file descriptors, so every client keeps the one
address the service advertises: a Kafka broker names a single address in its metadata, and a
per-client port would be bypassed after the first request. A rule is

    {"op": "rule", "label": "w1", "mode": "cut"}        existing links reset, new ones reset at once
    {"op": "rule", "label": "w1", "mode": "stall"}      nothing relayed either way (a partition):
                                                        bytes wait, and flow again when healed
    {"op": "rule", "label": "w1", "delay_ms": 400}      every chunk held this long (a slow link)
    {"op": "rule", "label": "w1", "rate_bps": 20000}    at most this many bytes a second each way
    {"op": "heal", "label": "w1"}                        the label's rule removed ("*" too)
    {"op": "stats"}                                      links open and faults applied, per label

The relay runs as a process of its own (``python -m devstack.netfault PORT UPSTREAM_PORT
--control CONTROL``) or inside another (the Kafka front relays Kafka frames with the same
rules: :class:`Faults`). Dev-only: production never has this between its services.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CHUNK = 65_536
ALL = "*"


@dataclass
class Rule:
    mode: str = ""  # "", "cut" or "stall"
    delay_ms: float = 0.0
    rate_bps: float = 0.0

    @classmethod
    def parse(cls, command: dict[str, Any]) -> Rule:
        mode = str(command.get("mode") or "")
        if mode not in ("", "cut", "stall"):
            raise ValueError(f"unknown mode {mode!r}")
        return cls(mode, float(command.get("delay_ms") or 0), float(command.get("rate_bps") or 0))


@dataclass(eq=False)
class Link:
    """One relayed connection: its client's label, and how to reset it."""

    label: str
    reset: Callable[[], None]
    opened: float = field(default_factory=time.monotonic)


class Faults:
    """The rules, the registered clients and the open links of one relay; :meth:`gate` is awaited
    before each chunk is passed on."""

    def __init__(self, listen_port: int) -> None:
        self.listen_port = listen_port
        self.labels: dict[int, str] = {}  # pid -> label
        self.rules: dict[str, Rule] = {}
        self.links: set[Link] = set()
        self.applied: dict[str, int] = {}
        self._changed = asyncio.Event()

    # --- which client is it ----------------------------------------------------------------

    def label_of(self, peer_port: int) -> str:
        """The label of the registered process holding the client end (``peer_port``) of a
        connection to this relay; ``""`` when none does (it passes untouched unless ``*`` rules)."""
        if not self.labels:
            return ""
        inode = _socket_inode(peer_port, self.listen_port)
        if inode is None:
            return ""
        target = f"socket:[{inode}]"
        for pid, label in list(self.labels.items()):
            try:
                for fd in os.scandir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(fd.path) == target:
                            return label
            except OSError:
                continue
        return ""

    # --- the rules ---------------------------------------------------------------------------

    def rule_for(self, label: str) -> Rule | None:
        return self.rules.get(label) or self.rules.get(ALL)

    def command(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command.get("op")
        if op == "clients":
            self.labels = {int(pid): label for label, pids in command["labels"].items() for pid in pids}
        elif op == "rule":
            label = str(command["label"])
            rule = Rule.parse(command)
            self.rules[label] = rule
            self.applied[label] = self.applied.get(label, 0) + 1
            if rule.mode == "cut":
                for link in [k for k in self.links if label in (ALL, k.label)]:
                    link.reset()
        elif op == "heal":
            label = str(command["label"])
            if label == ALL:
                self.rules.clear()
            else:
                self.rules.pop(label, None)
        elif op == "stats":
            open_links: dict[str, int] = {}
            for link in self.links:
                open_links[link.label or "-"] = open_links.get(link.label or "-", 0) + 1
            return {"ok": True, "links": open_links, "applied": self.applied, "rules": list(self.rules)}
        else:
            return {"ok": False, "error": f"unknown op {op!r}"}
        self._changed.set()
        self._changed = asyncio.Event()
        return {"ok": True}

    async def gate(self, link: Link, size: int) -> bool:
        """Wait as the link's rule says before ``size`` bytes pass; False when the link is cut."""
        while True:
            rule = self.rule_for(link.label)
            if rule is None:
                return True
            if rule.mode == "cut":
                return False
            if rule.mode == "stall":
                await self._changed.wait()
                continue
            pause = rule.delay_ms / 1000 + (size / rule.rate_bps if rule.rate_bps else 0.0)
            if pause <= 0:
                return True
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), pause)
            except TimeoutError:
                return True
            # the rule changed meanwhile: look again (a cut, a heal)

    def refuses(self, label: str) -> bool:
        rule = self.rule_for(label)
        return rule is not None and rule.mode == "cut"


def _socket_inode(local_port: int, remote_port: int) -> int | None:
    """Inode of the socket on this host whose local port is ``local_port`` and whose peer's port
    is ``remote_port`` (a loopback connection's client end), from /proc/net/tcp and tcp6."""
    want_local = f":{local_port:04X}"
    want_remote = f":{remote_port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[1].endswith(want_local) and parts[2].endswith(want_remote):
                return int(parts[9])
    return None


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a cut cable or a dead host's kernel would answer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


#: (reader, writer of the other side, link, faults) -> relay one direction until EOF or a cut
Pump = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Link, Faults], Coroutine[Any, Any, None]]
#: a new connection's (requests pump, responses pump): the pair may share the connection's state
Pumps = Callable[[], tuple[Pump, Pump]]


async def pump_bytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link, faults: Faults) -> None:
    while data := await reader.read(_CHUNK):
        if not await faults.gate(link, len(data)):
            return
        writer.write(data)
        await writer.drain()


def byte_pumps() -> tuple[Pump, Pump]:
    return pump_bytes, pump_bytes


async def relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream_port: int,
    faults: Faults,
    pumps: Pumps = byte_pumps,
) -> None:
    """Relay one accepted connection to 127.0.0.1:``upstream_port`` under ``faults``' rules."""
    peer = client_writer.get_extra_info("peername")
    label = await asyncio.to_thread(faults.label_of, peer[1]) if peer else ""
    if faults.refuses(label):
        _reset(client_writer)
        return
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
    except OSError:
        _reset(client_writer)  # as the service's own host would answer: refused
        return

    def reset() -> None:
        _reset(client_writer)
        _reset(upstream_writer)

    link = Link(label, reset)
    faults.links.add(link)
    requests, responses = pumps()
    tasks = [
        asyncio.create_task(requests(client_reader, upstream_writer, link, faults)),
        asyncio.create_task(responses(upstream_reader, client_writer, link, faults)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        faults.links.discard(link)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cut = faults.refuses(label)
        for writer in (client_writer, upstream_writer):
            if cut:
                _reset(writer)
            else:
                writer.close()


async def serve_control(faults: Faults, port: int) -> asyncio.Server:
    """The control listener: one JSON command a line, one JSON answer a line."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    answer = faults.command(json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    answer = {"ok": False, "error": repr(exc)}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def serve(port: int, upstream_port: int, control_port: int | None, pumps: Pumps = byte_pumps) -> None:
    """Relay 127.0.0.1:``port`` to ``upstream_port`` until killed; with ``control_port``, under
    the faults commanded there (without, every connection passes untouched)."""
    faults = Faults(port)
    control = await serve_control(faults, control_port) if control_port else None
    server = await asyncio.start_server(lambda r, w: relay(r, w, upstream_port, faults, pumps), "127.0.0.1", port)
    print(f"relay on 127.0.0.1:{port} to :{upstream_port}, control on :{control_port or '-'}", flush=True)
    async with server:
        try:
            await server.serve_forever()
        finally:
            if control is not None:
                control.close()


class Control:
    """The controller's side: one connection to a relay's control port (blocking, thread-safe
    enough for one caller at a time)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._sock: socket.socket | None = None
        self._file: Any = None

    def send(self, **command: Any) -> dict[str, Any]:
        for attempt in range(2):
            try:
                if self._sock is None:
                    self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                    self._file = self._sock.makefile("rwb")
                self._file.write(json.dumps(command).encode() + b"\n")
                self._file.flush()
                line = self._file.readline()
                if not line:
                    raise ConnectionError("the relay closed its control connection")
                answer = json.loads(line)
                if not answer.get("ok"):
                    raise ValueError(f"relay refused {command}: {answer.get('error')}")
                return answer
            except OSError:
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = self._file = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack.netfault", description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("--control", type=int, required=True, help="the control port")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.upstream_port, args.control))


if __name__ == "__main__":
    main(sys.argv[1:])

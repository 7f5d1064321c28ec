"""The durable broker's store: a small in-memory server of the S3 calls Tansu's ``s3://`` engine
makes (object_store 0.12 in Tansu 0.6), for the embedded stack only.

Tansu keeps every produced batch, watermark, group and offset as an object, and lists a
partition's batches on every fetch that has something to read. moto served it at about 7 ms of
CPU a request and lists a bucket by walking every key in it, so in a chaos run the broker's
store took more CPU than the workers and its listings grew with the log. Here keys are kept
sorted (a listing costs what it returns) and a request costs a fraction of a millisecond.

What it answers, as S3 does: PUT (``If-None-Match: *`` and ``If-Match: <etag>`` conditions,
412 when they fail), GET and HEAD (``If-None-Match``/``If-Match``, 304/412; ``Range``), DELETE,
ListObjectsV2 (``prefix``, ``delimiter``, ``start-after``, ``continuation-token``,
``max-keys``) and bucket creation. Requests are not authenticated. Objects live as long as the
process: the store is never restarted by a fault, the broker in front of it is.

    python -m devstack.object_store PORT
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import hashlib
import sys
import time
from dataclasses import dataclass
from email.utils import formatdate
from urllib.parse import parse_qsl, unquote, urlsplit
from xml.sax.saxutils import escape

_PAGE = 1000


@dataclass(frozen=True)
class _Object:
    data: bytes
    etag: str  # quoted, as S3 sends it
    modified: float


class Store:
    """Buckets of objects, keys kept sorted per bucket."""

    def __init__(self) -> None:
        self.buckets: dict[str, dict[str, _Object]] = {}
        self.keys: dict[str, list[str]] = {}
        self.requests = 0

    def bucket(self, name: str) -> tuple[dict[str, _Object], list[str]]:
        if name not in self.buckets:
            self.buckets[name], self.keys[name] = {}, []
        return self.buckets[name], self.keys[name]

    def put(self, bucket: str, key: str, data: bytes) -> _Object:
        objects, keys = self.bucket(bucket)
        if key not in objects:
            bisect.insort(keys, key)
        obj = _Object(data, f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"', time.time())
        objects[key] = obj
        return obj

    def delete(self, bucket: str, key: str) -> None:
        objects, keys = self.bucket(bucket)
        if objects.pop(key, None) is not None:
            del keys[bisect.bisect_left(keys, key)]

    def listing(
        self, bucket: str, prefix: str, delimiter: str, after: str, limit: int
    ) -> tuple[list[str], list[str], str | None]:
        """(keys, common prefixes, the last key returned when there is more) after ``after``."""
        _objects, keys = self.bucket(bucket)
        start = bisect.bisect_left(keys, prefix)
        if after:
            start = max(start, bisect.bisect_right(keys, after))
        found: list[str] = []
        prefixes: list[str] = []
        i = start
        last = ""
        while i < len(keys) and keys[i].startswith(prefix):
            key = keys[i]
            if len(found) + len(prefixes) >= limit:
                return found, prefixes, last
            if delimiter and delimiter in key[len(prefix) :]:
                common = key[: key.index(delimiter, len(prefix)) + len(delimiter)]
                prefixes.append(common)
                last = common
                # skip every key under this common prefix
                i = bisect.bisect_left(keys, common + "\U0010ffff")
                continue
            found.append(key)
            last = key
            i += 1
        return found, prefixes, None


class _Request:
    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        parts = urlsplit(target)
        self.path = unquote(parts.path)
        self.query = dict(parse_qsl(parts.query, keep_blank_values=True))
        self.headers = headers
        self.body = body


def _http_date(at: float) -> str:
    return formatdate(at, usegmt=True)


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(at))


def _error(status: int, code: str, message: str = "") -> tuple[int, dict[str, str], bytes]:
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>'
    )
    return status, {"Content-Type": "application/xml"}, xml.encode()


def handle(store: Store, request: _Request) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request."""
    store.requests += 1
    bucket, _, key = request.path.lstrip("/").partition("/")
    if not bucket:
        return _error(400, "InvalidRequest", "no bucket")
    if not key:
        if request.method == "PUT":
            store.bucket(bucket)
            return 200, {}, b""
        if request.method in ("GET", "HEAD"):
            return _list(store, bucket, request)
        return _error(405, "MethodNotAllowed")
    objects, _ = store.bucket(bucket)
    current = objects.get(key)
    if request.method == "PUT":
        if request.headers.get("if-none-match") == "*" and current is not None:
            return _error(412, "PreconditionFailed", "the object exists")
        match = request.headers.get("if-match")
        if match is not None and (current is None or match != current.etag):
            return _error(412 if current is not None else 404, "PreconditionFailed", "the ETag differs")
        obj = store.put(bucket, key, request.body)
        return 200, {"ETag": obj.etag, "Last-Modified": _http_date(obj.modified)}, b""
    if request.method == "DELETE":
        store.delete(bucket, key)
        return 204, {}, b""
    if request.method in ("GET", "HEAD"):
        if current is None:
            return _error(404, "NoSuchKey", key)
        meta = {"ETag": current.etag, "Last-Modified": _http_date(current.modified), "Accept-Ranges": "bytes"}
        if (match := request.headers.get("if-match")) is not None and match != current.etag:
            return _error(412, "PreconditionFailed", "the ETag differs")
        if (none_match := request.headers.get("if-none-match")) is not None and none_match in (current.etag, "*"):
            return 304, meta, b""
        data = current.data
        status = 200
        if (ranged := request.headers.get("range", "")).startswith("bytes="):
            first, _, last = ranged[6:].partition("-")
            start = int(first) if first else max(0, len(data) - int(last))
            end = int(last) if first and last else len(data) - 1
            if start >= len(data):
                return _error(416, "InvalidRange", ranged)
            end = min(end, len(data) - 1)
            meta["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        meta["Content-Type"] = "application/octet-stream"
        return status, meta, data
    return _error(405, "MethodNotAllowed")


def _list(store: Store, bucket: str, request: _Request) -> tuple[int, dict[str, str], bytes]:
    q = request.query
    prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
    limit = min(int(q.get("max-keys") or _PAGE), _PAGE)
    token = q.get("continuation-token")
    after = base64.urlsafe_b64decode(token).decode() if token else q.get("start-after", "")
    keys, prefixes, last = store.listing(bucket, prefix, delimiter, after, limit)
    objects, _ = store.bucket(bucket)
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
        f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>",
        f"<KeyCount>{len(keys) + len(prefixes)}</KeyCount><MaxKeys>{limit}</MaxKeys>",
    ]
    if delimiter:
        parts.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
    if token:
        parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
    parts.append(f"<IsTruncated>{'true' if last else 'false'}</IsTruncated>")
    if last:
        parts.append(
            f"<NextContinuationToken>{base64.urlsafe_b64encode(last.encode()).decode()}</NextContinuationToken>"
        )
    for key in keys:
        obj = objects[key]
        parts.append(
            f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(obj.modified)}</LastModified>"
            f"<ETag>{escape(obj.etag)}</ETag><Size>{len(obj.data)}</Size><StorageClass>STANDARD</StorageClass></Contents>"
        )
    parts += [f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes]
    parts.append("</ListBucketResult>")
    return 200, {"Content-Type": "application/xml"}, "".join(parts).encode()


_REASONS = {
    200: "OK",
    204: "No Content",
    206: "Partial Content",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    412: "Precondition Failed",
    416: "Range Not Satisfiable",
}


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        data = bytes(body)
    else:
        data = await reader.readexactly(int(headers.get("content-length") or 0))
    return _Request(method, target, headers, data)


async def _connection(store: Store, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (request := await _read_request(reader)) is not None:
            status, headers, body = handle(store, request)
            length = len(body)
            if request.method == "HEAD" or status == 304:
                body = b""
            headers.setdefault("Content-Length", str(length if request.method == "HEAD" else len(body)))
            headers["x-amz-request-id"] = str(store.requests)
            head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in headers.items()
            )
            writer.write(head.encode("latin-1") + b"\r\n" + body)
            await writer.drain()
            if request.headers.get("connection", "").lower() == "close":
                break
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def serve(port: int) -> None:
    store = Store()

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: _connection(store, r, w), "127.0.0.1", port)
        print(f"object store on 127.0.0.1:{port}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    serve(int(sys.argv[1]))

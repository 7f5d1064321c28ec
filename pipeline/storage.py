"""Storage stage: which URIs an event may name, and fetching their bytes from S3.

boto3 reads endpoint, region and credentials from the standard AWS environment
(``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, web
identity tokens, instance roles), so credentials never pass through moodstream's code or logs.

Only buckets on the allow-list can be read, and keys with path tricks are refused before any
request is made. The object's size is checked with HEAD before its body is read, and the read
itself stops one byte past the cap (an object can grow between the two calls). Throttling, 5xx
and connection errors are retried by botocore's standard retry mode with backoff; when those
retries are spent the error is :class:`ServiceUnavailable` (the worker waits and tries again)
rather than a dead letter.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import botocore.exceptions
from botocore.config import Config

from pipeline.errors import AccessDenied, BadEvent, NotFound, ServiceUnavailable, TooLarge

AUDIO_EXTENSIONS = frozenset({"mp3", "ogg", "oga", "opus", "flac", "wav", "m4a", "aac", "aif", "aiff", "wma", "mp4"})
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_MAX_KEY_BYTES = 1024
_READ_BLOCK = 1 << 20  # bytes per read of a streamed body


@dataclass(frozen=True)
class ObjectRef:
    scheme: str  # "s3" or "file"
    bucket: str  # "" for file://
    key: str  # the object key, or the absolute path for file://


@dataclass(frozen=True)
class ListedObject:
    bucket: str
    key: str
    size: int  # bytes


def parse_uri(uri: str, *, allowed_buckets: tuple[str, ...] | list[str], allow_file_uris: bool) -> ObjectRef:
    """Check an event's audio URI; raise :class:`BadEvent` saying what is wrong with it."""
    if not isinstance(uri, str) or not uri:
        raise BadEvent("audio_uri must be a non-empty string")
    if any(ord(c) < 32 or ord(c) == 127 for c in uri) or "\\" in uri:
        raise BadEvent("audio_uri contains control characters or backslashes")
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if not allow_file_uris:
            raise BadEvent("file:// URIs are not accepted (MOODSTREAM_ALLOW_FILE_URIS is off)")
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/") or ".." in Path(path).parts:
            raise BadEvent(f"file URI must be an absolute path without '..': {uri!r}")
        return ObjectRef("file", "", path)
    if parts.scheme != "s3":
        raise BadEvent(f"audio_uri scheme must be s3 (got {parts.scheme or 'none'!r})")
    if parts.query or parts.fragment or parts.username or parts.port:
        raise BadEvent("s3 URI must be s3://bucket/key with no query, fragment or credentials")
    bucket, key = parts.netloc, parts.path[1:]
    if not _BUCKET.match(bucket):
        raise BadEvent(f"invalid bucket name {bucket!r}")
    if bucket not in allowed_buckets:
        raise BadEvent(f"bucket {bucket!r} is not in the allow-list")
    decoded = unquote(key)
    if not key or key.endswith("/"):
        raise BadEvent("s3 URI has no object key")
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise BadEvent("object key longer than 1024 bytes")
    segments = decoded.split("/")
    if any(s in ("", ".", "..") for s in segments) or "\\" in decoded or "\x00" in decoded:
        raise BadEvent(f"object key has empty, '.' or '..' segments: {key!r}")
    return ObjectRef("s3", bucket, key)


def make_s3_client(max_attempts: int = 5) -> Any:
    """An S3 client from the standard AWS environment, with retries and timeouts."""
    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"}, connect_timeout=5, read_timeout=30)
    return boto3.session.Session().client("s3", config=config)


def fetch(ref: ObjectRef, *, client: Any, max_bytes: int) -> bytes:
    """The object's bytes; NotFound, AccessDenied, TooLarge, or ServiceUnavailable."""
    if ref.scheme == "file":
        return _read_file(ref.key, max_bytes)
    try:
        head = client.head_object(Bucket=ref.bucket, Key=ref.key)
        if head["ContentLength"] > max_bytes:
            raise TooLarge(f"object is {head['ContentLength']} bytes, more than the {max_bytes} allowed")
        body = client.get_object(Bucket=ref.bucket, Key=ref.key)["Body"]
        chunks, size = [], 0
        try:
            while block := body.read(_READ_BLOCK):
                chunks.append(block)
                size += len(block)
                if size > max_bytes:
                    raise TooLarge(f"object grew past {max_bytes} bytes while being read")
        finally:
            body.close()
        return b"".join(chunks)
    except botocore.exceptions.ClientError as exc:
        raise _translate(exc, ref) from None
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        raise ServiceUnavailable(f"S3 unreachable: {exc}") from None


async def fetch_async(ref: ObjectRef, *, client: Any, max_bytes: int) -> bytes:
    """:func:`fetch` in a thread, so the event loop keeps serving the other tracks."""
    return await asyncio.to_thread(fetch, ref, client=client, max_bytes=max_bytes)


def _read_file(path: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise NotFound(f"no file {path}") from None
    except PermissionError:
        raise AccessDenied(f"cannot read {path}") from None
    except IsADirectoryError:
        raise NotFound(f"{path} is a directory") from None
    if len(data) > max_bytes:
        raise TooLarge(f"file is larger than the {max_bytes} bytes allowed")
    return data


def _translate(exc: botocore.exceptions.ClientError, ref: ObjectRef) -> Exception:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    where = f"s3://{ref.bucket}/{ref.key}"
    if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound") or status == 404:
        return NotFound(f"{where} does not exist")
    if code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
        return AccessDenied(f"{where}: access denied ({code})")
    if status >= 500 or code in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"):
        return ServiceUnavailable(f"{where}: S3 answered {code or status} after retries")
    return AccessDenied(f"{where}: S3 refused the request ({code or status})")


def list_audio(prefix_uri: str, *, client: Any, page_size: int = 1000) -> Iterator[ListedObject]:
    """Every audio object (by extension) under ``s3://bucket/prefix``, paginated."""
    parts = urlsplit(prefix_uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise BadEvent(f"expected s3://bucket/prefix, got {prefix_uri!r}")
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=parts.netloc, Prefix=parts.path.lstrip("/"), PaginationConfig={"PageSize": page_size}):
            for obj in page.get("Contents", []):
                if obj["Key"].rsplit(".", 1)[-1].lower() in AUDIO_EXTENSIONS:
                    yield ListedObject(parts.netloc, obj["Key"], int(obj["Size"]))
    except botocore.exceptions.ClientError as exc:
        raise _translate(exc, ObjectRef("s3", parts.netloc, parts.path.lstrip("/"))) from None

"""Storage stage: which URIs an event may name, and fetching their bytes from S3.

boto3 reads endpoint, region and credentials from the standard AWS environment
(``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, web
identity tokens, instance roles), so credentials never pass through moodstream's code or logs.

Only buckets on the allow-list can be read, and keys with path tricks are refused before any
request is made. One GET per object: its size is checked on the response's headers, before
the body is read (an object over the cap is never downloaded).
Throttling, 5xx and connection errors are retried by botocore's standard retry mode with
backoff; when those retries are spent the error is :class:`ServiceUnavailable` (the worker
waits and tries again) rather than a dead letter. This module is the one place botocore
errors are translated.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import Collection, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import botocore.exceptions
from botocore.config import Config

from pipeline.errors import (
    AccessDenied,
    BadEvent,
    ConfigError,
    NotFound,
    ServiceUnavailable,
    TooLarge,
    TrackError,
)

#: File extensions (lower case, no dot) that :func:`list_audio` treats as audio.
AUDIO_EXTENSIONS = frozenset({"mp3", "ogg", "oga", "opus", "flac", "wav", "m4a", "aac", "aif", "aiff", "wma"})
MAX_KEY_BYTES = 1024  # S3's own limit on a key, in UTF-8 bytes
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0  # longest silence on an open connection, not a cap on the whole download
# The worker fetches a batch concurrently from threads sharing one client; botocore's default
# pool of 10 would drop and reopen connections beyond that.
MAX_POOL_CONNECTIONS = 32

# C0 and C1 control characters, DEL, and backslash (a path separator to some consumers).
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
# Credentials that are wrong, expired or skewed fail every request alike: pausing the worker
# until they are fixed beats dead-lettering the whole stream as access_denied.
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
    }
)
_DENIED_CODES = frozenset({"403", "AccessDenied", "AllAccessDisabled", "InvalidObjectState"})
_OUTAGE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable", "InternalError"}
)


@dataclass(frozen=True)
class ObjectRef:
    """Where an event's audio is: an S3 object, or a local file in demos."""

    scheme: str  # "s3" or "file"
    bucket: str  # "" for a file
    key: str  # the S3 key exactly as stored, or a file's absolute path

    @property
    def uri(self) -> str:
        """A readable URI for messages (not percent-encoded)."""
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else f"file://{self.key}"


@dataclass(frozen=True)
class ListedObject:
    """One object found by :func:`list_audio`."""

    bucket: str
    key: str
    size: int  # bytes


def parse_uri(uri: str, *, allowed_buckets: Collection[str], allow_file_uris: bool) -> ObjectRef:
    """Check an event's audio URI and say where it points; raise :class:`BadEvent` if refused.

    ``s3://bucket/key`` follows the AWS CLI convention: the key is everything after the
    bucket's slash, verbatim (``?``, ``#``, ``%`` and spaces are part of it). Keys whose
    segments, as written or once percent-decoded, are empty, ``.`` or ``..`` are refused, as
    are control characters and backslashes: S3 would store them literally, but a consumer
    that normalises or decodes paths would not read the same object.

    ``file://`` URIs (RFC 8089, percent-encoded, e.g. from ``Path.as_uri()``) name an absolute
    local path and are accepted only when ``allow_file_uris`` is set (local demos).
    """
    if match := _UNSAFE_CHARS.search(uri):
        raise BadEvent(f"audio_uri has a control character or backslash ({match.group()!r})")
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme == "file":
        if not allow_file_uris:
            raise BadEvent("audio_uri: file:// URIs are not accepted (MOODSTREAM_ALLOW_FILE_URIS is off)")
        return _file_ref(uri)
    if scheme != "s3":
        raise BadEvent(f"audio_uri must be s3://bucket/key, got scheme {scheme or '(none)'!r}")
    bucket, _, key = rest.partition("/")
    if bucket not in allowed_buckets:
        raise BadEvent(f"audio_uri: bucket {bucket[:80]!r} is not in the allow-list")
    if not key:
        raise BadEvent(f"audio_uri {uri[:200]!r} has no object key")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise BadEvent(f"audio_uri: object key is longer than {MAX_KEY_BYTES} bytes")
    _check_segments(key, uri)
    return ObjectRef("s3", bucket, key)


def _file_ref(uri: str) -> ObjectRef:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise BadEvent(f"audio_uri {uri[:200]!r}: a file URI is file:///absolute/path, no host, query or fragment")
    if not parts.path.startswith("/"):
        raise BadEvent(f"audio_uri {uri[:200]!r}: a file URI needs an absolute path")
    _check_segments(parts.path[1:], uri)
    return ObjectRef("file", "", unquote(parts.path))


def _check_segments(path: str, uri: str) -> None:
    """Refuse path tricks in ``path`` as written and once percent-decoded."""
    decoded = unquote(path)
    if match := _UNSAFE_CHARS.search(decoded):
        raise BadEvent(f"audio_uri {uri[:200]!r} encodes a control character or backslash ({match.group()!r})")
    for form in (path, decoded):
        if any(segment in ("", ".", "..") for segment in form.split("/")):
            raise BadEvent(f"audio_uri {uri[:200]!r} has an empty, '.' or '..' path segment")


def make_s3_client(max_attempts: int = 5) -> Any:
    """An S3 client from the standard AWS environment; ``max_attempts`` counts the first try.

    botocore's standard retry mode retries throttling, 5xx and connection errors with
    exponential backoff and jitter; the client is thread-safe and meant to be shared.
    """
    config = Config(
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=MAX_POOL_CONNECTIONS,
    )
    return boto3.session.Session().client("s3", config=config)


def fetch(ref: ObjectRef, *, client: Any, max_bytes: int) -> bytes:
    """The object's bytes, at most ``max_bytes`` of them.

    Raises :class:`NotFound`, :class:`AccessDenied` or :class:`TooLarge` for this object, and
    :class:`ServiceUnavailable` when S3 (or its credentials) fail after the client's retries.
    Blocking: the worker calls :func:`fetch_async`.
    """
    if ref.scheme == "file":
        return _read_file(ref.key, max_bytes)
    try:
        # One GET, no HEAD first: the size is in the response's headers, so an object over the
        # cap is refused before its body is read (the connection is dropped unread). A HEAD
        # would cost a second request per track, and its errors carry no code (a denied object
        # and a bad credential both read "403"); a GET's error names the cause.
        response = client.get_object(Bucket=ref.bucket, Key=ref.key)
        with closing(response["Body"]) as body:
            # botocore then reads exactly ContentLength bytes (a short body is an error).
            _check_size(response["ContentLength"], max_bytes, ref)
            return body.read()
    except botocore.exceptions.ClientError as exc:
        raise translate_s3_error(exc, ref.uri) from None
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        raise ServiceUnavailable(f"S3 unreachable reading {ref.uri}: {exc}") from None


async def fetch_async(ref: ObjectRef, *, client: Any, max_bytes: int) -> bytes:
    """:func:`fetch` in a thread, so the event loop keeps serving the other tracks."""
    return await asyncio.to_thread(fetch, ref, client=client, max_bytes=max_bytes)


def _check_size(size: int, max_bytes: int, ref: ObjectRef) -> None:
    if size > max_bytes:
        raise TooLarge(f"{ref.uri} is {size} bytes, more than the {max_bytes} allowed")


def _read_file(path: str, max_bytes: int) -> bytes:
    """A local file's bytes, under the same cap as an S3 object."""
    try:
        info = os.stat(path)
        # Only regular files: a FIFO would block the thread and a device never ends.
        if not stat.S_ISREG(info.st_mode):
            raise NotFound(f"file://{path} is not a regular file")
        if info.st_size > max_bytes:
            raise TooLarge(f"file://{path} is {info.st_size} bytes, more than the {max_bytes} allowed")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"file://{path} does not exist") from None
    except PermissionError:
        raise AccessDenied(f"file://{path}: permission denied") from None
    except OSError as exc:
        raise TrackError(f"file://{path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise TooLarge(f"file://{path} grew past the {max_bytes} bytes allowed while being read")
    return data


def translate_s3_error(exc: botocore.exceptions.ClientError, where: str) -> TrackError | ServiceUnavailable:
    """The moodstream error for an S3 error response (retries, if any, already spent)."""
    code = _error_code(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in _NOT_FOUND_CODES:
        return NotFound(f"{where} does not exist ({code})")
    if code in _CREDENTIAL_CODES:
        return ServiceUnavailable(f"{where}: S3 refused our credentials ({code})")
    if code in _DENIED_CODES:
        return AccessDenied(f"{where}: access denied ({code})")
    if code in _OUTAGE_CODES or status == 429 or status >= 500:
        return ServiceUnavailable(f"{where}: S3 answered {code} (HTTP {status}) after retries")
    # Any other refusal is specific to this request; dead-letter it with S3's own words.
    return TrackError(f"{where}: S3 refused the request: {code} (HTTP {status})")


def _error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def local_audio_files(folder: Path) -> list[Path]:
    """Every audio file (by :data:`AUDIO_EXTENSIONS`) under ``folder``, recursively, sorted;
    symbolic links are followed (music libraries are often link farms)."""
    found = []
    for dirpath, _, names in os.walk(folder, followlinks=True):
        found += [Path(dirpath) / n for n in names if Path(n).suffix.lower().lstrip(".") in AUDIO_EXTENSIONS]
    return sorted(p for p in found if p.is_file())


def list_audio(prefix_uri: str, *, client: Any, page_size: int = 1000) -> Iterator[ListedObject]:
    """Every audio object (by :data:`AUDIO_EXTENSIONS`) under ``s3://bucket/prefix``.

    Pages through ListObjectsV2 lazily, ``page_size`` keys per request, in key order. A
    malformed prefix URI raises :class:`ConfigError` at the call; S3's errors raise what
    :func:`fetch` raises, while iterating.
    """
    scheme, _, rest = prefix_uri.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme.lower() != "s3" or not bucket:
        raise ConfigError(f"expected s3://bucket/prefix, got {prefix_uri!r}")
    return _list_audio(client, bucket, prefix, page_size, prefix_uri)


def _list_audio(client: Any, bucket: str, prefix: str, page_size: int, where: str) -> Iterator[ListedObject]:
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
    )
    try:
        for page in pages:
            for obj in page.get("Contents", []):
                if PurePosixPath(obj["Key"]).suffix.lower().lstrip(".") in AUDIO_EXTENSIONS:
                    yield ListedObject(bucket, obj["Key"], int(obj["Size"]))
    except botocore.exceptions.ClientError as exc:
        raise translate_s3_error(exc, where) from None
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        raise ServiceUnavailable(f"S3 unreachable listing {where}: {exc}") from None

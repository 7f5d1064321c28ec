"""Event contracts: the records on ``tracks.ingested``, ``tracks.moods`` and the dead-letter topic.

The JSON Schemas in ``pipeline/schemas/`` are shipped for consumers and are what the input is
validated against; this module adds what a schema cannot say (URI rules, timestamps) and
builds the output records. It knows nothing about Kafka clients; topic names are settings.

Outputs are deterministic per (track_id, model name, model version) apart from
``processed_at`` and ``latency_ms``, so a consumer that sees a track twice (at-least-once
delivery) can keep either copy.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from pipeline.errors import BadEvent, TrackError
from pipeline.storage import ObjectRef, parse_uri

SCHEMA_DIR = Path(__file__).with_name("schemas")
SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 64 * 1024


def load_schema(name: str) -> dict[str, Any]:
    """A shipped schema by file stem, e.g. ``track_moods.v1``."""
    return json.loads((SCHEMA_DIR / f"{name}.json").read_text())


@lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(name))


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str


@dataclass(frozen=True)
class TrackIngested:
    track_id: str
    audio_uri: str
    content_type: str | None
    size_bytes: int | None
    ingested_at: datetime | None
    correlation_id: str | None
    ref: ObjectRef  # the checked audio_uri
    raw: bytes = field(repr=False)  # the record as received, for its dead letter


def parse_ingested(raw: bytes, *, allow_file_uris: bool, allowed_buckets: tuple[str, ...] | list[str]) -> TrackIngested:
    """Validate one ``tracks.ingested`` value; raise :class:`BadEvent` saying what is wrong."""
    if raw is None:
        raise BadEvent("empty record (no value)")
    if len(raw) > MAX_EVENT_BYTES:
        raise BadEvent(f"event is {len(raw)} bytes, more than {MAX_EVENT_BYTES}")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadEvent(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadEvent(f"event must be a JSON object, got {type(doc).__name__}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise BadEvent(f"unknown schema_version {doc.get('schema_version')!r}; this worker reads {SCHEMA_VERSION}")
    error = next(iter(sorted(_validator("track_ingested.v1").iter_errors(doc), key=lambda e: list(e.path))), None)
    if error is not None:
        where = "/".join(map(str, error.path)) or "event"
        raise BadEvent(f"{where}: {error.message[:300]}")
    ref = parse_uri(doc["audio_uri"], allowed_buckets=allowed_buckets, allow_file_uris=allow_file_uris)
    return TrackIngested(
        track_id=doc["track_id"],
        audio_uri=doc["audio_uri"],
        content_type=doc.get("content_type"),
        size_bytes=doc.get("size_bytes"),
        ingested_at=_timestamp(doc.get("ingested_at")),
        correlation_id=doc.get("correlation_id"),
        ref=ref,
        raw=raw,
    )


def track_id_of(raw: bytes | None) -> str | None:
    """The track id of a (possibly invalid) event if it has a usable one, for its dead letter."""
    try:
        doc = json.loads(raw or b"")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    track_id = doc.get("track_id") if isinstance(doc, dict) else None
    return track_id if isinstance(track_id, str) and 0 < len(track_id) <= 256 else None


def _timestamp(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadEvent(f"ingested_at is not an RFC 3339 timestamp: {value[:64]!r}") from None
    if parsed.tzinfo is None:
        raise BadEvent("ingested_at needs a time zone (e.g. a trailing Z)")
    return parsed


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()


def ingested_record(*, track_id: str, audio_uri: str, size_bytes: int | None = None, content_type: str | None = None, ingested_at: datetime | None = None, correlation_id: str | None = None) -> bytes:
    """A ``tracks.ingested`` value, as producers (and ``moodstream publish``) write it."""
    return _dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "track_id": track_id,
            "audio_uri": audio_uri,
            "size_bytes": size_bytes,
            "content_type": content_type,
            "ingested_at": _iso(ingested_at),
            "correlation_id": correlation_id,
        }
    )


@dataclass(frozen=True)
class TrackMoods:
    """A ``tracks.moods`` value; the mood fields come from :func:`pipeline.tagging.describe`."""

    track_id: str
    model: ModelRef
    tags: dict[str, float]
    top_tags: list[dict[str, Any]]
    moods: dict[str, float]
    top_moods: list[dict[str, Any]]
    timeline: list[dict[str, Any]]
    duration_s: float
    analysed_s: float
    patches: int
    decoder: str
    processed_at: datetime
    latency_ms: dict[str, float]
    correlation_id: str | None = None
    ingested_at: datetime | None = None

    def to_json(self) -> bytes:
        return _dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "track_id": self.track_id,
                "model": {"name": self.model.name, "version": self.model.version},
                "tags": self.tags,
                "top_tags": self.top_tags,
                "moods": self.moods,
                "top_moods": self.top_moods,
                "timeline": self.timeline,
                "duration_s": self.duration_s,
                "analysed_s": self.analysed_s,
                "patches": self.patches,
                "decoder": self.decoder,
                "processed_at": _iso(self.processed_at),
                "latency_ms": self.latency_ms,
                "correlation_id": self.correlation_id,
                "ingested_at": _iso(self.ingested_at),
            }
        )


def dead_letter(raw: bytes | None, error: TrackError, *, attempts: int, model: ModelRef | None, track_id: str | None) -> bytes:
    """A ``tracks.moods.dlq`` value keeping the original event byte for byte."""
    raw = raw or b""
    try:
        original, encoding = raw.decode("utf-8"), "text"
    except UnicodeDecodeError:
        original, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    return _dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "track_id": track_id,
            "reason": error.reason,
            "message": str(error)[:2000],
            "attempts": attempts,
            "original": original,
            "original_encoding": encoding,
            "failed_at": _iso(datetime.now(timezone.utc)),
            "model": None if model is None else {"name": model.name, "version": model.version},
        }
    )


def original_bytes(record: dict[str, Any]) -> bytes:
    """The original event of a parsed dead-letter record, ready to be produced again (replay)."""
    if record["original_encoding"] == "base64":
        return base64.b64decode(record["original"])
    return record["original"].encode("utf-8")

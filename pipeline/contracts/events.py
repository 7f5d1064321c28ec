"""Event contracts: the records on the input, output and dead-letter topics.

The JSON Schemas in ``pipeline/contracts/schemas/`` (draft 2020-12) are shipped for consumers and are
what the input is validated against; this module adds what a schema cannot say (the URI rules
of :func:`pipeline.stages.storage.parse_uri`, RFC 3339 timestamps, strict JSON) and builds the output
and dead-letter records. It knows nothing about Kafka clients; topic names are settings.

Outputs on ``tracks.moods`` are schema version 3 (``track_moods.v3.json``; docs/events.md says
what changed since versions 1 and 2); ingestion events and dead letters are version 1.

Delivery is at least once, so a track can be tagged twice. An output is deterministic per
(track_id, model name, model version) except ``processed_at`` and ``latency_ms``, which
describe the run, and ``correlation_id`` and ``ingested_at``, which echo the announcing event:
consumers deduplicate on (record key, model name, model version) and may keep either copy.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import jsonschema
import jsonschema.exceptions

from pipeline.errors import BadEvent, TrackError
from pipeline.stages.storage import ObjectRef, parse_uri

#: The shipped JSON Schemas (package data, read through importlib.resources).
SCHEMA_DIR = resources.files(__package__).joinpath("schemas")
SCHEMA_VERSION = 1  # tracks.ingested and tracks.moods.dlq
MOODS_SCHEMA_VERSION = 3  # tracks.moods
MAX_EVENT_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 2000  # of a dead letter's message; the schema says the same


def load_schema(name: str) -> dict[str, Any]:
    """A shipped schema by file stem: ``track_ingested.v1``, ``track_moods.v2`` (``.v1``, the
    previous output format) or ``track_dead_letter.v1``."""
    return json.loads((SCHEMA_DIR / f"{name}.json").read_text(encoding="utf-8"))


_INGESTED = jsonschema.Draft202012Validator(load_schema("track_ingested.v1"))
# Python's ``re.search`` lets ``$`` match before a trailing newline, which ECMA-262 consumers
# would refuse; the pattern is applied again with fullmatch.
_TRACK_ID = re.compile(_INGESTED.schema["properties"]["track_id"]["pattern"])
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


@dataclass(frozen=True)
class ModelRef:
    """The served model an output or dead letter came from, and the networks it ran."""

    name: str
    version: str
    networks: tuple[tuple[str, str], ...] = ()  # (name, version) of each network


@dataclass(frozen=True)
class TrackIngested:
    """A valid ``tracks.ingested`` event."""

    track_id: str
    audio_uri: str
    ref: ObjectRef  # audio_uri, checked against the allow-list
    content_type: str | None
    size_bytes: int | None  # as announced; the fetch asks S3 for the real size
    ingested_at: datetime | None  # time-zone aware
    correlation_id: str | None
    raw: bytes = field(repr=False)  # the value as received, for its dead letter
    title: str | None = None  # as the producer gave them: text, passed through to the record
    artist: str | None = None


def parse_ingested(raw: bytes | None, *, allow_file_uris: bool, allowed_buckets: Collection[str]) -> TrackIngested:
    """Validate one ``tracks.ingested`` value; raise :class:`BadEvent` saying what is wrong.

    ``raw`` is None for a Kafka record without a value (a tombstone).
    """
    if raw is None:
        raise BadEvent("record has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise BadEvent(f"event is {len(raw)} bytes, more than the {MAX_EVENT_BYTES} allowed")
    doc = _loads_strict(raw)
    if not isinstance(doc, dict):
        raise BadEvent(f"event must be a JSON object, got {_json_type(doc)}")
    version = doc.get("schema_version")
    if isinstance(version, (int, float)) and not isinstance(version, bool) and version != SCHEMA_VERSION:
        raise BadEvent(f"unknown schema_version {version!r}: this worker reads version {SCHEMA_VERSION}")
    _check_schema(doc)
    ref = parse_uri(doc["audio_uri"], allowed_buckets=allowed_buckets, allow_file_uris=allow_file_uris)
    return TrackIngested(
        track_id=doc["track_id"],
        audio_uri=doc["audio_uri"],
        ref=ref,
        content_type=doc.get("content_type"),
        size_bytes=doc.get("size_bytes"),
        ingested_at=_parse_timestamp(doc.get("ingested_at"), "ingested_at"),
        correlation_id=doc.get("correlation_id"),
        raw=raw,
        title=doc.get("title"),
        artist=doc.get("artist"),
    )


def _check_schema(doc: dict[str, Any]) -> None:
    error = jsonschema.exceptions.best_match(_INGESTED.iter_errors(doc))
    if error is not None:
        raise BadEvent(f"{error.json_path}: {_shorten(error.message)}")
    if not _TRACK_ID.fullmatch(doc["track_id"]):
        raise BadEvent(f"$.track_id: {doc['track_id'][:80]!r} does not match {_TRACK_ID.pattern!r}")


def _shorten(message: str, limit: int = 300) -> str:
    # jsonschema puts the offending value's repr first and the broken rule last: keep both.
    if len(message) <= limit:
        return message
    return f"{message[: limit // 2]}...{message[-limit // 2 :]}"


def track_id_of(raw: bytes | None) -> str | None:
    """The track id of a (possibly invalid) event if it has a valid one, for its dead letter."""
    try:
        doc = _loads_strict(raw or b"")
    except BadEvent:
        return None
    track_id = doc.get("track_id") if isinstance(doc, dict) else None
    if isinstance(track_id, str) and len(track_id) <= 256 and _TRACK_ID.fullmatch(track_id):
        return track_id
    return None


def ingested_record(
    *,
    track_id: str,
    audio_uri: str,
    size_bytes: int | None = None,
    content_type: str | None = None,
    ingested_at: datetime | None = None,
    correlation_id: str | None = None,
    title: str | None = None,
    artist: str | None = None,
) -> bytes:
    """A ``tracks.ingested`` value, as producers (and ``moodstream publish``) write it; ``title``
    and ``artist`` only when given (older workers ignore them)."""
    doc = {
        "schema_version": SCHEMA_VERSION,
        "track_id": track_id,
        "audio_uri": audio_uri,
        "size_bytes": size_bytes,
        "content_type": content_type,
        "ingested_at": _format_timestamp(ingested_at),
        "correlation_id": correlation_id,
    }
    for name, value in (("title", title), ("artist", artist)):
        if value is not None:
            doc[name] = value
    return _dumps(doc)


@dataclass(frozen=True)
class TrackMoods:
    """A ``tracks.moods`` value (schema version 3); ``analysis`` holds the fields that
    :func:`pipeline.stages.analysis.describe` computes (tags, moods, plane, timeline, embeddings, audio).

    Scores are in [0, 1]; valence and arousal in [-1, 1]; times in seconds; ``latency_ms`` maps
    a stage name (fetch, decode, features, inference, total) to its wall time in milliseconds.
    """

    track_id: str
    model: ModelRef
    analysis: dict[str, Any]
    processed_at: datetime
    latency_ms: dict[str, float]
    correlation_id: str | None = None
    ingested_at: datetime | None = None
    title: str | None = None
    artist: str | None = None
    audio_uri: str | None = None  # the announced object, for players; None for an upload

    def to_json(self) -> bytes:
        """The record: compact JSON, keys sorted; raises ValueError on a NaN or infinity."""
        return _dumps(
            {
                **self.analysis,
                "schema_version": MOODS_SCHEMA_VERSION,
                "track_id": self.track_id,
                "model": {
                    **_model(self.model),
                    "networks": [{"name": n, "version": v} for n, v in self.model.networks],
                },
                "processed_at": _format_timestamp(self.processed_at),
                "latency_ms": self.latency_ms,
                "correlation_id": self.correlation_id,
                "ingested_at": _format_timestamp(self.ingested_at),
                "title": self.title,
                "artist": self.artist,
                "audio_uri": self.audio_uri,
            }
        )


def dead_letter(
    raw: bytes | None, error: TrackError, *, attempts: int, model: ModelRef | None, track_id: str | None
) -> bytes:
    """A ``tracks.moods.dlq`` value: why ``raw`` failed, keeping ``raw`` itself.

    ``original`` is the parsed event when ``raw`` is strict JSON, its text when it is UTF-8
    but not JSON, and base64 of its bytes otherwise, as ``original_encoding`` says; a record
    without a value is kept as empty text. :func:`original_bytes` gives it back for replay.
    """
    raw = raw or b""
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "track_id": track_id,
        "reason": error.reason,
        "message": str(error)[:MAX_MESSAGE_CHARS],
        "attempts": attempts,
        "failed_at": _format_timestamp(datetime.now(UTC)),
        "model": None if model is None else _model(model),
    }
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _dumps({**record, "original": base64.b64encode(raw).decode("ascii"), "original_encoding": "base64"})
    try:
        return _dumps({**record, "original": _loads_strict(raw), "original_encoding": "json"})
    except (BadEvent, RecursionError):
        # Not JSON, or JSON nested so deep that it parses alone but not inside the record.
        return _dumps({**record, "original": text, "original_encoding": "text"})


def original_bytes(record: dict[str, Any]) -> bytes:
    """The original event of a parsed dead-letter record, to produce again (replay).

    Exact bytes for text and base64 originals; for JSON ones an equivalent event (same
    values, compact and with sorted keys).
    """
    original, encoding = record["original"], record["original_encoding"]
    if encoding == "base64":
        return base64.b64decode(original)
    if encoding == "json":
        return _dumps(original)
    return original.encode("utf-8")


def _loads_strict(raw: bytes) -> Any:
    """Parse RFC 8259 JSON from UTF-8, refusing what parsers disagree on: NaN and infinite
    numbers, and duplicate keys (each consumer would pick a different value)."""
    try:
        return json.loads(
            raw.decode("utf-8"),
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except UnicodeDecodeError as exc:
        raise BadEvent(f"not JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise BadEvent(f"not JSON: {exc}") from None
    except RecursionError:
        raise BadEvent("not JSON: nested too deeply") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key[:80]!r}")
        seen.add(key)
    return dict(pairs)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _parse_timestamp(value: str | None, name: str) -> datetime | None:
    """An RFC 3339 timestamp with a time zone (``Z`` or an offset); fractions past
    microseconds are dropped."""
    if value is None:
        return None
    if not _RFC3339.fullmatch(value):
        raise BadEvent(
            f"$.{name}: {value[:64]!r} is not an RFC 3339 timestamp with a time zone (e.g. 2026-01-02T03:04:05Z)"
        )
    try:
        return datetime.fromisoformat(value.upper())
    except ValueError as exc:
        raise BadEvent(f"$.{name}: {value[:64]!r}: {exc}") from None


def _format_timestamp(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z``, from a time-zone aware datetime."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment}: give it a time zone")
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _model(model: ModelRef) -> dict[str, str]:
    return {"name": model.name, "version": model.version}


def _dumps(doc: Any) -> bytes:
    # Sorted keys and fixed separators make equal records equal bytes.
    return json.dumps(doc, sort_keys=True, allow_nan=False, separators=(",", ":")).encode("ascii")

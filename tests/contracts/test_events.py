"""Event contracts: what the input accepts and refuses, and that outputs match the shipped schemas."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import jsonschema
import pytest

from pipeline import errors
from pipeline.contracts import events

ALLOWED = ("music",)
FORMATS = jsonschema.FormatChecker()


def parse(doc, *, files: bool = False) -> events.TrackIngested:
    raw = doc if isinstance(doc, bytes) or doc is None else json.dumps(doc).encode()
    return events.parse_ingested(raw, allow_file_uris=files, allowed_buckets=ALLOWED)


def valid(**over) -> dict:
    return {"schema_version": 1, "track_id": "t-1", "audio_uri": "s3://music/a/b.mp3", **over}


def validate(record: bytes, schema: str) -> dict:
    doc = json.loads(record)
    jsonschema.Draft202012Validator(events.load_schema(schema), format_checker=FORMATS).validate(doc)
    return doc


# --- schemas ----------------------------------------------------------------------------------


def test_shipped_schemas_are_valid_draft_2020_12():
    names = sorted(p.name.removesuffix(".json") for p in events.SCHEMA_DIR.iterdir() if p.name.endswith(".json"))
    assert names == ["track_dead_letter.v1", "track_ingested.v1", "track_moods.v1", "track_moods.v2", "track_moods.v3"]
    for name in names:
        schema = events.load_schema(name)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(schema)


def test_dead_letter_reasons_are_exactly_the_error_codes():
    assert events.load_schema("track_dead_letter.v1")["properties"]["reason"]["enum"] == list(errors.REASONS)


# --- input ------------------------------------------------------------------------------------


def test_round_trip_of_an_announcement():
    at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    raw = events.ingested_record(
        track_id="t-1",
        audio_uri="s3://music/x y.mp3",
        size_bytes=12,
        content_type="audio/mpeg",
        ingested_at=at,
        correlation_id="c",
    )
    validate(raw, "track_ingested.v1")
    event = events.parse_ingested(raw, allow_file_uris=False, allowed_buckets=ALLOWED)
    assert (event.track_id, event.audio_uri, event.size_bytes, event.content_type, event.correlation_id) == (
        "t-1",
        "s3://music/x y.mp3",
        12,
        "audio/mpeg",
        "c",
    )
    assert event.ref == events.ObjectRef("s3", "music", "x y.mp3")
    assert event.ingested_at == at and event.raw == raw


def test_minimal_event_has_no_optional_fields():
    event = parse(valid())
    assert (event.content_type, event.size_bytes, event.ingested_at, event.correlation_id) == (None, None, None, None)


def test_unknown_fields_are_tolerated():
    assert parse(valid(genre="jazz", extra={"nested": [1, {"deep": None}]})).track_id == "t-1"


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02t03:04:05z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T05:04:05.5+02:00", datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)),
        ("2026-01-02T03:04:05.123456789Z", datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
    ],
)
def test_rfc3339_timestamps_are_accepted(stamp, expected):
    assert parse(valid(ingested_at=stamp)).ingested_at == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "no value"),
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (json.dumps(valid()).encode("utf-16"), "not UTF-8"),
        (b"[1, 2]", "JSON object, got an array"),
        (b"null", "JSON object, got null"),
        (b'"s3://music/a.mp3"', "JSON object, got a string"),
        (b'{"schema_version": 1, "track_id": "t", "audio_uri": NaN}', "NaN is not a JSON number"),
        (b'{"schema_version": 1, "track_id": "t", "audio_uri": "s3://music/a.mp3", "x": 1e400}', "out of range"),
        (
            b'{"schema_version": 1, "track_id": "t", "audio_uri": "s3://music/a.mp3", "audio_uri": "s3://other/a.mp3"}',
            "duplicate key 'audio_uri'",
        ),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (json.dumps(valid(schema_version=2)).encode(), "unknown schema_version 2"),
        (json.dumps(valid(schema_version=0)).encode(), "unknown schema_version 0"),
        (
            json.dumps({"track_id": "t", "audio_uri": "s3://music/a.mp3"}).encode(),
            "'schema_version' is a required property",
        ),
        (json.dumps(valid(schema_version="1")).encode(), r"\$.schema_version"),
        (json.dumps(valid(schema_version=True)).encode(), r"\$.schema_version"),
        (
            json.dumps({"schema_version": 1, "audio_uri": "s3://music/a.mp3"}).encode(),
            "'track_id' is a required property",
        ),
        (json.dumps({"schema_version": 1, "track_id": "t"}).encode(), "'audio_uri' is a required property"),
        (json.dumps(valid(track_id=42)).encode(), r"\$.track_id: 42 is not of type 'string'"),
        (json.dumps(valid(track_id="")).encode(), r"\$.track_id"),
        (json.dumps(valid(track_id="a b")).encode(), r"\$.track_id"),
        (json.dumps(valid(track_id="t\n")).encode(), r"\$.track_id"),
        (json.dumps(valid(track_id="../t")).encode(), r"\$.track_id"),
        (json.dumps(valid(track_id="t" * 257)).encode(), r"\$.track_id"),
        (json.dumps(valid(audio_uri=["s3://music/a.mp3"])).encode(), r"\$.audio_uri"),
        (json.dumps(valid(audio_uri="")).encode(), r"\$.audio_uri"),
        (json.dumps(valid(content_type=5)).encode(), r"\$.content_type"),
        (json.dumps(valid(size_bytes=-1)).encode(), r"\$.size_bytes"),
        (json.dumps(valid(size_bytes="12")).encode(), r"\$.size_bytes"),
        (json.dumps(valid(size_bytes=1.5)).encode(), r"\$.size_bytes"),
        (json.dumps(valid(correlation_id=7)).encode(), r"\$.correlation_id"),
        (json.dumps(valid(ingested_at=1767225600)).encode(), r"\$.ingested_at"),
        (json.dumps(valid(ingested_at="yesterday")).encode(), r"\$.ingested_at: 'yesterday' is not an RFC 3339"),
        (json.dumps(valid(ingested_at="2026-01-01T00:00:00")).encode(), "time zone"),
        (json.dumps(valid(ingested_at="2026-01-01 00:00:00Z")).encode(), "RFC 3339"),
        (json.dumps(valid(ingested_at="2026-13-01T00:00:00Z")).encode(), "month must be in 1..12"),
        (json.dumps(valid(track_id=[[[["deep"]]]])).encode(), r"\$.track_id"),
    ],
)
def test_bad_events_are_refused_with_a_precise_message(raw, message):
    with pytest.raises(errors.BadEvent, match=message) as caught:
        parse(raw)
    assert caught.value.reason == "bad_event"


def test_a_deeply_nested_value_where_a_string_belongs_is_a_bad_event():
    raw = b'{"schema_version": 1, "audio_uri": "s3://music/a.mp3", "track_id": ' + b"[" * 980 + b"]" * 980 + b"}"
    with pytest.raises(errors.BadEvent):
        parse(raw)


def test_size_limit_is_64_kib():
    def padded(total: int) -> bytes:
        head = json.dumps(valid(pad="")).encode()
        return head[:-2] + b"x" * (total - len(head)) + head[-2:]

    assert parse(padded(events.MAX_EVENT_BYTES)).track_id == "t-1"
    with pytest.raises(errors.BadEvent, match=r"65537 bytes, more than the 65536 allowed"):
        parse(padded(events.MAX_EVENT_BYTES + 1))


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://music/a.mp3", "scheme 'http'"),
        ("https://music.s3.amazonaws.com/a.mp3", "scheme 'https'"),
        ("ftp://music/a.mp3", "scheme 'ftp'"),
        ("/etc/passwd", r"scheme '\(none\)'"),
        ("music/a.mp3", r"scheme '\(none\)'"),
        ("s3://other/a.mp3", "bucket 'other' is not in the allow-list"),
        ("s3://user:pw@music/a.mp3", "not in the allow-list"),
        ("s3://music:443/a.mp3", "not in the allow-list"),
        ("s3:///music/a.mp3", "bucket '' is not in the allow-list"),
        ("s3://music", "no object key"),
        ("s3://music/", "no object key"),
        ("s3://music/" + "k" * 1025, "longer than 1024 bytes"),
        ("s3://music/../secret/a.mp3", "'..' path segment"),
        ("s3://music/a/../../b.mp3", "'..' path segment"),
        ("s3://music/a/./b.mp3", "'..' path segment"),
        ("s3://music/a/..", "'..' path segment"),
        ("s3://music//a.mp3", "empty"),
        ("s3://music/a//b.mp3", "empty"),
        ("s3://music/a/", "empty"),
        ("s3://music/a/%2e%2e/b.mp3", "'..' path segment"),
        ("s3://music/a/%2E%2E/b.mp3", "'..' path segment"),
        ("s3://music/a%2F..%2Fb.mp3", "'..' path segment"),
        ("s3://music/a\\b.mp3", "backslash"),
        ("s3://music/a%5Cb.mp3", "encodes a control character or backslash"),
        ("s3://music/a\x00.mp3", "control character"),
        ("s3://music/a%00.mp3", "encodes a control character"),
        ("s3://music/a\n.mp3", "control character"),
        ("s3://music/a%0d%0a.mp3", "encodes a control character"),
        ("s3://music/a\x7f.mp3", "control character"),
        ("s3://music/a\x85.mp3", "control character"),
        ("file:///etc/passwd", "file:// URIs are not accepted"),
    ],
)
def test_uris_outside_the_allow_list_or_with_tricks_are_bad_events(uri, message):
    with pytest.raises(errors.BadEvent, match=message):
        parse(valid(audio_uri=uri))


@pytest.mark.parametrize(
    ("uri", "key"),
    [
        ("s3://music/a b/c.mp3", "a b/c.mp3"),
        ("s3://music/100%.mp3", "100%.mp3"),
        ("s3://music/a%20b.mp3", "a%20b.mp3"),  # keys are verbatim, as in the AWS CLI
        ("s3://music/Track #1?.mp3", "Track #1?.mp3"),
        ("s3://music/Björk/Jóga.flac", "Björk/Jóga.flac"),
        ("s3://music/a..b/.hidden.mp3", "a..b/.hidden.mp3"),
        ("S3://music/a.mp3", "a.mp3"),
    ],
)
def test_s3_keys_are_taken_verbatim(uri, key):
    assert parse(valid(audio_uri=uri)).ref == events.ObjectRef("s3", "music", key)


def test_file_uris_only_when_allowed(tmp_path):
    path = tmp_path / "a b.wav"
    assert parse(valid(audio_uri=path.as_uri()), files=True).ref == events.ObjectRef("file", "", str(path))
    assert parse(valid(audio_uri="file://localhost/tmp/a.wav"), files=True).ref.key == "/tmp/a.wav"
    with pytest.raises(errors.BadEvent, match="not accepted"):
        parse(valid(audio_uri=path.as_uri()))


@pytest.mark.parametrize(
    "uri",
    [
        "file:///tmp/../etc/passwd",
        "file:///tmp/a%2F..%2Fb.wav",
        "file:///tmp//a.wav",
        "file://host/tmp/a.wav",
        "file:///tmp/a.wav?x=1",
        "file:///tmp/a%00.wav",
        "file:tmp/a.wav",
    ],
)
def test_file_uris_with_tricks_are_bad_events(uri):
    with pytest.raises(errors.BadEvent):
        parse(valid(audio_uri=uri), files=True)


def test_track_id_of_a_bad_event_is_kept_when_valid():
    assert events.track_id_of(json.dumps(valid(audio_uri="http://x")).encode()) == "t-1"
    assert events.track_id_of(b"{oops") is None
    assert events.track_id_of(None) is None
    assert events.track_id_of(b'{"track_id": 5}') is None
    assert events.track_id_of(b'{"track_id": "a b"}') is None
    assert events.track_id_of(b"[1]") is None


# --- output -----------------------------------------------------------------------------------


LEAD = {"mood": "happy", "confidence": 0.9, "clear": True}


def moods_record(
    model: events.ModelRef | None = None,
    processed_at: datetime | None = None,
    latency_ms: dict | None = None,
    correlation_id: str | None = "corr-7",
    ingested_at: datetime | None = datetime(2026, 1, 1, 11, 59, tzinfo=UTC),
    **over,
) -> events.TrackMoods:
    analysis = dict(
        tags={"musicnn_msd": {"happy": 0.5, "sad": 0.125, "rock": 1.0}, "musicnn_mtt": {"fast": 0.25}},
        top_tags={
            "musicnn_msd": [{"tag": "rock", "score": 1.0}, {"tag": "happy", "score": 0.5}],
            "musicnn_mtt": [{"tag": "fast", "score": 0.25}],
        },
        mood_source="tags",
        moods={"happy": 0.9, "sad": 0.125},
        top_moods=[{"mood": "happy", "score": 0.9}],
        leading_mood=LEAD,
        valence=0.5,
        arousal=-0.25,
        quadrant="relaxed",
        quadrant_probabilities=None,
        mood_percentiles={"happy": 0.9, "sad": 0.125},
        timeline=[
            {
                "start_s": 0.0,
                "end_s": 30.0,
                "moods": {"happy": 0.95, "sad": 0.1},
                "top_moods": [{"mood": "happy", "score": 0.95}],
                "leading_mood": LEAD,
                "valence": 0.6,
                "arousal": 0.1,
                "quadrant": "happy",
                "quadrant_probabilities": None,
            },
            {
                "start_s": 30.0,
                "end_s": 42.5,
                "moods": {"happy": 0.5, "sad": 0.3},
                "top_moods": [],
                "leading_mood": {**LEAD, "clear": False, "confidence": 0.5},
                "valence": -0.1,
                "arousal": -0.2,
                "quadrant": "sad",
                "quadrant_probabilities": None,
            },
        ],
        audio_features=None,
        embeddings={"musicnn_msd": {"dim": 2, "dtype": "float16", "data": "ADwAQA=="}},
        duration_s=42.5,
        analysed_s=42.0,
        patches=14,
        decoder="pyav",
    )
    return events.TrackMoods(
        track_id="t-1",
        model=model or events.ModelRef("musicnn", "3+cal.0123abcd", (("musicnn_msd", "1"), ("musicnn_mtt", "1"))),
        analysis={**analysis, **over},
        processed_at=processed_at or datetime(2026, 1, 1, 12, 0, 0, 250000, tzinfo=UTC),
        latency_ms=latency_ms or {"fetch": 10.0, "decode": 20.5, "features": 3.0, "inference": 40.0, "total": 80.0},
        correlation_id=correlation_id,
        ingested_at=ingested_at,
    )


def test_output_validates_against_the_shipped_schema():
    doc = validate(moods_record().to_json(), "track_moods.v3")
    assert doc["schema_version"] == 3
    assert doc["model"] == {
        "name": "musicnn",
        "version": "3+cal.0123abcd",
        "networks": [{"name": "musicnn_msd", "version": "1"}, {"name": "musicnn_mtt", "version": "1"}],
    }
    assert doc["processed_at"] == "2026-01-01T12:00:00.250000Z" and doc["ingested_at"] == "2026-01-01T11:59:00Z"
    assert set(doc) == set(events.load_schema("track_moods.v3")["required"])
    nulls = validate(moods_record(correlation_id=None, ingested_at=None).to_json(), "track_moods.v3")
    assert nulls["correlation_id"] is None and nulls["ingested_at"] is None
    assert nulls["title"] is None and nulls["artist"] is None
    assert validate(moods_record(embeddings={}).to_json(), "track_moods.v3")["embeddings"] == {}


def test_a_v1_consumer_validating_its_schema_is_told_the_version_changed():
    doc = json.loads(moods_record().to_json())
    errors_seen = [
        (list(e.path), e.message)
        for e in jsonschema.Draft202012Validator(events.load_schema("track_moods.v1")).iter_errors(doc)
    ]
    assert (["schema_version"], "1 was expected") in errors_seen


def test_output_is_deterministic_but_for_the_run_fields():
    first = moods_record()
    again = moods_record(
        processed_at=first.processed_at + timedelta(hours=1),
        latency_ms={"total": 5.0},
        tags={
            k: dict(reversed(v.items())) for k, v in reversed(first.analysis["tags"].items())
        },  # insertion order must not matter
    )
    assert first.to_json() == moods_record().to_json()
    a, b = json.loads(first.to_json()), json.loads(again.to_json())
    assert a != b
    for doc in (a, b):
        del doc["processed_at"], doc["latency_ms"]
    assert a == b
    raw = first.to_json()
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "over",
    [
        {"tags": {"musicnn_msd": {"happy": 1.5}}},
        {"decoder": "ffmpeg"},
        {"patches": 0},
        {"top_moods": [{"mood": "happy"}]},
        {"latency_ms": {"fetch": 1.0}},
        {"valence": 1.5},
        {"quadrant": "calm"},
        {"leading_mood": {"mood": "happy", "confidence": 0.9}},
        {"embeddings": {"musicnn_msd": {"dim": 2, "dtype": "float32", "data": "AA=="}}},
    ],
)
def test_schema_catches_a_broken_output(over):
    latency = over.pop("latency_ms", None)
    with pytest.raises(jsonschema.ValidationError):
        validate(moods_record(latency_ms=latency, **over).to_json(), "track_moods.v3")


def test_output_refuses_nan_and_naive_times():
    with pytest.raises(ValueError):
        moods_record(valence=float("nan")).to_json()
    with pytest.raises(ValueError):
        moods_record(processed_at=datetime(2026, 1, 1)).to_json()


# --- dead letters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "encoding"),
    [
        (b"\xff\x00garbage\x80", "base64"),
        (bytes(range(256)), "base64"),
        (b"{not json", "text"),
        (b'{"a": NaN}', "text"),
        ("caf\u00e9 \u266b".encode(), "text"),
        (b"", "text"),
    ],
)
def test_dead_letter_keeps_a_non_json_original_byte_for_byte(raw, encoding):
    record = validate(
        events.dead_letter(raw, errors.BadEvent("bad"), attempts=1, model=None, track_id=None), "track_dead_letter.v1"
    )
    assert record["original_encoding"] == encoding
    assert events.original_bytes(record) == raw


def test_deeply_nested_json_still_makes_a_dead_letter():
    # Around the parser's nesting limit an event can parse alone yet be one level too deep
    # inside a record: it is then kept as text. No depth may break the dead letter.
    validator = jsonschema.Draft202012Validator(events.load_schema("track_dead_letter.v1"))
    encodings = set()
    for depth in range(900, 1100):
        raw = b"[" * depth + b"]" * depth
        record = json.loads(events.dead_letter(raw, errors.BadEvent("x"), attempts=1, model=None, track_id=None))
        validator.validate(record)
        original = events.original_bytes(record)
        if record["original_encoding"] == "json":
            assert json.loads(original) == json.loads(raw)
        else:
            assert original == raw
        encodings.add(record["original_encoding"])
    assert encodings == {"json", "text"}


def test_dead_letter_of_garbage_is_base64_of_the_bytes():
    raw = b"\xff\xfe\x00\x01"
    record = json.loads(events.dead_letter(raw, errors.BadEvent("not JSON"), attempts=1, model=None, track_id=None))
    assert base64.b64decode(record["original"]) == raw and record["track_id"] is None


def test_dead_letter_keeps_a_json_original_as_an_object():
    raw = b'{"schema_version": 1, "track_id": "t-1", "audio_uri": "s3://other/a.mp3", "x": [1, 2.5, null]}'
    error = errors.NotFound("s3://music/a.mp3 does not exist")
    model = events.ModelRef("musicnn_msd", "3")
    record = validate(events.dead_letter(raw, error, attempts=3, model=model, track_id="t-1"), "track_dead_letter.v1")
    assert record["original"] == json.loads(raw) and record["original_encoding"] == "json"
    assert json.loads(events.original_bytes(record)) == json.loads(raw)
    assert (record["track_id"], record["reason"], record["message"], record["attempts"]) == (
        "t-1",
        "not_found",
        str(error),
        3,
    )
    assert record["model"] == {"name": "musicnn_msd", "version": "3"}
    assert datetime.fromisoformat(record["failed_at"]).tzinfo is not None
    assert validate(
        events.dead_letter(b"[1, 2]", error, attempts=1, model=None, track_id=None), "track_dead_letter.v1"
    )["original"] == [1, 2]


def test_a_missing_value_is_dead_lettered_as_empty_text():
    record = validate(
        events.dead_letter(None, errors.BadEvent("record has no value"), attempts=1, model=None, track_id=None),
        "track_dead_letter.v1",
    )
    assert (record["original"], record["original_encoding"]) == ("", "text")


@pytest.mark.parametrize(
    "error",
    [
        cls("x")
        for cls in (
            errors.BadEvent,
            errors.NotFound,
            errors.AccessDenied,
            errors.TooLarge,
            errors.Undecodable,
            errors.TooShort,
            errors.InferenceFailed,
            errors.TrackError,
        )
    ],
)
def test_every_reason_makes_a_valid_dead_letter(error):
    record = validate(events.dead_letter(b"{}", error, attempts=1, model=None, track_id=None), "track_dead_letter.v1")
    assert record["reason"] == error.reason


def test_dead_letter_message_is_capped():
    record = validate(
        events.dead_letter(b"{}", errors.TrackError("x" * 5000), attempts=1, model=None, track_id=None),
        "track_dead_letter.v1",
    )
    assert len(record["message"]) == events.MAX_MESSAGE_CHARS


def test_schema_refuses_a_text_original_that_is_not_a_string():
    record = json.loads(events.dead_letter(b"{oops", errors.BadEvent("x"), attempts=1, model=None, track_id=None))
    record["original"] = {"a": 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(record, events.load_schema("track_dead_letter.v1"))

"""Event contracts: what the input accepts and refuses, and that outputs match the schemas."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import jsonschema
import pytest

from pipeline import events
from pipeline.errors import BadEvent, NotFound

ALLOWED = ("music",)


def parse(doc, **kw):
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return events.parse_ingested(raw, allow_file_uris=kw.get("files", False), allowed_buckets=ALLOWED)


def valid(**over):
    return {"schema_version": 1, "track_id": "t-1", "audio_uri": "s3://music/a/b.mp3", **over}


def test_round_trip_of_an_announcement():
    raw = events.ingested_record(track_id="t-1", audio_uri="s3://music/x y.mp3", size_bytes=12, ingested_at=datetime(2026, 1, 2, tzinfo=timezone.utc), correlation_id="c")
    event = events.parse_ingested(raw, allow_file_uris=False, allowed_buckets=ALLOWED)
    assert (event.track_id, event.ref.bucket, event.ref.key, event.size_bytes, event.correlation_id) == ("t-1", "music", "x y.mp3", 12, "c")
    assert event.ingested_at == datetime(2026, 1, 2, tzinfo=timezone.utc) and event.raw == raw
    jsonschema.validate(json.loads(raw), events.load_schema("track_ingested.v1"))


def test_unknown_fields_are_tolerated():
    assert parse(valid(genre="jazz")).track_id == "t-1"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b"null", "JSON object"),
        (json.dumps(valid(schema_version=2)).encode(), "schema_version"),
        (json.dumps({"schema_version": 1, "audio_uri": "s3://music/a.mp3"}).encode(), "track_id"),
        (json.dumps(valid(track_id=42)).encode(), "track_id"),
        (json.dumps(valid(track_id="")).encode(), "track_id"),
        (json.dumps(valid(track_id="a b")).encode(), "track_id"),
        (json.dumps(valid(size_bytes=-1)).encode(), "size_bytes"),
        (json.dumps(valid(ingested_at="yesterday")).encode(), "ingested_at"),
        (json.dumps(valid(ingested_at="2026-01-01T00:00:00")).encode(), "time zone"),
        (json.dumps(valid(audio_uri=["s3://music/a.mp3"])).encode(), "audio_uri"),
        (b'{"schema_version": 1, "track_id": "t", "audio_uri": "s3://music/a.mp3", "pad": "' + b"x" * 70000 + b'"}', "bytes"),
    ],
)
def test_bad_events_are_refused_with_a_precise_message(raw, message):
    with pytest.raises(BadEvent, match=message):
        parse(raw)


@pytest.mark.parametrize(
    "uri",
    [
        "http://music/a.mp3",
        "https://example.com/a.mp3",
        "ftp://music/a.mp3",
        "s3://other/a.mp3",
        "s3://music/",
        "s3://music",
        "s3://music/../secret/a.mp3",
        "s3://music/a/%2e%2e/b.mp3",
        "s3://music//a.mp3",
        "s3://music/a\\b.mp3",
        "s3://music/a\x00.mp3",
        "s3://user:pw@music/a.mp3",
        "s3://music/a.mp3?versionId=1",
        "file:///etc/passwd",
        "/etc/passwd",
    ],
)
def test_uris_outside_the_allow_list_or_with_tricks_are_bad_events(uri):
    with pytest.raises(BadEvent):
        parse(valid(audio_uri=uri))


def test_file_uris_only_when_allowed(tmp_path):
    path = tmp_path / "a.wav"
    event = parse(valid(audio_uri=path.as_uri()), files=True)
    assert event.ref.scheme == "file" and event.ref.key == str(path)
    with pytest.raises(BadEvent):
        parse(valid(audio_uri="file:///tmp/../etc/passwd"), files=True)


def test_output_record_is_deterministic_and_valid():
    record = events.TrackMoods(
        track_id="t-1",
        model=events.ModelRef("m", "1"),
        tags={"happy": 0.5},
        top_tags=[{"tag": "happy", "score": 0.5}],
        moods={"happy": 0.5},
        top_moods=[{"mood": "happy", "score": 0.5}],
        timeline=[{"start_s": 0.0, "end_s": 2.992, "top_moods": []}],
        duration_s=3.0,
        analysed_s=3.0,
        patches=1,
        decoder="pyav",
        processed_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
        latency_ms={"total": 1.0},
    )
    assert record.to_json() == record.to_json()
    jsonschema.validate(json.loads(record.to_json()), events.load_schema("track_moods.v1"), format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("raw", [b"\xff\x00garbage\x80", b'{"a": 1}', b""])
def test_dead_letter_keeps_the_original_byte_for_byte(raw):
    record = json.loads(events.dead_letter(raw, NotFound("gone"), attempts=1, model=None, track_id=None))
    jsonschema.validate(record, events.load_schema("track_dead_letter.v1"))
    assert record["reason"] == "not_found" and events.original_bytes(record) == raw


def test_track_id_of_a_bad_event_is_kept_when_usable():
    assert events.track_id_of(json.dumps(valid(audio_uri="http://x")).encode()) == "t-1"
    assert events.track_id_of(b"{oops") is None
    assert events.track_id_of(b'{"track_id": 5}') is None

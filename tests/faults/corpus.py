"""The malformed-input corpus, generated (never stored): bad audio files and bad events, each
with the outcome the worker must give it.

``expected`` is a dead-letter reason code, or ``"output"`` for audio that is valid but odd
(silence, 8 channels, 192 kHz, a wrong file extension, NaN/Inf samples, which the decoder
zeroes, and a tiny file that decodes to hours, analysed up to the duration cap).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile
from support import encode, tone

from pipeline.contracts import events

#: Random seeds per variant of a bad file; variants x seeds makes the corpus.
SEEDS = range(11)


@dataclass(frozen=True)
class AudioCase:
    name: str  # also the S3 key's stem
    ext: str  # the S3 key's extension (which may lie about the content)
    data: bytes
    expected: str  # reason code, or "output"


@dataclass(frozen=True)
class EventCase:
    name: str
    value: bytes | None  # None: a record without a value (tombstone)
    expected: str = "bad_event"


def _wav(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    """samples: [n, channels] float32 -> WAV bytes."""
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _header_only_wav(rate: int, channels: int) -> bytes:
    """A RIFF/WAVE header with a 'data' chunk of 0 bytes."""
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", 0)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def silent_flac(seconds: float, rate: int = 8000) -> bytes:
    """Digital silence as FLAC: about 2.5 kB per minute, so a tiny file holds hours of audio."""
    buf = io.BytesIO()
    block = np.zeros(rate * 60, np.int16)
    with soundfile.SoundFile(buf, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(seconds // 60)):
            f.write(block)
    return buf.getvalue()


def bad_audio(hours_file_s: float = 2 * 3600) -> list[AudioCase]:
    """At least 200 audio objects: per seed, every variant below."""
    cases: list[AudioCase] = []
    sources = {fmt: encode(tone(4.0, freq=330.0), fmt) for fmt in ("mp3", "ogg", "flac")}
    sources["vorbis"] = encode(tone(4.0, freq=330.0), "vorbis")
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        add = lambda name, ext, data, expected, seed=seed: cases.append(
            AudioCase(f"{name}-{seed}", ext, data, expected)
        )
        add("zero-bytes", ["mp3", "wav", "flac", "ogg"][seed % 4], b"", "undecodable")
        add("random-bytes", "mp3", rng.bytes(int(rng.integers(16, 200_000))), "undecodable")
        add(
            "random-text",
            "ogg",
            bytes(rng.integers(32, 127, int(rng.integers(100, 5000)), dtype=np.uint8)),
            "undecodable",
        )
        # A container's first bytes with nothing after them.
        for fmt, data in sources.items():
            add(
                f"truncated-head-{fmt}",
                "ogg" if fmt == "vorbis" else fmt,
                data[: int(rng.integers(1, 64))],
                "undecodable",
            )
        # Cut inside the first 0.3 s of audio: decodable, but shorter than the 1 s minimum.
        add(
            "truncated-short-wav",
            "wav",
            _wav(tone(4.0, rate=16_000, channels=1).T, 16_000)[: 44 + int(rng.integers(100, 9000))],
            "too_short",
        )
        add(
            "header-only-wav",
            "wav",
            _header_only_wav([8000, 16_000, 44_100, 48_000][seed % 4], 1 + seed % 2),
            "undecodable",
        )
        add(
            "one-sample",
            "wav",
            _wav(np.full((1, 1 + seed % 2), 0.5, np.float32), [8000, 44_100][seed % 2]),
            "too_short",
        )
        add("half-second", "flac", encode(tone(0.5), "flac"), "too_short")
        add("not-audio-json", "mp3", json.dumps({"seed": seed, "hello": "world"}).encode() * 20, "undecodable")
        add("not-audio-png", "flac", b"\x89PNG\r\n\x1a\n" + rng.bytes(3000), "undecodable")
        add("wav-header-garbage-body", "wav", _header_only_wav(44_100, 2)[:40] + rng.bytes(4), "undecodable")
        # Valid but odd: a normal output.
        add("silence", "wav", _wav(np.zeros((16_000 * 4, 1), np.float32), 16_000), "output")
        add("eight-channels", "wav", _wav(tone(4.0, rate=22_050, channels=8).T, 22_050), "output")
        add("rate-192k", "flac", encode(tone(3.5, rate=192_000, channels=1), "flac", rate=192_000), "output")
        nan = tone(4.0, rate=16_000, channels=1).T.copy()
        nan[rng.integers(0, len(nan), 500)] = [np.nan, np.inf, -np.inf][seed % 3]
        add("nan-inf-float-wav", "wav", _wav(nan, 16_000, "FLOAT"), "output")
        add(
            "wrong-extension",
            ["wav", "mp3", "ogg", "flac"][seed % 4],
            sources[["flac", "ogg", "mp3", "vorbis"][seed % 4]],
            "output",
        )
    cases.append(AudioCase("hours-of-silence", "flac", silent_flac(hours_file_s), "output"))
    return cases


def bad_events(bucket: str, key: str) -> Iterator[EventCase]:
    """At least 50 bad tracks.ingested values, each a bad_event; ``key`` exists in ``bucket``."""
    good = json.loads(events.ingested_record(track_id="ev-good", audio_uri=f"s3://{bucket}/{key}"))

    def doc(name: str, **changes: object) -> EventCase:
        d = {**good, "track_id": f"ev-{name}"}
        for field, value in changes.items():
            if value is _DROP:
                d.pop(field, None)
            else:
                d[field] = value
        return EventCase(name, json.dumps(d).encode())

    # Not JSON at all.
    for i, raw in enumerate(
        [
            b"",
            b"{",
            b"not json",
            b"\xff\xfe\x00garbage",
            b"[1, 2",
            b'{"a": NaN}',
            b"null",
            b"42",
            b'"a string"',
            b"[]",
            b'{"track_id": "x", "track_id": "y"}',
            b"{'single': 'quotes'}",
        ]
    ):
        yield EventCase(f"not-json-{i}", raw)
    yield EventCase("tombstone", None)
    # Missing fields.
    for field in ("track_id", "audio_uri", "schema_version"):
        yield doc(f"missing-{field}", **{field: _DROP})
    # Wrong types.
    for field, value in [
        ("track_id", 123),
        ("track_id", None),
        ("track_id", ["a"]),
        ("audio_uri", 5),
        ("audio_uri", {"s3": "x"}),
        ("schema_version", "1"),
        ("schema_version", True),
        ("size_bytes", "big"),
        ("size_bytes", -1),
        ("ingested_at", 1700000000),
        ("ingested_at", "yesterday"),
        ("correlation_id", 7),
    ]:
        yield doc(f"type-{field}-{type(value).__name__}", **{field: value})
    yield doc("track-id-newline", track_id="ev-a\n")
    yield doc("track-id-empty", track_id="")
    # Unknown schema versions.
    for version in (0, 2, 99, -1):
        yield doc(f"schema-v{version}", schema_version=version)
    # Huge payloads.
    yield doc("huge-correlation", correlation_id="x" * 70_000)
    yield EventCase("huge-raw", b"{" + b" " * 100_000 + b"}")
    yield EventCase("deeply-nested", b'{"track_id": "ev-deep", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    yield doc("huge-uri", audio_uri=f"s3://{bucket}/" + "k" * 2000)
    # URIs that are not allowed: other schemes, other buckets, path tricks.
    for i, uri in enumerate(
        [
            "file:///etc/passwd",
            f"file:///tmp/{key}",
            f"http://127.0.0.1/{bucket}/{key}",
            f"https://{bucket}.s3.amazonaws.com/{key}",
            f"ftp://{bucket}/{key}",
            f"/{bucket}/{key}",
            f"{bucket}/{key}",
            "s3://other-bucket/a.mp3",
            f"s3://{bucket}.evil/{key}",
            f"s3://{bucket.upper()}/{key}",
            f"s3://{bucket}",
            f"s3://{bucket}/",
            f"s3://{bucket}/../secrets/a.mp3",
            f"s3://{bucket}/a/./b.mp3",
            f"s3://{bucket}/a//b.mp3",
            f"s3://{bucket}/a/%2e%2e/b.mp3",
            f"s3://{bucket}/a\\..\\b.mp3",
            f"s3://{bucket}/a\x00.mp3",
            f"s3://{bucket}/a%00.mp3",
            f"s3://{bucket}/a\nb.mp3",
            "s3:///a.mp3",
            "",
            f"S3://other-bucket/{key}",
            f"s3://user:pass@{bucket}/{key}",
        ]
    ):
        yield doc(f"uri-{i}", audio_uri=uri)


_DROP = object()

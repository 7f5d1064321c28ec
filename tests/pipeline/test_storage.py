"""Storage stage against a real S3 API server (moto in server mode)."""

from __future__ import annotations

import os

import botocore.exceptions
import pytest

from pipeline import storage
from pipeline.errors import AccessDenied, NotFound, ServiceUnavailable, TooLarge
from pipeline.stack import EmbeddedStack

BUCKET = "music"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with EmbeddedStack(log_dir=tmp_path_factory.mktemp("logs")) as stack:
        os.environ.update({k: v for k, v in stack.env().items() if k.startswith("AWS_")})
        client = storage.make_s3_client(2)
        client.create_bucket(Bucket=BUCKET)
        yield client


def ref(key: str) -> storage.ObjectRef:
    return storage.parse_uri(f"s3://{BUCKET}/{key}", allowed_buckets=(BUCKET,), allow_file_uris=False)


@pytest.mark.integration
def test_fetch_returns_the_object(s3):
    s3.put_object(Bucket=BUCKET, Key="a/b c.mp3", Body=b"x" * 3000)
    assert storage.fetch(ref("a/b c.mp3"), client=s3, max_bytes=10_000) == b"x" * 3000


@pytest.mark.integration
def test_missing_object_is_not_found(s3):
    with pytest.raises(NotFound):
        storage.fetch(ref("nope.mp3"), client=s3, max_bytes=10)


@pytest.mark.integration
def test_too_large_is_refused_before_download(s3):
    s3.put_object(Bucket=BUCKET, Key="big.wav", Body=b"x" * 5000)
    with pytest.raises(TooLarge, match="5000 bytes"):
        storage.fetch(ref("big.wav"), client=s3, max_bytes=4999)


@pytest.mark.integration
def test_list_audio_pages_through_a_prefix(s3):
    for i in range(7):
        s3.put_object(Bucket=BUCKET, Key=f"cat/{i}.flac", Body=b"1")
    s3.put_object(Bucket=BUCKET, Key="cat/cover.jpg", Body=b"1")
    listed = list(storage.list_audio(f"s3://{BUCKET}/cat/", client=s3, page_size=3))
    assert sorted(o.key for o in listed) == [f"cat/{i}.flac" for i in range(7)]


def test_unreachable_s3_is_an_outage_not_a_dead_letter(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(ServiceUnavailable):
        storage.fetch(ref("a.mp3"), client=storage.make_s3_client(1), max_bytes=10)


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [(403, "AccessDenied", AccessDenied), (404, "NoSuchKey", NotFound), (503, "SlowDown", ServiceUnavailable), (500, "InternalError", ServiceUnavailable)],
)
def test_s3_error_codes_are_translated(status, code, error):
    exc = botocore.exceptions.ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    assert isinstance(storage._translate(exc, ref("a.mp3")), error)


def test_file_uris_read_with_the_same_cap(tmp_path):
    path = tmp_path / "a.wav"
    path.write_bytes(b"y" * 100)
    file_ref = storage.parse_uri(path.as_uri(), allowed_buckets=(), allow_file_uris=True)
    assert storage.fetch(file_ref, client=None, max_bytes=100) == b"y" * 100
    with pytest.raises(TooLarge):
        storage.fetch(file_ref, client=None, max_bytes=99)
    with pytest.raises(NotFound):
        storage.fetch(storage.ObjectRef("file", "", str(tmp_path / "none")), client=None, max_bytes=99)

"""Storage stage: URI rules (unit), and fetching and listing against a real S3 API server.

The integration tests start moto in server mode in a subprocess on a free port and talk to it
over HTTP with the same boto3 client the worker builds; access control is real too (moto's
IAM enforcement, switched on for the tests that need it).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import boto3
import botocore.exceptions
import botocore.response
import pytest

from devstack import free_ports
from pipeline.errors import AccessDenied, BadEvent, ConfigError, NotFound, ServiceUnavailable, TooLarge, TrackError
from pipeline.stages import storage

BUCKET = "music"


def ref(key: str, bucket: str = BUCKET) -> storage.ObjectRef:
    return storage.parse_uri(f"s3://{bucket}/{key}", allowed_buckets=(bucket,), allow_file_uris=False)


# --- parse_uri (unit) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://music/a/b c.mp3", storage.ObjectRef("s3", "music", "a/b c.mp3")),
        ("s3://music/x%2Fy.mp3", storage.ObjectRef("s3", "music", "x%2Fy.mp3")),
        ("s3://archive/2024/Ω.flac", storage.ObjectRef("s3", "archive", "2024/Ω.flac")),
        ("file:///srv/a%20b.wav", storage.ObjectRef("file", "", "/srv/a b.wav")),
    ],
)
def test_parse_uri_says_where_the_audio_is(uri, expected):
    assert storage.parse_uri(uri, allowed_buckets=("music", "archive"), allow_file_uris=True) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "s3://music/a/../b",
        "s3://music/a/%2e%2E/b",
        "s3://music//a",
        "s3://music/a\\b",
        "s3://music/a%5cb",
        "s3://music/a\x00",
        "s3://music/a%00",
        "s3://music/a\x1b",
        "gs://music/a",
        "s3://music",
    ],
)
def test_parse_uri_refuses_tricks(uri):
    with pytest.raises(BadEvent):
        storage.parse_uri(uri, allowed_buckets=(BUCKET,), allow_file_uris=True)


def test_parse_uri_with_an_empty_allow_list_refuses_every_bucket():
    with pytest.raises(BadEvent, match="allow-list"):
        storage.parse_uri("s3://music/a.mp3", allowed_buckets=(), allow_file_uris=False)


def test_object_ref_uri_is_readable():
    assert ref("a b.mp3").uri == "s3://music/a b.mp3"
    assert storage.ObjectRef("file", "", "/srv/a.wav").uri == "file:///srv/a.wav"


# --- error translation (unit, real botocore ClientErrors) -------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "error", "reason"),
    [
        (404, "NoSuchKey", NotFound, "not_found"),
        (404, "NoSuchBucket", NotFound, "not_found"),
        (404, "404", NotFound, "not_found"),  # HEAD: no body, the code is the status
        (403, "AccessDenied", AccessDenied, "access_denied"),
        (403, "403", AccessDenied, "access_denied"),
        (403, "InvalidObjectState", AccessDenied, "access_denied"),  # archived in Glacier
        (403, "InvalidAccessKeyId", ServiceUnavailable, None),
        (403, "SignatureDoesNotMatch", ServiceUnavailable, None),
        (400, "ExpiredToken", ServiceUnavailable, None),
        (503, "SlowDown", ServiceUnavailable, None),
        (500, "InternalError", ServiceUnavailable, None),
        (503, "503", ServiceUnavailable, None),
        (429, "429", ServiceUnavailable, None),
        (400, "InvalidRequest", TrackError, "internal"),
    ],
)
def test_s3_error_responses_are_translated(status, code, error, reason):
    exc = botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )
    translated = storage.translate_s3_error(exc, "s3://music/a.mp3")
    assert type(translated) is error and "s3://music/a.mp3" in str(translated)
    assert getattr(translated, "reason", None) == reason


# --- local files (demos) ----------------------------------------------------------------------


def test_file_uris_are_read_with_the_same_cap(tmp_path):
    path = tmp_path / "a b.wav"
    path.write_bytes(b"y" * 100)
    file_ref = storage.parse_uri(path.as_uri(), allowed_buckets=(), allow_file_uris=True)
    assert storage.fetch(file_ref, client=None, max_bytes=100) == b"y" * 100
    with pytest.raises(TooLarge, match="100 bytes"):
        storage.fetch(file_ref, client=None, max_bytes=99)


@pytest.mark.parametrize("name", ["missing.wav", "dir", "fifo", "a.wav/inside"])
def test_a_missing_or_special_file_is_not_found(tmp_path, name):
    (tmp_path / "dir").mkdir()
    (tmp_path / "a.wav").write_bytes(b"1")
    os.mkfifo(tmp_path / "fifo")  # reading it would block forever
    with pytest.raises(NotFound):
        storage.fetch(storage.ObjectRef("file", "", str(tmp_path / name)), client=None, max_bytes=99)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_access_denied(tmp_path):
    path = tmp_path / "a.wav"
    path.write_bytes(b"1")
    path.chmod(0)
    with pytest.raises(AccessDenied):
        storage.fetch(storage.ObjectRef("file", "", str(path)), client=None, max_bytes=99)


# --- a real S3 API server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory) -> Iterator[str]:
    """A moto S3 server in a subprocess on a free port, for this module."""
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto server not ready after 60 s; see {log.name}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def aws_env(moto_url) -> Iterator[None]:
    """The standard AWS environment pointing boto3 at the moto server."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("AWS_ENDPOINT_URL_S3", moto_url)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield


@pytest.fixture(scope="module")
def s3(aws_env):
    client = storage.make_s3_client(2)
    client.create_bucket(Bucket=BUCKET)
    return client


def calls_to(client, operation: str) -> list[dict]:
    """Records the API parameters of every ``operation`` the client sends from now on."""
    seen: list[dict] = []
    client.meta.events.register(f"before-parameter-build.s3.{operation}", lambda params, **_: seen.append(dict(params)))
    return seen


@pytest.mark.integration
def test_fetch_returns_the_object(s3):
    body = os.urandom(3000)
    s3.put_object(Bucket=BUCKET, Key="a/b c Ω.mp3", Body=body)
    assert storage.fetch(ref("a/b c Ω.mp3"), client=s3, max_bytes=3000) == body  # cap is inclusive


@pytest.mark.integration
async def test_fetch_async_runs_in_a_thread(s3):
    s3.put_object(Bucket=BUCKET, Key="async.mp3", Body=b"z" * 10)
    assert await storage.fetch_async(ref("async.mp3"), client=s3, max_bytes=10) == b"z" * 10


@pytest.mark.integration
def test_a_missing_object_or_bucket_is_not_found(s3):
    with pytest.raises(NotFound, match=r"nope\.mp3"):
        storage.fetch(ref("nope.mp3"), client=s3, max_bytes=10)
    with pytest.raises(NotFound):
        storage.fetch(ref("a.mp3", bucket="no-such-bucket"), client=s3, max_bytes=10)


@pytest.mark.integration
def test_too_large_is_refused_before_download(s3, monkeypatch):
    s3.put_object(Bucket=BUCKET, Key="big.wav", Body=b"x" * 5000)
    gets, heads = calls_to(s3, "GetObject"), calls_to(s3, "HeadObject")
    reads = []
    real_read = botocore.response.StreamingBody.read
    monkeypatch.setattr(
        botocore.response.StreamingBody, "read", lambda body, *a, **k: reads.append(a) or real_read(body, *a, **k)
    )
    with pytest.raises(TooLarge, match="5000 bytes, more than the 4999 allowed"):
        storage.fetch(ref("big.wav"), client=s3, max_bytes=4999)
    assert reads == []  # refused on the response's headers: the body was never read
    assert storage.fetch(ref("big.wav"), client=s3, max_bytes=5000) == b"x" * 5000
    assert len(reads) == 1
    assert len(gets) == 2 and heads == []  # one request per fetch


def set_auth_free_requests(moto_url: str, count: str) -> None:
    """How many more requests moto serves before it checks credentials and IAM policies."""
    request = urllib.request.Request(
        f"{moto_url}/moto-api/reset-auth", data=count.encode(), method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture
def iam_enforced(s3, moto_url) -> Iterator[dict[str, str]]:
    """Credentials of an IAM user who may read the bucket except ``private/``, with moto
    checking signatures and policies; the default credentials stop working meanwhile."""
    iam = boto3.client("iam", endpoint_url=moto_url)
    iam.create_user(UserName="reader")
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]},
            {"Effect": "Deny", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/private/*"},
        ],
    }
    iam.put_user_policy(UserName="reader", PolicyName="read-public", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    s3.put_object(Bucket=BUCKET, Key="private/secret.mp3", Body=b"s")
    s3.put_object(Bucket=BUCKET, Key="public/ok.mp3", Body=b"ok")
    set_auth_free_requests(moto_url, "0")
    try:
        yield {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        set_auth_free_requests(moto_url, "inf")
        iam.delete_user_policy(UserName="reader", PolicyName="read-public")
        iam.delete_access_key(UserName="reader", AccessKeyId=key["AccessKeyId"])
        iam.delete_user(UserName="reader")


@pytest.mark.integration
def test_a_denied_object_is_access_denied(iam_enforced, monkeypatch):
    for name, value in iam_enforced.items():
        monkeypatch.setenv(name, value)
    reader = storage.make_s3_client(1)
    assert storage.fetch(ref("public/ok.mp3"), client=reader, max_bytes=10) == b"ok"
    with pytest.raises(AccessDenied, match=r"private/secret\.mp3"):
        storage.fetch(ref("private/secret.mp3"), client=reader, max_bytes=10)


@pytest.mark.integration
def test_unknown_credentials_pause_instead_of_dead_lettering(iam_enforced, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    with pytest.raises(ServiceUnavailable, match="InvalidAccessKeyId"):
        storage.fetch(ref("public/ok.mp3"), client=storage.make_s3_client(1), max_bytes=10)


@pytest.mark.integration
def test_list_audio_pages_through_a_prefix(s3):
    audio = [f"cat/{i:02d}.flac" for i in range(7)] + ["cat/sub/x.MP3", "cat/y.aiff", "cat/z.opus"]
    for key in audio + ["cat/cover.jpg", "cat/notes", "cat/mp3", "catalogue/other.mp3"]:
        s3.put_object(Bucket=BUCKET, Key=key, Body=key.encode())
    pages = calls_to(s3, "ListObjectsV2")
    listed = list(storage.list_audio(f"s3://{BUCKET}/cat/", client=s3, page_size=3))
    assert [o.key for o in listed] == sorted(audio)
    assert all(o.bucket == BUCKET and o.size == len(o.key) for o in listed)
    assert len(pages) == 5 and all(p["MaxKeys"] == 3 for p in pages)  # 13 keys under cat/, 3 a page


@pytest.mark.integration
def test_list_audio_errors(s3):
    with pytest.raises(ConfigError):
        storage.list_audio("music/prefix", client=s3)  # refused at the call, not on iteration
    with pytest.raises(NotFound):
        list(storage.list_audio("s3://no-such-bucket/", client=s3))


# --- outages ----------------------------------------------------------------------------------


def test_unreachable_s3_is_an_outage_not_a_dead_letter(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(ServiceUnavailable, match="unreachable"):
        storage.fetch(ref("a.mp3"), client=storage.make_s3_client(1), max_bytes=10)


class _SlowDown(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that is always overloaded, counting the requests it refuses."""

    hits = 0

    def _refuse(self) -> None:
        type(self).hits += 1
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET = _refuse

    def log_message(self, *args: object) -> None:
        pass


def test_throttling_is_retried_then_an_outage(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowDown)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        _SlowDown.hits = 0
        with pytest.raises(ServiceUnavailable, match="after retries"):
            storage.fetch(ref("a.mp3"), client=storage.make_s3_client(3), max_bytes=10)
        assert _SlowDown.hits == 3  # max_attempts counts the first try
    finally:
        server.shutdown()
        server.server_close()

"""``moodstream serve`` over HTTP: a real process (in-process onnxruntime scorer, SQLite catalog in
a temporary folder) answering real clips, bad uploads and catalog queries.

Needs the clips of ``make clips`` in MOODSTREAM_TEST_CLIPS. The catalog is filled here through
the store itself (the service's own consumer of tracks.moods is tested on the embedded stack in
tests/worker/test_faust_app.py); the index catches up on the rows as a replica without a consumer does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import requests
from serving import REPO, ServiceProcess
from support import real_clip

from devstack import free_ports
from pipeline.contracts import events
from pipeline.service.catalog import CatalogStore, embedding_of
from pipeline.service.uploads import RETRY_AFTER_S
from pipeline.stages.taxonomy import encode_embedding

pytestmark = pytest.mark.integration

CLIP = "drascula-track24-90s.mp3"
MAX_UPLOAD_BYTES = 2_000_000  # the clips are about 0.5 MB
ANALYSIS_TIMEOUT_S = 20
HTTP_TIMEOUT_S = 90
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def clip() -> Path:
    return real_clip(CLIP)


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[ServiceProcess]:
    try:
        with ServiceProcess(
            tmp_path_factory.mktemp("service"),
            MOODSTREAM_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
            MOODSTREAM_ANALYSIS_TIMEOUT_S=str(ANALYSIS_TIMEOUT_S),
            MOODSTREAM_SERVICE_METRICS_PORT=str(free_ports(1)[0]),
        ) as running:
            yield running
    except RuntimeError as exc:  # it exited or never became ready: the message has its log tail
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def uploaded(service, clip) -> dict[str, Any]:
    """The clip's record as an upload gets it."""
    with clip.open("rb") as f:
        answer = requests.post(
            service.url + "/v1/analyses", files={"file": (clip.name, f, "audio/mpeg")}, timeout=HTTP_TIMEOUT_S
        )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    return answer.json()


def post(service: ServiceProcess, **kwargs: Any) -> requests.Response:
    return requests.post(service.url + "/v1/analyses", timeout=HTTP_TIMEOUT_S, **kwargs)


def problem(answer: requests.Response, status: int, reason: str) -> dict[str, Any]:
    """The problem+json body of ``answer``, checked to be a ``status`` with ``reason``."""
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert answer.headers["content-type"] == PROBLEM, answer.headers
    body = answer.json()
    assert (
        body["status"] == status and body["reason"] == reason and body["type"] == f"urn:moodstream:problem:{reason}"
    ), body
    assert body["title"] and body["detail"]
    return body


# --- uploads -------------------------------------------------------------------------------------


def test_an_upload_gets_the_record_a_catalog_track_gets(uploaded, clip, service):
    jsonschema.validate(uploaded, events.load_schema("track_moods.v3"))
    digest = hashlib.sha256(clip.read_bytes()).hexdigest()[:16]
    assert uploaded["track_id"] == f"upload-{digest}"
    assert uploaded["moods"] and uploaded["leading_mood"]["mood"] in uploaded["moods"]
    assert uploaded["timeline"] and uploaded["embeddings"]
    assert set(uploaded["latency_ms"]) >= {"upload", "decode", "features", "inference", "total"}
    # The same stages as `moodstream tag` (same model, same frontend): the same tags and moods.
    tagged = subprocess.run(
        [sys.executable, "-m", "pipeline", "tag", "--json", str(clip)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MOODSTREAM_ONNX_THREADS": "1"},
    )
    assert tagged.returncode == 0, tagged.stderr
    local = json.loads(tagged.stdout)
    assert local["model"] == uploaded["model"]
    for network, scores in local["tags"].items():
        assert uploaded["tags"][network] == pytest.approx(scores, abs=1e-5)
    assert uploaded["moods"] == pytest.approx(local["moods"], abs=1e-5)
    assert uploaded["leading_mood"]["mood"] == local["leading_mood"]["mood"]
    assert [s["start_s"] for s in uploaded["timeline"]] == [s["start_s"] for s in local["timeline"]]


def test_the_raw_body_and_any_file_name_give_the_same_record(service, clip, uploaded):
    raw = post(service, data=clip.read_bytes(), headers={"Content-Type": "application/octet-stream"})
    assert raw.status_code == 200, raw.text
    assert raw.json()["track_id"] == uploaded["track_id"] and raw.json()["moods"] == uploaded["moods"]
    # The name a client sends is never used: path tricks, a NUL, a wrong extension.
    for name in ("../../../../etc/passwd", "..\\..\\boot.ini", "a\x00b.mp3", "not-audio.txt", "x" * 1000 + ".exe"):
        with clip.open("rb") as f:
            answer = post(service, files={"file": (name, f, "text/plain")})
        assert answer.status_code == 200, (name, answer.text)
        assert answer.json()["track_id"] == uploaded["track_id"]
    written = {p.name for p in service.folder.rglob("*")}
    assert not written & {"passwd", "boot.ini", "not-audio.txt"}


def test_an_empty_upload_is_refused(service):
    body = problem(post(service, files={"file": ("empty.mp3", b"", "audio/mpeg")}), 415, "undecodable")
    assert "empty" in body["detail"]
    problem(post(service, data=b"", headers={"Content-Type": "audio/mpeg"}), 415, "undecodable")


def test_a_file_that_is_not_audio_is_refused_whatever_its_name(service):
    body = problem(
        post(service, files={"file": ("song.mp3", b"<html><body>not a song</body></html>" * 20, "audio/mpeg")}),
        415,
        "undecodable",
    )
    assert "container" in body["detail"]


def test_a_truncated_file_is_refused_with_the_dead_letter_reason(service, clip):
    cut = clip.read_bytes()[:3000]  # an MP3 header and a fraction of a second
    answer = post(service, files={"file": ("cut.mp3", cut, "audio/mpeg")})
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["reason"] in {"too_short", "undecodable"} and answer.headers["content-type"] == PROBLEM


def test_a_huge_upload_is_cut_off_declared_or_streamed(service):
    huge = b"\xff\xfb\x90\x00" + os.urandom(MAX_UPLOAD_BYTES + 100_000)
    problem(post(service, files={"file": ("big.mp3", huge, "audio/mpeg")}), 413, "too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        for start in range(0, len(huge), 64 * 1024):
            yield huge[start : start + 64 * 1024]

    try:
        answer = post(service, data=chunks(), headers={"Content-Type": "audio/mpeg"})
    except requests.ConnectionError:
        pytest.fail("the server hung up on a chunked upload instead of answering 413")
    problem(answer, 413, "too_large")
    assert requests.get(service.url + "/healthz", timeout=10).status_code == 200


def test_a_request_of_the_wrong_type_or_without_the_file_field(service, clip):
    problem(post(service, data=b"hello", headers={"Content-Type": "text/plain"}), 415, "bad_request")
    problem(post(service, data={"name": "no file here"}), 415, "bad_request")  # urlencoded
    problem(post(service, files={"audio": ("song.mp3", clip.read_bytes(), "audio/mpeg")}), 400, "bad_request")
    problem(
        post(service, data=b"--x\r\nnot a part", headers={"Content-Type": "multipart/form-data"}), 400, "bad_request"
    )


def test_beyond_the_bound_uploads_are_told_to_retry_and_a_stalled_one_times_out(service, clip):
    """One slot (MOODSTREAM_MAX_ANALYSES_IN_FLIGHT=1): a client that sends half its body and
    stalls holds it until the time limit, and meanwhile the next upload gets 503."""
    data = clip.read_bytes()
    stalled = socket.create_connection(("127.0.0.1", service.port), timeout=ANALYSIS_TIMEOUT_S + 30)
    head = f"POST /v1/analyses HTTP/1.1\r\nHost: x\r\nContent-Type: audio/mpeg\r\nContent-Length: {len(data)}\r\n\r\n"
    stalled.sendall(head.encode() + data[: len(data) // 2])
    started = time.monotonic()
    deadline = started + 10
    while service.metric("moodstream_analyses_in_flight") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    busy = post(service, data=data, headers={"Content-Type": "audio/mpeg"})
    body = problem(busy, 503, "busy")
    assert busy.headers["retry-after"] == str(RETRY_AFTER_S) and "in flight" in body["detail"]

    answer = read_answer(stalled)
    stalled.close()
    assert answer.startswith("HTTP/1.1 504"), answer[:200]
    assert '"reason":"timeout"' in answer and time.monotonic() - started >= ANALYSIS_TIMEOUT_S - 1
    deadline = time.monotonic() + 10
    while service.metric("moodstream_analyses_in_flight") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.metric("moodstream_analyses_in_flight") == 0
    assert post(service, data=data, headers={"Content-Type": "audio/mpeg"}).status_code == 200
    # Every upload so far (tagged, refused, cut off, timed out) left no spooled file behind.
    assert not list((service.folder / "tmp").glob("moodstream-upload-*"))


def read_answer(sock: socket.socket) -> str:
    """One HTTP/1.1 response read off ``sock``: its head and its Content-Length of body."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


# --- the catalog ---------------------------------------------------------------------------------


def variant(
    record: dict[str, Any], track_id: str, *, relaxed: float, vector: np.ndarray, network: str, **features: float
) -> dict[str, Any]:
    """``record`` as another track with its own relaxed score, embedding and audio features."""
    other = copy.deepcopy(record)
    other["track_id"] = track_id
    other["moods"]["relaxed"] = relaxed
    other["audio_features"].update(features)
    other["embeddings"][network] = {"dim": int(vector.shape[0]), "dtype": "float16", "data": encode_embedding(vector)}
    return other


@pytest.fixture(scope="module")
def catalog(service, uploaded) -> dict[str, dict[str, Any]]:
    """The upload's record and three variants stored where the service reads; one has a '/' in its id."""
    network = next(iter(uploaded["embeddings"]))
    base = embedding_of(uploaded, network)
    rng = np.random.default_rng(7)
    records = {
        "seed": variant(
            uploaded, "seed", relaxed=0.6, vector=base, network=network, tempo=124.0, energy=0.5, key=9, mode=0
        ),
        "near": variant(
            uploaded,
            "near",
            relaxed=0.9,
            vector=base + 0.01 * rng.standard_normal(base.shape).astype(np.float32),
            network=network,
            tempo=126.0,
            energy=0.8,
            key=9,
            mode=0,
        ),
        "label/album/far": variant(
            uploaded,
            "label/album/far",
            relaxed=0.1,
            vector=-base,
            network=network,
            tempo=90.0,
            energy=0.9,
            key=2,
            mode=1,
        ),
        "middle": variant(
            uploaded,
            "middle",
            relaxed=0.3,
            vector=base + 0.5 * rng.standard_normal(base.shape).astype(np.float32),
            network=network,
            tempo=122.0,
            energy=0.2,
            key=9,
            mode=1,
        ),
    }
    store = CatalogStore.open(service.catalog_url)
    try:
        for each in records.values():
            store.upsert(each)
        store.upsert(records["seed"])  # a duplicate changes nothing
        assert store.count() == len(records)
    finally:
        store.close()
    return records


def test_a_track_by_id_and_an_unknown_one(service, catalog):
    answer = requests.get(service.url + "/v1/tracks/near", timeout=10)
    assert answer.status_code == 200 and answer.json() == catalog["near"]
    slashed = requests.get(service.url + "/v1/tracks/label/album/far", timeout=10)
    assert slashed.status_code == 200 and slashed.json()["track_id"] == "label/album/far"
    body = problem(requests.get(service.url + "/v1/tracks/nobody", timeout=10), 404, "not_found")
    assert "nobody" in body["detail"]


def test_the_catalog_ranked_by_a_mood_once_per_track(service, catalog):
    answer = requests.get(service.url + "/v1/tracks", params={"mood": "relaxed", "limit": 3}, timeout=10)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [t["track_id"] for t in body["tracks"]] == ["near", "seed", "middle"]
    assert [t["score"] for t in body["tracks"]] == pytest.approx([0.9, 0.6, 0.3])
    assert body["count"] == 3 and body["mood"] == "relaxed"
    everything = requests.get(service.url + "/v1/tracks", params={"limit": 500}, timeout=10).json()["tracks"]
    ids = [t["track_id"] for t in everything]
    assert sorted(ids) == sorted(catalog) and len(ids) == len(set(ids))
    quadrant = catalog["seed"]["quadrant"]
    assert len(
        requests.get(service.url + "/v1/tracks", params={"quadrant": quadrant}, timeout=10).json()["tracks"]
    ) == len(catalog)
    v = catalog["seed"]["valence"]
    region = requests.get(
        service.url + "/v1/tracks", params={"valence": f"{v - 0.01},{v + 0.01}", "mood": "relaxed"}, timeout=10
    )
    assert [t["track_id"] for t in region.json()["tracks"]][:1] == ["near"]


def test_the_catalog_filtered_and_sorted_by_audio_features(service, catalog):
    params = {"tempo": "120,128", "key": "9", "mode": "0", "sort": "-energy"}
    answer = requests.get(service.url + "/v1/tracks", params=params, timeout=10)
    assert answer.status_code == 200, answer.text
    assert [t["track_id"] for t in answer.json()["tracks"]] == ["near", "seed"]
    assert answer.json()["tracks"][0]["audio_features"]["tempo"] == 126.0
    by_energy = requests.get(service.url + "/v1/tracks", params={"sort": "energy"}, timeout=10).json()["tracks"]
    assert [t["track_id"] for t in by_energy] == ["middle", "seed", "near", "label/album/far"]
    loud = requests.get(service.url + "/v1/tracks", params={"energy": "0.85,1", "mood": "relaxed"}, timeout=10)
    assert [t["track_id"] for t in loud.json()["tracks"]] == ["label/album/far"]


def test_a_tracks_features_in_spotifys_shape(service, catalog):
    """The fields, types and ranges of Spotify's audio-features object, from the record's."""
    answer = requests.get(service.url + "/v1/tracks/label/album/far/features", timeout=10)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    spotify = {
        "acousticness": float,
        "analysis_url": str,
        "danceability": float,
        "duration_ms": int,
        "energy": float,
        "id": str,
        "instrumentalness": float,
        "key": int,
        "liveness": float,
        "loudness": float,
        "mode": int,
        "speechiness": float,
        "tempo": float,
        "time_signature": int,
        "track_href": str,
        "type": str,
        "uri": str,
        "valence": float,
    }
    assert set(body) == set(spotify)
    assert all(isinstance(body[k], kind) for k, kind in spotify.items()), body
    record = catalog["label/album/far"]["audio_features"]
    assert body["id"] == "label/album/far" and body["type"] == "audio_features"
    assert body["tempo"] == 90.0 and body["key"] == 2 and body["mode"] == 1 and body["energy"] == 0.9
    assert body["duration_ms"] == round(record["duration_s"] * 1000) and body["loudness"] == record["loudness"]
    assert all(
        0.0 <= body[k] <= 1.0
        for k in ("acousticness", "danceability", "energy", "instrumentalness", "liveness", "speechiness", "valence")
    )
    assert requests.get(service.url + body["track_href"], timeout=10).json()["track_id"] == "label/album/far"
    problem(requests.get(service.url + "/v1/tracks/nobody/features", timeout=10), 404, "not_found")


def test_bad_feed_queries_are_problems(service, catalog):
    for params, word in (
        ({"mood": "grumpy"}, "unknown mood"),
        ({"quadrant": "north"}, "unknown quadrant"),
        ({"valence": "0.5"}, "low,high"),
        ({"arousal": "1,-1"}, "low <= high"),
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"tempo": "128,120"}, "low <= high"),
        ({"energy": "0,2"}, "high <= 1"),
        ({"key": "12"}, "key"),
        ({"sort": "-volume"}, "sort"),
    ):
        body = problem(requests.get(service.url + "/v1/tracks", params=params, timeout=10), 400, "bad_request")
        assert word in body["detail"], (params, body)


def test_similar_tracks_nearest_first(service, catalog):
    answer = requests.get(service.url + "/v1/tracks/seed/similar", params={"limit": 3}, timeout=10)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["track_id"] == "seed" and body["network"] in catalog["seed"]["embeddings"]
    assert [t["track_id"] for t in body["similar"]] == ["near", "middle", "label/album/far"]
    distances = [t["distance"] for t in body["similar"]]
    assert distances == sorted(distances) and distances[0] < 0.01 and distances[-1] > 1.9  # cosine: the opposite is ~2
    assert (
        requests.get(service.url + "/v1/tracks/label/album/far/similar", params={"limit": 1}, timeout=10).json()[
            "similar"
        ][0]["track_id"]
        == "middle"
    )
    problem(requests.get(service.url + "/v1/tracks/nobody/similar", timeout=10), 404, "not_found")
    problem(
        requests.get(service.url + "/v1/tracks/seed/similar", params={"limit": 1000}, timeout=10), 400, "bad_request"
    )


# --- the rest ------------------------------------------------------------------------------------


def test_moods_health_readiness_metrics_and_docs(service, catalog):
    moods = requests.get(service.url + "/v1/moods", timeout=10).json()
    assert "relaxed" in moods["moods"] and moods["quadrants"] and moods["model"]["name"]
    assert requests.get(service.url + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(service.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json() == {
        "status": "ready",
        "scorer": "ok",
        "catalog": "ok",
        "follower": "off",
    }, ready.text
    # /metrics on a port of its own (MOODSTREAM_SERVICE_METRICS_PORT), not on the service's.
    text = requests.get(service.metrics_url, timeout=10).text
    problem(requests.get(service.url + "/metrics", timeout=10), 404, "not_found")
    assert 'moodstream_http_requests_total{method="GET",route="/v1/tracks",status="200"}' in text
    assert "moodstream_catalog_tracks" in text
    # Swagger UI runs inline script from a CDN, which the CSP forbids: the document alone is served.
    problem(requests.get(service.url + "/docs", timeout=10), 404, "not_found")
    document = requests.get(service.url + "/openapi.json", timeout=10).json()
    paths = document["paths"]
    assert {"/v1/analyses", "/v1/tracks", "/v1/tracks/{track_id}", "/v1/tracks/{track_id}/similar", "/v1/moods"} <= set(
        paths
    )
    page = requests.get(service.url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # Auth is off here (the default): the document asks for no credentials and lists no 401/403.
    assert "securitySchemes" not in document.get("components", {})
    assert not any("security" in op or "401" in op["responses"] for path in paths.values() for op in path.values())


def test_every_answer_carries_the_security_headers_and_no_cors_unless_configured(service, catalog):
    origin = {"Origin": "https://elsewhere.example"}
    for path in ("/", "/static/app.js", "/v1/moods", "/v1/tracks/nobody", "/healthz"):
        answer = requests.get(service.url + path, headers=origin, timeout=10)
        assert "script-src 'self'" in answer.headers["content-security-policy"], path
        assert "unsafe-inline" not in answer.headers["content-security-policy"], path
        assert answer.headers["x-content-type-options"] == "nosniff", path
        assert answer.headers["referrer-policy"] == "no-referrer", path
        assert not any(h.lower().startswith("access-control-") for h in answer.headers), (path, answer.headers)
    assert requests.get(service.url + "/v1/moods", timeout=10).headers["cache-control"] == "no-store"
    preflight = requests.options(
        service.url + "/v1/tracks",
        headers={**origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"},
        timeout=10,
    )
    problem(preflight, 405, "method_not_allowed")
    assert "access-control-allow-origin" not in preflight.headers


def test_unknown_routes_and_methods_are_problems(service):
    problem(requests.get(service.url + "/v2/nothing", timeout=10), 404, "not_found")
    problem(requests.delete(service.url + "/v1/tracks", timeout=10), 405, "method_not_allowed")
    problem(requests.get(service.url + "/v1/analyses", timeout=10), 405, "method_not_allowed")

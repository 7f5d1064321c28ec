"""Authentication, scopes, per-client limits and headers through the running service.

``moodstream serve`` runs as a process with auth on: it trusts the tokens of a stand-in identity
provider (tests/identity.py: real RS256/ES256 keys made here, a real JWKS file) and four API
keys (two readers valid at once, as during a rotation, an uploader and an operator). Limits are
tight so a client runs out within a few requests: queries 3 at once then one per 100 s, uploads
2 at once then one per 2 minutes. The same rules as plain code: tests/service/test_auth.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from identity import IdentityProvider, api_key, bearer, rsa_key
from serving import ServiceProcess
from support import real_clip

from pipeline.service.catalog import CatalogStore

pytestmark = pytest.mark.integration

CLIP = "drascula-track24-90s.mp3"
HTTP_TIMEOUT_S = 90
PROBLEM = "application/problem+json"
QUERIES_BURST = 3
ANALYSES_BURST = 2
TOOLS_ORIGIN = "https://tools.example.com"
NOT_AUDIO = b"these are notes, not music\n" * 20


class Keys:
    def __init__(self) -> None:
        self.reader, reader = api_key("reader-2026a", "moods:read")
        self.reader_next, reader_next = api_key("reader-2026b", "moods:read")
        self.uploader, uploader = api_key("uploader", "moods:analyse")
        self.operator, operator = api_key("operator", "moods:read moods:admin")
        self.hammer, hammer = api_key("hammer", "moods:read moods:analyse")
        self.entries = ";".join([reader, reader_next, uploader, operator, hammer])


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def idp(tmp_path_factory) -> IdentityProvider:
    return IdentityProvider(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def service(tmp_path_factory, idp, keys) -> Iterator[ServiceProcess]:
    try:
        with ServiceProcess(
            tmp_path_factory.mktemp("auth"),
            **idp.settings(),
            MOODSTREAM_AUTH_API_KEYS=keys.entries,
            MOODSTREAM_QUERIES_PER_SECOND="0.01",
            MOODSTREAM_QUERIES_BURST=str(QUERIES_BURST),
            MOODSTREAM_ANALYSES_PER_MINUTE="0.5",
            MOODSTREAM_ANALYSES_BURST=str(ANALYSES_BURST),
            MOODSTREAM_CORS_ORIGINS=TOOLS_ORIGIN,
        ) as running:
            yield running
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def stored(service, idp) -> dict[str, Any]:
    """A real clip's record, from an upload with the right token, stored in the catalog."""
    clip = real_clip(CLIP)
    with clip.open("rb") as f:
        answer = requests.post(
            service.url + "/v1/analyses",
            files={"file": (clip.name, f, "audio/mpeg")},
            headers=bearer(idp.token(scope="moods:analyse", sub="uploading-app")),
            timeout=HTTP_TIMEOUT_S,
        )
    assert answer.status_code == 200, answer.text
    record = answer.json()
    store = CatalogStore.open(service.catalog_url)
    try:
        store.upsert(record)
    finally:
        store.close()
    return record


def get(service: ServiceProcess, path: str, headers: dict[str, str] | None = None, **params: Any) -> requests.Response:
    return requests.get(service.url + path, headers=headers, params=params, timeout=HTTP_TIMEOUT_S)


def upload(service: ServiceProcess, headers: dict[str, str], body: bytes = NOT_AUDIO) -> requests.Response:
    return requests.post(
        service.url + "/v1/analyses",
        data=body,
        headers={**headers, "Content-Type": "application/octet-stream"},
        timeout=HTTP_TIMEOUT_S,
    )


def problem(answer: requests.Response, status: int, reason: str) -> dict[str, Any]:
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert answer.headers["content-type"] == PROBLEM, answer.headers
    body = answer.json()
    assert body["status"] == status and body["reason"] == reason and body["detail"], body
    if status in (401, 403):
        assert answer.headers["www-authenticate"], answer.headers
    return body


def protected_operations(service: ServiceProcess) -> list[tuple[str, str]]:
    """(method, path) of every operation the OpenAPI document says needs credentials, with the
    path parameters filled in; and /metrics, which is outside the document."""
    document = get(service, "/openapi.json").json()
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    found = [("GET", "/metrics")]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if operation.get("security"):
                found.append((method.upper(), path.replace("{track_id}", "some/track")))
    return found


# --- who may ask --------------------------------------------------------------------------------


def test_without_credentials_every_protected_route_is_401_and_the_open_ones_answer(service):
    operations = protected_operations(service)
    assert {path for _, path in operations} >= {
        "/v1/analyses",
        "/v1/tracks",
        "/v1/tracks/some/track",
        "/v1/tracks/some/track/similar",
        "/v1/moods",
        "/metrics",
    }
    for method, path in operations:
        answer = requests.request(method, service.url + path, data=NOT_AUDIO, timeout=HTTP_TIMEOUT_S)
        body = problem(answer, 401, "unauthenticated")
        assert "Bearer" in body["detail"] and "X-API-Key" in body["detail"]
        assert answer.headers["www-authenticate"].startswith('Bearer realm="moodstream"'), answer.headers
    for path in ("/healthz", "/readyz", "/", "/static/app.js", "/openapi.json"):
        assert get(service, path).status_code == 200, path


def test_a_wrong_expired_foreign_or_tampered_token_is_401(service, idp):
    wrong = {
        "signed by another key": idp.token(key=rsa_key()),
        "expired": idp.token(exp_in_s=-3600),
        "for another audience": idp.token(aud="billing"),
        "from another issuer": idp.token(iss="https://login.evil.invalid/"),
        "without exp": idp.token(exp_in_s=None),
        "not a JWT": "hello",
    }
    for case, token in wrong.items():
        answer = get(service, "/v1/moods", bearer(token))
        problem(answer, 401, "invalid_token")
        assert 'error="invalid_token"' in answer.headers["www-authenticate"], case
    problem(get(service, "/v1/moods", {"Authorization": "Basic dXNlcjpwYXNz"}), 401, "invalid_token")
    problem(get(service, "/v1/moods", {"X-API-Key": "msk_guessed"}), 401, "invalid_api_key")


def test_the_right_token_or_key_without_the_scope_is_403(service, idp, keys):
    reader = bearer(idp.token(scope="moods:read", sub="read-only-app"))
    body = problem(upload(service, reader), 403, "insufficient_scope")
    assert "moods:analyse" in body["detail"]
    answer = get(service, "/v1/moods", {"X-API-Key": keys.uploader})
    problem(answer, 403, "insufficient_scope")
    assert 'scope="moods:read"' in answer.headers["www-authenticate"]
    problem(get(service, "/metrics", {"X-API-Key": keys.reader}), 403, "insufficient_scope")
    problem(get(service, "/v1/moods", bearer(idp.token(scope=None))), 403, "insufficient_scope")


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_the_right_token_gets_its_answer(service, idp, stored, alg):
    headers = bearer(idp.token(scope="moods:read", sub=f"catalog-app-{alg}", alg=alg))
    assert get(service, "/v1/moods", headers).json()["moods"]
    track = get(service, f"/v1/tracks/{stored['track_id']}", headers)
    assert track.status_code == 200 and track.json() == stored
    feed = get(service, "/v1/tracks", headers, mood="relaxed")
    assert feed.status_code == 200 and [t["track_id"] for t in feed.json()["tracks"]] == [stored["track_id"]]
    assert get(service, f"/v1/tracks/{stored['track_id']}/similar", headers).status_code == 200


def test_two_api_keys_are_valid_at_once(service, keys, stored):
    for key in (keys.reader, keys.reader_next):
        answer = get(service, f"/v1/tracks/{stored['track_id']}", {"X-API-Key": key})
        assert answer.status_code == 200 and answer.json()["track_id"] == stored["track_id"]


def test_an_operator_reads_the_metrics_with_the_admin_scope(service, keys):
    text = get(service, "/metrics", {"X-API-Key": keys.operator}).text
    assert 'moodstream_auth_refusals_total{reason="unauthenticated"}' in text
    assert service.metric("moodstream_auth_refusals_total", {"X-API-Key": keys.operator}) >= 1


# --- how often ----------------------------------------------------------------------------------


def test_a_client_over_its_query_rate_gets_429_while_others_are_served(service, idp, keys):
    hammer = {"X-API-Key": keys.hammer}
    answers = [get(service, "/v1/tracks", hammer) for _ in range(QUERIES_BURST + 2)]
    assert [a.status_code for a in answers[:QUERIES_BURST]] == [200] * QUERIES_BURST
    refused = answers[QUERIES_BURST]
    body = problem(refused, 429, "rate_limited")
    assert int(refused.headers["retry-after"]) >= 1 and "queries" in body["detail"]
    # Others are served meanwhile: another key, a token, and cheap routes of the same client.
    assert get(service, "/v1/tracks", {"X-API-Key": keys.reader_next}).status_code == 200
    assert get(service, "/v1/tracks", bearer(idp.token(sub="someone-else"))).status_code == 200
    assert get(service, "/v1/moods", hammer).status_code == 200
    assert service.metric("moodstream_rate_limited_total", {"X-API-Key": keys.operator}) >= 1


def test_a_client_over_its_upload_rate_gets_429_while_others_upload(service, idp, keys):
    hammer = {"X-API-Key": keys.hammer}
    for _ in range(ANALYSES_BURST):
        problem(upload(service, hammer), 415, "undecodable")  # analysed (and refused): a token each
    refused = upload(service, hammer, b"\x00" * 5_000_000)
    problem(refused, 429, "rate_limited")
    assert int(refused.headers["retry-after"]) >= 1
    problem(upload(service, bearer(idp.token(scope="moods:analyse", sub="another-uploader"))), 415, "undecodable")


# --- headers -------------------------------------------------------------------------------------


def test_cors_answers_the_configured_origin_only(service, keys):
    def preflight(origin: str) -> requests.Response:
        return requests.options(
            service.url + "/v1/moods",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "x-api-key",
            },
            timeout=HTTP_TIMEOUT_S,
        )

    allowed = preflight(TOOLS_ORIGIN)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == TOOLS_ORIGIN
    assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers
    other = preflight("https://elsewhere.example")
    assert other.headers.get("access-control-allow-origin") is None
    answer = get(service, "/v1/moods", {"X-API-Key": keys.reader, "Origin": TOOLS_ORIGIN})
    assert answer.headers["access-control-allow-origin"] == TOOLS_ORIGIN
    assert "content-security-policy" in answer.headers


def test_the_page_and_its_assets_are_open_and_carry_the_headers(service):
    for path in ("/", "/static/app.js", "/static/style.css"):
        answer = get(service, path)
        assert answer.status_code == 200, path
        assert "script-src 'self'" in answer.headers["content-security-policy"]
        assert answer.headers["x-content-type-options"] == "nosniff"


def test_the_page_has_no_inline_script_or_handler():
    """What the CSP forbids, the page does not need: no inline <script>, no on*= handlers, no
    javascript: URLs, no inline styles in the HTML, and no HTML parsing of strings in its JS."""
    web = Path(__file__).resolve().parents[2] / "pipeline" / "service" / "web"
    html = (web / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts), scripts
    assert not re.search(r"\son[a-z]+\s*=", html, re.I) and "javascript:" not in html.lower()
    assert not re.search(r"<style|\sstyle\s*=", html, re.I)
    for js in [web / "app.js", *sorted((web / "vendor").rglob("*.js"))]:
        code = js.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in code, (js.name, sink)

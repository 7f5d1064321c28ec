"""Who may ask and how often, as plain code: :class:`pipeline.service.auth.Authenticator` on real
tokens signed by keys made here (RS256, ES256), a real JWKS file and a JWKS served over HTTP,
API keys; :class:`pipeline.service.limits.TokenBuckets` on a clock the test moves. The same
rules through the running service: tests/service/test_auth_service.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from identity import AUDIENCE, ISSUER, IdentityProvider, api_key, rsa_key
from pydantic import SecretStr

from pipeline.errors import ConfigError
from pipeline.service.auth import ADMIN, ANALYSE, READ, ApiKeys, Authenticator, Jwks, key_hash, parse_api_keys
from pipeline.service.limits import ANALYSES, QUERIES, Limits, TokenBuckets
from pipeline.service.problems import Problem
from pipeline.settings import describe, load_settings


@pytest.fixture
def idp(tmp_path) -> IdentityProvider:
    return IdentityProvider(tmp_path)


def authenticator(idp: IdentityProvider | None = None, **overrides) -> Authenticator:
    settings = {"auth_enabled": True, **(idp_settings(idp) if idp else {}), **overrides}
    return Authenticator(load_settings(**settings))


def idp_settings(idp: IdentityProvider) -> dict[str, str]:
    return {"auth_issuer": idp.issuer, "auth_audience": idp.audience, "auth_jwks_url": str(idp.jwks_path)}


def check(auth: Authenticator, *, token: str | None = None, key: str | None = None, scope: str = READ):
    authorization = None if token is None else f"Bearer {token}"
    return asyncio.run(auth.authenticate(authorization, key, scope, peer="127.0.0.1"))


def refused(status: int, reason: str, call, *args, **kwargs) -> Problem:
    with pytest.raises(Problem) as caught:
        call(*args, **kwargs)
    problem = caught.value
    assert (problem.status, problem.reason) == (status, reason), problem.detail
    if status in (401, 403):
        assert problem.headers["WWW-Authenticate"], problem.headers
    return problem


# --- tokens -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_a_right_token_is_a_principal_with_its_scopes(idp, alg):
    principal = check(authenticator(idp), token=idp.token(alg=alg, scope="moods:read moods:analyse", sub="rec-7"))
    assert principal.kind == "token" and principal.name == "rec-7"
    assert principal.scopes == {READ, ANALYSE} and principal.client == "token:rec-7"


def test_scopes_may_come_as_an_scp_list(idp):
    principal = check(authenticator(idp), token=idp.token(scope=None, scp=["moods:read"]))
    assert principal.scopes == {READ}


def test_an_audience_list_holding_ours_is_accepted(idp):
    check(authenticator(idp), token=idp.token(aud=["account", AUDIENCE]))


@pytest.mark.parametrize(
    ("claims", "says"),
    [
        ({"exp_in_s": -120}, "expired"),
        ({"aud": "another-service"}, "not for this service"),
        ({"iss": "https://evil.test.invalid/"}, "another issuer"),
        ({"exp_in_s": None}, "no exp claim"),
        ({"sub": None}, "no sub claim"),
        ({"aud": None}, "no aud claim"),
        ({"nbf": "in 600 s"}, "not valid yet"),
        ({"iat": "in 600 s"}, "not valid yet"),
    ],
)
def test_a_wrong_token_is_refused_with_its_reason(idp, claims, says):
    # Times from now, not from collection: the whole suite runs for many minutes before this.
    claims = {k: int(time.time()) + 600 if v == "in 600 s" else v for k, v in claims.items()}
    problem = refused(401, "invalid_token", check, authenticator(idp), token=idp.token(**claims))
    assert says in problem.detail
    assert 'error="invalid_token"' in problem.headers["WWW-Authenticate"]


def test_clock_skew_is_allowed_up_to_the_leeway_and_no_further(idp):
    auth = authenticator(idp, auth_leeway_s=30)
    check(auth, token=idp.token(exp_in_s=-10))  # expired 10 s ago: within 30 s of skew
    check(auth, token=idp.token(nbf=int(time.time()) + 10))
    refused(401, "invalid_token", check, auth, token=idp.token(exp_in_s=-45))
    refused(401, "invalid_token", check, auth, token=idp.token(nbf=int(time.time()) + 45))
    with pytest.raises(ConfigError):  # the skew itself is bounded
        load_settings(auth_leeway_s=3600)


def test_a_token_signed_by_another_key_or_tampered_with_is_refused(idp):
    auth = authenticator(idp)
    stranger = idp.token(key=rsa_key())  # same kid and alg, another key
    assert "signature" in refused(401, "invalid_token", check, auth, token=stranger).detail
    head, body, signature = idp.token(scope=READ).split(".")
    forged_body = jwt.utils.base64url_encode(
        json.dumps({**json.loads(jwt.utils.base64url_decode(body)), "scope": "moods:admin"}).encode()
    ).decode()
    refused(401, "invalid_token", check, auth, token=f"{head}.{forged_body}.{signature}")
    refused(401, "invalid_token", check, auth, token="not-a-jwt")
    refused(401, "invalid_token", check, auth, token="a" * 10_000)


def test_algorithm_confusion_and_unsigned_tokens_are_refused(idp):
    auth = authenticator(idp)
    rsa_public_pem = (
        idp.keys["rsa-1"][0]
        .public_key()
        .public_bytes(encoding=serialization.Encoding.PEM, format=serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "scope": "moods:admin", "exp": int(time.time()) + 60}
    # HS256 keyed with the public key (which anyone has): the classic confusion attack, signed
    # by hand (PyJWT itself refuses to make one).
    signing_input = b".".join(
        jwt.utils.base64url_encode(json.dumps(part).encode())
        for part in ({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, body)
    )
    mac = jwt.utils.base64url_encode(hmac.new(rsa_public_pem, signing_input, hashlib.sha256).digest())
    confused = (signing_input + b"." + mac).decode()
    assert "not accepted" in refused(401, "invalid_token", check, auth, token=confused).detail
    unsigned = jwt.encode(body, None, algorithm="none", headers={"kid": "rsa-1"})
    refused(401, "invalid_token", check, auth, token=unsigned)
    # An EC key's kid with RS256, an RSA kid with ES256: the key decides its algorithm.
    refused(401, "invalid_token", check, auth, token=idp.token(alg="RS256", kid="ec-1"))
    refused(401, "invalid_token", check, auth, token=idp.token(alg="ES256", kid="rsa-1"))
    # Only public-key algorithms can even be configured.
    for bad in ("HS256", "none", "RS256,HS512"):
        with pytest.raises(ConfigError):
            load_settings(auth_algorithms=bad)


def test_an_algorithm_not_configured_is_refused(idp):
    auth = authenticator(idp, auth_algorithms="ES256")
    check(auth, token=idp.token(alg="ES256"))
    refused(401, "invalid_token", check, auth, token=idp.token(alg="RS256"))


def test_a_right_token_without_the_scope_is_forbidden(idp):
    auth = authenticator(idp)
    problem = refused(403, "insufficient_scope", check, auth, token=idp.token(scope=READ), scope=ANALYSE)
    assert 'error="insufficient_scope"' in problem.headers["WWW-Authenticate"] and ANALYSE in problem.detail
    refused(403, "insufficient_scope", check, auth, token=idp.token(scope=None), scope=READ)


def test_no_credentials_or_another_scheme_is_unauthenticated(idp):
    auth = authenticator(idp)
    problem = refused(401, "unauthenticated", check, auth)
    assert problem.headers["WWW-Authenticate"].startswith('Bearer realm="moodstream"')
    with pytest.raises(Problem) as caught:
        asyncio.run(auth.authenticate("Basic dXNlcjpwYXNz", None, READ))
    assert caught.value.status == 401


def test_a_rotated_signing_key_is_fetched_when_a_token_names_it(idp):
    auth = authenticator(idp)
    check(auth, token=idp.token())
    idp.keys["rsa-2"] = (rsa_key(), "RS256")
    idp.publish()
    new = idp.token(kid="rsa-2", key=idp.keys["rsa-2"][0])
    # Fetched again at most every MIN_REFETCH_S: a token with a fresh kid waits for that.
    auth.jwks.min_refetch_s = 0
    assert check(auth, token=new).name == "client-1"
    del idp.keys["rsa-1"]  # retired: its tokens stop working once the keys are fetched again
    idp.publish()
    auth.jwks.refresh()
    refused(401, "invalid_token", check, auth, token=idp.token(kid="rsa-1", key=rsa_key()))


def test_unknown_key_ids_do_not_make_the_service_fetch_on_every_request(idp):
    now = [1000.0]
    jwks = Jwks(str(idp.jwks_path), refresh_s=300, min_refetch_s=30, clock=lambda: now[0])
    assert jwks.stale("rsa-1")
    jwks.refresh()
    assert not jwks.stale("rsa-1") and not jwks.stale("forged-kid")  # fetched 0 s ago
    now[0] += 31
    assert jwks.stale("forged-kid") and not jwks.stale("rsa-1")
    jwks.refresh()
    assert not jwks.stale("forged-kid")
    now[0] += 300
    assert jwks.stale("rsa-1")  # the regular refresh


def test_keys_held_survive_a_provider_outage_and_none_held_is_unavailable(idp, tmp_path):
    jwks = Jwks(str(idp.jwks_path))
    jwks.refresh()
    idp.jwks_path.write_text("<html>down for maintenance</html>")
    jwks.refresh()  # keeps what it had, logs
    assert jwks.key("rsa-1", "RS256") is not None
    auth = authenticator(idp, auth_jwks_url=str(tmp_path / "missing.json"))
    problem = refused(503, "unavailable", check, auth, token=idp.token())
    assert problem.retry_after_s


@pytest.fixture
def jwks_server(idp) -> Iterator[str]:
    """The provider's JWKS served over HTTP on 127.0.0.1, as an issuer's jwks_uri is."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = idp.jwks_path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/realms/music/protocol/openid-connect/certs"
    server.shutdown()


def test_keys_from_a_jwks_url(idp, jwks_server):
    auth = authenticator(idp, auth_jwks_url=jwks_server)
    assert check(auth, token=idp.token(alg="ES256")).kind == "token"
    with pytest.raises(ConfigError, match="https"):
        Jwks("http://login.example.com/certs")
    with pytest.raises(ConfigError):
        Jwks("ftp://login.example.com/certs")


def test_a_jwks_with_one_key_takes_tokens_without_a_kid(tmp_path):
    idp = IdentityProvider(tmp_path)
    del idp.keys["ec-1"]
    idp.publish()
    check(authenticator(idp), token=idp.token(kid=None))


# --- API keys -----------------------------------------------------------------------------------


def test_two_api_keys_are_valid_at_once_and_a_removed_one_is_not():
    old, old_entry = api_key("recommender-2026a", "moods:read")
    new, new_entry = api_key("recommender-2026b", "moods:read moods:analyse")
    auth = authenticator(auth_api_keys=f"{old_entry};{new_entry}")
    assert check(auth, key=old).name == "recommender-2026a"
    assert check(auth, key=new, scope=ANALYSE).client == "api_key:recommender-2026b"
    refused(403, "insufficient_scope", check, auth, key=old, scope=ANALYSE)
    rotated = authenticator(auth_api_keys=new_entry)
    refused(401, "invalid_api_key", check, rotated, key=old)
    refused(401, "invalid_api_key", check, rotated, key=old + "x")
    refused(401, "invalid_api_key", check, rotated, key="")


def test_api_keys_from_a_file_follow_it_when_it_changes(tmp_path):
    first, first_entry = api_key("batch", "moods:read")
    second, second_entry = api_key("batch-next", "moods:read")
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# rotated monthly\n{first_entry}\n")
    auth = authenticator(auth_api_keys_file=str(keys_file))
    check(auth, key=first)
    refused(401, "invalid_api_key", check, auth, key=second)
    keys_file.write_text(f"{first_entry}\n{second_entry}  # the new one\n")
    check(auth, key=second)
    keys_file.write_text("garbage that is no entry")  # a broken update keeps the last good keys
    check(auth, key=second)


def test_only_hashes_are_stored_and_malformed_entries_are_named_not_echoed():
    key, entry = api_key("ops", "moods:admin")
    assert key not in entry and key_hash(key) in entry
    [parsed] = parse_api_keys(entry, "here")
    assert parsed.scopes == {ADMIN} and parsed.sha256.hex() == key_hash(key)
    for bad in (f"ops:{key}:moods:read", f"ops:{key_hash(key)}:", f"ops:{key_hash(key)}:moods:everything", "ops"):
        with pytest.raises(ConfigError) as caught:
            parse_api_keys(bad, "MOODSTREAM_AUTH_API_KEYS")
        assert key not in str(caught.value)
    with pytest.raises(ConfigError, match="twice"):
        parse_api_keys(f"{entry};{entry}", "here")
    assert not ApiKeys("", None)


def test_the_key_setting_is_a_secret_never_shown(tmp_path):
    _, entry = api_key("ops", "moods:read")
    settings = load_settings(auth_enabled=True, auth_api_keys=entry)
    assert isinstance(settings.auth_api_keys, SecretStr) and entry not in repr(settings)
    rows = {name: default for name, _, default, _ in describe()}
    assert rows["MOODSTREAM_AUTH_API_KEYS"] == "(secret)" and rows["MOODSTREAM_AUTH_ENABLED"] == "False"


def test_auth_on_needs_a_way_in_and_tokens_need_issuer_and_audience(idp):
    with pytest.raises(ConfigError, match="needs a way in"):
        load_settings(auth_enabled=True)
    with pytest.raises(ConfigError, match="ISSUER"):
        load_settings(auth_enabled=True, auth_jwks_url=str(idp.jwks_path))


def test_auth_off_is_an_anonymous_principal_by_address():
    principal = asyncio.run(Authenticator(load_settings()).authenticate(None, None, ANALYSE, peer="10.1.2.3"))
    assert principal.kind == "anonymous" and principal.client == "anonymous:10.1.2.3"
    assert {READ, ANALYSE, ADMIN} <= principal.scopes


# --- per-client limits ----------------------------------------------------------------------------


def test_a_client_over_its_rate_waits_while_others_are_served():
    now = [0.0]
    buckets = TokenBuckets(rate_per_s=0.5, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(2.0)  # one token every 2 s
    assert buckets.take("b") == 0.0  # another client has its own bucket
    now[0] += 2.0
    assert buckets.take("a") == 0.0 and buckets.take("a") > 0
    now[0] += 3600
    assert [buckets.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled to the burst, no more


def test_buckets_forget_the_least_recent_clients_beyond_their_bound():
    buckets = TokenBuckets(rate_per_s=1, burst=1, max_clients=100, clock=lambda: 0.0)
    for n in range(1000):
        buckets.take(f"client-{n}")
    assert len(buckets) == 100


def test_limits_answer_429_with_retry_after_and_a_rate_of_0_is_off():
    now = [0.0]
    limits = Limits(load_settings(analyses_per_minute=6, analyses_burst=1, queries_per_second=0), clock=lambda: now[0])
    limits.take(ANALYSES, "token:a")
    problem = refused(429, "rate_limited", limits.take, ANALYSES, "token:a")
    assert problem.retry_after_s == 10 and "6 a minute" in problem.detail
    limits.take(ANALYSES, "token:b")
    for _ in range(1000):
        limits.take(QUERIES, "token:a")  # off


def test_moodstream_api_key_prints_a_key_and_the_entry_that_admits_it(capsys):
    from pipeline.cli import main

    assert main(["api-key", "recommender-2026-12", "moods:read", "moods:analyse"]) == 0
    out, err = capsys.readouterr()
    key = re.search(r"msk_\S+", err).group()
    entry = out.strip()
    assert key.startswith("msk_") and key not in out
    auth = authenticator(auth_api_keys=entry)
    assert check(auth, key=key, scope=ANALYSE).name == "recommender-2026-12"
    assert main(["api-key", "x", "moods:write"]) == 2

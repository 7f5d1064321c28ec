"""Who may ask what: OAuth2/OIDC bearer tokens and API keys, and the scope each route needs.

With ``MOODSTREAM_AUTH_ENABLED`` a request to a protected route carries one of

* ``Authorization: Bearer <JWT>``: an access token of the identity provider, checked here
  against its signing keys (a JWKS, :class:`Jwks`): signature (public-key algorithms only,
  ``MOODSTREAM_AUTH_ALGORITHMS``), ``iss`` = ``MOODSTREAM_AUTH_ISSUER``, ``aud`` contains
  ``MOODSTREAM_AUTH_AUDIENCE``, ``exp`` (required), ``nbf`` and ``iat`` within
  ``MOODSTREAM_AUTH_LEEWAY_S`` of this clock, a ``sub``; its scopes from ``scope`` (space
  separated) or ``scp`` (a list);
* ``X-API-Key: <key>``: a machine's key, known here only by its SHA-256 (:class:`ApiKeys`), with
  the scopes its entry lists; several keys are valid at once, so one can be rotated without a gap.

Scopes: :data:`READ` (the catalog, the moods), :data:`ANALYSE` (uploads), :data:`ADMIN`
(``/metrics`` on the service port). No credentials or unusable ones: 401 with
``WWW-Authenticate``; good credentials without the scope: 403. Every refusal is a problem
(:mod:`pipeline.service.problems`) with its reason, counted in ``moodstream_auth_refusals_total``.
Without ``MOODSTREAM_AUTH_ENABLED`` every request is an anonymous principal holding every scope,
known by its peer address (for the per-client limits, :mod:`pipeline.service.limits`).

The classes are plain and synchronous where they can be (unit tests call them); :func:`allow`
wires them into FastAPI as a dependency of each protected route.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from pipeline import metrics
from pipeline.errors import ConfigError, ServiceUnavailable
from pipeline.service.problems import Problem
from pipeline.settings import Settings

log = logging.getLogger(__name__)

READ = "moods:read"
ANALYSE = "moods:analyse"
ADMIN = "moods:admin"
#: Every scope a route can require, with what it allows.
SCOPES = {
    READ: "read the catalog: tracks, feeds, similar tracks, the mood families",
    ANALYSE: "upload audio for analysis (POST /v1/analyses)",
    ADMIN: "the service's own metrics (/metrics on the service port)",
}
REALM = "moodstream"
API_KEY_HEADER = "X-API-Key"
#: How often a token naming an unknown signing key may make the service fetch the keys again.
MIN_REFETCH_S = 30.0
#: Largest bearer token or API key read, in bytes; longer ones are refused unread.
MAX_CREDENTIAL_BYTES = 8192
#: Which key type each family of signature algorithms needs (the JWK's ``kty``).
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: ``kind`` ``token`` (``name`` = its subject), ``api_key``
    (the key's name) or ``anonymous`` (auth off; its peer address)."""

    kind: str
    name: str
    scopes: frozenset[str]

    @property
    def client(self) -> str:
        """The identity the per-client limits count by."""
        return f"{self.kind}:{self.name}"


# --- API keys ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: bytes
    scopes: frozenset[str]


def new_api_key() -> str:
    """A fresh random key (256 bits): give it to the client once, store only its hash."""
    return "msk_" + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    """What the settings store of a key: its SHA-256, hex. A plain hash suffices: the keys are
    random 256-bit strings, not passwords (nothing to guess, nothing to stretch)."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_api_keys(text: str, where: str) -> list[ApiKey]:
    """Entries ``NAME:SHA256HEX:SCOPE [SCOPE…]``, separated by ``;`` or newlines; ``#`` starts a
    comment. A malformed entry is a :class:`ConfigError` naming its place (never its text)."""
    keys: list[ApiKey] = []
    for number, raw in enumerate(re.split(r"[;\n]", text), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        name, _, rest = entry.partition(":")
        digest, _, scope_text = rest.partition(":")
        scopes = frozenset(scope_text.split())
        name, digest = name.strip(), digest.strip().lower()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise ConfigError(
                f"{where}, entry {number}: the name must be letters, digits, . _ - (NAME:SHA256HEX:SCOPES)"
            )
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ConfigError(f"{where}, entry {number} ({name}): the key must be given as its SHA-256 in hex")
        unknown = scopes - set(SCOPES)
        if not scopes or unknown:
            raise ConfigError(
                f"{where}, entry {number} ({name}): scopes must be some of {', '.join(SCOPES)}, got {scope_text.strip()!r}"
            )
        keys.append(ApiKey(name, bytes.fromhex(digest), scopes))
    names = [k.name for k in keys]
    if len(names) != len(set(names)):
        raise ConfigError(f"{where}: a key name appears twice ({sorted({n for n in names if names.count(n) > 1})})")
    return keys


class ApiKeys:
    """The valid API keys: those of a setting and of a file (re-read when it changes, so a
    rotated Kubernetes Secret takes effect without a restart)."""

    def __init__(self, inline: str = "", path: Path | None = None) -> None:
        self._inline = parse_api_keys(inline, "MOODSTREAM_AUTH_API_KEYS")
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._from_file: list[ApiKey] = []
        self.reload()

    def __bool__(self) -> bool:
        return bool(self._inline or self._path)

    def reload(self) -> None:
        """Read the file again if it changed; a file that turned unreadable keeps the last keys."""
        if self._path is None:
            return
        try:
            info = self._path.stat()
            stamp = (info.st_mtime_ns, info.st_size)
            if stamp != self._stamp:
                self._from_file = parse_api_keys(self._path.read_text(), str(self._path))
                self._stamp = stamp
        except OSError as exc:
            if self._stamp is None:
                raise ConfigError(f"cannot read MOODSTREAM_AUTH_API_KEYS_FILE {self._path}: {exc}") from None
            log.warning("keeping the API keys read before: %s", exc)
        except ConfigError as exc:
            if self._stamp is None:
                raise
            log.warning("keeping the API keys read before: %s", exc)

    def verify(self, presented: str) -> ApiKey | None:
        """The entry of ``presented``, or None. Every entry is compared, in constant time."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key in [*self._inline, *self._from_file]:
            if hmac.compare_digest(key.sha256, digest):
                found = key
        return found


# --- signing keys (JWKS) -----------------------------------------------------------------------


class Jwks:
    """The identity provider's signing keys from ``source`` (https://…, http:// to localhost
    only, a file path or file://…), kept ``refresh_s`` and fetched again early when a token
    names a key not among them, but never more often than every ``min_refetch_s`` (so forged
    key ids cannot make the service hammer the provider, nor an outage of it every request)."""

    def __init__(
        self,
        source: str,
        *,
        refresh_s: float = 300.0,
        min_refetch_s: float = MIN_REFETCH_S,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.refresh_s = refresh_s
        self.min_refetch_s = min_refetch_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._keys: dict[str, dict[str, Any]] | None = None
        self._fetched_at = self._tried_at = -float("inf")
        parsed = urllib.parse.urlsplit(source)
        if parsed.scheme == "http" and parsed.hostname not in ("localhost", "127.0.0.1", "::1"):
            raise ConfigError("MOODSTREAM_AUTH_JWKS_URL: use https:// (http:// only to localhost)")
        if parsed.scheme not in ("https", "http", "file", ""):
            raise ConfigError(f"MOODSTREAM_AUTH_JWKS_URL: https://…, file://… or a path, got {parsed.scheme}://")

    @property
    def loaded(self) -> bool:
        return self._keys is not None

    def stale(self, kid: str | None) -> bool:
        """Whether to fetch the keys before checking a token that names ``kid``."""
        now = self._clock()
        if now - self._tried_at < self.min_refetch_s:
            return False
        if self._keys is None or now - self._fetched_at >= self.refresh_s:
            return True
        return kid is not None and kid not in self._keys

    def refresh(self) -> None:
        """Fetch the keys (blocking). A failure keeps the keys held before, if any; with none
        held it is ServiceUnavailable."""
        self._tried_at = self._clock()
        try:
            document = json.loads(self._read())
            keys = {}
            for n, jwk in enumerate(document["keys"]):
                if isinstance(jwk, dict) and jwk.get("use", "sig") == "sig" and "kty" in jwk:
                    keys[str(jwk.get("kid", f"#{n}"))] = jwk
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if self._keys is None:
                raise ServiceUnavailable(f"the token signing keys cannot be read: {type(exc).__name__}") from None
            log.warning("keeping the signing keys fetched before; %s: %s", self.source, exc)
            return
        self._keys = keys
        self._fetched_at = self._tried_at

    def key(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        """The key to check a token of ``alg`` naming ``kid`` with (a token without a kid: the
        only key, when there is one), or None."""
        keys = self._keys or {}
        only = next(iter(keys.values())) if len(keys) == 1 else None
        jwk = only if kid is None else keys.get(kid)
        if jwk is None or jwk.get("alg", alg) != alg or _KEY_TYPES.get(alg[:2]) != jwk.get("kty"):
            return None
        try:
            return jwt.PyJWK(jwk, algorithm=alg)
        except jwt.PyJWKError:
            return None

    def _read(self) -> str:
        parsed = urllib.parse.urlsplit(self.source)
        if parsed.scheme in ("https", "http"):
            request = urllib.request.Request(self.source, headers={"Accept": "application/json"})
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                return answer.read(1024 * 1024).decode()
        path = Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme == "file" else Path(self.source)
        return path.read_text()


# --- the authenticator -------------------------------------------------------------------------


class Authenticator:
    """Turns a request's credentials into a :class:`Principal` holding a scope, or a Problem."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.enabled = settings.auth_enabled
        self.issuer = settings.auth_issuer
        self.audience = settings.auth_audience
        self.algorithms = list(settings.auth_algorithms)
        self.leeway_s = settings.auth_leeway_s
        self._clock = clock
        self.jwks = (
            Jwks(settings.auth_jwks_url, refresh_s=settings.auth_jwks_refresh_s) if settings.auth_jwks_url else None
        )
        self.keys = ApiKeys(settings.auth_api_keys.get_secret_value(), settings.auth_api_keys_file)
        self._refreshing = asyncio.Lock()

    async def authenticate(
        self, authorization: str | None, api_key: str | None, scope: str, *, peer: str = "unknown"
    ) -> Principal:
        """The principal of a request with these headers, holding ``scope``; else a Problem."""
        if not self.enabled:
            return Principal("anonymous", peer, frozenset(SCOPES))
        if authorization:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or self.jwks is None:
                raise self._refuse(
                    401, "invalid_token", f"the Authorization scheme {scheme[:20]!r} is not accepted here"
                )
            token = token.strip()
            if self.jwks.stale(_kid(token)):
                async with self._refreshing:
                    if self.jwks.stale(_kid(token)):
                        try:
                            await asyncio.to_thread(self.jwks.refresh)
                        except ServiceUnavailable as exc:
                            raise Problem(503, "unavailable", str(exc), retry_after_s=int(MIN_REFETCH_S)) from None
            if not self.jwks.loaded:
                raise Problem(
                    503, "unavailable", "the token signing keys cannot be read yet", retry_after_s=int(MIN_REFETCH_S)
                )
            principal = self.verify_token(token)
        elif api_key is not None:
            principal = self.verify_api_key(api_key)
        else:
            raise self._refuse(401, "unauthenticated", self._how_to_authenticate())
        return self.authorize(principal, scope)

    def verify_token(self, token: str) -> Principal:
        """The principal of a bearer token, with the signing keys held now; else a 401 Problem."""
        if self.jwks is None:
            raise self._refuse(401, "invalid_token", "this service takes no bearer tokens")
        if len(token) > MAX_CREDENTIAL_BYTES:
            raise self._refuse(401, "invalid_token", "the token is too long")
        try:
            header = jwt.get_unverified_header(token)
            alg = str(header.get("alg"))
            if alg not in self.algorithms:
                raise jwt.InvalidAlgorithmError(f"tokens signed with {alg[:20]!r} are not accepted")
            kid = header.get("kid")
            key = self.jwks.key(None if kid is None else str(kid), alg)
            if key is None:
                raise jwt.InvalidKeyError("no signing key of the issuer matches the token's kid and alg")
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"], "enforce_minimum_key_length": True},
            )
            # PyJWT checks exp and nbf; a token issued in the future is a forgery or a wrong clock.
            if isinstance(claims.get("iat"), int | float) and claims["iat"] > self._clock() + self.leeway_s:
                raise jwt.ImmatureSignatureError("the token was issued in the future (iat)")
        except jwt.ExpiredSignatureError:
            raise self._refuse(401, "invalid_token", "the token has expired") from None
        except jwt.InvalidAudienceError:
            raise self._refuse(
                401, "invalid_token", f"the token is not for this service (aud must name {self.audience})"
            ) from None
        except jwt.InvalidIssuerError:
            raise self._refuse(401, "invalid_token", "the token comes from another issuer (iss)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise self._refuse(401, "invalid_token", f"the token has no {exc.claim} claim") from None
        except jwt.ImmatureSignatureError as exc:
            raise self._refuse(401, "invalid_token", f"the token is not valid yet: {exc}") from None
        except jwt.InvalidSignatureError:
            raise self._refuse(401, "invalid_token", "the token's signature does not verify") from None
        except jwt.PyJWTError as exc:  # malformed, wrong algorithm, unknown key, …
            raise self._refuse(401, "invalid_token", f"the token is not accepted: {_plain(str(exc))}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise self._refuse(401, "invalid_token", "the token's sub claim is not a name")
        return Principal("token", subject[:256], _scopes(claims))

    def verify_api_key(self, presented: str) -> Principal:
        """The principal of an API key; else a 401 Problem."""
        if not self.keys:
            raise self._refuse(401, "invalid_api_key", "this service takes no API keys")
        if len(presented) > MAX_CREDENTIAL_BYTES:
            raise self._refuse(401, "invalid_api_key", "the API key is too long")
        self.keys.reload()
        key = self.keys.verify(presented)
        if key is None:
            raise self._refuse(401, "invalid_api_key", "the API key is not known here (revoked, or mistyped?)")
        return Principal("api_key", key.name, key.scopes)

    def authorize(self, principal: Principal, scope: str) -> Principal:
        """``principal`` if it holds ``scope``; else a 403 Problem."""
        if scope in principal.scopes:
            return principal
        scheme = "Bearer" if principal.kind == "token" else "ApiKey"
        metrics.AUTH_REFUSALS.labels("insufficient_scope").inc()
        raise Problem(
            403,
            "insufficient_scope",
            f"this needs the scope {scope} ({SCOPES[scope]}); the credentials hold: {' '.join(sorted(principal.scopes)) or 'none'}",
            headers={"WWW-Authenticate": f'{scheme} realm="{REALM}", error="insufficient_scope", scope="{scope}"'},
        )

    def challenges(self, error: str | None = None, description: str = "") -> str:
        """The WWW-Authenticate value: one challenge per accepted kind of credential."""
        found = []
        if self.jwks is not None:
            bearer = f'Bearer realm="{REALM}"'
            if error:
                bearer += f', error="{error}", error_description="{_plain(description)}"'
            found.append(bearer)
        if self.keys:
            found.append(f'ApiKey realm="{REALM}", header="{API_KEY_HEADER}"')
        return ", ".join(found)

    def _how_to_authenticate(self) -> str:
        ways = []
        if self.jwks is not None:
            ways.append("Authorization: Bearer <an access token of the identity provider>")
        if self.keys:
            ways.append(f"{API_KEY_HEADER}: <an API key>")
        return "send " + " or ".join(ways)

    def _refuse(self, status: int, reason: str, detail: str) -> Problem:
        metrics.AUTH_REFUSALS.labels(reason).inc()
        error = "invalid_token" if reason == "invalid_token" else None
        return Problem(status, reason, detail, headers={"WWW-Authenticate": self.challenges(error, detail)})


def _kid(token: str) -> str | None:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        return None
    return None if kid is None else str(kid)


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    found: set[str] = set()
    for claim in ("scope", "scp"):
        value = claims.get(claim)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(s for s in value if isinstance(s, str))
    return frozenset(found)


def _plain(text: str) -> str:
    """Text safe inside a quoted header parameter: printable ASCII without quotes or backslashes."""
    return re.sub(r'[^\x20-\x7e]|["\\]', "?", text)[:200]


# --- FastAPI wiring ------------------------------------------------------------------------------

# Declared for the OpenAPI document (schemathesis and clients read the schemes from it); the
# headers themselves are read by Authenticator.authenticate.
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="JWT",
    description="An OAuth2/OIDC access token (JWT) of the identity provider; scopes: " + ", ".join(SCOPES),
)
_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, scheme_name="apiKey", description="A machine's API key.")


def allow(scope: str, *, limit: str | None = None) -> Any:
    """A route dependency: the request's :class:`Principal`, holding ``scope``; with ``limit``
    (a name of :mod:`pipeline.service.limits`) it also takes one of the client's tokens."""

    async def guard(
        request: Request,
        _bearer_credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
        _api_key_value: Annotated[str | None, Security(_api_key)],
    ) -> Principal:
        state = request.app.state.moodstream
        peer = request.client.host if request.client else "unknown"
        principal = await state.auth.authenticate(
            request.headers.get("authorization"), request.headers.get(API_KEY_HEADER), scope, peer=peer
        )
        if limit is not None:
            state.limits.take(limit, principal.client)
        request.state.principal = principal
        return principal

    guard.__name__ = f"allow_{scope.replace(':', '_')}" + (f"_{limit}" if limit else "")
    return Depends(guard)

"""A stand-in identity provider for the tests: real keys (made here with cryptography, never
committed), a real JWKS file, real signed tokens, and API keys with their hashed entries.

    idp = IdentityProvider(folder)                 # an RSA and an EC P-256 key, folder/jwks.json
    idp.token(scope="moods:read")                  # RS256, valid for 5 minutes
    idp.token(alg="ES256", aud="someone-else")     # any claim can be changed or dropped (None)
    key, entry = api_key("recommender", "moods:read")   # entry goes into MOODSTREAM_AUTH_API_KEYS
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pipeline.service.auth import key_hash, new_api_key

ISSUER = "https://login.test.invalid/realms/music"
AUDIENCE = "moodstream"
_UNSET: Any = object()


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if alg.startswith(("RS", "PS")) else jwt.algorithms.ECAlgorithm
    jwk = json.loads(algorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


class IdentityProvider:
    """Signs tokens with its keys and publishes their public halves at :attr:`jwks_path`."""

    def __init__(self, folder: Path, *, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.issuer, self.audience = issuer, audience
        self.jwks_path = folder / "jwks.json"
        self.keys: dict[str, tuple[Any, str]] = {"rsa-1": (rsa_key(), "RS256"), "ec-1": (ec_key(), "ES256")}
        self.publish()

    def publish(self) -> None:
        """Write the JWKS of :attr:`keys` (call again after adding or removing one)."""
        document = {"keys": [public_jwk(key, kid, alg) for kid, (key, alg) in self.keys.items()]}
        self.jwks_path.write_text(json.dumps(document))

    def token(
        self,
        *,
        scope: str | None = "moods:read moods:analyse",
        sub: str | None = "client-1",
        aud: Any = _UNSET,
        iss: Any = _UNSET,
        exp_in_s: float | None = 300,
        alg: str = "RS256",
        kid: str | None = _UNSET,
        key: Any = None,
        **claims: Any,
    ) -> str:
        """A token signed by this provider's key for ``alg`` (or ``key``); a claim given None is left out."""
        now = time.time()
        body = {
            "iss": self.issuer if iss is _UNSET else iss,
            "aud": self.audience if aud is _UNSET else aud,
            "sub": sub,
            "scope": scope,
            "iat": int(now),
            "exp": None if exp_in_s is None else int(now + exp_in_s),
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        kid_of = {a: k for k, (_, a) in self.keys.items()}
        the_kid = kid_of.get(alg) if kid is _UNSET else kid
        signing_key = key if key is not None else self.keys[kid_of[alg]][0]
        headers = {} if the_kid is None else {"kid": the_kid}
        return jwt.encode(body, signing_key, algorithm=alg, headers=headers)

    def settings(self) -> dict[str, str]:
        """The service's settings that trust this provider."""
        return {
            "MOODSTREAM_AUTH_ENABLED": "true",
            "MOODSTREAM_AUTH_ISSUER": self.issuer,
            "MOODSTREAM_AUTH_AUDIENCE": self.audience,
            "MOODSTREAM_AUTH_JWKS_URL": str(self.jwks_path),
        }


def api_key(name: str, scopes: str) -> tuple[str, str]:
    """A new key and its entry for MOODSTREAM_AUTH_API_KEYS (NAME:SHA256HEX:SCOPES)."""
    key = new_api_key()
    return key, f"{name}:{key_hash(key)}:{scopes}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}

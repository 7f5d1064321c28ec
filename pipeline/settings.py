"""Every moodstream setting, declared once: name, type, default, environment variable, doc.

Settings are read from ``MOODSTREAM_*`` environment variables (and a ``.env`` file if present)
and validated when a command starts; :func:`load_settings` turns a validation failure into one
:class:`~pipeline.errors.ConfigError` naming the variables at fault. S3 endpoint, region and
credentials are *not* settings of ours: boto3 reads the standard AWS environment
(``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, mounted web-identity tokens…),
so production credentials never pass through moodstream code.

Settings are read by the pipeline's wiring (``app``, ``cli``) and handed to stage functions as
plain arguments; model code never sees this object.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from pipeline.errors import ConfigError

#: The Triton model repository shipped beside this package: a clone's ``triton_models/``, or the
#: copy that installing the package puts next to it in site-packages.
DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parent.parent / "triton_models"


class ScorerKind(str, Enum):
    triton = "triton"  # gRPC to a Triton server (production, and the embedded demo)
    onnx = "onnx"  # in-process onnxruntime on the same model file (no server)


class KafkaSecurity(str, Enum):
    plaintext = "PLAINTEXT"
    ssl = "SSL"
    sasl_plaintext = "SASL_PLAINTEXT"
    sasl_ssl = "SASL_SSL"

    @property
    def uses_ssl(self) -> bool:
        return self in (KafkaSecurity.ssl, KafkaSecurity.sasl_ssl)

    @property
    def uses_sasl(self) -> bool:
        return self in (KafkaSecurity.sasl_plaintext, KafkaSecurity.sasl_ssl)


class Settings(BaseSettings):
    """All settings; environment variable = ``MOODSTREAM_`` + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="MOODSTREAM_", env_file=".env", extra="ignore", frozen=True)

    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated host:port.")
    kafka_security_protocol: KafkaSecurity = Field(
        KafkaSecurity.plaintext, description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    kafka_sasl_mechanism: str = Field("SCRAM-SHA-512", description="SASL mechanism when the protocol is SASL_*.")
    kafka_sasl_username: str = Field("", description="SASL user (mount it from a secret).")
    kafka_sasl_password: SecretStr = Field(
        SecretStr(""), description="SASL password (mount it from a secret; never logged)."
    )
    input_topic: str = Field("tracks.ingested", description="Topic announcing ingested tracks.")
    output_topic: str = Field("tracks.moods", description="Topic receiving mood tags.")
    dlq_topic: str = Field("tracks.moods.dlq", description="Topic receiving dead letters.")
    consumer_group: str = Field("moodstream-worker", description="Consumer group (the Faust app id).")
    batch_size: int = Field(8, ge=1, le=512, description="Most tracks taken from the stream into one batch.")
    batch_window_s: float = Field(0.5, gt=0, le=60, description="Longest wait for a batch to fill, in seconds.")
    kafka_session_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Consumer session timeout: a crashed worker's partitions move after this long."
    )
    kafka_heartbeat_interval_s: float = Field(
        1.0, gt=0, le=60, description="Consumer heartbeat interval (well under the session timeout)."
    )
    kafka_rebalance_timeout_s: float = Field(
        10.0, gt=0, le=300, description="How long a rebalance waits for members to rejoin."
    )
    kafka_group_instance_id: str = Field(
        "",
        description="Static group membership id, unique per worker (e.g. the pod name): a restarted worker gets its partitions back without a rebalance. Empty: dynamic membership.",
    )
    metrics_port: int = Field(9108, ge=0, le=65535, description="Port of the worker's Prometheus /metrics (0: off).")

    # --- Storage -----------------------------------------------------------------------------
    allowed_buckets: Annotated[list[str], NoDecode] = Field(
        ["moodstream-audio"],
        description="S3 buckets events may reference (JSON list or comma separated).",
    )
    max_object_bytes: int = Field(512 * 1024 * 1024, ge=1, description="Largest audio object fetched, in bytes.")
    allow_file_uris: bool = Field(
        False, description="Accept file:// URIs in events (local demos only, never production)."
    )
    s3_max_attempts: int = Field(
        5, ge=1, le=20, description="Attempts per S3 call on throttling and 5xx (with backoff)."
    )

    # --- Audio -------------------------------------------------------------------------------
    decode_workers: int = Field(2, ge=1, le=64, description="Processes decoding and computing mels inside one batch.")
    max_duration_s: float = Field(
        3600.0, gt=0, description="Audio beyond this many seconds is not decoded or analysed."
    )
    min_duration_s: float = Field(1.0, gt=0, description="Shorter audio is dead-lettered as too_short.")
    excerpts: int = Field(
        0,
        ge=0,
        le=100,
        description="Analyse at most this many evenly spread excerpts of a longer track, seeking "
        "past the rest (0 = the whole track; see docs/performance.md, Analysis window).",
    )
    excerpt_s: float = Field(15.0, ge=3.0, le=600.0, description="Length of each excerpt, in seconds.")

    # --- Scoring -----------------------------------------------------------------------------
    scorer: ScorerKind = Field(ScorerKind.triton, description="triton or onnx (in-process).")
    model: str = Field(
        "musicnn",
        description="Model name in the model repository: musicnn runs the MSD and MTT networks in one pass; musicnn_msd or musicnn_mtt one of them.",
    )
    model_version: str = Field("", description="Triton version of the model to call (empty: the server's latest).")
    model_repository: Path = Field(
        DEFAULT_MODEL_REPOSITORY,
        description="Model repository (read for model metadata, and by the onnx scorer).",
    )
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC host:port.")
    triton_timeout_s: float = Field(30.0, gt=0, description="Deadline of one Triton request, in seconds.")
    triton_max_attempts: int = Field(
        4, ge=1, le=20, description="Attempts per Triton request before the outage handling."
    )
    triton_shared_memory: bool = Field(
        True,
        description="Hand the worker's patches to Triton through this host's shared memory when the server can open it "
        "(it runs beside the worker); a server that cannot is detected on the first track and the requests carry them.",
    )
    max_patches_per_request: int = Field(
        64, ge=1, description="Most patches in one inference request (the model's max batch)."
    )
    onnx_batch_patches: int = Field(
        1,
        ge=1,
        le=1024,
        description="Patches per onnxruntime run (1 is the cheapest on a CPU; each holds ~40 MB of activations).",
    )
    onnx_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads for the onnx scorer (0 = all cores).")

    # --- Output ------------------------------------------------------------------------------
    audio_features: bool = Field(
        True,
        description="Compute each track's audio features (tempo, beats, key, loudness, energy, danceability... "
        "per track and timeline segment; docs/audio-features.md) from the audio the worker decodes anyway.",
    )
    moods_file: Path | None = Field(
        None,
        description="Mood families, the top-mood rule and the mood plane (TOML; unset: the moods.toml shipped in pipeline/stages).",
    )
    top_moods: int = Field(3, ge=1, le=20, description="Mood families listed in top_moods.")
    timeline_segment_s: float = Field(
        30.0, gt=0, description="Length of one timeline segment in the output, in seconds."
    )
    embeddings: bool = Field(
        True,
        description="Put each network's 200-d audio embedding of the track (float16, base64) in the output; off for consumers that do not want it (about 1.1 kB a record).",
    )

    # --- HTTP service (moodstream serve) and its catalog --------------------------------------
    service_host: str = Field("127.0.0.1", description="Address the HTTP service listens on (0.0.0.0 in a container).")
    service_port: int = Field(
        8080,
        ge=1,
        le=65535,
        description="Port of the HTTP service (page, API; /metrics unless MOODSTREAM_SERVICE_METRICS_PORT).",
    )
    catalog_url: SecretStr = Field(
        SecretStr("sqlite:///.moodstream/catalog.db"),
        description="The catalog's database: sqlite:///path.db (embedded default) or postgresql://user:password@host:port/db (mount it from a secret; never logged).",
    )
    catalog_follow: bool = Field(
        True,
        description="Fill the catalog from the output topic inside the service (off: serve an existing catalog read-only).",
    )
    catalog_group: str = Field(
        "moodstream-catalog", description="Consumer group of the service's catalog consumer of the output topic."
    )
    index_dir: Path = Field(
        Path(".moodstream/index"),
        description="Where the similar-tracks index is persisted (rebuilt from the catalog when missing or stale).",
    )
    similar_network: str = Field(
        "",
        description="Network whose audio embedding /similar compares, e.g. musicnn_msd (empty: the model's first network).",
    )
    max_upload_bytes: int = Field(
        100 * 1024 * 1024, ge=1024, description="Largest upload POST /v1/analyses accepts, in bytes (beyond: 413)."
    )
    analysis_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Longest one upload's analysis may take, in seconds (beyond: 504)."
    )
    max_analyses_in_flight: int = Field(
        4,
        ge=1,
        le=256,
        description="Uploads analysed at once; beyond it POST /v1/analyses answers 503 with Retry-After.",
    )

    service_metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Serve the HTTP service's Prometheus /metrics on this port alone, unauthenticated, for Prometheus (keep it off the ingress). 0: on the service port, where with auth on it needs the moods:admin scope.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [],
        description="Origins (scheme://host[:port]) whose pages may call the API from a browser (CORS; JSON list or comma separated). Empty: no CORS headers at all, only the service's own page.",
    )

    # --- authentication and per-client limits of the HTTP service -----------------------------
    auth_enabled: bool = Field(
        False,
        description="Require credentials on the API: an OAuth2/OIDC bearer token (JWT) or an API key, with the scope each route needs (moods:read, moods:analyse, moods:admin). Off: anyone who reaches the port is served (the local demo). /healthz, /readyz, the page and its assets stay open.",
    )
    auth_issuer: str = Field(
        "", description="The tokens' required issuer (the iss claim), e.g. https://login.example.com/realms/music."
    )
    auth_audience: str = Field("", description="The tokens' required audience (one of the aud claim), e.g. moodstream.")
    auth_jwks_url: str = Field(
        "",
        description="Where the token signing keys (a JWKS) are: https://… (http:// only to localhost), or a file (path or file://…), re-read every MOODSTREAM_AUTH_JWKS_REFRESH_S and when a token names a key it does not know.",
    )
    auth_jwks_refresh_s: float = Field(
        300.0,
        ge=10,
        le=86400,
        description="How long the signing keys are kept before they are fetched again, in seconds.",
    )
    auth_algorithms: Annotated[list[str], NoDecode] = Field(
        ["RS256", "ES256"],
        description="Token signature algorithms accepted (JSON list or comma separated): RS256/384/512, PS256/384/512, ES256/384/512, EdDSA. Shared-secret (HS*) and none are refused.",
    )
    auth_leeway_s: float = Field(
        30.0, ge=0, le=300, description="Clock skew allowed when checking a token's exp, nbf and iat, in seconds."
    )
    auth_api_keys: SecretStr = Field(
        SecretStr(""),
        description="API keys for machines, stored as SHA-256 hashes: entries NAME:SHA256HEX:SCOPE [SCOPE…] separated by ; or newlines (moodstream api-key makes one). Several at once, for rotation (mount from a secret; never logged).",
    )
    auth_api_keys_file: Path | None = Field(
        None,
        description="A file of API key entries in the MOODSTREAM_AUTH_API_KEYS format, one a line (# comments), re-read when it changes (a mounted secret); its keys are valid beside those of MOODSTREAM_AUTH_API_KEYS.",
    )
    analyses_per_minute: float = Field(
        30.0,
        ge=0,
        le=100000,
        description="Uploads (POST /v1/analyses) one client (token subject, API key, or without auth its address) may start per minute, on average; beyond: 429 with Retry-After (0: no per-client limit).",
    )
    analyses_burst: int = Field(
        10, ge=1, le=100000, description="Uploads one client may start at once before its rate applies."
    )
    queries_per_second: float = Field(
        20.0,
        ge=0,
        le=100000,
        description="Expensive catalog queries (GET /v1/tracks, /v1/tracks/{id}/similar) one client may make per second, on average; beyond: 429 with Retry-After (0: no per-client limit).",
    )
    queries_burst: int = Field(
        100, ge=1, le=100000, description="Expensive queries one client may make at once before its rate applies."
    )

    @field_validator("allowed_buckets", "cors_origins", "auth_algorithms", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                try:
                    return json.loads(value)
                except json.JSONDecodeError:
                    return value  # reported by validation as "not a valid list"
            return [b.strip() for b in value.split(",") if b.strip()]
        return value

    @field_validator("auth_algorithms")
    @classmethod
    def _asymmetric_only(cls, value: list[str]) -> list[str]:
        allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
        wrong = [a for a in value if a not in allowed]
        if wrong or not value:
            raise ValueError(f"accepted: {', '.join(sorted(allowed))} (a public-key algorithm; HS* and none never)")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin == "*" or not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d{1,5})?", origin):
                raise ValueError(f"{origin!r} is not an origin like https://tools.example.com (no *, no path)")
        return value

    @model_validator(mode="after")
    def _auth_complete(self) -> Settings:
        if self.auth_enabled and self.auth_jwks_url and not (self.auth_issuer and self.auth_audience):
            raise ValueError(
                "MOODSTREAM_AUTH_JWKS_URL needs MOODSTREAM_AUTH_ISSUER and MOODSTREAM_AUTH_AUDIENCE: tokens are checked against both"
            )
        if self.auth_enabled and not (
            self.auth_jwks_url or self.auth_api_keys.get_secret_value() or self.auth_api_keys_file
        ):
            raise ValueError(
                "MOODSTREAM_AUTH_ENABLED needs a way in: MOODSTREAM_AUTH_JWKS_URL (tokens) or MOODSTREAM_AUTH_API_KEYS / _FILE (keys)"
            )
        return self


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the settings; raise :class:`ConfigError` naming each bad variable."""
    try:
        return Settings(**overrides)
    except SettingsError as exc:
        raise ConfigError(f"invalid settings: {exc}") from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            if not field:  # a rule over several settings: its message names them
                lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
                continue
            lines.append(f"  MOODSTREAM_{field.upper()}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid settings:\n" + "\n".join(lines)) from None


def describe() -> list[tuple[str, str, str, str]]:
    """(environment variable, type, default, doc) of every setting, for ``moodstream settings``."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, SecretStr):
            default = "(secret)"
        elif isinstance(default, Enum):
            default = default.value
        kind = getattr(field.annotation, "__name__", str(field.annotation))
        rows.append((f"MOODSTREAM_{name.upper()}", kind, str(default), field.description or ""))
    return rows

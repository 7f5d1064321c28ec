"""Every Prometheus metric of the worker, defined in this one place.

Labels stay low-cardinality: model name and version, stage, reason, service, gRPC status code,
partition of the input topic. Durations are in seconds, following Prometheus conventions
(``_seconds``, ``_total``). ``deploy/grafana/`` and ``deploy/prometheus/`` query these names;
``tests/deploy/test_monitoring.py`` runs every query against a real Prometheus.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

MODEL_INFO = Gauge(
    "moodstream_model_info", "1 for the model (name, Triton version) this worker scores with.", ["model", "version"]
)
EVENTS_CONSUMED = Counter("moodstream_events_consumed_total", "Events taken from the input topic.")
OUTPUTS = Counter("moodstream_outputs_total", "Mood records published.", ["model", "version"])
DEAD_LETTERS = Counter("moodstream_dead_letters_total", "Dead-letter records published.", ["reason"])
STAGE_SECONDS = Histogram(
    "moodstream_stage_seconds",
    "Time spent per stage: fetch, decode, features (the log-mel frontend) and audio_features (tempo, key, loudness...; "
    "both per track, measured in the decoding process), inference, publish (per batch).",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
END_TO_END_SECONDS = Histogram(
    "moodstream_end_to_end_seconds",
    "From the event's ingested_at to its output being acknowledged by the broker.",
    buckets=_LATENCY_BUCKETS,
)
BATCH_TRACKS = Histogram("moodstream_batch_tracks", "Tracks per batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
BATCH_PATCHES = Histogram(
    "moodstream_batch_patches",
    "Patches per scoring call (one call per track; the scorer splits it into requests).",
    buckets=(1, 4, 16, 64, 256, 1024, 4096),
)
TRACKS_IN_FLIGHT = Gauge("moodstream_tracks_in_flight", "Tracks taken but not yet published.")
AUDIO_SECONDS = Counter("moodstream_audio_analysed_seconds_total", "Seconds of audio analysed.")
SERVICE_ERRORS = Counter("moodstream_service_errors_total", "Outage errors after retries, by service.", ["service"])
SERVICE_DOWN = Gauge("moodstream_service_down", "1 while the worker waits for a service to come back.", ["service"])
TRITON_ERRORS = Counter(
    "moodstream_triton_request_errors_total",
    "Failed Triton calls (each attempt), by model and gRPC status code.",
    ["model", "code"],
)
TRITON_RETRIES = Counter(
    "moodstream_triton_request_retries_total", "Triton calls tried again after a transient error.", ["model"]
)
CONSUMER_LAG = Gauge(
    "moodstream_consumer_lag_messages",
    "Events of the input topic not yet committed by this worker's group, per assigned partition.",
    ["partition"],
)
MOOD_SCORE = Histogram(
    "moodstream_mood_score",
    "Per-track score of each mood family (watch the distribution drift).",
    ["model", "mood"],
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0),
)
TRACK_TEMPO = Histogram(
    "moodstream_track_tempo_bpm",
    "Per-track tempo of the tracks with a pulse, in BPM (audio features).",
    buckets=(60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 180, 200),
)
TRACK_LOUDNESS = Histogram(
    "moodstream_track_loudness_lufs",
    "Per-track integrated loudness, LUFS (EBU R128; audio features).",
    buckets=(-40, -30, -25, -23, -20, -18, -16, -14, -12, -10, -8, -6, -4),
)
TRACK_FEATURE = Histogram(
    "moodstream_track_feature",
    "Per-track 0-1 audio features (energy, danceability, valence, acousticness, instrumentalness, speechiness, liveness).",
    ["feature"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
TRACK_FEATURES = ("energy", "danceability", "valence", "acousticness", "instrumentalness", "speechiness", "liveness")


def observe_audio_features(found: Mapping[str, object] | None) -> None:
    """Add one track's audio features (a record's ``audio_features``) to the distributions."""
    if not found:
        return
    tempo, loudness = found.get("tempo"), found.get("loudness")
    if isinstance(tempo, (int, float)):
        TRACK_TEMPO.observe(tempo)
    if isinstance(loudness, (int, float)):
        TRACK_LOUDNESS.observe(loudness)
    for name in TRACK_FEATURES:
        value = found.get(name)
        if isinstance(value, (int, float)):
            TRACK_FEATURE.labels(name).observe(value)


def partition_lag(
    highwaters: Mapping[int, int], committed: Mapping[int, int | None], earliest: Mapping[int, int]
) -> dict[int, int]:
    """Lag per partition: the end offset minus the group's committed offset (the next offset to
    read), or minus the earliest offset where the group has committed nothing yet."""
    lags = {}
    for partition, end in highwaters.items():
        start = committed.get(partition)
        if start is None:
            start = earliest.get(partition, 0)
        lags[partition] = max(0, end - start)
    return lags


def set_consumer_lag(lags: Mapping[int, int]) -> None:
    """Publish ``lags`` (partition -> messages); partitions no longer assigned lose their series,
    so a rebalance does not leave another worker's partitions reported twice."""
    current = {str(p) for p in lags}
    for (partition,) in [labels for labels in list(CONSUMER_LAG._metrics)]:
        if partition not in current:
            CONSUMER_LAG.remove(partition)
    for number, lag in lags.items():
        CONSUMER_LAG.labels(str(number)).set(lag)


# --- the catalog (pipeline/service/catalog.py: the service's consumer of tracks.moods) ----------------

CATALOG_RECORDS = Counter(
    "moodstream_catalog_records_total",
    "Records of the output topic taken into the catalog: stored (new or changed), unchanged (a duplicate) or rejected (not a valid v2 record).",
    ["outcome"],
)
CATALOG_LAG = Gauge(
    "moodstream_catalog_lag_records",
    "Records of the output topic not yet stored in the catalog, per partition.",
    ["partition"],
)
CATALOG_TRACKS = Gauge("moodstream_catalog_tracks", "Tracks in the catalog.")

# --- the HTTP service (pipeline/service/) ---------------------------------------------------

HTTP_REQUESTS = Counter(
    "moodstream_http_requests_total",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "moodstream_http_request_seconds",
    "Time from a request's arrival to its answer, by route template.",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
ANALYSES_IN_FLIGHT = Gauge(
    "moodstream_analyses_in_flight",
    "Uploads being read, decoded or scored now (at most MOODSTREAM_MAX_ANALYSES_IN_FLIGHT).",
)
ANALYSES = Counter(
    "moodstream_analyses_total",
    "Uploads answered: tagged, refused (busy, too large, not audio…) by reason, or failed.",
    ["outcome"],
)

# --- who may ask and how often (pipeline/service/auth.py, limits.py) --------------------------

AUTH_REFUSALS = Counter(
    "moodstream_auth_refusals_total",
    "Requests refused for their credentials: unauthenticated (none), invalid_token, invalid_api_key (401) or insufficient_scope (403).",
    ["reason"],
)
RATE_LIMITED = Counter(
    "moodstream_rate_limited_total",
    "Requests refused with 429 because their client was over its per-client limit (analyses or queries).",
    ["limit"],
)
RATE_LIMIT_CLIENTS = Gauge(
    "moodstream_rate_limit_clients",
    "Clients whose token bucket this process keeps, per limit.",
    ["limit"],
)
# Every series exists from the start (at 0), so rates and dashboards show 0 rather than nothing.
for _reason in ("unauthenticated", "invalid_token", "invalid_api_key", "insufficient_scope"):
    AUTH_REFUSALS.labels(_reason)
for _limit in ("analyses", "queries"):
    RATE_LIMITED.labels(_limit)
    RATE_LIMIT_CLIENTS.labels(_limit)

"""Every Prometheus metric of the worker, defined in this one place.

Labels stay low-cardinality: model name and version, stage, reason. Durations are in seconds,
following Prometheus conventions (``_seconds``, ``_total``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

EVENTS_CONSUMED = Counter("moodstream_events_consumed_total", "Events taken from the input topic.")
OUTPUTS = Counter("moodstream_outputs_total", "Mood records published.", ["model", "version"])
DEAD_LETTERS = Counter("moodstream_dead_letters_total", "Dead-letter records published.", ["reason"])
STAGE_SECONDS = Histogram(
    "moodstream_stage_seconds",
    "Time spent per stage: fetch, decode_features (per track), inference, publish (per batch).",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
END_TO_END_SECONDS = Histogram(
    "moodstream_end_to_end_seconds",
    "From the event's ingested_at to its output being acknowledged by the broker.",
    buckets=_LATENCY_BUCKETS,
)
BATCH_TRACKS = Histogram("moodstream_batch_tracks", "Tracks per batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
BATCH_PATCHES = Histogram("moodstream_batch_patches", "Patches per inference call.", buckets=(1, 4, 16, 64, 256, 1024, 4096))
TRACKS_IN_FLIGHT = Gauge("moodstream_tracks_in_flight", "Tracks taken but not yet published.")
AUDIO_SECONDS = Counter("moodstream_audio_analysed_seconds_total", "Seconds of audio analysed.")
SERVICE_ERRORS = Counter("moodstream_service_errors_total", "Outage errors after retries, by service.", ["service"])
SERVICE_DOWN = Gauge("moodstream_service_down", "1 while the worker waits for a service to come back.", ["service"])
MOOD_SCORE = Histogram(
    "moodstream_mood_score",
    "Per-track score of each mood family (watch the distribution drift).",
    ["model", "mood"],
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0),
)

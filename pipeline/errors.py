"""One exception tree for moodstream.

Every error a stage can raise for one track is a :class:`TrackError` carrying the reason code
that goes into its dead-letter record; the worker never needs to know which library failed.
Third-party exceptions (botocore, PyAV, soundfile, tritonclient, onnxruntime) are translated
into this tree at the one module that calls the library.

:class:`ServiceUnavailable` is different in kind: the track is fine but a service it needs is
not (Triton down, S3 answering 5xx after retries). The worker pauses and retries the batch
instead of dead-lettering good tracks.
"""

from __future__ import annotations


class MoodstreamError(Exception):
    """Base class of every error moodstream raises on purpose."""


class ConfigError(MoodstreamError):
    """A setting or a model repository entry is invalid; raised at start, never per track."""


class TrackError(MoodstreamError):
    """One track cannot be tagged; ``reason`` is its dead-letter reason code."""

    reason: str = "internal"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


class BadEvent(TrackError):
    """The event is not valid JSON, breaks the schema, or names a URI we may not read."""

    reason = "bad_event"


class NotFound(TrackError):
    reason = "not_found"


class AccessDenied(TrackError):
    reason = "access_denied"


class TooLarge(TrackError):
    """The object is larger than the configured maximum size (checked before download)."""

    reason = "too_large"


class Undecodable(TrackError):
    """Neither PyAV nor libsndfile could decode the bytes as audio."""

    reason = "undecodable"


class TooShort(TrackError):
    """The decoded audio is shorter than the minimum analysable duration."""

    reason = "too_short"


class InferenceFailed(TrackError):
    """The model server rejected this track's request (not an outage: the request itself)."""

    reason = "inference_failed"


class ServiceUnavailable(MoodstreamError):
    """A service is unreachable or overloaded after retries; the track itself is fine."""


#: Every reason code a dead-letter record can carry, for schemas, metrics and docs.
REASONS: tuple[str, ...] = (
    BadEvent.reason,
    NotFound.reason,
    AccessDenied.reason,
    TooLarge.reason,
    Undecodable.reason,
    TooShort.reason,
    InferenceFailed.reason,
    TrackError.reason,
)

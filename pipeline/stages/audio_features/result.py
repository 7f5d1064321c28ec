"""What the stage returns: :class:`AudioFeatures` and its timeline :class:`Section` s."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Fields computed from the signal alone, and fields derived from the tagging model's scores
#: (:func:`~pipeline.stages.audio_features.descriptors.from_tags`).
DSP_FIELDS = (
    "tempo",
    "tempo_confidence",
    "beats",
    "downbeats",
    "time_signature",
    "time_signature_confidence",
    "key",
    "mode",
    "key_confidence",
    "loudness",
    "loudness_range",
    "true_peak",
    "fade_in_end_s",
    "fade_out_start_s",
    "energy",
    "danceability",
    "speechiness",
    "sections",
)
MODEL_FIELDS = ("acousticness", "instrumentalness", "liveness")


@dataclass(frozen=True)
class Section:
    """One timeline segment (``segment_s`` long, the last one shorter): Spotify's ``sections``
    taken as fixed segments aligned with the product's mood timeline, not a novelty-based
    segmentation."""

    start: float  # s
    duration: float  # s
    tempo: float | None  # BPM, None without a pulse
    tempo_confidence: float
    key: int  # 0-11, -1 none
    mode: int  # 1 major, 0 minor, -1 none
    key_confidence: float
    loudness: float | None  # integrated LUFS of the segment (gated within it), None if silent


@dataclass(frozen=True)
class AudioFeatures:
    """One track's audio features; see docs/audio-features.md for every field."""

    duration_s: float
    sample_rate: int
    channels: int
    tempo: float | None  # BPM
    tempo_confidence: float  # 0-1
    beats: np.ndarray  # s
    downbeats: np.ndarray  # s
    time_signature: int  # beats per bar, 3-7 (Spotify's convention); -1 without a pulse
    time_signature_confidence: float
    key: int  # pitch class 0-11 (0 = C), -1 none
    mode: int  # 1 major, 0 minor, -1 none
    key_confidence: float
    loudness: float | None  # integrated LUFS (BS.1770-4 / EBU R128); None when all gated
    loudness_range: float | None  # LU (EBU Tech 3342)
    true_peak: float | None  # dBTP; None for digital silence
    fade_in_end_s: float
    fade_out_start_s: float
    energy: float  # 0-1
    danceability: float  # 0-1
    speechiness: float  # 0-1
    sections: list[Section] = field(default_factory=list)
    acousticness: float | None = None  # from the tag scores (from_tags); None until given
    instrumentalness: float | None = None
    liveness: float | None = None

    def with_tags(self, scores: dict[str, dict[str, float]]) -> AudioFeatures:
        """A copy with the model-derived fields computed from ``scores`` ({network: {tag:
        score}}, as the tagging stage reports them)."""
        from pipeline.stages.audio_features.descriptors import from_tags

        fields = from_tags(scores)
        return dataclasses.replace(
            self,
            acousticness=fields["acousticness"],
            instrumentalness=fields["instrumentalness"],
            liveness=fields["liveness"],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: seconds to the millisecond, other floats to 3-4 digits."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("beats", "downbeats"):
                out[f.name] = [round(float(t), 3) for t in value]
            elif f.name == "sections":
                out[f.name] = [{k: _round(v) for k, v in dataclasses.asdict(s).items()} for s in value]
            else:
                out[f.name] = _round(value)
        return out


def _round(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return round(float(value), 4)
    if isinstance(value, np.integer):
        return int(value)
    return value

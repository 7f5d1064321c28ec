"""Spotify-style 0-1 descriptors: documented rules over measured quantities.

DSP, from this stage's own measurements: ``energy``, ``danceability``, ``speechiness``, and the
fades. Model-derived (:func:`from_tags`, from the tagging model's scores): ``acousticness``,
``instrumentalness``, ``liveness``. Every weight below is a first guess to be calibrated on
real music with listeners' judgements; the rules are written so that calibration changes
numbers, not structure.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.stages.audio_features.rhythm import Rhythm

FADE_LU = 3.0  # a fade ends (starts) where the momentary loudness is this far under the body's


def _squash(x: float, centre: float, width: float) -> float:
    """Logistic map to 0-1: 0.5 at ``centre``, 0.73 at ``centre + width``."""
    return 1.0 / (1.0 + math.exp(-(x - centre) / width))


def fades(momentary: np.ndarray, integrated: float | None, duration_s: float) -> tuple[float, float]:
    """(end of the fade-in, start of the fade-out), seconds, from the momentary loudness (400-ms
    blocks every 100 ms): the first block and the end of the last block within ``FADE_LU`` of
    the body's level (the median of the blocks above the relative gate). Without a fade-in
    the first is 0 (or where the sound starts), without a fade-out the second is the duration.
    Silence: (0, duration)."""
    if integrated is None or not len(momentary):
        return 0.0, float(duration_s)
    gated = momentary[momentary > integrated - 10.0]
    body = float(np.median(gated)) if len(gated) else integrated
    loud = np.flatnonzero(momentary >= body - FADE_LU)
    if not len(loud):
        return 0.0, float(duration_s)
    fade_in = loud[0] * 0.1
    fade_out = min(float(duration_s), loud[-1] * 0.1 + 0.4)
    return float(fade_in), float(fade_out)


def energy(
    integrated: float | None, lra: float | None, onset: np.ndarray, fps: float, shape: dict[str, float]
) -> float:
    """0-1: perceived intensity. Loudness (0.45: the term is 0.01 at -30 LUFS, 0.5 at -17 and
    0.95 at -8), onset density (0.2: onset-envelope peaks per second), spectral noisiness and
    brightness (0.2: flatness and the power share above 2 kHz, distorted guitars and cymbals)
    and compression (0.15: a small loudness range). Silence: 0."""
    if integrated is None:
        return 0.0
    loud = _squash(integrated, -17.0, 3.0)
    rate = onset_rate(onset, fps)
    density = _squash(rate, 3.0, 1.0)
    noisy = min(1.0, 0.5 * _squash(shape["flatness"], 0.25, 0.08) + 0.5 * _squash(shape["high_share"], 0.12, 0.05))
    dense = 1.0 - _squash(lra if lra is not None else 10.0, 8.0, 2.5)
    return float(np.clip(0.45 * loud + 0.2 * density + 0.2 * noisy + 0.15 * dense, 0.0, 1.0))


def onset_rate(onset: np.ndarray, fps: float) -> float:
    """Onset-envelope peaks per second (local maxima over 50 ms above 1.5x the median)."""
    if len(onset) < 3:
        return 0.0
    o = onset.astype(np.float64)
    radius = max(1, int(0.05 * fps))
    padded = np.pad(o, radius, mode="edge")
    local_max = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1).max(axis=1)
    threshold = 1.5 * np.median(o) + 1e-9
    peaks = np.count_nonzero((o >= local_max) & (o > threshold))
    return peaks / (len(o) / fps)


def danceability(r: Rhythm) -> float:
    """0-1: how suitable for dancing. A stable, strong pulse at a dance tempo: tempo confidence
    (0.35), beat strength (0.25: the onset at the beats against the envelope's mean), regularity
    (0.2: beat intervals' variation), the tempo's distance from 120 BPM (0.2: in octaves, half
    an octave away halves it). No pulse: 0."""
    if r.tempo is None:
        return 0.0
    strength = _squash(r.beat_strength, 2.0, 0.5)
    regular = 1.0 - _squash(r.regularity, 0.1, 0.03)
    octaves = abs(math.log2(r.tempo / 120.0))
    fit = math.exp(-0.5 * (octaves / 0.42) ** 2)
    return float(np.clip(0.35 * r.confidence + 0.25 * strength + 0.2 * regular + 0.2 * fit, 0.0, 1.0))


def speechiness(windows: list[tuple[float, float, float, float]]) -> float:
    """0-1: presence of spoken words (> 0.66 mostly speech, 0.33-0.66 speech and music, < 0.33
    music). Per ~5-s window of the speech band (300-3400 Hz), :class:`~.spectral.LowRateAnalysis`
    measures the share of the envelopes' modulation at the syllable rate (2-8 Hz), their depth
    (dB, floored 40 dB under the window's peak) and their periodicity (autocorrelation peak at
    0.25-2 s). Speech raises the first two and lowers the third. The windows with sound are
    averaged and mapped by ``sigmoid((share - 0.6) / 0.05 + (depth - 8) / 1.5 - (periodicity
    - 0.3) / 0.05)``, fitted on espeak-ng speech mixed into 16 rendered songs at -20 to +10 dB
    (see docs/audio-features.md; to be refitted on real speech and rap)."""
    if not windows:
        return 0.0
    arr = np.array(windows)
    sound = arr[:, 3] > 1e-10  # the window's peak band power: not digital silence
    if not sound.any():
        return 0.0
    share, depth, periodic = (float(np.mean(arr[sound, i])) for i in range(3))
    z = (share - 0.6) / 0.05 + (depth - 8.0) / 1.5 - (periodic - 0.3) / 0.05
    return float(1.0 / (1.0 + math.exp(-float(np.clip(z, -50, 50)))))


# -- model-derived -----------------------------------------------------------------------------

#: Tags (musicnn's MTT and MSD vocabularies) that speak for or against each field.
ACOUSTIC = {
    "acoustic": 1.0,
    "guitar": 0.5,
    "classical": 1.0,
    "classic": 0.5,
    "piano": 0.8,
    "strings": 0.8,
    "violin": 1.0,
    "cello": 1.0,
    "harp": 1.0,
    "harpsichord": 1.0,
    "flute": 1.0,
    "sitar": 0.8,
    "folk": 0.8,
    "country": 0.5,
    "soft": 0.3,
    "choral": 0.6,
    "opera": 0.6,
}
ELECTRIC = {
    "electronic": 1.0,
    "techno": 1.0,
    "synth": 1.0,
    "electronica": 1.0,
    "electro": 1.0,
    "House": 1.0,
    "dance": 0.6,
    "beat": 0.5,
    "beats": 0.5,
    "metal": 0.6,
    "heavy metal": 0.6,
    "hard rock": 0.5,
    "trance": 1.0,
    "Hip-Hop": 0.5,
    "loud": 0.3,
}
VOICE = {
    "vocal": 1.0,
    "vocals": 1.0,
    "voice": 1.0,
    "singing": 1.0,
    "male vocal": 1.0,
    "female vocal": 1.0,
    "male voice": 1.0,
    "female voice": 1.0,
    "male": 0.8,
    "female": 0.8,
    "man": 0.8,
    "woman": 0.8,
    "choir": 1.0,
    "choral": 1.0,
    "opera": 1.0,
    "female vocalists": 1.0,
    "male vocalists": 1.0,
    "female vocalist": 1.0,
    "rnb": 0.5,
    "Hip-Hop": 0.6,
}
NO_VOICE = {
    "no vocal": 1.0,
    "no vocals": 1.0,
    "no voice": 1.0,
    "instrumental": 1.0,
    "ambient": 0.4,
    "techno": 0.4,
    "classical": 0.4,
    "new age": 0.3,
}
#: Neither vocabulary has a "live" tag; these lean towards recordings of a performance in a
#: room with an audience, weakly. Liveness stays low unless calibration finds better.
LIVE = {"rock": 0.2, "classic rock": 0.3, "blues": 0.3, "jazz": 0.3, "60s": 0.2, "70s": 0.2, "punk": 0.2}


def _weighted(scores: dict[str, float], tags: dict[str, float]) -> float:
    """The weighted mean of the tags' scores that are present (0 when none is)."""
    hits = [(scores[t], w) for t, w in tags.items() if t in scores]
    if not hits:
        return 0.0
    return sum(s * w for s, w in hits) / sum(w for _, w in hits)


def _strongest(scores: dict[str, float], tags: dict[str, float]) -> float:
    return max((scores[t] * w for t, w in tags.items() if t in scores), default=0.0)


def from_tags(scores: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """``acousticness``, ``instrumentalness``, ``liveness`` (0-1) from tag scores
    ``{network: {tag: score}}``; a field is None when no network carries any of its tags.

    * acousticness: the strongest acoustic-instrument tag against the strongest electronic one,
      ``sigmoid(6 (acoustic - electric))``.
    * instrumentalness: the no-vocals tags against the vocal tags,
      ``sigmoid(8 (no_voice - voice))`` (> 0.5: instrumental).
    * liveness: 0.1 + 0.5 x the live-leaning tags' weighted mean (a weak prior).
    """
    merged: dict[str, float] = {}
    for tags in scores.values():
        for tag, score in tags.items():
            merged[tag] = max(merged.get(tag, 0.0), float(score))
    out: dict[str, float | None] = {"acousticness": None, "instrumentalness": None, "liveness": None}
    if any(t in merged for t in (*ACOUSTIC, *ELECTRIC)):
        a, e = _strongest(merged, ACOUSTIC), _strongest(merged, ELECTRIC)
        out["acousticness"] = round(1.0 / (1.0 + math.exp(-6.0 * (a - e))), 4)
    if any(t in merged for t in (*VOICE, *NO_VOICE)):
        v, n = _strongest(merged, VOICE), _strongest(merged, NO_VOICE)
        out["instrumentalness"] = round(1.0 / (1.0 + math.exp(-8.0 * (n - v))), 4)
    if any(t in merged for t in LIVE):
        out["liveness"] = round(0.1 + 0.5 * _weighted(merged, LIVE), 4)
    return out

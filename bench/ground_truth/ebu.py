"""EBU test signals, synthesised from the specifications' descriptions (no files needed).

* EBU Tech 3341 (2016), "Loudness Metering: 'EBU Mode' metering to supplement EBU R 128":
  cases 1-5 (integrated loudness of stereo 1 kHz sines and their gating), 9 (short-term
  loudness of alternating levels), 12 (momentary loudness) and the true-peak cases 15-19 (sines
  at fs/4, fs/6, fs/8 sampled at phases that hide the peak between samples).
* EBU Tech 3342 (2016), "Loudness Range": cases 1-4 (sequences of stereo 1 kHz tones).

Each case is ``(name, rate, signal [2, n] float32, expected)``: ``expected`` maps a measure
(``integrated``, ``short_term``, ``momentary``, ``loudness_range``, ``true_peak``) to
``(value, minus tolerance, plus tolerance)`` as the specifications give them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

RATE = 48_000


@dataclass(frozen=True)
class Case:
    name: str
    rate: int
    signal: np.ndarray  # [channels, n] float32
    expected: dict[str, tuple[float, float, float]]  # measure -> (value, -tol, +tol)


def _tone(
    seconds: float, dbfs: float, rate: int = RATE, freq: float = 1000.0, phase: float = 0.0, ramp_s: float = 0.0
) -> np.ndarray:
    """A stereo sine (both channels) at ``dbfs`` peak level; ``ramp_s`` of raised-cosine fade
    in and out (the true-peak cases: an abrupt start from silence overshoots between samples,
    as any band-limited reconstruction of a step does, which the cases do not test)."""
    t = np.arange(int(round(seconds * rate))) / rate
    x = 10 ** (dbfs / 20) * np.sin(2 * np.pi * freq * t + phase)
    if ramp_s:
        n = int(ramp_s * rate)
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    x = x.astype(np.float32)
    return np.stack([x, x])


def _sequence(parts: list[tuple[float, float]], rate: int = RATE) -> np.ndarray:
    """Stereo 1 kHz tones: (seconds, dBFS) one after another, the phase continuous."""
    total = int(round(sum(s for s, _ in parts) * rate))
    t = np.arange(total) / rate
    gain = np.empty(total)
    at = 0
    for seconds, dbfs in parts:
        n = int(round(seconds * rate))
        gain[at : at + n] = 10 ** (dbfs / 20)
        at += n
    x = (gain * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    return np.stack([x, x])


def tech3341() -> Iterator[Case]:
    """Tech 3341 cases 1-5, 9, 12 (loudness) and 15-19 (true peak)."""
    lu = (0.1, 0.1)
    yield Case(
        "3341-1",
        RATE,
        _tone(20, -23.0),
        {"integrated": (-23.0, *lu), "short_term": (-23.0, *lu), "momentary": (-23.0, *lu)},
    )
    yield Case(
        "3341-2",
        RATE,
        _tone(20, -33.0),
        {"integrated": (-33.0, *lu), "short_term": (-33.0, *lu), "momentary": (-33.0, *lu)},
    )
    yield Case("3341-3", RATE, _sequence([(10, -36.0), (60, -23.0), (10, -36.0)]), {"integrated": (-23.0, *lu)})
    yield Case(
        "3341-4",
        RATE,
        _sequence([(10, -72.0), (10, -36.0), (60, -23.0), (10, -36.0), (10, -72.0)]),
        {"integrated": (-23.0, *lu)},
    )
    yield Case("3341-5", RATE, _sequence([(20, -26.0), (20.1, -20.0), (20, -26.0)]), {"integrated": (-23.0, *lu)})
    # Case 9: 1.34 s at -20 dBFS, 1.66 s at -30 dBFS, repeated: every 3-s window reads -23.0.
    yield Case("3341-9", RATE, _sequence([(1.34, -20.0), (1.66, -30.0)] * 20), {"short_term": (-23.0, *lu)})
    # Case 12: 0.18 s at -20 dBFS, 0.22 s at -30 dBFS, repeated: every 400-ms block reads -23.0.
    yield Case("3341-12", RATE, _sequence([(0.18, -20.0), (0.22, -30.0)] * 25), {"momentary": (-23.0, *lu)})
    tp = (0.4, 0.2)  # true peak: -0.4 / +0.2 dB
    # Cases 15-18: a sine whose true peak is -6 dBTP, sampled at phases that put the peak
    # between samples (the sample peak reads lower); 19: the same at fs/4 and 45 deg, 0 dBFS
    # samples, a true peak of +3.01 dBTP.
    for name, freq, phase_deg, peak_db, expect in (
        ("3341-15", RATE / 4, 0.0, -6.0, -6.0),
        ("3341-16", RATE / 4, 45.0, -6.0, -6.0),
        ("3341-17", RATE / 6, 60.0, -6.0, -6.0),
        ("3341-18", RATE / 8, 67.5, -6.0, -6.0),
        ("3341-19", RATE / 4, 45.0, 20 * np.log10(np.sqrt(2.0)), 3.0),
    ):
        yield Case(
            name,
            RATE,
            _tone(5.0, peak_db, freq=freq, phase=np.deg2rad(phase_deg), ramp_s=0.5),
            {"true_peak": (expect, *tp)},
        )


def tech3342() -> Iterator[Case]:
    """Tech 3342 cases 1-4 (loudness range of stereo 1 kHz tone sequences), +-1 LU."""
    lu = (1.0, 1.0)
    yield Case("3342-1", RATE, _sequence([(20, -20.0), (20, -30.0)]), {"loudness_range": (10.0, *lu)})
    yield Case("3342-2", RATE, _sequence([(20, -20.0), (20, -15.0)]), {"loudness_range": (5.0, *lu)})
    yield Case("3342-3", RATE, _sequence([(20, -40.0), (20, -20.0)]), {"loudness_range": (20.0, *lu)})
    yield Case(
        "3342-4",
        RATE,
        _sequence([(20, -50.0), (20, -35.0), (20, -20.0), (20, -35.0), (20, -50.0)]),
        {"loudness_range": (15.0, *lu)},
    )


def cases() -> list[Case]:
    return [*tech3341(), *tech3342()]

"""The benchmark's goals, small: songs rendered by the test itself (mma + fluidsynth, a few
seconds), scored with mir_eval. The thresholds leave room for a song to slip, not for the
estimators to regress: all five songs read right today (see docs/audio-features.md for the
full benchmark, ``python -m bench.audio_features``)."""

from __future__ import annotations

import mir_eval
import numpy as np
import pytest

from pipeline.stages.audio_features import tonal
from tests.stages.conftest import load, stream


@pytest.fixture(scope="module")
def scored(rendered):
    rows = []
    for spec, path, truth in rendered:
        x, rate = load(path)
        result = stream(x, rate)
        reference = truth["tempo"]
        estimate = f"{tonal.NAMES[result.key]} {'major' if result.mode == 1 else 'minor'}" if result.key >= 0 else "N"
        rows.append(
            {
                "name": spec.name,
                "acc1": result.tempo is not None and abs(result.tempo - reference) / reference <= 0.04,
                "acc2": result.tempo is not None
                and any(abs(result.tempo * k - reference) / reference <= 0.04 for k in (1, 2, 0.5)),
                "beat_f": mir_eval.beat.f_measure(
                    mir_eval.beat.trim_beats(np.array(truth["beats"])),
                    mir_eval.beat.trim_beats(np.asarray(result.beats)),
                ),
                "downbeat_f": mir_eval.beat.f_measure(
                    mir_eval.beat.trim_beats(np.array(truth["downbeats"])),
                    mir_eval.beat.trim_beats(np.asarray(result.downbeats)),
                ),
                "key": mir_eval.key.weighted_score(truth["key_name"], estimate),
                "meter": result.time_signature == truth["time_signature"],
                "result": result,
            }
        )
    return rows


def test_tempo(scored):
    assert sum(r["acc1"] for r in scored) >= len(scored) - 1, [(r["name"], r["result"].tempo) for r in scored]
    assert all(r["acc2"] for r in scored), [(r["name"], r["result"].tempo) for r in scored]


def test_beats_and_downbeats(scored):
    assert np.mean([r["beat_f"] for r in scored]) >= 0.85, [(r["name"], round(r["beat_f"], 2)) for r in scored]
    assert np.mean([r["downbeat_f"] for r in scored]) >= 0.7, [(r["name"], round(r["downbeat_f"], 2)) for r in scored]


def test_key(scored):
    assert np.mean([r["key"] for r in scored]) >= 0.8, [(r["name"], r["result"].key, r["result"].mode) for r in scored]


def test_meter(scored):
    assert sum(r["meter"] for r in scored) >= len(scored) - 1, [(r["name"], r["result"].time_signature) for r in scored]


def test_sections_follow_the_song(scored):
    for r in scored:
        result = r["result"]
        assert len(result.sections) == int(np.ceil(result.duration_s / 30.0))
        first = result.sections[0]
        assert first.loudness is not None and abs(first.loudness - result.loudness) < 3.0
        assert first.key == result.key or first.key_confidence < result.key_confidence

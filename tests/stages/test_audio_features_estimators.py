"""Each estimator on signals whose answer is known by construction."""

from __future__ import annotations

import json

import mir_eval
import numpy as np
import pytest

from bench.ground_truth import speech
from pipeline.stages.audio_features import AudioFeatures, from_tags, tonal
from tests.stages.conftest import chord_track, click_track, load, stream


@pytest.mark.parametrize("key", range(24))
def test_key_of_synthetic_chord_progressions(key):
    """I-IV-V-I in every major key and i-iv-V-i in every minor key, sine chords with a bass."""
    root, minor = key % 12, key >= 12
    x = chord_track(root, minor)
    result = stream(x, 22_050)
    assert (result.key, result.mode) == (root, 0 if minor else 1), (
        f"{tonal.NAMES[root]} {'minor' if minor else 'major'}: got {tonal.NAMES[result.key]} mode {result.mode}"
    )
    assert result.key_confidence > 0.2


def test_key_profiles_recover_their_own_key():
    for k in range(12):
        assert tonal.key_of(np.roll(tonal.MAJOR, k))[:2] == (k, 1)
        assert tonal.key_of(np.roll(tonal.MINOR, k))[:2] == (k, 0)
    assert tonal.key_of(np.ones(12)) == (-1, -1, 0.0)  # flat chroma: no key


@pytest.mark.parametrize("bpm", [84, 100, 120, 140])
def test_tempo_and_beats_of_a_click_track(bpm):
    rate = 44_100
    x = click_track(bpm, 30.0, rate)
    result = stream(x, rate)
    assert result.tempo == pytest.approx(bpm, rel=0.02)
    reference = np.arange(0, 30.0 - 0.1, 60.0 / bpm)
    assert mir_eval.beat.f_measure(mir_eval.beat.trim_beats(reference), mir_eval.beat.trim_beats(result.beats)) > 0.95
    assert result.tempo_confidence > 0.2
    assert result.danceability > 0.3


@pytest.mark.parametrize("meter", [3, 4])
def test_meter_and_downbeats_from_the_accented_beat(meter):
    rate = 44_100
    bpm = 120
    x = click_track(bpm, 30.0, rate, meter=meter)
    result = stream(x, rate)
    assert result.time_signature == meter
    reference = np.arange(0, 30.0 - 0.1, meter * 60.0 / bpm)
    assert (
        mir_eval.beat.f_measure(mir_eval.beat.trim_beats(reference), mir_eval.beat.trim_beats(result.downbeats)) > 0.9
    )


def test_fades_of_a_shaped_noise():
    """6 s of fade-in (dB-linear from -60 dB), 40 s at full level, 6 s of fade-out."""
    rate = 22_050
    rng = np.random.default_rng(4)
    level_db = np.concatenate([np.linspace(-60, 0, 6 * rate), np.zeros(40 * rate), np.linspace(0, -60, 6 * rate)])
    x = (0.1 * rng.standard_normal(len(level_db)) * 10 ** (level_db / 20)).astype(np.float32)
    result = stream(np.stack([x, x]), rate)
    assert result.fade_in_end_s == pytest.approx(6.0, abs=0.6)
    assert result.fade_out_start_s == pytest.approx(46.0, abs=0.6)
    assert result.duration_s == pytest.approx(52.0, abs=0.01)


def test_no_fades_on_abrupt_music():
    rate = 44_100
    x = click_track(110, 20.0, rate)
    result = stream(x, rate)
    assert result.fade_in_end_s < 0.5
    assert result.fade_out_start_s > result.duration_s - 1.0


def test_energy_grows_with_level_and_density():
    rate = 22_050
    sparse = click_track(70, 20.0, rate, accent=False) * 0.1
    dense = click_track(170, 20.0, rate, accent=False)
    noise = (0.3 * np.random.default_rng(2).standard_normal(20 * rate)).astype(np.float32)
    quiet, loud = stream(sparse, rate).energy, stream(dense + 0.3 * noise, rate).energy
    assert 0.0 <= quiet < loud <= 1.0
    assert loud - quiet > 0.3


def test_speechiness_orders_speech_in_music(rendered):
    if speech.tools_missing():
        pytest.skip("speechiness needs Debian's espeak-ng (`make tools`)")
    _spec, path, _ = rendered[0]
    music, rate = load(path)
    cache = path.parent.parent
    values = [
        stream(speech.mix(music, rate, ratio, cache), rate).speechiness for ratio in (None, -5.0, 5.0, float("inf"))
    ]
    assert values == sorted(values), values
    assert values[0] < 0.33 and values[-1] > 0.66


def test_model_derived_fields_from_tag_scores():
    vocal = {
        "musicnn_mtt": {"vocal": 0.8, "voice": 0.6, "no vocals": 0.05, "guitar": 0.7, "electronic": 0.05},
        "musicnn_msd": {"acoustic": 0.6, "instrumental": 0.02},
    }
    instrumental = {
        "musicnn_mtt": {"vocal": 0.02, "no vocals": 0.7, "synth": 0.8, "techno": 0.6},
        "musicnn_msd": {"instrumental": 0.5, "electronic": 0.9},
    }
    a, b = from_tags(vocal), from_tags(instrumental)
    assert a["instrumentalness"] < 0.5 < b["instrumentalness"]
    assert a["acousticness"] > 0.5 > b["acousticness"]
    assert all(0.0 <= v <= 1.0 for v in (*a.values(), *b.values()) if v is not None)
    assert a["liveness"] is None  # neither vocabulary here carries a live-leaning tag
    assert 0.0 <= from_tags({"musicnn_msd": {"rock": 0.9, "jazz": 0.1}})["liveness"] <= 1.0
    assert from_tags({}) == {"acousticness": None, "instrumentalness": None, "liveness": None}


def test_the_record_is_json_and_carries_every_field():
    rate = 22_050
    result = stream(click_track(120, 12.0, rate), rate, segment_s=5.0)
    result = result.with_tags({"musicnn_mtt": {"no vocals": 0.9, "drums": 0.9}})
    record = json.loads(json.dumps(result.to_dict()))
    assert set(record) == {f for f in AudioFeatures.__dataclass_fields__}
    assert [s["start"] for s in record["sections"]] == [0.0, 5.0, 10.0]
    assert record["sections"][-1]["duration"] == pytest.approx(2.0, abs=0.01)
    assert record["instrumentalness"] > 0.5
    assert all(s["tempo"] is None or s["tempo"] == pytest.approx(120, rel=0.04) for s in record["sections"][:2])

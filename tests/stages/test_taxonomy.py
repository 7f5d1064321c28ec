"""The mood view: the data file against the models, calibration, the rule, the plane, embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.contracts.model_meta import ModelMeta, Network, read_meta
from pipeline.errors import ConfigError
from pipeline.settings import DEFAULT_MODEL_REPOSITORY
from pipeline.stages.scoring import NetworkOutput
from pipeline.stages.taxonomy import cdf, decode_embedding, encode_embedding, load_taxonomy, mood_view, summarise

RULES = """
[families]
happy = "x"
calm = "y"
sad = "z"
[rule]
present = 0.75
probable = 0.5
class_clear = 0.5
va_clear = 0.1
[plane.valence]
happy = 1.0
sad = -1.0
[plane.arousal]
happy = 1.0
calm = -1.0
"""
LEVELS = np.linspace(0, 1, 101)


def meta(networks: list[tuple[str, str, tuple[str, ...]]], calibration: dict | None = None) -> ModelMeta:
    nets = tuple(Network(n, "1", task, labels, 4, f"{n}_scores", f"{n}_embedding") for n, task, labels in networks)
    return ModelMeta("m", "7", {}, nets, calibration)


def uniform_calibration(tags: list[str], families: list[str]) -> dict:
    """Every tag and family uniform on [0, 1] over the reference: calibrated = raw."""
    return {"tracks": 100, "tags": {t: list(LEVELS) for t in tags}, "families": {f: list(LEVELS) for f in families}}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "moods.toml"
    path.write_text(RULES + text)
    return path


@pytest.mark.parametrize("model", ["musicnn", "musicnn_msd", "musicnn_mtt"])
def test_shipped_mood_file_and_calibration_fit_the_shipped_models(model):
    meta = read_meta(DEFAULT_MODEL_REPOSITORY, model)
    taxonomy = load_taxonomy(meta)
    assert taxonomy.source == "tags" and len(taxonomy.families) >= 4
    assert meta.served_version.startswith("1+cal.")


def test_the_two_network_model_joins_both_networks_members():
    taxonomy = load_taxonomy(read_meta(DEFAULT_MODEL_REPOSITORY, "musicnn"))
    relaxed = next(f for f in taxonomy.families if f.name == "relaxed")
    assert {m.network for m in relaxed.members} == {"musicnn_msd", "musicnn_mtt"}
    assert {"chill", "Mellow", "soft", "slow", "quiet"} <= {m.tag for m in relaxed.members}


def test_unknown_tag_is_a_config_error(tmp_path: Path):
    path = write(tmp_path, "[n.happy]\ncheerful = 1.0\n")
    with pytest.raises(ConfigError, match="cheerful"):
        load_taxonomy(meta([("n", "tags", ("happy", "sad"))]), path, calibrated=False)


def test_undeclared_family_is_a_config_error(tmp_path: Path):
    path = write(tmp_path, "[n.gloomy]\nsad = 1.0\n")
    with pytest.raises(ConfigError, match="gloomy"):
        load_taxonomy(meta([("n", "tags", ("happy", "sad"))]), path, calibrated=False)


def test_a_model_with_families_but_no_calibration_is_told_how_to_calibrate(tmp_path: Path):
    path = write(tmp_path, "[n.happy]\nhappy = 1.0\n")
    with pytest.raises(ConfigError, match="calibrate-moods --model m"):
        load_taxonomy(meta([("n", "tags", ("happy",))]), path)


def test_cdf_interpolates_and_splits_ties_in_the_middle():
    q = np.array([0.0, 0.0, 0.0, 0.5, 1.0])  # levels 0, .25, .5, .75, 1
    assert cdf(q, 0.75) == pytest.approx(0.875)
    assert cdf(q, 0.0) == pytest.approx(0.25)  # three quantiles tie at 0: the middle of 0..0.5
    assert cdf(q, 2.0) == 1.0 and cdf(q, -1.0) == 0.0


def test_families_are_calibrated_means_of_members_across_networks_and_the_rule_picks_top_moods(tmp_path: Path):
    path = write(tmp_path, "[a.happy]\nhappy = 1.0\n[a.calm]\nchill = 1.0\n[b.calm]\nsoft = 3.0\n[a.sad]\nsad = 1.0\n")
    cal = uniform_calibration(["a:happy", "a:chill", "b:soft", "a:sad"], ["happy", "calm", "sad"])
    m = meta([("a", "tags", ("happy", "chill", "sad")), ("b", "tags", ("soft",))], cal)
    taxonomy = load_taxonomy(m, path)
    view = mood_view(taxonomy, {"a": np.array([0.8, 0.2, 0.1]), "b": np.array([1.0])})
    # calm = (1 * 0.2 + 3 * 1.0) / 4 = 0.8 on the uniform reference
    assert view.moods == pytest.approx({"happy": 0.8, "calm": 0.8, "sad": 0.1})
    assert [t["mood"] for t in view.top_moods] == ["calm", "happy"]  # ties by name
    assert view.leading_mood == {"mood": "calm", "confidence": pytest.approx(0.8), "clear": True}
    assert view.valence == pytest.approx(((2 * 0.8 - 1) - (2 * 0.1 - 1)) / 2)
    assert view.arousal == pytest.approx(((2 * 0.8 - 1) - (2 * 0.8 - 1)) / 2)
    assert view.quadrant == "happy"  # valence > 0, arousal = 0


def test_a_track_below_the_bar_in_every_mood_is_unclear_but_still_has_a_leader(tmp_path: Path):
    path = write(tmp_path, "[a.happy]\nhappy = 1.0\n[a.sad]\nsad = 1.0\n")
    taxonomy = load_taxonomy(
        meta([("a", "tags", ("happy", "sad"))], uniform_calibration(["a:happy", "a:sad"], ["happy", "sad"])), path
    )
    view = mood_view(taxonomy, {"a": np.array([0.6, 0.3])})
    assert view.top_moods == [] and view.leading_mood == {
        "mood": "happy",
        "confidence": pytest.approx(0.6),
        "clear": False,
    }


def test_a_valence_arousal_network_fills_the_same_fields(tmp_path: Path):
    taxonomy = load_taxonomy(meta([("deam", "va", ("valence", "arousal"))]), write(tmp_path, ""))
    view = mood_view(taxonomy, {"deam": np.array([0.2, 0.9])})
    assert (view.valence, view.arousal, view.quadrant) == (pytest.approx(-0.6), pytest.approx(0.8), "angry")
    assert view.leading_mood == {"mood": "angry", "confidence": pytest.approx(0.6), "clear": True}
    steps = load_taxonomy(
        meta([("dyn", "va_steps", ("valence@0.0s", "arousal@0.0s", "valence@0.5s", "arousal@0.5s"))]),
        write(tmp_path, ""),
    )
    assert mood_view(steps, {"dyn": np.array([0.5, 0.2, 0.7, 0.2])}).valence == pytest.approx(0.2)


def test_a_four_class_network_fills_the_same_fields(tmp_path: Path):
    taxonomy = load_taxonomy(meta([("q", "classes", ("angry", "happy", "relaxed", "sad"))]), write(tmp_path, ""))
    view = mood_view(taxonomy, {"q": np.array([0.1, 0.2, 0.6, 0.1])})
    assert view.quadrant == "relaxed" and view.leading_mood == {
        "mood": "relaxed",
        "confidence": pytest.approx(0.6),
        "clear": True,
    }
    assert view.valence == pytest.approx(0.6) and view.arousal == pytest.approx(-0.4)
    assert view.moods == pytest.approx({"angry": 0.1, "happy": 0.2, "relaxed": 0.6, "sad": 0.1})


def test_summary_tags_timeline_and_embeddings(tmp_path: Path):
    path = write(tmp_path, "[a.happy]\nhappy = 1.0\n[a.sad]\nsad = 1.0\n")
    taxonomy = load_taxonomy(
        meta([("a", "tags", ("happy", "sad"))], uniform_calibration(["a:happy", "a:sad"], ["happy", "sad"])), path
    )
    starts = np.arange(40) * 2.992  # two minutes
    scores = np.stack([np.where(starts < 60, 0.9, 0.1), np.full(40, 0.3)], axis=1).astype(np.float32)
    embedding = np.tile(np.array([[1.0, -2.0, 0.5, 0.0]], np.float32), (40, 1))
    doc = summarise({"a": NetworkOutput(scores, embedding)}, taxonomy, patch_starts_s=starts, segment_s=30)
    assert (
        doc["tags"]["a"] == pytest.approx({"happy": (21 * 0.9 + 19 * 0.1) / 40, "sad": 0.3})
        and doc["top_tags"]["a"][0]["tag"] == "happy"
    )
    assert [s["leading_mood"]["clear"] for s in doc["timeline"]] == [True, True, False, False]
    assert [s["quadrant"] for s in doc["timeline"]][:2] == ["happy", "happy"]
    assert doc["timeline"][0]["end_s"] == pytest.approx(10 * 2.992 + 2.992)  # the last patch starting in the segment
    assert all(set(s["moods"]) == set(doc["moods"]) for s in doc["timeline"])  # the page plots these over time
    assert doc["embeddings"]["a"]["dim"] == 4 and np.allclose(
        decode_embedding(doc["embeddings"]["a"]["data"]), [1.0, -2.0, 0.5, 0.0]
    )
    assert (
        summarise({"a": NetworkOutput(scores, embedding)}, taxonomy, patch_starts_s=starts, embeddings=False)[
            "embeddings"
        ]
        == {}
    )
    json.dumps(doc, allow_nan=False)


def test_embedding_encoding_is_float16_little_endian():
    vector = np.array([0.1, 1000.0, -3.5], np.float32)
    data = encode_embedding(vector)
    assert len(data) == 8 and np.allclose(decode_embedding(data), vector, rtol=1e-3)

"""Mood families: the data file against the models' labels, and the summary rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.model_meta import read_meta
from pipeline.settings import REPO_ROOT
from pipeline.taxonomy import load_taxonomy, summarise


@pytest.mark.parametrize("model", ["musicnn_msd", "musicnn_mtt"])
def test_shipped_mood_file_fits_the_shipped_models(model):
    meta = read_meta(REPO_ROOT / "triton_models", model)
    taxonomy = load_taxonomy(model, meta.labels)
    assert len(taxonomy.families) >= 4


def test_unknown_tag_is_a_config_error(tmp_path: Path):
    path = tmp_path / "moods.toml"
    path.write_text('[families]\nhappy = "x"\n[m.happy]\ncheerful = 0.1\n')
    with pytest.raises(ConfigError, match="cheerful"):
        load_taxonomy("m", ("happy", "sad"), path)


def test_undeclared_family_is_a_config_error(tmp_path: Path):
    path = tmp_path / "moods.toml"
    path.write_text('[families]\nhappy = "x"\n[m.gloomy]\nsad = 0.1\n')
    with pytest.raises(ConfigError, match="gloomy"):
        load_taxonomy("m", ("happy", "sad"), path)


def test_summary_means_over_patches_and_ranks_families_by_threshold_ratio(tmp_path: Path):
    path = tmp_path / "moods.toml"
    path.write_text('[families]\nhappy = "x"\ncalm = "y"\nsad = "z"\n[m.happy]\nhappy = 0.5\n[m.calm]\nchill = 0.1\nsoft = 0.2\n[m.sad]\nsad = 0.9\n')
    taxonomy = load_taxonomy("m", ("happy", "chill", "soft", "sad"), path)
    scores = np.array([[0.6, 0.2, 0.1, 0.5], [0.8, 0.4, 0.3, 0.5]], np.float32)  # two patches
    view = summarise(scores, taxonomy, patch_starts_s=np.array([0.0, 2.992]), segment_s=30)
    assert view.tags == pytest.approx({"happy": 0.7, "chill": 0.3, "soft": 0.2, "sad": 0.5})
    assert view.moods == pytest.approx({"happy": 0.7, "calm": 0.3, "sad": 0.5})
    # calm: 0.3 / 0.1 = 3.0 beats happy: 0.7 / 0.5 = 1.4; sad is under its threshold.
    assert [m["mood"] for m in view.top_moods] == ["calm", "happy"]
    assert view.top_tags[0] == {"tag": "happy", "score": pytest.approx(0.7)}
    assert len(view.timeline) == 1 and view.timeline[0]["end_s"] == pytest.approx(5.984)


def test_timeline_splits_long_tracks_into_segments(tmp_path: Path):
    path = tmp_path / "moods.toml"
    path.write_text('[families]\nhappy = "x"\n[m.happy]\nhappy = 0.5\n')
    taxonomy = load_taxonomy("m", ("happy",), path)
    starts = np.arange(40) * 2.992  # two minutes
    scores = np.where(starts < 60, 0.9, 0.1)[:, None].astype(np.float32)
    view = summarise(scores, taxonomy, patch_starts_s=starts, segment_s=30)
    assert len(view.timeline) == 4
    assert [bool(s["top_moods"]) for s in view.timeline] == [True, True, False, False]

"""Mood calibration: quantiles from reference track scores, stored in every config of an entry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.contracts.model_meta import read_meta
from pipeline.settings import DEFAULT_MODEL_REPOSITORY
from pipeline.stages.taxonomy import family_scores, load_taxonomy
from training.calibrate import TrackSet, calibration_for, entries_scored_by, refuse_reserved, write_calibration


def test_calibrated_families_are_uniform_over_the_reference_and_travel_in_the_configs(tmp_path: Path):
    repo = tmp_path / "models"
    for entry in ("musicnn", "musicnn_msd", "musicnn_mtt"):
        shutil.copytree(DEFAULT_MODEL_REPOSITORY / entry, repo / entry, ignore=shutil.ignore_patterns("*.onnx", "*.pt"))
    assert entries_scored_by(repo, "musicnn") == ["musicnn", "musicnn_msd", "musicnn_mtt"]
    meta = read_meta(repo, "musicnn")
    rng = np.random.default_rng(0)
    tracks = TrackSet(
        files=[f"t{i}" for i in range(400)],
        scores={n.name: rng.beta(0.5, 5.0, (400, len(n.labels))) for n in meta.networks},
        embeddings={n.name: np.zeros((400, n.embedding_dim)) for n in meta.networks},
        patches=np.full(400, 10),
    )
    calibration = calibration_for(load_taxonomy(meta, calibrated=False), tracks, ["pkg"])
    assert calibration["tracks"] == 400 and all(len(q) == 101 for q in calibration["families"].values())
    written = write_calibration(repo, "musicnn", calibration)
    assert sorted(p.name for p in written) == ["config.pbtxt", "cpu.pbtxt"]
    served = read_meta(repo, "musicnn")
    assert served.calibration == calibration and served.served_version.startswith("1+cal.")
    scores = family_scores(load_taxonomy(served), tracks.scores)
    # Over the reference itself each family's score is (close to) uniform on [0, 1].
    assert np.allclose(np.percentile(scores, [10, 50, 90], axis=0).T, [0.1, 0.5, 0.9], atol=0.02)


def test_the_reserved_check_packages_are_refused():
    refuse_reserved([Path("/music/reference/warzone2100-music/a.opus")])
    with pytest.raises(ValueError, match="reserved"):
        refuse_reserved([Path("/music/check/hyperrogue-music/usr/share/hyperrogue/music/x.ogg")])

"""One track through the CPU stages: whole-track analysis and the analysis window (excerpts)."""

from __future__ import annotations

import numpy as np
import pytest
from support import encode, tone

from pipeline.stages import frontend as F
from pipeline.stages.analysis import analyse


def test_excerpts_analyse_only_their_patches_at_their_times():
    data = encode(tone(90.0, rate=F.SAMPLE_RATE, channels=1), "flac", rate=F.SAMPLE_RATE)
    whole = analyse(data, max_duration_s=3600, min_duration_s=1)
    part = analyse(data, max_duration_s=3600, min_duration_s=1, excerpts=3, excerpt_s=9.0)
    per_excerpt = int(9.0 * F.FRAMES_PER_SECOND) // F.PATCH_FRAMES  # whole patches in 9 s
    assert len(part.patches.patches) == 3 * per_excerpt
    assert part.duration_s == pytest.approx(whole.duration_s, abs=0.01)
    assert part.patches.analysed_s == pytest.approx(27.0, abs=0.1)
    starts = part.patches.patch_starts_s
    assert starts[0] == pytest.approx(15.0 - 4.5) and starts[per_excerpt] == pytest.approx(45.0 - 4.5)
    assert np.all(np.diff(starts) > 0)


def test_a_track_shorter_than_the_excerpts_is_analysed_whole():
    data = encode(tone(20.0, rate=F.SAMPLE_RATE, channels=1), "flac", rate=F.SAMPLE_RATE)
    whole = analyse(data, max_duration_s=3600, min_duration_s=1)
    part = analyse(data, max_duration_s=3600, min_duration_s=1, excerpts=3, excerpt_s=9.0)
    np.testing.assert_array_equal(part.patches.patches, whole.patches.patches)
    np.testing.assert_array_equal(part.patches.patch_starts_s, whole.patches.patch_starts_s)


def test_analysis_reports_decoding_and_frontend_time():
    data = encode(tone(10.0), "mp3")
    result = analyse(data, max_duration_s=3600, min_duration_s=1)
    assert result.decode_s > 0 and result.features_s > 0


def test_embeddings_of_excerpts_of_one_real_track_are_nearer_each_other_than_other_tracks(example_clips):
    """The output's embedding (mean over patches, float16) places excerpts of the same track
    together: every excerpt's nearest neighbour, by cosine distance, is from its own track."""
    from pipeline.settings import DEFAULT_MODEL_REPOSITORY
    from pipeline.stages.scoring import OnnxScorer
    from pipeline.stages.taxonomy import decode_embedding, encode_embedding

    scorer = OnnxScorer(DEFAULT_MODEL_REPOSITORY, "musicnn")
    vectors, owners = {n.name: [] for n in scorer.meta.networks}, []
    for track, clip in enumerate(example_clips):
        patches = analyse(clip.read_bytes(), max_duration_s=3600, min_duration_s=1).patches.patches
        outputs = scorer.score_sync(patches)
        for part in np.array_split(np.arange(len(patches)), 3):  # three ~9-s excerpts a track
            owners.append(track)
            for name, out in outputs.items():
                vectors[name].append(decode_embedding(encode_embedding(out.embedding[part].mean(axis=0))))
    owners = np.array(owners)
    assert len(set(owners)) >= 2
    for name, rows in vectors.items():
        unit = np.array(rows) / np.linalg.norm(rows, axis=1, keepdims=True)
        distance = 1 - unit @ unit.T
        np.fill_diagonal(distance, np.inf)
        nearest = distance.argmin(axis=1)
        assert (owners[nearest] == owners).all(), (name, distance.round(3))
        same = distance[(owners[:, None] == owners[None, :]) & np.isfinite(distance)]
        other = distance[owners[:, None] != owners[None, :]]
        assert same.max() < other.min(), name

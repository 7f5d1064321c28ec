"""Heads as the model entry carries them: read from JSON, applied to a track's patch outputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.stages.heads import QUADRANTS, Heads, decode_array, encode_array

NETWORKS = {"net_a": (3, 4), "net_b": (2, 5)}  # name -> (labels, embedding dim)


@dataclass
class Out:
    scores: np.ndarray
    embedding: np.ndarray


def outputs(n: int, seed: int = 0) -> dict[str, Out]:
    rng = np.random.default_rng(seed)
    return {
        name: Out(rng.uniform(0.01, 0.99, (n, labels)), rng.normal(size=(n, dim)))
        for name, (labels, dim) in NETWORKS.items()
    }


def linear(rng, d: int, k: int, **extra) -> dict:
    return {
        "mean": encode_array(rng.normal(size=d)),
        "scale": encode_array(rng.uniform(0.5, 2.0, size=d)),
        "layers": [{"weight": encode_array(rng.normal(size=(d, k))), "bias": encode_array(rng.normal(size=k))}],
        **extra,
    }


def doc(seed: int = 0, **over) -> dict:
    rng = np.random.default_rng(seed)
    inputs = [
        {"network": "net_a", "output": "scores", "transform": "logit"},
        {"network": "net_b", "output": "embedding"},
    ]
    d = (3 + 5) * 2
    return {
        "version": "test-1",
        "trained_on": {"dataset": "synthetic", "clips": 0},
        "inputs": inputs,
        "statistics": ["mean", "std"],
        "track": "segments",
        "quadrant": {"labels": list(QUADRANTS), "members": [linear(rng, d, 4, temperature=1.5), linear(rng, d, 4)]},
        "families": {
            "labels": ["happy", "sad"],
            "members": [
                linear(
                    rng, d, 2, platt={"a": encode_array(np.array([1.0, 0.5])), "b": encode_array(np.array([0.0, -1.0]))}
                )
            ],
        },
        **over,
    }


def test_arrays_travel_as_float32_base64():
    a = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    back = decode_array(encode_array(a))
    assert back.shape == (2, 3) and np.allclose(back, a, atol=1e-7)


def test_features_are_each_statistic_of_each_input_over_the_rows_patches():
    heads = Heads.from_json(doc(), NETWORKS)
    out = outputs(6)
    rows = [np.arange(0, 4), np.arange(4, 6)]
    features = heads.features(out, rows)
    p = np.clip(out["net_a"].scores, 1e-6, 1 - 1e-6)
    per_patch = np.concatenate([np.log(p / (1 - p)), out["net_b"].embedding], axis=1)
    for i, r in enumerate(rows):
        assert np.allclose(features[i], np.concatenate([per_patch[r].mean(0), per_patch[r].std(0)]))


def test_probabilities_follow_the_members_and_calibration():
    heads = Heads.from_json(doc(), NETWORKS)
    out = outputs(5)
    quadrant, families = heads.predict(out, [np.arange(5)])
    assert quadrant.shape == (1, 4) and np.allclose(quadrant.sum(axis=1), 1.0)
    assert families is not None and families.shape == (1, 2) and ((families > 0) & (families < 1)).all()
    # By hand: the mean of the members' tempered softmaxes.
    x = heads.features(out, [np.arange(5)])
    expected = []
    for member in heads.quadrant.members:
        z = ((x - member.mean) / member.scale) @ member.layers[0].weight + member.layers[0].bias
        z = np.exp(z / member.temperature - (z / member.temperature).max())
        expected.append(z / z.sum())
    assert np.allclose(quadrant, np.mean(expected, axis=0))


def test_the_id_changes_with_the_content():
    assert Heads.from_json(doc(0), NETWORKS).id == Heads.from_json(doc(0), NETWORKS).id
    assert Heads.from_json(doc(0), NETWORKS).id != Heads.from_json(doc(1), NETWORKS).id


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"inputs": [{"network": "elsewhere", "output": "scores"}]}, "elsewhere"),
        ({"statistics": ["median"]}, "median"),
        ({"track": "sometimes"}, "track"),
        ({"quadrant": {"labels": ["a", "b", "c", "d"], "members": []}}, "member"),
    ],
)
def test_a_broken_head_set_is_a_config_error(change, words):
    with pytest.raises(ConfigError, match=words):
        Heads.from_json(doc(**change), NETWORKS)


def test_a_member_of_the_wrong_width_is_refused():
    broken = doc()
    broken["quadrant"]["members"][0]["layers"][0]["weight"] = encode_array(np.zeros((3, 4)))
    with pytest.raises(ConfigError):
        Heads.from_json(broken, NETWORKS)

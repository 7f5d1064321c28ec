"""From per-patch tag scores to the mood view of a track.

    track score of a tag   = mean of that tag over the track's patches
    mood family score      = max of its member tags' track scores   (families: moods.toml)
    top_moods              = families whose best member reaches its threshold, strongest first
    timeline               = the same, per segment of ``segment_s`` seconds

The families and thresholds are data (``moods.toml``), checked against the model's labels when
the worker starts, so no code here names a tag.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.features import PATCH_SECONDS

DEFAULT_MOODS_FILE = Path(__file__).with_name("moods.toml")


@dataclass(frozen=True)
class Family:
    name: str
    tag_index: tuple[int, ...]  # member tags, as indices into the model's labels
    thresholds: np.ndarray  # [n_members] score at which each member counts


@dataclass(frozen=True)
class Taxonomy:
    labels: tuple[str, ...]
    families: tuple[Family, ...]  # may be empty: a model without moods still gets tags


def load_taxonomy(model: str, labels: tuple[str, ...], path: Path = DEFAULT_MOODS_FILE) -> Taxonomy:
    """The families of ``model`` from ``path``; ConfigError names any tag the model lacks."""
    try:
        doc: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"mood file {path}: {exc}") from None
    known = doc.get("families", {})
    index = {label: i for i, label in enumerate(labels)}
    families = []
    for family, members in doc.get(model, {}).items():
        if family not in known:
            raise ConfigError(f"{path}: [{model}.{family}] is not declared under [families]")
        missing = [tag for tag in members if tag not in index]
        if missing:
            raise ConfigError(f"{path}: [{model}.{family}] names tags the model lacks: {missing}")
        families.append(
            Family(
                family,
                tuple(index[tag] for tag in members),
                np.array([float(t) for t in members.values()], dtype=np.float32),
            )
        )
    return Taxonomy(tuple(labels), tuple(families))


@dataclass(frozen=True)
class MoodView:
    tags: dict[str, float]  # every label -> track score
    top_tags: list[dict[str, float | str]]  # [{tag, score}] highest first
    moods: dict[str, float]  # family -> score
    top_moods: list[dict[str, float | str]]  # [{mood, score}] families over threshold
    timeline: list[dict[str, Any]]  # [{start_s, end_s, top_moods}]


def _rank_moods(taxonomy: Taxonomy, scores: np.ndarray, top_n: int) -> tuple[dict[str, float], list[dict[str, float | str]]]:
    """scores: [n_labels] -> (family -> score, the families over threshold, best first)."""
    moods: dict[str, float] = {}
    present = []
    for family in taxonomy.families:
        member = scores[list(family.tag_index)]
        best = int(np.argmax(member))
        moods[family.name] = round(float(member[best]), 6)
        # Ranked by how far past its threshold the family is, so a rare tag that clears its
        # bar is not buried under a common one.
        ratio = float(member[best] / family.thresholds[best])
        if ratio >= 1.0:
            present.append((ratio, family.name))
    present.sort(reverse=True)
    return moods, [{"mood": name, "score": moods[name]} for _, name in present[:top_n]]


def summarise(
    patch_scores: np.ndarray,
    taxonomy: Taxonomy,
    *,
    patch_starts_s: np.ndarray,
    top_n: int = 3,
    top_tags: int = 10,
    segment_s: float = 30.0,
) -> MoodView:
    """patch_scores: [n_patches, n_labels] probabilities; patch_starts_s: [n_patches] seconds."""
    if len(patch_scores) == 0:
        raise ValueError("a track needs at least one patch")
    track = patch_scores.mean(axis=0)
    tags = {label: round(float(s), 6) for label, s in zip(taxonomy.labels, track)}
    order = np.argsort(-track, kind="stable")[:top_tags]
    moods, top_moods = _rank_moods(taxonomy, track, top_n)
    timeline = []
    segment = np.floor(patch_starts_s / segment_s).astype(int)
    for seg in np.unique(segment):
        rows = segment == seg
        _, seg_top = _rank_moods(taxonomy, patch_scores[rows].mean(axis=0), top_n)
        timeline.append(
            {
                "start_s": round(float(seg * segment_s), 3),
                "end_s": round(float(patch_starts_s[rows].max() + PATCH_SECONDS), 3),
                "top_moods": seg_top,
            }
        )
    return MoodView(
        tags=tags,
        top_tags=[{"tag": taxonomy.labels[i], "score": tags[taxonomy.labels[i]]} for i in order],
        moods=moods,
        top_moods=top_moods,
        timeline=timeline,
    )

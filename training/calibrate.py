"""Mood thresholds from a reference collection: ``moodstream-train calibrate-moods DIR...``.

For each tag named in ``moods.toml`` for a model, the threshold is the larger of a floor
(default 0.05: the model must give the tag at least a 5 % probability) and a percentile
(default the 90th) of that tag's track score over the reference tracks (a tag that is common in
the reference music must stand out to count). Prints the model's sections of the TOML file
with the new thresholds, to paste over the old ones.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np

from pipeline.scoring import OnnxScorer
from pipeline.storage import AUDIO_EXTENSIONS
from pipeline.tagging import analyse
from pipeline.taxonomy import DEFAULT_MOODS_FILE


def track_scores(files: list[Path], scorer: OnnxScorer) -> np.ndarray:
    """[n_files, n_labels] mean patch scores; files that do not decode are skipped."""
    rows = []
    for path in files:
        try:
            patches = analyse(path.read_bytes(), max_duration_s=3600, min_duration_s=1.0).patches.patches
        except Exception as exc:  # noqa: BLE001 - a reference set may hold odd files; say which
            print(f"# skipped {path}: {exc}")
            continue
        rows.append(scorer.score_sync(patches).mean(axis=0))
    return np.stack(rows)


def calibrate(folders: list[Path], model: str, repository: Path, percentile: float = 90.0, floor: float = 0.05, moods_file: Path = DEFAULT_MOODS_FILE) -> str:
    """The ``[model.family]`` TOML sections with thresholds max(floor, percentile)."""
    files = sorted(p for d in folders for p in d.rglob("*") if p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS)
    scorer = OnnxScorer(repository, model)
    scores = track_scores(files, scorer)
    index = {label: i for i, label in enumerate(scorer.meta.labels)}
    sections = tomllib.loads(moods_file.read_text()).get(model, {})
    lines = [f"# {model}: max({floor:g}, {percentile:g}th percentile of track scores over {len(scores)} reference tracks)"]
    for family, members in sections.items():
        lines.append(f"[{model}.{family}]")
        for tag in members:
            value = float(np.percentile(scores[:, index[tag]], percentile))
            key = tag if tag.replace("_", "").isalnum() else f'"{tag}"'
            lines.append(f"{key} = {max(floor, value):.3f}  # p{percentile:g} {value:.4f}")
    return "\n".join(lines)

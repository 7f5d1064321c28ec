"""``moodstream-train human-eval 4q`` and ``moodstream-train heads 4q``: heads learned from the 4Q
set's human labels, measured like the papers and shipped with their model entry.

    4Q clips -> the entry's per-patch outputs (cached: training/heads/data.py)
             -> per clip, each statistic of each input over its patches (pipeline.stages.heads)
             -> human-eval: both protocols (training/heads/protocols.py), the recipe fitted
                inside every training fold (training/heads/recipe.py)
             -> heads: the recipe on all 900 clips, written into the entry's configs as the
                moodstream_heads parameter; the clips' features saved beside this module (no
                audio) so the test suite checks the heads on real human labels
"""

from __future__ import annotations

import json
import sys
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contracts.model_meta import HEADS_PARAMETER, read_meta
from pipeline.stages.heads import QUADRANTS, STATISTICS, Input, patch_features, row_features
from training.data import fourq
from training.export import write_parameter
from training.heads import protocols, recipe
from training.heads.data import DEFAULT_CACHE, clip_outputs

HERE = Path(__file__).resolve().parent
FAMILIES_FILE = HERE / "families.toml"
#: The clips' features as committed: no audio, only what the networks compute from it.
FEATURES_DIR = HERE / "features"
CITATION = (
    "Panda, R., Malheiro, R., & Paiva, R. P. (2018). Novel audio features for music emotion recognition. "
    "IEEE Transactions on Affective Computing. 4Q Audio Emotion Dataset, http://mir.dei.uc.pt"
)


def recipe_inputs(model: str, repository: Path) -> tuple[Input, ...]:
    """Every network's tag scores (through the logit) and its embedding."""
    meta = read_meta(repository, model)
    return tuple(
        Input(n.name, output, "logit" if output == "scores" else "none")
        for n in meta.networks
        for output in ("scores", "embedding")
    )


def families() -> dict[str, list[str]]:
    return dict(tomllib.loads(FAMILIES_FILE.read_text())["families"])


def family_targets(clips: list[fourq.Clip]) -> np.ndarray:
    """[n, F] 1 where a clip's mood words include one of the family's."""
    words = families()
    return np.array([[any(w in c.moods for w in ws) for ws in words.values()] for c in clips], np.int8)


@dataclass(frozen=True)
class LabelledFeatures:
    """One model's features of the labelled clips, with their labels."""

    model: str
    features: np.ndarray  # [n, D] per clip
    labels: np.ndarray  # [n] quadrant index
    artists: np.ndarray  # [n] artist index (for the artist-disjoint protocol)
    families: np.ndarray  # [n, F]
    songs: list[str]
    fingerprint: str
    inputs: tuple[Input, ...]
    statistics: tuple[str, ...] = STATISTICS

    def save(self, path: Path) -> None:
        """The committed form: float16 features, labels, artist indices, family targets."""
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            features=self.features.astype(np.float16),
            labels=self.labels.astype(np.int8),
            artists=self.artists.astype(np.int16),
            families=self.families,
            songs=np.array(self.songs),
            meta=np.array(
                json.dumps(
                    {
                        "model": self.model,
                        "fingerprint": self.fingerprint,
                        "inputs": [i.__dict__ for i in self.inputs],
                        "statistics": list(self.statistics),
                        "families": families(),
                        "citation": CITATION,
                    }
                )
            ),
        )

    @classmethod
    def load(cls, path: Path) -> LabelledFeatures:
        with np.load(path) as saved:
            meta = json.loads(str(saved["meta"]))
            return cls(
                meta["model"],
                saved["features"].astype(np.float64),
                saved["labels"].astype(np.int64),
                saved["artists"].astype(np.int64),
                saved["families"],
                [str(s) for s in saved["songs"]],
                meta["fingerprint"],
                tuple(Input(**i) for i in meta["inputs"]),
                tuple(meta["statistics"]),
            )


def labelled_features(
    data_root: Path, model: str, repository: Path, *, cache_dir: Path = DEFAULT_CACHE
) -> LabelledFeatures:
    """The model's per-clip features on the 4Q clips under ``data_root`` (clips the decoder
    refuses are left out, by name)."""
    clips = fourq.load(data_root)
    fingerprint = fourq.fingerprint(clips)
    found = clip_outputs([c.path for c in clips], model, repository, fingerprint, cache_dir=cache_dir)
    inputs = recipe_inputs(model, repository)
    rows = found.rows(len(clips))
    kept = [i for i, r in enumerate(rows) if len(r)]
    features = row_features(patch_features(inputs, found.outputs), STATISTICS, [rows[i] for i in kept])
    clips = [clips[i] for i in kept]
    _, artists = np.unique([c.artist.lower() for c in clips], return_inverse=True)
    return LabelledFeatures(
        model,
        features,
        np.array([c.label for c in clips]),
        artists,
        family_targets(clips),
        [c.song for c in clips],
        fingerprint,
        inputs,
    )


def quadrant_fit_predict(
    train: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, test: np.ndarray, seed: int
) -> np.ndarray:
    return recipe.fit_quadrant(train, labels, groups, seed=seed).probabilities(test)


def human_eval(found: LabelledFeatures, *, seeds: tuple[int, ...] = protocols.SEEDS) -> list[dict[str, Any]]:
    """Both protocols on ``found``: one result per protocol."""
    out = []
    for protocol in protocols.PROTOCOLS:
        started = time.monotonic()
        result = protocols.evaluate(
            protocol, found.features, found.labels, found.artists, quadrant_fit_predict, seeds=seeds
        )
        row = {
            "protocol": protocol,
            "model": found.model,
            **result.as_json(),
            "clips": len(found.labels),
            "seeds": list(seeds),
            "seconds": round(time.monotonic() - started, 1),
        }
        out.append(row)
        print(json.dumps(row, sort_keys=True), flush=True)
    return out


GOALS = {"musicnn": {"stratified": 0.82, "artist": 0.80}, "musicnn_student": {"stratified": 0.80, "artist": 0.78}}
ECE_GOAL = 0.05


def as_table(results: list[dict[str, Any]]) -> str:
    """The human-eval results as a Markdown table, with the goals."""
    lines = [
        "| model | protocol | macro-F1 | accuracy | ECE | F1 happy / angry / sad / relaxed | relaxing vs energetic F1 | happy vs sad F1 | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        goal = GOALS.get(r["model"], {}).get(r["protocol"])
        met = goal is not None and r["macro_f1"] >= goal and r["ece"] <= ECE_GOAL
        lines.append(
            f"| {r['model']} | {r['protocol']} | {r['macro_f1']:.3f} ± {r['macro_f1_std']:.3f} | {r['accuracy']:.3f} | {r['ece']:.3f} "
            f"| {' / '.join(f'{x:.2f}' for x in r['per_class_f1'])} | {r['relaxing_energetic']['macro_f1']:.3f} | {r['happy_sad']['macro_f1']:.3f} "
            f"| {_goal(goal, met)} |"
        )
    return "\n".join(lines)


def _goal(goal: float | None, met: bool) -> str:
    if goal is None:
        return ""
    return f"≥ {goal:.2f}, ECE ≤ {ECE_GOAL:.2f}: {'met' if met else 'missed'}"


def train_heads(found: LabelledFeatures, *, seed: int = 0) -> dict[str, Any]:
    """The heads on every clip: the moodstream_heads JSON."""
    quadrant = recipe.fit_quadrant(found.features, found.labels, found.artists, seed=seed)
    family = recipe.fit_families(found.features, found.families.astype(int), found.artists, seed=seed)
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    return {
        "version": f"4q-{stamp}-{found.fingerprint[:8]}",
        "trained_on": {
            "dataset": "4Q Audio Emotion Dataset (Panda, Malheiro & Paiva, IEEE TAFFC 2018)",
            "clips": len(found.labels),
            "fingerprint": found.fingerprint,
            "family_words": families(),
            "chosen_c": {"quadrant": quadrant.chosen_c, "families": family.chosen_c},
        },
        "inputs": [i.__dict__ for i in found.inputs],
        "statistics": list(found.statistics),
        "track": "segments",
        "quadrant": {"labels": list(QUADRANTS), "members": [quadrant.member]},
        "families": {"labels": list(families()), "members": [family.member]},
    }


def write_heads(repository: Path, model: str, heads: dict[str, Any]) -> list[Path]:
    """Put ``heads`` into every config of the entry; the files written."""
    return write_parameter(repository, model, HEADS_PARAMETER, heads)


def main_human_eval(
    data_root: Path | None,
    models: list[str],
    repository: Path,
    *,
    features_only: bool = False,
    seeds: int = len(protocols.SEEDS),
) -> int:
    """The command: features from the audio (``data_root``) or the committed ones."""
    results = []
    for model in models:
        found = (
            LabelledFeatures.load(FEATURES_DIR / f"4q-{model}.npz")
            if data_root is None
            else labelled_features(data_root, model, repository)
        )
        results += human_eval(found, seeds=protocols.SEEDS[:seeds])
    print(as_table(results))
    return 0


def main_heads(data_root: Path, model: str, repository: Path, *, write: bool) -> int:
    found = labelled_features(data_root, model, repository)
    heads = train_heads(found)
    found.save(FEATURES_DIR / f"4q-{model}.npz")
    if write:
        for path in write_heads(repository, model, heads):
            print(f"wrote {path}", file=sys.stderr)
    else:
        print(json.dumps(heads)[:400] + " ...")
    return 0

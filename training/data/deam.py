"""DEAM (MediaEval Database for Emotional Analysis in Music, Aljanaki et al., 2017) as published.

    .../static_annotations_averaged_songs_1_2000.csv      song_id, valence_mean, valence_std,
    .../static_annotations_averaged_songs_2000_2058.csv   arousal_mean, arousal_std  (1..9 scale;
                                                          headers carry leading spaces)
    .../arousal.csv, .../valence.csv                      dynamic: song_id, sample_15000ms,
                                                          sample_15500ms, ... (2 Hz, -1..1; rows
                                                          end early for shorter songs)
    .../MEMD_audio/<song_id>.mp3

Files are found by name anywhere under the root (the archives nest them differently). Targets
are scaled to [0, 1]: static ``(x - 1) / 8``, dynamic ``(x + 1) / 2``. DEAM has no official
split: a stable hash of the song id puts ``val_fraction`` and ``test_fraction`` of the songs aside.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from training.data import SPLITS, LabelledSet, Track, hash_split
from training.models.lstm_va import N_STEPS, TARGETS, step_labels

STATIC_FILES = ("static_annotations_averaged_songs_1_2000.csv", "static_annotations_averaged_songs_2000_2058.csv")


def _find(root: Path, name: str) -> Path:
    hits = sorted(p for p in root.rglob(name) if p.is_file())
    if not hits:
        raise FileNotFoundError(f"no {name} under {root}")
    return hits[0]


def _audio_dir(root: Path) -> Path:
    hits = sorted(p for p in root.rglob("MEMD_audio") if p.is_dir())
    if not hits:
        raise FileNotFoundError(f"no MEMD_audio folder under {root}")
    return hits[0]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        return [dict(zip(header, (v.strip() for v in row))) for row in reader if row and row[0].strip()]


def read_static(root: Path) -> dict[str, np.ndarray]:
    """song id -> [valence_mean, arousal_mean] on DEAM's 1..9 scale."""
    out = {}
    for name in STATIC_FILES:
        try:
            path = _find(root, name)
        except FileNotFoundError:
            if name == STATIC_FILES[0]:
                raise
            continue  # the 2000-2058 file is a separate download; use what is there
        for row in _rows(path):
            out[row["song_id"]] = np.array([float(row["valence_mean"]), float(row["arousal_mean"])], np.float32)
    return out


def read_dynamic(root: Path) -> tuple[dict[str, np.ndarray], float]:
    """(song id -> [n_steps, 2] (valence, arousal) on -1..1, time of the first step in seconds)."""
    series = {}
    start_s = None
    for j, target in enumerate(TARGETS):
        with _find(root, f"{target}.csv").open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader)]
            times = [int(h.removeprefix("sample_").removesuffix("ms")) / 1000 for h in header[1:]]
            if start_s is None:
                start_s = times[0]
            for row in reader:
                if not row or not row[0].strip():
                    continue
                values = [float(v) for v in row[1:] if v.strip()]
                series.setdefault(row[0].strip(), [None, None])[j] = np.array(values, np.float32)
    out = {}
    for song, (valence, arousal) in series.items():
        if valence is None or arousal is None:
            continue
        n = min(len(valence), len(arousal))
        out[song] = np.stack([valence[:n], arousal[:n]], axis=1)
    return out, float(start_s or 0.0)


def _catalog(
    kind: str,
    task: str,
    labels: tuple[str, ...],
    root: Path,
    targets: dict[str, np.ndarray],
    start_s: float,
    val_fraction: float,
    test_fraction: float,
) -> LabelledSet:
    audio = _audio_dir(root)
    present = {k: v for k, v in targets.items() if (audio / f"{k}.mp3").is_file()}
    split_of = hash_split(sorted(present), val_fraction, test_fraction)
    splits: dict[str, list[Track]] = {s: [] for s in SPLITS}
    for key in sorted(present, key=lambda k: (len(k), k)):
        splits[split_of[key]].append(Track(key, str(audio / f"{key}.mp3"), present[key], start_s))
    return LabelledSet(kind, task, labels, splits)


def load_static(root: Path, val_fraction: float = 0.1, test_fraction: float = 0.1) -> LabelledSet:
    """Whole-song valence and arousal (task ``va``), scaled to [0, 1]."""
    root = Path(root)
    targets = {k: (v - 1.0) / 8.0 for k, v in read_static(root).items()}
    return _catalog("deam", "va", TARGETS, root, targets, 0.0, val_fraction, test_fraction)


def load_dynamic(root: Path, val_fraction: float = 0.1, test_fraction: float = 0.1) -> LabelledSet:
    """Valence and arousal every 500 ms (task ``va_steps``), scaled to [0, 1]."""
    root = Path(root)
    series, start_s = read_dynamic(root)
    targets = {k: (v + 1.0) / 2.0 for k, v in series.items()}
    return _catalog(
        "deam_dynamic", "va_steps", tuple(step_labels(N_STEPS)), root, targets, start_s, val_fraction, test_fraction
    )

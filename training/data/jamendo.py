"""MTG-Jamendo mood/theme (Bogdanov et al., 2019) in its published layout.

    <root>/autotagging_moodtheme.tsv                              every track, all 56 tags
    <root>/splits/split-<N>/autotagging_moodtheme-train.tsv       the official splits 0..4
    <root>/splits/split-<N>/autotagging_moodtheme-validation.tsv
    <root>/splits/split-<N>/autotagging_moodtheme-test.tsv
    <audio_root>/<PATH>                                           PATH like "48/948.mp3"

Each TSV has the header ``TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION TAGS`` and CRLF line ends;
a row's tags are its 6th and later tab-separated fields (``mood/theme---calm``). Labels are the
tag names without the ``mood/theme---`` prefix, sorted, taken from the full TSV so every split
shares one label order. The low-quality audio download names files ``48/948.low.mp3``; either
form is found.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data import SPLITS, LabelledSet, Track

TSV = "autotagging_moodtheme.tsv"
PREFIX = "mood/theme---"
HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION")


def read_tsv(path: Path) -> list[tuple[str, str, list[str]]]:
    """[(track id, relative audio path, tags without prefix)] of one Jamendo TSV."""
    lines = path.read_text(encoding="utf-8").splitlines()  # CRLF or LF
    if not lines or tuple(lines[0].split("\t")[:5]) != HEADER:
        raise ValueError(f"{path}: not an MTG-Jamendo TSV (header {lines[:1]})")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 6:
            raise ValueError(f"{path}:{n}: expected at least 6 tab-separated fields, got {len(fields)}")
        tags = [t.strip().removeprefix(PREFIX) for t in fields[5:] if t.strip()]
        rows.append((fields[0].strip(), fields[3].strip(), tags))
    return rows


def audio_path(audio_root: Path, relative: str) -> Path:
    path = audio_root / relative
    if not path.is_file() and path.suffix == ".mp3":
        low = path.with_suffix(".low.mp3")
        if low.is_file():
            return low
    return path


def load(root: Path, audio_root: Path | None = None, split: int = 0) -> LabelledSet:
    """The tracks of official split ``split``, with multi-hot tag targets."""
    root = Path(root)
    audio_root = Path(audio_root) if audio_root else root
    labels = tuple(sorted({t for _, _, tags in read_tsv(root / TSV) for t in tags}))
    index = {t: i for i, t in enumerate(labels)}
    splits = {}
    for name in SPLITS:
        tracks = []
        for track_id, rel, tags in read_tsv(root / "splits" / f"split-{split}" / f"autotagging_moodtheme-{name}.tsv"):
            target = np.zeros(len(labels), np.float32)
            target[[index[t] for t in tags]] = 1.0
            tracks.append(Track(track_id, str(audio_path(audio_root, rel)), target))
        splits[name] = tracks
    return LabelledSet("jamendo", "tags", labels, splits)

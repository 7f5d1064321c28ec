"""The 4Q Audio Emotion Dataset, read from a local folder: human labels for the moods.

Panda, Malheiro & Paiva, "Novel audio features for music emotion recognition", IEEE Transactions
on Affective Computing, 2018; http://mir.dei.uc.pt ("4QAED"). 900 clips of
about 30 s from AllMusic, 225 in each of Russell's quadrants, each labelled from the AllMusic mood
words of its song:

    Q1  happy, exuberant   valence +, arousal +
    Q2  angry, anxious     valence -, arousal +
    Q3  sad, depressed     valence -, arousal -
    Q4  calm, relaxed      valence +, arousal -

The folder holds ``Q1/`` .. ``Q4/`` with the clips as MP3 (``<Song>.mp3``),
``panda_dataset_taffc_annotations.csv`` (Song, Quadrant) and ``panda_dataset_taffc_metadata.csv``
(Artist, Title, the AllMusic mood words ``MoodsStrSplit``, genres...). The clips are research-use
previews: moodstream never copies or commits them; what the networks compute from them may be
kept (``training/heads``).

    root/Q1/MT0000040632.mp3 ...
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

QUADRANTS = ("Q1", "Q2", "Q3", "Q4")
#: The product's name of each quadrant (pipeline.stages.taxonomy.QUADRANTS, in the same order).
QUADRANT_MOODS = {"Q1": "happy", "Q2": "angry", "Q3": "sad", "Q4": "relaxed"}
ANNOTATIONS = "panda_dataset_taffc_annotations.csv"
METADATA = "panda_dataset_taffc_metadata.csv"
CLIPS = 900


@dataclass(frozen=True)
class Clip:
    """One labelled clip."""

    song: str  # AllMusic id, e.g. MT0000040632
    quadrant: str  # Q1..Q4
    artist: str
    title: str
    moods: tuple[str, ...]  # AllMusic mood words, lower case (MoodsStrSplit)
    genres: tuple[str, ...]
    path: Path

    @property
    def label(self) -> int:
        """The quadrant as a class index 0..3."""
        return QUADRANTS.index(self.quadrant)


class DatasetError(ValueError):
    """The folder is not the 4Q layout, or is incomplete."""


def load(root: Path) -> list[Clip]:
    """Every clip of the 4Q set under ``root``, in song order; DatasetError saying what is missing.

    The quadrant comes from the annotations file and must agree with the metadata and with the
    folder the clip lies in.
    """
    root = Path(root).expanduser()
    for name in (ANNOTATIONS, METADATA):
        if not (root / name).is_file():
            raise DatasetError(f"{root} is not the 4Q layout: no {name} (expected Q1/..Q4/, {ANNOTATIONS}, {METADATA})")
    with open(root / ANNOTATIONS, newline="", encoding="utf-8") as f:
        labels = {row["Song"]: row["Quadrant"] for row in csv.DictReader(f)}
    with open(root / METADATA, newline="", encoding="utf-8") as f:
        meta = {row["Song"]: row for row in csv.DictReader(f)}
    clips, missing = [], []
    for song in sorted(labels):
        quadrant = labels[song]
        row = meta.get(song)
        if quadrant not in QUADRANTS or row is None or row["Quadrant"] != quadrant:
            raise DatasetError(
                f"{song}: quadrant {quadrant!r} in {ANNOTATIONS}, {row and row['Quadrant']!r} in {METADATA}"
            )
        path = root / quadrant / f"{song}.mp3"
        if not path.is_file():
            missing.append(str(path.relative_to(root)))
            continue
        clips.append(
            Clip(
                song=song,
                quadrant=quadrant,
                artist=row["Artist"].strip(),
                title=row["Title"].strip(),
                moods=_words(row["MoodsStrSplit"]),
                genres=_words(row["GenresStr"]),
                path=path,
            )
        )
    if missing:
        raise DatasetError(f"{len(missing)} clips listed in {ANNOTATIONS} are missing under {root}, e.g. {missing[:3]}")
    return clips


def _words(field: str) -> tuple[str, ...]:
    return tuple(w.strip().lower() for w in field.split(";") if w.strip())


def fingerprint(clips: list[Clip]) -> str:
    """16 hex digits naming the labelled set: songs, quadrants, artists and mood words (not the
    audio bytes, which a user's copy may re-encode). Heads record it as their training data."""
    digest = hashlib.sha256()
    for c in clips:
        digest.update(f"{c.song}\t{c.quadrant}\t{c.artist}\t{';'.join(c.moods)}\n".encode())
    return digest.hexdigest()[:16]

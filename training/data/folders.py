"""A labelled catalog as one folder per class, and unlabelled collections (a folder or S3 prefix).

    <root>/<class name>/**/<audio file>        e.g. happy/, angry/, sad/, relaxed/

Audio files are those with an extension in :data:`pipeline.stages.storage.AUDIO_EXTENSIONS`. Without
an official split, a stable hash of the file's path relative to the root sets tracks aside for
validation and test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.stages.storage import list_audio, local_audio_files, make_s3_client
from training.data import SPLITS, LabelledSet, Track, hash_split


def load_classes(root: Path, val_fraction: float = 0.15, test_fraction: float = 0.15) -> LabelledSet:
    """Single-label classes (task ``classes``) named after the sub-folders, sorted."""
    root = Path(root)
    labels = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if len(labels) < 2:
        raise ValueError(f"{root}: expected one sub-folder per class, found {list(labels)}")
    files = [(i, f) for i, label in enumerate(labels) for f in local_audio_files(root / label)]
    split_of = hash_split([str(f.relative_to(root)) for _, f in files], val_fraction, test_fraction)
    splits: dict[str, list[Track]] = {s: [] for s in SPLITS}
    for i, f in files:
        rel = str(f.relative_to(root))
        splits[split_of[rel]].append(Track(rel, str(f), np.array(i, np.int64)))
    return LabelledSet("folders", "classes", labels, splits)


def list_unlabelled(where: str, s3_client: object = None) -> list[Track]:
    """Every audio file under a folder, or every audio object under ``s3://bucket/prefix``."""
    if where.startswith("s3://"):
        client = s3_client or make_s3_client()
        return [Track(f"{o.key}", f"s3://{o.bucket}/{o.key}") for o in list_audio(where, client=client)]
    root = Path(where)
    if not root.is_dir():
        raise FileNotFoundError(f"{where}: not a folder or s3:// prefix")
    return [Track(str(f.relative_to(root)), str(f)) for f in local_audio_files(root)]

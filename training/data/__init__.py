"""Labelled and unlabelled collections, as the models see them.

A loader (:mod:`.jamendo`, :mod:`.deam`, :mod:`.folders`) reads a data set in its own on-disk
layout and returns a :class:`LabelledSet`: the task, the output labels and the tracks of each split,
each with its target. :mod:`.cache` turns a track's audio into log-mel frames once (with the
serving frontend) and :mod:`.patches` cuts them into model patches with their targets.

Targets per task:

    tags      [n_labels] float 0/1 (multi-label)
    classes   [] int64 class index
    va        [2] float (valence, arousal) scaled to [0, 1]
    va_steps  [n_annotations, 2] float (valence, arousal) scaled to [0, 1], one row every
              ``STEP_S`` seconds from ``Track.annotations_start_s``
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Track:
    key: str  # the data set's track id
    source: str  # a local path or an s3:// URI
    target: np.ndarray | None = None  # see the module doc; None when unlabelled
    annotations_start_s: float = 0.0  # va_steps: time of the first annotation row


@dataclass(frozen=True)
class LabelledSet:
    name: str  # the data set kind ("jamendo", "deam", ...)
    task: str
    labels: tuple[str, ...]  # output names in output order
    splits: dict[str, list[Track]] = field(default_factory=dict)  # SPLITS -> tracks


def hash_split(keys: list[str], val_fraction: float, test_fraction: float, salt: str = "moodstream") -> dict[str, str]:
    """key -> split. Keys are ordered by a hash of the key (not a random draw, so the split does
    not depend on the seed, the machine or the listing order); the first ``test_fraction`` of
    them (at least one when the fraction is non-zero) are test, the next ``val_fraction``
    validation, the rest train. Adding tracks moves at most the tracks at the boundaries."""
    ordered = sorted(keys, key=lambda k: hashlib.sha256(f"{salt}:{k}".encode()).digest())
    n = len(ordered)
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 and n >= 3 else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 and n >= 3 else 0
    return {k: "test" if i < n_test else "validation" if i < n_test + n_val else "train" for i, k in enumerate(ordered)}

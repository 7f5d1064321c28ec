"""Tiny data sets in the exact on-disk formats of MTG-Jamendo, DEAM and a class-per-folder
catalog, with synthesised audio whose pitch carries the label (so a model can learn it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import encode, tone

from pipeline.settings import DEFAULT_MODEL_REPOSITORY

JAMENDO_TAGS = ("calm", "energetic", "happy", "relaxing", "sad")
CLASSES = ("angry", "happy", "relaxed", "sad")
RATE = 22_050


def _audio(path: Path, seconds: float, freq: float, fmt: str = "mp3") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A little per-file amplitude change so no two files share their bytes.
    signal = tone(seconds, rate=RATE, channels=1, freq=freq) * (0.8 + 0.02 * (int(freq) % 7))
    path.write_bytes(encode(signal, fmt, rate=RATE))


def _tsv(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS"
    # newline="" keeps the CRLF the real files have.
    with path.open("w", newline="") as f:
        f.write("\r\n".join([header, *rows]) + "\r\n")


@pytest.fixture(scope="session")
def jamendo(tmp_path_factory) -> Path:
    """<root>/data/{autotagging_moodtheme.tsv, splits/split-0/...}, <root>/audio/NN/NNN.mp3."""
    root = tmp_path_factory.mktemp("jamendo")
    rows: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    plan = ["train"] * 8 + ["validation"] * 4 + ["test"] * 4
    for n, split in enumerate(plan):
        track = 1000 + n
        # Two tags per track from a pitch ladder: low = calm/relaxing/sad, high = energetic/happy.
        low = n % 2 == 0
        tags = ["calm", "relaxing"] if low else ["energetic", "happy"]
        if n % 4 == 0:
            tags = ["sad", "relaxing"]
        rel = f"{track % 100:02d}/{track}.mp3"
        _audio(root / "audio" / rel, 4.0, (220.0 if low else 1320.0) * (1 + 0.01 * n))
        rows[split].append(
            f"track_{track:07d}\tartist_{n:06d}\talbum_{n:06d}\t{rel}\t4.0\t"
            + "\t".join(f"mood/theme---{t}" for t in tags)
        )
    _tsv(root / "data" / "autotagging_moodtheme.tsv", [r for split in rows.values() for r in split])
    for split, lines in rows.items():
        _tsv(root / "data" / "splits" / "split-0" / f"autotagging_moodtheme-{split}.tsv", lines)
    return root


@pytest.fixture(scope="session")
def deam(tmp_path_factory) -> Path:
    """DEAM's archives unpacked: static CSVs (two files, leading-space headers), dynamic 2 Hz
    arousal.csv / valence.csv from 15 s, and MEMD_audio/<id>.mp3 of 19 s."""
    root = tmp_path_factory.mktemp("deam")
    ann = root / "DEAM_Annotations" / "annotations" / "annotations averaged per song"
    static = ann / "song_level"
    dynamic = ann / "dynamic (per second annotations)"
    static.mkdir(parents=True)
    dynamic.mkdir(parents=True)
    songs = list(range(2, 14)) + [2001, 2002]
    header = "song_id, valence_mean, valence_std, arousal_mean, arousal_std"
    first, second, arousal_rows, valence_rows = [header], [header], [], []
    times = [15000 + 500 * k for k in range(8)]
    for i, song in enumerate(songs):
        v, a = 2.0 + 5.0 * (i % 3) / 2, 2.0 + 6.0 * (i % 4) / 3  # 1..9 scale
        _audio(root / "MEMD_audio" / f"{song}.mp3", 19.0, 200.0 * (1 + (i % 3)) + 50 * (i % 4))
        (first if song < 2000 else second).append(f"{song}, {v:.1f}, 1.2, {a:.1f}, 0.9")
        n = len(times) - (i % 2)  # some rows end early, as shorter songs do in DEAM
        vd, ad = (v - 5) / 4, (a - 5) / 4
        valence_rows.append(
            ",".join([str(song)] + [f"{vd + 0.01 * k:.3f}" for k in range(n)] + [""] * (len(times) - n))
        )
        arousal_rows.append(
            ",".join([str(song)] + [f"{ad - 0.01 * k:.3f}" for k in range(n)] + [""] * (len(times) - n))
        )
    (static / "static_annotations_averaged_songs_1_2000.csv").write_text("\n".join(first) + "\n")
    (static / "static_annotations_averaged_songs_2000_2058.csv").write_text("\n".join(second) + "\n")
    cols = "song_id," + ",".join(f"sample_{t}ms" for t in times)
    (dynamic / "arousal.csv").write_text("\n".join([cols, *arousal_rows]) + "\n")
    (dynamic / "valence.csv").write_text("\n".join([cols, *valence_rows]) + "\n")
    return root


@pytest.fixture(scope="session")
def class_folders(tmp_path_factory) -> Path:
    """<root>/<class>/<n>.<ext>: four classes, five files each, in several formats."""
    root = tmp_path_factory.mktemp("classes")
    for c, name in enumerate(CLASSES):
        for n in range(5):
            _audio(
                root / name / f"{n}.{('mp3', 'wav', 'flac')[n % 3]}",
                3.5,
                180.0 * 2**c * (1 + 0.02 * n),
                ("mp3", "wav", "flac")[n % 3],
            )
    return root


@pytest.fixture(scope="session")
def unlabelled(tmp_path_factory) -> Path:
    """A folder of unlabelled tracks in nested sub-folders."""
    root = tmp_path_factory.mktemp("unlabelled")
    for n in range(10):
        _audio(root / f"album{n % 3}" / f"{n}.mp3", 7.0, 150.0 * 1.3**n)
    return root


@pytest.fixture(scope="session")
def mel_cache(tmp_path_factory) -> Path:
    """One feature cache for the whole session: each fixture file is decoded once."""
    return tmp_path_factory.mktemp("mel_cache")


#: Architecture dims small enough to train in a second on a shared CPU.


@pytest.fixture
def repository(tmp_path) -> Path:
    """A model repository holding only the teacher (the served musicnn entry)."""
    repo = tmp_path / "models"
    shutil.copytree(
        DEFAULT_MODEL_REPOSITORY / "musicnn", repo / "musicnn", ignore=shutil.ignore_patterns("__pycache__")
    )
    return repo

"""Mood calibration from reference music: ``moodstream-train calibrate-moods [DIR...] [--write]``.

Without folders the reference is Debian's reference music as ``make music`` fetches it
(``training/data/debian_music.toml``, role ``reference``). Files of the packages reserved as the
independent check (singularity-music, asc-music, hyperrogue-music) are refused wherever they lie.

Every reference track is analysed as the worker analyses it (the serving frontend, whole track up
to ``max_duration_s``) and scored by the served model once (``musicnn``: both networks in one
pass). For each tag that ``moods.toml`` makes a family member, and then for each family's raw
score (the weighted mean of its members' calibrated scores), the calibration stores the
``QUANTILES`` quantiles of the track scores over the reference (see
:mod:`pipeline.stages.taxonomy`). The entries calibrated are the model itself and every entry of the
repository whose networks it ran (``musicnn`` also calibrates ``musicnn_msd`` and
``musicnn_mtt`` from the same scores); ``--write`` stores each calibration in its entry's configs
(parameter ``moodstream_calibration``), which changes the version its outputs report.

Track outputs are cached per file (content size and modification time) beside the cache
directory, so calibrating again, or reporting (``moodstream-train mood-report``), scores nothing
twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contracts.model_meta import CALIBRATION_PARAMETER, read_meta
from pipeline.errors import TrackError
from pipeline.stages.analysis import analyse
from pipeline.stages.scoring import OnnxScorer
from pipeline.stages.storage import AUDIO_EXTENSIONS
from pipeline.stages.taxonomy import DEFAULT_MOODS_FILE, Calibration, Taxonomy, family_raw, load_taxonomy
from training.data import debian_music
from training.export import write_parameter

QUANTILES = 101  # levels 0, 0.01, ..., 1
DEFAULT_MAX_DURATION_S = 600.0  # of each reference track (the mean over 10 minutes is stable)


@dataclass(frozen=True)
class TrackSet:
    """Per-track outputs of the reference tracks, one row per track."""

    files: list[str]
    scores: dict[str, np.ndarray]  # network -> [n_tracks, n_labels] mean over the track's patches
    embeddings: dict[str, np.ndarray]  # network -> [n_tracks, dim]
    patches: np.ndarray  # [n_tracks] patches analysed


def audio_under(folders: list[Path]) -> list[Path]:
    return sorted(
        p
        for d in folders
        for p in Path(d).rglob("*")
        if p.is_file() and p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS
    )


def reference_files(
    folders: list[Path], *, role: str = "reference", music_dir: Path = debian_music.DEFAULT_DEST
) -> list[Path]:
    """The audio under ``folders``, or without folders the fetched Debian music of ``role``."""
    files = audio_under(folders) if folders else debian_music.audio_files(music_dir, role)
    if not files:
        where = [str(f) for f in folders] if folders else f"{music_dir} (role {role}; run `make music`)"
        raise ValueError(f"no audio files under {where}")
    return files


def refuse_reserved(files: list[Path]) -> None:
    """Calibration and tuning never see the check packages: ValueError naming the files."""
    reserved = [f for f in files if set(Path(f).resolve().parts) & debian_music.RESERVED]
    if reserved:
        raise ValueError(
            f"{len(reserved)} files belong to packages reserved as the independent check ({sorted(debian_music.RESERVED)}), e.g. {reserved[0]}"
        )


def score_tracks(
    files: list[Path],
    scorer: OnnxScorer,
    *,
    cache_dir: Path | None,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
    excerpts: int = 0,
    excerpt_s: float = 15.0,
    progress: bool = True,
) -> TrackSet:
    """Analyse and score each file (skipping what does not decode, with a line saying so)."""
    kept, rows = [], []
    model = hashlib.sha256(scorer.path.read_bytes()).hexdigest()[:16]
    for i, path in enumerate(files):
        key = _cache_key(path, model, max_duration_s, excerpts, excerpt_s)
        cached = cache_dir / f"{key}.npz" if cache_dir else None
        if cached is not None and cached.is_file():
            with np.load(cached) as data:
                row = {k: data[k] for k in data.files}
        else:
            try:
                analysis = analyse(
                    path.read_bytes(),
                    max_duration_s=max_duration_s,
                    min_duration_s=1.0,
                    excerpts=excerpts,
                    excerpt_s=excerpt_s,
                )
            except (TrackError, OSError) as exc:
                print(f"# skipped {path}: {exc}")
                continue
            outputs = scorer.score_sync(analysis.patches.patches)
            row = {"patches": np.array(len(analysis.patches.patches))}
            for name, out in outputs.items():
                row[f"scores/{name}"] = out.scores.mean(axis=0)
                row[f"embedding/{name}"] = out.embedding.mean(axis=0)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".{id(row)}.tmp.npz")
                np.savez(tmp, **row)
                tmp.replace(cached)
        kept.append(str(path))
        rows.append(row)
        if progress:
            print(f"# {i + 1}/{len(files)} {path.name}", flush=True)
    if not rows:
        raise ValueError("no reference track could be analysed")
    names = [n.name for n in scorer.meta.networks]
    return TrackSet(
        files=kept,
        scores={n: np.stack([r[f"scores/{n}"] for r in rows]) for n in names},
        embeddings={n: np.stack([r[f"embedding/{n}"] for r in rows]) for n in names},
        patches=np.array([int(r["patches"]) for r in rows]),
    )


def _cache_key(path: Path, model: str, max_duration_s: float, excerpts: int, excerpt_s: float) -> str:
    stat = path.stat()
    text = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, model, max_duration_s, excerpts, excerpt_s])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def source_names(folders: list[Path], files: list[Path]) -> list[str]:
    """What the reference consists of, without this machine's paths: the first folder below each
    given folder that holds the files (a package's name in the fetched layout), else its name."""
    if not folders:
        packages = {p.name for p in debian_music.load()}
        return sorted({part for f in files for part in Path(f).parts if part in packages})
    names = set()
    for path in files:
        for folder in folders:
            try:
                parts = path.relative_to(folder).parts
            except ValueError:
                continue
            names.add(parts[0] if len(parts) > 1 else Path(folder).resolve().name)
            break
    return sorted(names)


def calibration_for(taxonomy: Taxonomy, tracks: TrackSet, sources: list[str]) -> dict[str, Any]:
    """The calibration document of ``taxonomy``'s families over ``tracks``."""
    levels = np.linspace(0, 1, QUANTILES)
    tags = {}
    for family in taxonomy.families:
        for m in family.members:
            tags[m.key] = np.quantile(tracks.scores[m.network][:, m.column], levels)
    staged = replace(taxonomy, calibration=Calibration(tags=tags, families={}, tracks=len(tracks.files)))
    raw = family_raw(staged, tracks.scores)
    families = {f.name: np.quantile(raw[:, i], levels) for i, f in enumerate(taxonomy.families)}
    return {
        "quantiles": QUANTILES,
        "tracks": len(tracks.files),
        "sources": sorted(sources),
        "tags": {k: [float(f"{v:.6g}") for v in q] for k, q in sorted(tags.items())},
        "families": {k: [float(f"{v:.6g}") for v in q] for k, q in sorted(families.items())},
    }


def entries_scored_by(repository: Path, model: str) -> list[str]:
    """``model`` and every entry whose networks ``model`` runs (same names and versions)."""
    ran = {(n.name, n.version) for n in read_meta(repository, model).networks}
    found = [model]
    for entry in sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file() and p.name != model):
        try:
            networks = {(n.name, n.version) for n in read_meta(repository, entry).networks}
        except Exception:  # noqa: BLE001 - an unrelated broken entry is not ours to judge here
            continue
        if networks <= ran:
            found.append(entry)
    return found


def write_calibration(repository: Path, entry: str, calibration: dict[str, Any]) -> list[Path]:
    """Store ``calibration`` in every config of ``entry`` (config.pbtxt and configs/*.pbtxt)."""
    return write_parameter(repository, entry, CALIBRATION_PARAMETER, calibration)


def calibrate(
    folders: list[Path],
    model: str,
    repository: Path,
    *,
    cache_dir: Path | None,
    write: bool,
    moods_file: Path = DEFAULT_MOODS_FILE,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
) -> dict[str, dict[str, Any]]:
    """Entry -> its calibration over the reference tracks in ``folders``; stored when ``write``."""
    files = reference_files(folders)
    refuse_reserved(files)
    scorer = OnnxScorer(repository, model, threads=1)
    tracks = score_tracks(files, scorer, cache_dir=cache_dir, max_duration_s=max_duration_s)
    sources = source_names(folders, files)
    result = {}
    for entry in entries_scored_by(repository, model):
        taxonomy = load_taxonomy(read_meta(repository, entry), moods_file, calibrated=False)
        if not taxonomy.families:
            continue
        result[entry] = calibration_for(taxonomy, tracks, sources)
        if write:
            for path in write_calibration(repository, entry, result[entry]):
                print(f"# wrote {path}")
    return result

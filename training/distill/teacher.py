"""The teacher's outputs on every track's patches, computed once and cached: distillation's targets.

The teacher is a served model entry (``musicnn`` by default: the MSD and MTT networks in one
graph), run with onnxruntime exactly as the worker runs it. Per track it scores the patches that
start every ``TEACHER_HOP`` frames: the serving grid (what the worker scores, where agreement is
measured) and the patches halfway between (twice the training patches for the same audio).

    <mel cache>/teacher-<sha256(model.onnx)[:12]>-hop<TEACHER_HOP>/<audio sha256>.npz
        starts               [n] int32, first frame of each patch
        <output name>        [n, width] float32, every output of the entry
                             (``musicnn_msd_scores`` [n, 50], ``musicnn_msd_embedding`` [n, 200], ...)
    <the same folder>/mixed-<sha256 of the pairs>.npz
        <output name>        [n pairs, width] float32: the outputs on mixes of two tracks'
                             patches (:func:`mixed_outputs`, the distillation's mix stage)

Tracks are scored in ``workers`` processes of one onnxruntime thread each (one patch per run, the
cheapest on a CPU: see docs/performance.md); the mel frames come from the same
:class:`~training.data.cache.FeatureCache` the training reads.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.contracts.model_meta import ModelMeta, read_meta
from pipeline.errors import TrackError
from pipeline.stages.frontend import PATCH_FRAMES
from training.data.cache import FeatureCache
from training.data.patches import mix_frames, serving_starts

TEACHER_HOP = PATCH_FRAMES // 2  # 93 frames, 1.49 s


def patch_starts(n_frames: int) -> np.ndarray:
    """[n] first frames: the serving grid and, where a whole patch fits, the point halfway
    between two grid patches (``TEACHER_HOP`` after each grid start), in order."""
    grid = serving_starts(n_frames)
    mid = grid + TEACHER_HOP
    mid = mid[mid + PATCH_FRAMES <= n_frames]
    return np.sort(np.concatenate([grid, mid])).astype(np.int32)


@dataclass(frozen=True)
class Teacher:
    """A served entry as a teacher: its metadata and its ONNX file."""

    meta: ModelMeta
    onnx: Path

    @classmethod
    def from_repository(cls, repository: Path, name: str) -> Teacher:
        meta = read_meta(repository, name)
        versions = sorted((int(p.name) for p in (repository / name).iterdir() if p.name.isdigit()), reverse=True)
        if not versions:
            raise FileNotFoundError(f"teacher {name}: no version directory in {repository / name}")
        return cls(meta, repository / name / str(versions[0]) / "model.onnx")

    @property
    def tag(self) -> str:
        return hashlib.sha256(self.onnx.read_bytes()).hexdigest()[:12]

    def folder(self, cache: FeatureCache) -> Path:
        return cache.dir / f"teacher-{self.tag}-hop{TEACHER_HOP}"


# -- one process's work ----------------------------------------------------------------------

_session: ort.InferenceSession | None = None
_cache: FeatureCache | None = None


def _init(onnx: str, cache_root: str, max_duration_s: float) -> None:
    global _session, _cache
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    _session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    # FeatureCache appends the frontend key to the folder it is given; pass the parent.
    _cache = FeatureCache(Path(cache_root), max_duration_s=max_duration_s)


def _teach_one(source: str, folder: str) -> tuple[str, str | None]:
    """Frames (into the cache) and teacher outputs (into ``folder``) of one track; (source,
    None) or (source, reason it was skipped)."""
    assert _session is not None and _cache is not None
    try:
        frames = _cache.frames(source)
    except (TrackError, OSError) as exc:
        return source, f"{getattr(exc, 'reason', 'unreadable')}: {exc}"
    path = Path(folder) / f"{_cache.digest(source)}.npz"
    if path.is_file():
        return source, None
    starts = patch_starts(len(frames))
    _save(path, starts=starts, **_score(frames[s : s + PATCH_FRAMES] for s in starts))
    return source, None


def _teach_mixed(pairs: list[tuple[str, int, str, int, float]]) -> dict[str, np.ndarray]:
    """{output name: [len(pairs), width]}: the teacher's outputs on each mix of two cached
    tracks' patches (source a, its start, source b, its start, power weight of a)."""
    assert _cache is not None
    return _score(mix_frames(_cache.patch(a, sa), _cache.patch(b, sb), weight) for a, sa, b, sb, weight in pairs)


def _score(patches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """{output name: [n, width] float32}: the teacher's outputs on each [PATCH_FRAMES, N_MELS]
    patch, one run a patch."""
    assert _session is not None
    names = [o.name for o in _session.get_outputs()]
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for patch in patches:
        for name, value in zip(
            names, _session.run(names, {"mel": np.ascontiguousarray(patch, dtype=np.float32)[None]})
        ):
            rows[name].append(value[0])
    return {n: np.stack(v).astype(np.float32) for n, v in rows.items()}


def _save(path: Path, **arrays: np.ndarray) -> None:
    """``arrays`` into ``path`` (.npz), whole or not at all: a run stopped halfway leaves no file."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _pool(teacher: Teacher, cache: FeatureCache, workers: int) -> ProcessPoolExecutor:
    """``workers`` processes, each with the teacher's session (one thread) and ``cache``."""
    spawn = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        workers,
        mp_context=spawn,
        initializer=_init,
        initargs=(str(teacher.onnx), str(cache.dir.parent), cache.max_duration_s),
    )


# -- the pass over a collection --------------------------------------------------------------


def teacher_outputs(
    sources: list[str], cache: FeatureCache, teacher: Teacher, *, workers: int = 2, progress: bool = True
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """({source: {"starts": [n], output name: [n, width]}}, {source: reason skipped}).

    Tracks already in the cache cost a hash of their file; the others are decoded, turned into
    frames and scored in ``workers`` processes."""
    from tqdm import tqdm

    folder = teacher.folder(cache)
    folder.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    with _pool(teacher, cache, workers) as pool:
        jobs = [pool.submit(_teach_one, s, str(folder)) for s in sources]
        for job in tqdm(jobs, desc="teacher outputs", unit="track", disable=not progress):
            source, reason = job.result()
            if reason is not None:
                failed[source] = reason
    out = {}
    for source in sources:
        if source in failed:
            continue
        with np.load(folder / f"{cache.digest(source)}.npz") as data:
            out[source] = {k: data[k] for k in data.files}
    cache.flush()
    return out, failed


def mixed_outputs(
    pairs: list[tuple[str, int, str, int, float]],
    cache: FeatureCache,
    teacher: Teacher,
    *,
    workers: int = 2,
    progress: bool = True,
    chunk: int = 256,
) -> dict[str, np.ndarray]:
    """{output name: [len(pairs), width]}: the teacher's outputs on mixes of two tracks'
    patches (:func:`~training.data.patches.mix_frames`; each pair is source a, its first frame,
    source b, its first frame, the power weight of a), every track's frames already cached.

    Computed once per list of pairs and cached beside the tracks' outputs, as
    ``mixed-<sha256 of the pairs>.npz``; scored in ``workers`` processes of one thread."""
    from tqdm import tqdm

    folder = teacher.folder(cache)
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(
        repr([(cache.digest(a), sa, cache.digest(b), sb, float(np.float32(w))) for a, sa, b, sb, w in pairs]).encode()
    ).hexdigest()[:16]
    path = folder / f"mixed-{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    parts: list[dict[str, np.ndarray]] = []
    with _pool(teacher, cache, workers) as pool:
        jobs = [pool.submit(_teach_mixed, pairs[i : i + chunk]) for i in range(0, len(pairs), chunk)]
        for job in tqdm(jobs, desc="teacher outputs on mixes", unit="chunk", disable=not progress):
            parts.append(job.result())
    out = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]} if parts else {}
    _save(path, **out)
    return out

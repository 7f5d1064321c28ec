"""What the served networks compute on a labelled set's clips, computed once and cached.

Each clip goes through the product's own analysis (:func:`pipeline.stages.analysis.analyse_file`:
decode, 16 kHz mono, log-mel patches) and its model entry's ONNX graph
(:class:`pipeline.stages.scoring.OnnxScorer`), exactly as a served track does. What is kept are
the per-patch outputs of every network, grouped by clip:

    scores/<network>      [P, labels] float32   the network's tag probabilities per patch
    embedding/<network>   [P, dim] float32      its embedding per patch
    clip                  [P] int               the clip each patch belongs to
    start_s               [P] float             where the patch starts in its clip

The cache is keyed by the entry's ONNX file and the labelled set's fingerprint, so a new model
or another copy of the data computes them again; clips the decoder refuses are reported by
name and left out.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import TrackError
from pipeline.stages.analysis import analyse_file
from pipeline.stages.scoring import NetworkOutput, OnnxScorer

#: Where the per-clip outputs are cached (outside the clone: derived from audio nobody commits).
DEFAULT_CACHE = Path.home() / ".cache" / "moodstream" / "heads"


@dataclass(frozen=True)
class ClipOutputs:
    """Every network's per-patch outputs on a set of clips."""

    outputs: dict[str, NetworkOutput]  # network -> [P, ...] per patch
    clip: np.ndarray  # [P] clip index of each patch
    start_s: np.ndarray  # [P]
    failed: dict[int, str]  # clip index -> why it could not be analysed

    def rows(self, n_clips: int) -> list[np.ndarray]:
        """The patch indices of each clip, in clip order (empty for a failed clip)."""
        order = np.argsort(self.clip, kind="stable")
        bounds = np.searchsorted(self.clip[order], np.arange(n_clips + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(n_clips)]


def clip_outputs(
    paths: list[Path],
    model: str,
    repository: Path,
    fingerprint: str,
    *,
    cache_dir: Path = DEFAULT_CACHE,
    progress: bool = True,
) -> ClipOutputs:
    """The model entry's per-patch outputs on ``paths`` (in order), from the cache when there."""
    scorer = OnnxScorer(repository, model, threads=1)
    key = hashlib.sha256(scorer.path.read_bytes() + fingerprint.encode()).hexdigest()[:16]
    cached = cache_dir / f"{model}-{key}.npz"
    if cached.is_file():
        return _load(cached)
    clips: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    parts: dict[str, list[NetworkOutput]] = {n.name: [] for n in scorer.meta.networks}
    failed: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            analysis = analyse_file(str(path), max_duration_s=3600.0, min_duration_s=1.0)
        except (TrackError, OSError) as exc:
            failed[i] = f"{type(exc).__name__}: {exc}"
            print(f"skipped {path.name}: {failed[i]}", file=sys.stderr)
            continue
        scored = scorer.score_sync(analysis.patches.patches)
        for name, out in scored.items():
            parts[name].append(out)
        clips.append(np.full(len(analysis.patches.patches), i))
        starts.append(analysis.patches.patch_starts_s)
        if progress and (i + 1) % 50 == 0:
            print(f"{model}: {i + 1} of {len(paths)} clips", file=sys.stderr, flush=True)
    outputs = {
        name: NetworkOutput(np.concatenate([o.scores for o in outs]), np.concatenate([o.embedding for o in outs]))
        for name, outs in parts.items()
    }
    found = ClipOutputs(outputs, np.concatenate(clips), np.concatenate(starts), failed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _save(cached, found)
    return found


def _save(path: Path, found: ClipOutputs) -> None:
    arrays = {"clip": found.clip, "start_s": found.start_s}
    for name, out in found.outputs.items():
        arrays[f"scores/{name}"] = out.scores
        arrays[f"embedding/{name}"] = out.embedding
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, failed=np.array(json.dumps({str(k): v for k, v in found.failed.items()})), **arrays)
    partial.replace(path)


def _load(path: Path) -> ClipOutputs:
    with np.load(path) as saved:
        names = sorted({k.split("/", 1)[1] for k in saved.files if k.startswith("scores/")})
        outputs = {n: NetworkOutput(saved[f"scores/{n}"], saved[f"embedding/{n}"]) for n in names}
        failed = {int(k): v for k, v in json.loads(str(saved["failed"])).items()}
        return ClipOutputs(outputs, saved["clip"], saved["start_s"], failed)

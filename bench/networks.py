"""CPU cost of serving both networks: one two-network graph against two single-network models,
and against the distilled student.

    python -m bench.networks AUDIO_FILE [--patches 60]

Scores the same real patches (cut by the serving frontend) with onnxruntime on one thread, one
patch per run (the worker's CPU setting), through ``musicnn`` (MSD and MTT in one graph),
through ``musicnn_msd`` then ``musicnn_mtt``, and through ``musicnn_student`` (both networks'
outputs from one small trunk) when it is exported; prints the CPU milliseconds per patch of each
(median of ``--repeats`` passes), the outputs' max |delta| between the first two ways, and how
many times less CPU a patch the student needs than the teacher.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench import REPO_ROOT
from pipeline.errors import TrackError
from pipeline.stages.analysis import analyse
from pipeline.stages.scoring import OnnxScorer

STUDENT = "musicnn_student"


def first_patches(path: Path, limit: int) -> np.ndarray:
    """[<= limit, PATCH_FRAMES, N_MELS]: the first serving patches of ``path``."""
    return analyse(path.read_bytes(), max_duration_s=3600, min_duration_s=1).patches.patches[:limit]


def cpu_ms_per_patch(scorers: list[OnnxScorer], patches: np.ndarray, repeats: int) -> tuple[float, dict]:
    runs, outputs = [], {}
    for _ in range(repeats):
        start = time.process_time()
        for scorer in scorers:
            outputs.update(scorer.score_sync(patches))
        runs.append((time.process_time() - start) * 1000 / len(patches))
    return statistics.median(runs), outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("audio", type=Path)
    parser.add_argument("--patches", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        patches = first_patches(args.audio, args.patches)
    except (TrackError, OSError) as exc:
        print(f"{args.audio}: {getattr(exc, 'reason', 'unreadable')}: {exc}", file=sys.stderr)
        return 1
    repo = REPO_ROOT / "triton_models"
    one = [OnnxScorer(repo, "musicnn", threads=1)]
    two = [OnnxScorer(repo, "musicnn_msd", threads=1), OnnxScorer(repo, "musicnn_mtt", threads=1)]
    for scorers in (one, two):  # warm-up: arenas and caches
        cpu_ms_per_patch(scorers, patches[:4], 1)
    one_ms, a = cpu_ms_per_patch(one, patches, args.repeats)
    two_ms, b = cpu_ms_per_patch(two, patches, args.repeats)
    diff = max(float(np.abs(a[n].scores - b[n].scores).max()) for n in a)
    result = {
        "patches": len(patches),
        "one_graph_cpu_ms_per_patch": round(one_ms, 2),
        "two_models_cpu_ms_per_patch": round(two_ms, 2),
        "max_abs_diff": diff,
    }
    if (repo / STUDENT / "config.pbtxt").is_file():
        student = [OnnxScorer(repo, STUDENT, threads=1)]
        cpu_ms_per_patch(student, patches[:4], 1)
        student_ms, _ = cpu_ms_per_patch(student, patches, args.repeats)
        result.update(
            student_cpu_ms_per_patch=round(student_ms, 3), teacher_vs_student_cpu=round(one_ms / student_ms, 1)
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

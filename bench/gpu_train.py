"""The CPU tier's student trained on an accelerator: the distillation's own loop, timed.

    python -m bench.gpu_train pack OUT.npz [--minutes 25]         # here, with the music fetched
    python -m bench.gpu_train run PACK.npz [--device cuda] [--epochs 4] [--frozen-filters]

``pack`` writes a few reference packages' cached log-mel frames (float16) and the teacher's
cached outputs on their patches (the targets ``moodstream-train distill`` trains on), one package
held out for validation, into one file small enough to travel to a machine that has neither the
music nor the decoders. ``run`` makes the student of ``training/configs/musicnn_student.toml``
from the teacher's networks and trains it with :func:`training.engine.train` and
:class:`training.engine.DistillLoss`, exactly as ``distill`` does (mixed precision on CUDA), then
prints one JSON line: training patches a second, seconds an epoch, the losses. It needs only
torch, torchaudio and numpy (``training.engine`` reads no audio), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.stages.frontend import PATCH_FRAMES
from training.config import load_config
from training.engine import DistillLoss, setup_runtime, train
from training.models import build, load_checkpoint
from training.models.musicnn_student import freeze_filters, load_teachers

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "musicnn_student.toml"


class PackedPatches(Dataset):
    """(mel [PATCH_FRAMES, N_MELS] float32, target [D] float32) from a pack's arrays."""

    def __init__(self, frames: np.ndarray, starts: np.ndarray, targets: np.ndarray) -> None:
        self.frames, self.starts, self.targets = frames, starts, targets

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        return torch.from_numpy(self.frames[s : s + PATCH_FRAMES].astype(np.float32)), torch.from_numpy(
            self.targets[i].astype(np.float32)
        )


def pack(out: Path, minutes: float) -> None:
    """Frames and targets of the configured run's training packages (about ``minutes`` of
    music, spread over them) and of its validation package (a fifth as much)."""
    from bench import REPO_ROOT
    from training.data.sets import open_cache
    from training.distill.data import DEBIAN, TeacherPatches, distillation_set, split_by_group
    from training.distill.teacher import Teacher, teacher_outputs

    cfg = load_config(CONFIG)
    cache = open_cache(cfg)
    teacher = Teacher.from_repository(REPO_ROOT / "triton_models", cfg.teacher)
    splits = split_by_group(distillation_set(DEBIAN), cfg)
    arrays: dict[str, np.ndarray] = {}
    for split, share in (("train", 1.0), ("validation", 0.2)):
        tracks = splits[split][:: max(1, len(splits[split]) // 12)]
        outputs, _ = teacher_outputs([t.source for t in tracks], cache, teacher, workers=1, progress=False)
        budget = int(minutes * share * 60 * 62.5 / len(tracks))  # frames a track
        frames, starts, targets = [], [], []
        offset = 0
        for track in tracks:
            one = TeacherPatches([track], cache, outputs, teacher.meta.outputs, grid_only=False)
            keep = [i for i, (_, start, _) in enumerate(one.items) if start + PATCH_FRAMES <= budget]
            frames.append(np.asarray(cache.frames(track.source)[:budget], np.float16))
            starts += [offset + one.items[i][1] for i in keep]
            targets.append(one.targets[0][keep].astype(np.float16))
            offset += len(frames[-1])
        arrays |= {
            f"{split}_frames": np.concatenate(frames),
            f"{split}_starts": np.array(starts, np.int64),
            f"{split}_targets": np.concatenate(targets),
        }
    np.savez(out, **arrays)
    print(json.dumps({k: list(v.shape) for k, v in arrays.items()} | {"bytes": out.stat().st_size}))


def run(path: Path, device: str, epochs: int, frozen: bool, batch_size: int) -> dict:
    data = np.load(path)
    train_ds, val_ds = (
        PackedPatches(data[f"{s}_frames"], data[f"{s}_starts"], data[f"{s}_targets"]) for s in ("train", "validation")
    )
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = replace(
            load_config(CONFIG),
            device=device,
            epochs=epochs,
            batch_size=batch_size,
            out_dir=out_dir,
            progress=False,
            early_stopping=0,
            frozen_filters=frozen,
        )
        rt = setup_runtime(cfg)
        n_labels = 100
        dims = {**cfg.dims, "n_classes": n_labels, "task": "tags"}
        teachers = [load_checkpoint(Path(p) if Path(p).is_absolute() else repo / p)[0] for p in cfg.teacher_checkpoints]
        sample = torch.stack([train_ds[i][0] for i in np.linspace(0, len(train_ds) - 1, 512).astype(int)])
        model = load_teachers(build(cfg.arch, dims), teachers, sample)
        if frozen:
            freeze_filters(model)
        loss_fn = DistillLoss(train_ds.targets.astype(np.float32), n_labels, cfg.embedding_weight).to(rt.device)
        labels = tuple(f"tag{i}" for i in range(n_labels))
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        best = train(
            replace(cfg, dims=dims),
            rt,
            "tags",
            labels,
            train_ds,
            val_ds,
            loss_fn,
            source=f"bench.gpu_train {path.name}",
            with_embedding=True,
            model=model,
        )
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
        last = torch.load(Path(out_dir) / "last.pt", map_location="cpu", weights_only=False)
        best_ckpt = torch.load(best, map_location="cpu", weights_only=False)
    return {
        "device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "amp": str(rt.amp_dtype),
        "frozen_filters": frozen,
        "batch_size": batch_size,
        "epochs": epochs,
        "train_patches": len(train_ds),
        "validation_patches": len(val_ds),
        "wall_s": round(wall, 2),
        "s_per_epoch": round(wall / epochs, 2),
        "train_patches_per_s": round(len(train_ds) * epochs / wall, 1),
        "last_val_loss": round(float(last["val_loss"]), 4),
        "best_val_loss": round(float(best_ckpt["best_val_loss"]), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("out", type=Path)
    p.add_argument(
        "--minutes", type=float, default=25.0, help="minutes of training music (validation: a fifth as much)"
    )
    r = sub.add_parser("run")
    r.add_argument("pack", type=Path)
    r.add_argument("--device", default="cuda")
    r.add_argument("--epochs", type=int, default=4)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--frozen-filters", action="store_true")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.out, args.minutes)
    else:
        print(json.dumps(run(args.pack, args.device, args.epochs, args.frozen_filters, args.batch_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

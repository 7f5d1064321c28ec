"""The training engine: the loop that ``fit`` and distillation run, read top to bottom.

    data sets -> model -> loss -> AdamW + schedule -> epochs of (augment, step) + validation
    -> last.pt every epoch, best.pt on a better validation loss, early stopping
    -> TensorBoard logs (loss, learning rate, validation metrics; V/A scatter and error figures)

Runs on the CPU or one GPU in a single process; under ``torchrun --nproc_per_node=N`` (the
``WORLD_SIZE`` environment variable set) it trains with DistributedDataParallel, one process
per GPU, each on its shard of the training patches; every process validates on the whole
validation set so all reach the same early-stopping decision without talking, and only rank 0
writes checkpoints and logs.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from training.config import FitConfig
from training.data import Track
from training.data.cache import FeatureCache
from training.models import build, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- setup -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int  # 0 in a single process
    world: int  # 1 in a single process
    amp_dtype: torch.dtype | None  # None: full precision

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: FitConfig) -> Runtime:
    """Device, DDP process group (under torchrun), and the seeds."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    amp_dtype = None
    if cfg.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    seed_everything(cfg.seed + rank)
    return Runtime(device, rank, world, amp_dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_tracks(tracks: list[Track], cache: FeatureCache, rt: Runtime, progress: bool) -> list[Track]:
    """The tracks whose audio decodes, with their frames in the cache (rank 0 computes them)."""
    if rt.main:
        failed = cache.prepare([t.source for t in tracks], progress=progress)
    if rt.world > 1:
        dist.barrier()
        cache.reload()  # rank 0's index
    if not rt.main:
        failed = cache.prepare([t.source for t in tracks], progress=False)
    return [t for t in tracks if t.source not in failed]


# -- loss and augmentation -------------------------------------------------------------------


def make_loss(
    task: str, train_targets: np.ndarray | None, n_labels: int, weighting: bool, device: torch.device
) -> LossFn:
    """The task's loss on raw model outputs; with ``weighting``, rare tags and classes count more.

    tags: BCE with logits, positive weight neg/pos per tag (capped at 100); classes: cross
    entropy with weights n / (k * count); va, va_steps: MSE of the sigmoid against [0, 1] targets.
    """
    if task == "tags":
        pos_weight = None
        if weighting and train_targets is not None:
            pos = train_targets.sum(axis=0)
            pos_weight = torch.tensor(
                np.clip((len(train_targets) - pos) / np.maximum(pos, 1), 1.0, 100.0), dtype=torch.float32, device=device
            )
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    if task == "classes":
        weight = None
        if weighting and train_targets is not None:
            counts = np.bincount(train_targets.astype(int), minlength=n_labels)
            weight = torch.tensor(
                len(train_targets) / (n_labels * np.maximum(counts, 1)), dtype=torch.float32, device=device
            )
        return nn.CrossEntropyLoss(weight=weight)
    return lambda out, target: F.mse_loss(torch.sigmoid(out), target)


class DistillLoss(nn.Module):
    """MSE of [logits | embedding] against the teacher's, each column divided by the teacher's
    standard deviation on the training patches. Tag i weighs ``label_weight[i]`` (default 1); the
    embedding term as a whole weighs ``embedding_weight`` x the tags' total, spread evenly over
    its dimensions; the weights are scaled so the tags' add up to 1."""

    def __init__(
        self, targets: np.ndarray, n_labels: int, embedding_weight: float, label_weight: np.ndarray | None = None
    ) -> None:
        super().__init__()
        spread = np.maximum(targets.std(axis=0), 1e-3)
        weight = np.ones(targets.shape[1], np.float32)
        if label_weight is not None:
            if label_weight.shape != (n_labels,) or label_weight.min() <= 0:
                raise ValueError(f"label_weight must be {n_labels} positive weights, got shape {label_weight.shape}")
            weight[:n_labels] = label_weight
        if targets.shape[1] > n_labels:
            weight[n_labels:] = embedding_weight * weight[:n_labels].sum() / (targets.shape[1] - n_labels)
        self.register_buffer("scale", torch.tensor(1 / spread, dtype=torch.float32))
        self.register_buffer("weight", torch.tensor(weight / weight[:n_labels].sum()))

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((((out - target) * self.scale) ** 2) * self.weight).sum(dim=1).mean()


def spec_augment(mel: torch.Tensor, cfg: FitConfig) -> torch.Tensor:
    """SpecAugment-style masking: mel [B, T, F] with random bands and spans set to silence (0)."""
    b, t, f = mel.shape
    for n, width, size, dim in (
        (cfg.freq_masks, cfg.freq_mask_bands, f, 2),
        (cfg.time_masks, cfg.time_mask_frames, t, 1),
    ):
        index = torch.arange(size, device=mel.device)[None]
        for _ in range(n):
            w = torch.randint(0, width + 1, (b, 1), device=mel.device)
            s = (torch.rand(b, 1, device=mel.device) * (size - w + 1)).long()
            hit = (index >= s) & (index < s + w)  # [B, size]
            mel = mel.masked_fill(hit[:, None, :] if dim == 2 else hit[:, :, None], 0.0)
    return mel


def mixup(mel: torch.Tensor, target: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mel [B, T, F], target [B, D] -> each patch blended with a partner from the batch (a
    random permutation; batches mix tracks) by a weight lambda ~ Beta(alpha, alpha) per patch,
    kept >= 0.5 so the patch stays the larger part; its target blended by the same weight. For
    distillation the blended target is the teacher's logits blended, an approximation of what
    the teacher would say of the blended patch."""
    lam = torch.distributions.Beta(alpha, alpha).sample((len(mel),)).to(mel.device)
    lam = torch.maximum(lam, 1 - lam)
    partner = torch.randperm(len(mel), device=mel.device)
    mel = lam[:, None, None] * mel + (1 - lam[:, None, None]) * mel[partner]
    return mel, lam[:, None] * target + (1 - lam[:, None]) * target[partner]


# -- the run ---------------------------------------------------------------------------------


def train(
    cfg: FitConfig,
    rt: Runtime,
    task: str,
    labels: tuple[str, ...],
    train_ds: Dataset,
    val_ds: Dataset,
    loss_fn: LossFn,
    source: str,
    *,
    with_embedding: bool = False,
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None,
    extra: dict[str, Any] | None = None,
    model: nn.Module | None = None,
) -> Path:
    """The loop shared by ``fit`` and ``distill``: items are (mel [T, F], target).

    ``with_embedding``: the loss sees [outputs | embedding] (a student matching a teacher's
    embedding too); ``metrics`` replaces the task's validation metrics (it gets what the loss
    saw and the targets); ``extra`` goes into every checkpoint; ``model``: start from this one
    (of ``cfg.arch`` and ``cfg.dims``; its frozen parameters stay frozen until
    ``cfg.unfreeze_epoch``) instead of a fresh one."""
    out_dir = Path(cfg.out_dir)
    version = cfg.version or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    model = (model or build(cfg.arch, {**cfg.dims, "n_classes": len(labels), "task": task})).to(rt.device)
    if cfg.unfreeze_epoch and rt.world > 1:
        raise ValueError(
            "unfreeze_epoch needs a single process: DistributedDataParallel fixes the trained parameters when it wraps the model"
        )
    # Frozen parameters are in the optimizer too (without a gradient AdamW leaves them alone):
    # unfreezing them later keeps one parameter group, one schedule and a resumable state.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)

    start_epoch, best, stale, saved_schedule = 0, math.inf, 0, None
    if cfg.resume:
        resumed, ckpt = load_checkpoint(Path(cfg.resume))
        model.load_state_dict(resumed.state_dict())
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):  # fp16 runs: the loss scale found so far, not 2^16 again
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best, stale, saved_schedule = (
            ckpt["epoch"] + 1,
            ckpt["best_val_loss"],
            ckpt["stale_epochs"],
            ckpt["scheduler"],
        )
        version = cfg.version or ckpt["version"]  # a resumed run is the same model unless named
        log.info("resumed %s at epoch %d", cfg.resume, start_epoch)
    scheduler = _scheduler(cfg, optimizer, start_epoch, saved_schedule)

    net: nn.Module = model
    if rt.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    sampler = DistributedSampler(train_ds, shuffle=True, seed=cfg.seed) if rt.world > 1 else None
    pin = rt.device.type == "cuda"
    train_dl = DataLoader(
        train_ds,
        cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=pin,
        drop_last=len(train_ds) > cfg.batch_size,
    )
    val_dl = DataLoader(val_ds, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, pin_memory=pin)
    writer = tensorboard_writer(out_dir) if rt.main else None
    started = time.monotonic()

    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        if cfg.unfreeze_epoch and epoch >= cfg.unfreeze_epoch:
            model.requires_grad_(True)
        train_loss = _train_epoch(net, train_dl, loss_fn, optimizer, scaler, cfg, rt, epoch, with_embedding)
        val_loss, pred, true = _validate(model, val_dl, loss_fn, rt, with_embedding)
        if cfg.schedule == "cosine":
            scheduler.step()
        else:
            scheduler.step(val_loss)
        # a refit's validation music is in its training set: its loss chooses nothing
        improved = cfg.refit or val_loss < best - cfg.min_delta
        best, stale = (val_loss, 0) if improved else (best, stale + 1)
        if rt.main:
            scalars = _log_epoch(writer, epoch, train_loss, val_loss, optimizer, task, labels, pred, true, metrics)
            state = dict(
                config=asdict(cfg),
                epoch=epoch,
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(),
                best_val_loss=best,
                stale_epochs=stale,
                val_loss=val_loss,
                val_metrics=scalars,
            )
            save_checkpoint(
                out_dir / "last.pt",
                model,
                arch=cfg.arch,
                labels=list(labels),
                version=version,
                source=source,
                **(extra or {}),
                **state,
            )
            if improved:
                shutil.copyfile(out_dir / "last.pt", out_dir / "best.pt")
            print(
                f"epoch {epoch}: train loss {train_loss:.4f}, validation loss {val_loss:.4f}"
                + ("  (refit: kept)" if cfg.refit else "  (best)" if improved else "")
                + "".join(f", {k} {v:.4f}" for k, v in scalars.items()),
                flush=True,
            )
        if cfg.early_stopping and stale >= cfg.early_stopping:
            if rt.main:
                print(f"early stopping: no better validation loss for {stale} epochs", flush=True)
            break
        if cfg.time_limit_min and time.monotonic() - started > cfg.time_limit_min * 60:
            if rt.main:
                print(f"time limit of {cfg.time_limit_min} min reached after epoch {epoch}", flush=True)
            break
    if writer is not None:
        writer.close()
    if rt.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out_dir / "best.pt"


def cosine_factor(epoch: int, cycles: list[int], restart_factor: float) -> float:
    """Learning rate of ``epoch`` over the configured one: a cosine from 1 to 0 over each of
    ``cycles`` (epochs), cycle k scaled by ``restart_factor``^k (warm restarts)."""
    for k, length in enumerate(cycles):
        if epoch < length:
            return restart_factor**k * (1 + math.cos(math.pi * epoch / length)) / 2
        epoch -= length
    return 0.0


def _scheduler(
    cfg: FitConfig, optimizer: torch.optim.Optimizer, start_epoch: int, saved: dict[str, Any] | None = None
) -> Any:
    """The schedule from ``start_epoch`` on. cosine: a function of the epoch
    (:func:`cosine_factor`), computed again on resume rather than loaded, so a finished run can
    be resumed with a cycle more; plateau: ReduceLROnPlateau, continuing from its ``saved``
    state (a resumed checkpoint's) when given."""
    if cfg.schedule == "cosine":
        factor = functools.partial(
            cosine_factor, cycles=cfg.cosine_cycles or [max(1, cfg.epochs)], restart_factor=cfg.restart_lr_factor
        )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_epoch - 1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=cfg.plateau_factor, patience=cfg.plateau_patience
    )
    if saved is not None:
        scheduler.load_state_dict(saved)
    return scheduler


def _seen(outputs: tuple[torch.Tensor, torch.Tensor], with_embedding: bool) -> torch.Tensor:
    """What the loss sees of a model's (outputs, embedding)."""
    out, embedding = outputs
    return (torch.cat([out, embedding], dim=-1) if with_embedding else out).float()


def _train_epoch(
    net: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: FitConfig,
    rt: Runtime,
    epoch: int,
    with_embedding: bool,
) -> float:
    from tqdm import tqdm

    net.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not (cfg.progress and rt.main))
    for mel, target in bar:
        mel, target = mel.to(rt.device, non_blocking=True), target.to(rt.device, non_blocking=True)
        mel = spec_augment(mel, cfg)
        if cfg.mixup > 0 and target.is_floating_point():
            mel, target = mixup(mel, target, cfg.mixup)
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None):
            out = _seen(net(mel), with_embedding)
        loss = loss_fn(out, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * len(mel)
        count += len(mel)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


@torch.no_grad()
def _validate(
    model: nn.Module, loader: DataLoader, loss_fn: LossFn, rt: Runtime, with_embedding: bool
) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean loss, raw outputs [n, n_labels], targets) over the validation patches."""
    model.eval()
    total, outs, targets = 0.0, [], []
    for mel, target in loader:
        mel, target = mel.to(rt.device), target.to(rt.device)
        out = _seen(model(mel), with_embedding)
        total += loss_fn(out, target).item() * len(mel)
        outs.append(out.cpu().numpy())
        targets.append(target.cpu().numpy())
    return total / len(loader.dataset), np.concatenate(outs), np.concatenate(targets)


def tensorboard_writer(out_dir: Path) -> Any:
    """TensorBoard logs of a run: <out_dir>/tb."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tb"))


def _log_epoch(
    writer: Any,
    epoch: int,
    train_loss: float,
    val_loss: float,
    optimizer: torch.optim.Optimizer,
    task: str,
    labels: tuple[str, ...],
    out: np.ndarray,
    true: np.ndarray,
    custom: Callable[[np.ndarray, np.ndarray], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Scalars (and V/A figures) for TensorBoard; returns the patch-level validation metrics."""
    from training import evaluate

    scores = evaluate.activate(task, out)
    metrics = custom(out, true) if custom else evaluate.quick_metrics(task, labels, scores, true)
    writer.add_scalar("loss/train", train_loss, epoch)
    writer.add_scalar("loss/validation", val_loss, epoch)
    writer.add_scalar("lr", optimizer.param_groups[0]["lr"], epoch)
    for key, value in metrics.items():
        writer.add_scalar(f"validation/{key}", value, epoch)
    if task in ("va", "va_steps"):
        writer.add_figure("validation/va", evaluate.va_figure(labels, scores, true), epoch)
    writer.flush()
    return metrics

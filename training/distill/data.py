"""The distillation's music, its split by group, and the data sets of patches with the teacher's targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.stages.frontend import PATCH_FRAMES
from pipeline.stages.taxonomy import DEFAULT_MOODS_FILE, load_taxonomy
from training.config import FitConfig
from training.data import Track, debian_music, hash_split
from training.data.cache import FeatureCache
from training.data.folders import list_unlabelled
from training.data.patches import mix_frames
from training.distill.teacher import Teacher, mixed_outputs

DEBIAN = "debian"
_P_CLIP = 1e-6  # teacher probabilities are clipped here before the logit
MIX_WEIGHTS = (0.2, 0.8)  # power weight of a mix's first patch: uniform in this range


# -- the music and its split -----------------------------------------------------------------


def distillation_set(source: str, *, role: str = "reference", music_dir: Path | None = None) -> list[Track]:
    """Tracks keyed "<group>/<path in group>": ``debian`` (the fetched packages of ``role``), a
    folder or an s3:// prefix (group: the first folder below it). Training sources never hold
    the reserved check packages (ValueError)."""
    if source == DEBIAN:
        music_dir = debian_music.DEFAULT_DEST if music_dir is None else music_dir
        files = debian_music.audio_files(music_dir, role)
        if not files:
            raise ValueError(
                f"no fetched Debian music of role {role!r} under {music_dir}; run `make music ROLE={role}`"
            )
        return [Track(str(f.relative_to(music_dir / role)), str(f)) for f in files]
    tracks = list_unlabelled(source)
    if role == "reference":
        reserved = [t for t in tracks if set(Path(t.source).parts) & debian_music.RESERVED]
        if reserved:
            raise ValueError(
                f"{source}: {len(reserved)} files belong to packages reserved as the independent check ({sorted(debian_music.RESERVED)}), e.g. {reserved[0].source}"
            )
    return tracks


def distill_music(cfg: FitConfig, source: str) -> list[Track]:
    """The ``distill``-role packages' tracks when ``cfg.distill_music`` (training only: they are
    not the calibration reference, and never validation or held out)."""
    if not cfg.distill_music:
        return []
    if source != DEBIAN:
        raise ValueError(
            f"distill_music adds Debian's distill-role packages to the Debian reference music; source {source!r} is not {DEBIAN!r}"
        )
    extra = distillation_set(source, role="distill")
    named = {group_of(t) for t in extra} & (set(cfg.validation_groups) | set(cfg.holdout_groups))
    if named:
        raise ValueError(
            f"{sorted(named)}: distill-role packages only train; name reference packages as validation or held-out groups"
        )
    return extra


def group_of(track: Track) -> str:
    parts = Path(track.key).parts
    return parts[0] if len(parts) > 1 else track.key


def split_by_group(tracks: list[Track], cfg: FitConfig) -> dict[str, list[Track]]:
    """train / validation / test, whole groups each (see the module doc)."""
    groups = sorted({group_of(t) for t in tracks})
    named = set(cfg.validation_groups) | set(cfg.holdout_groups)
    if named:
        unknown = named - set(groups)
        if unknown:
            raise ValueError(f"validation/holdout groups {sorted(unknown)} are not in the music; its groups: {groups}")
        split_of = {
            g: "test" if g in cfg.holdout_groups else "validation" if g in cfg.validation_groups else "train"
            for g in groups
        }
    else:
        split_of = hash_split(groups, cfg.val_fraction, cfg.test_fraction)
    splits = {s: [t for t in tracks if split_of[group_of(t)] == s] for s in ("train", "validation", "test")}
    if not all(splits.values()):
        raise ValueError(
            f"{len(tracks)} tracks in {len(groups)} groups give an empty split ({ {k: len(v) for k, v in splits.items()} }); add music or name the groups"
        )
    return splits


# -- targets, data set, loss -----------------------------------------------------------------


def mood_tag_weights(meta: Any, weight: float, moods_file: Path = DEFAULT_MOODS_FILE) -> np.ndarray:
    """[n_labels of all ``meta``'s networks, in order]: ``weight`` for each tag that
    ``moods_file`` makes a mood family member, 1 for the others."""
    members = {m.key for family in load_taxonomy(meta, moods_file, calibrated=False).families for m in family.members}
    return np.array(
        [weight if f"{n.name}:{label}" in members else 1.0 for n in meta.networks for label in n.labels], np.float32
    )


def teacher_logits(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(probabilities, _P_CLIP, 1 - _P_CLIP)
    return np.log(p) - np.log1p(-p)


class TeacherPatches(Dataset):
    """(mel [PATCH_FRAMES, N_MELS], target [n_labels + embedding width]): the teacher's logits
    of every network, then its embeddings, for each patch the teacher scored (``grid_only``:
    the serving grid's patches only)."""

    def __init__(
        self,
        tracks: list[Track],
        cache: FeatureCache,
        outputs: dict[str, dict[str, np.ndarray]],
        meta_outputs: tuple[str, ...],
        *,
        grid_only: bool,
    ) -> None:
        self.cache = cache
        self.sources = [t.source for t in tracks]
        self.targets, self.items, self.starts = [], [], []
        for t, source in enumerate(self.sources):
            out = outputs[source]
            keep = out["starts"] % PATCH_FRAMES == 0 if grid_only else np.ones(len(out["starts"]), bool)
            self.targets.append(teacher_targets(out, meta_outputs)[keep])
            self.starts.append(out["starts"][keep])
            self.items += [(t, int(s), i) for i, s in enumerate(self.starts[t])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, _, row = self.items[index]
        return torch.from_numpy(self.mel(index)), torch.from_numpy(self.targets[t][row])

    def where(self, index: int) -> tuple[str, int]:
        """(source, first frame) of item ``index``'s patch."""
        t, start, _ = self.items[index]
        return self.sources[t], start

    def mel(self, index: int) -> np.ndarray:
        """[PATCH_FRAMES, N_MELS] float32: item ``index``'s patch."""
        return self.cache.patch(*self.where(index))

    def track_patches(self, t: int) -> torch.Tensor:
        """[n, PATCH_FRAMES, N_MELS]: every patch of track ``t``, in the order of its targets."""
        frames = self.cache.frames(self.sources[t])
        return torch.from_numpy(
            np.stack([frames[s : s + PATCH_FRAMES] for s in self.starts[t]]).astype(np.float32, copy=False)
        )

    def all_targets(self) -> np.ndarray:
        return np.concatenate(self.targets)


def teacher_targets(out: dict[str, np.ndarray], meta_outputs: tuple[str, ...]) -> np.ndarray:
    """[n, n_labels + embedding width]: the teacher's logits of every network, then its
    embeddings, from its outputs on n patches."""
    scores = [o for o in meta_outputs if o.endswith("scores")]
    embeddings = [o for o in meta_outputs if o.endswith("embedding")]
    return np.concatenate([teacher_logits(out[s]) for s in scores] + [out[e] for e in embeddings], axis=1).astype(
        np.float32
    )


class MixedPatches(Dataset):
    """(mel [PATCH_FRAMES, N_MELS], target): mixes of two patches of ``patches``, each with the
    teacher's targets on the mix. ``count`` pairs are drawn (seeded); those from one track are
    dropped, so there are a little fewer."""

    def __init__(
        self,
        patches: TeacherPatches,
        count: int,
        teacher: Teacher,
        *,
        seed: int,
        workers: int = 2,
        progress: bool = True,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.patches = patches
        first = rng.integers(len(patches.items), size=count)
        second = rng.integers(len(patches.items), size=count)
        other_track = np.array([patches.items[a][0] != patches.items[b][0] for a, b in zip(first, second)], bool)
        self.pairs = np.stack([first, second], axis=1)[other_track]
        if not len(self.pairs):
            raise ValueError(
                f"no mix of two tracks among {count} pairs drawn from {len(patches.sources)} track(s): mixes need patches of at least two tracks"
            )
        self.weights = rng.uniform(*MIX_WEIGHTS, size=len(self.pairs)).astype(np.float32)
        described = [(*patches.where(a), *patches.where(b), float(w)) for (a, b), w in zip(self.pairs, self.weights)]
        self.targets = teacher_targets(
            mixed_outputs(described, patches.cache, teacher, workers=workers, progress=progress), teacher.meta.outputs
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = (self.patches.mel(int(i)) for i in self.pairs[index])
        return torch.from_numpy(mix_frames(a, b, float(self.weights[index]))), torch.from_numpy(self.targets[index])

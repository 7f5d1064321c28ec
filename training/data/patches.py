"""Model patches and their targets, cut from cached frames: the torch side of the data sets.

Training items are random crops: each epoch a track gives up to ``patches_per_track`` patches,
each starting anywhere in the track when ``time_shift`` is on (the prototypes' time-shift
augmentation) or on the serving grid otherwise. Evaluation uses :func:`serving_patches`: every
non-overlapping patch from frame 0, exactly what the worker scores, so a track's score is the
mean over them as in :func:`pipeline.stages.taxonomy.summarise`.

For ``va_steps`` a patch only starts where every one of its 500 ms steps is annotated; the target
of a step is the annotation interpolated at the step's centre.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.stages.frontend import FRAMES_PER_SECOND, PATCH_FRAMES, log_compress, log_expand
from training.data import Track
from training.data.cache import FeatureCache
from training.models.lstm_va import N_STEPS, STEP_S, step_bounds


def serving_starts(n_frames: int) -> np.ndarray:
    """First frame of each patch the worker would score (hop PATCH_FRAMES, partial tail dropped)."""
    return np.arange(max(1, (n_frames - PATCH_FRAMES) // PATCH_FRAMES + 1)) * PATCH_FRAMES


def mix_frames(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """Log-mel frames of two signals mixed at powers ``weight`` and ``1 - weight``: the frames
    of ``sqrt(weight) x wave_a + sqrt(1 - weight) x wave_b`` for waves whose spectra do not
    overlap, and on average for independent ones (their cross terms cancel). a, b: log-mel frames
    of one shape, float32."""
    return log_compress(np.float32(weight) * log_expand(a) + np.float32(1.0 - weight) * log_expand(b))


def step_targets(track: Track, start: int) -> np.ndarray | None:
    """[N_STEPS * 2] step-major (valence, arousal) targets of the patch at frame ``start``, or
    None when a step falls outside the annotations."""
    assert track.target is not None
    centres = np.array([(start + (a + b) / 2) / FRAMES_PER_SECOND for a, b in step_bounds(N_STEPS)])
    times = track.annotations_start_s + STEP_S * np.arange(len(track.target))
    if centres[0] < times[0] - STEP_S / 2 or centres[-1] > times[-1] + STEP_S / 2:
        return None
    return (
        np.stack([np.interp(centres, times, track.target[:, j]) for j in range(2)], axis=1).astype(np.float32).ravel()
    )


def annotated_starts(track: Track, n_frames: int) -> tuple[int, int]:
    """[first, last] frame at which a ``va_steps`` patch may start (first > last: none)."""
    assert track.target is not None
    first = max(0, int(np.ceil((track.annotations_start_s - STEP_S / 2) * FRAMES_PER_SECOND)))
    end_s = track.annotations_start_s + STEP_S * (len(track.target) - 1) + STEP_S / 2
    last = min(n_frames - PATCH_FRAMES, int(end_s * FRAMES_PER_SECOND) - PATCH_FRAMES)
    while first <= last and step_targets(track, first) is None:
        first += 1
    while last >= first and step_targets(track, last) is None:
        last -= 1
    return first, last


class PatchDataset(Dataset):
    """(mel [PATCH_FRAMES, N_MELS] float32, target) items of labelled tracks (see module doc)."""

    def __init__(
        self,
        tracks: list[Track],
        task: str,
        cache: FeatureCache,
        *,
        patches_per_track: int = 8,
        time_shift: bool = True,
    ) -> None:
        self.task = task
        self.cache = cache
        self.time_shift = time_shift
        self.tracks: list[Track] = []
        self.ranges: list[tuple[int, int]] = []  # per track: [first, last] allowed start frame
        self.taken: list[int] = []  # per track: items per epoch
        self.items: list[tuple[int, int]] = []  # (track, grid slot)
        for track in tracks:
            n = len(cache.frames(track.source))
            first, last = annotated_starts(track, n) if task == "va_steps" else (0, n - PATCH_FRAMES)
            if first > last:
                continue  # no patch of this track has a full target
            t = len(self.tracks)
            self.tracks.append(track)
            self.ranges.append((first, last))
            slots = (last - first) // PATCH_FRAMES + 1
            self.taken.append(min(patches_per_track, slots))
            self.items += [(t, s) for s in range(self.taken[-1])]

    def __len__(self) -> int:
        return len(self.items)

    def start(self, index: int) -> int:
        t, slot = self.items[index]
        first, last = self.ranges[t]
        if self.time_shift:
            # torch's generator, not numpy's: DataLoader seeds it differently in each worker.
            return int(torch.randint(first, last + 1, ()).item())
        slots = (last - first) // PATCH_FRAMES + 1
        # Spread the slots taken over the whole track rather than its beginning.
        return first + (slot * slots // self.taken[t]) * PATCH_FRAMES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, _ = self.items[index]
        track = self.tracks[t]
        start = self.start(index)
        mel = torch.from_numpy(self.cache.patch(track.source, start))
        return mel, target_tensor(self.task, track, start)

    def targets(self) -> np.ndarray:
        """Every item's target without reading audio (for class and tag weighting)."""
        return np.stack([np.asarray(self.tracks[t].target) for t, _ in self.items])


def target_tensor(task: str, track: Track, start: int) -> torch.Tensor:
    if task == "va_steps":
        return torch.from_numpy(step_targets(track, start))
    if task == "classes":
        return torch.tensor(int(track.target), dtype=torch.long)
    return torch.from_numpy(np.asarray(track.target, np.float32))


def serving_patches(track: Track, cache: FeatureCache) -> tuple[np.ndarray, np.ndarray]:
    """(patches [n, PATCH_FRAMES, N_MELS], start frames [n]) the worker would score for ``track``."""
    frames = cache.frames(track.source)
    starts = serving_starts(len(frames))
    return np.stack([np.asarray(frames[s : s + PATCH_FRAMES]) for s in starts]), starts

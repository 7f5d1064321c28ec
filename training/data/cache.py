"""Log-mel frames of every audio file, computed once with the serving frontend and kept as .npy.

    <root>/<frontend hash>-<max s>s/<content sha256[:2]>/<content sha256>.npy  [n_frames, N_MELS] float32
    <root>/<frontend hash>-<max s>s/index.json   "<source>|<size>|<mtime or ETag>" -> content sha256

Files are keyed by their content, so the same audio under two names is computed once and a
changed file is recomputed; the frontend constants name the directory, so a frontend change
never reads stale features; so does the longest duration analysed (``max_duration_s``). Frames come from :func:`pipeline.stages.audio.decode` and
:class:`pipeline.stages.frontend.LogMelStream` exactly as the worker computes them; a clip shorter
than one patch is repeat-padded to one patch, as :class:`pipeline.stages.frontend.PatchStream` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import TrackError

# The decoders and the S3 client are imported where audio is read, not here: training on frames
# already in the cache needs neither (a GPU machine may have no FFmpeg libraries or boto3).
from pipeline.stages import frontend

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 30
# np.load parses the .npy header on every call (about 0.18 ms here, 12x slicing an open map), and
# a data set reads one patch per item, so the most recently used maps stay open; bounded because
# each open map holds a file descriptor.
OPEN_MAPS = 512


def frontend_key() -> str:
    blob = json.dumps(frontend.frontend_constants(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


class FeatureCache:
    """source (path or s3:// URI) -> memory-mapped log-mel frames [n_frames, N_MELS]."""

    def __init__(self, root: Path, *, max_duration_s: float = 600.0, s3_client: Any = None) -> None:
        self.dir = Path(root) / f"{frontend_key()}-{max_duration_s:g}s"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_duration_s = max_duration_s
        self._s3 = s3_client
        self._index_path = self.dir / "index.json"
        # source -> content digest, once per source: data sets read a track's frames for every
        # patch, and looking the source up each time would stat the file (or HEAD the object).
        # A run assumes its audio does not change under it.
        self._digests: dict[str, str] = {}
        self._open = lru_cache(maxsize=OPEN_MAPS)(self._load)  # digest -> open map
        self.reload()

    def reload(self) -> None:
        """Re-read the index (another process may have added to it)."""
        self._index: dict[str, str] = json.loads(self._index_path.read_text()) if self._index_path.is_file() else {}
        self._dirty = False

    def frames(self, source: str) -> np.ndarray:
        """[n_frames >= PATCH_FRAMES, N_MELS] float32 (read-only memory map); computes and stores
        them on first use. Raises TrackError (undecodable, too short, ...) or OSError."""
        return self._open(self.digest(source))

    def patch(self, source: str, start: int) -> np.ndarray:
        """[PATCH_FRAMES, N_MELS] float32, a copy: the patch of ``source`` from frame ``start``."""
        return np.array(self.frames(source)[start : start + frontend.PATCH_FRAMES], dtype=np.float32)

    def digest(self, source: str) -> str:
        """The sha256 of the source's content (its frames computed and stored if new)."""
        known = self._digests.get(source)
        if known is not None:
            return known
        stamp = self._stamp(source)
        digest = self._index.get(stamp)
        if digest is None or not self._path(digest).is_file():
            data = self._read(source)
            digest = hashlib.sha256(data).hexdigest()
            if not self._path(digest).is_file():
                self._store(digest, compute_frames(data, self.max_duration_s))
            self._index[stamp] = digest
            self._dirty = True
        self._digests[source] = digest
        return digest

    def prepare(self, sources: list[str], progress: bool = True) -> dict[str, str]:
        """Compute every source's frames now; returns {source: reason} for those that failed."""
        from tqdm import tqdm

        failed = {}
        for source in tqdm(sources, desc="mel cache", unit="file", disable=not progress):
            try:
                self.frames(source)
            except (TrackError, OSError) as exc:
                reason = exc.reason if isinstance(exc, TrackError) else "unreadable"
                log.warning("skipping %s: %s: %s", source, reason, exc)
                failed[source] = f"{reason}: {exc}"
        self.flush()
        return failed

    def flush(self) -> None:
        if self._dirty:
            tmp = self._index_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._index, sort_keys=True))
            tmp.replace(self._index_path)
            self._dirty = False

    def _load(self, digest: str) -> np.ndarray:
        return np.load(self._path(digest), mmap_mode="r")

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def _store(self, digest: str, frames: np.ndarray) -> None:
        path = self._path(digest)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.npy")
        np.save(tmp, frames)
        tmp.replace(path)  # atomic: a crashed run never leaves half a file under the real name

    def _stamp(self, source: str) -> str:
        if source.startswith("s3://"):
            import botocore.exceptions

            from pipeline.stages.storage import translate_s3_error

            bucket, _, key = source[5:].partition("/")
            try:
                head = self._client().head_object(Bucket=bucket, Key=key)
            except botocore.exceptions.ClientError as exc:
                raise translate_s3_error(exc, source) from None
            return f"{source}|{head['ContentLength']}|{head.get('ETag', '')}"
        st = Path(source).stat()
        return f"{Path(source).resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def _read(self, source: str) -> bytes:
        if source.startswith("s3://"):
            from pipeline.stages.storage import ObjectRef, fetch

            bucket, _, key = source[5:].partition("/")
            return fetch(ObjectRef("s3", bucket, key), client=self._client(), max_bytes=MAX_FILE_BYTES)
        return Path(source).read_bytes()

    def _client(self) -> Any:
        if self._s3 is None:
            from pipeline.stages.storage import make_s3_client

            self._s3 = make_s3_client()
        return self._s3


def compute_frames(data: bytes, max_duration_s: float) -> np.ndarray:
    """Encoded audio -> [n_frames >= PATCH_FRAMES, N_MELS] float32 log-mel (the serving frontend)."""
    from pipeline.stages import audio

    stream = audio.decode(data, max_duration_s=max_duration_s)
    mel = frontend.LogMelStream()
    # LogMelStream gathers the decoder's small chunks itself before each spectrogram call.
    frames = [mel.push(chunk) for chunk in stream.chunks] + [mel.finish()]
    out = np.concatenate(frames)
    if len(out) < frontend.PATCH_FRAMES:
        out = np.tile(out, (-(-frontend.PATCH_FRAMES // len(out)), 1))[: frontend.PATCH_FRAMES]
    return np.ascontiguousarray(out, dtype=np.float32)

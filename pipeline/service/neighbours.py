"""Tracks that sound alike: an approximate-nearest-neighbour index over the catalog's embeddings.

Each record carries every network's audio embedding (the mean of its patches' 200-d
penultimate layer, float16). :class:`NeighbourIndex` keeps one network's embeddings in a usearch
HNSW index under cosine distance, keyed by a small integer per track:

    <directory>/<network>.usearch   the index (usearch's own file)
    <directory>/<network>.json      {"seq": catalog row it is current to, "keys": {track_id: key}}

The catalog is the source of truth; the index is a cache of it. At start the persisted index is
loaded and caught up on rows written since its ``seq`` (:meth:`refresh`); a missing, unreadable
or foreign index (newer than the catalog, another dimension) is rebuilt from the catalog.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
from usearch.index import Index

from pipeline.service.catalog import CatalogStore, embedding_of

log = logging.getLogger(__name__)


class NeighbourIndex:
    """One network's embeddings of every catalog track; safe to share between threads."""

    def __init__(self, network: str, dim: int | None = None) -> None:
        self.network = network
        self.seq = 0  # the catalog row this index is current to
        self._dim = dim
        self._index: Index | None = None
        self._keys: dict[str, int] = {}
        self._next_key = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, track_id: str) -> bool:
        return track_id in self._keys

    # --- building -------------------------------------------------------------------------------

    @classmethod
    def load_or_build(cls, directory: Path, catalog: CatalogStore, network: str) -> NeighbourIndex:
        """The persisted index of ``network`` caught up with ``catalog``, or a new one built
        from it when there is none or it cannot be trusted."""
        index = cls._load(directory, network)
        if index is not None and index.seq > catalog.last_seq():
            log.warning(
                "the %s index is ahead of the catalog (row %d > %d): another catalog? rebuilding",
                network,
                index.seq,
                catalog.last_seq(),
            )
            index = None
        if index is None:
            index = cls(network)
        added = index.refresh(catalog)
        log.info("similar-tracks index for %s: %d tracks (%d new since it was saved)", network, len(index), added)
        index.try_save(directory)
        return index

    @classmethod
    def _load(cls, directory: Path, network: str) -> NeighbourIndex | None:
        meta_path, index_path = _paths(directory, network)
        if not (meta_path.exists() and index_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            restored = Index.restore(str(index_path), view=False)
            if restored is None or restored.size != len(meta["keys"]):
                raise ValueError("the index and its key map disagree")
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.warning("cannot load the %s index from %s (%s): rebuilding", network, directory, exc)
            return None
        index = cls(network, int(restored.ndim))
        index._index, index._keys, index.seq = (
            restored,
            {str(k): int(v) for k, v in meta["keys"].items()},
            int(meta["seq"]),
        )
        index._next_key = max(index._keys.values(), default=-1) + 1
        return index

    def refresh(self, catalog: CatalogStore) -> int:
        """Take in every track whose newest record changed since :attr:`seq`; returns how many
        vectors were added or replaced."""
        changed = 0
        while True:
            seq, rows = catalog.changed_since(self.seq)
            if not rows:
                return changed
            for track_id, record in rows:
                vector = embedding_of(record, self.network)
                if vector is None:
                    self.remove(track_id)
                else:
                    self.add(track_id, vector)
                    changed += 1
            self.seq = seq

    def add(self, track_id: str, vector: np.ndarray) -> None:
        """Add or replace the [dim] embedding of ``track_id``."""
        vector = np.asarray(vector, np.float32)
        with self._lock:
            if self._index is None:
                self._dim = self._dim or int(vector.shape[0])
                self._index = Index(ndim=self._dim, metric="cos", dtype="f32")
            if vector.shape != (self._dim,):
                log.warning(
                    "%s: a %s embedding of %s, not [%d]: not indexed", track_id, self.network, vector.shape, self._dim
                )
                return
            key = self._keys.get(track_id)
            if key is not None:
                self._index.remove(key)
            else:
                key = self._keys[track_id] = self._next_key
                self._next_key += 1
            self._index.add(key, vector)

    def remove(self, track_id: str) -> None:
        with self._lock:
            key = self._keys.pop(track_id, None)
            if key is not None and self._index is not None:
                self._index.remove(key)

    # --- querying -------------------------------------------------------------------------------

    def similar(self, track_id: str, limit: int = 20) -> list[tuple[str, float]]:
        """The ``limit`` tracks nearest ``track_id`` as [(track_id, cosine distance)], nearest
        first, without the track itself; KeyError when it is not in the index."""
        with self._lock:
            key = self._keys[track_id]
            if self._index is None:  # keys exist only once the index does
                raise KeyError(track_id)
            vector = np.asarray(self._index.get(key), np.float32)
            found = self._index.search(vector, min(limit + 1, len(self._keys)))
            by_key = {v: k for k, v in self._keys.items()}
            pairs = [
                (by_key[int(k)], float(d))
                for k, d in zip(found.keys, found.distances)
                if int(k) in by_key and int(k) != key
            ]
        return pairs[:limit]

    def try_save(self, directory: Path) -> bool:
        """:meth:`save`, or a warning when the disk refuses it (full, read-only): the index is a
        cache of the catalog, so the service goes on with the one in memory and the previous
        pair on disk, and saves again later. Whether it was saved."""
        try:
            self.save(directory)
        except (OSError, RuntimeError) as exc:  # usearch says RuntimeError for a failed write
            meta_path, index_path = _paths(directory, self.network)
            for leftover in (Path(str(index_path) + ".tmp"), meta_path.with_suffix(".json.tmp")):
                leftover.unlink(missing_ok=True)
            log.warning(
                "the %s index could not be saved in %s (%s); it is kept in memory", self.network, directory, exc
            )
            return False
        return True

    def save(self, directory: Path) -> None:
        """Write the index and its key map atomically (a crash leaves the previous pair)."""
        directory.mkdir(parents=True, exist_ok=True)
        meta_path, index_path = _paths(directory, self.network)
        with self._lock:
            if self._index is None:
                for path in (meta_path, index_path):
                    path.unlink(missing_ok=True)
                return
            self._index.save(str(index_path) + ".tmp")
            meta = json.dumps({"seq": self.seq, "network": self.network, "keys": self._keys})
        meta_tmp = meta_path.with_suffix(".json.tmp")
        meta_tmp.write_text(meta)
        os.replace(str(index_path) + ".tmp", index_path)
        os.replace(meta_tmp, meta_path)


def _paths(directory: Path, network: str) -> tuple[Path, Path]:
    return directory / f"{network}.json", directory / f"{network}.usearch"

"""A track's data between the event loop and its decoding process, through shared memory.

A process pool moves arguments and results through a pipe: pickled, written and read in
pipe-sized pieces, unpickled. For the patches of a 3-minute track (63 x 187 x 96 float32,
4.5 MB) that cost 3.5 ms of the event loop's CPU and 7.5 ms of the decoding process's, measured
here, where decoding that track costs about 215 ms; a 3-minute FLAC file is 5-7 times larger
still. Through shared memory the decoding process writes the patches once and the event loop
maps them where they are:

    event loop:        with send(data) as sent:                       # the encoded file
    decoding process:      with opened(sent) as data: ... share(analysis)
                               -> (analysis without its patches, SharedPatches)
    event loop:            receive(analysis, shared)                  # the patches, mapped
                           ... score (a Triton server on this host reads the block by its key)
                           shared.release()

The event loop removes the file's block once the job has ended, however it ended. A patches
block's name is removed by the process that receives its handle: on release, or when the
handle is dropped (a cancelled batch), so a block lives only while its track is in flight; its
memory goes with the last mapping. Should a process die meanwhile, multiprocessing's resource
tracker removes what is left when the worker exits. Data over ``MAX_SHARED_BYTES``, or a block
the shared-memory file system has no room for, goes through the pipe as before.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing import shared_memory
from typing import BinaryIO

import numpy as np

from pipeline.stages.analysis import Analysis
from pipeline.stages.frontend import PATCH_SHAPE

#: Larger data (patches of over 5 min of audio at 72 kB per 3 s patch; a file of over 5 min of
#: CD-quality FLAC) takes the pipe: several long tracks in flight at once must not fill a
#: container's /dev/shm (64 MiB by default in Docker and Kubernetes unless a memory volume is
#: mounted there, as deploy/k8s does).
MAX_SHARED_BYTES = 24 * 1024 * 1024


def _new_block(size: int) -> shared_memory.SharedMemory | None:
    """A new block of ``size`` bytes with its pages reserved, or None when there is no room.
    Writing past a full tmpfs raises SIGBUS, which would kill the process; a failed
    reservation is an OSError instead."""
    if not 0 < size <= MAX_SHARED_BYTES:
        return None
    try:
        block = shared_memory.SharedMemory(create=True, size=size)
    except OSError:
        return None
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(_fd(block), 0, size)
    except OSError:
        _remove(block)
        return None
    return block


def _fd(block: shared_memory.SharedMemory) -> int:
    """The block's file descriptor: SharedMemory keeps it (POSIX) but does not expose it."""
    return block._fd  # type: ignore[attr-defined]


def _write(block: shared_memory.SharedMemory, data: bytes | memoryview) -> None:
    """``data`` into ``block`` from its start, through its file rather than its mapping: a write
    into a fresh mapping faults each page in on its own (3.1 ms for 4.5 MB measured here, 1.8
    through the file)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(_fd(block), view[done:], done)


def _remove(block: shared_memory.SharedMemory) -> None:
    """Unmap ``block`` here and remove it everywhere (mappings elsewhere stay valid until closed)."""
    block.close()
    block.unlink()


# --- the encoded file, event loop -> decoding process -------------------------------------------


@dataclass(frozen=True)
class SharedBytes:
    """The name and length of a block holding an encoded file."""

    name: str
    size: int


@contextmanager
def send(data: bytes) -> Iterator[bytes | SharedBytes]:
    """In the event loop: ``data`` in a new block for the job the ``with`` body runs (``data``
    itself when it is to take the pipe); the block is removed when the body is left."""
    block = _new_block(len(data))
    if block is None:
        yield data
        return
    try:
        _write(block, data)
        yield SharedBytes(block.name, len(data))
    finally:
        _remove(block)


@contextmanager
def opened(data: bytes | SharedBytes) -> Iterator[bytes | BinaryIO]:
    """In the decoding process: the file, read from its block while the ``with`` body runs
    (see :func:`send`). It is read through the block's file descriptor, as any file is, rather
    than through a mapping: the decoder copies what it reads either way, and a mapping would
    first fault each of its pages in (and io.BytesIO over it would copy it whole)."""
    if not isinstance(data, SharedBytes):
        yield data
        return
    block = shared_memory.SharedMemory(name=data.name)
    try:
        with open(os.dup(_fd(block)), "rb") as file:
            yield file
    finally:
        block.close()


# --- the patches, decoding process -> event loop ------------------------------------------------


class SharedPatches:
    """The name and shape of a block of patches [n, PATCH_FRAMES, N_MELS] float32.

    Made by :func:`share` in the decoding process, which does not own the block. Unpickled in
    the receiving process, the handle owns it: :meth:`view` maps the patches in place, the block
    keeps its name until :meth:`release` (or until the handle is dropped), so that a Triton
    server on the same host can open it meanwhile (``key``), and the memory goes once the name
    is removed and the last mapping is gone.
    """

    def __init__(self, name: str, shape: tuple[int, ...], *, owner: bool) -> None:
        self.name = name
        self.shape = shape
        self._owner = owner

    def __reduce__(self) -> tuple:
        return (_received, (self.name, self.shape))

    @property
    def key(self) -> str:
        """The block's name as ``shm_open`` takes it (and Triton's shared-memory registration)."""
        return "/" + self.name

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(np.float32).itemsize

    def view(self) -> np.ndarray:
        """[n, PATCH_FRAMES, N_MELS] float32: the patches in the block, mapped, not copied. The
        mapping outlives :meth:`release` for as long as this array (or a view of it) lives."""
        if not self._owner:
            raise RuntimeError(
                f"shared patches {self.name} are viewed by the process that receives them (or were released)"
            )
        block = shared_memory.SharedMemory(name=self.name)
        try:
            # A mapping of our own: the block's is closed below, and closing a mapping that an
            # array still uses raises BufferError; this one is unmapped when the array goes.
            mapping = mmap.mmap(_fd(block), self.nbytes)
        finally:
            block.close()
        return np.frombuffer(mapping, np.float32).reshape(self.shape)

    def release(self) -> None:
        """Remove the block's name (once; mappings stay valid until unmapped)."""
        if getattr(self, "_owner", False):
            self._owner = False
            try:
                _remove(shared_memory.SharedMemory(name=self.name))
            except FileNotFoundError:
                pass

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - the interpreter is shutting down
            pass


def _received(name: str, shape: tuple[int, ...]) -> SharedPatches:
    return SharedPatches(name, shape, owner=True)


def share(analysis: Analysis) -> tuple[Analysis, SharedPatches | None]:
    """In the decoding process: ``analysis`` without its patches (an empty [0, *PATCH_SHAPE]
    array in their place) and the block now holding them; ``(analysis, None)`` unchanged when
    they are to take the pipe (see the module's docstring)."""
    patches = np.ascontiguousarray(analysis.patches.patches, np.float32)
    block = _new_block(patches.nbytes)
    if block is None:
        return analysis, None
    _write(block, patches.data)
    block.close()
    handle = SharedPatches(block.name, patches.shape, owner=False)
    return replace(analysis, patches=replace(analysis.patches, patches=np.empty((0, *PATCH_SHAPE), np.float32))), handle


def receive(analysis: Analysis, shared: SharedPatches | None) -> Analysis:
    """In the event loop: ``analysis`` with its patches back, mapped from their block (see
    :func:`share`); the caller releases ``shared`` once nothing needs to open the block by name."""
    if shared is None:
        return analysis
    return replace(analysis, patches=replace(analysis.patches, patches=shared.view()))

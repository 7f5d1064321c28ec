"""The decoding process pool, shared by the worker and the HTTP service.

Decoding and the frontend run in processes of their own (``spawn``, not ``fork``: the parent
runs an event loop and gRPC threads that must not be copied). :func:`start` makes the pool and
starts every process, with its imports, before the first track needs it; a pool that cannot start
is a :class:`~pipeline.errors.ConfigError` there, before any event is taken, so an environment
problem never turns every track into a dead letter.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import sys
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.stages import frontend

#: The folder holding the ``pipeline`` package (site-packages, or a clone's root).
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def make_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes (not yet started)."""
    # Spawned processes start from a copy of this process's sys.path; `faust -A
    # pipeline.worker.faust_app` has the package's folder on it only while it imports the app.
    if _PACKAGE_PARENT not in sys.path:
        sys.path.append(_PACKAGE_PARENT)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


async def warm_up(pool: Executor, workers: int) -> None:
    """Start the pool's ``workers`` processes (and their imports) now; ConfigError if they die."""
    loop = asyncio.get_running_loop()
    try:
        await asyncio.gather(*(loop.run_in_executor(pool, warm_process) for _ in range(workers)))
    except BrokenProcessPool:
        raise ConfigError("the decoding processes cannot start; their error is logged above") from None


def warm_process() -> None:
    """Runs once in each pool process at start. Unpickling this function imports the
    decoding and frontend stack; one tiny spectrogram builds the mel filterbank."""
    torch.set_num_threads(1)
    frontend.log_mel(np.zeros(frontend.N_FFT, np.float32))
    freeze_startup_objects()


def freeze_startup_objects() -> None:
    """Takes every object alive now (modules, clients, the model's metadata) out of the garbage
    collector's sight: they live as long as the process, and a full collection that scanned
    them (280,000 objects once torch, boto3 and gRPC are imported) cost 0.13 s of CPU in the
    worker's main process, a third of its own CPU on a batch of 12 tracks. Called once start-up
    is done, in the main process and in each decoding process."""
    gc.collect()
    gc.freeze()

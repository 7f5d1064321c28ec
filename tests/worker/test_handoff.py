"""Patches through shared memory: real decoding processes (spawned, as the worker's), real blocks."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import shared_memory

import numpy as np
import pytest
from support import REPO as REPO_ROOT
from support import encode, tone
from test_batch import CONFIG

from pipeline.stages.analysis import analyse
from pipeline.worker import handoff
from pipeline.worker.batch import _analyse_job


def exists(name: str) -> bool:
    try:
        shared_memory.SharedMemory(name=name).close()
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def test_patches_come_back_equal_and_the_block_is_removed_on_release(pool):
    data = encode(tone(20.0), "mp3")
    analysis, shared = pool.submit(_analyse_job, data, CONFIG).result()
    assert shared is not None and shared.shape == (6, 187, 96) and exists(shared.name)
    assert shared.key == "/" + shared.name and shared.nbytes == 6 * 187 * 96 * 4
    assert analysis.patches.patches.shape == (0, 187, 96)  # nothing big went through the pipe
    received = handoff.receive(analysis, shared)
    direct = analyse(data, max_duration_s=CONFIG.max_duration_s, min_duration_s=CONFIG.min_duration_s)
    np.testing.assert_array_equal(received.patches.patches, direct.patches.patches)
    np.testing.assert_array_equal(received.patches.patch_starts_s, direct.patches.patch_starts_s)
    assert received.duration_s == direct.duration_s
    assert exists(shared.name)  # mapped, not copied: the name stays for a Triton server to open
    shared.release()
    assert not exists(shared.name)
    # The mapping outlives the name for as long as the array does.
    np.testing.assert_array_equal(received.patches.patches, direct.patches.patches)
    with pytest.raises(RuntimeError, match="released"):
        shared.view()
    shared.release()  # once is enough; again is harmless


def test_the_file_goes_in_through_shared_memory_and_its_block_is_removed_after_the_job(pool):
    data = encode(tone(20.0), "flac")
    with handoff.send(data) as sent:
        assert isinstance(sent, handoff.SharedBytes) and sent.size == len(data) and exists(sent.name)
        through_block = handoff.receive(*pool.submit(_analyse_job, sent, CONFIG).result())
    assert not exists(sent.name)
    through_pipe = handoff.receive(*pool.submit(_analyse_job, data, CONFIG).result())
    np.testing.assert_array_equal(through_block.patches.patches, through_pipe.patches.patches)
    with pytest.raises(ValueError), handoff.send(data) as sent:
        raise ValueError("the job failed")  # the block goes all the same
    assert not exists(sent.name)


def test_a_dropped_handle_removes_its_block_viewed_or_not(pool):
    for view in (False, True):
        analysis, shared = pool.submit(_analyse_job, encode(tone(5.0), "wav"), CONFIG).result()
        name = shared.name
        received = handoff.receive(analysis, shared) if view else None
        assert exists(name)
        del shared  # a cancelled batch: nobody scores the track
        assert not exists(name)
        assert received is None or received.patches.patches.shape == (1, 187, 96)


def test_the_sending_side_neither_views_nor_removes():
    analysis = analyse(encode(tone(5.0), "wav"), max_duration_s=60, min_duration_s=1)
    _, shared = handoff.share(analysis)
    with pytest.raises(RuntimeError, match="process that receives"):
        shared.view()
    name = shared.name
    shared.release()  # not the sender's to remove
    received = pickle.loads(pickle.dumps(shared))  # as the pool delivers it
    del shared
    assert exists(name)
    np.testing.assert_array_equal(received.view(), analysis.patches.patches)
    received.release()
    assert not exists(name)


def test_large_or_empty_patches_take_the_pipe(monkeypatch):
    analysis = analyse(encode(tone(10.0), "wav"), max_duration_s=60, min_duration_s=1)
    monkeypatch.setattr(handoff, "MAX_SHARED_BYTES", analysis.patches.patches.nbytes - 1)
    assert handoff.share(analysis) == (analysis, None)
    assert handoff.receive(analysis, None) is analysis
    with handoff.send(b"") as empty, handoff.send(b"x" * (handoff.MAX_SHARED_BYTES + 1)) as large:
        assert empty == b"" and len(large) == handoff.MAX_SHARED_BYTES + 1


def test_no_room_in_shared_memory_takes_the_pipe(monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(handoff.os, "posix_fallocate", full)
    analysis = analyse(encode(tone(5.0), "wav"), max_duration_s=60, min_duration_s=1)
    assert handoff.share(analysis) == (analysis, None)
    with handoff.send(b"abc") as sent:
        assert sent == b"abc"


def test_no_block_is_left_or_reported_leaked_at_exit():
    """A whole worker-like run in its own interpreter: multiprocessing's resource tracker warns
    at exit about blocks nobody removed."""
    script = (
        "import multiprocessing, sys; from concurrent.futures import ProcessPoolExecutor;"
        "sys.path[:0] = ['tests', 'tests/worker'];"
        "from support import encode, tone; from test_batch import CONFIG;"
        "from pipeline.worker import handoff; from pipeline.worker.batch import _analyse_job\n"
        "if __name__ == '__main__':\n"
        "    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context('spawn')) as pool:\n"
        "        results = []\n"
        "        for i in range(4):\n"
        "            with handoff.send(encode(tone(4.0 + i), 'wav')) as sent:\n"
        "                results.append(pool.submit(_analyse_job, sent, CONFIG).result())\n"
        "        names = [s.name for _, s in results]\n"
        "        handoff.receive(*results[0]); del results\n"
        "    print(' '.join(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names = done.stdout.split()
    assert len(names) == 4 and not any(exists(n) for n in names)
    assert "leaked" not in done.stderr, done.stderr

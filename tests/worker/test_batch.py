"""The batch logic without Kafka: real stages (file:// audio, process pool, onnxruntime)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import shared_memory

import numpy as np
import pytest
from support import encode, tone

from pipeline.contracts import events
from pipeline.errors import InferenceFailed, ServiceUnavailable
from pipeline.settings import DEFAULT_MODEL_REPOSITORY
from pipeline.stages.analysis import analyse
from pipeline.stages.scoring import OnnxScorer
from pipeline.stages.taxonomy import load_taxonomy
from pipeline.worker import handoff
from pipeline.worker.batch import BatchWorker, WorkerConfig

CONFIG = WorkerConfig(
    output_topic="out",
    dlq_topic="dlq",
    allowed_buckets=(),
    allow_file_uris=True,
    max_object_bytes=10_000_000,
    max_duration_s=600,
    min_duration_s=1.0,
    top_moods=3,
    timeline_segment_s=30,
    outage_backoff_max_s=0.05,
)


class Recorder:
    def __init__(self):
        self.records: list[tuple[str, bytes | None, dict]] = []

    async def __call__(self, topic, key, value):
        self.records.append((topic, key, json.loads(value)))


class FlakyScorer:
    """Wraps a real scorer; the first ``outages`` calls fail as if Triton were down."""

    def __init__(self, inner, outages):
        self.inner, self.outages, self.calls = inner, outages, 0
        self.meta = inner.meta

    async def score(self, patches, shm_key=None):
        self.calls += 1
        if self.calls <= self.outages:
            raise ServiceUnavailable("Triton down")
        return await self.inner.score(patches, shm_key=shm_key)


@pytest.fixture(scope="module")
def scorer():
    return OnnxScorer(DEFAULT_MODEL_REPOSITORY, "musicnn")


def make_pool():
    return ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))


def make_worker(scorer, publish, make_pool=make_pool):
    taxonomy = load_taxonomy(scorer.meta)
    return BatchWorker(CONFIG, scorer=scorer, taxonomy=taxonomy, s3_client=None, make_pool=make_pool, publish=publish)


def announce(track_id, path):
    return events.ingested_record(track_id=track_id, audio_uri=path.as_uri())


def test_batch_scores_every_track_in_one_call_and_matches_tagging_alone(scorer, example_clips, tmp_path):
    (tmp_path / "tone.ogg").write_bytes(encode(tone(5.0), "vorbis"))
    (tmp_path / "short.wav").write_bytes(encode(tone(0.2), "wav"))
    raws = [
        announce("a", example_clips[0]),
        announce("b", tmp_path / "tone.ogg"),
        announce("c", tmp_path / "short.wav"),
        announce("d", tmp_path / "none.mp3"),
        b"][",
    ]
    publish = Recorder()
    result = asyncio.run(make_worker(scorer, publish).process(raws))
    assert result.outputs == 2 and result.dead_letters == {"too_short": 1, "not_found": 1, "bad_event": 1}
    outputs = {r["track_id"]: r for t, _, r in publish.records if t == "out"}
    assert set(outputs) == {"a", "b"}
    # Batching across tracks changes no score: compare with the track scored alone.
    alone = scorer.score_sync(
        analyse(example_clips[0].read_bytes(), max_duration_s=600, min_duration_s=1).patches.patches
    )
    for network in scorer.meta.networks:
        batched = np.array([outputs["a"]["tags"][network.name][label] for label in network.labels])
        assert np.abs(batched - alone[network.name].scores.mean(axis=0)).max() <= 1e-4
    # musicnn_mtt's top three on the jazz excerpt as `moodstream tag` gives them (0.47, 0.29, 0.20; the next 0.11)
    assert [t["tag"] for t in outputs["a"]["top_tags"]["musicnn_mtt"][:3]] == ["guitar", "slow", "piano"]
    assert outputs["a"]["model"]["networks"] == [
        {"name": "musicnn_msd", "version": "1"},
        {"name": "musicnn_mtt", "version": "1"},
    ]
    assert outputs["a"]["leading_mood"]["mood"] is not None and set(outputs["a"]["embeddings"]) == {
        "musicnn_msd",
        "musicnn_mtt",
    }


class KeyReadingScorer:
    """Wraps a real scorer; reads each shared-memory key it is given, as Triton would open it,
    and keeps what the block held beside the patches it came with."""

    def __init__(self, inner):
        self.inner, self.meta, self.seen = inner, inner.meta, []

    async def score(self, patches, shm_key=None):
        block = shared_memory.SharedMemory(name=shm_key.lstrip("/"))
        try:
            self.seen.append(
                (shm_key, np.array(patches), np.ndarray(patches.shape, np.float32, buffer=block.buf).copy())
            )
        finally:
            block.close()
        return await self.inner.score(patches, shm_key=shm_key)


def test_the_scorer_gets_the_patches_block_by_key_and_no_block_outlives_the_batch(example_clips):
    # A scorer of its own: two tracks score concurrently, which binds its lock to this test's loop.
    reader = KeyReadingScorer(OnnxScorer(DEFAULT_MODEL_REPOSITORY, "musicnn"))
    result = asyncio.run(
        make_worker(reader, Recorder()).process([announce("a", example_clips[0]), announce("b", example_clips[1])])
    )
    assert result.outputs == 2 and len(reader.seen) == 2
    for key, patches, in_block in reader.seen:
        assert len(patches) > 0
        np.testing.assert_array_equal(in_block, patches)
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=key.lstrip("/"))


def test_an_outage_pauses_the_batch_instead_of_dead_lettering(scorer, example_clips):
    flaky = FlakyScorer(scorer, outages=3)
    publish = Recorder()
    result = asyncio.run(make_worker(flaky, publish).process([announce("a", example_clips[1])]))
    assert flaky.calls == 4 and result.outputs == 1 and not result.dead_letters


class CrashingPool(ProcessPoolExecutor):
    """A real process pool whose process dies on any object starting with b"CRASH" (handed
    over in shared memory, as the worker does, or as bytes): it exits, or it takes a SIGSEGV
    as a crashing native decoder does."""

    how = "exit"

    def submit(self, fn, data, *args):
        with handoff.opened(data) as content:
            crash = (content[:5] if isinstance(content, bytes) else content.read(5)) == b"CRASH"
        if crash and self.how == "segv":
            return super().submit(signal.raise_signal, signal.SIGSEGV)
        if crash:
            return super().submit(os._exit, 1)
        return super().submit(fn, data, *args)


@pytest.mark.parametrize("how", ["exit", "segv"])
def test_a_file_that_kills_the_decoding_process_costs_only_that_track(scorer, example_clips, tmp_path, how):
    (tmp_path / "poison.mp3").write_bytes(b"CRASH" + b"\0" * 100)
    raws = [announce("good", example_clips[1]), announce("poison", tmp_path / "poison.mp3")]
    publish = Recorder()

    def pool():
        made = CrashingPool(2, mp_context=multiprocessing.get_context("spawn"))
        made.how = how
        return made

    worker = make_worker(scorer, publish, pool)
    result = asyncio.run(worker.process(raws))
    worker.close()
    assert result.outputs == 1 and result.dead_letters == {"undecodable": 1}
    dead = next(r for t, _, r in publish.records if t == "dlq")
    assert dead["track_id"] == "poison" and "process died" in dead["message"]


class RejectingScorer:
    """Wraps a real scorer; refuses any request holding an all-zero patch (a silent track), as
    a model server refuses a request it cannot run."""

    def __init__(self, inner):
        self.inner, self.meta, self.calls = inner, inner.meta, 0

    async def score(self, patches, shm_key=None):
        self.calls += 1
        if any(not p.any() for p in patches):
            raise InferenceFailed("request rejected")
        return await self.inner.score(patches, shm_key=shm_key)


def test_a_track_the_model_server_rejects_costs_only_that_track(scorer, example_clips, tmp_path):
    (tmp_path / "silence.wav").write_bytes(encode(np.zeros((1, 16_000 * 4), np.float32), "wav", rate=16_000))
    raws = [announce("good", example_clips[1]), announce("silent", tmp_path / "silence.wav")]
    publish = Recorder()
    rejecting = RejectingScorer(scorer)
    worker = make_worker(rejecting, publish)
    result = asyncio.run(worker.process(raws))
    worker.close()
    # One call per track: the rejected one costs only its own track.
    assert rejecting.calls == 2 and result.outputs == 1 and result.dead_letters == {"inference_failed": 1}
    dead = next(r for t, _, r in publish.records if t == "dlq")
    assert dead["track_id"] == "silent" and dead["reason"] == "inference_failed"

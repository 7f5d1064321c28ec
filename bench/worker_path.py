"""The worker's batch logic without Kafka, timed: S3 fetch + decode + mel + inference.

Runs :class:`pipeline.worker.batch.BatchWorker` exactly as the Faust agent does, on batches of
``MOODSTREAM_BATCH_SIZE`` announcements read from a file (one JSON record per line), with a
publisher that keeps the records instead of sending them. Settings come from the environment
(``MOODSTREAM_SCORER`` picks onnxruntime in this process or the Triton server).

    python -m bench.worker_path ANNOUNCEMENTS.jsonl

Prints one JSON object: tracks, outputs, wall seconds, and the CPU seconds of this process and
of its decoding processes (the Triton server's CPU is not included: inference is remote).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipeline.settings import load_settings
from pipeline.stages import storage
from pipeline.stages.taxonomy import load_taxonomy
from pipeline.worker.batch import BatchWorker
from pipeline.worker.faust_app import open_scorer, worker_config
from pipeline.worker.pool import freeze_startup_objects, warm_process


class _Keep:
    """Publisher that keeps (topic, key, value) instead of producing to Kafka."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes]] = []

    async def __call__(self, topic: str, key: bytes | None, value: bytes) -> None:
        self.records.append((topic, key, value))


def _cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _pool_cpu_s(worker: BatchWorker) -> float:
    """CPU seconds used so far by the worker's decoding processes (Linux /proc)."""
    total = 0
    for pid in worker.pool._processes:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


async def run(raws: list[bytes]) -> dict:
    s = load_settings()
    scorer = await open_scorer(s)
    keep = _Keep()
    spawn = multiprocessing.get_context("spawn")
    worker = BatchWorker(
        worker_config(s),
        scorer=scorer,
        taxonomy=load_taxonomy(scorer.meta, s.moods_file),
        s3_client=storage.make_s3_client(s.s3_max_attempts),
        make_pool=lambda: ProcessPoolExecutor(s.decode_workers, mp_context=spawn),
        publish=keep,
    )
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(worker.pool, warm_process) for _ in range(s.decode_workers)))
    freeze_startup_objects()  # as the worker does once it has started (pipeline/worker/faust_app.py)
    # Start-up is excluded: the figures are per track in steady state. Besides the imports, the
    # first S3 request, Triton call and output each load code once per process (botocore's
    # lazily built request path, as end_to_end's warm-up track covers for the real worker):
    # the first track goes through once, untimed, as the bench's other figures do.
    await worker.process(raws[:1])
    keep.records.clear()
    wall, cpu_self, cpu_pool = time.perf_counter(), _cpu_s(resource.RUSAGE_SELF), _pool_cpu_s(worker)
    outputs = 0
    for i in range(0, len(raws), s.batch_size):
        outputs += (await worker.process(raws[i : i + s.batch_size])).outputs
    wall = time.perf_counter() - wall
    cpu_self = _cpu_s(resource.RUSAGE_SELF) - cpu_self
    cpu_pool = _pool_cpu_s(worker) - cpu_pool
    worker.close()
    await scorer.close()
    outputs_seen = [json.loads(v) for topic, _, v in keep.records if topic == s.output_topic]
    audio_s = sum(r["analysed_s"] for r in outputs_seen)
    # The audio-features stage's time, measured around it in the decoding processes (one
    # thread each, so its wall time there is its CPU time).
    features_s = sum(r["latency_ms"].get("audio_features", 0.0) for r in outputs_seen) / 1000
    return {
        "scorer": s.scorer.value,
        "tracks": len(raws),
        "outputs": outputs,
        "audio_s": audio_s,
        "wall_s": wall,
        "cpu_s": cpu_self + cpu_pool,
        "cpu_s_main": cpu_self,
        "cpu_s_decoding": cpu_pool,
        "audio_features_s": features_s,
    }


def main() -> int:
    raws = [line.encode() for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    print(json.dumps(asyncio.run(run(raws))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The catalog service started on a full disk fills the catalog all the same (found by the chaos run).

The similar-tracks index is a cache of the catalog, saved beside it (``MOODSTREAM_INDEX_DIR``).
A service restarted while that disk was full died in its start-up with the index's failed save
(usearch: "Failed to serialize into stream"): it served, but never opened the catalog nor
followed the output topic, not even once space came back (chaos run, seed 3: the catalog
stopped at 173 of 594 tracks). Now a failed save is a warning, the index stays in memory, and
the service saves it again later and when it stops.

Real processes: a worker tags tracks onto a topic of the test's own; ``moodstream serve``
follows it, is stopped, and starts again with its index folder on a tmpfs filled to the last
byte (root only: mounting needs it) while more tracks arrive.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import pytest
import requests
from serving import ServiceProcess

from pipeline.contracts import events
from pipeline.stages import storage

from .kit import BUCKET, Reader, WorkerProcess, private_topics, produce

pytestmark = pytest.mark.faults
TRACKS = 4


@contextlib.contextmanager
def full_tmpfs(path, *, full: bool = True):
    """A 4 MB tmpfs at ``path``, with no byte free when ``full``; yields the filler file's path
    (:func:`fill` fills it, deleting it frees the space)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "moodstream-test", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs (root needed): {done.stderr.decode().strip()}")
    filler = path / "filler"
    try:
        if full:
            fill(filler)
        yield filler
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(filler):
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)


def test_a_catalog_service_restarted_on_a_full_disk_still_fills_the_catalog(stack, example_clips, tmp_path, summary):
    topics = private_topics(stack, "diskfull")
    storage.make_s3_client().upload_file(str(example_clips[0]), BUCKET, "diskfull/a.mp3")
    before, after = [f"diskfull-{i}" for i in range(TRACKS)], [f"diskfull-{i}" for i in range(TRACKS, 2 * TRACKS)]
    index_dir = tmp_path / "index-fs"
    service_settings = dict(
        MOODSTREAM_CATALOG_FOLLOW="true",
        MOODSTREAM_CATALOG_GROUP="diskfull-catalog",
        MOODSTREAM_OUTPUT_TOPIC=topics["MOODSTREAM_OUTPUT_TOPIC"],
        MOODSTREAM_KAFKA_BOOTSTRAP=stack.kafka_bootstrap,
        MOODSTREAM_INDEX_DIR=str(index_dir / "index"),
    )
    reader = Reader(stack.kafka_bootstrap, "diskfull")
    worker = WorkerProcess(stack, tmp_path / "worker.log", MOODSTREAM_BATCH_SIZE="4", **topics)
    announce = lambda ids: produce(
        stack.kafka_bootstrap,
        topics["MOODSTREAM_INPUT_TOPIC"],
        [(t.encode(), events.ingested_record(track_id=t, audio_uri=f"s3://{BUCKET}/diskfull/a.mp3")) for t in ids],
    )
    try:
        with full_tmpfs(index_dir, full=False) as filler:
            announce(before)
            assert reader.wait(lambda s: s.output_ids() >= set(before), 300, (worker,)), worker.log()
            with ServiceProcess(tmp_path, **service_settings) as service:
                assert _in_catalog(service, before), service.log_tail()
            fill(filler)  # the disk is full when the service starts again, with a catalog to index
            announce(after)
            assert reader.wait(lambda s: s.output_ids() >= set(after), 300, (worker,)), worker.log()
            with ServiceProcess(tmp_path, **service_settings) as service:  # ready: the catalog is open
                assert _in_catalog(service, before + after), service.log_tail()
                assert "could not be saved" in service.log_tail(400), service.log_tail()
                filler.unlink()  # space comes back; the service saves its index when it stops
            saved = sorted(p.name for p in (index_dir / "index").iterdir())
    finally:
        worker.stop()
        reader.close()
    assert any(n.endswith(".usearch") for n in saved) and not any(n.endswith(".tmp") for n in saved), saved
    summary(announced=2 * TRACKS, outputs=2 * TRACKS, dlq=0, duplicates=0, index_files=len(saved), uid=os.geteuid())


def _in_catalog(service: ServiceProcess, ids: list[str]) -> bool:
    """Whether the service answers every track of ``ids`` (waiting for its consumer)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(requests.get(f"{service.url}/v1/tracks/{t}", timeout=10).status_code == 200 for t in ids):
            return True
        time.sleep(0.5)
    return False

"""`moodstream demo DIR --json` as a user runs it: the whole product in one command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jsonschema
import pytest
from support import REPO, encode, tone

from pipeline.contracts import events
from pipeline.service.catalog import CatalogStore

pytestmark = pytest.mark.integration


def test_demo_json_prints_one_valid_output_per_track(example_clips, tmp_path):
    folder = tmp_path / "my music"
    (folder / "sub dir").mkdir(parents=True)
    for clip in example_clips:
        shutil.copyfile(clip, folder / f"copy of {clip.name}")
    (folder / "sub dir" / "a tone.flac").write_bytes(encode(tone(6.0), "flac"))
    (folder / "notes.txt").write_text("not announced: not an audio extension")

    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", str(folder), "--json", "--log-dir", str(tmp_path / "logs")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout
    schema = events.load_schema("track_moods.v3")
    for line in lines:
        jsonschema.validate(json.loads(line), schema)
    for line in lines:
        record = json.loads(line)
        assert record["leading_mood"]["mood"] is not None and record["quadrant"] in {"happy", "angry", "sad", "relaxed"}
        # The shipped entry carries heads learned from people: its quadrant is their most probable one.
        probabilities = record["quadrant_probabilities"]
        assert record["mood_source"] == "heads" and sum(probabilities.values()) == pytest.approx(1.0, abs=1e-3)
        assert record["quadrant"] == max(probabilities, key=probabilities.get)
        assert record["model"]["version"].count("heads.") == 1
    assert "3 tracks announced: 3 tagged, 0 dead-lettered, 0 lost" in done.stderr
    # The service ran beside the worker and its catalog took in every record from the topic.
    [page] = [line for line in done.stderr.splitlines() if line.startswith("the web page: http://127.0.0.1:")]
    assert "(3 tracks in its catalog" in page
    catalog = CatalogStore.open(f"sqlite:///{tmp_path / 'logs' / 'catalog.db'}")
    assert sorted(r["track_id"] for r in catalog.ranked(limit=10)) == sorted(
        json.loads(line)["track_id"] for line in lines
    )
    catalog.close()

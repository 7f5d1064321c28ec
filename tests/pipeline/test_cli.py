"""`moodstream tag` as a user runs it: a subprocess on real music."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

#: musicnn_mtt's top tags of the suite's clips (tests/conftest.py), as this code gives them:
#: guitar 0.47 over slow 0.29, ambient 0.39 over slow 0.33.
TOP_MTT = ["guitar", "ambient"]
#: musicnn's two example clips (ISC licence; not in Debian, so the project does not fetch them)
#: and the top tags musicnn publishes for them. The port itself is checked without them against
#: the original graph (tests/training/test_musicnn.py, the parity fixture) and the frontend
#: against librosa (tests/stages/test_frontend.py); this checks the whole path end to end.
MUSICNN_EXAMPLES = os.environ.get("MOODSTREAM_MUSICNN_EXAMPLES", "")
PUBLISHED_MTT = {
    "joram-moments_of_clarity-08-solipsism-59-88.mp3": ["techno", "electronic", "synth", "fast", "beat", "drums"],
    "TRWJAZW128F42760DD_test.mp3": ["guitar", "piano", "fast"],
}


def _tag(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "tag", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_tag_json_lists_the_highest_tags_first(example_clips):
    done = _tag("--model", "musicnn_mtt", "--json", *map(str, example_clips))
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(r["path"]).name for r in results] == [c.name for c in example_clips]
    for result, top in zip(results, TOP_MTT):
        assert {
            "path",
            "duration_s",
            "patches",
            "model",
            "tags",
            "moods",
            "top_tags",
            "leading_mood",
            "valence",
            "arousal",
            "quadrant",
            "embeddings",
        } <= set(result)
        tags, top_tags = result["tags"]["musicnn_mtt"], result["top_tags"]["musicnn_mtt"]
        assert (
            len(tags) == 50
            and result["model"]["name"] == "musicnn_mtt"
            and result["model"]["version"].startswith("1+cal.")
        )
        ranked = sorted(tags, key=lambda t: -tags[t])
        assert [t["tag"] for t in top_tags] == ranked[: len(top_tags)]
        assert top_tags[0]["tag"] == top


@pytest.mark.skipif(
    not MUSICNN_EXAMPLES, reason="MOODSTREAM_MUSICNN_EXAMPLES (a folder with musicnn's two example clips) not set"
)
def test_tag_gives_musicnn_published_tags_for_its_example_clips():
    clips = [Path(MUSICNN_EXAMPLES) / name for name in PUBLISHED_MTT]
    done = _tag("--model", "musicnn_mtt", "--json", *map(str, clips))
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        result = json.loads(line)
        expected = PUBLISHED_MTT[Path(result["path"]).name]
        assert [t["tag"] for t in result["top_tags"]["musicnn_mtt"][: len(expected)]] == expected


def test_tag_runs_both_networks_by_default_and_gives_every_clip_a_mood(example_clips):
    done = _tag("--json", *map(str, example_clips))
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        result = json.loads(line)
        assert set(result["tags"]) == {"musicnn_msd", "musicnn_mtt"} == set(result["embeddings"])
        assert [n["name"] for n in result["model"]["networks"]] == ["musicnn_msd", "musicnn_mtt"]
        assert (
            result["leading_mood"]["mood"] in result["moods"]
            and -1 <= result["valence"] <= 1
            and -1 <= result["arousal"] <= 1
        )
        assert result["quadrant"] in {"happy", "angry", "sad", "relaxed"}
        assert all({"leading_mood", "valence", "arousal", "quadrant"} <= set(seg) for seg in result["timeline"])


def test_tag_with_the_student_gives_the_same_fields_from_its_own_model(example_clips):
    done = _tag("--json", "--model", "musicnn_student", *map(str, example_clips))
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(example_clips)
    for result in results:
        assert result["model"]["name"] == "musicnn_student"
        assert [n["name"] for n in result["model"]["networks"]] == ["musicnn_msd", "musicnn_mtt"]
        assert set(result["tags"]) == {"musicnn_msd", "musicnn_mtt"} == set(result["embeddings"])
        assert result["leading_mood"]["mood"] in result["moods"] and result["timeline"]


def test_tag_reports_an_unreadable_file_and_still_tags_the_others(example_clips, tmp_path):
    spaced = tmp_path / "a file with spaces.mp3"
    shutil.copyfile(example_clips[1], spaced)
    garbage = tmp_path / "not audio.mp3"
    garbage.write_bytes(b"hello" * 100)
    done = _tag(str(garbage), str(spaced), str(tmp_path / "missing.ogg"))
    assert done.returncode == 1
    assert (
        "a file with spaces.mp3" in done.stdout and "ambient" in done.stdout and "musicnn_mtt:" in done.stdout
    )  # the default table: both networks
    assert "valence" in done.stdout
    errors = done.stderr.splitlines()
    assert any("not audio.mp3: undecodable:" in e for e in errors)
    assert any("missing.ogg: unreadable:" in e for e in errors)


def test_demo_without_its_clips_names_the_make_target(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo"],
        cwd=REPO,
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"no folder {tmp_path}/.cache/moodstream/clips" in done.stderr and "`make clips`" in done.stderr

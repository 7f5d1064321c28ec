"""`moodstream tag` as a user runs it: a subprocess on real music."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PUBLISHED_MTT = {
    "joram-moments_of_clarity-08-solipsism-59-88.mp3": ["techno", "electronic", "synth", "fast", "beat", "drums"],
    "TRWJAZW128F42760DD_test.mp3": ["guitar", "piano", "fast"],
}


def _tag(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "tag", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_tag_lists_musicnn_published_tags_first(example_clips):
    done = _tag("--model", "musicnn_mtt", "--json", *map(str, example_clips))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        result = json.loads(line)
        expected = PUBLISHED_MTT[Path(result["path"]).name]
        assert [t["tag"] for t in result["top_tags"]["musicnn_mtt"][: len(expected)]] == expected
        assert {"path", "duration_s", "patches", "model", "tags", "moods", "top_tags", "leading_mood", "valence", "arousal", "quadrant", "embeddings"} <= set(result)
        assert len(result["tags"]["musicnn_mtt"]) == 50
        assert result["model"]["name"] == "musicnn_mtt" and result["model"]["version"].startswith("1+cal.")


def test_tag_runs_both_networks_by_default_and_gives_every_clip_a_mood(example_clips):
    done = _tag("--json", *map(str, example_clips))
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        result = json.loads(line)
        assert set(result["tags"]) == {"musicnn_msd", "musicnn_mtt"} == set(result["embeddings"])
        assert [n["name"] for n in result["model"]["networks"]] == ["musicnn_msd", "musicnn_mtt"]
        assert result["leading_mood"]["mood"] in result["moods"] and -1 <= result["valence"] <= 1 and -1 <= result["arousal"] <= 1
        assert result["quadrant"] in {"happy", "angry", "sad", "relaxed"}
        assert all({"leading_mood", "valence", "arousal", "quadrant"} <= set(seg) for seg in result["timeline"])


def test_tag_reports_an_unreadable_file_and_still_tags_the_others(example_clips, tmp_path):
    spaced = tmp_path / "a file with spaces.mp3"
    shutil.copyfile(example_clips[1], spaced)
    garbage = tmp_path / "not audio.mp3"
    garbage.write_bytes(b"hello" * 100)
    done = _tag(str(garbage), str(spaced), str(tmp_path / "missing.ogg"))
    assert done.returncode == 1
    assert "a file with spaces.mp3" in done.stdout and "blues" in done.stdout and "musicnn_mtt:" in done.stdout  # the default table: both networks
    assert "valence" in done.stdout
    errors = done.stderr.splitlines()
    assert any("not audio.mp3: undecodable:" in e for e in errors)
    assert any("missing.ogg: unreadable:" in e for e in errors)

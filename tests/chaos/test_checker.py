"""The chaos run's checker against made-up histories: a clean one passes, and each broken promise
(a lost track, a premature commit, a catalog duplicate, differing outputs, a wrong dead letter,
an acknowledged announcement missing from the broker) is a violation of its kind. A checker
that cannot fail would let the chaos run pass whatever happened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .checker import check, render

GOOD, BAD = 6, 2  # tracks with an output; bad inputs (a dead letter each)


def _output(track: str, corr: str, *, mood: float = 0.5) -> dict[str, Any]:
    return {
        "schema_version": 3,
        "track_id": track,
        "correlation_id": corr,
        "model_name": "musicnn_student",
        "model_version": "1",
        "moods": {"happy": mood},
        "processed_at": "2026-01-01T00:00:00Z",
        "latency_ms": {"total": 12.0},
    }


def _dead(track: str, corr: str, reason: str) -> dict[str, Any]:
    return {
        "track_id": track,
        "reason": reason,
        "message": f"{reason}: test",
        "original": {"track_id": track, "correlation_id": corr},
    }


def history() -> dict[str, Any]:
    """A clean run on one partition: every input has its result, written before each commit's
    fence; the catalog holds every good track once."""
    plan, announced, inputs, outputs, dead, records, latest, fences = [], [], [], [], [], [], [], []
    for i in range(GOOD + BAD):
        track, corr = f"t{i}", f"c{i}"
        expected, kind = ("output", "clip") if i < GOOD else ("undecodable", "garbage")
        plan.append({"corr": corr, "track": track, "expected": expected, "kind": kind})
        announced.append({"i": i, "track": track, "corr": corr, "p": 0, "o": i, "t": 100.0 + i})
        value = {"schema_version": 1, "track_id": track, "audio_uri": "s3://b/k", "correlation_id": corr}
        inputs.append({"p": 0, "o": i, "value": json.dumps(value)})
        if expected == "output":
            doc = _output(track, corr)
            outputs.append({"p": 0, "o": len(outputs), "value": json.dumps(doc)})
            records.append([len(records) + 1, track, "musicnn_student", "1", json.dumps(doc)])
            latest.append([track, len(records)])
        else:
            dead.append({"p": 0, "o": len(dead), "value": json.dumps(_dead(track, corr, expected))})
    # One sample after everything: all inputs committed, the fences above every result.
    fences.append(
        {
            "n": 1,
            "t": 200.0,
            "committed": {"0": GOOD + BAD},
            "fences": {"tracks.moods/0": len(outputs), "tracks.moods.dlq/0": len(dead)},
        }
    )
    return {
        "plan": plan,
        "announced": announced,
        "input": inputs,
        "output": outputs,
        "dlq": dead,
        "catalog": {"records": records, "latest": latest},
        "fences": fences,
    }


def write(out: Path, h: dict[str, Any]) -> Path:
    final = out / "final"
    final.mkdir(parents=True)

    def jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl(final / "plan.jsonl", h["plan"])
    for name in ("input", "output", "dlq"):
        jsonl(final / f"{name}.jsonl", h[name])
    (final / "catalog.json").write_text(json.dumps(h["catalog"]))
    meta = {"date": "today", "seed": 0, "command": "test", "catalog": "sqlite", "wall_s": 1.0, "drained": True}
    (final / "meta.json").write_text(json.dumps({**meta, "peaks": {"worker": 100.0}, "notes": []}))
    jsonl(out / "announced.jsonl", h["announced"])
    jsonl(out / "fences.jsonl", h["fences"])
    seen = [
        {"topic": "moods", "p": 0, "o": r["o"], "t": 150.0, "id": json.loads(r["value"])["correlation_id"]}
        for r in h["output"]
    ]
    jsonl(out / "seen.jsonl", seen)
    jsonl(out / "faults.jsonl", [])
    jsonl(out / "catalog.jsonl", [{"t": 150.0, "count": len(h["catalog"]["latest"])}])
    return out


def test_a_clean_history_has_no_violation(tmp_path):
    report = check(write(tmp_path, history()))
    assert report["violations"] == [], report["violations"]
    assert report["lost"] == 0 and report["premature_commits"] == 0 and report["catalog_duplicates"] == 0
    assert report["inputs_checked_against_commits"] == GOOD + BAD
    assert "**lost** | **0**" in render(report)


def _lose_an_output(h: dict[str, Any]) -> None:
    h["output"].pop(2)
    h["catalog"]["records"].pop(2)
    h["catalog"]["latest"].pop(2)


def _commit_before_the_output(h: dict[str, Any]) -> None:
    # Input 3 committed at a sample whose fence sits below its output: the commit came first.
    h["fences"].insert(0, {"n": 0, "t": 120.0, "committed": {"0": 4}, "fences": {"tracks.moods/0": 3}})


def _catalog_twice(h: dict[str, Any]) -> None:
    records = h["catalog"]["records"]
    records.append([len(records) + 1, *records[1][1:]])


def _outputs_differ(h: dict[str, Any]) -> None:
    h["output"].append({"p": 0, "o": len(h["output"]), "value": json.dumps(_output("t1", "c1", mood=0.9))})


def _bad_input_with_an_output(h: dict[str, Any]) -> None:
    h["output"].append({"p": 0, "o": len(h["output"]), "value": json.dumps(_output("t7", "c7"))})


def _wrong_reason(h: dict[str, Any]) -> None:
    h["dlq"][0]["value"] = json.dumps(_dead("t6", "c6", "not_found"))


def _good_track_dead_lettered(h: dict[str, Any]) -> None:
    h["dlq"].append({"p": 0, "o": len(h["dlq"]), "value": json.dumps(_dead("t0", "c0", "undecodable"))})


def _acked_but_gone(h: dict[str, Any]) -> None:
    h["input"].pop(5)


@pytest.mark.parametrize(
    ("breakage", "kind"),
    [
        (_lose_an_output, "lost"),
        (_commit_before_the_output, "premature"),
        (_catalog_twice, "catalog"),
        (_outputs_differ, "differ"),
        (_bad_input_with_an_output, "wrong"),
        (_wrong_reason, "wrong"),
        (_good_track_dead_lettered, "wrong"),
        (_acked_but_gone, "acked"),
    ],
)
def test_each_broken_promise_is_a_violation(tmp_path, breakage, kind):
    h = history()
    breakage(h)
    report = check(write(tmp_path, h))
    assert kind in report["violations_by_kind"], report["violations"]
    assert report["first_violation_history"]["violation"]["kind"] in report["violations_by_kind"]

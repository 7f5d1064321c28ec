"""The short chaos run: 300 tracks of real music through three workers, the catalog service on
SQLite, and 30 faults over 90 s, every kind among them at least once (``make chaos``
runs 10,000 and 1,000), with every kind of bad input.

The checker (:mod:`tests.chaos.checker`) must find nothing: every announcement has its output
or the dead letter its bad input must get, copies of an output agree, the catalog holds each
track once, and no committed offset passed a result not yet written. Then the same history,
doctored (a track's outputs dropped, a catalog row doubled), must fail it: a checker that passes
whatever happened proves nothing (tests/chaos/test_checker.py tries each promise alone).
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from .checker import check, render
from .clips import BAD_KINDS
from .run import Config, Run

pytestmark = [pytest.mark.faults, pytest.mark.chaos_run]


def test_a_short_chaos_run_loses_nothing(tmp_path, capsys):
    from .__main__ import save

    config = Config(
        out=tmp_path / "run",
        tracks=300,
        faults=30,
        minutes=1.5,
        seed=7,
        music="suite",
        sample_s=2.0,
        bad_share=0.02,  # one of each bad kind
        drain_timeout_s=180.0,  # a stuck run ends as lost tracks with their history, not a timeout
    )
    run = Run(config)
    try:
        result = asyncio.run(run.run())
    finally:
        run.close()
    save(config, result, "pytest tests/chaos/test_chaos.py")
    report = check(config.out)
    with capsys.disabled():
        print("\n" + render(report))
    history = json.dumps(report.get("first_violation_history"), indent=1, default=str)[:8000]
    assert not report["violations"], f"{report['violations_by_kind']}\n{report['violations'][:5]}\n{history}"
    assert report["tracks"] == 300 and report["lost"] == 0
    assert report["catalog_duplicates"] == 0 and report["premature_commits"] == 0
    assert report["faults"] >= 30 and report["fence_samples"] > 0
    assert set(report["faults_by_kind"]) == {k.name for k in run.scheduler.kinds}, report["faults_by_kind"]
    assert set(report["bad_inputs"]) == set(BAD_KINDS), report["bad_inputs"]
    assert report["drained"]

    # The same history with a track lost and a catalog row doubled: the checker must say so.
    doctored = tmp_path / "doctored"
    shutil.copytree(config.out, doctored, ignore=shutil.ignore_patterns("stack", "faust"))
    outputs = [json.loads(line) for line in (doctored / "final" / "output.jsonl").read_text().splitlines()]

    def track(row: dict) -> str | None:
        return None if row.get("fence") else json.loads(row["value"])["track_id"]

    lost = next(t for row in outputs if (t := track(row)))
    kept = [json.dumps(row) for row in outputs if track(row) != lost]
    assert len(kept) < len(outputs)
    (doctored / "final" / "output.jsonl").write_text("\n".join(kept) + "\n")
    catalog = json.loads((doctored / "final" / "catalog.json").read_text())
    catalog["records"].append([10**9, *catalog["records"][-1][1:]])
    (doctored / "final" / "catalog.json").write_text(json.dumps(catalog))
    broken = check(doctored)
    assert {"lost", "catalog"} <= set(broken["violations_by_kind"]), broken["violations_by_kind"]
    assert broken["lost"] == 1 and broken["catalog_duplicates"] == 1
    assert broken["first_violation_history"]["violation"]["track"] == lost

"""The chaos run's checker: the whole history against moodstream's promises.

It reads what the run recorded (see :mod:`tests.chaos.history`) and what it read back at the
end: every record of the input, output and dead-letter topics, and the catalog's tables. It
checks

    acked        every announcement the broker acknowledged is on the input topic (the durable
                 broker lost nothing across its restarts)
    lost         every announcement has an output or a dead letter
    wrong        a good track has an output and no dead letter; a bad one the dead letter its
                 kind must get (reason; a decoder crash says the decoding process died) and no output
    differ       the outputs of one track are equal apart from the run fields
    catalog      the catalog holds each track with an output once, with a record equal to its
                 outputs, and nothing else
    premature    no committed input offset passed an announcement whose result was not yet
                 written (the fences, checked at the first sample that covers each input)
    metrics      no worker counted more outputs than the output topic holds

and prints the counts, the duplicates' rate, the recovery after each fault kind (p50/p99),
the peak memory per process; the first violation's track with its full history. ``check``
returns the report (``violations`` empty when the promises held).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .history import FENCE_KEY, read_jsonl

RUN_FIELDS = frozenset({"processed_at", "latency_ms", "correlation_id", "ingested_at"})
_CORRELATION = re.compile(rb'"correlation_id":\s*"([^"]+)"')


def _content(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in RUN_FIELDS}


def _corr_of_input(value: bytes | None) -> str | None:
    m = _CORRELATION.search(value or b"")
    return m.group(1).decode() if m else None


def _corr_of_dead(doc: dict[str, Any]) -> str | None:
    original = doc.get("original")
    if isinstance(original, dict):
        return original.get("correlation_id")
    if isinstance(original, str):
        m = _CORRELATION.search(original.encode())
        return m.group(1).decode() if m else None
    return None


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def check(out: Path) -> dict[str, Any]:
    final = out / "final"
    announced = read_jsonl(out / "announced.jsonl")
    plan = read_jsonl(final / "plan.jsonl")
    inputs = read_jsonl(final / "input.jsonl")
    outputs = read_jsonl(final / "output.jsonl")
    dead = read_jsonl(final / "dlq.jsonl")
    catalog = json.loads((final / "catalog.json").read_text())
    fences = read_jsonl(out / "fences.jsonl")
    faults = read_jsonl(out / "faults.jsonl")
    seen = read_jsonl(out / "seen.jsonl")
    cat_samples = read_jsonl(out / "catalog.jsonl")
    meta = json.loads((final / "meta.json").read_text())

    violations: list[dict[str, Any]] = []

    def violate(kind: str, corr: str | None, track: str | None, why: str) -> None:
        violations.append({"kind": kind, "corr": corr, "track": track, "why": why})

    by_corr = {p["corr"]: p for p in plan}
    track_of = {p["corr"]: p["track"] for p in plan}

    # --- the input topic holds every acknowledged announcement -------------------------------
    input_at = {(r["p"], r["o"]): r for r in inputs}
    for a in announced:
        r = input_at.get((a["p"], a["o"]))
        if r is None or _corr_of_input(r["value"].encode()) != a["corr"]:
            violate("acked", a["corr"], a["track"], f"acknowledged at {a['p']}/{a['o']} but not on the topic there")

    # --- results -------------------------------------------------------------------------------
    outs: dict[str, list[dict[str, Any]]] = defaultdict(list)  # corr -> outputs (with p, o)
    outs_by_track: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in outputs:
        if r.get("fence"):
            continue
        doc = json.loads(r["value"])
        doc["_at"] = (r["p"], r["o"])
        outs[doc.get("correlation_id")].append(doc)
        outs_by_track[doc["track_id"]].append(doc)
    deads: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for r in dead:
        if r.get("fence"):
            continue
        doc = json.loads(r["value"])
        doc["_at"] = (r["p"], r["o"])
        deads[_corr_of_dead(doc)].append(doc)

    lost = [c for c in by_corr if not outs.get(c) and not deads.get(c)]
    for c in lost:
        violate("lost", c, track_of[c], "no output and no dead letter")
    for c, p in by_corr.items():
        o, d = outs.get(c, []), deads.get(c, [])
        if p["expected"] == "output":
            if d:
                violate(
                    "wrong", c, p["track"], f"a good track dead-lettered: {[x['reason'] for x in d]}: {d[0]['message']}"
                )
        else:
            if o:
                violate("wrong", c, p["track"], f"a bad input ({p['kind']}) got an output")
            reasons = {x["reason"] for x in d}
            if d and reasons != {p["expected"]}:
                violate("wrong", c, p["track"], f"{p['kind']}: reasons {sorted(reasons)}, expected {p['expected']}")
            if d and p["kind"] == "segv" and not all("process died" in x["message"] for x in d):
                violate("wrong", c, p["track"], f"a decoder crash dead-lettered as: {d[0]['message']}")
    unknown_dead = [d for k, ds in deads.items() if k not in by_corr for d in ds]
    for d in unknown_dead:
        violate("wrong", None, d.get("track_id"), f"a dead letter for no announcement: {d.get('reason')}")

    # --- copies of one track's output -------------------------------------------------------------
    duplicates = 0
    for track, copies in outs_by_track.items():
        duplicates += len(copies) - 1
        first = _content({k: v for k, v in copies[0].items() if k != "_at"})
        for other in copies[1:]:
            if _content({k: v for k, v in other.items() if k != "_at"}) != first:
                diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k) and k != "_at")
                violate("differ", other.get("correlation_id"), track, f"outputs differ in {diff}")
                break

    # --- the catalog ------------------------------------------------------------------------------
    rows = catalog["records"]
    per_track = Counter(r[1] for r in rows)
    catalog_dups = sum(n - 1 for n in per_track.values() if n > 1)
    for track, n in per_track.items():
        if n > 1:
            violate("catalog", None, track, f"{n} rows in the catalog's records")
    latest = Counter(r[0] for r in catalog["latest"])
    for track, n in latest.items():
        if n > 1:
            violate("catalog", None, track, f"{n} rows in track_latest")
    with_output = set(outs_by_track)
    in_catalog = set(per_track)
    for track in sorted(with_output - in_catalog):
        violate("catalog", None, track, "has an output but is not in the catalog")
    for track in sorted(in_catalog - with_output):
        violate("catalog", None, track, "in the catalog without an output")
    for _seq, track, _name, _version, text in rows:
        copies = outs_by_track.get(track)
        if copies and _content(json.loads(text)) != _content({k: v for k, v in copies[-1].items() if k != "_at"}):
            violate("catalog", None, track, "the catalog's record differs from the outputs")
    latest_seq = {t: s for t, s in catalog["latest"]}
    for seq, track, *_ in rows:
        if track in latest_seq and latest_seq[track] != seq and per_track[track] == 1:
            violate("catalog", None, track, "track_latest points at another row")

    # --- commits never ahead of results (fences) ------------------------------------------------
    first_result: dict[str, dict[str, int]] = defaultdict(dict)  # corr -> "topic/partition" -> min offset
    for topic, table in (("tracks.moods", outs), ("tracks.moods.dlq", deads)):
        for corr, docs in table.items():
            for d in docs:
                where = f"{topic}/{d['_at'][0]}"
                first_result[corr][where] = min(first_result[corr].get(where, d["_at"][1]), d["_at"][1])
    checked = premature = 0
    covered: dict[int, int] = defaultdict(int)  # input partition -> offsets already checked below
    inputs_by_p: dict[int, list[tuple[int, str | None]]] = defaultdict(list)
    for r in inputs:
        inputs_by_p[r["p"]].append((r["o"], _corr_of_input(r["value"].encode())))
    for lst in inputs_by_p.values():
        lst.sort()
    for sample in sorted(fences, key=lambda s: s["n"]):
        for p_str, committed in sample["committed"].items():
            p = int(p_str)
            for offset, corr in inputs_by_p.get(p, []):
                if offset < covered[p]:
                    continue
                if offset >= committed:
                    break
                checked += 1
                ok = any(
                    off < sample["fences"].get(where, -1) for where, off in first_result.get(corr or "", {}).items()
                )
                if not ok:
                    premature += 1
                    violate(
                        "premature",
                        corr,
                        track_of.get(corr or ""),
                        f"input {p}/{offset} committed (offset {committed}, fence sample {sample['n']} at "
                        f"{sample['t']:.1f}) before its result was written",
                    )
            covered[p] = max(covered[p], committed)

    # --- the workers' own counts ----------------------------------------------------------------
    counted = 0.0
    for prom in sorted((out / "metrics").glob("worker-*.prom")):
        for line in prom.read_text().splitlines():
            if line.startswith("moodstream_outputs_total"):
                counted += float(line.split()[-1])
    if counted > len([r for r in outputs if not r.get("fence")]):
        violate("metrics", None, None, f"workers counted {counted:.0f} outputs, the topic holds {len(outputs)}")

    # --- recovery per fault kind ---------------------------------------------------------------
    recovery = recovery_times(faults, seen, announced, cat_samples, set(outs_by_track))

    fault_counts = Counter(f["kind"] for f in faults)
    fault_errors = Counter(f["kind"] for f in faults if f.get("error"))
    good = sum(1 for p in plan if p["expected"] == "output")
    report = {
        "date": meta["date"],
        "seed": meta["seed"],
        "command": meta["command"],
        "catalog": meta["catalog"],
        "wall_s": round(meta["wall_s"]),
        "drained": meta["drained"],
        "tracks": len(plan),
        "good_tracks": good,
        "bad_inputs": dict(Counter(p["kind"] for p in plan if p["expected"] != "output")),
        "acked_announcements": len(announced),
        "input_records": len(inputs),
        "outputs": sum(len(v) for v in outs.values()),
        "tracks_with_output": len(outs_by_track),
        "dead_letters": dict(Counter(d["reason"] for ds in deads.values() for d in ds)),
        "lost": len(lost),
        "duplicates": duplicates,
        "duplicate_rate": round(duplicates / max(1, len(outs_by_track)), 4),
        "catalog_rows": len(rows),
        "catalog_duplicates": catalog_dups,
        "fence_samples": len(fences),
        "inputs_checked_against_commits": checked,
        "premature_commits": premature,
        "faults": sum(fault_counts.values()),
        "faults_by_kind": dict(sorted(fault_counts.items())),
        "faults_failed_to_inject": dict(fault_errors),
        "recovery_s": recovery,
        "peak_rss_mb": meta["peaks"],
        "notes": meta.get("notes", []),
        "violations_by_kind": dict(Counter(v["kind"] for v in violations)),
        "violations": violations[:200],
    }
    if violations:
        first = violations[0]
        report["first_violation_history"] = history_of(
            out, first, plan, announced, inputs, outs, deads, rows, fences, faults, seen
        )
    return report


def recovery_times(
    faults: list[dict[str, Any]],
    seen: list[dict[str, Any]],
    announced: list[dict[str, Any]],
    cat_samples: list[dict[str, Any]],
    output_tracks: set[str],
) -> dict[str, dict[str, Any]]:
    """Per fault kind: seconds from the fault (its injection for a kill, a restart or a clock
    jump; its end for a lasting one) until results flow again on every input partition that had
    work waiting then (the catalog's row count grows again, for catalog faults): p50, p99, n."""
    partition_of = {a["corr"]: a["p"] for a in announced}
    acked_at = {a["corr"]: a["t"] for a in announced}
    first_seen: dict[str, float] = {}
    results_by_p: dict[int, list[float]] = defaultdict(list)
    for s in seen:
        if s["id"] in partition_of and s["id"] not in first_seen:
            first_seen[s["id"]] = s["t"]
        if s["id"] in partition_of:
            results_by_p[partition_of[s["id"]]].append(s["t"])
    for times in results_by_p.values():
        times.sort()
    waiting_by_p: dict[int, list[tuple[float, float]]] = defaultdict(list)  # (acked, first result)
    for corr, p in partition_of.items():
        waiting_by_p[p].append((acked_at[corr], first_seen.get(corr, float("inf"))))
    cat = sorted((s["t"], s["count"]) for s in cat_samples)

    per_kind: dict[str, list[float]] = defaultdict(list)
    for f in faults:
        if f.get("error"):
            continue
        t = f["end"] if f["lasting"] else f["start"]
        if f["affects"] == "catalog":
            before = [c for at, c in cat if at <= t]
            base = before[-1] if before else 0
            if base >= len(output_tracks):
                continue
            grown = next((at for at, c in cat if at > t and c > base), None)
            if grown is not None:
                per_kind[f["kind"]].append(grown - t)
            continue
        waits = []
        for p, pending in waiting_by_p.items():
            if not any(a <= t < r for a, r in pending):
                continue  # nothing waiting on this partition then
            times = results_by_p.get(p, [])
            i = np.searchsorted(times, t, side="right")
            if i < len(times):
                waits.append(times[i] - t)
        if waits:
            per_kind[f["kind"]].append(max(waits))
    return {
        kind: {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99), "max": round(max(v), 1)}
        for kind, v in sorted(per_kind.items())
    }


def history_of(
    out: Path,
    violation: dict[str, Any],
    plan: list[dict[str, Any]],
    announced: list[dict[str, Any]],
    inputs: list[dict[str, Any]],
    outs: dict[str, list[dict[str, Any]]],
    deads: dict[str | None, list[dict[str, Any]]],
    rows: list[list[Any]],
    fences: list[dict[str, Any]],
    faults: list[dict[str, Any]],
    seen: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything the run knows about the violating track."""
    corr, track = violation.get("corr"), violation.get("track")
    if corr is None and track is not None:
        corr = next((p["corr"] for p in plan if p["track"] == track), None)
    if track is None and corr is not None:
        track = next((p["track"] for p in plan if p["corr"] == corr), None)
    acks = [a for a in announced if a["corr"] == corr]
    seen_times = [s for s in seen if s["id"] == corr or (track and s.get("track") == track)]
    span = (min((a["t"] for a in acks), default=0), max((s["t"] for s in seen_times), default=float("inf")))
    logs = []
    if track:
        for log in sorted((out / "logs").glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if track in line:
                    logs.append(f"{log.name}: {line[:400]}")
    return {
        "violation": violation,
        "planned": next((p for p in plan if p["corr"] == corr), None),
        "acknowledged": acks,
        "input_records": [(r["p"], r["o"]) for r in inputs if _corr_of_input(r["value"].encode()) == corr],
        "outputs": [
            {"at": d["_at"], "processed_at": d.get("processed_at"), "latency_ms": d.get("latency_ms")}
            for d in outs.get(corr or "", [])
        ],
        "dead_letters": [{"at": d["_at"], "reason": d["reason"], "message": d["message"]} for d in deads.get(corr, [])],
        "seen": seen_times,
        "catalog_rows": [r[:4] for r in rows if r[1] == track],
        "fence_samples_then": [f for f in fences if span[0] <= f["t"] <= span[1] + 10][:20],
        "faults_then": [f for f in faults if f["start"] <= span[1] and (f["end"] or f["start"]) >= span[0] - 30],
        "log_lines": logs[:100],
    }


def render(report: dict[str, Any]) -> str:
    """The report as Markdown, for docs/chaos.md."""
    lines = [
        f"**{report['date']}**, seed {report['seed']}, catalog on {report['catalog']}: `{report['command']}`",
        "",
        "| | |",
        "|---|---|",
        f"| tracks announced | {report['tracks']} ({report['good_tracks']} clips, bad inputs {report['bad_inputs']}) |",
        f"| acknowledged announcements / input records | {report['acked_announcements']} / {report['input_records']} |",
        f"| outputs | {report['outputs']} for {report['tracks_with_output']} tracks |",
        f"| dead letters | {report['dead_letters']} |",
        f"| **lost** | **{report['lost']}** |",
        f"| duplicates | {report['duplicates']} (rate {report['duplicate_rate']:.2%}) |",
        f"| catalog rows / **duplicates** | {report['catalog_rows']} / **{report['catalog_duplicates']}** |",
        f"| **premature commits** | **{report['premature_commits']}** ({report['inputs_checked_against_commits']} inputs checked against {report['fence_samples']} committed-offset samples) |",
        f"| faults | {report['faults']} |",
        f"| wall time | {report['wall_s'] / 60:.1f} min (drained: {report['drained']}) |",
        f"| violations | {report['violations_by_kind'] or 'none'} |",
        "",
        "| fault kind | injected | recovery p50 (s) | p99 (s) | max (s) | measured |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, n in report["faults_by_kind"].items():
        r = report["recovery_s"].get(kind, {})
        lines.append(
            f"| {kind} | {n} | {r.get('p50', '-')} | {r.get('p99', '-')} | {r.get('max', '-')} | {r.get('n', 0)} |"
        )
    lines += ["", "| process | peak RSS (MB) |", "|---|---:|"]
    for role, mb in sorted(report["peak_rss_mb"].items()):
        lines.append(f"| {role} | {mb:.0f} |")
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def fence_record(value: bytes | None, key: bytes | None) -> bool:
    return key == FENCE_KEY

"""The soak's verdict: per long-lived process, its resident memory, file descriptors and threads
over the run, and whether they grow.

A process's figures are compared between the first and the last quarter of its life, after a
warm-up (the first tenth: caches fill, pools start); "grows" means the last quarter's median is
above the first's by more than the allowance (memory 10 % and 20 MB, descriptors and threads 5),
and the least-squares slope over the whole post-warm-up span is positive too.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .history import read_jsonl

MIN_SPAN_S = 600.0  # a process must have lived this long to be judged


def soak_report(out: Path) -> dict[str, Any]:
    series: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in read_jsonl(out / "procs.jsonl"):
        series[(row["name"], row["pid"])].append(row)
    report: dict[str, Any] = {}
    for (name, pid), rows in sorted(series.items()):
        rows.sort(key=lambda r: r["t"])
        span = rows[-1]["t"] - rows[0]["t"]
        if span < MIN_SPAN_S or len(rows) < 8:
            continue
        start = rows[0]["t"] + span / 10
        kept = [r for r in rows if r["t"] >= start]
        quarter = max(1, len(kept) // 4)
        entry: dict[str, Any] = {"pid": pid, "hours": round(span / 3600, 2)}
        grows = []
        for metric, allowance in (("rss_mb", None), ("fds", 5), ("threads", 5)):
            values = np.array([r[metric] for r in kept], float)
            times = np.array([r["t"] for r in kept], float)
            first, last = float(np.median(values[:quarter])), float(np.median(values[-quarter:]))
            slope_h = float(np.polyfit((times - times[0]) / 3600, values, 1)[0]) if len(values) > 2 else 0.0
            limit = max(first * 0.10, 20.0) if allowance is None else allowance
            grew = last - first > limit and slope_h > 0
            entry[metric] = {
                "first": round(first, 1),
                "last": round(last, 1),
                "max": round(float(values.max()), 1),
                "slope_per_h": round(slope_h, 2),
            }
            if grew:
                grows.append(metric)
        entry["grows"] = grows
        report[name] = entry
    return report


def render_soak(report: dict[str, Any]) -> str:
    lines = [
        "| process | hours | RSS MB first → last (max) | fds first → last (max) | threads first → last (max) | grows |",
        "|---|---:|---|---|---|---|",
    ]
    for name, e in report.items():
        cells = [f"{e[m]['first']:.0f} → {e[m]['last']:.0f} ({e[m]['max']:.0f})" for m in ("rss_mb", "fds", "threads")]
        lines.append(f"| {name} | {e['hours']} | {' | '.join(cells)} | {', '.join(e['grows']) or 'no'} |")
    return "\n".join(lines) + "\n"

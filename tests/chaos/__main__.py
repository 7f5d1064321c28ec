"""``make chaos`` / ``python -m tests.chaos``: thousands of tracks under overlapping faults, then
the checker over the whole history; ``--soak-hours`` for a steady run without faults.

Exit status: 0 when every promise held, 1 on any violation (the report names the first
violating track with its full history) or, in a soak, when a process's memory, descriptors or
threads grow, 2 when the run itself could not be made.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .checker import check, render
from .history import FENCE_KEY
from .run import Config, Run
from .soak import render_soak, soak_report


def parse(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--tracks", type=int, default=10_000)
    p.add_argument("--faults", type=int, default=1_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--catalog", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--static-workers", type=int, default=2, help="how many of them use static membership")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--minutes", type=float, default=45.0, help="the span the faults are spread over")
    p.add_argument("--clip-s", type=float, default=6.0)
    p.add_argument("--distinct-clips", type=int, default=1500)
    p.add_argument("--soak-hours", type=float, default=0.0, help="no faults: a steady rate for this long")
    p.add_argument("--soak-rate", type=float, default=1.0, help="tracks a second in a soak")
    p.add_argument("--out", type=Path, help="the run's folder (default .moodstream/chaos-<time>)")
    a = p.parse_args(argv)
    out = a.out or Path(".moodstream") / f"{'soak' if a.soak_hours else 'chaos'}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracks = a.tracks
    if a.soak_hours and a.tracks == 10_000:
        tracks = int(a.soak_hours * 3600 * a.soak_rate)
    return Config(
        out=out.resolve(),
        tracks=tracks,
        faults=0 if a.soak_hours else a.faults,
        seed=a.seed,
        catalog=a.catalog,
        workers=a.workers,
        static_workers=a.static_workers,
        partitions=a.partitions,
        minutes=a.minutes,
        clip_s=a.clip_s,
        distinct_clips=a.distinct_clips,
        soak_hours=a.soak_hours,
        soak_rate=a.soak_rate,
    )


def save(config: Config, result: dict, command: str) -> None:
    final = config.out / "final"
    final.mkdir(exist_ok=True)
    with open(final / "plan.jsonl", "w") as f:
        for a in result["announcements"]:
            f.write(
                json.dumps({"corr": a.correlation_id, "track": a.track_id, "expected": a.expected, "kind": a.kind})
                + "\n"
            )
    for name, records in result["topics"].items():
        with open(final / f"{name}.jsonl", "w") as f:
            for r in records:
                row = {"p": r["p"], "o": r["o"], "value": (r["value"] or b"").decode(errors="replace")}
                if r["key"] == FENCE_KEY:
                    row["fence"] = True
                f.write(json.dumps(row) + "\n")
    (final / "catalog.json").write_text(json.dumps(result["catalog_rows"]))
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seed": config.seed,
        "command": command,
        "catalog": config.catalog,
        "wall_s": result["wall_s"],
        "drained": result["drained"],
        "peaks": result["peaks"],
        "notes": result["notes"],
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items() if k != "kinds"},
    }
    (final / "meta.json").write_text(json.dumps(meta, indent=1))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The run's own clients meet every broker fault too; their errors are expected and retried.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    config = parse(argv)
    command = "python -m tests.chaos " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"# chaos run in {config.out}", flush=True)
    run = Run(config)
    try:
        result = asyncio.run(run.run())
    except KeyboardInterrupt:
        return 130
    except Exception:
        logging.exception("the chaos run could not be made; its folder: %s", config.out)
        return 2
    finally:
        run.close()
    save(config, result, command)
    report = check(config.out)
    text = render(report)
    if config.soak_hours:
        report["soak"] = soak_report(config.out)
        text += "\n" + render_soak(report["soak"])
    (config.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (config.out / "report.md").write_text(text)
    print(text)
    if report["violations"]:
        print("FIRST VIOLATION, with the track's history:")
        print(json.dumps(report["first_violation_history"], indent=1, default=str)[:20000])
        return 1
    grown = {name: e["grows"] for name, e in report.get("soak", {}).items() if e["grows"]}
    if grown:
        print(f"GROWS over the soak: {grown}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``moodstream`` command line: tag files locally, run the worker, run the demo, backfill.

    moodstream tag PATH... [--model musicnn_msd|musicnn_mtt] [--json]
    moodstream settings
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import ConfigError, TrackError


def _tag(args: argparse.Namespace) -> int:
    from pipeline.scoring import OnnxScorer
    from pipeline.settings import load_settings
    from pipeline.tagging import analyse, describe
    from pipeline.taxonomy import load_taxonomy

    settings = load_settings()
    model = args.model or settings.model
    scorer = OnnxScorer(settings.model_repository, model, threads=settings.onnx_threads, max_batch=settings.max_patches_per_request)
    taxonomy = load_taxonomy(model, scorer.meta.labels, settings.moods_file)
    failures = 0
    for path in args.paths:
        try:
            data = Path(path).read_bytes()
            analysis = analyse(data, max_duration_s=settings.max_duration_s, min_duration_s=settings.min_duration_s)
        except (TrackError, OSError) as exc:
            reason = exc.reason if isinstance(exc, TrackError) else "unreadable"
            print(f"{path}: {reason}: {exc}", file=sys.stderr)
            failures += 1
            continue
        result = describe(analysis, scorer.score_sync(analysis.patches.patches), taxonomy, top_moods=settings.top_moods, segment_s=settings.timeline_segment_s)
        result = {"path": str(path), "model": {"name": model, "version": scorer.meta.version}, **result}
        if args.json:
            print(json.dumps(result, sort_keys=True), flush=True)
        else:
            print(_table(result, args.top), flush=True)
    if failures:
        print(f"{failures} of {len(args.paths)} files could not be tagged", file=sys.stderr)
    return 1 if failures else 0


def _table(result: dict, top: int) -> str:
    lines = [f"{result['path']}  ({result['duration_s']:.1f} s, {result['patches']} patches, {result['model']['name']} v{result['model']['version']}, {result['decoder']})"]
    width = max(len(t["tag"]) for t in result["top_tags"][:top])
    for t in result["top_tags"][:top]:
        lines.append(f"  {t['tag']:<{width}}  {t['score']:.3f}  {'#' * round(t['score'] * 40)}")
    moods = ", ".join(f"{m['mood']} {m['score']:.3f}" for m in result["top_moods"]) or "(none above threshold)"
    lines.append(f"  moods: {moods}")
    return "\n".join(lines)


def _settings(args: argparse.Namespace) -> int:
    from pipeline.settings import describe

    for env, kind, default, doc in describe():
        print(f"{env}\n    {kind}, default {default}\n    {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moodstream", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tag = sub.add_parser("tag", help="tag audio files locally (in-process onnxruntime, no services)")
    tag.add_argument("paths", nargs="+", metavar="PATH")
    tag.add_argument("--model", help="model in the model repository (default: MOODSTREAM_MODEL)")
    tag.add_argument("--json", action="store_true", help="one JSON object per file and line")
    tag.add_argument("--top", type=int, default=10, help="tags shown per file in the table")
    tag.set_defaults(func=_tag)

    settings = sub.add_parser("settings", help="list every setting with its variable, type, default and doc")
    settings.set_defaults(func=_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"moodstream: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``moodstream`` command line: tag files locally, run the worker, run the demo, backfill.

moodstream tag PATH... [--model musicnn|musicnn_student|musicnn_msd|musicnn_mtt] [--json]
moodstream worker [--loglevel info]
moodstream demo [AUDIO_DIR] [--json] [--scorer triton|onnx]
moodstream publish s3://bucket/prefix [--rate N] [--dry-run]
moodstream serve [--loglevel info]
moodstream api-key NAME SCOPE...
moodstream settings
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import ConfigError, TrackError


def _tag(args: argparse.Namespace) -> int:
    from pipeline.settings import load_settings
    from pipeline.stages.analysis import analyse_file, describe
    from pipeline.stages.scoring import OnnxScorer
    from pipeline.stages.taxonomy import load_taxonomy

    settings = load_settings()
    model = args.model or settings.model
    scorer = OnnxScorer(
        settings.model_repository, model, threads=settings.onnx_threads, max_batch=settings.onnx_batch_patches
    )
    taxonomy = load_taxonomy(scorer.meta, settings.moods_file)
    failures = 0
    for path in args.paths:
        try:
            analysis = analyse_file(
                path,
                max_duration_s=settings.max_duration_s,
                min_duration_s=settings.min_duration_s,
                excerpts=settings.excerpts,
                excerpt_s=settings.excerpt_s,
                audio_features_segment_s=settings.timeline_segment_s if settings.audio_features else None,
            )
        except (TrackError, OSError) as exc:
            reason = exc.reason if isinstance(exc, TrackError) else "unreadable"
            print(f"{path}: {reason}: {exc}", file=sys.stderr)
            failures += 1
            continue
        result = describe(
            analysis,
            scorer.score_sync(analysis.patches.patches),
            taxonomy,
            top_moods=settings.top_moods,
            segment_s=settings.timeline_segment_s,
            embeddings=settings.embeddings,
        )
        meta = scorer.meta
        result = {
            "path": str(path),
            "model": {
                "name": model,
                "version": meta.served_version,
                "networks": [{"name": n.name, "version": n.version} for n in meta.networks],
            },
            **result,
        }
        if args.json:
            print(json.dumps(result, sort_keys=True), flush=True)
        else:
            print(_table(result, args.top), flush=True)
    if failures:
        print(f"{failures} of {len(args.paths)} files could not be tagged", file=sys.stderr)
    return 1 if failures else 0


def _table(result: dict, top: int) -> str:
    from pipeline.stages.analysis import audio_line
    from pipeline.stages.taxonomy import mood_line

    lines = [
        f"{result['path']}  ({result['duration_s']:.1f} s, {result['patches']} patches, {result['model']['name']} v{result['model']['version']}, {result['decoder']})"
    ]
    for network, ranked in result["top_tags"].items():
        lines.append(f"  {network}:")
        width = max(len(t["tag"]) for t in ranked[:top])
        for t in ranked[:top]:
            lines.append(f"    {t['tag']:<{width}}  {t['score']:.3f}  {'#' * round(t['score'] * 40)}")
    lines.append("  " + mood_line(result))
    lines.append("  " + audio_line(result))
    return "\n".join(lines) + "\n"


def _worker(args: argparse.Namespace) -> int:
    from pipeline.worker.faust_app import app  # loads and validates the settings

    # No Faust web server: metrics have their own port (MOODSTREAM_METRICS_PORT), and a fixed
    # web port would stop a second worker on the same host from starting.
    sys.argv = ["moodstream", "worker", "--loglevel", args.loglevel, "--without-web"]
    app.main()
    return 0


def _demo(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from pipeline.settings import load_settings

    try:
        from devstack import demo
    except ImportError:
        # The embedded stack is dev-only: it ships with a clone, never with the package.
        print(
            "moodstream demo: the demo runs the embedded stack, which comes with a clone of the repository (`make demo` there)",
            file=sys.stderr,
        )
        return 2

    settings = load_settings()
    audio_dir = Path(args.audio_dir) if args.audio_dir else demo.DEFAULT_AUDIO_DIR
    if not audio_dir.is_dir():
        hint = demo.FETCH_HINT if not args.audio_dir else "pass a folder of audio files"
        print(f"moodstream demo: no folder {audio_dir}; {hint}", file=sys.stderr)
        return 2
    opts = demo.DemoOptions(
        audio_dir=audio_dir,
        as_json=args.json,
        scorer=args.scorer,
        model=args.model or settings.model,
        timeout_s=args.timeout,
        hold=sys.stdout.isatty() if args.hold is None else args.hold,
        port=args.port,
        log_dir=Path(args.log_dir or f".moodstream/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve(),
    )
    return asyncio.run(demo.run(opts))


def _publish(args: argparse.Namespace) -> int:
    import asyncio

    from pipeline.backfill import backfill
    from pipeline.errors import ServiceUnavailable
    from pipeline.settings import load_settings

    try:
        count = asyncio.run(backfill(load_settings(), args.prefix, rate_per_s=args.rate, dry_run=args.dry_run))
    except (TrackError, ServiceUnavailable) as exc:
        print(f"moodstream publish: {args.prefix}: {exc}", file=sys.stderr)
        return 1
    print(f"{count} tracks {'listed' if args.dry_run else 'announced'}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    from pipeline.service.app import serve
    from pipeline.settings import load_settings

    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(load_settings())


def _api_key(args: argparse.Namespace) -> int:
    from pipeline.service.auth import SCOPES, key_hash, new_api_key, parse_api_keys

    unknown = sorted(set(args.scopes) - set(SCOPES))
    if unknown:
        raise ConfigError(f"unknown scopes {unknown}; one or more of {', '.join(SCOPES)}")
    key = new_api_key()
    entry = f"{args.name}:{key_hash(key)}:{' '.join(args.scopes)}"
    parse_api_keys(entry, "the new entry")  # the name is checked as the service will
    print(f"key (give it to the client once; it is stored nowhere):\n  {key}", file=sys.stderr)
    print("entry (add it to MOODSTREAM_AUTH_API_KEYS or the keys file; remove it to revoke):", file=sys.stderr)
    print(entry)
    return 0


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

    worker = sub.add_parser(
        "worker", help="run the streaming worker (the Faust app pipeline.worker.faust_app, without its web server)"
    )
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=_worker)

    demo = sub.add_parser(
        "demo", help="run everything locally: broker, S3, Triton, a worker and the web page; tag a folder"
    )
    demo.add_argument(
        "audio_dir",
        nargs="?",
        help="folder of audio files (default: the clips `make clips` writes, ~/.cache/moodstream/clips)",
    )
    demo.add_argument("--json", action="store_true", help="stdout: exactly one JSON output record per line")
    demo.add_argument("--scorer", choices=["triton", "onnx"], default="triton")
    demo.add_argument("--model", help="model to serve (default: MOODSTREAM_MODEL)")
    demo.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for all results")
    demo.add_argument(
        "--log-dir", help="where service logs and the demo's catalog go (default: .moodstream/demo-<time>)"
    )
    demo.add_argument(
        "--hold",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after tagging, keep everything running for the web page until Ctrl-C (default: when stdout is a terminal)",
    )
    demo.add_argument(
        "--port",
        type=int,
        default=0,
        help="the web page's port (default: MOODSTREAM_SERVICE_PORT when free, else any free one)",
    )
    demo.set_defaults(func=_demo)

    publish = sub.add_parser("publish", help="announce every audio object under an S3 prefix (backfill)")
    publish.add_argument("prefix", metavar="s3://bucket/prefix")
    publish.add_argument("--rate", type=float, default=0.0, help="announcements per second (0: no cap)")
    publish.add_argument("--dry-run", action="store_true", help="list what would be announced")
    publish.set_defaults(func=_publish)

    serve = sub.add_parser(
        "serve",
        help="run the web page and HTTP API (uploads, the catalog ranked by mood, similar tracks) on MOODSTREAM_SERVICE_PORT",
    )
    serve.add_argument("--loglevel", default="info")
    serve.set_defaults(func=_serve)

    key = sub.add_parser(
        "api-key",
        help="make a new API key for the HTTP service: prints the key (stderr) and its hashed entry (stdout)",
    )
    key.add_argument("name", help="who holds it, e.g. recommender-2026-12 (letters, digits, . _ -)")
    key.add_argument("scopes", nargs="+", metavar="SCOPE", help="moods:read, moods:analyse, moods:admin")
    key.set_defaults(func=_api_key)

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

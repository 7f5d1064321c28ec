"""``moodstream-train``: train, evaluate, distill and export models; import the pretrained ones.

moodstream-train fit [--config FILE] [--set KEY=VALUE ...] [--resume CHECKPOINT]
moodstream-train evaluate CHECKPOINT [--out DIR] [--set KEY=VALUE ...]
moodstream-train distill [debian|FOLDER|s3://...] [--export] [--config FILE] [--set ...]
moodstream-train export [NETWORK=]CHECKPOINT... [--name NAME] [--repository triton_models] [--version 1]
moodstream-train import-musicnn --tf-python PATH --clips DIR
moodstream-train compare-musicnn DIR... --tf-python PATH
moodstream-train calibrate-moods [DIR...] [--model musicnn] [--write]
moodstream-train mood-report [DIR...] [--role check|reference] [--model musicnn] [--out report.json]
moodstream-train fetch-music [--dest DIR] [--role reference|distill|check|all] [--package NAME ...]
moodstream-train fetch-music --clips DIR [--dest DIR]
moodstream-train human-eval 4q [--data-root DIR] [--model musicnn ...] [--seeds 5]
moodstream-train heads 4q --data-root DIR [--model musicnn] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from training import REPO_ROOT


def _import_musicnn(args: argparse.Namespace) -> int:
    from training.import_musicnn import convert

    clips = sorted(Path(args.clips).glob("*.mp3"))
    if not clips:
        print(f"no .mp3 clips in {args.clips} for the parity fixture", file=sys.stderr)
        return 2
    for model, diff in convert(args.tf_python, clips).items():
        print(f"{model}: max |PyTorch - TensorFlow| = {diff:.2e} on {len(clips)} clips")
    return 0


def _compare_musicnn(args: argparse.Namespace) -> int:
    import json

    from training.import_musicnn import compare

    files = sorted(
        p
        for d in args.folders
        for p in Path(d).rglob("*")
        if p.suffix.lower() in {".mp3", ".ogg", ".opus", ".flac", ".wav"}
    )
    for row in compare(args.tf_python, files, Path(args.repository)):
        print(json.dumps(row))
    return 0


def _calibrate_moods(args: argparse.Namespace) -> int:
    import json

    from training.calibrate import calibrate

    result = calibrate(
        [Path(f) for f in args.folders],
        args.model,
        Path(args.repository),
        cache_dir=Path(args.cache_dir),
        write=args.write,
        max_duration_s=args.max_duration,
    )
    for entry, calibration in result.items():
        print(
            f"{entry}: {calibration['tracks']} reference tracks, {len(calibration['tags'])} tags, {len(calibration['families'])} families"
        )
    if not args.write:
        print(json.dumps(result, sort_keys=True))
    return 0


def _mood_report(args: argparse.Namespace) -> int:
    import json

    from training.mood_report import as_markdown, report

    result = report(
        [Path(f) for f in args.folders],
        args.model,
        Path(args.repository),
        cache_dir=Path(args.cache_dir),
        role=args.role,
        excerpts=args.excerpts,
        excerpt_s=args.excerpt_s,
        max_duration_s=args.max_duration,
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(as_markdown(result))
    return 0


def _fetch_music(args: argparse.Namespace) -> int:
    from training.data import debian_music

    dest = Path(args.dest).expanduser()
    try:
        if args.clips:
            for clip in debian_music.make_clips(Path(args.clips).expanduser(), dest):
                print(clip)
            return 0
        roles = debian_music.ROLES if args.role == "all" else (args.role,)
        folders = debian_music.fetch(dest, roles, tuple(args.package))
    except (debian_music.FetchError, ValueError) as exc:
        print(f"fetch-music: {exc}", file=sys.stderr)
        return 2
    chosen = debian_music.select(debian_music.load(), roles, tuple(args.package))
    for package, folder in zip(chosen, folders):
        m = debian_music.measure(debian_music.audio_files(dest, package.role, (package.name,)))
        print(f"{package.name:<22} {package.role:<9} {m.tracks:>3} tracks {m.minutes:>6.1f} min  {m.codec:<7} {folder}")
    return 0


def _config(args: argparse.Namespace):
    from training.config import from_dict, load_config, parse_overrides

    if getattr(args, "resume", None):
        import torch

        # A resumed run continues with the options it was started with; --set may change
        # the schedule (epochs, patience, ...) but not the model.
        overrides = parse_overrides(args.set)
        if args.config or "dims" in overrides or "arch" in overrides:
            raise ValueError("--resume continues a run with its own config and dims; use --set for other options")
        saved = torch.load(args.resume, map_location="cpu", weights_only=False)["config"]
        return from_dict({**saved, **overrides, "resume": args.resume})
    return load_config(args.config, args.set)


def _key_value(text: str) -> str:
    """argparse check of a --set item; :func:`training.config.parse_overrides` reads it."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def _fit(args: argparse.Namespace) -> int:
    from training.fit import fit

    best = fit(_config(args))
    if os.environ.get("RANK", "0") == "0":  # one line under torchrun, not one per process
        print(f"best checkpoint: {best}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from training.config import parse_overrides
    from training.evaluate import evaluate

    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.parent / "eval"
    report = evaluate(checkpoint, out, parse_overrides(args.set))
    metrics = {k: v for k, v in report["metrics"].items() if k not in ("per_tag", "thresholds")}
    print(json.dumps({"tracks": report["tracks"], "metrics": metrics}, indent=1))
    print(f"report: {out / 'report.json'}, figure: {out / 'report.png'}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    import json

    from training.distill import distill

    report = distill(
        _config(args),
        args.source,
        repository=Path(args.repository),
        export_to=Path(args.repository) if args.export else None,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "skipped"}, indent=1))
    return 0


def _agreement(args: argparse.Namespace) -> int:
    import json

    from training.distill import agreement

    cfg = _config(args)
    try:
        report = agreement(cfg, args.source, repository=Path(args.repository))
    except ValueError as exc:
        raise SystemExit(f"moodstream-train agreement: {exc}") from None
    out = Path(args.out) if args.out else Path(cfg.out_dir) / "agreement_report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "skipped"}, indent=1))
    print(f"written to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export import export

    named = [c.partition("=") if "=" in c else ("", "", c) for c in args.checkpoints]
    paths = [Path(path) for _, _, path in named]
    names = [n for n, _, _ in named] if all(n for n, _, _ in named) else None
    if any(n for n, _, _ in named) and names is None:
        raise SystemExit("moodstream-train export: name every checkpoint (NAME=PATH) or none")
    result = export(
        paths[0] if len(paths) == 1 else paths,
        args.name,
        Path(args.repository),
        version=args.version,
        network_names=names,
    )
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in result.max_rel_diff.items())
    print(f"{result.directory}: parity vs eager (max |Δ| / output scale): {diffs}")
    print(f"serve it with MOODSTREAM_MODEL={result.directory.name} (model repository {result.directory.parent})")
    return 0


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML or YAML file of training options (training/config.py)")
    p.add_argument(
        "--set",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one option (dims.NAME for a dimension); repeatable",
    )


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose description may be a function, called only when help is shown:
    fit's names the architectures, which costs importing torch (3 s), not worth on every call."""

    def format_help(self) -> str:
        if callable(self.description):
            self.description = self.description()
        return super().format_help()


def _fit_description() -> str:
    from training.config import DATASETS
    from training.models import ARCHITECTURES

    return (
        "Train a model on a labelled data set.\n\n"
        f"architectures (--set arch=NAME): {', '.join(ARCHITECTURES)}\n"
        f"data sets (--set data=NAME, --set data_root=DIR): {', '.join(DATASETS)}\n"
        "examples: training/configs/*.toml; every option: training/config.py"
    )


def _human_eval(args: argparse.Namespace) -> int:
    from training.heads.run import main_human_eval

    root = Path(args.data_root).expanduser() if args.data_root else None
    return main_human_eval(root, args.model or ["musicnn", "musicnn_student"], Path(args.repository), seeds=args.seeds)


def _heads(args: argparse.Namespace) -> int:
    from training.heads.run import main_heads

    return main_heads(Path(args.data_root).expanduser(), args.model, Path(args.repository), write=args.write)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moodstream-train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    imp = sub.add_parser("import-musicnn", help="convert musicnn's TensorFlow checkpoints (one-off)")
    imp.add_argument(
        "--tf-python", required=True, help="python of an environment with tensorflow-cpu, tf-keras and musicnn==0.1.0"
    )
    imp.add_argument(
        "--clips", required=True, help="folder of musicnn's example .mp3 clips (ISC licence) for the parity fixture"
    )
    imp.set_defaults(func=_import_musicnn)

    cmp = sub.add_parser(
        "compare-musicnn", help="agreement of moodstream's path with the original musicnn on real music"
    )
    cmp.add_argument("folders", nargs="+")
    cmp.add_argument(
        "--tf-python", required=True, help="python with tensorflow-cpu, tf-keras, librosa and musicnn==0.1.0"
    )
    cmp.add_argument("--repository", default=str(REPO_ROOT / "triton_models"))
    cmp.set_defaults(func=_compare_musicnn)

    cal = sub.add_parser(
        "calibrate-moods",
        help="calibrate the mood families of a model (and the entries of its networks) on reference music",
    )
    rep = sub.add_parser(
        "mood-report",
        help="how the calibrated mood view behaves on real music: clear share, network agreement, stability, spread",
    )
    for p in (cal, rep):
        p.add_argument("folders", nargs="*", help="audio folders (default: the Debian music `make music` fetched)")
        p.add_argument(
            "--model", default="musicnn", help="served model that scores the music (default: musicnn, both networks)"
        )
        p.add_argument("--repository", default=str(REPO_ROOT / "triton_models"))
        p.add_argument(
            "--cache-dir",
            default=str(Path.home() / ".cache" / "moodstream" / "track-outputs"),
            help="per-track outputs, so nothing is scored twice",
        )
        p.add_argument("--max-duration", type=float, default=600.0, help="seconds of each track analysed")
    cal.add_argument(
        "--write", action="store_true", help="store the calibrations in the entries' configs (else print them)"
    )
    cal.set_defaults(func=_calibrate_moods)
    rep.add_argument(
        "--role",
        choices=["reference", "check"],
        default="check",
        help="without folders: which fetched Debian music (default: the check set)",
    )
    rep.add_argument("--excerpts", type=int, default=5, help="analysis window compared with the whole track")
    rep.add_argument("--excerpt-s", type=float, default=15.0)
    rep.add_argument("--out", help="write the figures as JSON here")
    rep.set_defaults(func=_mood_report)

    fm = sub.add_parser(
        "fetch-music",
        help="fetch Debian's reference music (training/data/debian_music.toml) with apt-get",
        description="Fetch the Debian packages of training/data/debian_music.toml into DEST/<role>/<package>/ "
        "(apt-get download + dpkg -x; already fetched packages are skipped) and print what each holds. "
        "The check role (singularity-music, asc-music, hyperrogue-music) is reserved: never for calibration, training or tuning.",
    )
    fm.add_argument("--dest", default="~/.cache/moodstream/music", help="cache folder (default: %(default)s)")
    fm.add_argument(
        "--role",
        choices=["reference", "distill", "check", "all"],
        default="reference",
        help="default: %(default)s (distill: student training music only)",
    )
    fm.add_argument(
        "--package",
        action="append",
        default=[],
        metavar="NAME",
        help="only this package of the list (any role); repeatable",
    )
    fm.add_argument(
        "--clips",
        metavar="DIR",
        help="instead: write the list's clips (30-s excerpts for the tests and the demo) into DIR",
    )
    fm.set_defaults(func=_fetch_music)

    he = sub.add_parser(
        "human-eval",
        help="how often the served heads' quadrant agrees with people, on the 4Q set, by the papers' protocol and artist-disjoint",
        description="Cross-validates the heads' recipe (training/heads) on the 4Q Audio Emotion Dataset: (a) stratified 10-fold "
        "repeated with 5 seeds, (b) artist-disjoint 10-fold with 5 seeds; prints one JSON line per protocol and model, then a "
        "table. Without --data-root it reads the clips' committed features (training/heads/features; no audio).",
    )
    he.add_argument("dataset", choices=["4q"])
    he.add_argument(
        "--data-root", help="the 4Q folder (Q1..Q4/, panda_dataset_taffc_*.csv); default: the committed features"
    )
    he.add_argument("--model", action="append", help="model entry, repeatable (default: musicnn and musicnn_student)")
    he.add_argument("--repository", default=str(REPO_ROOT / "triton_models"))
    he.add_argument("--seeds", type=int, default=5, help="repeats of each protocol (1-5)")
    he.set_defaults(func=_human_eval)

    hd = sub.add_parser(
        "heads",
        help="train a model entry's heads on the 4Q set's labels and store them in its configs",
        description="Fits the quadrant and mood-family heads on every 4Q clip (training/heads/recipe.py) on top of the entry's "
        "networks, saves the clips' features (training/heads/features/4q-<model>.npz) and, with --write, stores the heads "
        "in the entry's configs (the moodstream_heads parameter).",
    )
    hd.add_argument("dataset", choices=["4q"])
    hd.add_argument("--data-root", required=True, help="the 4Q folder (Q1..Q4/, panda_dataset_taffc_*.csv)")
    hd.add_argument("--model", default="musicnn")
    hd.add_argument("--repository", default=str(REPO_ROOT / "triton_models"))
    hd.add_argument("--write", action="store_true", help="store the heads in the entry's configs (else print them)")
    hd.set_defaults(func=_heads)

    fit = sub.add_parser(
        "fit",
        help="train a model on a labelled data set",
        description=_fit_description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_options(fit)
    fit.add_argument("--resume", help="continue the run of this checkpoint (last.pt) with its options")
    fit.set_defaults(func=_fit)

    ev = sub.add_parser("evaluate", help="metrics of a checkpoint on its validation and test tracks (JSON + PNG)")
    ev.add_argument("checkpoint")
    ev.add_argument("--out", help="report folder (default: <checkpoint folder>/eval)")
    ev.add_argument(
        "--set",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a data option of the checkpoint's run (data_root, audio_root, cache_dir)",
    )
    ev.set_defaults(func=_evaluate)

    dis = sub.add_parser(
        "distill", help="train a student on unlabelled music against a served model's outputs (training/distill.py)"
    )
    dis.add_argument(
        "source",
        nargs="?",
        default="debian",
        help="'debian' (the fetched reference packages, default), a folder of audio files or s3://bucket/prefix",
    )
    dis.add_argument(
        "--repository",
        default=str(REPO_ROOT / "triton_models"),
        help="model repository of the teacher (and of the exported student)",
    )
    dis.add_argument(
        "--export",
        action="store_true",
        help="export the best checkpoint into the repository, calibrate its moods and compare them with the teacher's",
    )
    _add_config_options(dis)
    dis.set_defaults(func=_distill, resume=None)

    agr = sub.add_parser(
        "agreement",
        help="a served student against its teacher on the held-out and check music, without training (training/distill.py)",
    )
    agr.add_argument(
        "source", nargs="?", default="debian", help="as for distill: the music whose split names the held-out groups"
    )
    agr.add_argument(
        "--repository",
        default=str(REPO_ROOT / "triton_models"),
        help="model repository of the teacher and the student (the config's name)",
    )
    agr.add_argument("--out", help="report file (default: <out_dir>/agreement_report.json)")
    _add_config_options(agr)
    agr.set_defaults(func=_agreement, resume=None)

    exp = sub.add_parser(
        "export",
        help="export checkpoints as a Triton model repository entry (several: one graph running each network on the same input)",
    )
    exp.add_argument(
        "checkpoints",
        nargs="+",
        metavar="[NETWORK=]CHECKPOINT",
        help="one checkpoint, or several networks for one entry (named NETWORK=PATH, else by the run's name or the file's stem)",
    )
    exp.add_argument("--name", help="model name in the repository (default: the run's name, else its architecture)")
    exp.add_argument("--repository", default=str(REPO_ROOT / "triton_models"))
    exp.add_argument("--version", type=int, default=1, help="Triton version directory")
    exp.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""``moodstream-train``: import the pretrained models, and export checkpoints for serving.

    moodstream-train import-musicnn --tf-python PATH [--clips DIR]
    moodstream-train compare-musicnn DIR... --tf-python PATH
    moodstream-train calibrate-moods DIR... [--model NAME] [--percentile 90] [--floor 0.05]
    moodstream-train export CHECKPOINT --name NAME [--repository triton_models] [--version 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.settings import REPO_ROOT

DEFAULT_CLIPS = REPO_ROOT.parent / "shared" / "audio" / "musicnn-examples"


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

    files = sorted(p for d in args.folders for p in Path(d).rglob("*") if p.suffix.lower() in {".mp3", ".ogg", ".opus", ".flac", ".wav"})
    for row in compare(args.tf_python, files, Path(args.repository)):
        print(json.dumps(row))
    return 0


def _calibrate_moods(args: argparse.Namespace) -> int:
    from training.calibrate import calibrate

    print(calibrate([Path(f) for f in args.folders], args.model, Path(args.repository), args.percentile, args.floor))
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export import export

    result = export(Path(args.checkpoint), args.name, Path(args.repository), version=args.version)
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in result.max_abs_diff.items())
    print(f"{result.directory}: parity vs eager: {diffs}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moodstream-train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import-musicnn", help="convert musicnn's TensorFlow checkpoints (one-off)")
    imp.add_argument("--tf-python", required=True, help="python of an environment with tensorflow-cpu, tf-keras and musicnn==0.1.0")
    imp.add_argument("--clips", default=str(DEFAULT_CLIPS), help="folder of real-music .mp3 clips for the parity fixture")
    imp.set_defaults(func=_import_musicnn)

    cmp = sub.add_parser("compare-musicnn", help="agreement of moodstream's path with the original musicnn on real music")
    cmp.add_argument("folders", nargs="+")
    cmp.add_argument("--tf-python", required=True, help="python with tensorflow-cpu, tf-keras, librosa and musicnn==0.1.0")
    cmp.add_argument("--repository", default=str(REPO_ROOT / "triton_models"))
    cmp.set_defaults(func=_compare_musicnn)

    cal = sub.add_parser("calibrate-moods", help="per-tag mood thresholds from a reference collection")
    cal.add_argument("folders", nargs="+")
    cal.add_argument("--model", default="musicnn_msd")
    cal.add_argument("--percentile", type=float, default=90.0)
    cal.add_argument("--floor", type=float, default=0.05, help="lowest threshold")
    cal.add_argument("--repository", default=str(REPO_ROOT / "triton_models"))
    cal.set_defaults(func=_calibrate_moods)

    exp = sub.add_parser("export", help="export a checkpoint as a Triton model repository entry")
    exp.add_argument("checkpoint")
    exp.add_argument("--name", required=True, help="model name in the repository")
    exp.add_argument("--repository", default=str(REPO_ROOT / "triton_models"))
    exp.add_argument("--version", type=int, default=1, help="Triton version directory")
    exp.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""``make bench``: moodstream against the decode floor and the naive baseline, on real audio in
every common codec.

    python -m bench.run AUDIO_DIR [--codecs mp3,vorbis,opus,flac,aac] [--repeats 3] [--cpu-repeats 5] [--out bench/results.json] [--limit N]

The tracks of AUDIO_DIR are encoded by the bench itself as MP3, Vorbis, Opus, FLAC and AAC
(:mod:`bench.codecs`; cached), and each codec is measured on its own, in one run, on the same
music, in ``--repeats`` rounds of figures 1-4, and ``--cpu-repeats`` rounds of figures 1-2 (the
CPU ratio), whose ratios are medians (each figure's method is in its docstring below):

1. decode floor          PyAV decode + soxr resampling of each file alone, CPU s per audio minute,
                         measured right before and right after the worker path with Triton
2. worker path           :mod:`bench.worker_path` (fetch + decode + mel + inference, no Kafka)
                         with the Triton scorer
3. end to end            the embedded stack (Tansu, moto, tritonserver) and one real worker:
                         every file announced at once, tracks/s and event -> output latency
4. naive baseline        :mod:`bench.naive` against the same broker
5. memory                peak RSS of ``moodstream tag`` on a 3-minute and a 60-minute track made
                         from the same music, in the same codec

On the first codec, the teacher (``musicnn``) and the distilled student (``musicnn_student``)
side by side: the worker path with onnxruntime in process (CPU per track, inference included),
end to end through Triton, and peak RSS. Once, on the source files: the analysis window.

Writes ``results.json`` (the three ratios per codec against their goals, the raw figures, the
machine, the date) and prints Markdown tables. Runs on the CPU; nothing here is part of the
test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from bench import REPO_ROOT
from bench.codecs import CODECS, readable, stereo, transcoded
from devstack import EmbeddedStack
from devstack.demo import upload
from pipeline.backfill import announcement
from pipeline.errors import TrackError
from pipeline.settings import load_settings
from pipeline.stages import audio, storage

BUCKET = "moodstream-bench"
MODEL = "musicnn"  # both networks in one pass, as the worker serves them by default
STUDENT = "musicnn_student"  # its distilled CPU tier (training/distill.py), when exported
CACHE = Path(os.environ.get("MOODSTREAM_BENCH_CACHE", Path.home() / ".cache" / "moodstream" / "bench"))
LONG_TRACKS_MIN = (3, 60)  # minutes of the two tracks the memory figure compares
REPEATS = 3  # rounds per codec: medians of three, one noisy round cannot decide a ratio
#: rounds of the decode floor and the worker path per codec (the first REPEATS of them full
#: rounds). The CPU ratio is the noisiest figure on a shared 2-core machine: the decoding
#: processes take turns with a Triton that keeps both cores busy, and one disturbed worker run
#: moved a codec's ratio from 1.20 to 1.58 (2026-12-05 07:12), two such rounds in three now and
#: then. A floor-and-worker round costs about 30 s, against 90 s for a full one.
CPU_REPEATS = 5


def decode_floor(files: list[Path]) -> dict:
    """CPU seconds to decode and resample each file (PyAV + soxr, as the worker does), alone,
    in this process; nothing else: no mel, no model."""
    cpu = audio_s = 0.0
    for path in files:
        data = path.read_bytes()
        start = time.process_time()
        wave, _ = audio.decode_all(data, max_duration_s=24 * 3600)
        cpu += time.process_time() - start
        audio_s += len(wave) / 16_000
    return {"files": len(files), "audio_s": audio_s, "cpu_s": cpu, "cpu_s_per_audio_min": cpu / (audio_s / 60)}


def floor_of(runs: list[dict]) -> dict:
    """One decode floor from several measurements of it (the mean CPU), each run's CPU kept."""
    cpu = sum(r["cpu_s"] for r in runs) / len(runs)
    first = runs[0]
    return {
        **first,
        "cpu_s": cpu,
        "cpu_s_per_audio_min": cpu / (first["audio_s"] / 60),
        "runs_cpu_s": [r["cpu_s"] for r in runs],
    }


def _python(module: str, *args: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{module} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _group_cpu_s(pgid: int | None) -> float:
    """CPU seconds used so far by the live processes of process group ``pgid`` (Linux /proc)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def worker_path(announcements: Path, env: dict[str, str], scorer: str) -> dict:
    result = _python("bench.worker_path", str(announcements), env={**env, "MOODSTREAM_SCORER": scorer})
    result["tracks_per_s"] = result["tracks"] / result["wall_s"]
    return result


async def end_to_end(
    stack: EmbeddedStack,
    objects: list[storage.ListedObject],
    warmup: storage.ListedObject,
    env: dict[str, str],
    log_dir: Path,
) -> dict:
    """One real worker process (``python -m pipeline worker``) on the embedded stack. A warm-up
    track is tagged first, so the figures exclude start-up; then every track is announced at
    once (an ingestion burst) and timed until its output arrives."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    s = load_settings()
    log = open(log_dir / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "worker"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    consumer = AIOKafkaConsumer(
        s.output_topic,
        s.dlq_topic,
        bootstrap_servers=stack.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    try:
        await _announce_and_wait(producer, consumer, s, [warmup], worker)
        started, arrived, dead = await _announce_and_wait(producer, consumer, s, objects, worker)
    finally:
        await producer.stop()
        await consumer.stop()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
    latencies = sorted(t - started for t in arrived.values())
    wall = max(arrived.values()) - started
    return {
        "tracks": len(objects),
        "outputs": len(arrived) - dead,
        "dead_letters": dead,
        "wall_s": wall,
        "tracks_per_s": len(objects) / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
    }


async def _announce_and_wait(
    producer, consumer, s, objects, worker: subprocess.Popen, timeout_s: float = 3600
) -> tuple[float, dict[str, float], int]:
    ids = {}
    started = time.monotonic()
    for obj in objects:
        track_id, record = announcement(obj, correlation_id="bench")
        ids[track_id] = obj
        await producer.send(s.input_topic, record, key=track_id.encode())
    await producer.flush()
    arrived: dict[str, float] = {}
    dead = 0
    while len(arrived) < len(ids):
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with status {worker.returncode}")
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{len(ids) - len(arrived)} tracks got no output in {timeout_s} s")
        for tp, records in (await consumer.getmany(timeout_ms=500)).items():
            for rec in records:
                track_id = json.loads(rec.value).get("track_id")
                if track_id in ids and track_id not in arrived:
                    arrived[track_id] = time.monotonic()
                    dead += tp.topic == s.dlq_topic
    return started, arrived, dead


def naive(files: list[Path], env: dict[str, str], bootstrap: str) -> dict:
    result = _python("bench.naive", "--bootstrap", bootstrap, *map(str, files), env=env)
    result["tracks_per_s"] = result["files"] / result["wall_s"]
    return result


def long_tracks(sources: list[Path], codec: str | None = None) -> dict[int, Path]:
    """Files of exactly 3 and 60 minutes made by concatenating the benchmark's music (Opus,
    48 kHz stereo, 128 kb/s), then encoded as ``codec`` when one is given; cached, since
    encoding an hour takes a while."""
    out = {}
    for minutes in LONG_TRACKS_MIN:
        path = CACHE / f"long-{_key(sources)}-{minutes}min.opus"
        if not path.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            _concatenate(sources, path, minutes * 60)
        out[minutes] = transcoded([path], codec, CACHE / "long")[0] if codec else path
    return out


def _key(sources: list[Path]) -> str:
    """A short name for a set of source files (their paths and sizes)."""
    return hashlib.sha256("\n".join(f"{p.resolve()}:{p.stat().st_size}" for p in sources).encode()).hexdigest()[:10]


def _concatenate(files: list[Path], path: Path, seconds: float) -> None:
    """The sources one after the other (again from the first when they are shorter), read
    through the product's decoder, as one Opus file of exactly ``seconds``."""
    rate, need = 48_000, int(seconds * 48_000)
    tmp = path.with_suffix(".part")
    print(f"# making a {seconds / 60:.0f}-minute track from the sources", file=sys.stderr, flush=True)
    with soundfile.SoundFile(tmp, "w", rate, 2, format="OGG", subtype="OPUS") as out:
        written = 0
        while written < need:
            for source in files:
                for block in stereo(source, rate):
                    samples = block[: need - written]
                    out.write(samples)
                    written += len(samples)
                    if written >= need:
                        break
                if written >= need:
                    break
    tmp.rename(path)


def peak_rss(path: Path, env: dict[str, str]) -> dict:
    """Peak resident memory (VmHWM) of ``python -m pipeline tag FILE`` (decode, mel and
    onnxruntime in one process), as the process itself reads it at exit. Not wait4's
    ru_maxrss: Linux carries a parent's peak into a forked child, so a child of this (large)
    process would report this process's peak."""
    report = (
        "import atexit, runpy, sys; "
        "atexit.register(lambda: print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)); "
        f"sys.argv = ['pipeline', 'tag', {str(path)!r}, '--json']; runpy.run_module('pipeline', run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", report], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"tag {path} failed with status {done.returncode}:\n{done.stderr[-2000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    kb = int(next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("VmHWM")))
    return {"duration_s": record["duration_s"], "patches": record["patches"], "peak_rss_mb": kb / 1024}


WINDOW_SETTINGS = ((3, 15.0), (5, 15.0), (10, 15.0))  # (excerpts, excerpt_s) compared with the whole track


def analysis_window(files: list[Path]) -> dict:
    """What the analysis window (``MOODSTREAM_EXCERPTS``) saves and changes: for each setting,
    CPU seconds per track (decode + mel in this process, plus onnxruntime on one thread) and
    the track scores' agreement with whole-track analysis (top-5 tags, max |Δ score|)."""
    from pipeline.stages.analysis import analyse
    from pipeline.stages.scoring import OnnxScorer

    scorer = OnnxScorer(REPO_ROOT / "triton_models", MODEL, threads=1)

    def run(data: bytes, excerpts: int, excerpt_s: float) -> tuple[np.ndarray, float, int]:
        start = time.process_time()
        patches = analyse(
            data, max_duration_s=3600, min_duration_s=1, excerpts=excerpts, excerpt_s=excerpt_s
        ).patches.patches
        scores = np.concatenate([out.scores.mean(axis=0) for out in scorer.score_sync(patches).values()])
        return scores, time.process_time() - start, len(patches)

    rows = {
        f"{n}x{s:g}s": {"cpu_s": 0.0, "patches": 0, "top5_overlap": [], "max_abs_diff": 0.0} for n, s in WINDOW_SETTINGS
    }
    whole_cpu = whole_patches = 0
    for i, path in enumerate(files, 1):
        print(f"# analysis window: {i}/{len(files)} {path.name}", file=sys.stderr, flush=True)
        data = path.read_bytes()
        try:
            ref, cpu, n = run(data, 0, 0.0)
        except TrackError as exc:  # readable, yet not analysable (shorter than a second)
            print(f"# skipped {path}: {exc.reason}: {exc}", file=sys.stderr, flush=True)
            continue
        whole_cpu += cpu
        whole_patches += n
        top = set(np.argsort(-ref)[:5])
        for (count, length), row in zip(WINDOW_SETTINGS, rows.values()):
            got, cpu, n = run(data, count, length)
            row["cpu_s"] += cpu
            row["patches"] += n
            row["top5_overlap"].append(len(top & set(np.argsort(-got)[:5])) / 5)
            row["max_abs_diff"] = max(row["max_abs_diff"], float(np.abs(got - ref).max()))
    for row in rows.values():
        row["cpu_saving"] = 1 - row["cpu_s"] / whole_cpu
        row["top5_overlap"] = float(np.mean(row["top5_overlap"]))
    return {"tracks": len(files), "whole": {"cpu_s": whole_cpu, "patches": whole_patches}, "settings": rows}


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import onnxruntime
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "os": platform.platform(),
    }


def _of_rounds(codec: dict, name: str) -> str:
    """' (r1, r2, ...)': the rounds' own values of a ratio a median was taken of, or nothing."""
    values = [r[name] for r in codec.get("rounds", []) if name in r]
    return f" ({', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""


def table(r: dict) -> str:
    """The Markdown tables ``make bench`` prints: per codec, then teacher and student, then the
    analysis window."""
    lines = [
        "| codec | decode floor, CPU s / audio min | worker (Triton), CPU s / audio min | end to end, tracks/s | naive, tracks/s | peak RSS 3 / 60 min, MB | `end_to_end_vs_naive` | `worker_cpu_vs_decode_floor` | `audio_features_vs_worker_cpu` | `rss_60min_vs_3min` |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for codec, c in r["codecs"].items():
        f = c["figures"]
        rss = f["rss"]
        marks = {name: "" if c["met"][name] else " ✗" for name in GOALS}
        lines.append(
            f"| {codec} | {f['decode_floor']['cpu_s_per_audio_min']:.3f} | {f['worker_triton']['cpu_s'] / f['worker_triton']['audio_s'] * 60:.3f} "
            f"| {f['end_to_end']['tracks_per_s']:.3f} (p50 {f['end_to_end']['latency_p50_s']:.0f} s) | {f['naive']['tracks_per_s']:.3f} "
            f"| {rss[str(LONG_TRACKS_MIN[0])]['peak_rss_mb']:.0f} / {rss[str(LONG_TRACKS_MIN[1])]['peak_rss_mb']:.0f} "
            + "".join(f"| {c[name]:.2f}{marks[name]}{_of_rounds(c, name)} " for name in GOALS)
            + "|"
        )
    lines.append("| goal | | | | | | " + " | ".join(GOALS.values()) + " |")
    tiers = r.get("tiers") or {}
    if tiers:
        lines += [
            "",
            f"| model ({r['tiers_codec']}) | inference, CPU ms / patch (1 thread) | worker path, onnxruntime in process: CPU s / track | end to end through Triton: tracks/s | peak RSS of `moodstream tag`, 3 min, MB |",
            "|---|---|---|---|---|",
        ]
        for name, t in tiers.items():
            lines.append(
                f"| {name} | {t['cpu_ms_per_patch']:.2f} | {t['worker_onnx']['cpu_s'] / t['worker_onnx']['tracks']:.2f} | {t['end_to_end']['tracks_per_s']:.3f} | {t['rss_3min']['peak_rss_mb']:.0f} |"
            )
    window = r.get("analysis_window")
    if window:
        lines += ["", "| analysis window | CPU | agreement with the whole track |", "|---|---|---|"]
        for name, row in window["settings"].items():
            lines.append(
                f"| {name} | {row['cpu_saving']:.0%} less | top-5 overlap {row['top5_overlap']:.0%}, max |Δscore| {row['max_abs_diff']:.3f} |"
            )
    if r.get("skipped"):
        lines += ["", f"skipped {len(r['skipped'])} files no decoder reads:"]
        lines += [f"- {Path(path).name}: {why}" for path, why in r["skipped"].items()]
    lines += [
        "",
        "all goals met on every codec"
        if r["goals_met"]
        else "goals missed: "
        + ", ".join(f"{codec} {name}" for codec, c in r["codecs"].items() for name in GOALS if not c["met"][name]),
    ]
    return "\n".join(lines)


async def codecs_figures(
    stack: EmbeddedStack,
    encoded: dict[str, list[Path]],
    env: dict[str, str],
    log_dir: Path,
    repeats: int = 1,
    cpu_repeats: int = 0,
) -> dict[str, dict]:
    """Every per-codec figure: ``repeats`` rounds of floor, worker path, end to end and naive,
    then floor and worker path alone up to ``cpu_repeats`` rounds (each round on its own uploads,
    so track ids are new). Rounds go over the codecs in turn, the order rotated by one codec a
    round, so each codec is measured early and late in the run: end to end (tracks/s, wall clock)
    is not a ratio, and this shared machine's speed drifts over a 30-minute run; measured each in
    a block in a fixed order, AAC, always last, read 0.64 tracks/s against 0.85-1.11 although back
    to back it ties MP3. The ratios are the medians of each round's own; the figures shown are
    the median round's of each."""
    codecs = list(encoded)
    rounds: dict[str, list[dict]] = {codec: [] for codec in codecs}
    for r in range(max(repeats, cpu_repeats)):
        for codec in codecs[r % len(codecs) :] + codecs[: r % len(codecs)]:
            rounds[codec].append(await _round(stack, encoded[codec], f"{codec}-{r}", env, log_dir, full=r < repeats))
    out: dict[str, dict] = {}
    for codec, its in rounds.items():
        figures: dict = {"rounds": its}
        for key, figure in (
            ("decode_floor", "cpu_s"),
            ("worker_triton", "cpu_s"),
            ("end_to_end", "tracks_per_s"),
            ("naive", "tracks_per_s"),
        ):
            figures[key] = _median_by([r[key] for r in its if key in r], figure)
        out[codec] = figures
    return out


async def _round(
    stack: EmbeddedStack, files: list[Path], name: str, env: dict[str, str], log_dir: Path, full: bool = True
) -> dict:
    figures: dict = {}
    objects, announcements = _announced(stack, files, f"bench-{name}", log_dir)
    # The floor is measured right before and right after the worker path it is compared with,
    # so a change in this shared machine's speed during the run moves both sides alike.
    floors = [decode_floor(files)]
    triton_cpu = _group_cpu_s(stack.triton_pid)
    figures["worker_triton"] = worker_path(announcements, env, "triton")
    figures["worker_triton"]["triton_cpu_s"] = _group_cpu_s(stack.triton_pid) - triton_cpu
    figures["decode_floor"] = floor_of([*floors, decode_floor(files)])
    print(
        f"{name}: decode floor {figures['decode_floor']}\n{name}: worker path {figures['worker_triton']}",
        file=sys.stderr,
    )
    if not full:
        return figures
    # The warm-up track is the first file again under its own key (its own track id).
    (warmup,) = upload(stack, files[:1], files[0].parent, bucket=BUCKET, prefix=f"warmup-{name}")
    figures["end_to_end"] = await end_to_end(stack, objects, warmup, env, log_dir)
    print(f"{name}: end to end {figures['end_to_end']}", file=sys.stderr)
    figures["naive"] = naive(files, env, stack.kafka_bootstrap)
    print(f"{name}: naive {figures['naive']}", file=sys.stderr)
    return figures


def _median_by(items: list[dict], key: str) -> dict:
    """The item whose ``key`` is the median (the lower middle one of an even count)."""
    return sorted(items, key=lambda item: item[key])[(len(items) - 1) // 2]


def _announced(
    stack: EmbeddedStack, files: list[Path], prefix: str, log_dir: Path
) -> tuple[list[storage.ListedObject], Path]:
    """``files`` uploaded under ``prefix``, and a file of their announcements (one JSON line each)."""
    objects = upload(stack, files, files[0].parent, bucket=BUCKET, prefix=prefix)
    announcements = log_dir / f"announcements-{prefix}.jsonl"
    announcements.write_text("".join(announcement(o)[1].decode() + "\n" for o in objects))
    return objects, announcements


async def tier_figures(
    stack: EmbeddedStack, files: list[Path], rss_track: Path, model: str, env: dict[str, str], log_dir: Path
) -> dict:
    """One model's cost on ``files``: CPU per patch (onnxruntime, one thread, one patch per run,
    median of 3 passes over the first file's first 60 patches), the worker path with onnxruntime
    in process (its CPU is the whole per-track cost, inference included), end to end through
    Triton, peak RSS."""
    from bench.networks import cpu_ms_per_patch, first_patches
    from pipeline.stages.scoring import OnnxScorer

    env = {**env, "MOODSTREAM_MODEL": model}
    objects, announcements = _announced(stack, files, f"tier-{model}", log_dir)
    patches = first_patches(files[0], 60)
    scorer = OnnxScorer(REPO_ROOT / "triton_models", model, threads=1)
    cpu_ms_per_patch([scorer], patches[:4], 1)  # warm-up: arena and caches
    figures = {"cpu_ms_per_patch": cpu_ms_per_patch([scorer], patches, 3)[0], "patches": len(patches)}
    figures["worker_onnx"] = worker_path(announcements, env, "onnx")
    (warmup,) = upload(stack, files[:1], files[0].parent, bucket=BUCKET, prefix=f"tier-warmup-{model}")
    figures["end_to_end"] = await end_to_end(stack, objects, warmup, env, log_dir)
    figures["rss_3min"] = peak_rss(rss_track, {**os.environ, "MOODSTREAM_MODEL": model})
    print(f"{model}: {figures}", file=sys.stderr)
    return figures


async def main_async(args: argparse.Namespace) -> dict:
    sources, skipped = readable(storage.local_audio_files(args.audio_dir)[: args.limit or None])
    if not sources:
        raise SystemExit(f"no audio file in {args.audio_dir} that moodstream's decoder reads")
    codecs = args.codecs
    print(f"{len(sources)} files from {args.audio_dir}, encoded as {', '.join(codecs)}", file=sys.stderr)
    encoded = {codec: transcoded(sources, codec, CACHE / _key(sources)) for codec in codecs}
    long = {codec: long_tracks(sources, codec) for codec in codecs}
    s = load_settings()
    tiers = [m for m in (MODEL, STUDENT) if (s.model_repository / m / "config.pbtxt").is_file()]
    figures: dict = {"codecs": {}, "tiers": {}, "skipped": {str(path): why for path, why in skipped.items()}}
    with tempfile.TemporaryDirectory(prefix="moodstream-bench-") as tmp:
        log_dir = Path(tmp)
        with EmbeddedStack(model_repository=s.model_repository, log_dir=log_dir, models=tiers) as stack:
            env = {
                **os.environ,
                **stack.env(),
                "MOODSTREAM_MODEL": MODEL,
                "MOODSTREAM_ALLOWED_BUCKETS": BUCKET,
                "MOODSTREAM_METRICS_PORT": "0",
            }
            stack.create_topics([s.input_topic, s.output_topic, s.dlq_topic])
            figures["codecs"] = await codecs_figures(stack, encoded, env, log_dir, args.repeats, args.cpu_repeats)
            for codec in codecs:
                figures["codecs"][codec]["rss"] = {
                    str(m): peak_rss(p, dict(os.environ)) for m, p in long[codec].items()
                }
                print(f"{codec}: rss {figures['codecs'][codec]['rss']}", file=sys.stderr)
            for model in tiers:
                figures["tiers"][model] = await tier_figures(
                    stack, encoded[codecs[0]], long[codecs[0]][LONG_TRACKS_MIN[0]], model, env, log_dir
                )
    figures["analysis_window"] = analysis_window(sources)
    print(f"analysis window: {figures['analysis_window']}", file=sys.stderr)
    return summarise(figures, args.audio_dir, codecs[0])


GOALS = {
    "end_to_end_vs_naive": ">= 1.8",
    "worker_cpu_vs_decode_floor": "<= 1.3",
    "audio_features_vs_worker_cpu": "<= 0.15",
    "rss_60min_vs_3min": "<= 1.3",
}


def ratios(f: dict) -> dict[str, float]:
    """The ratios the goals are stated in, from one codec's figures: with several rounds, the
    median of the ratios of the rounds that measured it (the memory figure is measured once)."""
    rounds = f.get("rounds", [])
    per_round = [round_ratios(r) for r in rounds] if len(rounds) > 1 else [round_ratios(f)]
    rss = f["rss"]
    return {
        "end_to_end_vs_naive": statistics.median(
            r["end_to_end_vs_naive"] for r in per_round if "end_to_end_vs_naive" in r
        ),
        "worker_cpu_vs_decode_floor": statistics.median(r["worker_cpu_vs_decode_floor"] for r in per_round),
        "audio_features_vs_worker_cpu": statistics.median(r["audio_features_vs_worker_cpu"] for r in per_round),
        "rss_60min_vs_3min": rss[str(LONG_TRACKS_MIN[1])]["peak_rss_mb"] / rss[str(LONG_TRACKS_MIN[0])]["peak_rss_mb"],
    }


def round_ratios(f: dict) -> dict[str, float]:
    """The throughput and CPU ratios of one round (only the CPU ones for a floor-and-worker round).

    The audio-features stage is new work beside the moods, not overhead over decoding: the
    worker's CPU against the decode floor leaves it out, and its own ratio sets it against the
    rest of the worker's CPU (the issue's "share of today's worker CPU per track")."""
    floor_per_track = f["decode_floor"]["cpu_s"] / f["decode_floor"]["files"]
    worker = f["worker_triton"]
    features_s = worker.get("audio_features_s", 0.0)
    rest_per_track = (worker["cpu_s"] - features_s) / worker["tracks"]
    out = {
        "worker_cpu_vs_decode_floor": rest_per_track / floor_per_track,
        "audio_features_vs_worker_cpu": features_s / worker["tracks"] / rest_per_track,
    }
    if "end_to_end" in f:
        out["end_to_end_vs_naive"] = f["end_to_end"]["tracks_per_s"] / f["naive"]["tracks_per_s"]
    return out


def _met(name: str, value: float) -> bool:
    op, bound = GOALS[name].split()
    return value >= float(bound) if op == ">=" else value <= float(bound)


def summarise(figures: dict, audio_dir: Path, tiers_codec: str = "") -> dict:
    """results.json: per codec the three ratios, whether each meets its goal, and the figures
    they come from; the teacher and student figures; the machine and the date."""
    codecs = {}
    for codec, f in figures["codecs"].items():
        r = ratios(f)
        rounds = [round_ratios(x) for x in f.get("rounds", [])]
        codecs[codec] = {**r, "met": {name: _met(name, v) for name, v in r.items()}, "rounds": rounds, "figures": f}
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "audio_dir": str(audio_dir),
        "model": MODEL,
        "goals": GOALS,
        "goals_met": all(all(c["met"].values()) for c in codecs.values()),
        "codecs": codecs,
        "tiers_codec": tiers_codec,
        "tiers": figures.get("tiers", {}),
        "analysis_window": figures.get("analysis_window"),
        "skipped": figures.get("skipped", {}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("audio_dir", type=Path)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results.json")
    parser.add_argument(
        "--codecs", type=_codecs, default=list(CODECS), help=f"comma-separated, from {','.join(CODECS)} (default: all)"
    )
    parser.add_argument("--limit", type=int, default=0, help="use only the first N files (quick checks)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=REPEATS,
        help=f"rounds of floor, worker path, end to end and naive per codec; the ratios are their medians (default {REPEATS})",
    )
    parser.add_argument(
        "--cpu-repeats",
        type=int,
        default=CPU_REPEATS,
        help=f"rounds of floor and worker path per codec, the full rounds included (default {CPU_REPEATS})",
    )
    args = parser.parse_args()
    if args.repeats < 1 or args.cpu_repeats < 0:
        parser.error(
            f"--repeats must be at least 1 and --cpu-repeats at least 0, got {args.repeats} and {args.cpu_repeats}"
        )
    result = asyncio.run(main_async(args))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwritten to {args.out}")
    return 0 if result["goals_met"] else 1


def _codecs(text: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CODECS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown codecs {unknown}; choose from {', '.join(CODECS)}")
    return chosen


if __name__ == "__main__":
    sys.exit(main())

"""``make bench``: moodstream against the decode floor and the naive baseline, on real audio.

    python -m bench.run AUDIO_DIR [--out bench/results.json] [--limit N]

Measured in one run, on the same files (each figure's method is in its docstring below):

1. decode floor          PyAV decode + soxr resampling of each file alone, CPU s per audio minute,
                         measured right before and right after the worker path with Triton
2. worker path           :mod:`bench.worker_path` (fetch + decode + mel + inference, no Kafka),
                         with the onnxruntime scorer and with the Triton scorer
3. end to end            the embedded stack (Tansu, moto, tritonserver) and one real worker:
                         every file announced at once, tracks/s and event -> output latency
4. naive baseline        :mod:`bench.naive` against the same broker
5. memory                peak RSS of ``moodstream tag`` on a 3-minute and a 60-minute track made
                         from the same music

Writes ``results.json`` (the ratios the issue's goals name, the raw figures, the machine, the
date) and prints a Markdown table. Runs on the CPU; nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
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

import av
import numpy as np
import soundfile

from pipeline import audio, storage
from pipeline.demo import audio_files, upload
from pipeline.publish import announcement
from pipeline.settings import REPO_ROOT, load_settings
from pipeline.stack import EmbeddedStack

BUCKET = "moodstream-bench"
MODEL = "musicnn"  # both networks in one pass, as the worker serves them by default
CACHE = Path(os.environ.get("MOODSTREAM_BENCH_CACHE", Path.home() / ".cache" / "moodstream" / "bench"))
LONG_TRACKS_MIN = (3, 60)  # minutes of the two tracks the memory figure compares


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
    return {**first, "cpu_s": cpu, "cpu_s_per_audio_min": cpu / (first["audio_s"] / 60), "runs_cpu_s": [r["cpu_s"] for r in runs]}


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


async def end_to_end(stack: EmbeddedStack, objects: list[storage.ListedObject], warmup: storage.ListedObject, env: dict[str, str], log_dir: Path) -> dict:
    """One real worker process (``python -m pipeline worker``) on the embedded stack. A warm-up
    track is tagged first, so the figures exclude start-up; then every track is announced at
    once (an ingestion burst) and timed until its output arrives."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    s = load_settings()
    log = open(log_dir / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    consumer = AIOKafkaConsumer(s.output_topic, s.dlq_topic, bootstrap_servers=stack.kafka_bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
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


async def _announce_and_wait(producer, consumer, s, objects, worker: subprocess.Popen, timeout_s: float = 3600) -> tuple[float, dict[str, float], int]:
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


def long_tracks(files: list[Path]) -> dict[int, Path]:
    """Opus files of exactly 3 and 60 minutes (48 kHz stereo, 128 kb/s) made by concatenating
    the benchmark's music; cached, since encoding an hour takes a while."""
    out = {}
    for minutes in LONG_TRACKS_MIN:
        path = CACHE / f"long-{minutes}min.opus"
        if not path.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            _concatenate(files, path, minutes * 60)
        out[minutes] = path
    return out


def _concatenate(files: list[Path], path: Path, seconds: float) -> None:
    rate, need = 48_000, int(seconds * 48_000)
    tmp = path.with_suffix(".part")
    with soundfile.SoundFile(tmp, "w", rate, 2, format="OGG", subtype="OPUS") as out:
        written = 0
        while written < need:
            for source in files:
                with av.open(str(source)) as container:
                    resampler = av.AudioResampler(format="flt", layout="stereo", rate=rate)
                    for frame in container.decode(audio=0):
                        for block in resampler.resample(frame):
                            samples = block.to_ndarray().reshape(-1, 2)[: need - written]
                            out.write(samples)
                            written += len(samples)
                            if written >= need:
                                break
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
    from pipeline.scoring import OnnxScorer
    from pipeline.tagging import analyse

    scorer = OnnxScorer(REPO_ROOT / "triton_models", MODEL, threads=1)

    def run(data: bytes, excerpts: int, excerpt_s: float) -> tuple[np.ndarray, float, int]:
        start = time.process_time()
        patches = analyse(data, max_duration_s=3600, min_duration_s=1, excerpts=excerpts, excerpt_s=excerpt_s).patches.patches
        scores = np.concatenate([out.scores.mean(axis=0) for out in scorer.score_sync(patches).values()])
        return scores, time.process_time() - start, len(patches)

    rows = {f"{n}x{s:g}s": {"cpu_s": 0.0, "patches": 0, "top5_overlap": [], "max_abs_diff": 0.0} for n, s in WINDOW_SETTINGS}
    whole_cpu = whole_patches = 0
    for path in files:
        data = path.read_bytes()
        ref, cpu, n = run(data, 0, 0.0)
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
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    import onnxruntime
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "os": platform.platform()}


def table(r: dict) -> str:
    f = r["figures"]
    rows = [
        ("decode floor (PyAV + soxr)", f"{f['decode_floor']['cpu_s_per_audio_min']:.3f} CPU s / audio min", ""),
        ("worker path, onnxruntime", f"{f['worker_onnx']['tracks_per_s']:.3f} tracks/s", f"{f['worker_onnx']['cpu_s'] / f['worker_onnx']['audio_s'] * 60:.3f} CPU s / audio min"),
        ("worker path, Triton (worker CPU only)", f"{f['worker_triton']['tracks_per_s']:.3f} tracks/s", f"{f['worker_triton']['cpu_s'] / f['worker_triton']['audio_s'] * 60:.3f} CPU s / audio min"),
        ("end to end (Kafka, S3, Triton)", f"{f['end_to_end']['tracks_per_s']:.3f} tracks/s", f"latency p50 {f['end_to_end']['latency_p50_s']:.1f} s, p95 {f['end_to_end']['latency_p95_s']:.1f} s"),
        ("naive baseline", f"{f['naive']['tracks_per_s']:.3f} tracks/s", f"{f['naive']['cpu_s'] / f['naive']['audio_s'] * 60:.3f} CPU s / audio min"),
        ("peak RSS, 3 min track", f"{f['rss'][str(LONG_TRACKS_MIN[0])]['peak_rss_mb']:.0f} MB", ""),
        ("peak RSS, 60 min track", f"{f['rss'][str(LONG_TRACKS_MIN[1])]['peak_rss_mb']:.0f} MB", ""),
    ]
    window = f["analysis_window"]
    for name, row in window["settings"].items():
        rows.append((f"analysis window {name}", f"{row['cpu_saving']:.0%} less CPU", f"top-5 overlap {row['top5_overlap']:.0%}, max |Δscore| {row['max_abs_diff']:.3f}"))
    goals = r["goals"]
    lines = ["| measurement | result | |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    lines += ["", "| ratio | value | goal |", "|---|---|---|"]
    lines += [f"| `{name}` | {r[name]:.2f} | {goal} |" for name, goal in goals.items()]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict:
    files = audio_files(args.audio_dir)[: args.limit or None]
    if not files:
        raise SystemExit(f"no audio files in {args.audio_dir}")
    print(f"{len(files)} files from {args.audio_dir}", file=sys.stderr)
    figures: dict = {}
    s = load_settings()
    with tempfile.TemporaryDirectory(prefix="moodstream-bench-") as tmp:
        log_dir = Path(tmp)
        with EmbeddedStack(model_repository=s.model_repository, log_dir=log_dir, models=[MODEL]) as stack:
            env = {**os.environ, **stack.env(), "MOODSTREAM_MODEL": MODEL, "MOODSTREAM_ALLOWED_BUCKETS": BUCKET, "MOODSTREAM_METRICS_PORT": "0"}
            objects = upload(stack, files, args.audio_dir, bucket=BUCKET, prefix="bench")
            announcements = log_dir / "announcements.jsonl"
            announcements.write_text("".join(announcement(o)[1].decode() + "\n" for o in objects))
            for scorer in ("onnx", "triton"):
                if scorer == "triton":
                    # The floor is measured right before and right after the worker path it is
                    # compared with, so a change in this shared machine's speed during the run
                    # moves both sides alike (single floors differed by 7 % between runs).
                    floors = [decode_floor(files)]
                triton_cpu = _group_cpu_s(stack.triton_pid)
                figures[f"worker_{scorer}"] = worker_path(announcements, env, scorer)
                figures[f"worker_{scorer}"]["triton_cpu_s"] = _group_cpu_s(stack.triton_pid) - triton_cpu
                print(f"worker path ({scorer}): {figures[f'worker_{scorer}']}", file=sys.stderr)
            figures["decode_floor"] = floor_of([*floors, decode_floor(files)])
            print(f"decode floor: {figures['decode_floor']}", file=sys.stderr)
            stack.create_topics([s.input_topic, s.output_topic, s.dlq_topic])
            # The warm-up track is the first file again under its own key (its own track id).
            (warmup,) = upload(stack, files[:1], files[0].parent, bucket=BUCKET, prefix="warmup")
            figures["end_to_end"] = await end_to_end(stack, objects, warmup, env, log_dir)
            print(f"end to end: {figures['end_to_end']}", file=sys.stderr)
            figures["naive"] = naive(files, env, stack.kafka_bootstrap)
            print(f"naive: {figures['naive']}", file=sys.stderr)
    figures["analysis_window"] = analysis_window(files)
    print(f"analysis window: {figures['analysis_window']}", file=sys.stderr)
    figures["rss"] = {str(m): peak_rss(p, dict(os.environ)) for m, p in long_tracks(files).items()}
    print(f"rss: {figures['rss']}", file=sys.stderr)

    return summarise(figures, args.audio_dir)


GOALS = {"end_to_end_vs_naive": ">= 1.8", "worker_cpu_vs_decode_floor": "<= 1.3", "rss_60min_vs_3min": "<= 1.3"}


def summarise(figures: dict, audio_dir: Path) -> dict:
    """results.json: the three ratios the goals are stated in, the goals, the machine, the date
    and every raw figure they come from."""
    floor_per_track = figures["decode_floor"]["cpu_s"] / figures["decode_floor"]["files"]
    worker_per_track = figures["worker_triton"]["cpu_s"] / figures["worker_triton"]["tracks"]
    rss = figures["rss"]
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "audio_dir": str(audio_dir),
        "model": MODEL,
        "end_to_end_vs_naive": figures["end_to_end"]["tracks_per_s"] / figures["naive"]["tracks_per_s"],
        "worker_cpu_vs_decode_floor": worker_per_track / floor_per_track,
        "rss_60min_vs_3min": rss[str(LONG_TRACKS_MIN[1])]["peak_rss_mb"] / rss[str(LONG_TRACKS_MIN[0])]["peak_rss_mb"],
        "goals": GOALS,
        "figures": figures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("audio_dir", type=Path)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results.json")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N files (quick checks)")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

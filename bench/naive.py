"""The baseline moodstream is measured against: the obvious script, as the research prototypes
would write it.

For each file in turn: ``librosa.load(sr=16000)``, librosa's mel spectrogram with musicnn's
parameters, both musicnn networks (MSD and MTT, the outputs moodstream computes) on the whole
track's patches, each its own onnxruntime session with default options as a prototype leaves
them, then a synchronous produce of the result to Kafka. The networks are the checkpoints
exported as they are (``torch.onnx.export`` of the trained modules, :func:`plain_onnx`), not the
model repository's inference form, which is moodstream's own work. No batching
across tracks, no overlap of I/O with computation, one process.

The one departure from "one inference call per file": the call is made in slices of
``SLICE`` patches. A single call on a 20-minute track needs about 40 MB of activations per
patch (16 GB; the first full run was killed by the kernel for memory), and 16 is the fastest
slice measured here (31 ms of CPU a patch; 140 ms at 64), so the baseline is the strongest
version of the obvious script, not a strawman.

    python -m bench.naive --bootstrap HOST:PORT --topic T FILE...

Prints one JSON object: files, audio seconds, wall seconds, CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import av
import librosa
import numpy as np
import onnxruntime as ort
from aiokafka import AIOKafkaProducer
from audioread.exceptions import NoBackendError

from bench import REPO_ROOT
from pipeline.stages.frontend import HOP_LENGTH, LOG_SCALE, N_FFT, N_MELS, PATCH_FRAMES, SAMPLE_RATE

SLICE = 16  # patches per onnxruntime call (see the module docstring)
CHECKPOINTS = [REPO_ROOT / "training" / "weights" / f"{name}.pt" for name in ("musicnn_msd", "musicnn_mtt")]
CACHE = Path(os.environ.get("MOODSTREAM_BENCH_CACHE", Path.home() / ".cache" / "moodstream" / "bench")) / "naive"


def plain_onnx(checkpoint: Path, cache: Path = CACHE) -> Path:
    """``checkpoint`` exported to ONNX the obvious way (mel -> scores, embedding), cached by the
    checkpoint's bytes. Outside the timed part: a prototype exports once."""
    import torch

    from training.models import load_checkpoint
    from training.serving import ServingGraph

    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    path = cache / f"{checkpoint.stem}-{digest}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    serving = ServingGraph([load_checkpoint(checkpoint)[0]]).eval()
    partial = path.with_suffix(".partial")
    torch.onnx.export(
        serving,
        (torch.randn(2, PATCH_FRAMES, N_MELS),),
        str(partial),
        input_names=["mel"],
        output_names=["scores", "embedding"],
        dynamic_axes={"mel": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    partial.rename(path)
    return path


def load(path: Path) -> np.ndarray:
    """``librosa.load(sr=16000)``: mono float32 at SAMPLE_RATE. Where librosa has no decoder for
    the file (AAC: libsndfile cannot read it and audioread finds no ffmpeg program here), PyAV
    decodes it and librosa resamples as its ``load`` does (channel mean, soxr_hq)."""
    try:
        return librosa.load(path, sr=SAMPLE_RATE)[0]
    except NoBackendError:
        pass
    with av.open(str(path)) as container:
        rate = container.streams.audio[0].rate
        wave = np.concatenate(
            [frame.to_ndarray().reshape(frame.layout.nb_channels, -1) for frame in container.decode(audio=0)], axis=1
        )
    return librosa.resample(wave.mean(axis=0), orig_sr=rate, target_sr=SAMPLE_RATE, res_type="soxr_hq")


def mel_patches(path: Path) -> tuple[np.ndarray, float]:
    """musicnn's own extractor, in float32: ([n, PATCH_FRAMES, N_MELS], duration in s)."""
    wave = load(path)
    mel = librosa.feature.melspectrogram(y=wave, sr=SAMPLE_RATE, hop_length=HOP_LENGTH, n_fft=N_FFT, n_mels=N_MELS).T
    logmel = np.log10(1 + LOG_SCALE * mel).astype(np.float32)
    n = max(1, len(logmel) // PATCH_FRAMES)
    if len(logmel) < PATCH_FRAMES:
        logmel = np.tile(logmel, (-(-PATCH_FRAMES // len(logmel)), 1))
    return logmel[: n * PATCH_FRAMES].reshape(n, PATCH_FRAMES, N_MELS), len(wave) / SAMPLE_RATE


async def run(files: list[Path], bootstrap: str, topic: str) -> dict:
    models = [plain_onnx(c) for c in CHECKPOINTS]
    sessions = [ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]) for model in models]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    audio_s = 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        for path in files:
            patches, duration = mel_patches(path)
            record = {"track": path.name}
            for checkpoint, session in zip(CHECKPOINTS, sessions):
                runs = [
                    session.run(["scores", "embedding"], {"mel": patches[i : i + SLICE]})
                    for i in range(0, len(patches), SLICE)
                ]
                scores, embedding = (np.concatenate(parts).mean(axis=0) for parts in zip(*runs))
                record[checkpoint.stem] = {
                    "scores": [round(float(s), 6) for s in scores],
                    "embedding": [round(float(e), 4) for e in embedding],
                }
            await producer.send_and_wait(topic, json.dumps(record).encode(), key=path.name.encode())
            audio_s += duration
    finally:
        await producer.stop()
    return {
        "files": len(files),
        "audio_s": audio_s,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", default="bench.naive")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.files, args.bootstrap, args.topic))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One-off conversion of musicnn's TensorFlow checkpoints into moodstream checkpoints.

    moodstream-train import-musicnn --tf-python /path/to/tf-env/bin/python

The TensorFlow side (``_tf_musicnn.py``) runs in its own environment with ``tensorflow-cpu``
and ``musicnn==0.1.0`` (``--no-deps``); TensorFlow is never needed at run time or in CI. This
side maps the variables onto :class:`training.models.musicnn.Musicnn`, writes
``training/weights/musicnn_{msd,mtt}.pt`` and a parity fixture: patches of real music with the
original graph's outputs, which ``tests/training/test_musicnn.py`` checks the port against.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.stages import audio, frontend
from training.models import save_checkpoint
from training.models.musicnn import Musicnn, MusicnnDims

REPO = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = REPO / "training" / "weights"
FIXTURE = REPO / "tests" / "fixtures" / "musicnn_parity.npz"
#: moodstream model name -> musicnn checkpoint folder
MODELS = {"musicnn_msd": "MSD_musicnn", "musicnn_mtt": "MTT_musicnn"}
VERSION = "1"
_SOURCE = "musicnn 0.1.0 (MTG-UPF, ISC licence), converted from its TensorFlow checkpoint {}"
PATCHES_PER_CLIP = 3


def state_dict_from_tf(variables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """TensorFlow variable name -> array, as musicnn's graph creates them, to a state dict of
    :class:`Musicnn`. The graph names layers by creation order (conv2d, conv2d_1, ...)."""

    def conv2d(i: int) -> dict[str, np.ndarray]:
        name = "conv2d" + (f"_{i}" if i else "")
        # TF kernel [kh, kw, in, out] -> torch [out, in, kh, kw]
        return {"weight": variables[f"{name}/kernel"].transpose(3, 2, 0, 1), "bias": variables[f"{name}/bias"]}

    def conv1d(i: int) -> dict[str, np.ndarray]:
        # The mid-end's TF kernels are [7, C_in, 1, out] over a [T, C_in, 1] image: a 1-D conv.
        kernel = variables[f"conv2d_{i}/kernel"][:, :, 0, :]
        return {"weight": kernel.transpose(2, 1, 0), "bias": variables[f"conv2d_{i}/bias"]}

    def bn(i: int) -> dict[str, np.ndarray]:
        name = "batch_normalization" + (f"_{i}" if i else "")
        return {
            "weight": variables[f"{name}/gamma"],
            "bias": variables[f"{name}/beta"],
            "running_mean": variables[f"{name}/moving_mean"],
            "running_var": variables[f"{name}/moving_variance"],
        }

    def dense(name: str) -> dict[str, np.ndarray]:
        return {"weight": variables[f"{name}/kernel"].T, "bias": variables[f"{name}/bias"]}

    parts: dict[str, dict[str, np.ndarray]] = {"input_bn": bn(0)}
    for i in range(5):  # two timbral, three temporal branches, in graph order
        parts[f"frontend.{i}.conv"] = conv2d(i)
        parts[f"frontend.{i}.bn"] = bn(i + 1)
    for i in range(3):
        parts[f"midend.{i}.conv"] = conv1d(i + 5)
        parts[f"midend.{i}.bn"] = bn(i + 6)
    parts["pool_bn"] = bn(9)
    parts["dense"] = dense("dense")
    parts["dense_bn"] = bn(10)
    parts["classifier"] = dense("dense_1")
    state = {
        f"{module}.{key}": torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        for module, params in parts.items()
        for key, value in params.items()
    }
    for module in [m for m in parts if m.endswith("bn")]:
        state[f"{module}.num_batches_tracked"] = torch.tensor(0)
    return state


def fixture_patches(clips: list[Path]) -> np.ndarray:
    """The first PATCHES_PER_CLIP patches of each clip: [n, PATCH_FRAMES, N_MELS] float32."""
    out = []
    for clip in clips:
        stream = audio.decode(clip.read_bytes(), max_duration_s=3600)
        out.append(frontend.patches_from_chunks(stream.chunks).patches[:PATCHES_PER_CLIP])
    return np.concatenate(out)


def run_tensorflow(tf_python: str, patches: np.ndarray) -> dict[str, np.ndarray]:
    """Runs ``_tf_musicnn.py`` in the TensorFlow environment; returns its arrays."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "in.npz"), Path(tmp, "out.npz")
        np.savez(src, patches=patches)
        subprocess.run([tf_python, str(Path(__file__).with_name("_tf_musicnn.py")), str(src), str(dst)], check=True)
        with np.load(dst) as result:
            return dict(result)


def compare(tf_python: str, files: list[Path], repository: Path) -> list[dict[str, float | str]]:
    """moodstream's whole path (PyAV, torchaudio, onnxruntime) against the original musicnn
    (librosa, TensorFlow) on the same files, per model: with the original's float16
    compression as published, and with the same compression in float32."""
    from pipeline.stages.analysis import analyse
    from pipeline.stages.scoring import OnnxScorer

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "scores.npz")
        subprocess.run(
            [tf_python, str(Path(__file__).with_name("_tf_musicnn.py")), "--tag", str(out), *map(str, files)],
            check=True,
            capture_output=True,
        )
        with np.load(out) as result:
            original = dict(result)
    report = []
    for name, folder in MODELS.items():
        scorer = OnnxScorer(repository, name)
        ours = np.stack(
            [
                scorer.score_sync(analyse(f.read_bytes(), max_duration_s=3600, min_duration_s=0).patches.patches).mean(
                    axis=0
                )
                for f in files
            ]
        )
        for variant in ("f32", "f16"):
            theirs = original[f"{folder}/{variant}"]
            top_theirs, top_ours = np.argsort(-theirs, axis=1)[:, :5], np.argsort(-ours, axis=1)[:, :5]
            report.append(
                {
                    "model": name,
                    "original_compression": {"f32": "float32", "f16": "float16 (as published)"}[variant],
                    "files": len(files),
                    "max_abs_diff": float(np.abs(ours - theirs).max()),
                    "median_track_max_abs_diff": float(np.median(np.abs(ours - theirs).max(axis=1))),
                    "top5_overlap": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top_theirs, top_ours)])),
                    "top5_same_order": float(np.mean([list(a) == list(b) for a, b in zip(top_theirs, top_ours)])),
                    "f16_overflow_bins": float(original["overflow"].mean()),
                }
            )
    return report


def convert(
    tf_python: str, clips: list[Path], weights_dir: Path = WEIGHTS_DIR, fixture: Path = FIXTURE
) -> dict[str, float]:
    """Writes both checkpoints and the parity fixture; returns max |Δprob| per model."""
    patches = fixture_patches(clips)
    tf_out = run_tensorflow(tf_python, patches)
    fixture_arrays: dict[str, np.ndarray] = {"patches": patches}
    worst = {}
    for name, folder in MODELS.items():
        variables = {k.split("/", 1)[1]: v for k, v in tf_out.items() if k.startswith(folder + "/")}
        labels = [str(x) for x in variables.pop("labels")]
        tf_probs, tf_embedding = variables.pop("probs"), variables.pop("embedding")
        model = Musicnn(MusicnnDims(n_classes=len(labels)))
        model.load_state_dict(state_dict_from_tf(variables))
        model.eval()
        with torch.inference_mode():
            logits, _embedding = model(torch.from_numpy(patches))
        worst[name] = float(np.abs(torch.sigmoid(logits).numpy() - tf_probs).max())
        save_checkpoint(
            weights_dir / f"{name}.pt",
            model,
            arch="musicnn",
            labels=labels,
            version=VERSION,
            source=_SOURCE.format(folder),
        )
        fixture_arrays[f"{name}/probs"] = tf_probs
        fixture_arrays[f"{name}/embedding"] = tf_embedding
    fixture.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(fixture, **fixture_arrays)
    return worst

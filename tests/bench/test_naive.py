"""The naive baseline computes what moodstream serves: its plainly exported networks give the
model repository's scores (which are the inference form of the same checkpoints)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from bench import naive
from pipeline.settings import DEFAULT_MODEL_REPOSITORY


def test_plain_export_scores_like_the_served_networks_and_is_cached(example_clips, tmp_path):
    patches, _ = naive.mel_patches(example_clips[0])
    for checkpoint in naive.CHECKPOINTS:
        plain = naive.plain_onnx(checkpoint, tmp_path)
        assert naive.plain_onnx(checkpoint, tmp_path) == plain  # the second call reads the cache
        served = DEFAULT_MODEL_REPOSITORY / checkpoint.stem / "1" / "model.onnx"
        ops = {node.op_type for node in onnx.load(str(plain)).graph.node}
        assert "BatchNormalization" in ops and "ReduceMax" in ops  # the trained graph, not rearranged
        want = ort.InferenceSession(str(served), providers=["CPUExecutionProvider"]).run(["scores"], {"mel": patches})[
            0
        ]
        got = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(["scores"], {"mel": patches})[0]
        assert np.abs(got - want).max() <= 1e-4

"""Heads learned from human labels: what a listener would call a track, as calibrated probabilities.

A head set is trained on people's judgments (``moodstream-train heads``: the 4Q set's quadrants
and its AllMusic mood words) on top of what the served networks compute per patch, and travels
with the model entry — its config's ``moodstream_heads`` parameter (JSON), next to the networks'
labels — never in code. One head set gives, for any group of a track's patches (a timeline
segment, or the whole track):

    network outputs of the group's patches    scores [n, labels] and embedding [n, dim] per network
      -> features                             per input (a network's scores, through the logit
                                              when asked, or its embedding): each statistic over
                                              the patches (mean, std)                      [D]
      -> each task's members                  standardise, dense layers, logits
      -> quadrant                             softmax(logits / temperature): P(happy, angry,
                                              sad, relaxed), the mean over members          [4]
      -> families                             sigmoid(a * logit + b) per family (Platt), the
                                              mean over members                            [F]

A whole track's probabilities are the patch-weighted mean of its segments' (``track`` is
``"segments"``) or the head applied to all its patches at once (``"whole"``): the head set says
which, as trained. Arrays travel as base64 of little-endian float32 with their shape.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.errors import ConfigError

#: The four quadrants of Russell's plane, in the order heads output them (Q1..Q4 of the 4Q set).
QUADRANTS = ("happy", "angry", "sad", "relaxed")
STATISTICS = ("mean", "std")
TRANSFORMS = ("none", "logit")
OUTPUTS = ("scores", "embedding")
#: Probabilities are clipped here before the logit transform of a network's scores.
_P_CLIP = 1e-6


class PatchOutputs(Protocol):
    """One network's per-patch outputs (:class:`pipeline.stages.scoring.NetworkOutput`)."""

    scores: np.ndarray  # [n, labels]
    embedding: np.ndarray  # [n, dim]


@dataclass(frozen=True)
class Input:
    """One source of features: a network's scores or embedding, optionally through the logit."""

    network: str
    output: str  # one of OUTPUTS
    transform: str = "none"  # one of TRANSFORMS


@dataclass(frozen=True)
class Dense:
    weight: np.ndarray  # [in, out]
    bias: np.ndarray  # [out]
    activation: str  # "relu" or "none"


@dataclass(frozen=True)
class Member:
    """One model of a task's ensemble: standardise, then dense layers to the task's logits."""

    columns: np.ndarray | None  # [d] feature columns it reads (None: all)
    mean: np.ndarray  # [d]
    scale: np.ndarray  # [d]
    layers: tuple[Dense, ...]
    temperature: float  # quadrant: logits / temperature before the softmax
    platt: tuple[np.ndarray, np.ndarray] | None  # families: (a [F], b [F]) of sigmoid(a * z + b)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """features: [m, D] -> [m, outputs]."""
        x = features if self.columns is None else features[:, self.columns]
        x = (x - self.mean) / self.scale
        for layer in self.layers:
            x = x @ layer.weight + layer.bias
            if layer.activation == "relu":
                x = np.maximum(x, 0.0)
        return x


@dataclass(frozen=True)
class Task:
    labels: tuple[str, ...]
    members: tuple[Member, ...]
    kind: str  # "softmax" (one label of several: the quadrant) or "sigmoid" (each label alone)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """features: [m, D] -> [m, len(labels)] probabilities, the mean over the members."""
        parts = []
        for member in self.members:
            z = member.logits(features)
            if self.kind == "softmax":
                z = z / member.temperature
                z = np.exp(z - z.max(axis=1, keepdims=True))
                parts.append(z / z.sum(axis=1, keepdims=True))
            else:
                a, b = member.platt if member.platt is not None else (np.ones(z.shape[1]), np.zeros(z.shape[1]))
                parts.append(1.0 / (1.0 + np.exp(-(a * z + b))))
        return np.mean(parts, axis=0)


@dataclass(frozen=True)
class Heads:
    """A model entry's heads; :meth:`from_json` reads the config parameter."""

    version: str
    trained_on: dict[str, Any]  # data set, clips, fingerprint, the family word lists
    inputs: tuple[Input, ...]
    statistics: tuple[str, ...]
    track: str  # "segments" or "whole"
    quadrant: Task
    families: Task | None
    doc: dict[str, Any]  # the JSON it was read from, for its id

    @property
    def id(self) -> str:
        """8 hex digits naming the head set by its content (part of the served version)."""
        return hashlib.sha256(json.dumps(self.doc, sort_keys=True).encode()).hexdigest()[:8]

    @classmethod
    def from_json(cls, doc: dict[str, Any], networks: dict[str, tuple[int, int]]) -> Heads:
        """``doc``: the ``moodstream_heads`` parameter; ``networks``: name -> (labels, embedding
        dim) of the model's networks, which the inputs must name. ConfigError says what is wrong."""
        try:
            inputs = tuple(Input(i["network"], i["output"], i.get("transform", "none")) for i in doc["inputs"])
            statistics = tuple(doc["statistics"])
            if unknown := [s for s in statistics if s not in STATISTICS]:
                raise ConfigError(f"heads use unknown statistics {unknown}; known: {STATISTICS}")
            width = sum(_input_width(i, networks) for i in inputs) * len(statistics)
            heads = cls(
                version=str(doc["version"]),
                trained_on=dict(doc["trained_on"]),
                inputs=inputs,
                statistics=statistics,
                track=doc.get("track", "segments"),
                quadrant=_task(doc["quadrant"], "softmax", width),
                families=_task(doc["families"], "sigmoid", width) if doc.get("families") else None,
                doc=doc,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid heads ({exc!r}); train them again with `moodstream-train heads`") from None
        if heads.track not in ("segments", "whole"):
            raise ConfigError(f"heads' track must be 'segments' or 'whole', got {heads.track!r}")
        if heads.quadrant.labels != QUADRANTS:
            raise ConfigError(f"the quadrant head's labels must be {QUADRANTS}, got {heads.quadrant.labels}")
        return heads

    def features(self, outputs: dict[str, PatchOutputs], rows: list[np.ndarray]) -> np.ndarray:
        """The feature vector of each group of patches: ``rows`` are index arrays (or boolean
        masks) into the patches -> [len(rows), D]."""
        return row_features(patch_features(self.inputs, outputs), self.statistics, rows)

    def predict(self, outputs: dict[str, PatchOutputs], rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """(quadrant probabilities [len(rows), 4], family probabilities [len(rows), F] or None)."""
        features = self.features(outputs, rows)
        families = self.families.probabilities(features) if self.families is not None else None
        return self.quadrant.probabilities(features), families


def patch_features(inputs: tuple[Input, ...], outputs: dict[str, PatchOutputs]) -> np.ndarray:
    """Each patch's inputs side by side: [n, d] float64 (scores through the logit where asked).
    Training computes its features with this very function, so served heads see what they
    learned from."""
    parts = []
    for source in inputs:
        out = outputs[source.network]
        values = np.asarray(out.scores if source.output == "scores" else out.embedding, np.float64)
        if source.transform == "logit":
            p = np.clip(values, _P_CLIP, 1 - _P_CLIP)
            values = np.log(p / (1 - p))
        parts.append(values)
    return np.concatenate(parts, axis=1)


def row_features(per_patch: np.ndarray, statistics: tuple[str, ...], rows: list[np.ndarray]) -> np.ndarray:
    """per_patch: [n, d]; rows: index arrays or masks of patch groups -> [len(rows), d * len(statistics)]."""
    return np.stack([np.concatenate([_statistic(per_patch[r], s) for s in statistics]) for r in rows])


def _statistic(x: np.ndarray, name: str) -> np.ndarray:
    """x: [n, d] -> [d]; the std of a single patch is 0, as numpy's population std gives."""
    return x.mean(axis=0) if name == "mean" else x.std(axis=0)


def _input_width(source: Input, networks: dict[str, tuple[int, int]]) -> int:
    if source.network not in networks:
        raise ValueError(f"input network {source.network!r} is not one of the model's {sorted(networks)}")
    if source.output not in OUTPUTS or source.transform not in TRANSFORMS:
        raise ValueError(f"input {source} must read one of {OUTPUTS} through one of {TRANSFORMS}")
    labels, dim = networks[source.network]
    return labels if source.output == "scores" else dim


def _task(doc: dict[str, Any], kind: str, width: int) -> Task:
    labels = tuple(doc["labels"])
    members = []
    for m in doc["members"]:
        columns = decode_array(m["columns"]).astype(np.int64) if m.get("columns") is not None else None
        d = len(columns) if columns is not None else width
        if columns is not None and (columns.min() < 0 or columns.max() >= width):
            raise ValueError(f"member columns outside the {width} features")
        layers = tuple(
            Dense(decode_array(layer["weight"]), decode_array(layer["bias"]), layer.get("activation", "none"))
            for layer in m["layers"]
        )
        fan_in = d
        for layer in layers:
            if layer.weight.shape[0] != fan_in or layer.bias.shape != (layer.weight.shape[1],):
                raise ValueError(f"layer of shape {layer.weight.shape} + {layer.bias.shape} after {fan_in} features")
            fan_in = layer.weight.shape[1]
        if fan_in != len(labels):
            raise ValueError(f"a member outputs {fan_in} values for {len(labels)} labels")
        platt = (decode_array(m["platt"]["a"]), decode_array(m["platt"]["b"])) if m.get("platt") else None
        members.append(
            Member(
                columns,
                decode_array(m["mean"]),
                decode_array(m["scale"]),
                layers,
                float(m.get("temperature", 1.0)),
                platt,
            )
        )
    if not members:
        raise ValueError("a task needs at least one member")
    return Task(labels, tuple(members), kind)


def encode_array(values: np.ndarray) -> dict[str, Any]:
    """An array as JSON: its shape and base64 of its little-endian float32 values."""
    a = np.ascontiguousarray(values, dtype="<f4")
    return {"shape": list(a.shape), "float32": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(doc: dict[str, Any]) -> np.ndarray:
    """The inverse of :func:`encode_array`: a float64 array of the stated shape."""
    raw = np.frombuffer(base64.b64decode(doc["float32"]), dtype="<f4")
    return raw.reshape(doc["shape"]).astype(np.float64)

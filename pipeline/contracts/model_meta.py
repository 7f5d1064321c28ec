"""What travels with a served model: its networks' labels, tasks and versions, the frontend
constants, the mood calibration and the heads learned from human labels.

They live in the model's ``config.pbtxt`` as JSON string parameters, ``moodstream`` (written by
``moodstream-train export``), ``moodstream_calibration`` (written by ``moodstream-train
calibrate-moods``) and ``moodstream_heads`` (written by ``moodstream-train heads``), so the
repository entry is the single source of truth and a Triton server hands them to a worker that
has no access to the repository's files.

A served model runs one or more *networks* on the same input in one request: ``musicnn`` runs
``musicnn_msd`` and ``musicnn_mtt``. Which networks make it up, and which output tensors carry
each network's scores and embedding, is this metadata, never code::

    {"version": "1", "frontend": {...},
     "networks": [{"name": "musicnn_msd", "version": "1", "task": "tags", "labels": [...],
                   "embedding_dim": 200, "scores": "musicnn_msd_scores",
                   "embedding": "musicnn_msd_embedding"}, ...]}

A single-network entry may use the original flat form (``version``, ``task``, ``labels``,
``embedding_dim`` at the top, outputs ``scores`` and ``embedding``); it reads as one network
named after the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from pipeline.errors import ConfigError
from pipeline.stages.frontend import frontend_constants

META_PARAMETER = "moodstream"
CALIBRATION_PARAMETER = "moodstream_calibration"
HEADS_PARAMETER = "moodstream_heads"
TASKS = ("tags", "classes", "va", "va_steps")
#: Output tensor names of a single-network entry in the flat form.
SCORES = "scores"
EMBEDDING = "embedding"


@dataclass(frozen=True)
class Network:
    """One network of a served model and the output tensors that carry its results."""

    name: str
    version: str
    task: str  # one of TASKS
    labels: tuple[str, ...]  # score columns, in output order
    embedding_dim: int
    scores_output: str  # tensor [batch, len(labels)]
    embedding_output: str  # tensor [batch, embedding_dim]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "labels": list(self.labels),
            "embedding_dim": self.embedding_dim,
            "scores": self.scores_output,
            "embedding": self.embedding_output,
        }


@dataclass(frozen=True)
class ModelMeta:
    name: str
    version: str  # as exported; what outputs report is :attr:`served_version`
    frontend: dict[str, Any]  # pipeline.stages.frontend.frontend_constants() at training time
    networks: tuple[Network, ...]
    calibration: dict[str, Any] | None = None  # see pipeline.stages.taxonomy.Calibration
    heads: dict[str, Any] | None = None  # see pipeline.stages.heads.Heads

    @property
    def served_version(self) -> str:
        """The version every output reports: the exported version, plus the calibration's and
        the heads' ids when there are some, so that recalibrating or retraining the heads
        changes the dedup key of the outputs."""
        version = self.version
        if self.calibration:
            version += f"+cal.{calibration_id(self.calibration)}"
        if self.heads:
            version += f"+heads.{calibration_id(self.heads)}"
        return version

    @property
    def network(self) -> Network:
        """The only network of a single-network model (training and export code use this)."""
        if len(self.networks) != 1:
            raise ConfigError(
                f"model {self.name} runs {len(self.networks)} networks; name one of {[n.name for n in self.networks]}"
            )
        return self.networks[0]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.network.labels

    @property
    def task(self) -> str:
        return self.network.task

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every output tensor, in the order the networks are listed (scores, embedding each)."""
        return tuple(name for n in self.networks for name in (n.scores_output, n.embedding_output))

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "frontend": self.frontend, "networks": [n.to_json() for n in self.networks]}

    def check_frontend(self) -> None:
        """Raise ConfigError when the model expects other features than this code computes."""
        if self.frontend != frontend_constants():
            raise ConfigError(
                f"model {self.name} v{self.version} was trained on frontend {self.frontend}, "
                f"this worker computes {frontend_constants()}"
            )


def label_columns(networks: tuple[Network, ...] | list[Network]) -> dict[str, slice]:
    """network name -> its labels' columns when every network's labels lie side by side, in order."""
    columns, start = {}, 0
    for n in networks:
        columns[n.name] = slice(start, start + len(n.labels))
        start += len(n.labels)
    return columns


def calibration_id(calibration: dict[str, Any]) -> str:
    """8 hex digits naming a calibration (or a head set) by its content."""
    return hashlib.sha256(json.dumps(calibration, sort_keys=True).encode()).hexdigest()[:8]


def from_config(config: pb.ModelConfig) -> ModelMeta:
    """The metadata of a parsed model config (from a file or from Triton's gRPC API)."""
    try:
        raw = json.loads(config.parameters[META_PARAMETER].string_value)
        if "networks" in raw:
            networks = tuple(_network(n) for n in raw["networks"])
        else:  # the flat single-network form
            networks = (_network({**raw, "name": config.name, "scores": SCORES, "embedding": EMBEDDING}),)
        calibration = heads = None
        if CALIBRATION_PARAMETER in config.parameters:
            calibration = json.loads(config.parameters[CALIBRATION_PARAMETER].string_value)
        if HEADS_PARAMETER in config.parameters:
            heads = json.loads(config.parameters[HEADS_PARAMETER].string_value)
        meta = ModelMeta(
            name=config.name,
            version=str(raw["version"]),
            frontend=raw["frontend"],
            networks=networks,
            calibration=calibration,
            heads=heads,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"model {config.name!r} has no valid {META_PARAMETER!r} parameter in its config "
            f"({exc!r}); export it with `moodstream-train export`"
        ) from None
    for network in meta.networks:
        if network.task not in TASKS:
            raise ConfigError(f"model {meta.name}: network {network.name}: unknown task {network.task!r}")
    if not meta.networks or len({n.name for n in meta.networks}) != len(meta.networks):
        raise ConfigError(
            f"model {meta.name}: networks must be listed once each, got {[n.name for n in meta.networks]}"
        )
    declared = {o.name for o in config.output}
    missing = sorted(set(meta.outputs) - declared) if declared else []
    if missing:
        raise ConfigError(f"model {meta.name}: its metadata names outputs the config does not declare: {missing}")
    return meta


def _network(raw: dict[str, Any]) -> Network:
    return Network(
        name=str(raw["name"]),
        version=str(raw["version"]),
        task=raw["task"],
        labels=tuple(raw["labels"]),
        embedding_dim=int(raw["embedding_dim"]),
        scores_output=str(raw["scores"]),
        embedding_output=str(raw["embedding"]),
    )


def config_path(repository: Path, name: str, config_name: str | None = None) -> Path:
    entry = repository / name
    return entry / "configs" / f"{config_name}.pbtxt" if config_name else entry / "config.pbtxt"


def read_config(repository: Path, name: str, config_name: str | None = None) -> pb.ModelConfig:
    """Parse ``repository/name/config.pbtxt`` (or ``configs/<config_name>.pbtxt``)."""
    path = config_path(repository, name, config_name)
    if not path.is_file():
        known = (
            sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
            if repository.is_dir()
            else []
        )
        raise ConfigError(f"no model {name!r} in {repository} (no {path}); models there: {known}")
    try:
        return text_format.Parse(path.read_text(), pb.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def read_meta(repository: Path, name: str) -> ModelMeta:
    """The metadata of model ``name`` in a local model repository."""
    return from_config(read_config(repository, name))

"""What travels with a served model: its labels, task, version and frontend constants.

They live in the model's ``config.pbtxt`` as the JSON string parameter ``moodstream`` (written
by ``moodstream-train export``), so the repository entry is the single source of truth and a
Triton server can hand them to a worker that has no access to the repository's files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from pipeline.errors import ConfigError
from pipeline.features import frontend_constants

META_PARAMETER = "moodstream"
TASKS = ("tags", "classes", "va", "va_steps")


@dataclass(frozen=True)
class ModelMeta:
    name: str
    version: str
    task: str  # one of TASKS
    labels: tuple[str, ...]  # output names in output order
    frontend: dict[str, Any]  # pipeline.features.frontend_constants() at training time
    embedding_dim: int

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "task": self.task,
            "labels": list(self.labels),
            "frontend": self.frontend,
            "embedding_dim": self.embedding_dim,
        }

    def check_frontend(self) -> None:
        """Raise ConfigError when the model expects other features than this code computes."""
        if self.frontend != frontend_constants():
            raise ConfigError(
                f"model {self.name} v{self.version} was trained on frontend {self.frontend}, "
                f"this worker computes {frontend_constants()}"
            )


def from_config(config: pb.ModelConfig) -> ModelMeta:
    """The metadata of a parsed model config (from a file or from Triton's gRPC API)."""
    try:
        raw = json.loads(config.parameters[META_PARAMETER].string_value)
        meta = ModelMeta(
            name=config.name,
            version=str(raw["version"]),
            task=raw["task"],
            labels=tuple(raw["labels"]),
            frontend=raw["frontend"],
            embedding_dim=int(raw["embedding_dim"]),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"model {config.name!r} has no valid {META_PARAMETER!r} parameter in its config "
            f"({exc!r}); export it with `moodstream-train export`"
        ) from None
    if meta.task not in TASKS:
        raise ConfigError(f"model {meta.name}: unknown task {meta.task!r}")
    return meta


def read_config(repository: Path, name: str, config_name: str | None = None) -> pb.ModelConfig:
    """Parse ``repository/name/config.pbtxt`` (or ``configs/<config_name>.pbtxt``)."""
    entry = repository / name
    path = entry / "configs" / f"{config_name}.pbtxt" if config_name else entry / "config.pbtxt"
    if not path.is_file():
        known = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()) if repository.is_dir() else []
        raise ConfigError(f"no model {name!r} in {repository} (no {path}); models there: {known}")
    try:
        return text_format.Parse(path.read_text(), pb.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def read_meta(repository: Path, name: str) -> ModelMeta:
    """The metadata of model ``name`` in a local model repository."""
    return from_config(read_config(repository, name))

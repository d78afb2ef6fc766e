"""Backends turn a model version directory into instances the Rust scheduler can drive.

Every backend returns a :class:`LoadedModel`: the served interface plus one object per instance,
each with ``execute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..tensor import Tensor


class LoadError(RuntimeError):
    """A model version could not be loaded; the message is shown to users as the reason."""


@dataclass
class LoadedModel:
    platform: str
    max_batch_size: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    instances: list[Any] = field(default_factory=list)


@dataclass
class LoadContext:
    """Everything a backend needs to load one version of one model."""

    name: str
    version: int
    model_dir: Any  # pathlib.Path
    version_dir: Any  # pathlib.Path
    config: Any  # fastserve.config.ModelConfig

    def initialize_args(self, instance_index: int) -> dict[str, Any]:
        """The dict a Python model's ``initialize`` receives."""
        return {
            "model_name": self.name,
            "model_version": self.version,
            "model_dir": str(self.model_dir),
            "version_dir": str(self.version_dir),
            "instance_index": instance_index,
            "instance_kind": self.config.instance_group.kind,
            "max_batch_size": self.config.max_batch_size or 0,
            "config": self.config.raw,
            "parameters": dict(self.config.parameters),
        }


def detect_backend(version_dir: Any) -> str | None:
    """The backend a version's files imply, when config.toml does not say."""
    if (version_dir / "model.py").is_file():
        return "python"
    if (version_dir / "model.onnx").is_file():
        return "onnxruntime"
    return None


def load_version(ctx: LoadContext) -> LoadedModel:
    backend = ctx.config.backend or detect_backend(ctx.version_dir)
    if backend is None:
        raise LoadError("no model file found (expected model.onnx or model.py) and config.toml sets no backend")
    if backend == "python":
        from . import python

        return python.load(ctx)
    if backend == "onnxruntime":
        from . import onnxruntime

        return onnxruntime.load(ctx)
    raise LoadError(f"unknown backend '{backend}'")

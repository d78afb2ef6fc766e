"""Backends turn a model version directory into instances the Rust scheduler can drive.

Every backend returns a :class:`LoadedModel`: the served interface plus one object per instance,
each with ``execute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]``.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import BACKEND_PARAMETERS, check_parameters
from ..logs import model_fields
from ..tensor import Tensor

log = logging.getLogger("fastserve.backends")


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
    # The instance_index of the first instance made (a replacement or a worker makes one instance
    # for a later seat).
    first_instance: int = 0

    def model_file(self, default: str) -> Any:
        """The version's model file: ``default_model_filename`` (Triton's key), else ``default``."""
        return self.version_dir / (self.config.default_model_filename or default)

    def initialize_args(self, instance_index: int, device_id: int | None = None) -> dict[str, Any]:
        """The dict a Python model's ``initialize`` receives."""
        return {
            "device_id": device_id,
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


def module_name(name: str, version: int) -> str:
    """The ``sys.modules`` key of a Python model version's ``model.py``."""
    return f"fastserve_models.{name}.v{version}"


def set_module(name: str, version: int, module: Any) -> None:
    """Puts ``module`` (None: nothing) back as the version's ``sys.modules`` entry."""
    key = module_name(name, version)
    if module is None:
        sys.modules.pop(key, None)
    else:
        sys.modules[key] = module


def release_version(name: str, version: int) -> None:
    """Forgets what the process keeps of an unloaded version besides its instances: a Python
    model's module stays in ``sys.modules`` (with all its module-level data) until dropped here."""
    set_module(name, version, None)


def finalize_instances(instances: list[Any]) -> None:
    """Calls ``finalize`` on instances that were built but will never be served (a failed or
    aborted load), as an unload would; one that raises does not stop the others."""
    for instance in instances:
        finalize = getattr(instance, "finalize", None)
        if not callable(finalize):
            continue
        try:
            finalize()
        except KeyboardInterrupt:
            raise
        except BaseException:  # a model's sys.exit() must not stop the server either
            log.exception("finalize() of an instance that was never served failed")


# Used when a model's first dimension is dynamic and config.toml sets no max_batch_size.
DEFAULT_MAX_BATCH_SIZE = 64


def reconcile(declared: list[Tensor], model: list[Tensor], what: str, subset_ok: bool) -> list[Tensor]:
    """Config may restate or narrow (-1 -> fixed) the model's tensors, never contradict them."""
    if not declared:
        return model
    by_name = {t.name: t for t in model}
    for t in declared:
        m = by_name.get(t.name)
        if m is None:
            raise LoadError(f"config.toml declares {what} '{t.name}', but the model's {what}s are {list(by_name)}")
        if m.datatype != t.datatype:
            raise LoadError(f"config.toml declares {what} '{t.name}' as {t.datatype}, the model has {m.datatype}")
        # A reshaped tensor: the model has its reshape; clients see its dims.
        dims = t.model_dims
        ok = len(m.dims) == len(dims) and all(md == -1 or md == td for md, td in zip(m.dims, dims, strict=True))
        if not ok:
            what_dims = "reshape" if t.reshape is not None else "dims"
            raise LoadError(f"config.toml declares {what} '{t.name}' with {what_dims} {dims}, the model has {m.dims}")
    if not subset_ok and {t.name for t in declared} != set(by_name):
        raise LoadError(f"config.toml declares {what}s {[t.name for t in declared]}, the model needs {list(by_name)}")
    return list(declared)


def cuda_device_count() -> int | None:
    """How many CUDA devices this process sees (honouring CUDA_VISIBLE_DEVICES), or None when that
    cannot be told: asked of the driver directly, so it works without CuPy or a CUDA toolkit."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0  # no NVIDIA driver: no CUDA device
    count = ctypes.c_int(0)
    try:
        if driver.cuInit(0) != 0:
            return 0
        if driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return None
    except AttributeError:
        return None
    return count.value


def check_gpus(gpus: list[int], who: str) -> None:
    """Refuses device ids this process cannot see, before a runtime fails less clearly."""
    visible = cuda_device_count()
    if visible is None:
        return
    missing = [g for g in gpus if g >= visible]
    if missing:
        raise LoadError(
            f"{who}: [instance_group] gpus {gpus} asks for CUDA device(s) {missing}, "
            f"but this process sees {visible} CUDA device(s)"
        )


def detect_backend(version_dir: Any, filename: str | None = None) -> str | None:
    """The backend a version's files (or ``default_model_filename``) imply, when config.toml does not say."""
    if filename is not None:
        suffixes = {".py": "python", ".xml": "openvino", ".onnx": "onnxruntime"}
        return suffixes.get(Path(filename).suffix) if (version_dir / filename).is_file() else None
    if (version_dir / "model.py").is_file():
        return "python"
    if (version_dir / "model.xml").is_file():
        return "openvino"
    if (version_dir / "model.onnx").is_file():
        return "onnxruntime"
    return None


def load_version(ctx: LoadContext) -> LoadedModel:
    backend = ctx.config.backend or detect_backend(ctx.version_dir, ctx.config.default_model_filename)
    if backend is None:
        raise LoadError(
            "no model file found (expected model.onnx, model.xml or model.py) and config.toml sets no backend"
        )
    unused = check_parameters(backend, ctx.config.parameters)  # a typo of a known key raises ConfigError
    if unused:
        log.warning(
            "model '%s': [parameters] %s not read by the %s backend (it reads %s)",
            *(ctx.name, ", ".join(unused), backend, ", ".join(BACKEND_PARAMETERS[backend])),
            extra=model_fields(ctx.name, ctx.version),
        )
    if ctx.config.device != "cpu" and backend != "python":
        raise LoadError(
            f'device = "{ctx.config.device}" applies to python models; '
            f"{backend} models choose their device with [instance_group] kind or [parameters]"
        )
    if ctx.config.instance_group.isolation == "process":
        from .. import isolation

        return isolation.load(ctx)
    if backend == "ensemble":
        cfg = ctx.config
        if not cfg.inputs or not cfg.outputs:
            raise LoadError("an ensemble must declare its [[input]]s and [[output]]s")
        # No instances here: the core runs the steps on the composing models (CoreServer.add_ensemble).
        return LoadedModel(platform="ensemble", max_batch_size=cfg.max_batch_size or 0, inputs=cfg.inputs,
                           outputs=cfg.outputs)  # fmt: skip
    if backend == "python":
        from . import python

        return python.load(ctx)
    if backend == "onnxruntime":
        from . import onnxruntime

        return onnxruntime.load(ctx)
    if backend == "openvino":
        from . import openvino

        return openvino.load(ctx)
    raise LoadError(f"unknown backend '{backend}'")

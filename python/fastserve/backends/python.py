"""Python models: ``model.py`` defines ``class Model`` with ``execute`` (and optional
``initialize``/``finalize``), as described in the README's Python model API, or Triton's
``class TritonPythonModel`` (run by ``triton_python.TritonModel``)."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Generator
from types import ModuleType
from typing import Any

import numpy as np

from ..logs import model_fields
from . import (
    LoadContext,
    LoadedModel,
    LoadError,
    check_gpus,
    finalize_instances,
    module_name,
    set_module,
    triton_python,
)

log = logging.getLogger("fastserve.backends.python")


def _import(ctx: LoadContext) -> ModuleType:
    path = ctx.model_file("model.py")
    if not path.is_file():
        raise LoadError(f"{path.name} not found in the version directory")
    # A unique module name per model version, so versions never share module state.
    name = module_name(ctx.name, ctx.version)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoadError("model.py cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    triton_python.install_utils()
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # sys.exit() in model.py fails this model, not the server
        log.exception(
            "importing model.py of model '%s' version %s failed",
            ctx.name,
            ctx.version,
            extra=model_fields(ctx.name, ctx.version),
        )
        raise LoadError(f"model.py raised {type(e).__name__}: {e}") from None
    return module


class CupyInstance:
    """Runs a ``device = "gpu"`` model on one CUDA device: each batch is copied to the device once
    (NumPy -> CuPy), the model computes there, and its outputs are copied back once. BYTES tensors
    have no device form and stay NumPy object arrays. Each instance has its own non-blocking stream,
    so instances sharing a GPU overlap instead of serializing on the default stream."""

    def __init__(self, model: Any, cupy: Any, device_id: int) -> None:
        self.model = model
        self.cupy = cupy
        self.device_id = device_id
        with cupy.cuda.Device(device_id):
            self.stream = cupy.cuda.Stream(non_blocking=True)

    def execute(self, inputs: dict[str, np.ndarray]) -> Any:
        """The model's outputs on the host: a dict of arrays, a generator of such dicts (a decoupled
        model), or whatever else the model returned."""
        cp = self.cupy
        with cp.cuda.Device(self.device_id), self.stream:
            on_device = {k: v if v.dtype == object else cp.asarray(v) for k, v in inputs.items()}
            outputs = self.model.execute(on_device)
            if isinstance(outputs, dict):
                return self._to_host(outputs)
        if inspect.isgenerator(outputs):
            return self._responses(outputs)
        return outputs  # the Rust side reports the wrong type

    def _to_host(self, outputs: dict[str, Any]) -> dict[str, Any]:
        cp = self.cupy
        result = {k: cp.asnumpy(v, stream=self.stream) if isinstance(v, cp.ndarray) else v for k, v in outputs.items()}
        self.stream.synchronize()
        return result

    def _responses(self, responses: Generator[Any, Any, Any]) -> Generator[Any, None, None]:
        """Each response of a decoupled model, produced on this instance's device and copied back;
        closing this closes the model's generator (its ``finally`` runs)."""
        try:
            while True:
                with self.cupy.cuda.Device(self.device_id), self.stream:
                    try:
                        response = next(responses)
                    except StopIteration:
                        return
                    host = self._to_host(response) if isinstance(response, dict) else response
                yield host
        finally:
            responses.close()

    def finalize(self) -> None:
        finalize = getattr(self.model, "finalize", None)
        if callable(finalize):
            with self.cupy.cuda.Device(self.device_id):
                finalize()


def _cupy(gpus: list[int]) -> Any:
    """CuPy, once it is known to see every requested device."""
    try:
        import cupy
    except Exception as e:
        raise LoadError(
            f"device = \"gpu\" needs CuPy (pip install 'fastserve-engine[gpu]'); importing cupy failed: {e}"
        ) from None
    try:
        visible = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise LoadError(f'device = "gpu" needs a CUDA device; CuPy reports: {e}') from None
    missing = [g for g in gpus if g >= visible]
    if visible == 0 or missing:
        raise LoadError(
            f'device = "gpu": [instance_group] gpus {gpus} asks for CUDA device(s) {missing or gpus}, '
            f"but CuPy sees {visible} CUDA device(s)"
        )
    return cupy


def load(ctx: LoadContext) -> LoadedModel:
    """Imports model.py as this version's module and creates its instances; on any failure the
    module entry this version had before (a serving copy, or none) is put back, so a failed reload
    neither replaces the serving module nor keeps the failed one alive."""
    cfg = ctx.config
    if not cfg.inputs or not cfg.outputs:
        raise LoadError("python models must declare [[input]] and [[output]] in config.toml")
    cupy = None
    if cfg.device == "gpu":
        cupy = _cupy(cfg.instance_group.gpus)
    elif cfg.instance_group.kind == "gpu":
        check_gpus(cfg.instance_group.gpus, "python model")
    previous = sys.modules.get(module_name(ctx.name, ctx.version))
    try:
        instances = _instances(ctx, _import(ctx), cupy)
    except BaseException:
        set_module(ctx.name, ctx.version, previous)
        raise
    return LoadedModel(
        platform="python",
        max_batch_size=cfg.max_batch_size or 0,
        inputs=list(cfg.inputs),
        outputs=list(cfg.outputs),
        instances=instances,
    )


def _instances(ctx: LoadContext, module: ModuleType, cupy: Any) -> list[Any]:
    """One ``Model()`` per placement, initialized; those already made are finalized when a later
    one fails, as an unload would."""
    model_class = getattr(module, "Model", None)
    triton_class = getattr(module, "TritonPythonModel", None)
    if not isinstance(model_class, type) and isinstance(triton_class, type):
        return _triton_instances(ctx, triton_class)
    if not isinstance(model_class, type):
        raise LoadError("model.py must define a class named Model (or Triton's TritonPythonModel)")
    instances: list[Any] = []
    try:
        for index, device_id in enumerate(ctx.config.instance_group.placements(), start=ctx.first_instance):
            model = _instance(ctx, model_class, index, device_id, cupy)
            instances.append(CupyInstance(model, cupy, device_id) if cupy is not None else model)
    except BaseException:
        finalize_instances(instances)
        raise
    return instances


def _instance(ctx: LoadContext, model_class: type, index: int, device_id: int | None, cupy: Any) -> Any:
    # Weights a GPU model creates in initialize() land on its own device.
    on_device = cupy.cuda.Device(device_id) if cupy is not None else contextlib.nullcontext()
    return _construct(ctx, model_class, "execute(inputs)", ctx.initialize_args(index, device_id), on_device)


def _construct(ctx: LoadContext, model_class: type, method: str, args: Any, on_device: Any) -> Any:
    """``model_class()`` with ``initialize(args)`` called when it has one; any exception from them
    (sys.exit() too) fails this model, not the server."""
    what = model_class.__name__
    try:
        model = model_class()
        if not callable(getattr(model, "execute", None)):
            raise LoadError(f"class {what} has no {method} method")
        initialize = getattr(model, "initialize", None)
        if callable(initialize):
            with on_device:
                initialize(args)
    except (LoadError, KeyboardInterrupt):
        raise
    except BaseException as e:
        log.exception(
            "initializing model '%s' version %s failed",
            ctx.name,
            ctx.version,
            extra=model_fields(ctx.name, ctx.version),
        )
        raise LoadError(f"{what}() or initialize() raised {type(e).__name__}: {e}") from None
    return model


def _triton_instances(ctx: LoadContext, model_class: type) -> list[Any]:
    """One ``TritonPythonModel()`` per placement, initialized with Triton's ``args``; those
    already made are finalized when a later one fails."""
    cfg = ctx.config
    if cfg.device == "gpu":
        raise LoadError(
            'device = "gpu" applies to class Model; a TritonPythonModel gets host (NumPy) tensors, '
            'placed with [instance_group] kind = "gpu"'
        )
    label = f"model '{ctx.name}' version {ctx.version}"
    instances: list[Any] = []
    try:
        for index, device_id in enumerate(cfg.instance_group.placements(), start=ctx.first_instance):
            args = triton_python.initialize_args(
                ctx.name, ctx.version, ctx.model_dir, cfg, index, device_id, cfg.max_batch_size or 0
            )
            model = _construct(ctx, model_class, "execute(requests)", args, contextlib.nullcontext())
            instances.append(triton_python.TritonModel(model, label))
    except BaseException:
        finalize_instances(instances)
        raise
    return instances

"""Models on OpenVINO: an OpenVINO IR (``model.xml`` + ``model.bin``) or an ONNX file (``model.onnx``),
compiled for ``[parameters] device`` (default "CPU") in the model's precision unless ``[parameters]
inference_precision`` says otherwise. Inputs and outputs are read from the model and
may be narrowed by config.toml, as for ONNX Runtime. ``infer`` releases the GIL, so instances
execute in parallel."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..config import ConfigError, parameter_int
from ..tensor import Tensor
from . import DEFAULT_MAX_BATCH_SIZE, LoadContext, LoadedModel, LoadError, reconcile

OV_TO_V2 = {
    "boolean": "BOOL",
    "u8": "UINT8",
    "u16": "UINT16",
    "u32": "UINT32",
    "u64": "UINT64",
    "i8": "INT8",
    "i16": "INT16",
    "i32": "INT32",
    "i64": "INT64",
    "f16": "FP16",
    "f32": "FP32",
    "f64": "FP64",
}

PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")


class OpenVinoInstance:
    """One compiled model and its infer request; ``execute`` runs one synchronous inference."""

    def __init__(self, compiled: Any, output_names: list[str]) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.output_names = output_names
        self.ports = [compiled.output(name) for name in output_names]

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The batch arrays are ours until execute returns: share them instead of copying. Outputs
        # are copied (share_outputs=False), since the request reuses its buffers for the next batch.
        results = self.request.infer(inputs, share_inputs=True, share_outputs=False)
        return {name: results[port] for name, port in zip(self.output_names, self.ports, strict=True)}


def _model_file(ctx: LoadContext) -> Any:
    named = ctx.config.default_model_filename
    xml = ctx.model_file("model.xml")
    if xml.suffix == ".xml" and xml.is_file():
        if not xml.with_suffix(".bin").is_file():
            raise LoadError(f"{xml.name} found without its weights file {xml.with_suffix('.bin').name}")
        return xml
    onnx = ctx.model_file("model.onnx")
    if onnx.suffix == ".onnx" and onnx.is_file():
        return onnx
    if named is not None:
        raise LoadError(f"default_model_filename '{named}' (an .xml with its .bin, or an .onnx) not found")
    raise LoadError("openvino models need model.xml (+ model.bin) or model.onnx in the version directory")


def _parameter_int(params: dict[str, Any], key: str, default: int) -> int:
    try:
        return parameter_int(params, key, default)
    except ConfigError as e:
        raise LoadError(str(e)) from None


def _precision(params: dict[str, Any], device: str) -> str | None:
    """The INFERENCE_PRECISION_HINT: the model's own precision (f32) unless [parameters]
    inference_precision opts into a lower one. OpenVINO's CPU plugin otherwise runs FP32 models in
    bf16 wherever the CPU has bf16 units, silently changing results (by ~1e-2 on the example MLP)."""
    precision = params.get("inference_precision")
    if precision is None:
        # Only the CPU and GPU plugins know the property; AUTO/HETERO/... pass it on per device.
        return "f32" if device.split(".")[0] in ("CPU", "GPU") else None
    if precision not in INFERENCE_PRECISIONS:
        raise LoadError(
            f"[parameters] inference_precision must be one of {', '.join(map(repr, INFERENCE_PRECISIONS))}, "
            f"got {precision!r}"
        )
    return str(precision)


def _properties(ctx: LoadContext) -> tuple[str, dict[str, str]]:
    """The device and compile properties from [parameters], checked before anything is compiled."""
    params = ctx.config.parameters
    device = params.get("device", "CPU")
    if not isinstance(device, str) or not device:
        raise LoadError(f"[parameters] device must be an OpenVINO device name such as CPU or GPU, got {device!r}")
    properties: dict[str, str] = {}
    hint = params.get("performance_hint")
    if hint is not None:
        if hint not in PERFORMANCE_HINTS:
            raise LoadError(
                f"[parameters] performance_hint must be one of {', '.join(PERFORMANCE_HINTS)}, got {hint!r}"
            )
        properties["PERFORMANCE_HINT"] = hint
    if "num_streams" in params:
        properties["NUM_STREAMS"] = str(_parameter_int(params, "num_streams", 1))
    precision = _precision(params, device)
    if precision is not None:
        properties["INFERENCE_PRECISION_HINT"] = precision
    if device == "CPU":
        # Instances share the cores; by default split them instead of oversubscribing.
        default = max(1, (os.cpu_count() or 1) // ctx.config.instance_group.count)
        properties["INFERENCE_NUM_THREADS"] = str(_parameter_int(params, "inference_num_threads", default))
    elif "inference_num_threads" in params:
        _parameter_int(params, "inference_num_threads", 1)
    return device, properties


def _tensors(ports: list[Any], batching: bool, what: str) -> list[Tensor]:
    out = []
    for port in ports:
        names = port.get_names()
        if not names:
            raise LoadError(f"the model has an unnamed {what}")
        name = port.get_any_name()
        type_name = port.get_element_type().get_type_name()
        datatype = OV_TO_V2.get(type_name)
        if datatype is None:
            raise LoadError(f"{what} '{name}' has OpenVINO type {type_name}, which fastserve cannot serve")
        shape = port.get_partial_shape()
        if shape.rank.is_dynamic:
            raise LoadError(f"{what} '{name}' has a dynamic rank; fastserve needs a fixed number of dimensions")
        dims = [-1 if d.is_dynamic else d.get_length() for d in shape]
        out.append(Tensor(name, datatype, dims[1:] if batching else dims))
    return out


def _first_dims_dynamic(model: Any) -> bool:
    ports = [*model.inputs, *model.outputs]
    return all(
        p.get_partial_shape().rank.is_static and len(p.get_partial_shape()) >= 1 and p.get_partial_shape()[0].is_dynamic
        for p in ports
    )


def _make_batchable(ov: Any, model: Any) -> None:
    """Turns a static first dimension into a dynamic one, so requests can be batched."""
    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        if shape.rank.is_dynamic or len(shape) == 0:
            raise LoadError(f"input '{port.get_any_name()}' has no first dimension to batch on")
        shapes[port.get_any_name()] = ov.PartialShape([ov.Dimension(), *list(shape)[1:]])
    try:
        model.reshape(shapes)
    except Exception as e:
        raise LoadError(f"OpenVINO cannot give the model a dynamic batch dimension: {e}") from None


def load(ctx: LoadContext) -> LoadedModel:
    try:
        import openvino as ov
    except ImportError:
        needs = "backend \"openvino\" needs the openvino package (pip install 'fastserve-engine[openvino]')"
        raise LoadError(needs) from None

    cfg = ctx.config
    if cfg.instance_group.kind != "cpu":
        raise LoadError(
            'openvino models choose their device with [parameters] device (e.g. "GPU"), '
            'not [instance_group] kind = "gpu"'
        )
    path = _model_file(ctx)
    device, properties = _properties(ctx)
    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as e:
        raise LoadError(f"OpenVINO cannot read {path.name}: {e}") from None

    batchable = _first_dims_dynamic(model)
    max_batch_size = cfg.max_batch_size
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH_SIZE if batchable else 0
    elif max_batch_size > 0 and not batchable:
        _make_batchable(ov, model)
        if not _first_dims_dynamic(model):
            raise LoadError(
                f"max_batch_size = {max_batch_size} needs a dynamic first dimension on every input and output, "
                "and reshaping the inputs did not give the outputs one"
            )
    batching = max_batch_size > 0
    inputs = reconcile(cfg.inputs, _tensors(list(model.inputs), batching, "input"), "input", subset_ok=False)
    outputs = reconcile(cfg.outputs, _tensors(list(model.outputs), batching, "output"), "output", subset_ok=True)
    output_names = [t.name for t in outputs]

    instances = []
    for _ in range(cfg.instance_group.count):
        try:
            compiled = core.compile_model(model, device, properties)
        except Exception as e:
            raise LoadError(f"OpenVINO cannot compile the model for device {device}: {e}") from None
        instances.append(OpenVinoInstance(compiled, output_names))
    return LoadedModel(
        platform="openvino",
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        instances=instances,
    )

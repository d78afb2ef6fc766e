"""ONNX models on ONNX Runtime. Inputs and outputs are read from the model file; config.toml may
narrow them. ORT releases the GIL inside ``run``, so instances execute in parallel."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..tensor import Tensor
from . import LoadContext, LoadedModel, LoadError

ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# Used when the model's first dimension is dynamic and config.toml sets no max_batch_size.
DEFAULT_MAX_BATCH_SIZE = 64


class OnnxInstance:
    """One ORT session; ``execute`` maps the batch dict onto ``session.run``."""

    def __init__(self, session: Any, output_names: list[str], string_inputs: set[str]) -> None:
        self.session = session
        self.output_names = output_names
        self.string_inputs = string_inputs

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in self.string_inputs:
            # ORT string tensors hold str; the wire carries bytes.
            arr = inputs[name]
            inputs[name] = np.array([b.decode("utf-8") for b in arr.ravel()], dtype=object).reshape(arr.shape)
        results = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, results, strict=True))


def _providers(ort: Any, kind: str) -> list[str]:
    available = ort.get_available_providers()
    if kind == "gpu":
        if "CUDAExecutionProvider" not in available:
            raise LoadError(
                '[instance_group] kind = "gpu" needs onnxruntime-gpu with the CUDA execution provider; '
                f"available providers: {', '.join(available)}"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _is_dynamic(dim: Any) -> bool:
    return not isinstance(dim, int) or dim < 0


def _model_tensors(nodes: list[Any], batching: bool, what: str) -> list[Tensor]:
    out = []
    for node in nodes:
        datatype = ORT_TO_V2.get(node.type)
        if datatype is None:
            raise LoadError(f"{what} '{node.name}' has type {node.type}, which has no V2 datatype")
        shape = list(node.shape)[1:] if batching else list(node.shape)
        out.append(Tensor(node.name, datatype, [-1 if _is_dynamic(d) else int(d) for d in shape]))
    return out


def _reconcile(declared: list[Tensor], model: list[Tensor], what: str, subset_ok: bool) -> list[Tensor]:
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
        ok = len(m.dims) == len(t.dims) and all(md == -1 or md == td for md, td in zip(m.dims, t.dims, strict=True))
        if not ok:
            raise LoadError(f"config.toml declares {what} '{t.name}' with dims {t.dims}, the model has {m.dims}")
    if not subset_ok and {t.name for t in declared} != set(by_name):
        raise LoadError(f"config.toml declares {what}s {[t.name for t in declared]}, the model needs {list(by_name)}")
    return list(declared)


def load(ctx: LoadContext) -> LoadedModel:
    import onnxruntime as ort

    cfg = ctx.config
    path = ctx.version_dir / "model.onnx"
    if not path.is_file():
        raise LoadError("model.onnx not found in the version directory")
    providers = _providers(ort, cfg.instance_group.kind)
    count = cfg.instance_group.count
    params = cfg.parameters
    sessions = []
    for _ in range(count):
        options = ort.SessionOptions()
        # Instances share the cores; by default split them instead of oversubscribing.
        threads = params.get("intra_op_num_threads", max(1, (os.cpu_count() or 1) // count))
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = int(params.get("inter_op_num_threads", 1))
        try:
            sessions.append(ort.InferenceSession(str(path), sess_options=options, providers=providers))
        except Exception as e:
            raise LoadError(f"ONNX Runtime cannot load model.onnx: {e}") from None

    first = sessions[0]
    nodes_in, nodes_out = first.get_inputs(), first.get_outputs()
    batchable = all(len(n.shape) >= 1 and _is_dynamic(n.shape[0]) for n in [*nodes_in, *nodes_out])
    max_batch_size = cfg.max_batch_size
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH_SIZE if batchable else 0
    elif max_batch_size > 0 and not batchable:
        raise LoadError(
            f"max_batch_size = {max_batch_size} needs a dynamic first dimension on every input and output; "
            f"the model has inputs {[(n.name, n.shape) for n in nodes_in]}"
        )
    batching = max_batch_size > 0
    inputs = _reconcile(cfg.inputs, _model_tensors(nodes_in, batching, "input"), "input", subset_ok=False)
    outputs = _reconcile(cfg.outputs, _model_tensors(nodes_out, batching, "output"), "output", subset_ok=True)
    output_names = [t.name for t in outputs]
    string_inputs = {t.name for t in inputs if t.datatype == "BYTES"}
    return LoadedModel(
        platform="onnxruntime_onnx",
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        instances=[OnnxInstance(s, output_names, string_inputs) for s in sessions],
    )

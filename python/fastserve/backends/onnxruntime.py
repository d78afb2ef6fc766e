"""ONNX models on ONNX Runtime. Inputs and outputs are read from the model file; config.toml may
narrow them. ORT releases the GIL inside ``run``, so instances execute in parallel."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, parameter_int
from ..logs import model_fields
from ..tensor import Tensor
from . import DEFAULT_MAX_BATCH_SIZE, LoadContext, LoadedModel, LoadError, check_gpus, reconcile

log = logging.getLogger(__name__)

# A full batch that runs faster than this gains nothing from splitting it over threads: waking the
# pool costs about as much, and the cores are better left to the network threads and to batching.
SMALL_BATCH_S = 0.001

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


# The numeric ORT input types the load-time probe can feed zeros of.
ORT_TYPES: dict[str, Any] = {
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(float16)": np.float16,
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
}


class OnnxInstance:
    """One ORT session; ``execute`` maps the batch dict onto ``session.run``."""

    def __init__(self, session: Any, output_names: list[str], string_inputs: set[str]) -> None:
        self.session = session
        self.output_names = output_names
        self.string_inputs = string_inputs

    def _decode_strings(self, inputs: dict[str, np.ndarray]) -> None:
        for name in self.string_inputs:
            # ORT string tensors hold str; the wire carries bytes.
            arr = inputs[name]
            inputs[name] = np.array([b.decode("utf-8") for b in arr.ravel()], dtype=object).reshape(arr.shape)

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._decode_strings(inputs)
        results = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, results, strict=True))


class BoundOnnxInstance(OnnxInstance):
    """A session on a device (CUDA): each batch input is copied to the device once, outputs stay
    on the device until one copy back, instead of ORT staging every run through host memory."""

    def __init__(
        self,
        session: Any,
        output_names: list[str],
        string_inputs: set[str],
        string_outputs: set[str],
        device_type: str,
        device_id: int,
    ) -> None:
        super().__init__(session, output_names, string_inputs)
        self.string_outputs = string_outputs
        self.device_type = device_type
        self.device_id = device_id

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._decode_strings(inputs)
        binding = self.session.io_binding()
        for name, arr in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self.output_names:
            if name in self.string_outputs:  # strings never live on a device
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))


def _parameters(ctx: LoadContext) -> dict[str, Any]:
    """Checks the ORT-specific [parameters]; returns the TensorRT ones (empty when off)."""
    params = ctx.config.parameters
    tensorrt = params.get("tensorrt", False)
    if not isinstance(tensorrt, bool):
        raise LoadError(f"[parameters] tensorrt must be a boolean, got {tensorrt!r}")
    fp16 = params.get("tensorrt_fp16", False)
    if not isinstance(fp16, bool):
        raise LoadError(f"[parameters] tensorrt_fp16 must be a boolean, got {fp16!r}")
    cache = params.get("tensorrt_engine_cache_path")
    if not tensorrt:
        for key in ("tensorrt_fp16", "tensorrt_engine_cache_path"):
            if key in params:
                raise LoadError(f"[parameters] {key} needs tensorrt = true")
        return {}
    if ctx.config.instance_group.kind != "gpu":
        raise LoadError('[parameters] tensorrt = true needs [instance_group] kind = "gpu"')
    options: dict[str, Any] = {"trt_fp16_enable": fp16}
    if cache is not None:
        if not isinstance(cache, str) or not cache:
            raise LoadError(f"[parameters] tensorrt_engine_cache_path must be a non-empty string, got {cache!r}")
        # Engines are written there: keep them inside the model directory, never elsewhere on disk.
        root = Path(ctx.model_dir).resolve()
        path = (root / cache).resolve()
        if path != root and root not in path.parents:
            raise LoadError(f"[parameters] tensorrt_engine_cache_path '{cache}' must stay inside the model directory")
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(path))
    return options


def _threads(params: dict[str, Any], key: str, default: int) -> int:
    """A thread count from [parameters]: an integer in its documented range, since ORT would
    otherwise take 2.5 as 2, "x" as a crash, or a huge count as an attempt to start that many."""
    try:
        return parameter_int(params, key, default)
    except ConfigError as e:
        raise LoadError(str(e)) from None


def _wheel_conflict_hint() -> str:
    """Both ORT wheels install the same ``onnxruntime`` module; the CPU one may have overwritten it."""
    from importlib import metadata

    installed = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            installed.add(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        return (
            " (onnxruntime and onnxruntime-gpu are both installed and share one module: "
            "uninstall both, then install onnxruntime-gpu alone)"
        )
    return ""


def _providers(ort: Any, kind: str, device_id: int | None, tensorrt: dict[str, Any]) -> list[Any]:
    """The provider list of one session; GPU sessions name their device explicitly."""
    available = ort.get_available_providers()
    if kind != "gpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise LoadError(
            '[instance_group] kind = "gpu" needs onnxruntime-gpu with the CUDA execution provider; '
            f"available providers: {', '.join(available)}{_wheel_conflict_hint()}"
        )
    providers: list[Any] = []
    if tensorrt:
        if "TensorrtExecutionProvider" not in available:
            raise LoadError(
                "[parameters] tensorrt = true needs onnxruntime-gpu built with the TensorRT execution provider "
                f"and TensorRT installed; available providers: {', '.join(available)}"
            )
        providers.append(("TensorrtExecutionProvider", {"device_id": device_id, **tensorrt}))
    # A session per instance gives each instance its own CUDA compute stream; copies stay in the
    # default stream (ORT's default, do_copy_in_default_stream = True), which ORT recommends.
    providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
    providers.append("CPUExecutionProvider")
    return providers


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


def _full_batch_seconds(session: Any, rows: int) -> float | None:
    """The median time of a few runs of `session` on zeros, `rows` in every dynamic dimension (the
    batch dimension, and 1 in the others); None for a model that cannot be run on zeros."""
    feed = {}
    for node in session.get_inputs():
        dtype = ORT_TYPES.get(node.type)
        if dtype is None:
            return None
        shape = [(rows if i == 0 else 1) if _is_dynamic(d) else int(d) for i, d in enumerate(node.shape)]
        feed[node.name] = np.zeros(shape, dtype)
    times = []
    try:
        session.run(None, feed)
        for _ in range(5):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
    except Exception:
        return None
    return sorted(times)[len(times) // 2]


def load(ctx: LoadContext) -> LoadedModel:
    import onnxruntime as ort

    cfg = ctx.config
    path = ctx.model_file("model.onnx")
    if not path.is_file():
        raise LoadError(f"{path.name} not found in the version directory")
    tensorrt = _parameters(ctx)
    kind = cfg.instance_group.kind
    placements = cfg.instance_group.placements()
    if kind == "gpu":
        _providers(ort, kind, 0, tensorrt)  # a missing provider is reported before any device probing
        check_gpus(cfg.instance_group.gpus, "ONNX Runtime")
        if "trt_engine_cache_path" in tensorrt:
            Path(tensorrt["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    params = cfg.parameters
    # CPU instances share the cores; by default split them instead of oversubscribing.
    cpu_instances = 1 if kind == "gpu" else len(placements)
    intra_threads = _threads(params, "intra_op_num_threads", max(1, (os.cpu_count() or 1) // cpu_instances))
    inter_threads = _threads(params, "inter_op_num_threads", 1)
    # ORT's pool threads spin between runs by default: that burns the cores the network threads need
    # (on 2 cores it halved throughput for the example MLP), so a server turns spinning off.
    spinning = params.get("intra_op_allow_spinning", False)
    if not isinstance(spinning, bool):
        raise LoadError(f"parameters.intra_op_allow_spinning must be true or false, not {spinning!r}")

    def session_on(device_id: int | None, threads: int) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = inter_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=_providers(ort, kind, device_id, tensorrt)
            )
        except Exception as e:
            raise LoadError(f"ONNX Runtime cannot load model.onnx: {e}") from None
        # ORT falls back to the CPU when a GPU provider fails to start; a GPU model must not.
        if kind == "gpu" and "CUDAExecutionProvider" not in session.get_providers():
            raise LoadError(
                f"ONNX Runtime could not start the CUDA execution provider on device {device_id} "
                "(is a CUDA device visible and the CUDA/cuDNN libraries installed?)"
            )
        if tensorrt and "TensorrtExecutionProvider" not in session.get_providers():
            raise LoadError(f"ONNX Runtime could not start the TensorRT execution provider on device {device_id}")
        return session

    sessions = [session_on(device_id, intra_threads) for device_id in placements]
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
    if kind != "gpu" and intra_threads > 1 and "intra_op_num_threads" not in params:
        seconds = _full_batch_seconds(first, max(1, max_batch_size))
        if seconds is not None and seconds < SMALL_BATCH_S:
            log.info(
                "model '%s': a full batch runs in %.3f ms on %d intra-op threads, so each instance uses 1 "
                "(a model this small gains nothing from more; [parameters] intra_op_num_threads chooses)",
                ctx.name,
                seconds * 1000,
                intra_threads,
                extra=model_fields(ctx.name, ctx.version),
            )
            sessions = [session_on(device_id, 1) for device_id in placements]
            first = sessions[0]
    inputs = reconcile(cfg.inputs, _model_tensors(nodes_in, batching, "input"), "input", subset_ok=False)
    outputs = reconcile(cfg.outputs, _model_tensors(nodes_out, batching, "output"), "output", subset_ok=True)
    output_names = [t.name for t in outputs]
    string_inputs = {t.name for t in inputs if t.datatype == "BYTES"}
    string_outputs = {t.name for t in outputs if t.datatype == "BYTES"}
    instances: list[OnnxInstance] = []
    for session, device_id in zip(sessions, placements, strict=True):
        if device_id is None:
            instances.append(OnnxInstance(session, output_names, string_inputs))
        else:
            instances.append(BoundOnnxInstance(session, output_names, string_inputs, string_outputs, "cuda", device_id))
    return LoadedModel(
        platform="onnxruntime_onnx",
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        instances=instances,
    )

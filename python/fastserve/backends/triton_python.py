"""Triton Python-backend models: a ``model.py`` with ``class TritonPythonModel`` (and no ``Model``)
runs through :class:`TritonModel`, which speaks Triton's API to the model and fastserve's
per-request instance protocol to the core (``execute_requests``: one ``InferenceRequest`` per
client request, each answered or failed on its own; ``execute_stream``: a decoupled request whose
responses the model sends with its response sender, from any thread)."""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from collections.abc import Generator
from typing import Any

import numpy as np

from .. import triton_python_backend_utils as pb_utils
from ..config import ModelConfig

# What ``execute_requests`` gets per request besides its inputs (the core's PyInstance builds it):
# request id, parameters as JSON, requested output names, correlation id, flags.
RequestInfo = tuple[str, str, list[str], int | str, int]


def install_utils() -> None:
    """Makes ``import triton_python_backend_utils`` work in model.py, as Triton's stub does."""
    sys.modules["triton_python_backend_utils"] = pb_utils


def _triton_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config(name: str, cfg: ModelConfig, max_batch_size: int) -> dict[str, Any]:
    """The model's configuration in Triton's JSON shape (``args["model_config"]``), from config.toml."""
    group: dict[str, Any] = {
        "name": f"{name}_0",
        "kind": "KIND_GPU" if cfg.instance_group.kind == "gpu" else "KIND_CPU",
        "count": cfg.instance_group.count,
    }
    if cfg.instance_group.kind == "gpu":
        group["gpus"] = list(cfg.instance_group.gpus)
    policy = cfg.version_policy
    if policy.all:
        version_policy: dict[str, Any] = {"all": {}}
    elif policy.specific is not None:
        version_policy = {"specific": {"versions": list(policy.specific)}}
    else:
        version_policy = {"latest": {"num_versions": policy.latest or 1}}
    config: dict[str, Any] = {
        "name": name,
        "platform": "",
        "backend": "python",
        "version_policy": version_policy,
        "max_batch_size": max_batch_size,
        "input": [{"name": t.name, "data_type": _triton_type(t.datatype), "dims": list(t.dims)} for t in cfg.inputs],
        "output": [{"name": t.name, "data_type": _triton_type(t.datatype), "dims": list(t.dims)} for t in cfg.outputs],
        "instance_group": [group],
        "parameters": {key: {"string_value": str(value)} for key, value in cfg.parameters.items()},
        "model_transaction_policy": {"decoupled": cfg.decoupled},
    }
    if cfg.sequence_batching is not None:
        config["sequence_batching"] = cfg.sequence_batching
    elif max_batch_size > 0:
        db = cfg.dynamic_batching
        config["dynamic_batching"] = {
            "preferred_batch_size": list(db.preferred_batch_sizes),
            "max_queue_delay_microseconds": db.max_queue_delay_us,
            "priority_levels": db.priority_levels,
            "default_priority_level": db.default_priority_level,
            "default_queue_policy": {
                "max_queue_size": db.max_queue_size,
                "default_timeout_microseconds": db.default_queue_timeout_us,
            },
        }
    return config


def initialize_args(
    name: str, version: int, model_dir: Any, cfg: ModelConfig, index: int, device_id: int | None, max_batch_size: int
) -> dict[str, str]:
    """Triton's ``initialize(args)``: every value a string, the configuration as JSON."""
    return {
        "model_config": json.dumps(model_config(name, cfg, max_batch_size)),
        "model_instance_kind": "GPU" if device_id is not None else "CPU",
        "model_instance_name": f"{name}_0_{index}",
        "model_instance_device_id": str(device_id or 0),
        "model_repository": str(model_dir),
        "model_version": str(version),
        "model_name": name,
    }


class TritonModel:
    """One instance of a ``TritonPythonModel``, driven by the core: ``execute_requests`` for
    ordinary models (one GIL acquisition per batch), ``execute_stream`` for decoupled ones."""

    def __init__(self, model: Any, label: str) -> None:
        self.model = model
        self.label = label
        self._loop: asyncio.AbstractEventLoop | None = None

    def _call_execute(self, requests: list[pb_utils.InferenceRequest]) -> Any:
        result = self.model.execute(requests)
        if inspect.isawaitable(result):  # async def execute, on this instance's own loop
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            result = self._loop.run_until_complete(result)
        return result

    def execute_requests(self, inputs: list[dict[str, np.ndarray]], infos: list[RequestInfo]) -> list[Any]:
        """Each request's outputs (a dict), or its error (a code name and message). Raises when the model
        does (the whole batch fails, as in Triton) or answers with the wrong number of responses."""
        requests = [_request(i, info) for i, info in zip(inputs, infos, strict=True)]
        responses = self._call_execute(requests)
        if not isinstance(responses, (list, tuple)) or len(responses) != len(requests):
            got = f"{len(responses)} responses" if isinstance(responses, (list, tuple)) else type(responses).__name__
            raise pb_utils.TritonModelException(
                "execute() must return a list of one InferenceResponse per request: "
                f"got {got} for {len(requests)} requests"
            )
        return [_answer(r) for r in responses]

    def execute_stream(self, inputs: dict[str, np.ndarray], info: RequestInfo) -> Generator[Any, None, None]:
        """A decoupled request: ``execute`` gets it with a response sender and returns None; the
        returned generator yields each response the model sends until the final flag."""
        sender = pb_utils.InferenceResponseSender()
        request = _request(inputs, info, sender)
        try:
            returned = self._call_execute([request])
        except BaseException:
            sender._cancel()  # the model's threads that still send get an error, not a silent drop
            raise
        if returned is not None and not (isinstance(returned, (list, tuple)) and not any(returned)):
            sender._cancel()
            raise pb_utils.TritonModelException(
                "a decoupled model's execute() returns None and sends its responses with request.get_response_sender()"
            )
        return sender._responses()

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A single request (warmup samples): its outputs, or TritonModelException with its error."""
        answer = self.execute_requests([inputs], [("", "{}", [], 0, 0)])[0]
        if isinstance(answer, str):
            raise pb_utils.TritonModelException(answer)
        if isinstance(answer, tuple):
            raise pb_utils.TritonModelException(answer[1])
        return dict(answer)

    def finalize(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        finalize = getattr(self.model, "finalize", None)
        if callable(finalize):
            finalize()


def _request(
    inputs: dict[str, np.ndarray], info: RequestInfo, sender: pb_utils.InferenceResponseSender | None = None
) -> pb_utils.InferenceRequest:
    request_id, parameters, outputs, correlation_id, flags = info
    return pb_utils._received(inputs, request_id, parameters, outputs, correlation_id, flags, sender)


# The core takes a request's error as (Triton's code name, message): the code picks the status.
_CODE_NAMES = {code: name for name, code in vars(pb_utils.TritonError).items() if name.isupper()}


def _answer(response: Any) -> Any:
    if not isinstance(response, pb_utils.InferenceResponse):
        return f"execute() returned {type(response).__name__} for a request, not an InferenceResponse"
    error = response.error()
    if error is not None:
        return (_CODE_NAMES.get(error.code(), "INTERNAL"), error.message())
    return {t._name: t._array for t in response.output_tensors()}

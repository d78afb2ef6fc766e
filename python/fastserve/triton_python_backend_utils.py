"""Triton's ``triton_python_backend_utils`` for fastserve: a Triton Python-backend ``model.py``
(``class TritonPythonModel``, ``import triton_python_backend_utils as pb_utils``) runs unchanged.

fastserve registers this module as ``sys.modules["triton_python_backend_utils"]`` before any
``model.py`` is imported (Triton injects its own the same way; it is not on PyPI). The names and
behaviour follow Triton's Python backend; the model runs in the server process, so tensors are
NumPy arrays built on the server's buffers without a copy.

Not available, because fastserve has no counterpart (using them raises, never silently does
nothing): GPU tensors (``Tensor.is_cpu()`` is always true and ``from_dlpack`` accepts host memory
only), ``InferenceRequest.exec(decoupled=True)`` (BLS calls get one response), custom metrics
(``MetricFamily``), request rescheduling, ``auto_complete_config`` (config.toml declares the
model's inputs and outputs) and shared-memory tuning (``set_shm_...``).
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections import deque
from collections.abc import Generator, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import call

# Request flags (TRITONSERVER_RequestFlag) and response flags (TRITONSERVER_ResponseCompleteFlag).
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

# Triton's config data types and their NumPy types (TYPE_STRING: object arrays of bytes).
TRITON_STRING_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}

# TRITONSERVER_DataType numbers, as ``numpy_to_triton_type`` answers and ``triton_to_numpy_type`` takes.
_TRITON_TYPE_NUMBERS: list[tuple[int, Any]] = [
    (1, np.bool_),
    (2, np.uint8),
    (3, np.uint16),
    (4, np.uint32),
    (5, np.uint64),
    (6, np.int8),
    (7, np.int16),
    (8, np.int32),
    (9, np.int64),
    (10, np.float16),
    (11, np.float32),
    (12, np.float64),
    (13, np.object_),
]

_log = logging.getLogger("fastserve.triton_python")


def triton_string_to_numpy(triton_type_string: str) -> Any:
    """The NumPy type of a config ``data_type`` such as ``"TYPE_FP32"``."""
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def numpy_to_triton_type(data_type: Any) -> int | None:
    """The TRITONSERVER_DataType number of a NumPy type (None for one Triton has no type for)."""
    if data_type == np.bytes_:
        return 13
    for number, np_type in _TRITON_TYPE_NUMBERS:
        if data_type == np_type:
            return number
    return None


def triton_to_numpy_type(data_type: int) -> Any:
    """The NumPy type of a TRITONSERVER_DataType number (None for an unknown one)."""
    return dict(_TRITON_TYPE_NUMBERS).get(data_type)


def serialize_byte_tensor(input_tensor: np.ndarray) -> np.ndarray | None:
    """Triton's BYTES wire form of an object (or ``np.bytes_``) array: each element as a 4-byte
    little-endian length and its bytes, in C order, as a 1-D uint8 array. None for an empty or
    non-bytes array, as Triton's."""
    if input_tensor.size == 0 or not (input_tensor.dtype == np.object_ or input_tensor.dtype.type == np.bytes_):
        return None
    parts = []
    for item in input_tensor.reshape(-1, order="C"):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def deserialize_bytes_tensor(encoded_tensor: bytes | np.ndarray) -> np.ndarray:
    """The object array of bytes elements that ``serialize_byte_tensor`` encoded (1-D)."""
    buffer = encoded_tensor.tobytes() if isinstance(encoded_tensor, np.ndarray) else bytes(encoded_tensor)
    items: list[bytes] = []
    offset = 0
    while offset < len(buffer):
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise TritonModelException("deserialize_bytes_tensor: an element runs past the end of the buffer")
        items.append(buffer[offset : offset + length])
        offset += length
    return np.array(items, dtype=np.object_)


class TritonError:
    """An error a response carries (``InferenceResponse(error=...)``): it fails that request only,
    with ``message``. ``code`` is one of the class's constants, as Triton's."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __str__(self) -> str:
        return self._message

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class TritonModelException(Exception):
    """Raised for a misuse of this API (as Triton's); raised from ``execute`` it fails the batch."""

    def message(self) -> str:
        return str(self)


class _HostCapsule:
    """Lets NumPy import a bare DLPack capsule (NumPy takes objects with ``__dlpack__`` only); the
    capsule must describe host memory, else NumPy refuses it."""

    def __init__(self, capsule: Any) -> None:
        self._capsule = capsule

    def __dlpack__(self, **_: Any) -> Any:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU


class Tensor:
    """A named input or output: ``Tensor(name, numpy_array)``. BYTES tensors are object arrays of
    ``bytes``. Only host (CPU) memory: fastserve hands Triton models NumPy arrays."""

    def __init__(self, name: str, numpy_array: Any) -> None:
        array = numpy_array if isinstance(numpy_array, np.ndarray) else np.asarray(numpy_array)
        if array.dtype.type == np.str_ or array.dtype == np.void:
            raise TritonModelException(
                f"Tensor '{name}': NumPy dtype {array.dtype} is not supported; use np.object_ for BYTES tensors"
            )
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def triton_dtype(self) -> int | None:
        """The TRITONSERVER_DataType number of the tensor's elements."""
        return numpy_to_triton_type(self._array.dtype.type)

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        """Always true: tensors live in host memory."""
        return True

    def to_dlpack(self) -> Any:
        """A DLPack capsule sharing the tensor's memory (no copy), e.g. for
        ``torch.utils.dlpack.from_dlpack``. BYTES tensors have no DLPack form."""
        if self._array.dtype == np.object_:
            raise TritonModelException(f"Tensor '{self._name}': BYTES tensors cannot be exported with DLPack")
        return self._array.__dlpack__()

    @staticmethod
    def from_dlpack(name: str, capsule: Any) -> Tensor:
        """A tensor sharing the memory of a DLPack capsule, or of an object with ``__dlpack__``
        (a torch CPU tensor, a NumPy array); host memory only."""
        source = capsule if hasattr(capsule, "__dlpack__") else _HostCapsule(capsule)
        try:
            array = np.from_dlpack(source)
        except (BufferError, RuntimeError, TypeError, ValueError) as e:
            raise TritonModelException(
                f"Tensor.from_dlpack('{name}'): {e} (fastserve takes host (CPU) memory only)"
            ) from None
        return Tensor(name, array)

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, dtype={self._array.dtype}, shape={list(self._array.shape)})"


class InferenceResponse:
    """A request's answer: its output tensors, or an ``error`` that fails that request alone."""

    def __init__(
        self,
        output_tensors: Sequence[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: Mapping[str, Any] | str | None = None,
    ) -> None:
        if output_tensors is not None and not isinstance(output_tensors, (list, tuple)):
            raise TritonModelException('InferenceResponse: "output_tensors" must be a list')
        if error is not None and not isinstance(error, TritonError):
            raise TritonModelException('InferenceResponse: "error" must be a TritonError')
        self._outputs = list(output_tensors or [])
        self._error = error
        self._parameters = _parameters_json(parameters)

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        """The response parameters as a JSON string (kept for the model's own use; fastserve does
        not send response parameters to clients)."""
        return self._parameters


class InferenceResponseSender:
    """Sends a decoupled request's responses (``request.get_response_sender()``), from any thread
    and after ``execute`` returned. ``flags=TRITONSERVER_RESPONSE_COMPLETE_FINAL`` ends the
    request (with or without a last response); the sender is closed afterwards, and also once the
    client went away: later sends raise ``TritonModelException``.

    Once ``execute`` returned, ``send`` waits while ``PENDING_RESPONSES`` responses are not yet taken
    by the server (a slow client), so memory stays bounded; while ``execute`` runs, sends never
    wait (the server starts taking responses when it returns, so waiting could never end)."""

    PENDING_RESPONSES = 16

    def __init__(self) -> None:
        self._pending: deque[tuple[InferenceResponse | None, int]] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._cancelled = False
        # The server takes responses (execute returned).
        self._draining = False

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if response is not None and not isinstance(response, InferenceResponse):
            raise TritonModelException(f"send() takes an InferenceResponse or None, not {type(response).__name__}")
        if response is None and not flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            raise TritonModelException("send() without a response must carry TRITONSERVER_RESPONSE_COMPLETE_FINAL")
        with self._changed:
            self._changed.wait_for(
                lambda: self._closed or not self._draining or len(self._pending) < self.PENDING_RESPONSES
            )
            if self._cancelled:
                raise TritonModelException("Unable to send response: the request was cancelled (its client went away)")
            if self._closed:
                raise TritonModelException("Unable to send response. Response sender has been closed.")
            if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
                self._closed = True
            self._pending.append((response, flags))
            self._changed.notify_all()

    def is_cancelled(self) -> bool:
        """True once the request's client went away (the model may stop early)."""
        return self._cancelled

    def _cancel(self) -> None:
        with self._changed:
            if not self._closed:
                self._cancelled = True
            self._closed = True
            self._changed.notify_all()

    def _next(self) -> tuple[InferenceResponse | None, int]:
        with self._changed:
            self._changed.wait_for(lambda: bool(self._pending))
            item = self._pending.popleft()
            self._changed.notify_all()
            return item

    def _responses(self) -> Generator[dict[str, np.ndarray], None, None]:
        """Each response's outputs as a dict until the final flag; an error response raises. Closing
        this generator (the client went away) cancels the sender."""
        with self._changed:
            self._draining = True
        try:
            while True:
                response, flags = self._next()
                if response is not None:
                    if response.has_error():
                        error = response.error()
                        raise TritonModelException(error.message() if error is not None else "error")
                    yield _outputs_dict(response)
                if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
                    return
        finally:
            self._cancel()


class InferenceRequest:
    """A request: as received in ``execute`` (one per client request, with its own tensors), or
    built by the model to call another model of the server (BLS) with ``request.exec()`` /
    ``await request.async_exec()``."""

    def __init__(
        self,
        model_name: str = "",
        requested_output_names: Iterable[str] = (),
        inputs: Sequence[Tensor] = (),
        request_id: str = "",
        correlation_id: int | str = 0,
        model_version: int = -1,
        flags: int = 0,
        timeout: int = 0,
        parameters: Mapping[str, Any] | str | None = None,
        preferred_memory: Any = None,
    ) -> None:
        if preferred_memory is not None:
            _log.debug("InferenceRequest: preferred_memory is ignored (tensors are host memory)")
        self._model_name = model_name
        self._outputs = list(requested_output_names)
        self._inputs = list(inputs)
        self._id = request_id
        self._correlation_id = correlation_id
        self._version = model_version
        self._flags = flags
        self._timeout = timeout
        self._parameters = _parameters_json(parameters)
        self._sender: InferenceResponseSender | None = None

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._id

    def correlation_id(self) -> int | str:
        """The sequence id (0 outside a sequence)."""
        return self._correlation_id

    def requested_output_names(self) -> list[str]:
        """The outputs the client asked for (empty: all)."""
        return self._outputs

    def parameters(self) -> str:
        """The request's parameters as a JSON string, as Triton's."""
        return self._parameters

    def flags(self) -> int:
        """``TRITONSERVER_REQUEST_FLAG_SEQUENCE_START`` / ``_END`` bits."""
        return self._flags

    def model_name(self) -> str:
        return self._model_name

    def model_version(self) -> int:
        return self._version

    def timeout(self) -> int:
        return self._timeout

    def is_cancelled(self) -> bool:
        """True once the client of a decoupled request went away."""
        return self._sender is not None and self._sender.is_cancelled()

    def get_response_sender(self) -> InferenceResponseSender:
        """The sender of a decoupled model's responses to this request."""
        if self._sender is None:
            raise TritonModelException(
                "get_response_sender() works on requests a decoupled model receives "
                "([model_transaction_policy] decoupled = true)"
            )
        return self._sender

    def exec(self, decoupled: bool = False) -> InferenceResponse:
        """Runs this request on ``model_name`` in-process (``fastserve.infer``: its queue,
        batching and statistics); a failure is the response's ``error()``, as Triton's."""
        name, inputs, version, parameters = self._call(decoupled)
        try:
            outputs = call.infer(name, inputs, version, parameters)
        except (RuntimeError, ValueError) as e:
            return InferenceResponse(error=TritonError(str(e)))
        return self._response(outputs)

    async def async_exec(self, decoupled: bool = False) -> InferenceResponse:
        """``exec`` for an ``async def execute``: awaits without blocking the event loop."""
        name, inputs, version, parameters = self._call(decoupled)
        try:
            outputs = await call.infer_async(name, inputs, version, parameters)
        except (RuntimeError, ValueError) as e:
            return InferenceResponse(error=TritonError(str(e)))
        return self._response(outputs)

    def _call(self, decoupled: bool) -> tuple[str, dict[str, np.ndarray], int | None, dict[str, Any]]:
        if decoupled:
            raise TritonModelException(
                "InferenceRequest.exec(decoupled=True) is not supported by fastserve: "
                "an in-process call gets one response"
            )
        if not self._model_name:
            raise TritonModelException("InferenceRequest.exec() needs InferenceRequest(model_name=...)")
        parameters: dict[str, Any] = json.loads(self._parameters)
        if self._timeout > 0:
            parameters["timeout"] = self._timeout
        if self._correlation_id:
            parameters["sequence_id"] = self._correlation_id
            parameters["sequence_start"] = bool(self._flags & TRITONSERVER_REQUEST_FLAG_SEQUENCE_START)
            parameters["sequence_end"] = bool(self._flags & TRITONSERVER_REQUEST_FLAG_SEQUENCE_END)
        inputs = {t.name(): t.as_numpy() for t in self._inputs}
        return self._model_name, inputs, None if self._version < 0 else self._version, parameters

    def _response(self, outputs: Mapping[str, np.ndarray]) -> InferenceResponse:
        wanted = self._outputs or list(outputs)
        return InferenceResponse([Tensor(name, outputs[name]) for name in wanted if name in outputs])


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    """The request's input ``name``, or None."""
    for tensor in inference_request.inputs():
        if tensor._name == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    """The response's output ``name``, or None."""
    for tensor in inference_response.output_tensors():
        if tensor._name == name:
            return tensor
    return None


def get_input_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The ``input`` entry of a model configuration (``json.loads(args["model_config"])``)."""
    return next((dict(i) for i in model_config.get("input", []) if i.get("name") == name), None)


def get_output_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The ``output`` entry of a model configuration (``json.loads(args["model_config"])``)."""
    return next((dict(o) for o in model_config.get("output", []) if o.get("name") == name), None)


class Logger:
    """Triton's model logger, onto Python ``logging`` (and so the server's log)."""

    @staticmethod
    def log(message: str, level: int = logging.INFO) -> None:
        _log.log(level, message)

    @staticmethod
    def log_info(message: str) -> None:
        _log.info(message)

    @staticmethod
    def log_warn(message: str) -> None:
        _log.warning(message)

    @staticmethod
    def log_error(message: str) -> None:
        _log.error(message)

    @staticmethod
    def log_verbose(message: str) -> None:
        _log.debug(message)


def _parameters_json(parameters: Mapping[str, Any] | str | None) -> str:
    if parameters is None:
        return "{}"
    if isinstance(parameters, str):
        if not isinstance(json.loads(parameters), dict):
            raise TritonModelException("parameters must be a JSON object")
        return parameters
    return json.dumps(dict(parameters))


def _outputs_dict(response: InferenceResponse) -> dict[str, np.ndarray]:
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


def _received(
    inputs: Mapping[str, np.ndarray],
    request_id: str,
    parameters: str,
    outputs: list[str],
    correlation_id: int | str,
    flags: int,
    sender: InferenceResponseSender | None = None,
) -> InferenceRequest:
    """A request as the server hands it to ``execute``: built without the checks the model's own
    requests get (the server's arrays and JSON are known to be valid), as this runs per request."""
    tensors = []
    for name, array in inputs.items():
        tensor = Tensor.__new__(Tensor)
        tensor._name, tensor._array = name, array
        tensors.append(tensor)
    request = InferenceRequest.__new__(InferenceRequest)
    request._model_name, request._outputs, request._inputs = "", outputs, tensors
    request._id, request._correlation_id, request._version = request_id, correlation_id, -1
    request._flags, request._timeout, request._parameters, request._sender = flags, 0, parameters, sender
    return request

"""Triton Python-backend models (``class TritonPythonModel`` with ``import
triton_python_backend_utils as pb_utils``) served unchanged: Triton's classic add_sub, per-request
answers inside one batch, BYTES, parameters and ``initialize`` args, decoupled response senders
over gRPC streams and SSE, BLS calls, errors, finalize at unload.

The server is embedded in this process so that a model can hold a batch on an event the test sets
(the ``tpb_shared`` module both import): nothing here waits on time."""

from __future__ import annotations

import json
import queue
import re
import sys
import threading
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from fastserve import Server
from tritonclient.utils import InferenceServerException

from conftest import write_model
from helpers import HANG_GUARD_S, wait_until

# Triton's add_sub example, as its users have it (config.toml in place of config.pbtxt).
ADD_SUB_CONFIG = """
    backend = "python"
    max_batch_size = 0
    [[input]]
    name = "INPUT0"
    datatype = "FP32"
    dims = [4]
    [[input]]
    name = "INPUT1"
    datatype = "FP32"
    dims = [4]
    [[output]]
    name = "OUTPUT0"
    datatype = "FP32"
    dims = [4]
    [[output]]
    name = "OUTPUT1"
    datatype = "FP32"
    dims = [4]
"""

ADD_SUB_MODEL = """
    import json

    import numpy as np
    import triton_python_backend_utils as pb_utils

    import tpb_shared


    class TritonPythonModel:
        def initialize(self, args):
            self.model_config = model_config = json.loads(args["model_config"])
            output0_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT0")
            output1_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT1")
            self.output0_dtype = pb_utils.triton_string_to_numpy(output0_config["data_type"])
            self.output1_dtype = pb_utils.triton_string_to_numpy(output1_config["data_type"])
            tpb_shared.args[args["model_name"]] = args

        def execute(self, requests):
            output0_dtype = self.output0_dtype
            output1_dtype = self.output1_dtype
            responses = []
            for request in requests:
                in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0")
                in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1")
                out_0, out_1 = (in_0.as_numpy() + in_1.as_numpy(), in_0.as_numpy() - in_1.as_numpy())
                out_tensor_0 = pb_utils.Tensor("OUTPUT0", out_0.astype(output0_dtype))
                out_tensor_1 = pb_utils.Tensor("OUTPUT1", out_1.astype(output1_dtype))
                inference_response = pb_utils.InferenceResponse(output_tensors=[out_tensor_0, out_tensor_1])
                responses.append(inference_response)
            return responses

        def finalize(self):
            tpb_shared.finalized.append("add_sub")
"""

BATCHED_CONFIG = """
    backend = "python"
    max_batch_size = 8
    [dynamic_batching]
    max_queue_delay_us = 0
    [[input]]
    name = "X"
    datatype = "FP32"
    dims = [2]
    [[output]]
    name = "Y"
    datatype = "FP32"
    dims = [2]
"""

# Records each batch's request count and shapes; holds a batch on the test's gate while
# tpb_shared.hold is set; a request whose first value is negative gets an error response, 99
# leaves out its output, and 1000 anywhere in the batch raises (the whole batch fails).
BATCHED_MODEL = """
    import numpy as np
    import triton_python_backend_utils as pb_utils

    import tpb_shared


    class TritonPythonModel:
        def execute(self, requests):
            tpb_shared.batches.append([r.inputs()[0].as_numpy().shape for r in requests])
            if tpb_shared.hold.is_set():
                tpb_shared.hold.clear()
                tpb_shared.gate.wait()
            xs = [pb_utils.get_input_tensor_by_name(r, "X").as_numpy() for r in requests]
            if any((x == 1000).any() for x in xs):
                raise ValueError("a row of 1000 breaks the whole batch")
            responses = []
            for x in xs:
                if x[0, 0] < 0:
                    error = pb_utils.TritonError(f"negative input {x[0, 0]:g}", pb_utils.TritonError.INVALID_ARG)
                    responses.append(pb_utils.InferenceResponse(error=error))
                elif x[0, 0] == 99:
                    responses.append(pb_utils.InferenceResponse([]))
                elif x[0, 0] == 77:
                    error = pb_utils.TritonError("row 77 exists", pb_utils.TritonError.ALREADY_EXISTS)
                    responses.append(pb_utils.InferenceResponse(error=error))
                else:
                    responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x * 10)]))
            return responses
"""

TEXT_CONFIG = """
    backend = "python"
    max_batch_size = 4
    [parameters]
    greeting = "hello"
    [[input]]
    name = "TEXT"
    datatype = "BYTES"
    dims = [-1]
    [[output]]
    name = "UPPER"
    datatype = "BYTES"
    dims = [-1]
    [[output]]
    name = "SEEN"
    datatype = "BYTES"
    dims = [1]
"""

# Upper-cases BYTES; SEEN tells what the request showed: its id, parameters, requested outputs.
TEXT_MODEL = """
    import json

    import numpy as np
    import triton_python_backend_utils as pb_utils

    import tpb_shared


    class TritonPythonModel:
        def initialize(self, args):
            tpb_shared.args[args["model_name"]] = args
            self.greeting = json.loads(args["model_config"])["parameters"]["greeting"]["string_value"]

        def execute(self, requests):
            responses = []
            for request in requests:
                text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
                upper = np.array([[s.upper() for s in row] for row in text], dtype=np.object_)
                seen = {
                    "id": request.request_id(),
                    "parameters": json.loads(request.parameters()),
                    "outputs": request.requested_output_names(),
                    "greeting": self.greeting,
                }
                seen_tensor = np.array([[json.dumps(seen).encode()]] * len(text), dtype=np.object_)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("UPPER", upper), pb_utils.Tensor("SEEN", seen_tensor)
                ]))
            return responses
"""

STREAM_CONFIG = """
    backend = "python"
    [model_transaction_policy]
    decoupled = true
    [[input]]
    name = "N"
    datatype = "INT32"
    dims = [1]
    [[output]]
    name = "OUT"
    datatype = "INT32"
    dims = [1]
"""

# Sends N responses from a thread of its own after execute returned, then the final flag; a
# negative N is answered with an error response. After the final flag the thread tries once more
# and records what that raised.
STREAM_MODEL = """
    import threading

    import numpy as np
    import triton_python_backend_utils as pb_utils

    import tpb_shared


    class TritonPythonModel:
        def initialize(self, args):
            tpb_shared.args[args["model_name"]] = args

        def execute(self, requests):
            for request in requests:
                n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
                sender = request.get_response_sender()
                threading.Thread(target=self.respond, args=(sender, n, request.request_id())).start()
            return None

        def respond(self, sender, n, request_id):
            if n < 0:
                error = pb_utils.TritonError(f"cannot count to {n}")
                final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)
                return
            for i in range(n):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], dtype=np.int32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            try:
                sender.send(pb_utils.InferenceResponse([]))
            except pb_utils.TritonModelException as e:
                tpb_shared.after_final[request_id] = str(e)
"""

# Sends responses from its own thread until a send raises (its client went away), and records that.
ENDLESS_MODEL = """
    import threading

    import numpy as np
    import triton_python_backend_utils as pb_utils

    import tpb_shared


    class TritonPythonModel:
        def execute(self, requests):
            for request in requests:
                threading.Thread(target=self.respond, args=(request,)).start()

        def respond(self, request):
            sender = request.get_response_sender()
            i = 0
            while True:
                try:
                    sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], dtype=np.int32))]))
                except pb_utils.TritonModelException as e:
                    tpb_shared.cancelled.append((str(e), request.is_cancelled(), i))
                    return
                i += 1
"""

BLS_CONFIG = """
    backend = "python"
    max_batch_size = 0
    [[input]]
    name = "A"
    datatype = "FP32"
    dims = [4]
    [[output]]
    name = "SUM"
    datatype = "FP32"
    dims = [4]
"""

# Calls add_sub in-process (Triton's BLS) and answers its OUTPUT0; a request with parameter
# "target" calls that model instead, and its error becomes this request's.
BLS_MODEL = """
    import json

    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                a = pb_utils.get_input_tensor_by_name(request, "A")
                target = json.loads(request.parameters()).get("target", "add_sub")
                call = pb_utils.InferenceRequest(
                    model_name=target,
                    requested_output_names=["OUTPUT0"],
                    inputs=[pb_utils.Tensor("INPUT0", a.as_numpy()), pb_utils.Tensor("INPUT1", a.as_numpy())],
                )
                answer = call.exec()
                if answer.has_error():
                    responses.append(pb_utils.InferenceResponse(error=answer.error()))
                    continue
                assert [t.name() for t in answer.output_tensors()] == ["OUTPUT0"]
                total = pb_utils.get_output_tensor_by_name(answer, "OUTPUT0").as_numpy()
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("SUM", total)]))
            return responses
"""


SEQUENCE_CONFIG = """
    backend = "python"
    max_batch_size = 2
    [sequence_batching]
    max_sequence_idle_microseconds = 600000000
    [[input]]
    name = "X"
    datatype = "INT32"
    dims = [1]
    [[output]]
    name = "SUM"
    datatype = "INT32"
    dims = [1]
    [[output]]
    name = "FLAGS"
    datatype = "INT32"
    dims = [1]
"""

# A running sum per correlation id, reset by the START flag and dropped at END.
SEQUENCE_MODEL = """
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            self.sums = {}

        def execute(self, requests):
            responses = []
            for request in requests:
                key, flags = request.correlation_id(), request.flags()
                if flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START:
                    self.sums[key] = 0
                x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
                self.sums[key] += int(x[0, 0])
                total = np.array([[self.sums[key]]], dtype=np.int32)
                if flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END:
                    del self.sums[key]
                flags_out = np.array([[flags]], dtype=np.int32)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("SUM", total), pb_utils.Tensor("FLAGS", flags_out)
                ]))
            return responses
"""

# BLS from an async def execute: await InferenceRequest.async_exec().
ASYNC_BLS_MODEL = """
    import asyncio

    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        async def execute(self, requests):
            calls = []
            for request in requests:
                a = pb_utils.get_input_tensor_by_name(request, "A").as_numpy()
                call = pb_utils.InferenceRequest(
                    model_name="add_sub",
                    requested_output_names=["OUTPUT1"],
                    inputs=[pb_utils.Tensor("INPUT0", a), pb_utils.Tensor("INPUT1", a * 3)],
                )
                calls.append(call.async_exec())
            answers = await asyncio.gather(*calls)
            differences = [pb_utils.get_output_tensor_by_name(r, "OUTPUT1").as_numpy() for r in answers]
            return [pb_utils.InferenceResponse([pb_utils.Tensor("SUM", d)]) for d in differences]
"""


@pytest.fixture(scope="module")
def shared() -> Iterator[types.ModuleType]:
    """State the test and the models share: ``import tpb_shared`` in model.py."""
    module = types.ModuleType("tpb_shared")
    module.args = {}  # type: ignore[attr-defined]
    module.batches = []  # type: ignore[attr-defined]
    module.finalized = []  # type: ignore[attr-defined]
    module.after_final = {}  # type: ignore[attr-defined]
    module.cancelled = []  # type: ignore[attr-defined]
    module.hold = threading.Event()  # type: ignore[attr-defined]
    module.gate = threading.Event()  # type: ignore[attr-defined]
    sys.modules["tpb_shared"] = module
    yield module
    del sys.modules["tpb_shared"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton_repo")
    write_model(root, "add_sub", ADD_SUB_CONFIG, ADD_SUB_MODEL)
    write_model(root, "batched", BATCHED_CONFIG, BATCHED_MODEL)
    write_model(root, "text", TEXT_CONFIG, TEXT_MODEL)
    write_model(root, "stream", STREAM_CONFIG, STREAM_MODEL)
    write_model(root, "endless", STREAM_CONFIG, ENDLESS_MODEL)
    write_model(root, "bls", BLS_CONFIG, BLS_MODEL)
    write_model(root, "async_bls", BLS_CONFIG, ASYNC_BLS_MODEL)
    write_model(root, "sequence", SEQUENCE_CONFIG, SEQUENCE_MODEL)
    return root


@pytest.fixture(scope="module")
def server(shared: types.ModuleType, repo: Path) -> Iterator[Server]:
    server = Server(http_port=0, grpc_port=0, metrics_port=0)
    statuses = server.load_repository(repo, control_mode="explicit", load_models=["*"])
    assert all(s.ready for s in statuses), statuses
    with server:
        yield server


def http(server: Server) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")


def grpc(server: Server) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")


def fp32_input(module: Any, name: str, array: np.ndarray) -> Any:
    x = module.InferInput(name, list(array.shape), "FP32")
    x.set_data_from_numpy(array.astype(np.float32))
    return x


@pytest.mark.parametrize("client", [httpclient, grpcclient])
def test_tritons_add_sub_runs_unchanged(server: Server, client: Any) -> None:
    a = np.array([1, 2, 3, 4], dtype=np.float32)
    b = np.array([10, 20, 30, 40], dtype=np.float32)
    connection = http(server) if client is httpclient else grpc(server)
    result = connection.infer("add_sub", [fp32_input(client, "INPUT0", a), fp32_input(client, "INPUT1", b)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_initialize_gets_tritons_args_as_strings(server: Server, shared: types.ModuleType, repo: Path) -> None:
    args = shared.args["add_sub"]
    assert all(isinstance(v, str) for v in args.values()), args
    assert args["model_name"] == "add_sub"
    assert args["model_version"] == "1"
    assert args["model_repository"] == str(repo / "add_sub")
    assert (args["model_instance_kind"], args["model_instance_device_id"]) == ("CPU", "0")
    assert args["model_instance_name"] == "add_sub_0_0"
    config = json.loads(args["model_config"])
    assert (config["name"], config["backend"], config["max_batch_size"]) == ("add_sub", "python", 0)
    assert config["input"][0] == {"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert "dynamic_batching" not in config
    assert config["model_transaction_policy"] == {"decoupled": False}

    text = json.loads(shared.args["text"]["model_config"])
    assert text["parameters"] == {"greeting": {"string_value": "hello"}}
    assert text["input"][0] == {"name": "TEXT", "data_type": "TYPE_STRING", "dims": [-1]}
    assert text["max_batch_size"] == 4 and "dynamic_batching" in text
    stream = json.loads(shared.args["stream"]["model_config"])
    assert stream["model_transaction_policy"] == {"decoupled": True}


def pending(server: Server, model: str) -> float:
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=HANG_GUARD_S).text
    found = re.search(rf'fastserve_pending_requests{{model="{model}",version="1"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_one_requests_error_fails_only_that_request_in_its_batch(server: Server, shared: types.ModuleType) -> None:
    shared.batches.clear()
    shared.hold.set()
    shared.gate.clear()

    def infer(value: float, rows: int = 1) -> Any:
        client = http(server)  # one client per thread: tritonclient's are not thread-safe
        try:
            x = np.full((rows, 2), value, dtype=np.float32)
            return client.infer("batched", [fp32_input(httpclient, "X", x)]).as_numpy("Y")
        except InferenceServerException as e:
            return e

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(infer, 1.0)
        wait_until(lambda: len(shared.batches) == 1, what="the first batch to reach the model")
        # The model holds the first batch; these queue and then run as one batch.
        rest = [pool.submit(infer, 2.0, 2), pool.submit(infer, -5.0), pool.submit(infer, 99.0)]
        wait_until(lambda: pending(server, "batched") == 3, what="three requests queued behind the held batch")
        shared.gate.set()
        ok, negative, missing = (f.result(timeout=HANG_GUARD_S) for f in rest)
        np.testing.assert_array_equal(first.result(timeout=HANG_GUARD_S), np.full((1, 2), 10.0))
    assert sorted(shared.batches[1]) == [(1, 2), (1, 2), (2, 2)], "each request keeps its own rows, in one batch"
    np.testing.assert_array_equal(ok, np.full((2, 2), 20.0))
    assert isinstance(negative, InferenceServerException) and "negative input -5" in negative.message()
    assert negative.status() == "400", "TritonError.INVALID_ARG is the client's error, as in Triton"
    assert isinstance(missing, InferenceServerException) and "did not return output 'Y'" in missing.message()
    assert missing.status() == "500"


def test_error_codes_without_an_http_status_keep_their_grpc_code(server: Server) -> None:
    x = np.full((1, 2), 77.0, dtype=np.float32)
    with pytest.raises(InferenceServerException) as over_http:
        http(server).infer("batched", [fp32_input(httpclient, "X", x)])
    with pytest.raises(InferenceServerException) as over_grpc:
        grpc(server).infer("batched", [fp32_input(grpcclient, "X", x)])
    # Triton: HTTP has no status for ALREADY_EXISTS (400); gRPC has the code itself.
    assert over_http.value.status() == "400" and "row 77 exists" in over_http.value.message()
    assert over_grpc.value.status() == "StatusCode.ALREADY_EXISTS", over_grpc.value.status()


def test_an_exception_in_execute_fails_the_batch_and_the_server_keeps_serving(server: Server) -> None:
    r = requests.post(
        f"http://127.0.0.1:{server.http_port}/v2/models/batched/infer",
        json={"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1000, 1]}]},
        timeout=HANG_GUARD_S,
    )
    assert r.status_code == 500 and "a row of 1000 breaks the whole batch" in r.json()["error"], r.text
    x = fp32_input(grpcclient, "X", np.ones((1, 2)))
    np.testing.assert_array_equal(grpc(server).infer("batched", [x]).as_numpy("Y"), np.full((1, 2), 10.0))


@pytest.mark.parametrize("client", [httpclient, grpcclient])
def test_bytes_tensors_request_id_and_parameters(server: Server, client: Any) -> None:
    text = client.InferInput("TEXT", [1, 2], "BYTES")
    text.set_data_from_numpy(np.array([[b"hi", b"there"]], dtype=np.object_))
    outputs = [client.InferRequestedOutput("UPPER"), client.InferRequestedOutput("SEEN")]
    connection = http(server) if client is httpclient else grpc(server)
    result = connection.infer(
        "text", [text], outputs=outputs, request_id="r-7", parameters={"custom": "yes"}, priority=0, timeout=0
    )
    assert result.as_numpy("UPPER").tolist() == [[b"HI", b"THERE"]]
    seen = json.loads(result.as_numpy("SEEN")[0, 0])
    assert seen == {"id": "r-7", "parameters": {"custom": "yes"}, "outputs": ["UPPER", "SEEN"], "greeting": "hello"}


def test_a_decoupled_models_sender_streams_from_its_own_thread_over_grpc(
    server: Server, shared: types.ModuleType
) -> None:
    client = grpc(server)
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        n = grpcclient.InferInput("N", [1], "INT32")
        n.set_data_from_numpy(np.array([4], dtype=np.int32))
        client.async_stream_infer("stream", [n], request_id="s-1", enable_empty_final_response=True)
        got = []
        while True:
            result, error = responses.get(timeout=HANG_GUARD_S)
            assert error is None, error
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            got.append(int(result.as_numpy("OUT")[0]))
        assert got == [0, 1, 2, 3]

        n.set_data_from_numpy(np.array([-1], dtype=np.int32))
        client.async_stream_infer("stream", [n], request_id="s-2")
        result, error = responses.get(timeout=HANG_GUARD_S)
        assert result is None and "cannot count to -1" in str(error)
    finally:
        client.stop_stream()
    message = wait_until(lambda: shared.after_final.get("s-1"), what="the send after the final flag")
    assert "closed" in message


def test_a_decoupled_models_sender_streams_over_http_generate_stream(server: Server) -> None:
    url = f"http://127.0.0.1:{server.http_port}/v2/models/stream/generate_stream"
    with requests.post(url, json={"N": 3}, stream=True, timeout=HANG_GUARD_S) as r:
        assert r.status_code == 200, r.text
        events = [json.loads(line[len(b"data: ") :]) for line in r.iter_lines() if line.startswith(b"data: ")]
    assert [e["OUT"] for e in events] == [0, 1, 2]


def test_a_client_that_goes_away_cancels_the_sender(server: Server, shared: types.ModuleType) -> None:
    url = f"http://127.0.0.1:{server.http_port}/v2/models/endless/generate_stream"
    with requests.post(url, json={"N": 0}, stream=True, timeout=HANG_GUARD_S) as r:
        first = next(line for line in r.iter_lines() if line.startswith(b"data: "))
        assert json.loads(first[len(b"data: ") :])["OUT"] == 0
    # The connection is closed: the server stops taking responses and the model's next send raises.
    message, cancelled, _ = wait_until(lambda: shared.cancelled and shared.cancelled[0], what="the send to fail")
    assert "cancelled" in message and cancelled


def test_bls_exec_calls_another_model_in_process(server: Server) -> None:
    a = np.array([1, 2, 3, 4], dtype=np.float32)
    result = http(server).infer("bls", [fp32_input(httpclient, "A", a)])
    np.testing.assert_array_equal(result.as_numpy("SUM"), a + a)
    with pytest.raises(InferenceServerException, match="nowhere"):
        http(server).infer("bls", [fp32_input(httpclient, "A", a)], parameters={"target": "nowhere"})


def test_bls_async_exec_from_an_async_execute(server: Server) -> None:
    a = np.array([1, 2, 3, 4], dtype=np.float32)
    result = grpc(server).infer("async_bls", [fp32_input(grpcclient, "A", a)])
    np.testing.assert_array_equal(result.as_numpy("SUM"), a - 3 * a)


def test_sequences_show_their_correlation_id_and_flags(server: Server) -> None:
    client = http(server)

    def step(sequence_id: int | str, value: int, start: bool = False, end: bool = False) -> tuple[int, int]:
        x = httpclient.InferInput("X", [1, 1], "INT32")
        x.set_data_from_numpy(np.array([[value]], dtype=np.int32))
        r = client.infer("sequence", [x], sequence_id=sequence_id, sequence_start=start, sequence_end=end)
        return int(r.as_numpy("SUM")[0, 0]), int(r.as_numpy("FLAGS")[0, 0])

    assert step(42, 1, start=True) == (1, 1)
    assert step("user-a", 10, start=True) == (10, 1)
    assert step(42, 2) == (3, 0)
    assert step("user-a", 5, end=True) == (15, 2)
    assert step(42, 3, end=True) == (6, 2)


def test_finalize_runs_at_unload(server: Server, shared: types.ModuleType) -> None:
    assert "add_sub" not in shared.finalized
    server.unload_model("add_sub")
    assert shared.finalized == ["add_sub"]
    assert server.load_model("add_sub")[0].ready


LOGGING_MODEL = """
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            pb_utils.Logger.log_warn(f"{args['model_name']} says hello through pb_utils.Logger")

        def execute(self, requests):
            return [pb_utils.InferenceResponse([request.inputs()[0]]) for request in requests]
"""


def test_the_fastserve_command_serves_triton_models_and_logs_through_pb_utils(start_server, tmp_path: Path) -> None:
    config = 'backend = "python"\nmax_batch_size = 4\n'
    config += (
        '[[input]]\nname = "Y"\ndatatype = "FP32"\ndims = [2]\n[[output]]\nname = "Y"\ndatatype = "FP32"\ndims = [2]\n'
    )
    write_model(tmp_path, "echo", config, LOGGING_MODEL)
    server = start_server(tmp_path)
    server.wait_for_log("echo says hello through pb_utils.Logger")
    client = httpclient.InferenceServerClient(server.address)
    y = np.arange(4, dtype=np.float32).reshape(2, 2)
    np.testing.assert_array_equal(client.infer("echo", [fp32_input(httpclient, "Y", y)]).as_numpy("Y"), y)


def test_bytes_tensors_serialize_as_triton_does() -> None:
    from fastserve import triton_python_backend_utils as pb_utils

    items = np.array([b"a", b"", "\u00e9"], dtype=np.object_)
    encoded = pb_utils.serialize_byte_tensor(items)
    assert encoded is not None and encoded.dtype == np.uint8
    assert encoded.tobytes() == b"\x01\x00\x00\x00a" + b"\x00" * 4 + b"\x02\x00\x00\x00\xc3\xa9"
    assert pb_utils.deserialize_bytes_tensor(encoded.tobytes()).tolist() == [b"a", b"", "\u00e9".encode()]
    with pytest.raises(pb_utils.TritonModelException, match="past the end"):
        pb_utils.deserialize_bytes_tensor(b"\x09\x00\x00\x00ab")
    assert pb_utils.triton_string_to_numpy("TYPE_FP16") is np.float16
    assert pb_utils.numpy_to_triton_type(np.float32) == 11
    assert pb_utils.triton_to_numpy_type(13) is np.object_


def test_tensors_share_memory_through_dlpack() -> None:
    from fastserve import triton_python_backend_utils as pb_utils

    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = pb_utils.Tensor("T", array)
    assert tensor.is_cpu() and tensor.triton_dtype() == 11
    back = pb_utils.Tensor.from_dlpack("U", tensor.to_dlpack())
    assert back.name() == "U" and np.shares_memory(back.as_numpy(), array)
    np.testing.assert_array_equal(back.as_numpy(), array)
    with pytest.raises(pb_utils.TritonModelException, match="BYTES"):
        pb_utils.Tensor("S", np.array([b"x"], dtype=np.object_)).to_dlpack()
    with pytest.raises(pb_utils.TritonModelException, match=r"use np\.object_ for BYTES"):
        pb_utils.Tensor("S", np.array(["x"]))


def test_a_sender_waits_for_the_server_only_once_execute_returned() -> None:
    from fastserve import triton_python_backend_utils as pb_utils

    def response(i: int) -> pb_utils.InferenceResponse:
        return pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], dtype=np.int32))])

    limit = pb_utils.InferenceResponseSender.PENDING_RESPONSES
    sender = pb_utils.InferenceResponseSender()
    # While execute runs nobody takes responses yet, so sends never wait.
    for i in range(limit + 5):
        sender.send(response(i))
    drained = sender._responses()
    first = next(drained)  # execute returned: the server takes responses
    assert int(first["OUT"][0]) == 0

    def send_more() -> None:
        for i in range(limit + 5, 3 * limit):
            sender.send(response(i))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    more = threading.Thread(target=send_more)
    more.start()
    # The backlog from execute drains below the limit before the thread may add more, and the
    # thread then waits with the limit reached.
    rest = [int(next(drained)["OUT"][0]) for _ in range(limit + 4)]
    wait_until(lambda: len(sender._pending) == limit, what="the sender to fill up to its limit")
    assert more.is_alive(), "the thread waits for the server to take responses"
    rest += [int(r["OUT"][0]) for r in drained]
    more.join(timeout=HANG_GUARD_S)
    assert rest == list(range(1, 3 * limit))
    with pytest.raises(pb_utils.TritonModelException, match="closed"):
        sender.send(response(0))

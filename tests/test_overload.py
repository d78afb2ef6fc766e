"""Overload protection on real servers with real clients: queue timeouts and gRPC deadlines,
priorities, clients that go away while queued, and hung models.

A model held on a gate makes the queue back up deterministically; the model records every value
it executes, so "never ran" is observed, not inferred. Waits poll server state with a generous
bound that only guards against a hang; no assertion depends on how long anything took.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from fastserve import Server, Tensor
from fastserve.config import ConfigError, parse_config
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import write_model
from helpers import wait_until

HANG_GUARD_S = 60
HOUR_US = 3_600_000_000


class Gated:
    """Echoes X, records each value it executes, and holds every batch until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.ran: list[float] = []
        self.lock = threading.Lock()

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["X"]
        with self.lock:
            self.ran.extend(float(v) for v in x.ravel())
        self.entered.set()
        if not self.release.wait(timeout=HANG_GUARD_S):
            raise RuntimeError("the test never released the model")
        return {"Y": x}


class Served:
    """An embedded server with one gated model ``m``, its metrics and a thread pool for clients."""

    def __init__(self, **queue: int) -> None:
        self.model = Gated()
        self.server = Server(http_port=0, grpc_port=0, metrics_port=0)
        self.server.add_model(
            "m", self.model, inputs=[Tensor("X", "FP32", [1])], outputs=[Tensor("Y", "FP32", [1])], **queue
        )
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.http_port}"
        self.grpc_address = f"127.0.0.1:{self.server.grpc_port}"
        self.pool = ThreadPoolExecutor(max_workers=16)

    def post(self, value: float, **parameters: int) -> requests.Response:
        body: dict = {"inputs": [{"name": "X", "shape": [1], "datatype": "FP32", "data": [value]}]}
        if parameters:
            body["parameters"] = parameters
        return requests.post(f"{self.url}/v2/models/m/infer", json=body, timeout=HANG_GUARD_S)

    def post_async(self, value: float, **parameters: int) -> Future[requests.Response]:
        return self.pool.submit(self.post, value, **parameters)

    def hold(self) -> Future[requests.Response]:
        """Sends value 0 and returns once the model is executing it, holding the only instance.
        Its own long timeout keeps a short default queue timeout from expiring it on a slow host."""
        first = self.post_async(0.0, timeout=HOUR_US)
        assert self.model.entered.wait(HANG_GUARD_S)
        return first

    def metric(self, name: str, **labels: str) -> float:
        text = requests.get(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=HANG_GUARD_S).text
        wanted = [f'{k}="{v}"' for k, v in {"model": "m", **labels}.items()]
        for line in text.splitlines():
            if line.startswith(name + "{") and all(w in line for w in wanted):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_pending(self, n: int) -> None:
        wait_until(lambda: self.metric("fastserve_pending_requests") == n, what=f"{n} queued requests")

    def close(self) -> None:
        self.model.release.set()
        self.server.stop()
        self.pool.shutdown()


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(**queue: int) -> Served:
        s = Served(**queue)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def grpc_input(value: float) -> list[grpcclient.InferInput]:
    x = grpcclient.InferInput("X", [1], "FP32")
    x.set_data_from_numpy(np.array([value], dtype=np.float32))
    return [x]


# -- queue timeouts and deadlines ----------------------------------------------------------------


def test_a_request_timing_out_in_the_queue_is_answered_503_and_never_runs(serve) -> None:
    s = serve()
    first = s.hold()
    # The only instance is held, so this request can only leave the queue by timing out.
    r = s.post(1.0, timeout=1000)
    assert r.status_code == 503, r.text
    assert "timed out in the queue" in r.json()["error"]
    s.model.release.set()
    assert first.result().status_code == 200
    assert s.post(2.0).status_code == 200
    assert s.model.ran == [0.0, 2.0], "the expired request never reached the model"
    assert s.metric("fastserve_request_failure_total", reason="timeout") == 1
    stats = requests.get(f"{s.url}/v2/models/m/stats", timeout=HANG_GUARD_S).json()
    assert stats["model_stats"][0]["inference_stats"]["fail"]["count"] == 1


def test_the_default_queue_timeout_applies_and_a_request_may_override_it(serve) -> None:
    s = serve(default_queue_timeout_us=1000)
    first = s.hold()
    patient = s.post_async(1.0, timeout=HOUR_US)
    s.wait_pending(1)
    r = s.post(2.0)
    assert r.status_code == 503 and "timed out in the queue" in r.json()["error"], r.text
    s.model.release.set()
    assert first.result().status_code == 200
    assert patient.result().json()["outputs"][0]["data"] == [1.0]
    assert s.model.ran == [0.0, 1.0]


def test_grpc_timeout_parameter_answers_unavailable(serve) -> None:
    s = serve()
    first = s.hold()
    client = grpcclient.InferenceServerClient(s.grpc_address)
    with pytest.raises(InferenceServerException) as e:
        client.infer("m", grpc_input(1.0), timeout=1000)  # parameters["timeout"], microseconds
    assert e.value.status() == "StatusCode.UNAVAILABLE"
    assert "timed out in the queue" in e.value.message()
    s.model.release.set()
    assert first.result().status_code == 200
    assert s.model.ran == [0.0]


def test_an_expired_grpc_deadline_is_deadline_exceeded_and_never_runs(serve) -> None:
    s = serve()
    first = s.hold()
    client = grpcclient.InferenceServerClient(s.grpc_address)
    with pytest.raises(InferenceServerException) as e:
        client.infer("m", grpc_input(1.0), client_timeout=0.2)  # the grpc-timeout header
    assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # The server drops it at the same deadline: as a timeout, or as a call gone away.
    s.wait_pending(0)
    dropped = s.metric("fastserve_request_failure_total", reason="timeout") + s.metric(
        "fastserve_request_cancelled_total"
    )
    assert dropped == 1
    s.model.release.set()
    assert first.result().status_code == 200
    assert s.model.ran == [0.0]


def test_bad_queue_parameters_are_rejected(serve) -> None:
    s = serve()
    for params in ({"timeout": -1}, {"timeout": "soon"}, {"priority": 1.5}):
        r = s.post(1.0, **params)  # type: ignore[arg-type]
        assert r.status_code == 400, (params, r.text)


# -- priorities ------------------------------------------------------------------------------------


def test_higher_priority_requests_run_first(serve) -> None:
    s = serve(priority_levels=3, default_priority_level=2)
    first = s.hold()
    sent: list[Future[requests.Response]] = []
    # Queued strictly one after another, so arrival order within a level is known.
    for value, priority in [(1, 3), (2, 2), (3, 0), (4, 1), (5, 3), (6, 1)]:
        sent.append(s.post_async(float(value), priority=priority))
        s.wait_pending(len(sent))
    s.model.release.set()
    assert first.result().status_code == 200
    assert all(f.result().status_code == 200 for f in sent)
    # Level 1 first, then 2 (priority 0 is the default level, 2), then 3; FIFO within each level.
    assert s.model.ran == [0.0, 4.0, 6.0, 2.0, 3.0, 1.0, 5.0]


def test_grpc_priority_is_honoured(serve) -> None:
    s = serve(priority_levels=2)
    first = s.hold()
    client = grpcclient.InferenceServerClient(s.grpc_address)
    low = s.pool.submit(client.infer, "m", grpc_input(1.0))  # no priority: the lowest level
    s.wait_pending(1)
    high = s.pool.submit(client.infer, "m", grpc_input(2.0), priority=1)
    s.wait_pending(2)
    s.model.release.set()
    first.result()
    low.result()
    high.result()
    assert s.model.ran == [0.0, 2.0, 1.0]


def test_out_of_range_priority_is_invalid(serve) -> None:
    s = serve(priority_levels=2)
    r = s.post(1.0, priority=3)
    assert r.status_code == 400 and "priority 3 is out of range" in r.json()["error"], r.text
    client = grpcclient.InferenceServerClient(s.grpc_address)
    with pytest.raises(InferenceServerException) as e:
        client.infer("m", grpc_input(1.0), priority=3)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert s.model.ran == []


def test_queue_policy_shows_in_the_grpc_model_config(serve) -> None:
    s = serve(max_batch_size=4, default_queue_timeout_us=2500, priority_levels=3, default_priority_level=2)
    config = grpcclient.InferenceServerClient(s.grpc_address).get_model_config("m", as_json=True)["config"]
    batching = config["dynamic_batching"]
    assert batching["priority_levels"] == "3" and batching["default_priority_level"] == "2"
    policy = batching["default_queue_policy"]
    assert policy["default_timeout_microseconds"] == "2500" and policy["allow_timeout_override"] is True


# -- clients that go away --------------------------------------------------------------------------


def test_a_disconnected_http_client_request_never_runs(serve) -> None:
    s = serve()
    first = s.hold()
    body = json.dumps({"inputs": [{"name": "X", "shape": [1], "datatype": "FP32", "data": [7.0]}]}).encode()
    head = f"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", s.server.http_port))
    sock.sendall(head.encode() + body)
    s.wait_pending(1)
    sock.close()
    # The dropped handler withdraws the request at once: counted, and gone from the queue.
    wait_until(lambda: s.metric("fastserve_request_cancelled_total") == 1, what="the request cancelled")
    s.wait_pending(0)
    s.model.release.set()
    assert first.result().status_code == 200
    assert s.post(8.0).status_code == 200, "the server still serves"
    assert s.model.ran == [0.0, 8.0], "the disconnected client's request never ran"


def test_a_cancelled_grpc_stream_releases_its_queued_requests(serve) -> None:
    s = serve()
    first = s.hold()
    client = grpcclient.InferenceServerClient(s.grpc_address)
    answers: list = []
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    for value in (1.0, 2.0, 3.0):
        client.async_stream_infer("m", grpc_input(value), request_id=str(value))
    s.wait_pending(3)
    client.stop_stream(cancel_requests=True)
    wait_until(lambda: s.metric("fastserve_request_cancelled_total") == 3, what="3 requests cancelled")
    s.wait_pending(0)
    s.model.release.set()
    assert first.result().status_code == 200
    assert s.post(4.0).status_code == 200
    assert s.model.ran == [0.0, 4.0], "the cancelled stream's requests never ran"


def test_a_cancelled_grpc_call_is_released(serve) -> None:
    s = serve()
    first = s.hold()
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="X", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.array([1.0], dtype=np.float32).tobytes())
    channel = grpc.insecure_channel(s.grpc_address)
    call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(request)
    s.wait_pending(1)
    call.cancel()
    wait_until(lambda: s.metric("fastserve_request_cancelled_total") == 1, what="the call cancelled")
    s.model.release.set()
    assert first.result().status_code == 200
    assert s.model.ran == [0.0]
    channel.close()


# -- hung models -----------------------------------------------------------------------------------

HANGING_MODEL = """
import threading

NEVER = threading.Event()


class Model:
    def execute(self, inputs):
        x = inputs["X"]
        if float(x.ravel()[0]) < 0:
            NEVER.wait()  # a hung model: this call never returns
        return {"Y": x * 2}
"""

TENSORS = """
[[input]]
name = "X"
datatype = "FP32"
dims = [1]

[[output]]
name = "Y"
datatype = "FP32"
dims = [1]
"""


def test_a_hung_model_fails_its_batch_and_keeps_serving_on_a_new_instance(tmp_path, start_server) -> None:
    # Far above any normal execute() here, so only the hung call can reach it.
    write_model(tmp_path, "hang", 'backend = "python"\nexecution_timeout_ms = 1000\n' + TENSORS, HANGING_MODEL)
    write_model(tmp_path, "other", 'backend = "python"\n' + TENSORS, HANGING_MODEL)
    server = start_server(tmp_path)

    def post(model: str, value: float) -> requests.Response:
        body = {"inputs": [{"name": "X", "shape": [1], "datatype": "FP32", "data": [value]}]}
        return requests.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=HANG_GUARD_S)

    r = post("hang", -1.0)
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "model 'hang' execution timed out after 1000 ms; instance replaced"
    server.wait_for_log("model execution timed out")
    assert post("hang", 2.0).json()["outputs"][0]["data"] == [4.0], "served by the replacement"
    assert post("other", 3.0).json()["outputs"][0]["data"] == [6.0]
    assert requests.get(f"{server.url}/v2/health/ready", timeout=HANG_GUARD_S).status_code == 200
    metrics = requests.get(server.metrics_url, timeout=HANG_GUARD_S).text
    assert 'fastserve_instance_replaced_total{model="hang",version="1"} 1' in metrics
    assert 'fastserve_request_failure_total{model="hang",version="1",reason="execution_timeout"} 1' in metrics
    # The abandoned thread is still inside execute(); stopping does not wait for it.
    assert server.terminate() == 0


def test_queue_and_execution_keys_in_config_toml(tmp_path, start_server) -> None:
    config = (
        'backend = "python"\nmax_batch_size = 4\nexecution_timeout_ms = 5000\n'
        "[dynamic_batching]\ndefault_queue_timeout_us = 2500\npriority_levels = 3\ndefault_priority_level = 2\n"
    )
    write_model(tmp_path, "q", config + TENSORS, HANGING_MODEL)
    server = start_server(tmp_path)
    client = grpcclient.InferenceServerClient(server.grpc_address)
    batching = client.get_model_config("q", as_json=True)["config"]["dynamic_batching"]
    assert batching["priority_levels"] == "3" and batching["default_priority_level"] == "2"
    assert batching["default_queue_policy"]["default_timeout_microseconds"] == "2500"
    with pytest.raises(InferenceServerException) as e:
        client.infer("q", _batched_input(1.0), priority=4)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


def _batched_input(value: float) -> list[grpcclient.InferInput]:
    x = grpcclient.InferInput("X", [1, 1], "FP32")
    x.set_data_from_numpy(np.array([[value]], dtype=np.float32))
    return [x]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"execution_timeout_ms": -1}, "execution_timeout_ms must be >= 0"),
        ({"dynamic_batching": {"default_queue_timeout_us": -5}}, "default_queue_timeout_us must be >= 0"),
        ({"dynamic_batching": {"priority_levels": -1}}, "priority_levels must be >= 0"),
        ({"dynamic_batching": {"priority_levels": 2, "default_priority_level": 3}}, "default_priority_level"),
    ],
)
def test_bad_queue_keys_are_config_errors(table: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(table)
    assert message in str(err.value)

"""Model pipelines: ensembles run by the core (Triton's ensemble_scheduling) and in-process calls
from Python models (`fastserve.infer`, Triton's BLS), with tritonclient over HTTP and gRPC."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastserve
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from fastserve import Server, Tensor

from conftest import ServerProcess, write_model
from helpers import HANG_GUARD_S, wait_until

ROW = [Tensor("X", "FP32", [2])]


def rows(n: int = 2) -> np.ndarray:
    return np.random.default_rng(n).normal(size=(n, 64)).astype(np.float32)


def test_the_example_ensemble_equals_its_steps_run_by_hand(example_server: ServerProcess) -> None:
    x = rows(3)
    for client_module, address in ((httpclient, example_server.address), (grpcclient, example_server.grpc_address)):
        client = client_module.InferenceServerClient(address)

        def run(model: str, name: str, value: np.ndarray, client: Any = client, module: Any = client_module) -> Any:
            inp = module.InferInput(name, list(value.shape), "FP32")
            inp.set_data_from_numpy(value)
            return client.infer(model, [inp])

        features = run("preprocess", "RAW", x).as_numpy("FEATURES")
        logits = run("mlp", "INPUT0", features).as_numpy("OUTPUT0")
        by_hand = run("postprocess", "LOGITS", logits)
        ensemble = run("classify", "RAW", x)
        np.testing.assert_allclose(ensemble.as_numpy("PROBS"), by_hand.as_numpy("PROBS"), rtol=1e-6)
        assert ensemble.as_numpy("CLASS").tolist() == by_hand.as_numpy("CLASS").tolist()
        # The in-process call gives what a direct call gives.
        direct = run("mlp", "INPUT0", x).as_numpy("OUTPUT0")
        top = run("mlp_top", "INPUT0", x)
        assert top.as_numpy("TOP")[:, 0].tolist() == direct.argmax(axis=1).tolist()
        np.testing.assert_allclose(top.as_numpy("SCORE")[:, 0], direct.max(axis=1), rtol=1e-6)
    config = httpclient.InferenceServerClient(example_server.address).get_model_config("classify")
    assert [s["model_name"] for s in config["ensemble_scheduling"]["step"]] == ["preprocess", "mlp", "postprocess"]
    grpc_config = grpcclient.InferenceServerClient(example_server.grpc_address).get_model_config("classify").config
    assert grpc_config.ensemble_scheduling.step[1].input_map["INPUT0"] == "features"


class Scale:
    """Y = X * factor; holds until the other branch started when given a barrier."""

    def __init__(self, factor: float, barrier: threading.Barrier | None = None) -> None:
        self.factor, self.barrier = factor, barrier

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.barrier is not None:
            # Both branches must be running at once to pass: a sequential graph would break it.
            self.barrier.wait(HANG_GUARD_S)
        if (inputs["X"] < 0).any():
            raise ValueError("negative input")
        return {"Y": inputs["X"] * self.factor}


class Add:
    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"Y": inputs["A"] + inputs["B"]}


def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> dict[str, Any]:
    return {"model_name": model, "model_version": -1, "input_map": inputs, "output_map": outputs}


DIAMOND = [
    step("split", {"X": "X"}, {"Y": "s"}),
    step("left", {"X": "s"}, {"Y": "l"}),
    step("right", {"X": "s"}, {"Y": "r"}),
    step("join", {"A": "l", "B": "r"}, {"Y": "y"}),
]


@pytest.fixture(scope="module")
def diamond() -> Iterator[Server]:
    barrier = threading.Barrier(2)
    server = Server(http_port=0, grpc_port=0)
    io = {"inputs": ROW, "outputs": [Tensor("Y", "FP32", [2])], "max_batch_size": 8}
    server.add_model("split", Scale(1.0), **io)
    server.add_model("left", Scale(2.0, barrier), **io)
    server.add_model("right", Scale(3.0, barrier), **io)
    server.add_model(
        "join",
        Add(),
        inputs=[Tensor("A", "FP32", [2]), Tensor("B", "FP32", [2])],
        outputs=[Tensor("Y", "FP32", [2])],
        max_batch_size=8,
    )
    # One ensemble instance: the branches of one request run in parallel inside it.
    server.add_ensemble(
        "diamond",
        [*DIAMOND[:3], step("join", {"A": "l", "B": "r"}, {"Y": "Y"})],
        inputs=ROW,
        outputs=[Tensor("Y", "FP32", [2])],
        max_batch_size=8,
        instance_count=1,
    )
    with server:
        yield server


def infer(server: Server, model: str, values: list[float]) -> requests.Response:
    body = {"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": values}]}
    return requests.post(f"http://127.0.0.1:{server.http_port}/v2/models/{model}/infer", json=body)


def test_a_diamond_runs_its_branches_concurrently_and_a_failing_step_fails_only_its_request(diamond) -> None:
    r = infer(diamond, "diamond", [1, 2])
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [5, 10]  # 2x + 3x
    bad = infer(diamond, "diamond", [-1, 2])
    assert bad.status_code == 500
    assert "ensemble 'diamond'" in bad.json()["error"] and "negative input" in bad.json()["error"]
    assert "step 1 (model 'split')" in bad.json()["error"]
    assert infer(diamond, "diamond", [3, 4]).json()["outputs"][0]["data"] == [15, 20]


def stats(server: Server, model: str) -> dict[str, Any]:
    return requests.get(f"http://127.0.0.1:{server.http_port}/v2/models/{model}/stats").json()["model_stats"][0]


def test_statistics_of_the_ensemble_and_its_steps_add_up(diamond) -> None:
    before = {m: stats(diamond, m) for m in ("diamond", "split", "join")}
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{diamond.grpc_port}")
    x = grpcclient.InferInput("X", [1, 2], "FP32")
    x.set_data_from_numpy(np.array([[1, 1]], dtype=np.float32))
    for _ in range(5):
        assert client.infer("diamond", [x]).as_numpy("Y").tolist() == [[5, 5]]
    after = {m: stats(diamond, m) for m in ("diamond", "split", "join")}
    success = lambda s: s["inference_stats"]["success"]["count"]  # noqa: E731
    assert success(after["diamond"]) - success(before["diamond"]) == 5
    for m in ("split", "join"):
        assert after[m]["inference_count"] - before[m]["inference_count"] == 5, m
        # Steps count as their models' requests, as in Triton.
        assert success(after[m]) - success(before[m]) == 5, m


@pytest.mark.parametrize(
    ("steps", "says"),
    [
        ([step("nosuch", {"X": "X"}, {"Y": "Y"})], "step 1 (model 'nosuch')"),
        ([step("split", {}, {"Y": "Y"})], "input 'X' is not in input_map"),
        ([step("split", {"X": "X"}, {"Y": "Y"}), step("left", {"X": "X"}, {"Y": "Y"})], "already produced"),
        (
            [
                step("split", {"X": "b"}, {"Y": "a"}),
                step("left", {"X": "a"}, {"Y": "b"}),
                step("right", {"X": "a"}, {"Y": "Y"}),
            ],
            "step 1 (model 'split'): its inputs depend on its own outputs (a cycle)",
        ),
        ([step("split", {"X": "X"}, {"Y": "other"})], "ensemble output 'Y' is produced by no step"),
        ([step("split", {"X": "X"}, {"Y": "t"}), step("join", {"A": "t", "B": "X"}, {"Y": "Y"})], ""),
        ([step("split", {"X": "X"}, {"Y": "Y"}), step("left", {"X": "missing"}, {"Y": "z"})], "nothing produces"),
    ],
)
def test_ensemble_graph_errors_name_the_step(diamond, steps: list[dict[str, Any]], says: str) -> None:
    def add() -> None:
        diamond.add_ensemble("broken", steps, inputs=ROW, outputs=[Tensor("Y", "FP32", [2])], max_batch_size=8)

    if not says:  # a valid graph: loads and serves
        add()
        assert infer(diamond, "broken", [1, 2]).json()["outputs"][0]["data"] == [2, 4]
        return
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        add()
    assert infer(diamond, "split", [1, 2]).status_code == 200


def test_a_datatype_mismatch_between_steps_is_a_load_error(diamond) -> None:
    with pytest.raises(ValueError, match=r"step 1 \(model 'split'\): input 'X' is FP32"):
        diamond.add_ensemble(
            "typed",
            [step("split", {"X": "X"}, {"Y": "Y"})],
            inputs=[Tensor("X", "INT32", [2])],
            outputs=[Tensor("Y", "FP32", [2])],
            max_batch_size=8,
        )


ENSEMBLE_CONFIG = """
    backend = "ensemble"
    max_batch_size = 8
    [[input]]
    name = "X"
    datatype = "FP32"
    dims = [2]
    [[output]]
    name = "Y"
    datatype = "FP32"
    dims = [2]
    [[ensemble.step]]
    model_name = "double"
    model_version = -1
    input_map = { X = "X" }
    output_map = { Y = "Y" }
"""

DOUBLE = """
    class Model:
        def execute(self, inputs):
            return {"Y": inputs["X"] * 2}
"""

DOUBLE_CONFIG = """
    backend = "python"
    max_batch_size = 8
    [[input]]
    name = "X"
    datatype = "FP32"
    dims = [2]
    [[output]]
    name = "Y"
    datatype = "FP32"
    dims = [2]
"""


def test_an_ensemble_follows_its_steps_availability(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "double", DOUBLE_CONFIG, DOUBLE)
    write_model(tmp_path, "ens", ENSEMBLE_CONFIG)
    write_model(tmp_path, "bad_ens", ENSEMBLE_CONFIG.replace('model_name = "double"', 'model_name = "nothere"'))
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "*")
    client = httpclient.InferenceServerClient(server.address)
    x = httpclient.InferInput("X", [1, 2], "FP32")
    x.set_data_from_numpy(np.array([[1, 2]], dtype=np.float32))
    assert client.infer("ens", [x]).as_numpy("Y").tolist() == [[2, 4]]
    r = requests.get(f"{server.url}/v2/models/bad_ens/ready")
    assert r.status_code == 400 and "step 1 (model 'nothere')" in r.json()["error"]
    client.unload_model("double")
    wait_until(lambda: not client.is_model_ready("ens"), what="the ensemble to follow its step")
    r = requests.get(f"{server.url}/v2/models/ens/ready")
    assert "step 1 (model 'double') is unavailable" in r.json()["error"]
    client.load_model("double")
    assert client.is_model_ready("ens")
    assert client.infer("ens", [x]).as_numpy("Y").tolist() == [[2, 4]]


class Caller:
    def __init__(self, target: str) -> None:
        self.target = target

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"Y": fastserve.infer(self.target, {"X": inputs["X"]})["Y"] + 1}


class AsyncCaller:
    async def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"Y": (await fastserve.infer_async("double", {"X": inputs["X"]}))["Y"] * 10}


class Slow:
    def __init__(self) -> None:
        self.release = threading.Event()

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.release.wait(HANG_GUARD_S)
        return {"Y": inputs["X"]}


def test_in_process_calls_equal_direct_calls_and_refuse_cycles() -> None:
    slow = Slow()
    io = {"inputs": ROW, "outputs": [Tensor("Y", "FP32", [2])], "max_batch_size": 8}
    with Server(http_port=0) as server:
        server.add_model("double", Scale(2.0), **io)
        server.add_model("caller", Caller("double"), **io)
        server.add_model("acaller", AsyncCaller(), **io)
        server.add_model("self", Caller("self"), **io)
        server.add_model("ping", Caller("pong"), **io)
        server.add_model("pong", Caller("ping"), **io)
        server.add_model("slow", slow, **io)
        server.add_model("impatient", Caller("slow"), execution_timeout_ms=200, **io)
        assert infer(server, "caller", [1, 2]).json()["outputs"][0]["data"] == [3, 5]
        assert infer(server, "acaller", [1, 2]).json()["outputs"][0]["data"] == [20, 40]
        r = infer(server, "self", [1, 2])
        assert r.status_code == 500 and "self -> self" in r.json()["error"]
        r = infer(server, "ping", [1, 2])
        assert r.status_code == 500 and "ping -> pong -> ping" in r.json()["error"]
        # The caller's execution timeout bounds its wait for the callee.
        r = infer(server, "impatient", [1, 2])
        slow.release.set()
        assert r.status_code == 503, r.text
        assert infer(server, "caller", [2, 2]).json()["outputs"][0]["data"] == [5, 5]

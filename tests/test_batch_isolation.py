"""One bad request does not fail the requests it was batched with: a failed batch of several
requests runs again one request at a time (`isolate_batch_failures`, on by default), and models
whose execute must not run twice turn that off. Batches are formed by holding the model on a gate
and waiting for the queue, never by timing."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from fastserve import Server, Tensor
from tritonclient.utils import InferenceServerException

from helpers import HANG_GUARD_S, wait_until


class Gated:
    """Doubles X; holds its first batch until the test opens the gate; a negative value makes the
    whole execute raise."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["X"]
        self.batches.append(x.shape[0])
        if len(self.batches) == 1:
            self.gate.wait(HANG_GUARD_S)
        if (x < 0).any():
            raise ValueError(f"negative input {x.min()}")
        return {"Y": x * 2}


@pytest.fixture
def server() -> Iterator[Server]:
    with Server(http_port=0, metrics_port=0) as server:
        yield server


def add(server: Server, name: str, **options: Any) -> Gated:
    model = Gated()
    io = {"inputs": [Tensor("X", "FP32", [2])], "outputs": [Tensor("Y", "FP32", [2])]}
    server.add_model(name, model, max_batch_size=8, **io, **options)
    return model


def metric(server: Server, name: str, model: str) -> float:
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=HANG_GUARD_S).text
    found = re.search(rf'{name}{{model="{model}",version="1"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def batch_of_good_and_bad(server: Server, model: Gated, name: str) -> tuple[Any, Any]:
    """A good and a bad request, queued behind a held batch so that they run as one batch."""

    def infer(value: float) -> Any:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")  # one per thread
        x = httpclient.InferInput("X", [1, 2], "FP32")
        x.set_data_from_numpy(np.full((1, 2), value, np.float32))
        try:
            return client.infer(name, [x]).as_numpy("Y")
        except InferenceServerException as e:
            return e

    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(infer, 1.0)
        wait_until(lambda: len(model.batches) == 1, what="the first batch to reach the model")
        good, bad = pool.submit(infer, 3.0), pool.submit(infer, -1.0)
        wait_until(lambda: metric(server, "fastserve_pending_requests", name) == 2, what="two queued requests")
        model.gate.set()
        np.testing.assert_array_equal(first.result(timeout=HANG_GUARD_S), np.full((1, 2), 2.0))
        return good.result(timeout=HANG_GUARD_S), bad.result(timeout=HANG_GUARD_S)


def test_only_the_bad_request_of_a_failed_batch_fails(server: Server) -> None:
    model = add(server, "isolated")
    good, bad = batch_of_good_and_bad(server, model, "isolated")
    np.testing.assert_array_equal(good, np.full((1, 2), 6.0))
    assert isinstance(bad, InferenceServerException) and "negative input -1.0" in bad.message()
    assert model.batches == [1, 2, 1, 1], "the batch of two failed, then each request ran alone"
    assert metric(server, "fastserve_batch_split_total", "isolated") == 1


def test_models_that_must_not_run_twice_fail_the_whole_batch_once(server: Server) -> None:
    model = add(server, "once", isolate_batch_failures=False)
    good, bad = batch_of_good_and_bad(server, model, "once")
    assert isinstance(good, InferenceServerException) and isinstance(bad, InferenceServerException)
    assert model.batches == [1, 2]
    assert metric(server, "fastserve_batch_split_total", "once") == 0


class PerRequest(Gated):
    """Answers each request of a batch on its own: a negative request gets its own error."""

    def execute_requests(self, inputs: list[dict[str, np.ndarray]], infos: list[tuple]) -> list[dict | str]:
        self.batches.append(len(inputs))
        if len(self.batches) == 1:
            self.gate.wait(HANG_GUARD_S)
        return [f"request {i} is negative" if (x["X"] < 0).any() else {"Y": x["X"] * 2} for i, x in enumerate(inputs)]


def test_a_model_can_fail_one_request_of_a_batch_explicitly(server: Server) -> None:
    model = PerRequest()
    io = {"inputs": [Tensor("X", "FP32", [2])], "outputs": [Tensor("Y", "FP32", [2])]}
    server.add_model("explicit", model, max_batch_size=8, **io)
    good, bad = batch_of_good_and_bad(server, model, "explicit")
    np.testing.assert_array_equal(good, np.full((1, 2), 6.0))
    assert isinstance(bad, InferenceServerException) and "is negative" in bad.message()
    assert model.batches == [1, 2], "one batch of two, answered request by request, nothing run twice"
    assert metric(server, "fastserve_batch_split_total", "explicit") == 0

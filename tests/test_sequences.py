"""Stateful models through the sequence batcher: sequence ids, START/END/READY/CORRID control
inputs, implicit state, direct and oldest strategies, idle release, and the errors, with
tritonclient over HTTP and gRPC (sync and stream)."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from fastserve import Server, Tensor
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess, write_model
from helpers import HANG_GUARD_S, wait_until

X = [Tensor("X", "INT32", [1])]
SUM = [Tensor("SUM", "INT32", [1])]
CONTROLS = [
    {"name": "START", "control": [{"kind": "CONTROL_SEQUENCE_START", "int32_false_true": [0, 1]}]},
    {"name": "READY", "control": [{"kind": "CONTROL_SEQUENCE_READY", "fp32_false_true": [0.0, 1.0]}]},
    {"name": "CORRID", "control": [{"kind": "CONTROL_SEQUENCE_CORRID", "data_type": "TYPE_STRING"}]},
]
STATE = [{"input_name": "TOTAL_IN", "output_name": "TOTAL_OUT", "data_type": "TYPE_INT32", "dims": [1]}]


class SlotAccumulator:
    """Keeps a running sum per batch slot, reset by START, as a direct-mode model does; checks
    that READY marks exactly the rows that carry a request and that CORRID names their sequence."""

    def __init__(self) -> None:
        self.sums: dict[int, int] = {}

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x, start, ready, corrid = inputs["X"], inputs["START"], inputs["READY"], inputs["CORRID"]
        assert start.dtype == np.int32 and ready.dtype == np.float32 and start.shape == (x.shape[0], 1)
        out = np.zeros_like(x)
        for row in range(x.shape[0]):
            if not ready[row, 0]:
                assert corrid[row, 0] == b""
                continue
            assert corrid[row, 0] != b""
            if start[row, 0]:
                self.sums[row] = 0
            self.sums[row] += int(x[row, 0])
            out[row, 0] = self.sums[row]
        return {"SUM": out}


class StateAccumulator:
    """Keeps no state of its own: the server feeds back TOTAL_OUT as TOTAL_IN."""

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        total = inputs["TOTAL_IN"] + inputs["X"]
        return {"SUM": total.copy(), "TOTAL_OUT": total}


@pytest.fixture(scope="module")
def served() -> Iterator[Server]:
    server = Server(http_port=0, grpc_port=0, metrics_port=0)
    direct = {"control_input": CONTROLS}
    server.add_model(
        "direct", SlotAccumulator, inputs=X, outputs=SUM, max_batch_size=4, instance_count=2, sequence_batching=direct
    )
    oldest = {
        "strategy": "oldest",
        "oldest": {"max_candidate_sequences": 8, "preferred_batch_size": [4], "max_queue_delay_microseconds": 1000},
        "state": STATE,
    }
    server.add_model(
        "oldest",
        StateAccumulator(),
        inputs=X,
        outputs=SUM,
        max_batch_size=4,
        instance_count=2,
        sequence_batching=oldest,
    )
    server.add_model(
        "state", StateAccumulator(), inputs=X, outputs=SUM, max_batch_size=4, sequence_batching={"state": STATE}
    )
    # No batching: one slot per instance, tensors without a batch dimension.
    server.add_model("single", StateAccumulator(), inputs=X, outputs=SUM, sequence_batching={"state": STATE})
    server.add_model(
        "plain",
        StateAccumulator(),
        inputs=[*X, Tensor("TOTAL_IN", "INT32", [1])],
        outputs=[*SUM, Tensor("TOTAL_OUT", "INT32", [1])],
        max_batch_size=4,
    )
    with server:
        yield server


def x_input(value: int, client: Any, batched: bool = True) -> Any:
    shape = [1, 1] if batched else [1]
    inp = client.InferInput("X", shape, "INT32")
    inp.set_data_from_numpy(np.full(shape, value, dtype=np.int32))
    return inp


def expected_sums(values: list[int]) -> list[int]:
    return list(np.cumsum(values))


@pytest.mark.parametrize("model", ["direct", "oldest", "state"])
def test_interleaved_sequences_over_one_grpc_stream_get_their_own_running_sums(served, model: str) -> None:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    sequences, steps = 8, 20
    try:
        # Step by step across the sequences, all on one stream, without waiting for answers.
        for step in range(steps):
            for seq in range(sequences):
                client.async_stream_infer(
                    model,
                    [x_input(seq * 100 + step, grpcclient)],
                    request_id=f"{seq}:{step}",
                    sequence_id=1000 + seq,
                    sequence_start=step == 0,
                    sequence_end=step == steps - 1,
                )
        got: dict[int, dict[int, int]] = {}
        for _ in range(sequences * steps):
            result, error = results.get(timeout=HANG_GUARD_S)
            assert error is None, error
            seq, step = map(int, result.get_response().id.split(":"))
            got.setdefault(seq, {})[step] = int(result.as_numpy("SUM")[0, 0])
    finally:
        client.stop_stream()
    for seq in range(sequences):
        values = [seq * 100 + step for step in range(steps)]
        assert [got[seq][step] for step in range(steps)] == expected_sums(values), seq


def test_sequences_over_http_and_grpc_sync_clients(served) -> None:
    def run(seq: int) -> list[int]:
        # tritonclient.http clients are not thread-safe: one pair per thread.
        http = httpclient.InferenceServerClient(f"127.0.0.1:{served.http_port}")
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
        sums = []
        for step, value in enumerate([3, 4, 5, 6]):
            client, module = (http, httpclient) if (seq + step) % 2 else (grpc, grpcclient)
            # String correlation ids work as integers do.
            result = client.infer(
                "direct",
                [x_input(value, module)],
                sequence_id=f"user-{seq}",
                sequence_start=step == 0,
                sequence_end=step == 3,
            )
            sums.append(int(result.as_numpy("SUM")[0, 0]))
        return sums

    with ThreadPoolExecutor(max_workers=6) as pool:
        for sums in pool.map(run, range(6)):
            assert sums == [3, 7, 12, 18]
    # Without batching: tensors without the batch dimension, one sequence per instance slot.
    http = httpclient.InferenceServerClient(f"127.0.0.1:{served.http_port}")
    sums = [
        int(
            http.infer(
                "single",
                [x_input(v, httpclient, batched=False)],
                sequence_id=5,
                sequence_start=i == 0,
                sequence_end=i == 2,
            ).as_numpy("SUM")[0]
        )
        for i, v in enumerate([1, 2, 3])
    ]
    assert sums == [1, 3, 6]


def infer_status(server: Server, model: str, **parameters: Any) -> tuple[int, str]:
    body = {"inputs": [{"name": "X", "shape": [1, 1], "datatype": "INT32", "data": [1]}], "parameters": parameters}
    r = requests.post(f"http://127.0.0.1:{server.http_port}/v2/models/{model}/infer", json=body)
    return r.status_code, r.json().get("error", "")


def test_sequence_errors_answer_400_and_the_server_keeps_serving(served) -> None:
    cases = [
        ("plain", {"sequence_id": 1, "sequence_start": True}, "not configured for sequence batching"),
        ("state", {}, "needs parameter 'sequence_id'"),
        ("state", {"sequence_id": 4242}, "is not active"),
        ("state", {"sequence_id": -1}, "unsigned 64-bit integer"),
        ("state", {"sequence_id": 1, "sequence_start": "yes"}, "must be a boolean"),
        ("state", {"sequence_start": True}, "need a 'sequence_id'"),
    ]
    for model, parameters, says in cases:
        status, error = infer_status(served, model, **parameters)
        assert status == 400 and says in error, (model, parameters, error)
    body = {
        "inputs": [{"name": "X", "shape": [2, 1], "datatype": "INT32", "data": [1, 2]}],
        "parameters": {"sequence_id": 3, "sequence_start": True},
    }
    r = requests.post(f"http://127.0.0.1:{served.http_port}/v2/models/state/infer", json=body)
    assert r.status_code == 400 and "batch size 1" in r.json()["error"]
    # A sequence that ended takes no more requests without a new start.
    assert infer_status(served, "state", sequence_id=77, sequence_start=True, sequence_end=True)[0] == 200
    status, error = infer_status(served, "state", sequence_id=77)
    # Which wording depends on whether the batcher has released the ended sequence's slot yet.
    assert status == 400 and ("already ended" in error or "is not active" in error), error
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    with pytest.raises(InferenceServerException, match="is not active") as e:
        grpc.infer("state", [x_input(1, grpcclient)], sequence_id=999)
    assert "INVALID_ARGUMENT" in str(e.value.status())
    assert infer_status(served, "state", sequence_id=78, sequence_start=True, sequence_end=True)[0] == 200


def metric(server: Server, name: str, model: str) -> float:
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_idle_sequence_is_released_and_cannot_continue() -> None:
    with Server(http_port=0, metrics_port=0) as server:
        short = {"max_sequence_idle_microseconds": 2000, "state": STATE}
        server.add_model("idle", StateAccumulator(), inputs=X, outputs=SUM, max_batch_size=2, sequence_batching=short)
        assert infer_status(server, "idle", sequence_id=1, sequence_start=True)[0] == 200
        wait_until(lambda: metric(server, "fastserve_sequence_idle_released_total", "idle") == 1, what="idle release")
        assert metric(server, "fastserve_sequences_active", "idle") == 0
        status, error = infer_status(server, "idle", sequence_id=1)
        assert status == 400 and "max_sequence_idle_microseconds" in error
        # A new start after the release begins from the initial state.
        body = {
            "inputs": [{"name": "X", "shape": [1, 1], "datatype": "INT32", "data": [5]}],
            "parameters": {"sequence_id": 1, "sequence_start": True},
        }
        r = requests.post(f"http://127.0.0.1:{server.http_port}/v2/models/idle/infer", json=body)
        assert r.json()["outputs"][0]["data"] == [5]


def test_more_sequences_than_slots_wait_for_a_free_slot() -> None:
    with Server(http_port=0, metrics_port=0) as server:
        # One instance, no batching: a single slot.
        server.add_model("one", StateAccumulator(), inputs=X, outputs=SUM, sequence_batching={"state": STATE})
        body = lambda seq, v, **flags: {  # noqa: E731
            "inputs": [{"name": "X", "shape": [1], "datatype": "INT32", "data": [v]}],
            "parameters": {"sequence_id": seq, **flags},
        }
        url = f"http://127.0.0.1:{server.http_port}/v2/models/one/infer"
        assert requests.post(url, json=body(1, 10, sequence_start=True)).json()["outputs"][0]["data"] == [10]
        with ThreadPoolExecutor(max_workers=1) as pool:
            second = pool.submit(requests.post, url, json=body(2, 1, sequence_start=True, sequence_end=True))
            # Sequence 2 is queued, not refused, while sequence 1 holds the slot.
            # Queued (counted at once) and then taken in by the sequence batcher (active): two steps.
            wait_until(
                lambda: (
                    metric(server, "fastserve_pending_requests", "one") == 1
                    and metric(server, "fastserve_sequences_active", "one") == 2
                ),
                what="sequence 2 queued and active",
            )
            assert requests.post(url, json=body(1, 5, sequence_end=True)).json()["outputs"][0]["data"] == [15]
            assert second.result(timeout=HANG_GUARD_S).json()["outputs"][0]["data"] == [1]


SEQUENCE_CONFIG = """
    backend = "python"
    max_batch_size = 8

    [sequence_batching]
    max_sequence_idle_microseconds = 5000000
    strategy = "oldest"

    [sequence_batching.oldest]
    max_candidate_sequences = 4
    preferred_batch_size = [2]

    [[sequence_batching.control_input]]
    name = "START"
    [[sequence_batching.control_input.control]]
    kind = "CONTROL_SEQUENCE_START"
    int32_false_true = [0, 1]

    [[sequence_batching.control_input]]
    name = "CORRID"
    [[sequence_batching.control_input.control]]
    kind = "CONTROL_SEQUENCE_CORRID"
    data_type = "TYPE_UINT64"

    [[sequence_batching.state]]
    input_name = "TOTAL_IN"
    output_name = "TOTAL_OUT"
    data_type = "TYPE_INT32"
    dims = [1]
    initial_state = { fill = 100 }

    [[input]]
    name = "X"
    datatype = "INT32"
    dims = [1]

    [[output]]
    name = "SUM"
    datatype = "INT32"
    dims = [1]
"""

SEQUENCE_MODEL = """
    import numpy as np

    class Model:
        def execute(self, inputs):
            assert inputs["CORRID"].dtype == np.uint64 and inputs["START"].dtype == np.int32
            total = inputs["TOTAL_IN"] + inputs["X"]
            return {"SUM": total.copy(), "TOTAL_OUT": total}
"""


def test_config_toml_declares_the_sequence_batcher(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "seq", SEQUENCE_CONFIG, SEQUENCE_MODEL)
    bad = SEQUENCE_CONFIG.replace('strategy = "oldest"', 'strategy = "newest"')
    write_model(tmp_path, "bad_seq", bad, SEQUENCE_MODEL)
    server: ServerProcess = start_server(tmp_path)
    client = httpclient.InferenceServerClient(server.address)
    sums = [
        int(
            client.infer(
                "seq", [x_input(v, httpclient)], sequence_id=9, sequence_start=i == 0, sequence_end=i == 2
            ).as_numpy("SUM")[0, 0]
        )
        for i, v in enumerate([1, 2, 3])
    ]
    assert sums == [101, 103, 106]  # the initial state is 100
    # Clients see only X and SUM; the configuration shows the sequence batcher as Triton's does.
    metadata = client.get_model_metadata("seq")
    assert [t["name"] for t in metadata["inputs"]] == ["X"] and [t["name"] for t in metadata["outputs"]] == ["SUM"]
    config = client.get_model_config("seq")["sequence_batching"]
    assert config["oldest"]["max_candidate_sequences"] == 4
    assert [c["name"] for c in config["control_input"]] == ["START", "CORRID"]
    assert config["state"][0]["input_name"] == "TOTAL_IN"
    grpc_config = grpcclient.InferenceServerClient(server.grpc_address).get_model_config("seq").config
    assert grpc_config.sequence_batching.oldest.preferred_batch_size == [2]
    # The bad configuration fails that model alone, with the reason.
    r = requests.get(f"{server.url}/v2/models/bad_seq/ready")
    assert r.status_code == 400 and "newest" in r.json()["error"], r.text
    assert client.is_model_ready("seq")

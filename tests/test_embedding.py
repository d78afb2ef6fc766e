"""The embedding API: models registered in code, every datatype through the Python boundary,
dynamic batching observed from inside the model, and clean start/stop."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fastserve
import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from fastserve import Server, Tensor

from conftest import DTYPES, EXAMPLES, Identity, Recorder, infer_json, sample


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_every_datatype_round_trips_as_numpy(identity_models, datatype: str) -> None:
    server, models = identity_models
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    x = sample(datatype, (2, 3))
    inp = httpclient.InferInput("IN", [2, 3], datatype)
    inp.set_data_from_numpy(x, binary_data=False)
    result = client.infer(
        f"id_{datatype.lower()}", [inp], outputs=[httpclient.InferRequestedOutput("OUT", binary_data=False)]
    )
    out = result.as_numpy("OUT")
    assert out.shape == (2, 3)
    if datatype == "BYTES":
        # tritonclient decodes JSON strings to str; the bytes on the model side were exact.
        assert [[v.encode() if isinstance(v, str) else v for v in row] for row in out.tolist()] == x.tolist()
    else:
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)
    # The model saw a NumPy array of the right dtype and shape, batch dimension first.
    assert models[datatype].seen[-1] == (np.dtype(DTYPES[datatype]).name, (2, 3))


def post_rows(port: int, rows: np.ndarray) -> np.ndarray:
    r = infer_json(
        f"http://127.0.0.1:{port}",
        "rec",
        [{"name": "X", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}],
    )
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def test_concurrent_requests_are_batched_and_each_gets_its_rows() -> None:
    model = Recorder()
    server = Server(http_port=0)
    # The batch is sent the moment 8 rows are queued; the long delay only bounds a hung test.
    server.add_model(
        "rec",
        model,
        inputs=[Tensor("X", "FP32", [3])],
        outputs=[Tensor("Y", "FP32", [3])],
        max_batch_size=8,
        max_queue_delay_us=60_000_000,
    )
    rows_per_request = [1, 2, 3, 1, 1]  # 8 rows in all
    with server, ThreadPoolExecutor(len(rows_per_request)) as pool:
        payloads = [np.full((n, 3), i * 10, dtype=np.float32) + np.arange(3) for i, n in enumerate(rows_per_request)]
        answers = list(pool.map(lambda p: post_rows(server.http_port, p), payloads))
    assert model.batches == [8]
    for payload, answer in zip(payloads, answers, strict=True):
        np.testing.assert_array_equal(answer, payload + 1)


def test_many_concurrent_clients_get_their_own_rows() -> None:
    model = Recorder()
    server = Server(http_port=0)
    server.add_model(
        "rec", model, inputs=[Tensor("X", "FP32", [3])], outputs=[Tensor("Y", "FP32", [3])], max_batch_size=16
    )
    with server, ThreadPoolExecutor(16) as pool:
        payloads = [np.full((1 + i % 3, 3), i, dtype=np.float32) for i in range(300)]
        answers = list(pool.map(lambda p: post_rows(server.http_port, p), payloads))
    for payload, answer in zip(payloads, answers, strict=True):
        np.testing.assert_array_equal(answer, payload + 1)
    assert sum(model.batches) == sum(len(p) for p in payloads)
    assert max(model.batches) <= 16


def test_shape_incompatible_requests_are_never_mixed() -> None:
    widths: list[set[int]] = []

    class Widths:
        def execute(self, inputs):
            x = inputs["X"]
            widths.append({x.shape[1]})
            return {"Y": x * 2}

    server = Server(http_port=0)
    server.add_model(
        "w", Widths(), inputs=[Tensor("X", "INT32", [-1])], outputs=[Tensor("Y", "INT32", [-1])], max_batch_size=16
    )

    def call(width: int) -> list[int]:
        x = list(range(width))
        r = infer_json(
            f"http://127.0.0.1:{server.http_port}",
            "w",
            [{"name": "X", "shape": [1, width], "datatype": "INT32", "data": x}],
        )
        assert r.status_code == 200, r.text
        return r.json()["outputs"][0]["data"]

    with server, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, [2 + i % 3 for i in range(60)]))
    for i, out in enumerate(results):
        assert out == [2 * v for v in range(2 + i % 3)]
    assert all(len(w) == 1 for w in widths)


def test_no_batching_model_sees_requests_without_batch_dim() -> None:
    seen = []

    class Sum:
        def execute(self, inputs):
            seen.append(inputs["X"].shape)
            return {"S": np.array([inputs["X"].sum()], dtype=np.float64)}

    server = Server(http_port=0)
    server.add_model("sum", Sum(), inputs=[Tensor("X", "FP64", [-1, 2])], outputs=[Tensor("S", "FP64", [1])])
    with server:
        r = infer_json(
            f"http://127.0.0.1:{server.http_port}",
            "sum",
            [{"name": "X", "shape": [3, 2], "datatype": "FP64", "data": [1, 2, 3, 4, 5, 6]}],
        )
    assert r.json()["outputs"][0]["data"] == [21.0]
    assert seen == [(3, 2)]


def test_lifecycle_hooks_and_instances() -> None:
    events: list[str] = []

    class Hooked:
        def __init__(self) -> None:
            events.append("init")

        def execute(self, inputs):
            return {"Y": inputs["X"]}

        def finalize(self) -> None:
            events.append("finalize")

    server = Server(http_port=0)
    server.add_model(
        "h",
        Hooked,
        inputs=[Tensor("X", "FP32", [1])],
        outputs=[Tensor("Y", "FP32", [1])],
        max_batch_size=4,
        instance_count=2,
    )
    assert events == ["init", "init"]
    with server:
        assert server.is_ready
        assert server.models() == [("h", 1, True)]
        port = server.http_port
        assert requests.get(f"http://127.0.0.1:{port}/v2/models/h/ready", timeout=10).status_code == 200
    assert events.count("finalize") == 2
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=10)


def test_unload_drains_and_forgets_the_model() -> None:
    server = Server(http_port=0)
    server.add_model("a", Identity(), inputs=[Tensor("IN", "FP32", [-1])], outputs=[Tensor("OUT", "FP32", [-1])])
    with server:
        url = f"http://127.0.0.1:{server.http_port}"
        assert server.unload_model("a") == 1
        assert requests.get(f"{url}/v2/models/a", timeout=10).status_code == 404
        assert server.models() == []


def test_embedded_repository_loading(tmp_path: Path) -> None:
    server = Server(http_port=0)
    statuses = server.load_repository(EXAMPLES)
    models = {"mlp", "echo", "textgen", "preprocess", "postprocess", "classify", "mlp_top"}
    assert {(s.name, s.version, s.ready) for s in statuses} == {(m, 1, True) for m in models}
    with server:
        r = infer_json(
            f"http://127.0.0.1:{server.http_port}",
            "echo",
            [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["q"]}],
        )
        assert r.json()["outputs"][0]["data"] == ["echo: q"]


def test_bind_conflict_is_a_clear_error() -> None:
    with Server(http_port=0) as first:
        second = Server(http_port=first.http_port)
        with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1"):
            second.start()


def test_invalid_declarations_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown datatype"):
        Tensor("X", "FLOAT32")
    server = Server(http_port=0)
    with pytest.raises(TypeError, match="no execute"):
        server._core.add_model(
            "m", 1, "python", [("X", "FP32", [1], None, False)], [("Y", "FP32", [1], None, False)], [object()]
        )
    assert fastserve.__version__


def test_a_server_never_started_is_collected_and_finalizes_its_models() -> None:
    # The models' threads need the GIL to finalize; dropping the server must not hold it meanwhile.
    import gc

    finalized = []

    class Model:
        def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"Y": inputs["X"]}

        def finalize(self) -> None:
            finalized.append(True)

    server = Server(http_port=0)
    server.add_model("m", Model(), inputs=[Tensor("X", "FP32", [1])], outputs=[Tensor("Y", "FP32", [1])])
    del server
    gc.collect()
    assert finalized == [True]

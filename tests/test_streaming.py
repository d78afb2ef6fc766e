"""Decoupled (streaming) models: generator `execute`, the HTTP generate extension (SSE), gRPC
decoupled streams with Triton's final-response flags, cancellation and backpressure, metrics and
statistics. Models are embedded in this process so a test can hold a model at a `yield` with an
event it sets itself: nothing here waits on time."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from fastserve import Server, Tensor
from fastserve.config import ConfigError, parse_config

from conftest import EXAMPLES, ServerProcess
from helpers import HANG_GUARD_S, wait_until

N_IN = [Tensor("N", "INT32", [1])]
OUT = [Tensor("OUT", "INT32", [1])]


class Count:
    """Yields 0..N-1, one response each."""

    def execute(self, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for i in range(int(inputs["N"][0])):
            yield {"OUT": np.array([i], dtype=np.int32)}


class BatchedCount:
    """Count for a model with max_batch_size > 0: one request per call, batch dimension 1."""

    def execute(self, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        assert inputs["N"].shape == (1, 1)
        for i in range(int(inputs["N"][0, 0])):
            yield {"OUT": np.array([[i]], dtype=np.int32)}


class AsyncCount:
    """The same as an async generator."""

    async def execute(self, inputs: dict[str, np.ndarray]) -> Any:
        for i in range(int(inputs["N"][0])):
            yield {"OUT": np.array([i * 10], dtype=np.int32)}


class Gated:
    """Yields once, then waits for the test to open the gate before yielding again."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def execute(self, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        yield {"OUT": np.array([1], dtype=np.int32)}
        assert self.gate.wait(HANG_GUARD_S), "the test never opened the gate"
        yield {"OUT": np.array([2], dtype=np.int32)}


class Endless:
    """Yields until its client goes away; records that its `finally` ran."""

    def __init__(self) -> None:
        self.closed: queue.Queue[int] = queue.Queue()
        self.yielded = 0

    def execute(self, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        i = 0
        try:
            while True:
                yield {"OUT": np.array([i], dtype=np.int32)}
                i += 1
        finally:
            self.closed.put(i)


class FailsAfterThree:
    def execute(self, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for i in range(3):
            yield {"OUT": np.array([i], dtype=np.int32)}
        raise RuntimeError("boom after three")


class Once:
    """An ordinary (not decoupled) model."""

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUT": inputs["N"] + 1}


class Words:
    """BYTES in, BYTES out: one response per word of the prompt."""

    def execute(self, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for word in inputs["PROMPT"][0].split():
            yield {"WORD": np.array([word], dtype=object)}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Server, dict[str, Any]]]:
    models: dict[str, Any] = {
        "count": Count(),
        "acount": AsyncCount(),
        "gated": Gated(),
        "endless": Endless(),
        "fails": FailsAfterThree(),
    }
    server = Server(http_port=0, grpc_port=0, metrics_port=0)
    for name, model in models.items():
        server.add_model(name, model, inputs=N_IN, outputs=OUT, decoupled=True)
    server.add_model("many", Count, inputs=N_IN, outputs=OUT, decoupled=True, instance_count=4)
    server.add_model(
        "batched", BatchedCount(), inputs=N_IN, outputs=OUT, decoupled=True, max_batch_size=8, max_queue_delay_us=0
    )
    server.add_model("once", Once(), inputs=N_IN, outputs=OUT)
    server.add_model(
        "words",
        Words(),
        inputs=[Tensor("PROMPT", "BYTES", [1])],
        outputs=[Tensor("WORD", "BYTES", [1])],
        decoupled=True,
    )
    with server:
        yield server, models


def url(server: Server, path: str) -> str:
    return f"http://127.0.0.1:{server.http_port}{path}"


def sse(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The events of a `text/event-stream` response as they arrive."""
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            yield json.loads(line[len(b"data: ") :])


def stream_events(server: Server, model: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with requests.post(url(server, f"/v2/models/{model}/generate_stream"), json=body, stream=True) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "text/event-stream"
        return list(sse(r))


def n_input(n: int, client: Any = grpcclient) -> Any:
    inp = client.InferInput("N", [1], "INT32")
    inp.set_data_from_numpy(np.array([n], dtype=np.int32))
    return inp


class StreamReader:
    """A tritonclient.grpc stream whose callback results land in a queue."""

    def __init__(self, server: Server) -> None:
        self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        self.results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def next(self) -> tuple[Any, Any]:
        return self.results.get(timeout=HANG_GUARD_S)

    def until_final(self, requests_left: int) -> list[tuple[str, list[int] | None, bool, str | None]]:
        """(id, OUT, triton_final_response, error) of everything received until `requests_left`
        requests ended (a final flag or an error)."""
        got = []
        while requests_left:
            result, error = self.next()
            if error is not None:
                got.append(("", None, True, str(error)))
                requests_left -= 1
                continue
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            out = result.as_numpy("OUT")
            got.append((response.id, None if out is None else out.tolist(), final, None))
            requests_left -= final
        return got

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def test_generate_stream_sends_one_event_per_yield_in_order(served) -> None:
    server, _ = served
    events = stream_events(server, "count", {"N": 5})
    assert [e["OUT"] for e in events] == [0, 1, 2, 3, 4]
    assert all(e["model_name"] == "count" and e["model_version"] == "1" for e in events)
    assert [e["OUT"] for e in stream_events(server, "acount", {"N": 3})] == [0, 10, 20]
    # A batching decoupled model gets the batch dimension added to each field.
    assert [e["OUT"] for e in stream_events(server, "batched", {"N": 2})] == [0, 1]
    # Strings are BYTES; an ordinary model answers with one event.
    assert [e["WORD"] for e in stream_events(server, "words", {"PROMPT": "a streamed reply"})] == [
        "a",
        "streamed",
        "reply",
    ]
    assert stream_events(server, "once", {"N": 41}) == [{"model_name": "once", "model_version": "1", "OUT": 42}]
    # Zero responses is a stream with no events.
    assert stream_events(server, "count", {"N": 0}) == []


def test_the_first_event_arrives_before_the_generator_finishes(served) -> None:
    server, models = served
    gate = models["gated"].gate
    gate.clear()
    with requests.post(url(server, "/v2/models/gated/generate_stream"), json={"N": 1}, stream=True) as r:
        events = sse(r)
        # The model is now blocked on the gate, which only this test opens: the event was sent
        # while its generator was still running.
        assert next(events)["OUT"] == 1
        gate.set()
        assert [e["OUT"] for e in events] == [2]


def test_generate_answers_once_and_errors_are_http_errors(served) -> None:
    server, _ = served
    r = requests.post(url(server, "/v2/models/count/generate"), json={"N": 1})
    assert r.status_code == 200 and r.json()["OUT"] == 0
    r = requests.post(url(server, "/v2/models/once/generate"), json={"N": 1, "parameters": {"x": 1}})
    assert r.status_code == 200 and r.json()["OUT"] == 2
    r = requests.post(url(server, "/v2/models/count/generate"), json={"N": 2})
    assert r.status_code == 400 and "generate_stream" in r.json()["error"]
    # Errors before the first event are ordinary HTTP errors in the V2 error format.
    for path, body, status, says in [
        ("/v2/models/count/generate_stream", {"NOPE": 1}, 400, "unexpected field 'NOPE'"),
        ("/v2/models/count/generate_stream", {"N": "x"}, 400, "N"),
        ("/v2/models/count/generate_stream", {}, 400, "missing required input(s) ['N']"),
        ("/v2/models/nosuch/generate_stream", {"N": 1}, 404, "nosuch"),
        ("/v2/models/count/versions/9/generate", {"N": 1}, 404, "9"),
    ]:
        r = requests.post(url(server, path), json=body)
        assert r.status_code == status, (path, body, r.text)
        assert says in r.json()["error"], (path, r.text)
    r = requests.post(url(server, "/v2/models/count/generate_stream"), data=b"not json")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]
    assert requests.get(url(server, "/v2/models/count/generate_stream")).status_code == 404
    assert "generate" in requests.get(url(server, "/v2")).json()["extensions"]


def test_an_error_after_three_yields_gives_three_responses_and_an_error(served) -> None:
    server, _ = served
    events = stream_events(server, "fails", {"N": 1})
    assert [e.get("OUT") for e in events[:3]] == [0, 1, 2]
    assert len(events) == 4 and "boom after three" in events[3]["error"]
    reader = StreamReader(server)
    try:
        reader.client.async_stream_infer("fails", [n_input(1)], request_id="f")
        got = reader.until_final(1)
        assert [(i, out, final) for i, out, final, _ in got[:3]] == [
            ("f", [0], False),
            ("f", [1], False),
            ("f", [2], False),
        ]
        assert len(got) == 4 and "boom after three" in (got[3][3] or "")
    finally:
        reader.close()


def test_grpc_stream_flags_the_last_response_of_each_request(served) -> None:
    server, _ = served
    reader = StreamReader(server)
    try:
        reader.client.async_stream_infer("count", [n_input(3)], request_id="a")
        got = reader.until_final(1)
        assert [(i, out, final) for i, out, final, _ in got] == [("a", [0], False), ("a", [1], False), ("a", [2], True)]
        # With empty final responses every response goes out at once and an empty one ends it.
        reader.client.async_stream_infer("acount", [n_input(2)], request_id="b", enable_empty_final_response=True)
        got = reader.until_final(1)
        assert [(i, out, final) for i, out, final, _ in got] == [
            ("b", [0], False),
            ("b", [10], False),
            ("b", None, True),
        ]
        reader.client.async_stream_infer("count", [n_input(0)], request_id="z", enable_empty_final_response=True)
        assert [(i, out, final) for i, out, final, _ in reader.until_final(1)] == [("z", None, True)]
    finally:
        reader.close()


def test_grpc_empty_final_mode_sends_each_response_before_the_next_is_produced(served) -> None:
    server, models = served
    gate = models["gated"].gate
    gate.clear()
    reader = StreamReader(server)
    try:
        reader.client.async_stream_infer("gated", [n_input(1)], request_id="g", enable_empty_final_response=True)
        result, error = reader.next()
        assert error is None and result.as_numpy("OUT").tolist() == [1]
        gate.set()
        got = reader.until_final(1)
        assert [(out, final) for _, out, final, _ in got] == [([2], False), (None, True)]
    finally:
        reader.close()


def test_unary_infer_on_a_decoupled_model_needs_exactly_one_response(served) -> None:
    server, _ = served
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    assert client.infer("count", [n_input(1)]).as_numpy("OUT").tolist() == [0]
    with pytest.raises(Exception, match="decoupled") as e:
        client.infer("count", [n_input(2)])
    assert "INVALID_ARGUMENT" in str(e.value.status())
    body = {"inputs": [{"name": "N", "shape": [1], "datatype": "INT32", "data": [0]}]}
    r = requests.post(url(server, "/v2/models/count/infer"), json=body)
    assert r.status_code == 400 and "sent no response" in r.json()["error"]


def cancelled_total(server: Server, model: str) -> float:
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    for line in text.splitlines():
        if line.startswith("fastserve_request_cancelled_total{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_closing_the_http_stream_stops_the_generator_and_frees_the_instance(served) -> None:
    server, models = served
    endless = models["endless"]
    before = cancelled_total(server, "endless")
    with requests.post(url(server, "/v2/models/endless/generate_stream"), json={"N": 1}, stream=True) as r:
        events = sse(r)
        assert [next(events)["OUT"] for _ in range(3)] == [0, 1, 2]
    # The client went away: the generator gets GeneratorExit at a yield and its finally runs.
    assert endless.closed.get(timeout=HANG_GUARD_S) >= 3
    wait_until(lambda: cancelled_total(server, "endless") == before + 1, what="the cancellation to be counted")
    # Its only instance serves the next request.
    with requests.post(url(server, "/v2/models/endless/generate_stream"), json={"N": 1}, stream=True) as r:
        assert next(sse(r))["OUT"] == 0
    endless.closed.get(timeout=HANG_GUARD_S)


def test_cancelling_the_grpc_stream_stops_the_generator(served) -> None:
    server, models = served
    endless = models["endless"]
    reader = StreamReader(server)
    reader.client.async_stream_infer("endless", [n_input(1)], request_id="e", enable_empty_final_response=True)
    for expected in range(3):
        result, error = reader.next()
        assert error is None and result.as_numpy("OUT").tolist() == [expected]
    reader.close(cancel=True)
    assert endless.closed.get(timeout=HANG_GUARD_S) >= 3
    assert stream_events(server, "count", {"N": 2}) == [
        {"model_name": "count", "model_version": "1", "OUT": 0},
        {"model_name": "count", "model_version": "1", "OUT": 1},
    ]


def test_a_hundred_concurrent_streams_of_fifty_responses_arrive_whole_and_in_order(served) -> None:
    server, _ = served

    def grpc_streams(worker: int) -> dict[str, list[int]]:
        reader = StreamReader(server)
        try:
            for k in range(10):
                reader.client.async_stream_infer(
                    "many", [n_input(50)], request_id=f"{worker}-{k}", enable_empty_final_response=True
                )
            got: dict[str, list[int]] = {}
            for request_id, out, final, error in reader.until_final(10):
                assert error is None, error
                if not final:
                    got.setdefault(request_id, []).extend(out or [])
            return got
        finally:
            reader.close()

    def http_stream(i: int) -> list[int]:
        return [e["OUT"] for e in stream_events(server, "many", {"N": 50})]

    with ThreadPoolExecutor(max_workers=16) as pool:
        grpc_results = list(pool.map(grpc_streams, range(5)))
        http_results = list(pool.map(http_stream, range(50)))
    expected = list(range(50))
    assert all(r == expected for r in http_results)
    per_request = {k: v for r in grpc_results for k, v in r.items()}
    assert len(per_request) == 50 and all(v == expected for v in per_request.values())


def test_metrics_and_statistics_count_requests_and_responses_apart(served) -> None:
    server, _ = served
    stats_before = requests.get(url(server, "/v2/models/words/stats")).json()["model_stats"][0]
    assert len(stream_events(server, "words", {"PROMPT": "one two three"})) == 3
    stats = requests.get(url(server, "/v2/models/words/stats")).json()["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == stats_before["inference_stats"]["success"]["count"] + 1
    responses = stats["response_stats"]
    assert {"0", "1", "2"} <= set(responses)
    before = stats_before.get("response_stats", {})
    assert responses["2"]["success"]["count"] == before.get("2", {"success": {"count": 0}})["success"]["count"] + 1
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    grpc_stats = grpc.get_inference_statistics("words", as_json=True)["model_stats"][0]
    assert int(grpc_stats["response_stats"]["2"]["success"]["count"]) == responses["2"]["success"]["count"]
    metrics = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    for name in (
        "fastserve_responses_total",
        "fastserve_first_response_duration_seconds_count",
        "fastserve_inter_response_duration_seconds_count",
    ):
        assert any(line.startswith(name + "{") and 'model="words"' in line for line in metrics.splitlines()), name
    config = grpc.get_model_config("words", as_json=True)["config"]
    assert config["model_transaction_policy"]["decoupled"] is True
    assert requests.get(url(server, "/v2/models/words/config")).json()["model_transaction_policy"] == {
        "decoupled": True
    }


def test_a_decoupled_execute_that_is_not_a_generator_is_a_clear_error() -> None:
    class Plain:
        def execute(self, inputs: dict[str, np.ndarray]) -> Any:
            return [1, 2]

    with Server(http_port=0) as server:
        server.add_model("plain", Plain(), inputs=N_IN, outputs=OUT, decoupled=True)
        r = requests.post(url(server, "/v2/models/plain/generate_stream"), json={"N": 1})
        assert r.status_code == 500 and "must yield each response" in r.json()["error"]
        # A dict is the request's one response.
        server.add_model("dict", Once(), inputs=N_IN, outputs=OUT, decoupled=True)
        assert stream_events(server, "dict", {"N": 1})[0]["OUT"] == 2


def test_config_toml_declares_decoupled_models(tmp_path: Path) -> None:
    assert parse_config({"model_transaction_policy": {"decoupled": True}}).decoupled is True
    assert parse_config({}).decoupled is False
    with pytest.raises(ConfigError, match="decoupled must be a boolean"):
        parse_config({"model_transaction_policy": {"decoupled": 1}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"model_transaction_policy": {"decoupledd": True}})


def test_the_example_text_generator_streams_over_both_protocols(example_server: ServerProcess) -> None:
    body = {"PROMPT": "the ", "MAX_TOKENS": 12}
    with requests.post(f"{example_server.url}/v2/models/textgen/generate_stream", json=body, stream=True) as r:
        assert r.status_code == 200
        tokens = [e["TEXT"] for e in sse(r)]
    assert len(tokens) == 12 and all(isinstance(t, str) and len(t) == 1 for t in tokens)
    client = grpcclient.InferenceServerClient(example_server.grpc_address)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    prompt = grpcclient.InferInput("PROMPT", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"the "], dtype=object))
    max_tokens = grpcclient.InferInput("MAX_TOKENS", [1], "INT32")
    max_tokens.set_data_from_numpy(np.array([12], dtype=np.int32))
    client.async_stream_infer("textgen", [prompt, max_tokens], request_id="t", enable_empty_final_response=True)
    streamed = []
    while True:
        result, error = results.get(timeout=HANG_GUARD_S)
        assert error is None, error
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
        streamed.append(result.as_numpy("TEXT")[0].decode())
    client.stop_stream()
    # The same prompt gives the same text over both protocols.
    assert streamed == tokens
    assert (EXAMPLES / "textgen" / "config.toml").is_file()


def test_stopping_the_server_ends_a_running_stream_within_the_drain_deadline() -> None:
    endless = Endless()
    server = Server(http_port=0, drain_timeout_s=0)
    server.add_model("endless", endless, inputs=N_IN, outputs=OUT, decoupled=True)
    server.start()
    with requests.post(url(server, "/v2/models/endless/generate_stream"), json={"N": 1}, stream=True) as r:
        events = sse(r)
        assert next(events)["OUT"] == 0
        # Nothing is left running: the generator was closed at a yield, its finally ran.
        assert server.stop() == 0
        assert endless.closed.get(timeout=HANG_GUARD_S) >= 1

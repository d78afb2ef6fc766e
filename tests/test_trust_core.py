"""Regression tests for promises of the serving core that once did not hold (issue #14): bounded
shutdown, bounded hung instances, exact floats, refused sequence parameters, checked outputs,
keep-alive after early errors, bounded ids, no paths in errors, a guarded repository API, and
listening while models load. Real servers, real clients; no timing asserts."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from fastserve import Server, Tensor
from tritonclient.utils import InferenceServerException

from conftest import DOUBLE_MODEL, EXAMPLES, write_model, xy_config
from helpers import wait_until

# Bounds a wait that must end; it never measures anything.
GUARD_S = 60


def xy(value: float, rows: int = 1) -> list[dict]:
    return [{"name": "X", "shape": [rows, 2], "datatype": "FP32", "data": [value] * (2 * rows)}]


# Hangs forever on a negative input, after creating the file "hung" in its model directory.
HANGING = """
    import os, threading

    class Model:
        def initialize(self, args):
            self.marker = os.path.join(args["model_dir"], "hung")

        def execute(self, inputs):
            x = inputs["X"]
            if (x < 0).any():
                open(self.marker, "w").close()
                threading.Event().wait()
            return {"Y": x * 2}
"""


def test_shutdown_is_bounded_by_the_drain_timeout_with_a_hung_model(tmp_path: Path, start_server) -> None:
    model = write_model(tmp_path, "hang", xy_config(), HANGING)
    server = start_server(tmp_path, "--drain-timeout-s", "1")
    answers: list[requests.Response | Exception] = []

    def ask(value: float) -> None:
        try:
            answers.append(
                requests.post(f"{server.url}/v2/models/hang/infer", json={"inputs": xy(value)}, timeout=GUARD_S)
            )
        except requests.RequestException as e:
            answers.append(e)

    stuck = threading.Thread(target=ask, args=(-1.0,))
    stuck.start()
    wait_until((model / "hung").exists, what="the model to hang (its marker file)")
    queued = [threading.Thread(target=ask, args=(1.0,)) for _ in range(5)]
    for t in queued:
        t.start()
    pending = 'fastserve_pending_requests{model="hang",version="1"} 5'
    wait_until(lambda: pending in requests.get(server.metrics_url, timeout=GUARD_S).text, what=f"metric {pending}")
    # Without a bound this process would never exit: the model never returns.
    assert server.terminate(timeout=GUARD_S) == 0
    for t in [stuck, *queued]:
        t.join(GUARD_S)
    assert len(answers) == 6
    statuses = sorted(a.status_code for a in answers if isinstance(a, requests.Response))
    assert statuses == [503] * 6, answers
    assert "abandoned" in server.log()


HANGING_FINALIZE = """
    import threading

    class Model:
        def execute(self, inputs):
            return {"Y": inputs["X"]}

        def finalize(self):
            threading.Event().wait()
"""


def test_shutdown_does_not_wait_for_a_hung_finalize(tmp_path: Path, start_server) -> None:
    write_model(tmp_path, "m", xy_config(), HANGING_FINALIZE)
    server = start_server(tmp_path, "--drain-timeout-s", "1")
    assert requests.post(f"{server.url}/v2/models/m/infer", json={"inputs": xy(1.0)}, timeout=GUARD_S).ok
    assert server.terminate(timeout=GUARD_S) == 0
    assert "abandoned" in server.log()


def test_too_many_hung_instances_make_the_version_unavailable_with_the_reason(tmp_path: Path, start_server) -> None:
    config = xy_config("execution_timeout_ms = 200\nmax_abandoned_instances = 1")
    write_model(tmp_path, "hang", config, HANGING)
    write_model(tmp_path, "other", xy_config(), DOUBLE_MODEL)
    server = start_server(tmp_path)
    url = f"{server.url}/v2/models/hang/infer"
    first = requests.post(url, json={"inputs": xy(-1.0)}, timeout=GUARD_S)
    assert first.status_code == 503 and "instance replaced" in first.json()["error"], first.text
    second = requests.post(url, json={"inputs": xy(-1.0)}, timeout=GUARD_S)
    assert "now unavailable" in second.json()["error"], second.text
    refused = requests.post(url, json={"inputs": xy(1.0)}, timeout=GUARD_S)
    assert refused.status_code == 503 and "max_abandoned_instances" in refused.json()["error"], refused.text
    ready = requests.get(f"{server.url}/v2/models/hang/ready", timeout=GUARD_S)
    assert ready.status_code == 400 and "max_abandoned_instances" in ready.text
    other = requests.post(f"{server.url}/v2/models/other/infer", json={"inputs": xy(1.0)}, timeout=GUARD_S)
    assert other.json()["outputs"][0]["data"] == [2.0, 2.0]
    assert server.terminate(timeout=GUARD_S) == 0


@pytest.fixture(scope="module")
def identity() -> Server:
    class Identity:
        def execute(self, inputs):
            return {"OUT": inputs["IN"]}

    server = Server(http_port=0, grpc_port=0)
    for dt in ("FP64", "FP32", "FP16"):
        server.add_model(
            f"id_{dt.lower()}", Identity(), inputs=[Tensor("IN", dt, [-1])], outputs=[Tensor("OUT", dt, [-1])]
        )
    # The largest settings allowed cost nothing (statistics were once sized by max_batch_size).
    server.add_model(
        "huge",
        Identity(),
        inputs=[Tensor("IN", "FP32", [-1])],
        outputs=[Tensor("OUT", "FP32", [-1])],
        max_batch_size=2**20,
        max_queue_size=10_000_000,
    )
    with server:
        yield server


def test_floats_round_trip_through_json_bit_identically(identity: Server) -> None:
    url = f"http://127.0.0.1:{identity.http_port}"
    rng = np.random.default_rng(7)
    doubles = np.concatenate(
        [[-0.49220651855132963, 5e-324, -2.2250738585072014e-308, 1.7976931348623157e308, -0.0, 0.1]],
        axis=None,
    )
    doubles = np.concatenate([doubles, rng.standard_normal(500) * 10.0 ** rng.integers(-300, 300, 500)])
    for dt, np_type in (("FP64", np.float64), ("FP32", np.float32), ("FP16", np.float16)):
        with np.errstate(over="ignore"):
            values = doubles.astype(np_type)
        values = values[np.isfinite(values)]
        body = {"inputs": [{"name": "IN", "shape": [len(values)], "datatype": dt, "data": values.tolist()}]}
        r = requests.post(f"{url}/v2/models/id_{dt.lower()}/infer", data=json.dumps(body), timeout=GUARD_S)
        assert r.status_code == 200, r.text
        back = np.array(r.json()["outputs"][0]["data"], dtype=np_type)
        assert back.tobytes() == values.tobytes(), dt


def test_huge_batch_and_queue_settings_serve_or_are_refused(identity: Server) -> None:
    url = f"http://127.0.0.1:{identity.http_port}/v2/models/huge/infer"
    body = {"inputs": [{"name": "IN", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert requests.post(url, json=body, timeout=GUARD_S).json()["outputs"][0]["data"] == [1, 2, 3]
    spec = {"inputs": [Tensor("IN", "FP32", [-1])], "outputs": [Tensor("OUT", "FP32", [-1])]}
    for key, value in (("max_batch_size", 2**40), ("max_queue_delay_us", 2**62), ("max_queue_size", 0)):
        with pytest.raises(ValueError, match=f"{key} must be between"):
            identity.add_model("too_big", object, **spec, **{key: value})
    assert requests.post(url, json=body, timeout=GUARD_S).status_code == 200


def test_sequence_parameters_are_refused_by_a_model_without_sequence_batching(identity: Server) -> None:
    x = np.ones(2, dtype=np.float64)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{identity.http_port}")
    inp = httpclient.InferInput("IN", [2], "FP64")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="not configured for sequence batching") as e:
        http.infer("id_fp64", [inp], sequence_id=7, sequence_start=True)
    assert e.value.status() == "400"
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{identity.grpc_port}")
    ginp = grpcclient.InferInput("IN", [2], "FP64")
    ginp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="not configured for sequence batching") as e:
        grpc.infer("id_fp64", [ginp], sequence_id="abc", sequence_end=True)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    # Without sequence parameters the same request is served.
    assert http.infer("id_fp64", [inp]).as_numpy("OUT").tolist() == [1.0, 1.0]


def test_over_long_request_ids_are_refused_and_never_echoed(identity: Server) -> None:
    url = f"http://127.0.0.1:{identity.http_port}/v2/models/id_fp64/infer"
    body = {"inputs": [{"name": "IN", "shape": [1], "datatype": "FP64", "data": [1.0]}]}
    long_id = "x" * 100_000
    r = requests.post(url, json={**body, "id": long_id}, timeout=GUARD_S)
    assert r.status_code == 400 and "over the limit of 256" in r.text
    assert len(r.headers["X-Request-Id"]) < 64
    r = requests.post(url, json=body, headers={"X-Request-Id": "y" * 4000}, timeout=GUARD_S)
    assert r.status_code == 400 and len(r.headers["X-Request-Id"]) < 64
    ok = requests.post(url, json={**body, "id": "z" * 256}, timeout=GUARD_S)
    assert ok.status_code == 200 and ok.headers["X-Request-Id"] == "z" * 256
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{identity.grpc_port}")
    inp = grpcclient.InferInput("IN", [1], "FP64")
    inp.set_data_from_numpy(np.ones(1))
    with pytest.raises(InferenceServerException, match="over the limit of 256"):
        grpc.infer("id_fp64", [inp], request_id=long_id)


BAD_OUTPUTS = """
    import numpy as np

    class Model:
        def execute(self, inputs):
            x = inputs["X"]
            kind = int(x[0, 0])
            if kind == 1:
                return {"Y": np.zeros((x.shape[0], 7), dtype=np.float32)}
            if kind == 2:
                return {"Y": x, "EXTRA": x}
            if kind == 3:
                return {"Y": np.float32(1.0)}
            return {"Y": x}
"""


def test_model_outputs_are_checked_against_the_declared_config(tmp_path: Path, start_server) -> None:
    write_model(tmp_path, "m", xy_config(), BAD_OUTPUTS)
    server = start_server(tmp_path)
    url = f"{server.url}/v2/models/m/infer"
    expected = {
        1.0: "returned output 'Y' with shape [1,7], but it is declared [-1,2]",
        2.0: "returned output 'EXTRA', which its configuration does not declare",
        3.0: "returned output 'Y' with shape [], but the batch has 1 rows",
    }
    for value, message in expected.items():
        r = requests.post(url, json={"inputs": xy(value)}, timeout=GUARD_S)
        assert r.status_code == 500 and message in r.json()["error"], r.text
        assert "model 'm'" in r.json()["error"]
    assert requests.post(url, json={"inputs": xy(0.0)}, timeout=GUARD_S).status_code == 200


def test_early_errors_keep_http1_connections_usable(example_server) -> None:
    """Answers given before the body is read (unknown model, bad auth, no route) drain a small
    body, so the next request on the same keep-alive connection never hits a closed socket."""
    body = json.dumps({"inputs": [{"name": "X", "data": [0] * 8000}]}).encode()
    assert len(body) > 16_000
    conn = http.client.HTTPConnection("127.0.0.1", example_server.port, timeout=GUARD_S)
    for i in range(300):
        path = ("/v2/models/nope/infer", "/v2/nothing/here", "/v2/models/mlp/versions/9/infer")[i % 3]
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 404, resp.status
        assert resp.getheader("Connection") != "close"
        resp.read()
    conn.close()


def test_an_early_error_after_a_large_body_closes_the_connection(example_server) -> None:
    # Only the head and a little of a 2 MiB body are sent: the answer must not wait for the rest,
    # and must tell the client that this connection ends.
    with socket.create_connection(("127.0.0.1", example_server.port), timeout=GUARD_S) as s:
        head = f"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {2 * 1024 * 1024}\r\n\r\n"
        s.sendall(head.encode() + b"x" * 1000)
        answer = s.makefile("rb").read()
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 404"), answer[:200]
    assert b"connection: close" in rest.lower(), answer[:400]


PATH_LEAK = """
    class Model:
        def initialize(self, args):
            self.dir = args["version_dir"]

        def execute(self, inputs):
            raise FileNotFoundError(f"missing {self.dir}/weights.bin")
"""


def test_model_errors_carry_no_server_paths(tmp_path: Path, start_server) -> None:
    write_model(tmp_path, "leaky", xy_config(), PATH_LEAK)
    server = start_server(tmp_path)
    r = requests.post(f"{server.url}/v2/models/leaky/infer", json={"inputs": xy(1.0)}, timeout=GUARD_S)
    assert r.status_code == 500
    error = r.json()["error"]
    assert "<repository>/leaky/1/weights.bin" in error, error
    assert str(tmp_path) not in error and str(tmp_path.resolve()) not in error


def test_repository_api_on_the_network_needs_an_admin_token(tmp_path: Path, start_server) -> None:
    write_model(tmp_path, "m", xy_config(), DOUBLE_MODEL)
    cmd = [sys.executable, "-m", "fastserve", "serve", "--model-repository", str(tmp_path), "--host", "0.0.0.0"]
    cmd += ["--http-port", "0", "--grpc-port", "0", "--no-metrics", "--model-control-mode", "explicit"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=2 * GUARD_S)
    assert refused.returncode == 2
    assert "--admin-token-file" in refused.stderr and "--allow-remote-repository-api" in refused.stderr
    token = tmp_path / "admin.token"
    token.write_text("s3cret")
    for extra in (("--admin-token-file", str(token)), ("--allow-remote-repository-api",)):
        server = start_server(tmp_path, "--host", "0.0.0.0", "--model-control-mode", "explicit", *extra)
        assert requests.get(f"{server.url}/v2/health/live", timeout=GUARD_S).status_code == 200
        assert server.terminate(timeout=GUARD_S) == 0


SLOW_INIT = """
    import os, time

    class Model:
        def initialize(self, args):
            gate = os.path.join(args["model_dir"], "go")
            while not os.path.exists(gate):
                time.sleep(0.01)

        def execute(self, inputs):
            return {"Y": inputs["X"]}
"""


def test_listeners_answer_while_models_load(tmp_path: Path, start_server) -> None:
    model = write_model(tmp_path, "slow", xy_config(), SLOW_INIT)
    server = start_server(tmp_path, wait_loaded=False)
    assert requests.get(f"{server.url}/v2/health/live", timeout=GUARD_S).status_code == 200
    ready = requests.get(f"{server.url}/v2/health/ready", timeout=GUARD_S)
    assert ready.status_code == 400
    assert "the startup models are still loading" in ready.json()["error"], ready.text
    (model / "go").touch()
    server.wait_for_log("model version(s) ready", timeout=GUARD_S)
    assert requests.get(f"{server.url}/v2/health/ready", timeout=GUARD_S).status_code == 200
    assert requests.post(f"{server.url}/v2/models/slow/infer", json={"inputs": xy(1.0)}, timeout=GUARD_S).ok


def test_grpc_responses_are_not_compressed_by_default_but_can_be(start_server) -> None:
    """A default tritonclient channel advertises gzip; the answer must still be plain unless the
    server is told otherwise (the encoding itself is checked in the Rust server tests)."""
    for extra in ((), ("--grpc-response-compression", "gzip")):
        server = start_server(EXAMPLES, *extra)
        client = grpcclient.InferenceServerClient(server.grpc_address)
        x = grpcclient.InferInput("INPUT0", [1, 64], "FP32")
        x.set_data_from_numpy(np.ones((1, 64), dtype=np.float32))
        assert client.infer("mlp", [x]).as_numpy("OUTPUT0").shape == (1, 10)
        server.terminate(timeout=GUARD_S)


def test_concurrent_early_errors_and_successes_share_keep_alive_connections(example_server) -> None:
    session = requests.Session()
    x = {"inputs": [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}

    def one(i: int) -> int:
        model = "mlp" if i % 2 else "absent"
        return session.post(f"{example_server.url}/v2/models/{model}/infer", json=x, timeout=GUARD_S).status_code

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes.count(200) == 100 and codes.count(404) == 100


def test_readiness_says_which_models_are_not_ready(tmp_path: Path, start_server) -> None:
    write_model(tmp_path, "good", xy_config(), DOUBLE_MODEL)
    write_model(tmp_path, "broken", xy_config(), "raise ImportError('missing dependency')\n")
    server = start_server(tmp_path)
    ready = requests.get(f"{server.url}/v2/health/ready", timeout=GUARD_S)
    assert ready.status_code == 400
    error = ready.json()["error"]
    assert "'broken' version 1 is not at ready state" in error and "missing dependency" in error, error
    assert "good" not in error

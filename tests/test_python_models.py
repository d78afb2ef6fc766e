"""Python models served from a repository by the `fastserve` command: the Model API, failures
that stay contained, load errors reported with their reason, and graceful shutdown."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from conftest import infer_json, write_model, xy_config

SCALE_CONFIG = xy_config("[parameters]\nfactor = 3")

SCALE_MODEL = """
    import numpy as np

    class Model:
        def initialize(self, args):
            self.factor = args["parameters"]["factor"]
            self.args = args

        def execute(self, inputs):
            x = inputs["X"]
            if (x == 13).any():
                raise ValueError("13 is unlucky")
            if (x == 7).any():
                return {"Y": x.astype("int64")}
            return {"Y": x * self.factor}
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path, "scale", SCALE_CONFIG, SCALE_MODEL)
    write_model(
        tmp_path,
        "broken_code",
        SCALE_CONFIG,
        "raise RuntimeError('cannot import me')\n",
    )
    write_model(tmp_path, "broken_config", "max_batch_sise = 4\n" + SCALE_CONFIG, SCALE_MODEL)
    bad_onnx = write_model(tmp_path, "broken_onnx", "")
    (bad_onnx / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    return tmp_path


def x_input(rows: list[list[float]]) -> list[dict]:
    return [{"name": "X", "shape": [len(rows), 2], "datatype": "FP32", "data": rows}]


def test_python_model_api(start_server, repo: Path) -> None:
    server = start_server(repo)
    r = infer_json(server.url, "scale", x_input([[1, 2], [3, 4]]))
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [3, 6, 9, 12]


def test_a_raising_model_fails_only_its_request(start_server, repo: Path) -> None:
    server = start_server(repo)
    r = infer_json(server.url, "scale", x_input([[13, 1]]))
    assert r.status_code == 500
    assert r.json()["error"] == "model 'scale' version 1 raised ValueError: 13 is unlucky"
    assert infer_json(server.url, "scale", x_input([[1, 1]])).status_code == 200
    server.wait_for_log("13 is unlucky")


def test_wrong_output_dtype_is_a_model_error(start_server, repo: Path) -> None:
    server = start_server(repo)
    r = infer_json(server.url, "scale", x_input([[7, 7]]))
    assert r.status_code == 500
    assert r.json()["error"] == "model 'scale' returned output 'Y' as INT64, but it is declared FP32"
    assert infer_json(server.url, "scale", x_input([[1, 1]])).status_code == 200


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("broken_code", "model.py raised RuntimeError: cannot import me"),
        ("broken_config", "unknown key(s) in config.toml: max_batch_sise"),
        ("broken_onnx", "ONNX Runtime cannot load model.onnx"),
    ],
)
def test_load_failures_are_reported_and_others_serve(start_server, repo: Path, model: str, reason: str) -> None:
    server = start_server(repo)
    ready = requests.get(f"{server.url}/v2/models/{model}/ready", timeout=10)
    assert ready.status_code == 400
    assert reason in ready.json()["error"]
    meta = requests.get(f"{server.url}/v2/models/{model}", timeout=10)
    assert meta.status_code == 503
    assert reason in meta.json()["error"]
    r = infer_json(server.url, model, x_input([[1, 1]]))
    assert r.status_code == 503
    assert r.json()["error"].startswith(f"Request for unknown model: '{model}' version 1 is not at ready state: ")
    assert reason in server.log()
    assert str(repo) not in r.json()["error"], "errors must not reveal filesystem paths"
    # Strict readiness, as Triton: the server is not ready while a model failed.
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 400
    assert requests.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
    assert infer_json(server.url, "scale", x_input([[1, 1]])).status_code == 200


def test_directory_traversal_names_are_not_models(start_server, repo: Path) -> None:
    server = start_server(repo)
    for path in ["/v2/models/../scale/ready", "/v2/models/%2e%2e/ready", "/v2/models/scale%2f..%2fx/ready"]:
        r = requests.get(server.url + path, timeout=10)
        assert r.status_code == 404, path


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sigterm_drains_in_flight_requests(start_server, tmp_path: Path, protocol: str) -> None:
    started, release = tmp_path / "started.fifo", tmp_path / "release.fifo"
    os.mkfifo(started)
    os.mkfifo(release)
    write_model(
        tmp_path,
        "slow",
        SCALE_CONFIG.replace("factor = 3", f'started = "{started}"\n    release = "{release}"'),
        """
        class Model:
            def initialize(self, args):
                self.started = args["parameters"]["started"]
                self.release = args["parameters"]["release"]

            def execute(self, inputs):
                with open(self.started, "w") as f:   # tells the test the request is running
                    f.write("x")
                with open(self.release) as f:        # blocks until the test lets it finish
                    f.read()
                return {"Y": inputs["X"]}
        """,
    )
    server = start_server(tmp_path)
    result: dict = {}

    def call() -> None:
        if protocol == "http":
            response = infer_json(server.url, "slow", x_input([[1, 2]]))
            assert response.status_code == 200, response.text
            result["data"] = response.json()["outputs"][0]["data"]
        else:
            x = grpcclient.InferInput("X", [1, 2], "FP32")
            x.set_data_from_numpy(np.array([[1, 2]], dtype=np.float32))
            result["data"] = grpcclient.InferenceServerClient(server.grpc_address).infer("slow", [x]).as_numpy("Y")

    caller = threading.Thread(target=call)
    caller.start()
    with open(started) as f:  # blocks until the model runs
        f.read()
    server.proc.send_signal(15)
    server.wait_for_log("received SIGTERM, draining")
    with open(release, "w") as f:
        f.write("go")
    caller.join(timeout=60)
    assert server.proc.wait(timeout=60) == 0
    assert np.asarray(result["data"]).ravel().tolist() == [1, 2]
    assert "draining" in server.log()

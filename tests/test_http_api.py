"""The V2 REST endpoints of a `fastserve serve` process, checked with requests, tritonclient.http
and a raw socket."""

from __future__ import annotations

import json
import socket

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient

from conftest import EXAMPLES, ServerProcess, infer_json


def mlp_reference(x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(EXAMPLES / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["OUTPUT0"], {"INPUT0": x})[0]


def test_health_and_server_metadata(example_server: ServerProcess) -> None:
    url = example_server.url
    assert requests.get(f"{url}/v2/health/live", timeout=10).status_code == 200
    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    meta = requests.get(f"{url}/v2", timeout=10).json()
    assert meta["name"] == "fastserve"
    assert meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_reads_the_onnx_file(example_server: ServerProcess) -> None:
    meta = requests.get(f"{example_server.url}/v2/models/mlp", timeout=10).json()
    assert meta == {
        "name": "mlp",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}],
    }
    versioned = requests.get(f"{example_server.url}/v2/models/mlp/versions/1", timeout=10).json()
    assert versioned == meta


def test_model_ready_with_and_without_version(example_server: ServerProcess) -> None:
    url = example_server.url
    assert requests.get(f"{url}/v2/models/mlp/ready", timeout=10).status_code == 200
    assert requests.get(f"{url}/v2/models/mlp/versions/1/ready", timeout=10).status_code == 200
    r = requests.get(f"{url}/v2/models/mlp/versions/7/ready", timeout=10)
    assert r.status_code == 404
    assert r.json() == {"error": "Request for unknown model: 'mlp' version 7 is not found"}


def test_unknown_model_is_404_everywhere(example_server: ServerProcess) -> None:
    url = example_server.url
    for method, path in [
        ("GET", "/v2/models/nope"),
        ("GET", "/v2/models/nope/ready"),
        ("POST", "/v2/models/nope/infer"),
    ]:
        r = requests.request(method, url + path, json={"inputs": []}, timeout=10)
        assert r.status_code == 404, path
        assert r.json() == {"error": "Request for unknown model: 'nope' is not found"}


def test_infer_json_matches_onnxruntime(example_server: ServerProcess) -> None:
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    r = infer_json(
        example_server.url,
        "mlp",
        [{"name": "INPUT0", "shape": [3, 64], "datatype": "FP32", "data": x.tolist()}],
        id="req-1",
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "mlp"
    assert body["model_version"] == "1"
    assert body["id"] == "req-1"
    (out,) = body["outputs"]
    assert out["name"] == "OUTPUT0" and out["datatype"] == "FP32" and out["shape"] == [3, 10]
    np.testing.assert_allclose(
        np.array(out["data"], dtype=np.float32).reshape(3, 10), mlp_reference(x), rtol=1e-5, atol=1e-6
    )


def test_versioned_infer_path(example_server: ServerProcess) -> None:
    x = np.ones((1, 64), dtype=np.float32)
    r = requests.post(
        f"{example_server.url}/v2/models/mlp/versions/1/infer",
        json={"inputs": [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}]},
        timeout=10,
    )
    assert r.status_code == 200
    assert r.json()["model_version"] == "1"


def test_tritonclient_http_against_the_examples(example_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(example_server.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and client.is_model_ready("echo")
    assert client.get_server_metadata()["name"] == "fastserve"
    assert client.get_model_metadata("mlp")["inputs"][0]["shape"] == [-1, 64]

    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    inp = httpclient.InferInput("INPUT0", [5, 64], "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    result = client.infer("mlp", [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)])
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), mlp_reference(x), rtol=1e-5, atol=1e-6)

    text = np.array([[b"hello", b"world!"]], dtype=object)
    inp = httpclient.InferInput("TEXT", [1, 2], "BYTES")
    inp.set_data_from_numpy(text, binary_data=False)
    result = client.infer("echo", [inp], request_id="e1")
    assert result.get_response()["id"] == "e1"
    assert [
        [str(v, "utf-8") if isinstance(v, bytes) else v for v in row] for row in result.as_numpy("TEXT").tolist()
    ] == [["echo: hello", "echo: world!"]]
    assert result.as_numpy("LENGTH").tolist() == [[5, 6]]


def test_only_requested_outputs_are_returned(example_server: ServerProcess) -> None:
    inputs = [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["abc"]}]
    r = infer_json(example_server.url, "echo", inputs, outputs=[{"name": "LENGTH"}])
    assert r.status_code == 200
    assert [o["name"] for o in r.json()["outputs"]] == ["LENGTH"]
    assert r.json()["outputs"][0]["data"] == [3]


def test_nested_and_flat_data_are_equivalent(example_server: ServerProcess) -> None:
    x = np.arange(128, dtype=np.float32).reshape(2, 64) / 100
    flat = infer_json(
        example_server.url,
        "mlp",
        [{"name": "INPUT0", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}],
    )
    nested = infer_json(
        example_server.url, "mlp", [{"name": "INPUT0", "shape": [2, 64], "datatype": "FP32", "data": x.tolist()}]
    )
    assert flat.json()["outputs"] == nested.json()["outputs"]


def _raw_http(port: int, payloads: list[bytes]) -> list[bytes]:
    """Sends requests on one keep-alive connection, reading each response fully."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        f = sock.makefile("rb")
        for payload in payloads:
            sock.sendall(payload)
            status = f.readline()
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            answers.append(status + f.read(length))
    return answers


def test_raw_socket_keep_alive(example_server: ServerProcess) -> None:
    body = json.dumps({"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}]}).encode()
    request = (
        b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    health = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n"
    answers = _raw_http(example_server.port, [request, health, request])
    assert answers[0].startswith(b"HTTP/1.1 200")
    assert b'"echo: x"' in answers[0]
    assert answers[1].startswith(b"HTTP/1.1 200")
    assert answers[2] == answers[0]


@pytest.mark.parametrize("path", ["/", "/v3", "/v2/models", "/v2/models/mlp/unknown", "/v2/health"])
def test_unknown_routes_are_404_json(example_server: ServerProcess, path: str) -> None:
    r = requests.get(example_server.url + path, timeout=10)
    assert r.status_code == 404
    assert "error" in r.json()

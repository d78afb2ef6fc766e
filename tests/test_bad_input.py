"""Every kind of bad input gets its status and a message in the user's terms, and the server
keeps serving afterwards."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import requests

from conftest import EXAMPLES, ServerProcess, infer_json


def good(url: str) -> None:
    x = np.zeros(64, dtype=np.float32).tolist()
    r = infer_json(url, "mlp", [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": x}])
    assert r.status_code == 200, r.text


def fp32(shape: list[int], n: int | None = None, name: str = "INPUT0", datatype: str = "FP32") -> dict:
    count = int(np.prod(shape)) if n is None else n
    return {"name": name, "shape": shape, "datatype": datatype, "data": [0] * count}


CASES = [
    (
        "wrong shape",
        {"inputs": [fp32([2, 63])]},
        "unexpected shape for input 'INPUT0' for model 'mlp'. Expected [-1,64], got [2,63]",
    ),
    (
        "wrong rank",
        {"inputs": [fp32([64])]},
        "unexpected shape for input 'INPUT0' for model 'mlp'. Expected [-1,64], got [64]",
    ),
    (
        "wrong datatype",
        {"inputs": [fp32([1, 64], datatype="INT32")]},
        "inference input 'INPUT0' data-type is 'INT32', but model 'mlp' expects 'FP32'",
    ),
    ("element count", {"inputs": [fp32([1, 64], n=63)]}, "input 'INPUT0': shape needs 64 elements, data has 63"),
    ("too many elements", {"inputs": [fp32([1, 64], n=65)]}, "input 'INPUT0': data has more than the 64 elements"),
    ("wrong name", {"inputs": [fp32([1, 64], name="X")]}, "unexpected inference input 'X' for model 'mlp'"),
    ("missing input", {"inputs": []}, "Got input(s) [], but missing required input(s) ['INPUT0']"),
    (
        "unknown output",
        {"inputs": [fp32([1, 64])], "outputs": [{"name": "NOPE"}]},
        "unexpected inference output 'NOPE' for model 'mlp'",
    ),
    ("batch too large", {"inputs": [fp32([65, 64])]}, "inference request batch-size must be <= 64 for 'mlp'"),
    ("unknown datatype", {"inputs": [fp32([1, 64], datatype="FLOAT")]}, "input 'INPUT0': unknown datatype 'FLOAT'"),
    ("negative dim", {"inputs": [fp32([1, 64]) | {"shape": [-1, 64]}]}, "negative dimension"),
    ("string for number", {"inputs": [fp32([1, 1]) | {"data": ["a"]}]}, "expected a number for FP32, got a string"),
    ("inputs not a list", {"inputs": 3}, "malformed infer request JSON"),
]


@pytest.mark.parametrize(("case", "body", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_400_with_message(example_server: ServerProcess, case: str, body: dict, message: str) -> None:
    r = requests.post(f"{example_server.url}/v2/models/mlp/infer", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]
    good(example_server.url)


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"[]", b'{"inputs": [', b"\xff\xfe", b'{"inputs": [{"name": "INPUT0"}]}'],
    ids=["garbage", "empty", "array", "truncated", "not-utf8", "missing-fields"],
)
def test_malformed_json_is_400(example_server: ServerProcess, raw: bytes) -> None:
    r = requests.post(f"{example_server.url}/v2/models/mlp/infer", data=raw, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"].startswith("malformed infer request JSON")
    good(example_server.url)


def test_deeply_nested_json_is_400(example_server: ServerProcess) -> None:
    depth = 200_000
    body = '{"inputs":[{"name":"INPUT0","shape":[1,64],"datatype":"FP32","data":' + "[" * depth + "]" * depth + "}]}"
    r = requests.post(f"{example_server.url}/v2/models/mlp/infer", data=body, timeout=30)
    assert r.status_code == 400
    good(example_server.url)


def test_wrong_method_is_rejected(example_server: ServerProcess) -> None:
    r = requests.get(f"{example_server.url}/v2/models/mlp/infer", timeout=10)
    assert r.status_code == 404
    assert r.json() == {"error": "GET is not supported on /v2/models/mlp/infer"}


def test_oversized_body_is_413(start_server) -> None:
    server = start_server(EXAMPLES, "--max-body-bytes", "4096")
    x = [0.0] * 64 * 64
    r = infer_json(server.url, "mlp", [{"name": "INPUT0", "shape": [64, 64], "datatype": "FP32", "data": x}])
    assert r.status_code == 413
    assert r.json() == {"error": "request body exceeds the limit of 4096 bytes"}

    # Chunked bodies have no Content-Length: the limit applies while reading.
    def chunks():
        for _ in range(100):
            yield b" " * 1000

    r = requests.post(f"{server.url}/v2/models/mlp/infer", data=chunks(), timeout=10)
    assert r.status_code == 413
    good(server.url)


def test_truncated_body_and_dropped_connection_do_not_hurt(example_server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", example_server.port), timeout=10) as sock:
        sock.sendall(b'POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{"inputs": [')
    with socket.create_connection(("127.0.0.1", example_server.port), timeout=10) as sock:
        sock.sendall(b"GARBAGE / HTTP/9.9\r\n\r\n")
        sock.recv(100)  # hyper answers 400 or just closes; either way the server must live on
    good(example_server.url)

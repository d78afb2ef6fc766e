"""pytest-benchmark micro-benchmarks of the Python boundary: a batch handed by the Rust core to a
Python model through the embedding API, and the NumPy conversions on either side of it.

Not part of the test suite (``testpaths = ["tests"]``); run on its own:

    python -m pytest benches/test_python_boundary.py --benchmark-only

Each request goes over one keep-alive loopback connection with the binary tensor extension, so the
difference between ``test_roundtrip_*`` and ``test_execute_direct`` is the cost of HTTP, the core's
queue and the Rust -> NumPy -> Rust handoff.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import numpy as np
import pytest
from fastserve import Server, Tensor

pytest.importorskip("pytest_benchmark")

FEATURES = 64


class Identity:
    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"Y": inputs["X"]}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server(http_port=0)
    s.add_model(
        "identity",
        Identity(),
        inputs=[Tensor("X", "FP32", [FEATURES])],
        outputs=[Tensor("Y", "FP32", [FEATURES])],
        max_batch_size=64,
    )
    with s:
        yield s


def binary_request(rows: int) -> tuple[bytes, dict[str, str]]:
    raw = np.arange(rows * FEATURES, dtype=np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "X",
                    "shape": [rows, FEATURES],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    return header + raw, headers


@pytest.mark.parametrize("rows", [1, 64])
def test_roundtrip_binary(benchmark, server: Server, rows: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    body, headers = binary_request(rows)

    def once() -> bytes:
        conn.request("POST", "/v2/models/identity/infer", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data
        return data

    data = benchmark(once)
    conn.close()
    assert len(data) >= rows * FEATURES * 4


@pytest.mark.parametrize("rows", [1, 64])
def test_execute_direct(benchmark, rows: int) -> None:
    x = np.ones((rows, FEATURES), dtype=np.float32)
    benchmark(Identity().execute, {"X": x})


@pytest.mark.parametrize("rows", [1, 64])
def test_numpy_from_json_list(benchmark, rows: int) -> None:
    """What a hand-written JSON wrapper pays per request: Python list -> ndarray."""
    data = [float(i) for i in range(rows * FEATURES)]
    benchmark(lambda: np.asarray(data, dtype=np.float32).reshape(rows, FEATURES))


@pytest.mark.parametrize("rows", [1, 64])
def test_numpy_from_bytes(benchmark, rows: int) -> None:
    """The binary path: bytes -> ndarray without a copy."""
    raw = np.arange(rows * FEATURES, dtype=np.float32).tobytes()
    benchmark(lambda: np.frombuffer(raw, dtype=np.float32).reshape(rows, FEATURES))


@pytest.mark.parametrize("rows", [1, 64])
def test_numpy_tolist(benchmark, rows: int) -> None:
    """Answer side of a JSON wrapper: ndarray -> Python list for json.dumps."""
    y = np.ones((rows, 10), dtype=np.float32)
    benchmark(lambda: y.ravel().tolist())

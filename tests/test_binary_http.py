"""The HTTP binary tensor extension and gzip/deflate bodies: tritonclient.http with binary inputs
and outputs and compression, and hand-built bodies for everything that can be wrong."""

from __future__ import annotations

import gzip
import http.client
import json
import zlib

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from fastserve import Server, Tensor
from tritonclient.utils import InferenceServerException

from conftest import DTYPES, EXAMPLES, Identity, ServerProcess, sample


@pytest.fixture(scope="module")
def identity_http():
    server = Server(http_port=0)
    for dt in DTYPES:
        server.add_model(
            f"id_{dt.lower()}",
            Identity(),
            inputs=[Tensor("IN", dt, [-1])],
            outputs=[Tensor("OUT", dt, [-1])],
            max_batch_size=8,
        )
    with server:
        yield f"127.0.0.1:{server.http_port}"


def as_bytes(values) -> list:
    return [v.encode() if isinstance(v, str) else v for v in values]


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
@pytest.mark.parametrize("datatype", list(DTYPES))
def test_every_datatype_binary_equals_json(identity_http: str, datatype: str, compression: str | None) -> None:
    client = httpclient.InferenceServerClient(identity_http)
    x = sample(datatype, (2, 3))
    model = f"id_{datatype.lower()}"
    binary_in = httpclient.InferInput("IN", [2, 3], datatype)
    binary_in.set_data_from_numpy(x, binary_data=True)
    binary = client.infer(
        model,
        [binary_in],
        outputs=[httpclient.InferRequestedOutput("OUT", binary_data=True)],
        request_compression_algorithm=compression,
        response_compression_algorithm=compression,
    )
    assert binary.get_output("OUT")["parameters"]["binary_data_size"] > 0
    json_in = httpclient.InferInput("IN", [2, 3], datatype)
    json_in.set_data_from_numpy(x, binary_data=False)
    as_json = client.infer(model, [json_in], outputs=[httpclient.InferRequestedOutput("OUT", binary_data=False)])
    out = binary.as_numpy("OUT")
    assert out.shape == (2, 3)
    if datatype == "BYTES":
        assert out.tolist() == x.tolist()
        assert as_bytes(as_json.as_numpy("OUT").ravel().tolist()) == out.ravel().tolist()
    else:
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)
        np.testing.assert_array_equal(as_json.as_numpy("OUT"), out)


def test_request_level_binary_output_and_compressed_mlp(example_server: ServerProcess) -> None:
    session = ort.InferenceSession(str(EXAMPLES / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    client = httpclient.InferenceServerClient(example_server.address)
    x = np.random.default_rng(5).standard_normal((7, 64)).astype(np.float32)
    expected = session.run(None, {"INPUT0": x})[0]
    for compression in (None, "gzip", "deflate"):
        inp = httpclient.InferInput("INPUT0", [7, 64], "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        # No outputs named: tritonclient asks for every output in binary (binary_data_output).
        result = client.infer(
            "mlp", [inp], request_compression_algorithm=compression, response_compression_algorithm=compression
        )
        assert result.get_output("OUTPUT0")["parameters"] == {"binary_data_size": 7 * 10 * 4}
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-5, atol=1e-6)


def binary_body(header: dict, *chunks: bytes) -> tuple[bytes, int]:
    text = json.dumps(header).encode()
    return text + b"".join(chunks), len(text)


def post(address: str, path: str, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
    """One raw POST, so headers and the body come back exactly as sent (no transparent decoding)."""
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_compressed_response_on_the_wire(example_server: ServerProcess) -> None:
    x = np.arange(64, dtype=np.float32).reshape(1, 64)
    header = {
        "inputs": [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }
    body, n = binary_body(header, x.tobytes())
    for coding, compress, decompress in (
        ("gzip", gzip.compress, gzip.decompress),
        ("deflate", zlib.compress, zlib.decompress),
    ):
        status, headers, raw = post(
            example_server.address,
            "/v2/models/mlp/infer",
            compress(body),
            {"Content-Encoding": coding, "Accept-Encoding": coding, "Inference-Header-Content-Length": str(n)},
        )
        assert status == 200, raw
        assert headers["content-encoding"] == coding
        plain = decompress(raw)
        # The header length counts the uncompressed JSON, as tritonclient reads it.
        json_len = int(headers["inference-header-content-length"])
        meta = json.loads(plain[:json_len])
        assert meta["outputs"][0]["parameters"]["binary_data_size"] == len(plain) - json_len == 40
    status, headers, raw = post(
        example_server.address,
        "/v2/models/mlp/infer",
        body,
        {"Accept-Encoding": "br", "Inference-Header-Content-Length": str(n)},
    )
    assert status == 200 and "content-encoding" not in headers


def fp32_header(size: int, shape: tuple[int, ...] = (1, 64)) -> dict:
    return {
        "inputs": [
            {"name": "INPUT0", "shape": list(shape), "datatype": "FP32", "parameters": {"binary_data_size": size}}
        ]
    }


GOOD = np.zeros(64, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (
            binary_body(fp32_header(256), GOOD)[0],
            {"Inference-Header-Content-Length": "100000"},
            400,
            "exceeds the body size",
        ),
        (
            binary_body(fp32_header(256), GOOD)[0],
            {"Inference-Header-Content-Length": "-1"},
            400,
            "must be a non-negative integer",
        ),
        (
            binary_body(fp32_header(256), GOOD)[0],
            {"Inference-Header-Content-Length": "abc"},
            400,
            "must be a non-negative integer",
        ),
        (
            binary_body(fp32_header(256), GOOD)[0],
            {"Inference-Header-Content-Length": "5"},
            400,
            "malformed infer request JSON",
        ),
        (binary_body(fp32_header(256), GOOD[:100])[0], None, 400, "binary_data_size 256 exceeds the 100 bytes"),
        (
            binary_body(fp32_header(100), GOOD[:100])[0],
            None,
            400,
            "100 bytes of binary data do not hold 64 FP32 elements",
        ),
        (binary_body(fp32_header(256), GOOD + b"xx")[0], None, 400, "2 bytes of binary data follow the JSON header"),
        (binary_body(fp32_header(256, (1, 63)), GOOD)[0], None, 400, "256 bytes of binary data do not hold 63 FP32"),
        (binary_body(fp32_header(-4), GOOD)[0], None, 400, "'binary_data_size' must be a non-negative integer"),
        (
            gzip.compress(binary_body(fp32_header(256), GOOD)[0])[:-20],
            {"Content-Encoding": "gzip"},
            400,
            "could not decompress",
        ),
        (b"not zlib at all", {"Content-Encoding": "deflate"}, 400, "could not decompress the deflate request body"),
        (binary_body(fp32_header(256), GOOD)[0], {"Content-Encoding": "br"}, 400, "unsupported Content-Encoding 'br'"),
    ],
)
def test_bad_binary_bodies_are_400(
    example_server: ServerProcess, body: bytes, headers, status: int, message: str
) -> None:
    if headers is None:  # the header length that matches the body
        headers = {"Inference-Header-Content-Length": str(body.index(b"}]}") + 3)}
    code, _, raw = post(example_server.address, "/v2/models/mlp/infer", body, headers)
    assert code == status, raw
    assert message in json.loads(raw)["error"]
    good, n = binary_body(fp32_header(256), GOOD)
    code, _, raw = post(
        example_server.address, "/v2/models/mlp/infer", good, {"Inference-Header-Content-Length": str(n)}
    )
    assert code == 200, raw


def test_bytes_binary_input_that_runs_past_its_data_is_400(identity_http: str) -> None:
    body, n = binary_body(
        {"inputs": [{"name": "IN", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}}]},
        b"\x09\x00\x00\x00abc",
    )
    code, _, raw = post(identity_http, "/v2/models/id_bytes/infer", body, {"Inference-Header-Content-Length": str(n)})
    assert code == 400
    assert "BYTES element of 9 bytes runs past the end of the data" in json.loads(raw)["error"]


def test_decompression_bomb_is_413_without_inflating_it(start_server) -> None:
    server = start_server(EXAMPLES, "--max-body-bytes", "100000")
    header = json.dumps(fp32_header(256)).encode()
    bomb = gzip.compress(header + b" " * 50_000_000)  # about 50 KB on the wire
    assert len(bomb) < 100_000
    code, _, raw = post(
        server.address,
        "/v2/models/mlp/infer",
        bomb,
        {"Content-Encoding": "gzip", "Inference-Header-Content-Length": "1"},
    )
    assert code == 413
    assert "decompressed request body exceeds the limit of 100000 bytes" in json.loads(raw)["error"]
    good, n = binary_body(fp32_header(256), GOOD)
    code, _, raw = post(
        server.address,
        "/v2/models/mlp/infer",
        gzip.compress(good),
        {"Content-Encoding": "gzip", "Inference-Header-Content-Length": str(n)},
    )
    assert code == 200, raw


def test_errors_stay_readable_when_compression_was_asked_for(example_server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(example_server.address)
    inp = httpclient.InferInput("INPUT0", [1, 63], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32), binary_data=True)
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", [inp], request_compression_algorithm="gzip", response_compression_algorithm="gzip")
    assert e.value.status() == "400"
    assert "unexpected shape for input 'INPUT0' for model 'mlp'. Expected [-1,64], got [1,63]" in e.value.message()

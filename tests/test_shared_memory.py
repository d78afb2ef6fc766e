"""Triton's system shared-memory extension, end to end with tritonclient over HTTP and gRPC:
regions registered, read and written through `tritonclient.utils.shared_memory`, the status and
unregister APIs, every refusal (bounds, overflow, keys that are paths, unknown or unregistered
regions, outputs too large) answered 400 / INVALID_ARGUMENT with the server serving on, a region
unregistered while a request uses it, `--no-shared-memory`, and CUDA shared memory answered as
unsupported."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from fastserve import Server, Tensor
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, serialized_byte_size

from conftest import write_model, xy_config

PROTOCOLS = ["http", "grpc"]
ROWS = 16
FP32_BYTES = ROWS * 4
EXPECTED_STATUS = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}


IDENTITY_XY = """
    class Model:
        def execute(self, inputs):
            return {"Y": inputs["X"]}
"""


class AddSub:
    """Triton's `simple` example: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}


class Suffix:
    """BYTES in, each element with a suffix out."""

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUT": np.array([bytes(v) + b"!" for v in inputs["IN"].reshape(-1)], dtype=object).reshape(-1)}


class Gate:
    """Answers its input once released; tells when it has started."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started.set()
        assert self.release.wait(timeout=120), "the test never released the gate"
        return {"Y": inputs["X"].copy()}


def _models(server: Server, gate: Gate | None = None) -> None:
    fp32 = [ROWS]
    server.add_model(
        "add_sub",
        AddSub(),
        inputs=[Tensor("INPUT0", "FP32", fp32), Tensor("INPUT1", "FP32", fp32)],
        outputs=[Tensor("OUTPUT0", "FP32", fp32), Tensor("OUTPUT1", "FP32", fp32)],
        max_batch_size=8,
    )
    server.add_model("suffix", Suffix(), inputs=[Tensor("IN", "BYTES", [-1])], outputs=[Tensor("OUT", "BYTES", [-1])])
    if gate is not None:
        server.add_model("gate", gate, inputs=[Tensor("X", "FP32", [ROWS])], outputs=[Tensor("Y", "FP32", [ROWS])])


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def server(gate: Gate) -> Iterator[Server]:
    s = Server(http_port=0, grpc_port=0)
    _models(s, gate)
    with s:
        yield s


def client(server: Server, protocol: str) -> Any:
    if protocol == "http":
        return httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    return grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")


def lib(protocol: str) -> Any:
    return httpclient if protocol == "http" else grpcclient


class Regions:
    """Shared-memory objects created for one test, destroyed (and unregistered) at its end."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.clients: list[Any] = []

    def create(self, name: str, byte_size: int) -> tuple[str, Any]:
        key = f"/fastserve_test_{os.getpid()}_{name}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        self.handles.append(handle)
        return key, handle

    def close(self) -> None:
        for c in self.clients:
            c.unregister_system_shared_memory()
        for h in self.handles:
            shm.destroy_shared_memory_region(h)


@pytest.fixture
def regions(server: Server) -> Iterator[Regions]:
    r = Regions()
    r.clients.append(client(server, "http"))
    yield r
    r.close()


def fp32(seed: int) -> np.ndarray:
    return (np.arange(ROWS, dtype=np.float32) * 0.5 + seed).reshape(1, ROWS)


def assert_serving(c: Any, protocol: str) -> None:
    """The server still answers an ordinary request after a refusal."""
    m = lib(protocol)
    a, b = fp32(1), fp32(2)
    x0, x1 = m.InferInput("INPUT0", [1, ROWS], "FP32"), m.InferInput("INPUT1", [1, ROWS], "FP32")
    x0.set_data_from_numpy(a)
    x1.set_data_from_numpy(b)
    np.testing.assert_array_equal(c.infer("add_sub", [x0, x1]).as_numpy("OUTPUT0"), a + b)


def refused(call: Any, protocol: str, text: str) -> str:
    with pytest.raises(InferenceServerException) as e:
        call()
    assert e.value.status() == EXPECTED_STATUS[protocol], e.value
    assert text in e.value.message(), e.value.message()
    return str(e.value.message())


def test_the_extension_is_advertised(server: Server) -> None:
    assert "system_shared_memory" in client(server, "http").get_server_metadata()["extensions"]
    assert "system_shared_memory" in client(server, "grpc").get_server_metadata().extensions


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fp32_inputs_and_outputs_round_trip_through_shared_memory(
    server: Server, regions: Regions, protocol: str
) -> None:
    c, m = client(server, protocol), lib(protocol)
    in_key, in_handle = regions.create(f"in_{protocol}", 2 * FP32_BYTES)
    out_key, out_handle = regions.create(f"out_{protocol}", 2 * FP32_BYTES)
    a, b = fp32(3), fp32(10)
    shm.set_shared_memory_region(in_handle, [a])
    shm.set_shared_memory_region(in_handle, [b], offset=FP32_BYTES)
    c.register_system_shared_memory(f"in_{protocol}", in_key, 2 * FP32_BYTES)
    c.register_system_shared_memory(f"out_{protocol}", out_key, 2 * FP32_BYTES)

    x0, x1 = m.InferInput("INPUT0", [1, ROWS], "FP32"), m.InferInput("INPUT1", [1, ROWS], "FP32")
    x0.set_shared_memory(f"in_{protocol}", FP32_BYTES)
    x1.set_shared_memory(f"in_{protocol}", FP32_BYTES, offset=FP32_BYTES)
    y0, y1 = m.InferRequestedOutput("OUTPUT0"), m.InferRequestedOutput("OUTPUT1")
    y0.set_shared_memory(f"out_{protocol}", FP32_BYTES)
    y1.set_shared_memory(f"out_{protocol}", FP32_BYTES, offset=FP32_BYTES)
    result = c.infer("add_sub", [x0, x1], outputs=[y0, y1])

    for name, offset, expected in [("OUTPUT0", 0, a + b), ("OUTPUT1", FP32_BYTES, a - b)]:
        out = result.get_output(name)
        shape = list(out["shape"] if protocol == "http" else out.shape)
        datatype = out["datatype"] if protocol == "http" else out.datatype
        assert (shape, datatype) == ([1, ROWS], "FP32")
        got = shm.get_contents_as_numpy(out_handle, np.float32, shape, offset=offset)
        np.testing.assert_array_equal(got, expected)
    if protocol == "http":
        # Described, not sent: no data and no binary section.
        assert "data" not in result.get_output("OUTPUT0")
        assert "binary_data_size" not in result.get_output("OUTPUT0").get("parameters", {})
    else:
        assert list(result.get_response().raw_output_contents) == [b"", b""]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bytes_round_trip_and_mixed_placement(server: Server, regions: Regions, protocol: str) -> None:
    c, m = client(server, protocol), lib(protocol)
    words = np.array([b"alpha", b"", "héllo".encode()], dtype=object)
    serialized = serialize_byte_tensor(words)
    size = serialized_byte_size(serialized)
    in_key, in_handle = regions.create(f"bin_{protocol}", size)
    out_key, out_handle = regions.create(f"bout_{protocol}", 64)
    shm.set_shared_memory_region(in_handle, [serialized])
    c.register_system_shared_memory(f"bin_{protocol}", in_key, size)
    c.register_system_shared_memory(f"bout_{protocol}", out_key, 64)
    x = m.InferInput("IN", [3], "BYTES")
    x.set_shared_memory(f"bin_{protocol}", size)
    y = m.InferRequestedOutput("OUT")
    y.set_shared_memory(f"bout_{protocol}", 64)
    c.infer("suffix", [x], outputs=[y])
    got = shm.get_contents_as_numpy(out_handle, np.object_, [3])
    assert list(got) == [b"alpha!", b"!", "héllo!".encode()]

    # Mixed: INPUT0 and OUTPUT0 in shared memory, INPUT1 and OUTPUT1 in the message.
    key, handle = regions.create(f"mix_{protocol}", 2 * FP32_BYTES)
    c.register_system_shared_memory(f"mix_{protocol}", key, 2 * FP32_BYTES)
    a, b = fp32(7), fp32(-1)
    shm.set_shared_memory_region(handle, [a])
    x0, x1 = m.InferInput("INPUT0", [1, ROWS], "FP32"), m.InferInput("INPUT1", [1, ROWS], "FP32")
    x0.set_shared_memory(f"mix_{protocol}", FP32_BYTES)
    x1.set_data_from_numpy(b)
    y0, y1 = m.InferRequestedOutput("OUTPUT0"), m.InferRequestedOutput("OUTPUT1")
    y0.set_shared_memory(f"mix_{protocol}", FP32_BYTES, offset=FP32_BYTES)
    result = c.infer("add_sub", [x0, x1], outputs=[y0, y1])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [1, ROWS], offset=FP32_BYTES), a + b)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_status_and_unregister(server: Server, regions: Regions, protocol: str) -> None:
    c = client(server, protocol)
    keys = {}
    for name in ("s1", "s2"):
        keys[name], _ = regions.create(f"{name}_{protocol}", 128)
        c.register_system_shared_memory(f"{name}_{protocol}", keys[name], 64, offset=32)

    def status(name: str = "") -> list[dict[str, Any]]:
        got = c.get_system_shared_memory_status(name)
        if protocol == "http":
            return list(got)
        return [
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in got.regions.values()
        ]

    expected = [{"name": f"{n}_{protocol}", "key": keys[n], "offset": 32, "byte_size": 64} for n in ("s1", "s2")]
    assert sorted(status(), key=lambda r: r["name"]) == expected
    assert status(f"s2_{protocol}") == expected[1:]
    c.unregister_system_shared_memory(f"s1_{protocol}")
    assert status() == expected[1:]
    with pytest.raises(InferenceServerException) as e:
        c.get_system_shared_memory_status(f"s1_{protocol}")
    assert e.value.status() in ("404", "StatusCode.NOT_FOUND")
    c.unregister_system_shared_memory(f"s1_{protocol}")  # already gone: not an error, as Triton
    c.unregister_system_shared_memory()
    assert status() == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_registrations_are_refused_and_the_server_serves_on(
    server: Server, regions: Regions, protocol: str
) -> None:
    c = client(server, protocol)
    key, _ = regions.create(f"reg_{protocol}", 64)
    name = f"reg_{protocol}"
    refused(lambda: c.register_system_shared_memory(name, key, 65), protocol, "runs past the end")
    refused(lambda: c.register_system_shared_memory(name, key, 8, offset=60), protocol, "runs past the end")
    huge = 2**64 - 1
    refused(lambda: c.register_system_shared_memory(name, key, huge, offset=8), protocol, "runs past the end")
    for bad_key in ("/../etc/passwd", "a/b", "/dev/shm/x", "/", "/" + "k" * 300):
        refused(lambda k=bad_key: c.register_system_shared_memory(name, k, 8), protocol, "invalid key")
    refused(
        lambda: c.register_system_shared_memory(name, f"/fastserve_test_{os.getpid()}_absent", 8),
        protocol,
        "unable to open shared memory object",
    )
    c.register_system_shared_memory(name, key, 64)
    refused(lambda: c.register_system_shared_memory(name, key, 64), protocol, "already in manager")
    assert [r["name"] for r in client(server, "http").get_system_shared_memory_status()] == [name]
    assert_serving(c, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_tensor_placements_are_refused_and_the_server_serves_on(
    server: Server, regions: Regions, protocol: str
) -> None:
    c, m = client(server, protocol), lib(protocol)
    key, handle = regions.create(f"use_{protocol}", 2 * FP32_BYTES)
    name = f"use_{protocol}"
    c.register_system_shared_memory(name, key, 2 * FP32_BYTES)
    shm.set_shared_memory_region(handle, [fp32(0), fp32(1)])

    def run(region: str, size: int, offset: int = 0, out: tuple[str, int, int] | None = None) -> Any:
        x0, x1 = m.InferInput("INPUT0", [1, ROWS], "FP32"), m.InferInput("INPUT1", [1, ROWS], "FP32")
        x0.set_shared_memory(region, size, offset=offset)
        x1.set_data_from_numpy(fp32(0))
        outputs = None
        if out is not None:
            y = m.InferRequestedOutput("OUTPUT0")
            y.set_shared_memory(out[0], out[1], offset=out[2])
            outputs = [y]
        return c.infer("add_sub", [x0, x1], outputs=outputs)

    refused(lambda: run(name, FP32_BYTES, offset=2 * FP32_BYTES), protocol, "is outside shared memory region")
    refused(lambda: run(name, FP32_BYTES, offset=FP32_BYTES + 4), protocol, "runs past the end")
    refused(lambda: run(name, 2**63 - 1, offset=8), protocol, "runs past the end")
    refused(lambda: run(name, FP32_BYTES - 4), protocol, "needs 64 bytes")
    refused(lambda: run("nowhere", FP32_BYTES), protocol, "'nowhere' is not registered")
    refused(lambda: run(name, FP32_BYTES, out=(name, FP32_BYTES - 4, 0)), protocol, "should be at least 64 bytes")
    refused(lambda: run(name, FP32_BYTES, out=(name, FP32_BYTES, 2**63 - 1)), protocol, "is outside")
    np.testing.assert_array_equal(run(name, FP32_BYTES, offset=FP32_BYTES).as_numpy("OUTPUT0"), fp32(1) + fp32(0))
    c.unregister_system_shared_memory(name)
    refused(lambda: run(name, FP32_BYTES), protocol, f"'{name}' is not registered")
    assert_serving(c, protocol)


def test_parameters_are_checked_over_http(server: Server, regions: Regions) -> None:
    url = f"http://127.0.0.1:{server.http_port}/v2/models/add_sub/infer"
    key, _ = regions.create("params", FP32_BYTES)
    client(server, "http").register_system_shared_memory("params", key, FP32_BYTES)
    body = {"name": "INPUT1", "shape": [1, ROWS], "datatype": "FP32", "data": [0.0] * ROWS}
    cases = [
        ({"shared_memory_region": "params"}, "needs parameter 'shared_memory_byte_size'"),
        ({"shared_memory_byte_size": FP32_BYTES}, "needs parameter 'shared_memory_region'"),
        ({"shared_memory_region": "params", "shared_memory_byte_size": -1}, "must be a non-negative integer"),
        ({"shared_memory_region": 5, "shared_memory_byte_size": FP32_BYTES}, "must be a string"),
        ({"shared_memory_region": "params", "shared_memory_byte_size": 1e30}, "must be a non-negative integer"),
    ]
    for params, text in cases:
        given = {"name": "INPUT0", "shape": [1, ROWS], "datatype": "FP32", "parameters": params}
        r = requests.post(url, json={"inputs": [given, body]}, timeout=60)
        assert r.status_code == 400 and text in r.json()["error"], (params, r.text)
    both = {**body, "name": "INPUT0", "parameters": {"shared_memory_region": "params", "shared_memory_byte_size": 64}}
    r = requests.post(url, json={"inputs": [both, body]}, timeout=60)
    assert r.status_code == 400 and "set only one of 'data'" in r.json()["error"], r.text
    wanted = {"name": "OUTPUT0", "parameters": {"shared_memory_region": "params", "shared_memory_byte_size": 64}}
    r = requests.post(
        url,
        json={
            "inputs": [{**body, "name": "INPUT0"}, body],
            "outputs": [{**wanted, "parameters": {**wanted["parameters"], "binary_data": True}}],
        },
        timeout=60,
    )
    assert r.status_code == 400 and "exclude each other" in r.json()["error"], r.text
    base = f"http://127.0.0.1:{server.http_port}/v2/systemsharedmemory"
    for body_text in ["{", '{"key": "/x"}', '{"key": 5, "byte_size": 1}', '{"key": "/x", "byte_size": -1}']:
        r = requests.post(f"{base}/region/bad/register", data=body_text, timeout=60)
        assert r.status_code == 400 and "malformed shared memory register request" in r.json()["error"], r.text
    assert requests.get(f"{base}/region/bad/register", timeout=60).status_code == 404
    assert requests.post(f"{base}/status", timeout=60).status_code == 404


def test_a_region_unregistered_in_flight_serves_its_request_to_the_end(
    server: Server, regions: Regions, gate: Gate
) -> None:
    """The request copied its input before the model ran (a later write to the region does not
    reach the model) and keeps its output region open after it is unregistered."""
    key, handle = regions.create("flight", 2 * FP32_BYTES)
    c = client(server, "http")
    c.register_system_shared_memory("flight", key, 2 * FP32_BYTES)
    original = np.arange(ROWS, dtype=np.float32)
    shm.set_shared_memory_region(handle, [original])
    answer: dict[str, Any] = {}

    def infer() -> None:
        own = client(server, "http")  # tritonclient's HTTP client is not thread-safe
        x = httpclient.InferInput("X", [ROWS], "FP32")
        x.set_shared_memory("flight", FP32_BYTES)
        y = httpclient.InferRequestedOutput("Y")
        y.set_shared_memory("flight", FP32_BYTES, offset=FP32_BYTES)
        try:
            answer["result"] = own.infer("gate", [x], outputs=[y])
        except Exception as e:  # reported by the assertion below
            answer["error"] = e

    gate.started.clear()
    gate.release.clear()
    thread = threading.Thread(target=infer)
    thread.start()
    assert gate.started.wait(timeout=60)
    shm.set_shared_memory_region(handle, [np.full(ROWS, -1, dtype=np.float32)])
    c.unregister_system_shared_memory("flight")
    assert c.get_system_shared_memory_status() == []
    gate.release.set()
    thread.join(timeout=60)
    assert "error" not in answer, answer
    got = shm.get_contents_as_numpy(handle, np.float32, [ROWS], offset=FP32_BYTES)
    np.testing.assert_array_equal(got, original)


def test_a_shrunken_object_is_refused_not_a_crash(server: Server, regions: Regions) -> None:
    key, _ = regions.create("shrink", 2 * FP32_BYTES)
    c = client(server, "http")
    c.register_system_shared_memory("shrink", key, 2 * FP32_BYTES)
    fd = os.open(f"/dev/shm{key}", os.O_RDWR)
    try:
        os.ftruncate(fd, 8)
    finally:
        os.close(fd)
    x0, x1 = httpclient.InferInput("INPUT0", [1, ROWS], "FP32"), httpclient.InferInput("INPUT1", [1, ROWS], "FP32")
    x0.set_shared_memory("shrink", FP32_BYTES)
    x1.set_data_from_numpy(fp32(0))
    refused(lambda: c.infer("add_sub", [x0, x1]), "http", "now smaller than the region")
    assert_serving(c, "http")


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any object read-write")
def test_a_read_only_object_serves_inputs_but_not_outputs(server: Server, regions: Regions) -> None:
    key, handle = regions.create("readonly", FP32_BYTES)
    shm.set_shared_memory_region(handle, [fp32(4)])
    os.chmod(f"/dev/shm{key}", 0o400)
    c = client(server, "http")
    c.register_system_shared_memory("readonly", key, FP32_BYTES)
    x0, x1 = httpclient.InferInput("INPUT0", [1, ROWS], "FP32"), httpclient.InferInput("INPUT1", [1, ROWS], "FP32")
    x0.set_shared_memory("readonly", FP32_BYTES)
    x1.set_data_from_numpy(fp32(0))
    np.testing.assert_array_equal(c.infer("add_sub", [x0, x1]).as_numpy("OUTPUT0"), fp32(4) + fp32(0))
    y = httpclient.InferRequestedOutput("OUTPUT0")
    y.set_shared_memory("readonly", FP32_BYTES)
    refused(lambda: c.infer("add_sub", [x0, x1], outputs=[y]), "http", "is read-only")


def test_cuda_shared_memory_is_answered_as_unsupported(server: Server) -> None:
    r = requests.get(f"http://127.0.0.1:{server.http_port}/v2/cudasharedmemory/status", timeout=60)
    assert r.status_code == 501 and "CUDA shared memory is not supported" in r.json()["error"], r.text
    with pytest.raises(InferenceServerException) as e:
        client(server, "http").register_cuda_shared_memory("c", b"handle", 0, 64)
    assert e.value.status() == "501"
    with pytest.raises(InferenceServerException) as e:
        client(server, "grpc").get_cuda_shared_memory_status()
    assert e.value.status() == "StatusCode.UNIMPLEMENTED" and "no CUDA IPC" in e.value.message()


def test_no_shared_memory_turns_the_extension_off(regions: Regions) -> None:
    off = Server(http_port=0, grpc_port=0, no_shared_memory=True)
    _models(off)
    key, _ = regions.create("off", FP32_BYTES)
    with off:
        h, g = client(off, "http"), client(off, "grpc")
        assert "system_shared_memory" not in h.get_server_metadata()["extensions"]
        assert "system_shared_memory" not in g.get_server_metadata().extensions
        with pytest.raises(InferenceServerException) as e:
            h.register_system_shared_memory("off", key, FP32_BYTES)
        assert e.value.status() == "501" and "--no-shared-memory" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            g.get_system_shared_memory_status()
        assert e.value.status() == "StatusCode.UNIMPLEMENTED"
        for protocol, c in (("http", h), ("grpc", g)):
            m = lib(protocol)
            x0, x1 = m.InferInput("INPUT0", [1, ROWS], "FP32"), m.InferInput("INPUT1", [1, ROWS], "FP32")
            x0.set_shared_memory("off", FP32_BYTES)
            x1.set_data_from_numpy(fp32(0))
            refused(lambda c=c, x=[x0, x1]: c.infer("add_sub", x), protocol, "--no-shared-memory")
            assert_serving(c, protocol)


def test_the_command_flag(tmp_path: Path, start_server: Any) -> None:
    write_model(tmp_path, "same", xy_config(), IDENTITY_XY)
    on = start_server(tmp_path)
    assert "system_shared_memory" in requests.get(f"{on.url}/v2", timeout=60).json()["extensions"]
    off = start_server(tmp_path, "--no-shared-memory")
    assert "system_shared_memory" not in requests.get(f"{off.url}/v2", timeout=60).json()["extensions"]
    r = requests.post(f"{off.url}/v2/systemsharedmemory/unregister", timeout=60)
    assert r.status_code == 501 and "--no-shared-memory" in r.json()["error"]

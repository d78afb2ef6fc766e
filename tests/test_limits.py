"""Request limits and slow clients, against real servers over raw sockets: every limit answers
with its status and a message (or closes the connection) without reading or allocating the
oversized amount first, and the server keeps serving afterwards. Timeouts are set to 1 s and only
guarded by generous hang limits, so no assertion depends on how fast the machine is."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import DOUBLE_MODEL, ServerProcess, infer_json, write_model, xy_config
from helpers import wait_until

HANG_GUARD_S = 30
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path, "double", xy_config(), DOUBLE_MODEL)
    return tmp_path


def x_input(rows: int = 1, data: object = None) -> list[dict]:
    values = [[1.0, 2.0]] * rows if data is None else data
    return [{"name": "X", "shape": [rows, 2], "datatype": "FP32", "data": values}]


def serves(server: ServerProcess) -> None:
    """The server still answers an inference correctly."""
    r = infer_json(server.url, "double", x_input())
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [2.0, 4.0]


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a hang guard, not a timing check)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open; got {data[:200]!r}") from None
    return data


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def body_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def vm(pid: int, field: str) -> int:
    """A /proc/<pid>/status memory field in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing")


# --- JSON depth and element counts ----------------------------------------------------------


def test_200k_deep_json_is_400_and_the_server_still_serves(start_server, repo: Path) -> None:
    server = start_server(repo)
    depth = 200_000
    body = '{"inputs":[{"name":"X","shape":[1,2],"datatype":"FP32","data":' + "[" * depth + "]" * depth + "}]}"
    r = requests.post(f"{server.url}/v2/models/double/infer", data=body, timeout=HANG_GUARD_S)
    assert r.status_code == 400
    assert r.json() == {"error": "JSON nesting is deeper than the limit of 64 levels"}
    # The repository API's JSON bodies are checked the same way (the index is served in every mode).
    r = requests.post(f"{server.url}/v2/repository/index", data="[" * depth, timeout=HANG_GUARD_S)
    assert r.status_code == 400
    serves(server)


def test_json_depth_is_configurable(start_server, repo: Path) -> None:
    # {"inputs":[{"data":[[1,2]]}]} nests 5 levels deep.
    server = start_server(repo, "--max-json-depth", "4")
    r = infer_json(server.url, "double", x_input())
    assert r.status_code == 400
    assert r.json()["error"] == "JSON nesting is deeper than the limit of 4 levels"
    flat = infer_json(server.url, "double", [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}])
    assert flat.status_code == 200, flat.text


def test_shape_far_larger_than_the_data_is_400_without_allocating(start_server, repo: Path) -> None:
    server = start_server(repo)
    rss = vm(server.proc.pid, "VmRSS")
    r = infer_json(server.url, "double", [{"name": "X", "shape": [10**12, 2], "datatype": "FP32", "data": [1, 2, 3]}])
    assert r.status_code == 400
    assert "needs 2000000000000 elements" in r.json()["error"]
    # 8 TB were never allocated: the process is about the size it was.
    assert vm(server.proc.pid, "VmRSS") - rss < 64 << 20
    serves(server)


def test_request_element_limit_over_http_and_grpc(start_server, repo: Path) -> None:
    server = start_server(repo, "--max-request-elements", "4")
    assert infer_json(server.url, "double", x_input(rows=2)).status_code == 200
    r = infer_json(server.url, "double", x_input(rows=3))
    assert r.status_code == 413
    assert r.json() == {"error": "the request's inputs hold 6 tensor elements, over the limit of 4"}
    x = grpcclient.InferInput("X", [3, 2], "FP32")
    x.set_data_from_numpy(np.ones((3, 2), dtype=np.float32))
    client = grpcclient.InferenceServerClient(server.grpc_address)
    with pytest.raises(InferenceServerException) as e:
        client.infer("double", [x])
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "over the limit of 4" in e.value.message()


# --- Bodies ---------------------------------------------------------------------------------


def test_endless_chunked_body_is_413_without_memory_growth(start_server, repo: Path) -> None:
    limit = 1 << 20
    server = start_server(repo, "--max-body-bytes", str(limit))
    pid = server.proc.pid
    rss_before, peak_before = vm(pid, "VmRSS"), vm(pid, "VmHWM")
    chunk = b"%x\r\n%s\r\n" % (64 << 10, b" " * (64 << 10))
    sent = 0
    with connect(server.port) as sock:
        sock.sendall(b"POST /v2/models/double/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        # Up to 1 GiB, stopping once the server answers: it must answer long before.
        while sent < 1 << 30 and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        response = read_until_closed(sock)
    assert status_of(response) == 413
    assert body_of(response) == {"error": f"request body exceeds the limit of {limit} bytes"}
    assert limit < sent < 1 << 30
    # Neither the resident size nor its peak grew by more than a small bound.
    assert vm(pid, "VmRSS") - rss_before < 64 << 20
    assert vm(pid, "VmHWM") - peak_before < 64 << 20
    serves(server)


def test_declared_gib_body_is_refused_before_reading(start_server, repo: Path) -> None:
    server = start_server(repo, "--max-body-bytes", str(1 << 20))
    with connect(server.port) as sock:
        # No body follows: an answer proves the server did not wait for it.
        sock.sendall(b"POST /v2/models/double/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 1073741824\r\n\r\n")
        response = read_until_closed(sock)
    assert status_of(response) == 413
    assert body_of(response) == {"error": "request body exceeds the limit of 1048576 bytes"}
    serves(server)


def test_slow_body_gets_408(start_server, repo: Path) -> None:
    server = start_server(repo, "--body-read-timeout-s", "1")
    with connect(server.port) as sock:
        sock.sendall(b"POST /v2/models/double/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"{" * 10)
        response = read_until_closed(sock)
    assert status_of(response) == 408
    assert body_of(response) == {"error": "the request body did not arrive within 1 s"}
    serves(server)


# --- Headers --------------------------------------------------------------------------------


def request_with_headers(port: int, headers: list[tuple[str, str]]) -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
    with connect(port) as sock:
        sock.sendall(f"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{lines}\r\n".encode())
        return read_until_closed(sock)


def test_oversized_and_too_many_headers_are_431(start_server, repo: Path) -> None:
    server = start_server(repo, "--max-header-bytes", "16384", "--max-headers", "20")
    assert status_of(request_with_headers(server.port, [("x-a", "a" * 8000)])) == 200
    assert status_of(request_with_headers(server.port, [("x-a", "a" * 20000)])) == 431
    assert status_of(request_with_headers(server.port, [(f"x-{i}", "v") for i in range(10)])) == 200
    assert status_of(request_with_headers(server.port, [(f"x-{i}", "v") for i in range(30)])) == 431
    serves(server)


def test_slowloris_head_is_closed_after_the_header_timeout(start_server, repo: Path) -> None:
    server = start_server(repo, "--header-read-timeout-s", "1", "--idle-timeout-s", "600")
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n" + b"x-slow: " + b"a" * 10_000
    response = b""
    with connect(server.port) as sock:
        sock.settimeout(0.2)
        deadline = time.monotonic() + HANG_GUARD_S
        closed = False
        for byte in head:  # one byte every 0.2 s: the head never completes
            try:
                sock.sendall(bytes([byte]))
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            response += chunk
            if not chunk:
                closed = True
                break
            assert time.monotonic() < deadline, "hang guard"
    assert closed, "the server kept a trickling head open"
    assert response == b"" or status_of(response) == 408
    serves(server)


# --- Malformed framing ----------------------------------------------------------------------

POST = b"POST /v2/models/double/infer HTTP/1.1\r\nHost: t\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"
BAD_HTTP1 = {
    "garbage request line": b"\x00\xff garbage \r\n\r\n",
    "bad chunk size": CHUNKED + b"zz\r\nab\r\n",
    "huge chunk size": CHUNKED + b"ffffffffffffffffff\r\nab",
    "truncated chunked body": CHUNKED + b'10\r\n{"inp',
    "truncated body": POST + b'Content-Length: 500\r\n\r\n{"inputs"',
    "negative length": POST + b"Content-Length: -5\r\n\r\n",
    "two lengths": POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n",
    "length and chunked": POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad version": b"GET /v2/health/live HTTP/9.9\r\n\r\n",
    "header without colon": b"GET /v2/health/live HTTP/1.1\r\nHost t\r\n\r\n",
}


@pytest.mark.parametrize("case", BAD_HTTP1)
def test_malformed_http1_is_refused_and_the_server_serves(start_server, repo: Path, case: str) -> None:
    server = start_server(repo, "--body-read-timeout-s", "1")
    with connect(server.port) as sock:
        sock.sendall(BAD_HTTP1[case])
        if case.startswith("truncated"):
            sock.shutdown(socket.SHUT_WR)  # the rest never comes
        response = read_until_closed(sock)
    # A 4xx answer or a plain close; never a 2xx or a server error.
    assert response == b"" or 400 <= status_of(response) < 500, response[:200]
    serves(server)


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def frames(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of each complete HTTP/2 frame in `data`."""
    while len(data) >= 9:
        n = int.from_bytes(data[:3], "big")
        if len(data) < 9 + n:
            return
        yield data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9 : 9 + n]
        data = data[9 + n :]


def settings_of(data: bytes) -> dict[int, int]:
    for kind, flags, _, payload in frames(data):
        if kind == 0x4 and not flags & 0x1:
            return {
                int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
                for i in range(0, len(payload), 6)
            }
    raise AssertionError(f"no SETTINGS frame in {data[:100]!r}")


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([first | value])
    out, value = [first | top], value - top
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def hpack_str(s: str) -> bytes:
    return hpack_int(len(s), 7) + s.encode()


def h2_get(path: str, extra: dict[str, str]) -> bytes:
    """A HEADERS block: GET, http, the path and literal headers (no Huffman, no indexing)."""
    block = b"\x82\x86" + b"\x04" + hpack_str(path) + b"\x01" + hpack_str("t")
    for name, value in extra.items():
        block += b"\x00" + hpack_str(name) + hpack_str(value)
    return frame(0x1, 0x5, 1, block)  # END_STREAM | END_HEADERS


def h2_exchange(port: int, *send: bytes) -> bytes:
    """Sends the preface, empty SETTINGS and `send`; reads until the server closes, or has sent its
    SETTINGS and, when `send` holds a request, a stream-1 answer (HEADERS or RST_STREAM)."""
    data = b""
    with connect(port) as sock:
        sock.sendall(PREFACE + frame(0x4, 0, 0) + b"".join(send))
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            kinds = {(kind, stream) for kind, _, stream, _ in frames(data)}
            if (0x4, 0) in kinds and (not send or kinds & {(0x1, 1), (0x3, 1)}):
                break
    return data


def stream1_answer(data: bytes) -> tuple[int, bytes]:
    return next((kind, payload) for kind, _, stream, payload in frames(data) if stream == 1 and kind in (0x1, 0x3))


def test_http2_header_list_limit(start_server, repo: Path) -> None:
    server = start_server(repo, "--max-header-bytes", "8192")
    assert settings_of(h2_exchange(server.port))[0x6] == 8192  # SETTINGS_MAX_HEADER_LIST_SIZE
    kind, block = stream1_answer(h2_exchange(server.port, h2_get("/v2/health/live", {"x-a": "a" * 100})))
    assert (kind, block[:1]) == (0x1, b"\x88")  # HEADERS, :status 200
    kind, block = stream1_answer(h2_exchange(server.port, h2_get("/v2/health/live", {"x-a": "a" * 12000})))
    # Refused: RST_STREAM, or HEADERS with a status other than 200 (h2 answers 431).
    assert kind == 0x3 or block[:1] != b"\x88"
    serves(server)


BAD_HTTP2 = {
    "garbage after the preface": PREFACE + b"\xde\xad\xbe\xef" * 64,
    "truncated frame": PREFACE + frame(0x4, 0, 0)[:5],
    "settings of a bad length": PREFACE + frame(0x4, 0, 0, b"\x00" * 7),
    "data on stream 0": PREFACE + frame(0x4, 0, 0) + frame(0x0, 0, 0, b"x" * 10),
    "headers with a garbage block": PREFACE + frame(0x4, 0, 0) + frame(0x1, 0x5, 1, b"\xff" * 40),
    "frame larger than allowed": PREFACE + frame(0x4, 0, 0) + (1 << 20).to_bytes(3, "big") + b"\x00\x00" + b"\x00" * 4,
}


@pytest.mark.parametrize("port_kind", ["http", "grpc"])
def test_malformed_http2_is_refused_and_the_server_serves(start_server, repo: Path, port_kind: str) -> None:
    server = start_server(repo)
    port = server.port if port_kind == "http" else server.grpc_port
    for case, data in BAD_HTTP2.items():
        with connect(port) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            reply = read_until_closed(sock)  # closed, not held open
        assert all(kind != 0x1 for kind, *_ in frames(reply)), case  # never answered as a request
    serves(server)
    client = grpcclient.InferenceServerClient(server.grpc_address)
    assert client.is_server_live()


def test_grpc_advertises_its_stream_and_header_limits(start_server, repo: Path) -> None:
    server = start_server(repo, "--grpc-max-concurrent-streams", "7", "--max-header-bytes", "10000")
    settings = settings_of(h2_exchange(server.grpc_port))
    assert settings[0x3] == 7  # SETTINGS_MAX_CONCURRENT_STREAMS
    assert settings[0x6] == 10000


# --- Connections ----------------------------------------------------------------------------


def get_live(sock: socket.socket) -> int:
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
    return status_of(sock.recv(4096))


def test_max_connections(start_server, repo: Path) -> None:
    server = start_server(repo, "--max-connections", "2")
    first, second = connect(server.port), connect(server.port)
    assert get_live(first) == 200 and get_live(second) == 200  # both admitted and kept alive
    with connect(server.port) as third:
        third.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_until_closed(third) == b""  # closed as soon as accepted
    # gRPC shares the limit.
    x = grpcclient.InferInput("X", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(server.grpc_address).infer("double", [x], client_timeout=HANG_GUARD_S)
    first.close()

    # The slot comes back once the server has seen the close; wait for that, bounded.
    def admitted() -> bytes:
        with connect(server.port) as again:
            again.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            return read_until_closed(again)

    wait_until(admitted, timeout=HANG_GUARD_S, what="the closed connection's slot to come back")
    second.close()


def test_idle_keep_alive_connections_are_closed(start_server, repo: Path) -> None:
    # A long header timeout, so only the idle timeout can close these connections.
    server = start_server(repo, "--idle-timeout-s", "1", "--header-read-timeout-s", "600")
    with connect(server.port) as sock:
        assert get_live(sock) == 200
        assert read_until_closed(sock) == b""  # closed once idle
    with connect(server.port) as sock:  # a connection that never sends a request
        assert read_until_closed(sock) == b""
    # HTTP/2: an idle connection gets GOAWAY, then is closed (once its PING is answered, as any
    # client does; one that never answers is closed by the keepalive timeout instead).
    with connect(server.port) as sock:
        sock.sendall(PREFACE + frame(0x4, 0, 0))
        data, answered = b"", 0
        while chunk := sock.recv(65536):
            data += chunk
            pings = [payload for kind, flags, _, payload in frames(data) if kind == 0x6 and not flags & 0x1]
            for payload in pings[answered:]:
                sock.sendall(frame(0x6, 0x1, 0, payload))
            answered = len(pings)
        assert any(kind == 0x7 for kind, *_ in frames(data))
    serves(server)


def test_busy_connections_are_not_idle(start_server, tmp_path: Path) -> None:
    started, release = tmp_path / "started.fifo", tmp_path / "release.fifo"
    os.mkfifo(started)
    os.mkfifo(release)
    model = f"""
        class Model:
            def execute(self, inputs):
                with open({str(started)!r}, "w") as f:
                    f.write("x")
                with open({str(release)!r}) as f:
                    f.read()
                return {{"Y": inputs["X"]}}
    """
    write_model(tmp_path, "slow", xy_config(), model)
    server = start_server(tmp_path, "--idle-timeout-s", "1")
    result: dict = {}
    caller = threading.Thread(target=lambda: result.update(r=infer_json(server.url, "slow", x_input())))
    caller.start()
    with open(started) as f:  # the model is running
        f.read()
    # Idle timeouts pass while the request runs, and the busy connection must stay open. Rather
    # than sleeping for them, watch them pass: connections opened after the request went quiet
    # and never used are closed by the idle timeout, so once two of them in turn have been closed,
    # the busy connection has been quiet for at least two idle timeouts.
    for _ in range(2):
        with connect(server.port) as idle:
            assert read_until_closed(idle) == b""
    with open(release, "w") as f:
        f.write("go")
    caller.join(timeout=HANG_GUARD_S)
    assert result["r"].status_code == 200, result["r"].text


# --- Shutdown under load --------------------------------------------------------------------


def test_sigterm_under_load_fails_no_accepted_request(start_server, repo: Path) -> None:
    server = start_server(repo, "--drain-timeout-s", "60")
    statuses: list[int] = []
    lock = threading.Lock()
    enough = threading.Event()

    def load() -> None:
        session = requests.Session()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = session.post(
                    f"{server.url}/v2/models/double/infer", json={"inputs": x_input()}, timeout=HANG_GUARD_S
                )
            except requests.ConnectionError:
                return  # refused or closed before the request was accepted: allowed
            with lock:
                statuses.append(r.status_code)
                if r.status_code == 200:
                    assert r.json()["outputs"][0]["data"] == [2.0, 4.0]
                if len(statuses) >= 200:
                    enough.set()

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    assert enough.wait(timeout=120), "the load never got going"
    assert server.terminate() == 0
    for t in threads:
        t.join(timeout=HANG_GUARD_S)
    assert not any(t.is_alive() for t in threads)
    # Every answered request succeeded, except ones refused as shutting down.
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) >= 200


# --- Configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-json-depth", "0", "--max-json-depth must be between 1 and 127"),
        ("--max-json-depth", "500", "--max-json-depth must be between 1 and 127"),
        ("--max-header-bytes", "100", "--max-header-bytes must be between 8192"),
        ("--max-connections", "0", "--max-connections must be positive"),
        ("--idle-timeout-s", "0", "--idle-timeout-s must be a positive number"),
        ("--body-read-timeout-s", "-1", "--body-read-timeout-s must be a positive number"),
    ],
)
def test_bad_limits_are_usage_errors(repo: Path, flag: str, value: str, message: str) -> None:
    cmd = [sys.executable, "-m", "fastserve", "serve", "--model-repository", str(repo), flag, value]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert message in p.stderr


def test_embedded_server_takes_the_limits_as_keywords() -> None:
    from fastserve import Server, Tensor

    class Double:
        def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"Y": inputs["X"] * 2}

    with pytest.raises(ValueError, match="max_json_depth"):
        Server(http_port=0, max_json_depth=1000)
    server = Server(http_port=0, max_json_depth=4, max_request_elements=2, max_header_bytes=8192)
    server.add_model("double", Double(), inputs=[Tensor("X", "FP32", [-1])], outputs=[Tensor("Y", "FP32", [-1])])
    with server:
        url = f"http://127.0.0.1:{server.http_port}"
        flat = {"name": "X", "shape": [2], "datatype": "FP32", "data": [1, 2]}
        assert infer_json(url, "double", [flat]).status_code == 200
        assert infer_json(url, "double", [dict(flat, shape=[1, 2], data=[[1, 2]])]).status_code == 400  # depth 5
        assert infer_json(url, "double", [dict(flat, shape=[3], data=[1, 2, 3])]).status_code == 413
        r = requests.get(f"{url}/v2/health/live", headers={"x-a": "a" * 10000}, timeout=HANG_GUARD_S)
        assert r.status_code == 431

"""Security: bearer-token auth, TLS and mTLS (HTTP and gRPC, real certificates made per test),
management safety, and no unsafe deserialisation on request paths."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import trustme
from fastserve import Server
from tritonclient.utils import InferenceServerException

from conftest import EXAMPLES, ROOT, write_model

TOKEN = "inference-s3cret-token"
ADMIN = "admin-s3cret-token"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def echo_body() -> dict:
    return {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": ["hi"]}]}


def start(**kwargs: object) -> Server:
    server = Server(http_port=0, grpc_port=0, **kwargs)  # type: ignore[arg-type]
    server.load_repository(EXAMPLES, control_mode="explicit", load_models=["echo"])
    return server.start()


@pytest.fixture
def auth_server() -> Iterator[Server]:
    server = start(auth_token=TOKEN)
    yield server
    server.stop()


@pytest.fixture
def admin_server() -> Iterator[Server]:
    server = start(auth_token=TOKEN, admin_token=ADMIN)
    yield server
    server.stop()


# -- auth over HTTP ------------------------------------------------------------------------------


def test_probes_stay_open_and_everything_else_needs_the_token(auth_server: Server) -> None:
    url = f"http://127.0.0.1:{auth_server.http_port}"
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert requests.get(url + path, timeout=10).status_code == 200, path
    guarded = [
        ("GET", "/v2", None),
        ("GET", "/v2/models/echo", None),
        ("GET", "/v2/models/echo/ready", None),
        ("GET", "/v2/models/stats", None),
        ("GET", "/v2/models/echo/stats", None),
        ("POST", "/v2/models/echo/infer", echo_body()),
        ("POST", "/v2/repository/index", None),
        ("POST", "/v2/repository/models/echo/load", None),
        ("GET", "/v2/no/such/route", None),
    ]
    for method, path, body in guarded:
        for headers in ({}, bearer("wrong"), {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
            r = requests.request(method, url + path, json=body, headers=headers, timeout=10)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer"
            assert "bearer token" in r.json()["error"]
            assert TOKEN not in r.text
    for method, path, body in guarded[:-1]:
        r = requests.request(method, url + path, json=body, headers=bearer(TOKEN), timeout=60)
        assert r.status_code == 200, (method, path, r.text)
    infer = requests.post(url + "/v2/models/echo/infer", json=echo_body(), headers=bearer(TOKEN), timeout=60).json()
    assert infer["outputs"][0]["data"] == ["echo: hi"]


def test_admin_token_guards_the_repository_api(admin_server: Server) -> None:
    url = f"http://127.0.0.1:{admin_server.http_port}"
    index = url + "/v2/repository/index"
    assert requests.post(index, headers=bearer(TOKEN), timeout=10).status_code == 401
    assert (
        requests.post(url + "/v2/repository/models/echo/unload", headers=bearer(TOKEN), timeout=10).status_code == 401
    )
    assert requests.post(index, headers=bearer(ADMIN), timeout=10).status_code == 200
    # The inference token and the stronger admin token both serve inference.
    for token in (TOKEN, ADMIN):
        r = requests.post(url + "/v2/models/echo/infer", json=echo_body(), headers=bearer(token), timeout=60)
        assert r.status_code == 200, r.text
    client = httpclient.InferenceServerClient(f"127.0.0.1:{admin_server.http_port}")
    try:
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.get_model_repository_index(headers=bearer(TOKEN))
        assert client.is_server_live()
        assert client.get_model_repository_index(headers=bearer(ADMIN))
    finally:
        client.close()


def test_admin_token_alone_leaves_inference_open() -> None:
    server = start(admin_token=ADMIN)
    try:
        url = f"http://127.0.0.1:{server.http_port}"
        assert requests.post(url + "/v2/models/echo/infer", json=echo_body(), timeout=60).status_code == 200
        assert requests.post(url + "/v2/repository/index", timeout=10).status_code == 401
        assert requests.post(url + "/v2/repository/index", headers=bearer(ADMIN), timeout=10).status_code == 200
    finally:
        server.stop()


def test_empty_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="auth_token must not be empty"):
        Server(http_port=0, auth_token=" ")


# -- auth over gRPC ------------------------------------------------------------------------------


def test_grpc_needs_the_token_except_for_probes(admin_server: Server) -> None:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{admin_server.grpc_port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        for call in (
            lambda h: client.get_server_metadata(headers=h),
            lambda h: client.get_model_metadata("echo", headers=h),
            lambda h: client.is_model_ready("echo", headers=h),
            lambda h: client.get_inference_statistics(headers=h),
            lambda h: client.get_model_config("echo", headers=h),
        ):
            for headers in (None, {"authorization": "Bearer wrong"}):
                with pytest.raises(InferenceServerException) as err:
                    call(headers)
                assert err.value.status() == "StatusCode.UNAUTHENTICATED"
                assert "bearer token" in err.value.message()
            call({"authorization": f"Bearer {TOKEN}"})

        x = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
        x.set_data_from_numpy(np.array([[b"hi"]], dtype=object))
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.infer("echo", [x])
        result = client.infer("echo", [x], headers={"authorization": f"Bearer {TOKEN}"})
        assert result.as_numpy("TEXT").tolist() == [[b"echo: hi"]]

        # Management takes only the admin token.
        with pytest.raises(InferenceServerException) as err:
            client.get_model_repository_index(headers={"authorization": f"Bearer {TOKEN}"})
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as err:
            client.unload_model("echo", headers={"authorization": f"Bearer {TOKEN}"})
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        assert client.is_model_ready("echo", headers={"authorization": f"Bearer {TOKEN}"})
        index = client.get_model_repository_index(headers={"authorization": f"Bearer {ADMIN}"}, as_json=True)
        assert any(m["name"] == "echo" for m in index["models"])
    finally:
        client.close()


# -- the command line --------------------------------------------------------------------------


def test_cli_token_file_and_env_never_log_the_token(start_server, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = start_server(EXAMPLES, "--auth-token-file", str(token_file), "--log-level", "debug", "--access-log")
    assert requests.get(server.url + "/v2/models/echo", timeout=10).status_code == 401
    r = requests.post(server.url + "/v2/models/echo/infer", json=echo_body(), headers=bearer(TOKEN), timeout=60)
    assert r.status_code == 200
    assert requests.post(server.url + "/v2/models/echo/infer", json=echo_body(), timeout=60).status_code == 401
    assert server.terminate() == 0
    assert TOKEN not in server.log()

    os.environ["FASTSERVE_ADMIN_TOKEN"] = ADMIN
    try:
        env_server = start_server(
            EXAMPLES, "--auth-token-file", str(token_file), "--model-control-mode", "explicit", "--load-model", "*"
        )
    finally:
        del os.environ["FASTSERVE_ADMIN_TOKEN"]
    index = env_server.url + "/v2/repository/index"
    assert requests.post(index, headers=bearer(TOKEN), timeout=10).status_code == 401
    assert requests.post(index, headers=bearer(ADMIN), timeout=10).status_code == 200
    assert ADMIN not in env_server.log()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fastserve", "serve", "--model-repository", str(EXAMPLES), "--http-port", "0"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_cli_refuses_missing_and_empty_token_files(tmp_path: Path) -> None:
    missing = run_cli("--auth-token-file", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "cannot read --auth-token-file" in missing.stderr
    (tmp_path / "empty").write_text("\n")
    empty = run_cli("--admin-token-file", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "is empty" in empty.stderr
    flags = subprocess.run(
        [sys.executable, "-m", "fastserve", "serve", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "--auth-token-file" in flags and "--auth-token " not in flags, "no token value on the command line"


# -- TLS -----------------------------------------------------------------------------------------


class Pki:
    """A throwaway CA with a server certificate for 127.0.0.1/localhost and a client certificate."""

    def __init__(self, root: Path) -> None:
        self.ca = trustme.CA()
        self.ca_pem = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        server = self.ca.issue_cert("localhost", "127.0.0.1")
        self.cert, self.key = root / "server.pem", root / "server.key"
        server.private_key_pem.write_to_path(str(self.key))
        self.cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
        client = self.ca.issue_cert("client@example.com")
        self.client_cert, self.client_key = root / "client.pem", root / "client.key"
        client.private_key_pem.write_to_path(str(self.client_key))
        self.client_cert.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def test_tls_http_and_grpc(pki: Pki) -> None:
    server = start(tls_cert=pki.cert, tls_key=pki.key)
    try:
        url = f"https://localhost:{server.http_port}"
        assert requests.get(url + "/v2/health/ready", verify=str(pki.ca_pem), timeout=10).status_code == 200
        r = requests.post(url + "/v2/models/echo/infer", json=echo_body(), verify=str(pki.ca_pem), timeout=60)
        assert r.json()["outputs"][0]["data"] == ["echo: hi"]
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url + "/v2/health/ready", timeout=10)  # not trusted without the CA
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{server.http_port}/v2/health/ready", timeout=10)

        http = httpclient.InferenceServerClient(
            f"localhost:{server.http_port}", ssl=True, ssl_options={"ca_certs": str(pki.ca_pem)}
        )
        try:
            x = httpclient.InferInput("TEXT", [1, 1], "BYTES")
            x.set_data_from_numpy(np.array([[b"hi"]], dtype=object))
            assert http.infer("echo", [x]).as_numpy("TEXT").tolist() == [[b"echo: hi"]]
        finally:
            http.close()

        grpc = grpcclient.InferenceServerClient(
            f"localhost:{server.grpc_port}", ssl=True, root_certificates=str(pki.ca_pem)
        )
        try:
            assert grpc.is_server_live()
            x = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
            x.set_data_from_numpy(np.array([[b"hi"]], dtype=object))
            assert grpc.infer("echo", [x]).as_numpy("TEXT").tolist() == [[b"echo: hi"]]
        finally:
            grpc.close()
    finally:
        server.stop()


def test_mtls_refuses_clients_without_a_certificate(pki: Pki) -> None:
    server = start(tls_cert=pki.cert, tls_key=pki.key, tls_client_ca=pki.ca_pem, auth_token=TOKEN)
    try:
        url = f"https://localhost:{server.http_port}/v2/models/echo/infer"
        client_cert = (str(pki.client_cert), str(pki.client_key))
        kwargs = {"json": echo_body(), "verify": str(pki.ca_pem), "timeout": 60}
        r = requests.post(url, cert=client_cert, headers=bearer(TOKEN), **kwargs)  # type: ignore[arg-type]
        assert r.status_code == 200, r.text
        # TLS and the token are independent layers: a good certificate still needs the token.
        assert requests.post(url, cert=client_cert, **kwargs).status_code == 401  # type: ignore[arg-type]
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.post(url, headers=bearer(TOKEN), **kwargs)  # type: ignore[arg-type]

        # A certificate from another CA is refused too.
        other = trustme.CA().issue_cert("intruder")
        with other.cert_chain_pems[0].tempfile() as c, other.private_key_pem.tempfile() as k:
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.post(url, cert=(c, k), headers=bearer(TOKEN), **kwargs)  # type: ignore[arg-type]

        address = f"localhost:{server.grpc_port}"
        headers = {"authorization": f"Bearer {TOKEN}"}
        good = grpcclient.InferenceServerClient(
            address,
            ssl=True,
            root_certificates=str(pki.ca_pem),
            private_key=str(pki.client_key),
            certificate_chain=str(pki.client_cert),
        )
        bad = grpcclient.InferenceServerClient(address, ssl=True, root_certificates=str(pki.ca_pem))
        try:
            assert good.get_server_metadata(headers=headers).name == "fastserve"
            with pytest.raises(InferenceServerException) as err:
                bad.get_server_metadata(headers=headers)
            assert err.value.status() == "StatusCode.UNAVAILABLE"
        finally:
            good.close()
            bad.close()
    finally:
        server.stop()


def test_bad_tls_files_are_one_line_startup_errors(pki: Pki, tmp_path: Path) -> None:
    other = trustme.CA().issue_cert("localhost")
    other_key = tmp_path / "other.key"
    other.private_key_pem.write_to_path(str(other_key))
    cases = [
        (["--tls-cert", str(pki.cert), "--tls-key", str(other_key)], "do not form a usable pair"),
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(pki.key)], "cannot read TLS certificate"),
        (["--tls-cert", str(pki.key), "--tls-key", str(pki.key)], "holds no PEM certificate"),
        (["--tls-cert", str(pki.cert), "--tls-key", str(pki.cert)], "holds no usable PEM private key"),
        (["--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--tls-client-ca", str(pki.key)], "client CA"),
    ]
    for args, message in cases:
        done = run_cli(*args)
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastserve: error: ") and message in lines[0], done.stderr
        assert "Traceback" not in done.stderr and "panicked" not in done.stderr
    half = run_cli("--tls-cert", str(pki.cert))
    assert half.returncode == 2 and "needs both --tls-cert and --tls-key" in half.stderr
    with pytest.raises(OSError, match="do not form a usable pair"):
        Server(http_port=0, tls_cert=pki.cert, tls_key=other_key)


def test_cli_serves_tls(start_server, pki: Pki) -> None:
    server = start_server(EXAMPLES, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    assert "https://127.0.0.1:" in server.log()
    r = requests.get(f"https://localhost:{server.port}/v2/health/live", verify=str(pki.ca_pem), timeout=10)
    assert r.status_code == 200
    # /metrics stays plain HTTP for scrapers.
    assert requests.get(server.metrics_url, timeout=10).status_code == 200


# -- management safety ---------------------------------------------------------------------------


def test_management_over_the_network_interface(start_server, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    # Listening on every interface; reached here through loopback.
    server = start_server(EXAMPLES, "--host", "0.0.0.0", "--auth-token-file", str(token_file))
    index = server.url + "/v2/repository/index"
    assert requests.post(index, headers=bearer("wrong"), timeout=10).status_code == 401
    assert requests.post(index, timeout=10).status_code == 401
    # The right token reads the index (served in every control mode) but still meets control mode
    # none for changes: loading is off.
    assert requests.post(index, headers=bearer(TOKEN), timeout=10).status_code == 200
    load = server.url + "/v2/repository/models/echo/load"
    assert requests.post(load, headers=bearer(TOKEN), timeout=10).status_code == 403


def test_no_warning_without_auth_only_on_loopback(start_server) -> None:
    server = start_server(EXAMPLES, "--host", "0.0.0.0")
    assert "without --auth-token-file" in server.log()
    local = start_server(EXAMPLES)
    assert "without --auth-token-file" not in local.log()


PYTHON_MODEL = """
import numpy as np

class Model:
    def execute(self, inputs):
        return {"Y": inputs["X"]}
"""

PYTHON_CONFIG = """
backend = "python"
[[input]]
name = "X"
datatype = "FP32"
dims = [-1]
[[output]]
name = "Y"
datatype = "FP32"
dims = [-1]
"""


def test_names_and_symlinks_cannot_escape_the_repository(start_server, tmp_path: Path) -> None:
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    repo.mkdir()
    write_model(repo, "m", PYTHON_CONFIG, PYTHON_MODEL)
    write_model(outside, "stray", PYTHON_CONFIG, PYTHON_MODEL)
    # A model directory that is a symlink out of the repository.
    (repo / "linked").symlink_to(outside / "stray", target_is_directory=True)
    # A version directory that is a symlink out of its model directory.
    write_model(repo, "v", PYTHON_CONFIG, PYTHON_MODEL)
    (repo / "v" / "2").symlink_to(outside / "stray" / "1", target_is_directory=True)
    server = start_server(repo, "--model-control-mode", "explicit", "--load-model", "m")

    for bad in [
        "..",
        "%2e%2e",
        "%2E%2E",
        "a%2F..%2F..%2Fetc",
        "..%2Foutside%2Fstray",
        "m%2F..",
        "%2Fetc",
        "m%5C..",
        "linked",
    ]:
        r = requests.post(f"{server.url}/v2/repository/models/{bad}/load", timeout=60)
        assert r.status_code in (400, 404), (bad, r.status_code, r.text)
        assert str(tmp_path) not in r.text and "outside" not in r.text.replace(bad, ""), r.text
    assert requests.get(f"{server.url}/v2/models/linked/ready", timeout=10).status_code == 404

    r = requests.post(f"{server.url}/v2/repository/models/v/load", timeout=60)
    assert r.status_code == 200, r.text
    assert requests.get(f"{server.url}/v2/models/v/versions/1/ready", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/v2/models/v/versions/2/ready", timeout=10).status_code != 200
    index = requests.post(f"{server.url}/v2/repository/index", timeout=10)
    assert str(tmp_path) not in index.text
    assert "linked" not in {e["name"] for e in index.json()}


def test_load_overrides_cannot_reach_outside(start_server, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    write_model(repo, "m", PYTHON_CONFIG, PYTHON_MODEL)
    onnx = repo / "mlp"
    (onnx / "1").mkdir(parents=True)
    (onnx / "1" / "model.onnx").write_bytes((EXAMPLES / "mlp" / "1" / "model.onnx").read_bytes())
    (onnx / "config.toml").write_text((EXAMPLES / "mlp" / "config.toml").read_text())
    server = start_server(repo, "--model-control-mode", "explicit", "--load-model", "*")
    escape = tmp_path / "escaped-cache"
    for cache in ("../../escaped-cache", str(escape)):
        config = {
            "instance_group": {"kind": "gpu"},
            "parameters": {"tensorrt": True, "tensorrt_engine_cache_path": cache},
        }
        r = requests.post(
            f"{server.url}/v2/repository/models/mlp/load", json={"parameters": {"config": config}}, timeout=60
        )
        assert r.status_code == 400, r.text
        assert str(tmp_path) not in r.text.replace(str(escape), "")
        assert not escape.exists()
    r = requests.post(
        f"{server.url}/v2/repository/models/m/load", json={"parameters": {"file:1/model.py": "Zm9v"}}, timeout=60
    )
    assert r.status_code == 403
    # Failures keep the serving version and never show the repository's location.
    for e in requests.post(f"{server.url}/v2/repository/index", timeout=10).json():
        assert str(repo) not in e.get("reason", "")


def test_no_unsafe_deserialisation_in_the_package() -> None:
    unsafe = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|_pickle|marshal|shelve|dill|cloudpickle)\b", re.M)
    # The builtins eval() and exec(), not methods of that name (Triton's InferenceRequest.exec).
    calls = re.compile(
        r"\b(pickle|marshal|shelve)\.(loads?|Unpickler|open)\b|yaml\.load\(|(?<![.\w])(?<!def )(eval|exec)\("
    )
    package = ROOT / "python" / "fastserve"
    offenders = []
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if unsafe.search(text) or calls.search(text):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []

"""Operators' conventions (issue #21): the repository index in every control mode, the standard
gRPC health service (Kubernetes gRPC probes) and server reflection (grpcurl), the OpenAPI document
and its Swagger UI page, model-state and build metrics, and TensorFlow Serving's REST predict API
(KServe V1) for clients written for it. Real servers on ephemeral ports, real clients."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import yaml
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from conftest import DOUBLE_MODEL, ROOT, ServerProcess, infer_json, write_model, xy_config
from helpers import HANG_GUARD_S, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# A model whose load waits until the test writes to a FIFO: the test decides when loading ends.
GATED_MODEL = """
    class Model:
        def initialize(self, args):
            with open({fifo!r}) as gate:
                gate.read()

        def execute(self, inputs):
            return {{"Y": inputs["X"]}}
"""


def health_check(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=HANG_GUARD_S).status)


def metric(url: str, name: str, **labels: str) -> float | None:
    text = requests.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


@pytest.fixture
def gated_repo(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A repository with `ok` (loads at once) and `slow` (loads once the FIFO is written)."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    repo = tmp_path / "repo"
    write_model(repo, "ok", xy_config(), DOUBLE_MODEL)
    write_model(repo, "slow", xy_config(), GATED_MODEL.format(fifo=str(fifo)))
    yield repo, fifo


def open_gate(fifo: Path) -> None:
    # Blocks until the model's initialize opened the FIFO for reading, then lets it finish.
    with open(fifo, "w") as gate:
        gate.write("go")


# --- repository index in every control mode ---------------------------------------------------


def test_repository_index_is_readable_in_mode_none(example_server: ServerProcess) -> None:
    r = requests.post(f"{example_server.url}/v2/repository/index", json={"ready": True}, timeout=10)
    assert r.status_code == 200, r.text
    assert {"name": "mlp", "version": "1", "state": "READY", "reason": ""} in r.json()
    index = grpcclient.InferenceServerClient(example_server.grpc_address).get_model_repository_index(as_json=True)
    assert "mlp" in {m["name"] for m in index["models"]}
    # Read-only: loads and unloads stay refused.
    load = requests.post(f"{example_server.url}/v2/repository/models/mlp/load", timeout=10)
    assert load.status_code == 403
    assert "--model-control-mode explicit or poll" in load.json()["error"]
    assert load.json()["error"].startswith("explicit model load / unload is not allowed"), "Triton's wording"


# --- grpc.health.v1.Health ----------------------------------------------------------------------


def test_grpc_health_server_and_models(example_server: ServerProcess) -> None:
    address = example_server.grpc_address
    assert health_check(address, "") == SERVING
    assert health_check(address, "mlp") == SERVING
    with pytest.raises(grpc.RpcError) as e:
        health_check(address, "no_such_model")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="mlp"))
        assert next(watch).status == SERVING
        watch.cancel()


def test_grpc_health_not_serving_until_the_startup_loads_finish(start_server, gated_repo: tuple[Path, Path]) -> None:
    repo, fifo = gated_repo
    server = start_server(repo, wait_loaded=False)
    address = server.grpc_address
    assert health_check(address, "") == NOT_SERVING, "the startup loads are still running"
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == NOT_SERVING
        open_gate(fifo)
        assert next(watch).status == SERVING, "the watcher hears the transition"
        watch.cancel()
    server.wait_for_log("model version(s) ready")
    assert health_check(address, "slow") == SERVING
    assert health_check(address, "ok") == SERVING


def test_grpc_health_is_open_when_auth_is_on(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "m", xy_config(), DOUBLE_MODEL)
    token = tmp_path / "token"
    token.write_text("s3cret")
    server = start_server(tmp_path, "--auth-token-file", str(token))
    # Kubernetes probes send no credentials; the inference service still needs them.
    assert health_check(server.grpc_address, "") == SERVING
    assert health_check(server.grpc_address, "m") == SERVING
    with pytest.raises(Exception, match="missing bearer token"):
        grpcclient.InferenceServerClient(server.grpc_address).is_model_ready("m")


def test_grpc_health_not_serving_while_draining(start_server, tmp_path: Path) -> None:
    fifo, entered = tmp_path / "gate", tmp_path / "entered"
    os.mkfifo(fifo)
    held = """
        class Model:
            def execute(self, inputs):
                open({entered!r}, "w").close()
                with open({fifo!r}) as gate:
                    gate.read()
                return {{"Y": inputs["X"]}}
    """
    write_model(tmp_path / "repo", "held", xy_config(), held.format(fifo=str(fifo), entered=str(entered)))
    server = start_server(tmp_path / "repo", "--drain-timeout-s", str(HANG_GUARD_S))
    with grpc.insecure_channel(server.grpc_address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == SERVING
        answers: list[requests.Response] = []
        request = threading.Thread(
            target=lambda: answers.append(infer_json(server.url, "held", [x_input([[1, 2]])])), daemon=True
        )
        request.start()
        wait_until(entered.exists, what="the request to reach the model")
        stopper = threading.Thread(target=server.terminate, daemon=True)
        stopper.start()
        assert next(watch).status == NOT_SERVING, "draining: probes must take the pod out of rotation"
        # The watch then ends, so a watching client does not hold the shutdown to its drain timeout.
        assert next(watch, None) is None
        open_gate(fifo)
        request.join(HANG_GUARD_S)
        stopper.join(HANG_GUARD_S)
    assert answers and answers[0].status_code == 200, "the request in flight finished during the drain"


def x_input(rows: list[list[float]]) -> dict:
    return {"name": "X", "datatype": "FP32", "shape": [len(rows), len(rows[0])], "data": rows}


# --- server reflection --------------------------------------------------------------------------


def test_reflection_lists_services_and_resolves_messages(example_server: ServerProcess) -> None:
    with grpc.insecure_channel(example_server.grpc_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services, services
        pool = DescriptorPool(database)
        infer = pool.FindMessageTypeByName("inference.ModelInferRequest")
        assert {"model_name", "inputs", "raw_input_contents"} <= {f.name for f in infer.fields}
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        assert "ModelInfer" in {m.name for m in service.methods}


# --- OpenAPI document and Swagger UI ------------------------------------------------------------


def test_openapi_document_is_served_from_docs(example_server: ServerProcess) -> None:
    r = requests.get(f"{example_server.url}/v2/openapi.json", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text()), "one source of truth"
    assert "/v2/models/{model}/infer" in r.json()["paths"]


def test_swagger_ui_page_and_assets(example_server: ServerProcess) -> None:
    page = requests.get(f"{example_server.url}/v2/docs", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "/v2/openapi.json" in page.text and "/v2/docs/swagger-ui-bundle.js" in page.text
    for asset, kind in [("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "css")]:
        r = requests.get(f"{example_server.url}/v2/docs/{asset}", timeout=10)
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
        assert len(r.content) > 10_000, "the asset is served from the package, not a stub"
    assert requests.post(f"{example_server.url}/v2/docs", timeout=10).status_code == 404


def test_swagger_ui_can_be_turned_off(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "m", xy_config(), DOUBLE_MODEL)
    server = start_server(tmp_path, "--no-swagger-ui")
    r = requests.get(f"{server.url}/v2/docs", timeout=10)
    assert r.status_code == 404
    assert "--no-swagger-ui" in r.json()["error"]
    assert requests.get(f"{server.url}/v2/openapi.json", timeout=10).status_code == 200


# --- metrics ------------------------------------------------------------------------------------


def test_model_state_load_failure_and_build_info_metrics(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "good", xy_config(), DOUBLE_MODEL)
    write_model(
        tmp_path,
        "bad",
        xy_config(),
        "class Model:\n    def initialize(self, args):\n        raise RuntimeError('no')\n",
    )
    server = start_server(tmp_path)
    url = server.metrics_url
    assert metric(url, "fastserve_model_state", model="good", version="1", state="ready") == 1.0
    assert metric(url, "fastserve_model_state", model="good", version="1", state="failed") == 0.0
    assert metric(url, "fastserve_model_state", model="bad", version="1", state="failed") == 1.0
    assert metric(url, "fastserve_model_state", model="bad", version="1", state="ready") == 0.0
    assert metric(url, "fastserve_model_load_failure_total", model="bad", version="1") == 1.0
    version = requests.get(f"{server.url}/v2", timeout=10).json()["version"]
    assert metric(url, "fastserve_build_info", version=version) == 1.0


def test_model_state_is_loading_while_the_load_runs(start_server, gated_repo: tuple[Path, Path]) -> None:
    repo, fifo = gated_repo
    server = start_server(repo, wait_loaded=False)
    url = server.metrics_url

    def state_of_slow(state: str) -> float | None:
        return metric(url, "fastserve_model_state", model="slow", version="1", state=state)

    wait_until(lambda: state_of_slow("loading") == 1.0, what="slow to be reported loading")
    assert state_of_slow("ready") == 0.0
    open_gate(fifo)
    wait_until(lambda: state_of_slow("ready") == 1.0, what="slow to be reported ready")
    assert state_of_slow("loading") == 0.0


# --- KServe V1 / TensorFlow Serving REST --------------------------------------------------------


def v2_outputs(url: str, rows: np.ndarray) -> np.ndarray:
    inputs = [{"name": "INPUT0", "datatype": "FP32", "shape": list(rows.shape), "data": rows.flatten().tolist()}]
    r = infer_json(url, "mlp", inputs)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def test_v1_predict_rows_and_columns_answer_as_v2(example_server: ServerProcess) -> None:
    rows = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    expected = v2_outputs(example_server.url, rows)
    url = f"{example_server.url}/v1/models/mlp:predict"
    r = requests.post(url, json={"signature_name": "serving_default", "instances": rows.tolist()}, timeout=10)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["predictions"], dtype=np.float32), expected, rtol=1e-6)
    r = requests.post(url, json={"inputs": {"INPUT0": rows.tolist()}}, timeout=10)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["outputs"], dtype=np.float32), expected, rtol=1e-6)
    named = requests.post(url, json={"instances": [{"INPUT0": row} for row in rows.tolist()]}, timeout=10)
    np.testing.assert_allclose(np.array(named.json()["predictions"], dtype=np.float32), expected, rtol=1e-6)
    versioned = requests.post(
        f"{example_server.url}/v1/models/mlp/versions/1:predict", json={"instances": rows.tolist()}, timeout=10
    )
    assert versioned.status_code == 200 and len(versioned.json()["predictions"]) == 3


def test_v1_model_status(example_server: ServerProcess) -> None:
    r = requests.get(f"{example_server.url}/v1/models/mlp", timeout=10)
    assert r.status_code == 200
    assert r.json() == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert requests.get(f"{example_server.url}/v1/models/mlp/versions/1", timeout=10).json() == r.json()


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v1/models/nope:predict", {"instances": [[1.0]]}, 404, "'nope'"),
        ("/v1/models/mlp:predict", {"instances": [[1.0] * 64, [1.0] * 63]}, 400, "rows must be alike"),
        ("/v1/models/mlp:predict", {"inputs": [[1.0] * 63]}, 400, "INPUT0"),
        ("/v1/models/mlp:predict", {"instances": [["a"] * 64]}, 400, "INPUT0"),
        ("/v1/models/mlp:predict", {"instances": []}, 400, "empty"),
        ("/v1/models/mlp:predict", {"rows": [[1.0] * 64]}, 400, "unexpected field 'rows'"),
        ("/v1/models/mlp:predict", {"inputs": {"NOPE": [[1.0] * 64]}}, 400, "unknown input"),
        ("/v1/models/mlp:classify", {"instances": [[1.0] * 64]}, 404, "only ':predict'"),
        ("/v1/models/mlp/versions/7:predict", {"instances": [[1.0] * 64]}, 404, "version 7"),
    ],
)
def test_v1_errors_are_tensorflow_servings_shape(
    example_server: ServerProcess, path: str, body: dict, status: int, says: str
) -> None:
    r = requests.post(example_server.url + path, json=body, timeout=10)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and says in r.json()["error"], r.text
    # The server keeps serving.
    assert requests.get(f"{example_server.url}/v1/models/mlp", timeout=10).status_code == 200


def test_v1_bodies_are_bounded_like_v2(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "m", xy_config(), DOUBLE_MODEL)
    server = start_server(tmp_path, "--max-body-bytes", "4096", "--max-json-depth", "8")
    url = f"{server.url}/v1/models/m:predict"
    big = requests.post(url, json={"instances": [[1.0, 2.0]] * 1000}, timeout=10)
    assert big.status_code == 413 and "error" in big.json()
    deep: object = [1.0, 2.0]
    for _ in range(10):
        deep = [deep]
    assert requests.post(url, json={"instances": deep}, timeout=10).status_code == 400
    bad_json = requests.post(url, data=b"{not json", timeout=10)
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    ok = requests.post(url, data=json.dumps({"instances": [[1.0, 2.0]]}), timeout=10)
    assert ok.json() == {"predictions": [[2.0, 4.0]]}

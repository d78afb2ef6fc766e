"""Prometheus metrics, the statistics API and logs, checked against a live server: exact counts
after known traffic, parsed with prometheus_client's real parser."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from conftest import ROOT, infer_json, write_model
from helpers import wait_until

CONFIG = """
    backend = "python"
    max_batch_size = 8
    [dynamic_batching]
    max_queue_delay_us = 60000000
    [[input]]
    name = "X"
    datatype = "FP32"
    dims = [1]
    [[output]]
    name = "Y"
    datatype = "FP32"
    dims = [1]
"""

MODEL = """
    import numpy as np

    class Model:
        def execute(self, inputs):
            x = inputs["X"]
            if (x < 0).any():
                raise ValueError("negative")
            return {"Y": x * 2}
"""


def scrape(url: str, accept: str | None = None) -> dict[str, list]:
    headers = {"Accept": accept} if accept else {}
    r = requests.get(url, headers=headers, timeout=10)
    assert r.status_code == 200
    families = {}
    for family in text_string_to_metric_families(r.text):
        families[family.name] = family.samples
    return families


def value(families: dict, sample_name: str, **labels: str) -> float:
    for s in (s for samples in families.values() for s in samples):
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {sample_name} {labels}")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path, "m", CONFIG, MODEL)
    return tmp_path


def rows(n: int, v: float = 1.0) -> list[dict]:
    return [{"name": "X", "shape": [n, 1], "datatype": "FP32", "data": [v] * n}]


def test_counters_histograms_and_stats_match_known_traffic(start_server, repo: Path) -> None:
    server = start_server(repo)
    url = server.url
    # 8 requests of 1 row each form exactly one batch of 8 (the batch is sent when full).
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: infer_json(url, "m", rows(1)), range(8)))
    assert all(a.status_code == 200 for a in answers)
    # Two requests of 4 rows: one batch of 8.
    with ThreadPoolExecutor(2) as pool:
        assert all(a.status_code == 200 for a in pool.map(lambda _: infer_json(url, "m", rows(4)), range(2)))
    # Failures of known kinds: 2 bad requests, 1 unknown model, 8 rows that make the model raise.
    assert infer_json(url, "m", [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]).status_code == 400
    assert infer_json(url, "m", [{"name": "Z", "shape": [1, 1], "datatype": "FP32", "data": [1]}]).status_code == 400
    assert infer_json(url, "nope", rows(1)).status_code == 404
    assert infer_json(url, "m", rows(8, -1.0)).status_code == 500

    f = scrape(server.metrics_url)
    labels = {"model": "m", "version": "1"}
    assert value(f, "fastserve_request_success_total", **labels) == 10
    assert value(f, "fastserve_request_failure_total", reason="bad_request", **labels) == 2
    assert value(f, "fastserve_request_failure_total", reason="model_error", **labels) == 1
    assert value(f, "fastserve_request_failure_total", reason="queue_full", **labels) == 0
    assert value(f, "fastserve_request_failure_total", model="", version="", reason="not_found") == 1
    assert value(f, "fastserve_inference_count_total", **labels) == 16, "rows of successful batches"
    assert value(f, "fastserve_execution_count_total", **labels) == 2
    assert value(f, "fastserve_pending_requests", **labels) == 0
    # The batch-size histogram saw exactly the two batches of 8.
    assert value(f, "fastserve_batch_size_count", **labels) == 2
    assert value(f, "fastserve_batch_size_sum", **labels) == 16
    assert value(f, "fastserve_batch_size_bucket", le="4", **labels) == 0
    assert value(f, "fastserve_batch_size_bucket", le="8", **labels) == 2
    assert value(f, "fastserve_request_duration_seconds_count", **labels) == 13
    assert value(f, "fastserve_queue_duration_seconds_count", **labels) == 10
    assert value(f, "fastserve_compute_infer_duration_seconds_count", **labels) == 10
    assert value(f, "fastserve_protocol_requests_total", protocol="http") == 14
    assert value(f, "fastserve_protocol_requests_total", protocol="grpc") == 0
    assert value(f, "fastserve_process_resident_memory_bytes") > 0
    assert not [name for name in f if name.startswith("fastserve_gpu_")] or has_gpu()

    stats = requests.get(f"{url}/v2/models/m/stats", timeout=10).json()
    (entry,) = stats["model_stats"]
    assert entry["name"] == "m" and entry["version"] == "1"
    assert entry["inference_count"] == 16 and entry["execution_count"] == 2
    inference = entry["inference_stats"]
    assert inference["success"]["count"] == 10
    assert inference["fail"]["count"] == 3
    assert inference["queue"]["count"] == 10
    assert inference["compute_infer"]["count"] == 10 and inference["compute_infer"]["ns"] > 0
    assert [b["batch_size"] for b in entry["batch_stats"]] == [8]
    assert entry["batch_stats"][0]["compute_infer"]["count"] == 2
    assert entry["last_inference"] > 0

    # tritonclient reads the same numbers, over HTTP and gRPC.
    grpc_stats = grpcclient.InferenceServerClient(server.grpc_address).get_inference_statistics("m", as_json=True)
    (g,) = grpc_stats["model_stats"]
    assert int(g["inference_count"]) == 16 and int(g["execution_count"]) == 2
    assert int(g["inference_stats"]["success"]["count"]) == 10
    assert int(g["inference_stats"]["fail"]["count"]) == 3
    assert int(g["inference_stats"]["compute_infer"]["ns"]) == inference["compute_infer"]["ns"]
    assert [int(b["batch_size"]) for b in g["batch_stats"]] == [8]
    client = httpclient.InferenceServerClient(server.address)
    assert client.get_inference_statistics("m")["model_stats"][0]["inference_count"] == 16
    assert client.get_inference_statistics("m", "1") == stats
    everything = client.get_inference_statistics()
    assert [s["name"] for s in everything["model_stats"]] == ["m"]
    assert requests.get(f"{url}/v2/models/nope/stats", timeout=10).status_code == 404


def has_gpu() -> bool:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


def test_gpu_metrics_absent_without_gpu(example_server) -> None:
    if has_gpu():
        pytest.skip("a GPU is present; covered by the GPU verification")
    f = scrape(f"http://127.0.0.1:{example_server.metrics_port}/metrics")
    assert not [name for name in f if "gpu" in name]
    assert "fastserve_cpu_utilization_ratio" in f or "fastserve_process_cpu_seconds" in f


def test_openmetrics_on_request(example_server) -> None:
    r = requests.get(
        f"http://127.0.0.1:{example_server.metrics_port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        timeout=10,
    )
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")
    plain = requests.get(f"http://127.0.0.1:{example_server.metrics_port}/metrics", timeout=10)
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert requests.get(f"http://127.0.0.1:{example_server.metrics_port}/other", timeout=10).status_code == 404


def test_pending_rises_under_load_and_returns_to_zero(start_server, tmp_path: Path) -> None:
    started, release = tmp_path / "started.fifo", tmp_path / "release.fifo"
    os.mkfifo(started)
    os.mkfifo(release)
    write_model(
        tmp_path,
        "gate",
        CONFIG.replace("max_batch_size = 8", "max_batch_size = 1"),
        f"""
        class Model:
            first = True

            def execute(self, inputs):
                if Model.first:
                    Model.first = False
                    with open("{started}", "w") as f:
                        f.write("x")
                    with open("{release}") as f:
                        f.read()
                return {{"Y": inputs["X"]}}
        """,
    )
    server = start_server(tmp_path)
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(infer_json, server.url, "gate", rows(1))
        with open(started) as f:  # the model holds its only instance
            f.read()
        rest = [pool.submit(infer_json, server.url, "gate", rows(1)) for _ in range(5)]
        # All five wait for the busy instance; observe it from the scrape rather than by timing.
        wait_until(
            lambda: value(scrape(server.metrics_url), "fastserve_pending_requests", model="gate", version="1") == 5,
            what="fastserve_pending_requests == 5",
        )
        with open(release, "w") as f:
            f.write("go")
        assert first.result().status_code == 200
        assert all(r.result().status_code == 200 for r in rest)
    assert value(scrape(server.metrics_url), "fastserve_pending_requests", model="gate", version="1") == 0


def test_access_log_lines_carry_the_request_id(start_server, repo: Path) -> None:
    server = start_server(repo, "--log-format", "json", "--access-log")
    r = requests.post(f"{server.url}/v2/models/m/infer", json={"id": "my-id-7", "inputs": rows(8)}, timeout=10)
    assert r.headers["X-Request-Id"] == "my-id-7"
    anonymous = infer_json(server.url, "m", rows(8))
    generated = anonymous.headers["X-Request-Id"]
    assert len(generated) == 16
    bad = infer_json(server.url, "nope", rows(1))
    # A request the model fails still ran in a batch: its line says how (the batch is sent when full).
    raised = requests.post(
        f"{server.url}/v2/models/m/infer", json={"id": "raised", "inputs": rows(8, -1.0)}, timeout=10
    )
    assert raised.status_code == 500
    # gRPC goes through the same pipeline: its failures are logged too, with their gRPC code.
    grpc = grpcclient.InferenceServerClient(server.grpc_address)
    x = grpcclient.InferInput("X", [8, 1], "FP32")  # a full batch: it runs without waiting
    x.set_data_from_numpy(np.ones((8, 1), dtype=np.float32))
    grpc.infer("m", [x], request_id="grpc-ok")
    wrong = grpcclient.InferInput("X", [1, 3], "FP32")
    wrong.set_data_from_numpy(np.ones((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException):
        grpc.infer("m", [wrong])
    assert server.terminate() == 0
    records = [json.loads(line) for line in server.lines if line.startswith("{")]
    access = [r for r in records if r.get("message") == "request"]
    by_id = {r["request_id"]: r for r in access}
    assert by_id["my-id-7"]["model"] == "m"
    assert by_id["my-id-7"]["version"] == 1
    assert by_id["my-id-7"]["status"] == 200
    assert by_id["my-id-7"]["protocol"] == "http"
    assert by_id["my-id-7"]["batch_size"] == 8
    assert {"queue_us", "compute_us", "duration_us"} <= by_id["my-id-7"].keys()
    assert by_id[generated]["status"] == 200
    assert by_id[bad.headers["X-Request-Id"]]["status"] == 404
    assert (by_id["raised"]["status"], by_id["raised"]["batch_size"]) == (500, 8)
    assert by_id["raised"]["compute_us"] > 0  # it ran: its figures are the real ones
    # The model's traceback is logged, and the failed batch with its request ids.
    raised_logs = [r for r in records if r.get("message") == "execute() raised"]
    assert raised_logs, "the model's exception is logged"
    assert all("negative" in r["error"] and 'raise ValueError("negative")' in r["traceback"] for r in raised_logs)
    assert all((r["model"], r["version"]) == ("m", 1) for r in raised_logs), "model and version are fields"
    assert any("raised" in r["request_ids"] for r in records if r.get("message") == "batch failed")
    ok = by_id["grpc-ok"]
    assert (ok["protocol"], ok["status"], ok["grpc_code"]) == ("grpc", 200, "Ok")
    failed = [r for r in access if r["protocol"] == "grpc" and r["grpc_code"] == "InvalidArgument"]
    assert len(failed) == 1 and failed[0]["status"] == 400


def test_python_logging_goes_through_the_same_sink(start_server, tmp_path: Path) -> None:
    write_model(
        tmp_path,
        "talker",
        CONFIG,
        """
        import logging

        class Model:
            def initialize(self, args):
                logging.getLogger("user.model").warning("hello from the model")

            def execute(self, inputs):
                return {"Y": inputs["X"]}
        """,
    )
    server = start_server(tmp_path, "--log-format", "json")
    server.wait_for_log("hello from the model")
    record = next(json.loads(line) for line in server.lines if "hello from the model" in line)
    assert record["level"] == "WARN" and record["logger"] == "user.model"


def test_dashboard_queries_only_existing_metrics(example_server) -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "fastserve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs
    names = {n for e in exprs for n in re.findall(r"\b(fastserve_[a-z_]+)", e)}
    # Traffic so every model series exists.
    x = np.zeros((1, 64), dtype=np.float32).ravel().tolist()
    infer_json(example_server.url, "mlp", [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": x}])
    text = requests.get(f"http://127.0.0.1:{example_server.metrics_port}/metrics", timeout=10).text
    exposed = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    gpu_optional = {n for n in names if n.startswith("fastserve_gpu_")}
    missing = {n for n in names - gpu_optional if n not in exposed}
    assert not missing, f"dashboard queries metrics the server does not expose: {missing}"


def test_metrics_can_be_turned_off(start_server, repo: Path) -> None:
    server = start_server(repo, "--no-metrics")
    assert server.metrics_port is None
    assert "metrics listening" not in server.log()
    # The statistics API still counts.
    assert infer_json(server.url, "m", rows(8)).status_code == 200
    stats = requests.get(f"{server.url}/v2/models/m/stats", timeout=10).json()
    assert stats["model_stats"][0]["inference_count"] == 8


def test_embedded_metrics_port() -> None:
    from fastserve import Server, Tensor

    class Echo:
        def execute(self, inputs):
            return {"Y": inputs["X"]}

    server = Server(http_port=0, metrics_port=0)
    server.add_model("e", Echo(), inputs=[Tensor("X", "FP32", [1])], outputs=[Tensor("Y", "FP32", [1])])
    with server:
        assert (
            infer_json(
                f"http://127.0.0.1:{server.http_port}",
                "e",
                [{"name": "X", "shape": [1], "datatype": "FP32", "data": [1]}],
            ).status_code
            == 200
        )
        f = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
        assert value(f, "fastserve_request_success_total", model="e", version="1") == 1


def test_otel_endpoint(start_server, repo: Path) -> None:
    """Default builds refuse --otel-endpoint clearly; builds with the otel feature export spans."""
    import http.server
    import subprocess
    import sys

    from fastserve import _core

    received: list[bytes] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    collector = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    endpoint = f"http://127.0.0.1:{collector.server_port}/v1/traces"
    if not _core.OTEL_AVAILABLE:
        cmd = [sys.executable, "-m", "fastserve", "serve", "--model-repository", str(repo), "--otel-endpoint", endpoint]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2
        assert "no OpenTelemetry support" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        collector.server_close()
        return
    import threading

    threading.Thread(target=collector.serve_forever, daemon=True).start()
    server = start_server(repo, "--otel-endpoint", endpoint)
    assert infer_json(server.url, "m", rows(8)).status_code == 200
    assert server.terminate() == 0  # flushes buffered spans on the way out
    collector.shutdown()
    assert any(b"infer" in body and b"fastserve" in body for body in received)

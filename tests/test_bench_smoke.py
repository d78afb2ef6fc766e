"""Smoke test of the benchmark harness (benches/run.py). It checks that the harness works, never how
fast anything is.

The end-to-end test builds the load generator in debug (it shares its dependencies with the core
crate that `cargo test` has just built, so this is quick); benchmarks proper always use a release
build. The harness's Python pieces (server start/stop and port parsing, statistics, the no-batching
repository copy, the in-process ceiling, the report) are exercised on their own too.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from conftest import ROOT

RUN_PY = ROOT / "benches" / "run.py"


def load_run():
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_harness_pieces(tmp_path: Path) -> None:
    run = load_run()
    repo = run.no_batching_repository(tmp_path)
    assert "max_batch_size = 0" in (repo / "mlp" / "config.toml").read_text()
    with run.started(run.NO_BATCH, repo) as server:
        assert server.http_port and server.grpc_port
        assert run.http_status(server.url + "/v2/health/ready") == 200
        stats = run.model_stats(server.url)
        assert stats["inference_count"] == 0
    assert server.proc.poll() is not None  # stopped on leaving the block

    ceiling = run.measure_ceiling(0.05, [1, 4])
    assert ceiling["ort_single_row_runs_per_s"] > 0 and ceiling["ort_json_rows_per_s"] > 0
    assert set(ceiling["ort_batched_rows_per_s"]) == {1, 4}

    point = {
        "server": run.FASTSERVE,
        "protocol": "binary",
        "concurrency": 64,
        "rows": 1,
        "requests_per_s": 100.0,
        "rows_per_s": 100.0,
        "errors": 0,
        "latency_us": {"p50": 100, "p90": 150, "p99": 200, "max": 300},
        "stats": {"mean_batch": 2.0},
    }
    run.annotate([point], {64: ceiling})
    assert point["ceiling_rows_per_s"] > 0 and point["p99_over_p50"] == 2.0
    assert "| fastserve | binary | 64 | 1 |" in run.markdown_table([point])
    targets = run.evaluate_targets([point], {64: ceiling}, None)
    assert any(t["target"].startswith("binary @64") for t in targets)

    # A "@before" twin (--before-python) is paired with its server point by point.
    assert run.before_after_markdown([point]) == ""
    before = {**point, "server": run.FASTSERVE + run.BEFORE, "requests_per_s": 50.0}
    run.annotate([point, before], {64: ceiling})
    assert before["ceiling_rows_per_s"] == point["ceiling_rows_per_s"]
    assert "| fastserve | binary | 64 | 1 | 50 | 100 | 2.00 |" in run.before_after_markdown([point, before])


def test_floor_and_defaults_servers(tmp_path: Path) -> None:
    """The serving floor answers the mlp's interface, the defaults copy has no config.toml, and the
    gRPC message h2load would send is one the server answers."""
    run = load_run()
    assert not (run.defaults_repository(tmp_path) / "mlp" / "config.toml").exists()
    with run.started(run.FLOOR, run.floor_repository(tmp_path)) as server:
        run.check_grpc_body(server, run.grpc_infer_body())
        assert run.model_stats(server.url)["inference_count"] == 1
        cpu = run.cpu_seconds(server.proc.pid)
        assert cpu is not None and cpu > 0


def debug_loadgen(run) -> Path:
    """The loadgen and the transport floor, built in debug (benchmarks proper use release)."""
    subprocess.run(["cargo", "build", "-q", "-p", "fastserve-loadgen"], cwd=ROOT, check=True, timeout=1200)
    return run.target_dir() / "debug" / "fastserve-loadgen"


def test_transport_floors_answer_as_the_mlp(tmp_path: Path) -> None:
    """Both transport floors answer the mlp's JSON request and the gRPC message h2load would send
    (the tonic one decoding it), so the clients count real answers; bad arguments are refused."""
    run = load_run()
    binary = run.transport_floor_path(debug_loadgen(run))
    request = run.request_body().encode()
    for name in run.TRANSPORTS:
        with run.started(name, binary) as server:
            assert server.http_port and server.grpc_port
            run.check_grpc_body(server, run.grpc_infer_body())
            post = urllib.request.Request(f"{server.url}/v2/models/mlp/infer", data=request, method="POST")
            with urllib.request.urlopen(post, timeout=10) as reply:
                assert json.loads(reply.read())["outputs"][0]["shape"] == [1, 10]
        assert server.proc.poll() is not None
    done = subprocess.run([str(binary), "--grpc-server", "other"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage" in done.stderr


def test_quick_run_end_to_end(tmp_path: Path) -> None:
    run = load_run()
    loadgen = debug_loadgen(run)
    cmd = [sys.executable, str(RUN_PY), "--quick", "--skip-build", "--loadgen", str(loadgen)]
    cmd += ["--servers", f"fastserve,{run.TRANSPORT}", "--protocols", "http,binary,grpc", "--concurrency", "2"]
    cmd += ["--duration-s", "0.5", "--warmup-s", "0.2", "--ceiling-s", "0.05", "--no-plot", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "latest.json").read_text())
    assert {(p["server"], p["protocol"]) for p in result["points"]} == {
        ("fastserve", "http"),
        ("fastserve", "binary"),
        ("fastserve", "grpc"),
        # The transport floor answers JSON, not the binary extension.
        (run.TRANSPORT, "http"),
        (run.TRANSPORT, "grpc"),
    }
    for p in result["points"]:
        assert p["requests"] > 0 and p["rows_per_s"] > 0, p
        assert p["errors"] == 0, p["error_samples"]
    report = (tmp_path / "latest.md").read_text()
    assert "| fastserve | grpc | 2 | 1 |" in report and f"| {run.TRANSPORT} | grpc | 2 | 1 |" in report

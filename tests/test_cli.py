"""The `fastserve` command line: usage errors, logging formats, startup reporting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import requests

from conftest import EXAMPLES


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastserve", *args], capture_output=True, text=True, timeout=120)


def test_unknown_flag_is_one_line_and_exit_2() -> None:
    r = run("serve", "--model-repository", str(EXAMPLES), "--no-such-flag")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["fastserve: error: unrecognized arguments: --no-such-flag"]


def test_missing_repository_is_exit_2(tmp_path: Path) -> None:
    r = run("serve", "--model-repository", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"fastserve: error: model repository '{tmp_path / 'nope'}' is not a directory"
    ]


def test_missing_required_flag_is_exit_2() -> None:
    r = run("serve")
    assert r.returncode == 2
    assert "--model-repository" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_console_script_and_version() -> None:
    r = subprocess.run(["fastserve", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert r.stdout.startswith("fastserve ")


def test_port_in_use_is_a_clear_failure(example_server) -> None:
    r = run("serve", "--model-repository", str(EXAMPLES), "--http-port", str(example_server.port))
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{example_server.port}" in r.stderr


def test_grpc_port_in_use_is_a_clear_failure(example_server) -> None:
    r = run(
        "serve", "--model-repository", str(EXAMPLES), "--http-port", "0", "--grpc-port", str(example_server.grpc_port)
    )
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{example_server.grpc_port}" in r.stderr


def test_invalid_grpc_flags_are_exit_2() -> None:
    r = run("serve", "--model-repository", str(EXAMPLES), "--grpc-port", "70000")
    expected = "fastserve: error: --grpc-port must be between 0 and 65535, got 70000"
    assert (r.returncode, r.stderr.strip()) == (2, expected)
    r = run("serve", "--model-repository", str(EXAMPLES), "--grpc-max-message-bytes", "0")
    assert (r.returncode, r.stderr.strip()) == (2, "fastserve: error: --grpc-max-message-bytes must be positive")


def test_json_logs_parse_and_report_models(start_server) -> None:
    server = start_server(EXAMPLES, "--log-format", "json")
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    assert server.terminate() == 0
    records = [json.loads(line) for line in server.lines if line.strip()]
    messages = [r["message"] for r in records]
    loaded = "loaded model 'mlp' version 1 (onnxruntime_onnx, max_batch_size 64, 1 instance(s)) in "
    assert any(m.startswith(loaded) for m in messages), messages
    assert any(r["message"] == "HTTP listening" and r["address"].startswith("http://127.0.0.1:") for r in records)
    assert any(r["message"] == "gRPC listening" and r["address"] == server.grpc_address for r in records)
    assert all({"timestamp", "level"} <= r.keys() for r in records)


def test_listens_on_loopback_by_default(example_server) -> None:
    assert "address=http://127.0.0.1:" in example_server.log()
    assert f"gRPC listening address=127.0.0.1:{example_server.grpc_port}" in example_server.log()


def test_the_command_alone_lists_its_commands() -> None:
    r = run()
    assert r.returncode == 0
    assert "serve" in r.stdout and "COMMAND" in r.stdout

"""The first hour with fastserve (issue #21): what the server says while it starts, how strict it
is about failed models, config errors with "did you mean", skipped directories with their fix, the
check/list/config commands, and the embedding API's logging, serve_forever and add_model errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import requests
from fastserve import ConfigError, Server, Tensor
from fastserve.cli import build_parser
from fastserve.config import parse_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from conftest import DOUBLE_MODEL, EXAMPLES, ROOT, write_model, xy_config

GUARD_S = 120  # a hang guard only: every wait below ends on an event

# initialize() blocks until the test writes to the FIFO named by [parameters] gate: the load lasts
# exactly as long as the test wants, with no timing involved.
GATED_MODEL = """
    class Model:
        def initialize(self, args):
            with open(args["parameters"]["gate"]) as gate:
                gate.read()

        def execute(self, inputs):
            return {"Y": inputs["X"] * 2}
"""

BROKEN_MODEL = """
    raise RuntimeError("cannot import me")
"""


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastserve", *args],
        capture_output=True,
        text=True,
        timeout=GUARD_S,
        env={**os.environ, **(env or {})},
    )


def serve(repo: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    ports = ("--http-port", "0", "--grpc-port", "0", "--metrics-port", "0")
    return run("serve", "--model-repository", str(repo), *ports, *extra, env=env)


@pytest.fixture
def mixed_repo(tmp_path: Path) -> Path:
    """One model that loads and one whose model.py fails."""
    repo = tmp_path / "repo"
    write_model(repo, "good", xy_config(), DOUBLE_MODEL)
    write_model(repo, "broken", xy_config(), BROKEN_MODEL)
    return repo


# -- startup: banner, early listening, per-model lines ---------------------------------------------


def test_listens_and_reports_while_a_slow_model_loads(start_server, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    write_model(repo, "slow", xy_config(f'[parameters]\ngate = "{gate}"'), GATED_MODEL)
    server = start_server(repo, wait_loaded=False)
    try:
        server.wait_for_log("loading model 'slow' version 1", timeout=GUARD_S)
        banner = re.search(
            r"fastserve \S+: model repository '(.+)' \(control mode none\); listening on (.+)", server.log()
        )
        assert banner is not None, server.log()
        assert banner.group(1) == str(repo)
        assert f"HTTP 127.0.0.1:{server.port}" in banner.group(2)
        assert f"gRPC 127.0.0.1:{server.grpc_port}" in banner.group(2)
        assert f"metrics 127.0.0.1:{server.metrics_port}" in banner.group(2)
        # The model is still inside initialize(): live, not ready, and the answer says why.
        assert requests.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
        ready = requests.get(f"{server.url}/v2/health/ready", timeout=10)
        assert ready.status_code == 400
        assert "the startup models are still loading (now: 'slow' version 1)" in ready.json()["error"]
    finally:
        with open(gate, "w") as g:  # opening unblocks the model's read; closing ends it
            g.write("go")
    server.wait_for_log("model version(s) ready", timeout=GUARD_S)
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    assert re.search(
        r"loaded model 'slow' version 1 \(python, max_batch_size 8, 1 instance\(s\)\) in \d+\.\d\d s", server.log()
    )
    assert "1 model version(s) ready, 0 failed" in server.log()


def test_ready_answer_lists_the_failed_models(start_server, mixed_repo: Path) -> None:
    server = start_server(mixed_repo)
    assert re.search(r"model 'broken' version 1 failed to load after \d+\.\d\d s: model.py raised", server.log())
    assert "1 model version(s) ready, 1 failed" in server.log()
    ready = requests.get(f"{server.url}/v2/health/ready", timeout=10)
    assert ready.status_code == 400
    error = ready.json()["error"]
    assert "'broken' version 1" in error and "cannot import me" in error, error
    assert "'good'" not in error


def test_an_empty_repository_warns(start_server, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    server = start_server(tmp_path / "empty")
    assert "the model repository" in server.log() and "has no models" in server.log()
    assert "0 model version(s) ready, 0 failed" in server.log()


def test_a_port_in_use_names_its_flag(example_server) -> None:
    r = run(
        "serve", "--model-repository", str(EXAMPLES), "--http-port", "0", "--grpc-port", str(example_server.grpc_port)
    )
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{example_server.grpc_port} (--grpc-port)" in r.stderr


# -- strictness -------------------------------------------------------------------------------------


def test_exit_on_error_exits_1_when_a_model_fails(mixed_repo: Path) -> None:
    r = serve(mixed_repo, "--exit-on-error")
    assert r.returncode == 1, r.stderr
    assert "exiting (--exit-on-error): model 'broken' version 1 failed to load" in r.stderr
    r = serve(mixed_repo, env={"FASTSERVE_EXIT_ON_ERROR": "true"})
    assert r.returncode == 1, r.stderr


def test_exit_on_error_serves_when_every_model_loads(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "good", xy_config(), DOUBLE_MODEL)
    server = start_server(tmp_path, "--exit-on-error=true")
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    assert server.terminate() == 0


def test_strict_readiness_false_is_ready_despite_a_failed_model(start_server, mixed_repo: Path) -> None:
    server = start_server(mixed_repo, "--strict-readiness", "false")
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/v2/models/broken/ready", timeout=10).status_code == 400
    assert requests.get(f"{server.url}/v2/models/good/ready", timeout=10).status_code == 200
    assert "--strict-readiness false" in server.log()
    parse = "import fastserve.cli as c; print(c.build_parser().parse_args(['serve', '--model-repository', '.']))"
    relaxed_by_env = subprocess.run(
        [sys.executable, "-c", parse],
        capture_output=True,
        text=True,
        timeout=GUARD_S,
        env={**os.environ, "FASTSERVE_STRICT_READINESS": "0"},
    )
    assert "strict_readiness=False" in relaxed_by_env.stdout, relaxed_by_env.stderr


def test_strict_readiness_flag_refuses_a_non_boolean() -> None:
    r = run("serve", "--model-repository", str(EXAMPLES), "--strict-readiness", "maybe")
    assert r.returncode == 2
    assert "--strict-readiness" in r.stderr and "'maybe'" in r.stderr


# -- config errors ----------------------------------------------------------------------------------


def problems_of(table: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(table)
    return e.value.problems


def test_every_config_problem_is_reported_at_once_with_did_you_mean() -> None:
    problems = problems_of(
        {
            "max_batch_sise": 4,
            "dynamic_batching": {"preferred_batch_size": [4], "max_queue_delay_us": "soon"},
            "instance_group": {"count": 0},
            "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [2]}],
            "output": [{"name": "Y", "datatype": "TYPE_STRING"}],
        }
    )
    assert problems == [
        "unknown key(s) in config.toml: max_batch_sise (did you mean max_batch_size?)",
        "[dynamic_batching] max_queue_delay_us must be an integer, got 'soon'",
        "unknown key(s) in [dynamic_batching]: preferred_batch_size (did you mean preferred_batch_sizes?)",
        "[instance_group] count must be >= 1 and <= 1024, got 0",
        'unknown key(s) in [[input]] entry 0: data_type (did you mean datatype = "FP32"?)',
        '[[output]] entry 0: datatype "TYPE_STRING" is config.pbtxt\'s spelling; did you mean datatype = "BYTES"?',
    ]


def test_a_single_problem_keeps_its_plain_message() -> None:
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) in \[routing\]: label \(did you mean labels\?\)$"):
        parse_config({"routing": {"label": {"stable": 1}}})
    with pytest.raises(ConfigError, match=r"backend must be one of .*, got 'onnx_runtime'; did you mean 'onnxruntime'"):
        parse_config({"backend": "onnx_runtime"})


def test_a_typo_in_a_backends_parameters_is_an_error_python_parameters_are_free() -> None:
    problems = problems_of({"backend": "onnxruntime", "parameters": {"intra_op_num_thread": 2}})
    assert problems == [
        "[parameters] intra_op_num_thread is not a parameter of the onnxruntime backend; "
        "did you mean intra_op_num_threads?"
    ]
    assert problems_of({"backend": "openvino", "parameters": {"performance_hints": "LATENCY"}}) == [
        "[parameters] performance_hints is not a parameter of the openvino backend; did you mean performance_hint?"
    ]
    assert parse_config({"backend": "python", "parameters": {"intra_op_num_thread": 2}}).parameters


def test_a_parameter_typo_fails_the_load_of_a_detected_backend(start_server, tmp_path: Path) -> None:
    # No backend key: the backend is known only from model.onnx, at load.
    shutil.copytree(EXAMPLES / "mlp", tmp_path / "mlp")
    (tmp_path / "mlp" / "config.toml").write_text("max_batch_size = 8\n[parameters]\ninter_op_num_thread = 1\n")
    server = start_server(tmp_path)
    ready = requests.get(f"{server.url}/v2/models/mlp/ready", timeout=10)
    assert ready.status_code == 400
    assert "did you mean inter_op_num_threads?" in server.log()


def test_all_problems_reach_the_log_and_the_models_ready_answer(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "typos", xy_config("preferred_batch_size = [2]\nexecution_timeout = 5"), DOUBLE_MODEL)
    server = start_server(tmp_path)
    error = requests.get(f"{server.url}/v2/models/typos/ready", timeout=10).json()["error"]
    assert "unknown key(s) in config.toml: execution_timeout (did you mean execution_timeout_ms?), " in error
    assert "preferred_batch_size (did you mean [dynamic_batching] preferred_batch_sizes?)" in error
    assert "model 'typos' version 1 failed to load" in server.log()


# -- skipped directories ----------------------------------------------------------------------------


def test_skipped_directories_are_logged_with_the_fix(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "good", xy_config(), DOUBLE_MODEL)
    write_model(tmp_path, "bad name!", xy_config(), DOUBLE_MODEL)
    (tmp_path / "noversion").mkdir()
    (tmp_path / "noversion" / "config.toml").write_text('backend = "python"\n')
    (tmp_path / "nofile" / "1").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    server = start_server(tmp_path)
    log = server.log()
    assert re.search(r"ignoring directory '.*bad name!': not a valid model name .*; rename the directory", log)
    assert ".git" not in log
    assert "model 'noversion' version 1 failed to load" in log
    assert "no numeric version directories: put the model's files in 'noversion/1/'" in log
    assert "no model file found (expected model.onnx, model.xml or model.py)" in log
    assert "1 model version(s) ready, 2 failed" in log


def test_a_repository_that_is_a_model_directory_says_how_to_serve_it(start_server, tmp_path: Path) -> None:
    model = write_model(tmp_path, "double", xy_config(), DOUBLE_MODEL)
    server = start_server(model)
    assert (
        f"ignoring directory '{model}': the model repository looks like a model directory (it holds config.toml); "
        "use --model-name NAME to serve it as the one model NAME, or point --model-repository at its parent"
    ) in server.log()
    assert "0 model version(s) ready, 0 failed" in server.log()
    r = run("check", "--model-repository", str(model))
    assert r.returncode == 1 and "looks like a model directory" in r.stdout
    assert run("check", "--model-repository", str(model), "--model-name", "double").returncode == 0


# -- check, list, config ----------------------------------------------------------------------------


@pytest.fixture
def repo_for_commands(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLES / "mlp", repo / "mlp")
    write_model(repo, "double", xy_config("[dynamic_batching]\npreferred_batch_sizes = [4]"), DOUBLE_MODEL)
    triton = repo / "triton_double"
    (triton / "1").mkdir(parents=True)
    (triton / "1" / "model.py").write_text(textwrap.dedent(DOUBLE_MODEL))
    (triton / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 4\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
    )
    return repo


def test_check_passes_a_good_repository(repo_for_commands: Path) -> None:
    r = run("check", "--model-repository", str(repo_for_commands))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "model 'mlp': ok (config.toml; version(s) 1 (onnxruntime))" in r.stdout
    assert "model 'triton_double': ok (config.pbtxt; version(s) 1 (python))" in r.stdout
    assert r.stdout.strip().endswith("3 model(s) checked, 0 problem(s)")
    loaded = run("check", "--model-repository", str(repo_for_commands), "--load")
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "loaded: 3 model version(s) ready, 0 failed" in loaded.stdout


def test_check_lists_every_problem_and_exits_1(repo_for_commands: Path) -> None:
    (repo_for_commands / "double" / "config.toml").write_text(
        xy_config("max_batch_sise = 4\n[dynamic_batching]\npreferred_batch_size = [4]")
    )
    (repo_for_commands / "empty" / "1").mkdir(parents=True)
    write_model(repo_for_commands, "bad name", xy_config(), DOUBLE_MODEL)
    r = run("check", "--model-repository", str(repo_for_commands))
    assert r.returncode == 1
    out = r.stdout
    assert "model 'double': 2 problem(s) (config.toml)" in out
    assert "  error: unknown key(s) in config.toml: max_batch_sise (did you mean max_batch_size?)" in out
    assert "preferred_batch_size (did you mean preferred_batch_sizes?)" in out
    assert "model 'empty': 1 problem(s)" in out and "version 1: no model file found" in out
    assert re.search(r"error: ignoring directory '.*bad name': not a valid model name", out)
    assert out.strip().endswith("4 model(s) checked, 4 problem(s)")
    # --load finds what only loading can: model.py raising on import.
    (repo_for_commands / "double" / "config.toml").write_text(xy_config())
    shutil.rmtree(repo_for_commands / "empty")
    shutil.rmtree(repo_for_commands / "bad name")
    (repo_for_commands / "double" / "1" / "model.py").write_text(textwrap.dedent(BROKEN_MODEL))
    assert run("check", "--model-repository", str(repo_for_commands)).returncode == 0
    loaded = run("check", "--model-repository", str(repo_for_commands), "--load")
    assert loaded.returncode == 1
    assert "model 'double' version 1: load failed: model.py raised RuntimeError: cannot import me" in loaded.stdout


def test_check_usage_errors_exit_2(tmp_path: Path) -> None:
    r = run("check", "--model-repository", str(tmp_path / "nope"))
    assert r.returncode == 2 and "is not a directory" in r.stderr


def test_list_shows_versions_backends_and_batching(repo_for_commands: Path) -> None:
    r = run("list", "--model-repository", str(repo_for_commands))
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    assert lines[0] == ["MODEL", "VERSIONS", "BACKEND", "MAX_BATCH", "BATCHING", "CONFIG"]
    rows = {line[0]: line for line in lines[1:]}
    assert rows["mlp"][:4] == ["mlp", "1", "onnxruntime", "64"]
    assert " ".join(rows["double"]).startswith("double 1 python 8 dynamic (delay 0 us, preferred [4]) config.toml")
    assert rows["triton_double"] == ["triton_double", "1", "python", "4", "none", "config.pbtxt"]
    as_json = json.loads(run("list", "--model-repository", str(repo_for_commands), "--format", "json").stdout)
    assert as_json[0] == {
        "model": "double",
        "versions": [1],
        "backend": "python",
        "max_batch_size": 8,
        "batching": "dynamic (delay 0 us, preferred [4])",
        "config": "config.toml",
        "problems": 0,
    }


def test_config_prints_the_effective_configuration(repo_for_commands: Path) -> None:
    r = run("config", "--model-repository", str(repo_for_commands), "triton_double", "--format", "json")
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)
    assert table["backend"] == "python" and table["max_batch_size"] == 4
    assert table["input"] == [{"name": "X", "datatype": "FP32", "dims": [2]}]
    assert table["instance_group"] == {"count": 1, "kind": "cpu", "isolation": "thread"}
    assert table["version_policy"] == {"latest": 1}
    toml = run("config", "--model-repository", str(repo_for_commands), "double")
    assert toml.returncode == 0, toml.stderr
    assert toml.stdout.startswith("# effective configuration of model 'double' (config.toml plus defaults)\n")
    as_json = run("config", "--model-repository", str(repo_for_commands), "double", "--format", "json").stdout
    assert tomllib.loads(toml.stdout) == json.loads(as_json), "TOML and JSON say the same"
    assert json.loads(as_json)["dynamic_batching"]["preferred_batch_sizes"] == [4]


def test_config_of_a_missing_or_broken_model_exits_1(repo_for_commands: Path) -> None:
    r = run("config", "--model-repository", str(repo_for_commands), "nope")
    assert r.returncode == 1 and "model 'nope' is not a directory" in r.stderr
    (repo_for_commands / "double" / "config.toml").write_text("max_batch_sise = 4\n")
    r = run("config", "--model-repository", str(repo_for_commands), "double")
    assert r.returncode == 1
    assert "did you mean max_batch_size?" in r.stderr


def test_the_command_alone_lists_every_command() -> None:
    r = run()
    assert r.returncode == 0
    for command in ("serve", "check", "list", "config", "convert-config"):
        assert re.search(rf"^\s+{command}\s", r.stdout, re.M), r.stdout


def test_the_readme_synopsis_lists_every_flag_of_every_command() -> None:
    readme = (ROOT / "README.md").read_text()
    synopsis = readme.split("## The `fastserve` command", 1)[1].split("```", 2)[1]
    commands = next(a for a in build_parser(environ={})._actions if a.dest == "command").choices
    assert isinstance(commands, dict)
    missing = [
        f"{name} {option}"
        for name, command in commands.items()
        for action in command._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help" and option not in synopsis
    ]
    assert missing == []
    assert all(f"fastserve {name}" in synopsis for name in commands)


def test_json_logs_name_the_model_in_fields(start_server, mixed_repo: Path) -> None:
    server = start_server(mixed_repo, "--log-format", "json")
    assert server.terminate() == 0
    records = [json.loads(line) for line in server.lines if line.strip()]
    loaded = [r for r in records if r["message"].startswith("loaded model 'good'")]
    assert [(r["model"], r["version"]) for r in loaded] == [("good", 1)]
    failed = [r for r in records if "failed to load" in r["message"]]
    assert [(r["model"], r["version"], r["level"]) for r in failed] == [("broken", 1, "ERROR")]
    loading = [r for r in records if r["message"].startswith("loading model")]
    assert {(r["model"], r["version"]) for r in loading} == {("good", 1), ("broken", 1)}


# -- embedding API ----------------------------------------------------------------------------------

EMBEDDED = """
import numpy as np
from fastserve import Server, Tensor

class Double:
    def execute(self, inputs):
        return {"Y": inputs["X"] * 2}

server = Server(http_port=0, access_log=True)
server.add_model("double", Double(), inputs=[Tensor("X", "FP32", [-1])], outputs=[Tensor("Y", "FP32", [-1])])
server.start()
print(server.http_port, flush=True)
print("abandoned", server.serve_forever(), flush=True)
"""


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_forever_logs_without_setup_and_stops_on_a_signal(stop: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-c", EMBEDDED], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        port = int(proc.stdout.readline())
        body = {"inputs": [{"name": "X", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
        r = requests.post(f"http://127.0.0.1:{port}/v2/models/double/infer", json=body, timeout=10)
        assert r.json()["outputs"][0]["data"] == [2, 4]
        lines: list[str] = []
        seen = threading.Event()

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if "model=double" in line and "status=200" in line:
                    seen.set()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        assert seen.wait(GUARD_S), "no access log line without any logging set-up:\n" + "".join(lines)
        proc.send_signal(stop)
        assert proc.wait(timeout=GUARD_S) == 0
        reader.join(timeout=GUARD_S)
        assert proc.stdout.read().strip() == "abandoned 0"
        assert any(f"received {stop.name}, draining" in line for line in lines), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_add_model_without_execute_says_so() -> None:
    class Bad:
        def run(self, inputs: dict) -> dict:
            return inputs

    io = {"inputs": [Tensor("X", "FP32", [-1])], "outputs": [Tensor("Y", "FP32", [-1])]}
    server = Server(http_port=0)
    with pytest.raises(TypeError, match=r"model 'm': class Bad has no execute\(inputs\) method"):
        server.add_model("m", Bad, **io)
    with pytest.raises(TypeError, match=r"model 'm': Bad has no execute\(inputs\) method"):
        server.add_model("m", Bad(), **io)
    with pytest.raises(TypeError, match=r"model 'm': Bad has no execute\(inputs\) method"):
        server.add_model("m", lambda: Bad(), **io)
    assert server.models() == []

"""Every numeric config.toml key has a documented range (config.RANGES); a value outside it fails
only that model's load, never the server, whether it comes from config.toml at start, from a poll
or from a load API override. Integers may arrive quoted, as protobuf's JSON mapping writes them
(issue #14)."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import requests
from fastserve.config import RANGES, ConfigError, Routing, Warmup, parse_config, ranges_markdown
from fastserve.tensor import Tensor

from conftest import EXAMPLES, write_model, xy_config
from helpers import wait_until

DOUBLE = """
    class Model:
        def execute(self, inputs):
            return {"Y": inputs["X"] * 2}
"""


def config_with(path: str, value: Any) -> dict[str, Any]:
    """The smallest config that sets the key of RANGES ``path`` to ``value``."""
    table, _, key = path.partition(".")
    key = key.removesuffix("[]")
    if table in ("max_batch_size", "execution_timeout_ms", "max_abandoned_instances", "max_instance_failures"):
        return {table: value}
    if path == "dynamic_batching.default_priority_level":
        return {"dynamic_batching": {"priority_levels": 1024, key: value}}
    if path == "instance_group.gpus[]":
        return {"instance_group": {"kind": "gpu", "gpus": [value]}}
    if table in ("input", "output"):
        return {table: [{"name": "T", "datatype": "FP32", "dims": [value]}]}
    if path == "routing.labels.*":
        return {"routing": {"labels": {"stable": value}}}
    if path == "routing.weights.*":
        return {"routing": {"weights": {"1": value, "2": 1}}}
    if path == "warmup.dims.*[]":
        return {"warmup": [{"dims": {"X": [value]}}]}
    if table == "warmup":
        return {"warmup": [{key: value}]}
    return {table: {key: [value] if path.endswith("[]") else value}}


CONFIG_RANGES = [p for p in RANGES if not p.startswith("parameters.")]


@pytest.mark.parametrize("path", CONFIG_RANGES)
def test_every_range_admits_its_ends_and_refuses_beyond(path: str) -> None:
    bounds = RANGES[path]
    parse_config(config_with(path, bounds.low))
    parse_config(config_with(path, bounds.high))
    for outside in (bounds.low - 1, bounds.high + 1):
        with pytest.raises(ConfigError, match=f">= {bounds.low} and <= {bounds.high}"):
            parse_config(config_with(path, outside))


def test_relations_between_keys() -> None:
    with pytest.raises(ConfigError, match=r"preferred_batch_sizes: 16 exceeds max_batch_size 8"):
        parse_config({"max_batch_size": 8, "dynamic_batching": {"preferred_batch_sizes": [4, 16]}})
    with pytest.raises(ConfigError, match=r"batch_size must be >= 1 and <= max\(1, max_batch_size\) = 4, got 5"):
        parse_config({"max_batch_size": 4, "warmup": [{"batch_size": 5}]})
    parse_config({"max_batch_size": 0, "warmup": [{"batch_size": 1}]})
    with pytest.raises(ConfigError, match="count x GPUs must be <= 1024 instances, got 2048"):
        parse_config({"instance_group": {"kind": "gpu", "count": 1024, "gpus": [0, 1]}})


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"max_batch_size": "16"}, "max_batch_size", 16),
        ({"execution_timeout_ms": "-0"}, "execution_timeout_ms", 0),
        ({"dynamic_batching": {"max_queue_size": "9"}}, "dynamic_batching.max_queue_size", 9),
        ({"dynamic_batching": {"preferred_batch_sizes": ["2", 4]}}, "dynamic_batching.preferred_batch_sizes", [2, 4]),
        ({"version_policy": {"specific": [str(2**63 - 1)]}}, "version_policy.specific", [2**63 - 1]),
        ({"input": [{"name": "T", "datatype": "FP32", "dims": ["-1", "3"]}]}, "inputs", [Tensor("T", "FP32", [-1, 3])]),
        ({"routing": {"labels": {"stable": "2"}, "weights": {"2": "5"}}}, "routing", Routing({"stable": 2}, {2: 5})),
        ({"warmup": [{"count": "2", "dims": {"X": ["3"]}}]}, "warmup", [Warmup(count=2, dims={"X": [3]})]),
    ],
)
def test_quoted_integers_are_integers(data: dict, key: str, expected: Any) -> None:
    value: Any = parse_config(data)
    for attribute in key.split("."):
        value = getattr(value, attribute)
    assert value == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_batch_size": True}, "max_batch_size must be an integer, got True"),
        ({"max_batch_size": "16.0"}, "max_batch_size must be an integer, got '16.0'"),
        ({"max_batch_size": " 16"}, "max_batch_size must be an integer"),
        ({"max_batch_size": "0x10"}, "max_batch_size must be an integer"),
        ({"max_batch_size": "１６"}, "max_batch_size must be an integer"),  # noqa: RUF001 (fullwidth digits)
        ({"max_batch_size": 16.0}, "max_batch_size must be an integer"),
        ({"max_batch_size": "9" * 5000}, "max_batch_size must be >= 0 and <= 1048576"),
        ({"dynamic_batching": {"preferred_batch_sizes": [True]}}, "preferred_batch_sizes must be a list of integers"),
        ({"dynamic_batching": {"preferred_batch_sizes": ["two"]}}, "preferred_batch_sizes must be a list of integers"),
        ({"routing": {"weights": {"1": False}}}, "weight of version 1 must be an integer"),
    ],
)
def test_other_strings_and_booleans_are_refused(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_the_readme_table_covers_every_range() -> None:
    table = ranges_markdown()
    for path, bounds in RANGES.items():
        assert f"| `{path}` | {bounds.low:,} | {bounds.high:,} |" in table


def test_an_out_of_range_config_fails_only_its_model(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "good", xy_config(), DOUBLE)
    write_model(tmp_path, "huge", xy_config().replace("max_batch_size = 8", "max_batch_size = 1000000000"), DOUBLE)
    server = start_server(tmp_path)
    r = requests.post(
        f"{server.url}/v2/models/good/infer",
        json={"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2, 4]
    r = requests.get(f"{server.url}/v2/models/huge/ready", timeout=10)
    assert r.status_code == 400
    assert "max_batch_size must be >= 0 and <= 1048576, got 1000000000" in r.json()["error"]


def infer_good(url: str) -> int:
    body = {"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    return requests.post(f"{url}/v2/models/good/infer", json=body, timeout=60).status_code


def test_out_of_range_overrides_are_400_and_the_server_serves_on(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "good", xy_config(), DOUBLE)
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "good")
    load = f"{server.url}/v2/repository/models/good/load"
    for override, message in [
        ({"max_batch_size": 1099511627776}, "max_batch_size must be >= 0 and <= 1048576, got 1099511627776"),
        ({"max_batch_size": "4611686018427387904"}, "max_batch_size must be >= 0 and <= 1048576, got '46"),
        ({"dynamic_batching": {"max_queue_size": 2**62}}, "max_queue_size must be >= 1 and <= 10000000, got 46"),
        ({"instance_group": {"count": 100000}}, "[instance_group] count must be >= 1 and <= 1024"),
        ({"dynamic_batching": {"priority_levels": 2**40}}, "priority_levels must be >= 0 and <= 1024, got 10"),
        ({"max_batch_size": True}, "max_batch_size must be an integer, got True"),
        ({"max_batch_size": "sixteen"}, "max_batch_size must be an integer, got 'sixteen'"),
    ]:
        r = requests.post(load, json={"parameters": {"config": json.dumps(override)}}, timeout=60)
        assert r.status_code == 400, override
        assert r.json()["error"].startswith("load failed for model 'good': version 1 is at UNAVAILABLE state: "), r.text
        assert message in r.json()["error"]
        assert infer_good(server.url) == 200
    assert server.proc.poll() is None


def test_quoted_integers_in_a_load_override(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "good", xy_config(), DOUBLE)
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "good")
    override = {
        "max_batch_size": "16",
        "dynamic_batching": {"preferred_batch_sizes": ["4", "8"], "max_queue_size": "7"},
    }
    r = requests.post(
        f"{server.url}/v2/repository/models/good/load",
        json={"parameters": {"config": json.dumps(override)}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    config = requests.get(f"{server.url}/v2/models/good/config", timeout=10).json()
    assert config["max_batch_size"] == 16
    assert [int(b) for b in config["dynamic_batching"]["preferred_batch_size"]] == [4, 8]
    assert int(config["dynamic_batching"]["default_queue_policy"]["max_queue_size"]) == 7
    assert infer_good(server.url) == 200


def test_a_poll_that_meets_an_out_of_range_config_goes_on(start_server, tmp_path: Path) -> None:
    write_model(tmp_path, "good", xy_config(), DOUBLE)
    server = start_server(tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    write_model(
        tmp_path, "huge", xy_config().replace("max_batch_size = 8", "max_batch_size = 4611686018427387904"), DOUBLE
    )
    # A poll may meet the directory half-written first (no model file yet); wait for the range error.
    expected = "max_batch_size must be >= 0 and <= 1048576, got 4611686018427387904"
    wait_until(
        lambda: expected in requests.get(f"{server.url}/v2/models/huge/ready", timeout=10).text,
        what="huge's range error in its ready answer",
    )
    # The poll thread lives on: a model added later is loaded.
    write_model(tmp_path, "later", xy_config(), DOUBLE)
    server.wait_for_log("loaded model 'later' version 1")
    assert infer_good(server.url) == 200


def onnx_model(repo: Path, name: str, config: str) -> None:
    write_model(repo, name, config)
    shutil.copy(EXAMPLES / "mlp" / "1" / "model.onnx", repo / name / "1" / "model.onnx")


@pytest.mark.parametrize(
    ("parameters", "reason"),
    [
        ("intra_op_num_threads = 0", "[parameters] intra_op_num_threads must be >= 1 and <= 1024, got 0"),
        ("intra_op_num_threads = 1000000", "[parameters] intra_op_num_threads must be >= 1 and <= 1024"),
        ("intra_op_num_threads = 2.5", "[parameters] intra_op_num_threads must be an integer, got 2.5"),
        ('inter_op_num_threads = "many"', "[parameters] inter_op_num_threads must be an integer, got 'many'"),
        ("inter_op_num_threads = true", "[parameters] inter_op_num_threads must be an integer, got True"),
    ],
)
def test_onnxruntime_thread_parameters_are_checked(start_server, tmp_path: Path, parameters: str, reason: str) -> None:
    onnx_model(tmp_path, "bad", f"[parameters]\n{parameters}\n")
    onnx_model(tmp_path, "ok", '[parameters]\nintra_op_num_threads = "2"\n')
    server = start_server(tmp_path)
    r = requests.get(f"{server.url}/v2/models/bad/ready", timeout=10)
    assert r.status_code == 400 and reason in r.json()["error"]
    assert requests.get(f"{server.url}/v2/models/ok/ready", timeout=10).status_code == 200


def test_openvino_thread_parameters_are_checked(start_server, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'fastserve-engine[openvino]')")
    onnx_model(tmp_path, "threads", 'backend = "openvino"\n[parameters]\ninference_num_threads = 4096\n')
    onnx_model(tmp_path, "streams", 'backend = "openvino"\n[parameters]\nnum_streams = 2.0\n')
    server = start_server(tmp_path)
    r = requests.get(f"{server.url}/v2/models/threads/ready", timeout=10)
    assert "[parameters] inference_num_threads must be >= 1 and <= 1024, got 4096" in r.json()["error"]
    r = requests.get(f"{server.url}/v2/models/streams/ready", timeout=10)
    assert "[parameters] num_streams must be an integer, got 2.0" in r.json()["error"]


def test_warmup_samples_are_bounded(start_server, tmp_path: Path) -> None:
    big = xy_config("[[warmup]]\nbatch_size = 2\n").replace("dims = [2]", "dims = [4096, 4096]")
    write_model(tmp_path, "big", big, DOUBLE)
    write_model(tmp_path, "wide", xy_config("[[warmup]]\nbatch_size = 9\n"), DOUBLE)
    # No max_batch_size: ONNX Runtime picks 64, which the warmup batch must fit.
    onnx_model(tmp_path, "default_batch", "[[warmup]]\nbatch_size = 65\n")
    server = start_server(tmp_path)

    def reason(name: str) -> str:
        return requests.get(f"{server.url}/v2/models/{name}/ready", timeout=10).json()["error"]

    assert "input 'X' of shape [2, 4096, 4096] has 33554432 elements, more than the 16777216" in reason("big")
    assert "batch_size must be >= 1 and <= max(1, max_batch_size) = 8, got 9" in reason("wide")
    assert "batch_size must be >= 1 and <= max(1, max_batch_size) = 64, got 65" in reason("default_batch")


def test_config_toml_takes_quoted_integers_too(start_server, tmp_path: Path) -> None:
    config = xy_config().replace("max_batch_size = 8", 'max_batch_size = "4"')
    write_model(tmp_path, "good", textwrap.dedent(config), DOUBLE)
    server = start_server(tmp_path)
    assert requests.get(f"{server.url}/v2/models/good/config", timeout=10).json()["max_batch_size"] == 4

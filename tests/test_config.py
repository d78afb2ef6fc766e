"""config.toml parsing: defaults, every key, and clear errors for mistakes."""

from __future__ import annotations

import pytest
from fastserve.config import ConfigError, VersionPolicy, parse_config
from fastserve.tensor import Tensor


def test_defaults() -> None:
    cfg = parse_config({})
    assert cfg.backend is None and cfg.max_batch_size is None
    assert cfg.dynamic_batching.max_queue_delay_us == 0 and cfg.dynamic_batching.max_queue_size == 1024
    assert cfg.instance_group.count == 1 and cfg.instance_group.kind == "cpu"
    assert cfg.version_policy.select([1, 2, 3]) == [3]


def test_every_key() -> None:
    cfg = parse_config(
        {
            "backend": "python",
            "max_batch_size": 16,
            "dynamic_batching": {"max_queue_delay_us": 100, "preferred_batch_sizes": [4, 8], "max_queue_size": 10},
            "instance_group": {"count": 2, "kind": "cpu"},
            "version_policy": {"specific": [1, 3]},
            "input": [{"name": "X", "datatype": "FP32", "dims": [-1, 4]}],
            "output": [{"name": "Y", "datatype": "INT64"}],
            "parameters": {"anything": {"nested": True}},
        }
    )
    assert cfg.max_batch_size == 16
    assert cfg.dynamic_batching.preferred_batch_sizes == [4, 8]
    assert cfg.instance_group.count == 2
    assert cfg.inputs == [Tensor("X", "FP32", [-1, 4])]
    assert cfg.outputs == [Tensor("Y", "INT64", [])]
    assert cfg.parameters == {"anything": {"nested": True}}
    assert cfg.version_policy.select([1, 2, 3]) == [1, 3]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_batch_sise": 4}, "unknown key(s) in config.toml: max_batch_sise"),
        ({"backend": "tensorflow"}, "backend must be one of onnxruntime, openvino, python"),
        ({"device": "tpu"}, "device must be one of cpu, gpu"),
        ({"device": "gpu", "instance_group": {"kind": "cpu"}}, 'device = "gpu" contradicts'),
        ({"instance_group": {"gpus": [0]}}, '[instance_group] gpus needs kind = "gpu"'),
        ({"instance_group": {"kind": "gpu", "gpus": [0, -1]}}, "gpus must be a list of integers >= 0"),
        ({"instance_group": {"kind": "gpu", "gpus": [True]}}, "gpus must be a list of integers >= 0"),
        ({"instance_group": {"kind": "gpu", "gpus": []}}, "gpus must list at least one device id, each once"),
        ({"instance_group": {"kind": "gpu", "gpus": [2, 2]}}, "gpus must list at least one device id, each once"),
        ({"max_batch_size": "eight"}, "max_batch_size must be an integer"),
        ({"max_batch_size": "8.0"}, "max_batch_size must be an integer"),
        ({"max_batch_size": 8.0}, "max_batch_size must be an integer"),
        ({"max_batch_size": True}, "max_batch_size must be an integer"),
        ({"max_batch_size": -1}, "max_batch_size must be >= 0"),
        ({"dynamic_batching": {"delay": 1}}, "unknown key(s) in [dynamic_batching]: delay"),
        ({"dynamic_batching": {"preferred_batch_sizes": [0]}}, "preferred_batch_sizes must be a list of integers >= 1"),
        ({"dynamic_batching": {"max_queue_size": 0}}, "max_queue_size must be >= 1"),
        ({"instance_group": {"kind": "tpu"}}, "kind must be one of cpu, gpu"),
        ({"instance_group": {"count": 0}}, "count must be >= 1"),
        ({"version_policy": {"latest": 2, "all": True}}, "set only one of latest, all, specific"),
        ({"input": [{"name": "X"}]}, "name and datatype are required"),
        ({"input": [{"name": "X", "datatype": "FLOAT"}]}, "unknown datatype 'FLOAT'"),
        ({"input": [{"name": "X", "datatype": "FP32", "dims": [-2]}]}, "dims must be a list of integers >= -1"),
        ({"input": [{"name": "X", "datatype": "FP32", "shape": [1]}]}, "unknown key(s) in [[input]] entry 0: shape"),
    ],
)
def test_mistakes_are_clear_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_instance_placements() -> None:
    assert parse_config({"instance_group": {"count": 2}}).instance_group.placements() == [None, None]
    gpu = parse_config({"instance_group": {"kind": "gpu", "count": 2, "gpus": [1, 3]}}).instance_group
    assert gpu.placements() == [1, 1, 3, 3], "count instances on each listed GPU"
    assert parse_config({"instance_group": {"kind": "gpu"}}).instance_group.placements() == [0]
    python_gpu = parse_config({"device": "gpu"})
    assert python_gpu.device == "gpu" and python_gpu.instance_group.kind == "gpu", "device = gpu implies GPU instances"


def test_version_policies() -> None:
    available = [1, 2, 5, 10]
    assert VersionPolicy(latest=2).select(available) == [5, 10]
    assert VersionPolicy(all=True).select(available) == available
    assert VersionPolicy(specific=[2, 7]).select(available) == [2]

"""What ``fastserve check``, ``fastserve list`` and ``fastserve config`` read from a model
repository without serving it: each model's configuration (``config.toml`` or Triton's
``config.pbtxt``), its versions and backends, and every problem at once, so CI can refuse a broken
repository before a server ever starts on it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _core
from .backends import detect_backend
from .config import CONFIG_FILES, ConfigError, ModelConfig, check_parameters, parse_config, read_config
from .repository import MODEL_NAME, scan, version_dirs
from .tensor import Tensor


@dataclass
class ModelReport:
    """One model of a repository as its files describe it."""

    name: str
    path: Path
    config_file: str | None = None  # config.toml, config.pbtxt, or None (all defaults)
    config: ModelConfig | None = None
    backends: dict[int, str | None] = field(default_factory=dict)  # selected version -> backend (None: no file)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong

    @property
    def backend(self) -> str | None:
        """The backend of the newest selected version (the one ``list`` shows)."""
        found = [b for _, b in sorted(self.backends.items()) if b is not None]
        return found[-1] if found else (self.config.backend if self.config else None)


@dataclass
class RepositoryReport:
    models: list[ModelReport]
    problems: list[str]  # of the repository itself: skipped directories, no models

    def problem_count(self) -> int:
        return len(self.problems) + sum(len(m.problems) for m in self.models)


def inspect_repository(root: Path, model_name: str | None = None) -> RepositoryReport:
    """Reads every model of ``root`` (single-model mode with ``model_name``, as ``serve``)."""
    if model_name is not None:
        if not MODEL_NAME.match(model_name) or ".." in model_name:
            return RepositoryReport([], [f"invalid model name '{model_name}'"])
        return RepositoryReport([inspect_model(model_name, root, single=True)], [])
    names, skipped = scan(root)
    problems = [f"ignoring directory '{path}': {why}" for path, why in skipped]
    if not names and not skipped:
        problems.append(
            f"the model repository '{root}' has no models: each model is a directory holding numbered version "
            "directories (<repository>/<model>/1/model.onnx, model.xml or model.py)"
        )
    return RepositoryReport([inspect_model(name, root / name) for name in names], problems)


def inspect_model(name: str, path: Path, single: bool = False) -> ModelReport:
    """Everything that can be known of model ``name`` without loading it."""
    report = ModelReport(name, path)
    report.config_file = next((f for f in CONFIG_FILES if (path / f).is_file()), None)
    try:
        report.config = parse_config(read_config(path))
    except ConfigError as e:
        report.problems.extend(e.problems)
        return report
    config = report.config
    dirs = version_dirs(path, bare_is_version_1=single)
    if not dirs:
        report.problems.append(
            f"no numeric version directories: put the model's files in '{name}/1/' (a directory per version, "
            "named by its number)"
        )
        return report
    selected = config.version_policy.select(list(dirs))
    if not selected:
        report.problems.append(f"version_policy selects none of the versions {list(dirs)}")
    for version in selected:
        backend = config.backend or detect_backend(dirs[version], config.default_model_filename)
        report.backends[version] = backend
        if backend is None:
            expected = config.default_model_filename or "model.onnx, model.xml or model.py"
            report.problems.append(f"version {version}: no model file found (expected {expected})")
            continue
        if config.backend is None:  # else parse_config checked them
            try:
                unused = check_parameters(backend, config.parameters)
            except ConfigError as e:
                report.problems.extend(e.problems)
                continue
            if unused:
                report.notes.append(f"[parameters] {', '.join(unused)} not read by the {backend} backend")
    return report


def batching(config: ModelConfig) -> str:
    """How requests of the model are scheduled, in a few words."""
    if config.sequence_batching is not None:
        return "sequence"
    if "dynamic_batching" not in config.raw:
        return "none"
    db = config.dynamic_batching
    preferred = f", preferred {db.preferred_batch_sizes}" if db.preferred_batch_sizes else ""
    return f"dynamic (delay {db.max_queue_delay_us} us{preferred})"


def effective_config(report: ModelReport) -> dict[str, Any]:
    """The model's configuration with every default filled in, as ``config.toml`` keys.
    ``max_batch_size`` is absent when the backend chooses it from the model file at load."""
    config = report.config
    assert config is not None
    table: dict[str, Any] = {
        "backend": report.backend,
        "max_batch_size": config.max_batch_size,
        "device": config.device,
        "execution_timeout_ms": config.execution_timeout_ms,
        "max_abandoned_instances": config.max_abandoned_instances,
        "max_instance_failures": config.max_instance_failures,
        "isolate_batch_failures": config.isolate_batch_failures,
        "default_model_filename": config.default_model_filename,
        "model_transaction_policy": {"decoupled": config.decoupled},
        "instance_group": dataclasses.asdict(config.instance_group),
        "version_policy": _policy(config),
    }
    if config.sequence_batching is not None:
        table["sequence_batching"] = config.sequence_batching
    elif "dynamic_batching" in config.raw:
        table["dynamic_batching"] = dataclasses.asdict(config.dynamic_batching)
    if config.instance_group.kind != "gpu":
        del table["instance_group"]["gpus"]
    if config.routing.labels or config.routing.weights:
        weights = {str(v): w for v, w in config.routing.weights.items()}
        table["routing"] = {"labels": dict(config.routing.labels), "weights": weights}
    if config.ensemble is not None:
        table["ensemble"] = config.ensemble
    table["input"] = [_tensor(t) for t in config.inputs]
    table["output"] = [_tensor(t) for t in config.outputs]
    table["warmup"] = [dataclasses.asdict(w) for w in config.warmup]
    table["parameters"] = config.parameters
    # TOML has no null, and empty lists of tables say nothing.
    return {k: v for k, v in table.items() if v is not None and v != []}


def _tensor(t: Tensor) -> dict[str, Any]:
    """A tensor's keys, ``reshape`` and ``optional`` only where set."""
    table: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "dims": list(t.dims)}
    if t.reshape is not None:
        table["reshape"] = list(t.reshape)
    if t.optional:
        table["optional"] = True
    return table


def _policy(config: ModelConfig) -> dict[str, Any]:
    policy = config.version_policy
    if policy.all:
        return {"all": True}
    if policy.specific is not None:
        return {"specific": policy.specific}
    return {"latest": policy.latest}


def as_toml(table: dict[str, Any]) -> str:
    """``table`` as a config.toml file (the core's TOML writer, as ``convert-config``)."""
    return _core.table_to_toml(json.dumps(table))

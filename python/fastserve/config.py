"""``config.toml``: the per-model settings of a model repository.

Keys mirror Triton's model configuration so its users feel at home. Unknown keys are errors, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tensor import Tensor

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKENDS = ("onnxruntime", "openvino", "python")
INSTANCE_KINDS = ("cpu", "gpu")
DEVICES = ("cpu", "gpu")


class ConfigError(ValueError):
    """A model's config.toml is malformed or contradicts its model."""


@dataclass
class DynamicBatching:
    max_queue_delay_us: int = 0
    preferred_batch_sizes: list[int] = field(default_factory=list)
    max_queue_size: int = 1024
    default_queue_timeout_us: int = 0  # 0: requests wait as long as it takes
    priority_levels: int = 0  # 0 or 1: no priorities; else parameters.priority 1 (highest)..N
    default_priority_level: int = 0  # the level of requests without one; 0: the lowest


@dataclass
class InstanceGroup:
    """``count`` instances on the CPU, or ``count`` instances on each GPU of ``gpus`` (kind "gpu")."""

    count: int = 1
    kind: str = "cpu"
    gpus: list[int] = field(default_factory=lambda: [0])

    def placements(self) -> list[int | None]:
        """One entry per instance: the CUDA device id it runs on, or None for the CPU."""
        if self.kind == "gpu":
            return [gpu for gpu in self.gpus for _ in range(self.count)]
        return [None] * self.count


@dataclass
class VersionPolicy:
    """Which numeric version directories are served: the latest N, all, or specific ones."""

    latest: int | None = 1
    all: bool = False
    specific: list[int] | None = None

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in set(self.specific)]
        return ordered[-(self.latest or 1) :]


@dataclass
class Routing:
    """Labels name versions (``stable = 1``); weights split requests that name no version."""

    labels: dict[str, int] = field(default_factory=dict)
    weights: dict[int, int] = field(default_factory=dict)


@dataclass
class Warmup:
    """Sample batches run on every instance before a version reports ready."""

    batch_size: int = 1
    count: int = 1
    data: str = "zero"  # or "random"
    dims: dict[str, list[int]] = field(default_factory=dict)  # concrete dims for variable ones


@dataclass
class ModelConfig:
    backend: str | None = None
    max_batch_size: int | None = None
    device: str = "cpu"  # python models: "gpu" hands execute() CuPy arrays
    execution_timeout_ms: int = 0  # 0: none; a longer execute() fails its batch and the instance is replaced
    dynamic_batching: DynamicBatching = field(default_factory=DynamicBatching)
    instance_group: InstanceGroup = field(default_factory=InstanceGroup)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    routing: Routing = field(default_factory=Routing)
    warmup: list[Warmup] = field(default_factory=list)
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def _take(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    if key not in table:
        return default
    value = table.pop(key)
    # bool is an int in Python; never accept it where a number is meant.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{where}{key} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}{key} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", str: "a string", bool: "a boolean", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _no_leftovers(table: dict[str, Any], where: str) -> None:
    if table:
        raise ConfigError(f"unknown key(s) in {where or 'config.toml'}: {', '.join(sorted(table))}")


def _int_list(values: Any, where: str, minimum: int) -> list[int]:
    if not isinstance(values, list) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values
    ):
        raise ConfigError(f"{where} must be a list of integers >= {minimum}")
    return list(values)


def _tensors(items: Any, key: str) -> list[Tensor]:
    if not isinstance(items, list):
        raise ConfigError(f"[[{key}]] must be an array of tables")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"[[{key}]] entry {i} must be a table")
        item = dict(item)
        where = f"[[{key}]] entry {i}: "
        name = _take(item, "name", str, where)
        datatype = _take(item, "datatype", str, where)
        dims = _int_list(_take(item, "dims", list, where, []), f"{where}dims", -1)
        if name is None or datatype is None:
            raise ConfigError(f"{where}name and datatype are required")
        _no_leftovers(item, f"[[{key}]] entry {i}")
        try:
            out.append(Tensor(name, datatype, dims))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return out


def _routing(rt: dict[str, Any]) -> Routing:
    where = "[routing] "
    labels = dict(_take(rt, "labels", dict, where, {}))
    weights = dict(_take(rt, "weights", dict, where, {}))
    _no_leftovers(rt, "[routing]")
    for label, version in labels.items():
        # Labels share the URL slot of version numbers, so they must not look like one.
        if not label or label.isdigit() or not label.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}label '{label}' must be a non-numeric name of letters, digits, - and _")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ConfigError(f"{where}label '{label}' must map to a version number")
    parsed: dict[int, int] = {}
    for version, weight in weights.items():
        if not str(version).isdigit():
            raise ConfigError(f"{where}weights keys must be version numbers, got '{version}'")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ConfigError(f"{where}weight of version {version} must be an integer >= 0")
        parsed[int(version)] = weight
    if parsed and not any(parsed.values()):
        raise ConfigError(f"{where}weights must not all be 0")
    return Routing(labels=labels, weights=parsed)


def _warmups(items: Any) -> list[Warmup]:
    if not isinstance(items, list):
        raise ConfigError("[[warmup]] must be an array of tables")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"[[warmup]] entry {i} must be a table")
        item = dict(item)
        where = f"[[warmup]] entry {i}: "
        w = Warmup(
            batch_size=_take(item, "batch_size", int, where, 1),
            count=_take(item, "count", int, where, 1),
            data=_take(item, "data", str, where, "zero"),
            dims={k: _int_list(v, f"{where}dims.{k}", 0) for k, v in _take(item, "dims", dict, where, {}).items()},
        )
        _no_leftovers(item, f"[[warmup]] entry {i}")
        if w.batch_size < 1 or w.count < 1:
            raise ConfigError(f"{where}batch_size and count must be >= 1")
        if w.data not in ("zero", "random"):
            raise ConfigError(f'{where}data must be "zero" or "random"')
        out.append(w)
    return out


def parse_config(data: dict[str, Any]) -> ModelConfig:
    """Validates a parsed TOML document into a ModelConfig."""
    raw = dict(data)
    table = dict(data)
    cfg = ModelConfig(raw=raw)
    cfg.backend = _take(table, "backend", str, "")
    if cfg.backend is not None and cfg.backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got '{cfg.backend}'")
    cfg.device = _take(table, "device", str, "", "cpu")
    if cfg.device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got '{cfg.device}'")
    cfg.execution_timeout_ms = _take(table, "execution_timeout_ms", int, "", 0)
    if cfg.execution_timeout_ms < 0:
        raise ConfigError("execution_timeout_ms must be >= 0")
    cfg.max_batch_size = _take(table, "max_batch_size", int, "")
    if cfg.max_batch_size is not None and cfg.max_batch_size < 0:
        raise ConfigError("max_batch_size must be >= 0")

    db = dict(_take(table, "dynamic_batching", dict, "", {}))
    where = "[dynamic_batching] "
    cfg.dynamic_batching = DynamicBatching(
        max_queue_delay_us=_take(db, "max_queue_delay_us", int, where, 0),
        preferred_batch_sizes=_int_list(
            _take(db, "preferred_batch_sizes", list, where, []), f"{where}preferred_batch_sizes", 1
        ),
        max_queue_size=_take(db, "max_queue_size", int, where, 1024),
        default_queue_timeout_us=_take(db, "default_queue_timeout_us", int, where, 0),
        priority_levels=_take(db, "priority_levels", int, where, 0),
        default_priority_level=_take(db, "default_priority_level", int, where, 0),
    )
    if cfg.dynamic_batching.max_queue_delay_us < 0:
        raise ConfigError(f"{where}max_queue_delay_us must be >= 0")
    if cfg.dynamic_batching.max_queue_size < 1:
        raise ConfigError(f"{where}max_queue_size must be >= 1")
    for key in ("default_queue_timeout_us", "priority_levels", "default_priority_level"):
        if getattr(cfg.dynamic_batching, key) < 0:
            raise ConfigError(f"{where}{key} must be >= 0")
    if cfg.dynamic_batching.default_priority_level > max(cfg.dynamic_batching.priority_levels, 1):
        raise ConfigError(f"{where}default_priority_level must be between 0 and priority_levels")
    _no_leftovers(db, "[dynamic_batching]")

    ig = dict(_take(table, "instance_group", dict, "", {}))
    where = "[instance_group] "
    count = _take(ig, "count", int, where, 1)
    # A Python model with device = "gpu" is placed on GPUs without restating kind = "gpu".
    kind = _take(ig, "kind", str, where, "gpu" if cfg.device == "gpu" else "cpu")
    gpus = _take(ig, "gpus", list, where)
    if count < 1:
        raise ConfigError(f"{where}count must be >= 1")
    if kind not in INSTANCE_KINDS:
        raise ConfigError(f"{where}kind must be one of {', '.join(INSTANCE_KINDS)}")
    if cfg.device == "gpu" and kind != "gpu":
        raise ConfigError(f'device = "gpu" contradicts {where}kind = "{kind}"')
    if gpus is not None:
        if kind != "gpu":
            raise ConfigError(f'{where}gpus needs kind = "gpu"')
        gpus = _int_list(gpus, f"{where}gpus", 0)
        if not gpus or len(set(gpus)) != len(gpus):
            raise ConfigError(f"{where}gpus must list at least one device id, each once")
    cfg.instance_group = InstanceGroup(count=count, kind=kind, gpus=gpus if gpus is not None else [0])
    _no_leftovers(ig, "[instance_group]")

    vp = dict(_take(table, "version_policy", dict, "", {}))
    where = "[version_policy] "
    latest = _take(vp, "latest", int, where)
    all_versions = _take(vp, "all", bool, where, False)
    specific = _take(vp, "specific", list, where)
    if sum(x is not None and x is not False for x in (latest, all_versions or None, specific)) > 1:
        raise ConfigError(f"{where}set only one of latest, all, specific")
    if latest is not None and latest < 1:
        raise ConfigError(f"{where}latest must be >= 1")
    cfg.version_policy = VersionPolicy(
        latest=latest if latest is not None else 1,
        all=all_versions,
        specific=_int_list(specific, f"{where}specific", 0) if specific is not None else None,
    )
    _no_leftovers(vp, "[version_policy]")

    cfg.routing = _routing(dict(_take(table, "routing", dict, "", {})))
    cfg.warmup = _warmups(table.pop("warmup", []))
    cfg.inputs = _tensors(table.pop("input", []), "input")
    cfg.outputs = _tensors(table.pop("output", []), "output")
    cfg.parameters = dict(_take(table, "parameters", dict, "", {}))
    _no_leftovers(table, "")
    return cfg


def load_config(model_dir: Path) -> ModelConfig:
    """Reads ``model_dir/config.toml``; a missing file means all defaults."""
    path = model_dir / "config.toml"
    if not path.is_file():
        return ModelConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config.toml is not valid TOML: {e}") from None
    return parse_config(data)

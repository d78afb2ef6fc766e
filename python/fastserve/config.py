"""``config.toml``: the per-model settings of a model repository.

Keys mirror Triton's model configuration so its users feel at home. Unknown keys are errors, so a
typo never silently falls back to a default, and every problem of a file is reported at once (with
"did you mean" for near misses): fixing a config should not take one restart per typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _core
from .logs import model_fields
from .options import MODEL_OPTIONS, model_default
from .tensor import Tensor

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKENDS = ("onnxruntime", "openvino", "python", "ensemble")
INSTANCE_KINDS = ("cpu", "gpu")
DEVICES = ("cpu", "gpu")

I64_MAX = 2**63 - 1  # versions travel as int64 (gRPC, Triton's JSON) and u64 (the native registry)
DIM_MAX = 2**31 - 1  # Triton's dims are int64, but no real tensor dimension comes near this
WARMUP_MAX_ELEMENTS = 2**24  # elements per warmup sample tensor: 128 MiB at most (FP64)
MAX_INSTANCES = 1024  # count x GPUs: every instance is a thread and a copy of the model


@dataclass(frozen=True)
class Range:
    """The inclusive range of one numeric key, and why it ends there (for the README)."""

    low: int
    high: int
    why: str


def _model_range(name: str) -> Range:
    """The bounds of a batching/queue key, as the core defines them."""
    option = MODEL_OPTIONS[name]
    assert option.min is not None and option.max is not None, name
    return Range(option.min, option.max, option.help)


# Every numeric key of config.toml, by dotted path ("[]": each list item, "*": each table value).
# The parser enforces exactly these and the README's table is generated from them
# (``ranges_markdown``): a bound keeps one model's typo from exhausting the server's memory or
# overflowing the native scheduler's integers, which would stop every other model too.
RANGES: dict[str, Range] = {
    "max_batch_size": _model_range("max_batch_size"),
    "execution_timeout_ms": _model_range("execution_timeout_ms"),
    "max_abandoned_instances": _model_range("max_abandoned_instances"),
    "max_instance_failures": _model_range("max_instance_failures"),
    "dynamic_batching.max_queue_delay_us": _model_range("max_queue_delay_us"),
    "dynamic_batching.preferred_batch_sizes[]": _model_range("preferred_batch_sizes"),
    "dynamic_batching.max_queue_size": _model_range("max_queue_size"),
    "dynamic_batching.default_queue_timeout_us": _model_range("default_queue_timeout_us"),
    "dynamic_batching.priority_levels": _model_range("priority_levels"),
    "dynamic_batching.default_priority_level": _model_range("default_priority_level"),
    "instance_group.count": Range(1, MAX_INSTANCES, f'per GPU with kind = "gpu"; count x GPUs <= {MAX_INSTANCES}'),
    "instance_group.gpus[]": Range(0, 65535, "CUDA device ids; each must also be visible at load"),
    "version_policy.latest": Range(1, 1024, "versions served side by side"),
    "version_policy.specific[]": Range(0, I64_MAX, "version numbers (also version directory names)"),
    "routing.labels.*": Range(0, I64_MAX, "version numbers"),
    "routing.weights.*": Range(0, 1_000_000, "relative weights; keys are version numbers"),
    "input.dims[]": Range(-1, DIM_MAX, "-1: variable"),
    "output.dims[]": Range(-1, DIM_MAX, "-1: variable"),
    "warmup.batch_size": Range(1, 2**20, "also <= max(1, max_batch_size)"),
    "warmup.count": Range(1, 1000, "runs per instance"),
    "warmup.dims.*[]": Range(0, DIM_MAX, f"each sample tensor has at most {WARMUP_MAX_ELEMENTS:,} elements"),
    "parameters.intra_op_num_threads": Range(1, 1024, "onnxruntime"),
    "parameters.inter_op_num_threads": Range(1, 1024, "onnxruntime"),
    "parameters.num_streams": Range(1, 1024, "openvino"),
    "parameters.inference_num_threads": Range(1, 1024, "openvino"),
}

# An integer as protobuf's JSON mapping may write it (Triton's config JSON quotes 64-bit ints).
QUOTED_INT = re.compile(r"-?[0-9]+")
MODEL_FILENAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}")

log = logging.getLogger("fastserve.config")


class ConfigError(ValueError):
    """A model's config.toml is malformed or contradicts its model. ``problems`` lists every problem
    found (the message joins them), so a user fixes them all in one go."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]

    @classmethod
    def of(cls, problems: list[str]) -> ConfigError:
        if len(problems) == 1:
            return cls(problems[0])
        return cls(f"{len(problems)} problems: " + "; ".join(problems), problems)


# The problems of the config being parsed (None: not collecting, the first problem raises).
_problems: ContextVar[list[str] | None] = ContextVar("fastserve_config_problems", default=None)


def _report(message: str) -> None:
    """Records a problem of the config being parsed and lets parsing go on (with the key's default),
    so one run reports them all; outside ``parse_config`` it raises."""
    problems = _problems.get()
    if problems is None:
        raise ConfigError(message)
    if message not in problems:
        problems.append(message)


@contextmanager
def _step() -> Iterator[None]:
    """One part of the config: a problem that stops it is recorded, and the other parts are still
    checked."""
    try:
        yield
    except ConfigError as e:
        for problem in e.problems:
            _report(problem)


def did_you_mean(word: str, known: Iterable[str]) -> str | None:
    """The known word ``word`` is most likely a typo of, if any."""
    matches = difflib.get_close_matches(word, list(known), n=1, cutoff=0.75)
    return matches[0] if matches else None


def triton_datatype(value: Any) -> str | None:
    """The V2 datatype a Triton ``TYPE_*`` name (config.pbtxt's spelling) stands for, if it is one."""
    if not isinstance(value, str) or not value.startswith("TYPE_"):
        return None
    name = value.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


@dataclass
class DynamicBatching:
    """The ``[dynamic_batching]`` keys; defaults and meaning are the core's (``fastserve.options``)."""

    max_queue_delay_us: int = model_default("max_queue_delay_us")
    preferred_batch_sizes: list[int] = field(default_factory=list)
    max_queue_size: int = model_default("max_queue_size")
    default_queue_timeout_us: int = model_default("default_queue_timeout_us")
    priority_levels: int = model_default("priority_levels")
    default_priority_level: int = model_default("default_priority_level")


@dataclass
class InstanceGroup:
    """``count`` instances on the CPU, or ``count`` instances on each GPU of ``gpus`` (kind "gpu")."""

    count: int = 1
    kind: str = "cpu"
    gpus: list[int] = field(default_factory=lambda: [0])
    # "thread" (in the server's process) or "process" (each instance in a worker process).
    isolation: str = model_default("isolation")

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
    execution_timeout_ms: int = model_default("execution_timeout_ms")
    max_abandoned_instances: int = model_default("max_abandoned_instances")
    # A failed batch of several requests runs again one request at a time (off: execute must not run twice).
    isolate_batch_failures: bool = model_default("isolate_batch_failures")
    max_instance_failures: int = model_default("max_instance_failures")
    # [model_transaction_policy] decoupled: execute() yields any number of responses per request.
    decoupled: bool = model_default("decoupled")
    # [sequence_batching] as written (Triton's keys); the core checks and runs it.
    sequence_batching: dict[str, Any] | None = None
    # [ensemble] (backend = "ensemble"): its [[ensemble.step]] tables as written; the core checks them.
    ensemble: dict[str, Any] | None = None
    dynamic_batching: DynamicBatching = field(default_factory=DynamicBatching)
    instance_group: InstanceGroup = field(default_factory=InstanceGroup)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    routing: Routing = field(default_factory=Routing)
    warmup: list[Warmup] = field(default_factory=list)
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    # Triton's key: the model file in each version directory instead of model.onnx / model.xml / model.py.
    default_model_filename: str | None = None


def _take(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    if key not in table:
        return default
    value = table.pop(key)
    # bool is an int in Python; never accept it where a number is meant.
    wrong_bool = isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    if wrong_bool or not isinstance(value, kind):
        _report(f"{where}{key} must be {_kind_name(kind)}, got {value!r}")
        return default
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", str: "a string", bool: "a boolean", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _unknown(key: str, value: Any, known: Iterable[str], top_level: bool = False) -> str:
    """An unknown key, with the known key it is most likely a typo of (and the value as that key
    takes it: ``data_type = "TYPE_FP32"`` -> ``datatype = "FP32"``); at the top level also a key of
    a table written outside it (``preferred_batch_size`` -> ``[dynamic_batching] preferred_batch_sizes``)."""
    guess = did_you_mean(key, known)
    if guess is None and top_level:
        tables = {
            "dynamic_batching": _keys(DynamicBatching),
            "instance_group": _keys(InstanceGroup),
            "version_policy": _keys(VersionPolicy),
            "model_transaction_policy": ["decoupled"],
        }
        guess = next((f"[{t}] {g}" for t, keys in tables.items() if (g := did_you_mean(key, keys))), None)
    if guess is None:
        return key
    datatype = triton_datatype(value) if guess == "datatype" else None
    return f'{key} (did you mean {guess} = "{datatype}"?)' if datatype else f"{key} (did you mean {guess}?)"


def _no_leftovers(table: dict[str, Any], where: str, known: Iterable[str]) -> None:
    """Reports the keys nobody took out of ``table``: unknown, most likely typos of ``known``."""
    if table:
        known = list(known)
        keys = ", ".join(_unknown(k, table[k], known, top_level=not where) for k in sorted(table))
        _report(f"unknown key(s) in {where or 'config.toml'}: {keys}")


def _keys(cls: type) -> list[str]:
    """The keys of a table that maps onto dataclass ``cls``."""
    return [f.name for f in dataclasses.fields(cls)]


# The keys of the top-level table; the sub-tables' keys are their dataclasses' fields.
TOP_LEVEL_KEYS = (
    "backend",
    "device",
    "max_batch_size",
    "execution_timeout_ms",
    "max_abandoned_instances",
    "max_instance_failures",
    "isolate_batch_failures",
    "default_model_filename",
    "model_transaction_policy",
    "dynamic_batching",
    "sequence_batching",
    "instance_group",
    "version_policy",
    "routing",
    "warmup",
    "input",
    "output",
    "parameters",
    "ensemble",
)
TENSOR_KEYS = ("name", "datatype", "dims", "reshape", "optional")


def as_int(value: Any) -> int | None:
    """The integer a config value stands for, or None: TOML/JSON integers, and integers in quotes,
    since protobuf's JSON mapping (Triton's config JSON) may quote any integer and always quotes
    64-bit ones. Booleans, floats and other strings are no integers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and QUOTED_INT.fullmatch(value):
        # Python refuses to parse thousands of digits; anything that long is out of range anyway.
        return int(value) if len(value) <= 64 else (-1 if value.startswith("-") else 1) * 10**64
    return None


def in_range(value: Any, path: str, label: str) -> int:
    """``value`` as an integer within ``RANGES[path]``, else a ConfigError naming ``label`` and the range."""
    bounds = RANGES[path]
    number = as_int(value)
    if number is None:
        raise ConfigError(f"{label} must be an integer, got {value!r}")
    if not bounds.low <= number <= bounds.high:
        raise ConfigError(f"{label} must be >= {bounds.low} and <= {bounds.high}, got {value!r}")
    return number


def _int(table: dict[str, Any], key: str, where: str, default: Any, path: str) -> Any:
    """Takes integer ``key`` out of ``table``, checked against ``RANGES[path]``."""
    if key not in table:
        return default
    try:
        return in_range(table.pop(key), path, f"{where}{key}")
    except ConfigError as e:
        _report(str(e))
        return default


def _int_list(values: Any, label: str, path: str) -> list[int]:
    bounds = RANGES[path]
    numbers = [as_int(v) for v in values] if isinstance(values, list) else [None]
    if any(n is None or not bounds.low <= n <= bounds.high for n in numbers):
        _report(f"{label} must be a list of integers >= {bounds.low} and <= {bounds.high}, got {values!r}")
        return []
    return [n for n in numbers if n is not None]


def _tensors(items: Any, key: str) -> list[Tensor]:
    if not isinstance(items, list):
        raise ConfigError(f"[[{key}]] must be an array of tables")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            _report(f"[[{key}]] entry {i} must be a table")
            continue
        item = dict(item)
        where = f"[[{key}]] entry {i}: "
        name = _take(item, "name", str, where)
        datatype = _take(item, "datatype", str, where)
        dims = _int_list(_take(item, "dims", list, where, []), f"{where}dims", f"{key}.dims[]")
        reshape = _take(item, "reshape", list, where)
        if reshape is not None:
            reshape = _int_list(reshape, f"{where}reshape", f"{key}.dims[]")
        optional = _take(item, "optional", bool, where, False) if key == "input" else False
        misspelt = {k for k in item if did_you_mean(k, TENSOR_KEYS)}
        _no_leftovers(item, f"[[{key}]] entry {i}", TENSOR_KEYS)
        if name is None or datatype is None:
            if not misspelt:  # else the typo's "did you mean" says it
                _report(f"{where}name and datatype are required")
            continue
        triton = triton_datatype(datatype)
        if triton is not None:
            _report(f'{where}datatype "{datatype}" is config.pbtxt\'s spelling; did you mean datatype = "{triton}"?')
            continue
        try:
            out.append(Tensor(name, datatype, dims, reshape, optional))
        except ValueError as e:
            _report(str(e))
    return out


def _routing(rt: dict[str, Any]) -> Routing:
    where = "[routing] "
    labels = dict(_take(rt, "labels", dict, where, {}))
    weights = dict(_take(rt, "weights", dict, where, {}))
    _no_leftovers(rt, "[routing]", _keys(Routing))
    parsed_labels: dict[str, int] = {}
    for label, version in labels.items():
        # Labels share the URL slot of version numbers, so they must not look like one.
        if not label or label.isdigit() or not label.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}label '{label}' must be a non-numeric name of letters, digits, - and _")
        parsed_labels[label] = in_range(version, "routing.labels.*", f"{where}label '{label}' (a version number)")
    parsed: dict[int, int] = {}
    for version, weight in weights.items():
        if not isinstance(version, str) or not QUOTED_INT.fullmatch(version) or version.startswith("-"):
            raise ConfigError(f"{where}weights keys must be version numbers, got '{version}'")
        number = in_range(version, "version_policy.specific[]", f"{where}weights key")
        parsed[number] = in_range(weight, "routing.weights.*", f"{where}weight of version {version}")
    if parsed and not any(parsed.values()):
        raise ConfigError(f"{where}weights must not all be 0")
    return Routing(labels=parsed_labels, weights=parsed)


def _warmups(items: Any) -> list[Warmup]:
    if not isinstance(items, list):
        raise ConfigError("[[warmup]] must be an array of tables")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"[[warmup]] entry {i} must be a table")
        item = dict(item)
        where = f"[[warmup]] entry {i}: "
        dims = _take(item, "dims", dict, where, {})
        w = Warmup(
            batch_size=_int(item, "batch_size", where, 1, "warmup.batch_size"),
            count=_int(item, "count", where, 1, "warmup.count"),
            data=_take(item, "data", str, where, "zero"),
            dims={k: _int_list(v, f"{where}dims.{k}", "warmup.dims.*[]") for k, v in dims.items()},
        )
        _no_leftovers(item, f"[[warmup]] entry {i}", _keys(Warmup))
        if w.data not in ("zero", "random"):
            raise ConfigError(f'{where}data must be "zero" or "random"')
        out.append(w)
    return out


def _dynamic_batching(db: dict[str, Any]) -> DynamicBatching:
    where = "[dynamic_batching] "
    path = "dynamic_batching."
    preferred = _take(db, "preferred_batch_sizes", list, where, [])
    numbers = ("max_queue_delay_us", "max_queue_size", "default_queue_timeout_us", "priority_levels")
    batching = DynamicBatching(
        preferred_batch_sizes=_int_list(preferred, f"{where}preferred_batch_sizes", path + "preferred_batch_sizes[]"),
        **{key: _int(db, key, where, model_default(key), path + key) for key in (*numbers, "default_priority_level")},
    )
    _no_leftovers(db, "[dynamic_batching]", _keys(DynamicBatching))
    # How the keys relate is the core's rule; max_batch_size is checked once the backend knows it.
    _check_with_core(batching, MODEL_OPTIONS["max_batch_size"].max or 0)
    return batching


def _check_with_core(batching: DynamicBatching, max_batch_size: int) -> None:
    try:
        _core.check_model_options({**dataclasses.asdict(batching), "max_batch_size": max_batch_size})
    except ValueError as e:
        raise ConfigError(f"[dynamic_batching] {e}") from None


def check_batch_sizes(batching: DynamicBatching, warmups: list[Warmup], max_batch_size: int) -> None:
    """Batch sizes a config names must fit the model's ``max_batch_size``; checked again once a
    backend has chosen the default for a config that sets none."""
    _check_with_core(batching, max_batch_size)
    for i, w in enumerate(warmups):
        if w.batch_size > max(1, max_batch_size):
            raise ConfigError(
                f"[[warmup]] entry {i}: batch_size must be >= 1 and <= max(1, max_batch_size) = "
                f"{max(1, max_batch_size)}, got {w.batch_size}"
            )


def _instance_group(ig: dict[str, Any], device: str) -> InstanceGroup:
    where = "[instance_group] "
    count = _int(ig, "count", where, 1, "instance_group.count")
    # A Python model with device = "gpu" is placed on GPUs without restating kind = "gpu".
    kind = _take(ig, "kind", str, where, "gpu" if device == "gpu" else "cpu")
    gpus = _take(ig, "gpus", list, where)
    isolation = _take(ig, "isolation", str, where, model_default("isolation"))
    if isolation not in MODEL_OPTIONS["isolation"].choices:
        raise ConfigError(f"{where}isolation must be one of {', '.join(MODEL_OPTIONS['isolation'].choices)}")
    _no_leftovers(ig, "[instance_group]", _keys(InstanceGroup))
    if kind not in INSTANCE_KINDS:
        raise ConfigError(f"{where}kind must be one of {', '.join(INSTANCE_KINDS)}")
    if device == "gpu" and kind != "gpu":
        raise ConfigError(f'device = "gpu" contradicts {where}kind = "{kind}"')
    if gpus is not None:
        if kind != "gpu":
            raise ConfigError(f'{where}gpus needs kind = "gpu"')
        gpus = _int_list(gpus, f"{where}gpus", "instance_group.gpus[]")
        if not gpus or len(set(gpus)) != len(gpus):
            raise ConfigError(f"{where}gpus must list at least one device id, each once")
    group = InstanceGroup(count=count, kind=kind, gpus=gpus if gpus is not None else [0], isolation=isolation)
    if len(group.placements()) > MAX_INSTANCES:
        raise ConfigError(f"{where}count x GPUs must be <= {MAX_INSTANCES} instances, got {len(group.placements())}")
    return group


def _version_policy(vp: dict[str, Any]) -> VersionPolicy:
    where = "[version_policy] "
    latest = _int(vp, "latest", where, None, "version_policy.latest")
    all_versions = _take(vp, "all", bool, where, False)
    specific = _take(vp, "specific", list, where)
    _no_leftovers(vp, "[version_policy]", _keys(VersionPolicy))
    if sum(x is not None and x is not False for x in (latest, all_versions or None, specific)) > 1:
        raise ConfigError(f"{where}set only one of latest, all, specific")
    return VersionPolicy(
        latest=latest if latest is not None else 1,
        all=all_versions,
        specific=_int_list(specific, f"{where}specific", "version_policy.specific[]") if specific is not None else None,
    )


def parse_config(data: dict[str, Any]) -> ModelConfig:
    """Validates a parsed TOML document (or a load API's JSON override merged into one) into a
    ModelConfig; every number is checked against ``RANGES``. Raises one ConfigError listing every
    problem found (``.problems``)."""
    problems: list[str] = []
    token = _problems.set(problems)
    try:
        cfg = _parse(data)
    finally:
        _problems.reset(token)
    if problems:
        raise ConfigError.of(problems)
    return cfg


def _parse(data: dict[str, Any]) -> ModelConfig:
    raw = dict(data)
    table = dict(data)
    cfg = ModelConfig(raw=raw)
    # Unknown top-level keys first: a typo there is the likeliest cause of the problems below.
    leftovers = {k: v for k, v in table.items() if k not in TOP_LEVEL_KEYS}
    _no_leftovers(leftovers, "", TOP_LEVEL_KEYS)
    with _step():
        backend = _take(table, "backend", str, "")
        if backend is not None and backend not in BACKENDS:
            guess = did_you_mean(backend, BACKENDS)
            hint = f"; did you mean '{guess}'?" if guess else ""
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got '{backend}'{hint}")
        cfg.backend = backend
    with _step():
        device = _take(table, "device", str, "", "cpu")
        if device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got '{device}'")
        cfg.device = device
    for key in ("execution_timeout_ms", "max_abandoned_instances", "max_instance_failures"):
        setattr(cfg, key, _int(table, key, "", model_default(key), key))
    cfg.max_batch_size = _int(table, "max_batch_size", "", None, "max_batch_size")
    with _step():
        cfg.isolate_batch_failures = _take(table, "isolate_batch_failures", bool, "", cfg.isolate_batch_failures)
    with _step():
        policy = dict(_take(table, "model_transaction_policy", dict, "", {}))
        cfg.decoupled = _take(policy, "decoupled", bool, "[model_transaction_policy] ", cfg.decoupled)
        _no_leftovers(policy, "[model_transaction_policy]", ("decoupled",))
    with _step():
        cfg.ensemble = _take(table, "ensemble", dict, "")
        if (cfg.ensemble is not None) != (cfg.backend == "ensemble"):
            raise ConfigError('backend = "ensemble" and an [ensemble] table with [[ensemble.step]]s go together')
        if cfg.ensemble is not None and (cfg.decoupled or "sequence_batching" in table):
            raise ConfigError("an ensemble cannot be decoupled or use [sequence_batching]")
    with _step():
        if "sequence_batching" in table and "dynamic_batching" in table:
            raise ConfigError("set [dynamic_batching] or [sequence_batching], not both (as Triton's scheduling choice)")
    with _step():
        cfg.sequence_batching = _take(table, "sequence_batching", dict, "")
        if cfg.sequence_batching is not None:
            if cfg.decoupled:
                raise ConfigError("[sequence_batching] does not work with a decoupled model")
            try:
                _core.check_model_options({"sequence_batching": cfg.sequence_batching})
            except ValueError as e:
                raise ConfigError(f"[sequence_batching] {e}") from None
    with _step():
        cfg.dynamic_batching = _dynamic_batching(dict(_take(table, "dynamic_batching", dict, "", {})))
    with _step():
        cfg.instance_group = _instance_group(dict(_take(table, "instance_group", dict, "", {})), cfg.device)
    with _step():
        cfg.version_policy = _version_policy(dict(_take(table, "version_policy", dict, "", {})))
    with _step():
        cfg.routing = _routing(dict(_take(table, "routing", dict, "", {})))
    with _step():
        cfg.warmup = _warmups(table.pop("warmup", []))
    with _step():
        if cfg.max_batch_size is not None:
            check_batch_sizes(cfg.dynamic_batching, cfg.warmup, cfg.max_batch_size)
    with _step():
        cfg.inputs = _tensors(table.pop("input", []), "input")
    with _step():
        cfg.outputs = _tensors(table.pop("output", []), "output")
    with _step():
        cfg.parameters = dict(_take(table, "parameters", dict, "", {}))
        if cfg.backend is not None:
            check_parameters(cfg.backend, cfg.parameters)
    with _step():
        name = _take(table, "default_model_filename", str, "")
        # A plain file name of the version directory: never a path to load from elsewhere.
        if name is not None and (not MODEL_FILENAME.fullmatch(name) or name in (".", "..")):
            raise ConfigError(f"default_model_filename must be a file name without a directory, got {name!r}")
        cfg.default_model_filename = name
    return cfg


# The [parameters] keys a backend reads (python models' parameters are free-form: the model reads
# them). A near miss of one of these is an error: the setting would silently not apply.
BACKEND_PARAMETERS: dict[str, tuple[str, ...]] = {
    "onnxruntime": (
        "intra_op_num_threads",
        "inter_op_num_threads",
        "intra_op_allow_spinning",
        "tensorrt",
        "tensorrt_fp16",
        "tensorrt_engine_cache_path",
    ),
    "openvino": ("device", "performance_hint", "num_streams", "inference_precision", "inference_num_threads"),
}


def check_parameters(backend: str, parameters: dict[str, Any]) -> list[str]:
    """Reports ``[parameters]`` keys that are typos of what ``backend`` reads (ConfigError outside
    ``parse_config``); returns the other keys it does not read (Triton's own backend parameters in a
    config.pbtxt, say), which the caller may warn about."""
    known = BACKEND_PARAMETERS.get(backend)
    if known is None:
        return []
    unused = []
    for key in sorted(set(parameters) - set(known)):
        guess = did_you_mean(key, known)
        if guess is None:
            unused.append(key)
        else:
            _report(f"[parameters] {key} is not a parameter of the {backend} backend; did you mean {guess}?")
    return unused


def sequence_tensors(sequence_batching: dict[str, Any] | None) -> tuple[set[str], set[str]]:
    """The model inputs the sequence batcher fills (control and state inputs) and the state
    outputs it takes back: the model has them, its clients never see them."""
    if not sequence_batching:
        return set(), set()
    controls = {str(c.get("name")) for c in sequence_batching.get("control_input", []) if isinstance(c, dict)}
    states = [s for s in sequence_batching.get("state", []) if isinstance(s, dict)]
    return controls | {str(s.get("input_name")) for s in states}, {str(s.get("output_name")) for s in states}


def parameter_int(parameters: dict[str, Any], key: str, default: int) -> int:
    """A backend's numeric ``[parameters]`` key, checked against ``RANGES["parameters.<key>"]``."""
    if key not in parameters:
        return default
    return in_range(parameters[key], f"parameters.{key}", f"[parameters] {key}")


def ranges_markdown() -> str:
    """The README's table of numeric config.toml keys, generated from ``RANGES``."""
    lines = ["| Key | Minimum | Maximum | Note |", "| --- | ---: | ---: | --- |"]
    for path, r in RANGES.items():
        lines.append(f"| `{path}` | {r.low:,} | {r.high:,} | {r.why} |")
    return "\n".join(lines) + "\n"


CONFIG_FILES = ("config.toml", "config.pbtxt")


def read_config(model_dir: Path) -> dict[str, Any]:
    """The model's configuration table: ``config.toml``, else Triton's ``config.pbtxt`` converted
    to the same table; neither means all defaults."""
    toml_file, triton_file = model_dir / "config.toml", model_dir / "config.pbtxt"
    if toml_file.is_file():
        if triton_file.is_file():
            log.info(
                "model '%s': config.toml and config.pbtxt both exist; config.toml is used",
                model_dir.name,
                extra=model_fields(model_dir.name),
            )
        text = toml_file.read_bytes().decode("utf-8", "replace")
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config.toml is not valid TOML: {e}") from None
    if triton_file.is_file():
        from . import pbtxt

        text = triton_file.read_bytes().decode("utf-8", "replace")
        converted = pbtxt.convert(text, model_dir.name)
        if converted.warnings:
            log.warning(
                "model '%s': config.pbtxt sets fields that only tune performance and have no effect in fastserve: %s",
                model_dir.name,
                ", ".join(converted.warnings),
                extra=model_fields(model_dir.name),
            )
        return converted.table
    return {}

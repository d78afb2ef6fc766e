"""Model repositories: ``<repo>/<model>/<version>/model.{onnx,py,xml}`` plus an optional
``<repo>/<model>/config.toml``, and the lifecycle of what is loaded from them.

Single-model mode (``model_name``, KServe's layout): the repository directory is that one model's
directory, so ``/mnt/models/config.toml`` + ``/mnt/models/1/model.onnx``; with no version
directories, a model file directly in it (``/mnt/models/model.onnx``) is version 1.

A version that fails to load is registered with its reason, so ready/metadata answers explain it,
and every other model still serves. A reload that fails leaves the serving version in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import LoadContext, LoadError, load_version
from .config import ConfigError, ModelConfig, parse_config
from .warmup import run_warmup

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("fastserve.repository")

# Model names become URL path segments: no separators, no dot-dot, no hidden directories.
MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

CONTROL_MODES = ("none", "poll", "explicit")
MODEL_FILES = ("model.onnx", "model.xml", "model.py")


def _replacement(ctx: LoadContext) -> Callable[[int], Any]:
    """Creates a fresh instance for a seat whose instance hung, the way ``instance_group.count``
    creates them: the backend loads the version again with one instance, placed where the seat was."""
    group = ctx.config.instance_group
    placements = group.placements()

    def create(seat: int) -> Any:
        device = placements[seat] if seat < len(placements) else None
        one = dataclasses.replace(group, count=1, gpus=[device] if device is not None else group.gpus)
        config = dataclasses.replace(ctx.config, instance_group=one)
        return load_version(dataclasses.replace(ctx, config=config)).instances[0]

    return create


@dataclass(frozen=True)
class VersionStatus:
    name: str
    version: int
    ready: bool
    reason: str = ""


def model_dir(repo: Path, name: str) -> Path:
    """The directory of model ``name``, refusing anything that is not a plain child directory."""
    if not MODEL_NAME.match(name) or ".." in name:
        raise LoadError(f"invalid model name '{name}'")
    path = repo / name
    if not path.is_dir() or path.resolve().parent != repo.resolve():
        raise LoadError(f"model '{name}' is not a directory of the model repository")
    return path


def model_names(repo: Path) -> list[str]:
    """Model directories that really are inside ``repo`` (a symlink out of it is ignored)."""
    root = repo.resolve()
    return sorted(
        p.name for p in repo.iterdir() if p.is_dir() and MODEL_NAME.match(p.name) and p.resolve().parent == root
    )


def version_numbers(path: Path) -> list[int]:
    """Numeric version directories that really are inside ``path`` (a symlink out is ignored)."""
    root = path.resolve()
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit() and p.resolve().parent == root)


def version_dirs(path: Path, bare_is_version_1: bool = False) -> dict[int, Path]:
    """Version number -> directory; with ``bare_is_version_1`` and no version directories, a model
    file directly in ``path`` makes ``path`` itself version 1."""
    dirs = {v: path / str(v) for v in version_numbers(path)}
    if not dirs and bare_is_version_1 and any((path / f).is_file() for f in MODEL_FILES):
        return {1: path}
    return dirs


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def version_fingerprint(path: Path) -> str:
    """Changes whenever a file of the version directory is added, removed or rewritten."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return _digest(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.toml"
    if not file.is_file():
        return {}
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config.toml is not valid TOML: {e}") from None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A config override replaces whole top-level keys and tables: overriding ``[version_policy]``
    with ``specific`` must not keep the file's ``latest`` beside it."""
    return {**base, **override}


@dataclass
class _Loaded:
    """What was loaded of one model, to tell later whether anything changed."""

    config_digest: str
    override: dict[str, Any] | None = None
    serving: dict[int, str] = field(default_factory=dict)  # version -> fingerprint of what serves
    failed: dict[int, str] = field(default_factory=dict)  # version -> fingerprint that failed


class ModelRepository:
    """Loads, reloads and unloads the models of one repository. One change runs at a time; the
    index can be read meanwhile and shows LOADING/UNLOADING states."""

    def __init__(self, core: Any, root: Path, model_name: str | None = None) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"model repository '{root}' is not a directory")
        if model_name is not None and (not MODEL_NAME.match(model_name) or ".." in model_name):
            raise ValueError(f"invalid model name '{model_name}'")
        self.core = core
        self.root = root
        self.single = model_name  # single-model mode: root is this model's directory
        self._change = threading.RLock()
        self._state_lock = threading.Lock()
        self._transient: dict[tuple[str, int], str] = {}
        self._reasons: dict[tuple[str, int], str] = {}
        self._loaded: dict[str, _Loaded] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def _public(self, reason: str) -> str:
        """The reason as API clients see it: without the server's filesystem layout."""
        for prefix in {str(self.root.resolve()), str(self.root.absolute()), str(self.root)}:
            reason = reason.replace(prefix, "<repository>")
        return reason

    def _names(self) -> list[str]:
        return [self.single] if self.single is not None else model_names(self.root)

    def _dir(self, name: str) -> Path:
        """The directory of ``name``; raises LookupError for a model this repository does not have."""
        if self.single is not None and name != self.single:
            raise LookupError(f"model '{name}' is not in the model repository (it serves only '{self.single}')")
        try:
            return self.root if self.single is not None else model_dir(self.root, name)
        except LoadError as e:
            raise LookupError(str(e)) from None

    def _set(self, name: str, version: int, transient: str | None = None, reason: str | None = None) -> None:
        with self._state_lock:
            if transient is None:
                self._transient.pop((name, version), None)
            else:
                self._transient[(name, version)] = transient
            if reason is not None:
                self._reasons[(name, version)] = reason

    # -- loading -------------------------------------------------------------------------------

    def load_all(self, names: Iterable[str] | None = None) -> list[VersionStatus]:
        """Loads the given models (default: every model of the repository); failures are recorded."""
        statuses: list[VersionStatus] = []
        for name in self._names() if names is None else names:
            try:
                statuses.extend(self.load(name))
            except LookupError as e:
                log.error("%s", e)
                statuses.append(VersionStatus(name, 0, False, str(e)))
        return statuses

    def load(
        self, name: str, override: dict[str, Any] | None = None, *, keep_override: bool = False, retry: bool = True
    ) -> list[VersionStatus]:
        """Loads or reloads ``name``: changed versions are rebuilt and swapped in while the old ones
        serve; versions the policy no longer selects are drained and removed. With ``retry=False``
        (polling) versions that failed are retried only once their files or config change."""
        with self._change:
            path = self._dir(name)
            current = self._loaded.get(name) or _Loaded(config_digest="")
            if keep_override:
                override = current.override
            config_file = path / "config.toml"
            text = config_file.read_bytes().decode("utf-8", "replace") if config_file.is_file() else ""
            digest = _digest([text, json.dumps(override, sort_keys=True, default=str)])
            same_config = current.config_digest == digest
            dirs = version_dirs(path, bare_is_version_1=self.single is not None)
            versions = sorted(dirs)
            new = _Loaded(config_digest=digest, override=override)
            try:
                config = parse_config(_merge(_read_config(path), override or {}))
            except ConfigError as e:
                if same_config and not retry:
                    return []
                new.serving = dict(current.serving)
                self._loaded[name] = new
                return [self._fail(name, v, str(e), v in current.serving) for v in (versions or [1])]
            selected = config.version_policy.select(versions)
            if not selected:
                reason = (
                    "no numeric version directories"
                    if not versions
                    else (f"version_policy selects none of the versions {versions}")
                )
                new.serving = dict(current.serving)
                self._loaded[name] = new
                return [self._fail(name, versions[-1] if versions else 1, reason, False)]
            statuses = []
            for v in selected:
                fingerprint = version_fingerprint(dirs[v])
                if same_config and current.serving.get(v) == fingerprint and self._is_ready(name, v):
                    new.serving[v] = fingerprint
                    statuses.append(VersionStatus(name, v, True))
                    continue
                if same_config and current.failed.get(v) == fingerprint and not retry:
                    new.failed[v] = fingerprint
                    continue
                status = self._load_version(name, path, dirs[v], v, config, serving=v in current.serving)
                statuses.append(status)
                if status.ready:
                    new.serving[v] = fingerprint
                else:
                    new.failed[v] = fingerprint
                    if v in current.serving:  # the old version still serves
                        new.serving[v] = current.serving[v]
            registered = {v for n, v, _ in self.core.models() if n == name}
            for v in sorted(registered - set(selected)):
                self._unload_version(name, v)
            self._loaded[name] = new
            if new.serving:
                self.core.set_routing(name, dict(config.routing.labels), dict(config.routing.weights))
            return statuses

    def _is_ready(self, name: str, version: int) -> bool:
        return any(n == name and v == version and ready for n, v, ready in self.core.models())

    def _fail(self, name: str, version: int, reason: str, serving: bool) -> VersionStatus:
        public = self._public(reason)
        if serving and self._is_ready(name, version):
            log.error("reloading model '%s' version %s failed, the serving version stays: %s", name, version, reason)
        else:
            log.error("model '%s' version %s failed to load: %s", name, version, reason)
            self.core.add_failed_model(name, version, public)
        self._set(name, version, reason=public)
        return VersionStatus(name, version, False, public)

    def _load_version(
        self, name: str, path: Path, version_dir: Path, version: int, config: ModelConfig, serving: bool
    ) -> VersionStatus:
        self._set(name, version, "LOADING")
        ctx = LoadContext(name=name, version=version, model_dir=path, version_dir=version_dir, config=config)
        try:
            loaded = load_version(ctx)
            run_warmup(loaded, config.warmup)
            batching = config.dynamic_batching
            self.core.add_model(
                name,
                version,
                loaded.platform,
                [t.as_tuple() for t in loaded.inputs],
                [t.as_tuple() for t in loaded.outputs],
                loaded.instances,
                max_batch_size=loaded.max_batch_size,
                max_queue_delay_us=batching.max_queue_delay_us,
                preferred_batch_sizes=list(batching.preferred_batch_sizes),
                max_queue_size=batching.max_queue_size,
                default_queue_timeout_us=batching.default_queue_timeout_us,
                priority_levels=batching.priority_levels,
                default_priority_level=batching.default_priority_level,
                execution_timeout_ms=config.execution_timeout_ms,
                instance_factory=_replacement(ctx) if config.execution_timeout_ms > 0 else None,
            )
        except (LoadError, ConfigError, ValueError) as e:
            return self._fail(name, version, str(e), serving)
        except Exception as e:  # a backend bug must not take the other models down
            log.exception("unexpected error loading model '%s' version %s", name, version)
            return self._fail(name, version, f"{type(e).__name__}: {e}", serving)
        finally:
            self._set(name, version)
        self._set(name, version, reason="")
        log.info(
            "loaded model '%s' version %s (%s, max_batch_size %s, %s instance(s))",
            name,
            version,
            loaded.platform,
            loaded.max_batch_size,
            len(loaded.instances),
        )
        return VersionStatus(name, version, True)

    # -- unloading -----------------------------------------------------------------------------

    def _unload_version(self, name: str, version: int) -> None:
        self._set(name, version, "UNLOADING")
        try:
            self.core.remove_model(name, version)
        finally:
            self._set(name, version)
            with self._state_lock:
                self._reasons.pop((name, version), None)
        log.info("unloaded model '%s' version %s", name, version)

    def unload(self, name: str) -> int:
        """Stops admitting requests to every version of ``name``, drains them, and removes them."""
        with self._change:
            versions = sorted({v for n, v, _ in self.core.models() if n == name})
            if not versions and name not in self._loaded:
                self._dir(name)
            for v in versions:
                self._unload_version(name, v)
            self._loaded.pop(name, None)
            return len(versions)

    # -- index and polling ---------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[tuple[str, str | None, str, str]]:
        """``(name, version, state, reason)`` for every model of the repository and every
        registered version. Never waits for a load in progress."""
        registered = {(n, v): ready for n, v, ready in self.core.models()}
        with self._state_lock:
            transient = dict(self._transient)
            reasons = dict(self._reasons)
        keys = set(registered) | set(transient)
        rows: list[tuple[str, str | None, str, str]] = []
        for name in sorted(set(self._names()) | {n for n, _ in keys}):
            versions = sorted(v for n, v in keys if n == name)
            if not versions:
                rows.append((name, None, "UNAVAILABLE", "unloaded"))
            for v in versions:
                state = transient.get((name, v)) or ("READY" if registered.get((name, v)) else "UNAVAILABLE")
                rows.append((name, str(v), state, reasons.get((name, v), "")))
        return [r for r in rows if r[2] == "READY"] if ready_only else rows

    def poll_once(self) -> None:
        """Loads new and changed models, unloads removed ones."""
        with self._change:
            present = set(self._names())
            for name in sorted(present):
                try:
                    self.load(name, keep_override=True, retry=False)
                except LookupError as e:
                    log.error("%s", e)
            for name in sorted(set(self._loaded) - present):
                self.unload(name)

    def start_polling(self, interval_s: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.poll_once()
                except Exception:
                    log.exception("repository poll failed")

        self._poller = threading.Thread(target=loop, name="fastserve-repository-poll", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()


class RepositoryApi:
    """The repository API as the Rust front ends call it (JSON parameters in, errors as exceptions:
    LookupError → 404, PermissionError → 403, anything else → 400)."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def index(self, ready_only: bool) -> list[tuple[str, str | None, str, str]]:
        return self.repository.index(ready_only)

    def load(self, name: str, parameters_json: str) -> None:
        parameters = json.loads(parameters_json or "{}")
        override = None
        for key, value in parameters.items():
            if key == "config":
                try:
                    override = json.loads(value) if isinstance(value, str) else value
                except json.JSONDecodeError as e:
                    raise ValueError(f"parameter 'config' is not valid JSON: {e}") from None
                if not isinstance(override, dict):
                    raise ValueError("parameter 'config' must be a JSON object of config.toml keys")
            elif key.startswith("file:"):
                raise PermissionError("file overrides are not accepted: models load only from the repository")
        statuses = self.repository.load(name, override)
        failed = [s for s in statuses if not s.ready]
        if failed:
            raise ValueError(
                "; ".join(f"failed to load model '{s.name}' version {s.version}: {s.reason}" for s in failed)
            )

    def unload(self, name: str, parameters_json: str) -> None:
        self.repository.unload(name)

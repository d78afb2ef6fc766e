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
import gc
import hashlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import (
    LoadContext,
    LoadedModel,
    LoadError,
    finalize_instances,
    load_version,
    module_name,
    release_version,
    set_module,
)
from .config import (
    CONFIG_FILES,
    I64_MAX,
    ConfigError,
    ModelConfig,
    check_batch_sizes,
    parse_config,
    read_config,
    sequence_tensors,
)
from .logs import model_fields
from .warmup import run_warmup

# Ensembles run this many requests at once unless [instance_group] count says otherwise.
ENSEMBLE_INSTANCES = 8

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
        return load_version(dataclasses.replace(ctx, config=config, first_instance=seat)).instances[0]

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


# A version directory's name: a number without leading zeros (so no two names mean one version).
VERSION_DIR = re.compile(r"0|[1-9][0-9]*")
# Directories that are never models and not worth a word: version control, editors, bytecode.
_NOT_MODELS = re.compile(r"^\.|^__pycache__$")


def model_dir_signs(path: Path) -> str | None:
    """Why ``path`` looks like one model's directory rather than a repository of models, or None."""
    for f in (*CONFIG_FILES, *MODEL_FILES):
        if (path / f).is_file():
            return f"it holds {f}"
    for p in sorted(path.iterdir()):
        if VERSION_DIR.fullmatch(p.name) and p.is_dir() and any((p / f).is_file() for f in MODEL_FILES):
            return f"its directory '{p.name}' holds a model file, as a version directory does"
    return None


def scan(repo: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """The model directories of ``repo``, and the directories skipped with why and how to fix it."""
    root = repo.resolve()
    signs = model_dir_signs(repo)
    if signs is not None:
        why = (
            f"the model repository looks like a model directory ({signs}); use --model-name NAME to serve it as "
            "the one model NAME, or point --model-repository at its parent"
        )
        return [], [(repo, why)]
    names, skipped = [], []
    for p in sorted(repo.iterdir()):
        if not p.is_dir() or _NOT_MODELS.search(p.name):
            continue
        if not MODEL_NAME.match(p.name) or ".." in p.name:
            skipped.append(
                (
                    p,
                    "not a valid model name (letters, digits, '_', '.' and '-', up to 128, not starting with '-'); "
                    "rename the directory",
                )
            )
        elif p.resolve().parent != root:
            skipped.append((p, "a symbolic link out of the model repository; copy or move the model into it"))
        else:
            names.append(p.name)
    return names, skipped


def model_names(repo: Path) -> list[str]:
    """Model directories that really are inside ``repo``; skipped ones are logged (once) with why."""
    names, skipped = scan(repo)
    for path, why in skipped:
        _skip(path, "directory", why)
    return names


_skipped: set[Path] = set()


def _skip(path: Path, what: str, why: str) -> None:
    """Logs a skipped directory once, not on every poll."""
    if path not in _skipped:
        _skipped.add(path)
        log.warning("ignoring %s '%s': %s", what, path, why)


def _version_of(p: Path) -> int | None:
    """The version a directory name stands for, or None (logged when it looks like a number)."""
    if not p.name.isdigit():
        return None
    if not VERSION_DIR.fullmatch(p.name):
        _skip(
            p, "version directory", "version directory names are numbers written without leading zeros in ASCII digits"
        )
        return None
    if len(p.name) > 19 or int(p.name) > I64_MAX:
        _skip(p, "version directory", f"version numbers go up to {I64_MAX}")
        return None
    return int(p.name)


def version_dirs(path: Path, bare_is_version_1: bool = False) -> dict[int, Path]:
    """Version number -> directory, for version directories that really are inside ``path`` (a
    symlink out is ignored); with ``bare_is_version_1`` and no version directories, a model file
    directly in ``path`` makes ``path`` itself version 1."""
    root = path.resolve()
    dirs = {}
    for p in path.iterdir():
        version = _version_of(p)
        if version is not None and p.is_dir() and p.resolve().parent == root:
            dirs[version] = p
    if not dirs and bare_is_version_1 and any((path / f).is_file() for f in MODEL_FILES):
        return {1: path}
    return dict(sorted(dirs.items()))


def version_numbers(path: Path) -> list[int]:
    """Numeric version directories that really are inside ``path``."""
    return sorted(version_dirs(path))


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


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A config override replaces whole top-level keys and tables: overriding ``[version_policy]``
    with ``specific`` must not keep the file's ``latest`` beside it."""
    return {**base, **override}


@dataclass
class _Loaded:
    """What serves of one model, to tell later whether anything changed."""

    config_digest: str
    override: dict[str, Any] | None = None
    serving: dict[int, str] = field(default_factory=dict)  # version -> fingerprint of what serves
    failed_attempt: str = ""  # the last attempt that failed; polling retries only a different one


@dataclass
class _Built:
    """A version loaded and warmed up but not registered yet: the load transaction's work in progress."""

    ctx: LoadContext
    loaded: LoadedModel
    previous_module: Any  # the version's sys.modules entry before this build (a serving copy, or None)

    @property
    def version(self) -> int:
        return int(self.ctx.version)

    def discard(self) -> None:
        """Undoes the build: its instances are finalized and the module entry it replaced is back."""
        finalize_instances(self.loaded.instances)
        set_module(self.ctx.name, self.version, self.previous_module)

    def forget_replaced(self) -> None:
        """Once registered: a build that imported no model.py (another backend) leaves the replaced
        version's module behind in sys.modules; drop it with the instances it belonged to."""
        key = module_name(self.ctx.name, self.version)
        if self.previous_module is not None and sys.modules.get(key) is self.previous_module:
            release_version(self.ctx.name, self.version)


class _Abort(Exception):
    """Ends a load transaction: ``failures`` maps versions to their reasons."""

    def __init__(self, failures: dict[int, str]) -> None:
        super().__init__(failures)
        self.failures = failures


def _reason(name: str, version: int, e: BaseException) -> str:
    """The reason a version failed, as users see it; unexpected errors (a backend bug, a Rust
    panic) are logged with their traceback."""
    if isinstance(e, (LoadError, ValueError)):
        return str(e)
    log.error(
        "unexpected error loading model '%s' version %s", name, version, exc_info=e, extra=model_fields(name, version)
    )
    return f"{type(e).__name__}: {e}"


class ModelRepository:
    """Loads, reloads and unloads the models of one repository. One change runs at a time; the
    index can be read meanwhile and shows LOADING/UNLOADING states.

    A (re)load is a transaction: every version that needs (re)loading is built and warmed up
    unregistered, and only when all of them succeeded are they registered, routing set and versions
    no longer selected unloaded. On any failure what served before serves on unchanged."""

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
        self._failures: dict[str, dict[int, str]] = {}  # model -> version -> reason of its last failed load
        self._loaded: dict[str, _Loaded] = {}
        self._garbage = False  # versions were built or removed since the last collection
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._started = time.monotonic()  # when the load under way started (for its log lines)

    def _collect(self) -> None:
        """Frees what replaced, aborted and unloaded versions left: a Python model's module, its
        classes and their data form reference cycles, which only the cycle collector frees."""
        if self._garbage:
            self._garbage = False
            gc.collect()

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

    def _set(self, name: str, version: int, transient: str | None = None) -> None:
        with self._state_lock:
            if transient is None:
                self._transient.pop((name, version), None)
            else:
                self._transient[(name, version)] = transient
            loading = [(n, v) for (n, v), state in sorted(self._transient.items()) if state == "LOADING"]
        # A startup probe names what it waits for.
        self.core.set_loading(loading)

    def _set_failures(self, name: str, failures: dict[int, str] | None) -> None:
        with self._state_lock:
            if failures:
                self._failures[name] = dict(failures)
            else:
                self._failures.pop(name, None)

    def _versions(self, name: str) -> dict[int, bool]:
        """The registered versions of ``name`` and whether each is ready."""
        return {v: ready for n, v, ready in self.core.models() if n == name}

    # -- loading -------------------------------------------------------------------------------

    def load_all(self, names: Iterable[str] | None = None) -> list[VersionStatus]:
        """Loads the given models (default: every model of the repository), ensembles after the
        models they compose; failures are recorded."""
        statuses: list[VersionStatus] = []
        if names is None:
            names = self._names()
            if not names:
                log.warning(
                    "the model repository '%s' has no models: each model is a directory holding numbered version "
                    "directories (%s)",
                    self.root,
                    "<repository>/<model>/1/model.onnx, model.xml or model.py",
                )
        for name in sorted(names, key=self._is_ensemble):
            try:
                statuses.extend(self.load(name))
            except LookupError as e:
                log.error("%s", e)
                statuses.append(VersionStatus(name, 0, False, str(e)))
            except Exception as e:  # an unreadable model directory must not stop the others
                log.exception("loading model '%s' failed", name, extra=model_fields(name))
                statuses.append(VersionStatus(name, 0, False, self._public(f"{type(e).__name__}: {e}")))
        return statuses

    def _is_ensemble(self, name: str) -> bool:
        try:
            return read_config(self._dir(name)).get("backend") == "ensemble"
        except Exception:  # an unreadable config fails in load() with its reason
            return False

    def load(
        self, name: str, override: dict[str, Any] | None = None, *, keep_override: bool = False, retry: bool = True
    ) -> list[VersionStatus]:
        """Loads or reloads ``name`` as one transaction (see the class). With ``retry=False``
        (polling) an attempt that failed is retried only once files or config change."""
        with self._change:
            try:
                path = self._dir(name)
            except LookupError as e:
                # Triton's wording, then why.
                raise LookupError(f"failed to load '{name}', failed to poll from model repository: {e}") from None
            current = self._loaded.get(name) or _Loaded(config_digest="")
            self._started = time.monotonic()
            if keep_override:
                override = current.override
            try:
                return self._transact(name, path, current, override, retry)
            finally:
                self._collect()

    def _transact(
        self, name: str, path: Path, current: _Loaded, override: dict[str, Any] | None, retry: bool
    ) -> list[VersionStatus]:
        texts = [(path / f).read_bytes().decode("utf-8", "replace") for f in CONFIG_FILES if (path / f).is_file()]
        digest = _digest([*texts, json.dumps(override, sort_keys=True, default=str)])
        dirs = version_dirs(path, bare_is_version_1=self.single is not None)
        try:
            config = parse_config(_merge(read_config(path), override or {}))
        except ConfigError as e:
            attempt = _digest(["config", digest])
            return self._abort(name, current, attempt, retry, {v: str(e) for v in (list(dirs) or [1])})
        selected = config.version_policy.select(list(dirs))
        if not selected:
            reason = (
                f"version_policy selects none of the versions {list(dirs)}"
                if dirs
                else f"no numeric version directories: put the model's files in '{name}/1/' (a directory per "
                "version, named by its number)"
            )
            attempt = _digest(["none", digest, *map(str, dirs)])
            return self._abort(name, current, attempt, retry, {max(dirs, default=1): reason})
        fingerprints = {v: version_fingerprint(dirs[v]) for v in selected}
        ready = self._versions(name)
        unchanged = current.config_digest == digest
        stale = [v for v in selected if not (unchanged and current.serving.get(v) == fingerprints[v] and ready.get(v))]
        attempt = _digest([digest, *(f"{v}:{fingerprints[v]}" for v in stale)])
        if not retry and attempt == current.failed_attempt:
            return []
        try:
            built = self._build(name, path, dirs, stale, config)
            self._register(name, built, config)
        except _Abort as e:
            return self._abort(name, current, attempt, True, e.failures)
        self._loaded[name] = _Loaded(config_digest=digest, override=override, serving=fingerprints)
        self._set_failures(name, None)
        self.core.set_routing(name, dict(config.routing.labels), dict(config.routing.weights))
        for v in sorted(set(self._versions(name)) - set(selected)):
            self._unload_version(name, v)
        return [VersionStatus(name, v, True) for v in selected]

    def _build(
        self, name: str, path: Path, dirs: dict[int, Path], stale: list[int], config: ModelConfig
    ) -> list[_Built]:
        """Loads and warms up each stale version without registering it; on the first failure the
        versions built so far are discarded and the transaction aborts."""
        built: list[_Built] = []
        for version in stale:
            self._garbage = True
            self._set(name, version, "LOADING")
            log.info("loading model '%s' version %s", name, version, extra=model_fields(name, version))
            try:
                built.append(self._build_version(name, path, dirs[version], version, config))
            except BaseException as e:
                for b in built:
                    b.discard()
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise _Abort({version: _reason(name, version, e)}) from None
            finally:
                self._set(name, version)
        return built

    def _build_version(self, name: str, path: Path, version_dir: Path, version: int, config: ModelConfig) -> _Built:
        ctx = LoadContext(name=name, version=version, model_dir=path, version_dir=version_dir, config=config)
        previous = sys.modules.get(module_name(name, version))
        built = _Built(ctx, load_version(ctx), previous)
        try:
            # A config without max_batch_size learns the backend's choice only now.
            check_batch_sizes(config.dynamic_batching, config.warmup, built.loaded.max_batch_size)
            run_warmup(built.loaded, config.warmup)
        except BaseException:
            built.discard()
            raise
        return built

    def _register(self, name: str, built: list[_Built], config: ModelConfig) -> None:
        """Registers every built version; each replaced same-numbered version drains meanwhile.
        Should the native side refuse one, the rest are discarded and the transaction aborts (the
        versions registered before it stay: they loaded and serve)."""
        for i, b in enumerate(built):
            try:
                self._add_model(name, b, config)
            except BaseException as e:
                # Its instances may be the native side's now (it finalizes them); its module is not.
                set_module(name, b.version, b.previous_module)
                for rest in built[i + 1 :]:
                    rest.discard()
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise _Abort({b.version: _reason(name, b.version, e)}) from None
            b.forget_replaced()
            log.info(
                "loaded model '%s' version %s (%s, max_batch_size %s, %s instance(s)) in %.2f s",
                name,
                b.version,
                b.loaded.platform,
                b.loaded.max_batch_size,
                len(b.loaded.instances),
                time.monotonic() - self._started,
                extra=model_fields(name, b.version),
            )

    def _add_model(self, name: str, b: _Built, config: ModelConfig) -> None:
        options = {
            **dataclasses.asdict(config.dynamic_batching),
            "max_batch_size": b.loaded.max_batch_size,
            "execution_timeout_ms": config.execution_timeout_ms,
            "max_abandoned_instances": config.max_abandoned_instances,
            "isolate_batch_failures": config.isolate_batch_failures,
            "isolation": config.instance_group.isolation,
            "max_instance_failures": config.max_instance_failures,
            "decoupled": config.decoupled,
            "sequence_batching": config.sequence_batching,
        }
        if b.loaded.platform == "ensemble" and config.ensemble is not None:
            # Ensemble instances are threads that wait on steps: several by default.
            count = config.instance_group.count if "instance_group" in config.raw else ENSEMBLE_INSTANCES
            self.core.add_ensemble(
                name,
                b.version,
                [t.as_tuple() for t in b.loaded.inputs],
                [t.as_tuple() for t in b.loaded.outputs],
                config.ensemble,
                count,
                options,
            )
            return
        # A model file (ONNX) lists the sequence batcher's control and state tensors too.
        hidden_inputs, hidden_outputs = sequence_tensors(config.sequence_batching)
        self.core.add_model(
            name,
            b.version,
            b.loaded.platform,
            [t.as_tuple() for t in b.loaded.inputs if t.name not in hidden_inputs],
            [t.as_tuple() for t in b.loaded.outputs if t.name not in hidden_outputs],
            b.loaded.instances,
            options,
            _replacement(b.ctx) if config.execution_timeout_ms > 0 else None,
        )

    def _abort(
        self, name: str, current: _Loaded, attempt: str, retry: bool, failures: dict[int, str]
    ) -> list[VersionStatus]:
        """Reports a failed attempt and leaves what serves as it is. Only when no version of the
        model serves are the failures registered, so ready/metadata answers explain them; else they
        show in the repository index (registering them would make the server unready)."""
        if not retry and attempt == current.failed_attempt:
            return []
        registered = self._versions(name)
        serving = ", ".join(f"version {v}" for v, ready in sorted(registered.items()) if ready)
        public = {v: self._public(reason) for v, reason in failures.items()}
        for version, reason in failures.items():
            self.core.record_load_failure(name, version)
            fields = model_fields(name, version)
            took = time.monotonic() - self._started
            if serving:
                log.error(
                    "loading model '%s' version %s failed after %.2f s (%s serve on): %s",
                    *(name, version, took, serving, reason),
                    extra=fields,
                )
            else:
                log.error(
                    "model '%s' version %s failed to load after %.2f s: %s", name, version, took, reason, extra=fields
                )
                self.core.add_failed_model(name, version, public[version])
        if not serving:  # failures of an earlier attempt that this one does not repeat
            for version in sorted(set(registered) - set(failures)):
                self.core.remove_model(name, version)
        self._set_failures(name, public)
        self._loaded[name] = dataclasses.replace(current, failed_attempt=attempt)
        return [VersionStatus(name, v, False, reason) for v, reason in public.items()]

    # -- unloading -----------------------------------------------------------------------------

    def _unload_version(self, name: str, version: int) -> None:
        """Drains and removes one version, then drops the module it leaves in ``sys.modules``."""
        self._set(name, version, "UNLOADING")
        self._garbage = True
        try:
            self.core.remove_model(name, version)
        finally:
            self._set(name, version)
            release_version(name, version)
        log.info("unloaded model '%s' version %s", name, version, extra=model_fields(name, version))

    def unload(self, name: str) -> int:
        """Stops admitting requests to every version of ``name``, drains them, and removes them."""
        with self._change:
            versions = sorted(self._versions(name))
            if not versions and name not in self._loaded:
                self._dir(name)
            try:
                for v in versions:
                    self._unload_version(name, v)
            finally:
                self._loaded.pop(name, None)
                self._set_failures(name, None)
                self._collect()
            return len(versions)

    # -- index and polling ---------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[tuple[str, str | None, str, str]]:
        """``(name, version, state, reason)`` for every model of the repository, every registered
        version and every version whose last load failed. Never waits for a load in progress."""
        registered = {(n, v): ready for n, v, ready in self.core.models()}
        with self._state_lock:
            transient = dict(self._transient)
            reasons = {(n, v): r for n, failed in self._failures.items() for v, r in failed.items()}
        keys = set(registered) | set(transient) | set(reasons)
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
        """Loads new and changed models, unloads removed ones; one model's failure never stops
        the others."""
        with self._change:
            present = set(self._names())
            for name in sorted(present):
                try:
                    self.load(name, keep_override=True, retry=False)
                except LookupError as e:
                    log.error("%s", e)
                except Exception:
                    log.exception("polling model '%s' failed", name)
            for name in sorted(set(self._loaded) - present):
                self.unload(name)

    def start_polling(self, interval_s: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.poll_once()
                except BaseException:  # a Rust panic (PanicException) included: polling goes on
                    log.exception("repository poll failed")

        self._poller = threading.Thread(target=loop, name="fastserve-repository-poll", daemon=True)
        self._poller.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stops polling; waits up to ``timeout_s`` for a poll under way (a load may take long; the
        poller is a daemon thread, so a shutdown need not wait for it)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout_s)


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
            # Triton's wording: one line per failed version.
            lines = (f"version {s.version} is at UNAVAILABLE state: {s.reason};" for s in failed)
            raise ValueError("\n".join(f"load failed for model '{name}': {line}" for line in lines))

    def unload(self, name: str, parameters_json: str) -> None:
        self.repository.unload(name)

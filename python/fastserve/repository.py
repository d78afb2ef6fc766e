"""Model repositories: ``<repo>/<model>/<version>/model.{onnx,py}`` plus an optional
``<repo>/<model>/config.toml``. A model that fails to load is registered with its reason, so
ready/metadata answers explain it, and every other model still serves."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import LoadContext, LoadError, load_version
from .config import ConfigError, ModelConfig, load_config

log = logging.getLogger("fastserve.repository")

# Model names become URL path segments: no separators, no dot-dot, no hidden directories.
MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


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
    root = repo.resolve()
    if not path.is_dir() or path.resolve().parent != root:
        raise LoadError(f"model '{name}' is not a directory of the model repository")
    return path


def model_names(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and MODEL_NAME.match(p.name))


def version_numbers(path: Path) -> list[int]:
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def load_model(core: Any, repo: Path, name: str) -> list[VersionStatus]:
    """Loads the versions of one model that its version policy selects."""
    try:
        path = model_dir(repo, name)
    except LoadError as e:
        log.error("%s", e)
        return [VersionStatus(name, 0, False, str(e))]
    versions = version_numbers(path)
    try:
        config = load_config(path)
    except ConfigError as e:
        return [_failed(core, name, v, str(e), repo) for v in (versions or [1])]
    if not versions:
        return [_failed(core, name, 1, "no numeric version directories", repo)]
    selected = config.version_policy.select(versions)
    if not selected:
        return [_failed(core, name, versions[-1], f"version_policy selects none of the versions {versions}", repo)]
    return [_load_version(core, repo, name, v, config) for v in selected]


def _public(reason: str, repo: Path) -> str:
    """The reason as API clients see it: without the server's filesystem layout."""
    for prefix in {str(repo.resolve()), str(repo.absolute()), str(repo)}:
        reason = reason.replace(prefix, "<repository>")
    return reason


def _failed(core: Any, name: str, version: int, reason: str, repo: Path) -> VersionStatus:
    log.error("model '%s' version %s failed to load: %s", name, version, reason)
    public = _public(reason, repo)
    core.add_failed_model(name, version, public)
    return VersionStatus(name, version, False, public)


def _load_version(core: Any, repo: Path, name: str, version: int, config: ModelConfig) -> VersionStatus:
    path = repo / name
    ctx = LoadContext(name=name, version=version, model_dir=path, version_dir=path / str(version), config=config)
    try:
        loaded = load_version(ctx)
        batching = config.dynamic_batching
        core.add_model(
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
        )
    except (LoadError, ConfigError, ValueError) as e:
        return _failed(core, name, version, str(e), repo)
    except Exception as e:  # a backend bug must not take the other models down
        log.exception("unexpected error loading model '%s' version %s", name, version)
        return _failed(core, name, version, f"{type(e).__name__}: {e}", repo)
    log.info(
        "loaded model '%s' version %s (%s, max_batch_size %s, %s instance(s))",
        name,
        version,
        loaded.platform,
        loaded.max_batch_size,
        len(loaded.instances),
    )
    return VersionStatus(name, version, True)


def load_repository(core: Any, repo: Path) -> list[VersionStatus]:
    """Loads every model of the repository; failures are recorded, not raised."""
    if not repo.is_dir():
        raise FileNotFoundError(f"model repository '{repo}' is not a directory")
    statuses: list[VersionStatus] = []
    for name in model_names(repo):
        statuses.extend(load_model(core, repo, name))
    return statuses

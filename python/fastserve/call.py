"""In-process calls between models (Triton's BLS): inside ``execute``, ``fastserve.infer`` runs
another model of the same server through its own queue, batching and statistics, with no network
and no serialization; the GIL is released while it runs. A call back into a model that is waiting
on this one (itself, or a cycle) is refused with an error instead of deadlocking, and calls count
toward the caller's ``execution_timeout_ms``."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _core


def infer(
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    version: int | str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Runs ``inputs`` on ``model_name`` (``version``: a number or label; None lets routing pick)
    and returns every output. Raises ``RuntimeError`` with the server's message on failure."""
    return _core.infer(model_name, dict(inputs), None if version is None else str(version), parameters)


async def infer_async(
    model_name: str,
    inputs: Mapping[str, np.ndarray],
    version: int | str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """``infer`` for an ``async def execute``: awaits the answer without blocking the event loop
    (the call waits on a worker thread, carrying this model's call chain and deadline)."""
    context = _core.call_context()
    version_arg = None if version is None else str(version)
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: _core.infer(model_name, dict(inputs), version_arg, parameters, context)
    )

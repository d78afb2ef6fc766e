"""Helpers shared by the tests and by ``benches/run.py`` (which puts ``tests/`` on ``sys.path``).
Fixtures stay in ``conftest.py``; plain functions that a test or the benchmark harness imports
live here, so that each exists once.

No helper here measures how long anything takes: a timeout is a guard against a hang, generous
enough that a slow, loaded CI host never reaches it, and reaching it fails loudly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# The default bound of a wait. Only a hang gets there: a wait that needs this long is a failure.
HANG_GUARD_S = 60.0


def wait_until(
    predicate: Callable[[], T],
    timeout: float = HANG_GUARD_S,
    what: str | Callable[[], str] = "the condition",
    interval: float = 0.02,
) -> T:
    """Polls ``predicate`` until it returns something truthy, and returns that value.

    For state that gives no event to wait on (a metric, a file another process writes, a row of
    the repository index). ``timeout`` only guards against a hang: once it has passed, raises
    ``AssertionError`` naming ``what`` and the last value seen. ``what`` may be a callable, called
    only then, to add context such as a server's log. Exceptions from ``predicate`` propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            description = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {description} (last value: {value!r})")
        time.sleep(interval)


# The lines a fastserve server logs when its listeners are up (the ports they bound), shared by the
# test fixtures and benches/run.py.
HTTP_LISTENING = re.compile(r"HTTP listening.*address\"?[=:]\"?https?://([0-9.]+):(\d+)")
METRICS_LISTENING = re.compile(r"metrics listening.*address\"?[=:]\"?http://([0-9.]+):(\d+)/metrics")
GRPC_LISTENING = re.compile(r"gRPC listening.*address\"?[=:]\"?([0-9.]+):(\d+)")

"""One log sink for Rust and Python: Python ``logging`` records are forwarded to the Rust
``tracing`` subscriber, so both share the level and the text/JSON format."""

from __future__ import annotations

import logging
from typing import Any

from . import _core

_LEVELS = {logging.ERROR: "error", logging.WARNING: "warning", logging.INFO: "info", logging.DEBUG: "debug"}


class RustLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            level = next(
                (name for lvl, name in sorted(_LEVELS.items(), reverse=True) if record.levelno >= lvl), "debug"
            )
            model, version = getattr(record, "model", None), getattr(record, "version", None)
            _core.log(
                level,
                record.name,
                message,
                model if isinstance(model, str) else None,
                version if isinstance(version, int) and not isinstance(version, bool) and version >= 0 else None,
            )
        except Exception:
            self.handleError(record)


def model_fields(name: str, version: int | None = None) -> dict[str, Any]:
    """``extra=`` of a log record about a model: JSON logs carry ``model`` and ``version`` as fields of
    their own (as the core's records do), so log tools filter on them instead of parsing messages."""
    return {"model": name, "version": version}


def ensure_logging() -> None:
    """Logging that just works for an embedded server (``Server(access_log=True)`` logs with no set-up
    call): unless :func:`setup_logging` ran first, the core logs at info level, as text, to stderr, and
    when the application has not configured Python logging, fastserve's own records go there too."""
    if not _core.init_logging("info", False, None):
        return  # set up already (setup_logging, or an earlier server)
    if logging.getLogger().handlers:
        return  # the application routes Python logging itself
    logger = logging.getLogger("fastserve")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.addHandler(_handler())


def _handler() -> RustLogHandler:
    handler = RustLogHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def setup_logging(level: str = "info", fmt: str = "text", otel_endpoint: str | None = None) -> None:
    """Chooses the level and format (``text`` or ``json``) of the one log sink and routes Python
    logging (root logger) through it; call it before the first ``Server.start()`` (which otherwise
    sets up info-level text logging). With ``otel_endpoint`` (an OTLP/HTTP traces URL, needs a build
    with the ``otel`` feature) request spans are exported."""
    _core.init_logging(level, fmt == "json", otel_endpoint)
    embedded = logging.getLogger("fastserve")
    for h in [h for h in embedded.handlers if isinstance(h, RustLogHandler)]:
        embedded.removeHandler(h)  # the root's handler takes over: no record twice
    root = logging.getLogger()
    if not any(isinstance(h, RustLogHandler) for h in root.handlers):
        root.addHandler(_handler())
    # `logging.getLevelNamesMapping` is 3.11+; with a name, `getLevelName` answers its number when the
    # name is known (every supported version).
    name = level.upper()
    root.setLevel(name if isinstance(logging.getLevelName(name), int) else "INFO")

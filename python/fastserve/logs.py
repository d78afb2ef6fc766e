"""One log sink for Rust and Python: Python ``logging`` records are forwarded to the Rust
``tracing`` subscriber, so both share the level and the text/JSON format."""

from __future__ import annotations

import logging

from . import _core

_LEVELS = {logging.ERROR: "error", logging.WARNING: "warning", logging.INFO: "info", logging.DEBUG: "debug"}


class RustLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            level = next(
                (name for lvl, name in sorted(_LEVELS.items(), reverse=True) if record.levelno >= lvl), "debug"
            )
            _core.log(level, record.name, message)
        except Exception:
            self.handleError(record)


def setup_logging(level: str = "info", fmt: str = "text", otel_endpoint: str | None = None) -> None:
    """Routes Python logging (root logger) through the Rust subscriber; with ``otel_endpoint``
    (an OTLP/HTTP traces URL, needs a build with the ``otel`` feature) request spans are exported."""
    _core.init_logging(level, fmt == "json", otel_endpoint)
    root = logging.getLogger()
    if not any(isinstance(h, RustLogHandler) for h in root.handlers):
        handler = RustLogHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    # `logging.getLevelNamesMapping` is 3.11+; with a name, `getLevelName` answers its number when the
    # name is known (every supported version).
    name = level.upper()
    root.setLevel(name if isinstance(logging.getLevelName(name), int) else "INFO")

"""The server and model options, defined once in the Rust core (names, kinds, defaults, bounds and
help) and read here, so the command's flags, the ``FASTSERVE_*`` variables, ``Server``'s keywords
and ``config.toml``'s batching keys can never disagree with what the core accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _core


@dataclass(frozen=True)
class OptionInfo:
    """One option as the core describes it."""

    name: str
    help: str
    kind: str  # int, float, bool, str, path, int_list
    optional: bool
    default: Any
    cli_default: Any
    group: str  # server, limits, security, hidden (no flag)
    choices: list[str]
    min: int | None
    max: int | None

    @property
    def command_default(self) -> Any:
        """What the ``fastserve`` command uses when the flag is absent."""
        return self.default if self.cli_default is None else self.cli_default


SERVER_OPTIONS: list[OptionInfo] = [OptionInfo(**o) for o in _core.server_options()]
MODEL_OPTIONS: dict[str, OptionInfo] = {o["name"]: OptionInfo(**o) for o in _core.model_options()}


def model_default(name: str) -> Any:
    """The default of a model option (a ``config.toml`` batching key)."""
    return MODEL_OPTIONS[name].default

"""Triton's ``config.pbtxt``, so a Triton model repository loads unchanged.

protobuf's own text-format parser reads the file against the descriptors of Triton's
``model_config.proto`` that the core ships (a hand-written parser would drift from Triton's grammar,
and prost's refuses its ``input [ { ... } ]`` lists); the core converts the message to the
equivalent ``config.toml`` table, naming every field fastserve does not honor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message

from . import _core
from .config import ConfigError


@dataclass(frozen=True)
class Converted:
    """A ``config.pbtxt`` as ``config.toml`` says it."""

    table: dict[str, Any]
    toml: str
    # Performance-only fields that have no effect in fastserve, by path.
    warnings: list[str]


@cache
def _model_config_class() -> type[Message]:
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(_core.model_config_descriptors()).file:
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def convert(text: str, model: str) -> Converted:
    """``text`` (model ``model``'s config.pbtxt) as a config.toml table; ConfigError otherwise."""
    message = _model_config_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ConfigError(f"config.pbtxt is not a valid Triton model configuration: {e}") from None
    try:
        table, toml, warnings = _core.convert_triton_config(message.SerializeToString(), model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Converted(json.loads(table), toml, warnings)

"""protos/grpc_predict_v2.proto and the Triton model_config.proto it imports stay wire-compatible with
the clients: every message, field number, type, enum value and RPC we declare matches the descriptors
shipped with tritonclient.grpc."""

from __future__ import annotations

import re

from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import service_pb2

from conftest import ROOT

PROTO = ROOT / "protos" / "grpc_predict_v2.proto"
MODEL_CONFIG = ROOT / "protos" / "model_config.proto"
# Triton's file opens some blocks with the brace on the next line.
OPEN = re.compile(r"^(message|enum|oneof|service)\s+(\w+)\s*(\{)?(\})?$")
FIELD = re.compile(r"^(repeated\s+)?(map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*(\d+);$")
ENUM_VALUE = re.compile(r"^(\w+)\s*=\s*(\d+);$")
RPC = re.compile(r"^rpc\s+(\w+)\((stream\s+)?(\w+)\)\s+returns\s+\((stream\s+)?(\w+)\)")
SCALARS = {
    "bool": FieldDescriptor.TYPE_BOOL,
    "int32": FieldDescriptor.TYPE_INT32,
    "int64": FieldDescriptor.TYPE_INT64,
    "uint32": FieldDescriptor.TYPE_UINT32,
    "uint64": FieldDescriptor.TYPE_UINT64,
    "float": FieldDescriptor.TYPE_FLOAT,
    "double": FieldDescriptor.TYPE_DOUBLE,
    "string": FieldDescriptor.TYPE_STRING,
    "bytes": FieldDescriptor.TYPE_BYTES,
}


def parse(text: str) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """(message, field, type, number, repeated), (enum, value, number) and RPC rows of our file."""
    fields, values, rpcs = [], [], []
    stack: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.split("//")[0].strip()
        if not line or line == "{" or line.startswith(("syntax", "package", "import")):
            continue
        if m := OPEN.match(line):
            if not m.group(4):  # `message X {}` opens and closes at once
                stack.append((m.group(1), m.group(2)))
            continue
        if line == "}":
            stack.pop()
            continue
        scope = ".".join(name for kind, name in stack if kind in ("message", "enum"))
        kind = stack[-1][0]
        if kind in ("message", "oneof") and (m := FIELD.match(line)):
            fields.append((scope, m.group(3), m.group(2), int(m.group(4)), bool(m.group(1))))
        elif kind == "enum" and (m := ENUM_VALUE.match(line)):
            values.append((scope, m.group(1), int(m.group(2))))
        elif kind == "service" and (m := RPC.match(line)):
            rpcs.append((m.group(1), m.group(3), bool(m.group(2)), m.group(5), bool(m.group(4))))
        else:
            raise AssertionError(f"unparsed line in {PROTO.name}: {raw!r}")
    assert not stack
    return fields, values, rpcs


def test_proto_matches_the_clients_descriptors() -> None:
    text = PROTO.read_text()
    assert "package inference;" in text and 'import "model_config.proto";' in text
    pool = service_pb2.DESCRIPTOR.pool
    fields, values, rpcs = parse(text)
    config_fields, values, config_rpcs = parse(MODEL_CONFIG.read_text())
    assert len(fields) >= 100 and len(config_fields) >= 150 and len(values) >= 35 and len(rpcs) == 20
    assert not config_rpcs
    fields += config_fields
    for message, name, type_, number, repeated in fields:
        theirs = pool.FindMessageTypeByName(f"inference.{message}").fields_by_name[name]
        assert theirs.number == number, (message, name)
        if type_.startswith("map<"):
            assert theirs.message_type.GetOptions().map_entry, (message, name)
            continue
        assert theirs.is_repeated == repeated, (message, name)
        if type_ in SCALARS:
            assert theirs.type == SCALARS[type_], (message, name)
        else:
            target = theirs.message_type or theirs.enum_type
            assert target.full_name.endswith(type_), (message, name, type_)
    for enum, name, number in values:
        assert pool.FindEnumTypeByName(f"inference.{enum}").values_by_name[name].number == number, (enum, name)
    service = pool.FindServiceByName("inference.GRPCInferenceService")
    assert {r[0] for r in rpcs} == {m.name for m in service.methods}
    for name, request, client_streaming, response, server_streaming in rpcs:
        method = service.methods_by_name[name]
        assert (method.input_type.name, method.client_streaming) == (request, client_streaming), name
        assert (method.output_type.name, method.server_streaming) == (response, server_streaming), name

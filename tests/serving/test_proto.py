"""The wire contract: stubs import from the installed package and match the .proto they came from."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

import mrl.proto
from mrl.proto import generate

PROTO = "mrl/v1/embedder.proto"


def test_stubs_import_as_a_package_and_describe_the_service():
    from mrl.proto import embedder_pb2, embedder_pb2_grpc
    from mrl.proto.mrl.v1 import embedder_pb2 as same

    assert embedder_pb2 is same
    service = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"]
    assert service.full_name == "mrl.v1.Embedder"
    assert [m.name for m in service.methods] == ["Embed", "EmbedStream", "ListModels", "GetModel"]
    assert hasattr(embedder_pb2_grpc, "EmbedderStub")
    fields = embedder_pb2.EmbedRequest.DESCRIPTOR.fields_by_name
    assert {"model", "inputs", "dimensions", "prompt_name", "truncate", "encoding"} <= set(fields)
    assert fields["dimensions"].has_presence  # unset (the default dims) differs from 0 (refused)
    with pytest.raises(AttributeError):
        _ = mrl.proto.no_such_stub


def test_fix_imports_rewrites_protoc_bare_imports():
    source = "import grpc\nfrom mrl.v1 import embedder_pb2 as mrl_dot_v1_dot_embedder__pb2\n"
    assert generate.fix_imports(source) == (
        "import grpc\nfrom mrl.proto.mrl.v1 import embedder_pb2 as mrl_dot_v1_dot_embedder__pb2\n"
    )


def compiled_schema(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    """What protoc makes of the .proto now, without the json names the stubs leave out."""
    from grpc_tools import protoc

    out = tmp_path / "schema.pb"
    assert protoc.main(["protoc", f"-I{generate.PROTO_ROOT}", f"--descriptor_set_out={out}", PROTO]) == 0
    (schema,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    pending = list(schema.message_type)
    while pending:
        message = pending.pop()
        pending.extend(message.nested_type)
        for field in message.field:
            field.ClearField("json_name")
    return schema


def test_committed_stubs_hold_the_schema_of_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) compiles the .proto")
    from mrl.proto import embedder_pb2

    committed = descriptor_pb2.FileDescriptorProto.FromString(embedder_pb2.DESCRIPTOR.serialized_pb)
    assert committed == compiled_schema(tmp_path), (
        "the committed stubs are stale: run python -m mrl.proto.generate and commit the result"
    )


def test_committed_stubs_are_what_the_generator_writes(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the stubs")
    from mrl.proto import embedder_pb2_grpc

    if version("grpcio-tools") != embedder_pb2_grpc.GRPC_GENERATED_VERSION:
        pytest.skip(
            f"grpcio-tools {version('grpcio-tools')} is not the {embedder_pb2_grpc.GRPC_GENERATED_VERSION} that "
            "wrote the stubs: their text differs by version (the schema test still runs)"
        )
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == {"embedder_pb2.py", "embedder_pb2_grpc.py"}
    for path in written:
        committed = generate.PROTO_ROOT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run python -m mrl.proto.generate"
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run python -m mrl.proto.generate and commit the result"
        )
    assert "from mrl.proto.mrl.v1 import embedder_pb2" in (tmp_path / "mrl/v1/embedder_pb2_grpc.py").read_text()


def test_the_proto_file_ships_with_the_package():
    proto = Path(generate.PROTO_ROOT) / "mrl" / "v1" / "embedder.proto"
    assert proto.is_file() and "package mrl.v1;" in proto.read_text()

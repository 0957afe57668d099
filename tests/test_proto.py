"""The latentwatch.v1 API: generated code imports and serves, the field names
other languages rely on exist, every element is documented, and
scripts/check-proto.sh (regenerate + diff + buf lint/format) passes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.descriptor import FieldDescriptor

from latentwatch.v1 import monitor_pb2 as pb
from latentwatch.v1 import monitor_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
PROTO = "latentwatch/v1/monitor.proto"
FD = FieldDescriptor


def field(message, name: str) -> FieldDescriptor:
    f = message.DESCRIPTOR.fields_by_name.get(name)
    assert f is not None, f"{message.DESCRIPTOR.full_name}.{name} missing"
    return f


def is_repeated(f: FieldDescriptor) -> bool:
    # FieldDescriptor.label is deprecated in newer protobuf releases.
    return f.is_repeated if hasattr(f, "is_repeated") else f.label == FD.LABEL_REPEATED


def test_generated_code_imports() -> None:
    assert pb.DESCRIPTOR.package == "latentwatch.v1"
    assert pb.DESCRIPTOR.name == PROTO
    # -Iproto: the grpc module imports `from latentwatch.v1 import monitor_pb2`.
    assert pb_grpc.latentwatch_dot_v1_dot_monitor__pb2 is pb
    for name in ("MonitorStub", "MonitorServicer", "add_MonitorServicer_to_server"):
        assert hasattr(pb_grpc, name), name
    assert (ROOT / "latentwatch/v1/monitor_pb2.pyi").is_file()


def test_service_methods() -> None:
    svc = pb.DESCRIPTOR.services_by_name["Monitor"]
    assert svc.full_name == "latentwatch.v1.Monitor"
    methods = {m.name: m for m in svc.methods}
    assert set(methods) == {"Generate", "Score", "ListDetectors", "GetAlerts", "GetInterventions", "ReloadDetectors",
                            "GetServerInfo"}
    trail = methods["GetInterventions"]
    assert (trail.input_type.name, trail.output_type.name) == ("GetInterventionsRequest", "GetInterventionsResponse")
    gen = methods["Generate"]
    assert gen.input_type.name == "GenerateRequest"
    assert gen.output_type.name == "GenerateResponse"
    assert gen.server_streaming and not gen.client_streaming
    for name in ("Score", "ListDetectors", "GetAlerts", "ReloadDetectors", "GetServerInfo"):
        m = methods[name]
        assert not m.server_streaming and not m.client_streaming
        assert m.input_type.name == f"{name}Request"
        assert m.output_type.name == f"{name}Response"


def test_required_field_names() -> None:
    # ScoreRequest.inputs[] of ScoreInput{text | messages[]}
    inputs = field(pb.ScoreRequest, "inputs")
    assert is_repeated(inputs) and inputs.message_type.name == "ScoreInput"
    assert field(pb.ScoreInput, "text").type == FD.TYPE_STRING
    msgs = field(pb.ScoreInput, "messages")
    assert is_repeated(msgs) and msgs.message_type.name == "ChatMessage"
    # GenerateRequest
    gmsgs = field(pb.GenerateRequest, "messages")
    assert is_repeated(gmsgs) and gmsgs.message_type is msgs.message_type
    assert field(pb.ChatMessage, "role").type == FD.TYPE_STRING
    assert field(pb.ChatMessage, "content").type == FD.TYPE_STRING
    assert field(pb.GenerateRequest, "max_new_tokens").type == FD.TYPE_UINT32
    assert field(pb.GenerateRequest, "prompt").type == FD.TYPE_STRING
    assert field(pb.GenerateRequest, "sampling").message_type.name == "SamplingParams"
    assert is_repeated(field(pb.GenerateRequest, "detectors"))
    assert field(pb.GenerateRequest, "include_token_scores").type == FD.TYPE_BOOL
    steer = field(pb.GenerateRequest, "steering")
    assert is_repeated(steer) and steer.message_type.name == "SteeringRequest"
    for msg in (pb.GenerateRequest, pb.ScoreRequest):
        assert field(msg, "metadata").message_type.name == "RequestMetadata"
    for name in ("temperature", "top_p", "top_k", "seed", "stop_sequences"):
        field(pb.SamplingParams, name)
    for name in ("client_id", "conversation_id", "tags"):
        field(pb.RequestMetadata, name)
    assert field(pb.RequestMetadata, "tags").message_type.GetOptions().map_entry
    vec = field(pb.SteeringRequest, "vector")
    assert is_repeated(vec) and vec.type == FD.TYPE_FLOAT
    for name in (
        "vector_id",
        "hook_point",
        "kind",
        "coefficient",
        "positions",
        "trigger_detector_id",
        "sae_id",
    ):
        field(pb.SteeringRequest, name)
    assert field(pb.SteeringRequest, "latent").type == FD.TYPE_UINT32
    assert set(pb.SteeringKind.keys()) == {
        "STEERING_KIND_UNSPECIFIED",
        "STEERING_KIND_ADD",
        "STEERING_KIND_ABLATE",
        "STEERING_KIND_CLAMP",
    }
    assert set(pb.SteeringPositions.keys()) == {
        "STEERING_POSITIONS_UNSPECIFIED",
        "STEERING_POSITIONS_PROMPT",
        "STEERING_POSITIONS_GENERATED",
        "STEERING_POSITIONS_ALL",
    }
    # GetAlerts: filters + AIP-158 paging.
    for name in ("start_time", "end_time", "detector_id", "request_id", "client_id", "page_token"):
        field(pb.GetAlertsRequest, name)
    assert field(pb.GetAlertsRequest, "page_size").type == FD.TYPE_INT32
    field(pb.GetAlertsResponse, "next_page_token")
    # Generate events and the summary.
    assert {f.name for f in pb.GenerateResponse.DESCRIPTOR.oneofs_by_name["event"].fields} == {
        "token",
        "alert",
        "intervention",
        "summary",
    }
    for name in ("request_id", "finish_reason", "scores", "alerts", "usage"):
        field(pb.GenerateSummary, name)
    for name in ("id", "version", "kind", "hook_point", "threshold", "calibration", "metrics"):
        field(pb.Detector, name)


def test_timestamps_enums_and_no_bytes() -> None:
    for msg, name in (
        (pb.Alert, "create_time"),
        (pb.Intervention, "create_time"),
        (pb.GetAlertsRequest, "start_time"),
        (pb.GetAlertsRequest, "end_time"),
    ):
        assert field(msg, name).message_type.full_name == "google.protobuf.Timestamp"
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        prefix = "".join("_" + c if c.isupper() else c.upper() for c in enum.name).lstrip("_")
        assert enum.values_by_number[0].name == f"{prefix}_UNSPECIFIED", enum.name
        assert all(v.name.startswith(prefix + "_") for v in enum.values), enum.name

    def walk(desc):
        yield desc
        for nested in desc.nested_types:
            yield from walk(nested)

    for top in pb.DESCRIPTOR.message_types_by_name.values():
        for desc in walk(top):
            for f in desc.fields:
                assert f.type != FD.TYPE_BYTES, f.full_name


def test_json_mapping_for_buf_curl() -> None:
    req = json_format.Parse('{"inputs":[{"text":"hello"}]}', pb.ScoreRequest())
    assert req.inputs[0].text == "hello"
    req = json_format.Parse(
        '{"inputs":[{"messages":[{"role":"user","content":"hi"}]}]}', pb.ScoreRequest()
    )
    assert req.inputs[0].messages[0].role == "user"
    assert req.inputs[0].messages[0].content == "hi"
    gen = json_format.Parse(
        '{"messages":[{"role":"user","content":"hi"}],"max_new_tokens":8,'
        '"sampling":{"temperature":0},"include_token_scores":true,'
        '"metadata":{"client_id":"c1","tags":{"team":"red"}},'
        '"steering":[{"vector_id":"v1","kind":"STEERING_KIND_ADD","coefficient":2.0}]}',
        pb.GenerateRequest(),
    )
    assert gen.max_new_tokens == 8
    assert gen.sampling.HasField("temperature") and gen.sampling.temperature == 0
    assert gen.metadata.tags["team"] == "red"
    assert gen.steering[0].kind == pb.STEERING_KIND_ADD
    out = json_format.MessageToDict(gen, preserving_proto_field_name=True)
    assert out["max_new_tokens"] == 8 and out["messages"][0]["role"] == "user"


def test_every_element_is_documented() -> None:
    """Comments are the API docs: every message, field, enum, value, RPC."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fds.pb"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-I",
                str(ROOT / "proto"),
                "--include_source_info",
                f"--descriptor_set_out={out}",
                PROTO,
            ],
            check=True,
            timeout=120,
        )
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (fdp,) = fds.file
    documented = {
        tuple(loc.path)
        for loc in fdp.source_code_info.location
        if loc.leading_comments.strip() or loc.trailing_comments.strip()
    }
    # Field numbers of FileDescriptorProto / DescriptorProto etc.
    MSG, ENUM, SVC = 4, 5, 6
    NESTED, FIELD, ONEOF, VALUE, METHOD = 3, 2, 8, 2, 2
    missing = []

    def check_msg(path, msg):
        if msg.options.map_entry:
            return
        if tuple(path) not in documented:
            missing.append(msg.name)
        for i, f in enumerate(msg.field):
            if tuple(path + [FIELD, i]) not in documented:
                missing.append(f"{msg.name}.{f.name}")
        for i, o in enumerate(msg.oneof_decl):
            if not o.name.startswith("_") and tuple(path + [ONEOF, i]) not in documented:
                missing.append(f"{msg.name}.{o.name}")
        for i, n in enumerate(msg.nested_type):
            check_msg(path + [NESTED, i], n)

    for i, m in enumerate(fdp.message_type):
        check_msg([MSG, i], m)
    for i, e in enumerate(fdp.enum_type):
        if (ENUM, i) not in documented:
            missing.append(e.name)
        for j, v in enumerate(e.value):
            if (ENUM, i, VALUE, j) not in documented:
                missing.append(v.name)
    for i, s in enumerate(fdp.service):
        if (SVC, i) not in documented:
            missing.append(s.name)
        for j, m in enumerate(s.method):
            if (SVC, i, METHOD, j) not in documented:
                missing.append(f"{s.name}.{m.name}")
    assert not missing, f"undocumented: {missing}"


def test_check_proto_script_passes() -> None:
    buf = os.environ.get("BUF") or (
        str(ROOT / "node_modules/.bin/buf")
        if (ROOT / "node_modules/.bin/buf").exists()
        else shutil.which("buf")
    )
    if not buf:
        pytest.fail("buf not found (npm devDependency @bufbuild/buf): run `make install`")
    env = {**os.environ, "BUF": buf, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/check-proto.sh")],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

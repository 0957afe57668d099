"""Standard gRPC health and server reflection, hardened against malformed request bodies.

The stock `add_HealthServicer_to_server` / `enable_server_reflection` use `Message.FromString` as
request deserializer; a body that is not a valid protobuf makes it raise, and grpc answers
UNKNOWN/INTERNAL. Here the deserializers never raise: they hand over a marker, and thin wrappers
around the stock aio servicers answer it with INVALID_ARGUMENT. Reflection is also served as
`grpc.reflection.v1` (wire-identical to v1alpha, which is what grpcio-reflection ships) for
clients that try v1 first.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


class _Garbage:
    """Stands in for a request body that did not parse."""

    def __init__(self, type_name: str):
        self.message = f"request is not a valid {type_name} message"


def _parse(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, TypeError):  # invalid wire data, invalid UTF-8 in a string field
            return _Garbage(cls.DESCRIPTOR.full_name)

    return parse


async def _refuse(request, context) -> None:
    if isinstance(request, _Garbage):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str]) -> health.aio.HealthServicer:
    """Serve grpc.health.v1.Health and server reflection (v1alpha and v1) on `server`.

    `service_names` are the application's fully-qualified services (listed by reflection along
    with health and reflection). Returns the health servicer; set statuses with `await h.set(...)`.
    Call before `server.start()`.
    """
    hs = health.aio.HealthServicer()
    rs = reflection.aio.ReflectionServicer(list(dict.fromkeys([*service_names, health.SERVICE_NAME,
                                                                reflection.SERVICE_NAME])))
    check_req, check_resp = _parse(health_pb2.HealthCheckRequest), health_pb2.HealthCheckResponse.SerializeToString

    async def check(request, context):
        await _refuse(request, context)
        return await hs.Check(request, context)

    async def list_(request, context):  # the aio servicer does not implement List
        await _refuse(request, context)
        statuses = dict(getattr(hs, "_server_status", {}))
        return health_pb2.HealthListResponse(
            statuses={k: health_pb2.HealthCheckResponse(status=v) for k, v in statuses.items()})

    async def watch(request, context):
        await _refuse(request, context)
        await hs.Watch(request, context)

    async def info(request_iterator, context):
        async def checked():
            async for request in request_iterator:
                await _refuse(request, context)
                yield request

        async for response in rs.ServerReflectionInfo(checked(), context):
            yield response

    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(health.SERVICE_NAME, {
            "Check": grpc.unary_unary_rpc_method_handler(check, check_req, check_resp),
            "List": grpc.unary_unary_rpc_method_handler(list_, _parse(health_pb2.HealthListRequest),
                                                        health_pb2.HealthListResponse.SerializeToString),
            "Watch": grpc.unary_stream_rpc_method_handler(watch, check_req, check_resp),
        }),
        *(grpc.method_handlers_generic_handler(name, {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                info, _parse(reflection_pb2.ServerReflectionRequest),
                reflection_pb2.ServerReflectionResponse.SerializeToString),
        }) for name in (reflection.SERVICE_NAME, REFLECTION_V1)),
    ))
    return hs


__all__ = ["REFLECTION_V1", "add_health_and_reflection"]

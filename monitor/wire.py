"""Request bytes to messages, without ever raising: a body that does not parse becomes a
`BadRequest` the interceptor answers with INVALID_ARGUMENT (grpc's own deserializer failure would
be INTERNAL), naming the string field that holds invalid UTF-8 when that is the cause."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError


class BadRequest:
    """What the deserializer hands over instead of a message it could not parse."""

    def __init__(self, message: str):
        self.message = message


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[i]
        result |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return result, i
        shift += 7


def bad_utf8_field(desc, data: bytes, prefix: str = "") -> str | None:
    """Path (e.g. `inputs[0].text`) of the first string field holding invalid UTF-8."""
    counts: dict[int, int] = {}
    i = 0
    try:
        while i < len(data):
            key, i = _varint(data, i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                _, i = _varint(data, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                n, i = _varint(data, i)
                chunk, i = data[i : i + n], i + n
                f = desc.fields_by_number.get(num)
                if f is None:
                    continue
                k = counts[num] = counts.get(num, -1) + 1
                is_map = f.type == f.TYPE_MESSAGE and f.message_type.GetOptions().map_entry
                path = prefix + f.name + (f"[{k}]" if f.is_repeated and not is_map else "")
                if f.type == f.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return path
                elif f.type == f.TYPE_MESSAGE:
                    found = bad_utf8_field(f.message_type, chunk, path + ".")
                    if found:
                        return found
            else:
                return None
    except IndexError:
        return None
    return None


def deserializer(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, RecursionError):
            path = bad_utf8_field(cls.DESCRIPTOR, data)
            if path:
                return BadRequest(f"{path}: invalid UTF-8 in a string field")
            return BadRequest(f"request body is not a valid {cls.DESCRIPTOR.full_name} message")

    return parse


def add_service(servicer, server: grpc.aio.Server, service: descriptor.ServiceDescriptor) -> None:
    """Register every method of `service` implemented by `servicer` with safe deserializers."""
    handlers = {}
    for m in service.methods:
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=deserializer(request_cls),
                                response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))

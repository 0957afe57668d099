"""One place maps what an RPC raised to a gRPC status, and counts its outcome.

`RequestError` (the request's fault, or a refusal) keeps its code and message; a body that did
not parse is INVALID_ARGUMENT; anything else is logged with its traceback and answered INTERNAL
with a generic message and the RPC's log reference, never the exception's text.

With `authorize` (`monitor.auth.Auth.check`) every RPC of the services is authenticated before
anything else, then `gate` may refuse work the server cannot take (draining, journal full, queue
full), and only then is the body parsed; refusals are outcomes like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from monitor.errors import RequestError
from monitor.metrics import Metrics
from monitor.wire import BadRequest

log = logging.getLogger(__name__)
access = logging.getLogger("latentwatch.access")  # one line per RPC: never prompt text


@dataclass
class Call:
    """What the access log and metrics say of one RPC. The servicer fills in what only it knows:
    the request id, and an outcome other than ok for an RPC that succeeded (a blocked generation)."""

    rpc: str
    outcome: str = "ok"
    request_id: str = ""
    client_id: str = ""


current: contextvars.ContextVar[Call] = contextvars.ContextVar("current_call")


def _rpc_kind(method: str) -> str:
    name = method.rsplit("/", 1)[-1]
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, services: tuple[str, ...],
                 authorize: Callable[[str, grpc.aio.ServicerContext], str] | None = None,
                 gate: Callable[[str, grpc.aio.ServicerContext], None] | None = None, gated: tuple[str, ...] = ()):
        self.metrics, self.services, self.authorize = metrics, services, authorize
        self.gate, self.gated = gate, gated

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(tuple(f"/{s}/" for s in self.services)):
            return handler
        kind, parse = _rpc_kind(details.method), handler.request_deserializer
        # the body is parsed only once the caller is authenticated and the work admitted
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(kind, parse, handler.unary_unary),
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._stream(kind, parse, handler.unary_stream),
                                                        response_serializer=handler.response_serializer)
        return handler

    def _unary(self, kind, parse, fn):
        async def run(body, context):
            async with self._rpc(kind, parse, body, context) as request:
                return await fn(request, context)

        return run

    def _stream(self, kind, parse, fn):
        async def run(body, context):
            async with self._rpc(kind, parse, body, context) as request:
                async for item in fn(request, context):
                    yield item

        return run

    @contextlib.asynccontextmanager
    async def _rpc(self, kind: str, parse, body: bytes, context):
        t0, call = time.monotonic(), Call(kind)
        current.set(call)
        try:
            client = self.authorize(kind, context) if self.authorize is not None else None
            if kind in self.gated:  # a burst beyond capacity costs no more than a bare gRPC call
                self.gate(kind, context)
            request = parse(body)
            _check(request)
            call.client_id = request.metadata.client_id if request.DESCRIPTOR.fields_by_name.get("metadata") else ""
            if client is not None:  # the token's client id, whatever the request says
                call.client_id = client
            yield request
        except asyncio.CancelledError:
            call.outcome = _cancelled(context)
            raise
        except Exception as e:  # noqa: BLE001 - mapped to a status right here
            await self._abort(kind, e, context, call)
        finally:
            seconds = time.monotonic() - t0
            self.metrics.observe_request(kind, call.outcome, seconds)
            access.info("%s %s", kind, call.outcome, extra={"rpc": kind, "outcome": call.outcome,
                                                           "request_id": call.request_id,
                                                           "client_id": call.client_id,
                                                           "latency_ms": round(1000 * seconds, 2)})

    async def _abort(self, kind: str, e: Exception, context, call: Call) -> None:
        if isinstance(e, grpc.aio.AbortError):
            raise e
        if isinstance(e, RequestError):
            call.outcome = e.code.lower()
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)
        ref = uuid.uuid4().hex[:12]
        log.error("%s failed (ref %s)", kind, ref, exc_info=e)
        call.outcome = "internal"
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the server log has the details")


def _cancelled(context) -> str:
    """A client that went away, or one whose deadline passed (grpc cancels the handler when the
    deadline timer fires, so a few milliseconds may still read as remaining)."""
    remaining = context.time_remaining()
    return "deadline_exceeded" if remaining is not None and remaining < 0.1 else "cancelled"


def _check(request) -> None:
    if isinstance(request, BadRequest):
        raise RequestError("INVALID_ARGUMENT", request.message)

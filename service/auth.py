"""Bearer-token authentication, as a server interceptor.

Every RPC must carry ``authorization: Bearer <token>`` metadata, except the health
service (load balancers and Kubernetes probe it without credentials). The token
is compared in constant time. Use it with TLS: without TLS the token travels in
clear text.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from tritarget.protos import target_assigner_pb2 as pb

from .errors import Unauthenticated
from .metrics import Metrics
from .servicer import LOGGED_CHARS, UNKNOWN_METHOD
from .status import abort, code_name, status_of

__all__ = ["BearerTokenInterceptor"]

access_log = logging.getLogger("tritarget.access")  # the servicer's: one line per call

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# The methods the metrics count, by path (reflection's calls are not: counting only its
# refusals read as every reflection call failing). Another name under the service's prefix
# counts as the servicer counts a method no service has, under UNKNOWN_METHOD: labelled by
# a caller's name, each name made up by a caller without a token was a new series.
_SERVICE = pb.DESCRIPTOR.services_by_name["TargetAssigner"]
_COUNTED = {f"/{_SERVICE.full_name}/{method.name}": method.name for method in _SERVICE.methods}
_COUNTED_PREFIX = f"/{_SERVICE.full_name}/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """``metrics``: refusals of the service's calls are counted and timed as the servicer
    does its own calls; ``access_log``: every refusal is logged (reflection's too)."""

    def __init__(self, token: str, metrics: Metrics | None = None, *, access_log: bool = False) -> None:
        if not token:
            raise ValueError("token: must not be empty")
        self._expected = token.encode()
        self._metrics = metrics
        self._access_log = access_log

    def _refusal(self, metadata) -> Unauthenticated | None:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return Unauthenticated("missing credentials: send 'authorization: Bearer <token>' metadata")
        # Every copy must match: a proxy or a later handler may read another one than we do.
        for value in values:
            given = value.encode() if isinstance(value, str) else value
            # "Bearer" 1*SP token (RFC 6750); the scheme's name is case-insensitive (RFC 7235),
            # the token compared whole.
            scheme, _, credentials = given.partition(b" ")
            credentials = credentials.lstrip(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials, self._expected):
                return Unauthenticated("invalid bearer token")
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        refusal = self._refusal(details.invocation_metadata)
        if refusal is None:
            return handler
        status = status_of(refusal)
        counted = self._metrics is not None and details.method.startswith(_COUNTED_PREFIX)
        known = _COUNTED.get(details.method)
        label = known or UNKNOWN_METHOD
        # Any other method is logged whole, quoted: a caller's, for a method no service has
        # (``servicer._UnknownMethods``).
        method = known or repr(details.method[:LOGGED_CHARS])
        started = time.perf_counter()

        def finished(context: grpc.aio.ServicerContext) -> None:
            # A request of the service, refused: counted, failed and timed together as it
            # is answered, as the servicer does its own (a caller gone before its message
            # arrived never reaches the handler: none of the three). Any refusal is logged:
            # one of reflection's too, or tokens could be tried there without a trace.
            seconds = time.perf_counter() - started
            if counted:
                metrics = self._metrics.method(label)
                metrics.requests.inc()
                self._metrics.errors.labels(label, code_name(status)).inc()
                metrics.request_seconds.observe(seconds)
            if self._access_log:  # its message unread: no id, images or boxes to name
                access_log.info("%s (request not read) %s %.2f ms peer=%s reason=%r", method, code_name(status),
                                seconds * 1000, context.peer(), status.message)  # fmt: skip

        return _refusing(handler, status, finished)


def _refusing(handler: grpc.RpcMethodHandler, status,
              finished: Callable[[grpc.aio.ServicerContext], None]) -> grpc.RpcMethodHandler:  # fmt: skip
    """A handler of the same kind as ``handler`` that calls ``finished`` and ends the call
    with ``status``, without a request deserializer: a refused caller's message (up to the
    size limit) is never parsed, so credentials-less traffic costs the server no decoding."""
    kwargs = {"response_serializer": handler.response_serializer}

    async def end(context) -> None:
        finished(context)  # before the answer, as the servicer's failures: counted once the caller has it
        await abort(context, status)

    if handler.response_streaming:

        async def refuse_stream(request, context):
            await end(context)
            yield  # pragma: no cover - abort raises; the yield makes this an async generator

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)

    async def refuse(request, context):
        await end(context)

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)

"""The one place where errors become gRPC statuses.

``ServiceError`` subclasses map to their codes; ``InvalidInput`` adds a
``google.rpc.BadRequest`` with one field violation per problem (read it with
``grpc_status.rpc_status.from_call``), and ``Overloaded`` (a full queue: it passes)
a ``google.rpc.ErrorInfo`` with reason ``OVERLOADED`` and a ``RetryInfo``, which tell it
from a request over a limit (never served) under the same RESOURCE_EXHAUSTED. Running
out of memory (host or GPU) is RESOURCE_EXHAUSTED too: the request was too large for
this server now. Anything else is a bug: INTERNAL with a generic message, and the
traceback goes to the log, naming the call, not to the caller.
"""

from __future__ import annotations

import logging

import grpc
import torch
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tritarget.protos import ERROR_DOMAIN, OVERLOADED_REASON
from tritarget.protos import target_assigner_pb2 as pb

from .errors import (
    InvalidInput,
    NotFound,
    Overloaded,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

__all__ = ["status_of", "abort", "request_error"]

log = logging.getLogger(__name__)

# Most specific first (Overloaded is a ResourceExhausted).
_CODES: tuple[tuple[type[ServiceError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
)

INTERNAL_MESSAGE = "internal server error (logged on the server)"
_OVERLOADED_RETRY_S = 0.1  # a batch takes milliseconds to tens of milliseconds

# A status travels in the trailers, and gRPC clients refuse trailers over 8 KiB (at
# random) or 16 KiB (always), so a message that repeats a long input (a 3,000-dimension
# shape, a 6,000-character preset name) would reach the caller as RESOURCE_EXHAUSTED
# without its reason. These caps, in bytes on the wire (``_clipped``), keep a status
# under ~5 KiB there: the message in grpc-message, and again with the violations in
# grpc-status-details-bin (base64).
_MAX_MESSAGE = 512
_MAX_FIELD = 128
_MAX_VIOLATIONS = 4


def _clipped(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` bytes on the wire: a character outside printable ASCII
    (and ``%``) counts three times its UTF-8 bytes, as gRPC percent-encodes each of them
    in grpc-message (a count of characters let 512 emoji through: 6 KiB of grpc-message
    alone, and a caller's override of them got RESOURCE_EXHAUSTED from its transport)."""
    cost = 0
    for end, char in enumerate(text):
        cost += 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode("utf-8", "surrogatepass"))
        if cost > limit:
            return f"{text[:end]}... ({len(text) - end} more characters)"
    return text


# What torch's host allocator raises when an allocation fails (a RuntimeError).
_HOST_ALLOCATOR_FAILED = "can't allocate memory"


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and _HOST_ALLOCATOR_FAILED in str(exc)
    )


def status_of(exc: BaseException, call: str = "a request") -> status_pb2.Status:
    """The ``google.rpc.Status`` a caller sees for ``exc``; ``call`` names the call in the
    log (method and request id), where its traceback goes when ``exc`` is a bug."""
    if _out_of_memory(exc):
        # With its traceback: a size computed wrong (a bug) fails the same way.
        log.warning("out of memory while serving %s: %s", call, _clipped(str(exc), _MAX_MESSAGE), exc_info=exc)
        exc = ResourceExhausted(
            "the server ran out of memory computing this request (its targets are sized by images x anchors and "
            "boxes); send fewer images or boxes per request, or retry later"
        )
    for cls, code in _CODES:
        if isinstance(exc, cls):
            status = status_pb2.Status(code=code.value[0], message=_clipped(exc.message, _MAX_MESSAGE))
            if isinstance(exc, InvalidInput) and exc.violations:
                bad_request = error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=_clipped(f, _MAX_FIELD), description=_clipped(d, _MAX_MESSAGE)
                        )
                        for f, d in exc.violations[:_MAX_VIOLATIONS]
                    ]
                )
                _attach(status, bad_request)
            if isinstance(exc, Overloaded):
                _attach(status, error_details_pb2.ErrorInfo(reason=OVERLOADED_REASON, domain=ERROR_DOMAIN))
                retry = error_details_pb2.RetryInfo()
                retry.retry_delay.FromMilliseconds(round(_OVERLOADED_RETRY_S * 1000))
                _attach(status, retry)
            return status
    log.error("unexpected error while serving %s", call, exc_info=exc)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=INTERNAL_MESSAGE)


def _attach(status: status_pb2.Status, detail_message) -> None:
    detail = any_pb2.Any()
    detail.Pack(detail_message)
    status.details.append(detail)


def code_name(status: status_pb2.Status) -> str:
    return code_pb2.Code.Name(status.code)


async def abort(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    """End the RPC with ``status`` (code, message and details in the trailers)."""
    await context.abort_with_status(rpc_status.to_status(status))


def request_error(status: status_pb2.Status) -> pb.RequestError:
    """The in-stream form of a status (AssignStream answers a bad request and goes on)."""
    error = pb.RequestError(code=status.code, message=status.message)
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for v in bad_request.field_violations:
                error.field_violations.add(field=v.field, description=v.description)
    return error

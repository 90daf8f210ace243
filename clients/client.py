"""``TargetClient`` (blocking) and ``AsyncTargetClient`` (asyncio) for a tritarget server.

    with TargetClient("127.0.0.1:50051") as client:
        targets = client.assign(gt_boxes, gt_counts, (800, 1344), preset="retinanet_torchvision")

* ``target``: one address, a list of addresses (requests go round-robin, a retry
  goes to the next one), or a ``dns:///name:port`` target, which gRPC resolves to
  every replica and balances with its ``round_robin`` policy (a Kubernetes
  headless Service gives exactly that).
* Deadlines: ``timeout`` per call (seconds), else the client's default.
* Retries: UNAVAILABLE (server down, not started yet, restarting, draining) and a
  server's full queue (RESOURCE_EXHAUSTED with the ErrorInfo reason ``OVERLOADED``; a
  request over a limit is not retried) are retried with exponential backoff and jitter
  until the call's deadline (or ``retries`` retries after the first try, when given);
  an endpoint that just failed is skipped for a moment while another is available.
  Other errors are not retried, except that with ``try_timeout`` (seconds) a unary try
  that takes longer is abandoned and retried on the next endpoint (a hung replica holds
  one try, not the whole call).
* Streams survive a replica dying: the requests a stream sent and got no answer for
  are sent again, in order, on a new stream to the next endpoint, then the stream
  goes on; nothing is lost or answered twice (a request's targets depend only on
  the request). A stream's call may leave its requests without an answer at most
  ``try_timeout`` (then the stream moves to the next endpoint with what is unanswered),
  else the client's timeout (then it ends DEADLINE_EXCEEDED): a server that hangs, at
  once or after answering for a while, does not hold a stream for good.
* ``connections``: connections per address (default 1). A server's front-end processes
  sharing a port (``tritarget serve --workers N``) are handed connections, not calls:
  one process that sends many requests to such a server reaches all of them only over
  several connections (``connections=2 * N`` spreads well; the kernel picks at random).
* ``wait_until_ready(timeout)``: block until an endpoint's health is SERVING.
* Errors: every failure is a ``TargetServiceError`` with the gRPC ``code``, the
  server's ``details`` and the ``field_violations`` of a bad request; when no
  server answered, it says which endpoints were tried, for how long, and what to run.
  A response that breaks the contract (a server bug: a malformed tensor, a stream
  answering out of order or not once per request) raises ``ValueError`` ("malformed
  response: ..."), never another image's or another request's targets.
  A ``TargetServiceError`` raised in a ``DataLoader`` worker reaches the trainer as one,
  with its ``code`` and ``details`` (torch rebuilds it from its message).
* Fork-safe and picklable: channels are made lazily per process and are not part of
  the pickled state, so a client handed to ``DataLoader`` workers (fork, spawn or
  forkserver) opens its own channels in each worker. gRPC's asyncio channels do not
  survive ``fork()``: an ``AsyncTargetClient`` whose channels were open when its process
  forked refuses to work in the child (spawn or forkserver, or a client opened there).
  An ``AsyncTargetClient`` keeps channels per event loop: one ``asyncio.run()`` after
  another, or loops running at once in several threads, each with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import math
import os
import random
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tritarget.kernels.problem import check_flags
from tritarget.kernels.sampling import fresh_seed
from tritarget.kernels.targets import SparseTargets, Targets
from tritarget.protos import ERROR_DOMAIN, OVERLOADED_REASON
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.protos import target_assigner_pb2_grpc as pb_grpc

from .wire import (
    anchors_request,
    build_request,
    decode_anchors,
    decode_response,
    decode_sparse,
    is_integer,
    is_real,
    level_starts,
)

__all__ = ["TargetClient", "AsyncTargetClient", "TargetServiceError", "ClientStats"]

# What a request is built from: a stream item's keys, a stream's defaults, assign's keywords.
_REQUEST_ARGUMENTS = frozenset(inspect.signature(build_request).parameters) - {"seeds"}

_MIB = 1 << 20
# What gRPC's C core reports when a stream's message could not be written because the
# stream ended under it (a server killed, draining or past the deadline while the client
# still writes); the client's core makes it up, no server sends it.
_BROKEN_WRITE = "Internal error from Core"
_SERVICE = pb.DESCRIPTOR.services_by_name["TargetAssigner"].full_name
# After an endpoint fails, other endpoints are preferred for this long.
_COOLDOWN_S = 1.0
# The last try before a deadline gets at least this long (a connect on a LAN takes less).
_LAST_TRY_S = 0.05
# One health check (wait_until_ready) or one question to a server whose stream broke
# (asyncio client) waits at most this long: an endpoint that never answers must not hold
# the wait while another is SERVING.
_PROBE_S = 1.0


def _transport_failure(error: grpc.RpcError) -> bool:
    """The server could not be reached or went away (retry elsewhere); not an answer."""
    return error.code() == grpc.StatusCode.UNAVAILABLE or _broken_write(error)


def _unreachable(error: grpc.RpcError) -> bool:
    """No connection could be made to the address (gRPC's words for it), unlike a server
    that answered UNAVAILABLE (draining) or a connection that broke."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (error.details() or "").lower()


def _rich_status(error: grpc.RpcError):
    """The call's ``google.rpc.Status`` from its trailers, or None: none sent, or one whose
    code or message differs from the call's (a proxy that rewrote the status; grpcio's
    reader raises ValueError there, and the call's own status is the one to trust)."""
    if not hasattr(error, "trailing_metadata"):
        return None
    try:
        return rpc_status.from_call(error)
    except ValueError:
        return None


def _overloaded(error: grpc.RpcError) -> bool:
    """The server's queue was full (retry, elsewhere first): a RESOURCE_EXHAUSTED whose
    ErrorInfo says so, where a request over a limit would fail again anywhere."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    status = _rich_status(error)
    for detail in () if status is None else status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if (info.reason, info.domain) == (OVERLOADED_REASON, ERROR_DOMAIN):
                return True
    return False


# How gRPC's C core words a TLS handshake that refused the server's certificate.
_CERTIFICATE_REFUSED = ("Hostname Verification Check failed", "CERTIFICATE_VERIFY_FAILED")


def _certificate_refused(error: grpc.RpcError) -> bool:
    """The server's certificate does not name the address or is not signed by the given
    CA: every try fails the same way (it is not retried)."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and any(
        m in (error.details() or "") for m in _CERTIFICATE_REFUSED
    )


def _broken_write(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.INTERNAL and error.details() == _BROKEN_WRITE


class _Failure(grpc.RpcError):
    """A failure the client establishes itself (no server sent it); ``silent``: the
    endpoint answered nothing for a whole try (it is avoided for a while, as one gone)."""

    def __init__(self, code: grpc.StatusCode, details: str, *, silent: bool = False) -> None:
        super().__init__(details)
        self._code, self._details, self.silent = code, details, silent

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _parsed(response):
    """A response grpc.aio received; it logs one whose bytes do not parse and hands over
    None (the blocking client's call fails): that failure, as the blocking client's."""
    if response is None:
        raise _Failure(grpc.StatusCode.INTERNAL, "Exception deserializing response!")
    return response


def bearer_token(token: str, source: str) -> str:
    """``token`` as client and server both read it: without surrounding whitespace (a
    secret made from a file ends with a newline; kept, it made a token no client can send:
    gRPC refuses such a header as "Invalid metadata"). Refused, naming ``source``: one
    empty once stripped (read as "no token", a server took every caller and a client sent
    none: None says that), and characters a bearer token cannot hold (RFC 6750: printable
    ASCII without spaces)."""
    token = token.strip()
    if not token:
        raise ValueError(f"{source}: the token is empty; give the token, or None for no token")
    if not all(" " < c <= "~" for c in token):
        raise ValueError(f"{source}: a bearer token is printable ASCII without spaces; this one is not")
    return token


def command_line_token(flag: str | None, verb: str) -> str | None:
    """The bearer token of a command: ``--token``, else env TRITARGET_TOKEN, else none. One
    given empty on purpose is refused (``TRITARGET_TOKEN="$SECRET"`` with SECRET unset is
    the usual way to get one): read as "no token", a server would take every caller, and
    a client's calls fail UNAUTHENTICATED far from the cause. ``verb``: what the command
    does without a token ("serve", "call")."""
    if flag is not None:
        if not flag.strip():
            raise ValueError(f"--token is empty; give the token, or leave --token out to {verb} without one")
        return bearer_token(flag, "--token")
    token = os.environ.get("TRITARGET_TOKEN")
    if token is not None and not token.strip():
        raise ValueError(f"TRITARGET_TOKEN is set but empty; unset it to {verb} without a token")
    return None if token is None else bearer_token(token, "TRITARGET_TOKEN")


def checked_timeout(name: str, value: Any, meaning_of_none: str | None) -> float | None:
    """``value`` as seconds > 0, or None where it has a meaning (``meaning_of_none``)."""
    if value is None and meaning_of_none is not None:
        return None
    if not is_real(value) or not 0 < value < math.inf:  # NaN too
        none = "" if meaning_of_none is None else f" (or None: {meaning_of_none})"
        raise ValueError(f"{name}: must be > 0 seconds{none}, got {value!r}")
    return float(value)


class TargetServiceError(Exception):
    """A failed call: ``code`` (grpc.StatusCode), ``details`` (the server's message),
    ``field_violations`` (list of (field, description) for INVALID_ARGUMENT) and the
    ``request_id`` of a failed stream item."""

    def __init__(
        self,
        code: grpc.StatusCode | str,
        details: str | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        request_id: str = "",
    ) -> None:
        if isinstance(code, str) and details is None:
            # One message string: how torch's DataLoader re-raises a worker's exception in
            # the trainer (``type(exc)(text)``, the text ending with the worker's traceback);
            # a type it cannot build that way reaches the trainer as a bare RuntimeError.
            message = code
            code, details = _code_and_details(message)
        else:
            if isinstance(code, str):  # a code's name: "NOT_FOUND"
                if code not in grpc.StatusCode.__members__:
                    raise ValueError(f"code: expected a grpc.StatusCode or its name, got {code!r}")
                code = grpc.StatusCode[code]
            message = f"{code.name}: {details}"
        super().__init__(message)
        self.code = code
        self.details = details
        self.field_violations = list(field_violations)
        self.request_id = request_id

    def __reduce__(self):
        # Pickled (a worker's result sent whole): rebuilt with every field (Exception's
        # default pickling passes only the message to __init__).
        return type(self), (self.code, self.details, self.field_violations, self.request_id)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> TargetServiceError:
        violations = []
        status = _rich_status(error)
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad_request = error_details_pb2.BadRequest()
                    detail.Unpack(bad_request)
                    violations += [(v.field, v.description) for v in bad_request.field_violations]
        return cls(error.code(), error.details() or "", violations)

    @classmethod
    def from_request_error(cls, error: pb.RequestError, request_id: str) -> TargetServiceError:
        code = next((c for c in grpc.StatusCode if c.value[0] == error.code), grpc.StatusCode.UNKNOWN)
        violations = [(v.field, v.description) for v in error.field_violations]
        return cls(code, error.message, violations, request_id)

    def naming_images(self, image_ids: Sequence[Any]) -> TargetServiceError:
        """The same error with the request's image indices followed by the caller's ids
        (``naming_images``)."""
        ids = list(image_ids)
        return TargetServiceError(self.code, naming_images(self.details, ids),
                                  [(f, naming_images(d, ids)) for f, d in self.field_violations],
                                  self.request_id)  # fmt: skip


# "CODE: details" as str(TargetServiceError) starts, or as a traceback's last line
# ("...TargetServiceError: CODE: details") shows it.
_CODE_AND_DETAILS = re.compile(r"(?:^|TargetServiceError: )([A-Z_]+): (.*)", re.DOTALL)


def _code_and_details(message: str) -> tuple[grpc.StatusCode, str]:
    """The code and details in an error's message (its last traceback's, when it holds
    tracebacks); UNKNOWN and the whole message when it names no code."""
    last = message.rsplit("Traceback (most recent call last):", 1)[-1]
    for match in _CODE_AND_DETAILS.finditer(last):
        code = grpc.StatusCode.__members__.get(match.group(1))
        if code is not None:
            return code, match.group(2).rstrip("\n")
    return grpc.StatusCode.UNKNOWN, message


# "image i", and the per-image arguments indexed by image ("image_sizes[i]", "image_sizes[i, j]").
_IMAGE_INDEX = re.compile(r"\bimage (\d+)\b|\b(?:image_sizes|pad_sizes|gt_counts|ignore_counts)\[(\d+)(?:, \d+)?\]")


def naming_images(text: str, image_ids: Sequence[Any]) -> str:
    """``text`` with each ``image i`` (or ``image_sizes[i]``, ...) followed by the caller's
    id of that image, e.g. ``image 2, box 5`` -> ``image 2 (id 139), box 5``: errors name
    dataset images."""

    def name(match: re.Match) -> str:
        i = int(match.group(1) or match.group(2))
        return f"{match.group(0)} (id {image_ids[i]})" if i < len(image_ids) else match.group(0)

    return _IMAGE_INDEX.sub(name, text)


@dataclass
class ClientStats:
    """What a client did in this process (``client.stats``)."""

    calls: int = 0  # unary calls and streams
    errors: int = 0  # calls or streams that failed for good
    retries: int = 0  # tries after a call's first, and stream restarts on another endpoint
    resent: int = 0  # stream requests sent again after a break (unanswered when their server went away), each once
    responses: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    latency_seconds: float = 0.0  # unary calls that succeeded, summed
    max_latency_seconds: float = 0.0


def read_root_certificates(path: str) -> bytes:
    """The PEM certificates in file ``path``; ``ValueError`` naming the file when it cannot
    be read or holds none (gRPC reports a bad one only as a failed TLS handshake, which a
    client retries as if no server were there)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    try:
        check_root_certificates(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return data


def check_root_certificates(data: bytes) -> None:
    """``ValueError`` unless ``data`` holds PEM certificates."""
    import ssl

    if not data.strip():  # ssl takes no certificates as none to check against
        raise ValueError("not PEM certificates (empty)")
    try:
        ssl.create_default_context(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        reason = exc.reason if isinstance(exc, ssl.SSLError) else None  # None for a key, say
        raise ValueError(f"not PEM certificates ({reason or exc})") from None


# Pings on a connection whose call waits, to find a server gone without a word.
_KEEPALIVE_MS = 30_000
# How gRPC words the GOAWAY of a server that was pinged more often than it allows.
_TOO_MANY_PINGS = "Too many pings"
# How gRPC refuses a message over a size limit: it names the sizes, not what to do.
_TOO_LARGE = re.compile(r"(SERVER|CLIENT): (Received|Sent) message larger than max")
_TOO_LARGE_ADVICE = {
    ("SERVER", "Received"): "this request is over the server's request size limit (sized by its "
    "--max-request-images and --max-request-boxes): send fewer images or boxes per request",
    ("SERVER", "Sent"): "the response is over the server's --max-message-mb: ask for fewer images per request",
    ("CLIENT", "Received"): "the response is over this client's max_message_bytes: raise it "
    "(TargetClient(..., max_message_bytes=...)) or ask for fewer images per request",
    ("CLIENT", "Sent"): "this request is over this client's max_message_bytes: send fewer images or boxes per request",
}

# Channel options the client's own arguments set (its checks rely on them).
_ARGUMENT_OPTIONS = {"grpc.max_send_message_length": "max_message_bytes",
                     "grpc.max_receive_message_length": "max_message_bytes"}  # fmt: skip


def _channel_options(max_message_bytes: int, backoff: float, max_backoff: float,
                     extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:  # fmt: skip
    """Ours, each replaced by the caller's of the same name: gRPC takes the first of two
    (a caller's keepalive time after ours was ignored)."""
    # gRPC's own reconnect backoff (1 s, x1.6, up to 120 s) bounded by the client's: while
    # it runs, every try fails at once without dialling, and a server that came up late in
    # the deadline was not found (up 17 s after the client: 10.7 s more, or the deadline).
    longest = 2**31 - 1  # gRPC's channel arguments are C ints
    reconnect_ms = min(longest, max(1, round(backoff * 1000)))
    options = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.service_config": json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}),
        "grpc.keepalive_time_ms": _KEEPALIVE_MS,
        "grpc.initial_reconnect_backoff_ms": reconnect_ms,
        "grpc.max_reconnect_backoff_ms": min(longest, max(reconnect_ms, round(max_backoff * 1000))),
    }
    options.update(extra)
    return list(options.items())


# Every client of this process: a forked child starts each afresh (``_reset``).
_CLIENTS: weakref.WeakSet[_Base] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for client in list(_CLIENTS):
        client._reset()


os.register_at_fork(after_in_child=_reset_after_fork)


class _Base:
    """What both clients share: endpoints, credentials, options, retry policy.

    The pickled state is the constructor's arguments; channels are opened lazily in
    whichever process uses the client."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = 60.0,
        try_timeout: float | None = None,
        retries: int | None = None,
        backoff: float = 0.05,
        max_backoff: float = 1.0,
        max_message_bytes: int = 256 * _MIB,
        options: Sequence[tuple[str, Any]] = (),
        connections: int = 1,
    ) -> None:
        self.targets = [target] if isinstance(target, str) else list(target)
        if not self.targets:
            raise ValueError("target: give at least one address")
        for address in self.targets:
            check_target(address)
        if not is_integer(connections) or connections < 1:
            raise ValueError(f"connections: must be an integer >= 1, got {connections!r}")
        self.connections = connections = int(connections)
        # One endpoint per connection, the addresses interleaved so that turns alternate
        # between them; channels alike in address and options share one connection
        # unless each keeps its own subchannel pool.
        self._endpoints = self.targets * connections
        own_pool = [("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []
        try_timeout = checked_timeout("try_timeout", try_timeout, "the call's timeout")
        timeout = checked_timeout("timeout", timeout, "no deadline")
        if not is_real(backoff) or not 0 <= backoff < math.inf:
            raise ValueError(f"backoff: must be finite seconds >= 0, got {backoff!r}")
        if not is_real(max_backoff) or not 0 < max_backoff < math.inf:
            raise ValueError(f"max_backoff: must be finite seconds > 0, got {max_backoff!r}")
        if retries is not None and (not is_integer(retries) or retries < 0):
            raise ValueError(f"retries: must be an integer >= 0 (or None: until the deadline), got {retries!r}")
        self.timeout = timeout
        self.try_timeout = try_timeout
        self.retries = None if retries is None else int(retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        if token is not None:
            if not isinstance(token, str):
                raise ValueError(f"token: expected a str, got {type(token).__name__}")
            token = bearer_token(token, "token")
        self._token = token
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if root_certificates is not None:
            if not isinstance(root_certificates, bytes):
                raise ValueError("root_certificates: expected the PEM file's bytes (read_root_certificates(path)), "
                                 f"got {type(root_certificates).__name__}")  # fmt: skip
            try:
                check_root_certificates(root_certificates)
            except ValueError as exc:
                raise ValueError(f"root_certificates: {exc}") from None
        check_flags(tls=tls)
        self._tls = tls or root_certificates is not None
        self._root_certificates = root_certificates
        if not is_integer(max_message_bytes) or not (0 < max_message_bytes < 2**31):  # gRPC's limits are int32
            raise ValueError(f"max_message_bytes: must be an integer in [1, 2**31), got {max_message_bytes!r}")
        self._max_message_bytes = max_message_bytes = int(max_message_bytes)
        if isinstance(options, Mapping) or not all(isinstance(o, tuple) and len(o) == 2 for o in options):
            raise ValueError(f"options: expected a sequence of (name, value) pairs, got {options!r}")
        for name, _ in options:
            if name in _ARGUMENT_OPTIONS:
                raise ValueError(f"options: {name} is set by the client's {_ARGUMENT_OPTIONS[name]}= argument")
        self._extra_options = list(options)
        self._options = _channel_options(max_message_bytes, backoff, max_backoff, [*options, *own_pool])
        self._reset()
        _CLIENTS.add(self)

    def _reset(self) -> None:
        """Forget every per-process thing: channels, stubs, the turn, failures, counters
        and locks (in a forked child, another thread may have held them at the fork)."""
        self._forget_channels()
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._stats = ClientStats()
        self._stats_lock = threading.Lock()

    @property
    def stats(self) -> ClientStats:
        """A snapshot of this process's counters (calls, retries, bytes, latency)."""
        with self._stats_lock:
            return replace(self._stats)

    def _count(self, **increments: float) -> None:
        with self._stats_lock:
            for name, value in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)

    def _answered(self, request, response, started: float) -> None:
        latency = time.monotonic() - started
        with self._stats_lock:
            stats = self._stats
            stats.responses += 1
            stats.request_bytes += request.ByteSize()
            stats.response_bytes += response.ByteSize()
            stats.latency_seconds += latency
            stats.max_latency_seconds = max(stats.max_latency_seconds, latency)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "target": self.targets, "token": self._token, "tls": self._tls,
            "root_certificates": self._root_certificates, "timeout": self.timeout, "try_timeout": self.try_timeout,
            "retries": self.retries, "backoff": self.backoff, "max_backoff": self.max_backoff,
            "max_message_bytes": self._max_message_bytes, "options": self._extra_options,
            "connections": self.connections,
        }  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._root_certificates)

    @staticmethod
    def _current_owner() -> Any:
        return os.getpid()

    def _forget_channels(self) -> None:
        self._owner: Any = None  # the process the channels were opened in
        self._closes = 0  # close() calls so far: a call that sees it change was closed under
        self._stubs: list[pb_grpc.TargetAssignerStub] = []
        self._channels: list = []
        self._failed_at = [float("-inf")] * len(self._endpoints)  # when each endpoint last failed

    def _open_all(self) -> None:
        if self._owner != self._current_owner():
            self._channels = [self._open(t) for t in self._endpoints]
            self._stubs = [pb_grpc.TargetAssignerStub(c) for c in self._channels]
            self._failed_at = [float("-inf")] * len(self._endpoints)
            self._owner = self._current_owner()

    def _endpoint(self, closes: int) -> tuple[int, pb_grpc.TargetAssignerStub, Any]:
        """The next endpoint in turn, skipping those that failed in the last moment
        (unless all did), with its stub and channel: channels opened on first use in this
        process. ``closes``: ``self._closes`` when the call began; a call the client was
        closed under gets ``TargetServiceError`` CANCELLED (it would open channels again)."""
        with self._lock:
            if self._closes != closes:
                raise self._closed_under_call()
            self._open_all()
            now = time.monotonic()
            for _ in range(len(self._endpoints)):
                index = next(self._turn) % len(self._endpoints)
                if now - self._failed_at[index] >= _COOLDOWN_S:
                    break
            else:
                index = next(self._turn) % len(self._endpoints)
            return index, self._stubs[index], self._channels[index]

    def _closed_under_call(self) -> TargetServiceError:
        self._count(errors=1)
        return TargetServiceError(grpc.StatusCode.CANCELLED, "the client was closed while this call waited")

    def _closing(self) -> list:
        """For ``close()``: the channels to close (those of this process), forgotten here
        under the lock, so that no call takes one of them any more."""
        with self._lock:
            channels = self._channels if self._owner == self._current_owner() else []
            self._channels, self._stubs, self._owner = [], [], None
            self._closes += 1
        return channels

    def _failed(self, index: int, error: grpc.RpcError) -> None:
        """The endpoint is skipped for a moment; an address nothing could connect to, on
        every connection to it (with ``connections=N`` a dead address was tried once on
        each). Otherwise only this connection: the others may reach other front ends."""
        now = time.monotonic()
        if not _unreachable(error):
            self._failed_at[index] = now
            return
        for same_address in range(index % len(self.targets), len(self._endpoints), len(self.targets)):
            self._failed_at[same_address] = now

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter (the exponent capped: without a deadline
        a call may retry more than a thousand times, and 2.0**1024 overflows)."""
        return random.uniform(0, min(self.max_backoff, self.backoff * 2.0 ** min(attempt, 64)))

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else checked_timeout("timeout", timeout, "the client's")
        return None if timeout is None else time.monotonic() + timeout

    def _retry_wait(self, error: grpc.RpcError, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before the next try, or None to give up. A wait that would pass
        the deadline is cut short, so the last try comes just before it (a server that
        comes up late in the deadline is still found)."""
        if not self._retryable(error, deadline) or (self.retries is not None and attempt >= self.retries):
            return None
        delay = self._delay(attempt)
        if deadline is not None:
            left = deadline - time.monotonic() - _LAST_TRY_S
            if left <= 0:
                return None
            delay = min(delay, left)
        return delay

    def _retryable(self, error: grpc.RpcError, deadline: float | None) -> bool:
        """A transport failure, a full queue, or a try cut short by ``try_timeout`` with time left."""
        if _certificate_refused(error):
            return False
        if _transport_failure(error) or _overloaded(error):
            return True
        return (self.try_timeout is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                and (deadline is None or deadline - time.monotonic() > _LAST_TRY_S))  # fmt: skip

    def _endpoint_failed(self, error: grpc.RpcError) -> bool:
        """The endpoint, not the request, failed: unreachable, gone, overloaded, or silent for a try."""
        return (_transport_failure(error) or _overloaded(error) or getattr(error, "silent", False)
                or (self.try_timeout is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED))  # fmt: skip

    def _health_wait(self, attempt: int, deadline: float) -> float | None:
        """Seconds before the next health check, cut short so that the last comes just
        before the deadline; None: the deadline is here."""
        left = deadline - time.monotonic() - _LAST_TRY_S
        return None if left <= 0 else min(self._delay(min(attempt, 4)), left)

    def _health_limit(self, deadline: float) -> float:
        return min(self._remaining(deadline), self.try_timeout or _PROBE_S)

    def _watchdog(self, attempt: int, deadline: float | None, reconnect: float | None, unanswered: _Unanswered,
                  cancel, schedule) -> _Watchdog | None:  # fmt: skip
        """The watchdog of a stream's call: a request waiting for it must get an answer
        within ``try_timeout``, else the client's timeout, and before the stream's deadline;
        after a break the first answer must also come before the search for a server ends.
        None where there is no bound at all."""
        steady = self._try_limit(_earlier(deadline, self._deadline(None)))
        if steady is None:
            return None
        first = self._try_limit(_earlier(deadline, reconnect)) if attempt else steady
        return _Watchdog(first, steady, unanswered, cancel, schedule, takeover=attempt > 0)

    def _silent(self, index: int, watchdog: _Watchdog) -> _Failure:
        if watchdog.answers:
            details = (f"{self._endpoints[index]} answered {watchdog.answers} of the stream's requests, then "
                       f"none for {watchdog.seconds:.1f} s")  # fmt: skip
        else:
            after = " of taking over from the server that went away" if watchdog.takeover else ""
            details = (f"{self._endpoints[index]} answered none of the stream's requests within "
                       f"{watchdog.seconds:.1f} s{after}")  # fmt: skip
        return _Failure(grpc.StatusCode.DEADLINE_EXCEEDED, silent=True, details=details)

    def _try_limit(self, deadline: float | None) -> float | None:
        """Seconds one try may take: what is left of the call, at most ``try_timeout``."""
        left = self._remaining(deadline)
        if self.try_timeout is None:
            return left
        return self.try_timeout if left is None else min(left, self.try_timeout)

    def _retry_after(self, error: grpc.RpcError, index: int, attempt: int, deadline: float | None,
                     started: float) -> float:  # fmt: skip
        """After try ``attempt`` on endpoint ``index`` failed: the seconds to wait before the
        next try, or ``TargetServiceError`` raised when the call gives up."""
        if self._endpoint_failed(error):  # not for a refused request: other callers' go on here
            self._failed(index, error)
        delay = self._retry_wait(error, attempt, deadline)
        if delay is None:
            self._count(errors=1)
            raise self._give_up(error, attempt + 1, started) from None
        self._count(retries=1)
        return delay

    def _health(self, index: int, reply: health_pb2.HealthCheckResponse | None, error: grpc.RpcError | None) -> str:
        """'' when endpoint ``index`` is SERVING, else what it said (for the error message)."""
        if error is not None:
            self._failed(index, error)
            return f"{self._endpoints[index]}: {error.code().name}"
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return ""
        return f"{self._endpoints[index]} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"

    def _give_up(self, error: grpc.RpcError, attempts: int, started: float) -> TargetServiceError:
        """The error for a call that failed for good; when no server answered, it says so."""
        failure = TargetServiceError.from_rpc_error(error)
        too_large = _TOO_LARGE.search(failure.details)
        if too_large is not None:
            failure.details += f": {_TOO_LARGE_ADVICE[too_large.groups()]}"
            failure.args = (f"{failure.code.name}: {failure.details}",)
        tried = ", ".join(self.targets)
        if failure.code == grpc.StatusCode.DEADLINE_EXCEEDED and failure.details == "Deadline Exceeded":
            # gRPC's own words for the client's deadline: no answer at all, which named nothing.
            tries = f"{attempts} {'try' if attempts == 1 else 'tries'}"
            failure.details = (
                f"no answer from {tried} within the call's timeout ({time.monotonic() - started:.1f} s, {tries}): a "
                "server that hangs or is far behind, or a listener that is no gRPC server; try_timeout= moves a "
                "try that takes longer to the next endpoint"
            )
            failure.args = (f"{failure.code.name}: {failure.details}",)
            return failure
        if not _transport_failure(error):
            return failure
        if _certificate_refused(error):
            failure.details = (
                f"the TLS server at {tried} sent a certificate this client refused: it must name the address "
                "connected to (a certificate for localhost: connect to localhost:PORT) and be signed by "
                f"root_certificates (command line: `--tls-ca`); last error: {failure.details}"
            )
            failure.args = (f"{failure.code.name}: {failure.details}",)
            return failure
        if error.details() == _TOO_MANY_PINGS:  # it did answer: its ping policy ended the connection
            every = dict(self._options)["grpc.keepalive_time_ms"]
            failure.details = (
                f"the server at {tried} closed the connection (GOAWAY: too many pings): this client pings every "
                f"{every} ms while a call waits, and the server (or a proxy in between) must allow it (gRPC's "
                f"grpc.http2.min_ping_interval_without_data_ms <= {every}; `tritarget serve` allows 10000) or the "
                "client ping less often (options=[('grpc.keepalive_time_ms', ms)]); retries reconnect"
            )
            failure.args = (f"{failure.code.name}: {failure.details}",)
            return failure
        failure.details = (
            f"no tritarget server answered at {tried} ({attempts} tries over {time.monotonic() - started:.1f} s; "
            f"last error: {failure.details}). Is it running, and reachable from here? Start one with `tritarget "
            "serve --port PORT` (or `tritarget up`), or check the address and the network between; "
            "`wait_until_ready(timeout)` waits for a server starting up"
        )
        if not self._tls:  # a TLS server hangs up on a plaintext client: it looks just like no server
            failure.details += "; a server with TLS needs tls=True or root_certificates (command line: `--tls-ca`)"
        failure.args = (f"{failure.code.name}: {failure.details}",)
        return failure

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(deadline - time.monotonic(), 0.001)

    @staticmethod
    def _request(item: pb.AssignRequest | Mapping[str, Any], defaults: Mapping[str, Any], index: int,
                 seeds: torch.Generator, densify: bool):  # fmt: skip
        """Stream item ``index`` as a request, refused before it is sent where it is not one
        or asks for what ``densify=False`` cannot return (the stream's defaults were
        checked when it was called; an item's own options were found out only by its
        answer, which ended the stream)."""
        if isinstance(item, pb.AssignRequest):
            options = {"format": "dense" if item.format == pb.FORMAT_DENSE else "sparse",
                       "return_max_iou": item.return_max_iou}  # fmt: skip
        elif isinstance(item, Mapping):
            _check_request_arguments(item, f"stream item {index}")
            options = {**defaults, **item}
            options.setdefault("request_id", str(index))
        else:
            raise TypeError(f"stream item {index}: expected a dict of assign arguments or an AssignRequest, "
                            f"got {type(item).__name__}")  # fmt: skip
        try:
            check_densify(densify, options)
            return item if isinstance(item, pb.AssignRequest) else build_request(**options, seeds=seeds)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"stream item {index}: {exc}") from None

    @staticmethod
    def _result(request: pb.AssignRequest, response: pb.AssignResponse, densify: bool) -> Targets | SparseTargets:
        if response.HasField("error"):
            # The server leaves the id out of an error response it would push over the size limit.
            raise TargetServiceError.from_request_error(response.error, response.request_id or request.request_id)
        targets = decode_response(response, request) if densify else decode_sparse(response, request)
        targets.level_starts = level_starts(request)
        return targets

    def _streamed(self, unanswered: _Unanswered, response: pb.AssignResponse, densify: bool,
                  return_exceptions: bool) -> Targets | SparseTargets | TargetServiceError:  # fmt: skip
        """A stream's next response, its request now answered: the targets, or the item's
        error (raised unless ``return_exceptions``)."""
        request = unanswered.answered()
        # The server echoes request_id (empty for an item it could not parse): one that
        # differs means responses out of order, each about to get another's targets.
        if request.request_id and response.request_id and response.request_id != request.request_id:
            self._count(errors=1)
            raise ValueError(
                f"malformed response: request_id {response.request_id!r} where the answer to {request.request_id!r} "
                "was due (AssignStream answers in request order)"
            )
        self._count(responses=1, response_bytes=response.ByteSize())
        try:
            return self._result(request, response, densify)
        except TargetServiceError as error:
            if not return_exceptions:
                self._count(errors=1)  # the stream ends here
                raise
            return error

    def _stream_broke(self, error: grpc.RpcError, index: int, attempt: int, deadline: float | None, started: float,
                      unanswered: _Unanswered) -> tuple[int, list[pb.AssignRequest], float]:  # fmt: skip
        """A stream's call on endpoint ``index`` failed: the new call's feed generation, the
        requests it sends again (in order, on the next endpoint) and the seconds to wait
        first; ``TargetServiceError`` raised when the stream gives up."""
        delay = self._retry_after(error, index, attempt, deadline, started)
        generation, resend, first_time = unanswered.restart()
        self._count(resent=first_time)
        return generation, resend, delay

    def _ended(self, unanswered: _Unanswered) -> None:
        """The stream's call ended OK, or broke with nothing left (``complete``): every
        request must have been sent and answered (a server that stops early ends
        UNAVAILABLE, and those requests go to another endpoint). Raises what reading the
        requests raised, if it stopped there."""
        cut_short = not unanswered.exhausted and unanswered.failure is None
        if unanswered.outstanding() or unanswered.failure is not None or cut_short:
            self._count(errors=1)
        if unanswered.outstanding():
            raise ValueError(
                f"malformed response: the stream ended OK with {unanswered.outstanding()} of its requests unanswered "
                "(AssignStream answers every request)"
            )
        if cut_short:
            raise ValueError(
                "malformed response: the stream ended OK before all its requests were sent (AssignStream reads "
                "every request)"
            )
        if unanswered.failure is not None:
            raise unanswered.failure


# gRPC's other name schemes ("unix:/path", "ipv4:1.2.3.4:5", ...): passed on unchecked.
_SCHEMES = re.compile(r"^(unix|unix-abstract|ipv4|ipv6|vsock):")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_target(address: object) -> None:
    """``ValueError`` unless ``address`` is a gRPC target this client can dial: 'host:port'
    ('[v6]:port'), 'dns:///host:port', or another of gRPC's schemes. The port is checked
    here: gRPC takes it modulo 65536 (port 102505 reached a server on 36969) and one left
    out as 443."""
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"target: expected 'host:port' addresses, got {address!r}")
    if _SCHEMES.match(address):
        return
    if _URL.match(address) and not address.startswith("dns:"):  # gRPC would resolve "http" as a host name
        raise ValueError(f"target: {address!r} is a URL; give 'host:port' (a TLS server: the client's tls=True, "
                         "the command line's --tls-ca)")  # fmt: skip
    if re.search(r"[\s,]", address):
        raise ValueError(f"target: {address!r} holds a space or a comma; give one 'host:port' per address (a list "
                         "of them for several)")  # fmt: skip
    name = re.sub(r"^dns:(//[^/]*/)?", "", address)
    host, colon, port = name.rpartition(":") if not name.startswith("[") or "]:" in name else ("", "", "")
    if not colon or not host or not (re.fullmatch("[0-9]+", port) and 1 <= int(port) <= 65535):
        raise ValueError(f"target: expected 'host:port' with a port in 1..65535, got {address!r}")
    if ":" in host and not host.startswith("["):
        raise ValueError(f"target: {address!r}: an IPv6 address goes in brackets, '[{host}]:{port}'")


def _named_request(gt_boxes, gt_counts, canvas, image_ids: Any, kwargs) -> tuple[pb.AssignRequest, list | None]:
    """``build_request``'s request and the caller's ids of its images, one per image,
    checked before it is sent (read only when the call fails, a wrong one replaced the
    server's error). A value the wire cannot carry (a class past int32) is refused naming
    its image's id, as the server's refusals are."""
    if image_ids is not None and (isinstance(image_ids, (str, bytes)) or not isinstance(image_ids, Iterable)):
        raise TypeError(f"image_ids: expected one id per image (a list), got {type(image_ids).__name__}")
    ids = None if image_ids is None else list(image_ids)
    try:
        request = build_request(gt_boxes, gt_counts, canvas, **kwargs)
    except ValueError as exc:
        if ids is None:
            raise
        raise ValueError(naming_images(str(exc), ids)) from None
    if ids is not None and len(ids) != len(request.gt_counts):
        raise ValueError(f"image_ids: {len(ids)} ids for {len(request.gt_counts)} images")
    return request, ids


def _check_request_arguments(names: Iterable[str], where: str) -> None:
    """``TypeError`` naming the first of ``names`` that builds no request (the message
    named ``build_request()``, which callers never see)."""
    unknown = sorted(set(names) - _REQUEST_ARGUMENTS, key=str)
    if unknown:
        own = " (one of stream()'s own arguments, for all its items)" if unknown[0] in ("timeout", "densify") else ""
        raise TypeError(f"{where}: unknown argument {unknown[0]!r}{own}; a request's arguments are "
                        f"{', '.join(sorted(_REQUEST_ARGUMENTS))}")  # fmt: skip


def check_densify(densify: bool, options: Mapping[str, Any]) -> None:
    """Refuse request options ``SparseTargets`` (``densify=False``) cannot hold."""
    check_flags(densify=densify)
    if not densify and options.get("format", "sparse") != "sparse":
        raise ValueError("densify=False returns SparseTargets: it needs format='sparse'")
    if not densify and options.get("return_max_iou"):
        raise ValueError("densify=False returns SparseTargets, which hold no max IoU: return_max_iou needs densify")


def _stream_seeds() -> torch.Generator:
    """Where a stream's items draw fresh sampling seeds: seeded now, on the caller's thread
    (gRPC's thread builds the requests), so that ``torch.manual_seed`` repeats a run and the
    trainer's own draws do not depend on the threads' timing."""
    return torch.Generator().manual_seed(fresh_seed())


def _earlier(first: float | None, second: float | None) -> float | None:
    """The earlier of two deadlines (None: none)."""
    return second if first is None else first if second is None else min(first, second)


def _not_ready(addresses: Sequence[str], waited: float, last: str, tls: bool) -> TargetServiceError:
    # A TLS server hangs up on a plaintext client: it looks just like no server (as in _give_up).
    tls_hint = "; a server with TLS needs tls=True or root_certificates (command line: `--tls-ca`)" if not tls else ""
    return TargetServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"no tritarget server at {', '.join(addresses)} became SERVING within {waited:.1f} s ({last}); "
        f"start one with `tritarget serve --port PORT` (or `tritarget up`), or check the address{tls_hint}",
    )


class _Unanswered:
    """The requests of one logical stream that were handed to gRPC and not answered yet,
    in order. Every (re)started call reads its requests through ``feed`` (``afeed`` for
    asyncio): first the ones to send again, then the source. ``restart()`` stops the old
    call's feed and returns what the new call must send again; a request the old feed
    was still reading when that happened is handed on to the new feed, so every request
    is on exactly one live call and the order is kept."""

    def __init__(self, source: Iterator[pb.AssignRequest] | AsyncIterator[pb.AssignRequest], count,
                 max_bytes: int) -> None:  # fmt: skip
        self._source = source
        self._count = count  # the client's counters
        self._max_bytes = max_bytes  # the client's max_message_bytes
        self._sent: deque[pb.AssignRequest] = deque()
        # How many of ``_sent``, from its oldest, were sent again already: a restart sends
        # all of ``_sent`` again and later requests join its end, so they are always its
        # first ones (counted by place: a request object may be streamed more than once).
        self._resent = 0
        self._sent_at: deque[float] = deque()  # when each was read and handed to gRPC
        self._late: deque[pb.AssignRequest] = deque()  # read by a stopped feed: sent by the next
        self._generation = 0
        self._state = threading.Lock()  # the blocking client's requests are read on a gRPC thread
        # What reading the source raised (an item that builds no request, or the caller's
        # iterable failing): the feed ends there, and the stream raises it once the
        # requests sent before it are answered. gRPC would otherwise end the call with
        # "UNKNOWN: Exception iterating requests!" and the answers still in flight.
        self.failure: Exception | None = None
        self.exhausted = False  # every request of the source read (a call that ends before is cut short)
        self._reading = threading.Lock()  # one reader of the source at a time (old and new feed)
        self._areading = asyncio.Lock()
        self._next: asyncio.Future | None = None  # the asyncio source's read in progress (``_anext``)

    def _take_late(self, generation: int) -> tuple[bool, pb.AssignRequest | None]:
        """(stopped, a late request to send first)."""
        with self._state:
            if generation != self._generation:
                return True, None
            return False, self._late.popleft() if self._late else None

    def _keep(self, generation: int, message: pb.AssignRequest) -> bool:
        """Record a request read from the source; False if its feed was stopped meanwhile,
        or if the request is over the client's message limit (then the stream's failure:
        gRPC's asyncio client reports such a write as a server gone, and it was sent again
        to every endpoint until the deadline)."""
        size = message.ByteSize()
        if size > self._max_bytes:
            self.failure = TargetServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a request of {size} bytes (request_id {message.request_id!r}) is over this client's "
                f"max_message_bytes ({self._max_bytes}); send fewer images per request",
            )
            return False
        self._count(request_bytes=size)
        with self._state:
            self._sent.append(message)
            self._sent_at.append(time.monotonic())
            if generation != self._generation:
                self._late.append(message)
                return False
            return True

    def feed(self, generation: int, resend: list[pb.AssignRequest]) -> Iterator[pb.AssignRequest]:
        yield from resend
        while True:
            with self._reading:
                stopped, message = self._take_late(generation)
                if stopped:
                    return
                if message is None:
                    if self.failure is not None:  # the stream ends there: nothing after it is sent
                        return
                    try:
                        message = next(self._source, None)
                    except Exception as exc:
                        self.failure = exc
                        return
                    self.exhausted = message is None
                    if message is None or not self._keep(generation, message):
                        return
            yield message

    async def afeed(self, generation: int, resend: list[pb.AssignRequest]) -> AsyncIterator[pb.AssignRequest]:
        for message in resend:
            yield message
        while True:
            async with self._areading:
                stopped, message = self._take_late(generation)
                if stopped:
                    return
                if message is None:
                    if self.failure is not None:  # the stream ends there: nothing after it is sent
                        return
                    try:
                        message = await self._anext()
                    except Exception as exc:
                        self.failure = exc
                        return
                    self.exhausted = message is None
                    if message is None or not self._keep(generation, message):
                        return
            yield message

    async def _anext(self) -> pb.AssignRequest | None:
        """The asyncio source's next request, read in a task of its own and awaited through
        a shield. grpc.aio cancels a feed when its call is cancelled (the watchdog, a
        retry); awaited directly, the cancellation reached the caller's async generator and
        ended it, and the stream ended as if complete with the requests after it never
        sent. A cancelled feed leaves the read to the next one."""
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._source, None))
        read = self._next
        try:
            message = await asyncio.shield(read)
        except asyncio.CancelledError:
            if read.cancelled():  # by close()
                self._next = None
            raise  # else the read, done or not, is the next feed's
        except Exception:
            self._next = None
            raise
        self._next = None
        return message

    def close(self) -> None:
        """The stream is over: a read of the asyncio source still in progress is cancelled."""
        if self._next is not None:
            self._next.cancel()

    def answered(self) -> pb.AssignRequest:
        """The oldest unanswered request, now answered."""
        with self._state:
            if not self._sent:
                raise ValueError(
                    "malformed response: an answer with no request outstanding (more answers than requests)"
                )
            self._sent_at.popleft()
            request = self._sent.popleft()
            self._resent = max(self._resent - 1, 0)
            return request

    def outstanding(self) -> int:
        with self._state:
            return len(self._sent)

    def complete(self) -> bool:
        """Every request of the source read (or reading it failed) and every one sent
        answered: a call that breaks now (a server that drains answers what it read, then
        ends the stream UNAVAILABLE) leaves nothing to send again."""
        with self._state:
            return not self._sent and (self.exhausted or self.failure is not None)

    def oldest_sent(self) -> float | None:
        """When the oldest unanswered request was sent (``time.monotonic()``), or None."""
        with self._state:
            return self._sent_at[0] if self._sent_at else None

    def restart(self) -> tuple[int, list[pb.AssignRequest], int]:
        """The new feed's generation, the requests it sends again, and how many of those
        are sent again for the first time (``stats.resent`` counts each request once,
        however many servers it goes through)."""
        with self._state:
            self._generation += 1
            self._late.clear()  # they are unanswered, so among the ones sent again
            resend = list(self._sent)
            first, self._resent = len(resend) - self._resent, len(resend)
            return self._generation, resend, first


class _Watchdog:
    """Cancels a stream's call (``fired``) once a request has waited ``seconds`` with no
    answer from the call (counted from the later of its sending and the last time the call
    was read from: its opening, or the caller's return for the next answer): a server that
    accepts connections and hangs, at once or after answering for a while, would otherwise
    hold the stream for ever, whatever the client's timeout. A slow source or a request
    sent late is given its own ``seconds``; a slow server that answers is not cut off.
    Only a call being read is watched: while the caller holds an answer (a training loop
    saving a checkpoint) the server's later answers wait unread, so from ``answered()``
    until ``reading()`` the clock rests. ``schedule(seconds, callback)`` returns a handle
    with ``cancel()``."""

    def __init__(self, first: float, steady: float, unanswered: _Unanswered, cancel, schedule, *,
                 takeover: bool) -> None:  # fmt: skip
        self.seconds = first  # until the call's first answer (a takeover's: what is left of the search)
        self._steady = steady  # from then on
        self.takeover = takeover  # the call took the stream over from a server that went away
        self.fired = False
        self._unanswered, self._cancel, self._schedule = unanswered, cancel, schedule
        self._opened = time.monotonic()
        self.answers = 0
        self._reading_since: float | None = self._opened  # None: the caller holds an answer
        self._looking = threading.Lock()  # a look (a timer's thread) and stop() (the stream's), one at a time
        self._handle = schedule(first, self._check)

    def _check(self) -> None:
        with self._looking:
            if self._handle is None:  # stopped meanwhile
                return
            oldest, since = self._unanswered.oldest_sent(), self._reading_since
            waited = 0.0 if oldest is None or since is None else time.monotonic() - max(oldest, since)
            if waited >= self.seconds:
                self.fired = True
                self._cancel()
            else:
                self._handle = self._schedule(self.seconds - waited, self._check)

    def answered(self) -> None:
        """The call answered a request, now handed to the caller: no look counts until
        ``reading()``."""
        self.answers += 1
        self.seconds = self._steady
        self._reading_since = None

    def reading(self) -> None:
        """The caller is back for the next answer: the silence counts from now."""
        self._reading_since = time.monotonic()

    def stop(self) -> None:
        """The call ended: no more looks."""
        with self._looking:
            handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()


def _timer(seconds: float, callback) -> threading.Timer:
    timer = threading.Timer(seconds, callback)
    timer.daemon = True
    timer.start()
    return timer


class TargetClient(_Base):
    """Blocking client; see the module docstring. Use it as a context manager."""

    def _open(self, target: str) -> grpc.Channel:
        if self._tls:
            return grpc.secure_channel(target, self._credentials(), options=self._options)
        return grpc.insecure_channel(target, options=self._options)

    def close(self) -> None:
        """Close the channels; calls in flight, in any thread, fail with
        ``TargetServiceError`` CANCELLED. The client opens new ones if used again."""
        for channel in self._closing():
            channel.close()

    def __enter__(self) -> TargetClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, timeout: float | None):
        started, deadline, closes = time.monotonic(), self._deadline(timeout), self._closes
        self._count(calls=1)
        for attempt in itertools.count():
            index, stub, _ = self._endpoint(closes)
            try:
                with self._closed_channel(closes):
                    response = getattr(stub, method)(request, timeout=self._try_limit(deadline),
                                                     metadata=self._metadata)  # fmt: skip
                self._answered(request, response, started)
                return response
            except grpc.RpcError as error:
                time.sleep(self._retry_after(error, index, attempt, deadline, started))

    @contextlib.contextmanager
    def _closed_channel(self, closes: int):
        """Where another thread closed the client as a call began or while it waited: gRPC's
        ValueError ("Cannot invoke RPC on closed channel!") or CANCELLED ("Channel closed!")
        raised as the call's CANCELLED, in the words of every other call the close ends."""
        try:
            yield
        except (ValueError, grpc.RpcError) as error:
            if self._closes != closes and (isinstance(error, ValueError) or error.code() == grpc.StatusCode.CANCELLED):
                raise self._closed_under_call() from None
            raise

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Return once an endpoint's health check says SERVING (its warm-up done); raise
        ``TargetServiceError`` (UNAVAILABLE) naming the endpoints after ``timeout`` seconds."""
        started, closes = time.monotonic(), self._closes
        deadline = started + checked_timeout("timeout", timeout, None)
        for attempt in itertools.count():
            index, _, channel = self._endpoint(closes)
            check = health_pb2_grpc.HealthStub(channel).Check
            reply, error = None, None
            try:
                with self._closed_channel(closes):
                    reply = check(health_pb2.HealthCheckRequest(service=_SERVICE),
                                  timeout=self._health_limit(deadline), metadata=self._metadata)  # fmt: skip
            except grpc.RpcError as failure:
                if _certificate_refused(failure):  # no retry changes it
                    raise self._give_up(failure, attempt + 1, started) from None
                error = failure
            last = self._health(index, reply, error)
            if not last:
                return
            delay = self._health_wait(attempt, deadline)
            if delay is None:
                raise _not_ready(self.targets, time.monotonic() - started, last, self._tls)
            time.sleep(delay)

    def assign(
        self, gt_boxes, gt_counts, canvas, *, timeout: float | None = None, densify: bool = True,
        image_ids: Sequence[Any] | None = None, **kwargs,
    ) -> Targets | SparseTargets:  # fmt: skip
        """Targets of a ragged batch.

        Args:
            gt_boxes (Tensor[N, 4]): every image's boxes, in ``box_format``: ``"xyxy"`` pixels
                (default), ``"xywh"``, ``"cxcywh"``, or one of those normalised (``"xyxyn"``...:
                fractions of each image's ``image_sizes``, else of the canvas).
            gt_counts (list of B ints or Tensor[B]): boxes per image.
            canvas ((int, int)): padded batch (height, width).
            preset (str) or config (TargetConfig or its dict), overrides (dict, optional).
            gt_classes (Tensor[N] int, optional), ignore_boxes + ignore_counts, image_sizes, pad_sizes
                (Tensor[B, 2]), drop_invalid, seed: as ``tritarget.kernels.assign``.
            format: ``"sparse"`` (default, far smaller) or ``"dense"``. SPARSE lists no
                matched box for anchors that are not positive: detectron2 mode's argmax
                boxes of negative and ignored anchors come back -1 (``"dense"`` carries them).
            delta_dtype: ``"float32"`` or ``"float16"`` (half the delta bytes).
            return_classes (default: when gt_classes are given), return_max_iou.
            timeout: seconds for this call (default: the client's).
            densify: False returns the SPARSE lists as ``SparseTargets`` (densify them where
                the trainer is: ``.to_dense(device="cuda")``).
            image_ids: the dataset's id of each image: errors name them next to the index.
        Returns:
            Targets, as ``tritarget.kernels.assign`` returns them (or SparseTargets).
        """
        check_densify(densify, kwargs)
        _check_request_arguments(kwargs, "assign")
        request, ids = _named_request(gt_boxes, gt_counts, canvas, image_ids, kwargs)
        try:
            return self._result(request, self.assign_raw(request, timeout=timeout), densify)
        except TargetServiceError as error:
            if ids is None:
                raise
            raise error.naming_images(ids) from None

    def assign_raw(self, request: pb.AssignRequest, *, timeout: float | None = None) -> pb.AssignResponse:
        """One Assign call with a ready request; the response as it came."""
        return self._call("Assign", request, timeout)

    def stream(
        self,
        requests: Iterable[Mapping[str, Any] | pb.AssignRequest],
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
        densify: bool = True,
        **defaults: Any,
    ) -> Iterator[Targets | TargetServiceError]:
        """Targets for each request, in order, over one AssignStream call.

        Each item is a dict of ``assign`` arguments but ``timeout``, ``densify`` (the
        stream's, for every item) and ``image_ids`` (``request_id`` names an item in
        errors), with ``defaults`` filling in what it leaves out, e.g. ``preset`` and
        ``canvas``; or a ready ``AssignRequest``.
        The server works on several items at once; a failed item raises
        ``TargetServiceError`` (or is yielded, with ``return_exceptions=True``).
        ``timeout`` bounds the whole stream when given; by default a stream has no deadline
        (it may last an epoch); the client's timeout (``try_timeout`` where given) bounds
        how long the call may leave its requests without an answer, and after a break the
        search for a server. An exception raised while reading
        ``requests`` (an item that makes no request, or the iterable itself failing) ends the
        stream: the requests before it are answered, then it is raised. When the stream's
        server becomes UNAVAILABLE (killed, draining), the unanswered requests are sent
        again, in order, on a new stream to the next endpoint: every request gets exactly
        one answer.
        ``densify=False`` yields ``SparseTargets`` (SPARSE requests only).
        """
        # Checked here, when called, not at the first answer (the stream is a generator).
        check_densify(densify, defaults)
        _check_request_arguments(defaults, "stream")
        check_flags(return_exceptions=return_exceptions)
        seconds = None if timeout is None else checked_timeout("timeout", timeout, "no deadline")
        return self._stream(requests, seconds, return_exceptions, densify, defaults)

    def _stream(self, requests, timeout: float | None, return_exceptions: bool, densify: bool,
                defaults: Mapping[str, Any]) -> Iterator[Targets | TargetServiceError]:  # fmt: skip
        seeds = _stream_seeds()
        unanswered = _Unanswered(
            (self._request(item, defaults, i, seeds, densify) for i, item in enumerate(requests)),
            self._count,
            self._max_message_bytes,
        )
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        generation, resend, attempt, reconnect, closes = 0, [], 0, None, self._closes
        self._count(calls=1)
        while True:
            index, stub, _ = self._endpoint(closes)
            with self._closed_channel(closes):
                call = stub.AssignStream(
                    unanswered.feed(generation, resend), timeout=self._remaining(deadline), metadata=self._metadata
                )
            watchdog = self._watchdog(attempt, deadline, reconnect, unanswered, call.cancel, _timer)
            try:
                for response in call:
                    attempt = 0  # progress: a later failure starts its backoff afresh
                    if watchdog is not None:
                        watchdog.answered()
                    yield self._streamed(unanswered, response, densify, return_exceptions)
                    if watchdog is not None:
                        watchdog.reading()
                self._ended(unanswered)
                return
            except grpc.RpcError as failure:
                if self._closes != closes and failure.code() == grpc.StatusCode.CANCELLED:  # close() under it
                    raise self._closed_under_call() from None
                if unanswered.complete():
                    self._ended(unanswered)
                    return
                error = self._silent(index, watchdog) if watchdog is not None and watchdog.fired else failure
                if attempt == 0:
                    broke, reconnect = time.monotonic(), self._deadline(None)
                generation, resend, delay = self._stream_broke(error, index, attempt, _earlier(deadline, reconnect),
                                                               broke, unanswered)  # fmt: skip
                attempt += 1
                time.sleep(delay)
            finally:
                if watchdog is not None:
                    watchdog.stop()
                call.cancel()

    def list_presets(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """``[{"name", "description", "config"}]`` of every preset the server knows."""
        response = self._call("ListPresets", pb.ListPresetsRequest(), timeout)
        return [
            {"name": p.name, "description": p.description, "config": json.loads(p.config_json)}
            for p in response.presets
        ]

    def get_anchors(
        self, canvas, *, preset: str | None = None, config: Any = None, overrides=None, timeout: float | None = None
    ):
        """The anchors (Tensor[A, 4] float32 xyxy) of a config on a canvas, in target order."""
        request = anchors_request(canvas, preset, config, overrides)
        return decode_anchors(self._call("GetAnchors", request, timeout), request)


def _cancellations() -> int:
    """The running task's cancellation requests so far (Python 3.10 does not count: 0).
    One that grows while a gRPC call is awaited is the caller's; the call's own
    cancellation (a watchdog's, a channel closed) raises the same CancelledError without
    it. Compared with the count before, not with 0: a task may have caught one earlier."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return cancelling() if cancelling is not None else 0


# Asyncio channels (and their stubs) a forked child inherited open: never freed there.
_INHERITED: list = []


class _LoopChannels:
    """One event loop's channels, their stubs, when each endpoint last failed, and the
    ``close()`` calls made on that loop (an asyncio channel belongs to the loop it was
    opened on)."""

    __slots__ = ("channels", "stubs", "failed_at", "closes")

    def __init__(self, endpoints: int) -> None:
        self.channels: list[grpc.aio.Channel] = []
        self.stubs: list[pb_grpc.TargetAssignerStub] = []
        self.failed_at = [float("-inf")] * endpoints
        self.closes = 0


def _of_the_running_loop(name: str) -> property:
    """``_LoopChannels.<name>`` of the event loop the caller runs on."""
    return property(lambda self: getattr(self._here, name), lambda self, value: setattr(self._here, name, value))


class AsyncTargetClient(_Base):
    """asyncio client with the same methods as ``TargetClient`` (coroutines; ``stream``
    is an async iterator). Use it as an ``async with`` context manager.

    What the blocking client keeps per process it keeps per event loop: threads that
    each run a loop and share one client each have their own channels, failures and
    closes (swapped at every change of loop, the channels were reopened for nearly every
    call: 59 connections for 60 alternating calls; shared, one loop's ``close()`` failed
    another's calls). A loop that has closed (a finished ``asyncio.run()``) lets its
    channels go at the next call or close."""

    _channels, _stubs, _failed_at, _closes = map(_of_the_running_loop, ("channels", "stubs", "failed_at", "closes"))

    def _reset(self) -> None:
        # Channels open at a fork() crash or hang the child when it uses gRPC: refused there,
        # and kept (freed, they crashed the child at once).
        loops = getattr(self, "_loops", {})
        self._forked_open = any(here.channels for here in loops.values())
        if self._forked_open:
            _INHERITED.append(loops)
        super()._reset()

    def _forget_channels(self) -> None:
        self._loops: dict[asyncio.AbstractEventLoop, _LoopChannels] = {}
        self._loops_lock = threading.Lock()

    @property
    def _here(self) -> _LoopChannels:
        """The running event loop's, made empty at its first use."""
        loop = asyncio.get_running_loop()
        here = self._loops.get(loop)
        if here is None:
            with self._loops_lock:
                here = self._loops.setdefault(loop, _LoopChannels(len(self._endpoints)))
        return here

    def _let_closed_loops_go(self) -> None:
        """A closed event loop's channels let go (a finished ``asyncio.run()`` without
        ``close()``): while any of its asyncio channels lives, gRPC keeps every event loop
        that ran one of its calls, so kept they held each finished loop (3 KB a run,
        without end: 280 MB over 100k runs)."""
        with self._loops_lock:
            for loop in [loop for loop in self._loops if loop.is_closed()]:
                del self._loops[loop]

    def _open_all(self) -> None:
        if self._forked_open:
            raise RuntimeError(
                "AsyncTargetClient: this process was forked while the client's channels were open, and gRPC's "
                "asyncio channels do not survive fork() (the child crashes or hangs): start workers with spawn or "
                "forkserver, close the client before forking, or open a client in the child"
            )
        self._let_closed_loops_go()
        here = self._here
        if not here.channels:
            here.channels = [self._open(t) for t in self._endpoints]
            here.stubs = [pb_grpc.TargetAssignerStub(c) for c in here.channels]
            here.failed_at = [float("-inf")] * len(self._endpoints)

    def _closing(self) -> list:
        """For ``close()``: this event loop's channels, forgotten here under the lock."""
        with self._lock:
            here = self._here
            channels, here.channels, here.stubs = here.channels, [], []
            here.closes += 1
        self._let_closed_loops_go()
        return channels

    def _open(self, target: str) -> grpc.aio.Channel:
        if self._tls:
            return grpc.aio.secure_channel(target, self._credentials(), options=self._options)
        return grpc.aio.insecure_channel(target, options=self._options)

    async def close(self) -> None:
        """Close the channels of the event loop it runs on; that loop's calls in flight fail
        with ``TargetServiceError`` CANCELLED. Other loops' channels stay open (each loop
        closes its own). The client opens new ones if used again."""
        for channel in self._closing():
            await channel.close()

    async def __aenter__(self) -> AsyncTargetClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method: str, request, timeout: float | None):
        started, deadline, closes = time.monotonic(), self._deadline(timeout), self._closes
        self._count(calls=1)
        for attempt in itertools.count():
            index, stub, _ = self._endpoint(closes)
            cancellations = _cancellations()
            try:
                rpc = getattr(stub, method)
                response = _parsed(await rpc(request, timeout=self._try_limit(deadline), metadata=self._metadata))
                self._answered(request, response, started)
                return response
            except grpc.RpcError as error:
                await asyncio.sleep(self._retry_after(error, index, attempt, deadline, started))
            except asyncio.CancelledError:
                # grpc.aio cancels the calls of a channel being closed: an error of the call,
                # as the blocking client raises, not the caller's task cancelled.
                if self._closes != closes and _cancellations() == cancellations:
                    raise self._closed_under_call() from None
                raise

    async def wait_until_ready(self, timeout: float = 60.0) -> None:
        """See ``TargetClient.wait_until_ready``."""
        started, closes = time.monotonic(), self._closes
        deadline = started + checked_timeout("timeout", timeout, None)
        for attempt in itertools.count():
            index, _, channel = self._endpoint(closes)
            check = health_pb2_grpc.HealthStub(channel).Check
            reply, error, cancellations = None, None, _cancellations()
            try:
                reply = await check(health_pb2.HealthCheckRequest(service=_SERVICE),
                                    timeout=self._health_limit(deadline), metadata=self._metadata)  # fmt: skip
            except grpc.RpcError as failure:
                if _certificate_refused(failure):  # no retry changes it
                    raise self._give_up(failure, attempt + 1, started) from None
                error = failure
            except asyncio.CancelledError:  # close() during the check: as in _call
                if self._closes != closes and _cancellations() == cancellations:
                    raise self._closed_under_call() from None
                raise
            last = self._health(index, reply, error)
            if not last:
                return
            delay = self._health_wait(attempt, deadline)
            if delay is None:
                raise _not_ready(self.targets, time.monotonic() - started, last, self._tls)
            await asyncio.sleep(delay)

    async def assign(
        self, gt_boxes, gt_counts, canvas, *, timeout: float | None = None, densify: bool = True,
        image_ids: Sequence[Any] | None = None, **kwargs,
    ) -> Targets | SparseTargets:  # fmt: skip
        """See ``TargetClient.assign``."""
        check_densify(densify, kwargs)
        _check_request_arguments(kwargs, "assign")
        request, ids = _named_request(gt_boxes, gt_counts, canvas, image_ids, kwargs)
        try:
            return self._result(request, await self.assign_raw(request, timeout=timeout), densify)
        except TargetServiceError as error:
            if ids is None:
                raise
            raise error.naming_images(ids) from None

    async def assign_raw(self, request: pb.AssignRequest, *, timeout: float | None = None) -> pb.AssignResponse:
        return await self._call("Assign", request, timeout)

    def stream(
        self,
        requests: Iterable[Mapping[str, Any] | pb.AssignRequest] | AsyncIterable[Mapping[str, Any] | pb.AssignRequest],
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
        densify: bool = True,
        **defaults: Any,
    ) -> AsyncIterator[Targets | TargetServiceError]:
        """See ``TargetClient.stream``; ``requests`` may also be an async iterable."""
        check_densify(densify, defaults)
        _check_request_arguments(defaults, "stream")
        check_flags(return_exceptions=return_exceptions)
        seconds = None if timeout is None else checked_timeout("timeout", timeout, "no deadline")
        return self._stream(requests, seconds, return_exceptions, densify, defaults)

    async def _stream(self, requests, timeout: float | None, return_exceptions: bool, densify: bool,
                      defaults: Mapping[str, Any]) -> AsyncIterator[Targets | TargetServiceError]:  # fmt: skip
        seeds = _stream_seeds()

        async def messages():
            if isinstance(requests, AsyncIterable):
                i = 0
                async for item in requests:
                    yield self._request(item, defaults, i, seeds, densify)
                    i += 1
            else:
                for i, item in enumerate(requests):
                    yield self._request(item, defaults, i, seeds, densify)

        unanswered = _Unanswered(messages(), self._count, self._max_message_bytes)
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        generation, resend, attempt, reconnect, closes = 0, [], 0, None, self._closes
        self._count(calls=1)
        try:
            while True:
                index, stub, _ = self._endpoint(closes)
                cancellations = _cancellations()
                call = stub.AssignStream(
                    unanswered.afeed(generation, resend), timeout=self._remaining(deadline), metadata=self._metadata
                )
                watchdog = self._watchdog(attempt, deadline, reconnect, unanswered, call.cancel,
                                          asyncio.get_running_loop().call_later)  # fmt: skip
                try:
                    async for response in call:
                        response = _parsed(response)
                        attempt = 0
                        if watchdog is not None:
                            watchdog.answered()
                        yield self._streamed(unanswered, response, densify, return_exceptions)
                        cancellations = _cancellations()  # resumed, maybe by another task (wait_for)
                        if watchdog is not None:
                            watchdog.reading()
                    self._ended(unanswered)
                    return
                except (grpc.RpcError, asyncio.CancelledError) as error:
                    if isinstance(error, asyncio.CancelledError):  # the caller's, the watchdog's or close()'s
                        if _cancellations() > cancellations:
                            raise
                        if self._closes != closes:
                            raise self._closed_under_call() from None
                        if watchdog is None or not watchdog.fired:
                            raise
                        error = self._silent(index, watchdog)
                    if unanswered.complete():
                        self._ended(unanswered)
                        return
                    if _broken_write(error):
                        error = await self._why_broken(error, index, stub, deadline)
                    if attempt == 0:
                        broke, reconnect = time.monotonic(), self._deadline(None)
                    generation, resend, delay = self._stream_broke(error, index, attempt, _earlier(deadline, reconnect),
                                                                   broke, unanswered)  # fmt: skip
                    attempt += 1
                    await asyncio.sleep(delay)
                finally:
                    if watchdog is not None:
                        watchdog.stop()
                    call.cancel()
        finally:
            unanswered.close()  # a read of the source in progress

    async def _why_broken(self, error: grpc.RpcError, index: int, stub: pb_grpc.TargetAssignerStub,
                          deadline: float | None) -> grpc.RpcError:  # fmt: skip
        """gRPC's asyncio client reports a stream that ended while it was writing a request
        as INTERNAL ("Internal error from Core"), the server's status lost: a wrong token or
        a passed deadline read as a server gone, and the requests were sent again and again.
        The stream's own deadline, then the endpoint itself (a cheap call with the same
        metadata), say which it was; a server that refuses the call is not retried."""
        if deadline is not None and deadline - time.monotonic() <= _LAST_TRY_S:
            return _Failure(grpc.StatusCode.DEADLINE_EXCEEDED, "the stream's deadline passed")
        try:
            await stub.ListPresets(pb.ListPresetsRequest(), timeout=_PROBE_S, metadata=self._metadata)
        except grpc.RpcError as refusal:
            if not _transport_failure(refusal) and refusal.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                return refusal
        return error

    async def list_presets(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        response = await self._call("ListPresets", pb.ListPresetsRequest(), timeout)
        return [
            {"name": p.name, "description": p.description, "config": json.loads(p.config_json)}
            for p in response.presets
        ]

    async def get_anchors(
        self, canvas, *, preset: str | None = None, config: Any = None, overrides=None, timeout: float | None = None
    ):
        request = anchors_request(canvas, preset, config, overrides)
        return decode_anchors(await self._call("GetAnchors", request, timeout), request)

"""The gRPC servicer: decode -> batcher -> encode, and nothing else.

Errors of any kind go through ``tritarget.service.status``; AssignStream answers
a bad request with ``AssignResponse.error`` and carries on with the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch
from google.protobuf.message import Message

from tritarget.kernels import SparseTargets, TargetConfig, Targets
from tritarget.kernels.anchors import grid_and_anchors
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.protos import target_assigner_pb2_grpc as pb_grpc

from . import codec
from .backend import Batcher
from .errors import DeviceLost, Overloaded, Unavailable, Unimplemented
from .metrics import Metrics
from .status import abort, code_name, request_error, status_of

__all__ = ["TargetAssignerServicer", "add_to_server", "add_unknown_method_handler"]

access_log = logging.getLogger("tritarget.access")
LOGGED_CHARS = 128  # a caller's string in a log line (request id, method name) is cut to this
# Requests of one stream in flight at once, so that they batch together (README: "up to 8").
STREAM_WINDOW = 8

# The server's deadline runs from when the call reached it, so the caller's own deadline
# passes (and its cancellation arrives) while the server still has a little time left:
# 1-2 ms on loopback with a busy compute worker, a network's one-way latency beyond it.
_DEADLINE_SLACK_S = 0.05


def cut_off_code(remaining: float | None) -> str:
    """How a call cancelled under its handler ended, from the seconds its deadline had left."""
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= _DEADLINE_SLACK_S else "CANCELLED"


def _call_name(method: str, request) -> str:
    """A call as the log names it, matching its access-log line (method and request id)."""
    return f"{method} id={getattr(request, 'request_id', '')[:LOGGED_CHARS]!r}"


@dataclasses.dataclass(frozen=True)
class _Call:
    """An RPC as its metrics and access-log lines name it. ``peer``, the caller's address,
    is read as the call starts: gRPC frees the call once it is over, and a stream's answer
    left unsent may be recorded after that."""

    method: str
    context: grpc.aio.ServicerContext
    peer: str

    @classmethod
    def of(cls, method: str, context: grpc.aio.ServicerContext) -> _Call:
        return cls(method, context, context.peer())


_WriteFailed = grpc._cython.cygrpc.ExecuteBatchError  # what a send on an ended call raises (no public name)

_DRAINED = object()  # in a stream's window: the server began shutting down here

_SERVICE = pb.DESCRIPTOR.services_by_name["TargetAssigner"]
_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


@dataclasses.dataclass(frozen=True)
class _Answer:
    """A stream item's answer, recorded (access log, metrics) once its fate is known: an
    answer computed is not an answer sent (a caller that reads slowly, then goes away)."""

    request: pb.AssignRequest
    started: float
    computed: float  # its time counts to here, as a unary call's to its handler's return
    response: pb.AssignResponse | bytes
    held: int  # bytes held for it (``_hold``) until it is sent or let go
    size: int  # its bytes on the wire
    code: str | None  # "OK" or its error's; None: recorded already (computed past the deadline)
    reason: str = ""  # its error's message


async def _write(context: grpc.aio.ServicerContext, response: bytes | Message) -> None:
    """Send a stream's response; the stream ended under it (its caller cancelled, its
    connection closed) is a cancelled call. Written here, not yielded to gRPC: gRPC logs a
    write that fails before it has seen the stream end (most of them, with megabyte
    answers) as an ERROR with a traceback, for what is ordinary client behaviour."""
    try:
        await context.write(response)
    except _WriteFailed as exc:
        raise asyncio.CancelledError("the stream ended while its response was being sent") from exc


def _serialized(response: bytes | Message) -> bytes:
    """The responses' serializer: the targets and anchors come serialized by the servicer
    (off the event loop, and the message let go at once), any other message is serialized
    here."""
    return response if type(response) is bytes else response.SerializeToString()


def add_to_server(servicer: TargetAssignerServicer, server: grpc.aio.Server) -> None:
    """Register the service like the generated ``add_TargetAssignerServicer_to_server``,
    but with request deserializers that turn undecodable bytes into an
    ``UndecodableRequest`` for the servicer to refuse (INVALID_ARGUMENT), and responses
    that may come serialized (``_serialized``)."""
    handlers = {}
    for method in _SERVICE.methods:
        request_class = getattr(pb, method.input_type.name)
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=codec.lenient_deserializer(request_class),
            response_serializer=_serialized,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(_SERVICE.full_name, handlers)


# The method label of calls to methods this server does not have.
UNKNOWN_METHOD = "(unknown)"


class _UnknownMethods(grpc.GenericRpcHandler):
    """A call to a method no service of the server has: refused UNIMPLEMENTED, naming the
    services there are, and logged (gRPC's own answer, "Method not found!", named neither,
    and a client built for another service or version went unseen). Counted in the metrics
    under one method label, "(unknown)" (a caller's names would make series without bound)."""

    def __init__(self, services: tuple[str, ...], access_log: bool, metrics: Metrics) -> None:
        self._services = ", ".join(services)
        self._access_log = access_log
        self._requests = metrics.requests.labels(UNKNOWN_METHOD)
        self._refused = metrics.errors.labels(UNKNOWN_METHOD, "UNIMPLEMENTED")

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method[:LOGGED_CHARS]  # a caller's: may be long

        async def refuse(requests, context: grpc.aio.ServicerContext) -> None:  # any kind of call: reads nothing
            self._requests.inc()
            self._refused.inc()
            if self._access_log:
                access_log.info("%r (unknown method) UNIMPLEMENTED peer=%s", method, context.peer())
            await abort(
                context, status_of(Unimplemented(f"unknown method {method!r}: this server has {self._services}"))
            )

        return grpc.stream_stream_rpc_method_handler(refuse)


def add_unknown_method_handler(
    server: grpc.aio.Server, services: tuple[str, ...], metrics: Metrics, *, access_log: bool
) -> None:
    """After every service is added: the handler of the methods none of them has."""
    server.add_generic_rpc_handlers((_UnknownMethods(services, access_log, metrics),))


class TargetAssignerServicer(pb_grpc.TargetAssignerServicer):
    def __init__(
        self,
        batcher: Batcher,
        limits: codec.Limits,
        metrics: Metrics,
        *,
        access_log: bool = True,
    ) -> None:
        self._batcher = batcher
        self._limits = limits
        self._metrics = metrics
        # Assign responses are encoded on the batcher's compute worker (``_encode``); this
        # single-threaded pool only builds and encodes GetAnchors' anchors off the loop.
        self._encoder = ThreadPoolExecutor(
            1, thread_name_prefix="tritarget-encode", initializer=torch.set_num_threads, initargs=(1,)
        )
        self._access_log = access_log
        self._draining = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._calls = 0  # calls in flight (``_in_flight``)
        metrics.calls_in_flight.set_function(lambda: self._calls)  # read at each scrape: nothing per call
        self._arrivals = 0  # calls started, ever (shutdown waits until they stop coming)
        self._readers: set[asyncio.Task] = set()  # each open stream's request reader
        self._unsent = 0  # bytes of Assign and GetAnchors responses not yet taken by their callers
        # Stream items waiting for room under ``max_unsent_bytes``, in order: (bytes, future).
        self._unsent_room: deque[tuple[int, asyncio.Future]] = deque()

    def close(self) -> None:
        self._encoder.shutdown(wait=True)

    async def _assign(self, method: str, request: pb.AssignRequest) -> tuple[bytes, int]:
        """The response, serialized, and its size, held (``_hold``) until the caller lets it go."""
        job = codec.decode_assign(request, self._limits)
        # Encoded on the compute worker right after its batch: one thread hop per request.
        finish = functools.partial(self._encode, request)
        # A stream's request waits for room in a full queue, and under the unsent bound:
        # refused, it would fail in the middle of a data loader's epoch, its stream having
        # no other replica to go to (its stream's window bounds what it holds).
        stream = method == "AssignStream"
        if job.sparse:  # its size is known only once computed
            if stream and self._unsent_room:
                # Its turn in the line (no bytes): held before the items ahead of it, its
                # bytes could keep a DENSE one of its own stream waiting for good (its
                # stream answers in order) and every item in line behind it.
                await self._unsent_room_for(0)
            response, size = await self._batcher.submit(job, finish, wait=stream)
            self._hold(size, whatever=stream)  # a stream's is built: dropping it would free nothing
        else:  # megabytes, known before: held from the start, so refused (or waiting) without doing the work
            bound = codec.dense_response_bytes(job.images, job.anchors_per_image, request, job.config.background_class)
            compute = lambda: self._batcher.submit(job, finish, wait=stream)  # noqa: E731
            response, size = await self._held_while(bound, compute, wait=stream)
        return response, size

    async def _held_while(
        self, bound: int, compute: Callable[[], Awaitable[tuple[Any, int]]], *, wait: bool = False
    ) -> tuple[Any, int]:
        """``compute()``'s response and size, with ``bound`` bytes (at least its size) held
        for it before it starts (``wait``: once there is room for them); what it did not use
        is let go."""
        if wait:
            await self._unsent_room_for(bound)
        else:
            self._hold(bound, built=False)
        try:
            response, size = await compute()
        except BaseException:
            self._let_go(bound)
            raise
        self._let_go(bound - size)
        return response, size

    def _hold(self, size: int, *, built: bool = True, whatever: bool = False) -> None:
        """Count a response of ``size`` bytes, ``built`` or about to be, as not yet taken by
        its caller; refused (RESOURCE_EXHAUSTED) where that would pass ``max_unsent_bytes``,
        unless it is the only one (the message limit bounds it), or while stream items wait
        for room (``whatever``: counted anyway)."""
        limit = self._limits.max_unsent_bytes
        if not whatever and (self._unsent_room or (self._unsent and self._unsent + size > limit)):
            fate = "was dropped" if built else "is refused before it is computed"
            waiting = f", {len(self._unsent_room)} stream requests waiting for room" if self._unsent_room else ""
            raise Overloaded(
                f"server busy: {self._unsent} bytes of responses are being built or waiting for their callers to "
                f"read them (limit {limit}{waiting}); this {size}-byte response {fate}: retry with backoff or use "
                "another replica"
            )
        self._unsent += size
        self._metrics.unsent_bytes.set(self._unsent)

    async def _unsent_room_for(self, size: int) -> None:
        """Hold ``size`` bytes once they fit under ``max_unsent_bytes`` (or nothing else is
        held), after every stream item that began waiting before."""
        if not self._unsent_room and self._fits(size):
            self._hold(size, whatever=True)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._unsent_room.append((size, waiter))
        try:
            await waiter  # held for it by ``_unsent_room_freed``
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # let in, then gone
                self._let_go(size)
            else:  # it leaves the line (counted waiting no more): the next may fit now
                with contextlib.suppress(ValueError):  # unless let out of it meanwhile
                    self._unsent_room.remove((size, waiter))
                self._unsent_room_freed()
            raise

    def _fits(self, size: int) -> bool:
        return not self._unsent or self._unsent + size <= self._limits.max_unsent_bytes

    def _unsent_room_freed(self) -> None:
        """Let in the stream items waiting for room that fit, in their order, holding their
        bytes for them (those gone meanwhile leave the line)."""
        room = self._unsent_room
        while room and (room[0][1].done() or self._fits(room[0][0])):
            size, waiter = room.popleft()
            if not waiter.done():
                self._hold(size, whatever=True)
                waiter.set_result(None)

    @property
    def waiting_requests(self) -> int:
        """Stream requests waiting for room under ``max_unsent_bytes``."""
        return len(self._unsent_room)

    def _let_go(self, size: int) -> None:
        """A held response was taken by gRPC's transport, or its call ended."""
        self._unsent -= size
        self._metrics.unsent_bytes.set(self._unsent)
        if size:
            self._unsent_room_freed()

    def _held_until_done(self, context: grpc.aio.ServicerContext, size: int) -> None:
        """A unary response is held until its call ends: gRPC keeps its bytes while the
        caller does not read them."""
        context.add_done_callback(lambda _: self._let_go(size))

    def _encode(self, request: pb.AssignRequest, targets: Targets | SparseTargets) -> tuple[bytes, int]:
        """Compute worker: the response holding a request's targets (DENSE copies megabytes;
        SPARSE copies the lists, or scans every anchor's label once when its batch ran dense),
        serialized, and its size. Serialized here, the message is let go at once: a unary
        response waiting for a caller that does not read was held as the message, its
        serialization and gRPC's send buffer (3.07x its bytes in RSS; 1.98x now,
        ``benchmarks/bench_unsent_memory.py``), and gRPC
        serialized it on the event loop (a 40 MB DENSE one in tens of milliseconds)."""
        start = time.perf_counter()
        response = codec.encode_assign(request, targets)
        size = codec.check_response_size(response, self._limits)
        serialized = response.SerializeToString()
        self._metrics.encode_seconds.observe(time.perf_counter() - start)
        return serialized, size

    def _received(self, method: str, request) -> None:
        metrics = self._metrics.method(method)
        metrics.requests.inc()
        metrics.bytes_in.inc(request.ByteSize())

    def _sent(self, method: str, size: int) -> None:
        self._metrics.method(method).bytes_out.inc(size)

    async def _fail(self, call: _Call, exc: Exception, request, started: float, *, counted: bool = True) -> None:
        """Answer the call with ``exc``'s status; ``counted``: a failed request (a stream's
        own end is none: its requests are counted, timed and logged one by one, and the end
        gets a line of its own)."""
        status = status_of(exc, _call_name(call.method, request))
        if counted:
            self._metrics.errors.labels(call.method, code_name(status)).inc()
            self._finished(call, request, code_name(status), started, reason=status.message)
        elif self._access_log:
            access_log.info("%s ended %s peer=%s reason=%r", call.method, code_name(status), call.peer, status.message)
        await abort(call.context, status)

    @staticmethod
    def _past_deadline(context: grpc.aio.ServicerContext) -> bool:
        remaining = context.time_remaining()
        return remaining is not None and remaining <= 0

    def _gone(self, call: _Call, request, started: float, ended: float | None = None) -> None:
        """A request cancelled under its handler, or answered for a stream that ended before
        its answer was sent: its caller went away, or its deadline passed."""
        code = cut_off_code(call.context.time_remaining())
        self._metrics.errors.labels(call.method, code).inc()
        self._finished(call, request, code, started, ended)

    def _finished(self, call: _Call, request, code: str, started: float, ended: float | None = None, *,
                  reason: str = "") -> None:  # fmt: skip
        """A request answered (or failed, for ``reason``) at ``ended`` (now where None): its
        time, and its access-log line (one per call, per item of a stream)."""
        ended = time.perf_counter() if ended is None else ended
        self._metrics.method(call.method).request_seconds.observe(ended - started)
        if self._access_log and access_log.isEnabledFor(logging.INFO):
            counts = getattr(request, "gt_counts", ())
            request_id = getattr(request, "request_id", "")[:LOGGED_CHARS]  # a caller's id may be megabytes
            # Summed only within the image limit: a refused request may hold millions of counts.
            boxes = sum(counts) if len(counts) <= self._limits.max_images else "?"
            because = f" reason={reason!r}" if reason else ""
            access_log.info("%s id=%r images=%d boxes=%s %s %.2f ms peer=%s%s", call.method, request_id, len(counts),
                            boxes, code, (ended - started) * 1000, call.peer, because)  # fmt: skip

    def drain(self) -> None:
        """Shutting down: new calls get UNAVAILABLE (the client retries them elsewhere),
        streams end with UNAVAILABLE once the items already read are answered."""
        self._draining.set()
        for reader in self._readers:
            reader.cancel()

    async def wait_settled(self, timeout: float, quiet: float = 0.05) -> bool:
        """Whether, within ``timeout`` seconds, every call in flight finished, its response
        taken by the transport (a unary call's handler returns before its caller has the
        bytes: stopping gRPC then dropped 40 MB DENSE answers already logged OK), and no
        call arrived for ``quiet`` seconds. gRPC hands the calls it accepted to their handlers
        only as the event loop gets to them (a busy loop leaves a backlog); those still
        waiting when gRPC stops are cancelled (CANCELLED, which clients do not retry)
        instead of refused here (UNAVAILABLE: clients retry on another replica)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not self._idle.is_set():
                try:
                    await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    return False
            seen = self._arrivals
            # In steps: after a stretch of the loop blocked, its timers and gRPC's new calls
            # are ready together, and a single sleep could end before the calls are seen.
            for _ in range(5):
                await asyncio.sleep(max(0.0, min(quiet / 5, deadline - loop.time())))
            if self._arrivals == seen and self._idle.is_set() and not self._unsent:
                return True
            if loop.time() >= deadline:
                return False

    def _admit(self) -> None:
        """A call starts: refused while shutting down, counted either way."""
        self._arrivals += 1
        if self._draining.is_set():
            raise Unavailable("the server is shutting down; retry on another replica")

    @contextlib.contextmanager
    def _in_flight(self):
        self._admit()
        self._calls += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._calls -= 1
            if not self._calls:
                self._idle.set()

    async def Assign(self, request: pb.AssignRequest, context: grpc.aio.ServicerContext) -> bytes:
        started, call = time.perf_counter(), _Call.of("Assign", context)
        self._received("Assign", request)
        try:
            with self._in_flight():
                response, size = await self._assign("Assign", request)
                self._held_until_done(context, size)
        except asyncio.CancelledError:
            self._gone(call, request, started)
            raise
        except Exception as exc:
            await self._fail(call, exc, request, started)
        if self._past_deadline(context):
            # Computed on the event loop (inline), the handler ran past the deadline with no
            # await for gRPC's cancellation to reach: the caller has DEADLINE_EXCEEDED, not
            # these bytes (they were counted as sent, the call logged OK).
            self._gone(call, request, started)
            return response  # gRPC drops it
        self._sent("Assign", size)
        self._finished(call, request, "OK", started)
        return response

    async def _answer(self, request: pb.AssignRequest, call: _Call) -> _Answer:
        """A stream item's answer: its targets, or its error (the stream goes on; an error
        holds no bytes). Recorded once sent (``_delivered``) or left unsent (``_not_delivered``)."""
        started = time.perf_counter()
        self._received("AssignStream", request)
        try:
            response, size = await self._assign("AssignStream", request)
        except asyncio.CancelledError:  # the stream ended before its answer
            self._gone(call, request, started)
            raise
        except Exception as exc:
            status = status_of(exc, _call_name("AssignStream", request))
            code = code_name(status)
            self._metrics.errors.labels("AssignStream", code).inc()
            if isinstance(exc, DeviceLost):
                # No answer: the stream ends UNAVAILABLE here, and the client sends this
                # request and those after it to another replica (an answer in the stream
                # would be this request's error, which a client does not retry).
                self._finished(call, request, code, started, reason=status.message)
                raise
            response = pb.AssignResponse(request_id=request.request_id, error=request_error(status))
            if response.ByteSize() > self._limits.max_message_bytes:
                # The echoed id (a caller's, up to the request's own size) pushes the error
                # over the message limit, and gRPC would end the whole stream. Responses come
                # in request order, so the client pairs this one by position without the id;
                # the error alone is small (a status message is clipped).
                response.ClearField("request_id")
            size = response.ByteSize()
            return _Answer(request, started, time.perf_counter(), response, 0, size, code, status.message)
        if self._past_deadline(call.context):  # computed on the event loop past the stream's deadline, as Assign's
            self._gone(call, request, started)
            return _Answer(request, started, time.perf_counter(), response, size, size, None)  # gRPC drops it
        return _Answer(request, started, time.perf_counter(), response, size, size, "OK")

    def _delivered(self, call: _Call, answer: _Answer) -> None:
        """A stream item's answer taken by gRPC's transport."""
        if answer.code is not None:
            self._sent("AssignStream", answer.size)
            self._finished(call, answer.request, answer.code, answer.started, answer.computed, reason=answer.reason)

    def _not_delivered(self, call: _Call, answer: _Answer) -> None:
        """A stream item's answer that its stream ended before sending: its caller went away
        or its deadline passed (counted so, not as sent); an error keeps its own code."""
        if answer.code == "OK":
            self._gone(call, answer.request, answer.started, answer.computed)
        elif answer.code is not None:
            self._finished(call, answer.request, answer.code, answer.started, answer.computed, reason=answer.reason)

    async def AssignStream(
        self, request_iterator: AsyncIterator[pb.AssignRequest], context: grpc.aio.ServicerContext
    ) -> None:
        call = _Call.of("AssignStream", context)
        try:
            with self._in_flight():
                async with contextlib.aclosing(self._stream(request_iterator, call)) as responses:
                    async for response in responses:
                        await _write(context, response)
        except Exception as exc:
            await self._fail(call, exc, None, time.perf_counter(), counted=False)

    async def _stream(
        self, request_iterator: AsyncIterator[pb.AssignRequest], call: _Call
    ) -> AsyncIterator[pb.AssignResponse | bytes]:
        # Up to STREAM_WINDOW requests of one stream are in flight at once; responses
        # leave in request order. Draining cancels the reading: what was read is
        # answered, then the stream ends UNAVAILABLE. Per item this is a task for the
        # answer and a few queue operations (no asyncio.wait: it costs tens of
        # microseconds per call).
        slots = asyncio.Semaphore(STREAM_WINDOW)
        answers: asyncio.Queue = asyncio.Queue()  # answer futures, then an end marker

        async def read() -> None:
            requests = aiter(request_iterator)
            try:
                while True:
                    await slots.acquire()  # a free place in the window, then the next request
                    try:
                        request = await anext(requests)
                    except StopAsyncIteration:
                        break
                    answers.put_nowait(asyncio.ensure_future(self._answer(request, call)))
                answers.put_nowait(None)
            except asyncio.CancelledError:  # drained (or the stream is over anyway)
                answers.put_nowait(_DRAINED)
            except Exception as exc:  # the read failed (client gone)
                answers.put_nowait(exc)

        reader = asyncio.ensure_future(read())
        self._readers.add(reader)
        if self._draining.is_set():
            reader.cancel()
        try:
            while (answer := await answers.get()) is not None:
                if answer is _DRAINED:
                    raise Unavailable("the server is shutting down; resend the unanswered requests to another replica")
                if isinstance(answer, Exception):
                    raise answer
                try:
                    answered = await answer
                except asyncio.CancelledError:  # the stream ended, maybe just as its answer came
                    answer.add_done_callback(functools.partial(self._dropped_answer, call))
                    raise
                try:
                    yield answered.response  # back here once gRPC's transport has taken it
                except BaseException:  # the stream ended first (cancelled, or closed: GeneratorExit)
                    self._not_delivered(call, answered)
                    raise
                finally:
                    self._let_go(answered.held)
                self._delivered(call, answered)
                slots.release()
        finally:
            self._readers.discard(reader)
            reader.cancel()
            while not answers.empty():
                answer = answers.get_nowait()
                if isinstance(answer, asyncio.Future):
                    answer.cancel()
                    answer.add_done_callback(functools.partial(self._dropped_answer, call))

    def _dropped_answer(self, call: _Call, answer: asyncio.Future) -> None:
        """A stream's answer that will not be sent (the stream ended first)."""
        if not answer.cancelled() and answer.exception() is None:
            answered = answer.result()
            self._let_go(answered.held)
            self._not_delivered(call, answered)

    async def _anchors(self, config: TargetConfig, canvas: tuple[int, int]) -> tuple[bytes, int]:
        """The anchors' response, serialized (as ``_encode``'s), and its size. Encoded from
        the set ``assign`` caches (read only here), not a caller's copy: the copy took about
        half of an 8192 x 8192 call (0.92 against 0.50 s in-process on the 2-core VM,
        2026-12-07)."""

        def encoded() -> bytes:
            _, anchors = grid_and_anchors(config.anchors, canvas, torch.device("cpu"))
            return codec.encode_anchors(anchors).SerializeToString()

        serialized = await asyncio.get_running_loop().run_in_executor(self._encoder, encoded)
        return serialized, len(serialized)

    async def ListPresets(self, request: pb.ListPresetsRequest, context) -> pb.ListPresetsResponse:
        started, call = time.perf_counter(), _Call.of("ListPresets", context)
        self._received("ListPresets", request)
        try:
            with self._in_flight():
                codec.decoded(request)
                response = codec.list_presets()
        except Exception as exc:
            await self._fail(call, exc, request, started)
        self._sent("ListPresets", response.ByteSize())
        self._finished(call, request, "OK", started)
        return response

    async def GetAnchors(self, request: pb.GetAnchorsRequest, context) -> bytes:
        started, call = time.perf_counter(), _Call.of("GetAnchors", context)
        self._received("GetAnchors", request)
        try:
            with self._in_flight():
                config, canvas, size = codec.anchors_request(request, self._limits)
                # Built and encoded off the loop: up to 256 MB (a copy of 0.3 s at 8192 x 8192).
                response, size = await self._held_while(size, lambda: self._anchors(config, canvas))
                self._held_until_done(context, size)
        except asyncio.CancelledError:  # its deadline or its caller: counted, timed and logged as Assign's
            self._gone(call, request, started)
            raise
        except Exception as exc:
            await self._fail(call, exc, request, started)
        self._sent("GetAnchors", size)
        self._finished(call, request, "OK", started)
        return response

"""grpc.health.v1 for the server: grpcio-health-checking's servicer, with the two things it
lacks.

- ``List`` (the protocol's snapshot of every service's status): grpcio-health-checking
  leaves it unimplemented, so each call was answered UNIMPLEMENTED "Method not
  implemented!" and logged an ERROR with a traceback, by anyone who reaches the port
  (health needs no token).
- An end for ``Watch`` streams at shutdown (``end_watches``): they never end by
  themselves, so gRPC's stop cut them, which a C-core client reads as UNAVAILABLE
  "Cancelling all calls" but grpc-js as INTERNAL (a reset stream), the code a client
  takes for a bug. Ended here, each gets UNAVAILABLE with a reason.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2

__all__ = ["Health"]

# How long ``end_watches`` waits for the Watch calls to send their ends.
_END_WAIT_S = 1.0


class Health(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._watches: dict[asyncio.Task, asyncio.Task] = {}  # each Watch call's task: its wait for changes
        self._ending = False

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        # The statuses the parent answers Check from (a mapping it declares, service -> status).
        statuses = {name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()}
        return health_pb2.HealthListResponse(statuses=statuses)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        if self._ending:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("the server is shutting down; watch another replica")
            return
        # The parent's Watch writes each change until it is cancelled: by gRPC when the
        # caller goes (this call's task is cancelled, and with it the wait), or here.
        changes = asyncio.ensure_future(super().Watch(request, context))
        call = asyncio.current_task()
        self._watches[call] = changes
        try:
            await changes
        except asyncio.CancelledError:
            if not self._ending:
                raise  # the caller went away
        finally:
            del self._watches[call]
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details("the server is shutting down; watch another replica")

    async def end_watches(self) -> None:
        """End every open Watch UNAVAILABLE (after the NOT_SERVING of
        ``enter_graceful_shutdown``), waiting a moment for their ends to be sent; later
        ones are refused so."""
        self._ending = True
        calls = list(self._watches)
        for changes in self._watches.values():
            changes.cancel()
        if calls:
            await asyncio.wait(calls, timeout=_END_WAIT_S)

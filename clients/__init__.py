"""tritarget.clients: talk to a tritarget server from data loaders.

``TargetClient`` (blocking) and ``AsyncTargetClient`` (asyncio) return the same
``Targets`` as the in-process ``tritarget.kernels.assign``; failures raise
``TargetServiceError``. They need only grpc, protobuf and torch (not the backends).
"""

from .client import AsyncTargetClient, ClientStats, TargetClient, TargetServiceError

__all__ = ["AsyncTargetClient", "ClientStats", "TargetClient", "TargetServiceError"]

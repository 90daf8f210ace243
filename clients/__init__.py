"""tritarget.clients: talk to a tritarget server from data loaders.

``TargetClient`` (blocking) and ``AsyncTargetClient`` (asyncio) return the same
``Targets`` as the in-process ``tritarget.kernels.assign``; failures raise
``TargetServiceError``. They need grpcio (with its health and status modules), protobuf,
numpy and torch, not the backends' compilers.

The tools users run beside them sit here too: ``loadtest`` (``tritarget loadtest``) and
``anchor_design`` (``tritarget anchors``), which runs the backends in-process. They are
not kernels, and the layout's top level is fixed (DESIGN §2).
"""

from .client import AsyncTargetClient, ClientStats, TargetClient, TargetServiceError

__all__ = ["AsyncTargetClient", "ClientStats", "TargetClient", "TargetServiceError"]

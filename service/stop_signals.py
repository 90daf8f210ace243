"""The signals that stop a server gracefully (its drain; a second one cuts it short).

SIGHUP too, which a closed terminal or ssh session sends and which killed the server
without a drain (exit 129), its calls in flight cut off. A module of its own: ``serve
--workers``' parent forwards these to its workers without importing the server (whose
imports would cost every command).
"""

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

"""tritarget.protos: the wire format, and what the server and its clients agree on beyond it."""

# google.rpc.ErrorInfo of a RESOURCE_EXHAUSTED status that passes (the server's queue is
# full: retry, another replica first), unlike a request over a limit (never served).
OVERLOADED_REASON = "OVERLOADED"
ERROR_DOMAIN = "tritarget.v1"

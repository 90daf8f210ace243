"""Prometheus metrics of one server (its own registry, so several servers can live
in one process, as they do in the tests).

Exposed on an HTTP port (``tritarget serve --metrics-port``) under ``/metrics``.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

__all__ = ["Metrics", "MethodMetrics"]

# Latency buckets from 0.1 ms (a queue hop) to 60 s (the client's default timeout: a huge
# dense batch on a CPU, a stream's request waiting for room, past 10 s read only as +Inf).
_SECONDS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_IMAGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# prometheus_client's own endpoint (start_http_server) serves each connection on a thread
# of its own with no timeout: 1,016 connections that sent half a request line held 1,016
# threads and file descriptors for good, and under a 1,024-descriptor limit gRPC could
# accept no caller. Here a connection silent for IDLE_S is closed, one open for SCRAPE_S in
# all too (a byte every few seconds kept one open for good: 16 such held every slot), and
# past MAX_SCRAPES at once a new one is closed unanswered (a scraper retries at its next
# interval). A scrape takes milliseconds; Prometheus gives one 10 s by default.
IDLE_S = 10.0
SCRAPE_S = 30.0
MAX_SCRAPES = 16


class _ScrapeHandler(WSGIRequestHandler):
    timeout = IDLE_S  # on every read of the connection (StreamRequestHandler.setup)

    def log_message(self, format, *args) -> None:  # noqa: A002 - the overridden method's name
        """Scrapes are not logged."""


class _ScrapeServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold the process at exit

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        # The address decides the family: "::" or "[::1]" need IPv6.
        self.address_family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}  # each open connection's SCRAPE_S end
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: its slot is free again
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        with self._lock:
            self._deadlines[request] = time.monotonic() + SCRAPE_S
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                del self._deadlines[request]
            self._slots.release()

    def service_actions(self) -> None:
        """``serve_forever``'s thread, at each poll (every 0.5 s at most): the connections
        open for SCRAPE_S are ended (a timer thread per connection doubled the threads the
        scrapes hold)."""
        now = time.monotonic()
        with self._lock:
            for connection, deadline in self._deadlines.items():
                if deadline <= now:
                    _cut_off(connection)

    def server_close(self) -> None:
        """Closed, it ends the scrapes still open too: the poll that ended them at
        SCRAPE_S stops with ``serve_forever``, and one that trickled kept its thread."""
        super().server_close()
        with self._lock:
            for connection in self._deadlines:
                _cut_off(connection)

    def handle_error(self, request, client_address) -> None:
        """A connection closed for its silence, or by its client, is not an error
        (socketserver printed a traceback for each)."""
        if not isinstance(sys.exc_info()[1], (TimeoutError, ConnectionError)):
            super().handle_error(request, client_address)


def _cut_off(connection: socket.socket) -> None:
    """End a scrape's connection (its handler's next read or write fails, and it is closed);
    one closed meanwhile is left alone (a closed socket object refuses, whatever reuses its
    descriptor number)."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def _only_metrics(app):
    """``app`` at /metrics, 404 elsewhere: prometheus_client answers every path, so an HTTP
    probe pointed at this port (/healthz) passed during warm-up, drain or a stuck event
    loop, on this thread of its own; readiness is gRPC's health service."""

    def serve(environ, start_response):
        if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"only /metrics here; readiness is the gRPC health service (grpc.health.v1)\n"]

    return serve


class Metrics:
    """Requests, errors by code, latency (whole request, and split queue / compute / encode),
    batch size, bytes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        # The process's memory, descriptors and CPU (process_resident_memory_bytes,
        # process_open_fds, ...), what --max-unsent-mb and the connection limits guard.
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        self.requests = Counter("tritarget_requests", "Requests received, by RPC", ["method"], registry=reg)
        self.errors = Counter(
            "tritarget_errors", "Requests failed, by RPC and status code", ["method", "code"], registry=reg
        )
        self.queue_seconds = Histogram(
            "tritarget_queue_seconds",
            "Time a request waited in the batcher (one computed in slices: its slices' waits together)",
            buckets=_SECONDS,
            registry=reg,
        )
        self.compute_seconds = Histogram(
            "tritarget_compute_seconds", "Time of one batched assign call", buckets=_SECONDS, registry=reg
        )
        self.request_seconds = Histogram(
            "tritarget_request_seconds", "Time from a request's arrival to its response (decode, queue, "
            "compute, encode) or its failure (a refused token's included), by RPC", ["method"], buckets=_SECONDS,
            registry=reg,
        )  # fmt: skip
        self.encode_seconds = Histogram(
            "tritarget_encode_seconds", "Time to encode one response", buckets=_SECONDS, registry=reg
        )
        self.batch_images = Histogram(
            "tritarget_batch_images", "Images per batched assign call", buckets=_IMAGES, registry=reg
        )
        self.batch_requests = Histogram(
            "tritarget_batch_requests",
            "Requests merged into one assign call (a request computed in slices counts in each of its slices' calls)",
            buckets=_IMAGES,
            registry=reg,
        )
        self.bytes_in = Counter("tritarget_request_bytes", "Serialized request bytes", ["method"], registry=reg)
        self.bytes_out = Counter("tritarget_response_bytes", "Serialized response bytes", ["method"], registry=reg)
        self.inline_batches = Counter(
            "tritarget_inline_batches",
            "Batches computed on the event loop: small SPARSE requests that found the cpu backend's server idle "
            "(--inline-max-images)",
            registry=reg,
        )
        self.device_to_host_bytes = Counter(
            "tritarget_device_to_host_bytes",
            "Result bytes copied from the GPU to the host (0 on a CPU backend)",
            registry=reg,
        )
        self.queued_images = Gauge(
            "tritarget_queued_images",
            "Images waiting in the batcher, and the places held by requests computed in slices",
            registry=reg,
        )
        self.waiting_requests = Gauge(
            "tritarget_stream_requests_waiting",
            "Stream requests waiting for room in the batcher's full queue or under --max-unsent-mb (a unary "
            "request would be refused)",
            registry=reg,
        )
        self.unsent_bytes = Gauge(
            "tritarget_unsent_response_bytes",
            "Bytes on the wire of responses built, or being built (DENSE, GetAnchors), and not yet taken by their "
            "callers (bounded by --max-unsent-mb; the process holds a waiting response about twice over)",
            registry=reg,
        )
        self.calls_in_flight = Gauge(
            "tritarget_calls_in_flight", "Calls open: Assign, AssignStream (a stream while it is open), GetAnchors, "
            "ListPresets", registry=reg
        )  # fmt: skip
        self.serving = Gauge(
            "tritarget_serving", "1 while health is SERVING (warm-up done, not draining), else 0", registry=reg
        )
        self._http = None
        self._methods: dict[str, MethodMetrics] = {}

    def method(self, name: str) -> MethodMetrics:
        """The per-RPC metrics of ``name``, bound once."""
        if name not in self._methods:
            self._methods[name] = MethodMetrics(self, name)
        return self._methods[name]

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint on a background thread; returns the bound port."""
        try:
            self._http = make_server(host, port, _only_metrics(make_wsgi_app(self.registry)), _ScrapeServer,
                                     _ScrapeHandler)  # fmt: skip
        except OSError as exc:  # "[Errno 98] Address already in use" alone does not say which port
            raise OSError(f"metrics port {host}:{port}: {exc.strerror or exc}") from None
        threading.Thread(target=self._http.serve_forever, name="tritarget-metrics", daemon=True).start()
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent), e.g. ``value("tritarget_batch_images_count")``."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0


class MethodMetrics:
    """One RPC's children of the labelled metrics. ``labels()`` looks a child up under a
    lock (microseconds), and a request touches four of them: bound once per RPC."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.requests = metrics.requests.labels(method)
        self.bytes_in = metrics.bytes_in.labels(method)
        self.bytes_out = metrics.bytes_out.labels(method)
        self.request_seconds = metrics.request_seconds.labels(method)

"""Bearer-token auth (interceptor) and TLS with a self-signed certificate made here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_service_harness import HTTP2_PREFACE, ServerThread, http2_frame, read_until, until

from tritarget.clients import AsyncTargetClient, TargetClient, TargetServiceError
from tritarget.clients.wire import build_request
from tritarget.protos import target_assigner_pb2 as pb
from tritarget.service.auth import BearerTokenInterceptor
from tritarget.service.server import ServerOptions, create_server, host_port

CANVAS = (96, 128)
BOXES = torch.tensor([[10.0, 10.0, 60.0, 50.0]])
TOKEN = "s3cret-token"


def _assign(client):
    return client.assign(BOXES, [1], CANVAS, preset="retinanet_torchvision")


@pytest.fixture(scope="module")
def auth_server():
    with ServerThread(token=TOKEN) as srv:
        yield srv


@pytest.mark.parametrize("token, message", [(None, "missing credentials"), ("wrong", "invalid bearer token")])
def test_auth_rejects_missing_or_wrong_token(auth_server, token, message):
    with TargetClient(auth_server.address, token=token, retries=0) as client:
        for call in (lambda: _assign(client), client.list_presets,
                     lambda: list(client.stream([{"gt_boxes": BOXES, "gt_counts": [1]}], preset="yolov5",
                                                canvas=CANVAS))):  # fmt: skip
            with pytest.raises(TargetServiceError) as info:
                call()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert message in info.value.details
    assert auth_server.metrics.value("tritarget_errors_total", {"method": "Assign", "code": "UNAUTHENTICATED"}) >= 1


def test_refused_calls_get_their_access_log_line(caplog):
    """Counted and timed, a call refused for its credentials had no access-log line: an
    operator chasing refusals found them in the metrics only. The line names the caller
    and the reason; reflection's refusals (not counted) are logged too: tokens tried there
    left no trace."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with ServerThread(token=TOKEN, access_log=True) as srv, caplog.at_level(logging.INFO, "tritarget.access"):
        for token in ("wrong", TOKEN):
            with TargetClient(srv.address, token=token, retries=0) as client:
                with contextlib.suppress(TargetServiceError):
                    _assign(client)
        with grpc.insecure_channel(srv.address) as channel, pytest.raises(grpc.RpcError):
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([ask]), timeout=10))
        reflection = [r.getMessage() for r in caplog.records if "ServerReflection" in r.getMessage()]
        # This test's unary calls: the module's auth_server logs the previous test's refused
        # stream when its handler ends, which came after that test once in CI, inside this
        # capture (the logger is the process's).
        lines = [r.getMessage() for r in caplog.records if r.name == "tritarget.access"]
        lines = [line for line in lines if line.startswith("Assign ")]
    peer = r"peer=ipv4:127\.0\.0\.1:\d+"
    assert len(lines) == 2, lines
    assert re.fullmatch(rf"Assign \(request not read\) UNAUTHENTICATED [0-9.]+ ms {peer} reason='invalid bearer token'",
                        lines[0]), lines  # fmt: skip
    assert re.fullmatch(rf"Assign id='' images=1 boxes=1 OK [0-9.]+ ms {peer}", lines[1]), lines
    assert len(reflection) == 1, reflection
    method = r"'/grpc\.reflection\.v1alpha\.ServerReflection/ServerReflectionInfo'"
    assert re.fullmatch(rf"{method} \(request not read\) UNAUTHENTICATED [0-9.]+ ms {peer} "
                        r"reason=\"missing credentials: .*\"", reflection[0])  # fmt: skip


def test_refused_calls_write_no_access_log_line_when_it_is_off(caplog):
    """The access log can be turned off (``access_log=False``, ``serve --no-access-log``):
    then a refused call, still counted in the metrics, writes no line either."""
    with ServerThread(token=TOKEN, access_log=False) as srv, caplog.at_level(logging.INFO, "tritarget.access"):
        with TargetClient(srv.address, token="wrong", retries=0) as client, pytest.raises(TargetServiceError):
            _assign(client)
        until(lambda: srv.metrics.value("tritarget_request_seconds_count", {"method": "Assign"}) == 1)
    assert [r.getMessage() for r in caplog.records if r.name == "tritarget.access"] == []


def test_refused_calls_are_timed_like_the_others_and_reflection_is_not_half_counted():
    """A refusal was counted as a request and an error but never timed (request_seconds
    covers every request), and reflection got a series of refusals only (every one of its
    calls read as failing)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with ServerThread(token=TOKEN) as srv:
        for token in (None, "wrong", TOKEN):
            with TargetClient(srv.address, token=token, retries=0) as client:
                with contextlib.suppress(TargetServiceError):
                    _assign(client)
        assign = {"method": "Assign"}
        assert srv.metrics.value("tritarget_requests_total", assign) == 3
        assert srv.metrics.value("tritarget_request_seconds_count", assign) == 3
        assert srv.metrics.value("tritarget_errors_total", {**assign, "code": "UNAUTHENTICATED"}) == 2
        with grpc.insecure_channel(srv.address) as channel:
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as info:
                list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([ask]), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for name in ("ServerReflectionInfo", "(unknown)"):  # in no series: not the service's call
            assert srv.metrics.value("tritarget_requests_total", {"method": name}) == 0
        # A caller gone before its message arrived never reaches the refusal: counted as a
        # request and an error but never timed before; now none of the three.
        with grpc.insecure_channel(srv.address) as channel:
            opened = channel.stream_stream("/tritarget.v1.TargetAssigner/Assign", request_serializer=bytes,
                                           response_deserializer=bytes)  # fmt: skip
            never = threading.Event()
            call = opened(iter(lambda: never.wait() and b"", b""), timeout=10)  # its one message never comes
            time.sleep(0.3)
            call.cancel()
            never.set()
        time.sleep(0.3)
        assert srv.metrics.value("tritarget_requests_total", assign) == 3
        assert srv.metrics.value("tritarget_request_seconds_count", assign) == 3


@pytest.mark.parametrize("token", [None, TOKEN])
def test_a_call_to_an_unknown_method_names_the_services_and_is_logged(token, caplog):
    """gRPC answered a method no service has with "Method not found!" and logged nothing: a
    client built for another version went unseen. Now the error names the services there
    are, whatever the kind of call, and the access log has a line; behind a token the
    token is checked first (a caller without one learns nothing of the server)."""
    method = "/tritarget.v2.TargetAssigner/Assign"
    with ServerThread(token=token, access_log=True) as srv, caplog.at_level(logging.INFO, "tritarget.access"):
        with grpc.insecure_channel(srv.address) as channel:
            for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
                call = getattr(channel, kind)(method, request_serializer=bytes, response_deserializer=bytes)
                with pytest.raises(grpc.RpcError) as info:
                    answer = call(b"x" if kind.startswith("unary") else iter([b"x"]), timeout=10)
                    if kind.endswith("stream"):  # a stream's status comes as it is read
                        list(answer)
                if token is None:
                    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, kind
                    assert info.value.details() == (f"unknown method {method!r}: this server has "
                                                    "tritarget.v1.TargetAssigner, grpc.health.v1.Health, "
                                                    "grpc.reflection.v1alpha.ServerReflection"), kind  # fmt: skip
                else:
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, kind
        lines = [r.getMessage() for r in caplog.records if r.name == "tritarget.access"]
        lines = [line for line in lines if "v2" in line]
        if token is None:  # counted under one label (no series per name a caller makes up): version skew shows
            unknown = {"method": "(unknown)"}
            assert srv.metrics.value("tritarget_requests_total", unknown) == 4
            assert srv.metrics.value("tritarget_errors_total", {**unknown, "code": "UNIMPLEMENTED"}) == 4
    code = r"\(unknown method\) UNIMPLEMENTED" if token is None else r"\(request not read\) UNAUTHENTICATED [0-9.]+ ms"
    assert len(lines) == 4, lines
    for line in lines:
        assert re.fullmatch(rf"'/tritarget\.v2\.TargetAssigner/Assign' {code} peer=ipv4:127\.0\.0\.1:\d+.*", line), line


def test_refused_calls_to_made_up_methods_of_the_service_share_one_label(caplog):
    """Behind a token, a call without one to a method the service does not have, under its
    own prefix, was counted under the name the caller made up: each name a new series (and
    a new entry kept in the metrics) for anyone who can reach the port. Now they count
    under "(unknown)", as the servicer counts them without a token; the log names them."""
    names = [f"/tritarget.v1.TargetAssigner/Probe{i}" for i in range(5)]
    with ServerThread(token=TOKEN, access_log=True) as srv, caplog.at_level(logging.INFO, "tritarget.access"):
        with grpc.insecure_channel(srv.address) as channel:
            for name in names:
                with pytest.raises(grpc.RpcError) as info:
                    channel.unary_unary(name, request_serializer=bytes, response_deserializer=bytes)(b"x", timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        unknown = {"method": "(unknown)"}
        until(lambda: srv.metrics.value("tritarget_request_seconds_count", unknown) == 5)
        assert srv.metrics.value("tritarget_requests_total", unknown) == 5
        assert srv.metrics.value("tritarget_errors_total", {**unknown, "code": "UNAUTHENTICATED"}) == 5
        labels = {sample.labels.get("method") for metric in srv.metrics.registry.collect() for sample in metric.samples}
        assert not any(label and label.startswith("Probe") for label in labels), labels
    lines = [r.getMessage() for r in caplog.records if r.name == "tritarget.access" and "Probe" in r.getMessage()]
    assert [line.split(" ", 1)[0] for line in lines] == [repr(name) for name in names]


@pytest.mark.parametrize("logged", [True, False])
def test_an_unknown_methods_long_name_is_cut_in_its_error_and_its_log_line(logged, caplog):
    """A caller's method name may be long: its error and its access-log line (only where the
    access log is on) quote its first 128 characters."""
    method = "/tritarget.v2.TargetAssigner/" + "A" * 2000
    with ServerThread(access_log=logged) as srv, caplog.at_level(logging.INFO, "tritarget.access"):
        with grpc.insecure_channel(srv.address) as channel:
            call = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
            with pytest.raises(grpc.RpcError) as info:
                call(b"x", timeout=10)
        lines = [r.getMessage() for r in caplog.records if "v2" in r.getMessage()]
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details().startswith(f"unknown method {method[:128]!r}: this server has ")
    if logged:
        assert len(lines) == 1 and lines[0].startswith(f"{method[:128]!r} (unknown method) UNIMPLEMENTED"), lines
    else:
        assert lines == []


@pytest.mark.parametrize(
    ("method", "token", "code"),
    [("/tritarget.v2.TargetAssigner/AssignStream", None, grpc.StatusCode.UNIMPLEMENTED),
     ("/tritarget.v1.TargetAssigner/AssignStream", TOKEN, grpc.StatusCode.UNAUTHENTICATED)],
    ids=["unknown-method", "no-token"],
)  # fmt: skip
def test_a_refused_stream_is_answered_before_its_first_message(method, token, code):
    """The refusal (an unknown method; a server behind a token called without one) reads
    nothing: a client stream that has sent no message yet (and may never) is answered at
    once, not left to its deadline (DEADLINE_EXCEEDED)."""
    never = threading.Event()
    with ServerThread(token=token) as srv, grpc.insecure_channel(srv.address) as channel:
        call = channel.stream_stream(method, request_serializer=bytes, response_deserializer=bytes)
        try:
            with pytest.raises(grpc.RpcError) as info:
                list(call(iter(lambda: never.wait() and b"", b""), timeout=5))  # its first message never comes
        finally:
            never.set()
    assert info.value.code() == code


def test_auth_accepts_the_token_and_health_needs_none(auth_server):
    with TargetClient(auth_server.address, token=TOKEN) as client:
        assert (_assign(client).labels == 1).any()
        assert (
            len(list(client.stream([{"gt_boxes": BOXES, "gt_counts": [1]}] * 2, preset="yolov5", canvas=CANVAS))) == 2
        )
    with grpc.insecure_channel(auth_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_an_interceptor_without_a_token_is_refused():
    """An empty token would let ``authorization: Bearer `` (nothing after the scheme) in."""
    with pytest.raises(ValueError, match="token: must not be empty"):
        BearerTokenInterceptor("")


def test_server_options_read_the_token_as_the_clients_do():
    """``ServerOptions(token="")`` served every caller (an empty token read as none, where
    None says that); a token with a file's trailing newline was one no client could match."""
    assert ServerOptions(token=" s3cret\n").token == "s3cret"
    assert ServerOptions().token is None
    for token, message in (("", "token: the token is empty"), (" \n", "token: the token is empty"),
                           ("s3 cret", "token: a bearer token is printable ASCII without spaces"),
                           (b"s3cret", "token: expected a str, got bytes")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ServerOptions(token=token)


def _raw_assign(channel: grpc.Channel):
    """Assign without the client library: the metadata exactly as given."""
    return channel.unary_unary(
        "/tritarget.v1.TargetAssigner/Assign",
        request_serializer=pb.AssignRequest.SerializeToString,
        response_deserializer=pb.AssignResponse.FromString,
    )


def test_auth_scheme_is_case_insensitive_and_the_token_exact(auth_server):
    """RFC 7235: the scheme's name is case-insensitive (``bearer`` from some clients);
    RFC 6750: one or more spaces after it (two were refused)."""
    request = build_request(BOXES, [1], CANVAS, preset="retinanet_torchvision")
    with grpc.insecure_channel(auth_server.address) as channel:
        assign = _raw_assign(channel)
        for value in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN}"):
            assert assign(request, metadata=(("authorization", value),), timeout=10).batch_size == 1
        for value in (f"Bearer {TOKEN.upper()}", f"Bearer {TOKEN} ", f"Basic {TOKEN}", f"Bearer{TOKEN}", "Bearer  "):
            with pytest.raises(grpc.RpcError) as info:
                assign(request, metadata=(("authorization", value),), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, value


@pytest.mark.parametrize("second", [f"Bearer {TOKEN}x", "Bearer ", "nope"])
def test_auth_needs_every_authorization_header_to_agree(auth_server, second):
    request = build_request(BOXES, [1], CANVAS, preset="retinanet_torchvision")
    with grpc.insecure_channel(auth_server.address) as channel:
        assign = _raw_assign(channel)
        both = (("authorization", f"Bearer {TOKEN}"), ("authorization", second))
        for metadata in (both, both[::-1]):
            with pytest.raises(grpc.RpcError) as info:
                assign(request, metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert assign(request, metadata=both[:1] * 2, timeout=10).batch_size == 1


def _self_signed(tmp_path, names: str = "IP:127.0.0.1,DNS:localhost") -> tuple[bytes, bytes]:
    """A certificate for ``names`` (127.0.0.1 / localhost) and its key (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    tmp_path.mkdir(parents=True, exist_ok=True)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", f"subjectAltName={names}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert.read_bytes(), key.read_bytes()


def test_cli_refuses_a_certificate_and_key_that_do_not_pair(tmp_path):
    """gRPC reports a rejected certificate only as a failed bind ("in use?"): the CLI checks
    the pair first and names both files."""
    cert, _ = _self_signed(tmp_path / "one")
    _, other_key = _self_signed(tmp_path / "two")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(other_key)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cases = ((["--tls-cert", "cert.pem", "--tls-key", "key.pem"], "--tls-cert cert.pem / --tls-key key.pem: not a PEM"),
             (["--tls-cert", "junk.pem", "--tls-key", "key.pem"], "--tls-cert junk.pem / --tls-key key.pem: not a PEM"),
             (["--tls-cert", "cert.pem"], "TLS needs both --tls-cert and --tls-key"))  # fmt: skip
    for args, message in cases:
        done = subprocess.run([sys.executable, "-m", "tritarget.service.cli", "serve", "--port", "0", *args],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 2 and message in done.stderr and "in use" not in done.stderr, (args, done.stderr)


@pytest.mark.parametrize("half", [{"tls_cert": b"certificate"}, {"tls_key": b"key"}], ids=["cert", "key"])
def test_a_server_with_half_of_tls_is_refused_by_name(half):
    """A certificate without its key (or a key alone) is not served as plaintext, nor left to
    gRPC's credentials to refuse with a TypeError."""

    async def create() -> None:  # gRPC's aio server is made in an event loop
        create_server(ServerOptions(port=0, backend="reference", warmup_canvas=(64, 64), **half))

    with pytest.raises(ValueError, match="TLS needs both a certificate and a key"):
        asyncio.run(create())


def test_tls_with_self_signed_certificate_and_token(tmp_path):
    cert, key = _self_signed(tmp_path)
    with ServerThread(tls_cert=cert, tls_key=key, token=TOKEN) as srv:
        with TargetClient(srv.address, root_certificates=cert, token=TOKEN) as client:
            assert (_assign(client).labels == 1).any()
            assert client.get_anchors(CANVAS, preset="yolov5").shape[1] == 4
        with TargetClient(srv.address, retries=0, timeout=5) as plaintext:
            with pytest.raises(TargetServiceError) as info:
                _assign(plaintext)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "a server with TLS needs tls=True" in info.value.details  # it looks like no server at all
            with pytest.raises(TargetServiceError) as info:  # its health check the same
                plaintext.wait_until_ready(1.0)
            assert "became SERVING" in info.value.details and "a server with TLS needs tls=True" in info.value.details
        with TargetClient(srv.address, root_certificates=cert, retries=0) as no_token:
            with pytest.raises(TargetServiceError) as info:
                _assign(no_token)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    # The key given as the CA: refused at once, not retried as a server that is not there.
    with pytest.raises(ValueError, match="root_certificates: not PEM certificates"):
        TargetClient(srv.address, root_certificates=key)


def test_loadtest_reaches_a_tls_server_with_its_ca_and_token(tmp_path):
    """``tritarget loadtest --tls-ca CA --token T``: both reach the run's clients and every
    request is answered (a CA dropped on the way fails every request UNAVAILABLE, a token
    dropped UNAUTHENTICATED; the flags were only checked, never used)."""
    import json

    from tritarget.service.cli import main

    cert, key = _self_signed(tmp_path)
    (tmp_path / "ca.pem").write_bytes(cert)
    out = tmp_path / "out.json"
    with ServerThread(tls_cert=cert, tls_key=key, token=TOKEN) as srv:
        code = main(["loadtest", "--target", srv.address, "--tls-ca", str(tmp_path / "ca.pem"), "--token", TOKEN,
                     "--duration", "0.3", "--warmup", "0", "--canvas", "64", "64", "--images", "1", "--variants", "1",
                     "--concurrency", "1", "--timeout", "5", "--no-progress", "--json", str(out)])  # fmt: skip
    summary = json.loads(out.read_text())
    assert (code, summary["errors"]) == (0, {}) and summary["requests"] > 0, summary


def test_a_refused_call_is_not_parsed(auth_server, monkeypatch):
    """Without credentials the server never decodes the message (parsed, a 64 MB one
    would cost the server its decoding before the refusal)."""
    parsed = []
    real = pb.AssignRequest.FromString
    monkeypatch.setattr(pb.AssignRequest, "FromString", lambda raw: parsed.append(raw) or real(raw))
    request = build_request(BOXES, [1], CANVAS, preset="retinanet_torchvision")
    with grpc.insecure_channel(auth_server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _raw_assign(channel)(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert parsed == []


async def _async_wait(cert: bytes, port: int, timeout: float) -> None:
    async with AsyncTargetClient(f"127.0.0.1:{port}", root_certificates=cert) as client:
        await client.wait_until_ready(timeout)


def test_a_certificate_that_does_not_name_the_address_fails_at_once_and_says_so(tmp_path):
    """A certificate for localhost, the client connecting to 127.0.0.1: every try fails the
    same way, yet it was retried for the whole timeout and reported as "no tritarget
    server answered ... Is it running?"."""
    cert, key = _self_signed(tmp_path, names="DNS:localhost")
    with ServerThread(tls_cert=cert, tls_key=key) as srv:
        with TargetClient(f"127.0.0.1:{srv.port}", root_certificates=cert, timeout=30) as client:
            start = time.monotonic()
            with pytest.raises(TargetServiceError) as info:
                _assign(client)
            assert time.monotonic() - start < 10
            assert "sent a certificate this client refused: it must name the address" in info.value.details
            # wait_until_ready too: it retried for its whole timeout and said to start a server.
            for wait in (client.wait_until_ready, lambda timeout: asyncio.run(_async_wait(cert, srv.port, timeout))):
                start = time.monotonic()
                with pytest.raises(TargetServiceError, match="sent a certificate this client refused"):
                    wait(timeout=30)
                assert time.monotonic() - start < 10
        with TargetClient(f"localhost:{srv.port}", root_certificates=cert) as client:
            assert (_assign(client).labels == 1).any()


def test_up_with_tls_sends_its_demo_by_the_certificates_name(tmp_path):
    """`tritarget up --tls-cert` with a certificate for localhost: the demo connected to
    127.0.0.1 and failed its hostname check (after 30 s of retries, exit 1). The hint it
    prints names what a `tritarget request` to it needs: the CA and a token."""
    cert, key = _self_signed(tmp_path, names="DNS:localhost")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    process = subprocess.Popen(
        [sys.executable, "-m", "tritarget.service.cli", "up", "--port", "0", "--tls-cert", "cert.pem", "--tls-key",
         "key.pem", "--warmup-canvas", "64", "64", "--token", TOKEN],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        match, output = read_until(process, r"service running on (\S+) .*try: tritarget request (.*)|the demo request "
                                            r"failed", timeout=120)  # fmt: skip
        assert "the demo request failed" not in output, output
        assert match.group(1).startswith("localhost:")
        assert re.fullmatch(r"--target \S+ --tls-ca cert.pem --token TOKEN", match.group(2)), match.group(2)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize(("host", "tls", "warned"), [("0.0.0.0", False, True), ("127.0.0.1", False, False),
                                                      ("localhost", False, False), ("::1", False, False),
                                                      ("0.0.0.0", True, False)])  # fmt: skip
def test_a_token_served_over_plaintext_beyond_loopback_is_warned_of(host, tls, warned, capsys):
    """Anyone on the path reads a bearer token sent over plaintext: served all the same
    (a private network, a proxy that ends TLS), but the operator is told."""
    import dataclasses

    from tritarget.service.cli import _server_options, _warn_of_a_token_in_the_clear, build_parser

    options = _server_options(build_parser().parse_args(["serve", "--host", host, "--token", TOKEN]))
    if tls:
        options = dataclasses.replace(options, tls_cert=b"certificate", tls_key=b"key")
    _warn_of_a_token_in_the_clear("serve", options)
    said = capsys.readouterr().err
    assert ("a bearer token without TLS on " + host in said) is warned, said
    if warned:
        assert "--tls-cert" in said


def test_a_host_is_loopback_only_when_every_address_it_resolves_to_is(monkeypatch, capsys):
    """Without a token there is nothing to warn of; a host that does not resolve, or that
    resolves to a loopback address and another, is not loopback only (callers may reach it
    over the network)."""
    from tritarget.service.cli import _loopback_only, _server_options, _warn_of_a_token_in_the_clear, build_parser

    monkeypatch.delenv("TRITARGET_TOKEN", raising=False)
    _warn_of_a_token_in_the_clear("serve", _server_options(build_parser().parse_args(["serve", "--host", "0.0.0.0"])))
    assert capsys.readouterr().err == ""
    both = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0)) for address in ("127.0.0.1", "192.0.2.1")]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: both)
    assert not _loopback_only("mixed.example")

    def unresolvable(*args, **kwargs):  # no name server asked: CI's machine may have none
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    assert not _loopback_only("no-such-host.invalid")


def test_idle_metrics_connections_are_bounded_and_closed(monkeypatch, capfd):
    """Connections to /metrics that never finish a request hold at most MAX_SCRAPES threads
    and file descriptors, each for IDLE_S (prometheus_client's own endpoint kept a thread
    and a descriptor per connection for good: enough of them starved gRPC of descriptors)."""
    from tritarget.service import metrics as metrics_module

    monkeypatch.setattr(metrics_module._ScrapeHandler, "timeout", 0.5)
    served = metrics_module.Metrics()
    port = served.serve_http("127.0.0.1", 0)
    threads = threading.active_count()
    before = set(threading.enumerate())
    idle = []
    try:
        for _ in range(3 * metrics_module.MAX_SCRAPES):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # half a request
            idle.append(sock)
            # One thread per connection served (a timer thread each doubled them), at most
            # MAX_SCRAPES (how many are served at once depends on how fast they connect).
            new = set(threading.enumerate()) - before
            assert all(thread.name.endswith("(process_request_thread)") for thread in new), new
            assert len(new) <= metrics_module.MAX_SCRAPES
        # Past the idle limit the server has closed every one of them (a read sees the end).
        for sock in idle:
            assert sock.recv(1) == b""
        until(lambda: threading.active_count() == threads)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b"tritarget_requests_total" in page or b"tritarget_queued_images" in page
        assert "Traceback" not in capfd.readouterr().err  # closing a silent connection is no error
    finally:
        for sock in idle:
            sock.close()
        served.stop_http()


def test_a_metrics_connection_that_trickles_is_closed_in_time(monkeypatch, capfd):
    """A byte before each idle limit kept a /metrics connection, its thread and its slot
    for good (16 such held every slot: scrapes refused); each has SCRAPE_S in all, cut at
    the next poll (every 0.5 s at most), not at a multiple of it."""
    from tritarget.service import metrics as metrics_module

    monkeypatch.setattr(metrics_module._ScrapeHandler, "timeout", 0.5)
    monkeypatch.setattr(metrics_module, "SCRAPE_S", 3.0)
    served = metrics_module.Metrics()
    port = served.serve_http("127.0.0.1", 0)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            started, sent = time.monotonic(), 0
            with contextlib.suppress(OSError):  # the write after the server closed it
                for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" * 10:
                    sock.sendall(bytes([byte]))
                    sent += 1
                    time.sleep(0.25)
            # Cut at 3 s to 3.5 s, seen by a write within 0.5 s more; at 6 s for twice SCRAPE_S.
            assert 2.9 < time.monotonic() - started < 5, sent
            assert sent < 24, sent
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b"tritarget_queued_images" in page
        assert "Traceback" not in capfd.readouterr().err
    finally:
        served.stop_http()


def test_stopping_the_metrics_endpoint_ends_its_open_scrapes(monkeypatch, capfd):
    """The cut at SCRAPE_S runs in the serving thread's poll, which the stop ends: a
    connection that trickled on kept its thread and socket for good."""
    from tritarget.service import metrics as metrics_module

    monkeypatch.setattr(metrics_module._ScrapeHandler, "timeout", 0.5)
    served = metrics_module.Metrics()
    port = served.serve_http("127.0.0.1", 0)
    before = set(threading.enumerate())
    ended = []

    def trickle(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the write after the server ended it
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" * 10:  # a byte before each idle limit
                sock.sendall(bytes([byte]))
                time.sleep(0.25)
        ended.append(time.monotonic())

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        trickling = threading.Thread(target=trickle, args=(sock,), daemon=True)
        trickling.start()
        time.sleep(0.6)
        served.stop_http()
        stopped = time.monotonic()
        trickling.join(5)
    assert ended and ended[0] - stopped < 2
    until(lambda: not set(threading.enumerate()) - before - {trickling}, timeout=5)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("metrics_host", ["127.0.0.2", "[::1]"])
def test_metrics_are_served_on_the_metrics_host_and_stop_with_the_server(metrics_host):
    """``metrics_host`` puts /metrics on an address of its own (an IPv6 literal in brackets
    too), not on the gRPC host's; the server's stop closes the endpoint."""
    address = metrics_host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family) as probe:
            probe.bind((address, 0))
    except OSError:
        pytest.skip(f"no {address} here")
    srv = ServerThread(metrics_host=metrics_host).start()
    try:
        port = srv.server.metrics_port
        page = urllib.request.urlopen(f"http://{host_port(metrics_host, port)}/metrics", timeout=10).read()
        assert b"tritarget_queued_images" in page
        with socket.socket() as other:  # the gRPC host's address has no /metrics
            assert other.connect_ex(("127.0.0.1", port)) != 0
    finally:
        srv.stop()
    with socket.socket(family) as late:
        assert late.connect_ex((address, port)) != 0


def test_a_metrics_connection_past_the_limit_is_closed_at_once(monkeypatch, capfd):
    """With MAX_SCRAPES connections being served, one more is closed unanswered at once
    (a scraper retries at its next interval), not given a thread and a descriptor of its
    own until its idle limit."""
    from tritarget.service import metrics as metrics_module

    monkeypatch.setattr(metrics_module._ScrapeHandler, "timeout", 20.0)  # the served ones stay for the test
    served = metrics_module.Metrics()
    port = served.serve_http("127.0.0.1", 0)
    before = set(threading.enumerate())
    held = []
    try:
        for _ in range(metrics_module.MAX_SCRAPES):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            held[-1].sendall(b"GET /metrics HTTP/1.1\r\n")  # half a request
        new = lambda: set(threading.enumerate()) - before  # noqa: E731
        until(lambda: sum(t.name.endswith("(process_request_thread)") for t in new()) == metrics_module.MAX_SCRAPES)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            extra.sendall(b"GET /metrics HTTP/1.1\r\n")
            started = time.monotonic()
            assert extra.recv(1) == b""  # closed, not served (a served one would wait 20 s here)
            assert time.monotonic() - started < 3
        assert "Traceback" not in capfd.readouterr().err
    finally:
        for sock in held:
            sock.close()
        served.stop_http()


_SETTINGS, _PING, _GOAWAY = 4, 6, 7  # HTTP/2 frame types


def _frames_until_closed(sock: socket.socket, timeout_s: float) -> list[tuple[int, bytes]]:
    """(type, payload) of every HTTP/2 frame the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[9 : 9 + length]))
        data = data[9 + length :]
    return frames


def test_pings_every_10_s_keep_a_connection_with_no_call_open():
    """Clients that keep idle connections alive (grpc-js, grpc-go: keepalive without calls)
    ping with no call open; gRPC's policy allowed that once per 2 hours, so the 4th such
    ping (30 s apart) ended the connection: GOAWAY too_many_pings. Every 10 s (README:
    the ping policy) is allowed, with calls or without."""
    with ServerThread() as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        sock.sendall(HTTP2_PREFACE + http2_frame(_SETTINGS, 0, 0, b"") + http2_frame(_SETTINGS, 1, 0, b""))
        for n in range(4):
            time.sleep(10.2 if n else 0.0)
            sock.sendall(http2_frame(_PING, 0, 0, n.to_bytes(8, "big")))
        time.sleep(1.0)
        sock.shutdown(socket.SHUT_WR)  # the server closes its end too: every frame it sent is read
        frames = _frames_until_closed(sock, timeout_s=10)
        sock.close()
    assert [payload for kind, payload in frames if kind == _PING] == [n.to_bytes(8, "big") for n in range(4)]
    assert not [payload for kind, payload in frames if kind == _GOAWAY and b"too_many_pings" in payload]


def test_a_connection_is_told_its_stream_limit_and_closed_once_idle():
    """A connection that opens the HTTP/2 session and then sends nothing (20,000 of them
    took every file descriptor, and gRPC kept them for good) is closed after
    connection_idle_s; the server's settings cap the streams it may open at once."""
    with ServerThread(max_streams_per_connection=7, connection_idle_s=1.0) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        started = time.monotonic()
        sock.sendall(HTTP2_PREFACE + http2_frame(_SETTINGS, 0, 0, b"") + http2_frame(_SETTINGS, 1, 0, b""))
        frames = _frames_until_closed(sock, timeout_s=15)
        closed_after = time.monotonic() - started
        sock.close()
    settings = next(payload for kind, payload in frames if kind == _SETTINGS and payload)
    values = {int.from_bytes(settings[i : i + 2], "big"): int.from_bytes(settings[i + 2 : i + 6], "big")
              for i in range(0, len(settings), 6)}  # fmt: skip
    assert values[3] == 7  # SETTINGS_MAX_CONCURRENT_STREAMS
    assert any(kind == _GOAWAY for kind, _ in frames)
    assert 0.5 < closed_after < 12


def test_calls_past_the_stream_limit_wait_in_the_caller_until_a_call_ends():
    """As the options document it: gRPC's client queues the calls a connection opens past
    the server's stream limit (it knows the limit from the settings) rather than having
    them refused; one waits out its deadline while the streams stay open, and is answered
    once one of them ends."""
    from tritarget.protos import target_assigner_pb2_grpc as rpc

    with ServerThread(max_streams_per_connection=2) as srv, grpc.insecure_channel(srv.address) as channel:
        grpc.channel_ready_future(channel).result(30)
        stub = rpc.TargetAssignerStub(channel)
        assert stub.ListPresets(pb.ListPresetsRequest(), timeout=30).presets  # the settings have arrived
        ends = [threading.Event(), threading.Event()]
        request = build_request(BOXES, [1], CANVAS, preset="retinanet_torchvision")

        def requests(end: threading.Event):
            yield request
            end.wait(60)

        streams = [stub.AssignStream(requests(end), timeout=60) for end in ends]
        for stream in streams:  # answered: both streams are open
            assert next(stream).batch_size == 1
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.ListPresets(pb.ListPresetsRequest(), timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started >= 0.9
        waiting = stub.ListPresets.future(pb.ListPresetsRequest(), timeout=30)
        ends[0].set()
        assert list(streams[0]) == [] and waiting.result().presets
        ends[1].set()
        assert list(streams[1]) == []


def test_connection_limits_past_grpcs_int32_milliseconds_serve():
    """30 days is more milliseconds than gRPC's int32 option holds: the server serves with
    its longest limit instead of failing to start (OverflowError)."""
    month = 30 * 86400.0
    with ServerThread(connection_idle_s=month, connection_age_s=month) as srv, TargetClient(srv.address) as client:
        assert _assign(client).labels.shape[0] == 1


def test_calls_and_streams_go_on_across_connections_closed_for_their_age(monkeypatch):
    """Past connection_age_s the server asks the caller to reconnect and, after the grace,
    closes the connection (a caller that never read its responses held the server's unsent
    bound for as long as it kept its connection): unary calls retry, a stream sends its
    unanswered requests again; none is lost or answered twice."""
    from tritarget.service import server as server_module

    monkeypatch.setattr(server_module, "_CONNECTION_AGE_GRACE_S", 0.3)
    items = [{"gt_boxes": BOXES, "gt_counts": [1], "request_id": f"r{i}"} for i in range(12)]

    def slowly():
        for item in items:
            time.sleep(0.25)
            yield item

    with ServerThread(connection_age_s=0.5) as srv, TargetClient(srv.address, timeout=60) as client:
        expected = _assign(client)
        for _ in range(6):
            time.sleep(0.3)
            assert torch.equal(_assign(client).labels, expected.labels)
        before = client.stats.retries
        answers = list(client.stream(slowly(), preset="retinanet_torchvision", canvas=CANVAS))
        assert len(answers) == len(items)
        assert all(torch.equal(answer.labels, expected.labels) for answer in answers)
        assert client.stats.retries > before, client.stats  # the stream was cut, and started again

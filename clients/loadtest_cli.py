"""``tritarget loadtest``: the command line of ``tritarget.clients.loadtest``.

    tritarget loadtest --target 127.0.0.1:50051 --duration 10 --concurrency 16 --verify 20 --json out.json

Prints the report table; exit status 0 only when every measured request was answered
without error and each of the ``--verify K`` responses asked for was verified and equals
the in-process targets (a run that answered fewer than K fails); 1 otherwise,
2 for a bad flag (before anything runs), 130 after Ctrl-C (the table and the files then
hold what was measured until then), 141 when the reader of its output has gone after a
run that succeeded (a failed or interrupted run keeps its 1 or 130).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys

from tritarget.service.arguments import batch_seed, integer, number, target_address, timeout_seconds
from tritarget.service.output import output_file_problem, reader_gone, written_in_place

__all__ = ["add_parser"]

_positive = number(0, above=True)

# The exit status of a run stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
_INTERRUPTED = 130


def _boxes(text: str) -> int | None:
    if text == "coco":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'coco' or a number of boxes per image, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"boxes per image must be >= 0, got {value}")
    return value


def add_parser(commands) -> None:
    from tritarget.kernels import presets

    from .loadtest import MAX_CONCURRENCY, MAX_PROCESSES, MAX_WINDOW

    parser = commands.add_parser(
        "loadtest", help="drive a running service: throughput, latency percentiles, errors, verification",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--target", action="append", required=True, type=target_address,
                        help="server address (repeat for several; or dns:///name:port)")  # fmt: skip
    # A stream's deadline is --timeout + --duration + --warmup: each bounded as --timeout is
    # (1e10 s made every stream's deadline overflow, DEADLINE_EXCEEDED at once).
    parser.add_argument("--duration", type=timeout_seconds, default=10.0, help="measured seconds (default 10)")
    parser.add_argument("--warmup", type=number(0, high=1e6), default=2.0, help="seconds before measuring (default 2)")
    parser.add_argument(
        "--concurrency",
        type=integer(1, MAX_CONCURRENCY),
        default=8,
        help="callers, or streams with --stream; with --rate, the connections "
        f"the calls are spread over (default 8; one connection per caller or stream, up to 64 per client "
        f"process and target; at most {MAX_CONCURRENCY:,})",
    )
    parser.add_argument("--rate", type=_positive,
                        help="open loop: requests per second in total, latency from each scheduled start")  # fmt: skip
    parser.add_argument("--stream", action="store_true", help="AssignStream calls instead of unary Assign")
    parser.add_argument("--window", type=integer(1, MAX_WINDOW),
                        help="closed-loop --stream only: requests in flight per stream (default 1)")  # fmt: skip
    parser.add_argument("--processes", type=integer(1, MAX_PROCESSES), default=1,
                        help=f"client processes (default 1, at most {MAX_PROCESSES})")  # fmt: skip
    parser.add_argument("--preset", default="retinanet_torchvision", choices=presets.names(),
                        help="default retinanet_torchvision")  # fmt: skip
    parser.add_argument("--canvas", type=integer(1), nargs=2, metavar=("H", "W"),
                        help="canvas size (default: the preset's: 800 1344; SSD300 300 300, d2l 256 256, "
                             "yolov5 640 640)")  # fmt: skip
    parser.add_argument("--images", type=integer(1), default=8, help="images per request (default 8)")
    parser.add_argument("--boxes", type=_boxes, default=None, metavar="coco|G",
                        help="boxes per image: COCO-like (default) or a fixed number")  # fmt: skip
    parser.add_argument("--format", choices=("sparse", "dense"), default="sparse", help="default sparse")
    parser.add_argument("--fp16", action="store_true", help="float16 deltas")
    parser.add_argument("--variants", type=integer(1), default=16, help="distinct requests cycled through (default 16)")
    parser.add_argument("--seed", type=batch_seed, default=0,
                        help="request i's images from seed + i (default 0)")  # fmt: skip
    parser.add_argument("--timeout", type=timeout_seconds, default=60.0,
                        help="deadline of a call, in seconds (default 60); of a stream: its run plus this")  # fmt: skip
    parser.add_argument("--token", help="bearer token (or env TRITARGET_TOKEN)")
    parser.add_argument("--tls-ca", help="PEM root certificate to verify a TLS server")
    parser.add_argument("--verify", type=integer(0), default=0, metavar="K",
                        help="check K answered requests (drawn from the whole run) against their requests and "
                             "in-process targets; any difference, or fewer than K answered, fails the run")  # fmt: skip
    parser.add_argument("--json", help="write the summary and the per-second series as JSON")
    parser.add_argument("--csv", help="write the per-second series as CSV")
    parser.add_argument("--plot", help="write a PNG of throughput and latency over time (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.set_defaults(handler=_loadtest)


def _usage_problem(args: argparse.Namespace) -> str | None:
    """The first flag that argparse cannot check alone, and what is wrong with it."""
    if args.window is not None and (not args.stream or args.rate is not None):
        return "--window: only with --stream, in closed loop (without --rate)"
    if args.concurrency < args.processes:
        return f"--concurrency {args.concurrency} is shared by --processes {args.processes}: give at least that many"
    outputs = [(flag, path) for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot))
               if path is not None]  # fmt: skip
    for flag, path in outputs:
        if problem := output_file_problem(path):  # before a run that may take minutes
            return f"{flag} {path}: {problem}"
    for (flag, path), (other, other_path) in itertools.combinations(outputs, 2):
        # The later file would replace the earlier; a device or a pipe takes both (/dev/null).
        same = os.path.realpath(path) == os.path.realpath(other_path)
        if same and not (written_in_place(path) and written_in_place(other_path) and not os.path.isfile(path)):
            return f"{flag} and {other} name the same file, {path}"
    if args.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            return "--plot: needs matplotlib (pip install matplotlib)"
        from matplotlib.backend_bases import FigureCanvasBase

        from .loadtest import plot_format

        kinds = FigureCanvasBase.get_supported_filetypes()
        if plot_format(args.plot) not in kinds:
            return f"--plot {args.plot}: matplotlib draws no .{plot_format(args.plot)} files ({', '.join(kinds)})"
    return None


def _loadtest(args: argparse.Namespace) -> int:
    from .loadtest import LoadTestOptions, Workload, run

    problem = _usage_problem(args)
    if problem is not None:
        print(f"tritarget loadtest: {problem}", file=sys.stderr)
        return 2
    try:
        options = LoadTestOptions(
            targets=tuple(args.target),
            workload=Workload(preset=args.preset, canvas=tuple(args.canvas) if args.canvas else None,
                              images=args.images, boxes=args.boxes, format=args.format, fp16=args.fp16,
                              variants=args.variants, seed=args.seed),
            duration_s=args.duration, warmup_s=args.warmup, concurrency=args.concurrency, rate=args.rate,
            stream=args.stream, window=args.window or 1, processes=args.processes, timeout_s=args.timeout,
            token=_token(args),
            tls_ca=_root_certificates(args.tls_ca),
            verify=args.verify,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"tritarget loadtest: {exc}", file=sys.stderr)
        return 2
    try:
        report = run(options, progress=not args.no_progress)
    except KeyboardInterrupt:  # a second Ctrl-C while the clients were stopping
        print("tritarget loadtest: interrupted", file=sys.stderr)
        return _INTERRUPTED
    except RuntimeError as exc:  # no client process came back with a result
        print(f"tritarget loadtest: {exc}", file=sys.stderr)
        return 1
    # The files before the table: a reader of stdout that stops (`| head -3`) ends the command at its next line.
    written, wrote, reader_left = True, [], False
    for path, write in ((args.json, report.write_json), (args.csv, report.write_csv), (args.plot, report.plot)):
        if not path:
            continue
        try:
            write(path)
        except BrokenPipeError:  # `--json /dev/stdout | head -1`: the other files are written all the same
            reader_left = True
        except OSError as exc:  # checked before the run, but a disk can fill, a folder go or a pipe close
            print(f"tritarget loadtest: could not write {path}: {exc.strerror or exc}", file=sys.stderr)
            written = False
        else:
            wrote.append(path)
    status = _INTERRUPTED if report.interrupted else 0 if report.ok and written else 1
    if reader_left:  # as exit_status ends a command whose reader has gone: 141 only for a run that succeeded
        gone = reader_gone()
        return status or gone
    print(report.table())
    for path in wrote:
        print(f"wrote {path}")
    return status


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token, checked under the name the user gave it by."""
    from .client import command_line_token

    return command_line_token(args.token, "call")


def _root_certificates(path: str | None) -> bytes | None:
    from .client import read_root_certificates

    try:
        return read_root_certificates(path) if path else None
    except ValueError as exc:
        raise ValueError(f"--tls-ca {exc}") from None

"""What a response waiting for a caller that does not read costs the server's memory,
against what ``--max-unsent-mb`` counts: its bytes on the wire.

``tritarget serve --backend cpu`` (a subprocess, metrics on) gets calls whose callers
never read (HTTP/2 spoken over a raw socket with a receive window of 0, which no gRPC
client does: ``tests/test_service_harness.unread_call``), one kind at a time: unary DENSE
Assign calls of 8 COCO-sized images (~34 MB each), unary GetAnchors of an 8192 x 4096
canvas (~96 MB each), and AssignStream calls each sending DENSE items until the bound
holds them. Per kind: the server's RSS before (after the same calls were made and read
once, so that the allocator's keep of the work itself is in the baseline) and while the
calls are held, and the ``tritarget_unsent_response_bytes`` gauge then; their ratio is
the memory a held byte costs. Writes ``unsent_memory.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

import torch
from recording import machine_line, write_json, write_text
from serving import start_server

from tritarget.clients import TargetClient
from tritarget.clients.wire import build_request
from tritarget.protos import target_assigner_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_service_harness import unread_call  # noqa: E402

CANVAS = (800, 1344)
BOXES, COUNTS = torch.tensor([[10.0, 10.0, 50.0, 60.0]] * 8), [1] * 8


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _gauge_mb(url: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return float(re.search(r"^tritarget_unsent_response_bytes (\S+)$", text, re.M).group(1)) / 2**20


def _kinds() -> list[tuple[str, str, list[bytes], int]]:
    """(name, method, one call's requests, calls)."""
    dense = build_request(BOXES, COUNTS, CANVAS, preset="retinanet_torchvision", format="dense").SerializeToString()
    anchors = pb.GetAnchorsRequest(config=pb.ConfigRef(preset="retinanet_torchvision"), canvas_height=8192,
                                   canvas_width=4096).SerializeToString()  # fmt: skip
    return [
        ("unary Assign, DENSE, 8 images", "Assign", [dense], 24),
        ("unary GetAnchors, 8192 x 4096", "GetAnchors", [anchors], 8),
        ("AssignStream, 4 DENSE items of 8 images each", "AssignStream", [dense] * 4, 6),
    ]


def _held(name: str, method: str, requests: list[bytes], calls: int, args) -> dict:
    """A fresh server's RSS and gauge with no call held (after the same calls were read
    twice), half the calls held and all of them."""
    process, address, url = start_server("--backend", "cpu", "--max-unsent-mb", str(args.max_unsent_mb),
                                         "--no-access-log", metrics=True)  # fmt: skip
    held = []
    try:
        port = int(address.rsplit(":", 1)[1])
        with TargetClient(address, timeout=300) as client:
            for _ in range(2):
                if method == "GetAnchors":
                    client.get_anchors((8192, 4096), preset="retinanet_torchvision")
                else:
                    client.assign(BOXES, COUNTS, CANVAS, preset="retinanet_torchvision", format="dense")
        points = [(_rss_mb(process.pid), _gauge_mb(url))]
        for _ in range(2):
            held += [unread_call(port, method, *requests) for _ in range(calls // 2)]
            time.sleep(args.settle_s)
            points.append((_rss_mb(process.pid), _gauge_mb(url)))
    finally:
        for call in held:
            call.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    (rss0, _), (rss1, gauge1), (rss2, gauge2) = points
    overall, second_half = (rss2 - rss0) / gauge2, (rss2 - rss1) / (gauge2 - gauge1)
    row = dict(kind=name, calls=calls, unsent_mb=round(gauge2), rss_mb=[round(rss0), round(rss1), round(rss2)],
               per_byte=round(overall, 2), per_byte_second_half=round(second_half, 2))  # fmt: skip
    print(f"{name}: {calls} calls held, unsent {gauge1:.0f} -> {gauge2:.0f} MB, RSS {rss0:.0f} -> {rss1:.0f} -> "
          f"{rss2:.0f} MB: {overall:.2f}x, the second half {second_half:.2f}x", flush=True)  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-unsent-mb", type=int, default=1024)
    parser.add_argument("--settle-s", type=float, default=6.0, help="wait after opening calls (default 6)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "service"))
    args = parser.parse_args()
    rows = [_held(*kind, args) for kind in _kinds()]
    machine = machine_line()
    out = Path(args.out)
    write_json(out / "unsent_memory.json", dict(machine=machine, max_unsent_mb=args.max_unsent_mb, rows=rows))
    lines = [f"# Server memory per unsent response byte (cpu backend; {machine})", "",
             f"`--max-unsent-mb {args.max_unsent_mb}`, a fresh server per row. RSS with no call held (after the "
             "same calls were read twice), with half the calls held and with all of them, against the "
             "`tritarget_unsent_response_bytes` gauge: the growth per unsent byte over all the calls and over "
             "the second half (once what the allocator kept of the work is used).", "",
             "| calls whose callers do not read | calls | unsent MB | RSS MB: none, half, all held | RSS / unsent "
             "| second half |", "|---|---:|---:|---|---:|---:|"]  # fmt: skip
    lines += [f"| {r['kind']} | {r['calls']} | {r['unsent_mb']} | {', '.join(map(str, r['rss_mb']))} | "
              f"{r['per_byte']:.2f}x | {r['per_byte_second_half']:.2f}x |" for r in rows]  # fmt: skip
    write_text(out / "unsent_memory.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

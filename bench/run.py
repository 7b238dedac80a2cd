"""make bench: netchan beside its peers, every figure measured in the same run.

1. Bulk throughput of one stream, beside raw asyncio TCP on the same event loop.
2. Channel message rates (64-byte messages) beside pyzmq PUSH/PULL, blocking
   and zmq.asyncio; request/response round trips beside raw asyncio TCP.
3. Resilience: throughput through a cutting proxy beside the same without
   cuts; the failover gap; mirror beside one path under 20% loss.
4. A dead peer: the longest stall of the live senders and workers when one
   peer is killed, beside the same with only the linger to end it.
5. Tunnels: netchan tunnel -L (tcp and udp carriers) beside ssh -L with two
   ciphers and a plain socat relay: MB/s both ways, CPU per GB, set-up time.
6. The VPN: iperf3 through netchan vpn (udp and tcp carriers) beside the bare
   veth link under it, between two network namespaces (needs root).
7. The coordinator: one stream through its relay and over the punched direct
   path beside a plain direct session; connect_peer to first byte and to the
   direct path.
8. Operations: the longest stall of a stream and of a work queue around
   netchan restart beside a plain restart; throughput with metrics scraped
   beside none.
9. Hostile input: a real client's handshake time and throughput beside a
   flood of forged QUIC Initials and beside 10,000 idle or garbage TCP
   connections, each beside no flood; the listener's memory.

``--baseline REF`` measures the netchan message rates of git revision REF
too, alternating with this tree's, and prints them side by side.

Every figure is the median of ``--runs`` runs (default 3).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import coordinator  # noqa: E402
import hostile  # noqa: E402
import ops  # noqa: E402
import deadpeer  # noqa: E402
import tunnel  # noqa: E402
import vpn  # noqa: E402
import messages  # noqa: E402
import resilience  # noqa: E402
from throughput import measure  # noqa: E402

MiB = 1 << 20

# qh3 runs faster on uvloop; aioquic runs slower on it, so it gets asyncio's loop
CASES = [
    # (label, kind, carrier, engine, loop, size)
    ("raw asyncio TCP (uvloop)", "raw", "tcp", "-", "uvloop", 2048 * MiB),
    ("raw asyncio TCP (asyncio)", "raw", "tcp", "-", "asyncio", 2048 * MiB),
    ("netchan tcp  qh3     (uvloop)", "netchan", "tcp", "qh3", "uvloop", 1024 * MiB),
    ("netchan udp  qh3     (uvloop)", "netchan", "udp", "qh3", "uvloop", 256 * MiB),
    ("netchan tcp  aioquic (asyncio)", "netchan", "tcp", "aioquic", "asyncio", 256 * MiB),
    ("netchan udp  aioquic (asyncio)", "netchan", "udp", "aioquic", "asyncio", 64 * MiB),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smaller transfers")
    p.add_argument("--only", choices=["bulk", "messages", "resilience", "deadpeer", "tunnel", "vpn", "coordinator", "ops", "hostile"], help="run one part")
    p.add_argument("--baseline", metavar="REF", help="a git revision whose message rates to show beside")
    a = p.parse_args()
    if a.only in (None, "bulk"):
        bulk(a)
    if a.only in (None, "messages"):
        if a.only is None:
            print()
        with tempfile.TemporaryDirectory() as tmp:
            baseline = (a.baseline, _export(a.baseline, tmp)) if a.baseline else None
            messages.run_all(a.runs, a.quick, baseline)
    if a.only in (None, "resilience"):
        if a.only is None:
            print()
        _uvloop_run(resilience.run_all(a.runs, a.quick))
    if a.only in (None, "deadpeer"):
        if a.only is None:
            print()
        _uvloop_run(deadpeer.run_all(a.runs, a.quick))
    if a.only in (None, "tunnel"):
        if a.only is None:
            print()
        tunnel.run_all(a.runs, a.quick)
    if a.only in (None, "vpn"):
        if a.only is None:
            print()
        vpn.run_all(a.runs, a.quick)
    if a.only in (None, "coordinator"):
        if a.only is None:
            print()
        _uvloop_run(coordinator.run_all(a.runs, a.quick))
    if a.only in (None, "ops"):
        if a.only is None:
            print()
        _uvloop_run(ops.run_all(a.runs, a.quick))
    if a.only in (None, "hostile"):
        if a.only is None:
            print()
        _uvloop_run(hostile.run_all(a.runs, a.quick))
    return 0


def _export(ref: str, into: str) -> str:
    """The package at git revision ``ref``, unpacked under ``into``; returns its src directory."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", ref, "src"], stdout=subprocess.PIPE, check=True)
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return str(Path(into) / "src")


def _uvloop_run(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        import asyncio

        asyncio.run(coro)


def bulk(a: argparse.Namespace) -> None:
    print("Bulk throughput, one stream, two processes on loopback "
          f"(median of {a.runs} runs)\n")
    print(f"{'case':34} {'MB/s':>9} {'ratio':>8} {'CPU s/GB':>9}   runs (MB/s)")
    baseline: dict[str, float] = {}
    for label, kind, carrier, engine, loop, size in CASES:
        if a.quick:
            size //= 8
        runs = [measure(kind, carrier, engine, loop, size) for _ in range(a.runs)]
        mbs = statistics.median(r["mb_s"] for r in runs)
        cpu = statistics.median(r["cpu_s_per_gb"] for r in runs)
        if kind == "raw":
            baseline[loop] = mbs
        ratio = mbs / baseline[loop]
        spread = ", ".join(f"{r['mb_s']:.0f}" for r in runs)
        print(f"{label:34} {mbs:9.1f} {ratio:7.1%} {cpu:9.2f}   {spread}", flush=True)
    print("\nratio: netchan MB/s / raw asyncio TCP MB/s on the same event loop, this run")


if __name__ == "__main__":
    sys.exit(main())

"""A dead peer's cost to the others: the longest stall the live senders and
workers see when one peer is killed (SIGKILL), with default settings, beside
the same with the unresponsive mark turned off (only the linger applies).

Senders: four sender processes on a channel of capacity 1, then 8, sending
as fast as they can; one is killed while it holds credit it has not used.  Workers: three worker
processes taking jobs from a channel and sending results on a reply channel
(the shape of ``make demo``); one is killed while it holds a job.  The figure
is the longest time without an item (or a result) from the live ones, from
the kill on.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import statistics
import sys
import tempfile
import time

import netchan

CHILD = r"""
import asyncio, sys, netchan

async def main(role, key, url, owner):
    async with netchan.Node(netchan.Identity.load(key)) as node:
        peer = await node.connect(url, owner)
        if role == "sender":
            ch = await peer.channel("items")
            print("ready", flush=True)
            i = 0
            while True:
                await ch.send(i)
                i += 1
        jobs = await peer.channel("jobs", direction="recv")
        print("ready", flush=True)
        while True:
            async with jobs.process() as job:
                await asyncio.sleep(0.002)
                await job["reply"].send(job["id"])

asyncio.run(main(*sys.argv[1:]))
"""


async def _children(owner: netchan.Node, tmp: str, role: str, n: int) -> tuple[list, list[str]]:
    procs, ids = [], []
    for k in range(n):
        ident = netchan.Identity.generate()
        key = os.path.join(tmp, f"{role}{k}.key")
        ident.save(key)
        owner.allow(ident.node_id)
        ids.append(ident.node_id)
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, role, key, owner.addresses[0], owner.node_id,
            stdout=asyncio.subprocess.PIPE))
    for proc in procs:
        if (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() != b"ready":
            raise RuntimeError(f"a {role} did not start")
    return procs, ids


async def _end(procs: list) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _held(chan, node_id: str) -> int:
    return sum(s.credit for ep, s in chan.core._senders.items() if ep.wire.stream.peer.node_id == node_id)


async def sender_stall(unresponsive: float | None, linger: float, after: float, capacity: int) -> float:
    """Kill one of four senders while it holds credit; the live ones' longest gap (s)."""
    with tempfile.TemporaryDirectory() as tmp:
        async with netchan.Node(listen=["udp://127.0.0.1:0"], unresponsive=unresponsive, linger=linger) as owner:
            chan = owner.channel("items", capacity=capacity)
            procs, ids = await _children(owner, tmp, "sender", 4)
            try:
                start = time.monotonic()
                victim = ids[-1]
                while time.monotonic() - start < 0.5:
                    await asyncio.wait_for(chan.recv(), 10)
                for _ in range(100):
                    # stop it while it holds credit it has not used (an item
                    # in flight would still arrive), then kill it
                    while not _held(chan, victim):
                        await asyncio.wait_for(chan.recv(), 10)
                    procs[-1].send_signal(signal.SIGSTOP)
                    await asyncio.sleep(0.05)
                    if _held(chan, victim):
                        break
                    procs[-1].send_signal(signal.SIGCONT)
                procs[-1].send_signal(signal.SIGKILL)
                killed = last = time.monotonic()
                gap = 0.0
                while last - killed < after:
                    await asyncio.wait_for(chan.recv(), linger + 10)
                    now = time.monotonic()
                    gap, last = max(gap, now - last), now
                return gap
            finally:
                await _end(procs)


async def worker_stall(unresponsive: float | None, linger: float, after: float) -> tuple[float, float]:
    """Kill one of three workers holding a job: the longest gap in results,
    and when the job it held went back to the queue (s after the kill)."""
    with tempfile.TemporaryDirectory() as tmp:
        async with netchan.Node(listen=["udp://127.0.0.1:0"], unresponsive=unresponsive, linger=linger) as owner:
            jobs = owner.channel("jobs", capacity=16)
            results = owner.channel("results", capacity=64)
            procs, _ = await _children(owner, tmp, "worker", 3)
            reply = results.send_only()

            async def produce() -> None:
                i = 0
                while True:
                    await jobs.send({"id": i, "reply": reply})
                    i += 1

            producer = asyncio.ensure_future(produce())
            try:
                start = time.monotonic()
                while time.monotonic() - start < 0.5 or not jobs.statistics()["in_process"]:
                    await asyncio.wait_for(results.recv(), 10)
                requeued = jobs.statistics()["requeued"]
                procs[-1].send_signal(signal.SIGKILL)
                killed = last = time.monotonic()
                gap, back = 0.0, None
                while last - killed < after or back is None:
                    await asyncio.wait_for(results.recv(), linger + 10)
                    now = time.monotonic()
                    gap, last = max(gap, now - last), now
                    if back is None and jobs.statistics()["requeued"] > requeued:
                        back = now - killed
                return gap, back
            finally:
                producer.cancel()
                await _end(procs)


def _ms(values: list[float]) -> str:
    return ", ".join(f"{v * 1000:.0f}" for v in values)


async def run_all(runs: int, quick: bool) -> None:
    off_linger = 3.0
    params = inspect.signature(netchan.Node).parameters
    unresponsive, linger = params["unresponsive"].default, params["linger"].default
    on_label = f"unresponsive {unresponsive:g} s (default), linger {linger:g} s"
    off_label = f"unresponsive off, linger {off_linger:g} s"
    print(f"A peer killed (SIGKILL): what the live ones wait for (median of {runs} runs)\n")
    print(f"{'case':56} {'ms':>7} {'vs off':>8}   runs (ms)")

    def row(on: list[float], off: list[float]) -> None:
        a, b = statistics.median(on), statistics.median(off)
        print(f"{'    ' + on_label:56} {a * 1000:7.0f} {a / b:8.3f}   {_ms(on)}")
        print(f"{'    ' + off_label:56} {b * 1000:7.0f} {1:8.3f}   {_ms(off)}", flush=True)

    for capacity in (1, 8):
        on = [await sender_stall(unresponsive, linger, 1.5, capacity) for _ in range(runs)]
        off = [await sender_stall(None, off_linger, off_linger + 1.0, capacity) for _ in range(runs)]
        print(f"  4 senders, capacity {capacity}, one killed holding credit: longest stall")
        row(on, off)
    on_w = [await worker_stall(unresponsive, linger, 1.5) for _ in range(runs)]
    off_w = [await worker_stall(None, off_linger, off_linger + 1.0) for _ in range(runs)]
    print("  3 workers + a reply channel, one killed holding a job: longest gap in results")
    row([g for g, _ in on_w], [g for g, _ in off_w])
    print("  ... and the time until the job it held is back in the queue")
    row([b for _, b in on_w], [b for _, b in off_w])
    print(f"\n  (off, the wait lasts the linger: {linger:g} s with the default linger)")


if __name__ == "__main__":
    asyncio.run(run_all(int(sys.argv[1]) if len(sys.argv) > 1 else 3, False))

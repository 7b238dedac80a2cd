"""``netchan demo``: a work queue across processes, through a proxy that cuts TCP.

This process is the producer: its node owns a ``jobs`` channel and a
``results`` channel.  Worker processes connect through a
:class:`~netchan.tools.chaos.TcpCutter` that terminates every TCP connection each
``cut_every`` seconds, take jobs with ``async with jobs.process()``, and send
each result on the reply channel that travels inside the job.  One worker is
killed (SIGKILL) partway through.  Every node runs with default settings: the
producer marks the dead worker's peer unresponsive after half a second of
silence, takes back what it held (the job it was processing goes back to the
head of the queue, the credit it held on the results channel to the live
workers), and the live workers never stop.  Another worker does the requeued
job, and the producer drops the duplicate result (if the dead worker's result
got out) by job id.  The summary reports the longest gap in jobs done.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sys
import tempfile
import time
from typing import Any

from ..errors import BrokenError, ConfigurationError, EndOfChannel, NetchanError
from ..identity import Identity
from ..node.node import Node
from ..tools.chaos import TcpCutter


def work(payload: bytes, rounds: int) -> str:
    """The job: a chain of hashes (the producer checks every answer)."""
    digest = payload
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()[:16]


async def run_worker(key_path: str, owner: str, url: str, number: int, engine: str | None = None) -> None:
    """A worker process: take jobs until the channel ends, reconnecting if the session is lost."""
    async with Node(Identity.load(key_path), engine=engine) as node:
        announced = False
        while True:
            try:
                peer = await node.connect(url, owner, timeout=10)
                jobs = await peer.channel("jobs", direction="recv")
                if not announced:
                    print("ready", flush=True)
                    announced = True
                while True:
                    async with jobs.process() as job:
                        result = work(job["payload"], job["rounds"])
                        if job["pause"]:
                            await asyncio.sleep(job["pause"])
                        await job["reply"].send({"id": job["id"], "worker": number, "result": result})
            except EndOfChannel:
                return
            except BrokenError:
                await asyncio.sleep(0.1)  # the session was lost: dial again


class _Progress:
    def __init__(self, total: int) -> None:
        self.total = total
        self.done: dict[int, str] = {}
        self.duplicates = 0
        self.wrong = 0
        self.by_worker: dict[int, int] = {}
        self.killed_at: int | None = None
        #: the latest thing to tell on the live line (a kill), and when
        self.event: tuple[str, float] | None = None
        self.kills: list[int] = []  # jobs done at each kill
        self.dying: dict[str, float] = {}  # killed worker's node id -> when, until marked unresponsive
        self.done_times: list[float] = []
        self.unresponsive_after: list[float] = []  # kill -> "peer unresponsive", seconds

    def longest_gap(self, start: float) -> tuple[float, float]:
        """The longest time without a job done, and when it began (from ``start``)."""
        best, at, last = 0.0, 0.0, start
        for t in self.done_times:
            if t - last > best:
                best, at = t - last, last - start
            last = t
        return best, at


async def run_workqueue(
    jobs: int = 2000,
    workers: int = 3,
    cut_every: float | tuple[float, float] = 1.0,
    rounds: int = 200,
    pause: float = 0.002,
    kill_at: float = 0.3,
    engine: str | None = None,
    deadline: float = 120.0,
    kills: int = 1,
    seed: int | None = None,
) -> int:
    """Run the work queue; returns 0 if every job was done once, correctly.

    ``kills`` workers are killed (SIGKILL): the first at ``kill_at`` of the
    jobs, any others at random points after it, each replaced by a new worker
    process.  ``cut_every`` may be a ``(low, high)`` range of seconds.
    """
    if workers < 1:
        raise ConfigurationError("the demo needs at least one worker")
    rng = random.Random(seed)
    kill_points = sorted([kill_at] + [rng.uniform(kill_at, 0.9) for _ in range(kills - 1)])[:kills]
    every = f"{cut_every[0]:g}-{cut_every[1]:g}" if isinstance(cut_every, tuple) else f"{cut_every:g}"
    print(f"netchan demo: a work queue of {jobs} jobs, {workers} worker processes,")
    if kills == 1:
        print(f"every TCP connection cut every {every} s, one worker killed (SIGKILL) at {kill_at:.0%}.\n")
    else:
        print(f"every TCP connection cut every {every} s, {kills} workers killed (SIGKILL) at "
              + ", ".join(f"{k:.0%}" for k in kill_points) + ", each replaced.\n")
    producer_id = Identity.generate()
    worker_ids = [Identity.generate() for _ in range(workers)]
    progress = _Progress(jobs)
    with tempfile.TemporaryDirectory() as tmp:
        keys = []
        for i, ident in enumerate(worker_ids):
            keys.append(os.path.join(tmp, f"worker{i}.key"))
            ident.save(keys[-1])
        node = Node(producer_id, ["tcp://127.0.0.1:0"], allow=[i.node_id for i in worker_ids], engine=engine)
        async with node:
            host, port = node.addresses[0].removeprefix("tcp://").rsplit(":", 1)
            async with TcpCutter((host, int(port)), cut_every=cut_every) as cutter:
                job_chan = node.channel("jobs", capacity=16)
                results = node.channel("results", capacity=64, allow_recv=[node.node_id])
                procs: list[asyncio.subprocess.Process] = []

                async def start_worker(i: int) -> asyncio.subprocess.Process:
                    args = [sys.executable, "-m", "netchan.cli.workqueue", keys[i], node.node_id, cutter.url, str(i)]
                    if engine:
                        args.append(engine)
                    return await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)

                try:
                    for i in range(workers):
                        procs.append(await start_worker(i))
                    for proc in procs:
                        assert proc.stdout is not None
                        line = await asyncio.wait_for(proc.stdout.readline(), 30)
                        if line.strip() != b"ready":
                            raise BrokenError("a worker did not start")
                    print(f"  producer {node.node_id[:12]}, {workers} workers up via {cutter.url}")
                    start = time.perf_counter()
                    expected = {}

                    async def watch() -> None:
                        async for ev in node.events():
                            killed = progress.dying.pop(ev.peer_id, None) if ev.kind == "peer unresponsive" else None
                            if killed is not None:
                                progress.unresponsive_after.append(time.perf_counter() - killed)

                    async def produce() -> None:
                        reply = results.send_only()
                        for i in range(jobs):
                            payload = i.to_bytes(4, "big") * 8
                            expected[i] = work(payload, rounds)
                            await job_chan.send({"id": i, "payload": payload, "rounds": rounds,
                                                 "pause": pause, "reply": reply})
                        await job_chan.close()

                    async def collect() -> None:
                        while len(progress.done) < jobs:
                            r = await results.recv()
                            job_id = r["id"]
                            if job_id in progress.done:
                                progress.duplicates += 1  # a requeued job done twice: dropped
                                continue
                            if r["result"] != expected.get(job_id):
                                progress.wrong += 1
                            progress.done[job_id] = r["result"]
                            progress.done_times.append(time.perf_counter())
                            progress.by_worker[r["worker"]] = progress.by_worker.get(r["worker"], 0) + 1
                            while kill_points and len(progress.done) >= jobs * kill_points[0]:
                                kill_points.pop(0)
                                # the last worker first (as the one-kill demo always did), then any
                                victim = len(procs) - 1 if not progress.kills else rng.randrange(len(procs))
                                progress.dying[worker_ids[victim].node_id] = time.perf_counter()
                                procs[victim].send_signal(signal.SIGKILL)
                                await procs[victim].wait()
                                progress.kills.append(len(progress.done))
                                if progress.killed_at is None:
                                    progress.killed_at = len(progress.done)
                                progress.event = (f"worker {victim} killed at {len(progress.done)} jobs: its job goes "
                                                  "back to the queue" + ("; a new worker starts" if workers == 1
                                                                          else ""), time.perf_counter())
                                if kill_points or kills > 1 or workers == 1:
                                    # a replacement (the only worker must have one: nobody else takes the jobs)
                                    procs[victim] = await start_worker(victim)

                    watcher = asyncio.ensure_future(watch())
                    tasks = [asyncio.ensure_future(produce()), asyncio.ensure_future(collect())]
                    finished = asyncio.ensure_future(asyncio.wait_for(asyncio.gather(*tasks), deadline))
                    live = sys.stdout.isatty()  # redraw one line; otherwise a line a second
                    while not finished.done():
                        await asyncio.wait([finished], timeout=0.25 if live else 1.0)
                        _line(progress, cutter, time.perf_counter() - start, job_chan.statistics(), live)
                    elapsed = time.perf_counter() - start
                    watcher.cancel()
                    try:
                        finished.result()
                    except asyncio.TimeoutError:
                        print(f"\n  stopped: not every job was done within {deadline:g} s")
                    except NetchanError as exc:
                        print(f"\n  stopped: {type(exc).__name__}: {exc}")
                    return _summary(progress, cutter, elapsed, start, job_chan.statistics())
                finally:
                    await _stop(procs)


def _line(p: _Progress, cutter: TcpCutter, elapsed: float, stats: dict[str, Any], live: bool = True) -> None:
    line = (f"  {elapsed:5.1f} s  jobs done {len(p.done):5d}/{p.total}  "
            f"queued {stats['buffered']:3d}  in process {stats['in_process']:2d}  "
            f"requeued {stats['requeued']:2d}  duplicates dropped {p.duplicates:2d}  "
            f"cuts {cutter.cuts:3d}")
    if p.event is not None:
        said, when = p.event
        if live:
            # shown on the line for a few seconds, so that the pause after a kill reads as what it is
            if time.perf_counter() - when < 4.0:
                line += f"  | {said}"
        else:
            print(f"  {said}")
            p.event = None
    if live:
        sys.stdout.write(f"\r{line}\x1b[K")
    else:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _summary(p: _Progress, cutter: TcpCutter, elapsed: float, start: float, stats: dict[str, Any]) -> int:
    lost = p.total - len(p.done)
    print("\n")
    print(f"  jobs done          {len(p.done)} of {p.total} ({len(p.done) / elapsed:.0f} jobs/s over {elapsed:.1f} s)")
    print(f"  jobs lost          {lost}")
    print(f"  results checked    {len(p.done) - p.wrong} correct, {p.wrong} wrong")
    if len(p.kills) <= 1:
        print(f"  worker killed      at {p.killed_at} jobs done; its job in process went back to the queue "
              f"({stats['requeued']} requeued)")
    else:
        print(f"  workers killed     {len(p.kills)}, at " + ", ".join(map(str, p.kills))
              + f" jobs done; what they held went back to the queue ({stats['requeued']} requeued)")
    if p.unresponsive_after:
        print("  marked unresponsive " + ", ".join(f"{t:.2f} s" for t in p.unresponsive_after)
              + " after " + ("the kill" if len(p.kills) == 1 else "each kill"))
    gap, at = p.longest_gap(start)
    print(f"  longest gap        {gap:.2f} s without a job done (from {at:.1f} s)")
    print(f"  duplicates dropped {p.duplicates} (by job id)")
    print("  jobs per worker    " + ", ".join(f"#{w}: {n}" for w, n in sorted(p.by_worker.items())))
    print(f"  TCP cuts survived  {cutter.cuts} (connections made: {cutter.connections})")
    ok = lost == 0 and p.wrong == 0 and p.killed_at is not None and p.duplicates <= len(p.kills)
    print(f"\n  {'OK: nothing lost' if ok else 'FAILED'}")
    return 0 if ok else 1


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 5)  # the jobs channel ended: they exit
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


if __name__ == "__main__":
    from .runner import run

    engine = sys.argv[5] if len(sys.argv) > 5 else None
    sys.exit(run(run_worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), engine), engine))

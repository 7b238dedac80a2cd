"""Channel semantics across processes: exact capacity with several sender
processes; rendezvous (a remote send returns only after our receive);
acknowledged processing in worker processes (requeue on an exception, and
when the worker is killed); close drains into another process."""

from __future__ import annotations

import asyncio
import sys

import pytest

import netchan

from .helpers import wait_for_condition

SENDER = r"""
import asyncio, sys, netchan

async def main(key, url, owner, name, count, tag):
    async with netchan.Node(netchan.Identity.load(key)) as node:
        peer = await node.connect(url, owner)
        ch = await peer.channel(name)
        print("ready", flush=True)
        for i in range(count):
            await ch.send([tag, i])
            print("sent", i, flush=True)
        await ch.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])))
"""


WORKER = r"""
import asyncio, sys, netchan

async def main(key, url, owner, name, mode):
    async with netchan.Node(netchan.Identity.load(key)) as node:
        peer = await node.connect(url, owner)
        ch = await peer.channel(name)
        print("ready", flush=True)
        failed = False
        while True:
            try:
                async with ch.process() as v:
                    if mode == "hold":
                        print("holding", v, flush=True)
                        await asyncio.sleep(3600)  # until killed
                    if mode == "fail-once" and not failed:
                        failed = True
                        print("failing", v, flush=True)
                        raise RuntimeError("processing failed")
                    print("done", v, flush=True)
            except RuntimeError:
                continue
            except netchan.EndOfChannel:
                print("end", flush=True)
                return

asyncio.run(main(*sys.argv[1:]))
"""


async def _start(tmp_path, owner, script, tag, *args):
    ident = netchan.Identity.generate()
    key = tmp_path / f"peer{tag}.key"
    ident.save(key)
    owner.allow(ident.node_id)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(key), owner.addresses[0], owner.node_id, *map(str, args),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )


async def start_sender(tmp_path, url, owner, name, count, tag):
    return await _start(tmp_path, owner, SENDER, tag, name, count, tag)


async def start_worker(tmp_path, owner, name, mode, tag):
    return await _start(tmp_path, owner, WORKER, f"w{tag}", name, mode)


async def lines(proc, n):
    """The next ``n`` lines the process prints, split into words."""
    return [(await asyncio.wait_for(proc.stdout.readline(), 20)).decode().split() for _ in range(n)]


async def stop(procs):
    for proc in procs:
        if proc.returncode is None:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.mark.async_timeout(60)
async def test_exact_capacity_with_sender_processes(tmp_path):
    async with netchan.Node(listen=["udp://127.0.0.1:0"]) as owner:
        chan = owner.channel("c", capacity=5)
        procs = [await start_sender(tmp_path, owner.addresses[0], owner, "c", 20, k) for k in range(3)]
        try:
            for proc in procs:
                assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"ready"
            # nobody receives yet: exactly five items are in, the senders wait
            await wait_for_condition(lambda: chan.statistics()["buffered"] == 5, timeout=20)
            await wait_for_condition(lambda: chan.statistics()["senders_waiting"] >= 1, timeout=20)
            got = []
            while len(got) < 60:
                s = chan.statistics()
                assert s["buffered"] + s["in_process"] <= 5
                got.append(tuple(await asyncio.wait_for(chan.recv(), 20)))
            assert sorted(got) == sorted((k, i) for k in range(3) for i in range(20))
            for k in range(3):
                assert [i for kk, i in got if kk == k] == list(range(20))
        finally:
            await stop(procs)


@pytest.mark.async_timeout(60)
async def test_rendezvous_send_in_another_process_waits_for_our_receive(tmp_path):
    async with netchan.Node(listen=["udp://127.0.0.1:0"]) as owner:
        chan = owner.channel("r", capacity=0)
        proc = await start_sender(tmp_path, owner.addresses[0], owner, "r", 3, 7)
        try:
            assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"ready"
            for i in range(3):
                # the sender waits for a receiver: nothing is buffered, nothing was sent
                await wait_for_condition(lambda: chan.statistics()["senders_waiting"] == 1, timeout=20)
                assert chan.statistics()["buffered"] == 0
                assert await asyncio.wait_for(chan.recv(), 20) == [7, i]
                line = await asyncio.wait_for(proc.stdout.readline(), 20)
                assert line.split() == [b"sent", str(i).encode()]
        finally:
            await stop([proc])


@pytest.mark.async_timeout(60)
async def test_an_item_a_worker_process_fails_to_process_comes_back_to_it_first(tmp_path):
    async with netchan.Node(listen=["udp://127.0.0.1:0"]) as owner:
        chan = owner.channel("jobs", capacity=10)
        for i in range(5):
            await chan.send(i)
        await chan.close()
        proc = await start_worker(tmp_path, owner, "jobs", "fail-once", 1)
        try:
            out = await lines(proc, 8)
            assert out == [["ready"], ["failing", "0"], *[["done", str(i)] for i in range(5)], ["end"]]
            assert chan.statistics()["requeued"] == 1
        finally:
            await stop([proc])


@pytest.mark.async_timeout(60)
async def test_the_item_a_killed_worker_process_held_goes_to_the_next_worker(tmp_path):
    # a killed process sends nothing: its session is given up after the linger time
    async with netchan.Node(listen=["udp://127.0.0.1:0"], linger=2.0, keepalive=0.5) as owner:
        chan = owner.channel("jobs", capacity=10)
        for i in range(5):
            await chan.send(i)
        holder = await start_worker(tmp_path, owner, "jobs", "hold", 1)
        try:
            assert await lines(holder, 2) == [["ready"], ["holding", "0"]]
            assert chan.statistics()["in_process"] == 1
            holder.kill()  # SIGKILL, mid-item
            await holder.wait()
            await wait_for_condition(lambda: chan.statistics()["in_process"] == 0, timeout=20)
            assert chan.statistics()["buffered"] == 5 and chan.statistics()["requeued"] == 1
            await chan.close()
            worker = await start_worker(tmp_path, owner, "jobs", "plain", 2)
            try:
                out = await lines(worker, 7)
                # none lost: the held item is back at the head, in order
                assert out == [["ready"], *[["done", str(i)] for i in range(5)], ["end"]]
            finally:
                await stop([worker])
        finally:
            await stop([holder])


@pytest.mark.async_timeout(60)
async def test_close_drains_into_a_receiver_process_and_then_ends_it(tmp_path):
    async with netchan.Node(listen=["udp://127.0.0.1:0"]) as owner:
        chan = owner.channel("jobs", capacity=3)
        worker = await start_worker(tmp_path, owner, "jobs", "plain", 1)
        try:
            assert await lines(worker, 1) == [["ready"]]
            for i in range(20):
                await chan.send(i)  # waits while the channel holds three
            await chan.close()
            with pytest.raises(netchan.ClosedError):
                await chan.send("late")
            out = await lines(worker, 21)
            assert out == [*[["done", str(i)] for i in range(20)], ["end"]]
            assert (await asyncio.wait_for(worker.wait(), 20)) == 0
        finally:
            await stop([worker])

"""Channel semantics across processes: exact capacity with several sender
processes, and rendezvous (a remote send returns only after our receive)."""

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


async def start_sender(tmp_path, url, owner, name, count, tag):
    ident = netchan.Identity.generate()
    key = tmp_path / f"sender{tag}.key"
    ident.save(key)
    owner.allow(ident.node_id)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SENDER, str(key), url, owner.node_id, name, str(count), str(tag),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    return proc


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

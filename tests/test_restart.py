"""``netchan restart``: a node started by ``netchan run`` replaced by a new
process three times while a client streams through it, a work queue it owns
is fed and emptied, and another work queue runs over a pipeline through it:
every byte and every item arrives, and the listening ports never refuse a
connection."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

import netchan
from netchan.tools.chaos import TcpCutter
from netchan.tunnels import Tunnels

from .helpers import echo_connection, wait_for_condition
from .test_run import _echo_pipeline, _peer
from .test_tunnel_cli import _lines_until

pytestmark = pytest.mark.async_timeout(150)


def _restart(control):
    return subprocess.run([sys.executable, "-m", "netchan", "restart", "--control", control],
                          capture_output=True, text=True, timeout=60)


@contextlib.asynccontextmanager
async def _server(tmp_path, config_text):
    config = tmp_path / "server.toml"
    config.write_text(config_text)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "netchan", "run", str(config),
                                                "--log-level", "warning", stdout=asyncio.subprocess.PIPE)
    pids = {proc.pid}
    try:
        yield proc, pids
    finally:
        # every generation: the first is our child, the others its descendants
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        await _gone(pids)
        if proc.returncode is None:
            await proc.wait()


async def _stream_through(peer, port, until):
    """Send pieces of varied sizes through a tunnel to the echo server until
    ``until`` is set, reading them back: (sent digest, got digest, bytes back, bytes sent)."""
    stream = await Tunnels.of(peer.node).open(peer, "127.0.0.1", port)
    sent, got = hashlib.sha256(), hashlib.sha256()
    sizes = [1, 1000, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
    total = 0

    async def write():
        nonlocal total
        i = 0
        while not until.is_set() or i < len(sizes):
            piece = os.urandom(sizes[i % len(sizes)])
            await stream.send(piece)
            sent.update(piece)
            total += len(piece)
            i += 1
            await asyncio.sleep(0.005)
        await stream.send_eof()

    async def read():
        n = 0
        with contextlib.suppress(netchan.EndOfStream):
            while True:
                chunk = await stream.receive(1 << 20)
                got.update(chunk)
                n += len(chunk)
        return n

    writer = asyncio.ensure_future(write())
    n = await read()
    await writer
    await stream.aclose()
    return sent.hexdigest(), got.hexdigest(), n, total


async def _knock(port, refused, stop):
    """Open TCP connections to ``port`` until ``stop``; count those refused."""
    opened = 0
    while not stop.is_set():
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            opened += 1
            writer.close()
        except ConnectionRefusedError:
            refused.append(port)
        await asyncio.sleep(0.02)
    return opened


async def _work(worker, boss_id, url, items):
    """The worker takes jobs from the boss's queue, reached at ``url``, until cancelled."""
    peer = await worker.connect(url, boss_id, timeout=10)
    await _take(await peer.channel("jobs", direction="recv"), items)


async def _take(channel, items):
    """Every item of ``channel`` into ``items``, until cancelled."""
    while True:
        items.append(await channel.recv())


async def _feed(channel, key, until, sent):
    """``{key: n}`` for n = 0, 1, ... into ``channel`` (``sent`` too), one every 10 ms,
    until ``until`` is set and at least 50 went."""
    while not until.is_set() or len(sent) < 50:
        item = {key: len(sent)}
        await channel.send(item)
        sent.append(item)
        await asyncio.sleep(0.01)


async def test_three_restarts_under_load_lose_no_byte_no_item_and_refuse_no_connection(tmp_path):
    me, boss, worker_id, taker_id = (netchan.Identity.generate() for _ in range(4))
    netchan.Identity.generate().save(tmp_path / "server.key")
    server_id = netchan.Identity.load(tmp_path / "server.key").node_id
    echo = await asyncio.start_server(echo_connection, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    # a work queue at the boss; the worker reaches the boss through a pipeline of the server
    # (which crosses the gateway to the boss's tcp port)
    async with netchan.Node(boss, listen=["tcp://127.0.0.1:0"], allow=[worker_id.node_id]) as boss_node, \
            netchan.Node(listen=["udp://127.0.0.1:0"], allow=netchan.ANY) as gateway, \
            netchan.Node(me) as client, netchan.Node(worker_id) as worker, netchan.Node(taker_id) as taker:
        jobs = boss_node.channel("jobs", capacity=8)
        boss_port = int(boss_node.addresses[0].rsplit(":", 1)[1])
        Tunnels.of(gateway).allow_exit(f"127.0.0.1:{boss_port}")
        config = (f'identity = "server.key"\nlisten = ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"]\n'
                  f'allow = ["{me.node_id}", "{taker_id.node_id}"]\nexit = ["127.0.0.1:{echo_port}"]\n'
                  'drain_timeout = 120\n[[channel]]\nname = "work"\ncapacity = 8\n' + _peer("gateway", gateway) + _echo_pipeline("to-boss", ["gateway"], boss_port))
        async with _server(tmp_path, config) as (proc, pids):
            lines = await _lines_until(proc, r"^control socket ")
            udp = next(line.split()[2] for line in lines if line.startswith("listening on udp"))
            tcp_port = int(next(line for line in lines if line.startswith("listening on tcp")).rsplit(":", 1)[1])
            pipeline_port = int(re.search(r"pipeline to-boss: listen \S+ at \S+:(\d+)", "\n".join(lines)).group(1))
            control = re.search(r"^control socket (\S+)", lines[-1]).group(1)

            peer = await client.connect(udp, server_id, timeout=10)
            restarted = asyncio.Event()
            stream = asyncio.ensure_future(_stream_through(peer, echo_port, restarted))
            items: list = []
            work = asyncio.ensure_future(_work(worker, boss.node_id, f"tcp://127.0.0.1:{pipeline_port}", items))
            fed: list = []
            feeding = asyncio.ensure_future(_feed(jobs, "job", restarted, fed))
            # and a work queue the server owns: the client puts work in, the taker takes it out
            put = await peer.channel("work", direction="send")
            take = await (await taker.connect(udp, server_id, timeout=10)).channel("work", direction="recv")
            put_in: list = []
            taken: list = []
            putting = asyncio.ensure_future(_feed(put, "work", restarted, put_in))
            taking = asyncio.ensure_future(_take(take, taken))
            refused: list = []
            stop = asyncio.Event()
            knocks = [asyncio.ensure_future(_knock(port, refused, stop)) for port in (tcp_port, pipeline_port)]
            for generation in range(3):
                done = await asyncio.to_thread(_restart, control)
                assert done.returncode == 0, done.stderr
                pid = int(re.search(r"pid (\d+) took over", done.stdout).group(1))
                pids.add(pid)
                # a new session reaches the new process (its packets passed on by the old one)
                async with netchan.Node(me) as newcomer:
                    fresh = await newcomer.connect(udp, server_id, timeout=10, reconnect=False)
                    async with await fresh.open_stream("echo") as s:
                        await s.send(b"generation %d" % generation)
                        await s.send_eof()
                        assert await asyncio.wait_for(s.receive_exactly(12), 10) == b"generation %d" % generation
            restarted.set()
            sent, got, n, total = await asyncio.wait_for(stream, 60)
            assert n == total and got == sent and total > 3 << 20
            await asyncio.wait_for(feeding, 30)
            await wait_for_condition(lambda: len(items) >= len(fed), timeout=30)
            assert items == fed == [{"job": i} for i in range(len(fed))]
            await asyncio.wait_for(putting, 30)
            await wait_for_condition(lambda: len(taken) >= len(put_in), timeout=30)
            assert taken == put_in == [{"work": i} for i in range(len(put_in))]
            for task in (work, taking):
                task.cancel()
            await asyncio.gather(work, taking, return_exceptions=True)
            stop.set()
            opened = await asyncio.gather(*knocks)
            assert refused == [] and all(opened), (refused, opened)
            assert len(pids) == 4
            # the load over, each old process drains (the worker's connection through the
            # pipeline and the work queue's handles held the first one) and exits, oldest first
            await worker.aclose()
            await taker.aclose()
            await put.aclose()
            said = []
            for _ in range(3):
                said += await _lines_until(proc, r"pid \d+ drained", n_max=200, timeout=30)
            drained = [int(m.group(1)) for line in said if (m := re.match(r"pid (\d+) drained", line))]
            assert drained[0] == proc.pid and len(set(drained)) == 3, said
            # (its exit, not proc.wait(): that waits for stdout to close, which the
            # generations after it share)
            await wait_for_condition(lambda: proc.returncode is not None, timeout=10)
            assert proc.returncode == 0
            # the client's session, idle, was closed by the old processes and redialed to the last one
            async with await peer.open_stream("echo") as s:
                await s.send(b"still here")
                await s.send_eof()
                assert await asyncio.wait_for(s.receive_exactly(10), 10) == b"still here"
    echo.close()
    await echo.wait_closed()


_ACTIVATE = """import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_PID"], os.environ["LISTEN_FDS"] = str(os.getpid()), "1"
os.execv(sys.executable, [sys.executable, "-m", "netchan", "run", sys.argv[2], "--log-level", "warning"])
"""


async def test_under_systemd_sockets_are_activated_and_readiness_follows_the_restart(tmp_path):
    netchan.Identity.generate().save(tmp_path / "server.key")
    server_id = netchan.Identity.load(tmp_path / "server.key").node_id
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    config = tmp_path / "server.toml"
    config.write_text(f'identity = "server.key"\nlisten = ["udp://127.0.0.1:{port}"]\nallow = ["any"]\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ACTIVATE, str(udp.fileno()), str(config), pass_fds=[udp.fileno()],
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}, stdout=asyncio.subprocess.PIPE)
    udp.close()  # the node has it now (as fd 3), bound before it started
    pids = {proc.pid}
    loop = asyncio.get_running_loop()
    try:
        lines = await _lines_until(proc, r"^control socket ")
        assert f"listening on udp://127.0.0.1:{port}" in lines
        assert await asyncio.wait_for(loop.sock_recv(notify, 4096), 10) == b"READY=1"
        async with netchan.Node() as client:
            peer = await client.connect(f"udp://127.0.0.1:{port}", server_id, timeout=10)
            control = re.search(r"^control socket (\S+)", lines[-1]).group(1)
            done = await asyncio.to_thread(_restart, control)
            assert done.returncode == 0, done.stderr
            pid = int(re.search(r"pid (\d+) took over", done.stdout).group(1))
            pids.add(pid)
            said = await asyncio.wait_for(loop.sock_recv(notify, 4096), 10)
            assert said == f"MAINPID={pid}\nREADY=1".encode()
            async with await peer.open_stream("echo") as s:  # the session goes on, wherever it is
                await s.send(b"ping")
                await s.send_eof()
                assert await asyncio.wait_for(s.receive_exactly(4), 10) == b"ping"
    finally:
        notify.close()
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 20)
        await _gone(pids - {proc.pid})


async def _gone(pids, timeout=10.0):
    """Wait until none of ``pids`` runs (SIGKILL after ``timeout``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    for pid in pids:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if asyncio.get_running_loop().time() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            await asyncio.sleep(0.05)


async def test_a_restart_after_the_config_moved_a_pipeline_listens_where_it_says_now(tmp_path):
    netchan.Identity.generate().save(tmp_path / "server.key")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    async with netchan.Node(listen=["udp://127.0.0.1:0"], allow=netchan.ANY) as gateway:
        def config(port):
            return ('identity = "server.key"\n' + _peer("gateway", gateway)
                    + _echo_pipeline("web", ["gateway"], 9).replace("127.0.0.1:0", f"127.0.0.1:{port}"))

        async with _server(tmp_path, config(ports[0])) as (proc, pids):
            lines = await _lines_until(proc, r"^control socket ")
            assert f"pipeline web: listen 127.0.0.1:{ports[0]} at 127.0.0.1:{ports[0]}" in "\n".join(lines)
            control = re.search(r"^control socket (\S+)", lines[-1]).group(1)
            (tmp_path / "server.toml").write_text(config(ports[1]))
            done = await asyncio.to_thread(_restart, control)
            assert done.returncode == 0, done.stderr
            pids.add(int(re.search(r"pid (\d+) took over", done.stdout).group(1)))
            lines = await _lines_until(proc, r"^pipeline web: ")
            assert lines[-1].startswith(f"pipeline web: listen 127.0.0.1:{ports[1]} at 127.0.0.1:{ports[1]}"), lines
            # the old port is let go once the old process has drained (nothing held it)
            await _lines_until(proc, r"drained")
            await wait_for_condition(lambda: proc.returncode is not None, timeout=10)
            with socket.socket() as s:
                s.bind(("127.0.0.1", ports[0]))


async def test_if_the_new_process_dies_the_old_one_takes_udp_sessions_again(tmp_path):
    netchan.Identity.generate().save(tmp_path / "server.key")
    server_id = netchan.Identity.load(tmp_path / "server.key").node_id
    async with _server(tmp_path, 'identity = "server.key"\nlisten = ["udp://127.0.0.1:0"]\nallow = ["any"]\n'
                       ) as (proc, pids):
        lines = await _lines_until(proc, r"^control socket ")
        udp = next(line.split()[2] for line in lines if line.startswith("listening on udp"))
        control = re.search(r"^control socket (\S+)", lines[-1]).group(1)
        async with netchan.Node() as client:
            held = await client.connect(udp, server_id, timeout=10)
            stream = await held.open_stream("echo")  # keeps the old process draining
            done = await asyncio.to_thread(_restart, control)
            assert done.returncode == 0, done.stderr
            pid = int(re.search(r"pid (\d+) took over", done.stdout).group(1))
            pids.add(pid)
            os.kill(pid, signal.SIGKILL)
            await _lines_until(proc, rf"^pid {pid} ended; pid {proc.pid} goes on")
            async with netchan.Node() as newcomer:
                fresh = await newcomer.connect(udp, server_id, timeout=10, reconnect=False)
                async with await fresh.open_stream("echo") as s:
                    await s.send(b"old one")
                    await s.send_eof()
                    assert await asyncio.wait_for(s.receive_exactly(7), 10) == b"old one"
            await stream.send(b"held")
            assert await asyncio.wait_for(stream.receive_exactly(4), 10) == b"held"
            await stream.aclose()


@pytest.mark.parametrize("engine", ["qh3", "aioquic"])
@pytest.mark.parametrize("cuts", ["after each restart", "every 0.4 s"])
async def test_a_tcp_carrier_cut_while_its_session_drains_is_given_back_to_the_old_process(tmp_path, engine, cuts):
    """The redial of a cut tcp carrier connection reaches the newest process,
    which does not have the session: it gives the connection back, down a
    chain of two draining processes, and the session goes on."""
    me = netchan.Identity.generate()
    netchan.Identity.generate().save(tmp_path / "server.key")
    server_id = netchan.Identity.load(tmp_path / "server.key").node_id
    echo = await asyncio.start_server(echo_connection, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    config = (f'identity = "server.key"\nlisten = ["tcp://127.0.0.1:0"]\nallow = ["{me.node_id}"]\n'
              f'exit = ["127.0.0.1:{echo_port}"]\nengine = "{engine}"\ndrain_timeout = 60\n')
    async with _server(tmp_path, config) as (proc, pids), netchan.Node(me, engine=engine) as client:
        lines = await _lines_until(proc, r"^control socket ")
        tcp_port = int(next(line for line in lines if line.startswith("listening on tcp")).rsplit(":", 1)[1])
        control = re.search(r"^control socket (\S+)", lines[-1]).group(1)
        async with TcpCutter(("127.0.0.1", tcp_port), cut_every=0.4 if cuts.startswith("every") else None,
                             seed=7) as cutter:
            peer = await client.connect(cutter.url, server_id, timeout=10)
            finished = asyncio.Event()
            stream = asyncio.ensure_future(_stream_through(peer, echo_port, finished))
            for _ in range(2):
                done = await asyncio.to_thread(_restart, control)
                assert done.returncode == 0, done.stderr
                pids.add(int(re.search(r"pid (\d+) took over", done.stdout).group(1)))
                # from now on the old process accepts nothing: a redial reaches the new one
                before = cutter.connections
                if cutter.cut_every is None:
                    assert cutter.cut() == 1
                await wait_for_condition(lambda: cutter.connections > before, timeout=10)
                async with await peer.open_stream("echo") as s:  # the session answers, where it lives
                    await s.send(b"still one session")
                    await s.send_eof()
                    assert await asyncio.wait_for(s.receive_exactly(17), 15) == b"still one session"
            assert client.counters.sessions == 1 and client.counters.redials == 0
            finished.set()
            sent, got, n, total = await asyncio.wait_for(stream, 60)
            assert n == total and got == sent and total > 1 << 20
            assert cutter.cuts >= 2
    echo.close()
    await echo.wait_closed()


@pytest.mark.parametrize("sender", ["leaves before the restart ends", "stays with the old process"])
async def test_items_waiting_in_an_owned_channel_move_to_the_new_process(tmp_path, sender):
    """Items buffered at the old process that nobody there can take any more
    are handed to the new one, ahead of its own, once each, in order."""
    me, taker_id = netchan.Identity.generate(), netchan.Identity.generate()
    netchan.Identity.generate().save(tmp_path / "server.key")
    server_id = netchan.Identity.load(tmp_path / "server.key").node_id
    config = (f'identity = "server.key"\nlisten = ["udp://127.0.0.1:0"]\n'
              f'allow = ["{me.node_id}", "{taker_id.node_id}"]\ndrain_timeout = 60\n'
              '[[channel]]\nname = "work"\ncapacity = 64\n')
    async with _server(tmp_path, config) as (proc, pids), netchan.Node(me) as client, \
            netchan.Node(taker_id) as taker:
        lines = await _lines_until(proc, r"^control socket ")
        udp = next(line.split()[2] for line in lines if line.startswith("listening on udp"))
        control = re.search(r"^control socket (\S+)", lines[-1]).group(1)
        peer = await client.connect(udp, server_id, timeout=10)
        put = await peer.channel("work", direction="send")
        for i in range(30):
            await put.send({"n": i, "pad": "x" * (i * 1000)})
        done = await asyncio.to_thread(_restart, control)
        assert done.returncode == 0, done.stderr
        pids.add(int(re.search(r"pid (\d+) took over", done.stdout).group(1)))
        if sender.startswith("leaves"):
            await put.aclose()  # its session idle, the old process closes it and has nothing left
            await _lines_until(proc, rf"^pid {proc.pid} drained", timeout=20)
        # the taker's session reaches the new process, which has the 30 items
        take = await (await taker.connect(udp, server_id, timeout=10)).channel("work", direction="recv")
        got = [await asyncio.wait_for(take.recv(), 10) for _ in range(30)]
        assert [item["n"] for item in got] == list(range(30))
        if not sender.startswith("leaves"):
            for i in range(30, 40):  # into the old process still: handed over as they come
                await put.send({"n": i, "pad": ""})
            got = [await asyncio.wait_for(take.recv(), 10) for _ in range(10)]
            assert [item["n"] for item in got] == list(range(30, 40))
            await put.aclose()
            await _lines_until(proc, rf"^pid {proc.pid} drained", timeout=20)
        # the sender comes back (to the new process): nothing is sent twice
        put = await peer.channel("work", direction="send")
        await put.send({"n": 99, "pad": ""})
        assert (await asyncio.wait_for(take.recv(), 10))["n"] == 99
        await put.aclose()
        await take.aclose()


async def test_items_go_over_the_link_in_messages_the_kernel_takes_and_a_too_large_one_stays():
    from netchan.ops.restart import Link

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old, new = Link(a), Link(b)
    try:
        assert 0 < old.message_max <= 512 << 10  # within what this kernel lets one message be
        old.message_max = 1000  # as a kernel with a small net.core.wmem_max would
        items = [("o", i, bytes([i]) * 300) for i in range(10)] + [("o", 10, b"x" * 2000), ("o", 11, b"y")]
        sent = await old.send_items("work", items, {"o": 11})
        assert sent == 10  # the large one (and what follows it) stays with the old process
        got = []
        while len(got) < 10:
            kind, (channel, chunk, accepted) = await asyncio.wait_for(new.receive(), 5)
            assert kind == "items" and channel == "work" and sum(len(d) for _, _, d in chunk) <= 1000
            got += [tuple(i) for i in chunk]
        assert got == items[:10]
    finally:
        old.close()
        new.close()

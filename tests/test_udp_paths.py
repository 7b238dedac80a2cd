"""A UDP peer may change address (NAT rebinding); forged packets move nothing."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

import netchan

from .helpers import echo


class UdpRelay:
    """Forwards client <-> server datagrams; can change its source port
    towards the server, and can replay client packets from a third socket."""

    def __init__(self, server_addr):
        self.server_addr = server_addr
        self.loop = asyncio.get_running_loop()
        self.front = self._sock()
        self.front.bind(("127.0.0.1", 0))
        self.client_addr = None
        self.back = self._sock()
        self.attacker = self._sock()
        self.replay = False
        self.replayed = 0
        self.loop.add_reader(self.front.fileno(), self._from_client)
        self.loop.add_reader(self.back.fileno(), self._from_server, self.back)
        self.loop.add_reader(self.attacker.fileno(), self._attacker_heard)
        self.attacker_heard = 0

    @staticmethod
    def _sock():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        return s

    @property
    def url(self):
        return "udp://127.0.0.1:%d" % self.front.getsockname()[1]

    def _from_client(self):
        while True:
            try:
                data, self.client_addr = self.front.recvfrom(65535)
            except BlockingIOError:
                return
            self.back.sendto(data, self.server_addr)
            if self.replay:  # an off-path attacker replays what it saw
                self.attacker.sendto(data, self.server_addr)
                self.replayed += 1

    def _from_server(self, sock):
        while True:
            try:
                data, _ = sock.recvfrom(65535)
            except BlockingIOError:
                return
            if self.client_addr is not None:
                self.front.sendto(data, self.client_addr)

    def _attacker_heard(self):
        while True:
            try:
                self.attacker.recvfrom(65535)
            except BlockingIOError:
                return
            self.attacker_heard += 1

    def rebind(self):
        """New source port towards the server, like a NAT that forgot us."""
        self.loop.remove_reader(self.back.fileno())
        self.back.close()
        self.back = self._sock()
        self.loop.add_reader(self.back.fileno(), self._from_server, self.back)

    def close(self):
        for s in (self.front, self.back, self.attacker):
            self.loop.remove_reader(s.fileno())
            s.close()


async def _roundtrip(stream, msg):
    await stream.send(msg)
    got = b""
    while len(got) < len(msg):
        got += await asyncio.wait_for(stream.receive(), 10)
    return got


@contextlib.asynccontextmanager
async def relayed_echo(ids, engine):
    """A server with an echo service, a client, and a UdpRelay between them."""
    server_id, client_id = ids
    async with netchan.Node(server_id, ["udp://127.0.0.1:0"], allow=[client_id.node_id],
                            engine=engine) as server:
        server.serve("echo", echo)
        port = int(server.addresses[0].rsplit(":", 1)[1])
        relay = UdpRelay(("127.0.0.1", port))
        try:
            async with netchan.Node(client_id, engine=engine) as client:
                peer = await client.connect(relay.url, node_id=server.node_id)
                yield relay, peer, await peer.open_stream("echo")
        finally:
            relay.close()


async def test_client_address_change_keeps_the_session(ids, engine):
    async with relayed_echo(ids, engine) as (relay, peer, stream):
        assert await _roundtrip(stream, b"before") == b"before"
        relay.rebind()
        assert await _roundtrip(stream, b"after the rebinding") == b"after the rebinding"
        assert not peer.closed and peer.reconnects == 0  # the same session throughout


async def test_replayed_packets_from_elsewhere_do_not_redirect_replies(ids, engine):
    async with relayed_echo(ids, engine) as (relay, peer, stream):
        relay.replay = True
        for i in range(20):
            msg = b"round %d" % i
            assert await _roundtrip(stream, msg) == msg
        assert relay.replayed > 20
        assert relay.attacker_heard == 0  # no reply ever went to the replayer


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("late", [0.2, 1.2])
def test_a_dial_started_before_the_server_listens_connects_once_it_does(loop, late):
    # the first Initial meets a closed port (ICMP port unreachable on the connected
    # socket): under uvloop that error once stopped the socket being watched at all
    runner = pytest.importorskip("uvloop").run if loop == "uvloop" else asyncio.run
    ident = netchan.Identity.generate()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        url = f"udp://127.0.0.1:{s.getsockname()[1]}"

    async def main():
        async with netchan.Node() as client:
            dial = asyncio.ensure_future(client.connect(url, ident.node_id, timeout=15))
            await asyncio.sleep(late)
            async with netchan.Node(ident, listen=[url], allow=netchan.ANY):
                peer = await asyncio.wait_for(dial, 15)
                async with await peer.open_stream("netchan.ping") as stream:
                    await stream.send(b"x" * 16)
                    assert await asyncio.wait_for(stream.receive_exactly(16), 5) == b"x" * 16

    runner(asyncio.wait_for(main(), 30))

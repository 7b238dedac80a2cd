"""A tcp carrier connection accepted by one listener and given up
(PacketPath.surrender) goes on at another listener on the same socket
(Listener.adopt), as a restarted node's new process gives a redial back to
the old one: nothing read before is lost, nothing is read twice, and the
dialer sees no break."""

from __future__ import annotations

import asyncio
import os

import pytest

from netchan.carriers import get_carrier, parse_url, tcp

from .helpers import wait_for_condition


class Echo:
    """The old listener's sink: confirms each batch and sends it back."""

    def __init__(self):
        self.packets = []

    def packets_received(self, packets, path):
        path.confirm()
        self.packets += packets
        path.send_packets(packets)

    def path_writable(self, path):
        pass


class GiveUp:
    """The new listener's sink: gives every connection to ``other``."""

    def __init__(self, other):
        self.other = other
        self.given = 0

    def packets_received(self, packets, path):
        url, sock, data = path.surrender()
        assert url == self.other.url
        self.given += 1
        self.other.adopt(sock, data)

    def path_writable(self, path):
        pass


class Collect:
    def __init__(self):
        self.packets = []

    def packets_received(self, packets, path):
        self.packets += packets

    def path_writable(self, path):
        pass


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("size", [1, 1000, 60000])
@pytest.mark.parametrize("count", [1, 7])
def test_a_connection_given_up_by_one_listener_goes_on_at_another_on_the_same_socket(loop, size, count):
    runner = pytest.importorskip("uvloop").run if loop == "uvloop" else asyncio.run

    async def main():
        carrier = get_carrier("tcp")
        echo = Echo()
        old = await carrier.listen(parse_url("tcp://127.0.0.1:0"), echo)
        giver = GiveUp(old)
        new = await carrier.listen(parse_url(f"{old.url}?fd={os.dup(old.handover())}"), giver)
        old.stop_accepting()  # from now on the new listener accepts
        back = Collect()
        path = await carrier.dial(parse_url(old.url), back)
        try:
            await wait_for_condition(lambda: path.writable, timeout=5)
            # each packet a different size around ``size`` (reads end mid-frame)
            first = [bytes([i]) * max(1, size - i) for i in range(count)]
            path.send_packets(first)
            await wait_for_condition(lambda: len(back.packets) >= count, timeout=10)
            assert back.packets == first and echo.packets == first and giver.given == 1
            more = [os.urandom(size) for _ in range(count)]
            path.send_packets(more)
            await wait_for_condition(lambda: len(back.packets) >= 2 * count, timeout=10)
            assert back.packets == first + more
            assert path.connects == 1  # the dialer never saw a break
        finally:
            path.close()
            await path.wait_closed()
            await new.aclose()
            await old.aclose()

    runner(asyncio.wait_for(main(), 30))


def test_a_proven_connection_is_not_given_up():
    async def main():
        carrier = get_carrier("tcp")
        refused = []

        class Keep:
            def packets_received(self, packets, path):
                path.confirm()  # a session here claimed it
                refused.append(path.surrender())

            def path_writable(self, path):
                pass

        listener = await carrier.listen(parse_url("tcp://127.0.0.1:0"), Keep())
        path = await carrier.dial(parse_url(listener.url), Collect())
        try:
            await wait_for_condition(lambda: path.writable, timeout=5)
            path.send_packets([b"x"])
            await wait_for_condition(lambda: refused, timeout=5)
            assert refused == [None]
        finally:
            path.close()
            await path.wait_closed()
            await listener.aclose()

    asyncio.run(asyncio.wait_for(main(), 20))


@pytest.mark.parametrize("inherited", [False, True])
def test_unproven_connections_keep_their_bytes_only_while_they_may_be_given_up(inherited):
    async def main():
        carrier = get_carrier("tcp")
        first = await carrier.listen(parse_url("tcp://127.0.0.1:0"), Collect())
        listener = first
        if inherited:  # a restart's new process: it may have to give redials back
            listener = await carrier.listen(parse_url(f"{first.url}?fd={os.dup(first.handover())}"), Collect())
            first.stop_accepting()
        try:
            _, writer = await asyncio.open_connection(*listener.url.removeprefix("tcp://").rsplit(":", 1))
            writer.write(tcp.MAGIC + bytes(16) + b"".join(tcp._frame([b"p" * 1000] * 5)))
            await wait_for_condition(lambda: listener._conns, timeout=5)
            conn = next(iter(listener._conns))
            await wait_for_condition(lambda: conn.path is not None, timeout=5)
            kept = conn._kept
            assert (kept is not None and len(kept) > 1000) if inherited else kept is None
            listener.keep_unproven(False)  # the predecessor is done: nothing kept from now on
            _, writer2 = await asyncio.open_connection(*listener.url.removeprefix("tcp://").rsplit(":", 1))
            writer2.write(tcp.MAGIC + bytes(16))
            await wait_for_condition(lambda: len(listener._conns) == 2, timeout=5)
            assert [c for c in listener._conns if c is not conn][0]._kept is None
            writer.close()
            writer2.close()
        finally:
            await listener.aclose()
            if listener is not first:
                await first.aclose()

    asyncio.run(asyncio.wait_for(main(), 20))

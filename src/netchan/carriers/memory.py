"""The memory carrier: packets between nodes of one process, with faults on demand.

``memory://NAME`` listens under a name; dialing it links the two ends.  Faults
apply to every packet of the listener's links, in both directions, and can be
set in the URL (``memory://srv?loss=5%&delay=0.01``) or changed while running
through :func:`faults`::

    f = netchan.carriers.memory.faults("srv")
    f.cut = True          # every packet dropped until f.cut = False
    f.loss = 0.2

Randomness comes from a seeded generator (``seed=`` in the URL), so a failing
test replays the same drops.
"""

from __future__ import annotations

import asyncio

from ..errors import ConfigurationError
from .base import Carrier, CarrierURL, Listener, PacketPath, PacketSink, register_carrier
from .faults import Faults as _Faults

__all__ = ["MemoryCarrier", "Faults", "faults", "DEFAULT_PACKET_SIZE"]

DEFAULT_PACKET_SIZE = 1350


class Faults(_Faults):
    """What the memory network does to packets (see :class:`netchan.carriers.faults.Faults`)."""

    @classmethod
    def from_url(cls, url: CarrierURL) -> Faults:
        seed = url.params.get("seed")
        return cls(
            loss=url.number("loss", 0.0),
            delay=url.number("delay", 0.0),
            jitter=url.number("jitter", 0.0),
            duplicate=url.number("duplicate", 0.0),
            reorder=url.number("reorder", 0.0),
            seed=int(seed) if seed is not None else None,
        )

    def transmit(self, packets: list[bytes], sink: PacketSink, path: PacketPath) -> None:
        """Send ``packets`` to ``sink`` as arriving on ``path``, applying the faults."""
        loop = asyncio.get_running_loop()
        if self.clean:
            self.delivered += len(packets)
            loop.call_soon(_deliver, sink, list(packets), path)
            return
        now_batch: list[bytes] = []
        for delay, p in self.plan(packets):
            if delay <= 0:
                now_batch.append(p)
            else:
                loop.call_later(delay, _deliver, sink, [p], path)
        if now_batch:
            loop.call_soon(_deliver, sink, now_batch, path)


def _deliver(sink: PacketSink, packets: list[bytes], path: PacketPath) -> None:
    if not getattr(path, "closed", False):
        sink.packets_received(packets, path)


_LISTENERS: dict[str, _MemoryListener] = {}


def faults(name: str) -> Faults:
    """The live fault settings of the memory listener called ``name``."""
    try:
        return _LISTENERS[name].faults
    except KeyError:
        raise ConfigurationError(f"no memory listener named {name!r}") from None


class _MemoryPath(PacketPath):
    def __init__(self, label: str, packet_size: int, net: Faults) -> None:
        self.label = label
        self.packet_size = packet_size
        self._faults = net
        self.closed = False
        self.peer: _MemoryPath | None = None  # the path at the other end
        self.peer_sink: PacketSink | None = None

    def send_packets(self, packets: list[bytes]) -> None:
        if self.closed or self.peer is None or self.peer.closed or self.peer_sink is None:
            self.packets_dropped += len(packets)
            return
        self._faults.transmit(packets, self.peer_sink, self.peer)

    def close(self) -> None:
        self.closed = True


class _MemoryListener(Listener):
    def __init__(self, name: str, sink: PacketSink, packet_size: int, net: Faults) -> None:
        self.name = name
        self.url = f"memory://{name}"
        self.sink = sink
        self.packet_size = packet_size
        self.faults = net
        self.links = 0
        self.paths: list[_MemoryPath] = []

    async def aclose(self) -> None:
        if _LISTENERS.get(self.name) is self:
            del _LISTENERS[self.name]
        for path in self.paths:
            path.close()


class MemoryCarrier(Carrier):
    scheme = "memory"

    async def listen(self, url: CarrierURL, sink: PacketSink) -> Listener:
        name = url.host
        if not name:
            raise ConfigurationError("a memory listener needs a name: memory://NAME")
        if name in _LISTENERS:
            raise ConfigurationError(f"memory listener {name!r} already exists")
        listener = _MemoryListener(
            name, sink, int(url.number("packet_size", DEFAULT_PACKET_SIZE)), Faults.from_url(url)
        )
        _LISTENERS[name] = listener
        return listener

    async def dial(self, url: CarrierURL, sink: PacketSink) -> PacketPath:
        listener = _LISTENERS.get(url.host)
        if listener is None:
            raise ConnectionRefusedError(111, f"no memory listener named {url.host!r}")
        net = listener.faults
        if any(k in url.params for k in ("loss", "delay", "jitter", "duplicate", "reorder", "seed")):
            net = Faults.from_url(url)  # the dialer asked for its own faults
        listener.links += 1
        size = int(url.number("packet_size", listener.packet_size))
        client = _MemoryPath(f"memory {url.host}", size, net)
        server = _MemoryPath(f"memory {url.host}#{listener.links}", size, net)
        client.peer, client.peer_sink = server, listener.sink
        server.peer, server.peer_sink = client, sink
        listener.paths = [p for p in listener.paths if not p.peer or not p.peer.closed]
        listener.paths.append(server)
        return client


register_carrier(MemoryCarrier())

"""The coordinator service: members join with an invitation, are known by
their key from then on, and are introduced to each other on request; the
coordinator then relays their session's packets (which it cannot read) on
a circuit that only that pair may use, within a rate per member.

A revoked member is refused at once (NotAllowed at the session's
authentication) and its sessions end.  A key the directory does not know is
admitted only to join: anything else it asks is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import NetchanError, ProtocolError
from ..identity import check_node_id
from ..logs import RateLimited
from ..node.service import ServiceStream, read_message, send_message
from .protocol import (
    ELSEWHERE,
    MAX_MESSAGE,
    NOT_ALLOWED,
    NOT_MEMBER,
    OFFLINE,
    RELAY_FRAME,
    RELAY_HEADER,
    RELAY_OVERHEAD,
    REVOKED,
    SERVICE,
    UNKNOWN_PEER,
    CoordinatorError,
    Forget,
    Hello,
    Introduce,
    Introduced,
    Join,
    Punched,
    Refused,
    Welcome,
    decoder,
)
from .store import Member, Store

if TYPE_CHECKING:
    from ..node.node import Node, Peer

__all__ = ["Coordinator", "RelayCounters"]

log = logging.getLogger("netchan.coordinator")
#: protocol breaks, by peer, at a bounded rate
broken = RateLimited(log)

#: the largest QUIC packet a relay circuit carries (a datagram-sized one)
RELAY_PACKET_SIZE = 1350
#: how long the asker's answer waits for the other member to open its NAT
PUNCH_WAIT = 1.0
#: how long a member counts as online here in a shared directory unless said
#: again (every third of it), and how often revocations made elsewhere are read
PRESENCE_TTL = 15.0


@dataclass
class RelayCounters:
    """What the relay moved and refused."""

    packets: int = 0
    bytes: int = 0
    no_circuit: int = 0  # datagrams on a circuit that is not the sender's
    over_rate: int = 0  # dropped: the sender went over its rate
    over_budget: int = 0  # dropped: the sender used up its bytes for the hour
    undeliverable: int = 0  # the other member is away, or the datagram did not fit


class _Bucket:
    """A token bucket of bytes: ``rate`` per second, up to ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.at = time.monotonic()

    def take(self, n: int) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


@dataclass
class _Online:
    """A member with its control stream open."""

    member: Member
    peer: Peer
    stream: ServiceStream
    candidates: list[str]
    bucket: _Bucket
    budget: _Bucket | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    order: asyncio.Lock = field(default_factory=asyncio.Lock)  # one introduction at a time
    circuits: set[int] = field(default_factory=set)
    #: the udp address we see it at ("" if it came another way)
    seen: str = ""

    async def send(self, message: Introduced | Forget | Refused | Welcome) -> None:
        async with self.lock:
            await send_message(self.stream, message)


@dataclass
class _Circuit:
    src: str
    dst: str
    out: int  # the number the other member knows this circuit by
    packets: int = 0
    bytes: int = 0


def refusal(exc: CoordinatorError) -> Refused:
    """What a member is told of a refusal (with where to ask instead, if anywhere)."""
    there, addresses = exc.elsewhere or ("", [])
    return Refused(exc.refusal, str(exc), there, addresses)


def seen_url(label: str) -> str:
    """The udp URL of a path label such as ``udp 1.2.3.4:5678`` (where a
    member's packets come from); "" for a path of another kind."""
    if not label.startswith("udp "):
        return ""
    host, _, port = label[4:].partition(" ")[0].rpartition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return f"udp://[{address}]:{port}" if address.version == 6 else f"udp://{address}:{port}"


class Coordinator:
    """Make ``node`` a coordinator with the directory in ``store``.

    ``relay_rate`` (bytes per second, with bursts of ``relay_burst``) bounds
    what each member may send through the relay, and ``relay_budget`` (bytes
    an hour, None: no bound) how much.  Use as
    ``async with Coordinator(node, store):`` (or ``await start()`` and
    ``await aclose()``).
    """

    def __init__(self, node: Node, store: Store, *, relay_rate: float = 64 << 20,
                 relay_burst: float = 16 << 20, relay_budget: float | None = None) -> None:
        self.node, self.store = node, store
        self.relay_rate, self.relay_burst, self.relay_budget = relay_rate, relay_burst, relay_budget
        self.counters = RelayCounters()
        self._revoked: set[str] = set()
        self._online: dict[str, _Online] = {}
        self._circuits: dict[int, _Circuit] = {}
        #: introductions waiting for the member asked of to say Punched, by circuit
        self._punching: dict[int, asyncio.Future[None]] = {}
        self._remove_gate = lambda: None
        self._refresher: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> Coordinator:
        await self.store.open()
        self._revoked = {m.node_id for m in await self.store.members() if m.revoked}
        self._remove_gate = self.node.add_gate(self._gate)
        self.node.serve(SERVICE, self._serve)
        self.node.add_frame_handler(RELAY_FRAME, self._relay)
        self._refresher = self.node.spawn(self._refresh(), "coordinator presence")
        self._listener = self.node.spawn(self._hear_revocations(), "revocations elsewhere")
        return self

    async def _hear_revocations(self) -> None:
        """Revocations made at other coordinators of a shared directory, at once
        (the periodic reading in _refresh catches any this misses)."""
        try:
            async for node_id in self.store.revocations():
                if node_id not in self._revoked:
                    await self.revoke(node_id)
        except Exception as exc:  # a store that went away: _refresh goes on reading
            log.warning("coordinator store: revocations: %s", exc)

    async def _refresh(self) -> None:
        """Keep our members online in the directory, and take revocations
        made by other coordinators of it."""
        while True:
            await asyncio.sleep(PRESENCE_TTL / 3)
            try:
                for online in list(self._online.values()):
                    await self.store.set_online(online.member.node_id, self.node.node_id, self.node.addresses,
                                                PRESENCE_TTL)
                revoked = {m.node_id for m in await self.store.members() if m.revoked}
            except Exception as exc:  # a store that is away for a while: try again next time
                log.warning("coordinator store: %s", exc)
                continue
            for node_id in revoked - self._revoked:
                await self.revoke(node_id)

    async def aclose(self) -> None:
        for task in (self._refresher, self._listener):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._remove_gate()
        for online in list(self._online.values()):
            online.stream.abort()
        self._online.clear()
        self._circuits.clear()
        await self.store.aclose()

    async def __aenter__(self) -> Coordinator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def online(self) -> list[Member]:
        """Members with their control stream open now."""
        return [o.member for o in self._online.values()]

    def circuit_counters(self, a: str, b: str) -> tuple[int, int]:
        """(packets, bytes) relayed from member ``a`` to member ``b``."""
        found = [c for c in self._circuits.values() if c.src == a and c.dst == b]
        return sum(c.packets for c in found), sum(c.bytes for c in found)

    async def revoke(self, who: str) -> Member | None:
        """Revoke a member (by node id or name) at once: refused from now on,
        its sessions and circuits ended."""
        member = await self.store.revoke(who)
        if member is None:
            return None
        self._revoked.add(member.node_id)
        online = self._online.pop(member.node_id, None)
        if online is not None:
            self._drop_circuits(online)
        for peer in self.node.peers:
            if peer.node_id == member.node_id:
                await peer.aclose()  # and the gate refuses it when it dials again
        # and the members it met end their sessions with it (direct ones too)
        for other in list(self._online.values()):
            with contextlib.suppress(NetchanError):
                await other.send(Forget(member.node_id, "revoked"))
        log.info("revoked %s (%s)", member.name, member.node_id)
        return member

    # -- admission and the control stream ---------------------------------------------

    def _gate(self, node_id: str) -> bool:
        # every key may come to join; a revoked one is refused at once
        return node_id not in self._revoked

    async def _serve(self, stream: ServiceStream, peer: Peer) -> None:
        online: _Online | None = None
        try:
            first = await read_message(stream, decoder, MAX_MESSAGE)
            member = await self._admit(first, peer)
            online = _Online(member, peer, stream, list(getattr(first, "candidates", [])),
                             _Bucket(self.relay_rate, self.relay_burst),
                             _Bucket(self.relay_budget / 3600, self.relay_budget) if self.relay_budget else None)
            old = self._online.get(member.node_id)
            if old is not None:  # the member came back on a new stream: the old one is over
                self._drop_circuits(old)
                old.stream.abort()
            self._online[member.node_id] = online
            await self.store.set_online(member.node_id, self.node.node_id, self.node.addresses, PRESENCE_TTL)
            online.seen = seen_url(peer.path) if getattr(first, "listening", False) else ""
            await self.store.seen(member.node_id, seen_url(peer.path) or peer.path)
            await online.send(Welcome(member.name, online.seen))
            log.info("member %s (%s) online at %s", member.name, member.node_id, peer.path)
            while True:
                request = await read_message(stream, decoder, MAX_MESSAGE)
                if isinstance(request, Punched):
                    circuit = self._circuits.get(request.circuit)
                    waiting = self._punching.get(request.circuit)
                    if circuit is not None and circuit.src == member.node_id and waiting is not None:
                        if not waiting.done():
                            waiting.set_result(None)
                    continue
                if not isinstance(request, Introduce):
                    raise ProtocolError(f"a member sends Introduce or Punched here, not {type(request).__name__}")
                # each in its own task: an answer that waits for the other
                # member does not hold up this member's Punched messages
                self.node.spawn(self._introduce_in_turn(online, request), "introduction")
        except CoordinatorError as exc:
            log.info("refused %s: %s", peer.node_id, exc)
            try:
                await send_message(stream, refusal(exc))
                await stream.aclose()
            except NetchanError:
                pass
        except ProtocolError as exc:
            broken.warning(("coordinator", peer.node_id), "coordinator stream from %s: %s", peer.node_id, exc)
            stream.abort()
        except NetchanError:
            pass  # the member went away
        finally:
            if online is not None and self._online.get(online.member.node_id) is online:
                del self._online[online.member.node_id]
                self._drop_circuits(online)
                with contextlib.suppress(Exception):  # the store may be gone (closing)
                    await self.store.set_offline(online.member.node_id, self.node.node_id)
                log.info("member %s (%s) offline", online.member.name, online.member.node_id)

    async def _admit(self, first: object, peer: Peer) -> Member:
        if isinstance(first, Join):
            member = await self.store.redeem(first.invitation, first.secret, peer.node_id, first.name)
            log.info("%s joined as %s", peer.node_id, member.name)
            return member
        if isinstance(first, Hello):
            known = await self.store.member(peer.node_id)
            if known is None:
                raise CoordinatorError(NOT_MEMBER, "this node is not a member here: join with an invitation")
            if known.revoked:
                raise CoordinatorError(REVOKED, "this node was revoked")
            return known
        raise ProtocolError(f"a coordinator stream begins with Join or Hello, not {type(first).__name__}")

    async def _introduce_in_turn(self, src: _Online, request: Introduce) -> None:
        async with src.order:  # answers go in the order asked (asyncio locks are fair)
            try:
                await self._introduce(src, request)
            except NetchanError as exc:
                log.info("introduction of %s to %s failed: %s", src.member.name, request.peer, exc)

    async def _introduce(self, src: _Online, request: Introduce) -> None:
        try:
            target = await self._find(request.peer)
            if target is None:
                raise CoordinatorError(UNKNOWN_PEER, f"no member {request.peer!r} here")
            if target.revoked:
                raise CoordinatorError(NOT_ALLOWED, f"{target.name} was revoked")
            if target.node_id == src.member.node_id:
                raise CoordinatorError(NOT_ALLOWED, "a member cannot be introduced to itself")
            if not set(target.groups) & set(src.member.groups):
                raise CoordinatorError(NOT_ALLOWED, f"{src.member.name} and {target.name} share no group")
            dst = self._online.get(target.node_id)
            if dst is None:
                where = await self.store.where_online(target.node_id)
                if where is not None and where[0] != self.node.node_id:
                    raise CoordinatorError(ELSEWHERE, f"{target.name} is online at coordinator {where[0]}", where)
                raise CoordinatorError(OFFLINE, f"{target.name} is not connected to the coordinator")
            size = min(RELAY_PACKET_SIZE, src.peer.frame_size - RELAY_OVERHEAD, dst.peer.frame_size - RELAY_OVERHEAD)
            if size < 1200:
                raise CoordinatorError(OFFLINE, "the relay cannot carry QUIC packets between these two paths")
        except CoordinatorError as exc:
            await src.send(refusal(exc))
            return
        forth, back = secrets.randbits(64), secrets.randbits(64)
        a, b = src.member.node_id, target.node_id
        self._circuits[forth] = _Circuit(a, b, back)
        self._circuits[back] = _Circuit(b, a, forth)
        src.circuits.add(forth)
        dst.circuits.add(back)
        # the member asked of goes first: it knows the circuit before packets
        # come on it, and opens its NAT toward the asker before the asker sends
        punched = self._punching[back] = asyncio.get_running_loop().create_future()
        try:
            await dst.send(Introduced(a, back, src.candidates + [src.seen], src.member.name, False, size))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(punched, PUNCH_WAIT)
        finally:
            del self._punching[back]
        await src.send(Introduced(b, forth, dst.candidates + [dst.seen], target.name, True, size))
        log.info("introduced %s to %s", src.member.name, target.name)

    async def _find(self, who: str) -> Member | None:
        try:
            node_id = check_node_id(who)
        except NetchanError:
            return await self.store.member_named(who)
        return await self.store.member(node_id)

    def _drop_circuits(self, online: _Online) -> None:
        for number in online.circuits:
            circuit = self._circuits.pop(number, None)
            if circuit is not None:
                self._circuits.pop(circuit.out, None)
        online.circuits.clear()

    # -- the relay ------------------------------------------------------------------------

    def _relay(self, frames: list[bytes], peer: Peer | None, path: object) -> None:
        """Forward a run of relay frames from ``peer``, each on its circuit, a
        run per destination at once."""
        counters = self.counters
        out: dict[str, list[tuple[_Circuit, bytes]]] = {}
        for data in frames:
            circuit = self._circuits.get(RELAY_HEADER.unpack_from(data)[1]) if len(data) > RELAY_OVERHEAD else None
            if circuit is None or peer is None or circuit.src != peer.node_id:
                counters.no_circuit += 1
                continue
            src = self._online.get(circuit.src)
            if src is None or not src.bucket.take(len(data)):
                counters.over_rate += 1
                continue
            if src.budget is not None and not src.budget.take(len(data)):
                counters.over_budget += 1
                continue
            out.setdefault(circuit.dst, []).append(
                (circuit, RELAY_HEADER.pack(RELAY_FRAME, circuit.out) + data[RELAY_OVERHEAD:]))
        for dst_id, batch in out.items():
            dst = self._online.get(dst_id)
            if dst is None or not dst.peer.send_frames([frame for _, frame in batch]):
                counters.undeliverable += len(batch)
                continue
            for circuit, frame in batch:  # counted as delivered, like the totals
                n = len(frame) - RELAY_OVERHEAD
                circuit.packets += 1
                circuit.bytes += n
                counters.packets += 1
                counters.bytes += n

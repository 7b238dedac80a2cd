"""A node's part as a member of a coordinator: join it, keep a control
stream open to it, and reach other members by node id (or name) through it.

``Membership.of(node)`` is that part (every node has one).  After
``await membership.join(invitation)``, ``await membership.connect_peer(id)``
returns a Peer like ``node.connect`` does: a session end to end between the
two members, whose packets go through the coordinator's relay
(``relay://COORDINATOR/PEER`` is the path's URL).  The member asked of admits
the asker because the coordinator introduced it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections import deque
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..carriers.base import Carrier, CarrierURL, Listener, PacketPath, PacketSink, register_carrier
from ..carriers.udp import punch
from ..errors import BrokenError, ClosedError, ConfigurationError, NetchanError, ProtocolError
from ..identity import check_node_id
from ..node.service import ServiceStream, read_message, register_extension, send_message
from ..session.scheduler import PROBE
from .protocol import (
    MAX_MESSAGE,
    RELAY_FRAME,
    RELAY_HEADER,
    RELAY_OVERHEAD,
    SERVICE,
    CoordinatorError,
    Forget,
    Hello,
    Introduce,
    Introduced,
    Invitation,
    Join,
    Punched,
    Refused,
    Welcome,
    decoder,
)

if TYPE_CHECKING:
    from ..node.node import Node, Peer

__all__ = ["Membership", "RelayPath"]

log = logging.getLogger("netchan.coordinator")

#: probes sent toward a member that is about to dial us, and how far apart
PUNCH_ROUNDS = 10
PUNCH_INTERVAL = 0.05
#: the TTL of those probes: past our own NAT, short of the other side's
PUNCH_TTL = 2


def ipaddress_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


class RelayPath(PacketPath):
    """Packets of one session through a coordinator, on one circuit."""

    def __init__(self, control: _Control, intro: Introduced, sink: PacketSink) -> None:
        self.control = control
        self.circuit = intro.circuit
        self.peer_id = intro.peer
        self.sink = sink
        self.packet_size = intro.packet_size
        self._prefix = RELAY_HEADER.pack(RELAY_FRAME, intro.circuit)
        self.label = f"relay://{control.coordinator_id}/{intro.peer}"
        self.closed = False

    @property
    def writable(self) -> bool:  # type: ignore[override]
        return not self.closed and not self.control.peer.closed

    def send_packets(self, packets: list[bytes]) -> None:
        if self.closed:
            self.packets_dropped += len(packets)
            return
        prefix = self._prefix
        if not self.control.peer.send_frames([prefix + p for p in packets]):
            self.packets_dropped += len(packets)

    def close(self) -> None:
        self.closed = True
        self.control.paths.pop(self.circuit, None)


class _Control:
    """The control stream to one coordinator, and what came of it."""

    def __init__(self, membership: Membership, coordinator_id: str, peer: Peer, stream: ServiceStream,
                 welcome: Welcome) -> None:
        self.membership = membership
        self.coordinator_id, self.peer, self.stream = coordinator_id, peer, stream
        self.name, self.seen_at = welcome.name, welcome.seen_at
        self.lock = asyncio.Lock()
        self.answers: deque[asyncio.Future[Introduced]] = deque()
        self.paths: dict[int, RelayPath] = {}
        #: circuits of members introduced to us, until their first packet comes
        self.expected: dict[int, Introduced] = {}
        self.open = True
        self.reader = membership.node.spawn(self._read(), f"control stream to {coordinator_id}")

    async def send(self, message: Introduce | Punched) -> None:
        async with self.lock:
            await send_message(self.stream, message)

    async def introduce(self, who: str) -> Introduced:
        if not self.open:
            raise ClosedError(f"the control stream to coordinator {self.coordinator_id} ended")
        future: asyncio.Future[Introduced] = asyncio.get_running_loop().create_future()
        async with self.lock:
            self.answers.append(future)
            await send_message(self.stream, Introduce(who))
        return await future

    async def close(self) -> None:
        self.open = False
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        self.stream.abort()
        await self.peer.aclose()

    async def _read(self) -> None:
        error: NetchanError = BrokenError("the coordinator's control stream ended")
        membership = self.membership
        try:
            while True:
                message = await read_message(self.stream, decoder, MAX_MESSAGE)
                if isinstance(message, Introduced) and not message.dialer:
                    membership.introduced[message.peer] = message  # it may dial us now
                    self.expected[message.circuit] = message
                    membership.punch_toward(self, message)
                    continue
                if isinstance(message, Forget):
                    await membership.forget(message.peer, message.reason)
                    continue
                if not self.answers:
                    raise ProtocolError(f"an unasked {type(message).__name__} from the coordinator")
                future = self.answers.popleft()
                if isinstance(message, Introduced):
                    membership.introduced[message.peer] = message
                    future.set_result(message)
                elif isinstance(message, Refused):
                    future.set_exception(CoordinatorError(
                        message.code, message.reason,
                        elsewhere=(message.coordinator, message.addresses) if message.coordinator else None))
                else:
                    raise ProtocolError(f"the coordinator sent {type(message).__name__} on its control stream")
        except NetchanError as exc:
            error = exc
            if isinstance(exc, ProtocolError):
                log.warning("coordinator control stream: %s", exc)
        finally:
            self.open = False
            while self.answers:
                future = self.answers.popleft()
                if not future.done():
                    future.set_exception(error)

    def forget(self, node_id: str) -> None:
        """No circuit to or from ``node_id`` any more."""
        for number, intro in list(self.expected.items()):
            if intro.peer == node_id:
                del self.expected[number]
        for path in list(self.paths.values()):
            if path.peer_id == node_id:
                path.close()

    def on_relay(self, frames: list[bytes]) -> None:
        """Relay frames from the coordinator: each run of one circuit to its path at once."""
        runs: dict[RelayPath, list[bytes]] = {}
        for data in frames:
            if len(data) <= RELAY_OVERHEAD:
                self.membership.relay_dropped += 1
                continue
            number = RELAY_HEADER.unpack_from(data)[1]
            path = self.paths.get(number)
            if path is None:
                intro = self.expected.pop(number, None)
                if intro is None:
                    self.membership.relay_dropped += 1
                    continue
                # the first packet of a member we were introduced to: our side
                # of its session answers on this circuit
                path = self.paths[number] = RelayPath(self, intro, self.membership.node)
            runs.setdefault(path, []).append(data[RELAY_OVERHEAD:])
        for path, packets in runs.items():
            path.sink.packets_received(packets, path)


class Membership:
    """This node as a member of a coordinator (or of several that share one
    directory: a member online at another is reached through that one)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        #: the coordinators we have a control stream to, the one joined first first
        self._controls: dict[str, _Control] = {}
        self._candidates: list[str] = []
        #: members a coordinator introduced to us, and how to reach them
        self.introduced: dict[str, Introduced] = {}
        #: an introduction made by connect_peer, for the dial that follows it
        self._fresh: dict[str, Introduced] = {}
        self.relay_dropped = 0
        #: see punch_toward (raise it behind two NATs of our own, e.g. a carrier-grade one)
        self.punch_ttl = PUNCH_TTL
        node.add_dialer("relay", self._dial)
        node.add_frame_handler(RELAY_FRAME, self._on_relay)
        node.add_gate(lambda node_id: True if node_id in self.introduced else None)

    @classmethod
    def of(cls, node: Node) -> Membership:
        """The node's membership part."""
        part: Membership = node.extension("coordinator")
        return part

    @property
    def _primary(self) -> _Control | None:
        return next(iter(self._controls.values()), None)

    @property
    def coordinator(self) -> Peer | None:
        """The session to the coordinator we joined."""
        primary = self._primary
        return primary.peer if primary is not None else None

    @property
    def coordinator_id(self) -> str:
        primary = self._primary
        return primary.coordinator_id if primary is not None else ""

    @property
    def name(self) -> str:
        primary = self._primary
        return primary.name if primary is not None else ""

    @property
    def seen_at(self) -> str:
        """The address the coordinator sees us at."""
        primary = self._primary
        return primary.seen_at if primary is not None else ""

    async def join(self, invitation: str | Invitation | None = None, *, coordinator: str | list[str] | None = None,
                   coordinator_id: str | None = None, name: str = "", announce: list[str] | None = None,
                   timeout: float | None = None) -> Welcome:
        """Join the coordinator: with an invitation the first time, or, once a
        member, with its URL(s) and ``coordinator_id``.  CoordinatorError
        (a NotAllowed) says why it refused.

        Other members try to reach this node directly at ``announce`` (by
        default the node's udp listening URLs; an unspecified address such
        as 0.0.0.0 stands for the address the coordinator sees)."""
        if self._controls:
            raise ConfigurationError("this node has joined a coordinator already")
        self._candidates = list(announce) if announce is not None else self.node.addresses
        if invitation is not None:
            inv = invitation if isinstance(invitation, Invitation) else Invitation.decode(invitation)
            control = await self._open(inv.addresses, inv.coordinator, inv, name, timeout)
        else:
            if coordinator is None or coordinator_id is None:
                raise ConfigurationError("join needs an invitation, or the coordinator's URL and node id")
            urls = [coordinator] if isinstance(coordinator, str) else list(coordinator)
            control = await self._open(urls, check_node_id(coordinator_id), None, name, timeout)
        return Welcome(control.name, control.seen_at)

    async def _open(self, urls: list[str], node_id: str, inv: Invitation | None, name: str,
                    timeout: float | None) -> _Control:
        # from our udp listener's socket: the address the coordinator sees is
        # then where other members can reach that listener (its NAT mapping)
        urls = [self._from_listener(u) for u in urls]
        listening = any("from=" in u for u in urls)
        first: Join | Hello = (Join(inv.id, inv.secret, name, self._candidates, listening) if inv is not None
                               else Hello(self._candidates, listening))
        peer = await self.node.connect(urls if len(urls) > 1 else urls[0], node_id, timeout=timeout)
        try:
            stream = await peer.open_stream(SERVICE)
            await send_message(stream, first)
            answer = await asyncio.wait_for(read_message(stream, decoder, MAX_MESSAGE), timeout or 10.0)
        except BaseException:
            await peer.aclose()
            raise
        if isinstance(answer, Refused):
            await peer.aclose()
            raise CoordinatorError(answer.code, f"the coordinator refused: {answer.reason}")
        if not isinstance(answer, Welcome):
            await peer.aclose()
            raise ProtocolError(f"the coordinator answered {type(answer).__name__} to {type(first).__name__}")
        control = self._controls[node_id] = _Control(self, node_id, peer, stream, answer)
        return control

    async def leave(self) -> None:
        """Close the control streams and the sessions to the coordinators."""
        controls, self._controls = list(self._controls.values()), {}
        for control in controls:
            await control.close()

    async def aclose(self) -> list[NetchanError]:
        await self.leave()
        return []

    async def forget(self, node_id: str, reason: str) -> None:
        """``node_id`` is no longer a member: it is admitted no more, and our
        sessions with it end."""
        self.introduced.pop(node_id, None)
        self._fresh.pop(node_id, None)
        for control in self._controls.values():
            control.forget(node_id)
        for peer in list(self.node.peers):
            if peer.node_id == node_id:
                log.info("ending the session with %s: %s at the coordinator", node_id, reason)
                await peer.aclose()

    async def introduce(self, who: str) -> Introduced:
        """Ask the coordinator to introduce us to ``who`` (node id or name)."""
        return (await self._introduce(who))[1]

    async def _introduce(self, who: str) -> tuple[_Control, Introduced]:
        control = self._primary
        if control is None:
            raise ClosedError("this node has not joined a coordinator")
        try:
            return control, await control.introduce(who)
        except CoordinatorError as exc:
            if exc.elsewhere is None:
                raise
            # online at another coordinator of the same directory: ask that one
            other_id, addresses = exc.elsewhere
            other = self._controls.get(other_id)
            if other is None or not other.open:
                other = await self._open(addresses, check_node_id(other_id), None, "", None)
            return other, await other.introduce(who)

    async def connect_peer(self, who: str, *, direct: bool = True, timeout: float | None = None) -> Peer:
        """A session with the member ``who`` (node id or name).

        Its first packets go through the coordinator's relay and straight to
        the member's announced udp addresses at once; a direct path that
        answers is preferred from then on, and the relay takes over again
        within the failover gap whenever it goes silent (``peer.paths``
        shows both).  ``direct=False`` keeps to the relay."""
        control, intro = await self._introduce(who)
        self._fresh[intro.peer] = intro
        relay = f"relay://{control.coordinator_id}/{intro.peer}"
        urls = [*map(self._from_listener, self.direct_candidates(intro)), relay] if direct else [relay]
        return await self.node.connect(urls if len(urls) > 1 else relay, intro.peer, timeout=timeout)

    def _udp_port(self) -> int | None:
        """The local port of this node's (first) udp listener."""
        for url in self.node.addresses:
            parts = urlsplit(url)
            if parts.scheme == "udp" and parts.port:
                return parts.port
        return None

    def _from_listener(self, url: str) -> str:
        port = self._udp_port()
        if port is None or not url.startswith(("udp://", "quic://")) or "?" in url:
            return url
        return f"{url}?from={port}"

    def punch_toward(self, control: _Control, intro: Introduced) -> None:
        """Open our NAT toward a member that is about to dial us, then say so
        (the coordinator answers that member only then).

        The probes go from our udp listener to each of its addresses with a
        small TTL (``punch_ttl``): they pass our NAT, opening its mapping
        toward the asker, and die before they reach the asker's NAT, where a
        packet it did not ask for would take the very port mapping that its
        own packets to us need.  The asker's packets then come in, and our
        answers go back the way they came."""
        port = self._udp_port()
        targets = self.direct_candidates(intro)

        async def punched() -> None:
            with contextlib.suppress(NetchanError):
                await control.send(Punched(intro.circuit))

        async def probes(port: int) -> None:
            for round_ in range(PUNCH_ROUNDS):
                for url in targets:
                    try:
                        punch(port, url, [PROBE + os.urandom(8)], ttl=self.punch_ttl)
                    except OSError as exc:
                        log.debug("cannot punch toward %s: %s", url, exc)
                if round_ == 0:  # the first are out (sent before this): the way is open
                    await punched()
                await asyncio.sleep(PUNCH_INTERVAL)

        if port is None or not targets:
            self.node.spawn(punched(), "no punch needed")
        else:
            self.node.spawn(probes(port), f"punch toward {intro.peer}")

    @staticmethod
    def direct_candidates(intro: Introduced) -> list[str]:
        """The udp URLs of an introduced member worth trying directly, best
        first: what it announced, then where the coordinator sees it."""
        seen = intro.candidates[-1] if intro.candidates else ""
        seen_host = urlsplit(seen).hostname or ""
        found: list[str] = []
        for url in intro.candidates:
            parts = urlsplit(url)
            if parts.scheme not in ("udp", "quic") or parts.port is None or parts.hostname is None:
                continue
            host = parts.hostname
            if ipaddress_unspecified(host):
                if not seen_host:
                    continue
                host = seen_host  # listening everywhere: try where the coordinator sees it
            candidate = f"udp://{f'[{host}]' if ':' in host else host}:{parts.port}"
            if candidate not in found:
                found.append(candidate)
        return found

    # -- relay paths ---------------------------------------------------------------------

    async def _dial(self, url: CarrierURL, sink: PacketSink) -> PacketPath:
        control = self._controls.get(url.host)
        if control is None:
            raise ConfigurationError(f"{url}: this node is not a member of coordinator {url.host}")
        peer_id = check_node_id(url.path.lstrip("/"))
        intro = self._fresh.pop(peer_id, None) or await control.introduce(peer_id)
        path = RelayPath(control, intro, sink)
        control.paths[intro.circuit] = path
        return path

    def _on_relay(self, frames: list[bytes], peer: Peer | None, path: object) -> None:
        control = self._controls.get(peer.node_id) if peer is not None else None
        if control is None:
            self.relay_dropped += len(frames)
            return
        control.on_relay(frames)


class _RelayScheme(Carrier):
    """``relay://COORDINATOR/PEER``: known to every node, dialed only by a
    member of that coordinator (its Membership makes the path)."""

    scheme = "relay"

    async def listen(self, url: CarrierURL, sink: PacketSink) -> Listener:
        raise ConfigurationError(f"{url}: a relay cannot be listened on; a node reaches it by joining a coordinator")

    async def dial(self, url: CarrierURL, sink: PacketSink) -> PacketPath:
        raise ConfigurationError(f"{url}: dial a relay path from a node that joined that coordinator")


register_carrier(_RelayScheme())
register_extension("coordinator", Membership)

"""A node run from a config file (``netchan run``): its listeners, rules,
peers and pipelines, and reloading them without a restart.

A pipeline takes connections from its left side (a TCP listener, a UDP
socket, a SOCKS5 front end, or a listener at the peer) through its modules
(``through``: the peers to cross, in order, or a failover among several) to
its right side (a destination, or a service of the last peer).  The session
to the second peer of a chain runs inside tunnels through the first (as ssh's
ProxyJump does): it stays end to end between this node and that peer, and
the first peer's exit rules must let it reach the second's address.

Sessions to peers are made when the first connection needs them, redialed
after a failure, and shared by the pipelines that cross the same chain of
peers.  :meth:`Runtime.reload` compares each pipeline with its new version
(and the peers it crosses): an unchanged one keeps its listener and its open
connections; a changed one is stopped and started anew; a removed one
stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import msgspec

from ..carriers.base import parse_url
from ..coordinator.saved import join_saved
from ..errors import ConfigurationError, EndOfChannel, NetchanError
from ..identity import Identity
from ..node.node import Node, Peer, allow_list, echo_service
from ..tunnels import Tunnels
from ..tunnels.front import Front
from ..tunnels.protocol import Open, format_address
from ..tunnels.pump import Counters, reset_tcp
from ..tunnels.rules import ExitRules, parse_hostport
from ..tunnels.service import Socks5, parse_remote_bind
from .config import LEFT_SIDES, Config, FailoverStep, ModuleConfig, PeerStep, PipelineConfig, module_of

if TYPE_CHECKING:
    from .restart import Inherited

__all__ = ["Runtime", "Pipeline", "Hop", "RESTART_KEYS", "RolledBack"]

log = logging.getLogger("netchan.run")

#: how long a connection waits for the session its pipeline needs
DIAL_TIMEOUT = 10.0
#: what a reload cannot change in a running process
RESTART_KEYS = ("identity", "listen", "engine", "member", "vpn", "channel", "metrics", "dashboard",
                "dashboard_token", "control", "log_format", "log_level", "drain_timeout")


class RolledBack(ConfigurationError):
    """A reload that could not be applied: the previous configuration runs again
    (pipelines it had stopped were started again, maybe on other ports if theirs were 0)."""


class Hop:
    """The session to one peer of a pipeline's chain, made through the hops
    before it, on first use and again after it is lost."""

    def __init__(self, runtime: Runtime, step: PeerStep, before: Hop | None) -> None:
        self.runtime, self.step, self.before = runtime, step, before
        self.conf = runtime.config.peers[step.peer]
        self._peer: Peer | None = None
        self._lock = asyncio.Lock()
        #: the tunnels through ``before`` that this hop's paths run in
        self._forwards: list[Any] = []

    @property
    def name(self) -> str:
        return self.step.peer

    @property
    def up(self) -> bool:
        return self._peer is not None and not self._peer.closed and self._peer.state == "up"

    async def peer(self) -> Peer:
        async with self._lock:
            if self._peer is not None and not self._peer.closed:
                return self._peer
            await self._drop_forwards()
            self._peer = await asyncio.wait_for(self._dial(), DIAL_TIMEOUT)
            log.info("session to %s (%s) up via %s", self.name, self.conf.id, self._peer.path)
            return self._peer

    async def _dial(self) -> Peer:
        node = self.runtime.node
        if self.conf.member:
            return await node.connect_peer(self.conf.id, timeout=DIAL_TIMEOUT)
        urls = [u for u in self.conf.urls if self.step.carrier is None or parse_url(u).scheme == self.step.carrier]
        paths = self.step.paths or self.conf.paths
        if self.before is not None:
            urls = [await self._through(u) for u in urls]
        return await node.connect(urls if len(urls) > 1 else urls[0], self.conf.id, timeout=DIAL_TIMEOUT,
                                  paths=paths)

    async def _through(self, url: str) -> str:
        """A local URL whose packets reach ``url`` in a tunnel through the hop before."""
        assert self.before is not None
        via = await self.before.peer()
        parsed = parse_url(url)
        target = format_address(parsed.host, parsed.port or 0)
        tunnels = self.runtime.tunnels
        if parsed.scheme == "udp":
            fwd: Any = await tunnels.forward_udp(via, "127.0.0.1:0", target)
        elif parsed.scheme == "tcp":
            fwd = await tunnels.forward_local(via, "127.0.0.1:0", target)
        else:
            raise ConfigurationError(f"{url}: only udp and tcp paths run through another peer")
        self._forwards.append(fwd)
        host, port = fwd.address
        return f"{parsed.scheme}://{format_address(host, port)}"

    async def _drop_forwards(self) -> None:
        forwards, self._forwards = self._forwards, []
        for fwd in forwards:
            await fwd.aclose()

    async def aclose(self) -> None:
        peer, self._peer = self._peer, None
        if peer is not None:
            await peer.aclose()
        await self._drop_forwards()


class Route:
    """Where a pipeline's connections go: the last of its modules' peers."""

    def __init__(self, runtime: Runtime, steps: list[ModuleConfig]) -> None:
        self.runtime = runtime
        before: Hop | None = None
        for step in steps[:-1]:
            assert isinstance(step, PeerStep)
            before = runtime.hop(step, before)
        last = steps[-1]
        names = last.peers() if isinstance(last, FailoverStep) else []
        self.choices = ([runtime.hop(PeerStep(peer=n), before) for n in names] if names
                        else [runtime.hop(last, before)] if isinstance(last, PeerStep) else [])
        if not self.choices:
            raise ConfigurationError(f"no pipeline module {type(last).__name__} ends a chain")

    @property
    def hops(self) -> list[Hop]:
        """Every hop this route uses."""
        found: list[Hop] = []
        for hop in self.choices:
            h: Hop | None = hop
            while h is not None:
                if h not in found:
                    found.append(h)
                h = h.before
        return found

    async def peer(self) -> Peer:
        """A session for one new connection: the first choice that is up, or
        the first that can be dialed."""
        for hop in self.choices:
            if hop.up:
                return await hop.peer()
        error: BaseException | None = None
        for hop in self.choices:
            try:
                return await hop.peer()
            except (NetchanError, asyncio.TimeoutError, OSError) as exc:
                log.info("pipeline peer %s: %s", hop.name, exc or type(exc).__name__)
                error = exc
        raise error if isinstance(error, NetchanError) else NetchanError(f"no peer reachable ({error!r})")


class _Forward(Front):
    """A pipeline's TCP listener."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__(pipeline.runtime.tunnels, None)  # type: ignore[arg-type]
        self.pipeline = pipeline
        self.counters = pipeline.counters

    @property
    def target(self) -> str:
        return self.pipeline.right

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = await self.pipeline.route.peer()
        except (NetchanError, asyncio.TimeoutError) as exc:
            self.counters.failure("unreachable")
            log.info("pipeline %s: %s", self.pipeline.name, exc or "timed out")
            reset_tcp(writer)
            return
        right = self.pipeline.conf.right
        if right.connect is not None:
            host, port = parse_hostport(right.connect)
            await self.tunnels.carry(peer, Open(host, int(port)), reader, writer, [self.counters])
            return
        assert right.service is not None
        try:
            stream = await peer.open_stream(right.service)
        except NetchanError as exc:
            self.counters.failure("service")
            log.info("pipeline %s: service %s: %s", self.pipeline.name, right.service, exc)
            reset_tcp(writer)
            return
        await self.tunnels.relay(stream, reader, writer, [self.counters, self.tunnels.counters])


class _SharedSocks(Socks5):
    """One SOCKS5 listener for the pipelines that name its address: each
    CONNECT goes through the first whose match rules take its destination."""

    udp = False

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime.tunnels, None)  # type: ignore[arg-type]
        self.pipelines: list[tuple[ExitRules, Pipeline]] = []

    async def route(self, request: Open) -> tuple[Peer | None, list[Counters]]:
        for rules, pipeline in self.pipelines:
            if not rules or rules.allows_name(request.host, request.port):
                try:
                    return await pipeline.route.peer(), [self.counters, pipeline.counters]
                except (NetchanError, asyncio.TimeoutError) as exc:
                    log.info("pipeline %s: %s", pipeline.name, exc or "timed out")
                    pipeline.counters.failure("unreachable")
                    return None, [self.counters]
        return None, [self.counters]


class Pipeline:
    """One ``[[pipeline]]`` of the config, running."""

    def __init__(self, runtime: Runtime, conf: PipelineConfig) -> None:
        self.runtime, self.conf = runtime, conf
        self.name = conf.name
        self.route = Route(runtime, [module_of(e) for e in conf.through])
        self.counters = Counters()
        self._front: Any = None
        self._starting: asyncio.Task[None] | None = None
        #: where it listens, once it does
        self.address = ""

    @property
    def left(self) -> str:
        side = next(k for k in LEFT_SIDES if getattr(self.conf.left, k) is not None)
        value = getattr(self.conf.left, side)
        return f"{side} {', '.join(value) if isinstance(value, list) else value}"

    @property
    def right(self) -> str:
        r = self.conf.right
        if r.connect is not None:
            return r.connect
        if r.service:
            return f"service {r.service}"
        if r.channel:
            return f"channel {r.channel}"
        return "(where addressed)" if self.conf.left.tun is not None else "(SOCKS5 client's)"

    async def start(self) -> None:
        left = self.conf.left
        if left.listen is not None:
            bind, port = parse_hostport(left.listen, default_host="127.0.0.1")
            sock = self.runtime.inherited_socket("pipelines", self.name, left.listen)
            try:
                self._front = await _Forward(self).start(bind or "127.0.0.1", int(port), sock)
            except OSError as exc:
                raise ConfigurationError(f"pipeline {self.name}: cannot listen on {left.listen}: "
                                         f"{exc.strerror or exc}") from None
            self.address = format_address(*self._front.address)
        elif left.socks5 is not None:
            front = await self.runtime.socks_front(left.socks5, left.users)
            front.pipelines.append((ExitRules(self.conf.match), self))
            order = [p.name for p in self.runtime.config.pipeline]  # the first match wins, in the file's order
            front.pipelines.sort(key=lambda rp: order.index(rp[1].name) if rp[1].name in order else len(order))
            self.address = format_address(*front.address)
        elif left.channel is not None:
            self._starting = asyncio.ensure_future(self._bridge(self.runtime.channels[left.channel]))
            self.address = f"channel {left.channel}"
        else:
            # a UDP forward, a listener at the peer or a VPN device needs the session first
            self._starting = asyncio.ensure_future(self._start_with_peer())

    async def _bridge(self, local: Any) -> None:
        """Each item of our channel to the last peer's channel, in order, one
        at a time: an item leaves our channel only once the owner there has it
        (on a failure, or if the pipeline stops, it goes back to the head)."""
        name = self.conf.right.channel
        assert name is not None
        while True:
            try:
                peer = await self.route.peer()
                remote = await peer.channel(name, direction="send")
                log.info("pipeline %s: channel %s -> %s at %s", self.name, local.name, name, peer.node_id)
                self.counters.open = 1
                try:
                    while True:
                        async with local.process() as item:
                            await remote.send(item)
                        self.counters.datagrams += 1
                finally:
                    self.counters.open = 0
                    with contextlib.suppress(NetchanError):
                        await remote.aclose()
            except EndOfChannel:
                return  # our channel was closed and has nothing left
            except (NetchanError, asyncio.TimeoutError, OSError) as exc:
                self.counters.failure(type(exc).__name__)
                log.warning("pipeline %s: %s; trying again in 1 s", self.name, exc or "timed out")
                await asyncio.sleep(1)

    async def _start_with_peer(self) -> None:
        left, right = self.conf.left, self.conf.right
        tunnels = self.runtime.tunnels
        while True:
            try:
                peer = await self.route.peer()
                if left.tun is not None:
                    from ..tunnels.vpn import DEVICE, VpnClient

                    vpn = VpnClient(self.runtime.node, peer, routes=left.tun, device=left.device or DEVICE)
                    self._front = await vpn.start()
                    self.counters = vpn.counters
                    assert vpn.device is not None
                    self.address = f"{vpn.device.name} {', '.join(map(str, vpn.addresses))}"
                    log.info("pipeline %s: VPN on %s, routes %s", self.name, self.address, ", ".join(left.tun))
                    return
                assert right.connect is not None
                if left.udp is not None:
                    self._front = await tunnels.forward_udp(peer, left.udp, right.connect)
                    self.address = format_address(*self._front.address) + "/udp"
                else:
                    assert left.remote is not None
                    self._front = await tunnels.forward_remote(peer, left.remote, right.connect)
                    self.address = f"{self._front.address} at {self.route.choices[0].name}"
                self._front.counters = self.counters
                log.info("pipeline %s: %s -> %s", self.name, self.address, self.right)
                return
            except (NetchanError, asyncio.TimeoutError, OSError) as exc:
                log.warning("pipeline %s: %s; trying again in 5 s", self.name, exc or "timed out")
                await asyncio.sleep(5)

    def handover(self) -> int | None:
        """The TCP listener's file descriptor (a left.listen pipeline), for a successor."""
        return self._front.handover() if isinstance(self._front, _Forward) else None

    async def stop_accepting(self) -> None:
        """No new connections; those open go on.  A UDP socket or a listener at
        the peer is closed (the successor makes its own once it is free)."""
        if isinstance(self._front, _Forward):
            self._front.stop_accepting()
        elif self.conf.left.socks5 is None and self.conf.left.channel is None:
            await self.aclose()  # (a channel's bridge goes on: it empties our channel)

    @property
    def handling(self) -> int:
        """Connections this pipeline handles now, those still being set up included."""
        if isinstance(self._front, _Forward):
            return self._front.handling
        return self.counters.open if self.conf.left.channel is None else 0

    async def aclose(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if self.conf.left.socks5 is not None:
            await self.runtime.socks_leave(self.conf.left.socks5, self)
        elif self._front is not None:
            await self._front.aclose()

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {"name": self.name, "left": self.left, "address": self.address, "right": self.right,
                "through": [h.name for h in self.route.choices] if len(self.route.choices) > 1
                else [h.name for h in reversed(self.route.hops)],
                "open": c.open, "opened": c.opened, "failed": c.failed, "bytes_out": c.bytes_out,
                "bytes_in": c.bytes_in, "datagrams": c.datagrams, "errors": dict(c.errors)}


def _fingerprint(config: Config, conf: PipelineConfig) -> bytes:
    """What makes a pipeline the same after a reload: itself and the peers it crosses."""
    names = sorted({n for e in conf.through for n in module_of(e).peers()})
    return msgspec.json.encode([conf, {n: config.peers[n] for n in names}])


class Runtime:
    """The node a config describes, its tunnels and pipelines."""

    def __init__(self, config: Config, inherited: Inherited | None = None) -> None:
        self.config = config
        #: the sockets a predecessor handed over (see netchan.ops.restart)
        self.inherited = inherited
        allow = allow_list(config.allow)
        listen = inherited.listen_urls(config.listen) if inherited is not None else config.listen
        self.node = Node(Identity.load(config.identity), listen=listen, allow=allow, engine=config.engine,
                         validate_after=None if config.validate_after < 0 else config.validate_after)
        self.node.serve("echo", echo_service)
        self.tunnels = Tunnels.of(self.node)
        self._set_rules(config)
        self.pipelines: dict[str, Pipeline] = {}
        self._prints: dict[str, bytes] = {}
        self._hops: dict[bytes, Hop] = {}
        self._socks: dict[str, _SharedSocks] = {}
        self.membership: Any = None
        #: the VPN this node is the hub of, if the config says so
        self.vpn: Any = None
        #: the channels the config has this node own, by name
        self.channels: dict[str, Any] = {}

    def _set_rules(self, config: Config) -> None:
        self.tunnels.exits = ExitRules(config.exit)
        self.tunnels.remote_binds = [parse_remote_bind(b) for b in config.allow_remote_bind]

    async def start(self) -> Runtime:
        await self.node.start()
        try:
            if self.config.vpn is not None:
                from ..tunnels.vpn import VpnServer

                v = self.config.vpn
                self.vpn = await VpnServer(self.node, v.subnet, routes=v.routes, nat=v.nat, device=v.device).start()
            for chan in self.config.channel:
                self.channels[chan.name] = self.node.channel(chan.name, chan.capacity, allow_send=chan.allow_send,
                                                             allow_recv=chan.allow_recv)
            if self.config.member:
                self.membership = await join_saved(self.node, self.config.identity)
            for conf in self.config.pipeline:
                await self._start(conf)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _start(self, conf: PipelineConfig) -> Pipeline:
        pipeline = Pipeline(self, conf)
        await pipeline.start()
        self.pipelines[conf.name] = pipeline
        self._prints[conf.name] = _fingerprint(self.config, conf)
        log.info("pipeline %s: %s -> %s -> %s", conf.name, pipeline.left,
                 " -> ".join(h.name for h in reversed(pipeline.route.hops)), pipeline.right)
        return pipeline

    def hop(self, step: PeerStep, before: Hop | None) -> Hop:
        """The (shared) hop for ``step`` after ``before``."""
        conf = self.config.peers[step.peer]
        key = msgspec.json.encode([before.step if before else None, step, conf,
                                   id(before) if before else 0])
        hop = self._hops.get(key)
        if hop is None:
            hop = self._hops[key] = Hop(self, step, before)
        return hop

    def inherited_socket(self, kind: str, name: str, listen: str) -> socket.socket | None:
        """The listening socket a predecessor handed over for ``kind`` ``name``,
        once, if it is where ``listen`` (``[host:]port``) says."""
        return self.inherited.take(kind, name, listen) if self.inherited is not None else None

    def handover(self) -> dict[str, dict[str, int]]:
        """The file descriptors of the pipelines' listeners, by kind and name."""
        pipelines = {name: fd for name, p in self.pipelines.items() if (fd := p.handover()) is not None}
        socks = {listen: fd for listen, front in self._socks.items() if (fd := front.handover()) is not None}
        return {"pipelines": pipelines, "socks": socks}

    async def stop_accepting(self) -> None:
        """A successor took the listeners: no new connections, those open go on."""
        for pipeline in list(self.pipelines.values()):
            await pipeline.stop_accepting()
        for front in self._socks.values():
            front.stop_accepting()

    @property
    def open_connections(self) -> int:
        """Connections the pipelines and the tunnels (exits for peers) carry now,
        and items waiting in the channels this node owns."""
        waiting = sum(stats["buffered"] + stats["in_process"]
                      for stats in (ch.statistics() for ch in self.channels.values()))
        connections = sum(p.handling for p in self.pipelines.values())
        socks = sum(front.handling for front in self._socks.values())
        return connections + socks + self.tunnels.counters.open + waiting

    async def hand_over_items(self, send: Callable[[str, list[tuple[str, int, bytes]], dict[str, int]],
                                                   Awaitable[int]], everything: bool = False) -> int:
        """A restart drains this process: give the successor the items waiting
        in the channels this node owns that nobody here can take any more
        (no handle that receives and no receiver waiting), or all of them
        (``everything``, at the end); how many moved."""
        moved = 0
        for name, channel in self.channels.items():
            if not everything and channel.takers:
                continue
            items, accepted = channel.surrender()
            if not items:
                continue
            sent = await send(name, items, accepted)
            if sent < len(items):
                channel.adopt(items[sent:], {})  # ours again
            moved += sent
            log.info("channel %s: %d items handed over to the new process", name, sent)
        return moved

    def adopt_items(self, name: str, items: list[tuple[str, int, bytes]], accepted: dict[str, int]) -> None:
        """The items a predecessor handed over for channel ``name``."""
        channel = self.channels.get(name)
        if channel is None:
            log.error("the old process handed over %d items of channel %r, which the config no longer has: "
                      "dropped", len(items), name)
            return
        channel.adopt(items, accepted)

    async def socks_front(self, listen: str, users: dict[str, str]) -> _SharedSocks:
        front = self._socks.get(listen)
        if front is None:
            bind, port = parse_hostport(listen, default_host="127.0.0.1")
            front = _SharedSocks(self)
            front.users = dict(users)
            try:
                await front.start(bind or "127.0.0.1", int(port), self.inherited_socket("socks", listen, listen))
            except OSError as exc:
                raise ConfigurationError(f"SOCKS5 {listen}: cannot listen: {exc.strerror or exc}") from None
            self._socks[listen] = front
        elif users and front.users != users:
            raise ConfigurationError(f"SOCKS5 {listen}: pipelines sharing it give different users")
        return front

    async def socks_leave(self, listen: str, pipeline: Pipeline) -> None:
        front = self._socks.get(listen)
        if front is None:
            return
        front.pipelines = [(r, p) for r, p in front.pipelines if p is not pipeline]
        if not front.pipelines:
            del self._socks[listen]
            await front.aclose()

    async def reload(self, config: Config, rolling_back: bool = False) -> dict[str, list[str]]:
        """Apply ``config``: rules at once; pipelines changed, added or removed
        (with the sessions no pipeline needs any more); the others untouched.
        ConfigurationError for what needs a restart."""
        for key in RESTART_KEYS:
            if getattr(config, key) != getattr(self.config, key):
                raise ConfigurationError(f"{key} changed: that needs a restart (netchan restart), not a reload")
        old = self.config
        self.config = config
        self._set_rules(config)
        self.node.set_allowed(allow_list(config.allow))
        self.node.validate_after = None if config.validate_after < 0 else config.validate_after
        done: dict[str, list[str]] = {"kept": [], "restarted": [], "started": [], "stopped": []}
        wanted = {p.name: p for p in config.pipeline}
        for name in list(self.pipelines):
            if name not in wanted or _fingerprint(config, wanted[name]) != self._prints[name]:
                await self.pipelines.pop(name).aclose()
                del self._prints[name]
                done["stopped" if name not in wanted else "restarted"].append(name)
        kept_hops = {id(h) for p in self.pipelines.values() for h in p.route.hops}
        # hops of the pipelines that stay are the same objects; the others are made anew
        for hop_key, hop in list(self._hops.items()):
            if id(hop) not in kept_hops:
                del self._hops[hop_key]
                await hop.aclose()
        try:
            for conf in config.pipeline:
                if conf.name not in self.pipelines:
                    await self._start(conf)
                    if conf.name not in done["restarted"]:
                        done["started"].append(conf.name)
                elif conf.name not in done["restarted"]:
                    done["kept"].append(conf.name)
        except (NetchanError, OSError) as exc:
            if rolling_back:
                raise
            # the previous configuration back: what was stopped starts again, what was
            # started stops; the pipelines this reload did not touch were never stopped
            log.error("reload failed: %s; going back to the previous configuration", exc)
            try:
                await self.reload(old, rolling_back=True)
            except (NetchanError, OSError) as again:
                raise ConfigurationError(f"{exc}; and going back failed too: {again}") from None
            raise RolledBack(f"{exc} (the previous configuration runs again)") from None
        log.info("reloaded: %s", ", ".join(f"{k} {' '.join(v)}" for k, v in done.items() if v) or "nothing")
        return done

    def status(self) -> dict[str, Any]:
        return {"pipelines": [p.status() for p in self.pipelines.values()],
                "config": self.config.file}

    async def aclose(self) -> None:
        for pipeline in list(self.pipelines.values()):
            await pipeline.aclose()
        self.pipelines.clear()
        for hop in list(self._hops.values()):
            await hop.aclose()
        self._hops.clear()
        for front in list(self._socks.values()):
            await front.aclose()
        self._socks.clear()
        if self.vpn is not None:
            await self.vpn.aclose()
        await self.node.aclose()

    async def __aenter__(self) -> Runtime:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

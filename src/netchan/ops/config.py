"""``netchan run``'s config file: one TOML file that says what the command
line says (identity, listeners, allow lists, exit rules, peers, coordinator
membership) and the node's pipelines.

The file's shape is checked by msgspec against the structs below (unknown
keys and wrong types refused), then what each value means (URLs, node ids,
exit rules, ports, the key file) by the same parsers the command line uses.
Every error names the file, the line and the key::

    node.toml:12: pipeline[1].left.listen: 'x:y': the port must be a number

An example::

    identity = "node.key"            # relative to this file
    listen = ["udp://0.0.0.0:7000"]
    allow = ["k3v...", "any"]        # node ids admitted ("any": every key)
    exit = ["10.0.0.0/8:*"]          # where peers' tunnels may go from here

    [peers.gateway]
    id = "fhq..."
    urls = ["udp://gw.example.org:7000", "tcp://gw.example.org:7000"]

    [peers.inner]                    # reached through gateway (see the pipeline)
    id = "abc..."
    urls = ["udp://10.1.0.5:7000"]

    [[pipeline]]
    name = "web"
    left = { listen = "127.0.0.1:8080" }
    through = ["gateway"]
    right = { connect = "10.0.0.5:80" }

    [[pipeline]]
    name = "corp"
    left = { socks5 = "127.0.0.1:1080" }
    through = ["gateway", "inner"]   # inner's session runs inside a tunnel through gateway
    match = ["*.corp.example:*", "10.1.0.0/16:*"]
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from ..carriers.base import parse_url
from ..errors import ConfigurationError, NetchanError
from ..identity import Identity, check_node_id
from ..tunnels.rules import ExitRule, parse_hostport
from ..tunnels.service import parse_remote_bind

__all__ = ["ConfigError", "Config", "PeerConfig", "PipelineConfig", "VpnConfig", "ChannelConfig", "LEFT_SIDES", "Left", "Right", "load_config",
           "parse_config", "MODULES", "register_module", "ModuleConfig", "PeerStep", "FailoverStep"]


class ConfigError(ConfigurationError):
    """A config file that cannot be used: ``file``, ``line`` (0: unknown) and
    ``key`` (a dotted path such as ``pipeline[0].left``) say where."""

    def __init__(self, file: str, line: int, key: str, reason: str) -> None:
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")
        self.file, self.line, self.key, self.reason = file, line, key, reason


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class PeerConfig(_Strict):
    """A peer the pipelines cross: its node id and where to reach it (or, with
    ``member``, by id through the coordinator this node joined)."""

    id: str
    urls: list[str] = []
    #: several URLs: the first healthy one ("failover") or all of them ("mirror")
    paths: Literal["failover", "mirror"] = "failover"
    member: bool = False


class Left(_Strict):
    """Where a pipeline's traffic comes from: one of these."""

    #: a local TCP listener, ``[bind:]port``
    listen: str | None = None
    #: a local UDP socket, ``[bind:]port``
    udp: str | None = None
    #: a SOCKS5 front end, ``[bind:]port``: the destination is the client's
    socks5: str | None = None
    #: SOCKS5 usernames and passwords (none: no authentication)
    users: dict[str, str] = {}
    #: the (one) peer listens on ``[bind:]port`` for us; connections come here
    remote: str | None = None
    #: networks routed into the VPN of the last peer (a TUN device here; Linux, CAP_NET_ADMIN)
    tun: list[str] | None = None
    #: the TUN device's name (``%d``: a free number)
    device: str | None = None
    #: items taken from this node's channel of that name (see [[channel]])
    channel: str | None = None


class Right(_Strict):
    """Where it goes at the far end: a destination, or a service of the last peer."""

    connect: str | None = None
    service: str | None = None
    #: the last peer's channel of that name (for left.channel)
    channel: str | None = None


class ChannelConfig(_Strict):
    """A channel this node owns (peers it admits may send and receive)."""

    name: str
    capacity: int = 0
    #: node ids that may send / receive (default: every peer admitted)
    allow_send: list[str] | None = None
    allow_recv: list[str] | None = None


class VpnConfig(_Strict):
    """This node as the hub of a VPN (``netchan vpn serve``): its addresses,
    the networks members may reach through it, NAT for them."""

    subnet: list[str]
    routes: list[str] = []
    nat: bool = False
    device: str = "netchan%d"


class PipelineConfig(_Strict):
    name: str
    left: Left
    #: the modules, in order: a peer's name (to cross it), or a module table
    #: such as ``{ peer = "gw", carrier = "tcp" }`` or ``{ failover = ["a", "b"] }``
    through: list[str | dict[str, Any]]
    right: Right = msgspec.field(default_factory=Right)
    #: destinations this pipeline takes from a SOCKS5 front end it shares with
    #: others (exit-rule syntax: ``host:port``, ``*.domain:*``, ``10.0.0.0/8:*``);
    #: empty: every destination
    match: list[str] = []


class Config(_Strict):
    identity: str
    listen: list[str] = []
    allow: list[str] = []
    exit: list[str] = []
    allow_remote_bind: list[str] = []
    engine: str | None = None
    #: the control socket (default: per node id, see ``netchan status``)
    control: str | None = None
    #: a member of the coordinator ``netchan join`` saved beside the identity
    member: bool = False
    #: ``host:port`` for a Prometheus endpoint
    metrics: str | None = None
    #: ``host:port`` for the live web page (a token is asked for unless on loopback)
    dashboard: str | None = None
    dashboard_token: str | None = None
    #: seconds an old process serves its sessions after a restart, at most
    drain_timeout: float = 300.0
    #: handshakes in progress past which Initials get a stateless Retry first
    #: (0: always validate addresses; -1: never)
    validate_after: Annotated[int, msgspec.Meta(ge=-1)] = 32
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    peers: dict[str, PeerConfig] = {}
    vpn: VpnConfig | None = None
    channel: list[ChannelConfig] = []
    pipeline: list[PipelineConfig] = []
    #: filled in by load_config: the file and its directory
    file: str = ""


# -- modules ----------------------------------------------------------------------


class ModuleConfig(_Strict):
    """A step of a pipeline; a module registers its struct under the key that
    names it in a ``through`` table (see :func:`register_module`)."""

    def peers(self) -> list[str]:
        """The names of the peers this step uses."""
        return []


class PeerStep(ModuleConfig):
    """Cross a peer (after the steps before it: its session runs through them)."""

    peer: str
    #: only this carrier's URLs of the peer (udp, tcp)
    carrier: str | None = None
    #: instead of the peer's own setting
    paths: Literal["failover", "mirror"] | None = None

    def peers(self) -> list[str]:
        return [self.peer]


class FailoverStep(ModuleConfig):
    """Each new connection goes through the first of these peers whose
    session is up (the last step of a pipeline)."""

    failover: list[str]

    def peers(self) -> list[str]:
        return list(self.failover)


#: key of a ``through`` table -> the struct it decodes to
MODULES: dict[str, type[ModuleConfig]] = {}


def register_module(key: str, struct: type[ModuleConfig]) -> type[ModuleConfig]:
    """Make ``{ KEY = ... }`` in a pipeline's ``through`` decode to ``struct``."""
    MODULES[key] = struct
    return struct


register_module("peer", PeerStep)
register_module("failover", FailoverStep)


def module_of(entry: str | dict[str, Any]) -> ModuleConfig:
    """One ``through`` entry as its module (a bare name: ``{ peer = NAME }``);
    msgspec.ValidationError or ConfigurationError (with a ``$``-path) if it is wrong."""
    if isinstance(entry, str):
        return PeerStep(peer=entry)
    kinds = [k for k in entry if k in MODULES]
    if len(kinds) != 1:
        raise ConfigurationError(f"a module table has one of {', '.join(sorted(MODULES))}"
                                 + (f", not {' and '.join(kinds)}" if kinds else ""))
    return msgspec.convert(entry, MODULES[kinds[0]])


# -- loading -----------------------------------------------------------------------


def load_config(path: str) -> Config:
    """Read, decode and check the config file ``path`` (ConfigError says where it is wrong)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(path, 0, "", f"cannot read it: {exc.strerror or exc}") from None
    return parse_config(raw.decode("utf-8", "replace"), path)


def parse_config(text: str, file: str = "<config>") -> Config:
    lines = _KeyLines(text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(file, int(match.group(1)) if match else 0, "", f"not TOML: {reason}") from None
    peers = data.get("peers")
    if isinstance(peers, dict):  # first each on its own: msgspec names a dict's key only as [...]
        for name, raw in peers.items():
            try:
                msgspec.convert(raw, PeerConfig)
            except msgspec.ValidationError as exc:
                inner = _located(file, lines, str(exc))
                key = f"peers.{name}" + (f".{inner.key}" if inner.key else "")
                raise ConfigError(file, lines.find(key), key, inner.reason) from None
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise _located(file, lines, str(exc)) from None
    config.file = os.path.abspath(file)
    _Checker(config, file, lines).check()
    return config


def _located(file: str, lines: _KeyLines, message: str) -> ConfigError:
    """A msgspec error (``reason - at `$.a[0].b```) as a ConfigError."""
    reason, _, at = message.rpartition(" - at `")
    if not reason:
        reason, at = message, "$`"
    path = at.rstrip("`").removeprefix("$").lstrip(".")
    field = re.search(r"(?:unknown|missing required) field `([^`]+)`", reason)
    if field:
        path = f"{path}.{field.group(1)}" if path else field.group(1)
        reason = re.sub(r"Object contains unknown field `[^`]+`", "unknown key", reason)
        reason = re.sub(r"Object missing required field `[^`]+`", "missing (it is needed)", reason)
    reason = re.sub(r"^Expected `([^`]+)`, got `([^`]+)`", r"expected \1, got \2", reason)
    return ConfigError(file, lines.find(path), path, reason)


class _KeyLines:
    """Where each key of a TOML text is (its dotted path, arrays of tables
    numbered), read line by line: enough to point at a line, not a parser."""

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r'^\s*([A-Za-z0-9_\-."\' ]+?)\s*=')
    _INLINE = re.compile(r'([A-Za-z0-9_\-]+)\s*=')

    _STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'')

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        table: list[str] = []
        counts: dict[str, int] = {}
        depth = 0  # inside a multi-line array: not keys
        for number, line in enumerate(text.splitlines(), 1):
            bare = self._STRINGS.sub('""', line).split("#", 1)[0]  # brackets in strings and comments do not count
            if depth == 0 and (m := self._HEADER.match(bare)):
                m = self._HEADER.match(line) or m  # quoted keys as written: [peers."a.b"]
                name = self._table(m.group(2), counts)
                if m.group(1) == "[[":
                    index = counts[name] = counts.get(name, -1) + 1
                    table = [f"{name}[{index}]"]
                else:
                    table = [name]
                self.lines.setdefault(table[0], number)
                continue
            if depth == 0 and (m := self._KEY.match(line)):
                key = ".".join(p.strip().strip('"\'') for p in m.group(1).split("."))
                full = ".".join([*table, key])
                self.lines.setdefault(full, number)
                rest = line[m.end():]
                if rest.lstrip().startswith("{"):
                    for sub in self._INLINE.findall(self._STRINGS.sub('""', rest)):
                        self.lines.setdefault(f"{full}.{sub}", number)
            depth = max(0, depth + bare.count("[") - bare.count("]"))

    @staticmethod
    def _table(header: str, counts: dict[str, int]) -> str:
        """A header's dotted path, a sub-table of an array of tables under its
        latest element (``[pipeline.left]`` -> ``pipeline[2].left``)."""
        parts = [p.strip().strip('"\'') for p in header.split(".")]
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in counts:
                return f"{prefix}[{counts[prefix]}]." + ".".join(parts[i:])
        return ".".join(parts)

    def find(self, path: str) -> int:
        """The line of ``path``, or of the nearest enclosing key found (1, where
        the top-level table begins, if none is)."""
        while path:
            for candidate in (path, re.sub(r"\[\d+\]$", "", path)):
                if candidate in self.lines:
                    return self.lines[candidate]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return 1


@dataclass
class _Checker:
    """What the values mean, checked with the parsers the command line uses."""

    config: Config
    file: str
    lines: _KeyLines

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.file, self.lines.find(key), key, reason)

    def each(self, key: str, values: list[str], check: Any) -> None:
        for i, value in enumerate(values):
            self.one(f"{key}[{i}]", value, check)

    def one(self, key: str, value: str, check: Any) -> None:
        try:
            check(value)
        except NetchanError as exc:
            raise self.fail(key, _reason(exc, value)) from None

    def check(self) -> None:
        c = self.config
        base = os.path.dirname(os.path.abspath(self.file))
        c.identity = os.path.join(base, os.path.expanduser(c.identity))
        try:
            Identity.load(c.identity)
        except NetchanError as exc:
            raise self.fail("identity", str(exc)) from None
        self.each("listen", c.listen, parse_url)
        self.each("allow", c.allow, lambda v: None if v.lower() == "any" else check_node_id(v))
        self.each("exit", c.exit, ExitRule.parse)
        self.each("allow_remote_bind", c.allow_remote_bind, parse_remote_bind)
        if c.engine is not None:
            from ..session.engine import ENGINES

            if c.engine not in ENGINES:
                raise self.fail("engine", f"{c.engine!r}: one of {', '.join(ENGINES)}")
        for key in ("metrics", "dashboard"):
            if getattr(c, key) is not None:
                self.one(key, getattr(c, key), _port_of)
        if c.vpn is not None:
            if not c.vpn.subnet:
                raise self.fail("vpn.subnet", "give the VPN's addresses, e.g. [\"10.77.0.0/24\"]")
            self.each("vpn.subnet", c.vpn.subnet, _network)
            self.each("vpn.routes", c.vpn.routes, _network)
        for name, peer in c.peers.items():
            key = f"peers.{name}"
            try:
                check_node_id(peer.id)
            except NetchanError as exc:
                raise self.fail(f"{key}.id", str(exc)) from None
            self.each(f"{key}.urls", peer.urls, parse_url)
            if not peer.urls and not peer.member:
                raise self.fail(key, "give its urls, or member = true to reach it through the coordinator")
            if peer.member and not c.member:
                raise self.fail(f"{key}.member", "this node is no member: set member = true at the top")
        channels: set[str] = set()
        for i, chan in enumerate(c.channel):
            if not chan.name:
                raise self.fail(f"channel[{i}].name", "a channel needs a name")
            if chan.name in channels:
                raise self.fail(f"channel[{i}].name", f"{chan.name!r} names another channel too")
            if chan.capacity < 0:
                raise self.fail(f"channel[{i}].capacity", "a capacity is 0 or more")
            for who in ("allow_send", "allow_recv"):
                self.each(f"channel[{i}].{who}", getattr(chan, who) or [], check_node_id)
            channels.add(chan.name)
        names: set[str] = set()
        for i, pipe in enumerate(c.pipeline):
            self.pipeline(f"pipeline[{i}]", pipe)
            if pipe.name in names:
                raise self.fail(f"pipeline[{i}].name", f"{pipe.name!r} names another pipeline too")
            names.add(pipe.name)

    def pipeline(self, key: str, pipe: PipelineConfig) -> None:
        sides = [k for k in LEFT_SIDES if getattr(pipe.left, k) is not None]
        if len(sides) != 1:
            raise self.fail(f"{key}.left", "one of listen, udp, socks5, remote, tun or channel" +
                            (f", not {' and '.join(sides)}" if sides else ""))
        side = sides[0]
        if side == "tun":
            self.each(f"{key}.left.tun", pipe.left.tun or [], _network)
        elif side == "channel":
            if pipe.left.channel not in {ch.name for ch in self.config.channel}:
                raise self.fail(f"{key}.left.channel", f"no [[channel]] named {pipe.left.channel!r} here")
            if pipe.right.channel is None or pipe.right.connect is not None or pipe.right.service is not None:
                raise self.fail(f"{key}.right", "a channel goes to a channel: right = { channel = \"NAME\" }")
        else:
            self.one(f"{key}.left.{side}", getattr(pipe.left, side), _port_of)
        if pipe.left.device is not None and side != "tun":
            raise self.fail(f"{key}.left.device", "a device is for left.tun")
        if not pipe.through:
            raise self.fail(f"{key}.through", "name at least one peer to cross")
        steps: list[ModuleConfig] = []
        for i, entry in enumerate(pipe.through):
            try:
                steps.append(module_of(entry))
            except msgspec.ValidationError as exc:
                inner = _located(self.file, self.lines, str(exc))
                raise self.fail(f"{key}.through[{i}]" + (f".{inner.key}" if inner.key else ""),
                                inner.reason) from None
            except ConfigurationError as exc:
                raise self.fail(f"{key}.through[{i}]", str(exc)) from None
            for name in steps[-1].peers():
                if name not in self.config.peers:
                    raise self.fail(f"{key}.through[{i}]", f"no peer {name!r} in [peers]")
            if isinstance(steps[-1], PeerStep) and steps[-1].carrier is not None:
                urls = self.config.peers[steps[-1].peer].urls
                if not any(parse_url(u).scheme == steps[-1].carrier for u in urls):
                    raise self.fail(f"{key}.through[{i}].carrier",
                                    f"peer {steps[-1].peer!r} has no {steps[-1].carrier} URL")
        if any(isinstance(s, FailoverStep) for s in steps[:-1]):
            raise self.fail(f"{key}.through", "failover is the last step of a pipeline")
        if len(steps) > 1 and any(self.config.peers[n].member for s in steps[1:] for n in s.peers()):
            raise self.fail(f"{key}.through", "a member peer is reached through the coordinator: first, or alone")
        if side == "remote" and len(steps) != 1:
            raise self.fail(f"{key}.through", "left.remote listens at one peer: name one")
        right = pipe.right
        if side != "channel" and right.channel is not None:
            raise self.fail(f"{key}.right.channel", "a channel takes items from left.channel")
        if side == "channel":
            pass
        elif side in ("socks5", "tun"):
            if right.connect is not None or right.service is not None:
                what = ("a SOCKS5 pipeline goes where its clients ask" if side == "socks5"
                        else "a tun pipeline's packets go where they are addressed")
                raise self.fail(f"{key}.right", f"{what}: no right side")
        else:
            if (right.connect is None) == (right.service is None):
                raise self.fail(f"{key}.right", "connect = \"HOST:PORT\" or service = \"NAME\"")
            if right.connect is not None:
                self.one(f"{key}.right.connect", right.connect, _port_of)
            if right.service is not None and side in ("udp", "remote"):
                raise self.fail(f"{key}.right.service", f"left.{side} goes to a destination (connect)")
        if pipe.match and side != "socks5":
            raise self.fail(f"{key}.match", "match rules choose among pipelines sharing a SOCKS5 front end")
        self.each(f"{key}.match", pipe.match, ExitRule.parse)


#: what a pipeline's traffic can come from
LEFT_SIDES = ("listen", "udp", "socks5", "remote", "tun", "channel")


def _network(text: str) -> None:
    """``text`` is an IP network (ConfigurationError if not)."""
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigurationError(f"{text!r} is not a network: {exc}") from None


def _port_of(text: str) -> int:
    """The port of ``[host:]port`` (ConfigurationError unless 0-65535)."""
    _host, port = parse_hostport(text, default_host="")
    if not port.isdigit() or int(port) > 65535:
        raise ConfigurationError(f"{text!r}: the port must be a number from 0 to 65535")
    return int(port)


def _reason(exc: NetchanError, value: str) -> str:
    text = str(exc)
    return text if repr(value) in text or value in text else f"{value!r}: {text}"

"""Exit rules: which destinations a node connects out to for its peers.

Nothing is reachable unless a rule allows it.  A rule is ``HOST:PORT``, where
HOST is an IP address, a network in CIDR form (``10.0.0.0/8``), a host name
(``example.org``, or ``*.example.org`` for its subdomains) or ``*`` (any),
and PORT is a number, a range (``8000-8100``) or ``*``.  IPv6 addresses and
networks go in brackets: ``[::1]:22``, ``[fd00::/8]:*``.

A destination given by name is allowed if a name rule matches it; otherwise
it is resolved and connected to only at addresses an address rule allows (so
a name that resolves into a forbidden network stays forbidden).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import ConfigurationError

__all__ = ["ExitRule", "ExitRules", "parse_hostport"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: a label of a host name: letters (any script), digits, hyphens inside, underscores as some names have
_LABEL = re.compile(r"\w(?:[\w-]{0,61}\w)?")


def parse_hostport(text: str, *, default_host: str | None = None) -> tuple[str, str]:
    """``host:port`` or ``[v6]:port`` (or ``port`` alone, with ``default_host``) -> (host, port text)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigurationError(f"{text!r}: write [IPv6]:PORT")
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_host is None:
            raise ConfigurationError(f"{text!r}: write HOST:PORT")
        return default_host, text
    if ":" in host:
        raise ConfigurationError(f"{text!r}: put an IPv6 address in brackets, [addr]:port")
    return host, port


@dataclass(frozen=True)
class ExitRule:
    """One ``--exit`` rule."""

    text: str
    network: IPNetwork | None  # an address or network rule
    name: str | None  # a name rule ("example.org", "*.example.org" or "*")
    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> ExitRule:
        host, port = parse_hostport(text)
        if not host:
            raise ConfigurationError(f"exit rule {text!r}: no host")
        if port == "*":
            low, high = 1, 65535
        else:
            a, sep, b = port.partition("-")
            try:
                low, high = int(a), int(b) if sep else int(a)
            except ValueError:
                raise ConfigurationError(f"exit rule {text!r}: the port must be a number, a range or *") from None
            if not 1 <= low <= high <= 65535:
                raise ConfigurationError(f"exit rule {text!r}: ports are 1 to 65535")
        network: IPNetwork | None = None
        name: str | None = None
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            name = host.lower().rstrip(".")
            label = name.removeprefix("*.")
            if name != "*" and (not label or any(not _LABEL.fullmatch(part) for part in label.split("."))):
                raise ConfigurationError(f"exit rule {text!r}: {host!r} is neither an address, a network "
                                         "nor a host name") from None
        return cls(text, network, name, low, high)

    def allows_port(self, port: int) -> bool:
        return self.low <= port <= self.high

    def allows_name(self, name: str, port: int) -> bool:
        if self.name is None or not self.allows_port(port):
            return False
        name = name.lower().rstrip(".")
        if self.name == "*":
            return True
        if self.name.startswith("*."):
            return name.endswith(self.name[1:])
        return name == self.name

    def allows_address(self, address: str, port: int) -> bool:
        if not self.allows_port(port):
            return False
        if self.name == "*":
            return True
        if self.network is None:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.version == self.network.version and ip in self.network


class ExitRules:
    """A node's exit rules (empty: nothing is reachable)."""

    def __init__(self, rules: list[str] | tuple[str, ...] = ()) -> None:
        self.rules = [ExitRule.parse(r) for r in rules]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __repr__(self) -> str:
        return f"ExitRules({[r.text for r in self.rules]!r})"

    def add(self, rule: str) -> None:
        self.rules.append(ExitRule.parse(rule))

    def is_address(self, host: str) -> bool:
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            return True
        except ValueError:
            return False

    def allows_name(self, host: str, port: int) -> bool:
        """A name rule (or an address rule, for a literal address) allows ``host:port``."""
        if self.is_address(host):
            return self.allows_address(host, port)
        return any(r.allows_name(host, port) for r in self.rules)

    def allows_address(self, address: str, port: int) -> bool:
        return any(r.allows_address(address, port) for r in self.rules)

    def may_resolve(self, host: str, port: int) -> bool:
        """Whether resolving ``host`` could lead anywhere allowed (an address rule covers the port)."""
        return any(r.network is not None and r.allows_port(port) for r in self.rules)

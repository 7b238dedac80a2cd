"""A TUN device for the VPN (Linux, CAP_NET_ADMIN): python-pytun opens it,
pyroute2 gives it its addresses, MTU and routes, and ``nft`` its NAT.

The device is not persistent: it disappears, with its addresses and routes,
when this process closes it or dies.  Routes it added are removed on close
all the same, and a NAT table and a forwarding switch it set are undone.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import logging
import os
import subprocess
from typing import Any, Callable, Iterable

from ..errors import ConfigurationError, NetchanError

__all__ = ["TunDevice", "Nat", "Forwarding", "VpnSetupError", "check_can_tun"]

log = logging.getLogger("netchan.tunnels.vpn")

#: packets read from the device per wake-up, at most
BATCH = 64
#: IPv6 address flag: no duplicate address detection (the address is usable at once)
_IFA_F_NODAD = 0x02

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class VpnSetupError(NetchanError):
    """The TUN device, its addresses or routes could not be set up."""


def check_can_tun() -> None:
    """Raise VpnSetupError with the reason if this process cannot make a TUN device."""
    if not os.path.exists("/dev/net/tun"):
        raise VpnSetupError("no /dev/net/tun on this machine (the tun kernel module)")
    missing = [name for name in ("pytun", "pyroute2") if importlib.util.find_spec(name) is None]
    if missing:
        raise VpnSetupError("the VPN needs python-pytun and pyroute2: pip install 'netchan[vpn]'")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as exc:
        raise VpnSetupError(f"cannot open /dev/net/tun: {exc.strerror} (the VPN needs CAP_NET_ADMIN)") from None
    os.close(fd)


class TunDevice:
    """An up TUN device with addresses and MTU; ``start(on_packet)`` begins reading.

    Made with ``await TunDevice.create(...)``.  Netlink requests run in a
    worker thread: pyroute2's own event loop cannot share this one (nor
    can uvloop carry a netlink socket)."""

    def __init__(self, dev: Any) -> None:
        self._dev = dev
        self.name: str = dev.name
        self.fd: int = dev.fileno()
        os.set_blocking(self.fd, False)
        self.index = 0
        self.mtu = 0
        self.routes: list[Network] = []
        self.dropped = 0
        self._reading = False

    @classmethod
    async def create(cls, name: str, mtu: int, addresses: Iterable[Interface]) -> TunDevice:
        import pytun

        check_can_tun()
        try:
            dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
        except pytun.Error as exc:
            raise VpnSetupError(f"cannot create TUN device {name!r}: {exc} (the VPN needs CAP_NET_ADMIN)") from None
        self = cls(dev)
        addresses = list(addresses)

        def setup(ipr: Any) -> None:
            (self.index,) = ipr.link_lookup(ifname=self.name)
            for iface in addresses:
                extra = {"flags": _IFA_F_NODAD} if iface.version == 6 else {}
                ipr.addr("add", index=self.index, address=str(iface.ip), prefixlen=iface.network.prefixlen,
                         **extra)
            ipr.link("set", index=self.index, mtu=mtu, state="up")

        try:
            await _netlink(setup)
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, Exception):
                raise VpnSetupError(f"cannot set up {self.name}: {exc}") from None
            raise
        self.mtu = mtu
        return self

    async def set_mtu(self, mtu: int) -> None:
        if mtu != self.mtu:
            await _netlink(lambda ipr: ipr.link("set", index=self.index, mtu=mtu))
            self.mtu = mtu

    async def add_route(self, network: Network) -> None:
        try:
            await _netlink(lambda ipr: ipr.route("add", dst=str(network), oif=self.index))
        except Exception as exc:
            raise VpnSetupError(f"cannot route {network} through {self.name}: {exc}") from None
        self.routes.append(network)

    def start(self, on_packet: Callable[[bytes], None]) -> None:
        """Call ``on_packet`` for each packet the system sends into the device."""
        read = os.read
        fd = self.fd

        def readable() -> None:
            for _ in range(BATCH):
                try:
                    packet = read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    log.warning("%s: read failed: %s", self.name, exc)
                    return
                on_packet(packet)

        asyncio.get_running_loop().add_reader(fd, readable)
        self._reading = True

    def write(self, packet: bytes) -> None:
        """Hand ``packet`` to the system (dropped and counted if its queue is full)."""
        try:
            os.write(self.fd, packet)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
        except OSError as exc:  # a packet the kernel will not take
            self.dropped += 1
            log.debug("%s: write failed: %s", self.name, exc)

    async def aclose(self) -> None:
        """Remove the routes added, then the device."""
        if self.fd < 0:
            return
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.fd)
            self._reading = False
        routes, self.routes = self.routes, []

        def remove(ipr: Any) -> None:
            for network in reversed(routes):
                try:
                    ipr.route("del", dst=str(network), oif=self.index)
                except Exception as exc:
                    log.debug("removing route %s: %s", network, exc)

        try:
            if routes:
                await _netlink(remove)
        finally:
            self._dev.close()  # the device goes with it
            self.fd = -1


async def _netlink(work: Callable[[Any], Any]) -> Any:
    """``work(ipr)`` with a pyroute2 IPRoute, in a worker thread."""
    from pyroute2 import IPRoute

    def run() -> Any:
        with IPRoute() as ipr:
            return work(ipr)

    return await asyncio.to_thread(run)


def _sysctl(path: str, value: str | None = None) -> str:
    with open(path, "r+" if value is not None else "r") as f:
        old = f.read().strip()
        if value is not None and old != value:
            f.seek(0)
            f.write(value)
    return old


class Forwarding:
    """IP forwarding switched on for the given families; back as it was on close."""

    PATHS = {4: "/proc/sys/net/ipv4/ip_forward", 6: "/proc/sys/net/ipv6/conf/all/forwarding"}

    def __init__(self, versions: Iterable[int]) -> None:
        self._was: dict[int, str] = {}
        for v in sorted(set(versions)):
            try:
                old = _sysctl(self.PATHS[v], "1")
            except OSError as exc:
                self.close()
                raise VpnSetupError(f"cannot turn on IPv{v} forwarding: {exc}") from None
            if old != "1":
                self._was[v] = old
                log.info("IPv%d forwarding turned on", v)

    def close(self) -> None:
        for v, old in self._was.items():
            try:
                _sysctl(self.PATHS[v], old)
            except OSError:
                pass
        self._was.clear()


class Nat:
    """Masquerade: packets from ``networks`` leaving by any device other
    than ``device`` take that device's address (an nftables table of our own)."""

    def __init__(self, device: str, networks: Iterable[Network]) -> None:
        self.tables: list[str] = []
        for net in networks:
            family = "ip" if net.version == 4 else "ip6"
            table = f"{family} netchan_{device}"
            rules = (f"table {table} {{\n chain postrouting {{\n  type nat hook postrouting priority srcnat; "
                     f"policy accept;\n  {family} saddr {net} oifname != \"{device}\" masquerade\n }}\n}}\n")
            self._nft(rules)
            self.tables.append(table)

    def _nft(self, script: str) -> None:
        try:
            done = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True, timeout=10)
        except FileNotFoundError:
            self.close()
            raise ConfigurationError("--nat needs the nft command (Debian package nftables)") from None
        if done.returncode != 0:
            self.close()
            raise VpnSetupError(f"nft refused the NAT rules: {done.stderr.strip()}")

    def close(self) -> None:
        for table in self.tables:
            subprocess.run(["nft", "delete", "table", *table.split()], capture_output=True, timeout=10)
        self.tables.clear()

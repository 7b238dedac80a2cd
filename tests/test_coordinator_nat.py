"""Hole punching through NATs made by the test: a coordinator in a "public"
network namespace and two members, each in its own namespace behind its own
nftables masquerading router.  With port-preserving NATs (endpoint-independent
mapping) a direct path is punched and carries the traffic; with one NAT that
picks a random port for every destination (symmetric) the session stays on
the relay, and its paths say so."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

from .helpers import Namespaces, sh, why_no_netns

ROLES = str(Path(__file__).with_name("coordinator_roles.py"))


_WHY_NOT = why_no_netns("ip", "nft", packages="iproute2, nftables")
pytestmark = [pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT), pytest.mark.async_timeout(90)]


class Internet(Namespaces):
    """pub (the coordinator at 198.18.0.1), nat1/nat2 (routers whose public
    sides are 198.18.1.2 and 198.18.2.2) and c1/c2 behind them (10.1.0.2, 10.2.0.2)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.pub, self.nat1, self.nat2, self.c1, self.c2 = (f"{tag}{n}" for n in ("p", "n1", "n2", "c1", "c2"))
        super().__init__([self.pub, self.nat1, self.nat2, self.c1, self.c2])

    def make(self, symmetric: tuple[bool, bool]) -> None:
        for ns in self.namespaces:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.pub, "addr", "add", "198.18.0.1/32", "dev", "lo")
        for i, (nat, client) in enumerate(((self.nat1, self.c1), (self.nat2, self.c2)), start=1):
            sh("ip", "link", "add", f"p{i}", "netns", self.pub, "type", "veth", "peer", "name", "wan", "netns", nat)
            sh("ip", "link", "add", "lan", "netns", nat, "type", "veth", "peer", "name", "eth0", "netns", client)
            for ns, dev, addr in ((self.pub, f"p{i}", f"198.18.{i}.1/24"), (nat, "wan", f"198.18.{i}.2/24"),
                                  (nat, "lan", f"10.{i}.0.1/24"), (client, "eth0", f"10.{i}.0.2/24")):
                sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", nat, "route", "add", "default", "via", f"198.18.{i}.1")
            sh("ip", "-n", client, "route", "add", "default", "via", f"10.{i}.0.1")
            sh("ip", "netns", "exec", nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            how = "masquerade fully-random" if symmetric[i - 1] else "masquerade"
            sh("ip", "netns", "exec", nat, "nft",
               f"add table ip nat; add chain ip nat post {{ type nat hook postrouting priority 100; }}; "
               f"add rule ip nat post oifname wan {how}")
        sh("ip", "netns", "exec", self.pub, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    async def start(self, ns: str, *args: str) -> asyncio.subprocess.Process:
        return await self.spawn(ns, sys.executable, ROLES, *args)


@contextlib.asynccontextmanager
async def internet(symmetric=(False, False)):
    net = Internet(f"nx{os.getpid() % 100000}")
    await net.destroy()  # whatever an earlier run left
    try:
        net.make(symmetric)
        yield net
    finally:
        await net.destroy()


async def line(proc: asyncio.subprocess.Process, key: str, timeout: float = 30.0) -> dict:
    """The next JSON line of ``proc`` that has ``key``."""
    async def read() -> dict:
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                raise AssertionError(f"exited before saying {key!r}: {(await proc.stderr.read()).decode()[-2000:]}")
            with contextlib.suppress(ValueError):
                said = json.loads(raw)
                if key in said:
                    return said

    return await asyncio.wait_for(read(), timeout)


async def run(net: Internet, tmp_path) -> tuple[dict, int]:
    """Coordinator, bob behind nat2, alice behind nat1 dialing bob by name:
    alice's report and the bytes the coordinator relayed."""
    coord = await net.start(net.pub, "coordinator", str(tmp_path), "198.18.0.1")
    invitations = (await line(coord, "invitations"))["invitations"]
    bob = await net.start(net.c2, "serve", invitations[1])
    ready = await line(bob, "ready")
    alice = await net.start(net.c1, "dial", invitations[0], "10")
    report = await line(alice, "paths", timeout=60)
    report["bob_seen_at"] = ready["seen_at"]
    # the coordinator says what it relayed every 0.2 s: its newest count
    # (the lines before it are older)
    loop = asyncio.get_running_loop()
    until = loop.time() + 1.0
    relayed = (await line(coord, "relayed"))["relayed"]
    while loop.time() < until:
        relayed = (await line(coord, "relayed"))["relayed"]
    return report, relayed


async def test_through_two_port_preserving_nats_a_direct_path_is_punched_and_used(tmp_path):
    async with internet() as net:
        report, relayed = await run(net, tmp_path)
    assert report["echo"] == "through the relay first" and report["whole"]
    direct = [p for p in report["paths"] if p["carrier"] == "udp"]
    relay = [p for p in report["paths"] if p["carrier"] == "relay"]
    assert relay and relay[0]["state"] == "up" and not relay[0]["active"]
    # the punched path: at bob's NAT's public address, up and carrying
    assert any(p["state"] == "up" and p["active"] and "198.18.2.2" in p["url"] for p in direct), report
    assert report["direct_after"] < 5
    assert relayed < 1 << 20  # the 1 MiB echo went direct


async def test_behind_a_symmetric_nat_the_session_stays_on_the_relay_and_says_so(tmp_path):
    async with internet(symmetric=(False, True)) as net:
        report, relayed = await run(net, tmp_path)
    assert report["echo"] == "through the relay first" and report["whole"]
    direct = [p for p in report["paths"] if p["carrier"] == "udp"]
    relay = [p for p in report["paths"] if p["carrier"] == "relay"]
    assert direct and all(p["state"] == "down" and not p["active"] for p in direct), report
    assert relay[0]["state"] == "up" and relay[0]["active"]
    assert relayed > 2 << 20  # the 1 MiB echo, both ways, through the relay

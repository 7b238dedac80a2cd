"""``netchan coordinator``, ``invite``, ``revoke``, ``members`` and ``join``.

A coordinator keeps its directory in its state directory (by default
``$XDG_STATE_HOME/netchan/coordinator``: ``directory.db``, SQLite, and its
key ``coordinator.key`` unless ``--identity`` names one) or, with ``--redis``, in a Redis shared with other coordinators,
and writes ``coordinator.json`` there (its node id and addresses) so that
``netchan invite --state DIR`` can make invitations while it runs.

``netchan join INVITATION --identity KEY`` redeems an invitation once and
writes what the node needs to come back (the coordinator's id and
addresses) next to its key, as ``KEY.member``; ``serve --member`` and
``ping --member PEER`` use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable

from ..carriers.faults import parse_rate, parse_seconds
from ..coordinator import Coordinator, Invitation, RedisStore, SqliteStore, Store
from ..coordinator.saved import join_saved, member_file, read_json, write_private
from ..errors import ConfigurationError, NetchanError
from ..identity import Identity
from ..node.node import Node, Peer
from .control import serve_control
from .options import add_listening_options, identity, listening_node
from .runner import stop_on_signals

__all__ = ["add_parsers", "member_file", "join_saved", "reach", "member_listen", "add_member_option"]


def default_state() -> str:
    """The coordinator's state directory when --state is not given."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "netchan", "coordinator")


def _store(args: argparse.Namespace) -> Store:
    if getattr(args, "redis", None):
        return RedisStore(args.redis)
    return SqliteStore(os.path.join(args.state, "directory.db"))


async def _coordinator(args: argparse.Namespace) -> int:
    os.makedirs(args.state, mode=0o700, exist_ok=True)
    if not args.identity:
        # the coordinator's id is in every invitation and membership: it keeps one key
        args.identity = os.path.join(args.state, "coordinator.key")
        if not os.path.exists(args.identity):
            Identity.generate().save(args.identity)
            print(f"new key {args.identity}", flush=True)
    node = listening_node(args, others_join=True)
    rate = parse_rate(args.relay_rate)
    budget = parse_rate(args.relay_budget.removesuffix("/h")) if args.relay_budget else None
    async with node, Coordinator(node, _store(args), relay_rate=rate, relay_burst=rate / 4,
                                 relay_budget=budget) as coord:
        addresses = args.address or node.addresses
        write_private(os.path.join(args.state, "coordinator.json"),
                       {"node_id": node.node_id, "addresses": addresses})
        print(f"coordinator {node.node_id}", flush=True)
        for url in node.addresses:
            print(f"listening on {url}", flush=True)
        members = await coord.store.members()
        state = "" if args.state == default_state() else f" --state {args.state}"
        print(f"{len(members)} members; invite more with: netchan invite{state}", flush=True)

        async def directory() -> dict[str, Any]:
            return {"coordinator": {
                "members": [dataclasses.asdict(m) for m in await coord.store.members()],
                "online": [m.node_id for m in coord.online],
                "relayed_bytes": coord.counters.bytes, "relay": dataclasses.asdict(coord.counters)}}

        async with serve_control(node, args.control, directory) as control:
            print(f"control socket {control} (netchan status)", flush=True)
            with stop_on_signals() as stop:
                await stop.wait()
    return 0


def _duration(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``7d`` as seconds."""
    for unit, scale in (("d", 86400.0), ("h", 3600.0)):
        if text.endswith(unit):
            try:
                return float(text[:-1]) * scale
            except ValueError:
                break
    try:
        return parse_seconds(text)
    except NetchanError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (write 90s, 30m, 1h or 7d)") from None


async def _invite(args: argparse.Namespace) -> int:
    info = read_json(os.path.join(args.state, "coordinator.json"), "coordinator (start netchan coordinator first)")
    addresses = args.address or info["addresses"]
    store = _store(args)
    await store.open()
    try:
        ident, secret = await store.create_invitation(expires=time.time() + args.expires, uses=args.uses,
                                                      name=args.name or "", groups=tuple(args.group or ["default"]))
    finally:
        await store.aclose()
    print(Invitation(info["node_id"], addresses, ident, secret).encode())
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    store = _store(args)
    await store.open()
    try:
        member = await store.revoke(args.who)
    finally:
        await store.aclose()
    if member is None:
        print(f"netchan revoke: no member {args.who!r}", file=sys.stderr)
        return 1
    print(f"revoked {member.name} ({member.node_id}); a running coordinator lets it go within seconds")
    return 0


async def _members(args: argparse.Namespace) -> int:
    store = _store(args)
    await store.open()
    try:
        members = await store.members()
    finally:
        await store.aclose()
    for m in members:
        seen = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.last_seen)) if m.last_seen else "never"
        state = "revoked" if m.revoked else "member"
        print(f"{m.name:16} {m.node_id}  {state:8} groups {','.join(m.groups):12} last seen {seen} "
              f"{m.last_address}")
    return 0


async def _join(args: argparse.Namespace) -> int:
    if not args.identity:
        print("netchan join: --identity is needed (the membership belongs to a key that stays)", file=sys.stderr)
        return 2
    inv = Invitation.decode(args.invitation)
    async with Node(identity(args.identity), listen=args.listen or [], engine=args.engine) as node:
        welcome = await node.join(inv, name=args.name or "")
    write_private(member_file(args.identity), {"coordinator": inv.coordinator, "addresses": inv.addresses,
                                                "name": welcome.name})
    print(f"joined coordinator {inv.coordinator} as {welcome.name}; saved in {member_file(args.identity)}")
    return 0


def add_member_option(p: Any, command: str) -> None:
    """``--member`` for a command that reaches a peer (ping, tunnel)."""
    p.add_argument("--member", action="store_true",
                   help=f"reach --peer (its node id or name) through the coordinator `netchan join` saved for "
                        f"--identity, rather than at a URL ({command} needs none then)")


def member_listen(args: argparse.Namespace) -> list[str]:
    """What a node that reaches a member listens on: udp, so that a direct path can be punched to it."""
    return ["udp://0.0.0.0:0"] if getattr(args, "member", False) else []


async def reach(node: Node, args: argparse.Namespace) -> Peer:
    """The peer ``args`` name: at its URL(s), or, with ``--member``, by node id
    or name through our coordinator."""
    if args.member:
        membership = await join_saved(node, args.identity, args.timeout)
        return await membership.connect_peer(args.peer, timeout=args.timeout)
    if not args.url:
        raise ConfigurationError("give the peer's URL, or --member to reach a member by name")
    urls = args.url if len(args.url) > 1 else args.url[0]
    return await node.connect(urls, node_id=args.peer, timeout=args.timeout, paths=args.paths)


def add_parsers(sub: Any, engine_help: str, run: Callable[..., int]) -> None:
    def state_options(p: Any) -> None:
        p.add_argument("--state", default=default_state(), metavar="DIR",
                       help="the coordinator's state directory (default: %(default)s)")
        p.add_argument("--redis", metavar="URL", help="keep the directory in Redis (redis://host:6379/0), "
                                                       "shared with other coordinators")

    p = sub.add_parser("coordinator", help="run a coordinator: members join it, it introduces and relays them")
    add_listening_options(p, "connect without joining", key="coordinator.key in the state directory")
    state_options(p)
    p.add_argument("--address", action="append", default=[], metavar="URL",
                   help="where members reach us, as invitations say (default: the listening URLs)")
    p.add_argument("--relay-rate", default="64MB/s", metavar="BYTES/S", help="what each member may relay")
    p.add_argument("--relay-budget", metavar="BYTES/h", help="how much each member may relay an hour "
                                                                  "(e.g. 10GB/h; default: no bound)")
    p.add_argument("--control", metavar="PATH", help="the control socket for netchan status")
    p.add_argument("--engine", default=None, help=engine_help)
    p.set_defaults(func=lambda a: run(_coordinator(a), a.engine), log_default="info")

    p = sub.add_parser("invite", help="print a one-line invitation to a coordinator's directory")
    state_options(p)
    p.add_argument("--expires", type=_duration, default=3600.0, metavar="DURATION",
                   help="how long it stays good (90s, 30m, 1h, 7d; default 1h)")
    p.add_argument("--uses", type=int, default=1, help="how many nodes may join with it (default 1)")
    p.add_argument("--name", help="the member's name (default: the one it asks for)")
    p.add_argument("--group", action="append", metavar="GROUP",
                   help="its groups (repeatable; members meet within a group; default: default)")
    p.add_argument("--address", action="append", default=[], metavar="URL",
                   help="the coordinator's addresses to put in it (default: what the coordinator wrote)")
    p.set_defaults(func=lambda a: run(_invite(a)))

    p = sub.add_parser("revoke", help="revoke a member of a coordinator's directory (by name or node id)")
    state_options(p)
    p.add_argument("who")
    p.set_defaults(func=lambda a: run(_revoke(a)))

    p = sub.add_parser("members", help="list a coordinator's directory")
    state_options(p)
    p.set_defaults(func=lambda a: run(_members(a)))

    p = sub.add_parser("join", help="redeem an invitation: this key becomes a member of that coordinator")
    p.add_argument("invitation")
    p.add_argument("-i", "--identity", metavar="PATH", help="our key file (the membership is kept beside it)")
    p.add_argument("--name", help="the name to ask for")
    p.add_argument("--listen", action="append", metavar="URL", help="udp://HOST:PORT to announce (optional)")
    p.add_argument("--engine", default=None, help=engine_help)
    p.set_defaults(func=lambda a: run(_join(a), a.engine))

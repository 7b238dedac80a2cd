"""Options more than one command takes: how a listening node is told where
to listen, whom to admit and which key to use."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..identity import Identity
from ..node.node import Node, allow_list

__all__ = ["add_listening_options", "listening_node", "identity"]


def identity(path: str | None, announce: str = "") -> Identity:
    """The key in ``path``, or a throwaway one (said on stderr after ``announce``, if given)."""
    if path:
        return Identity.load(path)
    ident = Identity.generate()
    if announce:
        print(f"({announce}: no --identity: using a throwaway key, node {ident.node_id})", file=sys.stderr)
    return ident


def add_listening_options(p: Any, who: str = "connect", key: str = "a throwaway key") -> None:
    p.add_argument("--listen", action="append", required=True, metavar="URL",
                   help="udp://HOST:PORT, tcp://HOST:PORT (repeatable)")
    p.add_argument("--allow", action="append", default=[], metavar="ID",
                   help=f"node id allowed to {who} (repeatable; 'any' admits every key)")
    p.add_argument("-i", "--identity", metavar="PATH", help=f"key file (default: {key})")


def listening_node(args: argparse.Namespace) -> Node:
    allow = allow_list(args.allow)
    return Node(identity(args.identity), listen=args.listen, allow=allow, engine=args.engine)

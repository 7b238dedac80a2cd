"""Options more than one command takes: how a listening node is told where
to listen, whom to admit and which key to use."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..errors import ConfigurationError
from ..identity import Identity, check_node_id
from ..node.node import Node, allow_list

log = logging.getLogger("netchan")

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
    p.add_argument("--allow-file", action="append", default=[], metavar="PATH",
                   help="a file of node ids allowed, one a line, each maybe followed by a comment, as ssh's "
                        "authorized_keys (lines starting with # are comments; repeatable)")
    p.add_argument("-i", "--identity", metavar="PATH", help=f"key file (default: {key})")


def read_allow_file(path: str) -> list[str]:
    """The node ids in an authorized-keys style file; ConfigurationError
    naming the file and line of one that is not a node id."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigurationError(f"--allow-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"--allow-file {path}: not a text file") from None
    ids = []
    for number, line in enumerate(lines, 1):
        words = line.split(maxsplit=1)
        if not words or words[0].startswith("#"):
            continue
        try:
            ids.append(check_node_id(words[0]))
        except ConfigurationError:
            raise ConfigurationError(f"{path}:{number}: not a node id: {words[0]!r} (each line: a node id, "
                                     "then a comment if you like)") from None
    return ids


def allowed(args: argparse.Namespace) -> list[str]:
    """The node ids that --allow and --allow-file name (or "any")."""
    written = list(args.allow)
    for path in getattr(args, "allow_file", []):
        written += read_allow_file(path)
    return written


def listening_node(args: argparse.Namespace, others_join: bool = False) -> Node:
    """The node the options describe; unless ``others_join`` (a coordinator's
    members are let in by their invitations), a warning if it admits no one."""
    written = allowed(args)
    node = Node(identity(args.identity), listen=args.listen, allow=allow_list(written), engine=args.engine)
    if not written and not others_join:
        log.warning("no --allow or --allow-file: this node admits no one (give the node ids of its clients, "
                    "or --allow any to admit every key)")
    return node

"""A membership kept beside its key: ``netchan join`` writes ``KEY.member``
(the coordinator's node id and addresses, the name it gave, mode 0600), and
``serve --member``, ``ping --member`` and ``netchan run`` come back with it."""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import ConfigurationError
from ..node.node import Node
from .member import Membership

__all__ = ["member_file", "write_private", "read_json", "join_saved"]


def member_file(key_path: str) -> str:
    """Where ``netchan join`` keeps a node's membership: next to its key."""
    return key_path + ".member"


def write_private(path: str, data: dict[str, Any]) -> None:
    """``data`` as JSON in ``path``, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def read_json(path: str, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (ConfigurationError naming ``what`` if there is none)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigurationError(f"{path}: no {what} here") from None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{path}: cannot read the {what}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}: not a {what}")
    return data


async def join_saved(node: Node, key_path: str | None, timeout: float | None = None) -> Membership:
    """Join again the coordinator that ``netchan join`` saved for ``key_path``."""
    if not key_path:
        raise ConfigurationError("--member needs --identity (the key that joined)")
    saved = read_json(member_file(key_path), "membership (run netchan join first)")
    membership = Membership.of(node)
    await membership.join(coordinator=saved["addresses"], coordinator_id=saved["coordinator"],
                          timeout=timeout)
    return membership

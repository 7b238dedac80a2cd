"""What a running node shows of itself: ``netchan status``, the dashboard
and the control socket all read this one view."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from ..node.node import Node

__all__ = ["node_status", "channel_rows"]


def node_status(node: Node) -> dict[str, Any]:
    """The node's peers and their paths (state, RTT, loss, what each carried),
    its session counters and its channels, as plain data."""
    peers = []
    for peer in node.peers:
        peers.append({"node_id": peer.node_id, "state": peer.state, "failovers": peer.failovers,
                      "paths": [asdict(p) for p in peer.paths]})
    return {"node_id": node.node_id, "addresses": node.addresses, "peers": peers, "channels": channel_rows(node),
            "counters": asdict(node.counters), "time": time.time()}


def channel_rows(node: Node) -> list[dict[str, Any]]:
    """The channels ``node`` owns (not its topics): depth, capacity, who waits, items in."""
    rows = []
    for name, owned in node.hub.owned_all().items():
        stats = owned.statistics() if hasattr(owned, "statistics") else {}
        if "buffered" in stats:
            rows.append({"name": name, "capacity": stats["capacity"], "buffered": stats["buffered"],
                         "senders_waiting": stats["senders_waiting"],
                         "receivers_waiting": stats["receivers_waiting"], "items_in": stats["items_in"]})
    return rows

"""A Prometheus endpoint for a running node (``metrics = "127.0.0.1:9100"``).

Read at each scrape, in the event loop (aiohttp serves it there), from what
the node knows: its peers and their paths (state, round trip, probe loss,
which one carries the traffic), what its tunnels and each pipeline moved,
its channels' depths and waiting senders and receivers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .status import channel_rows
from .web import WebServer, serve_app

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["NodeCollector", "serve_metrics"]


class NodeCollector(Collector):
    """The metrics of one node run from a config."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        node = self.runtime.node
        peers = GaugeMetricFamily("netchan_peers", "Sessions with other nodes, by state", labels=["state"])
        states: dict[str, int] = {}
        for peer in node.peers:
            states[peer.state] = states.get(peer.state, 0) + 1
        for state in ("up", "reconnecting", "closed"):
            peers.add_metric([state], states.get(state, 0))
        yield peers
        labels = ["peer", "path", "carrier"]
        up = GaugeMetricFamily("netchan_path_up", "1 while a path answers its probes", labels=labels)
        active = GaugeMetricFamily("netchan_path_active", "1 while a path carries the session", labels=labels)
        rtt = GaugeMetricFamily("netchan_path_rtt_seconds", "Median round trip of a path's probes", labels=labels)
        loss = GaugeMetricFamily("netchan_path_probe_loss", "Fraction of a path's recent probes unanswered",
                                 labels=labels)
        moved = {(what, unit): CounterMetricFamily(f"netchan_path_{what}_{unit}", f"QUIC {unit} a path {what}",
                                                   labels=labels)
                 for what in ("sent", "received") for unit in ("packets", "bytes")}
        failovers = CounterMetricFamily("netchan_peer_failovers", "Times a session moved to other paths",
                                        labels=["peer"])
        for peer in node.peers:
            failovers.add_metric([peer.node_id], peer.failovers)
            for info in peer.paths:
                key = [peer.node_id, info.url, info.carrier]
                up.add_metric(key, 1.0 if info.state == "up" else 0.0)
                active.add_metric(key, 1.0 if info.active else 0.0)
                if info.rtt is not None:
                    rtt.add_metric(key, info.rtt)
                loss.add_metric(key, info.loss)
                moved["sent", "packets"].add_metric(key, info.packets_sent)
                moved["sent", "bytes"].add_metric(key, info.bytes_sent)
                moved["received", "packets"].add_metric(key, info.packets_received)
                moved["received", "bytes"].add_metric(key, info.bytes_received)
        yield from (up, active, rtt, loss, *moved.values(), failovers)
        counters = node.counters
        yield CounterMetricFamily("netchan_sessions", "Sessions authenticated", value=counters.sessions)
        yield CounterMetricFamily("netchan_redials", "Lost sessions dialed again", value=counters.redials)
        yield CounterMetricFamily("netchan_retries", "Initials answered with a Retry (address validation)",
                                  value=counters.retries)
        yield CounterMetricFamily("netchan_bad_retry_tokens", "Initials dropped for a Retry token not ours or expired",
                                  value=counters.bad_tokens)
        failures = CounterMetricFamily("netchan_handshake_failures",
                                       "Sessions that ended before they were authenticated", labels=["reason"])
        for reason, n in counters.handshake_failures.items():
            failures.add_metric([reason], n)
        yield failures
        yield from _counters("netchan_tunnel", "All tunnels of this node", [], [],
                             [self.runtime.tunnels.counters])
        pipelines = list(self.runtime.pipelines.values())
        yield from _counters("netchan_pipeline", "Per pipeline", ["pipeline"], [[p.name] for p in pipelines],
                             [p.counters for p in pipelines])
        yield from _channels(node)


def _counters(prefix: str, what: str, labels: list[str], values: list[list[str]], counters: list[Any]) -> Iterator[Metric]:
    sent = CounterMetricFamily(f"{prefix}_sent_bytes", f"{what}: bytes from local applications to the far end",
                               labels=labels)
    received = CounterMetricFamily(f"{prefix}_received_bytes", f"{what}: bytes from the far end", labels=labels)
    opened = CounterMetricFamily(f"{prefix}_connections", f"{what}: connections carried", labels=labels)
    now = GaugeMetricFamily(f"{prefix}_open_connections", f"{what}: connections open now", labels=labels)
    failed = CounterMetricFamily(f"{prefix}_failures", f"{what}: connections not made, by reason",
                                 labels=[*labels, "reason"])
    datagrams = CounterMetricFamily(f"{prefix}_datagrams", f"{what}: UDP datagrams carried", labels=labels)
    for value, c in zip(values or [[]], counters):
        sent.add_metric(value, c.bytes_out)
        received.add_metric(value, c.bytes_in)
        opened.add_metric(value, c.opened)
        now.add_metric(value, c.open)
        datagrams.add_metric(value, c.datagrams)
        for reason, n in c.errors.items():
            failed.add_metric([*value, reason], n)
    yield from (sent, received, opened, now, failed, datagrams)


def _channels(node: Any) -> Iterator[Metric]:
    labels = ["channel"]
    depth = GaugeMetricFamily("netchan_channel_depth", "Items buffered in a channel", labels=labels)
    capacity = GaugeMetricFamily("netchan_channel_capacity", "A channel's buffer capacity", labels=labels)
    senders = GaugeMetricFamily("netchan_channel_waiting_senders", "Senders waiting on a channel", labels=labels)
    receivers = GaugeMetricFamily("netchan_channel_waiting_receivers", "Receivers waiting on a channel",
                                  labels=labels)
    items = CounterMetricFamily("netchan_channel_items", "Items that went into a channel", labels=labels)
    for row in channel_rows(node):
        name = row["name"]
        depth.add_metric([name], row["buffered"])
        capacity.add_metric([name], row["capacity"])
        senders.add_metric([name], row["senders_waiting"])
        receivers.add_metric([name], row["receivers_waiting"])
        items.add_metric([name], row["items_in"])
    yield from (depth, capacity, senders, receivers, items)


async def serve_metrics(runtime: Runtime, listen: str, sock: Any = None) -> WebServer:
    """Serve ``/metrics`` on ``listen`` (``host:port``, or the socket ``sock``) until closed."""
    from aiohttp import web

    registry = CollectorRegistry()
    registry.register(NodeCollector(runtime))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return await serve_app(app, listen, sock)

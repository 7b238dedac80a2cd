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

from ..tunnels.rules import parse_hostport

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["NodeCollector", "serve_metrics", "MetricsServer"]


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
        for peer in node.peers:
            for info in peer.paths:
                key = [peer.node_id, info.url, info.carrier]
                up.add_metric(key, 1.0 if info.state == "up" else 0.0)
                active.add_metric(key, 1.0 if info.active else 0.0)
                if info.rtt is not None:
                    rtt.add_metric(key, info.rtt)
                loss.add_metric(key, info.loss)
        yield from (up, active, rtt, loss)
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
    requeued = CounterMetricFamily("netchan_channel_requeued", "Items handed out again (a taker was lost)",
                                   labels=labels)
    for name, owned in node.hub.owned_all().items():
        stats = owned.statistics() if hasattr(owned, "statistics") else {}
        if "buffered" not in stats:
            continue  # a topic
        depth.add_metric([name], stats["buffered"])
        capacity.add_metric([name], stats["capacity"])
        senders.add_metric([name], stats["senders_waiting"])
        receivers.add_metric([name], stats["receivers_waiting"])
        items.add_metric([name], stats["items_in"])
        requeued.add_metric([name], stats["requeued"])
    yield from (depth, capacity, senders, receivers, items, requeued)


class MetricsServer:
    """The HTTP server of :func:`serve_metrics`."""

    def __init__(self, runner: Any, address: str) -> None:
        self.runner, self.address = runner, address

    async def aclose(self) -> None:
        await self.runner.cleanup()


async def serve_metrics(runtime: Runtime, listen: str) -> MetricsServer:
    """Serve ``/metrics`` on ``listen`` (``host:port``) until closed."""
    from aiohttp import web

    registry = CollectorRegistry()
    registry.register(NodeCollector(runtime))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = parse_hostport(listen, default_host="127.0.0.1")
    site = web.TCPSite(runner, host or "127.0.0.1", int(port))
    await site.start()
    bound = runner.addresses[0]
    return MetricsServer(runner, f"{bound[0]}:{bound[1]}")

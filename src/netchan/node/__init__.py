"""The node layer: a node listens and dials, keeps its peers (redialing them
with backoff), offers services on streams and datagrams, and reports peers
and paths going up and down.

It knows nothing of channels, tunnels or the coordinator: those are services
registered on a node through :func:`netchan.node.node.register_extension`.

Imports only ``errors``, ``identity``, ``carriers`` and ``session``.
"""

"""The tunnel layer, to come: TCP and UDP port forwarding both ways, a SOCKS5
front end, a TUN VPN and configurable pipelines, each a service registered on
a node like the channels.

Imports only ``errors``, ``identity``, ``carriers``, ``session`` and ``node``.
"""

"""The coordinator layer, to come: a node service that keeps a directory of
clients, introduces them, relays their packets at first and helps them go
direct.

Imports only ``errors``, ``identity``, ``carriers``, ``session`` and ``node``.
"""

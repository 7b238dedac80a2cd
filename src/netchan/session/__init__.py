"""The session layer: one authenticated, encrypted QUIC session whose identity
outlives any one connection.

- ``engine``: the QUIC engines (qh3, aioquic) behind one adapter;
- ``core``: the sans-I/O session core (authentication, services, streams,
  datagrams) driven with bytes and a clock;
- ``multipath`` and ``scheduler``: several carrier paths under one session
  and the sans-I/O scheduler that probes them and picks the active ones.

Imports only ``errors``, ``identity`` and ``carriers``.
"""

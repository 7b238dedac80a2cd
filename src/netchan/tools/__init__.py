"""Tools that ship for users' tests: ``chaos`` (a TCP proxy that cuts and
blackholes, a UDP proxy with loss, delay, duplication, reordering and NAT
rebinding) and ``testing`` (a manual clock and an in-memory session pair for
sans-I/O tests).  The fault planner they share is
:mod:`netchan.carriers.faults`, which the memory carrier uses too.

Imports only from the layers below the services (``errors``, ``identity``,
``carriers``, ``session``, ``node``).
"""

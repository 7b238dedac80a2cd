"""The tunnel layer: TCP port forwarding both ways (``-L``, ``-R``) and a
SOCKS5 front end, each forwarded connection one stream of the node's
"tunnel" service, under exit rules on the side that connects out.

Imports only ``errors``, ``identity``, ``carriers``, ``session`` and ``node``.
"""

from .protocol import TunnelError
from .rules import ExitRule, ExitRules
from .service import LocalForward, RemoteForward, Tunnels

__all__ = ["Tunnels", "LocalForward", "RemoteForward", "ExitRules", "ExitRule", "TunnelError"]

"""The coordinator layer: a node service that keeps a directory of members
(joined once with an invitation, known by their key after that), introduces
them to each other and relays their end-to-end encrypted sessions.

``Coordinator(node, store)`` makes a node a coordinator; ``Membership.of(node)``
is any node's part as a member (``join``, ``connect_peer``).

Imports only ``errors``, ``identity``, ``carriers``, ``session`` and ``node``.
"""

from .member import Membership, RelayPath
from .protocol import CoordinatorError, Invitation
from .service import Coordinator, RelayCounters
from .store import DEFAULT_GROUP, Member, RedisStore, SqliteStore, Store

__all__ = ["Coordinator", "Membership", "RelayPath", "RelayCounters", "CoordinatorError", "Invitation",
           "Store", "SqliteStore", "RedisStore", "Member", "DEFAULT_GROUP"]

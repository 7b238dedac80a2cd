"""netchan: network channels and tunnels over authenticated QUIC sessions.

Sessions are encrypted, both ends are authenticated by key, and a session's
identity does not depend on any one connection: a TCP carrier cut in the
middle is redialed and the session goes on.

The package is built in layers, bottom to top; each imports only from the
ones below it (``tests/test_layers.py`` checks this):

- ``errors``, ``identity``: the exception tree and node keys, used everywhere
  (the session authenticates by key, so identity sits below it);
- ``carriers``: how packets move (udp, tcp, memory) and the fault planner;
- ``session``: QUIC engines behind one adapter, the sans-I/O session core,
  several paths per session and their scheduler;
- ``node``: peers, streams, services, listeners, redialing;
- ``channels`` (channels, select, topics, their codec and frames), and beside
  it ``tunnels`` and ``coordinator``: services registered on a node;
- ``tools``: what ships for users' tests (chaos proxies, manual clock);
- ``cli``: the command line and its demos.

This module gathers the public names of every layer.
"""

from . import carriers, errors
from .channels.channel import Channel, ChannelView, select
from .channels.local import LocalChannel
from .channels.remote import RemoteChannel
from .channels.topics import RemoteSubscription, RemoteTopic, Subscription, Topic
from .errors import (
    AuthenticationError,
    BrokenError,
    ClosedError,
    ConfigurationError,
    DatagramTooLarge,
    DirectionError,
    EndOfChannel,
    EndOfStream,
    KeyFileError,
    LocalProtocolError,
    MessageTooLarge,
    NetchanError,
    NotAllowed,
    ProtocolError,
    RemoteProtocolError,
    SchemaMismatch,
    ServiceNotFound,
    TakenBack,
    Timeout,
    WouldBlock,
)
from .identity import Identity
from .node.node import ANY, Node, Peer, Stream
from .session.engine import DEFAULT_ENGINE, ENGINES

# importing the hub registers channels and topics on every node made from now on,
# importing the tunnel service the "tunnel" service, the coordinator member part
# every node's membership
from .channels import hub  # isort: skip
from .tunnels import service as _tunnels  # isort: skip
from .coordinator import member as _members  # isort: skip

del hub, _tunnels, _members

from .version import VERSION  # noqa: E402

__version__ = VERSION

__all__ = [
    "ANY",
    "Channel",
    "ChannelView",
    "LocalChannel",
    "RemoteChannel",
    "RemoteSubscription",
    "RemoteTopic",
    "Subscription",
    "Topic",
    "select",
    "DirectionError",
    "MessageTooLarge",
    "SchemaMismatch",
    "DEFAULT_ENGINE",
    "ENGINES",
    "Identity",
    "Node",
    "Peer",
    "Stream",
    "carriers",
    "errors",
    "AuthenticationError",
    "BrokenError",
    "ClosedError",
    "ConfigurationError",
    "DatagramTooLarge",
    "EndOfChannel",
    "EndOfStream",
    "KeyFileError",
    "LocalProtocolError",
    "NetchanError",
    "NotAllowed",
    "ProtocolError",
    "RemoteProtocolError",
    "ServiceNotFound",
    "TakenBack",
    "Timeout",
    "WouldBlock",
]

"""netchan: network channels and tunnels over authenticated QUIC sessions.

Sessions are encrypted, both ends are authenticated by key, and a session's
identity does not depend on any one connection: a TCP carrier cut in the
middle is redialed and the session goes on.
"""

from . import carriers, errors
from .engine import DEFAULT_ENGINE, ENGINES
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
    Timeout,
    WouldBlock,
)
from .channels import Channel, ChannelView, LocalChannel, RemoteChannel, select
from .identity import Identity
from .node import ANY, Node, Peer, Stream
from .topics import RemoteSubscription, RemoteTopic, Subscription, Topic

__version__ = "0.1.0"

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
    "Timeout",
    "WouldBlock",
]

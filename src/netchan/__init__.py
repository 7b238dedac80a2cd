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
    EndOfChannel,
    EndOfStream,
    KeyFileError,
    LocalProtocolError,
    NetchanError,
    NotAllowed,
    ProtocolError,
    RemoteProtocolError,
    ServiceNotFound,
    Timeout,
    WouldBlock,
)
from .identity import Identity
from .node import ANY, Node, Peer, Stream

__version__ = "0.1.0"

__all__ = [
    "ANY",
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

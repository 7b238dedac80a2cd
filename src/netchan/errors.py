"""Every exception netchan raises, in one tree.

::

    NetchanError
     ├── ClosedError            you closed it (or asked for it to close)
     ├── BrokenError            the peer or the network broke it
     │    ├── EndOfStream       the peer finished sending (clean end of a byte stream)
     │    └── TakenBack         the peer reset a stream because we fell silent: reopen it
     ├── EndOfChannel           a closed channel has been drained
     ├── WouldBlock             a *_nowait call could not complete at once
     ├── Timeout                a deadline passed (also a TimeoutError)
     ├── AuthenticationError    a peer failed to prove the key we expected
     ├── NotAllowed             the peer (or we) refused by policy
     ├── ServiceNotFound        the peer has no such service
     ├── DatagramTooLarge       a datagram does not fit in one packet (also a ValueError)
     ├── MessageTooLarge        a channel item is over the size limit (also a ValueError)
     ├── SchemaMismatch         the two ends of a channel disagree on its item type
     ├── DirectionError         a send-only handle asked to receive, or the reverse (also a TypeError)
     ├── KeyFileError           a key file is missing, malformed or readable by others
     ├── ConfigurationError     bad arguments (also a ValueError)
     └── ProtocolError          the wire protocol was violated
          ├── LocalProtocolError    by us
          └── RemoteProtocolError   by the peer

Errors from the QUIC engine and from sockets are translated into this tree at the
layer that sees them; they never reach users in their original form.  Where an
error corresponds to a wire error code, the code is the class attribute ``code``.
"""

from __future__ import annotations

__all__ = [
    "NetchanError",
    "ClosedError",
    "BrokenError",
    "EndOfStream",
    "TakenBack",
    "EndOfChannel",
    "WouldBlock",
    "Timeout",
    "AuthenticationError",
    "NotAllowed",
    "ServiceNotFound",
    "DatagramTooLarge",
    "MessageTooLarge",
    "SchemaMismatch",
    "DirectionError",
    "KeyFileError",
    "ConfigurationError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
]


class NetchanError(Exception):
    """Root of every netchan exception."""

    #: application error code used on the wire when this error closes a session
    #: ("NC" in the high bytes keeps them apart from QUIC's own codes)
    code: int = 0x4E430000


class ClosedError(NetchanError):
    """The resource was closed on this side; it cannot be used any more."""


class BrokenError(NetchanError):
    """The peer or the network broke the resource (session lost, stream reset...)."""

    code = 0x4E430001


class EndOfStream(BrokenError):
    """The peer finished sending on this stream; no more data will come."""


class TakenBack(BrokenError):
    """The peer reset a stream because this node was silent past the peer's
    unresponsive time: it took back what the stream held (channel credit,
    items in hand).  Nothing else is wrong: a handle reopens and carries on."""

    code = 0x4E430007


class EndOfChannel(NetchanError):
    """The channel was closed and every item in it has been received."""


class WouldBlock(NetchanError):
    """A non-blocking operation could not complete immediately."""


class Timeout(NetchanError, TimeoutError):
    """An operation did not complete before its deadline."""


class AuthenticationError(NetchanError):
    """The peer did not prove possession of the key we expected."""

    code = 0x4E430002


class NotAllowed(NetchanError):
    """The peer is authenticated but not allowed to do this."""

    code = 0x4E430003


class ServiceNotFound(NetchanError):
    """The peer has no service registered under the requested name."""

    code = 0x4E430004


class DatagramTooLarge(NetchanError, ValueError):
    """A datagram is larger than the session can carry in one packet."""


class MessageTooLarge(NetchanError, ValueError):
    """An item is larger than the channel's message size limit."""


class SchemaMismatch(NetchanError):
    """A channel handle's codec or item type differs from the owner's."""

    code = 0x4E430006


class DirectionError(NetchanError, TypeError):
    """A send-only view was asked to receive, or a receive-only view to send."""


class KeyFileError(NetchanError):
    """A key file cannot be used: missing, malformed, or readable by others."""


class ConfigurationError(NetchanError, ValueError):
    """Invalid arguments or configuration."""


class ProtocolError(NetchanError):
    """The netchan wire protocol was violated."""

    code = 0x4E430005


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


#: wire code -> exception class, for errors that close a session
_BY_CODE: dict[int, type[NetchanError]] = {
    cls.code: cls
    for cls in (BrokenError, AuthenticationError, NotAllowed, ServiceNotFound, ProtocolError, SchemaMismatch,
                TakenBack)
}


def error_from_code(code: int, reason: str) -> NetchanError:
    """Build the exception the peer meant when it closed a session with ``code``."""
    cls = _BY_CODE.get(code, BrokenError)
    if cls is ProtocolError:
        cls = RemoteProtocolError
    return cls(reason or f"session closed by peer (code {code:#x})")

"""What members and a coordinator say to each other, and the invitation format.

A member keeps one "coordinator" stream open to its coordinator: it sends a
:class:`Join` (with an invitation, the first time) or a :class:`Hello`, gets
a :class:`Welcome`, and from then on sends :class:`Introduce` requests and
receives :class:`Introduced` notices on it, each request answered in order
by an :class:`Introduced` or a :class:`Refused` (a :class:`Forget`
comes unasked when a member is revoked).  A member that receives a
notice (it is asked of) first opens its NAT toward the asker, then says
:class:`Punched`; only then is the asker answered, so that the asker's
packets find the way open rather than taking the mapping they need.

Relayed packets travel beside the QUIC sessions between members and the
coordinator, on the same paths, as frames: a byte that no QUIC packet
begins with (:data:`RELAY_FRAME`), an 8-byte circuit number and one QUIC
packet of the two members' own session, which the coordinator cannot read
and so need not protect again.  A circuit is made by an introduction and
belongs to one ordered pair of members; a frame counts only on a path of
that circuit's member's session.
"""

from __future__ import annotations

import base64
import struct

import msgspec

from ..errors import ConfigurationError, NotAllowed
from ..identity import check_node_id

SERVICE = "coordinator"
#: the first byte of a relayed packet's frame (see Node.add_frame_handler)
RELAY_FRAME = 0x01
MAX_MESSAGE = 16 * 1024
#: a relay frame: RELAY_FRAME, the circuit, then the members' QUIC packet
RELAY_HEADER = struct.Struct("!BQ")
#: what a relayed datagram adds to the QUIC packet it carries
RELAY_OVERHEAD = RELAY_HEADER.size


class Join(msgspec.Struct, tag="join"):
    """Make me a member with invitation ``invitation`` (its id and secret)."""

    invitation: str
    secret: str
    name: str = ""
    #: where I can be reached directly (my listening URLs)
    candidates: list[str] = []
    #: my packets come from my udp listener: where you see me, I can be reached
    listening: bool = False


class Hello(msgspec.Struct, tag="hello"):
    """I am a member already (known by my key)."""

    candidates: list[str] = []
    listening: bool = False


class Welcome(msgspec.Struct, tag="welcome"):
    name: str
    #: the address this coordinator sees us at ("udp://1.2.3.4:5678"), if any
    seen_at: str = ""


class Introduce(msgspec.Struct, tag="introduce"):
    """Introduce me to ``peer`` (a node id or a member's name)."""

    peer: str


class Introduced(msgspec.Struct, tag="introduced"):
    """``peer`` and I may talk: send to it on ``circuit``; it may be reached
    at ``candidates`` (its own, then the one the coordinator sees).  Sent to
    both: to the asker in answer, to the other unasked."""

    peer: str
    circuit: int
    candidates: list[str] = []
    name: str = ""
    #: True for the member that asked (it dials), False for the other
    dialer: bool = True
    #: the largest QUIC packet the relay carries both ways
    packet_size: int = 1200


class Punched(msgspec.Struct, tag="punched"):
    """The member asked of has opened its NAT toward the asker on ``circuit``'s
    introduction: the asker may send to it directly now."""

    circuit: int


class Forget(msgspec.Struct, tag="forget"):
    """Unasked, to every member: ``peer`` is no longer a member (revoked):
    end any session with it and admit it no more."""

    peer: str
    reason: str = "revoked"


class Refused(msgspec.Struct, tag="refused"):
    """A request that was not granted: ``code`` is one of the REFUSAL codes.
    A member that is online at another coordinator of the same directory is
    refused with ``elsewhere`` and that coordinator's id and addresses."""

    code: str
    reason: str
    coordinator: str = ""
    addresses: list[str] = []


Message = Join | Hello | Welcome | Introduce | Introduced | Punched | Forget | Refused
decoder = msgspec.msgpack.Decoder(Message)

#: why a join or an introduction was refused
NOT_MEMBER = "not-member"
REVOKED = "revoked"
BAD_INVITATION = "bad-invitation"
NOT_ALLOWED = "not-allowed"
UNKNOWN_PEER = "unknown-peer"
OFFLINE = "offline"
ELSEWHERE = "elsewhere"


class CoordinatorError(NotAllowed):
    """The coordinator refused: ``refusal`` says why (not-member, revoked,
    bad-invitation, not-allowed, unknown-peer, offline)."""

    def __init__(self, refusal: str, reason: str, elsewhere: tuple[str, list[str]] | None = None) -> None:
        super().__init__(reason)
        self.refusal = refusal
        #: (coordinator id, addresses) of the coordinator to ask instead
        self.elsewhere = elsewhere


# -- invitations -----------------------------------------------------------------------

_PREFIX = "netchan-invite:"


class Invitation(msgspec.Struct, array_like=True):
    """What a new node needs to join: the coordinator's key and addresses, and
    a secret it redeems once (``id`` names the invitation, ``secret`` proves it)."""

    coordinator: str
    addresses: list[str]
    id: str
    secret: str

    def encode(self) -> str:
        """One line: ``netchan-invite:`` and the invitation in base64."""
        raw = msgspec.msgpack.encode(self)
        return _PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Invitation:
        text = text.strip()
        if not text.startswith(_PREFIX):
            raise ConfigurationError(f"not a netchan invitation (it starts with {_PREFIX!r})")
        body = text[len(_PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            inv = msgspec.msgpack.decode(raw, type=cls)
            check_node_id(inv.coordinator)
        except (ValueError, msgspec.DecodeError, ConfigurationError) as exc:
            raise ConfigurationError(f"this invitation is damaged ({exc}); ask for it again") from None
        if not inv.addresses:
            raise ConfigurationError("this invitation names no address of its coordinator")
        return inv

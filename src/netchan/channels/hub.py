"""A node's channels and topics: :class:`ChannelHub` is the channel layer's
extension on a node.  It owns the node's channels and topics by name, serves
the stream service every remote handle opens, turns channel references
received in items into handles, and flushes the node's remote handles when
the node closes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import weakref
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from cryptography.hazmat.primitives import serialization

from ..errors import (
    BrokenError,
    ClosedError,
    ConfigurationError,
    EndOfStream,
    NetchanError,
    NotAllowed,
    ProtocolError,
    RemoteProtocolError,
    SchemaMismatch,
    ServiceNotFound,
)
from ..identity import check_node_id, node_id_set
from ..node.service import register_extension
from . import frames as w
from .channel import Channel, ChannelView, Operation, SelectGroup
from .codec import DEFAULT_MAX_MESSAGE, Reference, make_codec
from .local import LocalChannel, broken
from .remote import SERVICE, RemoteChannel
from .wire import HANDSHAKE_TIMEOUT, Wire, read_one

if TYPE_CHECKING:
    from ..node.node import Node, Peer, Stream
    from .topics import RemoteSubscription, RemoteTopic, Subscription, Topic

__all__ = ["ChannelHub"]

log = logging.getLogger("netchan.channels")

#: channel and topic handles one peer may have open at this node at once (a
#: newcomer past it is refused; the streams per session are limited anyway)
MAX_HANDLES_PER_PEER = 4096


class ChannelHub:
    """A node's channels and topics: owned ones by name, handles to remote ones."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._owned: dict[str, Any] = {}  # name -> LocalChannel | Topic
        #: handles each peer has open here (see MAX_HANDLES_PER_PEER)
        self._handles_of: dict[str, int] = {}
        #: the key of this node's seals on references (stable across restarts)
        self._ref_key = hashlib.sha256(b"netchan channel references\0" + node.identity.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())).digest()
        #: handles made from references in items, one per (owner, name, kind,
        #: direction); weak, so references that pass through leave nothing behind
        self._refs: weakref.WeakValueDictionary[tuple[str, str, str, str], Channel] = \
            weakref.WeakValueDictionary()
        #: every remote channel handle of this node, flushed when the node closes
        self._handles: weakref.WeakSet[RemoteChannel] = weakref.WeakSet()
        node.serve(SERVICE, self._serve)

    def channel(
        self,
        name: str | None = None,
        capacity: int = 0,
        *,
        codec: str | None = None,
        type: Any = None,
        allow_send: Iterable[str] | None = None,
        allow_recv: Iterable[str] | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> LocalChannel:
        if name is None:
            name = "~" + secrets.token_urlsafe(18)
        if not isinstance(name, str) or not name:
            raise ConfigurationError("a channel name is a non-empty string")
        if name in self._owned:
            raise ConfigurationError(f"this node already has a channel or topic named {name!r}")
        if not isinstance(capacity, int) or capacity < 0:
            raise ConfigurationError("capacity must be an int >= 0")
        chan = LocalChannel(
            self,
            name,
            capacity,
            make_codec(codec, type, self.resolve, max_message),
            node_id_set(allow_send),
            node_id_set(allow_recv),
        )
        self._owned[name] = chan
        return chan

    def topic(self, name: str, **options: Any) -> Topic:
        """A broadcast topic owned by this node (see :meth:`netchan.Node.topic`)."""
        from .topics import Topic

        topic = Topic(self, name, **options)
        self.add_topic(topic)
        return topic

    def subscribe(self, name: str, *, buffer: int | None = None) -> Subscription:
        """Subscribe to one of this node's own topics."""
        from .topics import Topic

        topic = self._owned.get(name)
        if not isinstance(topic, Topic):
            raise ServiceNotFound(f"this node has no topic {name!r}")
        return topic.subscribe(buffer=buffer)

    async def open_channel(self, peer: Peer, name: str, **options: Any) -> RemoteChannel:
        """A handle to ``peer``'s channel ``name`` (see :meth:`netchan.Peer.channel`)."""
        handle = RemoteChannel(self, peer.node_id, name, peer=peer, **options)
        await handle._ready()
        return handle

    async def open_topic(self, peer: Peer, name: str, **options: Any) -> RemoteTopic:
        """A handle to publish on ``peer``'s topic ``name``."""
        from .topics import RemoteTopic

        handle = RemoteTopic(self, peer, name, **options)
        await handle._ready()
        return handle

    async def open_subscription(self, peer: Peer, name: str, **options: Any) -> RemoteSubscription:
        """A subscription to ``peer``'s topic ``name``."""
        from .topics import RemoteSubscription

        sub = RemoteSubscription(self, peer, name, **options)
        await sub._ready()
        return sub

    def add_topic(self, topic: Any) -> None:
        if topic.name in self._owned:
            raise ConfigurationError(f"this node already has a channel or topic named {topic.name!r}")
        self._owned[topic.name] = topic

    def owned(self, name: str) -> Any:
        return self._owned.get(name)

    def owned_all(self) -> dict[str, Any]:
        """This node's channels and topics, by name."""
        return dict(self._owned)

    def track(self, handle: RemoteChannel) -> None:
        """``handle`` is flushed when the node closes."""
        self._handles.add(handle)

    def forget(self, obj: Any) -> None:
        """An owned channel or topic is over: its name is free again."""
        name = obj.name
        if self._owned.get(name) is obj:
            del self._owned[name]

    # -- handles to channels elsewhere ----------------------------------------------

    def seal(self, kind: str, name: str) -> bytes:
        """This node's seal on references to its ``kind`` ``name``."""
        return hmac.new(self._ref_key, f"{kind}\0{name}".encode(), hashlib.sha256).digest()[:16]

    def resolve(self, owner: str, name: str, kind: str, direction: str, addresses: list[str], seal: bytes) -> Any:
        """The handle a channel reference received in an item stands for."""
        check_node_id(owner)
        if direction not in ("both", "send", "recv"):
            raise RemoteProtocolError(f"bad direction {direction!r} in a channel reference")
        if kind != "channel":
            raise RemoteProtocolError(f"unknown kind {kind!r} in a reference")
        if owner == self.node.node_id:
            if not hmac.compare_digest(seal, self.seal(kind, name)):
                raise RemoteProtocolError(f"a reference to channel {name!r} that this node never gave out")
            chan = self._owned.get(name)
            if not isinstance(chan, LocalChannel):
                chan = _Missing(self, name)
            return chan if direction == "both" else ChannelView(chan, direction)
        key = (owner, name, kind, direction)
        handle = self._refs.get(key)
        if handle is None or (isinstance(handle, RemoteChannel) and handle.defunct):
            handle = RemoteChannel(self, owner, name, direction=direction, addresses=addresses, from_ref=True,
                                   seal=seal)
            self._refs[key] = handle
        return handle

    def forget_reference(self, handle: RemoteChannel) -> None:
        """``handle``, made from a reference, is over: a new reference makes a new one."""
        key = (handle.owner, handle.name, "channel", handle.direction)
        if self._refs.get(key) is handle:
            del self._refs[key]

    async def peer_for(self, owner: str, addresses: Sequence[str], hint: Peer | None) -> Peer:
        """A session with ``owner``: the one we have (either direction), or a new one."""
        if hint is not None and not hint.closed:
            return hint
        for peer in self.node.peers:
            if peer.node_id == owner:
                return peer
        errors = []
        for url in addresses:
            try:
                return await self.node.connect(url, owner)
            except NetchanError as exc:
                errors.append(f"{url}: {exc}")
        detail = "; ".join(errors) if errors else "no address known"
        raise BrokenError(f"cannot reach channel owner {owner} ({detail})")

    # -- the service ------------------------------------------------------------------

    async def _serve(self, stream: Stream, peer: Peer) -> None:
        wire = Wire(stream, w.max_frame(DEFAULT_MAX_MESSAGE))
        wire.start()
        counted = self._handles_of.get(peer.node_id, 0)
        self._handles_of[peer.node_id] = counted + 1
        try:
            if counted >= MAX_HANDLES_PER_PEER:
                raise NotAllowed(f"node {peer.node_id} has {MAX_HANDLES_PER_PEER} channel and topic handles open "
                                 "here already: no more")
            hello = w.handshake(await read_one(wire, HANDSHAKE_TIMEOUT), w.Hello)
            obj = self._owned.get(hello.name)
            kind = hello.kind
            if hello.seal is not None and not hmac.compare_digest(hello.seal, self.seal(kind, hello.name)):
                raise RemoteProtocolError(f"a handle opened from a forged reference to {kind} {hello.name!r}")
            try:
                if obj is None or obj.kind != kind:
                    raise ServiceNotFound(f"node {self.node.node_id} has no {kind} {hello.name!r}")
                directions = _admit(obj, peer.node_id, hello)
            except (ServiceNotFound, NotAllowed, SchemaMismatch) as exc:
                if isinstance(exc, NotAllowed):
                    broken.info(("refused", peer.node_id), "channel service: %s", exc)
                wire.send(w.Reply(ok=False, code=exc.code, reason=str(exc)))
                wire.finish()
                await asyncio.sleep(0)
                await stream.receive(1)  # until the handle goes (or the node closes)
                return
            wire.max_frame = w.max_frame(obj.codec.max_message)
            await obj.serve_handle(wire, peer, hello, directions)
        except (EndOfStream, BrokenError, ClosedError):
            pass
        except (ProtocolError, NotAllowed) as exc:
            broken.warning(("channel", peer.node_id), "channel service: %s from %s", exc, peer.node_id)
            wire.send(w.Reply(ok=False, code=exc.code, reason=str(exc)))
            wire.finish()
        finally:
            left = self._handles_of.get(peer.node_id, 1) - 1
            if left > 0:
                self._handles_of[peer.node_id] = left
            else:
                self._handles_of.pop(peer.node_id, None)
            await wire.aclose()

    async def aclose(self, timeout: float = 5.0) -> list[NetchanError]:
        """Close every remote handle, delivering what they owe first (for up to
        ``timeout`` seconds); returns the errors of those that could not."""
        handles = list(self._handles)
        results = await asyncio.gather(*(h.aclose(timeout) for h in handles), return_exceptions=True)
        self._refs.clear()
        errors = []
        for handle, result in zip(handles, results):
            if isinstance(result, NetchanError):
                errors.append(result)
            elif isinstance(result, BaseException):
                log.error("closing %r: %r", handle, result)  # the node closes all the same
        return errors


def _admit(chan: Any, node_id: str, hello: w.Hello) -> set[str]:
    """Which directions ``node_id`` may use; NotAllowed / SchemaMismatch otherwise."""
    asked = hello.dir
    wanted: set[str] = {"send", "recv"} if asked == "both" else {asked}
    allowed = set()
    if chan.allow_send is None or node_id in chan.allow_send:
        allowed.add("send")
    if chan.allow_recv is None or node_id in chan.allow_recv:
        allowed.add("recv")
    granted = wanted & allowed
    if not granted or (asked != "both" and granted != wanted):
        raise NotAllowed(f"node {node_id} may not {'use' if asked == 'both' else asked} {chan.kind} {chan.name!r}")
    codec = chan.codec
    if hello.schema != codec.schema and (hello.schema is not None or codec.schema is not None):
        if codec.schema is not None and hello.schema is None:
            raise SchemaMismatch(f"{chan.kind} {chan.name!r} carries typed items: open it with type=...")
        raise SchemaMismatch(f"{chan.kind} {chan.name!r}: the item type differs from the owner's")
    if hello.codec not in (None, codec.name):
        raise SchemaMismatch(f"{chan.kind} {chan.name!r} uses the {codec.name} codec, not {hello.codec}")
    return granted


class _Missing(Channel):
    """A reference to a channel of ours that no longer exists."""

    def __init__(self, hub: ChannelHub, name: str) -> None:
        self._hub = hub
        self.name = name
        self.capacity = 0

    def _reference(self) -> Reference:
        return (self._hub.node.node_id, self.name, "channel", "both", self._hub.node.addresses,
                self._hub.seal("channel", self.name))

    async def _ready(self) -> None:
        raise ServiceNotFound(f"this node has no channel {self.name!r} any more")

    def _start_send(self, value: Any, group: SelectGroup | None, index: int) -> Operation:
        raise ServiceNotFound(f"this node has no channel {self.name!r} any more")

    _start_recv = _start_send  # type: ignore[assignment]

    async def close(self) -> None:
        pass


register_extension("channels", ChannelHub)

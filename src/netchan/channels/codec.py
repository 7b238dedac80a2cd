"""How channel items become bytes, and back.

* ``"msgpack"`` (the default): None, bool, int, float, str, bytes, lists,
  dicts, and channel handles anywhere inside (as MessagePack extension 1).
* ``"raw"``: bytes only, passed through untouched.
* ``type=T``: typed items (msgspec structs, dataclasses, or any type msgspec
  can validate), checked on both ends; the type's schema fingerprint is
  compared when a handle opens, so two ends that disagree fail early with
  SchemaMismatch instead of mid-stream.
* ``"pickle"``: only when asked for by name, and only between nodes that
  trust each other with code execution.

A channel reference travels as ``[owner node id, name, kind, direction,
[owner addresses]]``; the receiving node turns it into a working handle.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from typing import Any, Callable

import msgspec

from ..errors import ConfigurationError, MessageTooLarge, ProtocolError, RemoteProtocolError

__all__ = ["Codec", "Sendable", "make_codec", "CHANNEL_EXT", "DEFAULT_MAX_MESSAGE"]

#: MessagePack extension code of a channel reference
CHANNEL_EXT = 1
#: largest encoded item, by default (a channel option)
DEFAULT_MAX_MESSAGE = 1024 * 1024
#: channel references one item may carry at most (each makes a handle)
MAX_REFERENCES = 64



#: what a channel reference says: (owner, name, kind, direction, the owner's
#: addresses, its seal); the seal is the owner's MAC of the kind and the name,
#: so that no peer can refer to a channel of a node that never gave it out
Reference = tuple[str, str, str, str, list[str], bytes]


class Sendable:
    """What may travel inside an item: a handle sent as a reference that the
    receiving node turns into a handle of its own (channels subclass it)."""

    __slots__ = ()

    def _reference(self) -> Reference:
        """(owner, name, kind, direction, addresses, seal) of what this handle reaches."""
        raise NotImplementedError


#: (owner, name, kind, direction, addresses, seal) -> a handle on this node
RefResolver = Callable[[str, str, str, str, list[str], bytes], Sendable]

_ref_encoder = msgspec.msgpack.Encoder()
_ref_decoder = msgspec.msgpack.Decoder(Reference)


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Sendable):
        return msgspec.msgpack.Ext(CHANNEL_EXT, _ref_encoder.encode(obj._reference()))
    raise NotImplementedError(f"cannot send a {type(obj).__name__} in a channel item")


class Codec:
    """Encodes and decodes the items of one channel handle."""

    name = "msgpack"

    def __init__(self, resolver: RefResolver | None, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._resolver = resolver
        self._refs_left = MAX_REFERENCES
        self.schema: str | None = None
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        self._decoder = self._make_decoder()

    def _make_decoder(self) -> msgspec.msgpack.Decoder[Any]:
        return msgspec.msgpack.Decoder(ext_hook=self._ext_hook)

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code != CHANNEL_EXT:
            raise RemoteProtocolError(f"unknown extension {code} in an item")
        if self._resolver is None:
            raise RemoteProtocolError("channel references cannot be received here")
        self._refs_left -= 1
        if self._refs_left < 0:
            raise RemoteProtocolError(f"more than {MAX_REFERENCES} channel references in one item")
        return self._resolver(*_ref_decoder.decode(data))

    def encode(self, value: Any) -> bytes:
        """Bytes of ``value``; MessageTooLarge over the limit, TypeError if not encodable."""
        try:
            data = self._encoder.encode(value)
        except (NotImplementedError, TypeError, OverflowError) as exc:
            raise TypeError(f"cannot encode item with {self.name}: {exc}") from None
        if len(data) > self.max_message:
            raise MessageTooLarge(f"item of {len(data)} bytes is over the limit of {self.max_message}")
        return data

    def encode_many(self, values: list[Any]) -> list[bytes]:
        """``encode`` of each value (all or nothing)."""
        try:
            datas = [self._encoder.encode(v) for v in values]
        except (NotImplementedError, TypeError, OverflowError) as exc:
            raise TypeError(f"cannot encode item with {self.name}: {exc}") from None
        self._check_sizes(datas)
        return datas

    def _check_sizes(self, datas: list[bytes]) -> None:
        if max(map(len, datas), default=0) > self.max_message:
            big = max(map(len, datas))
            raise MessageTooLarge(f"item of {big} bytes is over the limit of {self.max_message}")

    def decode(self, data: bytes | memoryview) -> Any:
        """The value in ``data``; RemoteProtocolError if it is malformed."""
        self._refs_left = MAX_REFERENCES
        try:
            return self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, RecursionError) as exc:
            raise RemoteProtocolError(f"malformed item: {exc}") from None
        except ProtocolError:
            raise
        except Exception as exc:  # from the reference resolver, say: still the item's fault
            raise RemoteProtocolError(f"malformed item: {exc}") from None


class RawCodec(Codec):
    name = "raw"

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"a raw channel carries bytes, not {type(value).__name__}")
        data = value if type(value) is bytes else bytes(value)
        if len(data) > self.max_message:
            raise MessageTooLarge(f"item of {len(data)} bytes is over the limit of {self.max_message}")
        return data

    def encode_many(self, values: list[Any]) -> list[bytes]:
        if set(map(type, values)) - {bytes}:
            return [self.encode(v) for v in values]
        self._check_sizes(values)
        return values if isinstance(values, list) else list(values)

    def decode(self, data: bytes | memoryview) -> Any:
        return bytes(data)


class PickleCodec(Codec):
    name = "pickle"

    def encode_many(self, values: list[Any]) -> list[bytes]:
        return [self.encode(v) for v in values]

    def encode(self, value: Any) -> bytes:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > self.max_message:
            raise MessageTooLarge(f"item of {len(data)} bytes is over the limit of {self.max_message}")
        return data

    def decode(self, data: bytes | memoryview) -> Any:
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise RemoteProtocolError(f"malformed pickled item: {exc}") from None


class TypedCodec(Codec):
    name = "typed"

    def __init__(self, type_: Any, resolver: RefResolver | None, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.type = type_
        super().__init__(resolver, max_message)
        self.schema = schema_fingerprint(type_)

    def _make_decoder(self) -> msgspec.msgpack.Decoder[Any]:
        return msgspec.msgpack.Decoder(self.type, ext_hook=self._ext_hook, dec_hook=_dec_hook)

    def encode_many(self, values: list[Any]) -> list[bytes]:
        return [self.encode(v) for v in values]

    def encode(self, value: Any) -> bytes:
        if isinstance(self.type, type) and not isinstance(value, self.type):
            raise TypeError(f"this channel carries {self.type.__name__}, not {type(value).__name__}")
        return super().encode(value)


def _dec_hook(type_: Any, obj: Any) -> Any:
    if isinstance(type_, type) and isinstance(obj, type_):
        return obj  # a channel handle made by the extension hook
    raise NotImplementedError


def _schema_hook(type_: Any) -> dict[str, Any]:
    if isinstance(type_, type) and issubclass(type_, Sendable):
        return {"type": "netchan-channel"}
    raise NotImplementedError


def schema_fingerprint(type_: Any) -> str:
    """A short hash of ``type_``'s JSON schema: equal types, equal fingerprints."""
    try:
        schema = msgspec.json.schema(type_, schema_hook=_schema_hook)
    except (TypeError, NotImplementedError) as exc:
        raise ConfigurationError(f"cannot use {type_!r} as a channel item type: {exc}") from None
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def make_codec(
    codec: str | None,
    type_: Any,
    resolver: RefResolver | None,
    max_message: int = DEFAULT_MAX_MESSAGE,
) -> Codec:
    """The codec named ``codec`` (or typed by ``type_``)."""
    if type_ is not None:
        if codec not in (None, "msgpack", "typed"):
            raise ConfigurationError("type= works with the msgpack codec only")
        return TypedCodec(type_, resolver, max_message)
    if codec in (None, "msgpack"):
        return Codec(resolver, max_message)
    if codec == "raw":
        return RawCodec(resolver, max_message)
    if codec == "pickle":
        return PickleCodec(resolver, max_message)
    raise ConfigurationError(f"unknown codec {codec!r} (msgpack, raw, pickle, or type=...)")

"""The coordinator's directory: members, their names and groups, invitations.

A store is a small async interface; :class:`SqliteStore` keeps it in one
SQLite file (embedded, nothing to run), so that a restarted coordinator
still knows its members.  Invitation secrets are kept only as SHA-256
digests and compared in constant time.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiosqlite

from ..identity import check_node_id
from .protocol import BAD_INVITATION, NOT_ALLOWED, CoordinatorError

__all__ = ["Member", "Store", "SqliteStore", "RedisStore", "DEFAULT_GROUP"]

#: the group every member is in unless its invitation says otherwise
DEFAULT_GROUP = "default"


@dataclass(frozen=True)
class Member:
    node_id: str
    name: str
    groups: tuple[str, ...] = (DEFAULT_GROUP,)
    revoked: bool = False
    #: the last address the coordinator saw it at, and when (time.time())
    last_address: str = ""
    last_seen: float = 0.0


@dataclass(frozen=True)
class InvitationRecord:
    id: str
    name: str
    groups: tuple[str, ...]
    expires: float
    uses_left: int
    created: float = field(default=0.0)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Store(abc.ABC):
    """Where a coordinator keeps its directory."""

    async def open(self) -> None:
        """Ready the store (create what is missing)."""

    async def aclose(self) -> None:
        """Let go of the store's resources."""

    @abc.abstractmethod
    async def create_invitation(self, *, expires: float, uses: int = 1, name: str = "",
                                groups: tuple[str, ...] = (DEFAULT_GROUP,)) -> tuple[str, str]:
        """A new invitation valid until ``expires`` (time.time()) for ``uses``
        joins: its (id, secret); only the secret's digest is kept."""

    @abc.abstractmethod
    async def redeem(self, invitation: str, secret: str, node_id: str, name: str) -> Member:
        """Use one of the invitation's joins for ``node_id`` (a member known
        already gets its record back and uses nothing); CoordinatorError
        (bad-invitation) if it is unknown, wrong, used up or expired."""

    @abc.abstractmethod
    async def member(self, node_id: str) -> Member | None: ...

    @abc.abstractmethod
    async def member_named(self, name: str) -> Member | None: ...

    @abc.abstractmethod
    async def members(self) -> list[Member]: ...

    @abc.abstractmethod
    async def revoke(self, who: str) -> Member | None:
        """Revoke a member by node id or name; the member, or None if unknown."""

    @abc.abstractmethod
    async def seen(self, node_id: str, address: str) -> None:
        """Record where a member was just seen."""

    # presence, for coordinators that share a directory (a store of one
    # coordinator needs none: it knows who is online)

    async def set_online(self, node_id: str, coordinator: str, addresses: list[str], ttl: float) -> None:
        """``node_id`` is online at ``coordinator`` (reached at ``addresses``)
        for ``ttl`` seconds unless said again."""

    async def set_offline(self, node_id: str, coordinator: str) -> None:
        """``node_id`` left ``coordinator`` (if it is still recorded there)."""

    async def where_online(self, node_id: str) -> tuple[str, list[str]] | None:
        """The coordinator ``node_id`` is online at, and its addresses."""
        return None

    async def revocations(self) -> AsyncIterator[str]:
        """Node ids as other coordinators of a shared directory revoke them
        (a store of one coordinator has none to tell)."""
        return
        yield


class SqliteStore(Store):
    """The directory in one SQLite file (``:memory:`` for a throwaway one)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        if self._db is not None:
            return
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA busy_timeout=5000")  # `netchan invite` writes while the coordinator runs
        await db.executescript("""
            CREATE TABLE IF NOT EXISTS members (
                node_id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, groups TEXT NOT NULL,
                revoked INTEGER NOT NULL DEFAULT 0, joined REAL NOT NULL,
                last_address TEXT NOT NULL DEFAULT '', last_seen REAL NOT NULL DEFAULT 0);
            CREATE TABLE IF NOT EXISTS invitations (
                id TEXT PRIMARY KEY, digest BLOB NOT NULL, name TEXT NOT NULL, groups TEXT NOT NULL,
                expires REAL NOT NULL, uses_left INTEGER NOT NULL, created REAL NOT NULL);
        """)
        if self.path != ":memory:":
            os.chmod(self.path, 0o600)  # it names every member; keep it the coordinator's
        self._db = db

    async def aclose(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the store is not open")
        return self._db

    async def create_invitation(self, *, expires: float, uses: int = 1, name: str = "",
                                groups: tuple[str, ...] = (DEFAULT_GROUP,)) -> tuple[str, str]:
        if uses < 1:
            raise ValueError("an invitation needs at least one use")
        ident, secret = secrets.token_hex(8), secrets.token_urlsafe(24)
        await self.db.execute(
            "INSERT INTO invitations VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ident, _digest(secret), name, json.dumps(list(groups)), expires, uses, time.time()))
        return ident, secret

    async def redeem(self, invitation: str, secret: str, node_id: str, name: str) -> Member:
        node_id = check_node_id(node_id)
        db = self.db
        known = await self.member(node_id)
        if known is not None and not known.revoked:
            return known
        await db.execute("BEGIN IMMEDIATE")
        try:
            async with db.execute("SELECT digest, name, groups, expires, uses_left FROM invitations WHERE id = ?",
                                  (invitation,)) as cur:
                row = await cur.fetchone()
            # one answer for every way an invitation can be wrong: a guesser learns nothing
            wrong = CoordinatorError(BAD_INVITATION, "this invitation is unknown, used up or expired")
            if row is None or not hmac.compare_digest(row[0], _digest(secret)):
                raise wrong
            if row[4] < 1 or row[3] < time.time():
                raise wrong
            if known is not None:  # revoked: an invitation does not undo that
                raise CoordinatorError(NOT_ALLOWED, "this node was revoked")
            chosen = row[1] or name or node_id[:8]
            async with db.execute("SELECT node_id FROM members WHERE name = ?", (chosen,)) as cur:
                if await cur.fetchone() is not None:
                    raise CoordinatorError(NOT_ALLOWED, f"the name {chosen!r} is taken")
            await db.execute("UPDATE invitations SET uses_left = uses_left - 1 WHERE id = ?", (invitation,))
            await db.execute("INSERT INTO members (node_id, name, groups, joined) VALUES (?, ?, ?, ?)",
                             (node_id, chosen, row[2], time.time()))
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        return Member(node_id, chosen, tuple(json.loads(row[2])))

    _COLUMNS = "node_id, name, groups, revoked, last_address, last_seen"

    @staticmethod
    def _member(row: tuple) -> Member:
        return Member(row[0], row[1], tuple(json.loads(row[2])), bool(row[3]), row[4], row[5])

    async def _one(self, where: str, value: str) -> Member | None:
        async with self.db.execute(f"SELECT {self._COLUMNS} FROM members WHERE {where} = ?", (value,)) as cur:
            row = await cur.fetchone()
        return None if row is None else self._member(tuple(row))

    async def member(self, node_id: str) -> Member | None:
        return await self._one("node_id", node_id)

    async def member_named(self, name: str) -> Member | None:
        return await self._one("name", name)

    async def members(self) -> list[Member]:
        async with self.db.execute(f"SELECT {self._COLUMNS} FROM members ORDER BY name") as cur:
            return [self._member(tuple(row)) for row in await cur.fetchall()]

    async def revoke(self, who: str) -> Member | None:
        found = await self.member(who.lower()) or await self.member_named(who)
        if found is None:
            return None
        await self.db.execute("UPDATE members SET revoked = 1 WHERE node_id = ?", (found.node_id,))
        return await self.member(found.node_id)

    async def seen(self, node_id: str, address: str) -> None:
        await self.db.execute("UPDATE members SET last_address = ?, last_seen = ? WHERE node_id = ?",
                              (address, time.time(), node_id))


class RedisStore(Store):
    """The directory in Redis, for several coordinators that share it (the
    ``redis`` package; ``url`` as ``redis://host:6379/0`` or
    ``unix:///path/redis.sock``).  Keys start with ``prefix``.  Each
    coordinator also records there which members are online at it, so that
    another coordinator sends members that ask for them its way."""

    _REDEEM = """
        local uses = tonumber(redis.call('HGET', KEYS[1], 'uses_left') or '0')
        local expires = tonumber(redis.call('HGET', KEYS[1], 'expires') or '0')
        if uses < 1 or expires < tonumber(ARGV[1]) then return 0 end
        redis.call('HINCRBY', KEYS[1], 'uses_left', -1)
        return 1
    """

    def __init__(self, url: str, prefix: str = "netchan:") -> None:
        self.url, self.prefix = url, prefix
        self._redis: Any = None

    async def open(self) -> None:
        if self._redis is None:
            import redis.asyncio  # optional: pip install redis

            self._redis = redis.asyncio.Redis.from_url(self.url, decode_responses=True)
            await self._redis.ping()

    async def aclose(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    @property
    def r(self) -> Any:
        if self._redis is None:
            raise RuntimeError("the store is not open")
        return self._redis

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def create_invitation(self, *, expires: float, uses: int = 1, name: str = "",
                                groups: tuple[str, ...] = (DEFAULT_GROUP,)) -> tuple[str, str]:
        if uses < 1:
            raise ValueError("an invitation needs at least one use")
        ident, secret = secrets.token_hex(8), secrets.token_urlsafe(24)
        key = self._key("invitation", ident)
        await self.r.hset(key, mapping={"digest": _digest(secret).hex(), "name": name,
                                        "groups": json.dumps(list(groups)), "expires": expires, "uses_left": uses})
        await self.r.expireat(key, int(expires) + 1)
        return ident, secret

    async def redeem(self, invitation: str, secret: str, node_id: str, name: str) -> Member:
        node_id = check_node_id(node_id)
        known = await self.member(node_id)
        if known is not None and not known.revoked:
            return known
        key = self._key("invitation", invitation)
        record = await self.r.hgetall(key)
        wrong = CoordinatorError(BAD_INVITATION, "this invitation is unknown, used up or expired")
        if not record or not hmac.compare_digest(bytes.fromhex(record["digest"]), _digest(secret)):
            raise wrong
        if known is not None:
            raise CoordinatorError(NOT_ALLOWED, "this node was revoked")
        if not await self.r.eval(self._REDEEM, 1, key, time.time()):
            raise wrong
        chosen = record["name"] or name or node_id[:8]
        if not await self.r.set(self._key("name", chosen), node_id, nx=True):
            await self.r.hincrby(key, "uses_left", 1)  # the use is not spent on a refusal
            raise CoordinatorError(NOT_ALLOWED, f"the name {chosen!r} is taken")
        member = Member(node_id, chosen, tuple(json.loads(record["groups"])))
        await self.r.hset(self._key("member", node_id), mapping={
            "name": chosen, "groups": record["groups"], "revoked": 0, "last_address": "", "last_seen": 0})
        await self.r.sadd(self._key("members"), node_id)
        return member

    async def member(self, node_id: str) -> Member | None:
        record = await self.r.hgetall(self._key("member", node_id))
        if not record:
            return None
        return Member(node_id, record["name"], tuple(json.loads(record["groups"])), record["revoked"] == "1",
                      record.get("last_address", ""), float(record.get("last_seen", 0)))

    async def member_named(self, name: str) -> Member | None:
        node_id = await self.r.get(self._key("name", name))
        return None if node_id is None else await self.member(node_id)

    async def members(self) -> list[Member]:
        found = [await self.member(n) for n in await self.r.smembers(self._key("members"))]
        return sorted((m for m in found if m is not None), key=lambda m: m.name)

    async def revoke(self, who: str) -> Member | None:
        found = await self.member(who.lower()) or await self.member_named(who)
        if found is None:
            return None
        await self.r.hset(self._key("member", found.node_id), "revoked", 1)
        await self.r.publish(self._key("revoked"), found.node_id)
        return await self.member(found.node_id)

    async def seen(self, node_id: str, address: str) -> None:
        await self.r.hset(self._key("member", node_id), mapping={"last_address": address, "last_seen": time.time()})

    async def set_online(self, node_id: str, coordinator: str, addresses: list[str], ttl: float) -> None:
        await self.r.set(self._key("online", node_id), json.dumps([coordinator, addresses]), px=int(ttl * 1000))

    async def set_offline(self, node_id: str, coordinator: str) -> None:
        key = self._key("online", node_id)
        raw = await self.r.get(key)
        if raw is not None and json.loads(raw)[0] == coordinator:
            await self.r.delete(key)

    async def revocations(self) -> AsyncIterator[str]:
        pubsub = self.r.pubsub()
        await pubsub.subscribe(self._key("revoked"))
        try:
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    yield str(message["data"])
        finally:
            await pubsub.aclose()

    async def where_online(self, node_id: str) -> tuple[str, list[str]] | None:
        raw = await self.r.get(self._key("online", node_id))
        if raw is None:
            return None
        coordinator, addresses = json.loads(raw)
        return coordinator, addresses

"""The owner's side of a channel, as a protocol core without I/O.

A channel lives at its *owner*.  Everything that sends to it or receives from
it is an *endpoint*: a remote handle (one stream per handle) or one pending
local operation.  Endpoints are opaque to this core; it only needs them to be
hashable.  Calls describe what an endpoint asked for; the core answers with
events that the asyncio layer turns into frames or resolved futures.

Rules kept here (and tested here, with no network):

* **Exact capacity.**  ``len(queue) + owed + reserved <= capacity``: senders
  send only with credit, and credit is granted only from free space.  Items
  handed to a receiver but not yet acknowledged (``owed``) still take room, so
  an item that comes back (its receiver failed or was lost) always fits.
* **Rendezvous.**  With capacity 0, credit is granted only against receivers
  that are waiting, and the sender's item is acknowledged only when a
  receiver's application has taken it.
* **Demand order.**  Receivers' requests queue in the order they arrive; each
  item goes to the oldest one.
* **Requeue at the head.**  A delivery that is given back (or whose receiver
  is lost) returns to the front of the queue, in its original order.
* **Close drains.**  After ``close`` no credit is granted, senders are told at
  once, and receivers see ``End`` only when nothing is queued, owed or still
  covered by credit granted before the close.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Hashable

import msgspec

from ..errors import LocalProtocolError, RemoteProtocolError
from . import frames as f

__all__ = [
    "ChannelCore",
    "Item",
    "Grant",
    "Accepted",
    "Deliver",
    "Reclaim",
    "Closed",
    "End",
    "Withdrawn",
    "EndpointCore",
    "WithdrawAsked",
    "WatchAsked",
]

Endpoint = Hashable

#: senders whose last sequence number a channel remembers (to drop resends)
MAX_ORIGINS = 4096
#: rendezvous items taken that a channel remembers per sender (to drop resends)
MAX_TAKEN = 1024


class Item(msgspec.Struct):
    """One item in a channel: its origin (one per sender) and sequence number
    there, its encoded bytes and, when the owner already decoded it, its value.
    (A msgspec Struct: created in C, which matters at a million items a second.)"""

    origin: str
    seq: int
    data: bytes
    value: Any = None
    #: the endpoint still waiting for "taken" (rendezvous only), else None
    sender: Any = None
    #: order of arrival in this channel (returned items go back by it)
    rank: int = 0
    #: its rendezvous send was cancelled while a receiver held it: if the
    #: receiver gives it back, it leaves instead of returning to the queue
    withdrawn: bool = False

    @property
    def id(self) -> str:
        """Unique per channel: receivers drop duplicates by it."""
        return f"{self.origin}:{self.seq}"

    def __repr__(self) -> str:
        return f"<Item {self.id}>"


# -- events ---------------------------------------------------------------------------


@dataclass(slots=True)
class Grant:
    """The sender may send ``n`` more items."""

    endpoint: Endpoint
    n: int


@dataclass(slots=True)
class Accepted:
    """Every item of this sender up to ``seq`` is in the channel (or, with
    capacity 0, taken by a receiver)."""

    endpoint: Endpoint
    seq: int


@dataclass(slots=True)
class Deliver:
    """Hand ``item`` to a receiver; it is owed until ``done`` or ``requeue``."""

    endpoint: Endpoint
    dseq: int
    item: Item


@dataclass(slots=True)
class Reclaim:
    """Another sender is starved: give back the credit you are not using."""

    endpoint: Endpoint


@dataclass(slots=True)
class Closed:
    """The channel is closed: sending is over for this endpoint."""

    endpoint: Endpoint


@dataclass(slots=True)
class Withdrawn:
    """The cancelled rendezvous send ``seq`` of this sender was not delivered:
    its item left the channel."""

    endpoint: Endpoint
    seq: int


@dataclass(slots=True)
class End:
    """The channel is closed and drained: this receiver's requests end."""

    endpoint: Endpoint


class _Sender:
    __slots__ = ("origin", "credit", "desire", "next_seq", "reclaiming")

    def __init__(self, origin: str, next_seq: int) -> None:
        self.origin = origin
        self.credit = 0  # granted and not yet used or released, as we count it
        self.desire = 0  # standing request: keep my credit topped up to this
        self.next_seq = next_seq
        self.reclaiming = False


class ChannelCore:
    """Buffer, credit, demand and acknowledgement rules of one channel."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        #: grant credit in steps of this many items when senders still hold some
        self._step = max(1, min(capacity // 4, 256))
        self.queue: deque[Item] = deque()
        self.events: deque[Any] = deque()
        self.closed = False
        self.ended = False
        self._senders: dict[Endpoint, _Sender] = {}
        self._hungry: dict[Endpoint, None] = {}  # senders below their desire, oldest first
        self._reserved = 0  # credit outstanding, all senders
        self._demand: deque[list[Any]] = deque()  # [endpoint, units], oldest first
        self._demand_total = 0
        self._owed: dict[Endpoint, dict[int, Item]] = {}
        self._owed_total = 0
        self._taken: set[tuple[Endpoint, int]] = set()  # owed items already taken (process blocks)
        self._next_dseq = 0
        self._rank = 0
        #: highest sequence accepted per origin, so that resent items are dropped
        self._accepted_upto: OrderedDict[str, int] = OrderedDict()
        #: rendezvous: the latest sequences a receiver took, per origin (a
        #: sender that lost the confirmation resends them), and the items
        #: receivers hold whose sender was lost (it may come back for them)
        self._rdv_taken: dict[str, dict[int, None]] = {}
        self._orphans: dict[tuple[str, int], Item] = {}
        # counters for statistics()
        self.items_in = 0
        self.items_out = 0
        self.requeued = 0
        self.duplicates = 0

    # -- state ----------------------------------------------------------------------

    @property
    def free(self) -> int:
        """Room for new items that no credit covers yet."""
        if self.capacity == 0:
            return self._demand_total - self._reserved - len(self.queue)
        return self.capacity - len(self.queue) - self._owed_total - self._reserved

    @property
    def owed(self) -> int:
        return self._owed_total

    @property
    def receivers_waiting(self) -> int:
        return self._demand_total

    @property
    def senders_waiting(self) -> int:
        return len(self._hungry)

    def _next_event(self) -> Any:
        return self.events.popleft() if self.events else None

    # -- senders --------------------------------------------------------------------

    def origin_of(self, handle: Hashable) -> str:
        """The origin under which ``handle``'s items enter (see attach_sender)."""
        return self._senders[handle].origin

    def attach_sender(self, ep: Endpoint, origin: str, next_seq: int = 1) -> int:
        """Register a sender whose items carry ids ``origin:seq``, seq from ``next_seq``.

        Returns the highest sequence of ``origin`` already in the channel: a
        sender that reconnects drops its copies up to there and resends from
        the next one (no credit is needed for what arrived before).  An origin
        may skip ahead (sequences it gave up on, such as failed rendezvous
        sends); the ones it skipped count as seen.
        """
        accepted = self._accepted_upto
        upto = accepted.get(origin, 0)
        # a rendezvous sender resends what no receiver took (this channel
        # dropped those when it lost the sender): it resumes where it says
        start = max(next_seq, 1) if self.capacity == 0 else max(next_seq, upto + 1, 1)
        self._senders[ep] = _Sender(origin, start)
        accepted[origin] = start - 1
        accepted.move_to_end(origin)
        if len(accepted) > MAX_ORIGINS:
            # forget the longest-unused origins that no attached sender has
            live = {s.origin for s in self._senders.values()}
            for old in list(accepted)[: len(accepted) - MAX_ORIGINS]:
                if old not in live:
                    del accepted[old]
        if self.closed:
            self.events.append(Closed(ep))
        return start - 1

    def want(self, ep: Endpoint, desire: int) -> None:
        """The sender would like to hold ``desire`` unused credits (a standing request)."""
        s = self._senders[ep]
        if self.closed:
            self.events.append(Closed(ep))
            return
        s.desire = max(0, desire)
        if s.credit < s.desire:
            self._hungry[ep] = None
            self._grant()
        else:
            self._hungry.pop(ep, None)

    def acquire(self, ep: Endpoint) -> bool:
        """Take one credit at once if nobody waits ahead and there is room."""
        if self.closed or self._hungry or self.free <= 0:
            return False
        s = self._senders[ep]
        s.credit += 1
        self._reserved += 1
        return True

    def release(self, ep: Endpoint, n: int) -> None:
        """The sender gives back ``n`` credits it will not use."""
        s = self._senders.get(ep)
        if s is None:
            return
        if not 0 <= n <= s.credit:
            raise RemoteProtocolError(f"released {n} credits, holds {s.credit}")
        s.credit -= n
        self._reserved -= n
        s.reclaiming = False
        if s.credit < s.desire and not self.closed:
            self._hungry[ep] = None
        self._grant()
        self._check_end()

    def items(self, ep: Endpoint, first_seq: int, items: list[Item]) -> None:
        """Items from a sender, each using one credit, in sequence order.

        Items whose sequence was already accepted (a resend) are dropped and
        acknowledged again.
        """
        s = self._senders[ep]
        if first_seq != s.next_seq:
            raise RemoteProtocolError(f"items from sequence {first_seq}, expected {s.next_seq}")
        n = len(items)
        if n > s.credit:
            raise RemoteProtocolError(f"{n} items sent with {s.credit} credits")
        if self.capacity:
            upto = self._accepted_upto[s.origin]
            fresh = items if first_seq > upto else [it for it in items if it.seq > upto]
        elif self._rdv_taken or self._orphans:
            fresh = self._rendezvous_resends(ep, s.origin, items)
        else:
            fresh = items
        dup = n - len(fresh)
        s.next_seq = first_seq + n
        # every item used a credit, a resent one too (the sender spent it)
        s.credit -= n
        self._reserved -= n
        self.duplicates += dup
        if fresh:
            last = s.next_seq - 1
            self._accepted_upto[s.origin] = last
            if self.capacity == 0:
                for it in fresh:
                    it.sender = ep
            rank = self._rank
            for it in fresh:
                rank += 1
                it.rank = rank
            self._rank = rank
            self.queue.extend(fresh)
            self.items_in += len(fresh)
            if self.capacity:
                self.events.append(Accepted(ep, last))
            if s.credit < s.desire and not self.closed:
                self._hungry[ep] = None
            if self._demand:
                self._dispatch()
        elif dup and self.capacity:
            self.events.append(Accepted(ep, s.next_seq - 1))
        if dup:
            # the credit of a dropped resend frees a place nobody holds now
            if s.credit < s.desire and not self.closed:
                self._hungry[ep] = None
            self._grant()
            self._check_end()

    def _rendezvous_resends(self, ep: Endpoint, origin: str, items: list[Item]) -> list[Item]:
        """The items a rendezvous sender sends for the first time.  A resent
        item that a receiver took is acknowledged again; one a receiver holds
        (its sender was lost meanwhile) is the sender's again."""
        taken = self._rdv_taken.get(origin)
        orphans = self._orphans
        fresh = []
        for it in items:
            if taken is not None and it.seq in taken:
                self.events.append(Accepted(ep, it.seq))
                continue
            held = orphans.pop((origin, it.seq), None) if orphans else None
            if held is not None:
                held.sender = ep
                held.withdrawn = False
                continue
            fresh.append(it)
        return fresh

    def put(self, ep: Endpoint, item: Item) -> None:
        """One item from a local sender, using one credit (no sequence checks)."""
        s = self._senders[ep]
        if s.credit < 1:
            raise LocalProtocolError("put() without credit")
        s.credit -= 1
        self._reserved -= 1
        self.items_in += 1
        self._rank += 1
        item.rank = self._rank
        self.queue.append(item)
        if self.capacity == 0:
            item.sender = ep
        else:
            self.events.append(Accepted(ep, item.seq))
        if self._demand:
            self._dispatch()

    def detach(self, ep: Endpoint) -> None:
        """A local sender is finished (it holds no items)."""
        s = self._senders.pop(ep, None)
        if s is not None:
            self._hungry.pop(ep, None)
            if s.credit:
                self._reserved -= s.credit
                self._grant()
                self._check_end()

    def withdraw(self, ep: Endpoint, seq: int) -> bool:
        """A rendezvous send was cancelled: take its item back if nobody took it.

        True: it was queued and leaves now (Withdrawn).  False: a receiver
        holds it, or took it already (Accepted was, or will be, the answer):
        if the receiver gives it back, it leaves then (Withdrawn); if the
        receiver takes it, the send happened after all (Accepted).
        """
        for it in self.queue:
            if it.sender == ep and it.seq == seq:
                self.queue.remove(it)
                it.sender = None
                self.events.append(Withdrawn(ep, seq))
                self._grant()
                self._check_end()
                return True
        held = self.holder(ep, seq)
        if held is not None:
            self._owed[held[0]][held[1]].withdrawn = True
        return False

    def holder(self, ep: Endpoint, seq: int) -> tuple[Endpoint, int] | None:
        """The receiver and delivery holding sender ``ep``'s rendezvous item ``seq``,
        while its application has not taken it yet."""
        for rep, owed in self._owed.items():
            for dseq, it in owed.items():
                if it.sender == ep and it.seq == seq and (rep, dseq) not in self._taken:
                    return rep, dseq
        return None

    def revoke(self, rep: Endpoint, dseq: int) -> None:
        """Take back a rendezvous item delivered to ``rep`` whose application has not
        taken it (the send was cancelled); ``rep``'s request returns to the head."""
        item = self._unowe(rep, dseq)
        if item.sender is not None:
            self.events.append(Withdrawn(item.sender, item.seq))
            item.sender = None
        self.items_out -= 1
        self._demand.appendleft([rep, 1])
        self._demand_total += 1
        self._grant()
        self._check_end()

    # -- receivers ------------------------------------------------------------------

    def demand(self, ep: Endpoint, units: int = 1) -> None:
        """The receiver asks for ``units`` more items."""
        if units <= 0:
            return
        if self.ended:
            self.events.append(End(ep))
            return
        tail = self._demand[-1] if self._demand else None
        if tail is not None and tail[0] == ep:
            tail[1] += units
        else:
            self._demand.append([ep, units])
        self._demand_total += units
        if self.queue:
            self._dispatch()
        elif self.capacity == 0:
            self._grant()

    def cancel_demand(self, ep: Endpoint, units: int = 1) -> int:
        """Withdraw up to ``units`` of the receiver's outstanding requests (newest first)."""
        removed = 0
        for entry in reversed(self._demand):
            if removed == units:
                break
            if entry[0] == ep:
                take = min(entry[1], units - removed)
                entry[1] -= take
                removed += take
        if removed:
            self._demand_total -= removed
            self._demand = deque(e for e in self._demand if e[1] > 0)
        return removed

    def take_nowait(self, ep: Endpoint | None = None, done: bool = True) -> tuple[int, Item] | None:
        """Take the head item at once (a local receiver), if any.

        With ``done=False`` the item stays owed by ``ep`` until ``done`` or
        ``requeue`` (acknowledged processing).
        """
        if not self.queue:
            return None
        item = self.queue.popleft()
        self._next_dseq += 1
        dseq = self._next_dseq
        self.items_out += 1
        if not done:
            self._owe(ep, dseq, item)
            self._taken.add((ep, dseq))
        self._on_taken(item)
        if done:
            self._grant()
            self._check_end()
        return dseq, item

    def take_one(self) -> Item:
        """The head item, for a local receiver when nobody waits ahead (queue not empty)."""
        item = self.queue.popleft()
        self._next_dseq += 1
        self.items_out += 1
        if item.sender is not None:
            self._on_taken(item)
        if self._hungry:
            self._grant()
        if self.closed:
            self._check_end()
        return item

    def take_many(self, n: int) -> list[Item]:
        """Up to ``n`` head items at once, for a local receiver (nobody waits ahead)."""
        queue = self.queue
        k = min(n, len(queue))
        if k == len(queue):
            out = list(queue)  # the whole queue: no item-by-item pops
            queue.clear()
        else:
            out = [queue.popleft() for _ in range(k)]
        self._next_dseq += k
        self.items_out += k
        if self.capacity == 0:
            for item in out:
                self._on_taken(item)
        self._grant()
        self._check_end()
        return out

    def taken(self, ep: Endpoint, dseq: int) -> None:
        """The receiver's application has the item (it may still requeue it)."""
        owed = self._owed.get(ep)
        item = owed.get(dseq) if owed else None
        if item is None:
            raise RemoteProtocolError(f"no item {dseq} was delivered to this receiver")
        if (ep, dseq) not in self._taken:
            self._taken.add((ep, dseq))
            self._on_taken(item)

    def done(self, ep: Endpoint, dseq: int) -> None:
        """The receiver is finished with the item: it leaves the channel."""
        item = self._unowe(ep, dseq)
        if (ep, dseq) in self._taken:
            self._taken.discard((ep, dseq))
        else:
            self._on_taken(item)
        self._grant()
        self._check_end()

    def requeue(self, ep: Endpoint, dseq: int) -> None:
        """Give the item back: it goes to the head of the queue."""
        item = self._unowe(ep, dseq)
        self._taken.discard((ep, dseq))
        self.items_out -= 1
        self.requeued += 1
        self._to_head(item)
        self._dispatch()
        self._check_end()

    def _to_head(self, item: Item) -> None:
        """Put a returned item back at the head, after returned items older than it
        (so items given back one by one keep their order)."""
        if item.withdrawn:
            if self._orphans:
                self._orphans.pop((item.origin, item.seq), None)
            if item.sender is not None:
                self.events.append(Withdrawn(item.sender, item.seq))  # its send was cancelled
                item.sender = None
            return
        queue = self.queue
        i = 0
        n = len(queue)
        while i < n and queue[i].rank < item.rank:
            i += 1
        queue.insert(i, item)

    def _owe(self, ep: Endpoint, dseq: int, item: Item) -> None:
        self._owed.setdefault(ep, {})[dseq] = item
        self._owed_total += 1

    def _unowe(self, ep: Endpoint, dseq: int) -> Item:
        owed = self._owed.get(ep)
        if not owed or dseq not in owed:
            raise RemoteProtocolError(f"no item {dseq} is owed by this receiver")
        item = owed.pop(dseq)
        if not owed:
            del self._owed[ep]
        self._owed_total -= 1
        return item

    def _on_taken(self, item: Item) -> None:
        sender = item.sender
        if sender is not None:
            item.sender = None
            self.events.append(Accepted(sender, item.seq))
        if self.capacity == 0:
            origin = item.origin
            if self._orphans:
                self._orphans.pop((origin, item.seq), None)
            taken = self._rdv_taken.get(origin)
            if taken is None:
                taken = self._rdv_taken[origin] = {}
                if len(self._rdv_taken) > MAX_ORIGINS:
                    del self._rdv_taken[next(iter(self._rdv_taken))]
            taken[item.seq] = None
            if len(taken) > MAX_TAKEN:
                del taken[next(iter(taken))]

    # -- handing the buffer to another process (a restart) ---------------------------

    def surrender(self) -> tuple[list[Item], dict[str, int]]:
        """Give up the items waiting in the buffer, for another process that
        owns a channel of the same name to serve (:meth:`adopt`): (the items,
        oldest first; the highest sequence accepted per origin).  Items
        receivers hold stay until they are acknowledged or come back; a
        rendezvous channel gives up nothing (its senders wait here)."""
        if self.capacity == 0 or not self.queue:
            return [], {}
        items = list(self.queue)
        self.queue.clear()
        self.items_out += len(items)
        self._grant()
        self._check_end()
        return items, dict(self._accepted_upto)

    def adopt(self, items: list[Item], accepted: dict[str, int]) -> None:
        """Take another process's buffered items (:meth:`surrender`) ahead of
        the ones here: they came first.  The buffer may hold more than the
        capacity until receivers take them (no sender gets credit meanwhile).
        ``accepted`` tells which of its senders' items arrived there, so that
        a sender reconnecting here does not send them again."""
        known = self._accepted_upto
        for origin, upto in accepted.items():
            if upto > known.get(origin, 0):
                known[origin] = upto
                known.move_to_end(origin)
        for old in list(known)[: max(0, len(known) - MAX_ORIGINS)]:
            if old not in {s.origin for s in self._senders.values()}:
                del known[old]
        for item in reversed(items):
            item.rank = 0  # older than anything here: returned items go back behind them
            item.sender = None
            self.queue.appendleft(item)
        self.items_in += len(items)
        if self._demand:
            self._dispatch()

    # -- endpoints going away -------------------------------------------------------

    def lost(self, ep: Endpoint) -> None:
        """The endpoint is gone (its stream or session broke, or it left).

        Items owed by it return to the head of the queue in their order; its
        requests and its unused credit are dropped, and so are its rendezvous
        items that no receiver took (their sends fail).
        """
        s = self._senders.pop(ep, None)
        if s is not None:
            self._reserved -= s.credit
            self._hungry.pop(ep, None)
            if self.capacity == 0:
                # its rendezvous sends fail: the items nobody took leave with it,
                # and those a receiver holds leave if they are given back
                if self.queue:
                    self.queue = deque(it for it in self.queue if it.sender is not ep)
                for owed_by in self._owed.values():
                    for it in owed_by.values():
                        if it.sender is ep:
                            it.withdrawn = True
                            it.sender = None
                            self._orphans[(it.origin, it.seq)] = it
        self.cancel_demand(ep, self._demand_total)
        owed = self._owed.pop(ep, None)
        if owed:
            self._owed_total -= len(owed)
            for dseq in owed:
                self._taken.discard((ep, dseq))
                self._to_head(owed[dseq])
                self.items_out -= 1
                self.requeued += 1
        if self.queue and self._demand:
            self._dispatch()
        self._grant()
        self._check_end()

    def close(self) -> None:
        """Close the channel: no new items; receivers drain what is in it."""
        if self.closed:
            return
        self.closed = True
        self._hungry.clear()
        for ep, s in self._senders.items():
            s.desire = 0
            self.events.append(Closed(ep))
        self._check_end()

    # -- internals ------------------------------------------------------------------

    def _dispatch(self) -> None:
        queue, demand = self.queue, self._demand
        while queue and demand:
            entry = demand[0]
            ep = entry[0]
            entry[1] -= 1
            if entry[1] == 0:
                demand.popleft()
            self._demand_total -= 1
            item = queue.popleft()
            self._next_dseq += 1
            self._owe(ep, self._next_dseq, item)
            self.items_out += 1
            self.events.append(Deliver(ep, self._next_dseq, item))
        if self.capacity == 0:
            self._grant()

    def _grant(self) -> None:
        if not self._hungry or self.closed:
            return
        free = self.free
        if free < self._step and self._reserved > 0:
            # senders still hold credit: grant in steps, not one item at a time;
            # and if some starve while others hold credit, take back the unused
            self._reclaim_idle()
            return
        if free <= 0:
            return
        senders = self._senders
        share = self._share()
        for ep in list(self._hungry):
            s = senders[ep]
            n = min(free, s.desire - s.credit, share - s.credit)
            if n > 0:
                s.credit += n
                self._reserved += n
                free -= n
                self.events.append(Grant(ep, n))
            del self._hungry[ep]
            if s.credit < s.desire and s.credit < share:
                # still short: behind the others that wait, so that senders
                # take turns (one that always wants more never starves them)
                self._hungry[ep] = None
            if free == 0:
                break
        if self._hungry and free == 0:
            # others still wait: whoever got credit keeps only what it can use now
            self._reclaim_idle()

    def _share(self) -> int:
        """The most credit one of several remote senders may hold: its share of
        the capacity.  No sender holds the whole channel while others are
        attached, so one that falls silent holding credit (until it is found
        unresponsive) never stops the rest."""
        n = len(self._senders)
        if n <= 1 or self.capacity == 0:
            return 1 << 62
        return -(-self.capacity // n)

    def _reclaim_idle(self) -> None:
        if len(self._senders) == 1:
            return  # a sole sender is never starved by its own credit
        # a starved sender's own credit is not reclaimed for itself
        only = next(iter(self._hungry)) if len(self._hungry) == 1 else None
        for ep, s in self._senders.items():
            if s.credit > 0 and not s.reclaiming and ep != only:
                s.reclaiming = True
                s.desire = 0
                self.events.append(Reclaim(ep))

    def _check_end(self) -> None:
        if (
            self.closed
            and not self.ended
            and not self.queue
            and self._owed_total == 0
            and self._reserved == 0
        ):
            self.ended = True
            for ep, _units in self._demand:
                self.events.append(End(ep))
            self._demand.clear()
            self._demand_total = 0


# -- one remote handle, as its owner serves it --------------------------------------------

#: a sender's items are acknowledged every this many, or after this delay
ACK_EVERY = 256
ACK_DELAY = 0.005
#: watching handles hear of readiness changes at most this often
READY_EVERY = 0.002

_SEND_FRAMES: frozenset[type[f.Frame]] = frozenset({f.Want, f.Items, f.Release, f.Close, f.Withdraw})
_RECV_FRAMES: frozenset[type[f.Frame]] = frozenset({f.Demand, f.Cancel, f.Taken, f.Done, f.Requeue})


@dataclass(slots=True)
class WithdrawAsked:
    """The handle withdraws its rendezvous item ``seq`` (its send was cancelled)."""

    seq: int


@dataclass(slots=True)
class WatchAsked:
    """The handle wants to hear when the channel's readiness changes."""


class EndpointCore:
    """One remote handle as the owner serves it, without I/O.

    The channel core's events for the handle become frames: grants and
    acknowledgements are coalesced to one of each per loop turn (an
    acknowledgement may wait ``ACK_DELAY`` or until ``ACK_EVERY`` items, since
    it only frees the sender's copies), and readiness goes out at most every
    ``READY_EVERY``.  The handle's frames become calls on the channel core.
    Time comes in as ``now``; :meth:`deadline` says when :meth:`on_timer` is
    due."""

    def __init__(self, channel: ChannelCore, endpoint: Endpoint, *, can_send: bool, can_recv: bool,
                 rendezvous: bool, decode: Any, max_message: int) -> None:
        self.channel = channel
        self.endpoint = endpoint  # how the channel core knows this handle
        self.can_send = can_send
        self.can_recv = can_recv
        self.rendezvous = rendezvous
        self._decode = decode  # None: items are kept as bytes (the raw codec)
        self.max_message = max_message
        self._grant = 0
        self._ack = 0
        self._ack_sent = 0
        self._ack_due: float | None = None
        self._told: tuple[bool, bool] | None = None
        self._ready: tuple[bool, bool] = (False, False)
        self._ready_due: float | None = None
        #: frames for the handle, in order
        self.outbox: list[f.Frame] = []
        #: the driver calls :meth:`flush` at the end of this loop turn
        self.flush_wanted = False
        self.events: deque[WithdrawAsked | WatchAsked] = deque()

    # owner -> handle

    def on_event(self, ev: Any, now: float) -> None:
        """An event of the channel core for this handle."""
        match ev:
            case Deliver():
                self.outbox.append(f.Deliver(ev.dseq, ev.item.id, ev.item.data))
            case Grant():
                self._grant += ev.n
                self.flush_wanted = True
            case Accepted():
                if self.rendezvous:
                    # a rendezvous sender waits for exactly this item (takers
                    # may take a sender's items out of order): not cumulative
                    self.outbox.append(f.Accepted(ev.seq))
                    return
                self._ack = max(self._ack, ev.seq)
                if self._ack - self._ack_sent >= ACK_EVERY:
                    self.flush_wanted = True
                elif self._ack_due is None:
                    self._ack_due = now + ACK_DELAY
            case Reclaim():
                self.flush()  # grants first, so the handle can give them back
                self.outbox.append(f.Reclaim())
            case Closed():
                self.flush()
                self.outbox.append(f.Closed())
            case End():
                self.outbox.append(f.End())
            case Withdrawn():
                self.outbox.append(f.Withdrawn(ev.seq))

    def tell_readiness(self, ready: tuple[bool, bool], now: float, at_once: bool = False) -> None:
        """The channel's readiness (for a watching handle): told at once, or
        at most once per ``READY_EVERY`` (a busy channel flips item by item)."""
        self._ready = ready
        if at_once:
            self._send_readiness()
        elif ready != self._told and self._ready_due is None:
            self._ready_due = now + READY_EVERY

    def _send_readiness(self) -> None:
        self._ready_due = None
        if self._ready != self._told:
            self._told = self._ready
            self.outbox.append(f.Ready(*self._ready))

    def flush(self) -> None:
        """What this turn coalesced: the acknowledgement, then the grant."""
        self.flush_wanted = False
        self._ack_due = None
        if self._ack > self._ack_sent:
            self.outbox.append(f.Accepted(self._ack))
            self._ack_sent = self._ack
        if self._grant:
            self.outbox.append(f.Grant(self._grant))
            self._grant = 0

    def deadline(self) -> float | None:
        """When :meth:`on_timer` is due next (None: nothing waits for time)."""
        due = [t for t in (self._ack_due, self._ready_due) if t is not None]
        return min(due) if due else None

    def on_timer(self, now: float) -> None:
        if self._ack_due is not None and now >= self._ack_due:
            self.flush()
        if self._ready_due is not None and now >= self._ready_due:
            self._send_readiness()

    # handle -> owner

    def receive_frame(self, frame: f.Frame) -> None:
        """A frame from the handle; RemoteProtocolError if it may not send it."""
        channel = self.channel
        ep = self.endpoint
        kind = type(frame)
        if kind in _SEND_FRAMES and not self.can_send:
            raise RemoteProtocolError("this handle may not send")
        if kind in _RECV_FRAMES and not self.can_recv:
            raise RemoteProtocolError("this handle may not receive")
        match frame:
            case f.Items(seq=first_seq, items=datas):
                origin = channel.origin_of(ep)
                if max(map(len, datas), default=0) > self.max_message:
                    raise RemoteProtocolError("an item is over the size limit")
                seqs = range(first_seq, first_seq + len(datas))
                decode = self._decode
                if decode is None:
                    items = [Item(origin, seq, d, d) for seq, d in zip(seqs, datas)]
                else:
                    # decoding here validates every item before it enters the channel
                    items = [Item(origin, seq, d, decode(d)) for seq, d in zip(seqs, datas)]
                channel.items(ep, first_seq, items)
            case f.Demand(n=n):
                channel.demand(ep, n)
            case f.Done(dseq=dseq):
                channel.done(ep, dseq)
            case f.Taken(dseq=dseq):
                channel.taken(ep, dseq)
            case f.Requeue(dseq=dseq):
                channel.requeue(ep, dseq)
            case f.Cancel(n=n):
                channel.cancel_demand(ep, n)
            case f.Want(n=n):
                channel.want(ep, n)
            case f.Release(n=n):
                channel.release(ep, n)
            case f.Withdraw(seq=seq):
                self.events.append(WithdrawAsked(seq))
            case f.Close():
                channel.close()
                self.outbox.append(f.Closed())
            case f.Watch():
                self.events.append(WatchAsked())
            case _:
                raise RemoteProtocolError(f"unexpected frame {kind.__name__} from a channel handle")

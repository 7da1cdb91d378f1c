"""
The ``memory`` spool store: everything in a dict, for tests.

It keeps the same rules as the durable stores (the contract suite in
``mailhub.testing.store_contract`` checks both), fires every ``Deferred`` at
once, and reads time only from the clock it is given.  Nothing survives the
process: never use it for mail you care about.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mailhub.interfaces import (
    ILeaseReclaim,
    INodeRegistry,
    IRouteCoordination,
    ISpoolControl,
    ISpoolStore,
    IStorePlugin,
)
from mailhub.model import (
    Address,
    Attempt,
    Decision,
    Entry,
    EntryFilter,
    Envelope,
    Lease,
    LeaseLost,
    StoreUnavailable,
    apply_decision,
    fair_share,
    new_entries,
)

__all__ = ["MemorySpoolStore", "plugin"]

_T = TypeVar("_T")


def _new_id() -> str:
    return uuid.uuid4().hex


@define
class _Slot:
    """
    An entry as the store holds it.  While leased, ``entry.next_attempt`` is
    the lease's expiry: an abandoned lease simply makes the entry due again.
    """

    entry: Entry
    lease_token: str | None = None
    lease_node: str | None = None
    lease_incarnation: str | None = None


@implementer(ISpoolStore, INodeRegistry, IRouteCoordination, ILeaseReclaim, ISpoolControl)
@define
class MemorySpoolStore:
    """
    An ``ISpoolStore`` in memory.

    :ivar unavailable: set it to make every method fail with
        ``StoreUnavailable``, to test how callers cope with a store that is down.
    """

    _clock: Any
    unavailable: bool = False
    _messages: dict[str, bytes] = field(factory=dict)
    _slots: dict[str, _Slot] = field(factory=dict)
    _attempts: dict[str, list[Attempt]] = field(factory=dict)
    _heartbeats: dict[str, tuple[float, dict[str, Any]]] = field(factory=dict)
    #: route -> node -> (share, want, expires, holding)
    _shares: dict[str, dict[str, tuple[int, int, float, int]]] = field(factory=dict)
    _route_states: dict[str, dict[str, Any]] = field(factory=dict)
    #: node -> the incarnation its leases are held under (``ILeaseReclaim``)
    _incarnations: dict[str, str] = field(factory=dict)

    def _call(self, fn: Callable[[], _T]) -> Deferred[_T]:
        if self.unavailable:
            return fail(StoreUnavailable("memory store marked unavailable"))
        try:
            return succeed(fn())
        except Exception:
            return fail()

    def _leased(self, slot: _Slot, now: float) -> bool:
        return slot.lease_token is not None and slot.entry.next_attempt > now

    def _drop(self, entry_id: str) -> None:
        slot = self._slots.pop(entry_id)
        self._attempts.pop(entry_id, None)
        message_id = slot.entry.message_id
        if not any(s.entry.message_id == message_id for s in self._slots.values()):
            self._messages.pop(message_id, None)

    def enqueue(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
    ) -> Deferred[list[str]]:
        def do() -> list[str]:
            message_id = uuid.uuid4().hex
            ids = []
            for entry in new_entries(envelope, len(message), routes, node, message_id, _new_id):
                self._slots[entry.id] = _Slot(entry)
                ids.append(entry.id)
            if ids:
                self._messages[message_id] = bytes(message)
            return ids

        return self._call(do)

    def enqueue_leased(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
        lease_seconds: float,
        decided: Mapping[str, tuple[Attempt, Decision]] | None = None,
    ) -> Deferred[list[Lease | Entry]]:
        expires = envelope.received_at + lease_seconds
        decided = decided or {}
        incarnation = self._incarnations.get(node)

        def do() -> list[Lease | Entry]:
            message_id = uuid.uuid4().hex
            results: list[Lease | Entry] = []
            for entry in new_entries(envelope, len(message), routes, node, message_id, _new_id):
                if entry.route in decided:
                    attempt, decision = decided[entry.route]
                    stored = apply_decision(entry, decision)
                    self._slots[entry.id] = _Slot(stored)
                    self._attempts[entry.id] = [evolve(attempt, entry_id=entry.id)]
                    results.append(stored)
                    continue
                token = uuid.uuid4().hex
                slot = _Slot(evolve(entry, next_attempt=expires, node=None))
                slot.lease_token = token
                slot.lease_node = node
                slot.lease_incarnation = incarnation
                self._slots[entry.id] = slot
                results.append(Lease(entry, node, token, expires))
            if results:
                self._messages[message_id] = bytes(message)
            return results

        return self._call(do)

    def claim(
        self,
        node: str,
        now: float,
        limit: int,
        lease_seconds: float,
        takeover_seconds: float,
        ids: Iterable[str] | None = None,
    ) -> Deferred[list[Lease]]:
        incarnation = self._incarnations.get(node)

        def do() -> list[Lease]:
            wanted = None if ids is None else set(ids)
            due = []
            for slot in self._slots.values():
                e = slot.entry
                if e.held or e.next_attempt > now:
                    continue
                if wanted is not None and e.id not in wanted:
                    continue
                if (
                    e.node is not None
                    and e.node != node
                    and e.next_attempt + takeover_seconds > now
                ):
                    continue
                due.append(slot)
            due.sort(key=lambda s: s.entry.next_attempt)
            leases = []
            for slot in due[:limit]:
                token = uuid.uuid4().hex
                leases.append(Lease(slot.entry, node, token, now + lease_seconds))
                slot.entry = evolve(slot.entry, next_attempt=now + lease_seconds, node=None)
                slot.lease_token = token
                slot.lease_node = node
                slot.lease_incarnation = incarnation
            return leases

        return self._call(do)

    def body(self, message_id: str) -> Deferred[bytes]:
        return self._call(lambda: self._messages[message_id])

    def record(self, lease: Lease, attempt: Attempt, decision: Decision) -> Deferred[Entry | None]:
        def do() -> Entry | None:
            slot = self._slots.get(lease.entry.id)
            if slot is None or slot.lease_token != lease.token:
                raise LeaseLost(lease.entry.id)
            base = evolve(slot.entry, next_attempt=lease.entry.next_attempt)
            entry = apply_decision(base, decision)
            if not entry.pending:
                self._drop(entry.id)
                return None
            slot.entry = entry
            slot.lease_token = None
            self._attempts.setdefault(entry.id, []).append(attempt)
            return entry

        return self._call(do)

    def release(self, lease: Lease, now: float) -> Deferred[None]:
        def do() -> None:
            slot = self._slots.get(lease.entry.id)
            if slot is not None and slot.lease_token == lease.token:
                slot.entry = evolve(slot.entry, next_attempt=now, node=None)
                slot.lease_token = None

        return self._call(do)

    def next_due(
        self, node: str, now: float, takeover_seconds: float = 0.0
    ) -> Deferred[float | None]:
        def do() -> float | None:
            times = [
                s.entry.next_attempt
                if s.entry.node is None or s.entry.node == node
                else s.entry.next_attempt + takeover_seconds
                for s in self._slots.values()
                if not s.entry.held
            ]
            return min(times, default=None)

        return self._call(do)

    def get(self, entry_id: str) -> Deferred[Entry | None]:
        def do() -> Entry | None:
            slot = self._slots.get(entry_id)
            return None if slot is None else slot.entry

        return self._call(do)

    def attempts(self, entry_id: str) -> Deferred[list[Attempt]]:
        return self._call(lambda: list(self._attempts.get(entry_id, [])))

    def entries(
        self, filter: EntryFilter | None = None, offset: int = 0, limit: int = 100
    ) -> Deferred[list[Entry]]:
        def matches(e: Entry) -> bool:
            if filter is None:
                return True
            if filter.route is not None and e.route != filter.route:
                return False
            if filter.held is not None and e.held != filter.held:
                return False
            if filter.recipient is not None:
                wanted = filter.recipient.lower()
                if not any(str(r.address).lower() == wanted for r in e.recipients):
                    return False
            return True

        def do() -> list[Entry]:
            found = [s.entry for s in self._slots.values() if matches(s.entry)]
            found.sort(key=lambda e: e.next_attempt)
            return found[offset : offset + limit]

        return self._call(do)

    def counts(self) -> Deferred[dict[str, Any]]:
        def do() -> dict[str, Any]:
            now = self._clock.seconds()
            routes: dict[str, int] = {}
            for s in self._slots.values():
                routes[s.entry.route] = routes.get(s.entry.route, 0) + 1
            return {
                "entries": len(self._slots),
                "held": sum(1 for s in self._slots.values() if s.entry.held),
                "leased": sum(1 for s in self._slots.values() if self._leased(s, now)),
                "recipients": sum(len(s.entry.pending) for s in self._slots.values()),
                "routes": routes,
            }

        return self._call(do)

    def hold(self, entry_id: str) -> Deferred[bool]:
        def do() -> bool:
            slot = self._slots.get(entry_id)
            if slot is None:
                return False
            slot.entry = evolve(slot.entry, held=True)
            return True

        return self._call(do)

    def release_held(self, entry_id: str, now: float) -> Deferred[bool]:
        def do() -> bool:
            slot = self._slots.get(entry_id)
            if slot is None:
                return False
            if slot.entry.held:
                due = slot.entry.next_attempt if self._leased(slot, now) else now
                slot.entry = evolve(slot.entry, held=False, next_attempt=due, node=None)
            return True

        return self._call(do)

    def flush(self, route: str | None, now: float) -> Deferred[int]:
        def do() -> int:
            n = 0
            for slot in self._slots.values():
                e = slot.entry
                if e.held or self._leased(slot, now) or (route is not None and e.route != route):
                    continue
                slot.entry = evolve(e, next_attempt=min(e.next_attempt, e.created, now), node=None)
                n += 1
            return n

        return self._call(do)

    def delete(self, entry_id: str) -> Deferred[bool]:
        def do() -> bool:
            if entry_id not in self._slots:
                return False
            self._drop(entry_id)
            return True

        return self._call(do)

    # -- ISpoolControl -----------------------------------------------------

    def requeue(self, entry_id: str, now: float, route: str | None = None) -> Deferred[str]:
        def do() -> str:
            slot = self._slots.get(entry_id)
            if slot is None:
                return "missing"
            if self._leased(slot, now):
                return "leased"
            slot.entry = evolve(slot.entry, next_attempt=now, node=None, route=route or slot.entry.route)
            slot.lease_token = None
            return "requeued"

        return self._call(do)

    def leased_entries(self, now: float) -> Deferred[set[str]]:
        return self._call(lambda: {i for i, s in self._slots.items() if self._leased(s, now)})

    # -- ILeaseReclaim -----------------------------------------------------

    def reclaim(self, node: str, incarnation: str, now: float) -> Deferred[int]:
        self._incarnations[node] = incarnation

        def do() -> int:
            n = 0
            for slot in self._slots.values():
                if (
                    self._leased(slot, now)
                    and slot.lease_node == node
                    and slot.lease_incarnation != incarnation
                ):
                    slot.entry = evolve(slot.entry, next_attempt=now, node=node)
                    slot.lease_token = None
                    n += 1
            return n

        return self._call(do)

    # -- INodeRegistry -----------------------------------------------------

    def heartbeat(self, node: str, now: float, info: Mapping[str, Any]) -> Deferred[None]:
        def do() -> None:
            self._heartbeats[node] = (now, dict(info))

        return self._call(do)

    def nodes(self, now: float) -> Deferred[list[dict[str, Any]]]:
        def do() -> list[dict[str, Any]]:
            found = {
                name: {"name": name, "last_seen": seen, "info": dict(info), "leased": 0, "reserved": 0}
                for name, (seen, info) in self._heartbeats.items()
            }

            def of(name: str) -> dict[str, Any]:
                return found.setdefault(
                    name, {"name": name, "last_seen": None, "info": {}, "leased": 0, "reserved": 0}
                )

            for slot in self._slots.values():
                if self._leased(slot, now) and slot.lease_node is not None:
                    of(slot.lease_node)["leased"] += 1
                elif slot.entry.node is not None and not slot.entry.held:
                    of(slot.entry.node)["reserved"] += 1
            return [found[name] for name in sorted(found)]

        return self._call(do)

    # -- IRouteCoordination -----------------------------------------------

    def share(
        self, route: str, node: str, want: int, holding: int, limit: int, now: float, ttl: float
    ) -> Deferred[int]:
        def do() -> int:
            shares = self._shares.setdefault(route, {})
            for name, (_, _, expires, _) in list(shares.items()):
                if expires <= now or name == node:
                    del shares[name]
            others = sum(max(given, held) for given, _, _, held in shares.values())
            wants = {name: w for name, (_, w, _, _) in shares.items()}
            wants[node] = want
            given = max(0, min(want, fair_share(limit, wants, node), limit - others))
            shares[node] = (given, want, now + ttl, holding)
            return given

        return self._call(do)

    def route_states(self) -> Deferred[dict[str, dict[str, Any]]]:
        return self._call(lambda: {r: dict(s) for r, s in self._route_states.items()})

    def set_route_state(self, route: str, state: Mapping[str, Any] | None) -> Deferred[None]:
        def do() -> None:
            if state is None:
                self._route_states.pop(route, None)
            else:
                self._route_states[route] = dict(state)

        return self._call(do)

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(IStorePlugin)
@frozen
class MemoryStorePlugin:
    """Makes a ``MemorySpoolStore``; the ``[store]`` table needs no keys."""

    name: str = "memory"
    #: ``[store]`` has no key of the plugin's (``mailhub.plugin``).
    config_keys: frozenset[str] = frozenset()

    def make(self, config: Mapping[str, Any], reactor: Any) -> MemorySpoolStore:
        """
        :param config: ignored.
        :param reactor: an ``IReactorTime``; ``counts()`` reads the time from it.
        """
        return MemorySpoolStore(reactor)


plugin = MemoryStorePlugin()

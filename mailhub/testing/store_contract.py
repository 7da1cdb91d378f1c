"""
The spool-store contract: what every ``ISpoolStore`` must do.

A store plugin's tests subclass ``SpoolStoreContract`` and provide a ``store``
fixture that returns a fresh, empty store (and closes it afterwards)::

    class TestMyStore(SpoolStoreContract):
        @pytest.fixture
        def store(self, tmp_path):
            store = plugin.make({"path": "spool.db", "config_dir": str(tmp_path)}, reactor)
            yield store
            pytest_twisted.blockon(store.close())

Every time the suite passes to the store is explicit and near ``NOW``.  The
store's own clock is consulted only by ``counts()`` (for ``"leased"``); the
suite's leases there are long enough that any clock from 0 to today works.

The tests are ``async`` (pytest-twisted's ``ensureDeferred``), so a store whose
``Deferred`` fire later, from a thread or the network, runs them as well as one
whose ``Deferred`` fire at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pytest
import pytest_twisted
from attrs import evolve
from twisted.internet.defer import DeferredList
from zope.interface.verify import verifyObject

from mailhub.interfaces import (
    ILeaseReclaim,
    INodeRegistry,
    IRouteCoordination,
    ISpoolControl,
    ISpoolStore,
)
from mailhub.model import (
    Action,
    Address,
    Attempt,
    Decision,
    Entry,
    EntryFilter,
    Envelope,
    Lease,
    LeaseLost,
    Outcome,
    RecipientState,
    Reply,
)

__all__ = [
    "NOW",
    "LeaseReclaimContract",
    "NodeRegistryContract",
    "RouteCoordinationContract",
    "SpoolControlContract",
    "SpoolStoreContract",
]

#: The time the suite's messages arrive at.
NOW = 1_700_000_000.0
LEASE = 300.0
TAKEOVER = 600.0

ROUTE_A = "smtp:mail.a.example:25"
ROUTE_B = "lmtp:mail.b.example:24"
ALICE = Address("alice", "a.example")
BOB = Address("bob", "a.example")
CAROL = Address("carol", "a.example")
DAVE = Address("dave", "b.example")
SENDER = Address("sender", "outside.example")

OK = Reply(250, "2.0.0", "ok")
LATER = Reply(451, "4.3.0", "try later")
NO = Reply(550, "5.1.1", "no such user")

#: A message that is not 7-bit text: every byte value, UTF-8, NUL, lone CR and LF.
ODD_MESSAGE = (
    b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n\r\n"
    + "grüße, 你好\r\n".encode()
    + bytes(range(256))
    + b"\x00\r\n.\r\nlone\rcr and lone\nlf\xff"
)


def _as_tuple(items: Iterable[Any]) -> Any:
    # mypy cannot solve the attrs ``converter=tuple`` of the model's fields.
    return tuple(items)


def envelope(received_at: float = NOW, sender: Address | None = SENDER) -> Envelope:
    return Envelope(
        sender,
        _as_tuple((ALICE, BOB, CAROL, DAVE)),
        received_at=received_at,
        client="192.0.2.7",
        helo="client.outside.example",
        body_8bit=True,
    )


def decision(
    outcomes: Mapping[Address, tuple[Action, Reply]],
    next_attempt: float | None = None,
    next_node: str | None = None,
) -> Decision:
    return Decision(
        _as_tuple(Outcome(a, action, reply) for a, (action, reply) in outcomes.items()),
        next_attempt,
        next_node,
    )


def attempt_for(lease: Lease, replies: Mapping[Address, Reply], at: float = NOW) -> Attempt:
    return Attempt(lease.entry.id, lease.node, at, at + 1, _as_tuple(replies.items()))


#: The first attempt of a message for a route known to be down: deferred
#: without connecting, to losangeles ten minutes later.
SUSPENDED = Reply(
    451, "4.4.1", "delivery to smtp:mail.a.example:25 suspended: route down (421 4.4.1 refused)"
)
RETRY_AT = NOW + 600


def deferred_at_once(recipients: Sequence[Address]) -> tuple[Attempt, Decision]:
    """
    ``enqueue_leased``'s ``decided`` for one route: dallas's first attempt,
    every recipient deferred to losangeles at ``RETRY_AT``, with an
    ``entry_id`` the store must ignore.
    """
    replies = _as_tuple((a, SUSPENDED) for a in recipients)
    attempt = Attempt("not-the-entry", "dallas", NOW, NOW, replies)
    retry = decision({a: (Action.RETRY, SUSPENDED) for a in recipients}, RETRY_AT, "losangeles")
    return attempt, retry


async def core_counts(store: Any) -> dict[str, Any]:
    """``store.counts()`` without the keys a store may add of its own."""
    counts = await store.counts()
    return {k: counts[k] for k in ("entries", "held", "leased", "recipients", "routes")}


class SpoolStoreContract:
    """
    Tests every ``ISpoolStore`` passes.

    The tests ask for a ``store`` fixture: a fresh, empty store per test.  Define
    it on the subclass, or in the test module or a ``conftest.py``.
    """

    async def enqueue(
        self,
        store: Any,
        routes: Mapping[str, Sequence[Address]] | None = None,
        received_at: float = NOW,
        node: str = "dallas",
        message: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    ) -> list[str]:
        if routes is None:
            routes = {ROUTE_A: [ALICE]}
        ids: list[str] = await store.enqueue(envelope(received_at), message, routes, node)
        return ids

    async def enqueue_leased(
        self,
        store: Any,
        routes: Mapping[str, Sequence[Address]] | None = None,
        received_at: float = NOW,
        node: str = "dallas",
        message: bytes = b"Subject: hi\r\n\r\nhello\r\n",
        lease_seconds: float = LEASE,
    ) -> list[Lease]:
        if routes is None:
            routes = {ROUTE_A: [ALICE]}
        leases: list[Lease] = await store.enqueue_leased(
            envelope(received_at), message, routes, node, lease_seconds
        )
        return leases

    async def claim(
        self,
        store: Any,
        node: str = "dallas",
        now: float = NOW,
        limit: int = 100,
        lease_seconds: float = LEASE,
        ids: Sequence[str] | None = None,
    ) -> list[Lease]:
        leases: list[Lease] = await store.claim(node, now, limit, lease_seconds, TAKEOVER, ids)
        return leases

    async def deliver_all(self, store: Any, lease: Lease, at: float = NOW) -> Entry | None:
        replies = {a: OK for a in lease.entry.pending}
        result: Entry | None = await store.record(
            lease,
            attempt_for(lease, replies, at),
            decision({a: (Action.DELIVERED, OK) for a in lease.entry.pending}),
        )
        return result

    # -- the interface --------------------------------------------------

    def test_provides_interface(self, store: Any) -> None:
        """The store provides every method of ``ISpoolStore``."""
        assert verifyObject(ISpoolStore, store)

    # -- enqueue --------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_enqueue_makes_one_entry_per_route(self, store: Any) -> None:
        """Each route gets its own entry with its recipients, all sharing one message."""
        message = b"Subject: hi\r\n\r\nhello\r\n"
        ids = await self.enqueue(store, {ROUTE_A: [ALICE, BOB], ROUTE_B: [DAVE]}, message=message)
        assert len(ids) == 2 and len(set(ids)) == 2
        a = await store.get(ids[0])
        b = await store.get(ids[1])
        assert a.route == ROUTE_A and b.route == ROUTE_B
        assert a.pending == (ALICE, BOB) and b.pending == (DAVE,)
        assert all(r.state is RecipientState.PENDING and r.reply is None for r in a.recipients)
        assert a.message_id == b.message_id
        for e, entry_id in ((a, ids[0]), (b, ids[1])):
            assert e.id == entry_id
            assert e.sender == SENDER
            assert e.created == NOW
            assert e.attempts == 0
            assert not e.held
            assert e.size == len(message)
            assert e.envelope_helo == "client.outside.example"
            assert e.envelope_client == "192.0.2.7"
        assert await store.body(a.message_id) == message

    @pytest_twisted.ensureDeferred
    async def test_enqueue_reserves_entry_for_accepting_node(self, store: Any) -> None:
        """A new entry is due at once, for the node that accepted it."""
        [entry_id] = await self.enqueue(store, node="losangeles", received_at=NOW + 5)
        entry = await store.get(entry_id)
        assert entry.node == "losangeles"
        assert entry.next_attempt == NOW + 5

    @pytest_twisted.ensureDeferred
    async def test_enqueue_null_sender(self, store: Any) -> None:
        """The null sender ``<>`` (bounces) is kept as ``None``."""
        ids = await store.enqueue(envelope(sender=None), b"x\r\n", {ROUTE_A: [ALICE]}, "dallas")
        assert (await store.get(ids[0])).sender is None

    @pytest.mark.parametrize(
        "message",
        [ODD_MESSAGE, b"", bytes(range(256)) * 1000],
        ids=["8bit", "empty", "large"],
    )
    @pytest_twisted.ensureDeferred
    async def test_message_bytes_round_trip_exactly(self, store: Any, message: bytes) -> None:
        """Whatever bytes go in come back out, unchanged."""
        [entry_id] = await self.enqueue(store, message=message)
        entry = await store.get(entry_id)
        assert await store.body(entry.message_id) == message
        assert entry.size == len(message)

    @pytest_twisted.ensureDeferred
    async def test_unicode_addresses_round_trip(self, store: Any) -> None:
        """SMTPUTF8 addresses come back as they went in."""
        who = Address("jürgen", "bücher.example")
        sender = Address("δοκιμή", "outside.example")
        env = Envelope(sender, _as_tuple([who]), received_at=NOW, smtputf8=True)
        [entry_id] = await store.enqueue(env, b"x\r\n", {ROUTE_A: [who]}, "dallas")
        entry = await store.get(entry_id)
        assert entry.sender == sender and entry.pending == (who,)

    @pytest_twisted.ensureDeferred
    async def test_smtputf8_flag_survives_enqueue_claim_record_and_get(self, store: Any) -> None:
        """
        ``Entry.smtputf8`` is the envelope's flag, on every entry of the
        message, through ``get``, ``claim``, ``record`` and ``entries``; a
        message without it stays without it.
        """
        utf8 = Envelope(SENDER, _as_tuple([ALICE, DAVE]), received_at=NOW, smtputf8=True)
        ids = await store.enqueue(utf8, b"x\r\n", {ROUTE_A: [ALICE], ROUTE_B: [DAVE]}, "dallas")
        [plain] = await self.enqueue(store, {ROUTE_A: [BOB]}, received_at=NOW + 1)
        assert [(await store.get(i)).smtputf8 for i in ids] == [True, True]
        assert (await store.get(plain)).smtputf8 is False
        leases = await self.claim(store, now=NOW + 1)
        assert {lease.entry.id: lease.entry.smtputf8 for lease in leases} == {
            ids[0]: True,
            ids[1]: True,
            plain: False,
        }
        lease = next(lease for lease in leases if lease.entry.id == ids[0])
        updated = await store.record(
            lease,
            attempt_for(lease, {ALICE: LATER}),
            decision({ALICE: (Action.RETRY, LATER)}, next_attempt=NOW + 1200),
        )
        assert updated.smtputf8 is True
        [again] = await self.claim(store, now=NOW + 1200, ids=[ids[0]])
        assert again.entry.smtputf8 is True
        listed = {e.id: e.smtputf8 for e in await store.entries(None, 0, 100)}
        assert listed[ids[0]] is True and listed[plain] is False

    # -- enqueue_leased -------------------------------------------------

    @pytest.mark.parametrize("variant", ["plain", "smtputf8", "null sender"])
    @pytest_twisted.ensureDeferred
    async def test_enqueue_leased_gives_one_lease_per_route_in_order(
        self, store: Any, variant: str
    ) -> None:
        """
        ``enqueue_leased`` gives one lease per route, in the order of
        ``routes``, held by the accepting node until ``received_at +
        lease_seconds``; each lease's entry is the entry ``enqueue`` stores for
        the same message (due at ``received_at``, reserved for that node).
        """
        env = envelope(NOW + 5)
        if variant == "smtputf8":
            env = evolve(env, smtputf8=True)
        elif variant == "null sender":
            env = evolve(env, sender=None)
        # Not in sorted order: the leases follow the mapping, not the names.
        routes = {ROUTE_B: [DAVE], ROUTE_A: [ALICE, BOB]}
        message = b"Subject: hi\r\n\r\nhello\r\n"
        leases = await store.enqueue_leased(env, message, routes, "losangeles", LEASE)
        assert [lease.entry.route for lease in leases] == [ROUTE_B, ROUTE_A]
        assert [lease.entry.pending for lease in leases] == [(DAVE,), (ALICE, BOB)]
        assert len({lease.entry.id for lease in leases}) == 2
        assert len({lease.entry.message_id for lease in leases}) == 1
        for lease in leases:
            assert lease.node == "losangeles"
            assert lease.expires == NOW + 5 + LEASE
            assert lease.token
            assert lease.entry.next_attempt == NOW + 5
            assert lease.entry.node == "losangeles"
            assert lease.entry.created == NOW + 5
            assert lease.entry.attempts == 0 and not lease.entry.held
            assert all(
                r.state is RecipientState.PENDING and r.reply is None
                for r in lease.entry.recipients
            )
        ids = await store.enqueue(env, message, routes, "losangeles")
        for lease, entry_id in zip(leases, ids, strict=True):
            stored = await store.get(entry_id)
            assert lease.entry == evolve(
                stored, id=lease.entry.id, message_id=lease.entry.message_id
            )

    @pytest.mark.parametrize(
        "message", [ODD_MESSAGE, b"", bytes(range(256)) * 1000], ids=["8bit", "empty", "large"]
    )
    @pytest_twisted.ensureDeferred
    async def test_enqueue_leased_stores_the_message(self, store: Any, message: bytes) -> None:
        """The message is stored with the leased entries: ``body`` gives back the exact bytes."""
        [lease] = await self.enqueue_leased(store, message=message)
        assert await store.body(lease.entry.message_id) == message
        assert lease.entry.size == len(message)
        assert (await store.get(lease.entry.id)).size == len(message)

    @pytest_twisted.ensureDeferred
    async def test_enqueue_leased_entries_not_claimed_before_expiry(self, store: Any) -> None:
        """
        Until the lease expires nobody claims an entry stored leased, by due
        time or by id, not even the node that holds the lease; it is next due
        at the expiry.
        """
        leases = await self.enqueue_leased(store, {ROUTE_A: [ALICE], ROUTE_B: [DAVE]})
        ids = [lease.entry.id for lease in leases]
        expires = leases[0].expires
        for node in ("dallas", "losangeles"):
            for now in (NOW, expires - 1):
                assert await self.claim(store, node=node, now=now) == []
                assert await self.claim(store, node=node, now=now, ids=ids) == []
        assert await store.next_due("losangeles", NOW, TAKEOVER) == expires
        assert await store.next_due("dallas", NOW, TAKEOVER) == expires

    @pytest_twisted.ensureDeferred
    async def test_expired_enqueue_leased_lease_goes_to_another_node(self, store: Any) -> None:
        """
        Once the lease expires another node claims the entry, and recording
        under the first lease fails with ``LeaseLost``, changing nothing.
        """
        [old] = await self.enqueue_leased(store, node="dallas")
        [new] = await self.claim(store, node="losangeles", now=old.expires)
        assert new.entry.id == old.entry.id
        assert new.token != old.token
        with pytest.raises(LeaseLost):
            await self.deliver_all(store, old)
        entry = await store.get(old.entry.id)
        assert entry.attempts == 0 and entry.pending == (ALICE,)
        assert await store.attempts(old.entry.id) == []
        assert await self.deliver_all(store, new) is None

    @pytest_twisted.ensureDeferred
    async def test_delivery_recorded_under_enqueue_leased_lease(self, store: Any) -> None:
        """
        A delivery recorded under a lease from ``enqueue_leased`` removes that
        entry; the message stays until its other entry is done too.
        """
        message = b"Subject: hi\r\n\r\nhello\r\n"
        first, second = await self.enqueue_leased(
            store, {ROUTE_A: [ALICE, BOB], ROUTE_B: [DAVE]}, message=message
        )
        message_id = first.entry.message_id
        assert await self.deliver_all(store, first) is None
        assert await store.get(first.entry.id) is None
        assert await store.body(message_id) == message
        assert await self.deliver_all(store, second) is None
        assert await store.get(second.entry.id) is None
        with pytest.raises(KeyError):
            await store.body(message_id)
        assert (await store.counts())["entries"] == 0

    @pytest_twisted.ensureDeferred
    async def test_deferral_recorded_under_enqueue_leased_lease(self, store: Any) -> None:
        """
        A deferral recorded under a lease from ``enqueue_leased`` keeps the
        entry with the decision applied, due when and where the policy says,
        and logs the attempt.
        """
        [lease] = await self.enqueue_leased(store, {ROUTE_A: [ALICE, BOB, CAROL]})
        await self.record_partial_delivery(store, lease)

    @pytest_twisted.ensureDeferred
    async def test_release_of_enqueue_leased_lease(self, store: Any) -> None:
        """
        Released, an entry stored leased is due at the given time for any
        node, with no attempt counted, and the released lease is gone.
        """
        [lease] = await self.enqueue_leased(store, node="dallas")
        assert await store.release(lease, NOW + 5) is None
        assert await self.claim(store, node="losangeles", now=NOW + 4) == []
        [again] = await self.claim(store, node="losangeles", now=NOW + 5)
        assert again.entry.id == lease.entry.id
        assert again.entry.attempts == 0
        assert await store.attempts(lease.entry.id) == []
        with pytest.raises(LeaseLost):
            await self.deliver_all(store, lease)

    @pytest_twisted.ensureDeferred
    async def test_get_shows_enqueue_leased_entry_as_claimed(self, store: Any) -> None:
        """
        ``get`` and ``entries`` show an entry stored leased exactly as they
        show one enqueued and then claimed at the same time for as long.
        """
        [lease] = await self.enqueue_leased(store, {ROUTE_A: [ALICE, BOB]})
        [claimed_id] = await self.enqueue(store, {ROUTE_A: [ALICE, BOB]})
        [claimed] = await self.claim(store, ids=[claimed_id])
        assert claimed.expires == lease.expires
        reference = await store.get(claimed_id)
        leased = await store.get(lease.entry.id)
        assert leased == evolve(reference, id=lease.entry.id, message_id=lease.entry.message_id)
        listed = {e.id: e for e in await store.entries(None, 0, 100)}
        assert listed[lease.entry.id] == leased

    @pytest_twisted.ensureDeferred
    async def test_counts_enqueue_leased_entry_as_leased(self, store: Any) -> None:
        """``counts`` counts an entry stored leased as leased, until the lease is released."""
        # A lease long enough to be current whatever the store's clock says.
        [lease] = await self.enqueue_leased(store, {ROUTE_A: [ALICE, BOB]}, lease_seconds=10.0**10)
        await self.enqueue(store, {ROUTE_B: [DAVE]})
        assert await core_counts(store) == {
            "entries": 2,
            "held": 0,
            "leased": 1,
            "recipients": 3,
            "routes": {ROUTE_A: 1, ROUTE_B: 1},
        }
        await store.release(lease, NOW)
        assert (await store.counts())["leased"] == 0

    @pytest_twisted.ensureDeferred
    async def test_enqueue_leased_without_routes_is_empty(self, store: Any) -> None:
        """No route, no lease, and nothing stored."""
        assert await store.enqueue_leased(envelope(), b"x\r\n", {}, "dallas", LEASE) == []
        assert (await store.counts())["entries"] == 0
        assert await store.entries(None, 0, 100) == []

    # -- enqueue_leased with a first attempt already decided --------------

    async def enqueue_decided(
        self,
        store: Any,
        routes: Mapping[str, Sequence[Address]],
        decided: Sequence[str],
        lease_seconds: float = LEASE,
        message: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    ) -> list[Any]:
        """
        ``enqueue_leased`` by dallas, the routes in ``decided`` deferred to
        losangeles: what it fires with, a ``Lease`` or an ``Entry`` per route
        (typed ``Any`` for the tests' unpacking).
        """
        firsts = {route: deferred_at_once(routes[route]) for route in decided}
        results: list[Any] = await store.enqueue_leased(
            envelope(), message, routes, "dallas", lease_seconds, firsts
        )
        return results

    @pytest.mark.parametrize("decided_route", [ROUTE_A, ROUTE_B], ids=["first", "second"])
    @pytest_twisted.ensureDeferred
    async def test_enqueue_leased_gives_the_decided_route_its_entry_in_routes_order(
        self, store: Any, decided_route: str
    ) -> None:
        """
        A decided route comes back as the ``Entry`` as stored (``get`` gives
        the same), the others as leases, in the order of ``routes``: the
        entry has the decision applied (due at its next attempt, for its next
        node, one attempt, each recipient pending with the deferral's reply)
        and is not leased; the lease of the other route is as without
        ``decided``.
        """
        routes = {ROUTE_A: [ALICE, BOB], ROUTE_B: [DAVE]}
        results = await self.enqueue_decided(store, routes, [decided_route])
        kinds = [Entry, Lease] if decided_route == ROUTE_A else [Lease, Entry]
        assert [type(r) for r in results] == kinds
        [entry] = [r for r in results if isinstance(r, Entry)]
        [lease] = [r for r in results if isinstance(r, Lease)]
        assert {entry.route, lease.entry.route} == {ROUTE_A, ROUTE_B}
        assert entry.route == decided_route
        assert entry.id != lease.entry.id and entry.message_id == lease.entry.message_id
        assert await store.get(entry.id) == entry
        assert entry.next_attempt == RETRY_AT and entry.node == "losangeles"
        assert entry.attempts == 1 and not entry.held
        assert entry.pending == tuple(routes[decided_route])
        assert [(r.address, r.state, r.reply) for r in entry.recipients] == [
            (a, RecipientState.PENDING, SUSPENDED) for a in routes[decided_route]
        ]
        assert entry.created == NOW and entry.sender == SENDER
        assert entry.size == len(b"Subject: hi\r\n\r\nhello\r\n")
        assert entry.envelope_helo == "client.outside.example" and entry.envelope_client == "192.0.2.7"
        assert lease.node == "dallas" and lease.expires == NOW + LEASE
        assert lease.entry.attempts == 0 and lease.entry.next_attempt == NOW
        assert lease.entry.node == "dallas"
        assert await store.attempts(lease.entry.id) == []

    @pytest_twisted.ensureDeferred
    async def test_decided_attempt_is_logged_with_the_real_entry_id(self, store: Any) -> None:
        """
        The decided entry's log holds exactly the attempt given, under the
        entry's own id (the ``entry_id`` given is ignored), with its replies.
        """
        routes = {ROUTE_A: [ALICE, BOB], ROUTE_B: [DAVE]}
        attempt, _ = deferred_at_once(routes[ROUTE_A])
        entry, _ = await self.enqueue_decided(store, routes, [ROUTE_A])
        assert await store.attempts(entry.id) == [evolve(attempt, entry_id=entry.id)]
        [logged] = await store.attempts(entry.id)
        assert logged.entry_id == entry.id and logged.node == "dallas"
        assert logged.replies == ((ALICE, SUSPENDED), (BOB, SUSPENDED))

    @pytest_twisted.ensureDeferred
    async def test_decided_entry_is_stored_as_record_leaves_it(self, store: Any) -> None:
        """
        The decided entry, its listing and its log are what ``enqueue_leased``
        without ``decided`` then ``record`` of the same attempt and decision
        leave for the same message.
        """
        routes = {ROUTE_A: [ALICE, BOB]}
        entry, = await self.enqueue_decided(store, routes, [ROUTE_A])
        [lease] = await self.enqueue_leased(store, routes)
        attempt, verdict = deferred_at_once(routes[ROUTE_A])
        recorded = await store.record(lease, evolve(attempt, entry_id=lease.entry.id), verdict)
        reference = await store.get(lease.entry.id)
        assert recorded == reference
        same = evolve(reference, id=entry.id, message_id=entry.message_id)
        assert entry == same
        assert await store.get(entry.id) == same
        listed = {e.id: e for e in await store.entries(None, 0, 100)}
        assert listed[entry.id] == same
        assert [evolve(a, entry_id="") for a in await store.attempts(entry.id)] == [
            evolve(a, entry_id="") for a in await store.attempts(lease.entry.id)
        ]

    @pytest_twisted.ensureDeferred
    async def test_decided_entry_is_due_at_its_next_attempt_for_its_next_node(
        self, store: Any
    ) -> None:
        """
        Nobody claims a decided entry before the decision's next attempt, by
        due time or by id; then its next node does, and the node that accepted
        it only after the takeover, as for a deferral ``record`` stored.
        """
        routes = {ROUTE_A: [ALICE], ROUTE_B: [DAVE]}
        first, second = await self.enqueue_decided(store, routes, [ROUTE_A, ROUTE_B])
        ids = [first.id, second.id]
        for node in ("dallas", "losangeles"):
            assert await self.claim(store, node=node, now=RETRY_AT - 1) == []
            assert await self.claim(store, node=node, now=RETRY_AT - 1, ids=ids) == []
        assert await store.next_due("losangeles", NOW, TAKEOVER) == RETRY_AT
        assert await store.next_due("dallas", NOW, TAKEOVER) == RETRY_AT + TAKEOVER
        assert await self.claim(store, node="dallas", now=RETRY_AT + TAKEOVER - 1, ids=ids) == []
        [again] = await self.claim(store, node="losangeles", now=RETRY_AT, ids=[first.id])
        assert again.entry == first
        [taken] = await self.claim(store, node="dallas", now=RETRY_AT + TAKEOVER, ids=[second.id])
        assert taken.entry == second

    @pytest_twisted.ensureDeferred
    async def test_counts_decided_entry_as_not_leased(self, store: Any) -> None:
        """``counts`` counts the decided entry, its recipients and route, but not as leased."""
        # A lease long enough to be current whatever the store's clock says.
        await self.enqueue_decided(
            store, {ROUTE_A: [ALICE, BOB], ROUTE_B: [DAVE]}, [ROUTE_A], lease_seconds=10.0**10
        )
        assert await core_counts(store) == {
            "entries": 2,
            "held": 0,
            "leased": 1,
            "recipients": 3,
            "routes": {ROUTE_A: 1, ROUTE_B: 1},
        }

    @pytest.mark.parametrize(
        "message", [ODD_MESSAGE, bytes(range(256)) * 1000, b""], ids=["8bit", "large", "empty"]
    )
    @pytest_twisted.ensureDeferred
    async def test_decided_message_body_lasts_until_both_entries_are_done(
        self, store: Any, message: bytes
    ) -> None:
        """
        The message is stored with a decided entry: its body stays while
        either entry is left (the leased one delivered first) and goes with
        the last.
        """
        routes = {ROUTE_A: [ALICE], ROUTE_B: [DAVE]}
        entry, lease = await self.enqueue_decided(store, routes, [ROUTE_A], message=message)
        assert await store.body(entry.message_id) == message
        assert entry.size == len(message)
        assert await self.deliver_all(store, lease) is None
        assert await store.body(entry.message_id) == message
        [again] = await self.claim(store, node="losangeles", now=RETRY_AT)
        assert await self.deliver_all(store, again, at=RETRY_AT) is None
        with pytest.raises(KeyError):
            await store.body(entry.message_id)
        assert (await store.counts())["entries"] == 0

    @pytest_twisted.ensureDeferred
    async def test_message_with_every_route_decided(self, store: Any) -> None:
        """
        With every route decided, ``enqueue_leased`` gives only entries, in
        the order of ``routes``, none leased, the message stored, each due
        at its next attempt.
        """
        routes = {ROUTE_B: [DAVE], ROUTE_A: [ALICE, BOB]}
        message = b"Subject: down\r\n\r\nboth\r\n"
        results = await self.enqueue_decided(store, routes, [ROUTE_A, ROUTE_B], message=message)
        assert all(isinstance(r, Entry) for r in results)
        assert [e.route for e in results] == [ROUTE_B, ROUTE_A]
        assert [e.pending for e in results] == [(DAVE,), (ALICE, BOB)]
        assert len({e.id for e in results}) == 2 and len({e.message_id for e in results}) == 1
        for entry in results:
            assert await store.get(entry.id) == entry
            assert entry.attempts == 1 and entry.next_attempt == RETRY_AT and entry.node == "losangeles"
            assert len(await store.attempts(entry.id)) == 1
        assert await store.body(results[0].message_id) == message
        counts = await store.counts()
        assert (counts["entries"], counts["leased"], counts["recipients"]) == (2, 0, 3)
        assert await store.next_due("losangeles", NOW, TAKEOVER) == RETRY_AT

    # -- claim ----------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_claim_leases_only_due_entries(self, store: Any) -> None:
        """An entry whose next attempt lies in the future is not claimed."""
        [due] = await self.enqueue(store, received_at=NOW - 10)
        await self.enqueue(store, received_at=NOW + 10)
        leases = await self.claim(store)
        assert [lease.entry.id for lease in leases] == [due]
        assert leases[0].node == "dallas"
        assert leases[0].expires == NOW + LEASE
        assert leases[0].token

    @pytest_twisted.ensureDeferred
    async def test_claim_earliest_first_within_limit(self, store: Any) -> None:
        """``limit`` bounds the leases, and the earliest due are leased first."""
        late = await self.enqueue(store, received_at=NOW - 1)
        early = await self.enqueue(store, received_at=NOW - 30)
        middle = await self.enqueue(store, received_at=NOW - 20)
        leases = await self.claim(store, limit=2)
        assert [lease.entry.id for lease in leases] == early + middle
        leases = await self.claim(store, limit=2)
        assert [lease.entry.id for lease in leases] == late

    @pytest_twisted.ensureDeferred
    async def test_claim_gives_entry_as_stored(self, store: Any) -> None:
        """The lease carries the entry as it was when claimed."""
        [entry_id] = await self.enqueue(store, {ROUTE_A: [ALICE, BOB]}, received_at=NOW - 3)
        before = await store.get(entry_id)
        [lease] = await self.claim(store)
        assert lease.entry == before

    @pytest_twisted.ensureDeferred
    async def test_claim_skips_held_entries(self, store: Any) -> None:
        """A held entry is never claimed."""
        [entry_id] = await self.enqueue(store)
        assert await store.hold(entry_id) is True
        assert await self.claim(store, now=NOW + 10 * TAKEOVER) == []

    @pytest_twisted.ensureDeferred
    async def test_reservation_for_other_node_honoured_until_takeover(self, store: Any) -> None:
        """Another node gets a reserved entry only ``takeover_seconds`` after it was due."""
        [entry_id] = await self.enqueue(store, node="dallas")
        assert await self.claim(store, node="losangeles", now=NOW + TAKEOVER - 1) == []
        leases = await self.claim(store, node="losangeles", now=NOW + TAKEOVER)
        assert [lease.entry.id for lease in leases] == [entry_id]

    @pytest_twisted.ensureDeferred
    async def test_reserved_node_claims_at_once(self, store: Any) -> None:
        """The node an entry is reserved for gets it as soon as it is due."""
        [entry_id] = await self.enqueue(store, node="dallas")
        leases = await self.claim(store, node="dallas", now=NOW)
        assert [lease.entry.id for lease in leases] == [entry_id]

    @pytest_twisted.ensureDeferred
    async def test_claim_by_ids(self, store: Any) -> None:
        """With ``ids`` only those entries are leased, and only if due to the node."""
        [first] = await self.enqueue(store)
        [second] = await self.enqueue(store)
        [other] = await self.enqueue(store, node="losangeles")
        leases = await self.claim(store, ids=[second, other])
        assert [lease.entry.id for lease in leases] == [second]
        leases = await self.claim(store, ids=[second])
        assert leases == []
        leases = await self.claim(store, ids=[first])
        assert [lease.entry.id for lease in leases] == [first]

    @pytest_twisted.ensureDeferred
    async def test_claim_by_unknown_ids_is_empty(self, store: Any) -> None:
        """Ids that name nothing lease nothing."""
        await self.enqueue(store)
        assert await self.claim(store, ids=["nosuchentry"]) == []
        assert await self.claim(store, ids=[]) == []

    @pytest_twisted.ensureDeferred
    async def test_leased_entry_not_claimed_again(self, store: Any) -> None:
        """While a lease lasts, nobody (not even its own node) claims the entry again."""
        await self.enqueue(store)
        [lease] = await self.claim(store, node="dallas")
        assert await self.claim(store, node="dallas", now=NOW + LEASE - 1) == []
        assert await self.claim(store, node="losangeles", now=NOW + LEASE - 1) == []

    @pytest_twisted.ensureDeferred
    async def test_simultaneous_claims_are_disjoint(self, store: Any) -> None:
        """Two nodes claiming at the same moment never lease the same entry."""
        ids = set()
        for _ in range(20):
            ids.update(await self.enqueue(store, node="elsewhere"))
        now = NOW + TAKEOVER
        results = await DeferredList(
            [
                store.claim("dallas", now, 15, LEASE, TAKEOVER),
                store.claim("losangeles", now, 15, LEASE, TAKEOVER),
            ],
            fireOnOneErrback=True,
            consumeErrors=True,
        )
        a = {lease.entry.id for lease in results[0][1]}
        b = {lease.entry.id for lease in results[1][1]}
        assert not a & b
        assert a | b == ids

    @pytest_twisted.ensureDeferred
    async def test_expired_lease_makes_entry_claimable_again(self, store: Any) -> None:
        """A lease not recorded in time expires; any node may then claim the entry."""
        [entry_id] = await self.enqueue(store)
        [old] = await self.claim(store, node="dallas")
        assert await self.claim(store, node="losangeles", now=old.expires - 1) == []
        [new] = await self.claim(store, node="losangeles", now=old.expires)
        assert new.entry.id == entry_id
        assert new.token != old.token

    @pytest_twisted.ensureDeferred
    async def test_record_under_lost_lease_fails_and_changes_nothing(self, store: Any) -> None:
        """The node whose lease expired gets ``LeaseLost`` and its attempt is not recorded."""
        [entry_id] = await self.enqueue(store)
        [old] = await self.claim(store, node="dallas")
        [new] = await self.claim(store, node="losangeles", now=old.expires)
        with pytest.raises(LeaseLost):
            await self.deliver_all(store, old)
        entry = await store.get(entry_id)
        assert entry.attempts == 0 and entry.pending == (ALICE,)
        assert await store.attempts(entry_id) == []
        # The new holder's lease is intact.
        assert await self.deliver_all(store, new) is None

    async def assert_stale_record_refused(
        self, store: Any, old: Lease, new: Lease, outcomes: Mapping[Address, tuple[Action, Reply]]
    ) -> None:
        """
        ``record`` under ``old`` (expired, its entry since claimed as ``new``)
        of an attempt that leaves recipients pending raises ``LeaseLost`` and
        changes nothing: not the entry, not its attempt log, not the new lease.
        """
        before = await store.get(new.entry.id)
        logged = await store.attempts(new.entry.id)
        replies = {a: reply for a, (_, reply) in outcomes.items()}
        with pytest.raises(LeaseLost):
            await store.record(
                old,
                attempt_for(old, replies, at=old.expires),
                decision(outcomes, next_attempt=old.expires + 1200, next_node="dallas"),
            )
        assert await store.get(new.entry.id) == before
        assert await store.attempts(new.entry.id) == logged
        # The stale writer did not wipe the new holder's token: nobody else
        # can claim the entry, and the new lease still records.
        assert await self.claim(store, node="dallas", now=old.expires + 1) == []
        await self.record_partial_delivery(store, new)

    @pytest_twisted.ensureDeferred
    async def test_record_of_retry_under_lost_lease_fails_and_changes_nothing(
        self, store: Any
    ) -> None:
        """A node whose lease expired cannot record a retry over the new holder's lease."""
        await self.enqueue(store, {ROUTE_A: [ALICE, BOB, CAROL]})
        [old] = await self.claim(store, node="dallas")
        [new] = await self.claim(store, node="losangeles", now=old.expires)
        await self.assert_stale_record_refused(
            store, old, new, {a: (Action.RETRY, LATER) for a in (ALICE, BOB, CAROL)}
        )

    @pytest_twisted.ensureDeferred
    async def test_record_of_partial_delivery_under_lost_lease_fails_and_changes_nothing(
        self, store: Any
    ) -> None:
        """Nor a partial delivery: recipients stay pending, so the entry would stay."""
        await self.enqueue(store, {ROUTE_A: [ALICE, BOB, CAROL]})
        [old] = await self.claim(store, node="dallas")
        [new] = await self.claim(store, node="losangeles", now=old.expires)
        await self.assert_stale_record_refused(
            store,
            old,
            new,
            {
                ALICE: (Action.DELIVERED, OK),
                BOB: (Action.RETRY, LATER),
                CAROL: (Action.FAILED, NO),
            },
        )

    @pytest_twisted.ensureDeferred
    async def test_record_of_retry_under_lost_enqueue_leased_lease_changes_nothing(
        self, store: Any
    ) -> None:
        """The accepting node's lease, once expired and taken over, records nothing either."""
        [old] = await self.enqueue_leased(store, {ROUTE_A: [ALICE, BOB, CAROL]})
        [new] = await self.claim(store, node="losangeles", now=old.expires)
        await self.assert_stale_record_refused(
            store, old, new, {a: (Action.RETRY, LATER) for a in (ALICE, BOB, CAROL)}
        )

    @pytest_twisted.ensureDeferred
    async def test_release_of_lost_lease_does_nothing(self, store: Any) -> None:
        """Releasing an expired lease leaves the new holder's lease alone."""
        await self.enqueue(store)
        [old] = await self.claim(store, node="dallas")
        [new] = await self.claim(store, node="losangeles", now=old.expires)
        await store.release(old, old.expires + 1)
        assert await self.claim(store, node="dallas", now=old.expires + 2) == []
        assert await self.deliver_all(store, new) is None

    # -- record ---------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_all_delivered_removes_entry_and_body(self, store: Any) -> None:
        """Once every recipient is done the entry and its message leave the spool."""
        [entry_id] = await self.enqueue(store, {ROUTE_A: [ALICE, BOB]})
        [lease] = await self.claim(store)
        assert await self.deliver_all(store, lease) is None
        assert await store.get(entry_id) is None
        with pytest.raises(KeyError):
            await store.body(lease.entry.message_id)
        assert (await store.counts())["entries"] == 0
        assert await self.claim(store, now=NOW + 10 * TAKEOVER) == []

    @pytest_twisted.ensureDeferred
    async def test_failed_and_expired_recipients_also_leave(self, store: Any) -> None:
        """Failed and expired recipients are final too: no pending one, no entry."""
        [entry_id] = await self.enqueue(store, {ROUTE_A: [ALICE, BOB, CAROL]})
        [lease] = await self.claim(store)
        result = await store.record(
            lease,
            attempt_for(lease, {ALICE: OK, BOB: NO, CAROL: LATER}),
            decision(
                {
                    ALICE: (Action.DELIVERED, OK),
                    BOB: (Action.FAILED, NO),
                    CAROL: (Action.EXPIRED, LATER),
                }
            ),
        )
        assert result is None
        assert await store.get(entry_id) is None

    @pytest_twisted.ensureDeferred
    async def test_body_kept_while_another_entry_uses_it(self, store: Any) -> None:
        """A message for two routes keeps its body until both entries are done."""
        first, second = await self.enqueue(store, {ROUTE_A: [ALICE], ROUTE_B: [DAVE]})
        leases = {lease.entry.id: lease for lease in await self.claim(store)}
        message_id = leases[first].entry.message_id
        await self.deliver_all(store, leases[first])
        assert await store.get(first) is None
        assert await store.body(message_id) == b"Subject: hi\r\n\r\nhello\r\n"
        await self.deliver_all(store, leases[second])
        with pytest.raises(KeyError):
            await store.body(message_id)

    @pytest_twisted.ensureDeferred
    async def test_partial_delivery_keeps_pending_recipients(self, store: Any) -> None:
        """Only the deferred recipients stay pending, due when and where the policy says."""
        await self.enqueue(store, {ROUTE_A: [ALICE, BOB, CAROL]})
        [lease] = await self.claim(store)
        await self.record_partial_delivery(store, lease)

    async def record_partial_delivery(self, store: Any, lease: Lease) -> None:
        """
        Under ``lease`` (an entry for ALICE, BOB and CAROL, created at
        ``NOW``), record ALICE delivered, BOB deferred to losangeles in 20
        minutes, CAROL failed; check the entry that stays, its attempt, and
        that it is due again then, to losangeles first.
        """
        retry_at = NOW + 1200
        attempt = attempt_for(lease, {ALICE: OK, BOB: LATER, CAROL: NO})
        updated = await store.record(
            lease,
            attempt,
            decision(
                {
                    ALICE: (Action.DELIVERED, OK),
                    BOB: (Action.RETRY, LATER),
                    CAROL: (Action.FAILED, NO),
                },
                next_attempt=retry_at,
                next_node="losangeles",
            ),
        )
        assert updated.pending == (BOB,)
        states = {r.address: (r.state, r.reply) for r in updated.recipients}
        assert states == {
            ALICE: (RecipientState.DELIVERED, OK),
            BOB: (RecipientState.PENDING, LATER),
            CAROL: (RecipientState.FAILED, NO),
        }
        assert updated.next_attempt == retry_at
        assert updated.node == "losangeles"
        assert updated.attempts == 1
        assert updated.created == NOW
        assert await store.get(lease.entry.id) == updated
        assert await store.attempts(lease.entry.id) == [attempt]
        # The lease ended: due again at retry_at, to losangeles first.
        assert await self.claim(store, node="losangeles", now=retry_at - 1) == []
        assert await self.claim(store, node="dallas", now=retry_at) == []
        [again] = await self.claim(store, node="losangeles", now=retry_at)
        assert again.entry == updated

    @pytest_twisted.ensureDeferred
    async def test_retry_for_any_node(self, store: Any) -> None:
        """A decision without ``next_node`` lets any node make the next attempt."""
        [entry_id] = await self.enqueue(store)
        [lease] = await self.claim(store, node="dallas")
        await store.record(
            lease,
            attempt_for(lease, {ALICE: LATER}),
            decision({ALICE: (Action.RETRY, LATER)}, next_attempt=NOW + 60),
        )
        [again] = await self.claim(store, node="losangeles", now=NOW + 60)
        assert again.entry.id == entry_id and again.entry.node is None

    @pytest_twisted.ensureDeferred
    async def test_delay_notice_is_recorded_once_and_for_good(self, store: Any) -> None:
        """
        ``Decision.delay_notified`` marks the entry (``Entry.delay_notified``)
        for every later claim, get and listing, and a later record without
        it does not clear it: no node sends the sender a second delay notice.
        """
        [entry_id] = await self.enqueue(store, {ROUTE_A: [ALICE, BOB]})
        [lease] = await self.claim(store)
        assert not lease.entry.delay_notified
        later = {ALICE: (Action.RETRY, LATER), BOB: (Action.RETRY, LATER)}
        notified = evolve(decision(later, next_attempt=NOW + 60), delay_notified=True)
        updated = await store.record(lease, attempt_for(lease, {ALICE: LATER, BOB: LATER}), notified)
        assert updated.delay_notified
        assert (await store.get(entry_id)).delay_notified
        [listed] = await store.entries(None, 0, 10)
        assert listed.delay_notified
        [again] = await self.claim(store, node="losangeles", now=NOW + 60)
        assert again.entry.delay_notified
        partly = decision({ALICE: (Action.DELIVERED, OK), BOB: (Action.RETRY, LATER)}, next_attempt=NOW + 120)
        updated = await store.record(again, attempt_for(again, {ALICE: OK, BOB: LATER}, NOW + 60), partly)
        assert updated.delay_notified and updated.pending == (BOB,)
        [third] = await self.claim(store, now=NOW + 120)
        assert third.entry.delay_notified
        # An entry never notified stays so through records without it.
        [other] = await self.enqueue(store)
        [lease] = await self.claim(store, ids=[other], now=NOW + 120)
        await store.record(lease, attempt_for(lease, {ALICE: LATER}), decision({ALICE: (Action.RETRY, LATER)}, NOW + 180))
        assert not (await store.get(other)).delay_notified

    @pytest_twisted.ensureDeferred
    async def test_hold_decision_holds_entry(self, store: Any) -> None:
        """A decision to hold keeps the entry, unclaimable until an operator releases it."""
        [entry_id] = await self.enqueue(store)
        [lease] = await self.claim(store)
        updated = await store.record(
            lease, attempt_for(lease, {ALICE: LATER}), decision({ALICE: (Action.HOLD, LATER)})
        )
        assert updated.held and updated.pending == (ALICE,)
        assert (await store.get(entry_id)).held
        assert await self.claim(store, now=NOW + 100 * TAKEOVER) == []
        assert await store.release_held(entry_id, NOW + 50) is True
        [again] = await self.claim(store, node="losangeles", now=NOW + 50)
        assert again.entry.id == entry_id and not again.entry.held

    @pytest_twisted.ensureDeferred
    async def test_attempts_are_logged_with_replies(self, store: Any) -> None:
        """Every recorded attempt is kept, oldest first, with its replies."""
        [entry_id] = await self.enqueue(store, {ROUTE_A: [ALICE, BOB]})
        [lease] = await self.claim(store)
        first = attempt_for(lease, {ALICE: LATER, BOB: LATER}, at=NOW)
        await store.record(
            lease,
            first,
            decision(
                {ALICE: (Action.RETRY, LATER), BOB: (Action.RETRY, LATER)},
                next_attempt=NOW + 100,
                next_node="losangeles",
            ),
        )
        [lease] = await self.claim(store, node="losangeles", now=NOW + 100)
        second = attempt_for(lease, {ALICE: OK, BOB: LATER}, at=NOW + 100)
        updated = await store.record(
            lease,
            second,
            decision(
                {ALICE: (Action.DELIVERED, OK), BOB: (Action.RETRY, LATER)},
                next_attempt=NOW + 200,
            ),
        )
        assert updated.attempts == 2
        assert await store.attempts(entry_id) == [first, second]

    @pytest_twisted.ensureDeferred
    async def test_attempts_of_unknown_entry_is_empty(self, store: Any) -> None:
        assert await store.attempts("nosuchentry") == []

    # -- release --------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_release_makes_entry_due_for_any_node(self, store: Any) -> None:
        """A released entry is due at the given time, to any node, with no attempt counted."""
        [entry_id] = await self.enqueue(store, node="dallas")
        [lease] = await self.claim(store, node="dallas")
        assert await store.release(lease, NOW + 5) is None
        assert await self.claim(store, node="losangeles", now=NOW + 4) == []
        [again] = await self.claim(store, node="losangeles", now=NOW + 5)
        assert again.entry.id == entry_id
        assert again.entry.attempts == 0
        assert await store.attempts(entry_id) == []

    @pytest_twisted.ensureDeferred
    async def test_record_after_release_is_lease_lost(self, store: Any) -> None:
        """A released lease is gone: recording under it fails."""
        await self.enqueue(store)
        [lease] = await self.claim(store)
        await store.release(lease, NOW)
        with pytest.raises(LeaseLost):
            await self.deliver_all(store, lease)

    # -- next_due -------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_next_due_empty_spool(self, store: Any) -> None:
        assert await store.next_due("dallas", NOW) is None

    @pytest_twisted.ensureDeferred
    async def test_next_due_is_earliest_claimable(self, store: Any) -> None:
        """The earliest time an entry is due to the node, held entries aside."""
        [held] = await self.enqueue(store, received_at=NOW - 100)
        await store.hold(held)
        await self.enqueue(store, received_at=NOW + 20)
        await self.enqueue(store, received_at=NOW + 10)
        assert await store.next_due("dallas", NOW) == NOW + 10

    @pytest_twisted.ensureDeferred
    async def test_next_due_counts_reservation_for_other_node(self, store: Any) -> None:
        """An entry reserved for another node is due to this one only after the takeover."""
        await self.enqueue(store, node="losangeles", received_at=NOW)
        assert await store.next_due("losangeles", NOW, TAKEOVER) == NOW
        assert await store.next_due("dallas", NOW, TAKEOVER) == NOW + TAKEOVER

    @pytest_twisted.ensureDeferred
    async def test_next_due_of_leased_entry_is_lease_expiry(self, store: Any) -> None:
        """A leased entry is next due when its lease would expire."""
        await self.enqueue(store)
        [lease] = await self.claim(store)
        assert await store.next_due("losangeles", NOW, TAKEOVER) == lease.expires

    # -- the read side --------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_get_unknown_entry(self, store: Any) -> None:
        assert await store.get("nosuchentry") is None

    @pytest_twisted.ensureDeferred
    async def test_body_unknown_message(self, store: Any) -> None:
        with pytest.raises(KeyError):
            await store.body("nosuchmessage")

    @pytest_twisted.ensureDeferred
    async def test_entries_filters_and_orders(self, store: Any) -> None:
        """``entries`` filters by route, held and recipient, ordered by next attempt."""
        [a_late] = await self.enqueue(store, {ROUTE_A: [ALICE]}, received_at=NOW + 30)
        [a_early] = await self.enqueue(store, {ROUTE_A: [BOB, CAROL]}, received_at=NOW + 10)
        [b_mid] = await self.enqueue(store, {ROUTE_B: [DAVE]}, received_at=NOW + 20)
        await store.hold(a_late)

        async def ids(f: EntryFilter | None, offset: int = 0, limit: int = 100) -> list[str]:
            return [e.id for e in await store.entries(f, offset, limit)]

        assert await ids(None) == [a_early, b_mid, a_late]
        assert await ids(EntryFilter(route=ROUTE_A)) == [a_early, a_late]
        assert await ids(EntryFilter(held=True)) == [a_late]
        assert await ids(EntryFilter(held=False)) == [a_early, b_mid]
        assert await ids(EntryFilter(recipient="carol@a.example")) == [a_early]
        assert await ids(EntryFilter(recipient="Carol@A.Example")) == [a_early]
        assert await ids(EntryFilter(recipient="nobody@a.example")) == []
        assert await ids(EntryFilter(route=ROUTE_A, held=False)) == [a_early]
        assert await ids(None, offset=1, limit=1) == [b_mid]
        assert await ids(None, offset=3, limit=10) == []
        [entry] = await store.entries(EntryFilter(route=ROUTE_B), 0, 10)
        assert entry == await store.get(b_mid)

    @pytest_twisted.ensureDeferred
    async def test_counts(self, store: Any) -> None:
        """``counts`` reports entries, held, leased, pending recipients and routes."""
        await self.enqueue(store, {ROUTE_A: [ALICE, BOB], ROUTE_B: [DAVE]})
        [held] = await self.enqueue(store, {ROUTE_A: [CAROL]})
        await store.hold(held)
        # A lease long enough to be current whatever the store's clock says.
        await self.claim(store, limit=1, lease_seconds=10.0**10)
        assert await core_counts(store) == {
            "entries": 3,
            "held": 1,
            "leased": 1,
            "recipients": 4,
            "routes": {ROUTE_A: 2, ROUTE_B: 1},
        }

    @pytest_twisted.ensureDeferred
    async def test_counts_empty_spool(self, store: Any) -> None:
        assert await core_counts(store) == {
            "entries": 0,
            "held": 0,
            "leased": 0,
            "recipients": 0,
            "routes": {},
        }

    # -- operator actions -----------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_hold_and_release_held(self, store: Any) -> None:
        """Held entries wait for the operator; released ones are due at once to any node."""
        [entry_id] = await self.enqueue(store, received_at=NOW + 1000)
        assert await store.hold(entry_id) is True
        assert (await store.get(entry_id)).held
        assert await store.release_held(entry_id, NOW) is True
        entry = await store.get(entry_id)
        assert not entry.held and entry.next_attempt == NOW
        [lease] = await self.claim(store, node="losangeles", now=NOW)
        assert lease.entry.id == entry_id

    @pytest_twisted.ensureDeferred
    async def test_hold_and_release_during_lease_keep_the_lease(self, store: Any) -> None:
        """Holding and releasing an entry being delivered never hands it to another node."""
        [entry_id] = await self.enqueue(store)
        [lease] = await self.claim(store)
        assert await store.hold(entry_id) is True
        assert await store.release_held(entry_id, NOW + 1) is True
        assert await self.claim(store, node="losangeles", now=NOW + 1) == []
        assert (await store.counts())["held"] == 0
        assert await self.deliver_all(store, lease) is None

    @pytest_twisted.ensureDeferred
    async def test_operator_actions_on_unknown_entry(self, store: Any) -> None:
        assert await store.hold("nosuchentry") is False
        assert await store.release_held("nosuchentry", NOW) is False
        assert await store.delete("nosuchentry") is False

    @pytest_twisted.ensureDeferred
    async def test_flush_route(self, store: Any) -> None:
        """Flushing a route makes its entries (not held ones) due now for any node."""
        [a] = await self.enqueue(store, {ROUTE_A: [ALICE]}, received_at=NOW + 500)
        [b] = await self.enqueue(store, {ROUTE_B: [DAVE]}, received_at=NOW + 500)
        [held] = await self.enqueue(store, {ROUTE_A: [BOB]}, received_at=NOW + 500)
        await store.hold(held)
        assert await store.flush(ROUTE_A, NOW) == 1
        leases = await self.claim(store, node="losangeles", now=NOW)
        assert [lease.entry.id for lease in leases] == [a]
        assert await store.flush(None, NOW) == 1
        leases = await self.claim(store, node="losangeles", now=NOW)
        assert [lease.entry.id for lease in leases] == [b]

    @pytest_twisted.ensureDeferred
    async def test_a_flush_hands_out_the_backlog_oldest_first(self, store: Any) -> None:
        """After a flush, claims take the oldest accepted entries first, whatever their retries said."""
        ids: list[str] = []  # oldest first; stored newest first, so the store's own order is no help
        for i in range(5):
            [entry_id] = await self.enqueue(store, {ROUTE_A: [ALICE]}, received_at=NOW - 100 - 10 * i)
            ids.insert(0, entry_id)
        for lease in await self.claim(store, now=NOW, ids=ids):
            # Retries in the reverse order of arrival, as staggered retries may fall.
            later = NOW + 1000 - 100 * ids.index(lease.entry.id)
            await store.record(
                lease, attempt_for(lease, {ALICE: LATER}), decision({ALICE: (Action.RETRY, LATER)}, next_attempt=later)
            )
        assert await store.flush(ROUTE_A, NOW + 1) == 5
        claimed = [lease.entry.id for lease in await self.claim(store, node="losangeles", now=NOW + 1, limit=5)]
        assert claimed == ids

    @pytest_twisted.ensureDeferred
    async def test_flush_leaves_leased_entries_alone(self, store: Any) -> None:
        """Flushing never hands out an entry that is being delivered."""
        await self.enqueue(store)
        await self.claim(store)
        assert await store.flush(None, NOW + 1) == 0
        assert await self.claim(store, node="losangeles", now=NOW + 1) == []

    @pytest_twisted.ensureDeferred
    async def test_delete(self, store: Any) -> None:
        """A deleted entry is gone, and its message with it when no other entry uses it."""
        first, second = await self.enqueue(store, {ROUTE_A: [ALICE], ROUTE_B: [DAVE]})
        message_id = (await store.get(first)).message_id
        assert await store.delete(first) is True
        assert await store.get(first) is None
        assert await store.body(message_id)
        assert await store.delete(second) is True
        with pytest.raises(KeyError):
            await store.body(message_id)
        assert (await store.counts())["entries"] == 0

    @pytest_twisted.ensureDeferred
    async def test_delete_leased_entry_loses_lease(self, store: Any) -> None:
        """Recording an attempt for an entry the operator deleted fails with ``LeaseLost``."""
        [entry_id] = await self.enqueue(store)
        [lease] = await self.claim(store)
        assert await store.delete(entry_id) is True
        with pytest.raises(LeaseLost):
            await self.deliver_all(store, lease)


class NodeRegistryContract:
    """
    Tests every store that provides ``INodeRegistry`` passes, with the same
    ``store`` fixture as ``SpoolStoreContract``.
    """

    def test_provides_node_registry(self, store: Any) -> None:
        """The store provides every method of ``INodeRegistry``."""
        assert verifyObject(INodeRegistry, store)

    @pytest_twisted.ensureDeferred
    async def test_no_nodes_at_first(self, store: Any) -> None:
        """An empty store knows no node."""
        assert await store.nodes(NOW) == []

    @pytest_twisted.ensureDeferred
    async def test_heartbeat_is_listed_and_replaced_by_the_next(self, store: Any) -> None:
        """``nodes`` gives each node's last heartbeat and its info, by name."""
        await store.heartbeat("losangeles", NOW, {"host": "la1", "pid": 7})
        await store.heartbeat("dallas", NOW + 1, {"host": "dal1", "pid": 8, "in_flight": 0})
        await store.heartbeat("losangeles", NOW + 10, {"host": "la1", "pid": 9})
        listed = await store.nodes(NOW + 11)
        assert listed == [
            {"name": "dallas", "last_seen": NOW + 1, "info": {"host": "dal1", "pid": 8, "in_flight": 0},
             "leased": 0, "reserved": 0},
            {"name": "losangeles", "last_seen": NOW + 10, "info": {"host": "la1", "pid": 9},
             "leased": 0, "reserved": 0},
        ]

    @pytest_twisted.ensureDeferred
    async def test_nodes_show_what_each_holds(self, store: Any) -> None:
        """
        Entries reserved for a node and entries it holds under a live lease are
        counted for it; a node that holds entries is listed without a heartbeat.
        """
        await store.heartbeat("dallas", NOW, {})
        routes = {ROUTE_A: [ALICE], ROUTE_B: [DAVE]}
        await store.enqueue(envelope(), b"x\r\n", routes, "dallas")
        await store.enqueue(envelope(), b"y\r\n", routes, "losangeles")
        # losangeles leases one of its own: one leased, one reserved.
        [lease] = await store.claim("losangeles", NOW, 1, LEASE, TAKEOVER)
        assert lease.entry.node == "losangeles"
        by_name = {n["name"]: n for n in await store.nodes(NOW + 1)}
        assert by_name["dallas"]["reserved"] == 2 and by_name["dallas"]["leased"] == 0
        assert by_name["losangeles"]["reserved"] == 1 and by_name["losangeles"]["leased"] == 1
        assert by_name["losangeles"]["last_seen"] is None and by_name["losangeles"]["info"] == {}

    @pytest_twisted.ensureDeferred
    async def test_enqueue_leased_entries_are_held_by_the_node(self, store: Any) -> None:
        """Entries stored leased count as leased by the accepting node, not reserved for it."""
        routes = {ROUTE_A: [ALICE], ROUTE_B: [DAVE]}
        await store.enqueue_leased(envelope(), b"x\r\n", routes, "dallas", LEASE)
        by_name = {n["name"]: n for n in await store.nodes(NOW + 1)}
        assert by_name["dallas"]["leased"] == 2
        assert by_name["dallas"]["reserved"] == 0

    @pytest_twisted.ensureDeferred
    async def test_decided_entries_are_reserved_for_their_next_node(self, store: Any) -> None:
        """
        Of a message stored with one route decided, the leased entry is held
        by the accepting node and the decided one reserved for its next node.
        """
        routes = {ROUTE_A: [ALICE], ROUTE_B: [DAVE]}
        await store.enqueue_leased(
            envelope(), b"x\r\n", routes, "dallas", LEASE, {ROUTE_A: deferred_at_once([ALICE])}
        )
        by_name = {n["name"]: n for n in await store.nodes(NOW + 1)}
        assert (by_name["dallas"]["leased"], by_name["dallas"]["reserved"]) == (1, 0)
        assert (by_name["losangeles"]["leased"], by_name["losangeles"]["reserved"]) == (0, 1)

    @pytest_twisted.ensureDeferred
    async def test_expired_lease_is_no_longer_held(self, store: Any) -> None:
        """A node whose lease expired (it died) no longer holds that entry."""
        await store.enqueue(envelope(), b"x\r\n", {ROUTE_A: [ALICE]}, "dallas")
        await store.claim("dallas", NOW, 1, LEASE, TAKEOVER)
        later = [n for n in await store.nodes(NOW + LEASE + 1) if n["name"] == "dallas"]
        assert later == [] or later[0]["leased"] == 0

    @pytest_twisted.ensureDeferred
    async def test_held_entries_are_not_reserved(self, store: Any) -> None:
        """An entry an operator holds is nobody's to deliver."""
        [entry_id] = await store.enqueue(envelope(), b"x\r\n", {ROUTE_A: [ALICE]}, "dallas")
        await store.hold(entry_id)
        listed = [n for n in await store.nodes(NOW) if n["name"] == "dallas"]
        assert listed == [] or listed[0]["reserved"] == 0


class RouteCoordinationContract:
    """
    Tests of ``IRouteCoordination``, for a store that provides it: shares of
    a route's connections between nodes, and routes' hub-wide states.
    """

    @pytest.fixture
    def ask(self, store: Any) -> Any:
        async def ask(
            node: str, want: int, holding: int = 0, limit: int = 3, now: float = NOW,
            ttl: float = 30.0, route: str = ROUTE_A,
        ) -> int:
            given: int = await store.share(route, node, want, holding, limit, now, ttl)
            return given

        return ask

    def test_provides_route_coordination(self, store: Any) -> None:
        assert verifyObject(IRouteCoordination, store)

    @pytest_twisted.ensureDeferred
    async def test_lone_node_gets_what_it_wants_up_to_the_limit(self, ask: Any) -> None:
        assert await ask("dallas", 2) == 2
        assert await ask("dallas", 5) == 3
        assert await ask("dallas", 0) == 0

    @pytest_twisted.ensureDeferred
    async def test_second_node_gets_what_the_first_gives_back(self, ask: Any) -> None:
        """
        The connections open never add up to more than the limit: a node
        shrinks first, then the other grows; and a node kept busy on all of
        them shrinks too (given its fair part, less than it holds, it starts
        nothing new), or it would keep them for the whole backlog.
        """
        assert await ask("dallas", 3) == 3
        # losangeles wants some, but dallas holds all three.
        assert await ask("losangeles", 3) == 0
        # dallas, asking again with all three still open, is given its fair two...
        assert await ask("dallas", 3, holding=3) == 2
        # ...and its three still count against losangeles until it holds two.
        assert await ask("losangeles", 3) == 0
        assert await ask("dallas", 3, holding=2) == 2
        assert await ask("losangeles", 3) == 1
        # Both still want three: the fair split of three stays two and one.
        assert await ask("dallas", 3, holding=2) == 2
        assert await ask("losangeles", 3, holding=1) == 1

    @pytest_twisted.ensureDeferred
    async def test_a_node_wanting_little_leaves_the_rest_to_the_other(self, ask: Any) -> None:
        assert await ask("dallas", 1, limit=10) == 1
        assert await ask("losangeles", 20, limit=10) == 9

    @pytest_twisted.ensureDeferred
    async def test_share_of_a_silent_node_lapses(self, ask: Any) -> None:
        """A node that died stops asking: its share is forgotten after its ttl."""
        assert await ask("dallas", 3, ttl=10) == 3
        assert await ask("losangeles", 3, now=NOW + 9) == 0
        assert await ask("losangeles", 3, now=NOW + 10) == 3

    @pytest_twisted.ensureDeferred
    async def test_what_a_node_holds_counts_against_the_others(self, ask: Any) -> None:
        assert await ask("dallas", 3) == 3
        # dallas wants nothing more, but two of its connections are still open.
        assert await ask("dallas", 0, holding=2) == 0
        assert await ask("losangeles", 3) == 1
        assert await ask("dallas", 0, holding=0) == 0
        assert await ask("losangeles", 3, holding=1) == 3

    @pytest_twisted.ensureDeferred
    async def test_routes_are_shared_separately(self, ask: Any) -> None:
        assert await ask("dallas", 3) == 3
        assert await ask("losangeles", 3, route=ROUTE_B) == 3

    @pytest_twisted.ensureDeferred
    async def test_shares_never_exceed_the_limit(self, ask: Any) -> None:
        """
        Three nodes asking in any order, each opening no more than it was
        given (and closing what is above its share only as attempts end),
        never hold more than the limit together.
        """
        rng = random.Random(7)
        limit = 4
        held = {"dallas": 0, "losangeles": 0, "chicago": 0}
        given = dict(held)
        for step in range(300):
            node = rng.choice(sorted(held))
            # What it has open now: up to its share, or, above it, fewer as attempts end.
            held[node] = rng.randint(0, max(given[node], held[node]))
            assert sum(held.values()) <= limit, (step, held)
            want = rng.randint(0, 6)
            given[node] = await ask(
                node, want, holding=held[node], limit=limit, now=NOW + step, ttl=10_000
            )
            assert 0 <= given[node] <= want
            assert sum(max(given[n], held[n]) for n in held) <= limit, (step, given, held)

    @pytest_twisted.ensureDeferred
    async def test_route_states_set_and_cleared(self, store: Any) -> None:
        assert await store.route_states() == {}
        state = {"state": "rejecting", "since": NOW, "reply": "550 5.1.1 no such user"}
        await store.set_route_state(ROUTE_A, state)
        assert await store.route_states() == {ROUTE_A: state}
        await store.set_route_state(ROUTE_B, {"state": "rejecting", "since": NOW + 1})
        await store.set_route_state(ROUTE_A, None)
        assert await store.route_states() == {ROUTE_B: {"state": "rejecting", "since": NOW + 1}}
        await store.set_route_state(ROUTE_A, None)  # clearing twice is fine


class LeaseReclaimContract:
    """
    Tests of ``ILeaseReclaim``, for a store that provides it: a node that
    starts again takes back at once the entries its earlier incarnation
    (a process that died) held under leases, and nothing else.  One store
    object plays both processes: what its earlier incarnation leased, it
    leased before the node's new ``reclaim``.
    """

    async def leased(self, store: Any, node: str = "dallas", count: int = 2) -> list[Lease]:
        """``count`` entries enqueued for ``node`` and claimed by it at ``NOW``."""
        routes = {f"smtp:mail{i}.a.example:25": [ALICE] for i in range(count)}
        await store.enqueue(envelope(), b"x\r\n", routes, node)
        leases: list[Lease] = await store.claim(node, NOW, 100, LEASE, TAKEOVER)
        assert len(leases) == count
        return leases

    def test_provides_lease_reclaim(self, store: Any) -> None:
        """The store provides every method of ``ILeaseReclaim``."""
        assert verifyObject(ILeaseReclaim, store)

    @pytest_twisted.ensureDeferred
    async def test_restarted_node_takes_back_its_leases_at_once(self, store: Any) -> None:
        """
        The leases of the node's earlier incarnation end: the entries are due
        at once, as they were before the lease, with no attempt counted.
        """
        assert await store.reclaim("dallas", "first", NOW) == 0
        leases = await self.leased(store)
        assert await store.reclaim("dallas", "second", NOW + 10) == 2
        again = await store.claim("dallas", NOW + 10, 100, LEASE, TAKEOVER)
        assert sorted(a.entry.id for a in again) == sorted(a.entry.id for a in leases)
        assert all(a.entry.attempts == 0 and a.entry.node == "dallas" for a in again)
        for a in again:
            assert await store.attempts(a.entry.id) == []

    @pytest_twisted.ensureDeferred
    async def test_taken_back_entries_are_reserved_for_the_node(self, store: Any) -> None:
        """Another node gets them only after ``takeover_seconds``, as any reserved entry."""
        await store.reclaim("dallas", "first", NOW)
        await self.leased(store)
        await store.reclaim("dallas", "second", NOW + 10)
        assert await store.next_due("dallas", NOW + 10, TAKEOVER) == NOW + 10
        assert await store.claim("losangeles", NOW + 10, 100, LEASE, TAKEOVER) == []
        taken = await store.claim("losangeles", NOW + 10 + TAKEOVER, 100, LEASE, TAKEOVER)
        assert len(taken) == 2

    @pytest_twisted.ensureDeferred
    async def test_the_lost_lease_can_record_nothing(self, store: Any) -> None:
        """
        The dead process's lease is lost: a record under it fails and changes
        nothing, a release under it does nothing.
        """
        await store.reclaim("dallas", "first", NOW)
        [old, _] = await self.leased(store)
        await store.reclaim("dallas", "second", NOW + 10)
        with pytest.raises(LeaseLost):
            await _deliver(store, old)
        await store.release(old, NOW + 20)
        entry = await store.get(old.entry.id)
        assert entry is not None and entry.pending == (ALICE,)
        assert entry.next_attempt == NOW + 10 and entry.node == "dallas"

    @pytest_twisted.ensureDeferred
    async def test_leases_taken_without_an_incarnation_are_taken_back(self, store: Any) -> None:
        """A lease taken before the store knew an incarnation of the node is an earlier run's."""
        await self.leased(store, count=1)
        assert await store.reclaim("dallas", "first", NOW + 10) == 1

    @pytest_twisted.ensureDeferred
    async def test_enqueue_leased_leases_are_taken_back(self, store: Any) -> None:
        """The accepting node's first-attempt leases are held under its incarnation too."""
        await store.reclaim("dallas", "first", NOW)
        routes = {ROUTE_A: [ALICE], ROUTE_B: [DAVE]}
        leases = await store.enqueue_leased(envelope(), b"x\r\n", routes, "dallas", LEASE)
        assert await store.reclaim("dallas", "first", NOW + 1) == 0
        assert await store.reclaim("dallas", "second", NOW + 1) == 2
        again = await store.claim("dallas", NOW + 1, 100, LEASE, TAKEOVER)
        assert sorted(a.entry.id for a in again) == sorted(a.entry.id for a in leases)
        assert await store.body(again[0].entry.message_id) == b"x\r\n"

    @pytest_twisted.ensureDeferred
    async def test_leases_of_this_incarnation_are_untouched(self, store: Any) -> None:
        """
        ``reclaim`` may be repeated: the leases taken since the call, under
        the new incarnation, stay held and can be recorded.
        """
        await store.reclaim("dallas", "first", NOW)
        await self.leased(store, count=1)
        await store.reclaim("dallas", "second", NOW + 10)
        [lease] = await store.claim("dallas", NOW + 10, 100, LEASE, TAKEOVER)
        assert await store.reclaim("dallas", "second", NOW + 11) == 0
        assert await _deliver(store, lease) is None
        assert await store.get(lease.entry.id) is None

    @pytest_twisted.ensureDeferred
    async def test_other_nodes_leases_are_untouched(self, store: Any) -> None:
        """Only the restarted node's leases end; the other node's stay held, and record."""
        await store.reclaim("losangeles", "la-first", NOW)
        [theirs] = await self.leased(store, node="losangeles", count=1)
        await self.leased(store, node="dallas", count=1)
        assert await store.reclaim("dallas", "second", NOW + 10) == 1
        assert await _deliver(store, theirs) is None
        assert await store.get(theirs.entry.id) is None

    @pytest_twisted.ensureDeferred
    async def test_expired_leases_are_not_counted(self, store: Any) -> None:
        """An entry whose lease has run out is due already: nothing to take back."""
        await store.reclaim("dallas", "first", NOW)
        [lease] = await self.leased(store, count=1)
        assert await store.reclaim("dallas", "second", NOW + LEASE + 1) == 0
        [again] = await store.claim("losangeles", NOW + LEASE + 1, 100, LEASE, TAKEOVER)
        assert again.entry.id == lease.entry.id

    @pytest_twisted.ensureDeferred
    async def test_held_entry_stays_held(self, store: Any) -> None:
        """An entry an operator held during the lease loses the lease but stays held."""
        await store.reclaim("dallas", "first", NOW)
        [lease] = await self.leased(store, count=1)
        assert await store.hold(lease.entry.id)
        assert await store.reclaim("dallas", "second", NOW + 10) == 1
        assert await store.claim("dallas", NOW + 10, 100, LEASE, TAKEOVER) == []
        assert await store.release_held(lease.entry.id, NOW + 20)
        [again] = await store.claim("dallas", NOW + 20, 100, LEASE, TAKEOVER)
        assert again.entry.id == lease.entry.id


class SpoolControlContract:
    """
    Tests of ``ISpoolControl``, for a store that provides it: an operator
    makes entries due now, moves them to another route (``mailhub queue
    flush|redirect``), and tells the entries being delivered apart.
    """

    async def deferred(self, store: Any, node: str = "losangeles") -> Entry:
        """An entry of ``ROUTE_A`` for ALICE, tried once at ``NOW`` and due again at ``NOW + 600`` for ``node``."""
        await store.enqueue(envelope(), b"Subject: hi\r\n\r\nhello\r\n", {ROUTE_A: [ALICE]}, "dallas")
        [lease] = await store.claim("dallas", NOW, 10, LEASE, TAKEOVER)
        entry: Entry = await store.record(
            lease, attempt_for(lease, {ALICE: LATER}), decision({ALICE: (Action.RETRY, LATER)}, NOW + 600, node)
        )
        return entry

    def test_provides_spool_control(self, store: Any) -> None:
        """The store provides every method of ``ISpoolControl``."""
        assert verifyObject(ISpoolControl, store)

    @pytest_twisted.ensureDeferred
    async def test_requeue_makes_an_entry_due_now_for_any_node(self, store: Any) -> None:
        """A deferred entry reserved for another node is claimable at once, by any node, as it was."""
        entry = await self.deferred(store)
        assert await store.claim("dallas", NOW + 10, 10, LEASE, TAKEOVER) == []
        assert await store.requeue(entry.id, NOW + 10) == "requeued"
        [lease] = await store.claim("dallas", NOW + 10, 10, LEASE, TAKEOVER)
        assert lease.entry.id == entry.id and lease.entry.route == ROUTE_A
        assert lease.entry.attempts == 1 and lease.entry.recipients == entry.recipients
        assert lease.entry.next_attempt == NOW + 10 and lease.entry.node is None

    @pytest_twisted.ensureDeferred
    async def test_requeue_to_a_route_moves_a_spooled_entry(self, store: Any) -> None:
        """
        The entry goes to the new route from its next attempt on: listings,
        counts and claims say so, its body, log and replies stay, and the
        route it leaves is no longer counted.
        """
        entry = await self.deferred(store)
        assert await store.requeue(entry.id, NOW + 10, ROUTE_B) == "requeued"
        moved = await store.get(entry.id)
        assert moved.route == ROUTE_B and moved.next_attempt == NOW + 10 and moved.node is None
        assert moved.recipients == entry.recipients and moved.attempts == 1
        assert (await core_counts(store))["routes"] == {ROUTE_B: 1}
        assert [e.id for e in await store.entries(EntryFilter(route=ROUTE_B), 0, 10)] == [entry.id]
        assert await store.entries(EntryFilter(route=ROUTE_A), 0, 10) == []
        assert len(await store.attempts(entry.id)) == 1
        [lease] = await store.claim("losangeles", NOW + 10, 10, LEASE, TAKEOVER)
        assert lease.entry.route == ROUTE_B
        assert await store.body(lease.entry.message_id) == b"Subject: hi\r\n\r\nhello\r\n"
        after = await store.record(
            lease,
            attempt_for(lease, {ALICE: LATER}, NOW + 10),
            decision({ALICE: (Action.RETRY, LATER)}, NOW + 900, None),
        )
        assert after.route == ROUTE_B and after.attempts == 2

    @pytest_twisted.ensureDeferred
    async def test_requeue_leaves_an_entry_being_delivered_alone(self, store: Any) -> None:
        """Under a live lease: ``"leased"``, nothing changed, and the lease still records."""
        await self.enqueue_two(store)
        [lease] = await store.claim("dallas", NOW, 1, LEASE, TAKEOVER)
        assert await store.requeue(lease.entry.id, NOW + 1, ROUTE_B) == "leased"
        assert (await store.get(lease.entry.id)).route == ROUTE_A
        assert await store.leased_entries(NOW + 1) == {lease.entry.id}
        await store.record(lease, attempt_for(lease, {ALICE: OK}), decision({ALICE: (Action.DELIVERED, OK)}))
        assert await store.leased_entries(NOW + 1) == set()

    async def enqueue_two(self, store: Any) -> list[str]:
        ids: list[str] = await store.enqueue(envelope(), b"x\r\n", {ROUTE_A: [ALICE]}, "dallas")
        ids += await store.enqueue(envelope(), b"y\r\n", {ROUTE_A: [BOB]}, "dallas")
        return ids

    @pytest_twisted.ensureDeferred
    async def test_requeue_after_a_lease_expired_ends_that_lease(self, store: Any) -> None:
        """The node whose lease ran out cannot record its attempt any more."""
        await self.enqueue_two(store)
        [lease] = await store.claim("dallas", NOW, 1, LEASE, TAKEOVER)
        assert await store.leased_entries(NOW + LEASE + 1) == set()
        assert await store.requeue(lease.entry.id, NOW + LEASE + 1, ROUTE_B) == "requeued"
        with pytest.raises(LeaseLost):
            await store.record(lease, attempt_for(lease, {ALICE: OK}), decision({ALICE: (Action.DELIVERED, OK)}))
        assert (await store.get(lease.entry.id)).route == ROUTE_B

    @pytest_twisted.ensureDeferred
    async def test_requeue_keeps_a_held_entry_held(self, store: Any) -> None:
        """A held entry moves to its new route and stays held until released."""
        entry = await self.deferred(store)
        assert await store.hold(entry.id)
        assert await store.requeue(entry.id, NOW + 10, ROUTE_B) == "requeued"
        moved = await store.get(entry.id)
        assert moved.held and moved.route == ROUTE_B
        assert await store.claim("dallas", NOW + 20, 10, LEASE, TAKEOVER) == []
        assert (await core_counts(store))["held"] == 1
        assert await store.release_held(entry.id, NOW + 20)
        [lease] = await store.claim("dallas", NOW + 20, 10, LEASE, TAKEOVER)
        assert lease.entry.route == ROUTE_B

    @pytest_twisted.ensureDeferred
    async def test_requeue_of_an_unknown_entry_says_missing(self, store: Any) -> None:
        assert await store.requeue("no-such-entry", NOW, ROUTE_B) == "missing"
        assert await store.requeue("no-such-entry", NOW) == "missing"


async def _deliver(store: Any, lease: Lease) -> Entry | None:
    """Record ``lease``'s attempt: every pending recipient delivered."""
    replies = {a: OK for a in lease.entry.pending}
    result: Entry | None = await store.record(
        lease,
        attempt_for(lease, replies, NOW + 20),
        decision({a: (Action.DELIVERED, OK) for a in lease.entry.pending}),
    )
    return result

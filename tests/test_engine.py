"""
The delivery engine over the memory store, a scripted transport and a Clock:
the seed's schedule from end to end, without a socket.
"""

from __future__ import annotations

from collections import Counter

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from mailhub.config import DeliveryConfig, parse
from mailhub.delivery.engine import PREFETCH_MAX_SIZE, DeliveryEngine
from mailhub.delivery.throttle import READ_AHEAD
from mailhub.model import Action, Address, Envelope, Reply, StoreUnavailable, new_entries
from mailhub.node import Node, routes_for
from mailhub.plugins.memory_store import MemorySpoolStore
from mailhub.plugins.standard_policy import StandardPolicy
from mailhub.testing.fakes import ScriptedTransport

ROUTE = "smtp:mail.example.com:25"
SENDER = Address("sender", "outside.example")
A = Address("alice", "example.com")
B = Address("bob", "example.com")
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"
OK = Reply(250, "2.0.0", "OK")
TEMP = Reply(451, "4.3.0", "try later")
PERM = Reply(550, "5.1.1", "no such user")
MINUTE = 60.0
DAY = 86400.0


def answered_later():
    """
    A transport script whose attempts wait for the test: each returns a
    ``Deferred`` appended to ``pending``, which the test fires with a reply.

    :returns: ``(pending, script)``
    """
    pending: list[Deferred] = []

    def slow(entry, message):
        d: Deferred = Deferred()
        pending.append(d)
        return d

    return pending, slow


class Hub:
    """Two engines (dallas, losangeles) over one memory store and one clock."""

    def __init__(self, script=None, limit=10, settings=None, store_class=MemorySpoolStore):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = store_class(self.clock)
        self.policy = StandardPolicy(nodes=("dallas", "losangeles"), jitter=0.0)
        self.transport = ScriptedTransport(script) if script else ScriptedTransport()
        self.bounces: list[tuple[str, list]] = []
        self.settings = settings or DeliveryConfig(max_scan_interval=60.0)
        self.engines = {
            name: DeliveryEngine(
                name, self.store, self.policy, lambda route: self.transport, lambda route: (limit, 30.0),
                self.bounce, self.clock, self.settings,
            )
            for name in ("dallas", "losangeles")
        }
        for e in self.engines.values():
            e.startService()

    def bounce(self, entry, outcomes, message, now):
        self.bounces.append((entry.id, list(outcomes)))
        return succeed(None)

    def accept(self, node="dallas", recipients=(A,)):
        env = Envelope(SENDER, recipients, received_at=self.clock.seconds())
        ids = []
        self.store.enqueue(env, MESSAGE, {ROUTE: list(recipients)}, node).addCallback(ids.extend)
        self.engines[node].kick(ids)
        return ids[0]

    def who_delivered(self):
        return [e.attempts for e, _ in self.transport.deliveries]

    def entry(self, entry_id):
        result = []
        self.store.get(entry_id).addCallback(result.append)
        return result[0]

    def attempts(self, entry_id):
        result = []
        self.store.attempts(entry_id).addCallback(result.append)
        return result[0]


def scripted(*replies):
    """A script answering each delivery with the next reply, the last one forever."""
    replies_left = list(replies)

    def script(entry, message):
        return replies_left.pop(0) if len(replies_left) > 1 else replies_left[0]

    return script


def test_accepting_node_tries_at_once_and_delivered_entry_leaves_the_spool():
    hub = Hub()
    entry_id = hub.accept("losangeles")
    assert len(hub.transport.deliveries) == 1
    assert hub.entry(entry_id) is None


def test_deferral_goes_to_the_other_node_ten_minutes_later():
    hub = Hub(scripted(TEMP, OK))
    entry_id = hub.accept("dallas")
    entry = hub.entry(entry_id)
    assert entry.node == "losangeles"
    assert entry.next_attempt == hub.clock.seconds() + 10 * MINUTE
    hub.clock.advance(10 * MINUTE - 1)
    assert len(hub.transport.deliveries) == 1
    hub.clock.advance(1)
    assert len(hub.transport.deliveries) == 2
    assert hub.entry(entry_id) is None


def test_each_node_retries_every_twenty_minutes_staggered():
    hub = Hub(scripted(TEMP))
    entry_id = hub.accept("dallas")
    start = hub.clock.seconds()
    for _ in range(18):
        hub.clock.advance(10 * MINUTE)
    log = hub.attempts(entry_id)
    times = {"dallas": [], "losangeles": []}
    for a in log:
        times[a.node].append(a.finished - start)
    assert times["dallas"][:4] == [0, 20 * MINUTE, 40 * MINUTE, 60 * MINUTE]
    assert times["losangeles"][:4] == [10 * MINUTE, 30 * MINUTE, 50 * MINUTE, 70 * MINUTE]


def test_other_node_takes_over_when_the_reserved_node_is_dead():
    hub = Hub(scripted(TEMP, OK), settings=DeliveryConfig(takeover_seconds=300.0, max_scan_interval=60.0))
    hub.engines["losangeles"].stopService()
    entry_id = hub.accept("dallas")
    hub.clock.advance(10 * MINUTE)
    assert len(hub.transport.deliveries) == 1
    hub.clock.advance(300)
    assert len(hub.transport.deliveries) == 2
    assert hub.entry(entry_id) is None


def test_permanent_failure_bounces_and_leaves_the_spool():
    hub = Hub(scripted(PERM))
    entry_id = hub.accept()
    assert hub.entry(entry_id) is None
    assert len(hub.bounces) == 1
    (bounced_id, outcomes), = hub.bounces
    assert bounced_id == entry_id
    assert [(o.recipient, o.action) for o in outcomes] == [(A, Action.FAILED)]


def test_partial_failure_bounces_one_and_retries_the_other():
    hub = Hub(lambda entry, message: {A: PERM, B: TEMP})
    entry_id = hub.accept(recipients=(A, B))
    assert [o.recipient for o in hub.bounces[0][1]] == [A]
    assert hub.entry(entry_id).pending == (B,)


def test_entry_expires_after_seven_days_with_a_dsn():
    hub = Hub(scripted(TEMP))
    entry_id = hub.accept()
    for _ in range(7 * 24 * 6 + 2):
        hub.clock.advance(10 * MINUTE)
    assert hub.entry(entry_id) is None
    (bounced_id, outcomes), = hub.bounces
    assert [o.action for o in outcomes] == [Action.EXPIRED]
    # One attempt every ten minutes for seven days, the last at expiry.
    assert len(hub.transport.deliveries) == 7 * 24 * 6 + 1


def test_rebuilt_server_rejecting_everything_holds_the_entry():
    hub = Hub(scripted(TEMP, PERM))
    entry_id = hub.accept()
    hub.clock.advance(10 * MINUTE)
    entry = hub.entry(entry_id)
    assert entry.held
    assert hub.bounces == []
    hub.clock.advance(DAY)
    assert len(hub.transport.deliveries) == 2


def test_connection_limit_per_route():
    pending, slow = answered_later()

    hub = Hub(slow, limit=3)
    for _ in range(10):
        hub.accept()
    assert len(pending) == 3
    pending.pop(0).callback(OK)
    assert len(pending) == 3
    while pending:
        pending.pop(0).callback(OK)
    assert len(hub.transport.deliveries) == 10


class CountingStore(MemorySpoolStore):
    claims = 0

    def claim(self, *args, **kw):
        type(self).claims += 1
        return super().claim(*args, **kw)


def test_idle_spool_is_not_polled_busily(monkeypatch):
    monkeypatch.setattr(CountingStore, "claims", 0)
    hub = Hub(store_class=CountingStore)
    for _ in range(3600):
        hub.clock.advance(1)
    # At most one scan per node per max_scan_interval (60 s).
    assert 2 <= CountingStore.claims <= 2 * 61


def test_transport_exception_defers_instead_of_losing_the_entry():
    def broken(entry, message):
        raise RuntimeError("bug")

    hub = Hub(broken)
    entry_id = hub.accept()
    entry = hub.entry(entry_id)
    assert entry is not None and entry.pending == (A,)
    assert entry.last_reply.temporary


def test_routes_group_recipients_and_send_the_rest_outbound():
    config = parse(
        b'[hub]\nhostname="h.example"\n[nodes.a]\nsmtp="tcp:0"\n'
        b'[domains."example.com"]\nroute="smtp:one:25"\n[domains."example.org"]\nroute="smtp:one:25"\n'
        b'[domains."example.net"]\nroute="smtp:two:25"\n'
    )
    routes = routes_for(config, [A, Address("c", "example.org"), Address("d", "example.net"), SENDER])
    assert routes == {
        "smtp:one:25": [A, Address("c", "example.org")],
        "smtp:two:25": [Address("d", "example.net")],
        "smtp:mx": [SENDER],
    }


@pytest.mark.parametrize("sender", [SENDER, None])
def test_node_bounce_enqueues_a_dsn_to_the_sender_and_never_to_null(sender):
    config = parse(
        b'[hub]\nhostname="h.example"\noutbound="smtp:smarthost:25"\n[nodes.dallas]\nsmtp="tcp:0"\n'
        b'[domains."example.com"]\nroute="smtp:mail.example.com:25"\n'
    )
    clock = Clock()
    stored: list[Envelope] = []

    class RecordingStore(MemorySpoolStore):
        def enqueue(self, envelope, *args, **kw):
            stored.append(envelope)
            return super().enqueue(envelope, *args, **kw)

        def enqueue_leased(self, envelope, *args, **kw):
            stored.append(envelope)
            return super().enqueue_leased(envelope, *args, **kw)

    store = RecordingStore(clock)
    node = Node("dallas", config, store, StandardPolicy(nodes=("dallas",), jitter=0.0), clock)
    transport = ScriptedTransport(lambda e, m: PERM if e.route == "smtp:mail.example.com:25" else TEMP)
    node._transports = {"smtp:mail.example.com:25": transport, "smtp:smarthost:25": transport}
    node.engine.startService()
    ids: list = []
    node.receive(Envelope(sender, (A,), received_at=0.0), MESSAGE).addCallback(ids.append)
    routes = [e.route for e, _ in transport.deliveries]
    assert stored[0].sender == sender and len(ids) == 1
    if sender is None:
        assert routes == ["smtp:mail.example.com:25"]
        # Nothing at all is stored for a bounce to <>: not even a message
        # without recipients, and the spool is empty once the entry failed.
        assert len(stored) == 1
        assert store.counts().result["entries"] == 0
    else:
        assert routes == ["smtp:mail.example.com:25", "smtp:smarthost:25"]
        dsn_entry, dsn = transport.deliveries[1]
        assert dsn_entry.sender is None
        assert dsn_entry.pending == (SENDER,)
        assert b"multipart/report" in dsn


def test_route_coming_back_releases_its_backlog_at_once_and_paced():
    up = {"value": False}
    hub = Hub(lambda entry, message: OK if up["value"] else Reply(421, "4.4.1", "refused"), limit=8)
    ids = []
    for _ in range(20):
        ids.append(hub.accept())
        hub.clock.advance(25)  # accepted over eight minutes: retries spread out too
    assert all(hub.entry(i).pending for i in ids)
    up["value"] = True
    # The first entry's retry finds the server up; the rest of the backlog
    # follows within seconds instead of over the next eight minutes.
    hub.clock.advance(10 * MINUTE - 20 * 25)
    for _ in range(5):
        hub.clock.advance(1)
    assert [i for i in ids if hub.entry(i) is not None] == []
    # (The node that saw it down may have found it back by its probe first.)
    assert sum(e.status()["routes"].get(ROUTE, {}).get("delivered", 0) for e in hub.engines.values()) == 20


def test_the_drain_report_counts_every_delivery_and_no_connection_too_many():
    up = {"value": False}
    pending, slow = answered_later()
    connections = {"open": 0, "peak": 0}

    def script(entry, message):
        if not up["value"]:
            return Reply(421, "4.4.1", "refused")
        connections["open"] += 1
        connections["peak"] = max(connections["peak"], connections["open"])

        def closed(result):
            connections["open"] -= 1
            return result

        return slow(entry, message).addBoth(closed)

    hub = Hub(script, limit=3, settings=DeliveryConfig(probe_seconds=30.0, max_scan_interval=60.0))
    ids = [hub.accept("dallas") for _ in range(12)]
    up["value"] = True
    for _ in range(200):
        hub.clock.advance(1)
        while pending:
            pending.pop(0).callback(OK)
        if all(hub.entry(i) is None for i in ids) and any(e.last_drains for e in hub.engines.values()):
            break
    assert all(hub.entry(i) is None for i in ids)
    reports = [e.last_drains[ROUTE] for e in hub.engines.values() if ROUTE in e.last_drains]
    assert sum(r["delivered"] for r in reports) == 12
    assert max(r["peak_connections"] for r in reports) == connections["peak"] <= 3


def test_stopping_gives_back_entries_waiting_for_their_turn():
    pending, slow = answered_later()

    hub = Hub(slow, limit=1)
    ids = [hub.accept("dallas") for _ in range(3)]
    stopped = hub.engines["dallas"].stopService()
    assert not stopped.called  # the attempt in flight finishes first
    # The two that waited are due again at once, for any node.
    waiting = [hub.entry(i) for i in ids[1:]]
    assert all(e.next_attempt <= hub.clock.seconds() and e.node is None for e in waiting)
    pending[0].callback(OK)
    assert stopped.called


def test_first_attempts_beyond_the_batch_wait_for_a_scan_instead_of_holding_leases():
    pending, slow = answered_later()

    hub = Hub(slow, limit=2, settings=DeliveryConfig(batch=4, max_scan_interval=60.0))
    ids = [hub.accept("dallas") for _ in range(10)]
    assert hub.engines["dallas"].in_flight == 4
    # The other six are not leased: still reserved for dallas, due now.
    unleased = [hub.entry(i) for i in ids[4:]]
    assert all(e.node == "dallas" and e.next_attempt <= hub.clock.seconds() for e in unleased)
    while pending:
        pending.pop(0).callback(OK)
        hub.clock.advance(0)
    assert [i for i in ids if hub.entry(i) is not None] == []


def test_entry_that_waited_half_its_lease_is_given_back_not_attempted():
    pending, slow = answered_later()

    hub = Hub(slow, limit=1, settings=DeliveryConfig(lease_seconds=100.0, max_scan_interval=60.0))
    hub.accept("dallas")
    second = hub.accept("dallas")
    hub.clock.advance(51)
    pending.pop(0).callback(OK)
    # The second's lease is past half: not attempted under it, but due again.
    assert len(hub.transport.deliveries) == 1
    assert hub.entry(second).next_attempt <= hub.clock.seconds()
    hub.clock.advance(1)
    assert len(hub.transport.deliveries) == 2


def test_route_down_defers_without_connecting_but_probes_every_probe_seconds():
    refused = Reply(421, "4.4.1", "Connection refused")
    hub = Hub(scripted(refused), settings=DeliveryConfig(probe_seconds=30.0, max_scan_interval=60.0))
    first = hub.accept("dallas")
    ids = [hub.accept("dallas") for _ in range(5)]
    # Only the first tried the server; the rest were deferred on its word.
    assert len(hub.transport.deliveries) == 1
    suspended = hub.attempts(ids[0])[0].replies[0][1]
    assert suspended.code == 451 and "suspended" in suspended.text and "refused" in suspended.text
    assert hub.entry(ids[0]).node == "losangeles"
    hub.clock.advance(30)
    hub.accept("dallas")  # the next attempt after probe_seconds is a real one
    assert len(hub.transport.deliveries) == 2
    assert hub.entry(first) is not None


def test_a_down_route_is_probed_every_probe_seconds_even_with_nothing_due():
    up = {"value": False}
    refused = Reply(421, "4.4.1", "Connection refused")
    hub = Hub(lambda entry, message: OK if up["value"] else refused,
              settings=DeliveryConfig(probe_seconds=30.0, max_scan_interval=60.0))
    ids = [hub.accept("dallas") for _ in range(5)]
    assert len(hub.transport.deliveries) == 1
    # The backlog's retries are ten minutes away; the server is back now.
    assert all(hub.entry(i).next_attempt >= hub.clock.seconds() + 9 * MINUTE for i in ids)
    up["value"] = True
    for _ in range(35):
        hub.clock.advance(1)
    # Within probe_seconds (and a tick) the probe found it, and the backlog followed.
    assert [i for i in ids if hub.entry(i) is not None] == []
    assert len(hub.transport.deliveries) == 6


def test_a_deferral_while_down_tells_no_sender_another_recipients_reply():
    # A probe that got another recipient's 5xx while the route is down (the
    # server answered for one recipient before it went away again).
    replies = {"now": Reply(421, "4.4.1", "Connection refused")}
    hub = Hub(lambda entry, message: replies["now"],
              settings=DeliveryConfig(probe_seconds=30.0, max_scan_interval=60.0))
    hub.accept("dallas")  # refused: the route is down
    throttle = hub.engines["dallas"].throttle(ROUTE)
    throttle.last_reply = Reply(550, "5.1.1", "<eve@example.com>: Recipient address rejected: User unknown")
    entry_id = hub.accept("dallas", recipients=(B,))  # deferred without connecting
    text = hub.entry(entry_id).last_reply.text
    assert "suspended" in text and "eve@" not in text and "Recipient address" not in text


def test_an_entry_held_while_rejecting_tells_its_sender_no_other_recipients_reply():
    hub = Hub(scripted(PERM))
    hub.store.set_route_state(ROUTE, {"state": "rejecting", "since": hub.clock.seconds(), "node": "dallas",
                                      "reply": "550 5.1.1 <eve@example.com>: User unknown", "recipients": 3})
    hub.clock.advance(2)  # the engines read the state
    hub.accept("dallas")  # this interval's probe: refused, held
    entry_id = hub.accept("dallas", recipients=(B,))  # held without being tried
    entry = hub.entry(entry_id)
    assert entry.held and "REJECTING" in entry.last_reply.text and "550 5.1.1" in entry.last_reply.text
    assert "eve@" not in entry.last_reply.text


def test_an_archive_entry_is_never_given_up_however_long_the_archive_is_down():
    unavailable = Reply(451, "4.3.0", "archive unavailable: archive database is full")
    hub = Hub(scripted(unavailable))
    hub.policy = StandardPolicy(nodes=("dallas", "losangeles"), jitter=0.0, retry_seconds=60.0, lifetime=300.0)
    for engine in hub.engines.values():
        engine._policy = hub.policy
    ids: list[str] = []
    env = Envelope(SENDER, (A,), received_at=hub.clock.seconds())
    hub.store.enqueue(env, MESSAGE, {"archive:local": [A]}, "dallas").addCallback(ids.extend)
    hub.engines["dallas"].kick(ids)
    with capturedLogs() as events:
        for _ in range(20):
            hub.clock.advance(60)
    entry = hub.entry(ids[0])
    assert entry is not None and entry.pending == (A,)  # kept, past the lifetime
    assert entry.next_attempt > hub.clock.seconds() - 60
    assert hub.bounces == []
    assert any("never given up" in formatEvent(e) for e in events)


def test_the_line_about_attempts_deferred_while_down_does_not_say_down_once_it_is_back():
    replies = {"now": Reply(421, "4.4.1", "Connection refused")}
    hub = Hub(lambda entry, message: replies["now"],
              settings=DeliveryConfig(probe_seconds=30.0, max_scan_interval=60.0))
    with capturedLogs() as events:
        hub.accept("dallas")  # refused: the route is down
        hub.accept("dallas")  # deferred without connecting
        hub.clock.advance(2)  # the line for it: the route is down
        hub.accept("dallas")  # deferred without connecting, for the next line
        replies["now"] = OK  # the server is back; the probe will find it
        for _ in range(35):
            hub.clock.advance(1)
    lines = [formatEvent(e) for e in events if "without connecting" in e.get("log_format", "")]
    assert len(lines) == 2, lines
    assert " is down: 1 attempts" in lines[0]
    assert " was down: 1 attempts were deferred without connecting before it came back" in lines[1], lines


def test_a_node_that_saw_the_route_down_believes_another_that_delivered():
    replies = {"now": Reply(421, "4.4.1", "Connection refused")}
    hub = Hub(lambda entry, message: replies["now"],
              settings=DeliveryConfig(probe_seconds=30.0, max_scan_interval=60.0, reject_storm_recipients=3))
    hub.accept("dallas")  # dallas sees the route down, and says so hub-wide
    hub.clock.advance(2)
    replies["now"] = OK
    hub.accept("losangeles")  # losangeles never saw it down: it delivers, the route is up
    hub.clock.advance(2)
    dallas = hub.engines["dallas"]
    assert dallas.status()["routes"][ROUTE]["down"] is False
    # So a 5xx on dallas now is one unknown user, as on losangeles: failed
    # and bounced, not deferred without connecting or held as a rebuilt
    # server's rejection.
    replies["now"] = PERM
    before = len(hub.transport.deliveries)
    entry_id = hub.accept("dallas", recipients=(B,))
    assert len(hub.transport.deliveries) == before + 1
    assert hub.entry(entry_id) is None
    assert [e for e, _ in hub.bounces] == [entry_id]


def test_greylisting_does_not_suspend_the_route():
    hub = Hub(scripted(Reply(450, "4.2.0", "greylisted, come back later")))
    for _ in range(3):
        hub.accept("dallas")
    assert len(hub.transport.deliveries) == 3


# -- the accepting node's first attempt: stored leased, tried at once ----------

COM = "smtp:mail.example.com:25"
ORG = "smtp:mail.example.org:25"
C = Address("carol", "example.org")

NODE_CONFIG = b"""
[hub]
hostname = "h.example"
outbound = "smtp:smarthost:25"
[delivery]
batch = %d
[nodes.dallas]
smtp = "tcp:0"
[domains."example.com"]
route = "smtp:mail.example.com:25"
[domains."example.org"]
route = "smtp:mail.example.org:25"
"""


class SpyStore(MemorySpoolStore):
    """
    The memory store, counting the calls made to it and the bodies read; the
    answers of the methods named in ``holding`` (``enqueue_leased``,
    ``body``, ``record``) wait, the work done at once, until ``let_through``.
    """

    def __init__(self, clock):
        super().__init__(clock)
        self.calls = Counter()
        self.bodies: list[str] = []
        self.holding: set[str] = set()
        self.held: list[tuple[str, Deferred, Deferred]] = []

    def _answer(self, name, d):
        if name not in self.holding:
            return d
        later = Deferred()
        self.held.append((name, d, later))
        return later

    def let_through(self, name):
        """Let the held answers of ``name`` through, oldest first."""
        mine = [h for h in self.held if h[0] == name]
        self.held = [h for h in self.held if h[0] != name]
        for _, d, later in mine:
            d.chainDeferred(later)

    def enqueue(self, *args):
        self.calls["enqueue"] += 1
        return super().enqueue(*args)

    def enqueue_leased(self, *args):
        self.calls["enqueue_leased"] += 1
        return self._answer("enqueue_leased", super().enqueue_leased(*args))

    def claim(self, *args):
        self.calls["claim"] += 1
        return super().claim(*args)

    def body(self, message_id):
        self.calls["body"] += 1
        self.bodies.append(message_id)
        return self._answer("body", super().body(message_id))

    def record(self, lease, attempt, decision):
        self.calls["record"] += 1
        return self._answer("record", super().record(lease, attempt, decision))

    def release(self, lease, now):
        self.calls["release"] += 1
        return super().release(lease, now)


class OneNode:
    """The node ``dallas`` over a spy store, its transports answering from ``pending`` Deferreds."""

    def __init__(self, batch=100, start=True):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = SpyStore(self.clock)
        self.pending: list[Deferred] = []
        self.transport = ScriptedTransport(self.slow)
        self.node = Node(
            "dallas", parse(NODE_CONFIG % batch), self.store,
            StandardPolicy(nodes=("dallas", "losangeles"), jitter=0.0), self.clock,
        )
        self.node._transports = {
            route: self.transport for route in (COM, ORG, "smtp:smarthost:25")
        }
        self.engine = self.node.engine
        if start:
            self.engine.startService()

    def slow(self, entry, message):
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def receive(self, *recipients):
        """Give the node a message; what its Deferred fired with (or ``[]`` while it waits)."""
        env = Envelope(SENDER, recipients or (A,), received_at=self.clock.seconds())
        result = []
        self.node.receive(env, MESSAGE).addBoth(result.append)
        return result

    def answer_all(self, reply=OK):
        while self.pending:
            self.pending.pop(0).callback(reply)

    def entry(self, entry_id):
        result = []
        self.store.get(entry_id).addCallback(result.append)
        return result[0]


def test_receive_with_room_stores_leased_and_tries_at_once_without_claim_or_body_read():
    """
    With room in the batch, ``receive`` stores the message leased to the node
    (one ``enqueue_leased``) and starts one attempt per route at once, with
    the message it holds: no ``claim``, no ``body`` read, no plain ``enqueue``.
    """
    hub = OneNode()
    [first_id] = hub.receive(A, C)
    assert hub.store.calls == Counter(enqueue_leased=1)
    assert [(e.route, m) for e, m in hub.transport.deliveries] == [(COM, MESSAGE), (ORG, MESSAGE)]
    assert hub.transport.deliveries[0][0].id == first_id
    assert hub.engine.in_flight == 2
    assert hub.engine._reserved == 0
    hub.answer_all()
    assert [hub.entry(e.id) for e, _ in hub.transport.deliveries] == [None, None]
    assert hub.engine.in_flight == 0
    assert hub.store.calls == Counter(enqueue_leased=1, record=2)


def test_receive_without_room_spools_unleased_for_the_next_scan():
    """
    With the batch full, ``receive`` falls back to ``enqueue``: the entry
    waits, reserved for the node and not leased, and the scan that follows
    the end of an attempt claims it and reads its body.
    """
    hub = OneNode(batch=1)
    hub.receive(A)
    [waiting] = hub.receive(A)
    assert hub.store.calls == Counter(enqueue_leased=1, enqueue=1)
    assert len(hub.transport.deliveries) == 1
    entry = hub.entry(waiting)
    assert entry.node == "dallas" and entry.next_attempt == hub.clock.seconds()
    hub.answer_all()
    hub.clock.advance(0)
    assert [e.id for e, _ in hub.transport.deliveries][1:] == [waiting]
    assert hub.store.calls["claim"] >= 1 and hub.store.calls["body"] == 1
    hub.answer_all()
    assert hub.entry(waiting) is None


def test_receive_with_less_room_than_routes_kicks_what_fits():
    """
    A message with more routes than the room left is spooled unleased; the
    room there is is filled at once by ``kick`` (a claim by id, with the
    message in hand), and the rest waits reserved for the node.
    """
    hub = OneNode(batch=2)
    hub.receive(A)
    [first_id] = hub.receive(A, C)
    assert hub.store.calls == Counter(enqueue_leased=1, enqueue=1, claim=1)
    assert len(hub.transport.deliveries) == 2
    kicked, message = hub.transport.deliveries[1]
    assert kicked.id == first_id and message == MESSAGE
    assert hub.store.calls["body"] == 0
    assert hub.engine.in_flight == 2


def test_failed_enqueue_leased_gives_the_room_back_and_fails_receive():
    """
    If the store cannot take the message, ``receive`` fails with the store's
    error and the room kept for its leases is given back: the next message
    is stored leased and tried at once again.
    """
    hub = OneNode(batch=1)
    hub.store.unavailable = True
    [failure] = hub.receive(A)
    assert failure.check(StoreUnavailable)
    assert hub.engine._reserved == 0
    hub.store.unavailable = False
    [entry_id] = hub.receive(A)
    assert hub.store.calls == Counter(enqueue_leased=2)
    assert [e.id for e, _ in hub.transport.deliveries] == [entry_id]


def test_room_kept_for_leases_on_their_way_counts_against_the_batch():
    """
    While ``enqueue_leased`` is answering, the room kept for its leases is
    not given to another message nor to a scan; when the leases arrive they
    are tried at once.
    """
    hub = OneNode(batch=2)
    hub.store.holding.add("enqueue_leased")
    hub.receive(A)
    hub.receive(A)
    assert hub.engine._reserved == 2
    [third] = hub.receive(A)
    assert hub.store.calls == Counter(enqueue_leased=2, enqueue=1)
    hub.clock.advance(0)  # the scan: no room
    assert hub.store.calls["claim"] == 0
    assert hub.entry(third).node == "dallas"
    hub.store.let_through("enqueue_leased")
    assert len(hub.transport.deliveries) == 2
    assert third not in [e.id for e, _ in hub.transport.deliveries]
    assert hub.engine._reserved == 0 and hub.engine.in_flight == 2
    assert hub.store.calls["body"] == 0


def test_leases_arriving_after_the_engine_stopped_are_released():
    """
    If the engine stops while ``enqueue_leased`` is answering, the leases
    are given back when they arrive: nothing is tried, and the entries are
    due at once for any node.
    """
    hub = OneNode()
    hub.store.holding.add("enqueue_leased")
    result = hub.receive(A, C)
    assert hub.engine._reserved == 2
    hub.engine.stopService()
    hub.clock.advance(5)
    hub.store.let_through("enqueue_leased")
    [first_id] = result
    assert hub.transport.deliveries == []
    assert hub.store.calls["release"] == 2
    assert hub.engine._reserved == 0
    now = hub.clock.seconds()
    entry = hub.entry(first_id)
    assert entry.next_attempt == now and entry.node is None
    leases = []
    hub.store.claim("losangeles", now, 10, 600.0, 300.0).addCallback(leases.extend)
    assert len(leases) == 2 and first_id in [lease.entry.id for lease in leases]


def test_store_raising_at_once_gives_the_room_back():
    """
    A store (or policy) that raises before ``enqueue_leased`` returns must
    not keep the room reserved for the message: the engine's batch would
    shrink for good.
    """
    hub = OneNode()

    def broken(*args, **kwargs):
        raise RuntimeError("store bug")

    hub.store.enqueue_leased = broken
    with pytest.raises(RuntimeError):
        hub.node.receive(Envelope(SENDER, (A,), received_at=hub.clock.seconds()), MESSAGE)
    assert hub.engine._reserved == 0


def test_stopping_waits_for_leases_on_their_way_and_their_release():
    """
    Stopping the engine waits for leases still coming from the store and for
    giving them back, so the hub closes its store only after: none is left
    to expire there (10 minutes during which no node could take the entry).
    """
    hub = OneNode()
    hub.store.holding.add("enqueue_leased")
    result = hub.receive(A)
    stopped = hub.engine.stopService()
    assert not stopped.called
    hub.store.let_through("enqueue_leased")
    [entry_id] = result
    assert hub.store.calls["release"] == 1
    assert stopped.called
    entry = hub.entry(entry_id)
    assert entry.next_attempt == hub.clock.seconds() and entry.node is None


def test_receive_with_engine_not_running_only_spools():
    """A node whose engine is not running stores the message unleased and tries nothing."""
    hub = OneNode(start=False)
    [entry_id] = hub.receive(A)
    assert hub.store.calls == Counter(enqueue=1)
    assert hub.transport.deliveries == []
    entry = hub.entry(entry_id)
    assert entry.node == "dallas" and entry.next_attempt == hub.clock.seconds()


# -- a message for a route known to be down: its first attempt decided --------

REFUSED = Reply(421, "4.4.1", "Connection refused")


def route_down(hub):
    """Mark ``COM`` down on the node: a real attempt refused; the store's counts start afresh."""
    hub.receive(A)
    assert len(hub.transport.deliveries) == 1
    hub.answer_all(REFUSED)
    assert hub.engine.throttle(COM).down
    hub.store.calls.clear()


def new_entry(hub):
    """An entry for ``A`` as ``receive`` would store it now, for ``decide_while_down``."""
    env = Envelope(SENDER, (A,), received_at=hub.clock.seconds())
    [entry] = new_entries(env, len(MESSAGE), {COM: [A]}, "dallas", "", lambda: "")
    return entry


def attempt_lines(events):
    return [formatEvent(e) for e in events if e.get("log_format") == "{line}"]


def test_message_for_a_down_route_is_stored_deferred_in_one_write():
    """
    While its route is down and no probe is due, a new message is stored
    with its first attempt already decided, in one ``enqueue_leased``: no
    claim, no record, no body read, no delivery.  The entry is deferred as
    the policy says (to losangeles, ten minutes on), its attempt logged in
    the store and in the mail log.
    """
    hub = OneNode()
    route_down(hub)
    now = hub.clock.seconds()
    with capturedLogs() as events:
        [entry_id] = hub.receive(A)
    assert hub.store.calls == Counter(enqueue_leased=1)
    assert len(hub.transport.deliveries) == 1
    assert hub.engine.in_flight == 0 and hub.engine._reserved == 0
    entry = hub.entry(entry_id)
    assert entry.node == "losangeles" and entry.next_attempt == now + 10 * MINUTE
    assert entry.attempts == 1 and entry.pending == (A,)
    # The reply says what the route's state is, not a reply it never got.
    assert (entry.last_reply.code, entry.last_reply.enhanced) == (451, "4.4.1")
    assert entry.last_reply.text.startswith(f"delivery to {COM} suspended: route down since ")
    assert entry.last_reply.text.endswith(f"not tried (last probe: {REFUSED})")
    suspended = entry.last_reply
    [attempt] = hub.store.attempts(entry_id).result
    assert (attempt.entry_id, attempt.node, attempt.finished) == (entry_id, "dallas", now)
    assert attempt.replies == ((A, suspended),)
    # Not a line per suspended entry: one per route and probe interval.
    assert attempt_lines(events) == []
    with capturedLogs() as events:
        hub.clock.advance(1)
    lines = [formatEvent(e) for e in events if "without connecting" in formatEvent(e)]
    assert len(lines) == 1 and f"route {COM} is down: 1 attempts deferred" in lines[0]


def test_only_the_down_route_of_a_message_is_decided():
    """
    A message for a down route and an up one: the down route's entry is
    stored deferred, the other leased and tried at once with the message in
    hand; ``receive`` gives the first entry's id either way.
    """
    hub = OneNode()
    route_down(hub)
    [first_id] = hub.receive(A, C)
    assert hub.store.calls == Counter(enqueue_leased=1)
    [(tried, message)] = hub.transport.deliveries[1:]
    assert tried.route == ORG and message == MESSAGE
    decided = hub.entry(first_id)
    assert decided.route == COM and decided.attempts == 1 and decided.node == "losangeles"
    assert hub.engine.in_flight == 1 and hub.engine._reserved == 0
    hub.answer_all()
    assert hub.entry(tried.id) is None
    assert hub.entry(first_id).attempts == 1


@pytest.mark.parametrize(
    "reply",
    [OK, TEMP, PERM, Reply(450, "4.2.0", "greylisted")],
    ids=["delivered", "deferred", "failed", "greylisted"],
)
def test_route_that_is_up_never_gets_decided(reply):
    """
    After an attempt that does not say the route is unreachable, the next
    message is stored leased and tried, not decided.
    """
    hub = OneNode()
    hub.receive(A)
    hub.answer_all(reply)
    assert not hub.engine.throttle(COM).down
    [entry_id] = hub.receive(A)
    # (A failure's DSN goes to the smarthost route.)
    assert [e.id for e, _ in hub.transport.deliveries if e.route == COM][1:] == [entry_id]
    assert hub.entry(entry_id).attempts == 0
    entry = new_entry(hub)
    assert hub.engine.decide_while_down(entry) is None


def test_first_message_after_probe_seconds_is_the_probe():
    """
    Within ``probe_seconds`` of the attempt that found the route down, new
    messages are decided; the first one after is stored leased and really
    attempted (the probe), once.  When it gets through, the route is up and
    the next message is tried at once.
    """
    hub = OneNode()
    route_down(hub)
    probe = hub.engine._settings.probe_seconds
    hub.clock.advance(probe - 1)
    [decided] = hub.receive(A)
    assert hub.entry(decided).attempts == 1
    assert len(hub.transport.deliveries) == 1
    hub.clock.advance(1)
    [probe_id] = hub.receive(A)
    assert [e.id for e, _ in hub.transport.deliveries][1:] == [probe_id]
    assert hub.entry(probe_id).attempts == 0
    hub.answer_all()
    assert not hub.engine.throttle(COM).down
    assert hub.entry(probe_id) is None
    [after] = hub.receive(A)
    assert after in [e.id for e, _ in hub.transport.deliveries]
    assert hub.entry(after).attempts == 0


def test_route_up_again_after_its_probe_is_no_longer_decided():
    """
    When the probe (here a scan's attempt after ``probe_seconds``) gets
    through, the route is up and the next message is tried at once, not
    decided.
    """
    hub = OneNode()
    route_down(hub)
    hub.clock.advance(hub.engine._settings.probe_seconds)
    ids = []
    env = Envelope(SENDER, (A,), received_at=hub.clock.seconds())
    hub.store.enqueue(env, MESSAGE, {COM: [A]}, "dallas").addCallback(ids.extend)
    hub.engine.wake()
    hub.clock.advance(0)
    assert [e.id for e, _ in hub.transport.deliveries][1:] == ids
    hub.answer_all()
    assert not hub.engine.throttle(COM).down
    [entry_id] = hub.receive(A)
    assert entry_id in [e.id for e, _ in hub.transport.deliveries]
    assert hub.entry(entry_id).attempts == 0


def test_operator_retry_tries_entries_of_a_route_seen_down():
    """
    After ``mailhub queue flush`` (``retry_now``) the entries of a route this
    node saw down are really tried, all of them, not deferred without
    connecting until ``probe_seconds`` pass (each for another retry interval).
    """
    hub = OneNode()
    route_down(hub)
    ids: list[str] = []
    for _ in range(3):
        env = Envelope(SENDER, (A,), received_at=hub.clock.seconds())
        hub.store.enqueue(env, MESSAGE, {COM: [A]}, "dallas").addCallback(ids.extend)
    hub.engine.retry_now()
    hub.clock.advance(0)
    # The window restarts small (a quarter, as after a recovery): answer the
    # attempts as they come.
    for _ in range(10):
        hub.answer_all()
        hub.clock.advance(0)
    assert sorted(e.id for e, _ in hub.transport.deliveries[1:]) == sorted(ids)
    assert not hub.engine.throttle(COM).down
    assert all(hub.entry(i) is None for i in ids)


def test_decide_while_down_decides_nothing_once_the_engine_stopped():
    """A stopped engine decides no first attempt, even for a route it saw down."""
    hub = OneNode()
    route_down(hub)
    entry = new_entry(hub)
    assert hub.engine.decide_while_down(entry) is not None
    hub.engine.stopService()
    assert hub.engine.decide_while_down(entry) is None


# -- entries claimed by a scan: bodies read ahead, the slot freed early --------


class ScanEngine:
    """
    The engine of dallas alone over a spy store, ``window`` attempts at once
    on the route, its transport answering from ``pending`` Deferreds; the
    entries are spooled for it and reach it by a scan, with no message in hand.
    """

    def __init__(self, window=1):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = SpyStore(self.clock)
        self.pending: list[Deferred] = []
        self.transport = ScriptedTransport(self.slow)
        self.engine = DeliveryEngine(
            "dallas", self.store, StandardPolicy(nodes=("dallas", "losangeles"), jitter=0.0),
            lambda route: self.transport, lambda route: (window, 30.0),
            lambda *args: succeed(None), self.clock, DeliveryConfig(max_scan_interval=60.0),
        )
        self.engine.startService()
        self.throttle = self.engine.throttle(ROUTE)

    def slow(self, entry, message):
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def spool(self, message=MESSAGE):
        """Spool a message for dallas and let a scan claim it: its entry."""
        env = Envelope(SENDER, (A,), received_at=self.clock.seconds())
        ids = []
        self.store.enqueue(env, message, {ROUTE: [A]}, "dallas").addCallback(ids.extend)
        entry = self.entry(ids[0])
        self.engine.wake()
        self.clock.advance(0)
        return entry

    def tried(self):
        return [e.id for e, _ in self.transport.deliveries]

    def answer(self, reply=OK):
        self.pending.pop(0).callback(reply)

    def entry(self, entry_id):
        return self.store.get(entry_id).result


def test_body_of_a_scanned_entry_is_read_while_it_waits_for_its_turn():
    """
    An entry claimed by a scan, on a route that is up with a short queue,
    has its body read before it gets its slot: when the slot comes it waits
    for that read (held here), not for a second one.
    """
    hub = ScanEngine(window=1)
    first = hub.spool()
    hub.store.holding.add("body")
    second = hub.spool()
    assert hub.throttle.active == 1 and hub.throttle.waiting == 1
    assert hub.store.bodies == [first.message_id, second.message_id]
    assert hub.tried() == [first.id]
    hub.answer()
    assert hub.throttle.active == 1 and hub.throttle.waiting == 0
    assert hub.tried() == [first.id]  # its turn, its body still on its way
    hub.store.let_through("body")
    assert hub.tried() == [first.id, second.id]
    assert hub.transport.deliveries[1][1] == MESSAGE
    assert hub.store.bodies == [first.message_id, second.message_id]


def test_bodies_are_read_ahead_only_for_the_next_windows_of_the_queue():
    """
    A body is read ahead once its attempt is among the next ``READ_AHEAD``
    windows to start, not before (a whole batch of bodies would sit in
    memory): with a window of 1, the fourth entry's is read when the second
    gets the slot, while the second is being tried.
    """
    assert READ_AHEAD == 2
    hub = ScanEngine(window=1)
    first, second, third, fourth = hub.spool(), hub.spool(), hub.spool(), hub.spool()
    assert hub.throttle.waiting == 3
    assert hub.store.bodies == [first.message_id, second.message_id, third.message_id]
    hub.answer()
    assert hub.tried() == [first.id, second.id]
    assert hub.store.bodies == [e.message_id for e in (first, second, third, fourth)]
    hub.answer()
    hub.answer()
    assert hub.tried() == [first.id, second.id, third.id, fourth.id]
    assert hub.store.bodies == [e.message_id for e in (first, second, third, fourth)]


@pytest.mark.parametrize(
    "extra, read_ahead", [(0, True), (1, False)], ids=["at the limit", "over the limit"]
)
def test_large_bodies_are_read_only_when_their_turn_comes(extra, read_ahead):
    """A body larger than ``PREFETCH_MAX_SIZE`` is not read ahead, only once the attempt has its slot."""
    hub = ScanEngine(window=1)
    first = hub.spool()
    large = b"x" * (PREFETCH_MAX_SIZE + extra)
    second = hub.spool(large)
    assert second.size == PREFETCH_MAX_SIZE + extra
    assert (second.message_id in hub.store.bodies) is read_ahead
    hub.answer()
    assert hub.tried() == [first.id, second.id]
    assert hub.transport.deliveries[1][1] == large
    assert hub.store.bodies == [first.message_id, second.message_id]


def test_body_is_not_read_for_an_attempt_suspended_on_a_down_route():
    """
    While the route is down, a scanned entry's attempt is deferred without
    connecting, and its body is never read: not ahead, not after.
    """
    hub = ScanEngine(window=1)
    first = hub.spool()
    hub.answer(REFUSED)
    assert hub.throttle.down
    second = hub.spool()
    assert hub.tried() == [first.id]
    assert hub.store.bodies == [first.message_id]
    entry = hub.entry(second.id)
    assert entry.attempts == 1 and "suspended" in entry.last_reply.text


def test_slot_is_free_once_the_transport_is_done_before_the_record():
    """
    The route's slot is given back as soon as the transport has answered:
    while the record of that attempt is still on its way, the next waiting
    attempt is already delivering, and with nothing waiting no slot is held.
    """
    hub = ScanEngine(window=1)
    hub.store.holding.add("record")
    first, second = hub.spool(), hub.spool()
    hub.answer()
    assert hub.store.calls["record"] == 1
    assert hub.tried() == [first.id, second.id]
    assert hub.throttle.active == 1 and hub.throttle.waiting == 0
    hub.answer()
    assert hub.store.calls["record"] == 2
    assert hub.throttle.active == 0
    assert hub.engine.in_flight == 2  # the attempts end with their records
    hub.store.let_through("record")
    assert hub.engine.in_flight == 0
    assert hub.entry(first.id) is None and hub.entry(second.id) is None


# -- one budget for the hub, and the reject storm -----------------------------


def test_two_nodes_never_run_more_attempts_than_the_routes_limit():
    """``max_connections`` bounds both nodes together: their shares come from the store."""
    pending: list[Deferred] = []
    running = {"now": 0, "peak": 0}

    def slow(entry, message):
        running["now"] += 1
        running["peak"] = max(running["peak"], running["now"])
        d: Deferred = Deferred()

        def done(reply):
            running["now"] -= 1
            return reply

        pending.append(d)
        return d.addCallback(done)

    hub = Hub(slow, limit=3)
    ids = [hub.accept(node) for node in ("dallas", "losangeles") * 10]
    for _ in range(200):
        hub.clock.advance(1)
        while pending:
            pending.pop(0).callback(OK)
            hub.clock.advance(0.01)
            assert running["now"] <= 3
    assert [i for i in ids if hub.entry(i) is not None] == []
    assert running["peak"] == 3
    shares = {name: e.throttle(ROUTE).share for name, e in hub.engines.items()}
    assert sum(shares.values()) <= 3


def test_a_node_kept_busy_on_every_connection_gives_the_other_its_part():
    """
    Dallas drains a backlog on all four connections, each attempt followed
    by the next: when losangeles wants some too, dallas is given its fair
    two, starts nothing new until it holds two, says so at once, and
    losangeles runs two while dallas's backlog still waits; together they
    never run more than four.
    """
    pending, slow = answered_later()

    hub = Hub(slow, limit=4)
    for _ in range(40):
        hub.accept("dallas")
    hub.clock.advance(1)
    dallas, losangeles = (hub.engines[n].throttle(ROUTE) for n in ("dallas", "losangeles"))
    assert dallas.active == 4
    for _ in range(20):
        hub.accept("losangeles")
    both = None
    for step in range(400):
        if pending:
            pending.pop(0).callback(OK)
        hub.clock.advance(0.05)
        assert dallas.active + losangeles.active <= 4
        if losangeles.active == 2 and dallas.active == 2:
            both = step
            break
    assert both is not None, "losangeles never got its part"
    assert both * 0.05 <= 2 * hub.settings.share_seconds + 0.5  # within two of the nodes' ticks
    assert hub.engines["dallas"].in_flight > 2  # dallas's backlog was still there
    for _ in range(2000):  # the rest of the backlog, then the engines stop
        if not pending and not any(e.in_flight for e in hub.engines.values()):
            break
        if pending:
            pending.pop(0).callback(OK)
        hub.clock.advance(0.05)
        assert dallas.active + losangeles.active <= 4
    assert not pending and not any(e.in_flight for e in hub.engines.values())
    for engine in hub.engines.values():
        engine.stopService()
    hub.clock.advance(60)


def test_a_stopped_node_gives_its_share_back_at_once():
    hub = Hub(limit=4)
    hub.accept("dallas")
    hub.engines["dallas"].throttle(ROUTE).peak_demand = 4
    hub.clock.advance(1)
    assert hub.engines["dallas"].throttle(ROUTE).share >= 1
    hub.engines["dallas"].stopService()
    given = hub.store.share(ROUTE, "losangeles", 4, 0, 4, hub.clock.seconds(), 30).result
    assert given == 4


def test_rejecting_after_an_outage_holds_backlog_and_new_mail_without_dsn():
    """
    A route that was down comes back answering 550 to everyone: nothing is
    bounced, the route becomes REJECTING hub-wide, and mail arriving then is
    held too.  When the server accepts again, a probe ends the state and
    everything is delivered.
    """
    mode = {"reply": Reply(421, "4.4.1", "refused")}
    hub = Hub(lambda entry, message: mode["reply"])
    backlog = [
        hub.accept(node, recipients=(Address(f"user{i}", "example.com"),))
        for i, node in enumerate(("dallas", "losangeles") * 3)
    ]
    assert all(hub.entry(i).pending for i in backlog)
    mode["reply"] = PERM
    hub.store.flush(None, hub.clock.seconds())
    for engine in hub.engines.values():
        engine.retry_now()
    hub.clock.advance(1)
    hub.clock.advance(1)
    assert hub.bounces == []
    state = hub.store.route_states().result
    assert state[ROUTE]["state"] == "rejecting" and "550 5.1.1" in state[ROUTE]["reply"]
    assert all(hub.entry(i).held for i in backlog)
    assert hub.engines["dallas"].status()["routes"][ROUTE]["state"] == "rejecting"
    # New mail while rejecting: held, not bounced.
    fresh = [hub.accept("dallas") for _ in range(3)]
    hub.clock.advance(1)
    assert hub.bounces == []
    assert all(hub.entry(i).held for i in fresh)
    # The server is fixed: a probe (one held entry released per probe
    # interval) is delivered, the state ends, the backlog flows.
    mode["reply"] = OK
    for _ in range(120):
        hub.clock.advance(1)
    assert hub.store.route_states().result == {}
    assert [i for i in backlog + fresh if hub.entry(i) is not None] == []
    assert hub.bounces == []


def test_a_single_rejection_on_a_healthy_route_still_bounces():
    hub = Hub(scripted(OK, PERM))
    hub.accept("dallas")
    entry_id = hub.accept("dallas")
    assert hub.entry(entry_id) is None
    assert [eid for eid, _ in hub.bounces] == [entry_id]
    assert hub.store.route_states().result == {}


def test_rejections_below_the_threshold_are_held_until_the_route_delivers():
    """After a deferral, a 5xx is held on suspicion; a delivery shows the route healthy and releases it."""
    mode = {"reply": TEMP}
    hub = Hub(lambda entry, message: mode["reply"] if entry.pending[0] != B else PERM)
    first = hub.accept("dallas")  # deferred: the route is troubled
    suspect = hub.accept("dallas", recipients=(B,))
    assert hub.entry(suspect).held and hub.bounces == []
    mode["reply"] = OK
    hub.store.flush(None, hub.clock.seconds())
    hub.engines["dallas"].wake()
    hub.clock.advance(1)
    assert hub.entry(first) is None
    # Released: tried again on a healthy route, the 5xx now bounces.
    hub.clock.advance(1)
    assert hub.entry(suspect) is None
    assert [eid for eid, _ in hub.bounces] == [suspect]


def test_storm_detection_can_be_turned_off():
    mode = {"reply": Reply(421, "4.4.1", "refused")}
    hub = Hub(
        lambda entry, message: mode["reply"],
        settings=DeliveryConfig(max_scan_interval=60.0, reject_storm_recipients=0),
    )
    entry_id = hub.accept("dallas")
    mode["reply"] = PERM
    fresh = hub.accept("losangeles")
    assert hub.entry(fresh) is None and [eid for eid, _ in hub.bounces] == [fresh]
    assert hub.entry(entry_id).pending


def test_new_mail_at_a_node_that_never_saw_the_outage_is_held_not_bounced():
    """A node learns from the store that the route is down: a 5xx then is suspect there too."""
    mode = {"reply": Reply(421, "4.4.1", "refused")}
    hub = Hub(lambda entry, message: mode["reply"])
    hub.accept("dallas")
    assert hub.store.route_states().result[ROUTE]["state"] == "down"
    hub.clock.advance(1)  # losangeles reads the route states
    assert hub.engines["losangeles"].route_states[ROUTE]["state"] == "down"
    assert not hub.engines["losangeles"].throttle(ROUTE).troubled
    mode["reply"] = PERM
    fresh = hub.accept("losangeles", recipients=(B,))
    assert hub.entry(fresh).held and hub.bounces == []
    # A delivery clears the hub-wide state.
    mode["reply"] = OK
    hub.accept("losangeles")
    assert ROUTE not in hub.store.route_states().result


def test_back_pressure_makes_the_attempt_wait_for_a_slot_not_for_the_schedule():
    """A 452 4.3.1 slows the route; the entry is tried again after the brief pause, not ten minutes later."""
    busy = Reply(452, "4.3.1", "Insufficient system resources")
    hub = Hub(scripted(busy, busy, OK))
    entry_id = hub.accept("dallas")
    assert hub.entry(entry_id) is not None
    hub.clock.advance(5)  # the pauses: about 1 s, then about 2 s
    assert hub.entry(entry_id) is None
    assert len(hub.transport.deliveries) == 3
    throttle = hub.engines["dallas"].throttle(ROUTE)
    assert throttle.back_pressure == 2 and throttle.window < 10


def test_back_pressure_that_lasts_goes_back_to_the_schedule():
    busy = Reply(452, "4.3.1", "Insufficient system resources")
    hub = Hub(scripted(busy))
    entry_id = hub.accept("dallas")
    hub.clock.advance(60)
    entry = hub.entry(entry_id)
    assert entry is not None and entry.attempts == 1 and entry.last_reply == busy
    assert entry.next_attempt > hub.clock.seconds() + 60  # the policy's retry, to the other node


def test_operator_release_of_a_rejecting_route_is_seen_before_the_next_tick():
    """``mailhub route release`` clears the state and releases the entries; a node woken at once delivers them."""
    from mailhub.delivery.engine import release_route

    mode = {"reply": Reply(421, "4.4.1", "refused")}
    hub = Hub(lambda entry, message: mode["reply"])
    backlog = [hub.accept("dallas", recipients=(Address(f"u{i}", "example.com"),)) for i in range(4)]
    mode["reply"] = PERM
    hub.store.flush(None, hub.clock.seconds())
    for engine in hub.engines.values():
        engine.retry_now()
    hub.clock.advance(0.1)
    assert hub.store.route_states().result[ROUTE]["state"] == "rejecting"
    assert all(hub.entry(i).held for i in backlog)
    hub.clock.advance(0.5)  # before the next tick: the engines' view is the store's of a moment ago
    mode["reply"] = OK
    hub.store.set_route_state(ROUTE, None)
    ensureDeferred(release_route(hub.store, ROUTE, hub.clock.seconds()))
    for engine in hub.engines.values():
        engine.retry_now()
    hub.clock.advance(0.1)
    assert [i for i in backlog if hub.entry(i) is not None] == []
    assert hub.bounces == []


def test_later_puts_off_an_entry_that_waited_for_its_turn_and_gives_the_turn_back():
    """
    ``later`` (the archive yielding to the mail) is asked again once an
    entry has waited for its turn on the route: put off then, it is deferred
    without being tried and its turn goes to the next entry.
    """
    pending, slow = answered_later()

    busy = {"until": None}
    hub = Hub(slow, limit=1)
    engine = hub.engines["dallas"]
    engine._later = lambda route, created: (busy["until"], TEMP) if busy["until"] else None
    first = hub.accept()
    second = hub.accept()
    assert len(pending) == 1  # the second waits for the route's one connection
    busy["until"] = hub.clock.seconds() + 120
    pending.pop(0).callback(OK)
    assert pending == []  # not tried...
    assert [e.id for e, _ in hub.transport.deliveries] == [first]
    put_off = hub.entry(second)
    assert put_off.next_attempt == busy["until"]  # ...but deferred until then
    assert [a.replies[0][1] for a in hub.attempts(second)] == [TEMP]
    assert engine.in_flight == 0  # and the batch has its place back
    assert engine.stats.attempts[(ROUTE, "yielded")] == 1
    busy["until"] = None
    third = hub.accept()
    assert len(pending) == 1 and hub.transport.deliveries[-1][0].id == third  # the turn was given back

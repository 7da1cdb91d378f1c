"""
What the hub delivered, for ``redeliver --skip-delivered``: the engine's
``delivered`` observer and the ``DeliveryRecorder`` that batches its
records into the archive.  A Clock, the memory store, a scripted transport
and an archive whose writes the test completes by hand.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from mailhub.archive.delivered import (
    HOLD_SECONDS,
    RETRY_SECONDS,
    DeliveryRecorder,
    archive_id_of,
    respooled_client,
)
from mailhub.archive.route import ARCHIVE_ROUTE, ArchiveGate, MailMeter
from mailhub.config import DeliveryConfig, parse
from mailhub.delivery.engine import DeliveryEngine
from mailhub.model import Address, Entry, Envelope, Recipient, Reply, StoreUnavailable
from mailhub.plugins.memory_store import MemorySpoolStore
from mailhub.plugins.standard_policy import StandardPolicy
from mailhub.testing.fakes import ScriptedTransport

ROUTE = "smtp:mail.example.com:25"
ALICE = Address("alice", "example.com")
BOB = Address("bob", "example.com")
OUTSIDE = Address("someone", "outside.example")
CONFIG = parse(
    b'[hub]\nhostname="h.example"\noutbound="smtp:smarthost:25"\n'
    b'[nodes.dallas]\nsmtp="tcp:0"\n'
    b'[domains."example.com"]\nroute="smtp:mail.example.com:25"\n'
)


class HandArchive:
    """The two methods the recorder calls; each write waits for the test to finish it."""

    def __init__(self) -> None:
        self.writes: list[tuple[list[Any], Deferred[None]]] = []

    def record_delivered(self, records: list[Any]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.writes.append((list(records), d))
        return d

    def finish(self, i: int = -1, error: Exception | None = None) -> None:
        d = self.writes[i][1]
        if error is None:
            d.callback(None)
        else:
            d.errback(error)


def entry(
    entry_id: str = "e1",
    message_id: str = "msg1",
    route: str = ROUTE,
    recipients: tuple[Address, ...] = (ALICE,),
    client: str = "192.0.2.1",
) -> Entry:
    return Entry(
        entry_id, message_id, route, OUTSIDE, [Recipient(a) for a in recipients], envelope_client=client
    )


def recorder(archive: Any, clock: Clock | None = None, **kw: Any) -> DeliveryRecorder:
    return DeliveryRecorder(archive, CONFIG, clock or Clock(), **kw)


# -- the recorder --------------------------------------------------------------


def test_one_write_at_a_time_and_the_next_takes_everything_that_waited() -> None:
    archive = HandArchive()
    r = recorder(archive)
    r(entry("e1", "msg1"), [ALICE], 10.0)
    assert [w for w, _ in archive.writes] == [[("msg1", ALICE, ROUTE, 10.0)]]
    for i in range(2, 5):
        r(entry(f"e{i}", f"msg{i}", recipients=(ALICE, BOB)), [ALICE, BOB], 10.0 + i)
    assert len(archive.writes) == 1  # nothing more while the first is in flight
    archive.finish(0)
    assert len(archive.writes) == 2
    assert len(archive.writes[1][0]) == 6
    archive.finish(1)
    assert len(archive.writes) == 2
    assert (r.written, r.lost) == (7, 0)


def test_a_batch_holds_at_most_max_batch_records() -> None:
    archive = HandArchive()
    r = recorder(archive, max_batch=3)
    r(entry("e0", "m0"), [ALICE], 1.0)
    for i in range(1, 8):
        r(entry(f"e{i}", f"m{i}"), [ALICE], 1.0)
    archive.finish(0)
    archive.finish(1)
    archive.finish(2)
    assert [len(w) for w, _ in archive.writes] == [1, 3, 3, 1]


def test_under_a_burst_records_wait_for_a_full_batch_or_the_bursts_end() -> None:
    """
    While the process accepts or delivers more than the gate's
    ``yield_above`` a second, a write goes only with a full batch; what is
    short of one waits, looked at again every ``HOLD_SECONDS``, until the
    rate falls.
    """
    archive, clock = HandArchive(), Clock()
    meter = MailMeter(clock)
    r = recorder(archive, clock, max_batch=3, gate=ArchiveGate(meter, clock, 50, 120))
    meter.tick(100)
    r(entry("e1", "m1"), [ALICE], 1.0)
    r(entry("e2", "m2"), [ALICE], 1.0)
    assert archive.writes == []
    r(entry("e3", "m3"), [ALICE], 1.0)
    assert [len(w) for w, _ in archive.writes] == [3]
    archive.finish(0)
    r(entry("e4", "m4"), [ALICE], 1.0)
    clock.advance(HOLD_SECONDS - 0.25)
    meter.tick(100)  # still busy at the next look
    clock.advance(0.25)
    assert len(archive.writes) == 1
    clock.advance(HOLD_SECONDS)  # a second without mail: the rate fell
    assert [w for w, _ in archive.writes][1] == [("m4", ALICE, ROUTE, 1.0)]
    archive.finish(1)
    assert (r.written, r.lost) == (4, 0)


def test_flush_writes_what_waits_for_a_burst_to_pass() -> None:
    archive, clock = HandArchive(), Clock()
    meter = MailMeter(clock)
    r = recorder(archive, clock, max_batch=3, gate=ArchiveGate(meter, clock, 50, 120))
    meter.tick(100)
    r(entry("e1", "m1"), [ALICE], 1.0)
    flushed = r.flush()
    assert [len(w) for w, _ in archive.writes] == [1]
    archive.finish(0)
    assert flushed.called
    assert clock.getDelayedCalls() == []


def test_without_a_burst_records_go_at_once() -> None:
    archive, clock = HandArchive(), Clock()
    r = recorder(archive, clock, max_batch=3, gate=ArchiveGate(MailMeter(clock), clock, 50, 120))
    r(entry("e1", "m1"), [ALICE], 1.0)
    assert [len(w) for w, _ in archive.writes] == [1]


def test_only_mailboxes_of_the_hubs_domains_and_never_the_archive_route() -> None:
    archive = HandArchive()
    r = recorder(archive)
    r(entry("a", route=ARCHIVE_ROUTE), [ALICE], 1.0)
    r(entry("dsn", "dsn-msg", route="smtp:smarthost:25", recipients=(OUTSIDE,)), [OUTSIDE], 1.0)
    assert archive.writes == []
    r(entry("e", "m", recipients=(ALICE, OUTSIDE)), [ALICE, OUTSIDE], 2.0)
    assert [w for w, _ in archive.writes] == [[("m", ALICE, ROUTE, 2.0)]]


def test_a_respooled_message_is_recorded_under_its_archive_copy() -> None:
    archive = HandArchive()
    r = recorder(archive)
    r(entry("e", "new-spool-id", client=respooled_client("archived-7")), [ALICE], 1.0)
    assert archive.writes[0][0] == [("archived-7", ALICE, ROUTE, 1.0)]
    assert archive_id_of(entry(message_id="m", client="archive:")) == "m"
    assert archive_id_of(entry(message_id="m", client="archive")) == "m"


def test_a_refused_batch_is_tried_again_once_then_lost() -> None:
    archive, clock = HandArchive(), Clock()
    r = recorder(archive, clock)
    with capturedLogs() as events:
        r(entry("e1", "m1"), [ALICE], 1.0)
        archive.finish(0, StoreUnavailable("down"))
        r(entry("e2", "m2"), [ALICE], 2.0)
        assert len(archive.writes) == 1  # waiting for the retry
        clock.advance(RETRY_SECONDS)
        assert archive.writes[1][0] == [("m1", ALICE, ROUTE, 1.0)]
        archive.finish(1, StoreUnavailable("still down"))
        assert archive.writes[2][0] == [("m2", ALICE, ROUTE, 2.0)]
        archive.finish(2)
    assert (r.written, r.lost) == (1, 1)
    text = " ".join(str(e.get("log_format")) for e in events)
    assert "trying again" in text and "lost" in text and "written again" in text


def test_beyond_max_pending_records_are_dropped_and_counted() -> None:
    archive = HandArchive()
    r = recorder(archive, max_pending=3)
    with capturedLogs() as events:
        for i in range(6):
            r(entry(f"e{i}", f"m{i}"), [ALICE], 1.0)
    # One in flight, three waiting, two dropped, one line about it.
    assert (len(archive.writes), r.lost) == (1, 2)
    assert sum("dropped" in str(e.get("log_format")) for e in events) == 1
    archive.finish(0)
    assert len(archive.writes[1][0]) == 3


def test_flush_waits_for_everything_and_tries_a_refused_batch_at_once() -> None:
    archive, clock = HandArchive(), Clock()
    r = recorder(archive, clock)
    r(entry("e1", "m1"), [ALICE], 1.0)
    archive.finish(0, StoreUnavailable("down"))
    r(entry("e2", "m2"), [ALICE], 2.0)
    flushed: list[object] = []
    r.flush().addCallback(flushed.append)
    assert archive.writes[1][0] == [("m1", ALICE, ROUTE, 1.0)]  # not waiting RETRY_SECONDS
    assert flushed == []
    archive.finish(1)
    assert flushed == []
    archive.finish(2)
    assert flushed == [None]
    assert clock.getDelayedCalls() == []
    idle: list[object] = []
    r.flush().addCallback(idle.append)
    assert idle == [None]


def test_flush_gives_up_on_what_the_archive_refuses() -> None:
    archive = HandArchive()
    r = recorder(archive)
    r(entry("e1", "m1"), [ALICE], 1.0)
    flushed: list[object] = []
    r.flush().addCallback(flushed.append)
    archive.finish(0, StoreUnavailable("down"))
    assert flushed == [None]
    assert r.lost == 1


def test_an_archive_that_raises_costs_the_batch_not_the_caller() -> None:
    class Raising:
        def record_delivered(self, records: Any) -> Deferred[None]:
            raise RuntimeError("bug")

    r = recorder(Raising())
    r(entry(), [ALICE], 1.0)  # does not raise
    assert r.written == 0


def test_synchronous_archive_writes_everything() -> None:
    written: list[Any] = []

    class Quick:
        def record_delivered(self, records: Any) -> Deferred[None]:
            written.extend(records)
            return succeed(None)

    r = recorder(Quick(), max_batch=2)
    for i in range(5):
        r(entry(f"e{i}", f"m{i}"), [ALICE, BOB], 1.0)
    assert len(written) == 10 and r.written == 10


# -- the engine's observer -----------------------------------------------------


class Engine:
    def __init__(self, script: Any, observer: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = MemorySpoolStore(self.clock)
        self.transport = ScriptedTransport(script)
        self.engine = DeliveryEngine(
            "dallas",
            self.store,
            StandardPolicy(nodes=("dallas",), jitter=0.0),
            lambda route: self.transport,
            lambda route: (10, 30.0),
            lambda *a: succeed(None),
            self.clock,
            DeliveryConfig(max_scan_interval=60.0),
            delivered=observer,
        )
        self.engine.startService()

    def accept(self, *recipients: Address) -> str:
        ids: list[str] = []
        env = Envelope(OUTSIDE, recipients, received_at=self.clock.seconds())
        self.engine.accept(env, b"Subject: x\r\n\r\nx\r\n", {ROUTE: list(recipients)}).addCallback(ids.append)
        return ids[0]


def test_engine_tells_the_observer_of_accepted_recipients_only() -> None:
    told: list[tuple[str, list[Address], float]] = []

    def script(entry: Entry, message: bytes) -> dict[Address, Reply]:
        return {ALICE: Reply(250, "2.0.0", "OK"), BOB: Reply(451, "4.2.0", "later")}

    hub = Engine(script, lambda e, rcpts, at: told.append((e.route, list(rcpts), at)))
    hub.accept(ALICE, BOB)
    assert told == [(ROUTE, [ALICE], hub.clock.seconds())]
    hub.clock.advance(60 * 60)  # BOB is deferred again: nothing more
    assert len(told) == 1


def test_engine_tells_nothing_of_rejected_recipients() -> None:
    told: list[Any] = []
    hub = Engine(lambda e, m: Reply(550, "5.1.1", "no such user"), lambda *a: told.append(a))
    hub.accept(ALICE)
    assert told == []


def test_an_observer_that_raises_does_not_stop_the_entry_leaving_the_spool() -> None:
    def observer(*a: Any) -> None:
        raise RuntimeError("bug")

    hub = Engine(lambda e, m: Reply(250, "2.0.0", "OK"), observer)
    with capturedLogs() as events:
        hub.accept(ALICE)
    assert hub.store.counts().result["entries"] == 0
    assert any("observer failed" in str(e.get("log_format")) for e in events)


def test_engine_without_an_observer_delivers_as_before() -> None:
    hub = Engine(lambda e, m: Reply(250, "2.0.0", "OK"), None)
    hub.accept(ALICE)
    assert hub.store.counts().result["entries"] == 0


def test_a_write_that_fails_at_once_is_retried_once() -> None:
    """An archive that answers with an already failed ``Deferred`` (down) is a refused write."""
    class Failing:
        def record_delivered(self, records: Any) -> Deferred[None]:
            return fail(StoreUnavailable("down"))

    clock = Clock()
    r = recorder(Failing(), clock)
    r(entry(), [ALICE], 1.0)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(RETRY_SECONDS)
    assert r.lost == 1 and clock.getDelayedCalls() == []


def test_a_delivery_is_recorded_for_the_folded_mailbox() -> None:
    """A 2xx for ``Alice@`` is a delivery to the archive's mailbox ``alice@``, which a re-delivery asks about."""
    archive = HandArchive()
    r = recorder(archive)
    upper = Address("Alice", "example.com")
    r(entry("e", "m", recipients=(upper,)), [upper], 1.0)
    assert archive.writes[0][0] == [("m", ALICE, ROUTE, 1.0)]

"""
The archive yields to the mail (``ArchiveGate``): the meter, the gate's
rules, and a node whose archive entries are put off in the spool while it
accepts or delivers a burst, until the burst is over or the message is
``max_lag`` old.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from mailhub.archive.route import ARCHIVE_ROUTE, ArchiveGate, MailMeter
from mailhub.config import ConfigError, parse
from mailhub.model import Address, ArchiveQuery, ArchiveScope, Envelope
from mailhub.node import Node
from mailhub.plugin import load_plugin
from mailhub.plugins.memory_store import MemorySpoolStore
from mailhub.plugins.standard_policy import StandardPolicy
from mailhub.testing.fakes import ScriptedTransport

ALICE = Address("alice", "example.com")
OUTSIDE = Address("someone", "outside.example")
ROUTE = "smtp:mail.example.com:25"


def busy_gate(yield_above: float = 10, max_lag: float = 60) -> tuple[Clock, MailMeter, ArchiveGate]:
    clock = Clock()
    clock.advance(1000)
    meter = MailMeter(clock)
    return clock, meter, ArchiveGate(meter, clock, yield_above, max_lag)


def test_the_meter_counts_the_last_second_only():
    clock = Clock()
    clock.advance(1000)
    meter = MailMeter(clock)
    assert meter.rate() == 0
    meter.tick(30)
    clock.advance(0.5)
    meter.tick(20)
    assert meter.rate() == 50
    clock.advance(0.6)  # the first 30 are more than a second old
    assert meter.rate() == 20
    clock.advance(1.0)
    assert meter.rate() == 0
    clock.advance(100)
    meter.tick()
    assert meter.rate() == 1


def test_a_quiet_front_door_puts_nothing_off():
    clock, meter, gate = busy_gate()
    meter.tick(10)  # at the limit, not above it
    assert gate.later(ARCHIVE_ROUTE, clock.seconds()) is None
    assert not gate.yielding


def test_a_steady_load_is_archived_at_most_max_lag_behind():
    clock, meter, gate = busy_gate(max_lag=5)
    created = clock.seconds()
    resumed: list[float] = []
    gate.on_resume(lambda: resumed.append(clock.seconds()))
    for _ in range(24):  # 6 s of a steady 40 messages a quarter second
        meter.tick(40)
        clock.advance(0.25)
    assert gate.yielding or gate.later(ARCHIVE_ROUTE, clock.seconds()) is not None
    assert gate.later(ARCHIVE_ROUTE, created) is None  # older than max_lag: taken up however busy
    assert resumed == []  # still busy


def test_later_puts_off_new_archive_entries_and_resume_says_when_to_take_them_up():
    clock, meter, gate = busy_gate(max_lag=60)
    resumed: list[float] = []
    gate.on_resume(lambda: resumed.append(clock.seconds()))
    created = clock.seconds()
    assert gate.later(ARCHIVE_ROUTE, created) is None  # quiet
    meter.tick(500)
    assert gate.later("smtp:mail.example.com:25", created) is None  # mail itself is never put off
    when, reply = gate.later(ARCHIVE_ROUTE, created)
    assert when == created + 60 and reply.code == 451
    assert gate.later(ARCHIVE_ROUTE, created - 61) is None  # already max_lag old
    assert gate.yielding and gate.put_off == 1
    clock.advance(0.5)
    assert resumed == []
    clock.advance(1.0)  # a quiet second
    assert resumed == [clock.seconds()] and not gate.yielding and gate.put_off == 0
    clock.advance(10)
    assert len(resumed) == 1  # once per burst, and no timer while quiet
    assert clock.getDelayedCalls() == []


def test_yield_above_zero_never_holds():
    clock, meter, gate = busy_gate(yield_above=0)
    meter.tick(100_000)
    assert gate.later(ARCHIVE_ROUTE, clock.seconds()) is None


def test_stop_puts_nothing_off_and_start_does_again():
    clock, meter, gate = busy_gate()
    meter.tick(1000)
    assert gate.later(ARCHIVE_ROUTE, clock.seconds()) is not None
    gate.stop()
    assert gate.later(ARCHIVE_ROUTE, clock.seconds()) is None
    assert clock.getDelayedCalls() == []  # no look at the rate left behind
    gate.start()
    assert gate.later(ARCHIVE_ROUTE, clock.seconds()) is not None


CONFIG = (
    b'[hub]\nhostname="h.example"\noutbound="smtp:smarthost:25"\n'
    b'[archive]\nplugin="memory"\nyield_above=20\nmax_lag=30\n'
    b'[nodes.dallas]\nsmtp="tcp:0"\n'
    b'[domains."example.com"]\nroute="smtp:mail.example.com:25"\n'
)


def archiving_node() -> tuple[Clock, MemorySpoolStore, Any, ScriptedTransport, Node]:
    """A started node of ``CONFIG`` with a memory archive; its route's transport scripted."""
    clock = Clock()
    clock.advance(1_000_000)
    store = MemorySpoolStore(clock)
    archive = load_plugin("mailhub.archives", "memory").make({}, clock)
    transport = ScriptedTransport()
    node = Node(
        "dallas", parse(CONFIG), store, StandardPolicy(nodes=("dallas",), jitter=0.0), clock, archive=archive
    )
    node._transports[ROUTE] = transport
    node.engine.startService()
    return clock, store, archive, transport, node


def test_a_node_delivers_a_burst_at_once_and_archives_it_after():
    clock, store, archive, transport, node = archiving_node()

    def archived() -> int:
        return len(archive.search(ArchiveScope(mailbox=ALICE), ArchiveQuery(), None, 100).result.items)

    ids: list[str] = []
    for i in range(40):
        message = f"Subject: burst {i}\r\nMessage-ID: <b{i}@outside.example>\r\n\r\nbody\r\n".encode()
        node.receive(Envelope(OUTSIDE, [ALICE], received_at=clock.seconds()), message).addCallback(ids.append)
    assert len(ids) == 40  # every 250 given
    assert len(transport.deliveries) == 40  # relayed at once
    routes = store.counts().result["routes"]
    assert routes == {ARCHIVE_ROUTE: 40 - archived()}  # the archive's copies wait in the spool...
    gate = node.archive_gate
    assert gate is not None and gate.yielding
    assert gate.put_off > 0  # ...put off, not leased: nothing of the batch waits for the archive
    assert node.engine.in_flight == 0
    [put_off] = [e for e in store.entries().result if e.route == ARCHIVE_ROUTE][:1]
    assert put_off.next_attempt == put_off.created + 30  # max_lag
    assert [a.replies[0][1].code for a in store.attempts(put_off.id).result] == [451]

    assert archived() < 40
    clock.advance(1.5)  # the burst is over: the put-off entries are due at once, not after max_lag
    for _ in range(20):
        clock.advance(0.25)
    assert archived() == 40
    assert store.counts().result["routes"] == {}
    assert not gate.yielding and gate.put_off == 0


def test_the_settings_are_checked():
    base = CONFIG.replace(b"yield_above=20\nmax_lag=30\n", b"")
    assert parse(base).archive_yield() == (50.0, 120.0)
    short = base + b"[delivery]\nlease_seconds = 60\n"
    # A put-off entry is deferred, not leased: its lag owes the lease nothing.
    assert parse(short.replace(b'plugin="memory"\n', b'plugin="memory"\nmax_lag=300\n')).archive_yield() == (50.0, 300.0)
    with pytest.raises(ConfigError, match=r"archive\.yield_above: must be 0"):
        parse(base.replace(b'plugin="memory"\n', b'plugin="memory"\nyield_above=-1\n'))
    with pytest.raises(ConfigError, match=r"archive\.max_lag: must be greater than 0"):
        parse(base.replace(b'plugin="memory"\n', b'plugin="memory"\nmax_lag=0\n'))


def test_the_meter_counts_mail_accepted_and_delivered_not_the_archive():
    clock, store, _, _, node = archiving_node()
    for i in range(3):
        node.receive(Envelope(OUTSIDE, [ALICE], received_at=clock.seconds()), b"Subject: %d\r\n\r\nbody\r\n" % i)
    assert store.counts().result["routes"] == {}  # relayed and archived
    assert node.archive_gate is not None
    assert node.archive_gate.meter.rate() == 6  # 3 accepted, 3 delivered; the 3 archived count for nothing


class FlushCountingStore(MemorySpoolStore):
    def __init__(self, clock):
        super().__init__(clock)
        self.flushes: list[str | None] = []

    def flush(self, route, now):
        self.flushes.append(route)
        return super().flush(route, now)


def test_two_nodes_sharing_a_gate_take_up_the_put_off_entries_with_one_flush():
    clock = Clock()
    clock.advance(1_000_000)
    config = parse(CONFIG.replace(b'[nodes.dallas]\nsmtp="tcp:0"\n', b'[nodes.dallas]\nsmtp="tcp:0"\n[nodes.losangeles]\nsmtp="tcp:0"\n'))
    store = FlushCountingStore(clock)
    archive = load_plugin("mailhub.archives", "memory").make({}, clock)
    gate = ArchiveGate(MailMeter(clock), clock, *config.archive_yield(), store=store)
    policy = StandardPolicy(nodes=("dallas", "losangeles"), jitter=0.0)
    nodes = [
        Node(name, config, store, policy, clock, archive=archive, archive_gate=gate) for name in ("dallas", "losangeles")
    ]
    for node in nodes:
        node._transports[ROUTE] = ScriptedTransport()
        node.engine.startService()
    for i in range(40):
        nodes[i % 2].receive(Envelope(OUTSIDE, [ALICE], received_at=clock.seconds()), b"Subject: %d\r\n\r\nx\r\n" % i)
    assert gate.yielding and store.counts().result["routes"].get(ARCHIVE_ROUTE)
    for _ in range(12):
        clock.advance(0.25)
    assert store.flushes == [ARCHIVE_ROUTE]  # once for the process, not once per node
    assert store.counts().result["routes"] == {}
    assert len(archive.search(ArchiveScope(mailbox=ALICE), ArchiveQuery(), None, 100).result.items) == 40

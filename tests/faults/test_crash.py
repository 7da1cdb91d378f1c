"""
A hub killed with ``kill -9`` loses nothing it acknowledged, and a restarted
node takes back at once what its dead process held (``ILeaseReclaim``)
instead of waiting ``lease_seconds`` for its leases to expire.

First the node's start-up over the ``memory`` store and a ``Clock``, then the
embedded default (both nodes in one ``twistd mailhub`` process over one
SQLite spool) killed while it delivers to a slow server and accepts more
mail, and started again.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from faults.tally import Load, Tally
from hubprocess import HubProcess, eventually, free_port, hub_config, message, send
from mailhub.config import parse
from mailhub.model import Address, Envelope, Lease
from mailhub.node import Node
from mailhub.plugins.memory_store import MemorySpoolStore
from mailhub.plugins.standard_policy import StandardPolicy
from mailhub.testing.downstream import DownstreamServer
from mailhub.testing.fakes import ScriptedTransport

ROUTE = "smtp:mail.example.com:25"
CONFIG = (
    b'[hub]\nhostname = "mx.hub.example"\noutbound = "smtp:smarthost:25"\n'
    b"[delivery]\nlease_seconds = 600\ntakeover_seconds = 300\n"
    b'[nodes.dallas]\nsmtp = "tcp:0"\n[nodes.losangeles]\nsmtp = "tcp:0"\n'
    b'[domains."example.com"]\nroute = "smtp:mail.example.com:25"\n'
)
ALICE = Address("alice", "example.com")
SENDER = Address("someone", "outside.example")


def dead_process_leases(store: MemorySpoolStore, clock: Clock, node: str) -> list[Lease]:
    """What a process running ``node`` held when it was killed: an accepted message, leased."""
    store.reclaim(node, "dead", clock.seconds())
    envelope = Envelope(SENDER, (ALICE,), received_at=clock.seconds())
    leases: list[Lease] = []
    store.enqueue_leased(envelope, b"Subject: x\r\n\r\nx\r\n", {ROUTE: [ALICE]}, node, 600).addCallback(
        leases.extend
    )
    return leases


def started_node(store: MemorySpoolStore, clock: Clock, transport: ScriptedTransport) -> Node:
    """Dallas, started with its engine and heartbeat (no SMTP listener: a ``Clock`` has no sockets)."""
    policy = StandardPolicy(nodes=("dallas", "losangeles"), jitter=0.0)
    node = Node("dallas", parse(CONFIG, "hub.toml"), store, policy, clock)
    node._transports[ROUTE] = transport
    node.removeService(node.getServiceNamed("smtp"))
    node.startService()
    return node


def test_started_node_delivers_its_dead_process_entries_at_once() -> None:
    """
    Dallas's earlier process held a lease for 600 s; the new one takes it
    back at start and delivers at once.  Los Angeles's lease is untouched.
    One line says how many entries were taken back.
    """
    clock = Clock()
    clock.advance(1_000_000)
    store = MemorySpoolStore(clock)
    [ours] = dead_process_leases(store, clock, "dallas")
    [theirs] = dead_process_leases(store, clock, "losangeles")
    clock.advance(5)
    transport = ScriptedTransport()
    with capturedLogs() as events:
        node = started_node(store, clock, transport)
        clock.advance(0)
    assert [entry.id for entry, _ in transport.deliveries] == [ours.entry.id]
    assert store.get(ours.entry.id).result is None  # delivered: gone from the spool
    kept = store.get(theirs.entry.id).result
    assert kept is not None and kept.next_attempt == theirs.expires
    lines = [formatEvent(e) for e in events if "took back" in formatEvent(e)]
    assert lines == [
        f"node dallas started (incarnation {node.incarnation}): took back 1 entries"
        " leased by its earlier run"
    ]
    node.stopService()


def test_heartbeat_names_the_incarnation() -> None:
    """``mailhub nodes`` can tell one start of a node from the next."""
    clock = Clock()
    store = MemorySpoolStore(clock)
    node = started_node(store, clock, ScriptedTransport())
    first = node.incarnation
    [listed] = store.nodes(0).result
    assert listed["info"]["incarnation"] == first
    node.stopService()
    node.startService()
    assert node.incarnation not in ("", first)
    node.stopService()


def test_a_store_that_cannot_be_reached_at_start_is_asked_again() -> None:
    """The start-up reclaim is retried every 5 s until the store answers, then delivers."""
    clock = Clock()
    store = MemorySpoolStore(clock)
    [ours] = dead_process_leases(store, clock, "dallas")
    store.unavailable = True
    transport = ScriptedTransport()
    with capturedLogs() as events:
        node = started_node(store, clock, transport)
        clock.advance(4.9)
        store.unavailable = False
        assert transport.deliveries == []
        clock.advance(0.1)
    assert [entry.id for entry, _ in transport.deliveries] == [ours.entry.id]
    texts = [formatEvent(e) for e in events]
    assert any("could not take back" in t and "trying again in 5 s" in t for t in texts)
    assert any("took back 1 entries" in t for t in texts)
    node.stopService()


# -- the embedded default, killed --------------------------------------------

#: Seconds the downstream server takes to answer each message (after it has
#: stored it): deliveries are in flight when the hub is killed.
SLOW = 2.0
_MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)@outside\.example>\r$", re.MULTILINE | re.IGNORECASE)


def delivered_ids(downstream: DownstreamServer) -> Counter[str]:
    """How many times the downstream server received each message, by Message-ID."""
    found: Counter[str] = Counter()
    for m in downstream.messages:
        ids = _MESSAGE_ID.findall(m.message)
        assert len(ids) == 1, m.message[:500]
        found[ids[0].decode()] += 1
    return found


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_kill_9_while_delivering_and_accepting_loses_nothing(
    tmp_path: Path, downstream: DownstreamServer
) -> None:
    """
    The embedded default is killed (both nodes at once: no other node can
    take over) while deliveries to a slow server are in flight and a client
    is sending more.  Started again, it delivers every acknowledged message
    within seconds, far below ``lease_seconds`` (600); only messages the
    server had stored but not yet answered when the hub died come twice.
    """
    ports = {"dallas": free_port(), "losangeles": free_port()}
    text = hub_config(
        tmp_path / "spool.db",
        downstream.port,
        ports,
        delivery="[delivery]\nlease_seconds = 600\ntakeover_seconds = 300\nmax_scan_interval = 60\n",
        extra="[smtp]\nmax_messages_per_minute_per_ip = 100000\nmax_connections_per_ip = 100\n",
    )
    hub = HubProcess(tmp_path, text)
    downstream.delay = SLOW
    hub.start()
    try:
        for port in ports.values():
            await hub.started(port)
        sent: list[str] = []
        acknowledged: set[str] = set()

        async def one(tag: str, port: int) -> bool:
            sent.append(tag)
            code, _ = await send(port, message(tag))
            if code == 250:
                acknowledged.add(tag)
            return code == 250

        # A first batch, all acknowledged; the server stores the first
        # messages at once and answers each only SLOW seconds later.
        first = [f"before-{i}" for i in range(12)]
        await _all([one(tag, list(ports.values())[i % 2]) for i, tag in enumerate(first)])
        assert acknowledged == set(first)
        await eventually(lambda: len(downstream.messages) >= 2, timeout=10, what="deliveries in flight")

        # A client keeps sending while the hub is killed.
        sending = True

        async def keep_sending() -> None:
            i = 0
            while sending and await one(f"during-{i}", ports["dallas"]):
                i += 1

        sender = ensureDeferred(keep_sending())
        await eventually(lambda: len(sent) > len(first) + 2, timeout=10, what="sending during the kill")
        await hub.stop(signal.SIGKILL)
        killed_at = reactor.seconds()
        sending = False
        await sender
        in_flight = {
            tag
            for m in downstream.messages
            if killed_at - m.received_at < SLOW + 1.0
            for tag in [_MESSAGE_ID.findall(m.message)[0].decode()]
        }
        before = delivered_ids(downstream)
        assert set(before) < acknowledged, "the kill came too late: everything was delivered"

        downstream.delay = 0.0
        hub.start()
        restarted = time.monotonic()
        for port in ports.values():
            await hub.started(port)
        await eventually(
            lambda: acknowledged <= set(delivered_ids(downstream)), timeout=15, what="every acknowledged message"
        )
        recovered = time.monotonic() - restarted
    finally:
        await hub.stop(signal.SIGTERM)
    delivered = delivered_ids(downstream)
    duplicates = {tag for tag, n in delivered.items() if n > 1}
    Tally(sent, acknowledged).report(
        "kill -9 while delivering (server 2 s slow) and accepting", downstream.messages, recovered,
        note=f"{len(in_flight)} in flight at the kill; {len(set(delivered) - acknowledged)} delivered not acknowledged",
    )
    assert acknowledged <= set(delivered)
    assert set(delivered) <= set(sent)
    assert duplicates <= in_flight and max(delivered.values()) <= 2
    assert recovered < 15 < 600
    log = hub.log_path.read_text()
    taken = [int(n) for n in re.findall(r"took back (\d+) entries", log)]
    # Four lines: each node's first start (nothing to take), then the restart.
    assert len(taken) == 4 and taken[:2] == [0, 0] and sum(taken[2:]) > 0


async def _all(calls: list[Any]) -> None:
    await gatherResults([ensureDeferred(c) for c in calls])


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_kill_9_in_a_burst_of_accepts_loses_nothing_acknowledged(
    tmp_path: Path, downstream: DownstreamServer, slow: bool
) -> None:
    """
    Eight clients (ten with ``--slow``, and ten times the messages) send to
    both nodes as fast as they can; the hub is killed in the middle of their group commits.  Every
    ``250`` given is delivered after the restart; a transaction cut off by
    the kill may or may not have been spooled (the client keeps it and sends
    again), and a message is delivered twice only if the server had it
    before the kill.
    """
    ports = {"dallas": free_port(), "losangeles": free_port()}
    text = hub_config(
        tmp_path / "spool.db", downstream.port, ports,
        delivery="[delivery]\nlease_seconds = 600\ntakeover_seconds = 300\nmax_scan_interval = 60\n",
        extra="[smtp]\nmax_messages_per_minute_per_ip = 1000000\nmax_connections_per_ip = 100\n",
    )
    hub = HubProcess(tmp_path, text)
    downstream.delay = 0.2
    tally = Tally()
    hub.start()
    try:
        for port in ports.values():
            await hub.started(port)
        load = Load(tally, list(ports.values()), workers=10 if slow else 8, prefix="burst")
        await eventually(lambda: len(tally.acknowledged) >= (400 if slow else 30), timeout=60,
                         what="a burst under way")
        await hub.stop(signal.SIGKILL)
        killed_at = reactor.seconds()
        await load.stop()
        before = Tally.delivered(m for m in downstream.messages if m.received_at <= killed_at)
        assert tally.acknowledged - set(before), "the kill came too late: everything was delivered"
        downstream.delay = 0.0
        hub.start()
        restarted = time.monotonic()
        for port in ports.values():
            await hub.started(port)
        await eventually(lambda: tally.acknowledged <= set(Tally.delivered(downstream.messages)),
                         timeout=30, what="every acknowledged message")
        recovered = time.monotonic() - restarted
    finally:
        await hub.stop(signal.SIGTERM)
    delivered = Tally.delivered(downstream.messages)
    duplicates = {tag for tag, n in delivered.items() if n > 1}
    cut_off = {tag for tag, code in tally.refused.items() if code == 0}
    tally.report("kill -9 in a burst of accepts", downstream.messages, recovered,
                 note=f"{len(cut_off)} transactions cut off by the kill")
    assert tally.lost(downstream.messages) == set()
    # Only what was acknowledged, or cut off mid-transaction, can reach the server.
    assert set(delivered) <= tally.acknowledged | cut_off
    assert duplicates <= set(before) and max(delivered.values()) <= 2
    assert recovered < 30 < 600

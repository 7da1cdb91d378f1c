"""
The clocks of the two sites are 30 s apart: Dallas's and Los Angeles's
nodes, each with its own ``Clock`` (Los Angeles 30 s ahead), over one spool
store.  A lease runs on the clock of the node that took it, and takeovers
on the clock of the node that takes over, so a skew smaller than the margins
(``lease_seconds`` 600, ``takeover_seconds`` 300) changes when things happen
by at most the skew and never who does them.

Deterministic: the ``memory`` store, ``Clock``s advanced together one
second at a time, ``ScriptedTransport``s that record the moment of each
attempt.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mailhub.config import parse
from mailhub.model import Address, Entry, Envelope, Reply
from mailhub.node import Node
from mailhub.plugins.memory_store import MemorySpoolStore
from mailhub.plugins.standard_policy import StandardPolicy
from mailhub.testing.fakes import ScriptedTransport

SKEW = 30.0
LEASE = 600.0
TAKEOVER = 300.0
#: The standard policy's interval with two nodes: 20 minutes / 2.
RETRY = 600.0
ROUTE = "smtp:mail.example.com:25"
CONFIG = (
    b'[hub]\nhostname = "mx.hub.example"\noutbound = "smtp:smarthost:25"\n'
    b"[delivery]\nlease_seconds = 600\ntakeover_seconds = 300\nmax_scan_interval = 1\n"
    b'[nodes.dallas]\nsmtp = "tcp:0"\n[nodes.losangeles]\nsmtp = "tcp:0"\n'
    b'[domains."example.com"]\nroute = "smtp:mail.example.com:25"\n'
)
OTHER = {"dallas": "losangeles", "losangeles": "dallas"}


class Sites:
    """Two started nodes over one store; ``real`` is the seconds since the start, as a wall would show."""

    def __init__(self) -> None:
        start = 1_000_000.0
        self.clocks = {"dallas": Clock(), "losangeles": Clock()}
        self.clocks["dallas"].advance(start)
        self.clocks["losangeles"].advance(start + SKEW)
        self.real = 0.0
        self.store = MemorySpoolStore(self.clocks["dallas"])
        #: What each node's transport answers next: a ``Reply`` or a ``Deferred`` (in flight).
        self.answer: dict[str, Reply | Deferred[Reply]] = {n: Reply(250, "2.0.0", "OK") for n in OTHER}
        self.attempts: list[tuple[str, float]] = []
        self.nodes = {name: self._node(name) for name in OTHER}

    def _node(self, name: str) -> Node:
        def script(entry: Entry, message: bytes) -> Reply | Deferred[Reply]:
            self.attempts.append((name, self.real))
            return self.answer[name]

        policy = StandardPolicy(nodes=("dallas", "losangeles"), jitter=0.0)
        node = Node(name, parse(CONFIG, "hub.toml"), self.store, policy, self.clocks[name])
        node._transports[ROUTE] = ScriptedTransport(script)
        node.removeService(node.getServiceNamed("smtp"))
        node.startService()
        return node

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds)):
            self.real += 1
            for clock in self.clocks.values():
                clock.advance(1)

    def receive(self, name: str) -> None:
        """A message for alice@example.com accepted by ``name``: spooled leased to it, first attempt at once."""
        clock = self.clocks[name]
        envelope = Envelope(Address("someone", "outside.example"), (Address("alice", "example.com"),),
                            received_at=clock.seconds())
        self.nodes[name].receive(envelope, b"Subject: skew\r\n\r\nskew\r\n")
        for c in self.clocks.values():
            c.advance(0)

    def spooled(self) -> int:
        return int(self.store.counts().result["entries"])

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.running:
                node.stopService()


@pytest.fixture
def sites() -> Iterator[Sites]:
    s = Sites()
    yield s
    s.stop()


@pytest.mark.parametrize("holder", ["dallas", "losangeles"])
def test_a_lease_holds_until_it_expires_on_the_clock_of_the_node_that_takes_it(
    sites: Sites, holder: str
) -> None:
    """
    The holder's attempt hangs.  The other node leaves the entry alone until
    the lease's expiry passes on its own clock (30 s early when it is ahead,
    30 s late when it is behind); the holder itself tries again at the
    expiry on its clock.  Whichever comes first makes the second attempt,
    and nobody earlier.  The holder's late ``250`` then changes nothing.
    """
    other = OTHER[holder]
    expires_for_other = LEASE - SKEW if other == "losangeles" else LEASE + SKEW
    second_at, second_by = min((expires_for_other, other), (LEASE, holder))
    in_flight: Deferred[Reply] = Deferred()
    sites.answer[holder] = in_flight
    sites.receive(holder)
    sites.answer[holder] = Reply(250, "2.0.0", "OK")
    assert sites.attempts == [(holder, 0.0)]
    sites.advance(second_at - 1)
    assert sites.attempts == [(holder, 0.0)], "tried again before the lease expired"
    sites.advance(2)
    assert sites.attempts == [(holder, 0.0), (second_by, second_at)]
    assert sites.spooled() == 0
    # Its lease token is no longer the entry's: the late reply is not recorded.
    in_flight.callback(Reply(250, "2.0.0", "late"))
    sites.advance(LEASE)
    assert len(sites.attempts) == 2 and sites.spooled() == 0


@pytest.mark.parametrize("first", ["dallas", "losangeles"])
def test_a_holder_that_answers_in_time_is_never_doubled(sites: Sites, first: str) -> None:
    """An attempt that ends ``SKEW`` s before ``lease_seconds`` is the only one, whichever clock is ahead."""
    in_flight: Deferred[Reply] = Deferred()
    sites.answer[first] = in_flight
    sites.receive(first)
    sites.advance(LEASE - SKEW - 1)
    in_flight.callback(Reply(250, "2.0.0", "OK"))
    sites.advance(2 * LEASE)
    assert sites.attempts == [(first, 0.0)]
    assert sites.spooled() == 0


@pytest.mark.parametrize("first", ["dallas", "losangeles"])
def test_a_deferral_goes_to_the_other_node_within_the_skew_of_its_time(sites: Sites, first: str) -> None:
    """
    ``451`` on the first node gives the next attempt to the other one, at
    the policy's interval measured on the first node's clock: the other
    node makes it up to ``SKEW`` s earlier or later, and the first node
    never takes it over (``takeover_seconds`` is ten times the skew).
    """
    other = OTHER[first]
    sites.answer[first] = Reply(451, "4.3.0", "try later")
    sites.receive(first)
    sites.advance(RETRY + SKEW + TAKEOVER + 10)
    assert [name for name, _ in sites.attempts] == [first, other]
    expected = RETRY - SKEW if other == "losangeles" else RETRY + SKEW
    assert sites.attempts[1][1] == pytest.approx(expected, abs=1.5)
    assert sites.spooled() == 0


@pytest.mark.parametrize("survivor", ["dallas", "losangeles"])
def test_a_survivor_takes_over_after_takeover_seconds_on_its_own_clock(sites: Sites, survivor: str) -> None:
    """
    The other node is down: the entry the survivor deferred to it is taken
    back by the survivor ``takeover_seconds`` after its due time, both on
    the survivor's clock, so the skew does not move it.
    """
    other = OTHER[survivor]
    sites.nodes[other].stopService()
    sites.answer[survivor] = Reply(451, "4.3.0", "try later")
    sites.receive(survivor)
    sites.advance(RETRY + TAKEOVER - 2)
    assert sites.attempts == [(survivor, 0.0)]
    sites.answer[survivor] = Reply(250, "2.0.0", "OK")
    sites.advance(4)
    assert sites.attempts == [(survivor, 0.0), (survivor, pytest.approx(RETRY + TAKEOVER, abs=1.5))]
    assert sites.spooled() == 0

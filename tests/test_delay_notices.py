"""
Delay notices (``mailhub.delivery.delay``): one RFC 3464 "delayed" DSN to the
sender after ``warn_after``, once per entry whatever node or restart tries it
next, none for a domain that turned them off.  A node over the memory store,
a scripted transport and a Clock.
"""

from __future__ import annotations

import email
from email.message import Message
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailhub.config import ConfigError, parse
from mailhub.delivery.dsn import build_delay_dsn
from mailhub.model import Action, Address, Entry, Envelope, Outcome, Recipient, Reply
from mailhub.node import Node
from mailhub.plugins.memory_store import MemorySpoolStore
from mailhub.plugins.standard_policy import StandardPolicy
from mailhub.testing.fakes import ScriptedTransport

ROUTE = "smtp:mail.example.com:25"
OUTBOUND = "smtp:smarthost:25"
SENDER = Address("sender", "outside.example")
ALICE = Address("alice", "example.com")
CAROL = Address("carol", "quiet.example")
MESSAGE = b"Subject: the quarterly figures\r\nMessage-ID: <q3@outside.example>\r\n\r\nhello\r\n"
TEMP = Reply(451, "4.3.0", "try later")
REFUSED = Reply(421, "4.4.1", "connection refused")
OK = Reply(250, "2.0.0", "OK")
HOUR = 3600.0

BASE = (
    '[hub]\nhostname = "mx.hub.example"\noutbound = "smtp:smarthost:25"\n'
    '[nodes.dallas]\nsmtp = "tcp:0"\n[nodes.losangeles]\nsmtp = "tcp:0"\n'
    '[domains."example.com"]\nroute = "smtp:mail.example.com:25"\n'
)


class Hub:
    """One node at a time over one memory store and one clock; the route's server defers."""

    def __init__(self, extra: str = "", reply: Reply = TEMP) -> None:
        self.config = parse((BASE + extra).encode(), "hub.toml")
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = MemorySpoolStore(self.clock)
        self.reply = reply
        self.transport = ScriptedTransport(lambda e, m: OK if e.route == OUTBOUND else self.reply)
        self.node: Node | None = None
        self.start("dallas")

    def start(self, name: str) -> Node:
        if self.node is not None:
            self.node.engine.stopService()
        policy = StandardPolicy(nodes=tuple(self.config.nodes), jitter=0.0)
        node = Node(name, self.config, self.store, policy, self.clock)
        node._transports = {r: self.transport for r in (ROUTE, "smtp:mail.quiet.example:25", OUTBOUND)}
        node.engine.startService()
        self.node = node
        return node

    def send(self, sender: Address | None = SENDER, recipients: tuple[Address, ...] = (ALICE,)) -> str:
        ids: list[str] = []
        assert self.node is not None
        envelope = Envelope(sender, recipients, received_at=self.clock.seconds())
        self.node.receive(envelope, MESSAGE).addCallback(ids.append)
        assert ids, "not spooled"
        return ids[0]

    def notices(self) -> list[tuple[Entry, Message]]:
        """The delay notices the outbound route was given, parsed."""
        return [
            (e, email.message_from_bytes(m))
            for e, m in self.transport.deliveries
            if e.route == OUTBOUND and b"Action: delayed" in m
        ]

    def entry(self, entry_id: str) -> Entry | None:
        found: list[Entry | None] = []
        self.store.get(entry_id).addCallback(found.append)
        return found[0]

    def advance(self, seconds: float, step: float = 60.0) -> None:
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step


def test_one_delay_notice_after_four_hours_then_none() -> None:
    hub = Hub()
    entry_id = hub.send()
    hub.advance(4 * HOUR - 120)
    assert hub.notices() == []
    hub.advance(3 * HOUR)
    [(entry, notice)] = hub.notices()
    assert entry.sender is None and entry.pending == (SENDER,)
    assert notice["Subject"] == "Delivery Status Notification (Delay)"
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    assert hub.entry(entry_id).delay_notified  # type: ignore[union-attr]
    # Still deferred 12 hours on: no second notice.
    hub.advance(12 * HOUR)
    assert len(hub.notices()) == 1
    assert hub.entry(entry_id) is not None


def test_the_notice_says_delayed_with_the_last_reply_and_when_the_hub_gives_up() -> None:
    hub = Hub()
    hub.send()
    accepted = hub.clock.seconds()
    hub.advance(5 * HOUR)
    [(_, notice)] = hub.notices()
    parts = list(notice.walk())
    text = parts[1].get_payload(decode=True).decode()
    assert "has not yet been delivered" in text and "<alice@example.com>: 451 4.3.0 try later" in text
    status = parts[2].get_payload()
    fields = {k: v for block in status for k, v in block.items()}
    assert fields["Action"] == "delayed"
    assert fields["Status"] == "4.3.0"
    assert fields["Final-Recipient"] == "rfc822; alice@example.com"
    assert fields["Will-Retry-Until"] == email.utils.format_datetime(
        email.utils.datetime.datetime.fromtimestamp(accepted + 7 * 86400, email.utils.datetime.UTC)
    )
    # The original's header block goes back, last.
    assert b"Subject: the quarterly figures" in notice.as_bytes().split(b"text/rfc822-headers", 1)[1]


def test_another_node_or_a_restart_does_not_send_it_again() -> None:
    hub = Hub()
    entry_id = hub.send()
    hub.advance(4 * HOUR + 30 * 60)
    assert len(hub.notices()) == 1
    # The other site takes over (a new node over the same spool), then a restart of dallas.
    hub.start("losangeles")
    hub.advance(3 * HOUR)
    hub.start("dallas")
    hub.advance(3 * HOUR)
    assert len(hub.notices()) == 1
    assert len(hub.store._attempts[entry_id]) > 20  # tried all along


def test_a_route_that_is_down_still_gets_its_senders_told() -> None:
    """Attempts deferred without connecting (route down) send the notice too, once."""
    hub = Hub(reply=REFUSED)
    for _ in range(3):
        hub.send()
    hub.advance(4 * HOUR + 20 * 60)
    assert len(hub.notices()) == 3
    hub.advance(4 * HOUR)
    assert len(hub.notices()) == 3


def test_warn_after_is_hub_wide_and_per_domain() -> None:
    hub = Hub(
        "[delivery]\nwarn_after = 3600\n"
        '[domains."quiet.example"]\nroute = "smtp:mail.quiet.example:25"\nwarn_after = false\n'
    )
    loud = hub.send(recipients=(ALICE,))
    quiet = hub.send(recipients=(CAROL,))
    hub.advance(HOUR + 20 * 60)
    assert [e.pending for e, _ in hub.notices()] == [(SENDER,)]
    hub.advance(24 * HOUR)
    assert len(hub.notices()) == 1
    assert hub.entry(loud).delay_notified and not hub.entry(quiet).delay_notified  # type: ignore[union-attr]


def test_warn_after_zero_turns_them_off_and_null_senders_never_get_one() -> None:
    hub = Hub("[delivery]\nwarn_after = 0\n")
    hub.send()
    hub.advance(10 * HOUR)
    assert hub.notices() == []
    hub = Hub()
    hub.send(sender=None)
    hub.advance(10 * HOUR)
    assert hub.notices() == []


@pytest.mark.parametrize("value", ["-1", "true", '"4h"'])
@pytest.mark.parametrize("table", ["[delivery]", '[domains."example.com"]\nroute = "smtp:mail.example.com:25"'])
def test_a_bad_warn_after_is_refused_naming_the_key(table: str, value: str) -> None:
    text = BASE.replace('[domains."example.com"]\nroute = "smtp:mail.example.com:25"\n', "")
    with pytest.raises(ConfigError) as raised:
        parse(f"{text}{table}\nwarn_after = {value}\n".encode(), "hub.toml")
    key = "delivery.warn_after" if table == "[delivery]" else 'domains."example.com".warn_after'
    assert f"hub.toml: {key}: must be a number of seconds" in str(raised.value)


def test_the_default_is_four_hours() -> None:
    assert parse(BASE.encode()).delivery.warn_after == 4 * HOUR


def test_no_delay_dsn_for_the_null_sender_or_nobody() -> None:
    entry = Entry("e1", "m1", ROUTE, None, (Recipient(ALICE),), created=0.0)
    outcome = Outcome(ALICE, Action.RETRY, TEMP)
    assert build_delay_dsn("mx.hub.example", entry, [outcome], MESSAGE, 5 * HOUR, None) is None
    entry = Entry("e1", "m1", ROUTE, SENDER, (Recipient(ALICE),), created=0.0)
    assert build_delay_dsn("mx.hub.example", entry, [], MESSAGE, 5 * HOUR, None) is None
    found: Any = build_delay_dsn("mx.hub.example", entry, [outcome], MESSAGE, 5 * HOUR, None)
    assert found[0].sender is None and b"Will-Retry-Until" not in found[1]


@pytest.mark.parametrize(("waited", "said"), [
    (68.0, "after 1 minute."),
    (45 * 60.0, "after 45 minutes."),
    (4 * HOUR + 100, "after 4 hours."),
    (3 * 86400.0, "after 3 days."),
])
def test_a_delay_notice_says_how_long_in_words_that_fit(waited: float, said: str) -> None:
    entry = Entry("e1", "m1", ROUTE, SENDER, (Recipient(ALICE),), created=0.0)
    found: Any = build_delay_dsn("mx.hub.example", entry, [Outcome(ALICE, Action.RETRY, TEMP)], MESSAGE, waited, None)
    text = found[1].decode()
    assert "has not yet been delivered to the recipients below " + said in text.replace("\r\n", " ")
    assert "hour(s)" not in text


def test_a_held_message_is_owed_its_notice_too() -> None:
    """A recipient held (a server rejecting everything) waits like a deferred one: its sender is told."""
    from mailhub.delivery.delay import DelayNotices
    from mailhub.model import Decision

    notices = DelayNotices("mx.hub.example", lambda domain: 4 * HOUR, None, lambda envelope, data: None)  # type: ignore[arg-type,return-value]
    entry = Entry("e1", "m1", ROUTE, SENDER, (Recipient(ALICE),), created=0.0)
    held = Decision((Outcome(ALICE, Action.HOLD, Reply(550, "5.1.1", "User unknown")),))
    assert notices.due(entry, held, 3 * HOUR) == []
    assert notices.due(entry, held, 5 * HOUR) == list(held.outcomes)
    failed = Decision((Outcome(ALICE, Action.FAILED, Reply(550, "5.1.1", "User unknown")),))
    assert notices.due(entry, failed, 5 * HOUR) == []  # a bounce says it instead

"""
Tests for the ``smtp`` transport plugin: against the real ``DownstreamServer``
on 127.0.0.1 for behaviour, and against ``StringTransport`` with a ``Clock``
for timeouts and the exact order of what goes on the wire.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import capturedLogs, formatEvent
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError
from zope.interface.verify import verifyObject

from mailhub.config import parse
from mailhub.interfaces import ITransport, ITransportPlugin
from mailhub.model import Address, CheckedMessage, Entry, Recipient, RecipientState, Reply
from mailhub.plugins.smtp import SMTPTransport, parse_target, plugin
from mailhub.smtp.client import parse_reply, wire_data
from mailhub.smtp.tls import generate_self_signed
from mailhub.testing.downstream import DownstreamServer

SENDER = "someone@outside.example"
MESSAGE = b"From: someone@outside.example\r\nSubject: test\r\n\r\nHello.\r\n"


def entry(*recipients: str, sender: str | None = SENDER, delivered: tuple[str, ...] = ()) -> Entry:
    return Entry(
        id="e1",
        message_id="m1",
        route="smtp:test",
        sender=Address.parse(sender) if sender else None,
        recipients=[Recipient(Address.parse(r)) for r in recipients]
        + [Recipient(Address.parse(r), RecipientState.DELIVERED) for r in delivered],
    )


def addr(text: str) -> Address:
    return Address.parse(text)


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def eventually(check: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
def transports():
    made: list[Any] = []
    yield made
    for t in made:
        pytest_twisted.blockon(t.close())


@pytest.fixture
def make(downstream, transports):
    """Builds the plugin's transport for the downstream server, through ``plugin.make``."""

    def make(**options: Any) -> Any:
        config = {"target": f"127.0.0.1:{downstream.port}", "hostname": "hub.test", **options}
        t = plugin.make(config, reactor)
        transports.append(t)
        return t

    return make


# Interfaces and configuration


def test_plugin_and_transport_provide_their_interfaces():
    assert verifyObject(ITransportPlugin, plugin)
    assert plugin.name == "smtp"
    assert verifyObject(
        ITransport, plugin.make({"target": "mail.example.com", "hostname": "hub.test"}, reactor)
    )


def test_targets():
    assert parse_target("mail.example.com") == ("mail.example.com", 25)
    assert parse_target("mail.example.com:2525") == ("mail.example.com", 2525)
    assert parse_target("[2001:db8::1]:26") == ("2001:db8::1", 26)
    assert parse_target("mx") is None


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"target": "host:port", "hostname": "h"}, "target"),
        ({"target": "host:99999", "hostname": "h"}, "target"),
        ({"target": "host"}, "hostname"),
        ({"target": "host", "hostname": "h", "command_timeout": 0}, "command_timeout"),
        ({"target": "host", "hostname": "h", "max_connections": "4"}, "max_connections"),
        ({"target": "host", "hostname": "h", "tls": "yes"}, "tls"),
        ({"target": "host", "hostname": "h", "tls_verify": "true"}, "tls_verify"),
        ({"target": "host", "hostname": "h", "tls": "none", "tls_verify": True}, "tls_verify"),
        ({"target": "host", "hostname": "h", "tls_verify": True, "tls_ca_file": 3}, "tls_ca_file"),
        ({"target": "host", "hostname": "h", "tls_ca_file": "ca.pem"}, "tls_ca_file"),
    ],
)
def test_bad_configuration_names_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        plugin.make(config, reactor)


# Wire format


def test_wire_data_stuffs_dots_and_ends_with_crlf_dot_crlf():
    assert wire_data(b".a\r\nb\r\n..c\r\n.\r\n") == b"..a\r\nb\r\n...c\r\n..\r\n.\r\n"
    assert wire_data(b"no final line end") == b"no final line end\r\n.\r\n"
    assert wire_data(b"") == b".\r\n"


def test_wire_data_trusts_what_the_server_found():
    """
    A ``CheckedMessage`` is not scanned again: without dot lines it goes as
    it is (even holding what a plain message would have stuffed: the server's
    word is taken), with them it is stuffed.
    """
    plain = b"Subject: t\r\n\r\nbody\r\n"
    assert wire_data(CheckedMessage.of(plain, dot_lines=False)) == plain + b".\r\n"
    lying = b"a\r\n.b\r\n"
    assert wire_data(CheckedMessage.of(lying, dot_lines=False)) == lying + b".\r\n"
    dotted = b".a\r\n.b\r\n"
    assert wire_data(CheckedMessage.of(dotted, dot_lines=True)) == b"..a\r\n..b\r\n.\r\n"
    assert wire_data(CheckedMessage.of(b"", dot_lines=False)) == b".\r\n"
    # Plain bytes are checked as before.
    assert wire_data(lying) == b"a\r\n..b\r\n.\r\n"


def test_wire_data_makes_bare_cr_and_lf_crlf():
    assert wire_data(b"a\nb\rc\r\n.d\n") == b"a\r\nb\r\nc\r\n..d\r\n.\r\n"


def test_parse_reply_takes_the_enhanced_code_of_a_multiline_reply():
    reply = parse_reply(
        550, [b"5.1.1 The account does not exist.", b"5.1.1 Please check", b"5.1.1 the address."]
    )
    assert reply == Reply(550, "5.1.1", "The account does not exist. Please check the address.")
    assert parse_reply(250, [b"OK"]) == Reply(250, "", "OK")
    # A class that does not match the code is text, not an enhanced code.
    assert parse_reply(451, [b"5.1.1 odd"]) == Reply(451, "", "5.1.1 odd")


# Against the real downstream server


@pytest_twisted.ensureDeferred
async def test_accepted_recipients_get_250_and_the_bytes_arrive_intact(downstream, make):
    message = b"Subject: t\r\n\r\n.leading dot\r\n..two dots\r\n\xe2\x82\xac 8-bit\r\n.\r\nend\r\n"
    replies = await make().deliver(entry("a@example.com", "b@example.com"), message)
    assert {a: (r.code, r.enhanced) for a, r in replies.items()} == {
        addr("a@example.com"): (250, "2.0.0"),
        addr("b@example.com"): (250, "2.0.0"),
    }
    [got] = downstream.messages
    assert got.message == message
    assert (got.sender, got.recipients) == (SENDER, ["a@example.com", "b@example.com"])
    assert got.helo == "hub.test"


@pytest_twisted.ensureDeferred
async def test_only_pending_recipients_are_tried(downstream, make):
    replies = await make().deliver(entry("a@example.com", delivered=("done@example.com",)), MESSAGE)
    assert list(replies) == [addr("a@example.com")]
    assert downstream.messages[0].recipients == ["a@example.com"]


@pytest_twisted.ensureDeferred
async def test_dot_stuffing_is_exact_on_the_wire(downstream, make):
    await make().deliver(entry("a@example.com"), b".first\r\n..second\r\n.\r\nmiddle\r\n.")
    assert downstream.messages[0].raw == b"..first\r\n...second\r\n..\r\nmiddle\r\n..\r\n.\r\n"


@pytest_twisted.ensureDeferred
async def test_message_without_final_crlf_gets_one(downstream, make):
    await make().deliver(entry("a@example.com"), b"Subject: t\r\n\r\nno line end")
    got = downstream.messages[0]
    assert got.raw == b"Subject: t\r\n\r\nno line end\r\n.\r\n"
    assert got.message == b"Subject: t\r\n\r\nno line end\r\n"


@pytest_twisted.ensureDeferred
async def test_bare_line_ends_never_reach_the_wire(downstream, make):
    await make().deliver(entry("a@example.com"), b"Subject: t\n\nbare lf\nbare cr\r.x\r\n")
    assert downstream.messages[0].raw == b"Subject: t\r\n\r\nbare lf\r\nbare cr\r\n..x\r\n.\r\n"


@pytest_twisted.ensureDeferred
async def test_8bit_message_says_body_8bitmime_and_size(downstream, make):
    t = make()
    await t.deliver(entry("a@example.com"), b"Subject: t\r\n\r\n\xc3\xa9\r\n")
    await t.deliver(entry("a@example.com"), MESSAGE)
    eight, seven = downstream.messages
    assert eight.mail_parameters == {"BODY": "8BITMIME", "SIZE": str(len(eight.raw))}
    assert seven.mail_parameters == {"SIZE": str(len(seven.raw))}


@pytest_twisted.ensureDeferred
async def test_null_sender_is_sent_as_empty_reverse_path(downstream, make):
    replies = await make().deliver(entry("a@example.com", sender=None), MESSAGE)
    assert replies[addr("a@example.com")].ok
    assert downstream.messages[0].sender == ""


@pytest_twisted.ensureDeferred
async def test_each_recipient_gets_its_own_reply(downstream, make):
    downstream.known_users = {"known@example.com"}
    downstream.recipient_replies = {"full@example.com": "452 4.2.2 Mailbox full"}
    replies = await make().deliver(
        entry("known@example.com", "nobody@example.com", "full@example.com"), MESSAGE
    )
    assert replies[addr("known@example.com")].code == 250
    assert (
        replies[addr("nobody@example.com")].code,
        replies[addr("nobody@example.com")].enhanced,
    ) == (550, "5.1.1")
    assert replies[addr("full@example.com")] == Reply(452, "4.2.2", "Mailbox full")
    assert downstream.messages[0].recipients == ["known@example.com"]


@pytest_twisted.ensureDeferred
async def test_no_message_when_every_recipient_is_refused(downstream, make):
    downstream.known_users = set()
    t = make()
    replies = await t.deliver(entry("a@example.com", "b@example.com"), MESSAGE)
    assert all(r.code == 550 for r in replies.values())
    assert downstream.messages == []
    # The connection stays usable.
    downstream.known_users = None
    assert (await t.deliver(entry("a@example.com"), MESSAGE))[addr("a@example.com")].ok
    assert downstream.connections == 1


@pytest_twisted.ensureDeferred
async def test_no_data_command_without_pipelining_when_every_recipient_is_refused(downstream, make):
    downstream.extensions = []
    downstream.known_users = set()
    replies = await make().deliver(entry("a@example.com"), MESSAGE)
    assert replies[addr("a@example.com")].code == 550
    assert [c.split(b" ")[0] for c in downstream.commands] == [b"EHLO", b"MAIL", b"RCPT"]


@pytest_twisted.ensureDeferred
async def test_tempfail_is_a_temporary_reply(downstream, make):
    downstream.mode = "tempfail"
    replies = await make().deliver(entry("a@example.com", "b@example.com"), MESSAGE)
    assert {(r.code, r.enhanced) for r in replies.values()} == {(451, "4.3.0")}
    assert all(r.temporary for r in replies.values())


@pytest_twisted.ensureDeferred
async def test_tempfail_after_data_is_a_temporary_reply(downstream, make):
    downstream.mode = "tempfail-data"
    replies = await make().deliver(entry("a@example.com"), MESSAGE)
    assert replies[addr("a@example.com")].code == 451
    assert downstream.messages == []


@pytest_twisted.ensureDeferred
async def test_reject_is_a_permanent_reply(downstream, make):
    downstream.mode = "reject"
    replies = await make().deliver(entry("a@example.com"), MESSAGE)
    reply = replies[addr("a@example.com")]
    assert (reply.code, reply.enhanced, reply.permanent) == (550, "5.1.1", True)
    assert "User unknown" in reply.text


@pytest_twisted.ensureDeferred
async def test_5xx_at_mail_is_the_reply_for_every_recipient(downstream, make):
    downstream.max_size = 10
    replies = await make().deliver(entry("a@example.com", "b@example.com"), MESSAGE)
    assert {(r.code, r.enhanced) for r in replies.values()} == {(552, "5.3.4")}


@pytest_twisted.ensureDeferred
async def test_dropped_connection_is_temporary(downstream, make):
    downstream.mode = "drop"
    replies = await make().deliver(entry("a@example.com", "b@example.com"), MESSAGE)
    assert {(r.code, r.enhanced) for r in replies.values()} == {(421, "4.4.2")}
    assert "lost" in replies[addr("a@example.com")].text


@pytest_twisted.ensureDeferred
async def test_connection_dropped_after_data_is_temporary(downstream, make):
    downstream.mode = "drop-data"
    replies = await make().deliver(entry("a@example.com"), MESSAGE)
    assert replies[addr("a@example.com")].temporary


@pytest_twisted.ensureDeferred
async def test_421_greeting_is_temporary(downstream, make):
    downstream.mode = "busy"
    replies = await make().deliver(entry("a@example.com"), MESSAGE)
    assert (replies[addr("a@example.com")].code, replies[addr("a@example.com")].enhanced) == (
        421,
        "4.3.2",
    )


@pytest_twisted.ensureDeferred
async def test_server_down_is_connection_refused(downstream, make):
    t = make()
    port = downstream.port
    await downstream.stop()
    replies = await t.deliver(entry("a@example.com"), MESSAGE)
    assert replies[addr("a@example.com")] == Reply(
        421, "4.4.1", f"Connection refused by 127.0.0.1:{port}"
    )
    await downstream.start(port=port)
    assert (await t.deliver(entry("a@example.com"), MESSAGE))[addr("a@example.com")].ok


@pytest_twisted.ensureDeferred
async def test_connection_is_reused_for_later_deliveries(downstream, make):
    t = make()
    for i in range(3):
        replies = await t.deliver(entry(f"u{i}@example.com"), MESSAGE)
        assert replies[addr(f"u{i}@example.com")].ok
    assert (downstream.connections, t.connections_made, len(downstream.messages)) == (1, 1, 3)
    assert downstream.commands.count(b"RSET") == 2


@pytest_twisted.ensureDeferred
async def test_connection_closed_by_the_server_while_idle_is_replaced(downstream, make):
    t = make()
    await t.deliver(entry("a@example.com"), MESSAGE)
    port = downstream.port
    await downstream.stop()
    await downstream.start(port=port)
    assert (await t.deliver(entry("a@example.com"), MESSAGE))[addr("a@example.com")].ok
    assert downstream.connections == 2


@pytest_twisted.ensureDeferred
async def test_per_connection_message_limit_moves_to_a_new_connection(downstream, make):
    downstream.max_messages_per_connection = 2
    t = make()
    for i in range(5):
        assert (await t.deliver(entry("a@example.com"), MESSAGE))[addr("a@example.com")].ok, i
    assert len(downstream.messages) == 5
    assert downstream.connections == 3


@pytest_twisted.ensureDeferred
async def test_concurrent_connection_limit_of_the_server_is_temporary(downstream, make):
    downstream.max_concurrent_connections = 1
    downstream.delay = 0.2
    t = make(max_connections=2)
    first, second = await gatherResults(
        [t.deliver(entry("a@example.com"), MESSAGE), t.deliver(entry("b@example.com"), MESSAGE)]
    )
    replies = [first[addr("a@example.com")], second[addr("b@example.com")]]
    assert sorted((r.code, r.enhanced) for r in replies) == [(250, "2.0.0"), (452, "4.3.1")]


@pytest_twisted.ensureDeferred
async def test_max_connections_is_respected_under_concurrent_deliveries(downstream, make):
    downstream.delay = 0.05
    t = make(max_connections=2)
    results = await gatherResults(
        [t.deliver(entry(f"u{i}@example.com"), MESSAGE) for i in range(8)]
    )
    assert all(r.ok for result in results for r in result.values())
    assert len(downstream.messages) == 8
    assert downstream.peak_connections == 2
    assert downstream.connections == 2


@pytest_twisted.ensureDeferred
async def test_idle_connections_are_closed_after_the_idle_timeout(downstream, make):
    t = make(idle_timeout=0.1)
    await t.deliver(entry("a@example.com"), MESSAGE)
    assert downstream.active_connections == 1
    await eventually(lambda: downstream.active_connections == 0)
    assert downstream.commands[-1] == b"QUIT"


@pytest_twisted.ensureDeferred
async def test_close_closes_idle_connections(downstream, make):
    t = make()
    await t.deliver(entry("a@example.com"), MESSAGE)
    await t.close()
    await eventually(lambda: downstream.active_connections == 0)


@pytest_twisted.ensureDeferred
async def test_helo_when_ehlo_is_refused(downstream, make):
    downstream.esmtp = False
    replies = await make().deliver(entry("a@example.com"), b"Subject: t\r\n\r\n\xc3\xa9\r\n")
    assert replies[addr("a@example.com")].ok
    assert [c.split(b" ")[0] for c in downstream.commands[:2]] == [b"EHLO", b"HELO"]
    # No extensions, so no MAIL parameters.
    assert downstream.messages[0].mail_parameters == {}


@pytest_twisted.ensureDeferred
async def test_one_command_at_a_time_without_pipelining(downstream, make):
    downstream.extensions = ["8BITMIME", "ENHANCEDSTATUSCODES"]
    downstream.known_users = {"a@example.com"}
    replies = await make().deliver(entry("a@example.com", "b@example.com"), MESSAGE)
    assert (replies[addr("a@example.com")].code, replies[addr("b@example.com")].code) == (250, 550)
    assert downstream.messages[0].recipients == ["a@example.com"]


@pytest_twisted.ensureDeferred
async def test_mx_hosts_are_tried_in_preference_order(downstream):
    resolver = FakeResolver(
        mx={"example.com": [(20, "mx2.example.com"), (10, "mx1.example.com")]},
        hosts={"mx2.example.com": "127.0.0.1"},  # mx1 does not resolve
    )
    t = SMTPTransport(reactor, "hub.test", None, resolver=resolver, mx_port=downstream.port)
    try:
        replies = await t.deliver(entry("a@example.com"), MESSAGE)
    finally:
        await t.close()
    assert replies[addr("a@example.com")].ok
    assert resolver.asked == ["mx1.example.com", "mx2.example.com"]


@pytest_twisted.ensureDeferred
async def test_mx_domain_without_mx_falls_back_to_its_address_and_groups_by_domain(downstream):
    resolver = FakeResolver(
        mx={"example.com": [], "example.org": [(10, "mx.example.org")]},
        hosts={"example.com": "127.0.0.1", "mx.example.org": "127.0.0.1"},
        missing={"nowhere.example"},
    )
    t = SMTPTransport(reactor, "hub.test", None, resolver=resolver, mx_port=downstream.port)
    try:
        replies = await t.deliver(
            entry("a@example.com", "b@example.org", "c@nowhere.example"), MESSAGE
        )
    finally:
        await t.close()
    assert replies[addr("a@example.com")].ok and replies[addr("b@example.org")].ok
    assert (
        replies[addr("c@nowhere.example")].code,
        replies[addr("c@nowhere.example")].enhanced,
    ) == (550, "5.1.2")
    assert sorted(tuple(m.recipients) for m in downstream.messages) == [
        ("a@example.com",),
        ("b@example.org",),
    ]


@pytest_twisted.ensureDeferred
async def test_mx_lookup_failure_is_temporary():
    t = SMTPTransport(
        reactor, "hub.test", None, resolver=FakeResolver(mx={}, hosts={}, broken=True)
    )
    replies = await t.deliver(entry("a@example.com"), MESSAGE)
    assert (replies[addr("a@example.com")].code, replies[addr("a@example.com")].enhanced) == (
        451,
        "4.4.3",
    )


class FakeResolver:
    """An ``IResolver`` with just what the transport uses: MX and address lookups."""

    def __init__(self, mx, hosts, missing=(), broken=False):
        self.mx, self.hosts, self.missing, self.broken = mx, hosts, set(missing), broken
        self.asked: list[str] = []

    def lookupMailExchange(self, name, timeout=None):
        from twisted.internet.defer import fail

        if self.broken:
            return fail(DNSServerError("SERVFAIL"))
        if name in self.missing:
            return fail(DNSNameError(name))
        answers = [
            dns.RRHeader(name, dns.MX, payload=dns.Record_MX(preference, host))
            for preference, host in self.mx.get(name, [])
        ]
        return succeed((answers, [], []))

    def getHostByName(self, name, timeout=None, effort=10):
        from twisted.internet.defer import fail

        self.asked.append(name)
        if name in self.hosts:
            return succeed(self.hosts[name])
        return fail(DNSNameError(name))


# Against a StringTransport, with a Clock


class Endpoints:
    """``endpoint_for``: each connect gives a protocol over a ``StringTransport``, at once or never."""

    def __init__(self, connect: bool = True) -> None:
        self.connect_now = connect
        self.protocols: list[Any] = []

    def __call__(self, host: str, port: int) -> Any:
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        if not self.connect_now:
            return Deferred()
        protocol = factory.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        return succeed(protocol)


def unit_transport(clock: Clock, endpoints: Endpoints, **options: Any) -> SMTPTransport:
    return SMTPTransport(
        clock, "hub.test", ("mail.example.com", 25), endpoint_for=endpoints, **options
    )


def written(protocol: Any) -> bytes:
    value = protocol.transport.value()
    protocol.transport.clear()
    return value


def greet(
    protocol: Any, extensions: bytes = b"250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
) -> None:
    protocol.dataReceived(b"220 mail.example.com ESMTP\r\n")
    assert written(protocol) == b"EHLO hub.test\r\n"
    protocol.dataReceived(b"250-mail.example.com\r\n" + extensions)


def test_pipelining_sends_mail_rcpts_and_data_in_one_write():
    clock, endpoints = Clock(), Endpoints()
    d = unit_transport(clock, endpoints).deliver(entry("a@example.com", "b@example.com"), b"x\r\n")
    [p] = endpoints.protocols
    greet(p)
    assert written(p) == (
        b"MAIL FROM:<someone@outside.example>\r\n"
        b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    )
    p.dataReceived(
        b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550-5.1.1 no such\r\n550 5.1.1 user\r\n354 go\r\n"
    )
    assert written(p) == b"x\r\n.\r\n"
    p.dataReceived(b"250 2.0.0 queued\r\n")
    replies = d.result
    assert replies == {
        addr("a@example.com"): Reply(250, "2.0.0", "queued"),
        addr("b@example.com"): Reply(550, "5.1.1", "no such user"),
    }


def test_421_during_rcpt_makes_every_open_recipient_temporary():
    clock, endpoints = Clock(), Endpoints()
    d = unit_transport(clock, endpoints).deliver(
        entry("a@example.com", "b@example.com", "c@example.com"), b"x\r\n"
    )
    [p] = endpoints.protocols
    greet(p)
    written(p)
    p.dataReceived(b"250 ok\r\n550 5.1.1 no\r\n250 ok\r\n421 4.3.2 shutting down\r\n")
    replies = d.result
    assert replies[addr("a@example.com")] == Reply(550, "5.1.1", "no")
    assert replies[addr("b@example.com")] == Reply(421, "4.3.2", "shutting down")
    assert replies[addr("c@example.com")] == Reply(421, "4.3.2", "shutting down")
    assert not p.transport.connected


def test_command_timeout_is_a_temporary_reply():
    clock, endpoints = Clock(), Endpoints()
    d = unit_transport(clock, endpoints, command_timeout=60).deliver(
        entry("a@example.com"), b"x\r\n"
    )
    [p] = endpoints.protocols
    greet(p)
    clock.advance(59)
    assert not d.called
    clock.advance(1)
    reply = d.result[addr("a@example.com")]
    assert (reply.code, reply.enhanced) == (421, "4.4.2")
    assert "timeout after 60s" in reply.text and "MAIL" in reply.text


def test_data_timeout_applies_to_the_end_of_data():
    clock, endpoints = Clock(), Endpoints()
    t = unit_transport(clock, endpoints, command_timeout=10, data_timeout=100)
    d = t.deliver(entry("a@example.com"), b"x\r\n")
    [p] = endpoints.protocols
    greet(p)
    p.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    clock.advance(99)
    assert not d.called
    clock.advance(1)
    assert "end of data" in d.result[addr("a@example.com")].text


def test_connect_timeout_is_a_temporary_reply():
    clock = Clock()
    d = unit_transport(clock, Endpoints(connect=False), connect_timeout=30).deliver(
        entry("a@example.com"), b"x"
    )
    clock.advance(30)
    reply = d.result[addr("a@example.com")]
    assert (reply.code, reply.enhanced) == (421, "4.4.2")
    assert "timed out" in reply.text


def test_unanswered_greeting_times_out():
    clock, endpoints = Clock(), Endpoints()
    d = unit_transport(clock, endpoints, command_timeout=300).deliver(entry("a@example.com"), b"x")
    clock.advance(300)
    assert d.result[addr("a@example.com")].code == 421


def test_deliveries_wait_for_a_free_connection():
    clock, endpoints = Clock(), Endpoints()
    t = unit_transport(clock, endpoints, max_connections=1)
    first = t.deliver(entry("a@example.com"), b"x\r\n")
    second = t.deliver(entry("b@example.com"), b"y\r\n")
    [p] = endpoints.protocols
    greet(p)
    written(p)
    p.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    p.dataReceived(b"250 2.0.0 first\r\n")
    assert first.result[addr("a@example.com")].text == "first"
    # The waiting delivery reuses the same connection: RSET leads the
    # pipelined group, no round trip of its own.
    assert len(endpoints.protocols) == 1
    sent = written(p)
    assert sent.startswith(b"x\r\n.\r\nRSET\r\nMAIL FROM:")
    assert sent.endswith(b"RCPT TO:<b@example.com>\r\nDATA\r\n")
    p.dataReceived(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 second\r\n")
    assert second.result[addr("b@example.com")].text == "second"


def test_reused_connection_whose_pipelined_rset_fails_is_dropped_and_delivery_retried():
    clock, endpoints = Clock(), Endpoints()
    t = unit_transport(clock, endpoints, max_connections=1)
    first = t.deliver(entry("a@example.com"), b"x\r\n")
    second = t.deliver(entry("b@example.com"), b"y\r\n")
    [p] = endpoints.protocols
    greet(p)
    written(p)
    p.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 first\r\n")
    assert first.result[addr("a@example.com")].ok
    assert b"RSET\r\nMAIL FROM:" in written(p)
    # The server gives up on the kept connection: the group is abandoned
    # unanswered, the connection closed at once, and a new one carries it.
    p.dataReceived(b"421 4.4.2 idle too long\r\n")
    assert not p.transport.connected
    assert len(endpoints.protocols) == 2
    q = endpoints.protocols[1]
    greet(q)
    assert written(q).startswith(b"MAIL FROM:")
    q.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 second\r\n")
    assert second.result[addr("b@example.com")].text == "second"


def test_idle_connection_is_closed_by_the_clock():
    clock, endpoints = Clock(), Endpoints()
    t = unit_transport(clock, endpoints, idle_timeout=30)
    d = t.deliver(entry("a@example.com"), b"x\r\n")
    [p] = endpoints.protocols
    greet(p)
    p.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
    assert d.result[addr("a@example.com")].ok
    written(p)
    clock.advance(29)
    assert p.transport.connected
    clock.advance(1)
    assert written(p) == b"QUIT\r\n"
    assert not p.transport.connected


def test_a_cancelled_delivery_gives_its_connection_slot_back():
    clock, endpoints = Clock(), Endpoints()
    t = unit_transport(clock, endpoints, max_connections=1)
    first = t.deliver(entry("a@example.com"), b"x\r\n")
    waiting = t.deliver(entry("b@example.com"), b"y\r\n")
    [p] = endpoints.protocols
    greet(p)
    waiting.cancel()
    first.cancel()
    first.addErrback(lambda f: f.trap(CancelledError))
    waiting.addErrback(lambda f: f.trap(CancelledError))
    assert not p.transport.connected
    third = t.deliver(entry("c@example.com"), b"z\r\n")
    assert len(endpoints.protocols) == 2
    greet(endpoints.protocols[1])
    endpoints.protocols[1].dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
    assert third.result[addr("c@example.com")].ok


# STARTTLS, against the real downstream server


TLS_HOST = "mail.test"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate and key for ``mail.test``: ``(cert path, key path)``."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    generate_self_signed(TLS_HOST, cert, key, time.time())
    return cert, key


@pytest.fixture
def tls_downstream(downstream, certificate):
    """The downstream server, offering STARTTLS with the self-signed certificate."""
    downstream.tls_certificate, downstream.tls_key = certificate
    return downstream


@pytest.fixture
def make_named(downstream, transports):
    """
    Like ``make``, for the route ``smtp:mail.test:PORT`` (the name in the
    certificate), with ``mail.test`` reaching the downstream server.
    """

    def make(**options: Any) -> Any:
        config = {"target": f"{TLS_HOST}:{downstream.port}", "hostname": "hub.test", **options}
        t = attrs.evolve(
            plugin.make(config, reactor),
            endpoint_for=lambda host, port: TCP4ClientEndpoint(reactor, "127.0.0.1", port),
        )
        transports.append(t)
        return t

    return make


def codes(replies: dict[Address, Reply]) -> set[tuple[int, str]]:
    return {(r.code, r.enhanced) for r in replies.values()}


def verbs(downstream: DownstreamServer) -> list[bytes]:
    return [c.split(b" ")[0].upper() for c in downstream.commands]


@pytest_twisted.ensureDeferred
async def test_starttls_is_used_when_the_server_offers_it(tls_downstream, make):
    """Opportunistic by default: STARTTLS, EHLO again, and the message goes over TLS."""
    replies = await make().deliver(entry("a@example.com"), MESSAGE)
    assert codes(replies) == {(250, "2.0.0")}
    [got] = tls_downstream.messages
    assert got.tls and got.message == MESSAGE
    assert verbs(tls_downstream)[:3] == [b"EHLO", b"STARTTLS", b"EHLO"]


@pytest_twisted.ensureDeferred
async def test_tls_connection_is_reused_still_over_tls(tls_downstream, make):
    t = make()
    await t.deliver(entry("a@example.com"), MESSAGE)
    await t.deliver(entry("b@example.com"), MESSAGE)
    assert [m.tls for m in tls_downstream.messages] == [True, True]
    assert tls_downstream.connections == 1 and verbs(tls_downstream).count(b"STARTTLS") == 1


@pytest_twisted.ensureDeferred
async def test_without_starttls_offered_opportunistic_tls_delivers_in_clear(downstream, make):
    replies = await make().deliver(entry("a@example.com"), MESSAGE)
    assert codes(replies) == {(250, "2.0.0")}
    assert not downstream.messages[0].tls
    assert b"STARTTLS" not in verbs(downstream)


@pytest_twisted.ensureDeferred
async def test_tls_none_never_uses_starttls(tls_downstream, make):
    await make(tls="none").deliver(entry("a@example.com"), MESSAGE)
    assert not tls_downstream.messages[0].tls
    assert b"STARTTLS" not in verbs(tls_downstream)


@pytest_twisted.ensureDeferred
async def test_required_tls_without_starttls_is_temporary_and_nothing_goes_in_clear(
    downstream, make
):
    """``tls = "required"``: a server without STARTTLS gets no MAIL, and the entry is retried."""
    replies = await make(tls="required").deliver(entry("a@example.com", "b@example.com"), MESSAGE)
    assert codes(replies) == {(421, "4.7.4")}
    assert all(r.temporary for r in replies.values())
    assert downstream.messages == []
    assert set(verbs(downstream)) <= {b"EHLO", b"QUIT"}


@pytest_twisted.ensureDeferred
async def test_required_tls_is_met_over_starttls(tls_downstream, make):
    replies = await make(tls="required").deliver(entry("a@example.com"), MESSAGE)
    assert codes(replies) == {(250, "2.0.0")}
    assert tls_downstream.messages[0].tls


@pytest_twisted.ensureDeferred
async def test_required_tls_with_a_failed_handshake_is_temporary(tls_downstream, make):
    tls_downstream.starttls_broken = True
    replies = await make(tls="required").deliver(entry("a@example.com"), MESSAGE)
    assert codes(replies) == {(421, "4.7.5")}
    assert tls_downstream.messages == []
    assert tls_downstream.connections == 1


@pytest_twisted.ensureDeferred
async def test_failed_handshake_in_opportunistic_mode_falls_back_to_clear_and_says_so(
    tls_downstream, make
):
    """A broken TLS setup downstream must not stop the mail: a new connection, in clear."""
    tls_downstream.starttls_broken = True
    with capturedLogs() as events:
        replies = await make().deliver(entry("a@example.com"), MESSAGE)
    assert codes(replies) == {(250, "2.0.0")}
    [got] = tls_downstream.messages
    assert not got.tls and got.connection == 2
    assert verbs(tls_downstream).count(b"STARTTLS") == 1
    logged = [formatEvent(e) for e in events]
    assert any("STARTTLS" in line and "without TLS" in line for line in logged), logged


@pytest_twisted.ensureDeferred
async def test_verified_tls_refuses_a_self_signed_certificate(tls_downstream, make_named):
    """``tls_verify = true`` against the system's CAs: untrusted is a 4xx, never clear text."""
    replies = await make_named(tls_verify=True).deliver(entry("a@example.com"), MESSAGE)
    assert codes(replies) == {(421, "4.7.5")}
    assert tls_downstream.messages == []
    assert tls_downstream.connections == 1
    assert b"MAIL" not in verbs(tls_downstream)


@pytest_twisted.ensureDeferred
async def test_verified_tls_trusts_the_tls_ca_file(tls_downstream, make_named, certificate):
    t = make_named(tls="required", tls_verify=True, tls_ca_file=certificate[0])
    replies = await t.deliver(entry("a@example.com"), MESSAGE)
    assert codes(replies) == {(250, "2.0.0")}
    assert tls_downstream.messages[0].tls


@pytest_twisted.ensureDeferred
async def test_verified_tls_checks_the_route_host_name(tls_downstream, make, certificate):
    """The certificate is for mail.test; the route names 127.0.0.1: refused."""
    t = make(tls_verify=True, tls_ca_file=certificate[0])
    replies = await t.deliver(entry("a@example.com"), MESSAGE)
    assert codes(replies) == {(421, "4.7.5")}
    assert tls_downstream.messages == []


@pytest_twisted.ensureDeferred
async def test_unreadable_tls_ca_file_is_temporary(tls_downstream, make_named, tmp_path):
    t = make_named(tls_verify=True, tls_ca_file=str(tmp_path / "missing.pem"))
    replies = await t.deliver(entry("a@example.com"), MESSAGE)
    assert codes(replies) == {(421, "4.7.5")}
    assert "tls_ca_file" in next(iter(replies.values())).text
    assert tls_downstream.messages == []


# SMTPUTF8, against the real downstream server


@pytest_twisted.ensureDeferred
async def test_smtputf8_entry_goes_with_the_smtputf8_parameter(downstream, make):
    downstream.extensions.append("SMTPUTF8")
    t = make()
    utf8 = attrs.evolve(entry("a@example.com"), smtputf8=True)
    assert codes(await t.deliver(utf8, MESSAGE)) == {(250, "2.0.0")}
    await t.deliver(entry("b@example.com"), MESSAGE)
    first, second = downstream.messages
    assert "SMTPUTF8" in first.mail_parameters
    assert "SMTPUTF8" not in second.mail_parameters


@pytest_twisted.ensureDeferred
async def test_utf8_address_goes_with_the_smtputf8_parameter(downstream, make):
    downstream.extensions.append("SMTPUTF8")
    utf8 = attrs.evolve(entry("jürgen@bücher.example"), smtputf8=True)
    assert codes(await make().deliver(utf8, MESSAGE)) == {(250, "2.0.0")}
    [got] = downstream.messages
    assert got.recipients == ["jürgen@bücher.example"] and "SMTPUTF8" in got.mail_parameters


@pytest_twisted.ensureDeferred
async def test_smtputf8_entry_to_a_server_without_it_fails_permanently_unsent(downstream, make):
    """The server lacks SMTPUTF8: 553 5.6.7 for every recipient, no MAIL, so the policy bounces."""
    utf8 = attrs.evolve(entry("a@example.com", "b@example.com"), smtputf8=True)
    replies = await make().deliver(utf8, MESSAGE)
    assert codes(replies) == {(553, "5.6.7")}
    assert all(r.permanent for r in replies.values())
    assert downstream.messages == [] and b"MAIL" not in verbs(downstream)


# STARTTLS, against a StringTransport


class TLSStringTransport(StringTransportWithDisconnection):
    """A ``StringTransport`` that records ``startTLS`` (the handshake is the test's to complete)."""

    tls_options: Any = None

    def startTLS(self, options: Any) -> None:
        self.tls_options = options


class TLSEndpoints(Endpoints):
    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = TLSStringTransport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        return succeed(protocol)


STARTTLS_OFFERED = b"250-PIPELINING\r\n250 STARTTLS\r\n"


def test_replies_injected_before_the_tls_handshake_are_never_read():
    """Bytes after the 220 to STARTTLS came in clear: the EHLO over TLS does not take them."""
    clock, endpoints = Clock(), TLSEndpoints()
    d = unit_transport(clock, endpoints).deliver(entry("a@example.com"), b"x\r\n")
    [p] = endpoints.protocols
    greet(p, STARTTLS_OFFERED)
    assert written(p) == b"STARTTLS\r\n"
    p.dataReceived(b"220 2.0.0 go ahead\r\n250-injected\r\n250 8BITMIME\r\n")
    assert p.transport.tls_options is not None
    assert written(p) == b""
    p.handshakeCompleted()
    assert written(p) == b"EHLO hub.test\r\n"
    p.dataReceived(b"250-mail.example.com\r\n250 PIPELINING\r\n")
    assert p.tls and set(p.extensions) == {"PIPELINING"}
    assert written(p).startswith(b"MAIL FROM:")
    p.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    p.dataReceived(b"250 2.0.0 queued\r\n")
    assert d.result == {addr("a@example.com"): Reply(250, "2.0.0", "queued")}


def test_tls_handshake_timeout_falls_back_to_a_new_connection_in_clear():
    clock, endpoints = Clock(), TLSEndpoints()
    d = unit_transport(clock, endpoints, command_timeout=60).deliver(
        entry("a@example.com"), b"x\r\n"
    )
    [p] = endpoints.protocols
    greet(p, STARTTLS_OFFERED)
    written(p)
    p.dataReceived(b"220 2.0.0 go ahead\r\n")
    clock.advance(60)
    assert p.broken and len(endpoints.protocols) == 2
    second = endpoints.protocols[1]
    greet(second, STARTTLS_OFFERED)
    assert written(second).startswith(b"MAIL FROM:")
    second.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    second.dataReceived(b"250 2.0.0 queued\r\n")
    assert d.result == {addr("a@example.com"): Reply(250, "2.0.0", "queued")}
    assert not second.tls


def test_starttls_refused_goes_on_in_clear_unless_required():
    clock, endpoints = Clock(), TLSEndpoints()
    d = unit_transport(clock, endpoints).deliver(entry("a@example.com"), b"x\r\n")
    [p] = endpoints.protocols
    greet(p, STARTTLS_OFFERED)
    written(p)
    p.dataReceived(b"454 4.7.0 TLS not available\r\n")
    assert written(p).startswith(b"MAIL FROM:")
    p.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 queued\r\n")
    assert d.result == {addr("a@example.com"): Reply(250, "2.0.0", "queued")}

    clock, endpoints = Clock(), TLSEndpoints()
    d = unit_transport(clock, endpoints, tls="required").deliver(entry("a@example.com"), b"x\r\n")
    [p] = endpoints.protocols
    greet(p, STARTTLS_OFFERED)
    written(p)
    p.dataReceived(b"454 4.7.0 TLS not available\r\n")
    assert written(p) == b"QUIT\r\n"
    [reply] = d.result.values()
    assert (reply.code, reply.enhanced) == (421, "4.7.4")


@pytest_twisted.ensureDeferred
async def test_domain_tls_keys_reach_the_transport_as_the_node_builds_it(
    tls_downstream, transports, certificate, tmp_path
):
    """The config's domain keys, as ``Node.transport_for`` passes them, verify and require TLS."""
    route = f"smtp:{TLS_HOST}:{tls_downstream.port}"
    text = (
        f'[hub]\nhostname = "hub.test"\n[nodes.dallas]\nsmtp = "tcp:0"\n'
        f'[domains."example.com"]\nroute = "{route}"\ntls = "required"\n'
        f'tls_verify = true\ntls_ca_file = "{certificate[0]}"\n'
    ).encode()
    config = parse(text, str(tmp_path / "hub.toml"))
    options = {**config.route_options(route), "target": route[5:], "hostname": config.hostname}
    t = attrs.evolve(
        plugin.make(options, reactor),
        endpoint_for=lambda host, port: TCP4ClientEndpoint(reactor, "127.0.0.1", port),
    )
    transports.append(t)
    assert codes(await t.deliver(entry("a@example.com"), MESSAGE)) == {(250, "2.0.0")}
    assert tls_downstream.messages[0].tls

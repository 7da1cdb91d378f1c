"""
Tests for ``mailhub.smtp.server``: the inbound SMTP protocol against a
``StringTransport`` and a ``Clock``, with fake recipient checks and stores;
then how replies reach a real socket (sent at once, in order).
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs, formatEvent

from mailhub import model
from mailhub.config import ConfigError, SmtpConfig, parse
from mailhub.model import Address, CheckedMessage, Envelope, Reply, StoreFull, StoreUnavailable
from mailhub.netio import send_now as _send_now
from mailhub.smtp.client import wire_data
from mailhub.smtp.server import SMTPFactory, SMTPServerProtocol, domain_check

HOST = "mx.hub.example"
DOMAINS = ("example.com", "Example.ORG")
CLIENT_IP = "198.51.100.7"


class Store:
    """A fake ``receive``: records messages; ``mode`` says how it answers."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.received: list[tuple[Envelope, bytes]] = []
        self.pending: list[Deferred[Any]] = []

    def __call__(self, envelope: Envelope, message: bytes) -> Deferred[Any]:
        if self.mode == "ok":
            self.received.append((envelope, message))
            return succeed("Q123")
        if self.mode == "pending":
            self.received.append((envelope, message))
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d
        if self.mode == "full":
            return fail(StoreFull())
        if self.mode == "raise":
            raise RuntimeError("store exploded")
        return fail(StoreUnavailable("disk on fire"))


class Session:
    """One SMTP connection under test."""

    def __init__(
        self,
        check: Callable[[Address], Deferred[Any]] | None = None,
        now: float = 0.0,
        **limits: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(now)
        self.store = Store()
        self.limits = SmtpConfig(**limits)
        factory = SMTPFactory(
            HOST,
            self.limits,
            check or domain_check(DOMAINS, HOST),
            self.store,
            self.clock,
        )
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", CLIENT_IP, 40000))
        protocol = factory.buildProtocol(self.transport.getPeer())
        assert isinstance(protocol, SMTPServerProtocol)
        self.protocol = protocol
        self.protocol.makeConnection(self.transport)
        self.banner = self.lines()

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)

    def lines(self) -> list[str]:
        """The reply lines written since the last call."""
        out = self.transport.value()
        self.transport.clear()
        assert out == b"" or out.endswith(b"\r\n")
        return out.decode("ascii").split("\r\n")[:-1]

    def replies(self) -> list[str]:
        """The final line of each reply written since the last call."""
        return [line for line in self.lines() if line[3:4] != "-"]

    def codes(self) -> list[str]:
        """``"250 2.1.0"``-style prefixes of each reply since the last call."""
        return [" ".join(r.split(" ")[:2]) for r in self.replies()]

    def begin(self, *recipients: str, mail: bytes = b"MAIL FROM:<alice@sender.example>") -> None:
        """EHLO, MAIL, the recipients and DATA, expecting them all accepted."""
        rcpts = recipients or ("bob@example.com",)
        self.send(b"EHLO client.sender.example\r\n", mail + b"\r\n")
        for r in rcpts:
            self.send(b"RCPT TO:<%s>\r\n" % r.encode())
        self.send(b"DATA\r\n")
        codes = self.codes()
        assert codes[-1] == "354 End", codes
        assert all(c.startswith("250") for c in codes[:-1]), codes


def connect(**kw: Any) -> Session:
    return Session(**kw)


def body_of(message: bytes) -> bytes:
    """A stored message without the hub's Received: header (its first three lines)."""
    assert message.startswith(b"Received: ")
    return message.split(b"\r\n", 3)[3]


# -- greeting and simple commands -------------------------------------------


def test_banner_names_hostname() -> None:
    assert connect().banner == [f"220 {HOST} ESMTP mailhub"]


def test_banner_text_from_config() -> None:
    assert connect(banner="ESMTP ready").banner == [f"220 {HOST} ESMTP ready"]


def test_ehlo_advertises_extensions() -> None:
    s = connect(max_message_size=1234)
    s.send(b"EHLO client.example\r\n")
    lines = s.lines()
    assert lines[0].startswith(f"250-{HOST}")
    assert [line[4:] for line in lines[1:]] == [
        "PIPELINING",
        "SIZE 1234",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
    ]
    assert lines[-1].startswith("250 ")


def test_helo_is_answered_250() -> None:
    s = connect()
    s.send(b"HELO client.example\r\n")
    assert s.lines() == [f"250 {HOST}"]


@pytest.mark.parametrize("line", [b"EHLO\r\n", b"HELO\r\n", b"EHLO \x01bad\r\n"])
def test_hello_without_valid_name_is_501(line: bytes) -> None:
    s = connect()
    s.send(line)
    assert s.codes() == ["501 5.5.4"]


def test_noop_is_250() -> None:
    s = connect()
    s.send(b"NOOP\r\n")
    assert s.codes() == ["250 2.0.0"]


def test_vrfy_is_252() -> None:
    s = connect()
    s.send(b"VRFY bob\r\n")
    assert s.codes() == ["252 2.0.0"]


def test_help_is_214() -> None:
    s = connect()
    s.send(b"HELP\r\n")
    assert s.codes() == ["214 2.0.0"]


def test_quit_is_221_and_closes() -> None:
    s = connect()
    s.send(b"QUIT\r\n")
    assert s.codes() == ["221 2.0.0"]
    assert s.transport.disconnecting


def test_input_after_quit_is_ignored() -> None:
    s = connect()
    s.send(b"QUIT\r\nNOOP\r\n", b"NOOP\r\n")
    assert s.codes() == ["221 2.0.0"]


def test_unknown_command_is_500() -> None:
    s = connect()
    s.send(b"FROB\r\n")
    assert s.codes() == ["500 5.5.2"]


def test_empty_line_is_500() -> None:
    s = connect()
    s.send(b"\r\n")
    assert s.codes() == ["500 5.5.2"]


def test_commands_are_case_insensitive() -> None:
    s = connect()
    s.send(b"ehlo c.example\r\nmail from:<a@b.example>\r\nrcpt to:<bob@example.com>\r\n")
    assert s.codes() == ["250 ENHANCEDSTATUSCODES", "250 2.1.0", "250 2.1.5"]


def test_bare_lf_ends_a_command_line() -> None:
    s = connect()
    s.send(b"NOOP\nNOOP\r\n")
    assert s.codes() == ["250 2.0.0", "250 2.0.0"]


def test_non_ascii_in_mail_is_553() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\n")
    s.lines()
    s.send("MAIL FROM:<jörg@b.example>\r\n".encode())
    assert s.codes() == ["553 5.6.7"]


def test_non_ascii_in_other_command_is_501() -> None:
    s = connect()
    s.send("NOOP ü\r\n".encode())
    assert s.codes() == ["501 5.5.4"]


# -- long command lines -------------------------------------------------------


def test_command_line_at_limit_is_accepted() -> None:
    s = connect(max_line_length=20)
    s.send(b"NOOP " + b"x" * 15 + b"\r\n")
    assert s.codes() == ["250 2.0.0"]


def test_too_long_command_line_is_500() -> None:
    s = connect(max_line_length=20)
    s.send(b"NOOP " + b"x" * 16 + b"\r\n")
    assert s.codes() == ["500 5.5.2"]


def test_too_long_command_line_is_discarded_and_session_continues() -> None:
    s = connect(max_line_length=20)
    s.send(b"NOOP " + b"x" * 100)
    assert s.codes() == ["500 5.5.2"]
    s.send(b"y" * 100, b"QUIT\r\nNOOP\r\n")
    assert s.codes() == ["250 2.0.0"]


def test_too_long_command_line_is_answered_once() -> None:
    s = connect(max_line_length=20)
    for _ in range(10):
        s.send(b"z" * 30)
    s.send(b"\r\nNOOP\r\n")
    assert s.codes() == ["500 5.5.2", "250 2.0.0"]


# -- sequencing ---------------------------------------------------------------


def test_mail_before_hello_is_503() -> None:
    s = connect()
    s.send(b"MAIL FROM:<a@b.example>\r\n")
    assert s.codes() == ["503 5.5.1"]


def test_rcpt_before_mail_is_503() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\nRCPT TO:<bob@example.com>\r\n")
    assert s.codes()[-1] == "503 5.5.1"


def test_data_before_mail_is_503() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\nDATA\r\n")
    assert s.codes()[-1] == "503 5.5.1"


def test_data_before_rcpt_is_503() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nDATA\r\n")
    assert s.codes()[-1] == "503 5.5.1"


def test_data_after_only_refused_recipients_is_554() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@elsewhere.example>\r\n")
    s.send(b"DATA\r\n")
    assert s.codes()[-2:] == ["550 5.7.1", "554 5.5.1"]


def test_nested_mail_is_503() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n")
    assert s.codes()[-1] == "503 5.5.1"


def test_rset_ends_the_transaction() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRSET\r\nRCPT TO:<bob@example.com>\r\n")
    assert s.codes()[-2:] == ["250 2.0.0", "503 5.5.1"]


def test_ehlo_ends_the_transaction() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nEHLO c.example\r\n")
    s.send(b"MAIL FROM:<a@b.example>\r\n")
    assert s.codes()[-1] == "250 2.1.0"


def test_data_with_argument_is_501() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.com>\r\n")
    s.send(b"DATA now\r\n")
    assert s.codes()[-1] == "501 5.5.4"


# -- MAIL ---------------------------------------------------------------------


def mail(s: Session, line: bytes) -> list[str]:
    s.send(b"EHLO c.example\r\n")
    s.lines()
    s.send(line + b"\r\n")
    return s.codes()


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL",
        b"MAIL FROM:alice@b.example",
        b"MAIL TO:<alice@b.example>",
        b"MAIL FROM:<alice@b.example",
        b"MAIL FROM:<alice@b.example>SIZE=10",
    ],
)
def test_mail_bad_syntax_is_501(line: bytes) -> None:
    assert mail(connect(), line) == ["501 5.5.4"]


def test_mail_bad_sender_address_is_553() -> None:
    assert mail(connect(), b"MAIL FROM:<no-domain>") == ["553 5.1.7"]


def test_mail_from_with_space_is_accepted() -> None:
    assert mail(connect(), b"MAIL FROM: <alice@b.example>") == ["250 2.1.0"]


def test_null_sender_gives_envelope_sender_none() -> None:
    s = connect()
    s.begin(mail=b"MAIL FROM:<>")
    s.send(b"hi\r\n.\r\n")
    assert s.store.received[0][0].sender is None


def test_sender_source_route_is_ignored() -> None:
    s = connect()
    s.begin(mail=b"MAIL FROM:<@relay.example:alice@b.example>")
    s.send(b"hi\r\n.\r\n")
    assert s.store.received[0][0].sender == Address("alice", "b.example")


@pytest.mark.parametrize(
    ("path", "sender"),
    [
        (b"user@[192.0.2.1]", Address("user", "[192.0.2.1]")),
        (b"user@[IPv6:2001:db8::1]", Address("user", "[IPv6:2001:db8::1]")),
        (b"user@[ipv6:::ffff:192.0.2.1]", Address("user", "[IPv6:::ffff:192.0.2.1]")),
        # Leading zeros, which some parsers read as octal, are not relayed.
        (b"user@[192.000.002.010]", Address("user", "[192.0.2.10]")),
        (b'"a b"@[192.0.2.1]', Address('"a b"', "[192.0.2.1]")),
        (b"@relay.example:user@[192.0.2.1]", Address("user", "[192.0.2.1]")),
    ],
)
def test_address_literal_sender_is_accepted(path: bytes, sender: Address) -> None:
    """RFC 5321 4.1.2: a mailbox's domain may be an address literal."""
    s = connect()
    s.begin(mail=b"MAIL FROM:<" + path + b">")
    s.send(b"hi\r\n.\r\n")
    assert s.codes() == ["250 2.0.0"]
    assert s.store.received[0][0].sender == sender


@pytest.mark.parametrize(
    ("path", "words"),
    [
        (b"user@[192.0.2.256]", "malformed IPv4 address literal [192.0.2.256]: four numbers 0-255"),
        (b"user@[192.0.2]", "malformed IPv4 address literal [192.0.2]"),
        (b"user@[192.0.2.1.5]", "malformed IPv4 address literal"),
        (b"user@[192.0.2.-1]", "malformed IPv4 address literal"),
        (b"user@[IPv6:2001:db8::g]", "malformed IPv6 address literal [IPv6:2001:db8::g]"),
        (b"user@[IPv6:1::2::3]", "malformed IPv6 address literal"),
        (b"user@[IPv6:fe80::1%eth0]", "malformed IPv6 address literal"),
        (b"user@[IPv6:192.0.2.1]", "malformed IPv6 address literal"),
        (b"user@[2001:db8::1]", "address literal [2001:db8::1]: only IPv4 and IPv6"),
        (b"user@[x400:c=de]", "address literal [x400:c=de]: only IPv4 and IPv6"),
        (b"user@[]", "malformed address literal []"),
        (b"user@[192.0.2.1", "malformed address literal [192.0.2.1"),
        (b"user@[192.0.2.1].example", "malformed address literal"),
        (b"bad local@[192.0.2.1]", "malformed local part"),
        (b"a%b@[192.0.2.1]", "routing characters in local part"),
        (b"@[192.0.2.1]", "address must be local@domain"),
    ],
)
def test_malformed_address_literal_sender_is_553_saying_what_is_wrong(path: bytes, words: str) -> None:
    s = connect()
    s.send(b"EHLO c.example\r\n")
    s.lines()
    s.send(b"MAIL FROM:<" + path + b">\r\n")
    [reply] = s.replies()
    assert reply.startswith("553 5.1.7 Bad sender address: ")
    assert words in reply


def test_address_literal_recipient_stays_refused_for_a_literal_sender() -> None:
    """The hub relays only for its domains: a literal is never one of them."""
    s = connect()
    s.send(b"EHLO c.example\r\nMAIL FROM:<user@[192.0.2.1]>\r\n")
    s.lines()
    s.send(b"RCPT TO:<bob@[192.0.2.1]>\r\nRCPT TO:<bob@[IPv6:2001:db8::1]>\r\n")
    assert s.replies() == ["550 5.7.1 address literals are not accepted"] * 2
    s.send(b"RCPT TO:<bob@example.com>\r\n")
    assert s.codes() == ["250 2.1.5"]


def test_mail_size_over_limit_is_552() -> None:
    assert mail(connect(max_message_size=1000), b"MAIL FROM:<a@b.example> SIZE=1001") == [
        "552 5.3.4"
    ]


def test_mail_size_within_limit_is_accepted() -> None:
    assert mail(connect(max_message_size=1000), b"MAIL FROM:<a@b.example> SIZE=1000") == [
        "250 2.1.0"
    ]


@pytest.mark.parametrize("param", [b"SIZE", b"SIZE=", b"SIZE=12k", b"SIZE=-1"])
def test_mail_size_not_a_number_is_501(param: bytes) -> None:
    assert mail(connect(), b"MAIL FROM:<a@b.example> " + param) == ["501 5.5.4"]


def test_body_8bitmime_marks_envelope() -> None:
    s = connect()
    s.begin(mail=b"MAIL FROM:<a@b.example> BODY=8BITMIME")
    s.send(b"caf\xc3\xa9\r\n.\r\n")
    assert s.store.received[0][0].body_8bit is True


def test_body_7bit_is_accepted_and_not_8bit() -> None:
    s = connect()
    s.begin(mail=b"MAIL FROM:<a@b.example> body=7bit")
    s.send(b"hi\r\n.\r\n")
    assert s.store.received[0][0].body_8bit is False


def test_body_unknown_value_is_501() -> None:
    assert mail(connect(), b"MAIL FROM:<a@b.example> BODY=BINARYMIME") == ["501 5.5.4"]


def test_unknown_mail_parameter_is_555() -> None:
    assert mail(connect(), b"MAIL FROM:<a@b.example> RET=HDRS") == ["555 5.5.4"]


def test_mail_parameter_after_helo_is_555() -> None:
    s = connect()
    s.send(b"HELO c.example\r\n")
    s.lines()
    s.send(b"MAIL FROM:<a@b.example> SIZE=10\r\n")
    assert s.codes() == ["555 5.5.4"]


# -- RCPT ---------------------------------------------------------------------


def rcpt(s: Session, *lines: bytes) -> list[str]:
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
    s.lines()
    for line in lines:
        s.send(line + b"\r\n")
    return s.codes()


def test_rcpt_for_relayed_domain_is_250() -> None:
    assert rcpt(connect(), b"RCPT TO:<bob@example.com>") == ["250 2.1.5"]


def test_rcpt_domain_match_ignores_case() -> None:
    assert rcpt(connect(), b"RCPT TO:<bob@EXAMPLE.org>") == ["250 2.1.5"]


def test_rcpt_with_space_is_accepted() -> None:
    assert rcpt(connect(), b"RCPT TO: <bob@example.com>") == ["250 2.1.5"]


@pytest.mark.parametrize(
    "line",
    [b"RCPT", b"RCPT TO:bob@example.com", b"RCPT FROM:<bob@example.com>", b"RCPT TO:<>"],
)
def test_rcpt_bad_syntax_is_501(line: bytes) -> None:
    assert rcpt(connect(), line)[0].startswith("501")


def test_rcpt_parameter_is_555() -> None:
    assert rcpt(connect(), b"RCPT TO:<bob@example.com> NOTIFY=NEVER") == ["555 5.5.4"]


@pytest.mark.parametrize(
    "address",
    [
        "bob@elsewhere.example",  # a domain the hub does not serve
        f"bob@{HOST}",  # the hub's own name
        "bob%elsewhere.example@example.com",  # percent hack
        "elsewhere.example!bob@example.com",  # bang path
        "@example.com,@relay.example:bob@elsewhere.example",  # source route
        "@example.com:bob@example.com",  # source route into a served domain
        '"bob@elsewhere.example"@example.com',  # quoted local part with @
        '"bob%elsewhere.example"@example.com',  # quoted percent hack
        "bob@[192.0.2.1]",  # IP literal
        "bob@[IPv6:2001:db8::1]",  # IPv6 literal
        "bob@elsewhere.example@example.com",  # two @
        "bob@evilexample.com",  # ends with a served domain
        "bob@sub.example.com",  # a sub-domain of a served domain
        "bob@example.com.elsewhere.example",  # starts with a served domain
        "bob@xexample.org",  # ends with a served domain, other case in the config
        "bob@example.co",  # a prefix of a served domain
    ],
)
def test_relay_tricks_are_refused_550(address: str) -> None:
    s = connect()
    assert rcpt(s, b"RCPT TO:<%s>" % address.encode()) == ["550 5.7.1"]


def test_hub_hostname_accepted_when_listed() -> None:
    s = connect(check=domain_check([*DOMAINS, HOST], HOST))
    assert rcpt(s, b"RCPT TO:<postmaster@%s>" % HOST.encode()) == ["250 2.1.5"]


def test_domain_check_refusal_is_relaying_denied() -> None:
    result: list[object] = []
    domain_check(["example.com"], HOST)(Address("bob", "other.example")).addCallback(result.append)
    assert result == [Reply(550, "5.7.1", "Relaying denied")]


def test_domain_check_accepts_listed_domain_with_none() -> None:
    result: list[object] = []
    domain_check(["Example.COM"], HOST)(Address("bob", "example.com")).addCallback(result.append)
    assert result == [None]


def test_refusal_reply_from_check_is_passed_on() -> None:
    s = connect(check=lambda a: succeed(Reply(550, "5.1.1", "No such user")))
    assert rcpt(s, b"RCPT TO:<bob@example.com>") == ["550 5.1.1"]


def test_recipient_check_failure_is_451() -> None:
    s = connect(check=lambda a: fail(RuntimeError("directory down")))
    assert rcpt(s, b"RCPT TO:<bob@example.com>") == ["451 4.3.0"]


def test_recipient_check_raising_is_451() -> None:
    def check(address: Address) -> Deferred[Any]:
        raise RuntimeError("bug")

    s = connect(check=check)
    assert rcpt(s, b"RCPT TO:<bob@example.com>") == ["451 4.3.0"]


def test_recipient_check_giving_nonsense_is_451() -> None:
    s = connect(check=lambda a: succeed("yes"))
    assert rcpt(s, b"RCPT TO:<bob@example.com>") == ["451 4.3.0"]


def test_too_many_recipients_is_452() -> None:
    s = connect(max_recipients=2)
    codes = rcpt(
        s,
        b"RCPT TO:<a@example.com>",
        b"RCPT TO:<b@example.com>",
        b"RCPT TO:<c@example.com>",
    )
    assert codes == ["250 2.1.5", "250 2.1.5", "452 4.5.3"]


def test_duplicate_recipients_collapse_to_one() -> None:
    s = connect(max_recipients=2)
    codes = rcpt(
        s,
        b"RCPT TO:<a@example.com>",
        b"RCPT TO:<a@EXAMPLE.com>",
        b"RCPT TO:<b@example.com>",
        b"DATA",
        b"hi\r\n.",
    )
    assert codes == ["250 2.1.5", "250 2.1.5", "250 2.1.5", "354 End", "250 2.0.0"]
    assert s.store.received[0][0].recipients == (
        Address("a", "example.com"),
        Address("b", "example.com"),
    )


# -- pipelining ---------------------------------------------------------------


class SlowCheck:
    """A recipient check whose answers the test gives later, in any order."""

    def __init__(self) -> None:
        self.pending: list[tuple[Address, Deferred[Any]]] = []

    def __call__(self, address: Address) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((address, d))
        return d

    def answer_all(self) -> None:
        while self.pending:
            address, d = self.pending.pop(0)
            d.callback(None if address.domain == "example.com" else Reply(550, "5.7.1", "no"))


PIPELINED = (
    b"EHLO c.example\r\n"
    b"MAIL FROM:<a@b.example>\r\n"
    b"RCPT TO:<one@example.com>\r\n"
    b"RCPT TO:<x@elsewhere.example>\r\n"
    b"RCPT TO:<two@example.com>\r\n"
    b"DATA\r\n"
    b"Subject: pipelined\r\n\r\nbody\r\n.\r\n"
    b"NOOP\r\n"
    b"QUIT\r\n"
)


def test_pipelined_session_in_one_write_is_answered_in_order() -> None:
    s = connect()
    s.send(PIPELINED)
    assert s.codes() == [
        "250 ENHANCEDSTATUSCODES",
        "250 2.1.0",
        "250 2.1.5",
        "550 5.7.1",
        "250 2.1.5",
        "354 End",
        "250 2.0.0",
        "250 2.0.0",
        "221 2.0.0",
    ]


def test_pipelined_input_waits_while_recipient_check_pending() -> None:
    check = SlowCheck()
    s = connect(check=check)
    s.send(PIPELINED)
    assert s.codes() == ["250 ENHANCEDSTATUSCODES", "250 2.1.0"]
    assert len(check.pending) == 1
    # A few pipelined commands wait in the buffer: reading goes on.
    assert s.transport.producerState == "producing"


def test_input_past_the_bound_while_waiting_stops_reading_until_the_reply() -> None:
    check = SlowCheck()
    s = connect(check=check)
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<one@example.com>\r\n")
    assert len(check.pending) == 1
    s.send(b"NOOP\r\n" * 10000)  # 60,000 octets: under the bound
    assert s.transport.producerState == "producing"
    s.send(b"NOOP\r\n" * 1000)
    assert s.transport.producerState == "paused"
    assert s.codes() == ["250 ENHANCEDSTATUSCODES", "250 2.1.0"]
    check.answer_all()
    assert s.transport.producerState == "producing"
    assert s.codes() == ["250 2.1.5"] + ["250 2.0.0"] * 11000


def test_pipelined_replies_stay_in_order_when_checks_fire_later() -> None:
    check = SlowCheck()
    s = connect(check=check)
    s.send(PIPELINED)
    while check.pending:
        check.answer_all()
    assert s.codes() == [
        "250 ENHANCEDSTATUSCODES",
        "250 2.1.0",
        "250 2.1.5",
        "550 5.7.1",
        "250 2.1.5",
        "354 End",
        "250 2.0.0",
        "250 2.0.0",
        "221 2.0.0",
    ]
    assert s.store.received[0][0].recipients == (
        Address("one", "example.com"),
        Address("two", "example.com"),
    )


def test_transport_resumes_when_check_fires() -> None:
    check = SlowCheck()
    s = connect(check=check)
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<one@example.com>\r\n")
    check.answer_all()
    assert s.transport.producerState == "producing"


def test_pipelined_input_waits_while_store_pending() -> None:
    s = connect()
    s.store.mode = "pending"
    s.send(PIPELINED)
    assert s.codes()[-1] == "354 End"
    s.store.pending[0].callback("Q9")
    assert s.codes() == ["250 2.0.0", "250 2.0.0", "221 2.0.0"]
    assert s.transport.disconnecting


def test_pipelined_input_split_at_every_position_gives_same_replies() -> None:
    expected = connect()
    expected.send(PIPELINED)
    want = expected.codes()
    for i in range(len(PIPELINED) + 1):
        s = connect()
        s.send(PIPELINED[:i], PIPELINED[i:])
        assert s.codes() == want, i


# -- DATA: end of data and transparency ---------------------------------------

MESSAGE = b"Subject: test\r\n\r\nhello\r\nworld\r\n"


@pytest.mark.parametrize("split", range(len(MESSAGE + b".\r\n") + 1))
def test_end_of_data_split_at_any_position(split: int) -> None:
    s = connect()
    s.begin()
    stream = MESSAGE + b".\r\nNOOP\r\n"
    s.send(stream[:split], stream[split:])
    assert s.codes() == ["250 2.0.0", "250 2.0.0"]
    assert body_of(s.store.received[0][1]) == MESSAGE


def test_end_of_data_one_octet_at_a_time() -> None:
    s = connect()
    s.begin()
    for i, _ in enumerate(MESSAGE + b".\r\n"):
        s.send((MESSAGE + b".\r\n")[i : i + 1])
    assert s.codes() == ["250 2.0.0"]
    assert body_of(s.store.received[0][1]) == MESSAGE


def test_lone_dot_as_first_line_ends_empty_message() -> None:
    s = connect()
    s.begin()
    s.send(b".\r\n")
    assert s.codes() == ["250 2.0.0"]
    assert body_of(s.store.received[0][1]) == b""


def test_first_line_dot_split_from_crlf_ends_message() -> None:
    s = connect()
    s.begin()
    s.send(b".", b"\r", b"\n")
    assert s.codes() == ["250 2.0.0"]


@pytest.mark.parametrize(
    "fake_end",
    [
        b"\n.\n",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r.\r",
        b"\r\n.\r",
        b"\r.\r\n",
        b"\r\n.\x00\r\n",
        b"\r\n\x00.\r\n",
        b"\r\n.\r\x00\n",
        b"\r\n .\r\n",
    ],
)
def test_only_crlf_dot_crlf_ends_the_message(fake_end: bytes) -> None:
    """Whatever the message's content is then made into, only CRLF "." CRLF ended it."""
    s = connect(bare_line_endings="normalise", nul_bytes="remove")
    s.begin()
    s.send(b"Subject: x\r\n\r\nline" + fake_end + b"MAIL FROM:<evil@elsewhere.example>\r\n")
    assert s.lines() == []
    s.send(b".\r\n")
    assert s.codes() == ["250 2.0.0"]
    assert len(s.store.received) == 1
    assert b"MAIL FROM:<evil@elsewhere.example>" in s.store.received[0][1]
    assert b"\x00" not in s.store.received[0][1]


def test_data_is_dot_unstuffed() -> None:
    s = connect()
    s.begin()
    s.send(b"..first\r\nmiddle\r\n..\r\n...\r\n.\r\n")
    assert body_of(s.store.received[0][1]) == b".first\r\nmiddle\r\n.\r\n..\r\n"


def test_dot_stuffing_split_across_chunks_is_unstuffed() -> None:
    s = connect()
    s.begin()
    s.send(b"a\r", b"\n.", b".b\r\n.", b"\r\n")
    assert body_of(s.store.received[0][1]) == b"a\r\n.b\r\n"


@pytest.mark.parametrize(
    ("content", "dot_lines"),
    [
        (b"Subject: t\r\n\r\nno dot at a line start. a.b\r\n", False),
        (b"", False),
        (b"..first line\r\n", True),
        (b"a\r\n...\r\nb\r\n", True),
        (b"a\r\n", False),
    ],
)
def test_accepted_message_carries_what_the_checks_found(content: bytes, dot_lines: bool) -> None:
    """
    The message handed on is a ``CheckedMessage``: CRLF only, and whether a
    line starts with a dot, so the first attempt's transport need not scan
    it again.
    """
    s = connect()
    s.begin()
    s.send(content + b".\r\n")
    message = s.store.received[0][1]
    assert isinstance(message, CheckedMessage)
    assert message.dot_lines is dot_lines
    body = body_of(message)
    assert (body.startswith(b".") or b"\r\n." in body) is dot_lines


def test_normalised_message_may_have_dot_lines() -> None:
    """A bare LF made CRLF can put a dot at a line's start: the server says so."""
    s = connect(bare_line_endings="normalise")
    s.begin()
    s.send(b"a\n.b\r\n.\r\n")
    message = s.store.received[0][1]
    assert body_of(message) == b"a\r\n.b\r\n"
    assert isinstance(message, CheckedMessage) and message.dot_lines


# -- DATA: content checks -----------------------------------------------------


@pytest.mark.parametrize("content", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"a\r\n\nb\r\n"])
def test_bare_line_endings_are_rejected_554(content: bytes) -> None:
    s = connect(bare_line_endings="reject")
    s.begin()
    s.send(content + b".\r\n")
    assert s.codes() == ["554 5.6.0"]
    assert s.store.received == []


_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@settings(max_examples=400, deadline=None)
@given(
    data=st.binary(max_size=200).map(
        # Mostly line ends, in every arrangement.
        lambda raw: bytes(b"\r\nx"[b % 3] for b in raw)
    ),
    cut=st.tuples(st.integers(0, 200), st.integers(0, 200)),
)
# The range's edges: a CRLF cut after its CR, or before its LF.
@example(data=b"\r\n", cut=(1, 2))
@example(data=b"x\r\nx", cut=(0, 2))
@example(data=b"x\nx", cut=(0, 1))
def test_bare_line_end_agrees_with_the_definition(data: bytes, cut: tuple[int, int]) -> None:
    """
    ``has_bare_line_end(data, lo, hi)`` is the regular expression's answer for
    ``data[lo:hi]``, whatever the range (the octets just outside it, a CR
    before ``lo`` or an LF at ``hi``, do not count).
    """
    lo, hi = sorted(min(c, len(data)) for c in cut)
    for kind in (bytes, bytearray):
        expected = bool(_BARE.search(data[lo:hi]))
        assert model.has_bare_line_end(kind(data), lo, hi) == expected, (data, lo, hi)


@pytest.mark.parametrize("position", [0, 1, 32 * 1024 - 1, 32 * 1024, 32 * 1024 + 1, 99_998])
@pytest.mark.parametrize("octet", [b"\r", b"\n"])
def test_one_bare_octet_in_100_kb_is_found(position: int, octet: bytes) -> None:
    """A single bare CR or LF anywhere in a 100 KB message, at its ends too, is a 554."""
    line = b"x" * 98 + b"\r\n"
    message = bytearray(line * 1000)
    # Put the octet on an "x" (move it off a line end).
    while message[position : position + 1] in (b"\r", b"\n"):
        position -= 1
    message[position : position + 1] = octet
    s = connect(bare_line_endings="reject", max_message_size=10**6)
    s.begin()
    s.send(bytes(message) + b".\r\n")
    assert s.codes() == ["554 5.6.0"]
    assert s.store.received == []


@pytest.mark.parametrize(
    ("content", "normalised"),
    [
        (b"a\nb\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\r\r\n", b"a\r\n\r\n"),
        (b"a\n\rb\r\n", b"a\r\n\r\nb\r\n"),
        (b"\n.\nx\r\n", b"\r\n.\r\nx\r\n"),
    ],
)
def test_bare_line_endings_are_normalised(content: bytes, normalised: bytes) -> None:
    s = connect(bare_line_endings="normalise")
    s.begin()
    s.send(content + b".\r\n")
    assert s.codes() == ["250 2.0.0"]
    assert body_of(s.store.received[0][1]) == normalised


# NUL octets: a downstream server that drops them would read CRLF NUL "." CRLF
# as the end of DATA, and what follows as commands (SMTP smuggling).
_SMUGGLED = (
    b"Subject: x\r\n\r\nline\r\n\x00.\r\n"
    b"MAIL FROM:<evil@elsewhere.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\nsmuggled\r\n"
)


@pytest.mark.parametrize(
    "content", [b"a\x00b\r\n", b"\x00\r\n", b"a\r\n\x00", b"Subject: \x00\r\n\r\nb\r\n", _SMUGGLED]
)
def test_nul_octets_are_rejected_554_by_default(content: bytes) -> None:
    s = connect()
    s.begin()
    s.send(content + b"\r\n.\r\n" if not content.endswith(b"\r\n") else content + b".\r\n")
    assert s.replies() == ["554 5.6.0 Message contains NUL octets"]
    assert s.store.received == []


def test_nul_before_the_dot_ends_nothing_and_the_session_goes_on() -> None:
    """Refused whole: the "second message" after CRLF NUL "." CRLF was never a command."""
    s = connect()
    s.begin()
    s.send(_SMUGGLED + b".\r\n")
    assert s.codes() == ["554 5.6.0"]
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\nok\r\n.\r\n")
    assert s.codes() == ["250 2.1.0", "250 2.1.5", "354 End", "250 2.0.0"]
    assert [body_of(m) for _, m in s.store.received] == [b"ok\r\n"]


def test_removed_nul_before_a_dot_is_relayed_as_a_dot_line() -> None:
    """
    With ``nul_bytes = "remove"`` the line "NUL ." is the line "." of one
    message, and goes to the downstream server dot-stuffed: it ends nothing
    there either.
    """
    s = connect(nul_bytes="remove")
    s.begin()
    s.send(_SMUGGLED + b".\r\n")
    assert s.codes() == ["250 2.0.0"]
    [(_, message)] = s.store.received
    assert body_of(message) == _SMUGGLED.replace(b"\x00", b"")
    assert isinstance(message, CheckedMessage) and message.dot_lines
    wire = wire_data(message)
    assert b"\x00" not in wire
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"smuggled\r\n.\r\n")
    assert b"\r\nline\r\n..\r\nMAIL FROM:" in wire


@pytest.mark.parametrize(
    ("content", "stored"),
    [
        (b"a\x00b\r\n", b"ab\r\n"),
        (b"\x00\x00\r\n", b"\r\n"),
        (b"\x00.x\r\n", b".x\r\n"),
        # Without its NUL the CR has its LF: no bare line end is left.
        (b"a\r\x00\nb\r\n", b"a\r\nb\r\n"),
    ],
)
def test_nul_octets_are_removed(content: bytes, stored: bytes) -> None:
    s = connect(nul_bytes="remove")
    s.begin()
    s.send(content + b".\r\n")
    assert s.codes() == ["250 2.0.0"]
    message = s.store.received[0][1]
    assert body_of(message) == stored
    assert isinstance(message, CheckedMessage) and message.dot_lines


@pytest.mark.parametrize(("mode", "reply"), [("reject", "554 5.6.0"), ("normalise", "250 2.0.0")])
def test_bare_line_end_left_by_a_removed_nul_follows_its_own_setting(mode: str, reply: str) -> None:
    s = connect(nul_bytes="remove", bare_line_endings=mode)
    s.begin()
    s.send(b"a\x00\rb\r\n.\r\n")
    assert s.codes() == [reply]
    if mode == "normalise":
        assert body_of(s.store.received[0][1]) == b"a\r\nb\r\n"


def test_nul_bytes_setting_is_reject_or_remove() -> None:
    base = (
        b'[hub]\nhostname = "mx.hub.example"\n[nodes.dallas]\nsmtp = "tcp:2525"\n'
        b'[domains."example.com"]\nroute = "smtp:mail.example.com:25"\n'
    )
    assert parse(base, "hub.toml").smtp.nul_bytes == "reject"
    assert parse(base + b'[smtp]\nnul_bytes = "remove"\n', "hub.toml").smtp.nul_bytes == "remove"
    with pytest.raises(ConfigError, match="hub.toml: smtp.nul_bytes: must be 'reject' or 'remove'"):
        parse(base + b'[smtp]\nnul_bytes = "strip"\n', "hub.toml")


def test_oversize_data_is_552_after_end_of_data() -> None:
    s = connect(max_message_size=100)
    s.begin()
    for _ in range(10):
        s.send(b"x" * 50 + b"\r\n")
    assert s.lines() == []
    s.send(b".\r\n")
    assert s.codes() == ["552 5.3.4"]
    assert s.store.received == []


def test_oversize_data_end_marker_split_while_discarding() -> None:
    s = connect(max_message_size=10)
    s.begin()
    s.send(b"x" * 100 + b"\r", b"\n", b".", b"\r", b"\nNOOP\r\n")
    assert s.codes() == ["552 5.3.4", "250 2.0.0"]


def test_session_continues_after_oversize_data() -> None:
    s = connect(max_message_size=10)
    s.begin()
    s.send(b"x" * 100 + b"\r\n.\r\n")
    s.lines()
    s.send(b"RCPT TO:<bob@example.com>\r\n")
    assert s.codes() == ["503 5.5.1"]  # the transaction was reset


def test_message_at_size_limit_is_accepted() -> None:
    s = connect(max_message_size=10)
    s.begin()
    s.send(b"12345678\r\n.\r\n")
    assert s.codes() == ["250 2.0.0"]


def test_message_one_over_size_limit_is_552() -> None:
    s = connect(max_message_size=10)
    s.begin()
    s.send(b"123456789\r\n.\r\n")
    assert s.codes() == ["552 5.3.4"]


def test_data_line_too_long_is_554() -> None:
    s = connect(max_data_line_length=10)
    s.begin()
    s.send(b"short\r\n" + b"y" * 11 + b"\r\n.\r\n")
    assert s.codes() == ["554 5.6.0"]
    assert s.store.received == []


def test_first_data_line_too_long_is_554() -> None:
    s = connect(max_data_line_length=10)
    s.begin()
    s.send(b"y" * 11 + b"\r\n.\r\n")
    assert s.codes() == ["554 5.6.0"]


def test_data_line_at_limit_is_accepted() -> None:
    s = connect(max_data_line_length=10)
    s.begin()
    s.send(b"y" * 10 + b"\r\n" + b"z" * 10 + b"\r\n.\r\n")
    assert s.codes() == ["250 2.0.0"]


def test_stuffed_line_at_limit_is_accepted_and_one_over_is_554() -> None:
    # The limit applies to the line as stored, after its dot is removed.
    s = connect(max_data_line_length=10)
    s.begin()
    s.send(b"a\r\n.." + b"y" * 9 + b"\r\n.\r\n")
    assert s.codes() == ["250 2.0.0"]
    assert body_of(s.store.received[0][1]) == b"a\r\n." + b"y" * 9 + b"\r\n"
    s.begin()
    s.send(b"a\r\n.." + b"y" * 10 + b"\r\n.\r\n")
    assert s.codes() == ["554 5.6.0"]


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 40),
    lines=st.lists(st.tuples(st.integers(0, 45), st.booleans()), min_size=1, max_size=150),
    cuts=st.lists(st.integers(0, 8000), max_size=6),
)
def test_long_line_is_found_anywhere_in_a_long_message(
    limit: int, lines: list[tuple[int, bool]], cuts: list[int]
) -> None:
    """Over many multiples of the limit, and with dot-stuffed lines, split anywhere."""
    body = b"".join(
        (b"." if dot and n else b"") + b"x" * (n - 1 if dot and n else n) + b"\r\n"
        for n, dot in lines
    )
    wire = _stuff(body)
    s = connect(max_data_line_length=limit)
    s.begin()
    bounds = [0, *sorted({c for c in cuts if c < len(wire)}), len(wire)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        s.send(wire[start:end])
    if any(n > limit for n, _ in lines):
        assert s.codes() == ["554 5.6.0"]
        assert s.store.received == []
    else:
        assert s.codes() == ["250 2.0.0"]
        assert body_of(s.store.received[0][1]) == body


def test_dot_stuffing_and_end_of_data_split_at_every_octet() -> None:
    wire = b"..a\r\nb\r\n...\r\n.x\r\n\r\n.\r\nNOOP\r\n"
    for cut in range(len(wire) + 1):
        s = connect()
        s.begin()
        s.send(wire[:cut], wire[cut:])
        assert s.codes() == ["250 2.0.0", "250 2.0.0"], cut
        assert body_of(s.store.received[0][1]) == b".a\r\nb\r\n..\r\nx\r\n\r\n", cut
    s = connect()
    s.begin()
    s.send(*(wire[i : i + 1] for i in range(len(wire))))
    assert s.codes() == ["250 2.0.0", "250 2.0.0"]
    assert body_of(s.store.received[0][1]) == b".a\r\nb\r\n..\r\nx\r\n\r\n"


def test_message_without_stuffing_split_at_every_octet() -> None:
    wire = b"Subject: x\r\n\r\na.b\r\n\r\n.\r\n"
    for cut in range(len(wire) + 1):
        s = connect()
        s.begin()
        s.send(wire[:cut], wire[cut:])
        assert s.codes() == ["250 2.0.0"], cut
        assert body_of(s.store.received[0][1]) == b"Subject: x\r\n\r\na.b\r\n\r\n", cut


@settings(max_examples=500, deadline=None)
@given(
    content=st.binary(max_size=60).map(
        # Line ends, dots and text in every arrangement.
        lambda raw: bytes(b"\r\n.x"[b % 4] for b in raw)
    ),
    cuts=st.lists(st.integers(0, 70), max_size=6),
    mode=st.sampled_from(["reject", "normalise"]),
)
def test_data_scan_agrees_with_the_definitions_however_the_input_is_cut(
    content: bytes, cuts: list[int], mode: str
) -> None:
    """
    Whatever the content and wherever the chunks end, the server ends the
    message at the first CRLF "." CRLF (counting the CRLF before DATA's first
    line), removes the leading dot of every line, and rejects or normalises
    exactly when the unstuffed message has a CR without an LF after it or an
    LF without a CR in front: one scan decides the end, the dot lines and
    the bare CRs, picking up at each chunk what the last left undecided.
    """
    wire = content + b"\r\n.\r\n"
    stream = b"\r\n" + wire
    end = stream.find(b"\r\n.\r\n")
    lines = stream[2 : end + 2].split(b"\r\n")
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    bounds = sorted({0, len(wire), *(min(c, len(wire)) for c in cuts)})
    s = connect(bare_line_endings=mode)
    s.begin()
    s.send(*(wire[a:b] for a, b in zip(bounds, bounds[1:], strict=False)))
    replies = s.codes()
    if _BARE.search(unstuffed) and mode == "reject":
        assert replies[0] == "554 5.6.0"
        assert s.store.received == []
        return
    assert replies[0] == "250 2.0.0"
    body = s.store.received[0][1]
    assert body_of(body) == _BARE.sub(b"\r\n", unstuffed)
    assert isinstance(body, CheckedMessage)
    if body.dot_lines is False:
        assert b"\r\n." not in b"\r\n" + body_of(body)


def test_session_continues_after_rejected_data() -> None:
    s = connect()
    s.begin()
    s.send(b"bare\nlf\r\n.\r\n")
    s.lines()
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\nok\r\n.\r\n")
    assert s.codes() == ["250 2.1.0", "250 2.1.5", "354 End", "250 2.0.0"]


def test_second_message_in_one_session() -> None:
    s = connect()
    s.begin()
    s.send(b"one\r\n.\r\n")
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.com>\r\nDATA\r\ntwo\r\n.\r\n")
    assert [body_of(m) for _, m in s.store.received] == [b"one\r\n", b"two\r\n"]
    assert s.store.received[1][0].recipients == (Address("c", "example.com"),)


# -- storing ------------------------------------------------------------------


def test_envelope_describes_the_session() -> None:
    s = connect(now=1_700_000_000)
    s.begin("bob@example.com", "carol@example.org")
    s.send(b"hi\r\n.\r\n")
    envelope = s.store.received[0][0]
    assert envelope == Envelope(
        Address("alice", "sender.example"),
        (Address("bob", "example.com"), Address("carol", "example.org")),
        received_at=1_700_000_000,
        client=CLIENT_IP,
        helo="client.sender.example",
        body_8bit=False,
    )


def test_received_header_is_added_on_top() -> None:
    s = connect(now=1_700_000_000)
    s.begin()
    s.send(MESSAGE + b".\r\n")
    message = s.store.received[0][1]
    assert re.fullmatch(
        rb"Received: from client\.sender\.example \(198\.51\.100\.7\)\r\n"
        rb"\tby mx\.hub\.example \(mailhub\) with ESMTP id [0-9a-f]+;\r\n"
        rb"\tTue, 14 Nov 2023 22:13:20 \+0000\r\n",
        message[: -len(MESSAGE)],
    )
    assert message.endswith(MESSAGE)


def test_received_header_does_not_carry_comment_syntax_from_helo() -> None:
    s = connect()
    s.send(b"EHLO evil)(x\\\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.com>\r\n")
    s.send(b"DATA\r\nhi\r\n.\r\n")
    envelope, message = s.store.received[0]
    assert envelope.helo == "evil)(x\\"
    assert message.startswith(b"Received: from evil__x_ (198.51.100.7)\r\n")


def test_received_header_says_smtp_after_helo() -> None:
    s = connect()
    s.send(b"HELO old.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.com>\r\n")
    s.send(b"DATA\r\nhi\r\n.\r\n")
    assert b"with SMTP id" in s.store.received[0][1].split(b"\r\n\r\n")[0]


def test_local_ids_are_distinct_hex() -> None:
    s = connect()
    ids = []
    for _ in range(3):
        s.begin()
        s.send(b"hi\r\n.\r\n")
        assert s.codes() == ["250 2.0.0"]
    for _, message in s.store.received:
        m = re.search(rb"with ESMTP id ([0-9a-f]{16});", message)
        assert m is not None, message
        ids.append(m.group(1))
    assert len(set(ids)) == 3


@pytest.mark.parametrize(
    "times",
    [
        [1_700_000_000.5, 1_700_000_000.9, 1_700_000_001.6, 1_700_000_060.6, 1_700_000_060.6],
        [1_700_000_000.9999999, 1_700_003_601.0, 1_700_003_601.0005, 1_600_000_000.0],
    ],
)
def test_received_date_follows_the_clock(times: list[float]) -> None:
    from datetime import UTC, datetime
    from email.utils import format_datetime

    for now in times:
        s = connect(now=now)
        s.begin()
        s.send(b"hi\r\n.\r\n")
        header = s.store.received[-1][1].split(b"\r\n")[2]
        expected = format_datetime(datetime.fromtimestamp(now, UTC))
        assert header == b"\t" + expected.encode(), (now, header)


def test_250_names_queue_id_from_store() -> None:
    s = connect()
    s.begin()
    s.send(b"hi\r\n.\r\n")
    assert s.replies() == ["250 2.0.0 OK queued as Q123"]


def test_no_reply_until_store_fires() -> None:
    s = connect()
    s.store.mode = "pending"
    s.begin()
    s.send(b"hi\r\n.\r\n")
    assert s.lines() == []
    s.store.pending[0].callback(None)
    assert s.codes() == ["250 2.0.0"]


def test_store_failure_is_451_and_never_250() -> None:
    s = connect()
    s.store.mode = "unavailable"
    s.begin()
    s.send(b"hi\r\n.\r\nNOOP\r\n")
    codes = s.codes()
    assert codes == ["451 4.3.0", "250 2.0.0"]  # the 250 is the NOOP's


def test_store_failure_fired_later_is_451() -> None:
    s = connect()
    s.store.mode = "pending"
    s.begin()
    s.send(b"hi\r\n.\r\n")
    s.store.pending[0].errback(StoreUnavailable("replica lost"))
    assert s.codes() == ["451 4.3.0"]


def test_a_store_that_is_down_is_one_warning_not_a_traceback() -> None:
    s = connect()
    s.store.mode = "pending"
    s.begin()
    with capturedLogs() as events:
        s.send(b"hi\r\n.\r\n")
        s.store.pending[0].errback(StoreUnavailable("redis: store got no answer within 5s"))
    assert s.codes() == ["451 4.3.0"]
    [event] = [e for e in events if "spool store" in e.get("log_format", "")]
    assert event["log_level"] is LogLevel.warn and "log_failure" not in event
    assert event["why"] == "redis: store got no answer within 5s"
    assert not [e for e in events if "log_failure" in e]


def test_store_raising_is_451() -> None:
    s = connect()
    s.store.mode = "raise"
    s.begin()
    s.send(b"hi\r\n.\r\n")
    assert s.codes() == ["451 4.3.0"]


def test_store_full_is_452() -> None:
    s = connect()
    s.store.mode = "full"
    s.begin()
    s.send(b"hi\r\n.\r\n")
    assert s.codes() == ["452 4.3.1"]


def test_transaction_is_reset_after_store_failure() -> None:
    s = connect()
    s.store.mode = "unavailable"
    s.begin()
    s.send(b"hi\r\n.\r\nDATA\r\n")
    assert s.codes() == ["451 4.3.0", "503 5.5.1"]


def test_connection_lost_while_storing_writes_nothing() -> None:
    s = connect()
    s.store.mode = "pending"
    s.begin()
    s.send(b"hi\r\n.\r\n")
    s.protocol.connectionLost()
    s.store.pending[0].callback("Q1")
    assert s.lines() == []


# -- timeouts -----------------------------------------------------------------


def test_idle_timeout_is_421_and_closes() -> None:
    s = connect(idle_timeout=30)
    s.clock.advance(29)
    assert s.lines() == []
    s.clock.advance(1)
    assert s.lines() == [f"421 4.4.2 {HOST} Timeout"]
    assert s.transport.disconnecting


def test_command_restarts_idle_timer() -> None:
    s = connect(idle_timeout=30)
    s.clock.advance(20)
    s.send(b"NOOP\r\n")
    s.clock.advance(20)
    assert s.codes() == ["250 2.0.0"]
    assert not s.transport.disconnecting


def test_data_timeout_applies_during_data() -> None:
    s = connect(idle_timeout=30, data_timeout=100)
    s.begin()
    s.clock.advance(99)
    s.send(b"more\r\n")
    s.clock.advance(99)
    assert s.lines() == []
    s.clock.advance(1)
    assert s.codes() == ["421 4.4.2"]


def test_no_timeout_while_store_is_pending() -> None:
    s = connect(idle_timeout=30)
    s.store.mode = "pending"
    s.begin()
    s.send(b"hi\r\n.\r\n")
    s.clock.advance(1000)
    assert s.lines() == []
    s.store.pending[0].callback(None)
    assert s.codes() == ["250 2.0.0"]
    s.clock.advance(30)
    assert s.codes() == ["421 4.4.2"]


def test_no_timer_left_after_quit() -> None:
    s = connect()
    s.send(b"QUIT\r\n")
    assert s.clock.getDelayedCalls() == []


def test_no_timer_left_after_connection_lost() -> None:
    s = connect()
    s.protocol.connectionLost()
    assert s.clock.getDelayedCalls() == []


# -- logging ------------------------------------------------------------------


def test_accepted_message_is_logged_with_client() -> None:
    s = connect()
    s.begin()
    with capturedLogs() as events:
        s.send(b"hi\r\n.\r\n")
    texts = [formatEvent(e) for e in events]
    assert any("accepted" in t and CLIENT_IP in t for t in texts), texts


def test_accepted_message_is_one_line_naming_sender_recipients_and_size() -> None:
    s = connect()
    s.begin("bob@example.com", "carol@example.org")
    with capturedLogs() as events:
        s.send(b"hi\r\n.\r\n")
    texts = [formatEvent(e) for e in events]
    [line] = [t for t in texts if "accepted" in t]
    size = len(s.store.received[0][1])
    assert line.endswith(
        f"from {CLIENT_IP} helo client.sender.example: <alice@sender.example> to "
        f"<bob@example.com>, <carol@example.org>, {size} octets"
    ), line
    assert "(Q123)" in line


def test_accepted_message_with_null_sender_is_logged() -> None:
    s = connect()
    s.begin(mail=b"MAIL FROM:<>")
    with capturedLogs() as events:
        s.send(b"hi\r\n.\r\n")
    texts = [formatEvent(e) for e in events]
    assert any(": <> to <bob@example.com>," in t for t in texts), texts


def test_refusal_is_logged_with_client() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
    with capturedLogs() as events:
        s.send(b"RCPT TO:<x@elsewhere.example>\r\n")
    texts = [formatEvent(e) for e in events]
    assert any("550 5.7.1" in t and CLIENT_IP in t for t in texts), texts


# -- property -----------------------------------------------------------------

_TOKENS = [
    b"EHLO c.example\r\n",
    b"HELO c.example\r\n",
    b"MAIL FROM:<a@b.example>\r\n",
    b"MAIL FROM:<> SIZE=10 BODY=8BITMIME\r\n",
    b"RCPT TO:<bob@example.com>\r\n",
    b"RCPT TO:<x@elsewhere.example>\r\n",
    b"RCPT TO:<bob%elsewhere.example@example.com>\r\n",
    b"RCPT TO:<@example.com:x@elsewhere.example>\r\n",
    b'RCPT TO:<"x@elsewhere.example"@example.com>\r\n',
    b"RCPT TO:<x@[192.0.2.1]>\r\n",
    b"RCPT TO:<x@mx.hub.example>\r\n",
    b"RCPT TO:<x@evilexample.com>\r\n",
    b"RCPT TO:<x@sub.example.com>\r\n",
    b"RCPT TO:<x@example.org.elsewhere.example>\r\n",
    b"DATA\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"..\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"\x00",
    b"x" * 70,
    "ü".encode(),
]
_LINE = re.compile(r"[2-5][0-9][0-9][ -][ -~]*\Z")


_RCPTS = [t for t in _TOKENS if t.startswith(b"RCPT")]
_BODY = [b"Subject: x\r\n", b"\r\n", b"..dot\r\n", b"\n.\n", b"\r\n.\n", b"\n", b"\r", b"y" * 60]


@st.composite
def _transactions(draw: st.DrawFn) -> bytes:
    """A mostly well-formed transaction, so that messages do reach receive()."""
    rcpts = draw(st.lists(st.sampled_from(_RCPTS), min_size=1, max_size=5))
    body = draw(st.lists(st.one_of(st.sampled_from(_BODY), st.binary(max_size=20)), max_size=8))
    end = draw(st.sampled_from([b"\r\n.\r\n", b".\r\n", b"\n.\r\n"]))
    return b"MAIL FROM:<a@b.example>\r\n" + b"".join(rcpts) + b"DATA\r\n" + b"".join(body) + end


@st.composite
def _sessions(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    parts = draw(
        st.lists(
            st.one_of(_transactions(), st.sampled_from(_TOKENS), st.binary(max_size=40)),
            max_size=20,
        )
    )
    stream = draw(st.sampled_from([b"", b"EHLO c.example\r\n"])) + b"".join(parts)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=8))
    return stream, sorted(set(cuts))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(session=_sessions(), slow=st.booleans(), normalise=st.booleans())
def test_any_input_gives_valid_replies_and_never_relays(
    session: tuple[bytes, list[int]], slow: bool, normalise: bool
) -> None:
    stream, cuts = session
    allowed = domain_check(DOMAINS, HOST)
    pending: list[Deferred[Any]] = []

    def check(address: Address) -> Deferred[Any]:
        if not slow:
            return allowed(address)
        d: Deferred[Any] = Deferred()
        pending.append(d)
        return d.addCallback(lambda _: allowed(address))

    s = connect(
        check=check,
        max_line_length=64,
        max_message_size=300,
        max_data_line_length=50,
        max_recipients=3,
        bare_line_endings="normalise" if normalise else "reject",
    )
    with capturedLogs() as events:
        bounds = [0, *cuts, len(stream)]
        for start, end in zip(bounds, bounds[1:], strict=False):
            s.send(stream[start:end])
            while pending:
                pending.pop(0).callback(None)
        s.clock.advance(10_000)
    assert not [e for e in events if "log_failure" in e], [formatEvent(e) for e in events]
    out = s.transport.value()
    assert out == b"" or out.endswith(b"\r\n")
    for line in out.decode("ascii").split("\r\n")[:-1]:
        assert _LINE.match(line), line
    for envelope, _ in s.store.received:
        assert envelope.recipients
        assert all(r.domain.lower() in ("example.com", "example.org") for r in envelope.recipients)


# -- limits that keep one client from hurting others ---------------------------


class Listener:
    """Several connections to one factory, from chosen client IPs."""

    def __init__(self, **limits: Any) -> None:
        self.clock = Clock()
        self.store = Store()
        self.factory = SMTPFactory(
            HOST, SmtpConfig(**limits), domain_check(DOMAINS, HOST), self.store, self.clock
        )

    def connect(self, ip: str = CLIENT_IP) -> tuple[SMTPServerProtocol, StringTransport]:
        t = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000))
        p = self.factory.buildProtocol(t.getPeer())
        p.makeConnection(t)
        return p, t


def test_connections_over_per_ip_limit_get_421_and_close() -> None:
    listener = Listener(max_connections_per_ip=2)
    listener.connect()
    listener.connect()
    with capturedLogs() as events:
        _, t = listener.connect()
    assert t.value() == f"421 4.7.0 {HOST} Too many connections, try later\r\n".encode()
    assert t.disconnecting
    assert any(CLIENT_IP in formatEvent(e) and "421 4.7.0" in formatEvent(e) for e in events)
    _, other = listener.connect("203.0.113.5")
    assert other.value().startswith(b"220 ")


def test_connections_over_total_limit_get_421() -> None:
    listener = Listener(max_connections=2)
    listener.connect("203.0.113.1")
    listener.connect("203.0.113.2")
    _, t = listener.connect("203.0.113.3")
    assert t.value().startswith(b"421 4.7.0")


def test_closed_connection_frees_its_slot() -> None:
    listener = Listener(max_connections_per_ip=1)
    p, _ = listener.connect()
    p.connectionLost()
    _, t = listener.connect()
    assert t.value().startswith(b"220 ")
    refused, _ = listener.connect()
    refused.connectionLost()
    assert listener.factory.limiter.per_ip == {CLIENT_IP: 1}


def test_messages_per_connection_limit_is_421_at_next_mail() -> None:
    s = connect(max_messages_per_connection=2)
    for _ in range(2):
        s.begin()
        s.send(b"hi\r\n.\r\n")
        assert s.codes() == ["250 2.0.0"]
    s.send(b"MAIL FROM:<alice@sender.example>\r\nRCPT TO:<bob@example.com>\r\n")
    assert s.codes() == ["421 4.7.0"]
    assert s.transport.disconnecting


def test_rate_per_ip_is_450_at_mail_and_recovers_with_time() -> None:
    listener = Listener(max_messages_per_minute_per_ip=2)
    p, t = listener.connect()
    p.dataReceived(b"EHLO c.example\r\n")
    t.clear()
    for _ in range(2):
        p.dataReceived(b"MAIL FROM:<a@b.example>\r\nRSET\r\n")
    p2, t2 = listener.connect()
    t2.clear()
    p2.dataReceived(b"EHLO c.example\r\n")
    t2.clear()
    with capturedLogs() as events:
        p2.dataReceived(b"MAIL FROM:<a@b.example>\r\n")
    assert t2.value().startswith(b"450 4.7.1")
    assert any(CLIENT_IP in formatEvent(e) and "450 4.7.1" in formatEvent(e) for e in events)
    listener.clock.advance(30)
    t2.clear()
    p2.dataReceived(b"MAIL FROM:<a@b.example>\r\n")
    assert t2.value().startswith(b"250 2.1.0")


def test_trickled_command_is_cut_off_at_idle_timeout() -> None:
    """One byte a second never completes a command: the timeout counts from its start."""
    s = connect(idle_timeout=30)
    for i in range(29):
        s.clock.advance(1)
        s.send(b"NOOP"[i % 4 : i % 4 + 1])
    assert s.lines() == []
    s.clock.advance(1)
    assert s.codes() == ["421 4.4.2"]
    assert s.transport.disconnecting


def test_trickled_data_line_is_cut_off_at_data_timeout() -> None:
    s = connect(idle_timeout=30, data_timeout=100)
    s.begin()
    for _ in range(99):
        s.clock.advance(1)
        s.send(b"x")
    assert s.lines() == []
    s.clock.advance(1)
    assert s.codes() == ["421 4.4.2"]


def test_trickled_data_lines_are_cut_off_at_data_total_timeout() -> None:
    s = connect(idle_timeout=30, data_timeout=100, data_total_timeout=500)
    s.begin()
    for _ in range(9):
        s.clock.advance(50)
        s.send(b"x\r\n")
    assert s.lines() == []
    s.clock.advance(50)
    assert s.codes() == ["421 4.4.2"]


def test_header_over_limit_is_552_5_3_4() -> None:
    s = connect(max_header_size=100)
    s.begin()
    s.send(b"Subject: " + b"x" * 100 + b"\r\n\r\nbody\r\n.\r\n")
    assert s.codes() == ["552 5.3.4"]
    assert s.store.received == []


def test_header_without_body_counts_whole_message() -> None:
    s = connect(max_header_size=20)
    s.begin()
    s.send(b"Subject: " + b"x" * 20 + b"\r\n.\r\n")
    assert s.codes() == ["552 5.3.4"]


def test_header_at_limit_and_large_body_is_accepted() -> None:
    header = b"Subject: " + b"x" * 89 + b"\r\n"
    assert len(header) == 100
    s = connect(max_header_size=100)
    s.begin()
    s.send(header + b"\r\n" + b"y" * 500 + b"\r\n.\r\n")
    assert s.codes() == ["250 2.0.0"]


# -- SMTPUTF8 (RFC 6531) -----------------------------------------------------


def test_utf8_addresses_with_smtputf8_are_accepted_and_flagged() -> None:
    s = connect()
    s.begin("jürgen@example.com", mail="MAIL FROM:<jörg@bücher.example> SMTPUTF8".encode())
    s.send("Subject: grüße\r\n\r\nhallo\r\n.\r\n".encode())
    assert s.codes() == ["250 2.0.0"]
    [(envelope, message)] = s.store.received
    assert envelope.smtputf8
    assert str(envelope.sender) == "jörg@bücher.example"
    assert [str(r) for r in envelope.recipients] == ["jürgen@example.com"]
    assert body_of(message) == "Subject: grüße\r\n\r\nhallo\r\n".encode()
    assert b"with UTF8ESMTP id" in message


def test_ascii_smtputf8_transaction_is_flagged() -> None:
    s = connect()
    s.begin(mail=b"MAIL FROM:<a@b.example> SMTPUTF8")
    s.send(b"hi\r\n.\r\n")
    assert s.store.received[0][0].smtputf8


def test_envelope_without_smtputf8_is_not_flagged() -> None:
    s = connect()
    s.begin()
    s.send(b"hi\r\n.\r\n")
    assert not s.store.received[0][0].smtputf8


def test_utf8_recipient_without_smtputf8_is_553_5_6_7() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
    s.lines()
    s.send("RCPT TO:<jürgen@example.com>\r\n".encode())
    assert s.codes() == ["553 5.6.7"]


def test_smtputf8_with_value_is_501() -> None:
    assert mail(connect(), b"MAIL FROM:<a@b.example> SMTPUTF8=yes") == ["501 5.5.4"]


def test_smtputf8_after_helo_is_555() -> None:
    s = connect()
    s.send(b"HELO c.example\r\n")
    s.lines()
    s.send(b"MAIL FROM:<a@b.example> SMTPUTF8\r\n")
    assert s.codes() == ["555 5.5.4"]


def test_invalid_utf8_in_rcpt_is_553_5_6_7() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example> SMTPUTF8\r\n")
    s.lines()
    s.send(b"RCPT TO:<j\xfcrgen@example.com>\r\n")
    assert s.codes() == ["553 5.6.7"]


def test_utf8_domain_outside_configured_domains_is_relaying_denied() -> None:
    s = connect()
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example> SMTPUTF8\r\n")
    s.lines()
    s.send("RCPT TO:<bob@exämple.com>\r\n".encode())
    assert s.codes() == ["550 5.7.1"]


def test_reply_quoting_utf8_address_stays_ascii() -> None:
    def refuse(address: Address) -> Deferred[Any]:
        return succeed(Reply(550, "5.1.1", f"<{address}> unknown"))

    s = connect(check=refuse)
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example> SMTPUTF8\r\n")
    s.lines()
    s.send("RCPT TO:<jürgen@example.com>\r\n".encode())
    [line] = s.lines()
    assert line.startswith("550 5.1.1 <j") and line.isascii()


# -- more properties: what is stored is what was sent ---------------------------

_PIECES = [
    b"Subject: x\r\n",
    b"From: a@b.example\r\n",
    b"\r\n",
    b".",
    b"..",
    b".\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r.\r",
    b"\n",
    b"\r",
    b"\x00",
    b"\x00.\x00",
    "grüße ".encode(),
    b"z" * 30,
]


def _stuff(body: bytes) -> bytes:
    """What a correct client sends for ``body`` (RFC 5321 4.5.2)."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    stuffed = (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]
    return (
        stuffed + b".\r\n" if stuffed.endswith(b"\r\n") or not stuffed else stuffed + b"\r\n.\r\n"
    )


def _normalised(body: bytes) -> bytes:
    """The documented normalisation: each bare CR and each bare LF becomes CRLF."""
    out = bytearray()
    i = 0
    while i < len(body):
        if body[i : i + 2] == b"\r\n":
            out += b"\r\n"
            i += 2
        elif body[i : i + 1] in (b"\r", b"\n"):
            out += b"\r\n"
            i += 1
        else:
            out += body[i : i + 1]
            i += 1
    return bytes(out)


@settings(max_examples=400, deadline=None)
@given(
    body=st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=12)), max_size=25).map(
        b"".join
    ),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
    normalise=st.booleans(),
    remove_nul=st.booleans(),
)
def test_stored_message_is_exactly_what_was_sent_or_refused_as_documented(
    body: bytes, cuts: list[int], normalise: bool, remove_nul: bool
) -> None:
    """
    Refused with the first reply that applies, in order: size, NUL octets
    (unless removed), bare line ends (unless normalised), line length,
    header size.  Else stored as sent, less its NULs, then normalised.
    """
    limits = {"max_message_size": 250, "max_data_line_length": 60, "max_header_size": 80}
    s = connect(
        bare_line_endings="normalise" if normalise else "reject",
        nul_bytes="remove" if remove_nul else "reject",
        **limits,
    )
    s.begin()
    wire = _stuff(body)
    bounds = [0, *sorted({c for c in cuts if c < len(wire)}), len(wire)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        s.send(wire[start:end])
    codes = s.codes()
    sent = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
    has_nul = b"\x00" in sent
    if remove_nul:
        sent = sent.replace(b"\x00", b"")
    clean = _normalised(sent)
    lines = clean.split(b"\r\n")
    header = (
        0
        if clean.startswith(b"\r\n")
        else (clean.find(b"\r\n\r\n") + 2 if b"\r\n\r\n" in clean else len(clean))
    )
    if len(wire) - 3 > 250:
        expected = "552 5.3.4"
    elif has_nul and not remove_nul:
        expected = "554 5.6.0"
    elif clean != sent and not normalise:
        expected = "554 5.6.0"
    elif any(len(line) > 60 for line in lines):
        expected = "554 5.6.0"
    elif header > 80:
        expected = "552 5.3.4"
    else:
        expected = "250 2.0.0"
    event(expected)
    assert codes == [expected], (wire, codes)
    if expected == "250 2.0.0":
        [(_, message)] = s.store.received
        assert body_of(message) == clean
        assert message.count(b"\r") == message.count(b"\n") == message.count(b"\r\n")
        assert b"\x00" not in message
    else:
        assert s.store.received == []


_UTF8_TOKENS = [
    "MAIL FROM:<jörg@b.example> SMTPUTF8\r\n".encode(),
    "MAIL FROM:<jörg@b.example>\r\n".encode(),
    b"MAIL FROM:<a@b.example> SMTPUTF8\r\n",
    "RCPT TO:<jürgen@example.com>\r\n".encode(),
    "RCPT TO:<bob@exämple.com>\r\n".encode(),
    b"RCPT TO:<bob@example.com.evil.example>\r\n",
    b"RCPT TO:<unknown@example.com>\r\n",
    b"RCPT TO:<j\xfcrgen@example.com>\r\n",
    b"STARTTLS\r\n",
    b"MAIL FROM:<a@b.example> SMTPUTF8=1\r\n",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(
        st.one_of(
            st.sampled_from(_TOKENS + _UTF8_TOKENS),
            _transactions(),
            st.text(max_size=30).map(lambda t: t.encode("utf-8")),
            st.binary(max_size=30),
        ),
        max_size=25,
    ),
    cuts=st.lists(st.integers(0, 3000), max_size=8),
)
def test_any_input_with_utf8_and_validation_never_relays_or_accepts_unknown(
    parts: list[bytes], cuts: list[int]
) -> None:
    from mailhub.smtp.recipients import StaticRecipients
    from mailhub.smtp.server import chain_checks

    known = StaticRecipients(
        ["bob@example.com", "one@example.com", "two@example.com", "jürgen@example.com"]
    )
    check = chain_checks(domain_check(DOMAINS, HOST), known)
    s = connect(check=check, max_line_length=80, max_message_size=300, max_recipients=3)
    stream = b"EHLO c.example\r\n" + b"".join(parts)
    bounds = [0, *sorted({c for c in cuts if c < len(stream)}), len(stream)]
    with capturedLogs() as events:
        for start, end in zip(bounds, bounds[1:], strict=False):
            s.send(stream[start:end])
        s.clock.advance(10_000)
    assert not [e for e in events if "log_failure" in e], [formatEvent(e) for e in events]
    out = s.transport.value()
    assert out == b"" or out.endswith(b"\r\n")
    for line in out.decode("ascii").split("\r\n")[:-1]:
        assert _LINE.match(line), line
    for envelope, _ in s.store.received:
        assert envelope.recipients
        for r in envelope.recipients:
            assert str(r).lower() in (
                "bob@example.com",
                "one@example.com",
                "two@example.com",
                "jürgen@example.com",
            )
        assert envelope.smtputf8 or all(str(r).isascii() for r in envelope.recipients)


def test_quit_frees_the_connection_slot_before_the_connection_closes() -> None:
    """
    QUIT gives the connection's slot back as its 221 is written, before the
    connection is lost: a client that reconnects at once is not refused, and
    the slot is not given back a second time when the connection goes.
    """
    listener = Listener(max_connections_per_ip=1)
    p, t = listener.connect()
    p.dataReceived(b"QUIT\r\n")
    assert t.value().endswith(f"221 2.0.0 {HOST} closing connection\r\n".encode())
    assert t.disconnecting
    assert listener.factory.limiter.per_ip == {}
    assert listener.factory.limiter.connections == 0
    again, t2 = listener.connect()
    assert t2.value().startswith(b"220 ")
    p.connectionLost()
    assert listener.factory.limiter.per_ip == {CLIENT_IP: 1}
    assert listener.factory.limiter.connections == 1
    again.connectionLost()
    assert listener.factory.limiter.per_ip == {} and listener.factory.limiter.connections == 0


# -- replies on a real socket: sent at once, in order --------------------------


def test_send_now_leaves_other_transports_to_write() -> None:
    """On a transport that is not plain TCP, ``_send_now`` sends nothing and gives all back."""
    t = StringTransport()
    data = b"250 2.0.0 OK\r\n"
    assert _send_now(t, data) == data
    assert t.value() == b""


class _Made(Protocol):
    def __init__(self, made: Deferred[Protocol]) -> None:
        self._made = made

    def connectionMade(self) -> None:
        self._made.callback(self)


@asynccontextmanager
async def plain_tcp(small_buffers: bool = False) -> AsyncIterator[tuple[Any, socket.socket]]:
    """
    A plain TCP connection over 127.0.0.1: the reactor's transport of its
    server side, and the client's blocking socket.  With ``small_buffers``
    the kernel holds little of what the server sends while the client does
    not read, so sends are partial.
    """
    made: Deferred[Protocol] = Deferred()
    factory = Factory.forProtocol(lambda: _Made(made))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if small_buffers:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(10)
        client.connect(("127.0.0.1", port.getHost().port))
        transport = (await made).transport
        if small_buffers:
            transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        try:
            yield transport, client
        finally:
            transport.abortConnection()
    finally:
        client.close()
        await port.stopListening()


def _read(sock: socket.socket, n: int) -> bytes:
    """``n`` octets from ``sock``, or fewer if it closes (to run in a thread)."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


@pytest_twisted.ensureDeferred
async def test_send_now_sends_at_once_on_a_plain_tcp_connection() -> None:
    """On plain TCP with nothing queued the data is in the client's socket on return."""
    async with plain_tcp() as (transport, client):
        assert type(transport) is tcp.Server
        assert _send_now(transport, b"220 hello\r\n") == b""
        # No turn of the reactor in between: the kernel has it already.
        client.setblocking(False)
        assert client.recv(100) == b"220 hello\r\n"


@pytest_twisted.ensureDeferred
async def test_send_now_waits_behind_data_written_before() -> None:
    """Data given to ``write`` and not yet sent goes first: ``_send_now`` sends nothing."""
    async with plain_tcp() as (transport, client):
        transport.write(b"250 first\r\n")
        assert _send_now(transport, b"250 second\r\n") == b"250 second\r\n"
        transport.write(b"250 second\r\n")
        assert await deferToThread(_read, client, 22) == b"250 first\r\n250 second\r\n"


@pytest_twisted.ensureDeferred
async def test_send_now_waits_behind_data_the_socket_did_not_take() -> None:
    """
    While part of an earlier write waits in the transport's buffer (the
    client reads slowly), ``_send_now`` sends nothing.
    """
    async with plain_tcp(small_buffers=True) as (transport, client):
        big = bytes(range(256)) * 4096
        transport.write(big)
        for _ in range(100):
            await deferLater(reactor, 0.01, lambda: None)
            if transport.dataBuffer and not transport._tempDataBuffer:
                break
        assert transport.dataBuffer, "the socket took it all: no partial send to test"
        assert _send_now(transport, b"tail") == b"tail"
        transport.write(b"tail")
        assert await deferToThread(_read, client, len(big) + 4) == big + b"tail"


@pytest_twisted.ensureDeferred
async def test_send_now_gives_back_what_the_socket_did_not_take() -> None:
    """A partial send returns exactly the rest, which written after arrives in order."""
    async with plain_tcp(small_buffers=True) as (transport, client):
        big = bytes(range(256)) * 4096
        rest = _send_now(transport, big)
        sent = len(big) - len(rest)
        assert 0 < sent < len(big)
        assert rest == big[sent:]
        transport.write(rest)
        assert await deferToThread(_read, client, len(big)) == big


class _FailingSocket:
    """A socket whose ``send`` fails; everything else is the real one's."""

    def __init__(self, real: socket.socket) -> None:
        self._real = real

    def send(self, data: bytes) -> int:
        raise ConnectionResetError(104, "Connection reset by peer")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest_twisted.ensureDeferred
async def test_send_now_gives_all_back_on_socket_error() -> None:
    """A socket error is left to the transport: ``_send_now`` gives all the data back."""
    async with plain_tcp() as (transport, client):
        real = transport.socket
        transport.socket = _FailingSocket(real)
        try:
            assert _send_now(transport, b"250 OK\r\n") == b"250 OK\r\n"
        finally:
            transport.socket = real


@pytest_twisted.ensureDeferred
async def test_send_now_leaves_tls_to_the_transport() -> None:
    """Over TLS the bytes must go through the TLS layer: ``_send_now`` gives all back."""
    async with plain_tcp() as (transport, client):
        transport.TLS = True
        try:
            assert _send_now(transport, b"250 OK\r\n") == b"250 OK\r\n"
        finally:
            del transport.TLS
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(100)


@pytest.fixture
def listen() -> Iterator[Callable[..., tuple[int, SMTPFactory]]]:
    """Starts SMTP listeners on 127.0.0.1 with the real reactor (``listen(**limits)``)."""
    ports: list[Any] = []

    def start(**limits: Any) -> tuple[int, SMTPFactory]:
        check = domain_check(DOMAINS, HOST)
        factory = SMTPFactory(HOST, SmtpConfig(**limits), check, Store(), reactor)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port, factory

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


class _Client:
    """A plain SMTP client on a blocking socket (to run in a thread)."""

    def __init__(self, port: int, small_buffer: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if small_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")

    def reply(self) -> list[bytes]:
        """The lines of the next reply."""
        lines = []
        while True:
            line = self.file.readline()
            assert line.endswith(b"\r\n"), (lines, line)
            lines.append(line)
            if line[3:4] == b" ":
                return lines

    def replies(self, n: int) -> list[bytes]:
        """The final lines of the next ``n`` replies."""
        return [self.reply()[-1] for _ in range(n)]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> bytes:
        """Whatever comes before the server closes, then close."""
        rest = self.file.read()
        self.file.close()
        self.sock.close()
        return rest


_BURST = b"NOOP\r\nVRFY someone\r\nFROB\r\n"
_BURST_REPLIES = [
    b"250 2.0.0 OK\r\n",
    b"252 2.0.0 Cannot VRFY user, but will accept message\r\n",
    b"500 5.5.2 Command not recognized\r\n",
]


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_real_socket_session_gets_every_reply_in_order(
    listen: Callable[..., tuple[int, SMTPFactory]],
) -> None:
    """
    Over a real socket, each reply arrives whole and in order: the banner,
    the multi-line EHLO and HELP, a pipelined transaction, and a burst of
    thousands of pipelined commands whose replies the client reads slowly.
    """
    port, factory = listen()

    def session() -> dict[str, Any]:
        c = _Client(port, small_buffer=True)
        seen: dict[str, Any] = {"banner": c.reply()}
        c.send(b"EHLO client.example\r\n")
        seen["ehlo"] = c.reply()
        c.send(
            b"MAIL FROM:<alice@sender.example>\r\nRCPT TO:<bob@example.com>\r\n"
            b"RCPT TO:<eve@elsewhere.example>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\n"
        )
        seen["transaction"] = c.replies(5)
        c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
        seen["data"] = c.replies(1)
        c.send(_BURST * 3000 + b"HELP\r\n")
        seen["burst"] = c.replies(3 * 3000)
        seen["help"] = c.reply()
        c.send(b"QUIT\r\n")
        seen["quit"] = c.replies(1)
        seen["after"] = c.close()
        return seen

    seen = await deferToThread(session)
    assert seen["banner"] == [f"220 {HOST} ESMTP mailhub\r\n".encode()]
    assert seen["ehlo"] == [
        f"250-{HOST} Hello 127.0.0.1\r\n".encode(),
        b"250-PIPELINING\r\n",
        b"250-SIZE %d\r\n" % SmtpConfig().max_message_size,
        b"250-8BITMIME\r\n",
        b"250-SMTPUTF8\r\n",
        b"250 ENHANCEDSTATUSCODES\r\n",
    ]
    assert [line[:9] for line in seen["transaction"]] == [
        b"250 2.1.0", b"250 2.1.5", b"550 5.7.1", b"250 2.1.5", b"354 End d",
    ]  # fmt: skip
    assert seen["data"] == [b"250 2.0.0 OK queued as Q123\r\n"]
    assert seen["burst"] == _BURST_REPLIES * 3000
    assert seen["help"][-1].startswith(b"214 2.0.0 Supported commands: EHLO HELO")
    assert seen["quit"] == [f"221 2.0.0 {HOST} closing connection\r\n".encode()]
    assert seen["after"] == b""


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_client_reconnecting_after_221_is_greeted_not_refused(
    listen: Callable[..., tuple[int, SMTPFactory]],
) -> None:
    """
    With one connection per IP, a client that reads the 221 of its QUIT and
    reconnects at once (an MTA with more mail) is greeted with 220, every time.
    """
    port, factory = listen(max_connections_per_ip=1)

    def sessions() -> list[bytes]:
        greetings = []
        c = _Client(port)
        for _ in range(20):
            greetings.append(c.reply()[-1][:4])
            c.send(b"QUIT\r\n")
            assert c.reply()[-1].startswith(b"221 ")
            c.close()
            c = _Client(port)
        greetings.append(c.reply()[-1][:4])
        c.send(b"QUIT\r\n")
        c.close()
        return greetings

    assert await deferToThread(sessions) == [b"220 "] * 21


def _pending_listener(**limits: Any) -> tuple[Any, Store]:
    """A real listener on 127.0.0.1 whose store answers only when told (``store.pending``)."""
    store = Store()
    store.mode = "pending"
    factory = SMTPFactory(HOST, SmtpConfig(**limits), domain_check(DOMAINS, HOST), store, reactor)
    return reactor.listenTCP(0, factory, interface="127.0.0.1"), store


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await deferLater(reactor, 0.01, lambda: None)


_TRANSACTION = b"MAIL FROM:<alice@sender.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_client_that_shuts_down_its_side_still_gets_its_replies() -> None:
    """
    A client sends its message and QUIT and shuts down its sending side at
    once (``nc -N``, scripts, some MTAs), while the store is still at work:
    it gets the 250 and the 221, then the connection closes; the message is
    stored once.  (Closing at the client's end of input would lose the 250
    and have the client send the message again.)
    """
    port, store = _pending_listener()

    def session() -> tuple[list[bytes], bytes]:
        c = _Client(port.getHost().port)
        c.reply()
        c.send(b"EHLO client.example\r\n")
        c.reply()
        c.send(_TRANSACTION)
        c.replies(3)
        c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        c.sock.shutdown(socket.SHUT_WR)
        return c.replies(2), c.close()

    try:
        result = deferToThread(session)
        await _until(lambda: bool(store.pending))
        # Time for the client's end of input to reach the server first.
        await deferLater(reactor, 0.3, lambda: None)
        store.pending[0].callback("Q9")
        replies, after = await result
    finally:
        await port.stopListening()
    assert replies == [
        b"250 2.0.0 OK queued as Q9\r\n",
        f"221 2.0.0 {HOST} closing connection\r\n".encode(),
    ]
    assert after == b""
    assert len(store.received) == 1


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_a_closed_connection_keeps_its_slot_while_its_store_is_pending() -> None:
    """
    With one connection allowed, a client that sends a message and resets
    the connection cannot come back while the store still holds that message: the
    slot is the connection's until the store answers.  Then it is free
    again.
    """
    port, store = _pending_listener(max_connections=1)
    number = port.getHost().port

    def send_and_close() -> None:
        c = _Client(number)
        c.reply()
        c.send(b"EHLO client.example\r\n")
        c.reply()
        c.send(_TRANSACTION)
        c.replies(3)
        c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
        # Reset, not a shutdown: the server's connection is gone at once.
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sock.close()

    def banner() -> bytes:
        c = _Client(number)
        line = c.reply()[-1][:4]
        c.sock.close()
        return line

    try:
        await deferToThread(send_and_close)
        await _until(lambda: bool(store.pending))
        await deferLater(reactor, 0.3, lambda: None)  # the close reaches the server
        assert await deferToThread(banner) == b"421 "
        store.pending[0].callback("Q9")
        # The connection closes once its reply is written: a turn of the
        # reactor or two, then the slot is free.
        for _ in range(100):
            if await deferToThread(banner) == b"220 ":
                break
            await deferLater(reactor, 0.02, lambda: None)
        else:
            raise AssertionError("the slot stayed taken after the store answered")
    finally:
        await port.stopListening()
    assert len(store.received) == 1


# -- found by scripts/mutate ---------------------------------------------------


def test_colon_in_a_sender_local_part_is_not_a_source_route() -> None:
    """Only a reverse path starting with ``@`` is a source route to strip; ``a:b@...`` is malformed."""
    assert mail(connect(), b"MAIL FROM:<a:b@sender.example>") == ["553 5.1.7"]


@pytest.mark.parametrize(
    "address",
    [b'"bob@elsewhere.example@example.com', b"bob%elsewhere.example", b"bob!elsewhere.example"],
)
def test_malformed_recipient_with_routing_characters_is_refused_as_relaying(address: bytes) -> None:
    """A recipient that is malformed *and* hides a second destination gets ``550 5.7.1``, not ``501``."""
    assert rcpt(connect(), b"RCPT TO:<" + address + b">") == ["550 5.7.1"]


def test_repeated_recipient_is_checked_once_and_accepted_at_the_recipient_limit() -> None:
    """A recipient given again is ``250`` without asking the check again, even at ``max_recipients``."""
    asked: list[Address] = []

    def check(address: Address) -> Deferred[Any]:
        asked.append(address)
        return succeed(None)

    s = connect(check=check, max_recipients=1)
    codes = rcpt(s, b"RCPT TO:<bob@example.com>", b"RCPT TO:<bob@example.com>")
    assert codes == ["250 2.1.5", "250 2.1.5"]
    assert asked == [Address("bob", "example.com")]


def test_temporary_refusal_from_a_recipient_check_reaches_the_client_as_it_is() -> None:
    """A check's own 4xx (``450 4.2.0``, say) is what the client gets, not a generic ``451 4.3.0``."""
    s = connect(check=lambda a: succeed(Reply(450, "4.2.0", "Mailbox busy")))
    assert rcpt(s, b"RCPT TO:<bob@example.com>") == ["450 4.2.0"]


def test_recipient_check_answering_with_a_2xx_reply_is_a_check_failure() -> None:
    """A check must fire ``None`` to accept: a ``Reply(250)`` is not an acceptance but a ``451 4.3.0``."""
    s = connect(check=lambda a: succeed(Reply(250, "2.1.5", "fine")))
    assert rcpt(s, b"RCPT TO:<bob@example.com>", b"DATA") == ["451 4.3.0", "554 5.5.1"]


def test_message_at_size_limit_is_accepted_when_the_end_marker_is_split() -> None:
    """A message of exactly ``max_message_size`` octets is accepted however its end marker is cut."""
    s = connect(max_message_size=10)
    s.begin()
    s.send(b"12345678\r\n.\r", b"\n")
    assert s.codes() == ["250 2.0.0"]


@pytest.mark.parametrize(
    ("limits", "message", "code"),
    [
        ({}, b"bare\nLF\r\n", "554 5.6.0"),
        ({"max_data_line_length": 10}, b"a line far too long\r\n", "554 5.6.0"),
        ({"max_header_size": 10}, b"Subject: a long header\r\n\r\nhi\r\n", "552 5.3.4"),
    ],
)
def test_refused_message_ends_its_transaction(limits: dict[str, Any], message: bytes, code: str) -> None:
    """After a message refused at the end of DATA, neither RCPT nor DATA goes on without a new MAIL."""
    s = connect(**limits)
    s.begin()
    s.send(message + b".\r\n")
    assert s.codes() == [code]
    s.send(b"RCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert s.codes() == ["503 5.5.1", "503 5.5.1"]
    assert s.store.received == []


def test_command_after_a_refused_message_has_the_idle_timeout_not_the_data_timeout() -> None:
    """Once DATA is over, refused or not, the next command has ``idle_timeout`` from there."""
    s = connect(idle_timeout=300, data_timeout=10)
    s.begin()
    s.send(b"bare\nLF\r\n.\r\n")
    assert s.codes() == ["554 5.6.0"]
    s.clock.advance(299)
    assert s.lines() == []
    assert not s.transport.disconnecting
    s.clock.advance(1)
    assert s.codes() == ["421 4.4.2"]


def test_address_of_254_octets_parses_and_of_255_is_too_long() -> None:
    """RFC 5321's path limit: 254 octets between the brackets parse, 255 are ``501 5.1.3``."""
    def address(length: int) -> str:
        # A 64-octet local part and a valid domain: only the length is wrong.
        return "l" * 64 + "@" + ".".join(["a" * 63, "b" * 63, "c" * (length - 65 - 128 - 12)]) + ".example.com"

    assert len(address(254)) == 254
    assert str(Address.parse(address(254))) == address(254)
    with pytest.raises(model.AddressError) as e:
        Address.parse(address(255))
    assert (e.value.code, e.value.enhanced, str(e.value)) == (501, "5.1.3", "address too long")

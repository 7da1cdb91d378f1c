"""
STARTTLS on the inbound listener.

First the protocol's decisions against a ``StringTransport`` that records
``startTLS``; then real sockets and real TLS, with Python's ``ssl`` and
``smtplib`` as the client in a thread (the tests run on the reactor).
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from mailhub.config import SmtpConfig, parse
from mailhub.model import Envelope
from mailhub.smtp.server import SMTPFactory, domain_check
from mailhub.smtp.tls import generate_self_signed, server_tls_options, tls_files

HOST = "mx.hub.example"


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A ``StringTransport`` that records ``startTLS`` and what was written before it."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.9", 5000))
        self.tls_started: Any = None
        self.before_tls = b""

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_started = contextFactory
        self.before_tls = self.value()
        self.clear()


class Received:
    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bytes]] = []

    def __call__(self, envelope: Envelope, message: bytes) -> Deferred[Any]:
        self.messages.append((envelope, message))
        return succeed("Q1")


def session(**limits: Any) -> tuple[Any, TLSStringTransport]:
    factory = SMTPFactory(
        HOST, SmtpConfig(**limits), domain_check(["example.com"], HOST), Received(), Clock(), tls=object()
    )
    transport = TLSStringTransport()
    protocol = factory.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    transport.clear()
    return protocol, transport


def codes(out: bytes) -> list[str]:
    lines = [x for x in out.decode("ascii").split("\r\n")[:-1] if x[3:4] != "-"]
    return [" ".join(x.split(" ")[:2]) for x in lines]


# -- the protocol's decisions ---------------------------------------------------


def test_ehlo_advertises_starttls_when_tls_is_configured() -> None:
    p, t = session()
    p.dataReceived(b"EHLO c.example\r\n")
    assert b"250-STARTTLS\r\n" in t.value()


def test_ehlo_does_not_advertise_starttls_without_tls_context() -> None:
    factory = SMTPFactory(HOST, SmtpConfig(), domain_check(["example.com"], HOST), Received(), Clock())
    t = TLSStringTransport()
    p = factory.buildProtocol(t.getPeer())
    p.makeConnection(t)
    p.dataReceived(b"EHLO c.example\r\nSTARTTLS\r\n")
    assert b"STARTTLS" not in t.value()
    assert codes(t.value())[-1] == "454 4.7.0"


def test_starttls_answers_220_then_starts_tls() -> None:
    p, t = session()
    p.dataReceived(b"EHLO c.example\r\n")
    t.clear()
    p.dataReceived(b"STARTTLS\r\n")
    assert t.before_tls == b"220 2.0.0 Ready to start TLS\r\n"
    assert t.tls_started is not None


def test_commands_pipelined_after_starttls_are_discarded() -> None:
    p, t = session()
    p.dataReceived(b"EHLO c.example\r\nSTARTTLS\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.com>\r\n")
    assert codes(t.before_tls) == ["250 ENHANCEDSTATUSCODES", "220 2.0.0"]
    assert t.value() == b""


def test_session_is_reset_after_starttls_mail_needs_new_ehlo() -> None:
    p, t = session()
    p.dataReceived(b"EHLO c.example\r\nSTARTTLS\r\n")
    p.dataReceived(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(t.value()) == ["503 5.5.1"]


def test_ehlo_after_starttls_does_not_advertise_starttls() -> None:
    p, t = session()
    p.dataReceived(b"EHLO c.example\r\nSTARTTLS\r\n")
    p.dataReceived(b"EHLO c.example\r\n")
    assert b"STARTTLS" not in t.value()
    p.dataReceived(b"STARTTLS\r\n")
    assert codes(t.value())[-1] == "503 5.5.1"


def test_starttls_with_argument_is_501() -> None:
    p, t = session()
    p.dataReceived(b"EHLO c.example\r\nSTARTTLS now\r\n")
    assert codes(t.value())[-1] == "501 5.5.4"
    assert t.tls_started is None


def test_require_tls_refuses_mail_before_starttls_530() -> None:
    p, t = session(require_tls=True)
    p.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
    assert codes(t.value())[-1] == "530 5.7.0"


def test_require_tls_accepts_mail_after_starttls() -> None:
    p, t = session(require_tls=True)
    p.dataReceived(b"EHLO c.example\r\nSTARTTLS\r\n")
    p.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
    assert codes(t.value())[-1] == "250 2.1.0"


# -- certificate files -----------------------------------------------------------

CONFIG = b"""
[hub]
hostname = "mx.hub.example"
[store]
plugin = "sqlite"
path = "var/spool.db"
[nodes.dallas]
smtp = "tcp:0"
[domains."example.com"]
route = "smtp:127.0.0.1:2500"
"""


def test_self_signed_pair_is_generated_beside_the_spool_once(tmp_path: Path) -> None:
    config = parse(CONFIG, str(tmp_path / "hub.toml"))
    server_tls_options(config, 1_700_000_000.0)
    cert, key, configured = tls_files(config)
    assert not configured
    assert cert == str(tmp_path / "var" / "tls" / "cert.pem")
    assert (Path(key).stat().st_mode & 0o777) == 0o600
    first = Path(cert).read_bytes()
    server_tls_options(config, 1_700_000_000.0)
    assert Path(cert).read_bytes() == first


def test_generation_is_logged(tmp_path: Path) -> None:
    from twisted.logger import capturedLogs, formatEvent

    config = parse(CONFIG, str(tmp_path / "hub.toml"))
    with capturedLogs() as events:
        server_tls_options(config, 1_700_000_000.0)
    assert any("self-signed" in formatEvent(e) for e in events)


def test_configured_paths_are_relative_to_config_dir(tmp_path: Path) -> None:
    generate_self_signed(HOST, str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), 1_700_000_000.0)
    text = CONFIG + b'[smtp]\ntls_certificate = "c.pem"\ntls_key = "k.pem"\n'
    config = parse(text, str(tmp_path / "hub.toml"))
    assert config.smtp.tls_certificate == str(tmp_path / "c.pem")
    server_tls_options(config, 0.0)
    assert not (tmp_path / "var").exists()


def test_unreadable_configured_certificate_is_a_config_error(tmp_path: Path) -> None:
    from mailhub.config import ConfigError

    text = CONFIG + b'[smtp]\ntls_certificate = "nope.pem"\ntls_key = "k.pem"\n'
    config = parse(text, str(tmp_path / "hub.toml"))
    with pytest.raises(ConfigError, match=r"hub.toml: smtp.tls_certificate: cannot read"):
        server_tls_options(config, 0.0)


def test_certificate_without_key_is_a_config_error() -> None:
    from mailhub.config import ConfigError

    with pytest.raises(ConfigError, match=r"hub.toml: smtp.tls_key: "):
        parse(CONFIG + b'[smtp]\ntls_certificate = "c.pem"\n', "/etc/hub.toml")


# -- real sockets, real TLS -------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Any:
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    generate_self_signed("localhost", cert, key, reactor.seconds())
    config = parse(
        CONFIG + b'[smtp]\ntls_certificate = "cert.pem"\ntls_key = "key.pem"\n',
        str(tmp_path / "hub.toml"),
    )
    received = Received()
    factory = SMTPFactory(
        HOST,
        config.smtp,
        domain_check(["example.com"], HOST),
        received,
        reactor,
        tls=server_tls_options(config, reactor.seconds()),
    )
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield port.getHost().port, cert, received
    pytest_twisted.blockon(port.stopListening())


def _client_context(cafile: str) -> ssl.SSLContext:
    # Verifies the chain; the hostname is not checked (the client dials 127.0.0.1).
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False
    return ctx


@pytest_twisted.ensureDeferred
async def test_smtplib_sends_a_message_over_starttls(tls_server: Any) -> None:
    port, cert, received = tls_server

    def client() -> tuple[bool, bool]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("client.example")
            offered = s.has_extn("starttls")
            s.starttls(context=_client_context(cert))
            s.ehlo("client.example")
            still_offered = s.has_extn("starttls")
            s.sendmail("alice@sender.example", ["bob@example.com"], b"Subject: tls\r\n\r\nsecret\r\n")
            return offered, still_offered

    offered, still_offered = await deferToThread(client)
    assert offered and not still_offered
    [(envelope, message)] = received.messages
    assert envelope.recipients[0].local == "bob"
    assert b"with ESMTPS id" in message
    assert message.endswith(b"\r\nsecret\r\n")


def _recv_reply(sock: Any) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] == b" ":
            return data


@pytest_twisted.ensureDeferred
async def test_commands_sent_with_starttls_are_not_answered_over_tls(tls_server: Any) -> None:
    """The CVE-2011-0411 injection: a plaintext MAIL in the STARTTLS write is never executed."""
    port, cert, received = tls_server

    def client() -> tuple[bytes, bytes, bytes, bytes]:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        _recv_reply(raw)
        raw.sendall(b"EHLO client.example\r\n")
        _recv_reply(raw)
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<bob@example.com>\r\n")
        ready = _recv_reply(raw)
        tls = _client_context(cert).wrap_socket(raw, server_hostname="localhost")
        # The first thing said over TLS must answer this, not the injected MAIL.
        tls.sendall(b"NOOP\r\n")
        first = _recv_reply(tls)
        tls.sendall(b"MAIL FROM:<alice@sender.example>\r\n")
        before_ehlo = _recv_reply(tls)
        tls.sendall(b"EHLO client.example\r\nMAIL FROM:<alice@sender.example>\r\nQUIT\r\n")
        rest = b""
        while True:
            chunk = tls.recv(4096)
            if not chunk:
                break
            rest += chunk
        tls.close()
        return ready, first, before_ehlo, rest

    ready, first, before_ehlo, rest = await deferToThread(client)
    assert ready == b"220 2.0.0 Ready to start TLS\r\n"
    assert first == b"250 2.0.0 OK\r\n"
    assert before_ehlo.startswith(b"503 5.5.1")
    assert b"250 2.1.0" in rest and b"221 2.0.0" in rest
    assert received.messages == []


# -- property: nothing pipelined after STARTTLS is ever executed -----------------

_AFTER = [
    b"MAIL FROM:<a@b.example>\r\n",
    b"RCPT TO:<bob@example.com>\r\n",
    b"DATA\r\n",
    b"hello\r\n.\r\n",
    b"EHLO evil.example\r\n",
    b"QUIT\r\n",
    b"STARTTLS\r\n",
    b"NOOP\r\n",
]


@settings(max_examples=200, deadline=None)
@given(
    before=st.lists(st.sampled_from([b"NOOP\r\n", b"RSET\r\n", b"MAIL FROM:<a@b.example>\r\n"]), max_size=3),
    after=st.lists(st.one_of(st.sampled_from(_AFTER), st.binary(max_size=20)), min_size=1, max_size=10),
)
def test_pipelined_input_after_starttls_is_never_answered(before: list[bytes], after: list[bytes]) -> None:
    p, t = session()
    p.dataReceived(b"EHLO c.example\r\n" + b"".join(before) + b"STARTTLS\r\n" + b"".join(after))
    assert t.tls_started is not None
    assert t.before_tls.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert t.value() == b""
    p.dataReceived(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(t.value()) == ["503 5.5.1"]

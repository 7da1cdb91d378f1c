"""
Tests for ``mailhub.sink`` (``mailhub.testing.downstream``): the test SMTP server, driven by a
raw client over a real socket on 127.0.0.1 (and, for ``main``, by the
standard library's ``smtplib`` against a subprocess).
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from mailhub import sink as downstream
from mailhub.testing.downstream import DownstreamServer, ReceivedMessage

pytestmark = pytest.mark.integration


class Client(Protocol):
    """A raw SMTP client: ``send`` some bytes, ``reply()`` waits for the next full reply."""

    def __init__(self) -> None:
        self.buffer = b""
        self.replies: list[bytes] = []
        self.waiting: list[Deferred[bytes]] = []
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = _reply_end(self.buffer)
            if end < 0:
                return
            reply, self.buffer = self.buffer[:end], self.buffer[end:]
            if self.waiting:
                self.waiting.pop(0).callback(reply)
            else:
                self.replies.append(reply)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)

    def reply(self) -> Deferred[bytes]:
        if self.replies:
            d: Deferred[bytes] = Deferred()
            d.callback(self.replies.pop(0))
            return d
        d = Deferred()
        self.waiting.append(d)
        return d

    async def command(self, line: bytes) -> bytes:
        assert self.transport is not None
        self.transport.write(line + b"\r\n")
        return await self.reply()


def _reply_end(buffer: bytes) -> int:
    start = 0
    while True:
        end = buffer.find(b"\r\n", start)
        if end < 0:
            return -1
        if buffer[start + 3 : start + 4] != b"-":
            return end + 2
        start = end + 2


async def connect(port: int) -> Client:
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        Factory.forProtocol(Client)
    )
    assert (await client.reply()).startswith(b"220 ")
    return client


@pytest.fixture
def server():
    s = DownstreamServer(reactor)
    pytest_twisted.blockon(s.start(port=0))
    yield s
    pytest_twisted.blockon(s.stop())


@pytest_twisted.ensureDeferred
async def test_accepted_message_is_recorded_raw_and_unstuffed(server):
    c = await connect(server.port)
    ehlo = await c.command(b"EHLO client.test")
    assert b"250-PIPELINING" in ehlo and b"8BITMIME" in ehlo and b"SIZE " in ehlo
    assert (await c.command(b"MAIL FROM:<a@x.test> BODY=8BITMIME")).startswith(b"250 2.1.0")
    assert (await c.command(b"RCPT TO:<b@y.test>")).startswith(b"250 ")
    assert (await c.command(b"DATA")).startswith(b"354 ")
    raw = b"Subject: hi\r\n\r\n..dot\r\n\xc3\xa9t\xc3\xa9\r\n.\r\n"
    assert (await c.command(raw[:-2])).startswith(b"250 2.0.0")
    await c.command(b"QUIT")
    await c.closed
    [m] = server.messages
    assert (m.sender, m.recipients, m.helo) == ("a@x.test", ["b@y.test"], "client.test")
    assert m.raw == raw
    assert m.message == b"Subject: hi\r\n\r\n.dot\r\n\xc3\xa9t\xc3\xa9\r\n"
    assert m.mail_parameters == {"BODY": "8BITMIME"}
    assert (server.connections, server.peak_connections, server.active_connections) == (1, 1, 0)


@pytest_twisted.ensureDeferred
async def test_pipelined_commands_are_answered_in_order(server):
    c = await connect(server.port)
    await c.command(b"EHLO client.test")
    assert c.transport is not None
    c.transport.write(b"MAIL FROM:<>\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    replies = [await c.reply() for _ in range(4)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354"]
    assert (await c.command(b".")).startswith(b"250")
    assert server.messages[0].sender == "" and server.messages[0].raw == b".\r\n"


@pytest_twisted.ensureDeferred
async def test_unknown_users_get_550_and_known_ones_are_accepted(server):
    server.known_users = {"Alice@y.test"}
    c = await connect(server.port)
    await c.command(b"EHLO client.test")
    await c.command(b"MAIL FROM:<a@x.test>")
    assert (await c.command(b"RCPT TO:<alice@y.test>")).startswith(b"250")
    assert (await c.command(b"RCPT TO:<bob@y.test>")).startswith(b"550 5.1.1")
    assert server.rejections == 1


@pytest_twisted.ensureDeferred
async def test_tempfail_and_reject_modes_answer_at_rcpt(server):
    c = await connect(server.port)
    await c.command(b"EHLO client.test")
    await c.command(b"MAIL FROM:<a@x.test>")
    server.mode = "tempfail"
    assert (await c.command(b"RCPT TO:<b@y.test>")).startswith(b"451 4.3.0")
    server.mode = "reject"
    assert (await c.command(b"RCPT TO:<b@y.test>")).startswith(b"550 5.1.1")


@pytest_twisted.ensureDeferred
async def test_drop_mode_closes_after_the_banner(server):
    server.mode = "drop"
    c = await connect(server.port)
    await c.closed


@pytest_twisted.ensureDeferred
async def test_down_refuses_connections_and_comes_back_on_the_same_port(server):
    port = server.port
    c = await connect(port)
    await server.stop()
    await c.closed
    with pytest.raises(ConnectionRefusedError):
        await connect(port)
    assert await server.start(port=port) == port
    c = await connect(port)
    assert (await c.command(b"NOOP")).startswith(b"250")


@pytest_twisted.ensureDeferred
async def test_mode_down_stops_listening_and_any_other_mode_listens_again(server):
    port = server.port
    server.mode = "down"
    await deferLater(reactor, 0.05, lambda: None)
    assert not server.listening
    with pytest.raises(ConnectionRefusedError):
        await connect(port)
    server.mode = "accept"
    await deferLater(reactor, 0.05, lambda: None)
    assert server.listening and server.port == port
    await connect(port)


@pytest_twisted.ensureDeferred
async def test_back_pressure_after_n_messages_per_connection(server):
    server.max_messages_per_connection = 1
    c = await connect(server.port)
    await c.command(b"EHLO client.test")
    for expected in (b"250", b"452 4.3.1"):
        reply = await c.command(b"MAIL FROM:<a@x.test>")
        assert reply.startswith(expected)
        if expected == b"250":
            await c.command(b"RCPT TO:<b@y.test>")
            await c.command(b"DATA")
            await c.command(b"x\r\n.")


@pytest_twisted.ensureDeferred
async def test_wait_for_fires_with_the_messages_or_times_out(server):
    with pytest.raises(TimeoutError):
        await server.wait_for(1, timeout=0.05)
    waiting = server.wait_for(1, timeout=5)
    c = await connect(server.port)
    await c.command(b"HELO client.test")
    await c.command(b"MAIL FROM:<a@x.test>")
    await c.command(b"RCPT TO:<b@y.test>")
    await c.command(b"DATA")
    await c.command(b"body\r\n.")
    assert [m.message for m in await waiting] == [b"body\r\n"]


def test_main_prints_a_line_per_message_and_fills_the_maildir(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    maildir = tmp_path / "Maildir"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailhub.testing.downstream",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--maildir",
            str(maildir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        assert "listening" in proc.stdout.readline()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@x.test", ["b@y.test"], b"Subject: from smtplib\r\n\r\n.hello\r\n")
        line = proc.stdout.readline()
        assert "from=<a@x.test> to=<b@y.test>" in line and "subject='from smtplib'" in line
        [saved] = (maildir / "new").iterdir()
        assert saved.read_bytes().endswith(b"Subject: from smtplib\n\n.hello\n")
    finally:
        proc.terminate()
        proc.wait(10)


@pytest_twisted.ensureDeferred
async def test_starttls_is_offered_only_with_a_certificate_and_recorded(server, tmp_path):
    """``smtplib`` (another client than ours) upgrades; the message is recorded as over TLS."""
    import ssl
    import time

    from twisted.internet.threads import deferToThread

    from mailhub.smtp.tls import generate_self_signed

    c = await connect(server.port)
    assert b"STARTTLS" not in await c.command(b"EHLO client.test")
    assert (await c.command(b"STARTTLS")).startswith(b"502 ")
    assert c.transport is not None
    c.transport.loseConnection()
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    generate_self_signed("downstream.test", cert, key, time.time())
    server.tls_certificate, server.tls_key = cert, key

    def send() -> None:
        context = ssl.create_default_context(cafile=cert)
        context.check_hostname = False
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.ehlo("client.test")
            assert client.has_extn("starttls")
            client.starttls(context=context)
            client.ehlo("client.test")
            assert not client.has_extn("starttls")
            client.sendmail("a@x.test", ["b@y.test"], b"Subject: tls\r\n\r\nhi\r\n")
            client.sendmail("a@x.test", ["b@y.test"], b"Subject: tls again\r\n\r\nhi\r\n")

    await deferToThread(send)
    plain = await connect(server.port)
    await plain.command(b"EHLO client.test")
    await plain.command(b"MAIL FROM:<a@x.test>")
    await plain.command(b"RCPT TO:<b@y.test>")
    await plain.command(b"DATA")
    assert (await plain.command(b"Subject: plain\r\n\r\nhi\r\n.")).startswith(b"250 ")
    assert [m.tls for m in server.messages] == [True, True, False]


@pytest.mark.parametrize(
    "head, subject",
    [
        (b"Subject: last\r\n", "last"),
        (b"Subject: first\r\nFrom: a@x.test\r\n", "first"),
        (b"subject: folded\r\n  on two lines\r\nTo: b@y.test\r\n", "folded on two lines"),
        (b"From: a@x.test\r\n", ""),
    ],
)
def test_summary_line_shows_the_subject_alone(head: bytes, subject: str) -> None:
    """The sink's line for a message: the subject without its line end, wherever it is."""
    message = ReceivedMessage("a@x.test", ["b@y.test"], b"", head + b"\r\nbody\r\n")
    line = downstream._summary(message)
    assert line.endswith(f"subject={subject!r}")
    assert "\r" not in line

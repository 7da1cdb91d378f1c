"""
Tests for the ``lmtp`` transport plugin: against a real Dovecot LMTP server
(``mailhub.testing.dovecot``) for behaviour, and against ``StringTransport``
with a ``Clock`` for what goes on the wire and when.  The transport
contract (``tests/test_transport_contract.py``) runs for it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from zope.interface.verify import verifyObject

from hubprocess import HubProcess, eventually, free_port, hub_config, message, send, sleep
from mailhub.interfaces import ITransport, ITransportPlugin
from mailhub.model import Address, Entry, Recipient, Reply
from mailhub.plugin import check_plugin_config, load_plugin
from mailhub.plugins.lmtp import LMTPTransport, parse_target, plugin
from mailhub.testing.dovecot import DovecotServer

SENDER = "someone@outside.example"
MESSAGE = b"From: someone@outside.example\r\nSubject: lmtp\r\n\r\nHello, Dovecot.\r\n"


def entry(*recipients: str, sender: str | None = SENDER) -> Entry:
    return Entry(
        id="e1",
        message_id="m1",
        route="lmtp:test",
        sender=Address.parse(sender) if sender else None,
        recipients=[Recipient(Address.parse(r)) for r in recipients],
    )


def addr(text: str) -> Address:
    return Address.parse(text)


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    server = DovecotServer.start(tmp_path_factory.mktemp("dovecot"), users=("alice", "bob"), full=("full",))
    yield server
    server.stop()


@pytest.fixture
def server(dovecot: DovecotServer) -> DovecotServer:
    """The module's Dovecot, running (a test may have stopped it)."""
    if not dovecot.running:
        dovecot.restart()
    return dovecot


def make(target: str, **options: Any) -> LMTPTransport:
    return plugin.make({"target": target, "hostname": "hub.test", **options}, reactor)


# Configuration


def test_plugin_is_found_by_its_entry_point_and_provides_its_interfaces():
    assert load_plugin("mailhub.transports", "lmtp") is plugin
    assert verifyObject(ITransportPlugin, plugin)
    assert verifyObject(ITransport, make("mail.example.com:24"))


def test_targets():
    assert parse_target("mail.example.com:2424") == ("mail.example.com", 2424)
    assert parse_target("mail.example.com") == ("mail.example.com", 24)
    assert parse_target("[2001:db8::1]:24") == ("2001:db8::1", 24)
    assert parse_target("unix:/run/dovecot/lmtp") == "/run/dovecot/lmtp"


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"target": "127.0.0.1:24x"}, "target"),
        ({"target": "unix:run/lmtp"}, "target"),
        ({"target": "unix:/" + "x" * 200}, "target"),
        ({"target": "host:24", "hostname": "two words"}, "hostname"),
        ({"target": "host:24", "connect_timeout": 0}, "connect_timeout"),
        ({"target": "host:24", "data_timeout": "60"}, "data_timeout"),
    ],
)
def test_check_config_names_the_key_at_fault(config, key):
    problem = check_plugin_config(plugin, {"hostname": "hub.test", **config}, "domains.example")
    assert problem is not None and problem[0] == key
    assert "\n" not in problem[1]


# Against Dovecot


@pytest_twisted.ensureDeferred
async def test_delivered_message_lands_in_the_users_maildir(server):
    before = len(server.messages("alice"))
    replies = await make(f"127.0.0.1:{server.port}").deliver(entry("alice@example.com"), MESSAGE)
    reply = replies[addr("alice@example.com")]
    assert (reply.code, reply.enhanced) == (250, "2.0.0")
    assert "Saved" in reply.text
    [stored] = server.messages("alice")[before:]
    assert stored == b"Return-Path: <someone@outside.example>\n" + MESSAGE.replace(b"\r\n", b"\n")
    assert list((server.home("alice") / "Maildir" / "new").iterdir())


@pytest_twisted.ensureDeferred
async def test_unknown_user_gets_its_5xx_while_the_other_recipient_is_delivered(server):
    before = len(server.messages("bob"))
    replies = await make(f"127.0.0.1:{server.port}").deliver(
        entry("nobody@example.com", "bob@example.com"), MESSAGE
    )
    nobody = replies[addr("nobody@example.com")]
    assert (nobody.code, nobody.enhanced) == (550, "5.1.1")
    assert replies[addr("bob@example.com")].code == 250
    assert len(server.messages("bob")) == before + 1
    assert not server.home("nobody").exists()


@pytest_twisted.ensureDeferred
async def test_each_accepted_recipient_gets_its_own_reply_after_data(server):
    """A full mailbox between two others: its 452 comes after DATA, in RCPT order."""
    before = {u: len(server.messages(u)) for u in ("alice", "bob")}
    replies = await make(f"127.0.0.1:{server.port}").deliver(
        entry("alice@example.com", "full@example.com", "bob@example.com"), MESSAGE
    )
    full = replies[addr("full@example.com")]
    assert (full.code, full.enhanced) == (452, "4.2.2")
    assert "<full@example.com>" in full.text
    assert "<alice@example.com>" in replies[addr("alice@example.com")].text
    assert "<bob@example.com>" in replies[addr("bob@example.com")].text
    assert {u: len(server.messages(u)) - before[u] for u in before} == {"alice": 1, "bob": 1}
    assert server.messages("full") == []


@pytest_twisted.ensureDeferred
async def test_delivery_over_the_unix_socket(server):
    before = len(server.messages("alice"))
    replies = await make(f"unix:{server.socket_path}").deliver(entry("alice@example.com"), MESSAGE)
    assert replies[addr("alice@example.com")].code == 250
    assert len(server.messages("alice")) == before + 1


@pytest_twisted.ensureDeferred
async def test_server_down_is_temporary_and_mail_flows_when_it_is_back(server):
    transport = make(f"127.0.0.1:{server.port}")
    server.stop(remove=False)
    try:
        replies = await transport.deliver(entry("alice@example.com"), MESSAGE)
    finally:
        server.restart()
    assert replies[addr("alice@example.com")] == Reply(
        421, "4.4.1", f"Connection refused by 127.0.0.1:{server.port}"
    )
    assert (await transport.deliver(entry("alice@example.com"), MESSAGE))[addr("alice@example.com")].ok


@pytest_twisted.ensureDeferred
async def test_missing_unix_socket_is_temporary(tmp_path: Path):
    replies = await make(f"unix:{tmp_path}/no-such-socket").deliver(entry("alice@example.com"), MESSAGE)
    reply = replies[addr("alice@example.com")]
    assert (reply.code, reply.enhanced) == (421, "4.4.1")
    assert "no-such-socket" in reply.text


# Against a StringTransport, with a Clock


class Endpoint:
    """Each connect gives a protocol over a ``StringTransport``, at once."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        return succeed(protocol)


def written(protocol: Any) -> bytes:
    value = protocol.transport.value()
    protocol.transport.clear()
    return value


def unit(clock: Clock, **options: Any) -> tuple[LMTPTransport, Endpoint]:
    endpoint = Endpoint()
    return LMTPTransport(clock, "hub.test", ("mail.example.com", 24), endpoint=lambda: endpoint, **options), endpoint


def greet(p: Any, extensions: bytes) -> None:
    p.dataReceived(b"220 mail.example.com LMTP\r\n")
    assert written(p) == b"LHLO hub.test\r\n"
    p.dataReceived(b"250-mail.example.com\r\n" + extensions)


def test_without_pipelining_one_command_at_a_time_and_a_reply_per_recipient_after_data():
    clock = Clock()
    transport, endpoint = unit(clock)
    d = transport.deliver(entry("a@example.com", "b@example.com", "c@example.com"), b"x\r\n")
    [p] = endpoint.protocols
    greet(p, b"250 ENHANCEDSTATUSCODES\r\n")
    assert written(p) == b"MAIL FROM:<someone@outside.example>\r\n"
    p.dataReceived(b"250 2.1.0 ok\r\n")
    assert written(p) == b"RCPT TO:<a@example.com>\r\n"
    p.dataReceived(b"250 2.1.5 ok\r\n")
    assert written(p) == b"RCPT TO:<b@example.com>\r\n"
    p.dataReceived(b"550 5.1.1 no\r\n")
    assert written(p) == b"RCPT TO:<c@example.com>\r\n"
    p.dataReceived(b"250 2.1.5 ok\r\n")
    assert written(p) == b"DATA\r\n"
    p.dataReceived(b"354 go\r\n")
    assert written(p) == b"x\r\n.\r\n"
    p.dataReceived(b"250 2.0.0 <a@example.com> saved\r\n")
    assert not d.called
    p.dataReceived(b"452 4.2.2 <c@example.com> full\r\n")
    assert d.result == {
        addr("a@example.com"): Reply(250, "2.0.0", "<a@example.com> saved"),
        addr("b@example.com"): Reply(550, "5.1.1", "no"),
        addr("c@example.com"): Reply(452, "4.2.2", "<c@example.com> full"),
    }
    assert written(p) == b"QUIT\r\n"


def test_no_data_when_every_recipient_is_refused_and_unused_354_aborts():
    clock = Clock()
    transport, endpoint = unit(clock)
    d = transport.deliver(entry("a@example.com"), b"x\r\n")
    [p] = endpoint.protocols
    greet(p, b"250 PIPELINING\r\n")
    assert written(p) == b"MAIL FROM:<someone@outside.example>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
    # A server out of step: it wants the message although nobody was accepted.
    p.dataReceived(b"250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    assert d.result == {addr("a@example.com"): Reply(550, "5.1.1", "no")}
    assert written(p) == b""
    assert not p.transport.connected


def test_data_timeout_applies_to_each_recipients_reply():
    clock = Clock()
    transport, endpoint = unit(clock, command_timeout=10, data_timeout=100)
    d = transport.deliver(entry("a@example.com", "b@example.com"), b"x\r\n")
    [p] = endpoint.protocols
    greet(p, b"250 PIPELINING\r\n")
    written(p)
    p.dataReceived(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    clock.advance(90)
    p.dataReceived(b"250 2.0.0 <a@example.com> saved\r\n")
    clock.advance(99)
    assert not d.called
    clock.advance(1)
    assert d.result[addr("a@example.com")].code == 250
    late = d.result[addr("b@example.com")]
    assert (late.code, late.enhanced) == (421, "4.4.2")
    assert "timeout after 100s" in late.text


def test_a_greeting_refusal_is_every_recipients_reply():
    clock = Clock()
    transport, endpoint = unit(clock)
    d = transport.deliver(entry("a@example.com", "b@example.com"), b"x\r\n")
    [p] = endpoint.protocols
    p.dataReceived(b"421 4.3.2 too busy\r\n")
    assert set(d.result.values()) == {Reply(421, "4.3.2", "too busy")}


# The hub as users run it


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_twistd_hub_relays_to_dovecot_over_lmtp(server, downstream, tmp_path):
    """``twistd mailhub`` with a route ``lmtp:unix:...``: accepted mail lands in the Maildir, a full mailbox waits."""
    ports = {"dallas": free_port()}
    extra = f'[domains."dovecot.example"]\nroute = "lmtp:unix:{server.socket_path}"\ndata_timeout = 60\n'
    hub = HubProcess(tmp_path, hub_config(tmp_path / "spool.db", downstream.port, ports, extra=extra))
    before = len(server.messages("alice"))
    hub.start()
    try:
        await hub.started(ports["dallas"])
        data = message("via lmtp", to="alice@dovecot.example")
        code, _ = await send(
            ports["dallas"], data, recipients=["alice@dovecot.example", "full@dovecot.example"]
        )
        assert code == 250
        await eventually(lambda: len(server.messages("alice")) == before + 1, what="delivery to alice")
        stored = server.messages("alice")[-1]
        assert stored.endswith(data.replace(b"\r\n", b"\n"))
        # The full mailbox's 452 keeps its recipient in the spool; alice is done
        # (once the attempt is recorded: that may lag the delivery a little).
        for _ in range(50):
            [entry] = await hub.queue()
            pending = [r["address"] for r in entry["recipients"] if r["state"] == "pending"]
            if entry["attempts"]:
                break
            await sleep(0.2)
        assert pending == ["full@dovecot.example"]
    finally:
        await hub.stop()

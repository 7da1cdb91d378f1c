"""
Tests for the ``http`` transport plugin, against a real ``twisted.web``
server on 127.0.0.1 (``mailhub.testing.http_receiver``), in clear and over
TLS with a self-signed certificate.  The transport contract
(``tests/test_transport_contract.py``) runs for it too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from hubprocess import HubProcess, eventually, free_port, hub_config, message, send, sleep
from mailhub.interfaces import ITransport, ITransportPlugin
from mailhub.model import Address, Entry, Recipient, Reply
from mailhub.plugin import check_plugin_config, load_plugin
from mailhub.plugins.http import parse_target, plugin, reply_for_status
from mailhub.smtp.tls import generate_self_signed
from mailhub.testing.http_receiver import HTTPReceiver

SENDER = "someone@outside.example"
MESSAGE = b"From: someone@outside.example\r\nSubject: http\r\n\r\n.dot\r\nHello.\r\n"


def entry(*recipients: str, sender: str | None = SENDER, smtputf8: bool = False) -> Entry:
    return Entry(
        id="e1",
        message_id="m1",
        route="http:test",
        sender=Address.parse(sender) if sender else None,
        recipients=[Recipient(Address.parse(r)) for r in recipients],
        smtputf8=smtputf8,
    )


def addr(text: str) -> Address:
    return Address.parse(text)


@pytest.fixture
def transports() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for t in made:
        pytest_twisted.blockon(t.close())


@pytest.fixture
def receiver() -> Iterator[HTTPReceiver]:
    server = HTTPReceiver(reactor)
    pytest_twisted.blockon(server.start())
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def make(transports):
    def make(target: str, **options: Any) -> Any:
        t = plugin.make({"target": target, "hostname": "hub.test", **options}, reactor)
        transports.append(t)
        return t

    return make


# Configuration


def test_plugin_is_found_by_its_entry_point_and_provides_its_interfaces():
    assert load_plugin("mailhub.transports", "http") is plugin
    assert verifyObject(ITransportPlugin, plugin)
    assert verifyObject(ITransport, plugin.make({"target": "https://example.com/mail"}, reactor))


def test_targets():
    assert parse_target("https://inbound.example.com/mail") == "https://inbound.example.com/mail"
    assert parse_target("http://127.0.0.1:8080/x?y=1") == "http://127.0.0.1:8080/x?y=1"


@pytest.mark.parametrize(
    ("config", "key", "says"),
    [
        ({"target": "https://user:pw@example.com/"}, "target", "credentials"),
        ({"target": "mailto:x@example.com"}, "target", "http://"),
        ({"target": "https://example.com:8x/"}, "target", "URL"),
        ({"target": "https://example.com/#top"}, "target", "fragment"),
        ({"target": "https://example.com/", "timeout": 0}, "timeout", "greater than 0"),
        ({"target": "https://example.com/", "tls_verify": "yes"}, "tls_verify", "true or false"),
        ({"target": "http://example.com/", "tls_ca_file": "/ca.pem"}, "tls_ca_file", "http://"),
        ({"target": "https://example.com/", "tls_verify": False, "tls_ca_file": "/ca.pem"}, "tls_ca_file", "tls_verify"),
        ({"target": "https://example.com/", "headers": "Authorization: x"}, "headers", "table"),
        ({"target": "https://example.com/", "headers": {"Content-Type": "text/plain"}}, "headers", "set by the transport"),
        ({"target": "https://example.com/", "headers": {"X Bad": "1"}}, "headers", "header name"),
        ({"target": "https://example.com/", "headers": {"X-Token": "a\nb"}}, "headers", "printable"),
    ],
)
def test_check_config_names_the_key_at_fault(config, key, says):
    problem = check_plugin_config(plugin, config, "domains.example")
    assert problem is not None
    assert problem[0] == key and says in problem[1], problem
    assert "\n" not in problem[1]


@pytest.mark.parametrize(
    ("status", "code", "enhanced"),
    [
        (200, 250, "2.0.0"), (202, 250, "2.0.0"), (204, 250, "2.0.0"),
        (429, 451, "4.7.0"), (500, 451, "4.3.0"), (503, 451, "4.3.0"),
        (400, 554, "5.0.0"), (404, 554, "5.0.0"), (413, 554, "5.0.0"),
        (301, 451, "4.3.0"), (100, 451, "4.3.0"),
    ],
)  # fmt: skip
def test_reply_for_status(status, code, enhanced):
    reply = reply_for_status(status, "Phrase", "https://h")
    assert (reply.code, reply.enhanced) == (code, enhanced)
    assert reply.text.startswith(f"HTTP {status} Phrase from https://h")


# Against the twisted.web receiver


@pytest_twisted.ensureDeferred
async def test_post_carries_the_message_and_the_envelope(receiver, make):
    t = make(receiver.url("/in/mail?k=v"), headers={"Authorization": "Bearer s3cret"})
    replies = await t.deliver(entry("a@example.com", "b@example.com"), MESSAGE)
    assert {a: r.code for a, r in replies.items()} == {addr("a@example.com"): 250, addr("b@example.com"): 250}
    [post] = receiver.posts
    assert post.path == "/in/mail"
    assert post.message == MESSAGE
    assert post.headers["content-type"] == ["message/rfc822"]
    assert post.headers["authorization"] == ["Bearer s3cret"]
    assert post.envelope == {
        "sender": SENDER,
        "recipients": ["a@example.com", "b@example.com"],
        "smtputf8": False,
        "message_id": "m1",
        "entry": "e1",
    }


@pytest_twisted.ensureDeferred
async def test_null_sender_and_utf8_addresses_in_the_envelope(receiver, make):
    await make(receiver.url()).deliver(entry("jürgen@example.com", sender=None, smtputf8=True), MESSAGE)
    [post] = receiver.posts
    raw = post.headers["mailhub-envelope"][0]
    assert raw.isascii() and "\\u00fc" in raw
    assert json.loads(raw)["recipients"] == ["jürgen@example.com"]
    assert post.envelope["sender"] is None and post.envelope["smtputf8"] is True


@pytest.mark.parametrize(
    ("status", "temporary"), [(429, True), (500, True), (503, True), (400, False), (404, False)]
)
@pytest_twisted.ensureDeferred
async def test_status_decides_for_every_recipient(receiver, make, status, temporary):
    receiver.status = status
    replies = await make(receiver.url()).deliver(entry("a@example.com", "b@example.com"), MESSAGE)
    assert len(replies) == 2
    for reply in replies.values():
        assert (reply.temporary, reply.permanent) == (temporary, not temporary)
        assert f"HTTP {status}" in reply.text
        # The first line of the receiver's answer says why.
        assert reply.text.endswith(f"the receiver says {status}")


@pytest_twisted.ensureDeferred
async def test_json_that_is_not_a_reply_leaves_the_recipient_delivered(receiver, make):
    receiver.recipient_replies = {"a@example.com": "no idea"}
    replies = await make(receiver.url()).deliver(entry("a@example.com"), MESSAGE)
    assert replies[addr("a@example.com")].code == 250


@pytest_twisted.ensureDeferred
async def test_no_response_within_the_timeout_is_temporary(receiver, make):
    receiver.hang = True
    started = time.monotonic()
    replies = await make(receiver.url(), timeout=0.5).deliver(entry("a@example.com"), MESSAGE)
    reply = replies[addr("a@example.com")]
    assert (reply.code, reply.enhanced) == (421, "4.4.2")
    assert "within 0.5s" in reply.text
    assert time.monotonic() - started < 5
    assert len(receiver.posts) == 1


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_temporary(receiver, make):
    url = receiver.url()
    await receiver.stop()
    reply = (await make(url).deliver(entry("a@example.com"), MESSAGE))[addr("a@example.com")]
    assert (reply.code, reply.enhanced) == (421, "4.4.1")


@pytest_twisted.ensureDeferred
async def test_connections_are_kept_between_deliveries(receiver, make):
    t = make(receiver.url())
    for _ in range(3):
        assert (await t.deliver(entry("a@example.com"), MESSAGE))[addr("a@example.com")].ok
    assert receiver.connections_made == 1


# Over TLS, with a self-signed certificate


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    generate_self_signed("localhost", cert, key, time.time())
    return cert, key


@pytest.fixture
def tls_receiver(certificate) -> Iterator[HTTPReceiver]:
    server = HTTPReceiver(reactor)
    pytest_twisted.blockon(server.start(certificate=certificate))
    yield server
    pytest_twisted.blockon(server.stop())


@pytest_twisted.ensureDeferred
async def test_certificate_is_verified_by_default(tls_receiver, make):
    reply = (await make(tls_receiver.url(host="localhost")).deliver(entry("a@example.com"), MESSAGE))[
        addr("a@example.com")
    ]
    assert (reply.code, reply.enhanced) == (421, "4.7.5")
    assert "TLS" in reply.text
    assert tls_receiver.posts == []


@pytest_twisted.ensureDeferred
async def test_tls_ca_file_is_trusted(tls_receiver, make, certificate):
    t = make(tls_receiver.url(host="localhost"), tls_ca_file=certificate[0])
    assert (await t.deliver(entry("a@example.com"), MESSAGE))[addr("a@example.com")] == Reply(
        250, "2.0.0", f"HTTP 200 OK from https://localhost:{tls_receiver.port}"
    )
    assert tls_receiver.posts[0].message == MESSAGE


@pytest_twisted.ensureDeferred
async def test_the_certificate_must_name_the_urls_host(tls_receiver, make, certificate):
    t = make(tls_receiver.url(host="127.0.0.1"), tls_ca_file=certificate[0])
    reply = (await t.deliver(entry("a@example.com"), MESSAGE))[addr("a@example.com")]
    assert (reply.code, reply.enhanced) == (421, "4.7.5"), reply
    assert tls_receiver.posts == []


@pytest_twisted.ensureDeferred
async def test_without_verification_a_self_signed_server_is_used(tls_receiver, make):
    t = make(tls_receiver.url(host="127.0.0.1"), tls_verify=False)
    assert (await t.deliver(entry("a@example.com"), MESSAGE))[addr("a@example.com")].ok


@pytest_twisted.ensureDeferred
async def test_unreadable_tls_ca_file_is_temporary(tls_receiver, make, tmp_path):
    t = make(tls_receiver.url(host="localhost"), tls_ca_file=str(tmp_path / "missing.pem"))
    reply = (await t.deliver(entry("a@example.com"), MESSAGE))[addr("a@example.com")]
    assert (reply.code, reply.enhanced) == (421, "4.7.5")
    assert "tls_ca_file" in reply.text


# The hub as users run it


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_twistd_hub_posts_to_the_route_url_and_bounces_a_refused_recipient(receiver, downstream, tmp_path):
    ports = {"dallas": free_port()}
    extra = f'[domains."web.example"]\nroute = "http:{receiver.url()}"\ntimeout = 30\n'
    hub = HubProcess(tmp_path, hub_config(tmp_path / "spool.db", downstream.port, ports, extra=extra))
    receiver.known_users = {"alice@web.example"}
    hub.start()
    try:
        await hub.started(ports["dallas"])
        data = message("via http", to="alice@web.example")
        code, _ = await send(ports["dallas"], data, recipients=["alice@web.example", "nobody@web.example"])
        assert code == 250
        await eventually(lambda: receiver.messages_for("alice@web.example"), what="the POST")
        [post] = receiver.posts
        assert post.message.endswith(data)
        assert post.envelope["recipients"] == ["alice@web.example", "nobody@web.example"]
        # nobody's 550 from the JSON body: a DSN to the sender, through [hub] outbound.
        await eventually(lambda: downstream.messages, what="the DSN")
        [dsn] = downstream.messages
        assert dsn.recipients == ["someone@outside.example"]
        assert b"nobody@web.example" in dsn.message and b"5.1.1" in dsn.message
        # Nothing left: alice delivered, nobody failed, the DSN sent (its record may lag its delivery).
        for _ in range(50):
            if not (left := await hub.queue()):
                break
            await sleep(0.2)
        assert left == []
    finally:
        await hub.stop()

"""
The LiveArchive pages over real HTTP on 127.0.0.1: a node over the memory
store and the memory archive (which keeps the accounts), a scripted
transport for the organisation's server.
"""

from __future__ import annotations

import base64
import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pyotp
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.server import Site

from mailhub.archive import accounts as acc
from mailhub.config import parse
from mailhub.model import Account, Address, ArchivedMessage, ArchiveText, Role
from mailhub.node import Node
from mailhub.plugin import load_plugin
from mailhub.plugins.memory_store import MemorySpoolStore
from mailhub.plugins.standard_policy import StandardPolicy
from mailhub.testing.fakes import ScriptedTransport
from mailhub.web.livearchive import LiveArchive
from mailhub.web.status import StatusResource

ALICE = Address("alice", "example.com")
BOB = Address("bob", "example.com")
CAROL = Address("carol", "example.org")
PASSWORD = "correct horse battery"
ROUTE = "smtp:mail.example.com:25"

CONFIG = (
    b'[hub]\nhostname="mx.hub.example"\noutbound="smtp:smarthost:25"\n'
    b'[archive]\nplugin="memory"\n'
    b'[nodes.dallas]\nsmtp="tcp:0"\n'
    b'[domains."example.com"]\nroute="smtp:mail.example.com:25"\n'
    b'[domains."example.org"]\nroute="smtp:mail.example.com:25"\n'
    b'[web]\npublic_url="https://mail.hub.example"\n'
)
ALICE_RECOVERY = Address("alice", "private.example")

HOSTILE_HTML = (
    b"From: Mallory <m@evil.example>\r\nTo: alice@example.com\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe_<script>alert(1)</script>?=\r\n"
    b'Content-Type: text/html; charset=utf-8\r\n\r\n'
    b'<p onclick="alert(2)">Hello <b>Alice</b></p><script>alert(3)</script>'
    b'<a href="javascript:alert(4)">click</a><img src="https://tracker.evil.example/p.gif">'
    b'<svg><script>alert(5)</script></svg><iframe src="https://evil.example"></iframe>'
    b'<style>body{background:url(https://evil.example/x)}</style>\r\n'
)


class Web:
    """A node serving the LiveArchive on a real port, and a browser-like client with cookies."""

    def __init__(self, config: bytes = CONFIG) -> None:
        self.config = parse(config)
        self.store = MemorySpoolStore(reactor)
        self.archive = load_plugin("mailhub.archives", "memory").make({}, reactor)
        self.transport = ScriptedTransport()
        self.node = Node("dallas", self.config, self.store, StandardPolicy(nodes=("dallas",), jitter=0.0), reactor,
                         archive=self.archive)
        self.node._transports[ROUTE] = self.transport
        self.node._transports["smtp:smarthost:25"] = self.transport
        self.node.engine.startService()
        self.signer = acc.SessionSigner(b"k" * 32, reactor)
        self.live = LiveArchive(self.node, self.archive, self.signer, acc.LoginThrottle(reactor), reactor)
        self.cookies: dict[str, str] = {}
        self.port: Any = None

    async def start(self) -> None:
        site = Site(StatusResource(self.node, self.store, None, self.live))
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        for account in (
            Account(ALICE, acc.hash_password(PASSWORD), recovery=str(ALICE_RECOVERY)),
            Account(BOB, acc.hash_password(PASSWORD)),
            Account(CAROL, acc.hash_password(PASSWORD), role=Role.DOMAIN_ADMIN),
        ):
            await self.archive.add_account(account)

    async def stop(self) -> None:
        await self.node.engine.stopService()
        await self.port.stopListening()

    async def other_node(self, proxies: Any = ()) -> Any:
        """
        The LiveArchive of a second node (or of this one restarted): the same
        archive and secret, its own signer and throttle, nothing in memory;
        its listening port, to pass as ``port`` (stop it when done).
        """
        other = LiveArchive(self.node, self.archive, acc.SessionSigner(b"k" * 32, reactor), acc.LoginThrottle(reactor),
                            reactor, proxies=proxies)
        site = Site(StatusResource(self.node, self.store, None, other))
        return await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)

    def url(self, path: str, port: Any = None) -> str:
        return f"http://127.0.0.1:{(port or self.port).getHost().port}{path}"

    async def request(
        self, method: str, path: str, data: Any = None, files: Any = None, port: Any = None, headers: Any = None
    ) -> tuple[int, dict, str]:
        """A request to this node (or to the listener ``port``), with the client's cookies."""
        response = await treq.request(
            method, self.url(path, port), data=data, files=files, cookies=dict(self.cookies), allow_redirects=False,
            headers=headers,
        )
        for cookie in response.cookies():
            if cookie.value:
                self.cookies[cookie.name] = cookie.value
            else:
                self.cookies.pop(cookie.name, None)
        body = await response.text("utf-8")
        headers = {k.decode().lower(): v[-1].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, headers, body

    async def login(self, address: str = str(ALICE), password: str = PASSWORD, code: str = "") -> tuple[int, dict, str]:
        _, _, page = await self.request("GET", "/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        return await self.request("POST", "/login", data={"csrf": token, "address": address, "password": password, "code": code})

    async def archive_message(self, archive_id: str, mailbox: Address, message: bytes, subject: str = "") -> None:
        await self.archive.add(ArchivedMessage(archive_id, reactor.seconds(), Address("m", "evil.example"),
                                               (mailbox,), message, ArchiveText(subject=subject)))


@pytest.fixture
def web() -> Iterator[Web]:
    w = Web()
    pytest_twisted.blockon(ensureDeferred(w.start()))
    yield w
    pytest_twisted.blockon(ensureDeferred(w.stop()))


def csrf(page: str, form: str = "") -> str:
    """The CSRF token of ``form`` in a page (the first one without a name)."""
    return re.search(rf'name="csrf" value="({form}[^"]*)"', page).group(1)  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_pages_need_a_login_and_carry_strict_headers(web: Web) -> None:
    code, headers, _ = await web.request("GET", "/mail")
    assert code == 303 and headers["location"] == "/login"
    code, headers, page = await web.request("GET", "/login")
    assert code == 200 and "hub password" in page
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src" not in csp
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-store"


@pytest_twisted.ensureDeferred
async def test_login_with_a_wrong_password_fails_and_is_throttled(web: Web) -> None:
    for _ in range(5):
        code, _, page = await web.login(password="wrong password!!")
        assert code == 401 and "not right" in page
    code, _, page = await web.login()  # even the right password waits now
    assert code == 429 and "Too many failed logins" in page
    assert "session" not in web.cookies


@pytest_twisted.ensureDeferred
async def test_the_lockout_counts_the_account_however_its_address_is_spelt(web: Web) -> None:
    for _ in range(5):
        code, _, _ = await web.login(password="wrong password!!")
        assert code == 401
    for spelling in (str(ALICE) + ".", str(ALICE).upper()):
        web.cookies = {}
        code, _, page = await web.login(address=spelling)
        assert code == 429 and "Too many failed logins" in page, spelling


async def _login_from(web: Web, port: Any, client: str, address: str, password: str = PASSWORD) -> tuple[int, str]:
    """A login through a proxy that says the browser is ``client`` (X-Forwarded-For)."""
    web.cookies = {}
    headers = {"X-Forwarded-For": client}
    _, _, page = await web.request("GET", "/login", port=port, headers=headers)
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    code, _, page = await web.request("POST", "/login", port=port, headers=headers,
                                      data={"csrf": token, "address": address, "password": password, "code": ""})
    return code, page


@pytest_twisted.ensureDeferred
async def test_behind_a_trusted_proxy_one_client_cannot_lock_everyone_out(web: Web) -> None:
    port = await web.other_node(proxies=["127.0.0.1/32"])
    try:
        for i in range(20):
            code, _ = await _login_from(web, port, "203.0.113.9", f"nobody{i}@example.com", "wrong password!!")
            assert code == 401
        code, page = await _login_from(web, port, "203.0.113.9", str(BOB))
        assert code == 429 and "Too many failed logins" in page
        code, _ = await _login_from(web, port, "198.51.100.7", str(ALICE))
        assert code == 303  # another browser behind the same proxy logs in
        # The proxy appends the browser's address: a hop the client wrote before it does not count.
        code, _ = await _login_from(web, port, "198.51.100.7, 203.0.113.9", str(BOB))
        assert code == 429
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_without_a_trusted_proxy_x_forwarded_for_is_not_believed(web: Web) -> None:
    for i in range(20):
        code, _ = await _login_from(web, None, f"192.0.2.{i}", f"nobody{i}@example.com", "wrong password!!")
        assert code == 401
    code, page = await _login_from(web, None, "192.0.2.200", str(BOB))
    assert code == 429 and "Too many failed logins" in page


@pytest_twisted.ensureDeferred
async def test_login_without_the_form_token_is_refused(web: Web) -> None:
    code, _, page = await web.request("POST", "/login", data={"address": str(ALICE), "password": PASSWORD})
    assert "expired" in page and "session" not in web.cookies


@pytest_twisted.ensureDeferred
async def test_a_user_reads_their_mailbox_and_nobody_elses(web: Web) -> None:
    await web.archive_message("a1", ALICE, b"Subject: for alice\r\n\r\nhello alice\r\n", "for alice")
    await web.archive_message("b1", BOB, b"Subject: for bob\r\n\r\nhello bob\r\n", "for bob")
    code, headers, _ = await web.login()
    assert code == 303 and headers["location"] == "/mail"
    code, _, page = await web.request("GET", "/mail")
    assert code == 200 and "for alice" in page and "for bob" not in page
    assert 'class="unread"' in page
    code, _, page = await web.request("GET", "/mail/msg/a1?mailbox=alice%40example.com")
    assert code == 200 and "hello alice" in page
    _, _, page = await web.request("GET", "/mail")
    assert 'class="unread"' not in page  # read now
    # Every way to reach bob's mail with another id or mailbox is a 404.
    for path in (
        "/mail?mailbox=bob%40example.com",
        "/mail/msg/b1?mailbox=bob%40example.com",
        "/mail/msg/b1?mailbox=alice%40example.com",
        "/mail/msg/b1",
        "/mail/msg/b1/raw?mailbox=bob%40example.com",
        "/mail/msg/b1/body?mailbox=bob%40example.com",
        "/mail/msg/b1/part/0?mailbox=bob%40example.com",
        "/compose?reply=b1&mailbox=bob%40example.com",
        "/sent/somebody-elses",
    ):
        code, _, page = await web.request("GET", path)
        assert code == 404, path
        assert "hello bob" not in page


@pytest_twisted.ensureDeferred
async def test_a_user_reads_mail_to_her_address_however_it_was_spelt(web: Web) -> None:
    """
    Mail to ``Alice@EXAMPLE.com`` is alice@example.com's: she reads it
    after logging in as ``ALICE@example.com``, with or without a mailbox
    in the link, however that one is spelt.
    """
    await web.archive_message("a1", Address("Alice", "EXAMPLE.com"), b"Subject: for alice\r\n\r\nhello alice\r\n", "for alice")
    code, headers, _ = await web.login("ALICE@example.com")
    assert code == 303 and headers["location"] == "/mail"
    code, _, page = await web.request("GET", "/mail")
    assert code == 200 and "for alice" in page
    for path in ("/mail/msg/a1", "/mail/msg/a1?mailbox=alice%40example.com", "/mail/msg/a1?mailbox=Alice%40example.com"):
        code, _, page = await web.request("GET", path)
        assert code == 200 and "hello alice" in page, path
    code, _, page = await web.request("GET", "/mail?mailbox=Alice%40example.com")
    assert code == 200 and "for alice" in page


@pytest_twisted.ensureDeferred
async def test_a_domain_administrator_reads_every_mailbox_of_the_domain_only(web: Web) -> None:
    await web.archive_message("b1", BOB, b"Subject: for bob\r\n\r\nhello bob\r\n", "for bob")
    await web.archive_message("c1", Address("dave", "example.org"), b"Subject: for dave\r\n\r\nhi\r\n", "for dave")
    await web.login(str(CAROL))
    code, _, page = await web.request("GET", "/mail?mailbox=dave%40example.org")
    assert code == 200 and "for dave" in page
    code, _, _ = await web.request("GET", "/mail?mailbox=bob%40example.com")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_hostile_html_renders_inert(web: Web) -> None:
    await web.archive_message("h1", ALICE, HOSTILE_HTML, "hostile")
    await web.login()
    code, headers, page = await web.request("GET", "/mail/msg/h1?mailbox=alice%40example.com")
    assert code == 200
    assert "<script>" not in page and "&lt;script&gt;" in page  # the subject, escaped
    # Sandboxed: no script, not of the hub's origin; its links may open a tab of their own.
    assert '<iframe class="body" title="Message" sandbox="allow-popups allow-popups-to-escape-sandbox" ' in page
    assert "Show remote images" in page
    code, headers, body = await web.request("GET", "/mail/msg/h1/body?mailbox=alice%40example.com")
    assert code == 200
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "https:" not in csp
    lowered = body.lower()
    for bad in ("<script", "onclick", "javascript:", "<svg", "<iframe", "<style>body{background"):
        assert bad not in lowered, bad
    assert "tracker.evil.example" in body and ' src="https://tracker' not in body  # kept aside, not loaded
    assert "<b>Alice</b>" in body
    _, headers, body = await web.request("GET", "/mail/msg/h1/body?mailbox=alice%40example.com&images=1")
    assert "img-src 'self' data: cid: https: http:" in headers["content-security-policy"]
    assert ' src="https://tracker.evil.example/p.gif"' in body


@pytest_twisted.ensureDeferred
async def test_attachments_are_downloads_and_raw_is_the_message(web: Web) -> None:
    message = (
        b"Subject: with file\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b'--b\r\nContent-Type: text/html\r\nContent-Disposition: attachment; filename="x.html"\r\n\r\n'
        b"<script>alert(1)</script>\r\n--b--\r\n"
    )
    await web.archive_message("f1", ALICE, message, "with file")
    await web.login()
    _, _, page = await web.request("GET", "/mail/msg/f1?mailbox=alice%40example.com")
    part = re.search(r'href="(/mail/msg/f1/part/\d+)"', page).group(1)  # type: ignore[union-attr]
    code, headers, body = await web.request("GET", part + "?mailbox=alice%40example.com")
    assert code == 200 and headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"].startswith('attachment; filename="x.html"')
    code, headers, body = await web.request("GET", "/mail/msg/f1/raw?mailbox=alice%40example.com")
    assert code == 200 and headers["content-type"] == "message/rfc822" and body.startswith("Subject: with file")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("field", ["subject", "in_reply_to", "references"])
async def test_a_header_field_with_a_line_break_is_refused_not_a_500(web: Web, field: str) -> None:
    await web.login()
    _, _, compose = await web.request("GET", "/compose")
    fields = {"csrf": csrf(compose, "compose"), "to": "bob@example.com", "cc": "", "subject": "hello",
              "body": "Hi", "in_reply_to": "", "references": ""}
    fields[field] = "x\r\nBcc: everyone@example.com"
    code, _, page = await web.request("POST", "/compose", data=fields)
    assert code == 400 and "must be one line" in page
    assert web.transport.deliveries == []


@pytest_twisted.ensureDeferred
async def test_a_sent_message_has_its_download_headers_and_attachments(web: Web) -> None:
    await web.login()
    _, _, compose = await web.request("GET", "/compose")
    fields = {"csrf": csrf(compose, "compose"), "to": "bob@example.com", "cc": "", "subject": "the notes",
              "body": "Here they are.", "in_reply_to": "", "references": ""}
    code, _, _ = await web.request("POST", "/compose", data=fields, files={"files": ("notes.txt", b"attached notes")})
    assert code == 303
    _, _, listing = await web.request("GET", "/sent")
    sent_id = re.search(r'href="/sent/([^"?/]+)"', listing).group(1)  # type: ignore[union-attr]
    code, _, page = await web.request("GET", f"/sent/{sent_id}")
    assert code == 200 and "the notes" in page
    for link in (f"/sent/{sent_id}/raw", f"/sent/{sent_id}?&amp;headers=1", f"/sent/{sent_id}/part/"):
        assert link in page, link
    code, headers, raw = await web.request("GET", f"/sent/{sent_id}/raw")
    assert code == 200 and headers["content-type"] == "message/rfc822" and "Subject: the notes" in raw
    code, _, page = await web.request("GET", f"/sent/{sent_id}?&headers=1")
    assert code == 200 and '<th scope="row">Subject</th>' in page
    part = re.search(rf'href="/sent/{sent_id}/part/(\d+)">notes.txt', page).group(1)  # type: ignore[union-attr]
    code, headers, data = await web.request("GET", f"/sent/{sent_id}/part/{part}")
    assert code == 200 and data == "attached notes" and "attachment" in headers["content-disposition"]
    # Another person's Sent folder is nobody else's.
    web.cookies = {}
    await web.login(str(BOB))
    for path in (f"/sent/{sent_id}", f"/sent/{sent_id}/raw", f"/sent/{sent_id}/part/{part}", f"/sent/{sent_id}/body"):
        code, _, _ = await web.request("GET", path)
        assert code == 404, path


INVOICE = (
    b"From: Bob <bob@outside.example>\r\nTo: alice@example.com\r\nSubject: Invoice 42\r\n"
    b"Message-ID: <inv42@outside.example>\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain\r\n\r\nPlease pay.\r\n"
    b'--b1\r\nContent-Type: application/pdf; name="invoice.pdf"\r\n'
    b'Content-Disposition: attachment; filename="invoice.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
    b"JVBERi0xLjQgaW52b2ljZQ==\r\n--b1--\r\n"
)


@pytest_twisted.ensureDeferred
async def test_forward_sends_the_originals_attachments_along(web: Web) -> None:
    await web.archive_message("inv", ALICE, INVOICE, "Invoice 42")
    await web.archive_message("bobs", BOB, INVOICE.replace(b"Invoice 42", b"Bob's own"), "Bob's own")
    await web.login()
    code, _, page = await web.request("GET", "/compose?reply=inv&mailbox=alice%40example.com&mode=forward")
    assert code == 200 and "Forwarded with the original's attachments: invoice.pdf" in page
    fields = {"csrf": csrf(page, "compose"), "to": "carol@example.com", "cc": "", "subject": "Fwd: Invoice 42",
              "body": "For you.", "in_reply_to": "", "references": "", "forward": "inv",
              "forward_mailbox": "alice@example.com"}
    code, _, _ = await web.request("POST", "/compose", data=fields)
    assert code == 303
    [(entry, data)] = web.transport.deliveries
    assert b'filename="invoice.pdf"' in data and b"JVBERi0xLjQgaW52b2ljZQ==" in data
    # Only what the account may read can be forwarded, whatever the form says.
    fields.update(forward="bobs", forward_mailbox="bob@example.com")
    code, _, _ = await web.request("POST", "/compose", data=fields)
    assert code == 404 and len(web.transport.deliveries) == 1


PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489")
LOGO = (
    b"From: Shop <news@shop.example>\r\nTo: alice@example.com\r\nSubject: Our logo\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/related; boundary="r1"\r\n\r\n'
    b'--r1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n'
    b'<p>Hello</p><img src="cid:logo1" alt="logo"><img src="cid:page2" alt="page"><img src="cid:nothing" alt="x">\r\n'
    b"--r1\r\nContent-Type: image/png\r\nContent-ID: <logo1>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.b64encode(PNG) + b"\r\n"
    b"--r1\r\nContent-Type: image/svg+xml\r\nContent-ID: <page2>\r\n\r\n<svg onload=\"alert(1)\"/>\r\n"
    b"--r1--\r\n"
)


@pytest_twisted.ensureDeferred
async def test_a_messages_own_images_show_and_nothing_else_does(web: Web) -> None:
    await web.archive_message("logo", ALICE, LOGO, "Our logo")
    await web.login()
    code, _, body = await web.request("GET", "/mail/msg/logo/body?mailbox=alice%40example.com")
    assert code == 200
    src = re.search(r'<img src="([^"]+)" alt="logo"', body).group(1).replace("&amp;", "&")  # type: ignore[union-attr]
    assert src.startswith("/mail/msg/logo/inline/") and "mailbox=alice%40example.com" in src
    # The SVG part is no picture the hub shows, and an unknown cid shows nothing.
    assert 'data-blocked-src="cid:page2"' in body and 'data-blocked-src="cid:nothing"' in body
    response = await treq.get(web.url(src), cookies=dict(web.cookies))
    assert response.code == 200 and response.headers.getRawHeaders(b"content-type") == [b"image/png"]
    assert await response.content() == PNG
    index = int(re.search(r"/inline/(\d+)", src).group(1))  # type: ignore[union-attr]
    code, _, _ = await web.request("GET", src.replace(f"/inline/{index}", f"/inline/{index + 1}"))  # the SVG part
    assert code == 404
    # Not alice's: nothing.
    web.cookies = {}
    await web.login(str(BOB))
    code, _, _ = await web.request("GET", src.replace("alice%40example.com", "bob%40example.com"))
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_a_search_that_cannot_be_read_lists_nothing(web: Web) -> None:
    await web.archive_message("a1", ALICE, b"Subject: for alice\r\n\r\nhello alice\r\n", "for alice")
    await web.login()
    code, _, page = await web.request("GET", "/mail?q=after%3Anotadate")
    assert code == 200 and "is not a date" in page and "for alice" not in page


@pytest_twisted.ensureDeferred
async def test_reply_is_sent_through_the_hub_and_kept_in_sent(web: Web) -> None:
    original = (
        b"From: Bob <bob@example.com>\r\nTo: alice@example.com\r\nSubject: lunch?\r\n"
        b"Message-ID: <l1@example.com>\r\n\r\nLunch at noon?\r\n"
    )
    await web.archive_message("l1", ALICE, original, "lunch?")
    await web.login()
    code, _, page = await web.request("GET", "/compose?reply=l1&mailbox=alice%40example.com&mode=reply")
    assert code == 200 and "Re: lunch?" in page and "bob@example.com" in page
    fields = {"csrf": "nope", "to": "Bob <bob@example.com>", "cc": "", "subject": "Re: lunch?",
              "body": "Yes!", "in_reply_to": "<l1@example.com>", "references": ""}
    code, _, page = await web.request("POST", "/compose", data=fields)
    assert code == 403  # no valid CSRF token: nothing sent
    assert web.transport.deliveries == []
    _, _, compose = await web.request("GET", "/compose")
    fields["csrf"] = csrf(compose, "logout")  # a token of another form does not pass either
    code, _, _ = await web.request("POST", "/compose", data=fields)
    assert code == 403 and web.transport.deliveries == []
    fields["csrf"] = csrf(compose, "compose")
    code, headers, _ = await web.request("POST", "/compose", data=fields, files={"files": ("notes.txt", b"attached notes")})
    assert code == 303 and headers["location"].startswith("/sent")
    # Bob's server is down too: the reply reaches his archive mailbox at once.
    [(entry, data)] = web.transport.deliveries
    assert entry.sender == ALICE and entry.pending == (BOB,)
    assert b"In-Reply-To: <l1@example.com>" in data and b"notes.txt" in data
    # The archive's copy is made by the spool's archive entry, decoded in a
    # thread: wait for it (at once, on an idle machine).
    from twisted.internet.task import deferLater

    for _ in range(100):
        found = await web.archive.search(*_bob_scope())
        if found.items:
            break
        await deferLater(reactor, 0.05, lambda: None)
    assert [s.subject for s in found.items] == ["Re: lunch?"]
    code, _, page = await web.request("GET", "/sent")
    assert code == 200 and "Re: lunch?" in page and "bob@example.com" in page


def _bob_scope() -> Any:
    from mailhub.model import ArchiveQuery, ArchiveScope

    return ArchiveScope(mailbox=BOB), ArchiveQuery(), None, 10


@pytest_twisted.ensureDeferred
async def test_totp_is_needed_once_enrolled(web: Web) -> None:
    secret = acc.new_totp_secret()
    account = await web.archive.account(ALICE)
    await web.archive.update_account(type(account)(**{**account.__dict__, "totp_secret": secret})
                                     if hasattr(account, "__dict__") else _with_totp(account, secret))
    code, _, _ = await web.login()
    assert code == 401
    code, headers, _ = await web.login(code=pyotp.TOTP(secret).at(reactor.seconds()))
    assert code == 303 and headers["location"] == "/mail"


def _with_totp(account: Account, secret: str) -> Account:
    from attrs import evolve

    return evolve(account, totp_secret=secret)


@pytest_twisted.ensureDeferred
async def test_logout_needs_its_token_and_ends_the_session(web: Web) -> None:
    await web.login()
    _, _, page = await web.request("GET", "/mail")
    session_cookie = dict(web.cookies)
    code, _, _ = await web.request("POST", "/logout", data={"csrf": "forged"})
    assert code == 403
    code, headers, _ = await web.request("POST", "/logout", data={"csrf": csrf(page, "logout")})
    assert code == 303 and headers["location"] == "/login"
    web.cookies = session_cookie  # a copied cookie no longer works either
    code, headers, _ = await web.request("GET", "/mail")
    assert code == 303 and headers["location"] == "/login"


@pytest_twisted.ensureDeferred
async def test_a_logged_out_session_stays_ended_on_another_node_and_after_a_restart(web: Web) -> None:
    port = await web.other_node()
    try:
        await web.login()
        phone = dict(web.cookies)  # a second session of the same person, still in use
        web.cookies = {}
        await web.login()
        _, _, page = await web.request("GET", "/mail")
        laptop = dict(web.cookies)
        code, _, _ = await web.request("POST", "/logout", data={"csrf": csrf(page, "logout")})
        assert code == 303
        web.cookies = dict(laptop)
        code, headers, _ = await web.request("GET", "/mail", port=port)
        assert code == 303 and headers["location"] == "/login"
        web.cookies = dict(phone)
        code, _, _ = await web.request("GET", "/mail", port=port)
        assert code == 200  # only the session logged out ended
        account = await web.archive.account(ALICE)
        assert len(account.ended_sessions) == 1 and account.password_hash
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_new_password_ends_every_session(web: Web) -> None:
    await web.login()
    account = await web.archive.account(ALICE)
    await web.archive.update_account(_with_version(account))
    code, headers, _ = await web.request("GET", "/mail")
    assert code == 303 and headers["location"] == "/login"


def _with_version(account: Account) -> Account:
    from attrs import evolve

    return evolve(account, session_version=account.session_version + 1)


@pytest_twisted.ensureDeferred
async def test_search_box_uses_the_archive_language(web: Web) -> None:
    await web.archive.add(ArchivedMessage("s1", reactor.seconds(), None, (ALICE,), b"Subject: invoice 7\r\n\r\nx\r\n",
                                          ArchiveText(subject="invoice 7")))
    await web.archive.add(ArchivedMessage("s2", reactor.seconds(), None, (ALICE,), b"Subject: lunch\r\n\r\nx\r\n",
                                          ArchiveText(subject="lunch")))
    await web.login()
    _, _, page = await web.request("GET", "/mail?q=" + urllib.parse.quote("subject:invoice"))
    assert "invoice 7" in page and "lunch" not in page
    _, _, page = await web.request("GET", "/mail?q=" + urllib.parse.quote("before:someday"))
    assert "is not a date" in page


@pytest_twisted.ensureDeferred
async def test_users_have_no_administration_page(web: Web) -> None:
    await web.login()
    code, _, _ = await web.request("GET", "/admin/users")
    assert code == 404
    code, _, _ = await web.request("POST", "/admin/users/bob%40example.com/disable", data={"csrf": "x"})
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_a_domain_administrator_manages_the_accounts_of_the_domain(web: Web) -> None:
    await web.archive.add_account(Account(Address("dave", "example.org"), acc.hash_password(PASSWORD)))
    await web.login(str(CAROL))
    code, _, page = await web.request("GET", "/admin/users")
    assert code == 200 and "dave@example.org" in page and "alice@example.com" not in page
    token = csrf(page, "admin")
    # Another domain's account, or a hub administrator: not for a domain administrator.
    code, _, page = await web.request(
        "POST", "/admin/users", data={"csrf": token, "address": "eve@example.com", "role": "user", "password": PASSWORD}
    )
    assert code == 400 and "may not create" in page
    code, _, _ = await web.request("POST", "/admin/users/alice%40example.com/disable", data={"csrf": token})
    assert code == 404
    code, _, page = await web.request(
        "POST", "/admin/users", data={"csrf": token, "address": "erin@example.org", "role": "user", "password": "short"}
    )
    assert code == 400 and "too short" in page
    code, _, page = await web.request(
        "POST", "/admin/users", data={"csrf": token, "address": "erin@example.org", "role": "user", "password": PASSWORD}
    )
    assert code == 200 and "erin@example.org can log in now" in page
    assert (await web.archive.account(Address("erin", "example.org"))) is not None
    code, _, page = await web.request("POST", "/admin/users/dave%40example.org/disable", data={"csrf": token})
    assert code == 200 and (await web.archive.account(Address("dave", "example.org"))).disabled
    code, _, _ = await web.request("POST", "/admin/users/dave%40example.org/enable", data={"csrf": "forged"})
    assert code == 403
    audit = await web.archive.audit_log(f"user:{CAROL}", None, None, None, 10)
    assert {e.action for e in audit} >= {"account-add", "account-disable"}


# -- invitations, password resets, log out everywhere ------------------------------

ERIN = Address("erin", "example.org")
NEW_PASSWORD = "a brand new passphrase"


async def mails_to(web: Web, address: Address, count: int = 1) -> list[bytes]:
    """The messages the hub delivered to ``address`` (waiting for ``count`` of them): the outbound test double."""
    from twisted.internet.task import deferLater

    await web.live.mailing()
    for _ in range(100):
        found = [data for entry, data in web.transport.deliveries if address in entry.pending]
        if len(found) >= count:
            return found
        await deferLater(reactor, 0.05, lambda: None)
    return found


def link_in(data: bytes, purpose: str) -> str:
    """The path of the link in a mail (``/invite/TOKEN``), which must start with the configured public_url."""
    import email
    import email.policy

    text = email.message_from_bytes(data, policy=email.policy.default).get_content()  # type: ignore[attr-defined]
    return re.search(rf"https://mail\.hub\.example(/{purpose}/[A-Za-z0-9_.-]+)\s", text).group(1)  # type: ignore[union-attr]


async def form_token(web: Web, path: str) -> tuple[int, str, str]:
    """GET a form shown without a session: its status, page and double-submit token."""
    code, _, page = await web.request("GET", path)
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    return code, page, match.group(1) if match else ""


async def invite_erin(web: Web) -> str:
    """Carol, domain administrator of example.org, invites erin; the link's path, from the mail."""
    await web.login(str(CAROL))
    _, _, page = await web.request("GET", "/admin/users")
    code, _, page = await web.request("POST", "/admin/users", data={
        "csrf": csrf(page, "admin"), "address": str(ERIN), "role": "user", "recovery": "erin@home.example", "password": "",
    })
    assert code == 200 and "erin@example.org is invited" in page and "mailed to erin@example.org and erin@home.example" in page
    [to_erin] = await mails_to(web, ERIN)
    [to_home] = await mails_to(web, Address("erin", "home.example"))
    assert link_in(to_erin, "invite") == link_in(to_home, "invite")
    web.cookies.clear()  # erin's browser, not carol's
    return link_in(to_erin, "invite")


@pytest_twisted.ensureDeferred
async def test_an_invitation_sets_the_password_once(web: Web) -> None:
    link = await invite_erin(web)
    assert (await web.archive.account(ERIN)).password_hash == ""
    code, page, token = await form_token(web, link)
    assert code == 200 and "erin@example.org" in page and "choose your hub password" in page
    fields = {"csrf": token, "password": PASSWORD, "again": PASSWORD}
    code, _, _ = await web.request("POST", link, data={**fields, "csrf": "forged"})
    assert code == 403
    code, _, page = await web.request("POST", link, data={**fields, "again": PASSWORD + "!"})
    assert code == 400 and "differ" in page
    code, _, page = await web.request("POST", link, data={**fields, "password": "short", "again": "short"})
    assert code == 400 and "too short" in page
    assert (await web.archive.account(ERIN)).password_hash == ""
    code, headers, _ = await web.request("POST", link, data=fields)
    assert code == 303 and headers["location"] == "/login?notice=invite"
    _, _, page = await web.request("GET", "/login?notice=invite")
    assert "Your hub password is set" in page
    code, headers, _ = await web.login(str(ERIN))
    assert code == 303 and headers["location"] == "/mail"
    # Used: refused, to show and to set.
    web.cookies.clear()
    code, page, _ = await form_token(web, link)
    assert code == 404 and "This link does not work" in page
    _, _, token = await form_token(web, "/login")
    code, _, _ = await web.request("POST", link, data={"csrf": token, "password": NEW_PASSWORD, "again": NEW_PASSWORD})
    assert code == 404
    assert acc.verify_password((await web.archive.account(ERIN)).password_hash, PASSWORD)
    audit = await web.archive.audit_log(None, None, None, None, 50)
    assert {"account-invite", "password-invite"} <= {e.action for e in audit}


@pytest_twisted.ensureDeferred
async def test_an_invitation_link_expires_after_72_hours(web: Web) -> None:
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(reactor.seconds())
    web.signer.links = acc.AccountLinks(b"k" * 32, clock)
    link = await invite_erin(web)
    clock.advance(72 * 3600 - 1)
    code, _, token = await form_token(web, link)
    assert code == 200
    clock.advance(1)
    code, page, _ = await form_token(web, link)
    assert code == 404 and "expired" in page
    _, _, token = await form_token(web, "/login")
    code, _, _ = await web.request("POST", link, data={"csrf": token, "password": PASSWORD, "again": PASSWORD})
    assert code == 404 and (await web.archive.account(ERIN)).password_hash == ""


@pytest_twisted.ensureDeferred
async def test_a_link_changed_in_the_url_is_refused(web: Web) -> None:
    import base64
    import json

    link = await invite_erin(web)
    token = link.rsplit("/", 1)[1]
    payload, mac = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["a"] = ["alice", "example.com"]
    for_alice = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    for changed in (
        f"/invite/{for_alice}.{mac}",  # another account
        f"/invite/{payload}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}",  # another MAC
        f"/invite/{payload}",  # cut short
        f"/reset/{token}",  # the right token, for something else
    ):
        code, _, _ = await web.request("GET", changed)
        assert code == 404, changed
        _, _, form = await form_token(web, "/login")
        code, _, _ = await web.request("POST", changed, data={"csrf": form, "password": PASSWORD, "again": PASSWORD})
        assert code == 404, changed
    assert (await web.archive.account(ERIN)).password_hash == ""
    assert acc.verify_password((await web.archive.account(ALICE)).password_hash, PASSWORD)


async def ask_reset(web: Web, address: str, headers: Any = None) -> tuple[int, str]:
    _, _, token = await form_token(web, "/reset")
    code, _, page = await web.request("POST", "/reset", data={"csrf": token, "address": address}, headers=headers)
    return code, page


@pytest_twisted.ensureDeferred
async def test_reset_answers_the_same_whatever_the_account_and_mails_only_the_recovery_address(web: Web) -> None:
    _, _, page = await web.request("GET", "/login")
    assert 'href="/reset"' in page and "Forgot your hub password?" in page
    # Alice has a recovery address, Bob none, nobody no account at all, Carol is an administrator.
    answers = {a: await ask_reset(web, a, {"Host": ["evil.example"]})
               for a in (str(ALICE), str(BOB), "nobody@example.com", str(CAROL))}
    assert len(set(answers.values())) == 1, answers
    code, page = answers[str(ALICE)]
    assert code == 200 and "If an account with a recovery address exists" in page
    [mail] = await mails_to(web, ALICE_RECOVERY)
    # Only the recovery address: not alice's own, not bob's, nobody's.
    assert [(e.sender, e.pending) for e, _ in web.transport.deliveries] == [(None, (ALICE_RECOVERY,))]
    # The link's base is [web] public_url, never the Host the request named.
    assert link_in(mail, "reset").startswith("/reset/") and b"evil.example" not in mail
    audit = await web.archive.audit_log(None, None, None, None, 50)
    assert [e.scope for e in audit if e.action == "password-reset-mail"] == [f"mailbox {ALICE}"]


@pytest_twisted.ensureDeferred
async def test_reset_link_sets_a_new_password_once_ends_sessions_and_totp_still_counts(web: Web) -> None:
    await web.login()
    old_session = dict(web.cookies)
    secret = acc.new_totp_secret()
    await web.archive.update_account(_with_totp(await web.archive.account(ALICE), secret))
    web.cookies.clear()
    await ask_reset(web, str(ALICE))
    [mail] = await mails_to(web, ALICE_RECOVERY)
    link = link_in(mail, "reset")
    code, page, token = await form_token(web, link)
    assert code == 200 and "alice@example.com" in page
    code, _, _ = await web.request("POST", link, data={"password": NEW_PASSWORD, "again": NEW_PASSWORD})
    assert code == 403  # no form token
    code, headers, _ = await web.request("POST", link, data={"csrf": token, "password": NEW_PASSWORD, "again": NEW_PASSWORD})
    assert code == 303 and headers["location"] == "/login?notice=reset"
    # The session from before the reset is over.
    web.cookies = old_session
    code, headers, _ = await web.request("GET", "/mail")
    assert code == 303 and headers["location"] == "/login"
    web.cookies.clear()
    code, _, _ = await web.login(password=PASSWORD)
    assert code == 401
    code, _, _ = await web.login(password=NEW_PASSWORD)
    assert code == 401  # the second factor is still needed
    code, headers, _ = await web.login(password=NEW_PASSWORD, code=pyotp.TOTP(secret).at(reactor.seconds()))
    assert code == 303 and headers["location"] == "/mail"
    web.cookies.clear()
    code, _, _ = await web.request("GET", link)
    assert code == 404  # used


@pytest_twisted.ensureDeferred
async def test_reset_requests_are_throttled_per_address_and_per_client_whatever_the_account(web: Web) -> None:
    for address in (str(ALICE), "nobody@example.com"):
        for _ in range(3):
            code, _ = await ask_reset(web, address)
            assert code == 200
        code, page = await ask_reset(web, address)
        assert code == 429 and "Too many requests" in page
    assert len(await mails_to(web, ALICE_RECOVERY, 3)) == 3
    # Ten requests from one client address, over any addresses, then it waits too.
    for n in range(4):
        assert (await ask_reset(web, f"someone{n}@example.com"))[0] == 200
    code, _ = await ask_reset(web, "someone-else@example.com")
    assert code == 429
    await web.live.mailing()
    assert len([e for e, _ in web.transport.deliveries]) == 3


@pytest_twisted.ensureDeferred
async def test_reset_needs_its_form_token_and_an_address(web: Web) -> None:
    code, _, _ = await web.request("POST", "/reset", data={"address": str(ALICE)})
    assert code == 403
    code, page = await ask_reset(web, "not an address")
    assert code == 400 and "not an email address" in page
    await web.live.mailing()
    assert web.transport.deliveries == []


@pytest_twisted.ensureDeferred
async def test_log_out_everywhere_ends_the_session_on_another_node_too(web: Web) -> None:
    port = await web.other_node()
    try:
        await web.login()
        copied = dict(web.cookies)
        code, _, _ = await web.request("GET", "/mail", port=port)
        assert code == 200  # the other node accepts the session
        code, _, page = await web.request("GET", "/account")
        assert code == 200 and "Log out everywhere" in page and str(ALICE_RECOVERY) in page
        code, _, _ = await web.request("POST", "/account/logout-everywhere", data={"csrf": csrf(page, "logout")})
        assert code == 403  # another form's token
        code, headers, _ = await web.request("POST", "/account/logout-everywhere", data={"csrf": csrf(page, "everywhere")})
        assert code == 303 and headers["location"] == "/login?notice=everywhere"
        web.cookies = dict(copied)
        for on in (port, None):
            code, headers, _ = await web.request("GET", "/mail", port=on)
            assert code == 303 and headers["location"] == "/login", on
        web.cookies.clear()
        code, _, _ = await web.login()
        assert code == 303  # logging in again works
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_administrator_logs_a_user_out_everywhere_and_invites_again(web: Web) -> None:
    dave = Address("dave", "example.org")
    await web.archive.add_account(Account(dave, acc.hash_password(PASSWORD)))
    await web.archive.add_account(Account(ERIN))  # invited, no password
    await web.login(str(dave))
    daves = dict(web.cookies)
    web.cookies.clear()
    await web.login(str(CAROL))
    _, _, page = await web.request("GET", "/admin/users")
    token = csrf(page, "admin")
    for action in ("logout", "invite"):
        code, _, _ = await web.request("POST", f"/admin/users/{dave}/{action}", data={"csrf": "forged"})
        assert code == 403
        code, _, _ = await web.request("POST", f"/admin/users/{ALICE}/{action}", data={"csrf": token})
        assert code == 404  # another domain's account
    code, _, page = await web.request("POST", f"/admin/users/{dave}/invite", data={"csrf": token})
    assert code == 400 and "has a password already" in page
    code, _, page = await web.request("POST", f"/admin/users/{ERIN}/invite", data={"csrf": token})
    assert code == 200 and "mailed to erin@example.org" in page
    assert len(await mails_to(web, ERIN)) == 1
    code, _, _ = await web.request("POST", f"/admin/users/{dave}/logout", data={"csrf": token})
    assert code == 200
    web.cookies = daves
    code, headers, _ = await web.request("GET", "/mail")
    assert code == 303 and headers["location"] == "/login"


@pytest_twisted.ensureDeferred
async def test_without_a_public_url_nothing_is_mailed_and_the_administrator_gets_the_link() -> None:
    w = Web(CONFIG.replace(b'[web]\npublic_url="https://mail.hub.example"\n', b""))
    await w.start()
    try:
        _, _, page = await w.request("GET", "/login")
        assert 'href="/reset"' not in page and "Ask your administrator" in page
        code, _, page = await w.request("GET", "/reset")
        assert code == 200 and "cannot mail a link" in page
        code, _, _ = await w.request("POST", "/reset", data={"address": str(ALICE)})
        assert code == 404
        await w.login(str(CAROL))
        _, _, page = await w.request("GET", "/admin/users")
        code, _, page = await w.request("POST", "/admin/users", data={
            "csrf": csrf(page, "admin"), "address": str(ERIN), "role": "user", "password": "",
        })
        assert code == 200 and "no [web] public_url" in page
        link = re.search(r'<a class="link" href="(/invite/[^"]+)"', page).group(1)  # type: ignore[union-attr]
        await w.live.mailing()
        assert w.transport.deliveries == []
        w.cookies.clear()
        code, _, token = await form_token(w, link)
        assert code == 200
        code, _, _ = await w.request("POST", link, data={"csrf": token, "password": PASSWORD, "again": PASSWORD})
        assert code == 303
    finally:
        await w.stop()

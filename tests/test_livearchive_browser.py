"""
The LiveArchive end to end in a real browser: Debian's ``chromium`` driven
by Playwright (``executable_path``: nothing is downloaded), against a real
``twistd mailhub`` over SQLite (spool and archive) whose domain's server is
the real ``DownstreamServer``.

Alice chooses her hub password from the link of her invitation, logs in
with it and a TOTP code, searches, reads a
hostile HTML message (nothing in it runs or loads), reads another, replies
(the reply arrives at the downstream server), finds it in Sent and logs
out.  Screenshots of the main views at desktop (1280x800) and phone
(390x844) widths are saved under the test's ``tmp_path``, and their paths
printed.

Playwright's sync API runs in one thread of its own (``Browser.run``): the
reactor keeps serving the downstream server meanwhile.
"""

from __future__ import annotations

import email
import json
import re
import subprocess
import urllib.request
from collections.abc import Callable
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, TypeVar

import pyotp
import pytest
import pytest_twisted
from playwright.sync_api import (
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Page,
    Playwright,
    Request,
    Response,
    expect,
    sync_playwright,
)
from twisted.internet import reactor
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.python.threadpool import ThreadPool

from hubprocess import BIN, HubProcess, eventually, free_port, hub_config, send
from mailhub.testing.downstream import DownstreamServer

pytestmark = [pytest.mark.integration]

T = TypeVar("T")

ALICE = "alice@example.com"
PASSWORD = "correct horse battery staple"
TRACKER = "tracker.evil.example"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

ZEBRA = (
    b"From: Bob Builder <bob@outside.example>\r\nTo: Alice <alice@example.com>\r\n"
    b"Subject: Quarterly zebra report\r\nMessage-ID: <zebra-1@outside.example>\r\n"
    b"Date: Mon, 07 Dec 2026 09:30:00 +0000\r\n\r\n"
    b"Hi Alice,\r\n\r\nthe zebra numbers are in: 42 stripes, up from 40.\r\n"
    b"Can you confirm before Friday?\r\n\r\nBob\r\n"
)

NEWSLETTER = (
    "From: Mallory News <news@evil.example>\r\nTo: alice@example.com\r\n"
    "Subject: Your weekly newsletter\r\nMessage-ID: <news-1@evil.example>\r\n"
    "Date: Mon, 07 Dec 2026 08:00:00 +0000\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    '<h2>This week</h2><p onmouseover="alert(1)">Hello <b>Alice</b>, here is the news.</p>'
    "<script>alert('script ran')</script>"
    '<img src="x" onerror="alert(2)">'
    f'<img src="https://{TRACKER}/pixel.gif?who=alice" alt="tracker">'
    f'<a href="javascript:alert(3)">click me</a>'
    '<a href="https://good.example/page">Good link</a>'
    f'<div style="background:url(https://{TRACKER}/bg.png)">styled</div>'
    f'<iframe src="https://{TRACKER}/frame"></iframe>'
    "<svg><script>alert(4)</script></svg>\r\n"
).encode()


def browser_hub(tmp_path: Path, downstream: DownstreamServer) -> tuple[HubProcess, int, int]:
    """A hub over SQLite with the sqlite archive (which keeps the accounts) and a web listener."""
    port, web = free_port(), free_port()
    text = hub_config(tmp_path / "spool.db", downstream.port, {"dallas": port}, retry_minutes=0.1)
    text = text.replace(
        f'smtp = "tcp:{port}:interface=127.0.0.1"\n',
        f'smtp = "tcp:{port}:interface=127.0.0.1"\nweb = "tcp:{web}:interface=127.0.0.1"\n',
    )
    text += (
        '[archive]\nplugin = "sqlite"\npath = "archive.db"\nretention_days = 30\n'
        "[smtp]\nmax_messages_per_minute_per_ip = 1000000\nmax_connections_per_ip = 100\n"
    )
    return HubProcess(tmp_path, text), port, web


def user_cli(hub: HubProcess, *args: str, stdin: str = "") -> str:
    """``mailhub user --config FILE ARGS...`` (blocking); its output, or the test fails."""
    out = subprocess.run([str(BIN / "mailhub"), "user", "--config", str(hub.config_path), *args],
                         input=stdin, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"mailhub user {' '.join(args)}: {out.stdout}{out.stderr}"
    return out.stdout


def web_answers(web: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/login", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Browser:
    """
    Chromium under Playwright's sync API, always on one thread of its own
    (the sync API may only be used from the thread that started it).
    """

    def __init__(self, base: str, shots: Path) -> None:
        self.base = base
        self.shots = shots
        self.saved: list[Path] = []
        self.dialogs: list[str] = []
        self.outside: list[str] = []  # requests to anything but the hub
        self.console: list[str] = []
        self.failed: list[str] = []  # answers of 400 and more
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="playwright")
        self._playwright: Playwright | None = None
        self._started = False

    def run(self, step: Callable[..., T], *args: Any) -> Any:
        """Run ``step(*args)`` on the browser's thread; a Deferred of its result."""
        return deferToThreadPool(reactor, self._pool, step, *args)  # type: ignore[arg-type]

    async def start(self) -> None:
        self._pool.start()
        self._started = True
        await self.run(self._start)

    async def stop(self) -> None:
        if not self._started:
            return
        try:
            await self.run(self._stop)
        finally:
            self._pool.stop()

    def _start(self) -> None:
        self._playwright = sync_playwright().start()
        self.chromium = self._playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, headless=True
        )

    def _stop(self) -> None:
        if self._playwright is not None:
            if hasattr(self, "chromium"):
                self.chromium.close()
            self._playwright.stop()

    def context(self, viewport: dict[str, int], storage_state: Any = None) -> BrowserContext:
        context = self.chromium.new_context(
            viewport=viewport,  # type: ignore[arg-type]
            storage_state=storage_state,
            is_mobile=viewport is PHONE,
            has_touch=viewport is PHONE,
        )
        context.set_default_timeout(20_000)

        def request(r: Request) -> None:
            if not r.url.startswith(self.base) and not r.url.startswith(("about:", "data:")):
                self.outside.append(r.url)

        def dialog(d: Dialog) -> None:
            self.dialogs.append(f"{d.type}: {d.message}")
            d.dismiss()

        def console(m: ConsoleMessage) -> None:
            self.console.append(f"{m.type}: {m.text}")

        def page(p: Page) -> None:
            p.on("dialog", dialog)
            p.on("console", console)

        def response(r: Response) -> None:
            if r.status >= 400:
                self.failed.append(f"{r.status} {r.url}")

        context.on("request", request)
        context.on("response", response)
        context.on("page", page)
        return context

    def shot(self, page: Page, name: str, width: str) -> None:
        path = self.shots / f"{name}-{width}.png"
        page.screenshot(path=str(path), full_page=True)
        self.saved.append(path)


def _inert(page: Page) -> None:
    """Nothing on the page or in its frames is a script."""
    assert page.locator("script").count() == 0
    for frame in page.frames:
        assert frame.locator("script").count() == 0, frame.url


# -- the steps, each run on the browser's thread -----------------------------


def accept_invitation(b: Browser, link: str) -> None:
    """Alice opens the link of her invitation and chooses her hub password."""
    context = b.context(DESKTOP)
    page = context.new_page()
    page.goto(b.base + link)
    expect(page.get_by_role("heading", level=1)).to_contain_text("choose your hub password")
    b.shot(page, "invite", "desktop")
    page.get_by_label("New hub password").fill(PASSWORD)
    page.get_by_label("The same again").fill(PASSWORD)
    page.get_by_role("button", name="Set the password").click()
    page.wait_for_url(b.base + "/login?notice=invite")
    expect(page.get_by_role("status")).to_contain_text("Your hub password is set")
    context.close()


def log_in_search_read_and_reply(b: Browser, secret: str) -> dict[str, Any]:
    desktop = b.context(DESKTOP)
    page = desktop.new_page()
    page.goto(b.base + "/mail")
    page.wait_for_url(b.base + "/login")  # no session: the login page
    expect(page.get_by_role("heading", level=1)).to_contain_text("while your server is down")
    b.shot(page, "login", "desktop")
    page.get_by_label("Email address").fill(ALICE)
    page.get_by_label("Hub password").fill(PASSWORD)
    page.get_by_label("Code from your authenticator app").fill(pyotp.TOTP(secret).now())
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(b.base + "/mail")
    rows = page.locator("ol.messages li")
    expect(rows).to_have_count(2)
    expect(page.locator("h1")).to_contain_text(ALICE)
    expect(rows.first).to_have_class("unread")
    b.shot(page, "mailbox", "desktop")

    # The hostile newsletter: shown sanitised in its sandboxed frame, inert.
    page.get_by_role("link", name=re.compile("Your weekly newsletter")).click()
    page.wait_for_url(re.compile(r"/mail/msg/"))
    body = page.frame_locator("iframe.body").locator("body")
    expect(body).to_contain_text("here is the news")
    expect(page.get_by_role("link", name="Show remote images")).to_be_visible()
    page.wait_for_load_state("networkidle")
    _inert(page)
    b.shot(page, "message-html", "desktop")
    # Its links open in a tab of their own: the frame may open one (it still runs no script).
    with page.expect_popup() as popup:
        body.get_by_role("link", name="Good link").click()
    assert popup.value.url.startswith("https://good.example/") or popup.value.url.startswith("chrome-error:")
    popup.value.close()

    # Search with the search box, open the result.
    page.get_by_role("link", name="Inbox", exact=True).click()
    page.get_by_role("searchbox", name="Search").fill("zebra")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(re.compile(r"/mail\?q=zebra"))
    expect(page.locator("h1")).to_contain_text("Search in")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Quarterly zebra report")
    b.shot(page, "search", "desktop")
    rows.first.get_by_role("link").click()
    page.wait_for_url(re.compile(r"/mail/msg/"))
    expect(page.locator("h1")).to_have_text("Quarterly zebra report")
    expect(page.locator("pre.body")).to_contain_text("42 stripes")
    message_url = page.url
    b.shot(page, "message", "desktop")

    # Reply.
    page.get_by_role("link", name="Reply", exact=True).click()
    page.wait_for_url(re.compile(r"/compose\?"))
    expect(page.get_by_label("To", exact=True)).to_have_value(re.compile("bob@outside.example"))
    expect(page.get_by_label("Subject", exact=True)).to_have_value("Re: Quarterly zebra report")
    message = page.get_by_label("Message", exact=True)
    expect(message).to_have_value(re.compile("> the zebra numbers are in"))
    message.press("Control+Home")
    message.press_sequentially("Confirmed: 42 stripes. Thanks, Bob!\n")
    compose_url = page.url
    b.shot(page, "compose", "desktop")
    page.get_by_role("button", name="Send").click()
    page.wait_for_url(re.compile(r"/sent\?notice=sent"))
    expect(page.get_by_role("status")).to_contain_text("Sent.")
    return {"context": desktop, "page": page, "message_url": message_url, "compose_url": compose_url}


def sent_phone_and_log_out(b: Browser, state: dict[str, Any]) -> None:
    desktop: BrowserContext = state["context"]
    page: Page = state["page"]
    page.goto(b.base + "/mail")
    page.get_by_role("link", name="Sent", exact=True).click()
    page.wait_for_url(b.base + "/sent")
    expect(page.locator("h1")).to_have_text("Sent")
    sent = page.locator("ol.messages li")
    expect(sent).to_have_count(1)
    expect(sent.first).to_contain_text("Re: Quarterly zebra report")
    expect(sent.first).to_contain_text("bob@outside.example")
    b.shot(page, "sent", "desktop")
    sent.first.get_by_role("link").click()
    expect(page.locator("pre.body")).to_contain_text("Confirmed: 42 stripes.")

    # The same views at phone width: the login page without a session, the
    # rest with Alice's (one TOTP step logs in once).
    phone = b.context(PHONE)
    p = phone.new_page()
    p.goto(b.base + "/login")
    b.shot(p, "login", "phone")
    phone.close()
    phone = b.context(PHONE, storage_state=desktop.storage_state())
    p = phone.new_page()
    for name, url in (("mailbox", "/mail"), ("message", state["message_url"]),
                      ("compose", state["compose_url"]), ("sent", "/sent")):
        p.goto(url if url.startswith("http") else b.base + url)
        expect(p.locator("main h1")).to_be_visible()
        assert "/login" not in p.url, name
        b.shot(p, name, "phone")
    # Nothing is wider than the phone's screen, and the header takes two short rows.
    p.goto(b.base + "/mail")
    assert p.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    header = p.locator("header.top").bounding_box()
    assert header is not None and header["height"] <= 90, header

    # Log out: the login page; the session is over for every copy of the cookie.
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(b.base + "/login")
    expect(page.get_by_label("Hub password")).to_be_visible()
    page.goto(b.base + "/mail")
    page.wait_for_url(b.base + "/login")
    p.goto(b.base + "/mail")
    p.wait_for_url(b.base + "/login")
    phone.close()
    desktop.close()


@pytest.mark.timeout(240)
@pytest_twisted.ensureDeferred
async def test_log_in_search_read_reply_sent_and_log_out_in_chromium(tmp_path, downstream):
    hub, port, web = browser_hub(tmp_path, downstream)
    # The account, as an administrator makes it before an outage: invited
    # (without [web] public_url the command prints the link instead of mailing it).
    invited = await deferToThread(user_cli, hub, "add", ALICE, "--invite")
    link = re.search(r"alice@example\.com  (/invite/\S+)", invited).group(1)  # type: ignore[union-attr]
    enrolled = await deferToThread(user_cli, hub, "totp", ALICE)
    secret = re.search(r"secret, to type in by hand: (\S+)", enrolled).group(1)  # type: ignore[union-attr]

    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser = Browser(f"http://127.0.0.1:{web}", shots)
    hub.start()
    try:
        await hub.started(port)
        await eventually(lambda: deferToThread(web_answers, web), timeout=30, what="the web listener")
        for data in (NEWSLETTER, ZEBRA):
            code, text = await send(port, data, sender="someone@outside.example", recipients=[ALICE])
            assert code == 250, text
        await eventually(lambda: len(downstream.messages) >= 2, timeout=30, what="both delivered downstream")

        async def archived() -> bool:
            out = await deferToThread(hub.cli, "archive", "search", "--mailbox", ALICE, "--json")
            return out.returncode == 0 and json.loads(out.stdout)["total"] == 2

        await eventually(archived, timeout=30, what="both archived")

        await browser.start()
        await browser.run(accept_invitation, browser, link)
        state = await browser.run(log_in_search_read_and_reply, browser, secret)

        def replies() -> list[Any]:
            return [m for m in downstream.messages if m.sender == ALICE]

        [reply] = await eventually(replies, timeout=30, what="the reply at the downstream server")
        assert reply.recipients == ["bob@outside.example"]
        parsed = email.message_from_bytes(reply.message, policy=default_policy)
        assert parsed["Subject"] == "Re: Quarterly zebra report"
        assert parsed["In-Reply-To"] == "<zebra-1@outside.example>"
        assert ALICE in parsed["From"]
        text = parsed.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
        assert text.startswith("Confirmed: 42 stripes. Thanks, Bob!")
        assert "> the zebra numbers are in" in text

        await browser.run(sent_phone_and_log_out, browser, state)
    finally:
        await browser.stop()
        await hub.stop()
        for path in browser.saved:
            print(f"screenshot: {path}")
        for line in browser.console:
            print(f"console: {line}")

    assert browser.dialogs == [], f"a script ran: {browser.dialogs}"
    # Only the link the reader clicked went outside: nothing else did, by itself.
    outside = [u for u in browser.outside if u != "https://good.example/page"]
    assert outside == [] and browser.outside.count("https://good.example/page") <= 1, browser.outside
    assert not [c for c in browser.console if TRACKER in c], browser.console
    # Every page and its style sheet loaded (Chromium asks for a favicon there is none of).
    assert [f for f in browser.failed if not f.endswith("/favicon.ico")] == [], browser.failed
    assert len(browser.saved) == 13

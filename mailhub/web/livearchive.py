"""
The LiveArchive pages: people read, search and answer their mail while
their own server is down.

Served by every node's web listener (``/login``, ``/mail``, ``/compose``,
``/sent``, ``/account``, ``/admin/users``; ``/reset`` asks for a reset
link, ``/invite/TOKEN`` and ``/reset/TOKEN`` set a password from a mailed
link), server-rendered with Jinja2 templates that escape everything by
default (``autoescape``: a value is text unless a template says otherwise,
which none does), no script at all, usable by keyboard and on a phone.  Jinja2 rather than ``twisted.web.template``: the pages are mostly
markup with a few values in it, which Jinja2 templates say plainly, with
escaping on by default either way.

Security, for an MX on the public internet:

- a session is a signed cookie (``mailhub.archive.accounts.SessionSigner``:
  ``HttpOnly``, ``SameSite=Strict``, ``Secure`` and the ``__Host-`` prefix over
  TLS), expiring, ended on every node and device when the password changes
  or is reset, the account is disabled, or its owner logs out everywhere;
- every request that changes anything carries a CSRF token bound to the
  session (the forms used without one: a double-submit token);
- logins are throttled per account and per client address
  (``mailhub.archive.accounts.LoginThrottle``), and so are requests of a
  password reset (``reset_throttle``), whose answer never says whether the
  account exists: the mail, to the recovery address only, is looked up and
  sent after the answer;
- the links that set a password are signed, expire and work once
  (``mailhub.archive.accounts.AccountLinks``); their base is ``[web]
  public_url``, never the request's ``Host``;
- every route checks that the account may read the mailbox and that the
  message is that mailbox's: any other id gives ``404``;
- every answer has a strict Content-Security-Policy (no script, nothing from
  elsewhere, no framing), ``Referrer-Policy: no-referrer``, ``nosniff``, and
  HSTS over TLS; a message's HTML is sanitised (``mailhub.web.mime``) and
  shown in a sandboxed frame of its own with an even stricter policy;
  attachments are always downloads, never rendered.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jinja2
from attrs import evolve
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.web import resource, server

from mailhub.archive import accounts as acc
from mailhub.archive.query import QueryError, parse_query
from mailhub.model import (
    Account,
    Address,
    AddressError,
    ArchiveQuery,
    ArchiveScope,
    AuditEvent,
    Envelope,
    Role,
    SentMessage,
)
from mailhub.web import mime

__all__ = ["LiveArchive"]

_HERE = os.path.dirname(os.path.abspath(__file__))
#: Largest form accepted (a message with attachments).
MAX_POST = 25 * 1024 * 1024
PAGE = 50
#: How long a mailbox's count of messages is shown again without counting:
#: counting a large mailbox reads all of it (half a second for 100,000
#: messages in the sqlite archive), too long to wait for on every page.
COUNT_SECONDS = 300.0
#: Mailboxes whose count is kept at most (the oldest go first).
COUNTS_KEPT = 10_000

_PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; frame-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
#: For a message's HTML, inside its sandboxed frame: inline styles only,
#: images from the message itself unless the reader asked for remote ones.
_BODY_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data: cid:{remote}; frame-ancestors 'self'; base-uri 'none'; form-action 'none'"


class _Answer(Exception):
    """Stop handling a request with this status (and page)."""

    def __init__(self, code: int, title: str = "", text: str = "") -> None:
        super().__init__(title)
        self.code, self.title, self.text = code, title, text


class _Redirect(Exception):
    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


_NOT_FOUND = _Answer(404, "Not found", "There is no such message or mailbox, or it is not yours.")
_BAD_LINK = _Answer(
    404, "This link does not work",
    "It was used already, it has expired, or it is incomplete (copy the whole link from the mail). "
    "For a new one, ask your administrator, or use \u201cForgot your hub password?\u201d on the login page.",
)
#: What the login page says after a redirect to it (``/login?notice=KEY``).
_LOGIN_NOTICES = {
    acc.INVITE: "Your hub password is set: log in with it.",
    acc.RESET: "Your new hub password is set and every session of the account has ended. "
    "Log in with it (and the code of your authenticator app, if you enrolled one).",
    "everywhere": "You are logged out on every device.",
}


class LiveArchive(resource.Resource):
    """
    :param node: the ``mailhub.node.Node`` serving it (its engine's route
        states for the banner, ``receive`` to send).
    :param archive: an ``IArchive`` that also provides ``IAccountStore``.
    :param signer: ``mailhub.archive.accounts.SessionSigner``.
    :param throttle: ``mailhub.archive.accounts.LoginThrottle``.
    :param clock: ``IReactorTime``.
    :param tls: whether the listener is ``ssl:`` (``Secure`` cookies, HSTS).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self, node: Any, archive: Any, signer: Any, throttle: Any, clock: Any, tls: bool = False,
        proxies: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self._node = node
        self._archive = archive
        self._signer = signer
        self._throttle = throttle
        self._clock = clock
        self._tls = tls
        self._proxies = [ipaddress.ip_network(p) for p in proxies]
        self._cookie = b"__Host-session" if tls else b"session"
        self._totp_guard = acc.TotpReplayGuard()
        self._reset_throttle = acc.reset_throttle(clock)
        #: Reset mails being looked up and spooled after their answer.
        self._mailing: set[Deferred[None]] = set()
        #: Accounts whose password a link is setting now, on this node.
        self._setting: set[str] = set()
        #: mailbox -> (when counted, how many messages), and the counts under way.
        self._counts: dict[str, tuple[float, int]] = {}
        self._counting: set[str] = set()
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(os.path.join(_HERE, "templates")),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        with open(os.path.join(_HERE, "static", "style.css"), "rb") as f:
            self._css = f.read()
        self._routes: dict[tuple[bytes, str], Callable[..., Any]] = {
            (b"GET", ""): self._root,
            (b"GET", "login"): self._login_form,
            (b"POST", "login"): self._login,
            (b"POST", "logout"): self._logout,
            (b"GET", "mail"): self._mailbox,
            (b"GET", "compose"): self._compose_form,
            (b"POST", "compose"): self._send,
            (b"GET", "sent"): self._sent,
            (b"GET", "account"): self._account_page,
            (b"GET", "reset"): self._reset_form,
            (b"POST", "reset"): self._reset_request,
        }

    # -- plumbing ----------------------------------------------------------

    def render(self, request: Any) -> Any:
        ensureDeferred(self._handle(request))
        return server.NOT_DONE_YET

    def _headers(self, request: Any, csp: str = _PAGE_CSP, frame: bytes = b"DENY") -> None:
        request.setHeader(b"content-security-policy", csp.encode())
        request.setHeader(b"x-frame-options", frame)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cross-origin-opener-policy", b"same-origin")
        request.setHeader(b"permissions-policy", b"camera=(), microphone=(), geolocation=()")
        request.setHeader(b"cache-control", b"no-store")
        if self._tls:
            request.setHeader(b"strict-transport-security", b"max-age=31536000")

    async def _handle(self, request: Any) -> None:
        self._headers(request)
        path = [p.decode("utf-8", "replace") for p in request.postpath]
        while path and path[-1] == "":
            path.pop()
        try:
            if request.method == b"GET" and path == ["static", "style.css"]:
                request.setHeader(b"content-type", b"text/css; charset=utf-8")
                request.setHeader(b"cache-control", b"public, max-age=3600")
                return self._finish(request, self._css)
            handler: Callable[..., Any] | None
            if path[:2] == ["mail", "msg"] and request.method == b"GET":
                handler = self._message
            elif path[:1] == ["sent"] and len(path) >= 2 and request.method == b"GET":
                handler = self._sent_message
            elif path[:2] == ["admin", "users"]:
                handler = {b"GET": self._admin, b"POST": self._admin_change}.get(request.method)
            elif path[:1] in (["invite"], ["reset"]) and len(path) == 2:
                handler = {b"GET": self._link_form, b"POST": self._link_set}.get(request.method)
            elif path == ["account", "logout-everywhere"] and request.method == b"POST":
                handler = self._logout_everywhere
            elif len(path) <= 1:
                handler = self._routes.get((request.method, "/".join(path)))
            else:
                handler = None
            if handler is None:
                raise _NOT_FOUND
            await handler(request, path)
        except _Redirect as r:
            request.setResponseCode(303)
            request.setHeader(b"location", r.location.encode())
            self._finish(request, b"")
        except _Answer as a:
            request.setResponseCode(a.code)
            self._page(request, "error.html", title=a.title or "Error", text=a.text, account=None)
        except Exception:
            self.log.failure("LiveArchive request {path} failed", path="/".join(path))
            request.setResponseCode(500)
            self._page(
                request, "error.html", title="Something went wrong",
                text="The hub could not answer this page. Your mail is safe; try again in a moment.", account=None,
            )

    def _finish(self, request: Any, body: bytes) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.write(body)
        request.finish()

    def _page(self, request: Any, template: str, **values: Any) -> None:
        session = values.pop("session", None)
        account: Account | None = values.get("account")
        values.setdefault("hostname", self._node.config.hostname)
        values.setdefault("banner", None)
        values.setdefault("section", "")
        values.setdefault("query", "")
        values.setdefault("mailbox", "")
        values["account_address"] = str(account.address) if account else ""
        values["csrf"] = (lambda form: acc.csrf_token(session, form)) if session else (lambda form: "")
        body = self._env.get_template(template).render(**values)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        self._finish(request, body.encode("utf-8"))

    @staticmethod
    def _arg(request: Any, name: str, default: str = "") -> str:
        values = request.args.get(name.encode())
        if not values:
            return default
        return values[-1].decode("utf-8", "replace")

    def _client(self, request: Any) -> str:
        """
        The browser's address: the TCP peer's, or, when the peer is one of
        ``[web] trusted_proxies``, the last address in ``X-Forwarded-For``
        that is not one of them (a client can put anything in front of
        it).  Behind a proxy every browser would otherwise be the proxy,
        and twenty wrong passwords from anyone would lock everyone out.
        """
        peer = getattr(request.getClientAddress(), "host", "") or "unknown"
        if not self._proxies or not self._trusted(peer):
            return peer
        forwarded = b",".join(request.requestHeaders.getRawHeaders(b"x-forwarded-for") or [])
        for hop in reversed(forwarded.decode("latin-1").split(",")):
            hop = hop.strip()
            if not hop:
                continue
            if not self._trusted(hop):
                return hop if _is_ip(hop) else peer
        return peer

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._proxies)

    async def _session(self, request: Any) -> tuple[Any, Account]:
        """The request's session and account; a page without one sends the browser to log in."""
        value = request.getCookie(self._cookie)
        if value:
            session = await self._signer.verify(value.decode("latin-1"), self._archive.account)
            if session is not None and session.account is not None:
                # Seen now: the idle timer starts again (max_age does not).
                self._set_cookie(request, self._cookie, self._signer.refresh(session), max_age=int(self._signer.max_age))
                return session, session.account
        raise _Redirect("/login")

    def _check_csrf(self, request: Any, session: Any, form: str) -> None:
        if not acc.check_csrf(session, self._arg(request, "csrf"), form):
            raise _Answer(403, "Expired form", "This form has expired. Go back, reload the page and try again.")

    async def _audit(self, account: Account, action: str, scope: str, detail: str = "") -> None:
        await self._archive.record_audit(
            AuditEvent(self._clock.seconds(), f"user:{account.address}", action, scope, detail)
        )

    def _mailbox_arg(self, request: Any, account: Account) -> Address:
        """The mailbox a request is about (the account's own by default), if the account may read it; else 404."""
        text = self._arg(request, "mailbox")
        try:
            # Folded, as the archive keeps its mailboxes: ?mailbox=Alice@ is alice@'s.
            mailbox = Address.parse(text).folded() if text else account.address
        except AddressError:
            raise _NOT_FOUND from None
        if not account.can_read(mailbox):
            raise _NOT_FOUND
        return mailbox

    def _mailboxes(self, account: Account) -> list[str]:
        return [str(account.address), *(str(m) for m in account.mailboxes if m != account.address)]

    async def _banner(self, mailbox: Address) -> dict[str, str] | None:
        """The state of the mailbox's own server, from the hub's route state."""
        route = self._node.config.route_for(mailbox.domain)
        if route is None:
            return None
        engine = self._node.engine
        state = engine.route_states.get(route) or {}
        try:
            backlog = int((await self._node.store.counts()).get("routes", {}).get(route, 0))
        except Exception:
            backlog = 0
        waiting = f"; {backlog} message{'s' if backlog != 1 else ''} waiting for it" if backlog else ""
        if state.get("state") == "rejecting":
            return {"kind": "rejecting", "text": f"Your mail server is refusing mail since {_when(state.get('since'))}. "
                    f"The hub is holding it for you{waiting}; nothing is lost."}
        down_since = engine.route_down_since(route)
        if down_since is not None:
            return {"kind": "down", "text": f"Your mail server is down since {_when(down_since)}. "
                    f"Your mail is here and will be delivered when it is back{waiting}."}
        if backlog:
            return {"kind": "up", "text": f"Your mail server is back: {backlog} messages are on their way to it."}
        return None

    # -- login and out -----------------------------------------------------

    async def _root(self, request: Any, path: list[str]) -> None:
        await self._session(request)  # to /login without one
        raise _Redirect("/mail")

    def _form_token(self, request: Any) -> str:
        """The double-submit token of a form shown without a session (login, reset), set as a cookie too."""
        token = request.getCookie(b"login_csrf")
        token_text = token.decode("latin-1") if token else secrets.token_urlsafe(24)
        if not token:
            self._set_cookie(request, b"login_csrf", token_text, max_age=3600)
        return token_text

    def _form_token_ok(self, request: Any) -> bool:
        cookie = request.getCookie(b"login_csrf") or b""
        given = self._arg(request, "csrf").encode("latin-1", "replace")
        return bool(cookie) and hmac.compare_digest(cookie, given)

    async def _login_form(self, request: Any, path: list[str], error: str = "", address: str = "") -> None:
        token_text = self._form_token(request)
        if error:
            request.setResponseCode(401 if "password" in error else 429)
        self._page(
            request, "login.html", account=None, error=error, address=address, login_csrf=token_text, totp=True,
            notice="" if error else _LOGIN_NOTICES.get(self._arg(request, "notice"), ""),
            reset=self._public_url() is not None,
        )

    def _public_url(self) -> str | None:
        return acc.public_url(self._node.config)

    def _set_cookie(self, request: Any, name: bytes, value: str, max_age: int | None = None) -> None:
        request.addCookie(
            name, value.encode("latin-1"), path=b"/", httpOnly=True, secure=self._tls, sameSite="strict",
            max_age=None if max_age is None else str(max_age).encode(),
        )

    async def _login(self, request: Any, path: list[str]) -> None:
        if not self._form_token_ok(request):
            return await self._login_form(request, path, "This form has expired: please try again.")
        text = self._arg(request, "address").strip()
        password = self._arg(request, "password")
        code = self._arg(request, "code").strip()
        ip = self._client(request)
        # The account as the archive knows it: "bob@example.com." and
        # "BOB@example.com" are bob@example.com's failures too.
        key = _login_key(text)
        wait = self._throttle.check(key, ip)
        if wait:
            return await self._login_form(
                request, path, f"Too many failed logins: try again in {int(wait) + 1} seconds.", text
            )
        account = None
        try:
            account = await self._archive.account(Address.parse(text).folded())
        except AddressError:
            account = None
        ok = await acc.verify_password_async(account.password_hash if account else "", password)
        if ok and account is not None and account.totp_secret:
            ok = acc.verify_totp(account.totp_secret, code, self._clock.seconds(), self._totp_guard)
        if not ok or account is None or account.disabled:
            self._throttle.failed(key, ip)
            self.log.info("LiveArchive: failed login for {address} from {ip}", address=text, ip=ip)
            return await self._login_form(
                request, path, "That address, hub password or code is not right.", text
            )
        self._throttle.succeeded(key, ip)
        value = self._signer.issue(account)
        self._set_cookie(request, self._cookie, value, max_age=int(self._signer.max_age))
        request.addCookie(b"login_csrf", b"", path=b"/", max_age=b"0", httpOnly=True, secure=self._tls, sameSite="strict")
        await self._audit(account, "login", f"mailbox {account.address}", ip)
        raise _Redirect("/mail")

    async def _logout(self, request: Any, path: list[str]) -> None:
        session, account = await self._session(request)
        self._check_csrf(request, session, "logout")
        self._signer.revoke(session)
        # Kept with the account: every node refuses the cookie, after a restart
        # too.  Read again just before: a password set meanwhile must stay.
        fresh = await self._archive.account(account.address)
        if fresh is not None:
            await self._archive.update_account(self._signer.ended(fresh, session))
        self._clear_session_cookie(request)
        raise _Redirect("/login")

    def _clear_session_cookie(self, request: Any) -> None:
        request.addCookie(self._cookie, b"", path=b"/", max_age=b"0", httpOnly=True, secure=self._tls, sameSite="strict")

    # -- the account's own page; log out everywhere --------------------------

    async def _account_page(self, request: Any, path: list[str]) -> None:
        session, account = await self._session(request)
        self._page(
            request, "account.html", session=session, account=account, section="account",
            mailboxes=self._mailboxes(account), role=account.role.value, totp=bool(account.totp_secret),
            recovery=account.recovery, since=_when(session.issued),
        )

    async def _logout_everywhere(self, request: Any, path: list[str]) -> None:
        session, account = await self._session(request)
        self._check_csrf(request, session, "everywhere")
        # A new session generation: every node refuses the sessions issued
        # before it at their next request (they read it from the archive).
        await self._archive.update_account(evolve(account, session_version=account.session_version + 1))
        self._signer.revoke(session)
        self._clear_session_cookie(request)
        await self._audit(account, "logout-everywhere", f"mailbox {account.address}", self._client(request))
        raise _Redirect("/login?notice=everywhere")

    # -- forgotten passwords, invitations: the links that set a password ----

    async def _reset_form(self, request: Any, path: list[str], answer: str = "", error: str = "", code: int = 200) -> None:
        request.setResponseCode(code)
        self._page(
            request, "reset.html", account=None, login_csrf=self._form_token(request),
            enabled=self._public_url() is not None, answer=answer, error=error,
        )

    async def _reset_request(self, request: Any, path: list[str]) -> None:
        """
        Mail a reset link to the account's recovery address.  The answer is
        the same whether the account exists, has a recovery address or is
        disabled, and is given before the account is even looked up: its
        time says nothing either.
        """
        if self._public_url() is None:
            return await self._reset_form(request, path, code=404)
        if not self._form_token_ok(request):
            return await self._reset_form(request, path, error="This form has expired: please try again.", code=403)
        try:
            address = Address.parse(self._arg(request, "address").strip()).folded()
        except AddressError:
            return await self._reset_form(
                request, path, error="That is not an email address: give the one you log in with.", code=400
            )
        ip = self._client(request)
        key = str(address).casefold()
        wait = self._reset_throttle.check(key, ip)
        if wait:
            return await self._reset_form(
                request, path, code=429,
                error=f"Too many requests for a new password: try again in {int(wait) // 60 + 1} minutes.",
            )
        self._reset_throttle.failed(key, ip)
        d = ensureDeferred(self._mail_reset(address, ip))
        self._mailing.add(d)
        d.addErrback(lambda f: self.log.failure("LiveArchive: the reset mail of {address} failed", f, address=address))
        d.addBoth(lambda _: self._mailing.discard(d))
        await self._reset_form(
            request, path,
            answer="If an account with a recovery address exists for that address, a mail with a link to choose "
            "a new password is on its way to its recovery address (never to the address itself). The link "
            "works once, for one hour. No mail after a few minutes? Ask your administrator.",
        )

    async def _mail_reset(self, address: Address, ip: str) -> None:
        account = await self._archive.account(address)
        base = self._public_url()
        if account is None or account.disabled or not acc.link_recipients(acc.RESET, account) or base is None:
            return
        links = self._signer.links
        token = links.issue(acc.RESET, account)
        now = self._clock.seconds()
        envelope, data = acc.link_mail(
            acc.RESET, account, acc.link_url(base, acc.RESET, token), self._node.config.hostname, now,
            links.expires(token) or now, client=ip,
        )
        await self._node.receive(envelope, data)
        await self._archive.record_audit(
            AuditEvent(now, f"web:{ip}", "password-reset-mail", f"mailbox {account.address}",
                       f"to {', '.join(str(r) for r in envelope.recipients)}")
        )

    def mailing(self) -> Deferred[None]:
        """Fires once every reset mail under way is spooled (or has failed, which is logged)."""
        d = gatherResults(list(self._mailing), consumeErrors=True)
        return d.addCallback(lambda _: None)

    async def _link_account(self, purpose: str, token: str) -> Account:
        """The account a link of ``purpose`` sets the password of, if the link works; else 404."""
        links = self._signer.links
        address = links.address(token, purpose)
        account = await self._archive.account(address) if address is not None else None
        if account is None or not links.check(token, purpose, account):
            raise _BAD_LINK
        return account

    async def _link_form(self, request: Any, path: list[str], error: str = "", code: int = 200) -> None:
        purpose, token = path
        account = await self._link_account(purpose, token)
        request.setResponseCode(code)
        self._page(
            request, "password.html", account=None, purpose=purpose, address=str(account.address),
            login_csrf=self._form_token(request), error=error, action=f"/{purpose}/{token}",
            until=_when(self._signer.links.expires(token)), totp=bool(account.totp_secret),
        )

    async def _link_set(self, request: Any, path: list[str]) -> None:
        purpose, token = path
        account = await self._link_account(purpose, token)
        if not self._form_token_ok(request):
            return await self._link_form(request, path, "This form has expired: please try again.", 403)
        password = self._arg(request, "password")
        if password != self._arg(request, "again"):
            return await self._link_form(request, path, "The two passwords differ: type the same one twice.", 400)
        try:
            acc.check_password_policy(password, account.address)
        except acc.PasswordPolicyError as e:
            return await self._link_form(request, path, f"Not this one: {e}.", 400)
        key = str(account.address)
        if key in self._setting:
            raise _BAD_LINK
        self._setting.add(key)
        try:
            new_hash = await acc.hash_password_async(password)
            # Once more after hashing (tens of milliseconds): the link may
            # have been used meanwhile, here or on another node.
            account = await self._link_account(purpose, token)
            # A new password and a new session generation: the link is used,
            # and every session of the account ends on every node.
            await self._archive.update_account(
                evolve(account, password_hash=new_hash, session_version=account.session_version + 1)
            )
        finally:
            self._setting.discard(key)
        ip = self._client(request)
        # Failed logins before (somebody else's guesses, perhaps) no longer lock its owner out.
        self._throttle.succeeded(key.lower(), ip)
        await self._archive.record_audit(
            AuditEvent(self._clock.seconds(), f"web:{ip}", f"password-{purpose}", f"mailbox {account.address}", "")
        )
        raise _Redirect(f"/login?notice={purpose}")

    # -- reading -----------------------------------------------------------

    async def _mailbox(self, request: Any, path: list[str]) -> None:
        session, account = await self._session(request)
        mailbox = self._mailbox_arg(request, account)
        text = self._arg(request, "q")
        try:
            query = parse_query(text)
        except QueryError as e:
            # The error, and no list: every message under a search that
            # failed would read as its result.
            self._page(
                request, "mailbox.html", session=session, account=account, mailbox=str(mailbox),
                mailboxes=self._mailboxes(account), items=[], total=0, next=None, query=text,
                error=str(e), section="inbox", banner=await self._banner(mailbox),
            )
            return
        scope = ArchiveScope(mailbox=mailbox)
        cursor = self._arg(request, "cursor") or None
        # The audit's commit (an fsync) runs beside the search, not after it;
        # the page is still shown only once the search is recorded.
        audited = ensureDeferred(self._audit(account, "search", str(scope), repr(text))) if text else None
        try:
            page = await self._archive.search(scope, query, cursor, PAGE)
        except ValueError:
            raise _NOT_FOUND from None
        finally:
            if audited is not None:
                await audited
        total = self._total(mailbox, query, cursor, page)
        banner = ensureDeferred(self._banner(mailbox))
        read = await self._archive.read_ids(account.address, [s.id for s in page.items])
        items = [
            {
                "id": s.id,
                "sender": s.sender,
                "subject": s.subject,
                "when": _when(s.received_at),
                "has_attachment": s.has_attachment,
                "unread": s.id not in read,
            }
            for s in page.items
        ]
        self._page(
            request, "mailbox.html", session=session, account=account, mailbox=str(mailbox),
            mailboxes=self._mailboxes(account), items=items, total=total, next=page.next, query=text,
            error="", section="inbox", banner=await banner,
        )

    def _total(self, mailbox: Address, query: ArchiveQuery, cursor: str | None, page: Any) -> int | str:
        """
        What a page of the mailbox says of how many messages there are,
        without counting a large result on every page: exact when the whole
        result is on the first page; for the mailbox without a search, its
        count of at most ``COUNT_SECONDS`` ago (made in the background,
        shown from the next page on); otherwise only that there are more.
        """
        if cursor is None and page.next is None:
            return len(page.items)
        if query != ArchiveQuery():
            return f"more than {PAGE}"
        key = str(mailbox)
        known = self._counts.get(key)
        if (known is None or self._clock.seconds() - known[0] > COUNT_SECONDS) and key not in self._counting:
            self._counting.add(key)

            def counted(n: int) -> None:
                self._counts.pop(key, None)
                if len(self._counts) >= COUNTS_KEPT:
                    del self._counts[next(iter(self._counts))]
                self._counts[key] = (self._clock.seconds(), n)

            d = self._archive.count(ArchiveScope(mailbox=mailbox), ArchiveQuery())
            d.addCallback(counted)
            d.addErrback(lambda f: self.log.failure("LiveArchive: counting {mailbox} failed", f, mailbox=key))
            d.addBoth(lambda _: self._counting.discard(key))
        return f"about {known[1]:,}" if known else f"more than {PAGE}"

    async def _archived(self, request: Any, account: Account, archive_id: str) -> tuple[Address, Any]:
        """The archived message ``archive_id`` of the requested mailbox, which the account may read; else 404."""
        mailbox = self._mailbox_arg(request, account)
        message = await self._archive.get(archive_id)
        if message is None or mailbox not in message.mailboxes:
            raise _NOT_FOUND
        return mailbox, message

    async def _message(self, request: Any, path: list[str]) -> None:
        # /mail/msg/ID, /mail/msg/ID/body, /mail/msg/ID/raw, /mail/msg/ID/part/N
        if len(path) < 3:
            raise _NOT_FOUND
        session, account = await self._session(request)
        archive_id = path[2]
        mailbox, message = await self._archived(request, account, archive_id)
        images = self._arg(request, "images") == "1"
        base = f"/mail/msg/{urllib.parse.quote(archive_id, safe='')}"
        mq = f"mailbox={urllib.parse.quote(str(mailbox))}"
        rest = path[3:]
        if rest == ["raw"]:
            await self._audit(account, "read", archive_id, "raw")
            return self._download(request, message.message, f"{archive_id}.eml", "message/rfc822")
        if len(rest) == 2 and rest[0] == "part" and rest[1].isdigit():
            filename, data = await _part(message.message, int(rest[1]))
            await self._audit(account, "read", archive_id, f"attachment {filename!r}")
            # Always a download, never shown inline: an attachment is the sender's content.
            return self._download(request, data, filename, "application/octet-stream")
        if len(rest) == 2 and rest[0] == "inline" and rest[1].isdigit():
            return await self._inline(request, message.message, int(rest[1]))
        marked = None
        if not rest:
            # Both commits in one batch of the archive's writer, while the message is parsed.
            marked = gatherResults(
                [
                    self._archive.set_read(account.address, [archive_id], True),
                    ensureDeferred(self._audit(account, "read", archive_id, str(mailbox))),
                ],
                consumeErrors=True,
            )
        shown = await deferToThread(mime.show, message.message, images, f"{base}/inline/{{index}}?{mq}")
        if rest == ["body"]:
            return self._body(request, shown.html, images)
        if rest or marked is None:
            raise _NOT_FOUND
        await marked
        reply_base = f"reply={urllib.parse.quote(archive_id, safe='')}&{mq}"
        self._page(
            request, "message.html", session=session, account=account, mailbox=str(mailbox),
            shown=shown, when=_when(message.received_at), images=images,
            headers=self._arg(request, "headers") == "1",
            self_url=f"{base}?{mq}", raw_url=f"{base}/raw?{mq}", part_url=f"{base}/part/",
            body_url=f"{base}/body?{mq}" + ("&images=1" if images else ""), reply_base=reply_base,
            section="inbox", banner=None,
        )

    async def _inline(self, request: Any, message: bytes, index: int) -> None:
        """One of a message's own images (``cid:``), for its frame: a picture type only, else 404."""
        found = await deferToThread(mime.attachment, message, index)
        if found is None or found[1] not in mime.INLINE_IMAGES:
            raise _NOT_FOUND
        request.setHeader(b"content-type", found[1].encode())
        request.setHeader(b"content-disposition", b"inline")
        request.setHeader(b"content-security-policy", b"default-src 'none'; sandbox")
        self._finish(request, found[2])

    def _body(self, request: Any, html: str, images: bool) -> None:
        """A message's sanitised HTML, for its sandboxed frame, under the strictest policy."""
        self._headers(request, _BODY_CSP.format(remote=" https: http:" if images else ""), frame=b"SAMEORIGIN")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        doc = (
            '<!doctype html><html><head><meta charset="utf-8"><base target="_blank">'
            "<style>body{font:15px/1.45 system-ui,sans-serif;margin:8px;overflow-wrap:anywhere}"
            "img[data-blocked-src]{display:none}</style></head><body>" + html + "</body></html>"
        )
        self._finish(request, doc.encode("utf-8"))

    def _download(self, request: Any, data: bytes, filename: str, ctype: str) -> None:
        safe = "".join(c if c.isalnum() or c in "._- " else "_" for c in filename)[:120] or "download"
        request.setHeader(b"content-type", ctype.encode())
        request.setHeader(
            b"content-disposition",
            f"attachment; filename=\"{safe}\"; filename*=UTF-8''{urllib.parse.quote(filename[:200])}".encode(),
        )
        self._finish(request, data)

    # -- writing -----------------------------------------------------------

    async def _compose_form(
        self, request: Any, path: list[str], error: str = "", draft: Mapping[str, str] | None = None, code: int = 200
    ) -> None:
        session, account = await self._session(request)
        if code != 200:
            request.setResponseCode(code)
        values = {"to": "", "cc": "", "subject": "", "body": "", "in_reply_to": "", "references": "",
                  "forward": "", "forward_mailbox": ""}
        forwarded: list[str] = []
        original = self._arg(request, "reply")
        if draft is not None:
            values.update(draft)
        elif original:
            mailbox, message = await self._archived(request, account, original)
            shown = await deferToThread(mime.show, message.message, False)
            mode = self._arg(request, "mode", "reply")
            subject = shown.subject
            quoted = "\n".join("> " + line for line in shown.text.splitlines())
            if mode == "forward":
                # The original's attachments go with it (fetched again, and
                # its access checked again, when the form is sent).
                values["forward"], values["forward_mailbox"] = original, str(mailbox)
                forwarded = [a.filename for a in shown.attachments]
                values["subject"] = subject if subject.lower().startswith("fwd:") else f"Fwd: {subject}"
                values["body"] = (
                    f"\n\n---------- Forwarded message ----------\nFrom: {shown.sender}\nDate: {shown.date}\n"
                    f"Subject: {subject}\nTo: {shown.to}\n\n{shown.text}"
                )
            else:
                values["subject"] = subject if subject.lower().startswith("re:") else f"Re: {subject}"
                values["to"] = shown.reply_to or shown.sender
                if mode == "all":
                    others = [a for a in mime.addresses(f"{shown.to}, {shown.cc}") if a.lower() != str(account.address)]
                    values["cc"] = ", ".join(others)
                values["body"] = f"\n\nOn {shown.date}, {shown.sender} wrote:\n{quoted}"
                values["in_reply_to"] = shown.message_id
                values["references"] = shown.references
        if draft is not None and values.get("forward"):
            forwarded = await self._forwarded_names(request, account, values)
        self._page(request, "compose.html", session=session, account=account, draft=values, error=error,
                   section="compose", forwarded=forwarded)

    async def _forwarded_original(self, request: Any, account: Account, draft: Mapping[str, str]) -> tuple[bytes, Any]:
        """The message being forwarded and its ``mime.show``, if the account may still read it; else 404."""
        request.args[b"mailbox"] = [draft.get("forward_mailbox", "").encode()]
        _, message = await self._archived(request, account, draft["forward"])
        return message.message, await deferToThread(mime.show, message.message, False)

    async def _forwarded(self, request: Any, account: Account, draft: Mapping[str, str]) -> list[tuple[str, str, bytes]]:
        """The attachments of the message being forwarded (``mime.attachment`` each)."""
        data, shown = await self._forwarded_original(request, account, draft)
        found = []
        for a in shown.attachments:
            part = await deferToThread(mime.attachment, data, a.index)
            if part is not None:
                found.append(part)
        return found

    async def _forwarded_names(self, request: Any, account: Account, draft: Mapping[str, str]) -> list[str]:
        """Their names only, for the form shown again: no attachment decoded."""
        _, shown = await self._forwarded_original(request, account, draft)
        return [a.filename for a in shown.attachments]

    async def _send(self, request: Any, path: list[str]) -> None:
        session, account = await self._session(request)
        length = int(request.getHeader(b"content-length") or 0)
        if length > MAX_POST:
            raise _Answer(413, "Too large", f"A message may be at most {MAX_POST // (1024 * 1024)} MB with its attachments.")
        fields, files = await deferToThread(_form, request)
        request.args[b"csrf"] = [fields.get("csrf", "").encode()]
        self._check_csrf(request, session, "compose")
        draft = {k: fields.get(k, "") for k in ("to", "cc", "subject", "body", "in_reply_to", "references",
                                                 "forward", "forward_mailbox")}
        for name in ("subject", "in_reply_to", "references"):
            # One header line each: a line break would end the header (and
            # is no subject a person types; the form's field has none).
            if "\r" in draft[name] or "\n" in draft[name]:
                return await self._compose_form(request, path, f"The {name.replace('_', '-')} must be one line.", draft, 400)
        to, cc = mime.addresses(draft["to"]), mime.addresses(draft["cc"])
        recipients: list[Address] = []
        try:
            for text in to + cc:
                recipients.append(Address.parse(text))
        except AddressError as e:
            return await self._compose_form(request, path, f"{text}: {e}", draft)
        if not recipients:
            return await self._compose_form(request, path, "Give at least one recipient.", draft)
        if draft["forward"]:
            files = [*await self._forwarded(request, account, draft), *files]
        now = self._clock.seconds()
        data, message_id = await deferToThread(
            mime.build_message, str(account.address), to, cc, draft["subject"], draft["body"],
            self._node.config.hostname, draft["in_reply_to"], draft["references"], files, now,
        )
        envelope = Envelope(
            account.address, tuple(recipients), received_at=now, client=self._client(request), helo="livearchive"
        )
        # The hub's own path: its spool, its routes (the outbound one for the
        # rest of the world), its archive for mail to the hub's own mailboxes.
        await self._node.receive(envelope, data.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n"))
        await self._archive.add_sent(SentMessage(message_id, account.address, now, data))
        await self._audit(account, "send", f"mailbox {account.address}", f"to {len(recipients)} recipients")
        raise _Redirect("/sent?notice=sent")

    async def _sent(self, request: Any, path: list[str]) -> None:
        session, account = await self._session(request)
        before_text = self._arg(request, "before")
        before = float(before_text) if before_text.replace(".", "", 1).isdigit() else None
        sent = await self._archive.sent(account.address, before, PAGE)
        items = []
        for s in sent:
            shown = await deferToThread(mime.show, s.message, False)
            items.append({"id": s.id, "to": shown.to, "subject": shown.subject, "when": _when(s.sent_at)})
        notice = "Sent. It is on its way." if self._arg(request, "notice") == "sent" else ""
        nxt = repr(sent[-1].sent_at) if len(sent) == PAGE else None
        self._page(request, "sent.html", session=session, account=account, items=items, next=nxt, notice=notice, section="sent")

    # -- administration of accounts ----------------------------------------

    async def _admin(
        self, request: Any, path: list[str], notice: str = "", error: str = "", link: str = ""
    ) -> None:
        session, account = await self._session(request)
        if len(path) != 2:
            raise _NOT_FOUND
        listed = await _manageable(self, account)
        rows = [
            {
                "address": str(a.address),
                "role": a.role.value,
                "disabled": a.disabled,
                "has_password": bool(a.password_hash),
                "totp": bool(a.totp_secret),
                "manageable": acc.can_manage(account, a) and a.address != account.address,
            }
            for a in listed
        ]
        if error:
            request.setResponseCode(400)
        self._page(
            request, "admin.html", session=session, account=account, accounts=rows, notice=notice, error=error,
            link=link, domain="" if account.role is Role.HUB_ADMIN else account.address.domain,
            hub_admin=account.role is Role.HUB_ADMIN, section="admin",
        )

    async def _admin_change(self, request: Any, path: list[str]) -> None:
        session, account = await self._session(request)
        await _manageable(self, account)  # a user: 404
        self._check_csrf(request, session, "admin")
        password = self._arg(request, "password")
        if len(path) == 2:
            # Add an account.
            try:
                address = Address.parse(self._arg(request, "address").strip()).folded()
                role = Role(self._arg(request, "role", "user"))
            except (AddressError, ValueError) as e:
                return await self._admin(request, path[:2], error=str(e))
            new = Account(address, role=role, created=self._clock.seconds())
            if self._node.config.route_for(address.domain) is None:
                return await self._admin(request, path[:2], error=f"{address.domain} is not a domain of this hub")
            if not acc.can_manage(account, new):
                return await self._admin(request, path[:2], error=f"you may not create {address} as {role.value}")
            recovery = self._arg(request, "recovery").strip()
            if recovery:
                try:
                    new = evolve(new, recovery=str(Address.parse(recovery)))
                except AddressError as e:
                    return await self._admin(request, path[:2], error=f"recovery address {recovery}: {e}")
            if password:
                try:
                    acc.check_password_policy(password, address)
                except acc.PasswordPolicyError as e:
                    return await self._admin(request, path[:2], error=str(e))
                new = evolve(new, password_hash=await acc.hash_password_async(password))
            try:
                await self._archive.add_account(new)
            except KeyError:
                return await self._admin(request, path[:2], error=f"{address} has an account already")
            await self._audit(account, "account-add", f"mailbox {address}", role.value)
            if password:
                return await self._admin(request, path[:2], notice=f"{address} can log in now.")
            return await self._invite(request, path[:2], account, new)
        if len(path) != 4:
            raise _NOT_FOUND
        try:
            target_address = Address.parse(path[2]).folded()
        except AddressError:
            raise _NOT_FOUND from None
        target = await self._archive.account(target_address)
        if target is None or not acc.can_manage(account, target) or target.address == account.address:
            raise _NOT_FOUND
        action = path[3]
        if action == "disable":
            changed = evolve(target, disabled=True, session_version=target.session_version + 1)
        elif action == "enable":
            changed = evolve(target, disabled=False)
        elif action == "totp-remove":
            changed = evolve(target, totp_secret="")
        elif action == "logout":
            changed = evolve(target, session_version=target.session_version + 1)
        elif action == "invite":
            if target.password_hash or target.disabled:
                return await self._admin(
                    request, path[:2], error=f"{target.address} has a password already, or is disabled: no invitation"
                )
            return await self._invite(request, path[:2], account, target)
        elif action == "password":
            try:
                acc.check_password_policy(password, target.address)
            except acc.PasswordPolicyError as e:
                return await self._admin(request, path[:2], error=str(e))
            changed = evolve(
                target, password_hash=await acc.hash_password_async(password), session_version=target.session_version + 1
            )
        else:
            raise _NOT_FOUND
        await self._archive.update_account(changed)
        await self._audit(account, f"account-{action}", f"mailbox {target.address}")
        return await self._admin(request, path[:2], notice=f"{target.address}: {action.replace('-', ' ')} done.")

    async def _invite(self, request: Any, path: list[str], admin: Account, invited: Account) -> None:
        """
        Mail ``invited`` (without a password) the link to choose one, through
        the hub's own path; without ``[web] public_url``, show the link to
        the administrator instead, to hand over.
        """
        links = self._signer.links
        token = links.issue(acc.INVITE, invited)
        until = _when(links.expires(token))
        base = self._public_url()
        if base is None:
            await self._audit(admin, "account-invite", f"mailbox {invited.address}", "link shown")
            return await self._admin(
                request, path, link=acc.link_url(None, acc.INVITE, token),
                notice=f"{invited.address} is invited, but this hub has no [web] public_url to mail the link with: "
                f"give {invited.address} this link yourself (it works once, until {until}):",
            )
        now = self._clock.seconds()
        envelope, data = acc.link_mail(
            acc.INVITE, invited, acc.link_url(base, acc.INVITE, token), self._node.config.hostname, now,
            links.expires(token) or now, client=self._client(request),
        )
        to = " and ".join(str(r) for r in envelope.recipients)
        try:
            await self._node.receive(envelope, data)
        except Exception as e:
            self.log.failure("LiveArchive: the invitation of {address} was not spooled", address=invited.address)
            return await self._admin(
                request, path, error=f"{invited.address} has an account, but its invitation could not be sent now"
                f" ({e or type(e).__name__}): send it again from this page in a moment.",
            )
        await self._audit(admin, "account-invite", f"mailbox {invited.address}", f"mailed to {to}")
        return await self._admin(
            request, path, notice=f"{invited.address} is invited: a link to choose a password was mailed to {to}"
            f" (it works once, until {until})."
        )

    async def _sent_message(self, request: Any, path: list[str]) -> None:
        # /sent/ID, /sent/ID/body, /sent/ID/raw, /sent/ID/part/N: as a message of the archive.
        session, account = await self._session(request)
        sent = await self._archive.sent_message(account.address, path[1])
        if sent is None:
            raise _NOT_FOUND
        base = f"/sent/{urllib.parse.quote(sent.id, safe='')}"
        rest = path[2:]
        if rest == ["raw"]:
            return self._download(request, sent.message, f"{sent.id}.eml", "message/rfc822")
        if len(rest) == 2 and rest[0] == "part" and rest[1].isdigit():
            filename, data = await _part(sent.message, int(rest[1]))
            return self._download(request, data, filename, "application/octet-stream")
        if len(rest) == 2 and rest[0] == "inline" and rest[1].isdigit():
            return await self._inline(request, sent.message, int(rest[1]))
        images = self._arg(request, "images") == "1"
        shown = await deferToThread(mime.show, sent.message, images, f"{base}/inline/{{index}}")
        if rest == ["body"]:
            return self._body(request, shown.html, images)
        if rest:
            raise _NOT_FOUND
        self._page(
            request, "message.html", session=session, account=account, shown=shown, when=_when(sent.sent_at),
            images=images, headers=self._arg(request, "headers") == "1", self_url=f"{base}?",
            raw_url=f"{base}/raw", part_url=f"{base}/part/", body_url=f"{base}/body" + ("?images=1" if images else ""),
            reply_base="", section="sent",
        )


async def _part(message: bytes, index: int) -> tuple[str, bytes]:
    """The file name and bytes of the message's part ``index`` (an attachment), or 404."""
    found = await deferToThread(mime.attachment, message, index)
    if found is None:
        raise _NOT_FOUND
    return found[0], found[2]


async def _manageable(live: LiveArchive, account: Account) -> list[Account]:
    """The accounts ``account`` may see on the administration page."""
    if account.role is Role.HUB_ADMIN:
        return list(await live._archive.accounts(None))
    if account.role is Role.DOMAIN_ADMIN:
        return list(await live._archive.accounts(account.address.domain))
    raise _NOT_FOUND


def _form(request: Any) -> tuple[dict[str, str], list[tuple[str, str, bytes]]]:
    """A multipart/form-data (or urlencoded) body: its fields and its files (in a thread)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    ctype = request.getHeader(b"content-type") or b""
    request.content.seek(0)
    body = request.content.read()
    fields: dict[str, str] = {}
    files: list[tuple[str, str, bytes]] = []
    if not ctype.lower().startswith(b"multipart/form-data"):
        for key, values in request.args.items():
            fields[key.decode()] = values[-1].decode("utf-8", "replace")
        return fields, files
    parsed = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype + b"\r\n\r\n" + body)
    for part in parsed.iter_parts():  # type: ignore[attr-defined]
        name = part.get_param("name", header="content-disposition") or ""
        filename = part.get_filename()
        raw = part.get_payload(decode=True)
        payload = raw if isinstance(raw, bytes) else b""
        if filename is not None:
            if filename and payload:
                files.append((os.path.basename(filename), part.get_content_type(), payload))
        else:
            fields[str(name)] = payload.decode("utf-8", "replace").replace("\r\n", "\n")
    return fields, files


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _login_key(text: str) -> str:
    """What the login throttle counts failures of: the folded address, or the text as typed if it is none."""
    try:
        return str(Address.parse(text).folded())
    except AddressError:
        return text.casefold()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True

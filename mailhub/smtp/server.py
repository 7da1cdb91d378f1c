"""
The inbound SMTP server: the hub's MX listener.

It speaks ESMTP (RFC 5321) with PIPELINING (RFC 2920), SIZE (RFC 1870),
8BITMIME (RFC 6152) and ENHANCEDSTATUSCODES (RFC 2034 / 3463) to whoever
sends mail to the organisation's domains.  It decides only what to answer:
which recipients the hub relays for is the injected ``check_recipient``, and
storing an accepted message is the injected ``receive``.  "250" after DATA is
said only once ``receive`` has fired, that is once the message is durable;
any failure to store gives the client a 4xx so it keeps the message.

This is deliberately not ``twisted.mail.smtp``'s server: that one advertises
neither PIPELINING nor SIZE, and its handling of pipelined input has open bugs
(Twisted issue #8126).  Here the protocol is written directly on
``twisted.internet.protocol.Protocol``: commands are taken from one input
buffer one at a time, and while a check or a store is pending nothing more is
read (the transport is paused), so replies always go out in command order.

The message body is never handled line by line in Python: DATA mode scans the
received chunks with ``bytes.find`` for ``CRLF . CRLF`` (and only that: no
bare-LF, bare-CR or NUL variant ends a message, which is what SMTP smuggling
relies on), and unstuffs, checks and normalises with bytes methods and compiled
regular expressions.  NUL octets are refused, or removed with ``[smtp]
nul_bytes = "remove"``: a downstream server that drops them would read
``CRLF NUL . CRLF`` as the end of DATA.  The checks run in place on the DATA
buffer, and the stored message is its one copy (with the ``Received:`` header
in front); only dot-stuffed, normalised or NUL-cleaned messages are copied
once more.

This module must not do I/O other than through its transport, nor read the
wall clock: time comes from the injected ``IReactorTime``.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import secrets
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.config import SmtpConfig
from mailhub.model import (
    Address,
    AddressError,
    CheckedMessage,
    Envelope,
    Reply,
    StoreFull,
    StoreUnavailable,
    has_bare_lf,
)
from mailhub.netio import write_now
from mailhub.stats import SmtpStats

__all__ = [
    "ClientLimiter",
    "Receive",
    "RecipientCheck",
    "SMTPFactory",
    "SMTPServerProtocol",
    "address_literal",
    "chain_checks",
    "domain_check",
    "sender_address",
]

RecipientCheck = Callable[[Address], "Deferred[Any]"]
"""
Decides whether the hub takes mail for one recipient: the returned Deferred
fires with ``None`` to accept, or a ``Reply`` (4xx/5xx) to refuse with.  An
exception or errback gives the client ``451 4.3.0``.
"""

Receive = Callable[[Envelope, bytes], "Deferred[Any]"]
"""
Stores an accepted message durably; the Deferred fires (optionally with a
``str`` queue id for the 250 text) only once it is durable.  Failing with
``StoreFull`` gives ``452 4.3.1``, any other failure ``451 4.3.0``.
"""

_log = Logger(namespace="mailhub.smtp.server")

RELAYING_DENIED = Reply(550, "5.7.1", "Relaying denied")

# What the DATA scan looks for, by what it already knows (a line starting with
# a dot seen, a bare CR seen): CRLF "." starts the end marker or a dot-stuffed
# line; a CR with no LF after it is bare.  Each pattern starts with one literal
# octet, so the regular expression engine's own scan finds the candidates (a
# third of the time of ``bytes.find`` for CRLF "."; a pattern starting with a
# choice of octets steps through every position and takes ten times as long).
_DATA_SCANS = {
    (False, False): re.compile(rb"\r(?:\n\.|(?!\n))"),
    (True, False): re.compile(rb"\r(?:\n\.\r\n|(?!\n))"),
    (False, True): re.compile(rb"\r\n\."),
    (True, True): re.compile(rb"\r\n\.\r\n"),
}
#: Input held while a reply is awaited before reading stops (see dataReceived).
_MAX_WAITING_INPUT = 64 * 1024
_MAIL = re.compile(r"FROM: *<([^<>]*)>(.*)\Z", re.IGNORECASE)
_RCPT = re.compile(r"TO: *<([^<>]*)>(.*)\Z", re.IGNORECASE)
_HELO_NAME = re.compile(r"[!-~]+\Z")
# What may appear of the client's HELO name inside the Received comment syntax.
_HEADER_UNSAFE = re.compile(r"[^A-Za-z0-9.\-:\[\]_]")
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_QUEUE_ID = re.compile(r"[!-~]{1,128}\Z")
# The local id of a message (its Received: id, in the logs): a random prefix
# per process and a counter, unique without a system call per message.  The
# ids of one process are sequential; nothing relies on them being secret.
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count()
# A recipient whose text hides a second destination is a relay attempt even
# when Address.parse calls it merely malformed (the percent hack, for one).
_ROUTED = re.compile(r"[%!\[]|\A@|@.*@")
# RFC 5321 4.1.3: an IPv4 address literal is four decimal numbers; an IPv6
# one is "IPv6:" and hex digits, colons and (for an embedded IPv4 address)
# dots, which excludes a zone ("%eth0") that Python's ipaddress would take.
_IPV4_LITERAL = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\Z")
_IPV6_LITERAL = re.compile(r"[0-9A-Fa-f:.]+\Z")
_LITERAL_TAG = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")

_HELP = "Supported commands: EHLO HELO STARTTLS MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"


def address_literal(text: str) -> str:
    """
    Check an address literal (RFC 5321 section 4.1.3), the domain of a
    mailbox ``user@[192.0.2.1]`` or ``user@[IPv6:2001:db8::1]``.

    :param text: the literal, brackets included.
    :returns: the literal as it is relayed: an IPv4 address without leading
        zeros (which some parsers read as octal), an IPv6 one as given.
    :raises AddressError: for a malformed literal, or one of a kind other
        than IPv4 and IPv6 (RFC 5321's general literals have no other
        registered tag), with a text saying which.
    """
    if len(text) < 3 or not text.startswith("[") or not text.endswith("]"):
        raise AddressError(f"malformed address literal {text}")
    inner = text[1:-1]
    tag, colon, value = inner.partition(":")
    if not colon:
        m = _IPV4_LITERAL.match(inner)
        if m is None or any(int(n) > 255 for n in m.groups()):
            raise AddressError(f"malformed IPv4 address literal {text}: four numbers 0-255 expected")
        return "[" + ".".join(str(int(n)) for n in m.groups()) + "]"
    if tag.upper() == "IPV6":
        try:
            if not _IPV6_LITERAL.match(value):
                raise ValueError("only hex digits, ':' and '.' are allowed")
            ipaddress.IPv6Address(value)
        except ValueError as e:
            raise AddressError(f"malformed IPv6 address literal {text}: {e}") from None
        return text
    if _LITERAL_TAG.match(tag):
        raise AddressError(f"address literal {text}: only IPv4 and IPv6 literals are accepted")
    raise AddressError(f"malformed address literal {text}")


def sender_address(path: str) -> Address:
    """
    The mailbox of a reverse path (``MAIL FROM:<path>``, without a source
    route): ``Address.parse``'s rules, except that the domain may be an
    address literal, as RFC 5321 allows (section 4.1.2).  Recipients keep
    ``Address.parse``'s rule, which refuses literals: the hub relays only
    for its own domains.

    :raises AddressError: for anything ``Address.parse`` refuses in the
        local part, and for a malformed literal (``address_literal``).
    """
    local, at, domain = path.rpartition("@")
    if not (at and domain.startswith("[")):
        return Address.parse(path)
    if not local:
        raise AddressError("address must be local@domain")
    if len(path) > 254:
        raise AddressError("address too long")
    literal = address_literal(domain)
    # The local part by the very rules of every other address: parsed with
    # a domain that passes them.
    Address.parse(f"{local}@literal.invalid")
    return Address(local, literal)


def domain_check(domains: Collection[str], hostname: str) -> RecipientCheck:
    """
    The relay rule: the hub takes mail only for the domains it serves.

    :param domains: the domains relayed for (any case; a trailing dot is ignored).
    :param hostname: the hub's own name.  Mail for it is refused like any other
        domain not in ``domains``: the hub has no mailboxes of its own.
    :returns: a ``RecipientCheck`` firing with ``None`` for an ``Address``
        whose domain is in ``domains`` and with ``Reply(550, "5.7.1",
        "Relaying denied")`` for any other.
    """
    # ``hostname`` needs no rule of its own: like every domain not in
    # ``domains`` it is refused, and it is accepted only when listed.
    allowed = frozenset(d.lower().rstrip(".") for d in domains)

    def check(address: Address) -> Deferred[Any]:
        if address.domain.lower().rstrip(".") in allowed:
            return succeed(None)
        return succeed(RELAYING_DENIED)

    return check


def chain_checks(*checks: RecipientCheck) -> RecipientCheck:
    """
    Ask several recipient checks in turn; the first refusal wins.

    :param checks: asked in order (put the relay rule first, so that no
        other check ever looks at a recipient the hub does not relay for).
    :returns: a ``RecipientCheck`` firing with ``None`` when every check
        accepts, else with the first refusal ``Reply``.
    """

    def check(address: Address) -> Deferred[Any]:
        remaining = list(checks)

        def next_check(result: object) -> object:
            if result is not None or not remaining:
                return result
            return maybeDeferred(remaining.pop(0), address).addCallback(next_check)

        return succeed(None).addCallback(next_check)

    return check


class ClientLimiter:
    """
    The listener's limits across connections: how many connections in all
    and per client IP, and how many messages per minute per client IP.

    The rate is a token bucket per IP (``max_messages_per_minute_per_ip``
    tokens, refilled evenly over a minute) so its memory is one pair per
    active client; full buckets are dropped.

    :param limits: the listener's ``[smtp]`` limits.
    :param clock: the time source.
    """

    def __init__(self, limits: SmtpConfig, clock: IReactorTime) -> None:
        self._limits = limits
        self._clock: Any = clock
        self.connections = 0
        self.per_ip: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}
        self._last_sweep = 0.0
        #: Plain counts for the metrics (``mailhub.web.metrics``).
        self.stats = SmtpStats()

    def admit(self, ip: str) -> bool:
        """Count a new connection from ``ip``, unless that would go over a limit."""
        if self.connections >= self._limits.max_connections:
            return False
        if self.per_ip.get(ip, 0) >= self._limits.max_connections_per_ip:
            return False
        self.connections += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return True

    def release(self, ip: str) -> None:
        """An admitted connection from ``ip`` has ended."""
        self.connections -= 1
        n = self.per_ip.get(ip, 0) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)

    def allow_message(self, ip: str) -> bool:
        """Take one message from ``ip``'s budget; ``False`` when it has none left."""
        rate = self._limits.max_messages_per_minute_per_ip
        now = self._clock.seconds()
        tokens, last = self._buckets.get(ip, (float(rate), now))
        tokens = min(float(rate), tokens + (now - last) * rate / 60.0)
        if now - self._last_sweep > 60.0:
            self._last_sweep = now
            # After a minute of silence a bucket is full again: forget it.
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60.0}
        if tokens < 1.0:
            self._buckets[ip] = (tokens, now)
            return False
        self._buckets[ip] = (tokens - 1.0, now)
        return True


class SMTPFactory(Factory):
    """
    Builds one ``SMTPServerProtocol`` per inbound connection.

    :param hostname: the hub's name, for the banner, EHLO and ``Received:``.
    :param limits: the listener's limits (``[smtp]``).
    :param check_recipient: the relay rule, asked once per distinct recipient.
    :param receive: stores an accepted message durably.
    :param clock: the time source for timeouts and ``Envelope.received_at``.
    :param tls: the STARTTLS context (a ``CertificateOptions`` or any
        ``IOpenSSLServerConnectionCreator``); ``None``: no STARTTLS.
    """

    def __init__(
        self,
        hostname: str,
        limits: SmtpConfig,
        check_recipient: RecipientCheck,
        receive: Receive,
        clock: IReactorTime,
        tls: Any = None,
    ) -> None:
        self.hostname = hostname
        self.limits = limits
        self._check_recipient = check_recipient
        self._receive = receive
        self._clock = clock
        self._tls = tls
        self.limiter = ClientLimiter(limits, clock)

    def buildProtocol(self, addr: IAddress | None) -> SMTPServerProtocol:
        """
        :param addr: the client's address (the protocol reads it from its transport).
        :returns: a new protocol for one connection.
        """
        p = SMTPServerProtocol(
            self.hostname,
            self.limits,
            self._check_recipient,
            self._receive,
            self._clock,
            tls=self._tls,
            limiter=self.limiter,
        )
        p.factory = self
        return p


@implementer(IHalfCloseableProtocol)
class SMTPServerProtocol(Protocol):
    """
    One inbound SMTP session.

    Input goes into one buffer.  In command mode it is taken a line at a time;
    in DATA mode all of it is handed to the end-of-data scanner.  While a
    recipient check or a store is outstanding (``_waiting``) what arrives is
    held, unprocessed (reading stops past ``_MAX_WAITING_INPUT``); when the
    Deferred fires its reply is written and processing resumes where it
    stopped.  A client that shuts down its sending side (after QUIT, say)
    still gets every reply to what it sent before the connection closes.

    :param hostname: the hub's name.
    :param limits: the listener's limits.
    :param check_recipient: the relay rule.
    :param receive: stores an accepted message durably.
    :param clock: the time source.
    :param tls: the STARTTLS context, or ``None`` for no STARTTLS.
    :param limiter: the limits shared by the listener's connections; by
        default this connection has its own (tests).
    """

    def __init__(
        self,
        hostname: str,
        limits: SmtpConfig,
        check_recipient: RecipientCheck,
        receive: Receive,
        clock: IReactorTime,
        tls: Any = None,
        limiter: ClientLimiter | None = None,
    ) -> None:
        self._hostname = hostname
        self._limits = limits
        self._check_recipient = check_recipient
        self._receive = receive
        # Typed Any: without the mypy-zope plugin mypy misreads interface
        # methods (no ``self``), so calls on IReactorTime/IDelayedCall fail to check.
        self._clock: Any = clock
        self._normalise = limits.bare_line_endings == "normalise"
        self._remove_nul = limits.nul_bytes == "remove"
        self._tls_options = tls
        self._limiter = limiter or ClientLimiter(limits, clock)
        self._admitted = False
        self._secure = False  # STARTTLS done
        self._messages = 0  # accepted in this connection
        self._data_deadline = 0.0

        self._client = ""
        self._buffer = b""
        self._out: list[bytes] = []
        self._timer: Any = None  # an IDelayedCall, see _clock
        self._processing = False
        self._waiting = False
        # Input that arrived while waiting, in the order it came.
        self._held: list[bytes] = []
        self._held_size = 0
        self._paused = False
        self._eof = False  # the client shut down its side: it sends no more
        self._done = False  # QUIT or timeout: no more input is read
        self._lost = False
        self._discarding = False  # inside the rest of a too-long command line

        self._helo: str | None = None
        self._esmtp = False

        self._in_data = False
        self._data = bytearray()
        self._oversize = False
        self._stuffed = False  # a line of this DATA starts with a dot
        self._bare_cr = False  # this DATA has a CR with no LF after it
        self._reset_transaction()

    @property
    def _transport(self) -> Any:
        # Any for the same reason as _clock.
        assert self.transport is not None
        return self.transport

    # -- transaction state ------------------------------------------------

    def _reset_transaction(self) -> None:
        self._in_mail = False
        self._sender: Address | None = None
        self._recipients: list[Address] = []
        self._rcpt_tried = False
        self._body_8bit = False
        self._smtputf8 = False

    # -- Protocol ---------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self._transport.getPeer()
        self._client = str(getattr(peer, "host", peer))
        if not self._limiter.admit(self._client):
            self._reply(Reply(421, "4.7.0", f"{self._hostname} Too many connections, try later"), "connection")
            self._flush()
            self._done = True
            self._transport.loseConnection()
            return
        self._admitted = True
        self._limiter.stats.sessions += 1
        # A listener on an "ssl:" endpoint is TLS from the first byte.
        self._secure = ISSLTransport.providedBy(self.transport)
        banner = self._limits.banner or "ESMTP mailhub"
        self._write_line(f"220 {self._hostname} {banner}")
        self._flush()
        self._restart_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        if self._waiting:
            # A pipelining client may send on while a reply is awaited (the
            # store's, a recipient check's).  Its input is held (in pieces:
            # adding each to the buffer would copy the buffer every time);
            # past a bound, reading stops until the reply is written.  (Not
            # at once: stopping and restarting reading costs two epoll_ctl
            # calls per message, and a client that is not pipelining sends
            # nothing while it waits.)
            self._held.append(data)
            self._held_size += len(data)
            if (
                self._held_size > _MAX_WAITING_INPUT
                and not self._paused
                and IPushProducer.providedBy(self._transport)
            ):
                self._paused = True
                self._transport.pauseProducing()
            return
        self._buffer += data
        # The timers measure from the start of a command (or of DATA), so a
        # client cannot keep a session alive by trickling bytes: only a
        # complete command line, or a complete line of DATA, restarts them.
        self._process()

    def readConnectionLost(self) -> None:
        """
        The client shut down its sending side (``IHalfCloseableProtocol``):
        what it sent is still answered, then the connection closes.  Without
        this, a client that sends QUIT and shuts down its side at once, as
        scripts and some MTAs do, would lose the reply to a message whose
        store was still pending (and send the message again).
        """
        self._eof = True
        if not self._waiting:
            # Whatever complete command lines it sent are answered already.
            self._done = True
            self._process()

    def writeConnectionLost(self) -> None:
        """``IHalfCloseableProtocol``: the hub never shuts down only its own side."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = self._done = True
        self._cancel_timer()
        if not self._waiting:
            # A store or check still pending keeps the connection's slot until
            # it fires: otherwise a client could close and reconnect to have
            # any number of messages in the store's hands at once.
            self._release_slot()
        self._buffer = b""
        self._held = []
        self._data = bytearray()

    def _release_slot(self) -> None:
        if self._admitted:
            self._admitted = False
            self._limiter.release(self._client)

    # -- input loop -------------------------------------------------------

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self._buffer and not self._waiting and not self._done:
                step = self._data_step if self._in_data else self._command_step
                if not step():
                    break
        finally:
            self._processing = False
            self._flush()
            if (self._done or self._eof) and not self._lost and self._waiting is False:
                # QUIT, a timeout, or the client has sent all it will and
                # everything it sent is answered.
                self._done = True
                self._transport.loseConnection()

    def _command_step(self) -> bool:
        """
        Handle one command line from the buffer.

        :returns: whether any input was consumed.
        """
        buf = self._buffer
        nl = buf.find(b"\n")
        if self._discarding:
            if nl < 0:
                self._buffer = b""
                return False
            self._buffer = buf[nl + 1 :]
            self._discarding = False
            self._restart_timer()
            return True
        limit = self._limits.max_line_length
        if nl < 0:
            # The line may still end in CRLF, so one more octet (the CR) is allowed.
            if len(buf) > limit + 1:
                self._buffer = b""
                self._discarding = True
                self._reply(Reply(500, "5.5.2", "Line too long"))
            return False
        line = buf[:nl]
        self._buffer = buf[nl + 1 :]
        # Before dispatching: a command that waits for a Deferred stops the timer.
        self._restart_timer()
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > limit:
            self._reply(Reply(500, "5.5.2", "Line too long"))
        else:
            self._command(line)
        return True

    def _command(self, line: bytes) -> None:
        utf8 = not line.isascii()
        if utf8:
            # RFC 6531: UTF-8 is allowed in the addresses of MAIL (with the
            # SMTPUTF8 parameter) and RCPT (in such a transaction), nowhere else.
            if line[:4].upper() not in (b"MAIL", b"RCPT"):
                self._reply(Reply(501, "5.5.4", "Non-ASCII characters in command"))
                return
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                self._reply(Reply(553, "5.6.7", "Address is not valid UTF-8"))
                return
            if any(c < " " or c == "\x7f" for c in text):
                self._reply(Reply(501, "5.5.4", "Control characters in command"))
                return
        else:
            text = line.decode("ascii")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        arg = arg.strip(" ")
        if verb == "EHLO":
            self._hello(arg, esmtp=True)
        elif verb == "HELO":
            self._hello(arg, esmtp=False)
        elif verb == "STARTTLS":
            self._starttls(arg)
        elif verb == "MAIL":
            self._mail(arg, utf8)
        elif verb == "RCPT":
            self._rcpt(arg, utf8)
        elif verb == "DATA":
            self._start_data(arg)
        elif verb == "RSET":
            self._reset_transaction()
            self._reply(Reply(250, "2.0.0", "OK"))
        elif verb == "NOOP":
            self._reply(Reply(250, "2.0.0", "OK"))
        elif verb == "VRFY":
            self._reply(Reply(252, "2.0.0", "Cannot VRFY user, but will accept message"))
        elif verb == "HELP":
            self._reply(Reply(214, "2.0.0", _HELP))
        elif verb == "QUIT":
            # The session is over: its connection slot is free before the
            # client reads the 221, or a client that reconnects at once
            # (an MTA with more mail) would find it still taken.
            self._release_slot()
            self._reply(Reply(221, "2.0.0", f"{self._hostname} closing connection"))
            self._done = True
            self._cancel_timer()
        else:
            self._reply(Reply(500, "5.5.2", "Command not recognized"))

    # -- commands ---------------------------------------------------------

    def _hello(self, arg: str, esmtp: bool) -> None:
        name = arg.split(" ", 1)[0]
        verb = "EHLO" if esmtp else "HELO"
        if not _HELO_NAME.match(name):
            self._reply(Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return
        self._helo = name
        self._esmtp = esmtp
        self._reset_transaction()
        if not esmtp:
            # RFC 2034: no enhanced status code in the reply to HELO/EHLO.
            self._write_line(f"250 {self._hostname}")
            return
        lines = [
            f"{self._hostname} Hello {self._client}",
            "PIPELINING",
            f"SIZE {self._limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
        ]
        if self._can_starttls():
            lines.append("STARTTLS")
        lines.append("ENHANCEDSTATUSCODES")
        for text in lines[:-1]:
            self._write_line(f"250-{text}")
        self._write_line(f"250 {lines[-1]}")

    def _can_starttls(self) -> bool:
        return (
            self._tls_options is not None
            and not self._secure
            and ITLSTransport.providedBy(self.transport)
        )

    def _starttls(self, arg: str) -> None:
        if arg:
            self._reply(Reply(501, "5.5.4", "Syntax: STARTTLS"))
            return
        if self._secure:
            self._reply(Reply(503, "5.5.1", "TLS already active"))
            return
        if not self._can_starttls():
            self._reply(Reply(454, "4.7.0", "TLS not available"))
            return
        self._write_line("220 2.0.0 Ready to start TLS")
        self._flush()
        # RFC 3207 section 4.2 / CVE-2011-0411: whatever the client pipelined
        # after STARTTLS arrived in clear text and must never be executed as
        # if it came over TLS.
        if self._buffer:
            _log.warn(
                "discarded {count} octets sent after STARTTLS by {client}",
                count=len(self._buffer),
                client=self._client,
            )
        self._buffer = b""
        self._discarding = False
        self._transport.startTLS(self._tls_options)
        self._secure = True
        # RFC 3207 section 4.2: the session starts again; a new EHLO is needed.
        self._helo = None
        self._esmtp = False
        self._reset_transaction()

    def _close_with(self, reply: Reply, what: str = "") -> None:
        """Answer with ``reply`` and close the connection once it is written."""
        self._reply(reply, what)
        self._done = True
        self._cancel_timer()

    def _mail(self, arg: str, utf8: bool = False) -> None:
        if self._helo is None:
            self._reply(Reply(503, "5.5.1", "Send HELO or EHLO first"))
            return
        if self._in_mail:
            self._reply(Reply(503, "5.5.1", "Nested MAIL command"))
            return
        if self._limits.require_tls and not self._secure:
            self._reply(Reply(530, "5.7.0", "Must issue a STARTTLS command first"))
            return
        if self._messages >= self._limits.max_messages_per_connection:
            self._close_with(Reply(421, "4.7.0", f"{self._hostname} Too many messages in this connection"))
            return
        m = _MAIL.match(arg)
        if m is None or (m.group(2) and not m.group(2).startswith(" ")):
            self._reply(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            return
        path, params = m.groups()
        body_8bit = False
        smtputf8 = False
        for param in params.split():
            if not self._esmtp:
                self._reply(Reply(555, "5.5.4", "MAIL parameters need EHLO"))
                return
            key, eq, value = param.partition("=")
            key = key.upper()
            if key == "SIZE":
                if not eq or not value.isdigit() or len(value) > 20:
                    self._reply(Reply(501, "5.5.4", "Syntax: SIZE=<octets>"))
                    return
                if int(value) > self._limits.max_message_size:
                    self._reply(
                        Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
                    )
                    return
            elif key == "BODY":
                body = value.upper()
                if not eq or body not in ("7BIT", "8BITMIME"):
                    self._reply(Reply(501, "5.5.4", "Syntax: BODY=7BIT or BODY=8BITMIME"))
                    return
                body_8bit = body == "8BITMIME"
            elif key == "SMTPUTF8":
                if eq:
                    self._reply(Reply(501, "5.5.4", "Syntax: SMTPUTF8 takes no value"))
                    return
                smtputf8 = True
            else:
                self._reply(Reply(555, "5.5.4", "Unsupported MAIL parameter"))
                return
        if utf8 and not smtputf8:
            self._reply(Reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter"))
            return
        sender: Address | None = None
        if path:
            if path.startswith("@") and ":" in path:
                # RFC 5321 4.1.1.3: a source route in the reverse path is ignored.
                path = path.split(":", 1)[1]
            try:
                sender = sender_address(path)
            except AddressError as e:
                self._reply(Reply(553, "5.1.7", f"Bad sender address: {e}"))
                return
        if not self._limiter.allow_message(self._client):
            self._reply(Reply(450, "4.7.1", "Too many messages from your address, try later"), "MAIL")
            return
        self._in_mail = True
        self._sender = sender
        self._body_8bit = body_8bit
        self._smtputf8 = smtputf8
        self._reply(Reply(250, "2.1.0", "Sender OK"))

    def _rcpt(self, arg: str, utf8: bool = False) -> None:
        if not self._in_mail:
            self._reply(Reply(503, "5.5.1", "Need MAIL before RCPT"))
            return
        if utf8 and not self._smtputf8:
            self._reply(Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8 in MAIL"))
            return
        m = _RCPT.match(arg)
        if m is None or (m.group(2) and not m.group(2).startswith(" ")):
            self._reply(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            return
        path, params = m.groups()
        if params.strip(" "):
            self._reply(Reply(555, "5.5.4", "Unsupported RCPT parameter"))
            return
        self._rcpt_tried = True
        try:
            address = Address.parse(path)
        except AddressError as e:
            if e.code != 550 and _ROUTED.search(path):
                self._reply(Reply(550, "5.7.1", "Relaying denied: routing characters in address"))
            else:
                self._reply(Reply(e.code, e.enhanced, str(e)))
            return
        if address in self._recipients:
            self._reply(Reply(250, "2.1.5", "Recipient OK"))
            return
        if len(self._recipients) >= self._limits.max_recipients:
            self._reply(Reply(452, "4.5.3", "Too many recipients"))
            return
        d = maybeDeferred(self._check_recipient, address)
        self._wait(d, lambda result: self._recipient_checked(address, result))

    def _recipient_checked(self, address: Address, result: object) -> None:
        if isinstance(result, Failure):
            _log.failure(
                "recipient check for {address} from {client} failed",
                result,
                address=str(address),
                client=self._client,
            )
            self._reply(Reply(451, "4.3.0", "Temporary failure checking recipient, try later"))
        elif result is None:
            if address not in self._recipients:
                self._recipients.append(address)
            self._reply(Reply(250, "2.1.5", "Recipient OK"))
        elif isinstance(result, Reply) and result.code >= 400:
            self._reply(result, f"RCPT <{address}>")
        else:
            _log.error(
                "recipient check for {address} gave {result!r}, not None or a 4xx/5xx Reply",
                address=str(address),
                result=result,
            )
            self._reply(Reply(451, "4.3.0", "Temporary failure checking recipient, try later"))

    def _start_data(self, arg: str) -> None:
        if arg:
            self._reply(Reply(501, "5.5.4", "Syntax: DATA"))
        elif not self._in_mail:
            self._reply(Reply(503, "5.5.1", "Need MAIL before DATA"))
        elif not self._recipients:
            if self._rcpt_tried:
                self._reply(Reply(554, "5.5.1", "No valid recipients"))
            else:
                self._reply(Reply(503, "5.5.1", "Need RCPT before DATA"))
        else:
            self._write_line("354 End data with <CR><LF>.<CR><LF>")
            self._in_data = True
            # The CRLF in front lets a first line of "." (an empty message) match
            # the same end marker, and a first line of ".." be unstuffed like any other.
            self._data = bytearray(b"\r\n")
            self._oversize = False
            self._stuffed = False
            self._bare_cr = False
            self._data_deadline = self._clock.seconds() + self._limits.data_total_timeout
            self._restart_timer()

    # -- DATA -------------------------------------------------------------

    def _data_step(self) -> bool:
        """
        Add the whole buffer to the message and look for its end.

        :returns: ``True``: the buffer was consumed.
        """
        data = self._data
        # Only the last four octets already seen can start a marker split across chunks.
        start = max(0, len(data) - 4)
        if b"\n" in self._buffer:
            self._restart_timer()
        data += self._buffer
        self._buffer = b""
        end = self._find_end(data, start)
        limit = self._limits.max_message_size
        if end < 0:
            if len(data) - 4 > limit:
                # Too big whatever comes next: keep only what could begin the marker.
                del data[:-4]
                self._oversize = True
            return True
        with memoryview(data) as view:
            self._buffer = bytes(view[end + 5 :])
        self._in_data = False
        self._data = bytearray()
        self._restart_timer()
        # Without truncation the message proper is data[2:end + 2], `end` octets.
        if self._oversize or end > limit:
            self._reset_transaction()
            self._reply(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"))
            return True
        if not self._stuffed:
            # No line starts with a dot: checked where it is, no copy.
            self._message_received(data, 2, end + 2)
            return True
        # RFC 5321 4.5.2: a leading dot is removed from every line.  The CRLF
        # in front of the message is data[0:2]: the first line's dot is at 2.
        lo = 3 if data[2] == 0x2E else 2
        with memoryview(data) as view:
            message = bytes(view[lo : end + 2]).replace(b"\r\n.", b"\r\n")
        self._message_received(message, 0, len(message))
        return True

    def _find_end(self, data: bytearray, pos: int) -> int:
        """
        Where the end-of-data marker (CRLF "." CRLF) starts in ``data``, from
        ``pos`` on, or -1.  The same scan notes whether any line starts with
        a dot (``_stuffed``) and whether any CR has no LF after it
        (``_bare_cr``), so that neither needs a pass of its own over the message.
        Whatever is undecided at the end of ``data`` (CRLF "." without the two
        octets that tell, a last CR) is scanned again with the next chunk.
        """
        while True:
            found = _DATA_SCANS[self._stuffed, self._bare_cr].search(data, pos)
            if found is None:
                return -1
            at = found.start()
            if found.end() == at + 1:
                # A CR with no LF after it, unless the LF is still to come.
                if at + 1 == len(data):
                    return -1
                self._bare_cr = True
                pos = at + 1
            elif len(data) < at + 5:
                return -1
            elif data[at + 3 : at + 5] == b"\r\n":
                return at
            else:
                self._stuffed = True
                pos = at + 3

    def _message_received(self, data: bytes | bytearray, lo: int, hi: int) -> None:
        """
        Check the message ``data[lo:hi]`` (unstuffed) and hand it to ``receive``.

        :param data: holds the message; not kept (the caller drops it).
        """
        # The regex _BARE_LINE_END is ten times slower than these two checks,
        # so it only runs to normalise.  (Bare CRs were sought by the DATA scan;
        # undoing dot-stuffing neither makes nor removes one.)
        # A line starts with a dot only if the client stuffed one, or a NUL
        # removed or a bare line end made CRLF below put one at a line's start.
        dot_lines = self._stuffed
        bare_cr = self._bare_cr
        if data.find(b"\x00", lo, hi) >= 0:
            # A downstream that drops NULs would read "CRLF NUL . CRLF" as the
            # end of DATA (SMTP smuggling): what the hub relays has none.
            if not self._remove_nul:
                self._reset_transaction()
                self._reply(Reply(554, "5.6.0", "Message contains NUL octets"))
                return
            with memoryview(data) as view:
                data = bytes(view[lo:hi]).replace(b"\x00", b"")
            lo, hi = 0, len(data)
            # Removing a NUL can put a dot at a line's start, or a CR before an LF.
            dot_lines = True
            bare_cr = _BARE_CR.search(data) is not None
        if bare_cr or has_bare_lf(data, lo, hi):
            if not self._normalise:
                self._reset_transaction()
                self._reply(Reply(554, "5.6.0", "Message contains bare CR or LF"))
                return
            with memoryview(data) as view:
                data = _BARE_LINE_END.sub(b"\r\n", view[lo:hi])
            lo, hi = 0, len(data)
            dot_lines = True
        n = self._limits.max_data_line_length
        if _has_long_line(data, lo, hi, n):
            self._reset_transaction()
            self._reply(Reply(554, "5.6.0", f"Message has lines longer than {n} octets"))
            return
        if _header_size(data, lo, hi) > self._limits.max_header_size:
            self._reset_transaction()
            self._reply(Reply(552, "5.3.4", "Message header size exceeds limit"))
            return
        assert self._helo is not None
        now = self._clock.seconds()
        local_id = f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"
        with memoryview(data) as view:
            message = CheckedMessage.of(
                b"".join((self._received_header(local_id, now), view[lo:hi])), dot_lines
            )
        envelope = Envelope(
            self._sender,
            self._recipients,  # type: ignore[arg-type]  # attrs converter=tuple
            received_at=now,
            client=self._client,
            helo=self._helo,
            smtputf8=self._smtputf8,
            body_8bit=self._body_8bit,
        )
        self._reset_transaction()
        d = maybeDeferred(self._receive, envelope, message)
        self._wait(d, lambda result: self._stored(envelope, local_id, len(message), result))

    def _received_header(self, local_id: str, now: float) -> bytes:
        helo = _HEADER_UNSAFE.sub("_", self._helo or "")
        date = _date(now)
        # RFC 3848 / RFC 6531 section 3.7.4: the protocol type says TLS and UTF-8.
        protocol = ("UTF8ESMTP" if self._smtputf8 else "ESMTP") if self._esmtp else "SMTP"
        if self._secure:
            protocol += "S"
        return (
            f"Received: from {helo} ({self._client})\r\n"
            f"\tby {self._hostname} (mailhub) with {protocol} id {local_id};\r\n"
            f"\t{date}\r\n"
        ).encode("ascii")

    def _stored(self, envelope: Envelope, local_id: str, size: int, result: object) -> None:
        if isinstance(result, Failure):
            if result.check(StoreFull):
                _log.warn(
                    "spool full: message {id} from {client} not accepted",
                    id=local_id,
                    client=envelope.client,
                )
                self._reply(Reply(452, "4.3.1", "Insufficient system storage, try later"))
            elif result.check(StoreUnavailable):
                # The spool's store is down or slow (Redis restarting): an
                # operational state, said in one line, not a traceback per message.
                _log.warn(
                    "spool store unavailable: message {id} from {client} not accepted (451): {why}",
                    id=local_id,
                    client=envelope.client,
                    why=result.getErrorMessage(),
                )
                self._reply(Reply(451, "4.3.0", "Temporary failure storing message, try later"))
            else:
                _log.failure(
                    "storing message {id} from {client} failed",
                    result,
                    id=local_id,
                    client=envelope.client,
                )
                self._reply(Reply(451, "4.3.0", "Temporary failure storing message, try later"))
            return
        self._messages += 1
        self._limiter.stats.accepted += 1
        queue_id = result if isinstance(result, str) and _QUEUE_ID.match(result) else local_id
        # The one line per message.  Its text is made here in one f-string and
        # logged as "{line}": twisted.logger's formatting of a format with
        # seven fields costs more than the rest of the line's work together,
        # and a log observer renders every line (twistd's does).  The fields
        # stay in the event for structured observers.
        recipients = ", ".join(f"<{r}>" for r in envelope.recipients)
        sender = envelope.sender or ""
        _log.info(
            "{line}",
            line=f"accepted message {local_id} ({queue_id}) from {envelope.client} helo "
            f"{envelope.helo}: <{sender}> to {recipients}, {size} octets",
            id=local_id,
            queue_id=queue_id,
            client=envelope.client,
            size=size,
        )
        self._reply(Reply(250, "2.0.0", f"OK queued as {queue_id}"))

    # -- waiting for a Deferred -------------------------------------------

    def _wait(self, d: Deferred[Any], handle: Callable[[object], None]) -> None:
        """
        Stop processing input until ``d`` fires; then give its result (or
        ``Failure``) to ``handle``, which writes the reply, and carry on.
        """
        self._waiting = True
        self._cancel_timer()

        def done(result: object) -> None:
            try:
                handle(result)
            except Exception:
                _log.failure("SMTP session with {client} failed", client=self._client)
                self._reply(Reply(451, "4.3.0", "Internal error, try later"))
            self._waiting = False
            if self._lost:
                self._release_slot()
                return
            if self._held:
                self._buffer += b"".join(self._held)
                self._held = []
                self._held_size = 0
            if self._paused:
                self._paused = False
                self._transport.resumeProducing()
            self._restart_timer()
            self._process()

        d.addBoth(done)

    # -- output and timers ------------------------------------------------

    def _reply(self, reply: Reply, what: str = "") -> None:
        if reply.code >= 400:
            self._limiter.stats.refused(reply, what)
            _log.info(
                "refused {what}from {client}: {reply}",
                what=f"{what} " if what else "",
                client=self._client,
                reply=str(reply),
            )
        self._write_line(str(reply))

    def _write_line(self, line: str) -> None:
        # A reply text may quote a UTF-8 address; replies stay ASCII.
        self._out.append(line.encode("ascii", "backslashreplace") + b"\r\n")

    def _flush(self) -> None:
        if self._out and not self._lost:
            write_now(self._transport, b"".join(self._out))
        self._out = []

    def _restart_timer(self) -> None:
        if self._done:
            return
        if self._in_data:
            left = self._data_deadline - self._clock.seconds()
            timeout = max(0.0, min(self._limits.data_timeout, left))
        else:
            timeout = self._limits.idle_timeout
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self._clock.callLater(timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._limiter.stats.timeouts += 1
        _log.info(
            "timeout {where} from {client}",
            where="in DATA" if self._in_data else "waiting for a command",
            client=self._client,
        )
        self._write_line(f"421 4.4.2 {self._hostname} Timeout")
        self._flush()
        self._done = True
        self._transport.loseConnection()


_last_date: tuple[int, str] | None = None


def _date(now: float) -> str:
    """The RFC 5322 date of ``now`` (UTC); one formatting per second of traffic."""
    global _last_date
    second = int(now // 1)
    if _last_date is None or _last_date[0] != second:
        _last_date = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
    return _last_date[1]


def _header_size(data: bytes | bytearray, lo: int, hi: int) -> int:
    """The octets of the header section of ``data[lo:hi]``, up to and with its last CRLF."""
    if data.startswith(b"\r\n", lo, hi):
        return 0
    end = data.find(b"\r\n\r\n", lo, hi)
    return hi - lo if end < 0 else end + 2 - lo


def _has_long_line(data: bytes | bytearray, lo: int, hi: int, limit: int) -> bool:
    """
    Whether ``data[lo:hi]`` has a line of more than ``limit`` octets.

    Its lines end in CRLF (no bare CR or LF; a last line without one is
    allowed for).  A line starting at ``start`` has at most ``limit`` octets
    exactly when its LF is among the ``limit + 2`` octets from ``start``; so
    does every line ending inside that window.  The scan therefore jumps to
    just after the window's last LF: one ``rfind`` (C, backwards) per window,
    about ``len / limit`` calls whatever the number of lines, instead of a
    regular expression stepping through every octet.
    """
    window = limit + 2
    start = lo
    # The rest, from a line's start, is too short to hold a long line.
    while hi - start > limit:
        lf = data.rfind(b"\n", start, start + window)
        if lf < 0:
            return True
        start = lf + 1
    return False

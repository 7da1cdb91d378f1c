"""
The ``smtp`` transport: delivers entries to a route's server over ESMTP.

Route targets::

    route = "smtp:mail.example.com:2525"   # host and port
    route = "smtp:mail.example.com"        # port 25
    route = "smtp:[2001:db8::25]:25"       # an IPv6 literal
    route = "smtp:mx"                      # each recipient domain's MX hosts

Options (the domain's table, and ``hostname`` from ``[hub]``): ``hostname``
(our EHLO name), ``connect_timeout`` (30 s), ``command_timeout`` (300 s, per
reply), ``data_timeout`` (600 s, for the reply to the end of data),
``idle_timeout`` (30 s, how long an idle connection is kept for reuse) and
``max_connections`` (10, open at once for the route), and for STARTTLS
(RFC 3207):

- ``tls``: ``"opportunistic"`` (the default) upgrades with STARTTLS when the
  server offers it and says EHLO again; if the TLS handshake fails, the
  message goes over a new connection in clear, and the log says so, since
  a broken TLS setup on the organisation's own server must not stop its
  mail.  ``"required"`` never sends a message in clear: a server that does
  not offer STARTTLS gets ``421 4.7.4``, a failed handshake ``421 4.7.5``,
  for every recipient, so the entry is retried.  ``"none"`` never uses TLS.
- ``tls_verify`` (false): verify the server's certificate for the route's
  host (the MX host with ``smtp:mx``), against the system's trusted CAs or
  ``tls_ca_file`` (a PEM file of CA, or self-signed, certificates).  A
  verification failure is ``421 4.7.5`` even when TLS is opportunistic:
  falling back to clear text there would undo what was asked for.  Without
  it TLS protects against eavesdropping, not against an active attacker;
  customers' servers often have self-signed certificates.

Anything a server sends after its ``220`` to STARTTLS and before the
handshake is thrown away unread.

An entry received with SMTPUTF8 (``Entry.smtputf8``), or with an address
that is not ASCII, goes with the ``SMTPUTF8`` MAIL parameter; a server that
does not offer it gets no MAIL at all, and every recipient gets
``553 5.6.7``, so that the policy fails them with a DSN.

One ``SMTPTransport`` serves one route.  Each delivery is one SMTP
transaction per destination: EHLO (HELO if EHLO gets a 5xx), MAIL with
``BODY=8BITMIME`` and ``SIZE=`` where they apply, one RCPT per pending
recipient, DATA only if a recipient was accepted.  With PIPELINING, MAIL,
every RCPT and DATA go out in one write.  Each recipient's result is the
reply to the end of data if its RCPT was accepted, its RCPT reply otherwise.

Nothing here ever errbacks to the caller: a refused connection, a timeout, a
dropped connection, a DNS failure all become a ``Reply`` (4xx unless the
failure is permanent, like a domain that does not exist) for the recipients
they concern, and the policy decides what that means.

Connections are kept after a delivery and reused (``RSET`` first) for the
next one to the same host, at most ``max_connections`` open, each closed
after ``idle_timeout`` unused.  A reused connection that turns out dead, or
whose ``RSET`` or ``MAIL`` gets a temporary failure (Exchange's per-connection
message limit), is discarded and the delivery retried once on a new one.

This is our own client protocol rather than ``twisted.mail.smtp.ESMTPClient``:
that client is built for one factory per message batch, pulls each message
from its factory through callbacks (``getMailFrom``/``getMailTo``/
``getMailData``), closes the connection when the factory has nothing more to
send, and has no notion of an idle connection waiting for the next delivery
from elsewhere.  Reusing a connection across ``deliver()`` calls, pipelining
MAIL/RCPT/DATA and keeping one ``Reply`` per recipient would mean fighting
every one of those choices.  Here a connection is a small line protocol that
matches replies to commands in order (which is all PIPELINING needs), and the
transaction is plain ``async`` code over it.

The message body is never handled line by line in Python: line ends are
normalised and dots stuffed with ``bytes.replace``.  No blocking call is made:
DNS goes through ``twisted.names``, time comes from the injected reactor.
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, cast

from attrs import define, field, frozen
from OpenSSL.SSL import Error as SSLError
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    gatherResults,
    succeed,
)
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.interfaces import IPooledTransport, ITransport, ITransportPlugin
from mailhub.model import Address, CheckedMessage, Entry, Reply, has_bare_line_end, is_back_pressure
from mailhub.netio import write_now

__all__ = ["SMTPClientProtocol", "SMTPTransport", "SMTPTransportPlugin", "plugin", "wire_data"]

_MAX_REPLY = 64 * 1024
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|\Z)(.*)\Z", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|\Z)")

Key = tuple[str, int]
"""A destination: host name (or address) and port."""


def wire_data(message: bytes) -> bytes:
    """
    The DATA payload for ``message``: CRLF line ends, dots stuffed, ending with
    CRLF and the terminating ``. CRLF``.

    The message should already have CRLF line ends; any bare CR or LF is made a
    CRLF all the same, since a bare one confuses servers at best and, with a
    dot next to it, smuggles a second message at worst.  A ``CheckedMessage``
    (the accepting node's first attempt) carries what the SMTP server's
    checks found, and is not scanned again for it.
    """
    if isinstance(message, CheckedMessage):
        dot_lines = message.dot_lines
    else:
        dot_lines = True
        if has_bare_line_end(message):
            message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    if dot_lines:
        if message.startswith(b"."):
            message = b"." + message
        message = message.replace(b"\r\n.", b"\r\n..")
    return message + b".\r\n"


def parse_reply(code: int, lines: Sequence[bytes]) -> Reply:
    """
    A ``Reply`` from the lines of one (possibly multi-line) SMTP reply, without
    their codes: the enhanced status code (RFC 3463) is taken from the first
    line if its class matches the code, and removed from every line that
    repeats it; the texts are joined with spaces.
    """
    texts = [line.decode("utf-8", "replace").strip() for line in lines]
    enhanced = ""
    first = _ENHANCED.match(texts[0]) if texts else None
    if first is not None and first.group(1) == str(code)[0]:
        enhanced = first.group(0).strip()
        texts = [t[len(enhanced) :].strip() if t.startswith(enhanced) else t for t in texts]
    return Reply(code, enhanced, " ".join(t for t in texts if t))


@define
class _Waiter:
    deferred: Deferred[Reply]
    command: str
    timeout: float
    lines: list[bytes] = field(factory=list)


@implementer(IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """
    One connection to an SMTP server: sends commands and matches each reply to
    its command, in order.

    ``send`` never fails: every Deferred it returns fires with a ``Reply``.
    When the connection is lost or a reply does not come in time, every
    outstanding command gets a synthetic ``421 4.4.2`` reply saying so, and the
    connection is closed; a ``421`` from the server does the same for the
    commands after it.  After that ``broken`` is true.

    :ivar banner: a ``Deferred`` firing with the server's greeting.
    :ivar extensions: the EHLO keywords (upper case) and their parameters, once
        the transport has read them.
    :ivar last_lines: the text lines of the last reply received (EHLO's keywords).
    """

    def __init__(self, clock: Any, peer: str, banner_timeout: float) -> None:
        self._clock = clock
        self.peer = peer
        self._buffer = b""
        self._waiting: deque[_Waiter] = deque()
        self._timer: IDelayedCall | None = None
        self.broken = False
        self.extensions: dict[str, str] = {}
        self.on_lost: Callable[[SMTPClientProtocol], None] | None = None
        self.lost: Deferred[None] = Deferred()
        self._connected = False
        self._aborted = False
        self.last_lines: list[bytes] = []
        self.tls = False
        self._handshake: Deferred[str | None] | None = None
        self._handshake_timer: IDelayedCall | None = None
        self.banner = self._expect("greeting", banner_timeout)

    # sending

    def send(self, commands: Sequence[bytes], timeout: float) -> list[Deferred[Reply]]:
        """
        Send ``commands`` in one write (the caller knows the server pipelines
        when there are several).

        :returns: one ``Deferred`` per command, firing with its ``Reply``.
        """
        if self.broken:
            return [succeed(self._lost_reply(c.split(b" ", 1)[0].decode(), "")) for c in commands]
        assert self.transport is not None
        write_now(self.transport, b"".join(c + b"\r\n" for c in commands))
        return [
            self._expect(c.split(b" ", 1)[0].decode("ascii", "replace").upper(), timeout)
            for c in commands
        ]

    def command(self, command: bytes, timeout: float) -> Deferred[Reply]:
        """Send one command; :returns: a ``Deferred`` firing with its ``Reply``."""
        return self.send([command], timeout)[0]

    def data(self, payload: bytes, timeout: float) -> Deferred[Reply]:
        """
        Send a message's payload (``wire_data``) after a 354.

        :returns: a ``Deferred`` firing with the reply to the end of data.
        """
        if self.broken:
            return succeed(self._lost_reply("end of data", ""))
        assert self.transport is not None
        write_now(self.transport, payload)
        return self._expect("end of data", timeout)

    def quit(self) -> None:
        """Say QUIT and close, without waiting for the answer."""
        if not self.broken and self.transport is not None:
            self.broken = True
            self.transport.write(b"QUIT\r\n")
            self.transport.loseConnection()

    def abort(self) -> None:
        """Close at once (the session is out of step with the server)."""
        self.broken = True
        if self.transport is not None and self._connected and not self._aborted:
            self._aborted = True
            cast(ITCPTransport, self.transport).abortConnection()

    def start_tls(self, options: IOpenSSLClientConnectionCreator | CertificateOptions,
                  timeout: float) -> Deferred[str | None]:
        """
        Begin the TLS handshake, after the server's ``220`` to STARTTLS.

        Anything the server sent after its ``220`` came before the handshake,
        in clear, from whoever sits on the path: it is thrown away, never read
        as a reply.

        :returns: a ``Deferred`` firing with ``None`` once the handshake is
            done (``tls`` is then true), or with why it failed (the
            connection is then closed).
        """
        assert self.transport is not None and self._handshake is None
        self._buffer = b""
        self._handshake = Deferred()
        self._handshake_timer = self._clock.callLater(timeout, self._handshake_timed_out, timeout)
        cast(ITLSTransport, self.transport).startTLS(options)
        return self._handshake

    def handshakeCompleted(self) -> None:
        """``IHandshakeListener``: TLS is up."""
        self.tls = True
        self._handshake_done(None)

    def _handshake_timed_out(self, timeout: float) -> None:
        self._handshake_timer = None
        self._handshake_done(f"no TLS handshake within {timeout:g}s")
        self.abort()

    def _handshake_done(self, failure: str | None) -> None:
        d, self._handshake = self._handshake, None
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        if d is not None:
            d.callback(failure)

    def _expect(self, command: str, timeout: float) -> Deferred[Reply]:
        waiter = _Waiter(Deferred(), command, timeout)
        self._waiting.append(waiter)
        if self._timer is None and self._connected:
            self._arm()
        return waiter.deferred

    def _arm(self) -> None:
        """Time the reply awaited first (moving the running timer: cheaper than a new one)."""
        timer = self._timer
        if timer is not None and timer.active():
            if self._waiting:
                timer.reset(self._waiting[0].timeout)
                return
            timer.cancel()
        self._timer = self._clock.callLater(self._waiting[0].timeout, self._timed_out) if self._waiting else None

    # receiving

    def connectionMade(self) -> None:
        self._connected = True
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while not self.broken:
            line, sep, rest = self._buffer.partition(b"\r\n")
            if not sep:
                if len(self._buffer) > _MAX_REPLY:
                    self._protocol_error("a reply line too long")
                return
            self._buffer = rest
            self._line(line)

    def _line(self, line: bytes) -> None:
        match = _REPLY_LINE.match(line)
        if match is None:
            self._protocol_error(f"a malformed reply {line[:80]!r}")
            return
        if not self._waiting:
            # Unsolicited (a 421 on idle timeout, say): the session is over.
            self.broken = True
            assert self.transport is not None
            self.transport.loseConnection()
            return
        head = self._waiting[0]
        head.lines.append(match.group(3))
        if match.group(2) == b"-":
            if sum(len(x) for x in head.lines) > _MAX_REPLY:
                self._protocol_error("a reply too long")
            return
        self._waiting.popleft()
        code = int(match.group(1))
        self.last_lines = head.lines
        reply = parse_reply(code, head.lines)
        if code == 421:
            # The server is closing the channel: nothing after this gets an answer.
            self._finish(lambda w: reply)
            self.abort()
            head.deferred.callback(reply)
            return
        self._arm()
        head.deferred.callback(reply)

    def _protocol_error(self, what: str) -> None:
        command = self._waiting[0].command if self._waiting else "nothing"
        reply = Reply(421, "4.4.2", f"{self.peer} sent {what} in reply to {command}")
        self._finish(lambda w: reply)
        self.abort()

    def _timed_out(self) -> None:
        self._timer = None
        head = self._waiting[0]
        reply = Reply(
            421,
            "4.4.2",
            f"timeout after {head.timeout:g}s waiting for {self.peer} to answer {head.command}",
        )
        self._finish(lambda w: reply)
        self.abort()

    def _lost_reply(self, command: str, why: str) -> Reply:
        return Reply(
            421, "4.4.2", f"connection to {self.peer} lost{why} before the reply to {command}"
        )

    def _finish(self, reply_for: Callable[[_Waiter], Reply]) -> None:
        """Answer every outstanding command with ``reply_for(waiter)``."""
        self.broken = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            waiter.deferred.callback(reply_for(waiter))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        why = "" if reason.check(ConnectionDone) else f" ({reason.getErrorMessage()})"
        if self._handshake is not None:
            self._handshake_done(
                "the connection closed during the TLS handshake"
                + (f": {_tls_error(reason)}" if not reason.check(ConnectionDone) else "")
            )
        self._finish(lambda w: self._lost_reply(w.command, why))
        if self.on_lost is not None:
            self.on_lost(self)
        self.lost.callback(None)


class _ClientFactory(Factory):
    def __init__(self, make: Callable[[], SMTPClientProtocol]) -> None:
        self._make = make

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        return self._make()


@define(eq=False)
class _Connection:
    """A connection of the pool."""

    protocol: SMTPClientProtocol
    key: Key
    deliveries: int = 0
    idle_timer: IDelayedCall | None = None
    counted: bool = True


class _Discard(Exception):
    """The reused connection is no good: discard it and retry on a new one."""


@frozen
class _TLSFailed:
    """The TLS handshake with ``peer`` failed (the connection is closed)."""

    peer: str
    why: str


class _TLSSetupError(Exception):
    """Our side of TLS cannot be set up (``tls_ca_file`` unreadable, say)."""


TLS_MODES = ("opportunistic", "required", "none")
"""The values of the ``tls`` option."""


def _read_ca_file(path: str) -> list[Certificate]:
    """The PEM certificates in ``path`` (runs in a thread)."""
    with open(path, "rb") as f:
        pem = f.read()
    found = [
        Certificate.loadPEM(block + b"-----END CERTIFICATE-----\n")
        for block in pem.split(b"-----END CERTIFICATE-----")
        if b"-----BEGIN CERTIFICATE-----" in block
    ]
    if not found:
        raise ValueError("no PEM certificate in it")
    return found


def _tls_error(reason: Failure) -> str:
    """What OpenSSL (or certificate verification) said, shortly."""
    error = reason.value
    errors = error.args[0] if reason.check(SSLError) and error is not None and error.args else None
    if isinstance(errors, list):
        texts = [e[-1] for e in errors if isinstance(e, tuple) and e and e[-1]]
        if texts:
            return ", ".join(str(t) for t in texts)
    return reason.getErrorMessage()


Endpoints = Callable[[str, int], IStreamClientEndpoint]
"""Gives the endpoint to connect to a host (an address, if names are resolved) and port."""


def _endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """
    A client endpoint for ``host``.  An address literal needs no name
    resolution: ``HostnameEndpoint`` would still send it through the
    resolver's thread pool on every connection.
    """
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if version == 4:
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)


@implementer(ITransport, IPooledTransport)
@define(eq=False)
class SMTPTransport:
    """
    An ``ITransport`` for one route, over ESMTP; see the module docstring.

    :param reactor: ``IReactorTime`` and ``IReactorTCP`` (if ``endpoint_for`` is not given).
    :param hostname: our EHLO name.
    :param destination: the ``(host, port)`` every entry goes to, or ``None``
        to look up each recipient domain's MX hosts.
    :param resolver: an ``IResolver`` for MX lookups (``twisted.names.client``'s
        by default); with it, MX host names are resolved to addresses too.
    :param endpoint_for: makes the endpoint for a host and port (tests inject
        theirs); ``HostnameEndpoint`` by default.
    :param mx_port: the port of MX hosts (25; something else only in tests).
    :param tls: STARTTLS: ``"opportunistic"``, ``"required"`` or ``"none"``
        (see the module docstring).
    :param tls_verify: verify the server's certificate for the route's host.
    :param tls_ca_file: trust the CA certificates in this PEM file, rather
        than the system's, when verifying.
    """

    _reactor: Any
    _hostname: str
    _destination: Key | None
    _connect_timeout: float = 30.0
    _command_timeout: float = 300.0
    _data_timeout: float = 600.0
    _idle_timeout: float = 30.0
    _max_connections: int = 10
    _resolver: Any = None
    _endpoint_for: Endpoints | None = None
    _mx_port: int = 25
    _tls: str = "opportunistic"
    _tls_verify: bool = False
    _tls_ca_file: str | None = None
    _random: Callable[[], float] = random.random
    _open: int = field(init=False, default=0)
    _idle: dict[Key, list[_Connection]] = field(init=False, factory=dict)
    _slot_waiters: deque[Deferred[None]] = field(init=False, factory=deque)
    _closed: bool = field(init=False, default=False)
    _ca_certificates: list[Certificate] | None = field(init=False, default=None)
    connections_made: int = field(init=False, default=0)
    _log: ClassVar[Logger] = Logger()
    """How many connections were opened in all."""

    # ITransport

    def deliver(self, entry: Entry, message: bytes) -> Deferred[dict[Address, Reply]]:
        return Deferred.fromCoroutine(self._deliver(entry, message))

    def close(self) -> Deferred[None]:
        """Close every idle connection (a busy one closes when its delivery ends)."""
        self._closed = True
        waits: list[Deferred[Any]] = []
        for connections in list(self._idle.values()):
            for conn in list(connections):
                waits.append(conn.protocol.lost)
                self._drop(conn, quit=True)
        self._idle.clear()
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    # IPooledTransport

    def limit_connections(self, count: int) -> None:
        """
        Keep at most ``count`` connections open (this node's share of the
        route): idle ones above it are closed now with QUIT, busy ones as
        their deliveries end.
        """
        self._max_connections = max(0, count)
        for connections in list(self._idle.values()):
            for conn in list(connections):
                if self._open <= self._max_connections:
                    return
                self._drop(conn, quit=True)

    # delivery

    async def _deliver(self, entry: Entry, message: bytes) -> dict[Address, Reply]:
        try:
            return await self._deliver_entry(entry, message)
        except CancelledError:
            raise
        except Exception as e:
            # A bug here must not become an errback: the contract is a reply per recipient.
            self._log.failure("smtp delivery of entry {entry} failed", entry=entry.id)
            return dict.fromkeys(
                entry.pending, Reply(451, "4.3.0", f"transport error: {_describe(e)}")
            )

    async def _deliver_entry(self, entry: Entry, message: bytes) -> dict[Address, Reply]:
        recipients = entry.pending
        if not recipients:
            return {}
        payload = wire_data(message)
        utf8 = entry.smtputf8
        if self._destination is not None:
            return await self._deliver_to(
                [self._destination], entry.sender, recipients, payload, message, utf8
            )
        by_domain: dict[str, list[Address]] = {}
        for address in recipients:
            by_domain.setdefault(address.domain, []).append(address)
        results = await gatherResults(
            [
                Deferred.fromCoroutine(
                    self._deliver_domain(domain, entry.sender, group, payload, message, utf8)
                )
                for domain, group in by_domain.items()
            ]
        )
        merged: dict[Address, Reply] = {}
        for result in results:
            merged.update(result)
        return merged

    async def _deliver_domain(
        self,
        domain: str,
        sender: Address | None,
        recipients: Sequence[Address],
        payload: bytes,
        message: bytes,
        smtputf8: bool,
    ) -> dict[Address, Reply]:
        hosts = await self._mx_hosts(domain)
        if isinstance(hosts, Reply):
            return dict.fromkeys(recipients, hosts)
        return await self._deliver_to(hosts, sender, recipients, payload, message, smtputf8)

    async def _mx_hosts(self, domain: str) -> list[Key] | Reply:
        """The MX hosts of ``domain`` in preference order, or the reply for every recipient."""
        from twisted.names.error import DNSNameError

        try:
            answers, _, _ = await self._dns().lookupMailExchange(domain)
        except DNSNameError:
            return Reply(550, "5.1.2", f"domain {domain} does not exist (DNS)")
        except Exception as e:
            return Reply(451, "4.4.3", f"MX lookup for {domain} failed: {_describe(e)}")
        from twisted.names.dns import MX

        records = [
            (a.payload.preference, self._random(), str(a.payload.name))
            for a in answers
            if a.type == MX
        ]
        if not records:
            # No MX: the domain's own address record is its implicit MX (RFC 5321 5.1).
            return [(domain, self._mx_port)]
        records.sort()
        if len(records) == 1 and records[0][2] in ("", "."):
            return Reply(556, "5.1.10", f"domain {domain} accepts no mail (null MX)")
        return [(name, self._mx_port) for _, _, name in records if name not in ("", ".")]

    def _dns(self) -> Any:
        if self._resolver is None:
            from twisted.names import cache, client, hosts, resolve

            # client.createResolver would use the global reactor.
            self._resolver = resolve.ResolverChain(
                [
                    hosts.Resolver(b"/etc/hosts"),
                    cache.CacheResolver(reactor=self._reactor),
                    client.Resolver(b"/etc/resolv.conf", reactor=self._reactor),
                ]
            )
        return self._resolver

    async def _deliver_to(
        self,
        hosts: Sequence[Key],
        sender: Address | None,
        recipients: Sequence[Address],
        payload: bytes,
        message: bytes,
        smtputf8: bool,
    ) -> dict[Address, Reply]:
        """Try ``hosts`` in order until one of them takes part in a transaction."""
        failure = Reply(421, "4.4.0", "no host to deliver to")
        for key in hosts:
            fresh_only = False
            while True:
                conn = await self._acquire(key, fresh_only)
                if conn is None:
                    got = await self._connect(key)
                    if isinstance(got, Reply):
                        failure = got
                        break
                    conn = got
                try:
                    return await self._transaction(
                        conn, sender, recipients, payload, message, smtputf8
                    )
                except _Discard:
                    fresh_only = True
        return dict.fromkeys(recipients, failure)

    async def _transaction(
        self,
        conn: _Connection,
        sender: Address | None,
        recipients: Sequence[Address],
        payload: bytes,
        message: bytes,
        smtputf8: bool,
    ) -> dict[Address, Reply]:
        """
        One MAIL transaction on ``conn``; gives the connection back to the pool
        (or closes it) before returning.

        :raises _Discard: if ``conn`` was reused and failed before the transaction began.
        """
        try:
            return await self._transaction_steps(
                conn, sender, recipients, payload, message, smtputf8
            )
        except _Discard:
            raise
        except BaseException:
            # Cancelled (or a bug): the session is in an unknown state.
            self._drop(conn)
            raise

    async def _transaction_steps(
        self,
        conn: _Connection,
        sender: Address | None,
        recipients: Sequence[Address],
        payload: bytes,
        message: bytes,
        smtputf8: bool,
    ) -> dict[Address, Reply]:
        p = conn.protocol
        reused = conn.deliveries > 0
        timeout = self._command_timeout
        pipelining = "PIPELINING" in p.extensions
        mail = _mail_command(sender, recipients, payload, message, smtputf8, p.extensions)
        # RSET checks that a kept connection still works.  With PIPELINING it
        # leads the transaction's group (RFC 2920 allows it anywhere in one)
        # instead of costing a round trip of its own; if it fails, the
        # connection is dropped unanswered, which abandons whatever the
        # server made of the rest of the group.
        rset_in_group = reused and pipelining and not isinstance(mail, Reply)
        if reused and not rset_in_group:
            if not (await p.command(b"RSET", timeout)).ok:
                self._drop(conn)
                raise _Discard()
        conn.deliveries += 1
        if isinstance(mail, Reply):
            self._release(conn)
            return dict.fromkeys(recipients, mail)
        rcpts = [b"RCPT TO:<" + str(a).encode() + b">" for a in recipients]
        results: dict[Address, Reply] = {}
        accepted: list[Address] = []
        data_reply: Reply | None = None
        if pipelining:
            pending = p.send([b"RSET"] * rset_in_group + [mail, *rcpts, b"DATA"], timeout)
            if rset_in_group and not (await pending.pop(0)).ok:
                self._drop(conn, abort=True)
                for d in pending:
                    d.addErrback(lambda f: None)
                raise _Discard()
            mail_reply = await pending[0]
            rcpt_replies = [await d for d in pending[1:-1]]
            data_reply = await pending[-1]
        else:
            mail_reply = await p.command(mail, timeout)
            rcpt_replies = []
            if mail_reply.ok:
                for rcpt in rcpts:
                    rcpt_replies.append(await p.command(rcpt, timeout))
                    if rcpt_replies[-1].code == 421:
                        break
        if not mail_reply.ok:
            if reused and mail_reply.temporary:
                self._drop(conn)
                raise _Discard()
            if is_back_pressure(mail_reply):
                self._leave(conn, data_reply)
            else:
                self._settle(conn, data_reply)
            return dict.fromkeys(recipients, mail_reply)
        fatal: Reply | None = None
        for address, reply in zip(recipients, rcpt_replies, strict=False):
            if reply.code == 421:
                fatal = reply
                break
            if reply.ok:
                accepted.append(address)
            else:
                results[address] = reply
        if fatal is None and accepted:
            if data_reply is None:
                data_reply = await p.command(b"DATA", timeout)
            if data_reply.code == 354:
                final = await p.data(payload, self._data_timeout)
                data_reply = None
                if final.code == 421:
                    fatal = final
                else:
                    results.update(dict.fromkeys(accepted, final))
            elif data_reply.code == 421:
                fatal = data_reply
            else:
                results.update(dict.fromkeys(accepted, data_reply))
                data_reply = None
        if fatal is not None:
            self._drop(conn)
            for address in recipients:
                results.setdefault(address, fatal)
            return results
        if any(is_back_pressure(r) for r in results.values()):
            self._leave(conn, data_reply)
        else:
            self._settle(conn, data_reply)
        return results

    def _leave(self, conn: _Connection, unused_data_reply: Reply | None) -> None:
        """
        End a transaction the server pushed back on (``452 4.3.1``): it has
        too many of us, so the connection goes (with QUIT) instead of
        waiting idle for the next delivery.
        """
        if unused_data_reply is not None and unused_data_reply.code == 354:
            self._drop(conn, abort=True)
        else:
            self._drop(conn, quit=True)

    def _settle(self, conn: _Connection, unused_data_reply: Reply | None) -> None:
        """End a transaction: keep the connection unless DATA was answered 354 and not used."""
        if unused_data_reply is not None and unused_data_reply.code == 354:
            # The server wants a message we are not sending: out of step.
            self._drop(conn, abort=True)
        else:
            self._release(conn)

    # connections

    async def _connect(self, key: Key) -> _Connection | Reply:
        """
        Open, greet, EHLO and (as ``tls`` says) STARTTLS a new connection, for
        which a slot is reserved; if that fails, the reply says why and the
        slot is free again.

        When the TLS handshake fails and TLS is only opportunistic (and
        certificates are not verified), the message goes over a new
        connection without TLS, and the log says so: a broken TLS setup on
        the organisation's own server must not stop its mail.
        """
        ready = False
        try:
            got = await self._session(key, starttls=self._tls != "none")
            if isinstance(got, _TLSFailed):
                if self._tls == "required" or self._tls_verify:
                    return Reply(421, "4.7.5", f"TLS with {got.peer} failed: {got.why}")
                self._log.warn(
                    "STARTTLS with {peer} failed ({why}): delivering over a new connection "
                    "without TLS, as tls = \"opportunistic\" allows",
                    peer=got.peer,
                    why=got.why,
                )
                got = await self._session(key, starttls=False)
                assert not isinstance(got, _TLSFailed)
            if isinstance(got, Reply):
                return got
            conn = _Connection(got, key)
            got.on_lost = lambda _: self._lost(conn)
            ready = True
            return conn
        finally:
            if not ready:
                self._free_slot()

    async def _session(self, key: Key, starttls: bool) -> SMTPClientProtocol | Reply | _TLSFailed:
        """
        A connection to ``key`` ready for MAIL, or why there is none; closes
        what it opened unless it returns the connection.

        :param starttls: use STARTTLS if the server offers it (and insist on
            it if ``tls`` is ``"required"``).
        """
        host, port = key
        peer = _peer(host, port)
        protocol: SMTPClientProtocol | None = None
        ready = False
        try:
            address = host
            if self._destination is None and not _is_address(host):
                try:
                    address = await self._dns().getHostByName(host)
                except CancelledError:
                    raise
                except Exception as e:
                    return Reply(421, "4.4.3", f"cannot resolve {host}: {_describe(e)}")
            endpoint = (
                self._endpoint_for(address, port)
                if self._endpoint_for is not None
                else _endpoint(self._reactor, address, port, self._connect_timeout)
            )
            factory = _ClientFactory(
                lambda: SMTPClientProtocol(self._reactor, peer, self._command_timeout)
            )
            d = endpoint.connect(factory)
            d.addTimeout(self._connect_timeout, self._reactor)
            protocol = cast(SMTPClientProtocol, await d)
            self.connections_made += 1
            banner = await protocol.banner
            if not banner.ok:
                return banner
            reply = await self._ehlo(protocol, helo_too=True)
            if not reply.ok:
                return reply
            if starttls:
                refused = await self._starttls(protocol, host, peer)
                if refused is not None:
                    return refused
            ready = True
            return protocol
        except ConnectionRefusedError:
            return Reply(421, "4.4.1", f"Connection refused by {peer}")
        except (DeferredTimeout, ConnectTimeout):
            return Reply(
                421, "4.4.2", f"Connection to {peer} timed out after {self._connect_timeout:g}s"
            )
        except DNSLookupError as e:
            return Reply(421, "4.4.3", f"cannot resolve {host}: {_describe(e)}")
        except ConnectError as e:
            return Reply(421, "4.4.1", f"cannot connect to {peer}: {_describe(e)}")
        finally:
            if not ready and protocol is not None:
                protocol.quit()

    async def _ehlo(self, protocol: SMTPClientProtocol, helo_too: bool) -> Reply:
        """EHLO (then HELO, if EHLO gets a 5xx and ``helo_too``); sets ``extensions``."""
        protocol.extensions = {}
        reply = await protocol.command(b"EHLO " + self._hostname.encode(), self._command_timeout)
        if reply.ok:
            protocol.extensions = _extensions(protocol.last_lines[1:])
        elif reply.permanent and helo_too:
            reply = await protocol.command(
                b"HELO " + self._hostname.encode(), self._command_timeout
            )
        return reply

    async def _starttls(
        self, protocol: SMTPClientProtocol, host: str, peer: str
    ) -> Reply | _TLSFailed | None:
        """
        Upgrade a greeted connection with STARTTLS and say EHLO again.

        :returns: ``None`` when the connection may carry the message (over
            TLS, or in clear where ``tls = "opportunistic"`` allows it), else
            the reply for the recipients, or ``_TLSFailed``.
        """
        required = self._tls == "required"
        if "STARTTLS" not in protocol.extensions:
            if required:
                return Reply(
                    421, "4.7.4", f"{peer} does not offer STARTTLS, and the route requires TLS"
                )
            return None
        reply = await protocol.command(b"STARTTLS", self._command_timeout)
        if reply.code != 220:
            if reply.code == 421 or protocol.broken:
                return reply
            if required:
                return Reply(
                    421, "4.7.4", f"{peer} refused STARTTLS ({reply}), and the route requires TLS"
                )
            # RFC 3207: the session goes on, in clear, as if STARTTLS was never offered.
            self._log.info("{peer} refused STARTTLS ({reply}): going on without TLS",
                           peer=peer, reply=str(reply))
            return None
        try:
            options = await self._tls_options(host)
        except _TLSSetupError as e:
            protocol.abort()
            return Reply(421, "4.7.5", str(e))
        failed = await protocol.start_tls(options, self._command_timeout)
        if failed is not None:
            return _TLSFailed(peer, failed)
        # RFC 3207: forget everything learnt before TLS, and ask again.
        reply = await self._ehlo(protocol, helo_too=False)
        if not reply.ok:
            return reply
        return None

    async def _tls_options(self, host: str) -> IOpenSSLClientConnectionCreator | CertificateOptions:
        """
        The client TLS context for ``host``: no verification (``tls_verify``
        false), else verification of ``host`` against ``tls_ca_file`` (read
        once, in a thread) or the system's trusted CAs.

        :raises _TLSSetupError: if ``tls_ca_file`` cannot be read.
        """
        if not self._tls_verify:
            # Encryption against eavesdropping only: customers' own servers
            # often have self-signed certificates.
            return CertificateOptions(verify=False)
        trust: Any  # IOpenSSLTrustRoot, which Twisted keeps private
        if self._tls_ca_file is None:
            trust = platformTrust()
        else:
            if self._ca_certificates is None:
                try:
                    self._ca_certificates = await deferToThreadPool(
                        self._reactor, self._reactor.getThreadPool(), _read_ca_file, self._tls_ca_file
                    )
                except Exception as e:
                    raise _TLSSetupError(f"tls_ca_file: cannot use {self._tls_ca_file}: {_describe(e)}")
            trust = trustRootFromCertificates(self._ca_certificates)
        return optionsForClientTLS(host, trustRoot=trust)

    async def _acquire(self, key: Key, fresh_only: bool) -> _Connection | None:
        """
        An idle connection to ``key`` to reuse, or ``None`` once a slot for a
        new connection is reserved; waits while ``max_connections`` are busy.
        """
        while True:
            idle = self._idle.get(key)
            if idle and not fresh_only:
                conn = idle.pop()
                if conn.idle_timer is not None and conn.idle_timer.active():
                    conn.idle_timer.cancel()
                conn.idle_timer = None
                return conn
            # A share of 0 still lets a delivery the engine started open one.
            if self._open < max(1, self._max_connections):
                self._open += 1
                return None
            victim = next((c for cs in self._idle.values() for c in cs), None)
            if victim is not None:
                # Make room: an idle connection is worth less than this delivery,
                # which takes over its slot.
                victim.counted = False
                self._drop(victim, quit=True)
                return None
            waiter: Deferred[None] = Deferred()
            self._slot_waiters.append(waiter)
            await waiter

    def _release(self, conn: _Connection) -> None:
        """A delivery is done with ``conn``: keep it idle, or close it."""
        if conn.protocol.broken or self._closed or self._open > self._max_connections:
            self._drop(conn, quit=True)
            return
        self._idle.setdefault(conn.key, []).append(conn)
        conn.idle_timer = self._reactor.callLater(self._idle_timeout, self._idle_expired, conn)
        self._wake()

    def _idle_expired(self, conn: _Connection) -> None:
        conn.idle_timer = None
        self._drop(conn, quit=True)

    def _drop(self, conn: _Connection, quit: bool = False, abort: bool = False) -> None:
        """Close ``conn`` and forget it; its slot is free at once."""
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        if conn.idle_timer is not None and conn.idle_timer.active():
            conn.idle_timer.cancel()
        conn.idle_timer = None
        if quit and not abort:
            conn.protocol.quit()
        else:
            conn.protocol.abort()
        if conn.counted:
            conn.counted = False
            self._free_slot()

    def _lost(self, conn: _Connection) -> None:
        """The connection closed under us (server timeout, say)."""
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            self._drop(conn)

    def _free_slot(self) -> None:
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.called:  # a cancelled delivery no longer waits
                waiter.callback(None)
                return


def _mail_command(
    sender: Address | None,
    recipients: Iterable[Address],
    payload: bytes,
    message: bytes,
    smtputf8: bool,
    extensions: Mapping[str, str],
) -> bytes | Reply:
    """
    The MAIL command for a transaction, or the reply if it cannot be sent.

    SMTPUTF8 is needed when the entry came with it (its headers may hold
    UTF-8 even if its addresses do not) or when an address is not ASCII.
    """
    command = b"MAIL FROM:<" + (str(sender).encode() if sender is not None else b"") + b">"
    if not message.isascii() and "8BITMIME" in extensions:
        command += b" BODY=8BITMIME"
    if "SIZE" in extensions:
        command += b" SIZE=%d" % len(payload)
    addresses = [str(sender or "")] + [str(a) for a in recipients]
    if smtputf8 or not all(a.isascii() for a in addresses):
        if "SMTPUTF8" not in extensions:
            return Reply(
                553,
                "5.6.7",
                "the route's server does not support SMTPUTF8 (RFC 6531), which this message needs",
            )
        command += b" SMTPUTF8"
    return command


def _extensions(lines: Iterable[bytes]) -> dict[str, str]:
    found = {}
    for line in lines:
        keyword, _, parameters = line.decode("ascii", "replace").strip().partition(" ")
        if keyword:
            found[keyword.upper()] = parameters.strip()
    return found


def _peer(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_address(host: str) -> bool:
    from twisted.internet.abstract import isIPAddress, isIPv6Address

    return isIPAddress(host) or isIPv6Address(host)


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def parse_target(target: str) -> Key | None:
    """
    ``"host:port"``, ``"host"`` (port 25), ``"[v6]:port"`` or ``"mx"`` (``None``).

    :raises ValueError: naming ``target``.
    """
    if target == "mx":
        return None
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("25" if not rest else "")
        if not sep or not host or not port_text:
            raise ValueError(f"target: {target!r} is not '[address]:port'")
    else:
        host, _, port_text = target.partition(":")
        port_text = port_text or "25"
        if not host or ":" in port_text:
            raise ValueError(f"target: {target!r} is not 'host:port', 'host' or 'mx'")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"target: bad port in {target!r}")
    return host, int(port_text)


def _tls_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """
    The ``tls``, ``tls_verify`` and ``tls_ca_file`` options, checked.

    :raises ValueError: naming the key at fault.
    """
    tls = config.get("tls", "opportunistic")
    if tls not in TLS_MODES:
        raise ValueError(f"tls: must be one of {', '.join(map(repr, TLS_MODES))}, not {tls!r}")
    verify = config.get("tls_verify", False)
    if not isinstance(verify, bool):
        raise ValueError(f"tls_verify: must be true or false, not {verify!r}")
    ca_file = config.get("tls_ca_file")
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file):
        raise ValueError(f"tls_ca_file: must be the path of a PEM file, not {ca_file!r}")
    if tls == "none" and (verify or ca_file is not None):
        key = "tls_verify" if verify else "tls_ca_file"
        raise ValueError(f'{key}: means nothing with tls = "none"')
    if ca_file is not None and not verify:
        raise ValueError("tls_ca_file: is used only with tls_verify = true")
    return {"tls": tls, "tls_verify": verify, "tls_ca_file": ca_file}


@implementer(ITransportPlugin)
@frozen
class SMTPTransportPlugin:
    """Makes an ``SMTPTransport`` for a route ``smtp:TARGET``."""

    name: str = "smtp"

    def make(self, config: Mapping[str, Any], reactor: Any) -> SMTPTransport:
        """
        :param config: ``target``, ``hostname`` and the optional keys of the
            module docstring (``mx_port`` too, for tests).
        :param reactor: an ``IReactorTime`` and ``IReactorTCP``.
        :raises ValueError: naming the key at fault.
        """
        target = config.get("target")
        if not isinstance(target, str) or not target:
            raise ValueError("target: the route's target is missing")
        hostname = config.get("hostname")
        if not isinstance(hostname, str) or not hostname or any(c.isspace() for c in hostname):
            raise ValueError(f"hostname: must be our host name, not {hostname!r}")

        def number(key: str, default: float) -> float:
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{key}: must be a number greater than 0, not {value!r}")
            return float(value)

        def count(key: str, default: int) -> int:
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key}: must be a whole number greater than 0, not {value!r}")
            return value

        return SMTPTransport(
            reactor,
            hostname,
            parse_target(target),
            connect_timeout=number("connect_timeout", 30),
            command_timeout=number("command_timeout", 300),
            data_timeout=number("data_timeout", 600),
            idle_timeout=number("idle_timeout", 30),
            max_connections=count("max_connections", 10),
            mx_port=count("mx_port", 25),
            **_tls_config(config),
        )


plugin = SMTPTransportPlugin()

"""
The one SMTP and LMTP client of mailhub, public for transport authors.

A transport that speaks SMTP (RFC 5321) or LMTP (RFC 2033) to its route's
server builds on this module rather than on a client of its own: the
``smtp`` transport does (``mailhub.plugins.smtp``: its connection
pool, TLS policy and delivery logic are its own, the protocol is this), and
so does recipient verification (``verify = "route"``, through the smtp
transport's ``IRecipientProbe``).  What is here:

- ``SMTPClientProtocol``: one connection; sends commands (several in one
  write, for PIPELINING) and matches each reply to its command, in order;
  EHLO/LHLO and the extensions, STARTTLS, the message, one reply after the
  end of data (SMTP) or one per accepted recipient (LMTP).  It never fails:
  a lost connection, a timeout or a malformed reply is a synthetic
  ``421 4.4.2`` ``Reply`` for every command still waiting.
- ``connect``, ``client_endpoint`` and ``connect_error_reply``: opening a
  connection, and what to tell the policy when that fails.
- ``parse_reply``, ``parse_reply_text``: the reply parser (the only one in
  mailhub), enhanced status codes (RFC 3463) included.
- ``wire_data``: line ends made CRLF and dots stuffed, for DATA.
- ``mail_command``: MAIL with ``BODY=8BITMIME``, ``SIZE=`` and
  ``SMTPUTF8`` where they apply; ``probe_rcpt``: MAIL ``<>`` and RCPT, to ask
  whether a recipient exists without sending anything.
- ``parse_target``: ``host:port``, ``host`` (the default port) and
  ``[IPv6]:port`` route targets.

A delivery, reduced to its bones (``async`` code under
``Deferred.fromCoroutine``; every ``await`` gives a ``Reply``, never an
exception, once ``connect`` has succeeded)::

    from mailhub.smtp import client

    host, port = client.parse_target("mail.example.com:2525")
    peer = client.peer_name(host, port)
    endpoint = client.client_endpoint(reactor, host, port, timeout=30)
    try:
        protocol = await client.connect(reactor, endpoint, peer, 30, 300)
    except Exception as e:
        reply = client.connect_error_reply(e, host, peer, 30)
        if reply is None:
            raise
        return reply                      # 421 4.4.x: the policy retries
    if not (reply := await protocol.banner).ok:
        return reply
    if not (reply := await protocol.hello("mx.hub.example", 300)).ok:
        return reply
    payload = client.wire_data(message)
    mail = client.mail_command(sender, [rcpt], payload, message, False, protocol.extensions)
    for command in (mail, b"RCPT TO:<" + str(rcpt).encode() + b">", b"DATA"):
        if (reply := await protocol.command(command, 300)).code >= 400:
            return reply
    reply = await protocol.data(payload, 600)   # with lmtp=True: data_replies
    protocol.quit()

The caller owns time (every wait has the timeout it is given, measured on
the clock it is given) and policy: this module decides nothing about retries,
TLS or which host to try.  No blocking call is made; the message is never
handled line by line in Python: line ends are normalised and dots stuffed
with ``bytes.replace``.

This is our own client protocol rather than ``twisted.mail.smtp.ESMTPClient``:
that client is built for one factory per message batch, pulls each message
from its factory through callbacks (``getMailFrom``/``getMailTo``/
``getMailData``), closes the connection when the factory has nothing more to
send, and has no notion of an idle connection waiting for the next delivery
from elsewhere.  Reusing a connection across deliveries, pipelining
MAIL/RCPT/DATA and keeping one ``Reply`` per recipient would mean fighting
every one of those choices.  Here a connection is a small line protocol that
matches replies to commands in order (which is all PIPELINING needs), and a
transaction is plain ``async`` code over it.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

from attrs import define, field
from OpenSSL.SSL import Error as SSLError
from twisted.internet.defer import Deferred, succeed
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
from twisted.internet.ssl import Certificate, CertificateOptions
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.model import Address, CheckedMessage, Reply, has_bare_line_end
from mailhub.netio import write_now

__all__ = [
    "DEFAULT_PORT",
    "SMTPClientProtocol",
    "client_endpoint",
    "connect",
    "connect_error_reply",
    "mail_command",
    "parse_reply",
    "parse_reply_text",
    "parse_target",
    "peer_name",
    "probe_rcpt",
    "read_ca_file",
    "split_rcpt_replies",
    "wire_data",
]

DEFAULT_PORT = 25
"""The port of a target that names none (SMTP's)."""

_MAX_REPLY = 64 * 1024
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|\Z)(.*)\Z", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|\Z)")


# Targets


def parse_target(target: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """
    The host and port of a route's target: ``"host:port"``, ``"host"``
    (``default_port``) or ``"[address]:port"`` / ``"[address]"`` for an IPv6
    literal.

    :raises ValueError: ``"target: ..."``, saying what is wrong with ``target``.
    """
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else (str(default_port) if not rest else "")
        if not sep or not host or not port_text:
            raise ValueError(f"target: {target!r} is not '[address]:port'")
    else:
        host, _, port_text = target.partition(":")
        port_text = port_text or str(default_port)
        if not host or ":" in port_text:
            raise ValueError(f"target: {target!r} is not 'host:port' or 'host'")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"target: bad port in {target!r}")
    return host, int(port_text)


def peer_name(host: str, port: int) -> str:
    """``host:port`` as replies and logs name a server: ``[2001:db8::1]:25`` for IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Replies


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


def parse_reply_text(text: str) -> Reply | None:
    """
    A ``Reply`` from one line of reply text, such as ``str(Reply)`` gives
    (``"550 5.1.1 User unknown"``), or ``None`` if it does not start with a
    reply code.
    """
    match = _REPLY_LINE.match(text.encode("utf-8", "replace"))
    if match is None:
        return None
    return parse_reply(int(match.group(1)), [match.group(3)])


# The message


def read_ca_file(path: str) -> list[Certificate]:
    """
    The PEM certificates in ``path``: a transport's ``tls_ca_file``, the
    CAs it trusts instead of the system's.  Blocking: call it in a thread.

    :raises OSError: the file cannot be read.
    :raises ValueError: there is no PEM certificate in it.
    """
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


def split_rcpt_replies(
    recipients: Sequence[Address], replies: Sequence[Reply]
) -> tuple[list[Address], dict[Address, Reply], Reply | None]:
    """
    The RCPT replies of one transaction, in RCPT order, sorted out.

    :param recipients: the recipients, as their RCPT commands were sent.
    :param replies: the replies received so far (fewer than ``recipients``
        when the client stopped at a ``421``).
    :returns: ``(accepted, refused, fatal)``: the recipients the server
        took, in order (DATA goes on for them); the refused ones with their
        replies; and the ``421`` that ended the session, or ``None``.  The
        recipients after a ``421`` are in neither.
    """
    accepted: list[Address] = []
    refused: dict[Address, Reply] = {}
    for address, reply in zip(recipients, replies, strict=False):
        if reply.code == 421:
            return accepted, refused, reply
        if reply.ok:
            accepted.append(address)
        else:
            refused[address] = reply
    return accepted, refused, None


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


def mail_command(
    sender: Address | None,
    recipients: Iterable[Address],
    payload: bytes,
    message: bytes,
    smtputf8: bool,
    extensions: Mapping[str, str],
) -> bytes | Reply:
    """
    The MAIL command for a transaction, or the reply for every recipient if it
    cannot be sent.

    ``BODY=8BITMIME`` goes with a message that is not ASCII, ``SIZE=`` with
    the payload's size, where the server offers them.  SMTPUTF8 is needed
    when the entry came with it (its headers may hold UTF-8 even if its
    addresses do not) or when an address is not ASCII; a server that does not
    offer it gets nothing, and the reply is ``553 5.6.7`` (permanent).

    :param payload: ``wire_data(message)``.
    :param extensions: the server's (``SMTPClientProtocol.extensions``).
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


# Connections


def client_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    A client endpoint for ``host`` (a name or an address) and ``port``.  An
    address literal needs no name resolution: ``HostnameEndpoint`` would
    still send it through the resolver's thread pool on every connection.
    """
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if version == 4:
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)


class _ClientFactory(Factory):
    # One per connection: "Starting factory <...>" twice per attempt says
    # nothing the attempt's own log line does not.
    noisy = False

    def __init__(self, make: Callable[[], SMTPClientProtocol]) -> None:
        self._make = make

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        return self._make()


def connect(
    clock: Any,
    endpoint: IStreamClientEndpoint,
    peer: str,
    connect_timeout: float,
    banner_timeout: float,
    lmtp: bool = False,
) -> Deferred[SMTPClientProtocol]:
    """
    Connect to a server.

    :param clock: an ``IReactorTime`` for every timeout of the connection.
    :param peer: the server's name in replies and logs (``peer_name``).
    :param connect_timeout: seconds the connection may take.
    :param banner_timeout: seconds to wait for the greeting, once connected.
    :param lmtp: speak LMTP (``LHLO``, a reply per recipient after data).
    :returns: a ``Deferred`` firing with the ``SMTPClientProtocol`` once
        connected (its greeting comes on ``banner``), or failing with the
        endpoint's error (``connect_error_reply`` turns it into a reply),
        ``twisted.internet.defer.TimeoutError`` after ``connect_timeout``.
        Cancelling it cancels the connection attempt.
    """
    factory = _ClientFactory(lambda: SMTPClientProtocol(clock, peer, banner_timeout, lmtp=lmtp))
    d = endpoint.connect(factory)
    d.addTimeout(connect_timeout, clock)
    return cast("Deferred[SMTPClientProtocol]", d)


def connect_error_reply(error: BaseException, host: str, peer: str, connect_timeout: float) -> Reply | None:
    """
    The reply for every recipient when a connection could not be made
    (``connect`` failed with ``error``): a ``421`` with ``4.4.1`` (refused,
    unreachable), ``4.4.2`` (timed out) or ``4.4.3`` (the name does not
    resolve), so that the policy retries.  ``None`` when ``error`` is not a
    connection failure (a cancellation, a bug): the caller re-raises it.
    """
    if isinstance(error, ConnectionRefusedError):
        return Reply(421, "4.4.1", f"Connection refused by {peer}")
    if isinstance(error, DeferredTimeout | ConnectTimeout):
        return Reply(421, "4.4.2", f"Connection to {peer} timed out after {connect_timeout:g}s")
    if isinstance(error, DNSLookupError):
        return Reply(421, "4.4.3", f"cannot resolve {host}: {_describe(error)}")
    if isinstance(error, ConnectError):
        return Reply(421, "4.4.1", f"cannot connect to {peer}: {_describe(error)}")
    return None


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


# The protocol


@define
class _Waiter:
    deferred: Deferred[Reply]
    command: str
    timeout: float
    lines: list[bytes] = field(factory=list)


@implementer(IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """
    One connection to an SMTP (or LMTP) server: sends commands and matches
    each reply to its command, in order.

    ``send`` never fails: every Deferred it returns fires with a ``Reply``.
    When the connection is lost or a reply does not come in time, every
    outstanding command gets a synthetic ``421 4.4.2`` reply saying so, and the
    connection is closed; a ``421`` from the server does the same for the
    commands after it.  After that ``broken`` is true.

    Made by ``connect`` (or by a factory of the caller's, for tests).

    :param clock: an ``IReactorTime``; every reply is timed on it.
    :param peer: the server's name in synthetic replies.
    :param banner_timeout: seconds to wait for the greeting.
    :param lmtp: speak LMTP: ``hello`` says LHLO, ``data_replies`` takes a
        reply per recipient.
    :ivar banner: a ``Deferred`` firing with the server's greeting.
    :ivar extensions: the EHLO/LHLO keywords (upper case) and their
        parameters, once ``hello`` has read them.
    :ivar last_lines: the text lines of the last reply received (EHLO's keywords).
    :ivar tls: TLS is up (``start_tls``).
    :ivar broken: the session is over; commands get a ``421`` at once.
    :ivar lost: a ``Deferred`` firing once the connection is closed.
    :ivar on_lost: called with the protocol when the connection closes.
    """

    def __init__(self, clock: Any, peer: str, banner_timeout: float, lmtp: bool = False) -> None:
        self._clock = clock
        self.peer = peer
        self.lmtp = lmtp
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

    def hello(self, name: str, timeout: float, helo_too: bool = True) -> Deferred[Reply]:
        """
        Say EHLO (LHLO with LMTP) and read the server's extensions into
        ``extensions`` (emptied first, as RFC 3207 wants after STARTTLS).

        :param name: our host name.
        :param helo_too: if EHLO gets a 5xx, say HELO (SMTP only).
        :returns: a ``Deferred`` firing with the reply.
        """
        return Deferred.fromCoroutine(self._hello(name, timeout, helo_too))

    async def _hello(self, name: str, timeout: float, helo_too: bool) -> Reply:
        self.extensions = {}
        reply = await self.command((b"LHLO " if self.lmtp else b"EHLO ") + name.encode(), timeout)
        if reply.ok:
            self.extensions = _extensions(self.last_lines[1:])
        elif reply.permanent and helo_too and not self.lmtp:
            reply = await self.command(b"HELO " + name.encode(), timeout)
        return reply

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

    def data_replies(self, payload: bytes, count: int, timeout: float) -> list[Deferred[Reply]]:
        """
        LMTP (RFC 2033): send a message's payload after a 354, and take one
        reply for each recipient whose RCPT was accepted, in RCPT order.

        :param count: how many RCPTs were accepted.
        :returns: one ``Deferred`` per such recipient, firing with its reply;
            each is timed from the reply before it.
        """
        if self.broken:
            return [succeed(self._lost_reply("end of data", "")) for _ in range(count)]
        assert self.transport is not None
        write_now(self.transport, payload)
        return [self._expect("end of data", timeout) for _ in range(count)]

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


def _extensions(lines: Iterable[bytes]) -> dict[str, str]:
    found = {}
    for line in lines:
        keyword, _, parameters = line.decode("ascii", "replace").strip().partition(" ")
        if keyword:
            found[keyword.upper()] = parameters.strip()
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


# Asking about a recipient


def probe_rcpt(protocol: SMTPClientProtocol, recipient: Address, timeout: float) -> Deferred[Reply]:
    """
    Ask a greeted server (after ``hello``) whether it takes mail for
    ``recipient``: ``MAIL FROM:<>`` (with ``SMTPUTF8`` if the address needs
    it), then ``RCPT TO:<recipient>`` (in one write with PIPELINING).  Never
    DATA: nothing is sent.  The transaction is left open: say ``RSET`` to
    reuse the connection, or ``quit``.

    :returns: a ``Deferred`` firing with the reply to RCPT: 2xx, the
        recipient exists; 5xx, it does not; 4xx, the server cannot say now.
        A 5xx to MAIL says nothing of the recipient and is given as
        ``451 4.3.0``; an address that needs SMTPUTF8, on a server without
        it, is ``553 5.6.7`` without asking.
    """
    return Deferred.fromCoroutine(_probe_rcpt(protocol, recipient, timeout))


async def _probe_rcpt(protocol: SMTPClientProtocol, recipient: Address, timeout: float) -> Reply:
    address = str(recipient)
    mail = b"MAIL FROM:<>"
    if not address.isascii():
        if "SMTPUTF8" not in protocol.extensions:
            return Reply(553, "5.6.7", "The route's server does not support SMTPUTF8")
        mail += b" SMTPUTF8"
    rcpt = b"RCPT TO:<" + address.encode() + b">"
    if "PIPELINING" in protocol.extensions:
        mail_reply, rcpt_pending = protocol.send([mail, rcpt], timeout)
        mail_reply_value = await mail_reply
        rcpt_reply: Reply | None = await rcpt_pending
    else:
        mail_reply_value = await protocol.command(mail, timeout)
        rcpt_reply = None
    if not mail_reply_value.ok:
        if mail_reply_value.temporary:
            return mail_reply_value
        return Reply(451, "4.3.0", f"cannot verify recipients: {protocol.peer} answered MAIL FROM:<> {mail_reply_value}")
    if rcpt_reply is None:
        rcpt_reply = await protocol.command(rcpt, timeout)
    return rcpt_reply

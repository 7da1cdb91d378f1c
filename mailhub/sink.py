"""
A real SMTP server on a real socket, playing "the organisation's server".

Integration tests deliver to it and switch it, at run time, between the ways
a real downstream server behaves::

    server = DownstreamServer(reactor)
    port = await server.start(port=0)          # 127.0.0.1, a free port
    server.mode = "tempfail"                   # 451 4.3.0 at RCPT
    await server.stop()                        # connection refused from now on
    await server.start(port=port)              # back up on the same port
    messages = await server.wait_for(3, timeout=10)

Users run it to try the hub (``mailhub sink --listen
tcp:2500:interface=127.0.0.1 --maildir DIR``; tests import it as
``mailhub.testing.downstream``): it accepts everything, prints one line per message and, with
``--maildir``, saves each message in a Maildir.

The protocol is our own few hundred lines on ``Protocol`` rather than
``twisted.mail``: a test server has to misbehave on purpose (drop the
connection after DATA, refuse the Nth message of a connection, answer late)
and has to record the bytes exactly as they came off the wire, dot-stuffing
included, so that tests can check what a client really sent.

It speaks ESMTP with PIPELINING, 8BITMIME, SIZE and ENHANCEDSTATUSCODES, and
HELO, MAIL, RCPT, DATA, RSET, NOOP, VRFY and QUIT; with a certificate
(``tls_certificate`` and ``tls_key``) it offers STARTTLS too, and records
whether each message came over TLS.  It is strict where a
client's correctness is being tested: commands and the end of data are
recognised only with CRLF line ends.  It is not a mail server: nothing is
relayed, and everything received is kept in memory.  It reads time only from
the reactor it is given, and the Maildir writes of ``main`` go through the
reactor's thread pool.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from attrs import define, field
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509 import load_pem_x509_certificate
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["MODES", "DownstreamServer", "ReceivedMessage", "main"]

MODES = frozenset(
    {
        "accept",  # 250 and store the message
        "tempfail",  # 451 4.3.0 at every RCPT
        "tempfail-data",  # accept RCPT, 451 4.3.0 at the end of DATA
        "reject",  # 550 5.1.1 at every RCPT
        "reject-data",  # accept RCPT, 554 5.6.0 at the end of DATA
        "drop",  # banner, then close; an open session is closed at its next command
        "drop-data",  # close without a reply at the end of DATA
        "store-drop",  # store the message, then close without a reply to DATA
        "data-twice",  # store the message and answer its end of DATA with 250 twice
        "shutdown",  # 421 4.3.2 to MAIL (mid-session), then close
        "busy",  # 421 4.3.2 banner, then close
        "down",  # not listening: connection refused (see ``DownstreamServer.mode``)
    }
)
"""The modes a ``DownstreamServer`` can be switched to."""

_MAX_LINE = 4096
_MAIL = re.compile(rb"FROM:\s*<([^>]*)>\s*(.*)\Z", re.IGNORECASE | re.DOTALL)
_RCPT = re.compile(rb"TO:\s*<([^>]*)>\s*(.*)\Z", re.IGNORECASE | re.DOTALL)


@define
class ReceivedMessage:
    """
    One message the server accepted (said 250 to after DATA).

    :ivar sender: the reverse path, ``""`` for the null sender ``<>``.
    :ivar recipients: the accepted forward paths, as given.
    :ivar raw: the DATA payload exactly as received on the wire: dot-stuffed,
        up to and including the terminating ``CRLF . CRLF`` (for an empty
        message, just ``. CRLF``).
    :ivar message: the message: ``raw`` unstuffed, without the terminator.
    :ivar helo: what the client said in EHLO/HELO.
    :ivar mail_parameters: the ESMTP parameters of MAIL, upper-cased keys
        (``{"BODY": "8BITMIME", "SIZE": "1234"}``).
    :ivar connection: the serial number of the connection it came on (from 1).
    :ivar received_at: the reactor's time when it was accepted.
    :ivar tls: it came over TLS (after STARTTLS).
    """

    sender: str
    recipients: list[str]
    raw: bytes
    message: bytes
    helo: str = ""
    mail_parameters: dict[str, str] = field(factory=dict)
    connection: int = 0
    received_at: float = 0.0
    tls: bool = False


class _Session(Protocol):
    """One SMTP connection to a ``DownstreamServer``; all its state lives here."""

    def __init__(self, server: DownstreamServer, serial: int) -> None:
        self.server = server
        self.serial = serial
        self.helo: str | None = None
        self.sender: str | None = None
        self.parameters: dict[str, str] = {}
        self.recipients: list[str] = []
        self.messages = 0
        self.over_limit = False
        self.tls = False
        self._buffer = b""
        self._data: bytearray | None = None
        self._paused = False
        self._closed = False
        self._drip = bytearray()
        self._dripping: IDelayedCall | None = None
        self.opened_at = server._reactor.seconds()
        self.lost: Deferred[None] = Deferred()

    # connection

    def connectionMade(self) -> None:
        server = self.server
        server._sessions.add(self)
        server.active_connections += 1
        server.peak_connections = max(server.peak_connections, server.active_connections)
        limit = server.max_concurrent_connections
        self.over_limit = limit is not None and server.active_connections > limit
        if server.mode == "busy":
            self._reply(421, "4.3.2 Service not available, closing transmission channel")
            self._close()
            return
        self._reply(220, f"{server.hostname} ESMTP mailhub downstream test server")
        if server.mode == "drop":
            self._close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        if self._dripping is not None and self._dripping.active():
            self._dripping.cancel()
        self.server._sessions.discard(self)
        self.server.active_connections -= 1
        self.server.durations.append(self.server._reactor.seconds() - self.opened_at)
        self.lost.callback(None)

    def _close(self) -> None:
        self._closed = True
        assert self.transport is not None
        self.transport.loseConnection()

    def _reply(self, code: int, *lines: str) -> None:
        if self._closed:
            return
        assert self.transport is not None
        last = len(lines) - 1
        data = b"".join(
            f"{code}{' ' if i == last else '-'}{text}\r\n".encode() for i, text in enumerate(lines)
        )
        if self.server.drip > 0:
            self._drip += data
            if self._dripping is None:
                self._dripping = self.server._reactor.callLater(self.server.drip, self._drip_one)
            return
        self.transport.write(data)

    def _drip_one(self) -> None:
        """Write the next byte of the replies waiting; ``drip`` seconds later, the next."""
        self._dripping = None
        if self._closed or not self._drip:
            return
        assert self.transport is not None
        self.transport.write(bytes(self._drip[:1]))
        del self._drip[:1]
        if self._drip:
            self._dripping = self.server._reactor.callLater(self.server.drip, self._drip_one)

    # input

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        self._process()

    def _process(self) -> None:
        while not self._paused and not self._closed:
            if self._data is not None:
                if not self._take_data():
                    return
                continue
            line, sep, rest = self._buffer.partition(b"\r\n")
            if not sep:
                if len(self._buffer) > _MAX_LINE:
                    self._buffer = b""
                    self._reply(500, "5.5.2 Line too long")
                return
            self._buffer = rest
            self._command(line)

    def _take_data(self) -> bool:
        """Move input into the DATA buffer; ``True`` once the message ended."""
        assert self._data is not None
        start = max(0, len(self._data) - 4)
        self._data += self._buffer
        self._buffer = b""
        if self._data.startswith(b".\r\n"):
            end = 3
        else:
            found = self._data.find(b"\r\n.\r\n", start)
            if found < 0:
                return False
            end = found + 5
        raw = bytes(self._data[:end])
        self._buffer = bytes(self._data[end:])
        self._data = None
        self._end_of_data(raw)
        return True

    # commands

    def _command(self, line: bytes) -> None:
        server = self.server
        server.commands.append(line)
        if server.mode == "drop":
            self._close()
            return
        verb, _, arg = line.partition(b" ")
        handler = getattr(self, "_smtp_" + verb.decode("ascii", "replace").upper(), None)
        if handler is None:
            self._reply(500, "5.5.2 Command not recognised")
        else:
            handler(arg.strip())

    def _reset(self) -> None:
        self.sender = None
        self.parameters = {}
        self.recipients = []

    def _smtp_EHLO(self, arg: bytes) -> None:
        server = self.server
        if not server.esmtp:
            self._reply(502, "5.5.2 Command not implemented")
            return
        self.helo = arg.decode("utf-8", "replace")
        self._reset()
        extensions = [f"SIZE {server.max_size}" if e == "SIZE" else e for e in server.extensions]
        if server.tls_certificate and not self.tls:
            extensions.append("STARTTLS")
        self._reply(250, f"{server.hostname} greets {self.helo}", *extensions)

    def _smtp_STARTTLS(self, arg: bytes) -> None:
        server = self.server
        if not server.tls_certificate or self.tls:
            self._reply(502, "5.5.1 Command not implemented")
            return
        if arg:
            self._reply(501, "5.5.4 Syntax: STARTTLS")
            return
        self._reply(220, "2.0.0 Ready to start TLS")
        # Whatever the client pipelined after STARTTLS is never executed.
        self._buffer = b""
        if server.starttls_broken:
            self._close()
            return
        if server.starttls_stall:
            # Neither a handshake nor another reply: whatever comes is never read.
            self._paused = True
            return
        assert self.transport is not None
        self.transport.startTLS(server._tls_options())  # type: ignore[attr-defined]
        self.tls = True
        self.helo = None
        self._reset()

    def _smtp_HELO(self, arg: bytes) -> None:
        self.helo = arg.decode("utf-8", "replace")
        self._reset()
        self._reply(250, self.server.hostname)

    def _smtp_MAIL(self, arg: bytes) -> None:
        server = self.server
        if self.helo is None:
            self._reply(503, "5.5.1 Say EHLO first")
            return
        if self.sender is not None:
            self._reply(503, "5.5.1 Nested MAIL command")
            return
        if server.mode == "shutdown":
            self._reply(421, "4.3.2 Shutting down, closing transmission channel")
            self._close()
            return
        match = _MAIL.match(arg)
        if match is None:
            self._reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
            return
        parameters = {}
        for item in match.group(2).split():
            key, _, value = item.decode("utf-8", "replace").partition("=")
            parameters[key.upper()] = value
        if "8BITMIME" not in server.extensions:
            parameters_ok = "BODY" not in parameters
        else:
            parameters_ok = parameters.get("BODY", "7BIT").upper() in ("7BIT", "8BITMIME")
        unknown = set(parameters) - {"BODY", "SIZE", "SMTPUTF8"}
        if not parameters_ok or unknown:
            self._reply(555, "5.5.4 Unsupported MAIL parameters")
            return
        if self.over_limit or (
            server.max_messages_per_connection is not None
            and self.messages >= server.max_messages_per_connection
        ):
            server.deferrals += 1
            self._reply(452, "4.3.1 Insufficient system resources")
            return
        if (
            "SIZE" in parameters
            and parameters["SIZE"].isdigit()
            and int(parameters["SIZE"]) > server.max_size
        ):
            self._reply(552, "5.3.4 Message size exceeds fixed maximum message size")
            return
        self.sender = match.group(1).decode("utf-8", "replace")
        self.parameters = parameters
        self._reply(250, "2.1.0 Sender OK")

    def _smtp_RCPT(self, arg: bytes) -> None:
        server = self.server
        if self.sender is None:
            self._reply(503, "5.5.1 Need MAIL before RCPT")
            return
        match = _RCPT.match(arg)
        if match is None or not match.group(1):
            self._reply(501, "5.5.4 Syntax: RCPT TO:<address>")
            return
        recipient = match.group(1).decode("utf-8", "replace")
        key = recipient.lower()
        if server.mode == "tempfail":
            server.deferrals += 1
            self._reply(451, "4.3.0 Temporary failure, try again later")
            return
        if server.mode == "reject":
            server.rejections += 1
            self._reply(550, f"5.1.1 <{recipient}>: Recipient address rejected: User unknown")
            return
        rule = server.recipient_replies.get(key)
        if rule is not None:
            code, _, text = rule.partition(" ")
            if code.startswith("5"):
                server.rejections += 1
            elif code.startswith("4"):
                server.deferrals += 1
            self._reply(int(code), text)
            if not code.startswith("2"):
                return
        elif server.known_users is not None and key not in {u.lower() for u in server.known_users}:
            server.rejections += 1
            self._reply(550, f"5.1.1 <{recipient}>: Recipient address rejected: User unknown")
            return
        else:
            self._reply(250, "2.1.5 Recipient OK")
        self.recipients.append(recipient)

    def _smtp_DATA(self, arg: bytes) -> None:
        if self.sender is None:
            self._reply(503, "5.5.1 Need MAIL before DATA")
            return
        if not self.recipients:
            self._reply(554, "5.5.1 No valid recipients")
            return
        self._data = bytearray()
        self._reply(354, "End data with <CR><LF>.<CR><LF>")

    def _smtp_RSET(self, arg: bytes) -> None:
        self._reset()
        self._reply(250, "2.0.0 OK")

    def _smtp_NOOP(self, arg: bytes) -> None:
        self._reply(250, "2.0.0 OK")

    def _smtp_VRFY(self, arg: bytes) -> None:
        self._reply(252, "2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    def _smtp_QUIT(self, arg: bytes) -> None:
        self._reply(221, "2.0.0 Bye")
        self._close()

    # end of data

    def _end_of_data(self, raw: bytes) -> None:
        server = self.server
        mode = server.mode
        if mode in ("drop", "drop-data"):
            self._close()
            return
        sender, recipients, parameters = self.sender or "", self.recipients, self.parameters
        self._reset()
        content = raw[:-3]
        # Unstuffing: a leading dot of any line goes.  Prefixing CRLF makes the
        # first line like every other, so one replace does every line.
        message = (b"\r\n" + content).replace(b"\r\n.", b"\r\n")[2:]
        if mode == "tempfail-data":
            server.deferrals += 1
            reply: tuple[int, str] = (451, "4.3.0 Temporary failure, try again later")
        elif mode == "reject-data":
            server.rejections += 1
            reply = (554, "5.6.0 Message content rejected")
        elif len(message) > server.max_size:
            reply = (552, "5.3.4 Message size exceeds fixed maximum message size")
        else:
            self.messages += 1
            received = ReceivedMessage(
                sender=sender,
                recipients=list(recipients),
                raw=raw,
                message=message,
                helo=self.helo or "",
                mail_parameters=parameters,
                connection=self.serial,
                received_at=server._reactor.seconds(),
                tls=self.tls,
            )
            server._store(received)
            if mode == "store-drop":
                self._close()
                return
            reply = (250, f"2.0.0 OK queued as {len(server.messages)}")
        # "data-twice": one reply too many, in the same write as the first.
        replies = [reply, reply] if mode == "data-twice" else [reply]
        if server.delay > 0:
            self._paused = True
            server._reactor.callLater(server.delay, self._late_reply, replies)
        else:
            self._reply_all(replies)

    def _reply_all(self, replies: list[tuple[int, str]]) -> None:
        if len(replies) == 1 or self.server.drip > 0 or self._closed:
            for reply in replies:
                self._reply(*reply)
            return
        assert self.transport is not None
        self.transport.write(b"".join(f"{code} {text}\r\n".encode() for code, text in replies))

    def _late_reply(self, replies: list[tuple[int, str]]) -> None:
        self._paused = False
        self._reply_all(replies)
        self._process()


class DownstreamServer:
    """
    An SMTP server for tests, switchable at run time.

    Settings (plain attributes, read at each command, so a change applies at
    once, to open connections too):

    :ivar mode: one of ``MODES``.  Setting ``"down"`` stops listening (and
        closes open connections), as ``stop()`` does; setting any other mode
        while down listens again on the same port.  Use ``stop()`` and
        ``start()`` when a test needs to wait for that to happen.
    :ivar known_users: if not ``None``, the only recipients accepted (case
        insensitive); any other gets ``550 5.1.1``.
    :ivar recipient_replies: a dict of recipient (lower case) to the reply it
        gets at RCPT, as text (``"452 4.2.2 Mailbox full"``); a ``2xx`` accepts.
    :ivar max_messages_per_connection: Exchange-style back-pressure: after
        this many messages on one connection, MAIL gets ``452 4.3.1``.
    :ivar max_concurrent_connections: likewise for every connection opened
        while this many are already open.
    :ivar delay: seconds to wait before answering the end of DATA (a slow
        server).
    :ivar esmtp: ``False`` makes EHLO answer ``502`` (an old HELO-only server).
    :ivar extensions: the EHLO keywords advertised (``"SIZE"`` is sent with
        ``max_size``).
    :ivar max_size: the SIZE limit, in bytes.
    :ivar tls_certificate: the path of a PEM certificate; with ``tls_key``
        (the path of its PEM key), EHLO offers STARTTLS (``None``: it does
        not).  The files are read at the first STARTTLS after a change.
    :ivar tls_key: see ``tls_certificate``.
    :ivar starttls_broken: answer STARTTLS with 220, then close the
        connection instead of the TLS handshake (a server whose TLS is
        misconfigured).
    :ivar starttls_stall: answer STARTTLS with 220, then neither start the
        handshake nor read anything more: the connection stays open until
        the client gives up.
    :ivar drip: if more than 0, every reply is written one byte at a time,
        this many seconds apart (a server that answers one byte a second);
        closing a connection drops what is not yet written.

    Records:

    :ivar messages: every ``ReceivedMessage`` accepted, in order.
    :ivar commands: every command line received, on every connection.
    :ivar connections: how many connections were accepted in all.
    :ivar active_connections: how many are open now.
    :ivar peak_connections: the most open at once.
    :ivar rejections: how many 5xx replies were given to RCPT or DATA.
    :ivar deferrals: how many 4xx replies were given to MAIL, RCPT or DATA.
    :ivar durations: how long each closed connection was open, in order of closing.
    :ivar port: the port listened on (kept while down, for ``start(port=...)``).
    :ivar on_message: called with each ``ReceivedMessage``, if set.
    """

    _log = Logger()

    def __init__(
        self, reactor: Any, hostname: str = "downstream.test", interface: str = "127.0.0.1"
    ) -> None:
        """
        :param reactor: an ``IReactorTCP`` and ``IReactorTime``.
        :param hostname: the name the server gives in its banner and EHLO reply.
        :param interface: the address ``start`` listens on.
        """
        self._reactor = reactor
        self.hostname = hostname
        self.interface = interface
        self._mode = "accept"
        self.known_users: set[str] | None = None
        self.recipient_replies: dict[str, str] = {}
        self.max_messages_per_connection: int | None = None
        self.max_concurrent_connections: int | None = None
        self.delay = 0.0
        self.esmtp = True
        self.extensions = ["PIPELINING", "8BITMIME", "SIZE", "ENHANCEDSTATUSCODES"]
        self.max_size = 10 * 1024 * 1024
        self.tls_certificate: str | None = None
        self.tls_key: str | None = None
        self.starttls_broken = False
        self.starttls_stall = False
        self.drip = 0.0
        self._tls_loaded: tuple[tuple[str, str | None], CertificateOptions] | None = None
        self.on_message: Callable[[ReceivedMessage], Any] | None = None
        self.port: int | None = None
        self._listening: IListeningPort | None = None
        self._sessions: set[_Session] = set()
        self._waiters: list[tuple[int, Deferred[list[ReceivedMessage]], IDelayedCall]] = []
        self.reset()

    def reset(self) -> None:
        """Forget every record (messages, commands, counters); settings stay."""
        self.messages: list[ReceivedMessage] = []
        self.commands: list[bytes] = []
        self.connections = 0
        self.active_connections = len(self._sessions)
        self.peak_connections = self.active_connections
        self.rejections = 0
        self.deferrals = 0
        self.durations: list[float] = []

    def _tls_options(self) -> CertificateOptions:
        """The server's TLS context, from ``tls_certificate`` and ``tls_key``."""
        assert self.tls_certificate is not None
        files = (self.tls_certificate, self.tls_key)
        if self._tls_loaded is None or self._tls_loaded[0] != files:
            # A test server reads two small local files once; not worth a thread.
            pem = b""
            for path in files:
                if path:
                    with open(path, "rb") as f:
                        pem += f.read() + b"\n"
            options = CertificateOptions(
                privateKey=load_pem_private_key(pem, password=None),  # type: ignore[arg-type]
                certificate=load_pem_x509_certificate(pem),  # type: ignore[arg-type]
            )
            self._tls_loaded = (files, options)
        return self._tls_loaded[1]

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (one of {', '.join(sorted(MODES))})")
        was = self._mode
        self._mode = mode
        if mode == "down" and was != "down":
            self.stop()
        elif was == "down" and mode != "down" and self.port is not None and self._listening is None:
            self.start(self.port).addErrback(
                lambda f: self._log.failure("cannot listen again on port {port}", f, port=self.port)
            )

    @property
    def listening(self) -> bool:
        return self._listening is not None

    def start(self, port: int = 0) -> Deferred[int]:
        """
        Listen on ``interface``:``port`` (``0``: a free port).

        :returns: a ``Deferred`` firing with the port number once listening.
        """
        endpoint: IStreamServerEndpoint
        if ":" in self.interface:
            endpoint = TCP6ServerEndpoint(self._reactor, port, interface=self.interface)
        else:
            endpoint = TCP4ServerEndpoint(self._reactor, port, interface=self.interface)
        return self.listen(endpoint)

    def listen(self, endpoint: IStreamServerEndpoint) -> Deferred[int]:
        """
        Listen on any stream endpoint (``main`` uses this for its ``--listen``).

        :returns: a ``Deferred`` firing with the port number, or ``0`` if the
            endpoint has none.
        """
        if self._listening is not None:
            raise RuntimeError("already listening")
        if self._mode == "down":
            self._mode = "accept"

        def listening(port: IListeningPort) -> int:
            self._listening = port
            self.port = getattr(port.getHost(), "port", 0)
            return self.port

        return endpoint.listen(_Factory(self)).addCallback(listening)

    def stop(self) -> Deferred[None]:
        """
        Stop listening and close every open connection: from now on a client
        gets "connection refused".

        :returns: a ``Deferred`` firing once the port and every connection are closed.
        """
        waits: list[Deferred[Any]] = []
        if self._listening is not None:
            port, self._listening = self._listening, None
            waits.append(maybeDeferred(port.stopListening))
        for session in list(self._sessions):
            waits.append(session.lost)
            session._close()
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def wait_for(self, count: int, timeout: float = 10.0) -> Deferred[list[ReceivedMessage]]:
        """
        :returns: a ``Deferred`` firing with ``messages`` once it holds at
            least ``count`` messages, or failing with
            ``twisted.internet.error.TimeoutError`` after ``timeout`` seconds.
        """
        if len(self.messages) >= count:
            return succeed(self.messages)
        d: Deferred[list[ReceivedMessage]] = Deferred()

        def expire() -> None:
            self._waiters[:] = [w for w in self._waiters if w[1] is not d]
            d.errback(TimeoutError(f"{len(self.messages)} of {count} messages after {timeout}s"))

        self._waiters.append((count, d, self._reactor.callLater(timeout, expire)))
        return d

    def _store(self, message: ReceivedMessage) -> None:
        self.messages.append(message)
        if self.on_message is not None:
            self.on_message(message)
        ready = [w for w in self._waiters if len(self.messages) >= w[0]]
        self._waiters[:] = [w for w in self._waiters if len(self.messages) < w[0]]
        for _, d, call in ready:
            call.cancel()
            d.callback(self.messages)


class _Factory(Factory):
    def __init__(self, server: DownstreamServer) -> None:
        self.server = server

    def buildProtocol(self, addr: Any) -> _Session:
        self.server.connections += 1
        return _Session(self.server, self.server.connections)


# The command line


def _summary(message: ReceivedMessage) -> str:
    subject = ""
    head = message.message.split(b"\r\n\r\n", 1)[0]
    found = re.search(
        rb"^Subject:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.IGNORECASE | re.MULTILINE
    )
    if found:
        subject = re.sub(rb"\r\n[ \t]+", b" ", found.group(1)).decode("utf-8", "replace")
    when = datetime.fromtimestamp(message.received_at, UTC).isoformat(timespec="seconds")
    to = ",".join(f"<{r}>" for r in message.recipients)
    return f"{when} from=<{message.sender}> to={to} size={len(message.message)} subject={subject!r}"


def _save(directory: str, name: str, message: ReceivedMessage) -> str:
    """Deliver into a Maildir (runs in a worker thread): write to tmp/, rename into new/."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    head = f"Return-Path: <{message.sender}>\nX-Envelope-To: {', '.join(message.recipients)}\n"
    tmp = os.path.join(directory, "tmp", name)
    with open(tmp, "wb") as f:
        f.write(head.encode())
        f.write(message.message.replace(b"\r\n", b"\n"))
        f.flush()
        os.fsync(f.fileno())
    final = os.path.join(directory, "new", name)
    os.rename(tmp, final)
    return final


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailhub sink",
        description="A test SMTP server that accepts mail and prints one line per message.",
    )
    p.add_argument(
        "--listen", default="tcp:2500:interface=127.0.0.1", help="a Twisted server endpoint string"
    )
    p.add_argument("--maildir", help="also save each message in this Maildir")
    p.add_argument("--mode", default="accept", choices=sorted(MODES - {"down"}))
    p.add_argument("--user", action="append", help="accept only these recipients (repeatable)")
    p.add_argument("--hostname", default="downstream.test")
    p.add_argument(
        "--max-connections",
        type=int,
        help="like Exchange's back pressure: 452 4.3.1 at MAIL on connections above this many",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the server until interrupted.

    :param argv: the arguments (without the program name); ``sys.argv`` if ``None``.
    :returns: the exit status.
    """
    args = _parser().parse_args(argv)
    from twisted.internet import reactor

    r: Any = reactor
    server = DownstreamServer(r, hostname=args.hostname)
    server.mode = args.mode
    if args.user:
        server.known_users = set(args.user)
    if args.max_connections:
        server.max_concurrent_connections = args.max_connections
    status = [0]
    saved = [0]

    def received(message: ReceivedMessage) -> None:
        line = _summary(message)
        if args.maildir:
            saved[0] += 1
            name = f"{int(message.received_at)}.M{saved[0]}P{os.getpid()}.{args.hostname}"
            d = deferToThreadPool(r, r.getThreadPool(), _save, args.maildir, name, message)
            d.addCallbacks(
                lambda path: print(f"{line} saved={path}", flush=True),
                lambda f: print(
                    f"{line} NOT SAVED: {f.getErrorMessage()}", file=sys.stderr, flush=True
                ),
            )
        else:
            print(line, flush=True)

    server.on_message = received

    def listening(port: int) -> None:
        print(f"listening on {args.listen} (mode {server.mode}); Ctrl-C to stop", flush=True)

    def failed(f: Failure) -> None:
        print(f"cannot listen on {args.listen}: {f.getErrorMessage()}", file=sys.stderr, flush=True)
        status[0] = 1
        r.stop()

    def begin() -> None:
        try:
            endpoint = serverFromString(r, args.listen)
        except ValueError as e:
            failed(Failure(e))
            return
        server.listen(endpoint).addCallbacks(listening, failed)

    r.callWhenRunning(begin)
    r.run()
    return status[0]


if __name__ == "__main__":
    sys.exit(main())

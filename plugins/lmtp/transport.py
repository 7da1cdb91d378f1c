"""
The ``lmtp`` transport: delivers entries to a mailbox server over LMTP (RFC
2033), as Dovecot and Cyrus take mail from an MTA in front of them.

Route targets::

    route = "lmtp:mail.example.com:24"     # host and port
    route = "lmtp:mail.example.com"        # port 24
    route = "lmtp:[2001:db8::25]:24"       # an IPv6 literal
    route = "lmtp:unix:/run/dovecot/lmtp"  # a unix socket (an absolute path)

Options (the domain's table, and ``hostname`` from ``[hub]``): ``hostname``
(our LHLO name), ``connect_timeout`` (30 s), ``command_timeout`` (300 s, per
reply) and ``data_timeout`` (600 s, for each recipient's reply after the end
of data).

Each delivery is one LMTP transaction on a connection of its own: LHLO,
MAIL (with ``BODY=8BITMIME``, ``SIZE=`` and ``SMTPUTF8`` as for SMTP), one
RCPT per pending recipient, DATA if a recipient was accepted (with
PIPELINING, MAIL, every RCPT and DATA go in one write), then QUIT.  After
the end of data an LMTP server answers once for each accepted recipient, in
RCPT order: each recipient's result is that reply (a full mailbox is a
``452`` for that recipient only), or its RCPT reply if it was refused.
Connections are not kept between deliveries: a mailbox server on the
organisation's own network accepts a connection at once.  LMTP has no
STARTTLS here: use it over a unix socket or a network you trust.

Nothing here ever errbacks to the caller: a refused connection (or a
missing socket), a timeout, a dropped connection all become a ``4xx``
``Reply`` for the recipients they concern.  The protocol, reply parsing and
dot-stuffing are the core's (``mailhub.smtp.client``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from attrs import define, frozen
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from mailhub.interfaces import ITransport, ITransportPlugin
from mailhub.model import Address, Entry, Reply
from mailhub.smtp import client
from mailhub.smtp.client import SMTPClientProtocol, mail_command, split_rcpt_replies, wire_data

__all__ = ["DEFAULT_PORT", "LMTPTransport", "LMTPTransportPlugin", "parse_target", "plugin"]

DEFAULT_PORT = 24
"""The port of a target that names none (RFC 2033 asks for no well-known port; 24 is usual)."""

#: The longest path of a unix socket (``sun_path`` less its NUL).
_MAX_SOCKET_PATH = 107

Destination = tuple[str, int] | str
"""A host and port, or the path of a unix socket."""


def parse_target(target: str) -> Destination:
    """
    A route's target: ``"unix:/path"`` (the path of a unix socket), else a
    host and port as ``mailhub.smtp.client.parse_target`` reads it
    (``"host:port"``, ``"host"``: port 24, ``"[v6]:port"``).

    :raises ValueError: ``"target: ..."``, saying what is wrong.
    """
    if target.startswith("unix:"):
        path = target.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"target: {target!r}: a unix socket is 'unix:/absolute/path'")
        if len(path.encode()) > _MAX_SOCKET_PATH or "\0" in path:
            raise ValueError(f"target: {target!r}: not a usable unix socket path")
        return path
    return client.parse_target(target, DEFAULT_PORT)


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


@implementer(ITransport)
@define(eq=False)
class LMTPTransport:
    """
    An ``ITransport`` for one route, over LMTP; see the module docstring.

    :param reactor: ``IReactorTime``, and ``IReactorTCP`` or
        ``IReactorUNIX`` (if ``endpoint`` is not given).
    :param hostname: our LHLO name.
    :param destination: ``(host, port)``, or the path of a unix socket.
    :param endpoint: makes the endpoint to connect to (tests inject theirs).
    """

    _reactor: Any
    _hostname: str
    _destination: Destination
    _connect_timeout: float = 30.0
    _command_timeout: float = 300.0
    _data_timeout: float = 600.0
    _endpoint: Callable[[], IStreamClientEndpoint] | None = None
    _log: ClassVar[Logger] = Logger()

    # ITransport

    def deliver(self, entry: Entry, message: bytes) -> Deferred[dict[Address, Reply]]:
        return Deferred.fromCoroutine(self._deliver(entry, message))

    def close(self) -> Deferred[None]:
        """Nothing to close: no connection outlives its delivery."""
        return succeed(None)

    # delivery

    @property
    def _peer(self) -> str:
        if isinstance(self._destination, str):
            return f"unix:{self._destination}"
        return client.peer_name(*self._destination)

    def _make_endpoint(self) -> IStreamClientEndpoint:
        if self._endpoint is not None:
            return self._endpoint()
        if isinstance(self._destination, str):
            return UNIXClientEndpoint(self._reactor, self._destination, timeout=self._connect_timeout)
        host, port = self._destination
        return client.client_endpoint(self._reactor, host, port, self._connect_timeout)

    async def _deliver(self, entry: Entry, message: bytes) -> dict[Address, Reply]:
        recipients = entry.pending
        if not recipients:
            return {}
        try:
            return await self._deliver_entry(entry, recipients, message)
        except CancelledError:
            raise
        except Exception as e:
            # A bug here must not become an errback: the contract is a reply per recipient.
            self._log.failure("lmtp delivery of entry {entry} failed", entry=entry.id)
            return dict.fromkeys(recipients, Reply(451, "4.3.0", f"transport error: {_describe(e)}"))

    async def _deliver_entry(
        self, entry: Entry, recipients: Sequence[Address], message: bytes
    ) -> dict[Address, Reply]:
        peer = self._peer
        host = self._destination if isinstance(self._destination, str) else self._destination[0]
        try:
            protocol = await client.connect(
                self._reactor, self._make_endpoint(), peer, self._connect_timeout,
                self._command_timeout, lmtp=True,
            )  # fmt: skip
        except Exception as e:
            failed = client.connect_error_reply(e, host, peer, self._connect_timeout)
            if failed is None:
                raise
            return dict.fromkeys(recipients, failed)
        try:
            results, unused_data = await self._transaction(protocol, entry, recipients, message)
        except BaseException:
            # Cancelled (or a bug): the session is in an unknown state.
            protocol.abort()
            raise
        if unused_data:
            # The server waits for a message we are not sending: out of step.
            protocol.abort()
        else:
            protocol.quit()
        return results

    async def _transaction(
        self, p: SMTPClientProtocol, entry: Entry, recipients: Sequence[Address], message: bytes
    ) -> tuple[dict[Address, Reply], bool]:
        """
        Greet, then one transaction.

        :returns: the reply for each recipient, and whether DATA was
            answered ``354`` without a message following it.
        """
        timeout = self._command_timeout
        banner = await p.banner
        if not banner.ok:
            return dict.fromkeys(recipients, banner), False
        hello = await p.hello(self._hostname, timeout)
        if not hello.ok:
            return dict.fromkeys(recipients, hello), False
        payload = wire_data(message)
        mail = mail_command(entry.sender, recipients, payload, message, entry.smtputf8, p.extensions)
        if isinstance(mail, Reply):
            return dict.fromkeys(recipients, mail), False
        rcpts = [b"RCPT TO:<" + str(a).encode() + b">" for a in recipients]
        data_reply: Reply | None = None
        if "PIPELINING" in p.extensions:
            pending = p.send([mail, *rcpts, b"DATA"], timeout)
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
        unused = data_reply is not None and data_reply.code == 354
        if not mail_reply.ok:
            return dict.fromkeys(recipients, mail_reply), unused
        accepted, results, fatal = split_rcpt_replies(recipients, rcpt_replies)
        if fatal is None and accepted:
            if data_reply is None:
                data_reply = await p.command(b"DATA", timeout)
            if data_reply.code == 354:
                unused = False
                # RFC 2033 4.2: one reply per accepted RCPT, in RCPT order.
                replies = p.data_replies(payload, len(accepted), self._data_timeout)
                for address, d in zip(accepted, replies, strict=True):
                    results[address] = await d
            else:
                results.update(dict.fromkeys(accepted, data_reply))
        for address in recipients:
            results.setdefault(address, fatal or Reply(421, "4.4.2", f"no reply from {p.peer}"))
        return results, unused


@implementer(ITransportPlugin)
@frozen
class LMTPTransportPlugin:
    """Makes an ``LMTPTransport`` for a route ``lmtp:TARGET``."""

    name: str = "lmtp"
    #: The keys of a route's ``[domains."..."]`` table that are the transport's (``mailhub.plugin``).
    config_keys: frozenset[str] = frozenset({"connect_timeout", "command_timeout", "data_timeout"})

    def check_config(self, config: Mapping[str, Any]) -> None:
        """
        Check the route's target and options as ``make`` does (making a
        transport opens nothing).

        :raises ValueError: naming the key at fault (``target``: the route's target).
        """
        target = config.get("target")
        if isinstance(target, str):
            parse_target(target)  # first: the route's own error before the hub's name
        self.make(config, None)

    def make(self, config: Mapping[str, Any], reactor: Any) -> LMTPTransport:
        """
        :param config: ``target``, ``hostname`` and the optional keys of the
            module docstring.
        :param reactor: an ``IReactorTime`` and ``IReactorTCP``/``IReactorUNIX``.
        :raises ValueError: naming the key at fault.
        """
        target = config.get("target")
        if not isinstance(target, str) or not target:
            raise ValueError("target: the route's target is missing")
        destination = parse_target(target)
        hostname = config.get("hostname")
        if not isinstance(hostname, str) or not hostname or any(c.isspace() for c in hostname):
            raise ValueError(f"hostname: must be our host name, not {hostname!r}")

        def number(key: str, default: float) -> float:
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{key}: must be a number greater than 0, not {value!r}")
            return float(value)

        return LMTPTransport(
            reactor,
            hostname,
            destination,
            connect_timeout=number("connect_timeout", 30),
            command_timeout=number("command_timeout", 300),
            data_timeout=number("data_timeout", 600),
        )


plugin = LMTPTransportPlugin()

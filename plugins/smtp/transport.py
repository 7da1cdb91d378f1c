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

The SMTP client protocol, reply parsing, dot-stuffing and target parsing
are the core's (``mailhub.smtp.client``, public for transport authors);
the connection pool is ``pool``'s and STARTTLS is ``tls``'s; this module
is the delivery logic, MX lookups and the plugin.  No blocking call is
made: DNS goes through ``twisted.names``, time comes from the injected
reactor.

The transport also verifies recipients (``IRecipientProbe``, for
``verify = "route"``): ``probe`` opens a connection of its own (EHLO and
STARTTLS as for a delivery), says ``MAIL FROM:<>`` and ``RCPT``, then
``RSET`` and ``QUIT``, and never sends DATA.  Probes take no slot of the
pool, and with ``smtp:mx`` there is nothing to probe (the domain's MX is
the hub itself): ``make`` refuses ``verify = "route"`` there.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from mailhub.interfaces import IPooledTransport, IRecipientProbe, ITransport, ITransportPlugin
from mailhub.model import ROUTE_MAX_CONNECTIONS, Address, Entry, Reply, is_back_pressure
from mailhub.smtp import client
from mailhub.smtp.client import SMTPClientProtocol, mail_command, split_rcpt_replies, wire_data

from .pool import Connection, ConnectionPool, Key
from .tls import StartTLS, TLSFailed, tls_config

__all__ = ["SMTPTransport", "SMTPTransportPlugin", "parse_target", "plugin"]


class _Discard(Exception):
    """The reused connection is no good: discard it and retry on a new one."""


Endpoints = Callable[[str, int], IStreamClientEndpoint]
"""Gives the endpoint to connect to a host (an address, if names are resolved) and port."""


@implementer(ITransport, IPooledTransport, IRecipientProbe)
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
    _max_connections: int = ROUTE_MAX_CONNECTIONS
    _resolver: Any = None
    _endpoint_for: Endpoints | None = None
    _mx_port: int = 25
    _tls: str = "opportunistic"
    _tls_verify: bool = False
    _tls_ca_file: str | None = None
    _random: Callable[[], float] = random.random
    _pool: ConnectionPool = field(init=False)
    _start_tls: StartTLS = field(init=False)
    connections_made: int = field(init=False, default=0)
    """How many connections were opened in all."""
    _log: ClassVar[Logger] = Logger()

    def __attrs_post_init__(self) -> None:
        self._pool = ConnectionPool(self._reactor, self._max_connections, self._idle_timeout)
        self._start_tls = StartTLS(self._reactor, self._tls, self._tls_verify, self._tls_ca_file)

    # ITransport

    def deliver(self, entry: Entry, message: bytes) -> Deferred[dict[Address, Reply]]:
        return Deferred.fromCoroutine(self._deliver(entry, message))

    def close(self) -> Deferred[None]:
        """Close every idle connection (a busy one closes when its delivery ends)."""
        return self._pool.close()

    # IPooledTransport

    def limit_connections(self, count: int) -> None:
        """
        Keep at most ``count`` connections open (this node's share of the
        route): idle ones above it are closed now with QUIT, busy ones as
        their deliveries end.
        """
        self._pool.limit(count)

    # IRecipientProbe

    def probe(self, recipient: Address) -> Deferred[Reply]:
        """
        Ask the route's server whether ``recipient`` exists, over a new
        connection of the probe's own (greeted, with STARTTLS as ``tls``
        says, outside the pool's slots): ``MAIL FROM:<>`` and ``RCPT``;
        ``RSET`` and ``QUIT`` follow once the answer is given.
        """
        return Deferred.fromCoroutine(self._probe(recipient))

    async def _probe(self, recipient: Address) -> Reply:
        try:
            if self._destination is None:
                return Reply(451, "4.3.5", "a route smtp:mx cannot verify recipients")
            got = await self._open_session(self._destination)
            if isinstance(got, Reply):
                # A refusal before RCPT says nothing of the recipient.
                return got if got.temporary else Reply(451, "4.3.0", f"cannot verify recipients: {got}")
            try:
                reply = await client.probe_rcpt(got, recipient, self._command_timeout)
            except BaseException:
                got.abort()
                raise
            got.command(b"RSET", self._command_timeout).addCallback(lambda _: got.quit())
            return reply
        except CancelledError:
            raise
        except Exception as e:
            self._log.failure("smtp probe of {recipient} failed", recipient=str(recipient))
            return Reply(451, "4.3.0", f"transport error: {_describe(e)}")

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
                conn = await self._pool.acquire(key, fresh_only)
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
        conn: Connection,
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
            self._pool.drop(conn)
            raise

    async def _transaction_steps(
        self,
        conn: Connection,
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
        mail = mail_command(sender, recipients, payload, message, smtputf8, p.extensions)
        # RSET checks that a kept connection still works.  With PIPELINING it
        # leads the transaction's group (RFC 2920 allows it anywhere in one)
        # instead of costing a round trip of its own; if it fails, the
        # connection is dropped unanswered, which abandons whatever the
        # server made of the rest of the group.
        rset_in_group = reused and pipelining and not isinstance(mail, Reply)
        if reused and not rset_in_group:
            if not (await p.command(b"RSET", timeout)).ok:
                self._pool.drop(conn)
                raise _Discard()
        conn.deliveries += 1
        if isinstance(mail, Reply):
            self._pool.release(conn)
            return dict.fromkeys(recipients, mail)
        rcpts = [b"RCPT TO:<" + str(a).encode() + b">" for a in recipients]
        data_reply: Reply | None = None
        if pipelining:
            pending = p.send([b"RSET"] * rset_in_group + [mail, *rcpts, b"DATA"], timeout)
            if rset_in_group and not (await pending.pop(0)).ok:
                self._pool.drop(conn, abort=True)
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
                self._pool.drop(conn)
                raise _Discard()
            if is_back_pressure(mail_reply):
                self._leave(conn, data_reply)
            else:
                self._settle(conn, data_reply)
            return dict.fromkeys(recipients, mail_reply)
        accepted, results, fatal = split_rcpt_replies(recipients, rcpt_replies)
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
            self._pool.drop(conn)
            for address in recipients:
                results.setdefault(address, fatal)
            return results
        if any(is_back_pressure(r) for r in results.values()):
            self._leave(conn, data_reply)
        else:
            self._settle(conn, data_reply)
        return results

    def _leave(self, conn: Connection, unused_data_reply: Reply | None) -> None:
        """
        End a transaction the server pushed back on (``452 4.3.1``): it has
        too many of us, so the connection goes (with QUIT) instead of
        waiting idle for the next delivery.
        """
        if unused_data_reply is not None and unused_data_reply.code == 354:
            self._pool.drop(conn, abort=True)
        else:
            self._pool.drop(conn, quit=True)

    def _settle(self, conn: Connection, unused_data_reply: Reply | None) -> None:
        """End a transaction: keep the connection unless DATA was answered 354 and not used."""
        if unused_data_reply is not None and unused_data_reply.code == 354:
            # The server wants a message we are not sending: out of step.
            self._pool.drop(conn, abort=True)
        else:
            self._pool.release(conn)

    # connections

    async def _connect(self, key: Key) -> Connection | Reply:
        """
        Open a new connection (``_open_session``), for which a slot is reserved; if
        that fails, the reply says why and the slot is free again.
        """
        ready = False
        try:
            got = await self._open_session(key)
            if isinstance(got, Reply):
                return got
            conn = self._pool.adopt(got, key)
            ready = True
            return conn
        finally:
            if not ready:
                self._pool.free_slot()

    async def _open_session(self, key: Key) -> SMTPClientProtocol | Reply:
        """
        Open, greet, EHLO and (as ``tls`` says) STARTTLS a new connection, or
        say why there is none.

        When the TLS handshake fails and TLS is only opportunistic (and
        certificates are not verified), the message goes over a new
        connection without TLS, and the log says so: a broken TLS setup on
        the organisation's own server must not stop its mail.
        """
        got = await self._session(key, starttls=self._tls != "none")
        if isinstance(got, TLSFailed):
            if self._tls == "required" or self._tls_verify:
                return Reply(421, "4.7.5", f"TLS with {got.peer} failed: {got.why}")
            self._log.warn(
                "STARTTLS with {peer} failed ({why}): delivering over a new connection "
                "without TLS, as tls = \"opportunistic\" allows",
                peer=got.peer,
                why=got.why,
            )
            got = await self._session(key, starttls=False)
            assert not isinstance(got, TLSFailed)
        return got

    async def _session(self, key: Key, starttls: bool) -> SMTPClientProtocol | Reply | TLSFailed:
        """
        A connection to ``key`` ready for MAIL, or why there is none; closes
        what it opened unless it returns the connection.

        :param starttls: use STARTTLS if the server offers it (and insist on
            it if ``tls`` is ``"required"``).
        """
        host, port = key
        peer = client.peer_name(host, port)
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
                else client.client_endpoint(self._reactor, address, port, self._connect_timeout)
            )
            protocol = await client.connect(
                self._reactor, endpoint, peer, self._connect_timeout, self._command_timeout
            )
            self.connections_made += 1
            banner = await protocol.banner
            if not banner.ok:
                return banner
            reply = await protocol.hello(self._hostname, self._command_timeout)
            if not reply.ok:
                return reply
            if starttls:
                refused = await self._start_tls.upgrade(
                    protocol, host, peer, self._hostname, self._command_timeout
                )
                if refused is not None:
                    return refused
            ready = True
            return protocol
        except Exception as e:
            failed = client.connect_error_reply(e, host, peer, self._connect_timeout)
            if failed is None:
                raise
            return failed
        finally:
            if not ready and protocol is not None:
                protocol.quit()


def _is_address(host: str) -> bool:
    from twisted.internet.abstract import isIPAddress, isIPv6Address

    return isIPAddress(host) or isIPv6Address(host)


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def parse_target(target: str) -> Key | None:
    """
    A route's target: ``"mx"`` (``None``: each recipient domain's MX hosts),
    or as ``mailhub.smtp.client.parse_target`` reads it (``"host:port"``,
    ``"host"``, port 25, ``"[v6]:port"``).

    :raises ValueError: naming ``target``.
    """
    return None if target == "mx" else client.parse_target(target)


@implementer(ITransportPlugin)
@frozen
class SMTPTransportPlugin:
    """Makes an ``SMTPTransport`` for a route ``smtp:TARGET``."""

    name: str = "smtp"
    #: Its transports provide ``IRecipientProbe`` (``verify = "route"``).
    recipient_probe: bool = True
    #: The keys of a route's ``[domains."..."]`` table that are the transport's (``mailhub.plugin``).
    config_keys: frozenset[str] = frozenset({
        "connect_timeout", "command_timeout", "data_timeout", "idle_timeout", "tls", "tls_verify", "tls_ca_file",
    })

    def check_config(self, config: Mapping[str, Any]) -> None:
        """
        Check the route's target and options as ``make`` does: making a
        transport opens nothing, so this makes one and drops it.

        :raises ValueError: naming the key at fault (``target``: the route's target).
        """
        target = config.get("target")
        if isinstance(target, str):
            parse_target(target)  # first: the route's own error before the hub's name
        self.make(config, None)

    def make(self, config: Mapping[str, Any], reactor: Any) -> SMTPTransport:
        """
        :param config: ``target``, ``hostname`` and the optional keys of the
            module docstring (``mx_port`` too, for tests); ``verify``, the
            domain's, to refuse ``"route"`` with ``smtp:mx``.
        :param reactor: an ``IReactorTime`` and ``IReactorTCP``.
        :raises ValueError: naming the key at fault.
        """
        target = config.get("target")
        if not isinstance(target, str) or not target:
            raise ValueError("target: the route's target is missing")
        hostname = config.get("hostname")
        if not isinstance(hostname, str) or not hostname or any(c.isspace() for c in hostname):
            raise ValueError(f"hostname: must be our host name, not {hostname!r}")
        destination = parse_target(target)
        if destination is None and config.get("verify") == "route":
            # The MX of one of the hub's domains is the hub itself.
            raise ValueError("verify: 'route' needs a route to the domain's server, 'smtp:host:port', not smtp:mx")

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
            destination,
            connect_timeout=number("connect_timeout", 30),
            command_timeout=number("command_timeout", 300),
            data_timeout=number("data_timeout", 600),
            idle_timeout=number("idle_timeout", 30),
            max_connections=count("max_connections", ROUTE_MAX_CONNECTIONS),
            mx_port=count("mx_port", 25),
            **tls_config(config),
        )


plugin = SMTPTransportPlugin()

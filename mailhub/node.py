"""
One node of the hub ("dallas", "losangeles"): its SMTP listener, its delivery
engine and (when configured) its web listener, over the hub's shared spool.

The node wires objects together and owns no policy of its own: what to accept
is the SMTP server's business, when to retry the policy's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.server import Site

from mailhub import __version__
from mailhub.archive.accounts import LoginThrottle
from mailhub.archive.route import ARCHIVE_ROUTE, ArchiveTransport, is_archive_route
from mailhub.config import HubConfig
from mailhub.delivery.dsn import build_dsn
from mailhub.delivery.engine import DeliveryEngine
from mailhub.interfaces import IDeliveryPolicy, INodeRegistry, ISpoolStore, ITransport
from mailhub.model import Address, Entry, Envelope, Outcome, Route
from mailhub.plugin import load_plugin
from mailhub.smtp.recipients import recipient_validation
from mailhub.smtp.server import SMTPFactory, chain_checks, domain_check
from mailhub.web.archive_api import ArchiveAPI, read_tokens
from mailhub.web.livearchive import LiveArchive
from mailhub.web.status import StatusResource

__all__ = ["Node", "routes_for"]


def routes_for(
    config: HubConfig, recipients: Iterable[Address], archive: bool = False
) -> dict[str, list[Address]]:
    """
    Group recipients by route: one spool entry per route.  Recipients outside
    the hub's domains (only DSNs have those) take the ``[hub] outbound`` route.

    :param archive: add the archive's route (``mailhub.archive.route``) for
        the recipients in the hub's domains, last.
    """
    routes: dict[str, list[Address]] = {}
    mailboxes: list[Address] = []
    for address in recipients:
        route = config.route_for(address.domain)
        if route is not None:
            mailboxes.append(address)
        routes.setdefault(route or config.outbound, []).append(address)
    if archive and mailboxes:
        routes[ARCHIVE_ROUTE] = mailboxes
    return routes


class Node(MultiService):
    log = Logger()

    def __init__(
        self,
        name: str,
        config: HubConfig,
        store: ISpoolStore,
        policy: IDeliveryPolicy,
        reactor: Any,
        tls: Any = None,
        archive: Any = None,
        web_auth: Any = None,
    ) -> None:
        super().__init__()
        self.setName(name)
        self.config = config
        self._store = store
        self._reactor = reactor
        #: The hub's ``IArchive`` (``None``: no archive configured).
        self.archive = archive
        self._transports: dict[str, ITransport] = {}
        self.engine = DeliveryEngine(
            name,
            store,
            policy,
            self.transport_for,
            self.pacing_for,
            self.bounce,
            reactor,
            config.delivery,
        )
        self.engine.setServiceParent(self)
        node_config = config.nodes[name]
        self.smtp_factory = SMTPFactory(
            config.hostname,
            config.smtp,
            # The relay rule first: recipient validation only sees our domains.
            chain_checks(domain_check(config.domains, config.hostname), recipient_validation(config, reactor)),
            self.receive,
            reactor,
            tls=tls,
        )
        listener = StreamServerEndpointService(serverFromString(reactor, node_config.smtp), self.smtp_factory)
        # A port we cannot bind must stop twistd with the error, not leave a
        # node running that accepts nothing.
        listener._raiseSynchronously = True
        listener.setName("smtp")
        listener.setServiceParent(self)
        if node_config.web:
            api = None
            if archive is not None and config.web.get("api_tokens_file"):
                try:
                    tokens = read_tokens(config.web["api_tokens_file"])
                except (OSError, ValueError) as e:
                    raise ValueError(f"{config.path}: web.api_tokens_file: {e}") from None
                api = ArchiveAPI(archive, tokens, reactor)
            secure = node_config.web.startswith("ssl:")
            live = None
            if web_auth is not None:
                live = LiveArchive(self, archive, web_auth, LoginThrottle(reactor), reactor, tls=secure)
            web = StreamServerEndpointService(
                _web_endpoint(reactor, node_config.web, tls), Site(StatusResource(self, store, api, live))
            )
            web._raiseSynchronously = True
            web.setName("web")
            web.setServiceParent(self)
        if INodeRegistry.providedBy(store):
            # At start, then every heartbeat_seconds; a failed heartbeat is
            # logged and the next one comes on time (a LoopingCall stops at
            # the first failure it sees, so none reaches it).
            heartbeat = TimerService(config.delivery.heartbeat_seconds, self.heartbeat)
            heartbeat.clock = reactor
            heartbeat.setName("heartbeat")
            heartbeat.setServiceParent(self)
        self._host = socket.gethostname()
        self._heartbeat_failing = False
        #: The signal that wakes this node's engine, if its process handles
        #: one (``mailhub.service.install_wake_signal``); heartbeats tell.
        self.wake_signal: int | None = None

    @property
    def store(self) -> ISpoolStore:
        """The hub's spool store, which this node shares."""
        return self._store

    def receive(self, envelope: Envelope, message: bytes) -> Deferred[str]:
        """
        Spool an accepted message (one entry per route) and try it at once
        (``DeliveryEngine.accept``).

        :returns: a Deferred firing with the first entry id once the spool has
            the message durably; it fails if the store could not take it.
        """
        routes = routes_for(self.config, envelope.recipients, archive=self.archive is not None)
        return self.engine.accept(envelope, message, routes)

    def heartbeat(self) -> Deferred[None]:
        """
        Tell the store's ``INodeRegistry`` that this node is alive.

        :returns: a Deferred that fires when done and never fails.
        """
        info = {
            "host": self._host,
            "pid": os.getpid(),
            "version": __version__,
            "in_flight": self.engine.in_flight,
            "attempts": self.engine.attempts_made,
        }
        if self.wake_signal is not None:
            info["wake_signal"] = self.wake_signal
        d: Deferred[None] = INodeRegistry(self._store).heartbeat(self.name, self._reactor.seconds(), info)

        def sent(_: object) -> None:
            if self._heartbeat_failing:
                self.log.info("heartbeat recorded again")
            self._heartbeat_failing = False

        def failed(f: Any) -> None:
            # Once per outage: the store's own errors say what is wrong.
            if not self._heartbeat_failing:
                self.log.warn("heartbeat not recorded: {why}", why=f.getErrorMessage())
            self._heartbeat_failing = True

        return d.addCallbacks(sent, failed)

    def bounce(self, entry: Entry, outcomes: Sequence[Outcome], message: bytes, now: float) -> Deferred[Any]:
        if is_archive_route(entry.route):
            # The hub's own copy is nobody else's business: no DSN, but an operator must know.
            self.log.error(
                "entry {entry}: message {message} could not be archived for {mailboxes} ({why}); given up",
                entry=entry.id,
                message=entry.message_id,
                mailboxes=", ".join(str(o.recipient) for o in outcomes),
                why=str(outcomes[0].reply) if outcomes else "",
            )
            return succeed(None)
        dsn = build_dsn(self.config.hostname, entry, outcomes, message, now)
        if dsn is None:
            self.log.info("entry {entry}: failed recipients but null sender; no DSN", entry=entry.id)
            return succeed(None)
        return self.receive(*dsn)

    def transport_for(self, route: str) -> ITransport:
        transport = self._transports.get(route)
        if transport is None and is_archive_route(route) and self.archive is not None:
            transport = self._transports[route] = ArchiveTransport(self.archive, self._reactor)
        if transport is None:
            parsed = Route.parse(route)
            factory = load_plugin("mailhub.transports", parsed.transport)
            options = {**self.config.route_options(route), "target": parsed.target, "hostname": self.config.hostname}
            transport = self._transports[route] = factory.make(options, self._reactor)
        return transport

    def pacing_for(self, route: str) -> tuple[int, float, float | None]:
        """A route's ``(max_connections, backpressure_pause, max_rate)``, for the whole hub."""
        if is_archive_route(route):
            return int((self.config.archive or {}).get("max_connections", 10)), 30.0, None
        options = self.config.route_options(route)
        rate = options.get("max_rate")
        return (
            int(options.get("max_connections", 10)),
            float(options.get("backpressure_pause", 30.0)),
            float(rate) if rate else None,
        )

    def stopService(self) -> Deferred[Any]:
        d = ensureDeferred(self._stop())
        return d

    async def _stop(self) -> None:
        await super().stopService()
        await DeferredList([t.close() for t in self._transports.values()], consumeErrors=True)


def _web_endpoint(reactor: Any, description: str, tls: Any) -> Any:
    """
    A node's web endpoint.  ``ssl:PORT[:interface=...]`` without a
    ``privateKey`` uses the node's own certificate (the one STARTTLS uses);
    any other Twisted endpoint string is taken as it is.
    """
    if description.startswith("ssl:") and "privatekey=" not in description.lower() and tls is not None:
        from twisted.internet.endpoints import SSL4ServerEndpoint

        parts = description.split(":")[1:]
        port = int(parts[0])
        options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        return SSL4ServerEndpoint(reactor, port, tls, interface=options.get("interface", ""))
    return serverFromString(reactor, description)

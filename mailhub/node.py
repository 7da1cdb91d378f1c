"""
One node of the hub ("dallas", "losangeles"): its SMTP listener, its delivery
engine and (when configured) its web listener, over the hub's shared spool.

The node wires objects together and owns no policy of its own: what to accept
is the SMTP server's business, when to retry the policy's.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from mailhub import __version__
from mailhub.archive.accounts import LoginThrottle
from mailhub.archive.delivered import DeliveryRecorder
from mailhub.archive.route import (
    ARCHIVE_ROUTE,
    ArchiveGate,
    ArchiveTransport,
    MailMeter,
    is_archive_route,
)
from mailhub.config import HubConfig
from mailhub.delivery.delay import DelayNotices, warn_after_for
from mailhub.delivery.dsn import build_dsn
from mailhub.delivery.engine import DeliveryEngine
from mailhub.drill import Drills
from mailhub.interfaces import (
    IDeliveryPolicy,
    ILeaseReclaim,
    INodeRegistry,
    ISpoolStore,
    ITransport,
)
from mailhub.model import Address, Entry, Envelope, Outcome, Route
from mailhub.plugin import load_plugin
from mailhub.queue_select import QueueControl
from mailhub.smtp.recipients import recipient_validation
from mailhub.smtp.server import SMTPFactory, chain_checks, domain_check
from mailhub.web.accesslog import access_log_line
from mailhub.web.admin_api import AdminAPI
from mailhub.web.archive_api import ArchiveAPI, read_token_roles
from mailhub.web.livearchive import LiveArchive
from mailhub.web.metrics import metrics_resource
from mailhub.web.status import StatusResource

__all__ = ["Node", "StartupError", "routes_for", "where"]

#: Seconds a stopping node waits for the store to record that it stopped.
STOP_HEARTBEAT_TIMEOUT = 10.0


class StartupError(Exception):
    """
    A node cannot start: ``str()`` is one line naming the node, the
    configuration file and key, and what is wrong.

    :ivar node: the node's name.
    :ivar key: the configuration key at fault (``nodes.dallas.smtp``).
    """

    def __init__(self, node: str, path: str, key: str, message: str) -> None:
        self.node = node
        self.key = key
        super().__init__(f"node {node}: {path}: {key}: {message}")


class _Listener(StreamServerEndpointService):
    """
    A node's SMTP or web listener.  A port it cannot bind stops the start
    with a ``StartupError`` (twistd: at once, with the error), rather than
    leaving a node running that accepts nothing.
    """

    def __init__(self, config: HubConfig, node: str, kind: str, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.setName(kind)
        self._config = config
        self._node = node
        self._kind = kind

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            description = getattr(self._config.nodes[self._node], self._kind)
            why = e.socketError.strerror if isinstance(e.socketError, OSError) else str(e.socketError)
            raise StartupError(
                self._node, self._config.path, f"nodes.{self._node}.{self._kind}", f"cannot listen on {description}: {why}"
            ) from None


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
        archive_writer: Any = None,
        archive_gate: ArchiveGate | None = None,
    ) -> None:
        super().__init__()
        self.setName(name)
        self.config = config
        self._store = store
        self._reactor = reactor
        #: The hub's ``IArchive`` (``None``: no archive configured).
        self.archive = archive
        #: Where the archive route's adds go (``mailhub.archive.worker``), or ``None``: ``archive``.
        self._archive_writer = archive_writer
        #: Where the archive yields to the front door under a burst (one for
        #: every node of a process, ``HubService`` gives it), or ``None``.
        if archive_gate is None and archive is not None:
            archive_gate = ArchiveGate(MailMeter(reactor), reactor, *config.archive_yield(), store=store)
        self.archive_gate = archive_gate
        self._transports: dict[str, ITransport] = {}
        #: What this node delivered, for ``redeliver --skip-delivered`` (with an archive).
        self.delivered = (
            None if archive is None else DeliveryRecorder(archive, config, reactor, gate=archive_gate)
        )
        #: This node's drills (``mailhub.drill``): run, scheduled, and their last results.
        self.drills = Drills(self, reactor)
        self.engine = DeliveryEngine(
            name,
            store,
            policy,
            self.transport_for,
            self.pacing_for,
            self.bounce,
            reactor,
            config.delivery,
            delivered=self._note_delivered,
            # self.config at each call: a reload's warn_after applies at once.
            delay_notices=DelayNotices(
                config.hostname,
                lambda domain: warn_after_for(self.config, domain),
                getattr(policy, "lifetime", None),
                self.receive,
            ),
            later=None if archive_gate is None else archive_gate.later,
        )
        self.engine.setServiceParent(self)
        if archive_gate is not None:
            archive_gate.on_resume(self._archive_resumed)
        node_config = config.nodes[name]
        self._recipient_check = _recipient_check(config, reactor)
        self.smtp_factory = SMTPFactory(
            config.hostname,
            config.smtp,
            self.check_recipient,
            self.receive,
            reactor,
            tls=tls,
        )
        self.smtp_factory.noisy = False  # the start line says where the node listens
        listener = _Listener(config, name, "smtp", serverFromString(reactor, node_config.smtp), self.smtp_factory)
        listener.setServiceParent(self)
        if node_config.web:
            api = None
            roles = None
            if config.web.get("api_tokens_file"):
                try:
                    roles = read_token_roles(config.web["api_tokens_file"])
                except (OSError, ValueError) as e:
                    raise ValueError(f"{config.path}: web.api_tokens_file: {e}") from None
                if archive is not None:
                    api = ArchiveAPI(archive, {t: name for t, (name, _) in roles.items()}, reactor)
            secure = browser_tls(node_config.web, config.web)
            live = None
            if web_auth is not None:
                live = LiveArchive(
                    self, archive, web_auth, LoginThrottle(reactor), reactor, tls=secure,
                    proxies=config.web.get("trusted_proxies", ()),
                )
            root = StatusResource(self, store, None, live)
            if roles is not None:
                # /api: the admin API, which hands /api/archive to the archive's.
                queue = QueueControl(store, lambda: self.config, reactor, self.receive, self.engine.wake)
                root.putChild(b"api", AdminAPI(queue, roles, api, reload=self.reload_hub, drills=self.drills))
            root.putChild(b"metrics", metrics_resource(self, config, reactor))
            site = Site(root, logFormatter=access_log_line)
            site.noisy = False
            web = _Listener(config, name, "web", _web_endpoint(reactor, node_config.web, tls), site)
            web.setServiceParent(self)
        if config.drills.every:
            # After the listeners: the first round runs at start, through them.
            drills = TimerService(config.drills.every, self.drills.run_scheduled)
            drills.clock = reactor
            drills.setName("drills")
            drills.setServiceParent(self)
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
        #: This start of the node (``ILeaseReclaim``), unique to the process
        #: and the start: made by each ``startService``, ``""`` when stopped.
        self.incarnation = ""
        self._reclaim_retry: Any = None
        #: The signal that wakes this node's engine, if its process handles
        #: one (``mailhub.service.install_wake_signal``); heartbeats tell.
        self.wake_signal: int | None = None

    def check_recipient(self, address: Address) -> Deferred[Any]:
        """The relay rule and the domains' recipient validation (``RecipientCheck``), as configured now."""
        return self._recipient_check(address)

    def reconfigure(self, config: HubConfig) -> list[str]:
        """
        Serve ``config`` from now on (``HubService.reload``): its domains,
        routes, their limits and pacing, recipient lists and the ``[smtp]``
        limits.  The caller keeps what needs a restart (endpoints, store,
        archive, node names, ...) as it was in ``config``.

        :raises mailhub.config.ConfigError: when a domain's recipient list
            cannot be used; nothing has changed then.
        :returns: the routes whose transport was closed (their options
            changed): the next attempt makes a new one.
        """
        check = _recipient_check(config, self._reactor)
        old, self.config = self.config, config
        self._recipient_check = check
        # New connections get the new limits; the limiter keeps its counts.
        self.smtp_factory.limits = config.smtp
        self.smtp_factory.limiter._limits = config.smtp
        closed = []
        for route, transport in list(self._transports.items()):
            if not is_archive_route(route) and old.route_options(route) != config.route_options(route):
                # Busy connections finish their delivery first (ITransport.close).
                del self._transports[route]
                transport.close().addErrback(
                    lambda f, route: self.log.failure("closing the transport of {route} failed", f, route=route), route
                )
                closed.append(route)
        self.engine.repace()
        return closed

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
        if self.archive_gate is not None:
            self.archive_gate.meter.tick()
        return self.engine.accept(envelope, message, routes)

    def heartbeat(self, stopped: bool = False) -> Deferred[None]:
        """
        Tell the store's ``INodeRegistry`` that this node is alive.

        :param stopped: say instead that the node stopped cleanly (its last
            heartbeat, ``"stopped": true`` in its info): ``mailhub nodes``
            then shows it ``stopped``, not ``DOWN``.
        :returns: a Deferred that fires when done and never fails.
        """
        info = {
            "host": self._host,
            "pid": os.getpid(),
            "version": __version__,
            "in_flight": self.engine.in_flight,
            "attempts": self.engine.attempts_made,
        }
        if stopped:
            info["stopped"] = True
        elif self.wake_signal is not None:
            info["wake_signal"] = self.wake_signal
        if self.incarnation:
            info["incarnation"] = self.incarnation
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

    def _archive_resumed(self) -> None:
        """The archive stopped yielding: its put-off entries are due now (``ArchiveGate``)."""
        if self.engine.running:
            self.engine.wake()

    def _note_delivered(self, entry: Entry, recipients: Sequence[Address], at: float) -> None:
        """The engine's ``delivered`` observer: the drills, then the archive's delivery records."""
        if self.archive_gate is not None and not is_archive_route(entry.route):
            # A draining backlog keeps the archive waiting too: mail first.
            self.archive_gate.meter.tick()
        self.drills.delivered(entry, recipients, at)
        if self.delivered is not None:
            self.delivered(entry, recipients, at)

    def reload_hub(self) -> Deferred[Any] | None:
        """
        ``HubService.reload`` of the hub that runs this node (``POST
        /api/reload``), or ``None`` for a node run outside a ``HubService``.
        """
        reload = getattr(self.parent, "reload", None)
        return None if reload is None else reload()  # type: ignore[no-any-return]

    def bounce(self, entry: Entry, outcomes: Sequence[Outcome], message: bytes, now: float) -> Deferred[Any]:
        self.drills.bounced(entry, outcomes)
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
            transport = self._transports[route] = ArchiveTransport(
                self.archive, self._reactor, writer=self._archive_writer
            )
        if transport is None:
            parsed = Route.parse(route)
            factory = load_plugin("mailhub.transports", parsed.transport)
            options = {**self.config.route_options(route), "target": parsed.target, "hostname": self.config.hostname}
            transport = self._transports[route] = factory.make(options, self._reactor)
        return transport

    def pacing_for(self, route: str) -> tuple[int, float, float | None]:
        """A route's ``(max_connections, backpressure_pause, max_rate)``, for the whole hub."""
        return self.config.pacing(route)

    def startService(self) -> None:
        # First, before the engine and the listener take any lease: every
        # lease this start takes is held under its incarnation, which
        # reclaim never takes back.
        self.incarnation = f"{os.getpid()}-{secrets.token_hex(6)}"
        if ILeaseReclaim.providedBy(self._store):
            self._take_back()
        if self.archive_gate is not None:
            self.archive_gate.start()
        super().startService()
        self.log.info("{line}", line=self.start_line())

    def start_line(self) -> str:
        """
        The line a node logs when it starts: its endpoints (with TLS or
        not), the spool, the archive and the domains it serves.
        """
        from mailhub.smtp.tls import tls_files

        node = self.config.nodes[str(self.name)]
        cert, _, configured = tls_files(self.config)
        certificate = f"certificate {cert}" + ("" if configured else ", self-signed")
        smtp = f"{node.smtp} ({'TLS' if node.smtp.startswith('ssl:') else 'STARTTLS'}, {certificate})"
        if not node.web:
            web = "none"
        elif not node.web.startswith("ssl:"):
            web = f"{node.web} (no TLS)"
        elif "privatekey=" in node.web.lower():
            web = f"{node.web} (TLS)"
        else:
            web = f"{node.web} (TLS, {certificate})"
        return (
            f"node {self.name} started: SMTP {smtp}; web {web};"
            f" spool {where(self.config, 'store')[1]}; archive {where(self.config, 'archive')[1]};"
            f" domains {', '.join(self.config.domains) or 'none'}"
        )

    def _take_back(self) -> None:
        """
        Make due at once, reserved for this node, the entries that its
        earlier incarnations (a process that died: ``kill -9``, a crash, a
        power cut) held under leases that have not expired, instead of
        leaving them to wait up to ``lease_seconds``.  Retried every 5 s
        while the store cannot be reached.
        """
        self._reclaim_retry = None
        incarnation = self.incarnation
        d = ILeaseReclaim(self._store).reclaim(self.name, incarnation, self._reactor.seconds())

        def done(count: int) -> None:
            self.log.info(
                "node {node} started (incarnation {incarnation}): took back {count} entries"
                " leased by its earlier run",
                node=self.name,
                incarnation=incarnation,
                count=count,
            )
            if count:
                self.engine.wake()

        def failed(f: Failure) -> None:
            if incarnation != self.incarnation:
                return  # stopped since
            self.log.warn(
                "node {node}: could not take back its earlier run's leases: {why}; trying again in 5 s",
                node=self.name,
                why=f.getErrorMessage(),
            )
            self._reclaim_retry = self._reactor.callLater(5.0, self._take_back)

        d.addCallbacks(done, failed)

    def stopService(self) -> Deferred[Any]:
        started, self.incarnation = bool(self.incarnation), ""
        if self._reclaim_retry is not None and self._reclaim_retry.active():
            self._reclaim_retry.cancel()
        self._reclaim_retry = None
        if self.archive_gate is not None:
            # The engine waits for its attempts: held archive entries go now.
            self.archive_gate.stop()
        d = ensureDeferred(self._stop(started))
        return d

    async def _stop(self, started: bool = True) -> None:
        await super().stopService()
        if self.delivered is not None:
            await self.delivered.flush()
        await DeferredList([t.close() for t in self._transports.values()], consumeErrors=True)
        if started and INodeRegistry.providedBy(self._store):
            # Last: a clean stop shows as "stopped", not as DOWN once the
            # heartbeats are missed.  Bounded: a store that does not answer
            # must not hold up the stop.
            await self.heartbeat(stopped=True).addTimeout(STOP_HEARTBEAT_TIMEOUT, self._reactor)
        self.log.info("node {node} stopped", node=self.name)


def _recipient_check(config: HubConfig, reactor: Any) -> Any:
    """The relay rule first, then recipient validation: it only sees the hub's domains."""
    return chain_checks(domain_check(config.domains, config.hostname), recipient_validation(config, reactor))


def where(config: HubConfig, table: str) -> tuple[str, str]:
    """
    Where the ``[store]`` or ``[archive]`` plugin keeps its data, for log
    lines and errors, without passwords: ``(key, text)``, the key naming the
    setting (``store.path``, ``store.host``, ...).
    """
    section: Mapping[str, Any] | None = getattr(config, table)
    if not section:
        return table, "none"
    plugin = section.get("plugin", "?")
    path = section.get("path")
    if isinstance(path, str) and path:
        return f"{table}.path", f"{plugin} {os.path.join(config.config_dir, os.path.expanduser(path))}"
    sentinels = section.get("sentinels")
    if sentinels:
        hosts = ", ".join(str(s) if isinstance(s, str) else ":".join(map(str, s)) for s in sentinels)
        return f"{table}.sentinels", f"{plugin} master {section.get('master', '?')} via Sentinels {hosts}"
    for key in ("url", "dsn"):
        value = section.get(key)
        if isinstance(value, str) and value:
            return f"{table}.{key}", f"{plugin} {_without_password(value)}"
    host = section.get("host")
    if host:
        port = section.get("port")
        return f"{table}.host", f"{plugin} {host}" + (f":{port}" if port else "")
    return table, str(plugin)


def _without_password(address: str) -> str:
    """A URL (``redis://:pw@host``) or libpq ``key=value`` string with its password left out."""
    if "://" in address:
        parts = urlsplit(address)
        if parts.password is not None:
            netloc = (parts.username or "") + ":***@" + (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
            address = urlunsplit(parts._replace(netloc=netloc))
        return address
    return re.sub(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "password=***", address)


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


def browser_tls(listener: str, web: Mapping[str, Any]) -> bool:
    """
    Whether browsers reach the LiveArchive over TLS (``Secure`` and
    ``__Host-`` cookies, HSTS): its listener is ``ssl:``, or ``[web]
    public_url`` is ``https://`` (a TLS proxy in front of a ``tcp:`` one).
    """
    return listener.startswith("ssl:") or str(web.get("public_url", "")).startswith("https://")

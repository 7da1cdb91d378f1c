"""
The hub as a Twisted service, for ``twistd mailhub`` and for embedding.

``makeHubService(config)`` returns an ``IService``: add it to an existing
application (see ``examples/embed.tac``) and the hub starts and stops with it.

Under ``twistd mailhub`` the hub also answers ``SIGUSR2`` (``WAKE_SIGNAL``)
by trying its due entries at once, those of routes it saw down included
(``HubService.wake``): ``mailhub queue flush`` and ``release`` send it to the
hub processes on their host, as ``postqueue -f`` wakes Postfix's queue
manager, instead of leaving the change to the next periodic scan.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorProcess

from mailhub.archive.accounts import SessionSigner, load_or_create_secret, secret_file
from mailhub.archive.retention import ArchiveRetention
from mailhub.archive.worker import ArchiveProcess
from mailhub.config import HubConfig
from mailhub.interfaces import WAKE_SIGNAL, IAccountStore
from mailhub.model import Route
from mailhub.node import Node
from mailhub.plugin import load_plugin
from mailhub.smtp.tls import server_tls_options

__all__ = ["WAKE_SIGNAL", "HubService", "install_wake_signal", "makeHubService"]


class HubService(MultiService):
    """
    The nodes of one hub in this process, over one spool store.

    :ivar store: the ``ISpoolStore`` the nodes share.
    :ivar nodes: the ``Node`` services, by name.
    """

    def __init__(self, config: HubConfig, reactor: Any, node_names: list[str]) -> None:
        super().__init__()
        self.config = config
        store_factory = load_plugin("mailhub.stores", config.store["plugin"])
        policy_factory = load_plugin("mailhub.policies", config.policy["plugin"])
        # Fail at start, not at the first delivery, on a route naming a
        # transport that is not installed.
        for route in {d.route for d in config.domains.values()} | {config.outbound}:
            load_plugin("mailhub.transports", Route.parse(route).transport)
        self.policy = policy_factory.make(config.plugin_section("policy"), reactor)
        self.store = store_factory.make(config.plugin_section("store"), reactor)
        #: The hub's ``IArchive``, or ``None`` without an ``[archive]`` table.
        self.archive: Any = None
        #: The archive's worker process (``mailhub.archive.worker``), or ``None``.
        self.archive_writer: ArchiveProcess | None = None
        if config.archive is not None:
            archive_factory = load_plugin("mailhub.archives", config.archive["plugin"])
            try:
                self.archive = archive_factory.make(config.archive_section(), reactor)
            except ValueError as e:
                raise ValueError(f"{config.path}: {e}") from None
            processes = int(config.archive.get("processes", 1))
            if processes and getattr(archive_factory, "shareable", False) and IReactorProcess.providedBy(reactor):
                self.archive_writer = ArchiveProcess(
                    config.archive["plugin"], config.archive_section(), reactor,
                    nice=int(config.archive.get("nice", 10)),
                )
            retention = ArchiveRetention(self.archive, config, reactor)
            expire = TimerService(float(config.archive.get("expire_every_minutes", 10)) * 60, retention.run)
            expire.clock = reactor
            expire.setName("archive-retention")
            expire.setServiceParent(self)
        # Before the reactor runs (twistd builds services first): reading, and
        # on first start generating, the STARTTLS certificate blocks briefly.
        try:
            tls = server_tls_options(config, reactor.seconds())
        except OSError as e:
            # Generating the self-signed pair where it cannot be written
            # (the configuration's directory, read-only under systemd).
            raise ValueError(
                f"{config.path}: smtp.tls_certificate: not set, and a self-signed certificate cannot be"
                f" generated: {e}"
            ) from None
        # The LiveArchive's sessions: one key for every node (a file, read
        # now, before the reactor runs), and each node's login throttle.
        web_auth = None
        if IAccountStore.providedBy(self.archive) and any(config.nodes[n].web for n in node_names):
            try:
                secret = load_or_create_secret(secret_file(config))
            except (OSError, ValueError) as e:
                raise ValueError(f"{config.path}: web.secret_file: {e}") from None
            web_auth = SessionSigner(secret, reactor)
        self.nodes = {
            name: Node(
                name, config, self.store, self.policy, reactor, tls=tls, archive=self.archive,
                web_auth=web_auth, archive_writer=self.archive_writer,
            )
            for name in node_names
        }
        for node in self.nodes.values():
            node.setServiceParent(self)

    def wake(self) -> None:
        """
        Have every node's engine try its due entries now, after ``mailhub
        queue flush``/``release``: also those of a route it saw down.
        """
        for node in self.nodes.values():
            node.engine.retry_now()

    def stopService(self) -> Deferred[Any]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await super().stopService()
        await self.store.close()
        if self.archive_writer is not None:
            await self.archive_writer.close()
        if self.archive is not None:
            await self.archive.close()


def makeHubService(config: HubConfig, reactor: Any = None, nodes: list[str] | None = None) -> HubService:
    """
    Build the hub's service from a loaded configuration.

    :param config: from ``mailhub.config.load``.
    :param reactor: defaults to the global reactor.
    :param nodes: the node names to run in this process; all of the
        configuration's by default (the embedded default: both sites, one process).
    :raises ValueError: for a node name the configuration does not have.
    :raises mailhub.plugin.PluginNotFound: for a plugin that is not installed.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    names = nodes or config.node_names()
    unknown = [n for n in names if n not in config.nodes]
    if unknown:
        raise ValueError(
            f"{config.path}: nodes: no node {', '.join(unknown)} (configured: {', '.join(config.nodes)})"
        )
    return HubService(config, reactor, names)


def install_wake_signal(hub: Any, reactor: Any) -> None:
    """
    Make ``WAKE_SIGNAL`` wake ``hub``'s engines (``twistd mailhub`` does this;
    an application embedding the hub owns its process's signals and decides).

    :param hub: a ``HubService``, or what runs one (``mailhub.tap.TwistdHub``):
        its ``nodes`` and ``wake``.
    """

    def woken(signum: int, frame: object) -> None:
        reactor.callFromThread(hub.wake)

    signal.signal(WAKE_SIGNAL, woken)
    # Heartbeats say so: the CLI signals only processes that asked for it
    # (the signal's default action would end any other).
    for node in hub.nodes.values():
        node.wake_signal = int(WAKE_SIGNAL)

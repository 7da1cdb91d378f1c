"""
The hub as a Twisted service, for ``twistd mailhub`` and for embedding.

``makeHubService(config)`` returns an ``IService``: add it to an existing
application (see ``examples/embed.tac``) and the hub starts and stops with it.

``SIGHUP`` (``RELOAD_SIGNAL``, under ``twistd mailhub``) and
``HubService.reload`` read the configuration file again: its domains,
routes, their limits and pacing, recipient lists, ``[hub] outbound`` and the
``[smtp]`` limits apply at once; a file with errors is refused whole (each
error logged on one line) and the running configuration stays; what cannot
change without a restart (endpoints, store, archive, policy, node names,
``[delivery]``, ``[web]``, the certificate) is logged as needing one and
left as it is.

Under ``twistd mailhub`` the hub also answers ``SIGUSR2`` (``WAKE_SIGNAL``)
by trying its due entries at once, those of routes it saw down included
(``HubService.wake``): ``mailhub queue flush`` and ``release`` send it to the
hub processes on their host, as ``postqueue -f`` wakes Postfix's queue
manager, instead of leaving the change to the next periodic scan.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Any

from attrs import evolve, fields, frozen
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailhub.alerts import alert_monitor
from mailhub.archive.accounts import SessionSigner, load_or_create_secret, secret_file
from mailhub.archive.retention import ArchiveRetention
from mailhub.archive.route import ArchiveGate, MailMeter
from mailhub.archive.worker import ArchiveProcess
from mailhub.config import ConfigError, HubConfig, _toml, load
from mailhub.interfaces import WAKE_SIGNAL, IAccountStore
from mailhub.model import Route
from mailhub.node import Node
from mailhub.plugin import load_plugin
from mailhub.smtp.tls import server_tls_options

__all__ = [
    "RELOAD_SIGNAL",
    "WAKE_SIGNAL",
    "HubService",
    "ReloadResult",
    "install_reload_signal",
    "install_wake_signal",
    "makeHubService",
]

#: The signal that makes ``twistd mailhub`` read its configuration again.
RELOAD_SIGNAL = signal.SIGHUP

#: ``HubConfig`` fields a reload changes in a running hub; every other field
#: (and ``[smtp]``'s certificate) needs a restart.
RELOADABLE = ("outbound", "domains", "smtp")
_SMTP_RESTART = ("tls_certificate", "tls_key")
#: ``HubConfig`` fields whose TOML key is not their name.
_TOML_KEYS = {"hostname": "hub.hostname"}


@frozen
class ReloadResult:
    """
    What ``HubService.reload`` did.

    :ivar errors: the file's errors, one line each (``file: key: what``);
        if there are any, nothing changed.
    :ivar changes: what changed, one line each (``domain example.org added: route ...``).
    :ivar needs_restart: the keys that changed in the file but keep their
        running value until the node restarts (``nodes.dallas.smtp``).
    """

    errors: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": list(self.errors), "changes": list(self.changes),
                "needs_restart": list(self.needs_restart)}


class HubService(MultiService):
    """
    The nodes of one hub in this process, over one spool store.

    :ivar store: the ``ISpoolStore`` the nodes share.
    :ivar nodes: the ``Node`` services, by name.
    :ivar config: the configuration running now (``reload`` replaces it).
    """

    log = Logger()

    def __init__(self, config: HubConfig, reactor: Any, node_names: list[str]) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self._reloading = DeferredLock()
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
        #: One for every node of this process: the archive yields to their front doors together.
        self.archive_gate = (
            None if self.archive is None else ArchiveGate(MailMeter(reactor), reactor, *config.archive_yield(), store=self.store)
        )
        self.nodes = {
            name: Node(
                name, config, self.store, self.policy, reactor, tls=tls, archive=self.archive,
                web_auth=web_auth, archive_writer=self.archive_writer, archive_gate=self.archive_gate,
            )
            for name in node_names
        }
        for node in self.nodes.values():
            node.setServiceParent(self)
        #: The ``[alerts]`` monitor of this process (``mailhub.alerts``), or ``None``.
        self.alerts = alert_monitor(config, list(self.nodes.values()), self.store, self.policy, reactor)
        if self.alerts is not None:
            self.alerts.setServiceParent(self)

    def wake(self) -> None:
        """
        Have every node's engine try its due entries now, after ``mailhub
        queue flush``/``release``: also those of a route it saw down.
        """
        for node in self.nodes.values():
            node.engine.retry_now()

    def reload(self) -> Deferred[ReloadResult]:
        """
        Read the configuration file (``config.path``) again and apply what a
        running hub can change; one reload at a time.  Each error, change and
        key that needs a restart is logged on a line of its own.

        :returns: a Deferred firing with the ``ReloadResult``; it never fails.
        """
        return self._reloading.run(lambda: ensureDeferred(self._reload()))

    async def _reload(self) -> ReloadResult:
        path = self.config.path
        try:
            # Reading and checking the file (plugins' checks, files they
            # name) is blocking I/O: in a thread.
            new = await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), load, path)
            result = self._apply(new)
        except ConfigError as e:
            result = ReloadResult(errors=tuple(str(e).splitlines()))
        except Exception as e:  # a plugin's check that raised: still the operator's to read
            self.log.failure("reading {path} failed", path=path)
            result = ReloadResult(errors=(f"{path}: {' '.join(str(e).split()) or type(e).__name__}",))
        for line in result.errors:
            self.log.error("{line}", line=f"configuration not reloaded: {line}")
        if result.errors:
            self.log.error("{line}", line=f"configuration not reloaded: {path} has {len(result.errors)}"
                           " error(s); the running configuration stays")
            return result
        for line in result.changes:
            self.log.info("{line}", line=f"configuration reloaded: {line}")
        for key in result.needs_restart:
            self.log.warn("{line}", line=f"configuration reloaded: {path}: {key} changed: needs a restart"
                          " (the running value stays until then)")
        if not result.changes and not result.needs_restart:
            self.log.info("{line}", line=f"configuration reloaded: {path}: no changes")
        return result

    def _apply(self, new: HubConfig) -> ReloadResult:
        """Serve ``new``'s reloadable parts; the rest stays as it runs."""
        old = self.config
        kept: dict[str, Any] = {}
        restart: list[str] = []
        for f in fields(HubConfig):
            if f.name in RELOADABLE or f.name == "path":
                continue
            before, after = getattr(old, f.name), getattr(new, f.name)
            if before != after:
                restart.extend(_changed_keys(_TOML_KEYS.get(f.name, f.name), before, after))
                kept[f.name] = before
        smtp_kept = {k: getattr(old.smtp, k) for k in _SMTP_RESTART}
        restart.extend(f"smtp.{k}" for k, v in smtp_kept.items() if getattr(new.smtp, k) != v)
        config = evolve(new, smtp=evolve(new.smtp, **smtp_kept), **kept)
        changes = _changes(old, config)
        if changes:
            # A recipient list that cannot be used (a recipients_file gone)
            # refuses the file with a ConfigError at the first node, before
            # any change: every node builds its checks from the same file.
            for node in self.nodes.values():
                node.reconfigure(config)
            self.config = config
        return ReloadResult(changes=tuple(changes), needs_restart=tuple(restart))

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


def _changed_keys(table: str, before: Any, after: Any) -> list[str]:
    """The keys of a table (or attrs object) that differ: ``nodes.dallas.smtp``, ``delivery.lease_seconds``."""
    if hasattr(before, "__attrs_attrs__") and hasattr(after, "__attrs_attrs__"):
        before = {f.name: getattr(before, f.name) for f in fields(type(before))}
        after = {f.name: getattr(after, f.name) for f in fields(type(after))}
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        keys = [*before, *(k for k in after if k not in before)]
        found: list[str] = []
        for k in keys:
            if before.get(k) != after.get(k):
                found.extend(_changed_keys(f"{table}.{k}", before.get(k), after.get(k)))
        return found
    return [table]


def _changes(old: HubConfig, new: HubConfig) -> list[str]:
    """What a reload changes, one line each."""
    lines = []
    if old.outbound != new.outbound:
        lines.append(f"hub.outbound: {old.outbound} -> {new.outbound}")
    for f in fields(type(old.smtp)):
        before, after = getattr(old.smtp, f.name), getattr(new.smtp, f.name)
        if before != after:
            lines.append(f"smtp.{f.name}: {_toml(before)} -> {_toml(after)}")
    for name, domain in new.domains.items():
        was = old.domains.get(name)
        settings = {"route": domain.route, "max_connections": domain.max_connections, **domain.options}
        if was is None:
            lines.append(f"domain {name} added: " + ", ".join(f"{k} {v!r}" for k, v in settings.items()))
            continue
        before = {"route": was.route, "max_connections": was.max_connections, **was.options}
        differ = [
            f"{k} {_shown(before, k)} -> {_shown(settings, k)}"
            for k in [*before, *(k for k in settings if k not in before)]
            if before.get(k) != settings.get(k)
        ]
        if differ:
            lines.append(f"domain {name}: " + ", ".join(differ))
    for name in old.domains:
        if name not in new.domains:
            lines.append(f"domain {name} removed: mail for it is refused from now on (entries already spooled are still delivered)")
    return lines


def _shown(settings: Mapping[str, Any], key: str) -> str:
    """A setting as the configuration file writes it (TOML: ``false``, ``"text"``), or ``(unset)``."""
    return _toml(settings[key]) if key in settings else "(unset)"


def install_reload_signal(hub: Any, reactor: Any) -> None:
    """
    Make ``RELOAD_SIGNAL`` (``SIGHUP``) reload ``hub``'s configuration
    (``twistd mailhub`` does this once its reactor runs; an application
    embedding the hub owns its process's signals and decides).

    :param hub: a ``HubService``, or what runs one: its ``reload``.
    """

    def reload(signum: int, frame: object) -> None:
        reactor.callFromThread(hub.reload)

    signal.signal(RELOAD_SIGNAL, reload)


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

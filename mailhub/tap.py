"""
``twistd mailhub``: command-line options and ``makeService``.

``twisted/plugins/mailhub_plugin.py`` points here; nothing imported by this
module at plugin-discovery time installs a reactor.

Under twistd a hub that cannot start says why in one line on stderr, naming
the node, the configuration file and the key at fault, and twistd exits with
status 1, without a traceback: a configuration or certificate error (in
``makeService``), a port already in use (when the listeners bind, before
twistd drops privileges), a spool store that does not answer (asked once the
reactor runs, before any node starts).  An application that embeds the hub
(``mailhub.service.makeHubService``) gets the exceptions instead.

``SIGHUP`` reloads the configuration (``HubService.reload``): the handler
is installed once the reactor runs, after twistd's own.  ``--log-format
json`` makes twistd's log one JSON object a line (``twisted.logger``'s
``eventAsJSON`` fields, plus ``text``, the line as the text log has it, and
``level``), written where ``--logfile`` says.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized
from zope.interface import provider

__all__ = ["STORE_CHECK_TIMEOUT", "Options", "TwistdHub", "json_log_observer", "makeService"]

#: Seconds the spool store has to answer at start (stores time out sooner
#: by themselves: Redis after its ``command_timeout``).
STORE_CHECK_TIMEOUT = 30.0


class Options(usage.Options):
    synopsis = "--config FILE [--node NAME]"
    longdesc = (
        "Run the mailhub nodes of a configuration: SMTP listener, delivery engine "
        "and web archive of each.  Without --node, every node of the configuration "
        "runs in this process over one spool (the embedded default)."
    )
    optParameters = [
        ["config", "c", "mailhub.toml", "The hub's TOML configuration file."],
        ["log-format", None, "text", "text (twistd's) or json: one JSON object a line, where --logfile says."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["nodes"] = []

    def opt_node(self, name: str) -> None:
        """Run only this node (may be given more than once)."""
        self["nodes"].append(name)

    def opt_version(self) -> None:
        """Display mailhub's version and exit."""
        from mailhub import __version__

        print(f"mailhub {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format must be text or json, not {self['log-format']!r}")
        twistd = self.parent
        if self["log-format"] == "json" and twistd is not None and twistd.get("syslog"):
            raise usage.UsageError("--log-format json writes where --logfile says, not to syslog")


def _who(names: list[str]) -> str:
    """``node dallas`` or ``nodes dallas, losangeles``: who could not start."""
    return f"node{'s' if len(names) > 1 else ''} {', '.join(names)}" if names else ""


def makeService(options: Options) -> IService:
    from mailhub.config import ConfigError, load
    from mailhub.plugin import PluginNotFound
    from mailhub.service import makeHubService

    names: list[str] = list(options["nodes"])
    try:
        config = load(options["config"])
        names = names or config.node_names()
        hub = makeHubService(config, nodes=options["nodes"] or None)
    except (ConfigError, PluginNotFound, ValueError, OSError) as e:
        # twistd shows a traceback for anything else; the operator needs the message.
        prefix = f"mailhub: {_who(names)}: " if names else "mailhub: "
        raise SystemExit("\n".join(prefix + line for line in str(e).splitlines()))
    from twisted.internet import reactor

    from mailhub.memory import keep_freed_memory
    from mailhub.service import install_wake_signal

    service = TwistdHub(hub, reactor, names)
    if options["log-format"] == "json":
        service.log_observer = json_log_observer(options.parent)
    install_wake_signal(service, reactor)
    keep_freed_memory()
    return service


def json_log_observer(twistd: Any) -> Any:
    """
    An ``ILogObserver`` writing one JSON object a line (``eventAsJSON``,
    plus ``text``: the line as the text log would say it, and ``level``)
    where twistd's options say its log goes: ``--logfile`` (``-``: standard
    output), or ``twistd.log`` when it daemonizes without one.

    :param twistd: twistd's ``ServerOptions`` (``Options.parent``), or ``None``.
    """
    from twisted.logger import formatEvent, jsonFileLogObserver
    from twisted.python.logfile import LogFile

    name = (twistd or {}).get("logfile") or ""
    if name == "-" or (not name and (twistd is None or twistd.get("nodaemon"))):
        out: Any = sys.stdout
    else:
        out = LogFile.fromFullPath(name or "twistd.log")
    # No record separator: one JSON object a line, for jq and the journal.
    write = jsonFileLogObserver(out, recordSeparator="")

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        write({**event, "text": formatEvent(event), "level": getattr(level, "name", None)})

    return observe


class TwistdHub(Service):
    """
    The hub's service (``makeHubService``) as ``twistd mailhub`` runs it:
    its nodes start once the spool store has answered, and a start-up
    failure ends the process with one line on stderr and exit status 1.

    :ivar hub: the ``HubService``.
    """

    log = Logger()

    def __init__(self, hub: Any, reactor: Any, names: list[str]) -> None:
        self.hub = hub
        self._reactor = reactor
        self._who = _who(names)
        self._first = names[0]
        self._starting: Deferred[None] | None = None
        #: Set as the application's ``ILogObserver`` (``--log-format json``), or ``None``.
        self.log_observer: Any = None

    def setServiceParent(self, parent: Any) -> None:
        # twistd hands its Application here before it starts logging, and
        # logs to the application's ILogObserver when it has one.
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    @property
    def nodes(self) -> Any:
        """The hub's nodes, by name (``install_wake_signal``)."""
        return self.hub.nodes

    def wake(self) -> None:
        self.hub.wake()

    def reload(self) -> Deferred[Any]:
        """``HubService.reload``: ``SIGHUP``."""
        return self.hub.reload()  # type: ignore[no-any-return]

    def privilegedStartService(self) -> None:
        # The listeners bind here, before twistd drops privileges (port 25).
        from mailhub.node import StartupError

        super().privilegedStartService()
        try:
            self.hub.privilegedStartService()
        except StartupError as e:
            self._say(str(e))
            raise SystemExit(1)

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._start)

    def _start(self) -> None:
        from mailhub.service import install_reload_signal

        # Now, not in makeService: the reactor has installed its handlers.
        install_reload_signal(self, self._reactor)
        self._starting = ensureDeferred(self._check_then_start())

    async def _check_then_start(self) -> None:
        from mailhub.node import StartupError, where

        config = self.hub.config
        try:
            d = self.hub.store.next_due(self._first, self._reactor.seconds())
            await d.addTimeout(STORE_CHECK_TIMEOUT, self._reactor)
        except Exception as e:
            if not self.running:
                return  # stopped meanwhile
            key, text = where(config, "store")
            why = " ".join(str(e).split()) or type(e).__name__
            self._fail(f"{self._who}: {config.path}: {key}: cannot reach the spool store ({text}): {why}")
            return
        if not self.running:
            return
        try:
            self.hub.startService()
        except StartupError as e:
            self._fail(str(e))
        except Exception as e:
            self.log.failure("start failed")
            self._fail(f"{self._who}: cannot start: {' '.join(str(e).split()) or type(e).__name__}")

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self.hub.running:
            return self.hub.stopService()  # type: ignore[no-any-return]
        # The nodes never started (the store did not answer): close what the
        # hub opened.
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        await self.hub.store.close()
        if self.hub.archive is not None:
            await self.hub.archive.close()

    def _say(self, line: str) -> None:
        """The failure, in the log and as one line on the process's real stderr."""
        self.log.error("{line}", line=line)
        # twistd sends sys.stderr to the log; the operator's terminal (and
        # systemd's journal) is the one the process started with.
        stderr = sys.__stderr__
        if stderr is not None:
            stderr.write(f"mailhub: {line}\n")
            stderr.flush()

    def _fail(self, line: str) -> None:
        """Stop the process with ``line`` and exit status 1."""
        self._say(line)
        # twistd exits 0 whenever its reactor stops: leave with 1 once the
        # shutdown has run (services stopped, thread pools joined).
        self._reactor.addSystemEventTrigger("after", "shutdown", _exit, 1)
        self._reactor.stop()


def _exit(status: int) -> None:
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os._exit(status)


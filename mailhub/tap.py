"""
``twistd mailhub``: command-line options and ``makeService``.

``twisted/plugins/mailhub_plugin.py`` points here; nothing imported by this
module at plugin-discovery time installs a reactor.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage


class Options(usage.Options):
    synopsis = "--config FILE [--node NAME]"
    longdesc = (
        "Run the mailhub nodes of a configuration: SMTP listener, delivery engine "
        "and web archive of each.  Without --node, every node of the configuration "
        "runs in this process over one spool (the embedded default)."
    )
    optParameters = [
        ["config", "c", "mailhub.toml", "The hub's TOML configuration file."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["nodes"] = []

    def opt_node(self, name: str) -> None:
        """Run only this node (may be given more than once)."""
        self["nodes"].append(name)


def makeService(options: Options) -> IService:
    from mailhub.config import ConfigError, load
    from mailhub.plugin import PluginNotFound
    from mailhub.service import makeHubService

    try:
        config = load(options["config"])
        hub = makeHubService(config, nodes=options["nodes"] or None)
    except (ConfigError, PluginNotFound, ValueError) as e:
        # twistd shows a traceback for anything else; the operator needs the message.
        raise SystemExit(f"mailhub: {e}")
    from twisted.internet import reactor

    from mailhub.memory import keep_freed_memory
    from mailhub.service import install_wake_signal

    install_wake_signal(hub, reactor)
    keep_freed_memory()
    return hub

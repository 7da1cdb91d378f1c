"""
Retention: the archive forgets what is older than each domain's
``archive_retention_days`` (``[archive] retention_days``, 30, by default),
except mailboxes and domains under legal hold.

It runs by itself every ``[archive] expire_every_minutes`` (10) in every hub
process (expiring twice is harmless), in batches of ``BATCH`` (mailbox,
message) pairs with the reactor free between them, so that a first run over
years of imported mail never stalls a node.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mailhub.config import HubConfig
from mailhub.interfaces import IArchive

__all__ = ["BATCH", "ArchiveRetention"]

#: Pairs removed by one ``IArchive.expire`` call.
BATCH = 500


class ArchiveRetention:
    """
    :param archive: the hub's ``IArchive``.
    :param config: for the domains and their retention.
    :param reactor: ``IReactorTime``: the time, and the turns between batches.
    """

    log = Logger()

    def __init__(self, archive: IArchive, config: HubConfig, reactor: Any) -> None:
        self._archive = archive
        self._config = config
        self._reactor = reactor
        self._running: Deferred[Any] | None = None
        #: Pairs removed by the last complete run, per domain.
        self.last_run: dict[str, int] = {}

    def run(self) -> Deferred[Any]:
        """One pass over every domain (a pass still running is not doubled); never fails."""
        if self._running is not None:
            return succeed(None)
        self._running = ensureDeferred(self._run())

        def done(result: object) -> None:
            self._running = None

        self._running.addErrback(lambda f: self.log.failure("archive retention failed", f)).addBoth(done)
        return self._running

    async def _run(self) -> None:
        now = self._reactor.seconds()
        removed: dict[str, int] = {}
        for domain in sorted(self._config.domains):
            before = now - self._config.archive_retention_days(domain) * 86400
            total = 0
            while True:
                count = await self._archive.expire(domain, before, BATCH)
                total += count
                if count < BATCH:
                    break
                # Let the node breathe between batches.
                await deferLater(self._reactor, 0, lambda: None)
            removed[domain] = total
            if total:
                self.log.info(
                    "archive: {count} messages of {domain} older than {days:g} days expired",
                    count=total,
                    domain=domain,
                    days=self._config.archive_retention_days(domain),
                )
        self.last_run = removed

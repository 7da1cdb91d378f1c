"""
Delay notices: one RFC 3464 "delayed" DSN to the sender of an entry that is
still not delivered ``warn_after`` seconds after the hub accepted it (4 hours
by default; ``[delivery] warn_after``, and per domain ``warn_after = 0`` or
``false`` for none).

The engine asks ``DelayNotices.due`` after each attempt's decision.  When
it names recipients, the engine enqueues the notice through the hub
(``send``) before it records the attempt, and records it with
``Decision.delay_notified``: the store keeps the mark with the entry
(``Entry.delay_notified``), under the attempt's lease, so neither a restart
nor another node sends a second one.  A crash between the two can repeat a
notice (as it can repeat a bounce), never lose the record of one.

This module decides and builds; it does no I/O of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from mailhub.archive.route import is_archive_route
from mailhub.delivery.dsn import build_delay_dsn
from mailhub.model import Action, Decision, Entry, Envelope, Outcome

__all__ = ["DEFAULT_WARN_AFTER", "DelayNotices", "warn_after_for"]

#: Seconds after acceptance before the sender hears that the entry is delayed.
DEFAULT_WARN_AFTER = 4 * 3600.0


def warn_after_for(config: Any, domain: str) -> float:
    """
    ``domain``'s ``warn_after`` (seconds; ``0`` for no notice): the domain's
    own key, else ``[delivery] warn_after``.  Domains the hub does not serve
    (mail through ``[hub] outbound``) take the hub's.
    """
    d = config.domains.get(domain.lower())
    if d is not None and "warn_after" in d.options:
        value = d.options["warn_after"]
        return 0.0 if value is False else float(value)
    return float(config.delivery.warn_after)


class DelayNotices:
    """
    Which attempts owe their sender a delay notice, and the notice itself.

    :param hostname: the hub's name (the DSN's ``Reporting-MTA``).
    :param warn_after: gives a recipient domain's ``warn_after`` (seconds;
        ``0``: none).
    :param lifetime: how long the policy keeps an entry (seconds), for
        ``Will-Retry-Until``; ``None`` if unknown.
    :param send: enqueues a message through the hub (``Node.receive``).
    """

    def __init__(
        self,
        hostname: str,
        warn_after: Callable[[str], float],
        lifetime: float | None,
        send: Callable[[Envelope, bytes], Deferred[Any]],
    ) -> None:
        self._hostname = hostname
        self._warn_after = warn_after
        self._lifetime = lifetime
        self._send = send

    def due(self, entry: Entry, decision: Decision, now: float) -> list[Outcome]:
        """
        The recipients of an attempt to name in a delay notice: those the
        decision retries or holds (a server rejecting everything: the hub
        keeps the message) whose domain's ``warn_after`` has passed since the
        entry was accepted, unless the entry had its notice already, comes
        from the null sender or is the archive's.  One notice per entry: a
        recipient whose domain waits longer is named only if its time has
        come too.

        :returns: the outcomes to report, or ``[]`` for no notice.
        """
        if entry.delay_notified or entry.sender is None or is_archive_route(entry.route):
            return []
        age = now - entry.created
        late = []
        for o in decision.outcomes:
            if o.action in (Action.RETRY, Action.HOLD):
                after = self._warn_after(o.recipient.domain)
                if after > 0 and age >= after:
                    late.append(o)
        return late

    def send(self, entry: Entry, outcomes: Sequence[Outcome], message: bytes, now: float) -> Deferred[Any]:
        """
        Enqueue the notice for ``outcomes`` of ``entry`` through the hub.

        :param message: the original message (its headers go back).
        :returns: a Deferred that fires once the spool has the notice, or
            fails as ``Node.receive`` does.
        """
        retry_until = None if self._lifetime is None else entry.created + self._lifetime
        dsn = build_delay_dsn(self._hostname, entry, outcomes, message, now, retry_until)
        assert dsn is not None  # due() gave outcomes and a sender
        return self._send(*dsn)

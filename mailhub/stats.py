"""
The plain counts the hot path keeps for the metrics: the SMTP server's
sessions and refusals, the delivery engine's attempts, its delivery latency
and the latency of its store calls.

Bumping one is an integer or float addition (a dict lookup at most):
``mailhub.web.metrics`` turns them into Prometheus metrics only when
``/metrics`` is scraped.  This module must stay that cheap, and must not
import a metrics library.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any, TypeVar

from mailhub.model import Action, Decision, Entry, Reply

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

__all__ = ["DELIVERY_BUCKETS", "STORE_BUCKETS", "Buckets", "DeliveryStats", "SmtpStats", "refusal_reason"]

T = TypeVar("T")

#: Upper bounds (seconds) of the delivery latency histogram: from the
#: message's acceptance to its route's server taking it.  Most mail takes
#: well under a second; a backlog drains over minutes to days.
DELIVERY_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400,
)

#: Upper bounds (seconds) of the store call latency histogram.
STORE_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)


class Buckets:
    """
    A histogram's counts: one per bucket (the last is ``+Inf``), not
    cumulative, with the sum and the count of what was observed.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to it ("le").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


_ACTIONS = {
    Action.DELIVERED: "delivered",
    Action.RETRY: "deferred",
    Action.FAILED: "failed",
    Action.EXPIRED: "expired",
    Action.HOLD: "held",
}


class DeliveryStats:
    """
    What one node's delivery engine did (``DeliveryEngine.stats``).

    :ivar attempts: ``{(route, result): count}``; the result of an attempt
        is the outcome of its recipients when they agree (``delivered``,
        ``deferred``, ``failed``, ``expired``, ``held``), ``mixed`` when
        they do not, ``suspended`` for an attempt deferred without
        connecting (its route is down), ``yielded`` for an archive entry put
        off while the front door is busy (``ArchiveGate``), ``lease_lost``
        when another node took the entry over meanwhile (nothing was recorded).
    :ivar latency: per route, from acceptance to delivery, for each attempt
        that delivered to at least one recipient.
    :ivar store: per store call (``claim``, ``record``, ...), its latency.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self.attempts: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Buckets] = {}
        self.store: dict[str, Buckets] = {}

    def count(self, route: str, result: str) -> None:
        """One attempt on ``route`` ended with ``result``."""
        key = (route, result)
        self.attempts[key] = self.attempts.get(key, 0) + 1

    def attempt(self, entry: Entry, decision: Decision, suspended: bool, finished: float) -> None:
        """An attempt of ``entry`` was decided (``decision``) at ``finished``."""
        outcomes = decision.outcomes
        delivered = False
        result = "suspended" if suspended else ""
        for o in outcomes:
            if o.action is Action.DELIVERED:
                delivered = True
            if not suspended:
                name = _ACTIONS[o.action]
                result = name if not result or result == name else "mixed"
        self.count(entry.route, result or "mixed")
        if delivered:
            buckets = self.latency.get(entry.route)
            if buckets is None:
                buckets = self.latency[entry.route] = Buckets(DELIVERY_BUCKETS)
            buckets.observe(max(0.0, finished - entry.created))

    def timed(self, call: str, d: Deferred[T]) -> Deferred[T]:
        """
        Time a store call from now until ``d`` fires (either way).

        :returns: ``d``, with its result untouched.
        """
        started = self._clock.seconds()

        def done(result: Any) -> Any:
            buckets = self.store.get(call)
            if buckets is None:
                buckets = self.store[call] = Buckets(STORE_BUCKETS)
            buckets.observe(max(0.0, self._clock.seconds() - started))
            return result

        return d.addBoth(done)


class SmtpStats:
    """
    What one SMTP listener saw (``ClientLimiter.stats``).

    :ivar sessions: connections admitted (within the connection limits).
    :ivar accepted: messages accepted (``250`` after DATA).
    :ivar timeouts: sessions the hub ended for idling (``421 4.4.2``).
    :ivar refusals: ``{reason: count}`` of the replies ``>= 400`` the hub
        gave (``refusal_reason``).
    """

    def __init__(self) -> None:
        self.sessions = 0
        self.accepted = 0
        self.timeouts = 0
        self.refusals: dict[str, int] = {}

    def refused(self, reply: Reply, what: str) -> None:
        """The hub answered ``reply`` (a 4xx or 5xx) to ``what`` (the server's log word)."""
        reason = refusal_reason(reply, what)
        self.refusals[reason] = self.refusals.get(reason, 0) + 1


#: The refusals the SMTP server gives, by (code, enhanced status).
_REASONS = {
    (450, "4.7.1"): "rate_limit",
    (550, "5.7.1"): "relay_denied",
    (550, "5.1.1"): "unknown_recipient",
    (451, "4.4.1"): "recipient_unverifiable",
    (552, "5.3.4"): "size",
    (452, "4.5.3"): "too_many_recipients",
    (530, "5.7.0"): "tls_required",
    (454, "4.7.0"): "tls_unavailable",
    (554, "5.6.0"): "bad_message",
    (553, "5.6.7"): "smtputf8",
    (553, "5.1.7"): "bad_sender",
    (452, "4.3.1"): "spool_full",
    (451, "4.3.0"): "local_error",
}


def refusal_reason(reply: Reply, what: str = "") -> str:
    """
    Why the hub refused something, as a metric label: one of a fixed set of
    words (``relay_denied``, ``rate_limit``, ``too_many_connections``,
    ``too_many_messages``, ``size``, ``bad_command``, ...; ``other`` for a
    reply not listed, such as a route's own reply to a verified recipient).
    """
    if reply.code == 421 and reply.enhanced == "4.7.0":
        return "too_many_connections" if what == "connection" else "too_many_messages"
    reason = _REASONS.get((reply.code, reply.enhanced))
    if reason is not None:
        return reason
    if reply.enhanced.startswith("5.5."):
        return "bad_command"
    if what.startswith("RCPT"):
        return "recipient_refused"
    return "other"

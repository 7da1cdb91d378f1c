"""
The ``standard`` delivery policy: the seed's retry schedule.

- The first attempt happens at once (the accepting node makes it).
- After a temporary failure (4xx, refused, timeout, dropped connection) the
  next attempt goes to the *other* node after ``retry_minutes / 2``, with
  jitter: each node then retries an entry every ``retry_minutes`` and the entry
  is tried every ``retry_minutes / 2``, staggered between the sites.  With one
  node, every ``retry_minutes``.
- An entry still undelivered ``lifetime_days`` after it was accepted expires:
  its pending recipients get a DSN with the last error.
- A 5xx fails the recipient (DSN).  Except: when an entry that was deferred
  before now has *every* recipient rejected, the policy holds it instead
  (``hold_on_reject_after_deferral``).  That is what a rebuilt server that came
  back rejecting everything looks like; bouncing a week of spooled mail for it
  would lose the mail, holding it lets an operator release it once the server
  is fixed.

The policy is a pure object: it reads no clock and touches no socket.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from attrs import field, frozen
from zope.interface import implementer, provider

from mailhub.interfaces import IDeliveryPolicy, IPolicyPlugin
from mailhub.model import Action, Address, Decision, Entry, Outcome, Reply

__all__ = ["StandardPolicy", "plugin"]


@implementer(IDeliveryPolicy)
@frozen
class StandardPolicy:
    """
    :ivar nodes: node names in configuration order; a deferral passes the
        entry to the next one in this list.
    :ivar retry_seconds: how often each node retries an entry.
    :ivar lifetime: seconds before an undelivered entry expires.
    :ivar jitter: fraction of the interval by which an attempt may move
        earlier or later, so entries deferred together do not return together.
    """

    nodes: tuple[str, ...] = field(converter=tuple)
    retry_seconds: float = 20 * 60.0
    lifetime: float = 7 * 86400.0
    jitter: float = 0.1
    hold_on_reject_after_deferral: bool = True
    _random: Callable[[], float] = field(default=random.random, repr=False)

    def interval(self) -> float:
        """Seconds from a deferral to the next attempt of the entry (before jitter)."""
        if len(self.nodes) > 1:
            return self.retry_seconds / 2
        return self.retry_seconds

    def other_node(self, node: str) -> str | None:
        if not self.nodes:
            return None
        if node not in self.nodes:
            return self.nodes[0]
        return self.nodes[(self.nodes.index(node) + 1) % len(self.nodes)]

    def decide(self, entry: Entry, replies: Mapping[Address, Reply], now: float, node: str) -> Decision:
        expires = entry.created + self.lifetime
        all_permanent = bool(replies) and all(r.permanent for r in replies.values())
        # "Deferred before": its last attempt got a temporary failure.  (Not
        # merely tried before: an entry held and released that is rejected
        # again is a real rejection, and bounces.)
        last = entry.last_reply
        deferred_before = entry.attempts > 0 and last is not None and last.temporary
        hold = self.hold_on_reject_after_deferral and all_permanent and deferred_before
        outcomes = []
        for address in entry.pending:
            reply = replies.get(address, Reply(451, "4.3.0", "no reply from transport"))
            if reply.ok:
                action = Action.DELIVERED
            elif reply.permanent:
                action = Action.HOLD if hold else Action.FAILED
            elif now >= expires:
                action = Action.EXPIRED
            else:
                action = Action.RETRY
            outcomes.append(Outcome(address, action, reply))
        if not any(o.action is Action.RETRY for o in outcomes):
            return Decision(outcomes)
        interval = self.interval()
        delay = interval * (1 + self.jitter * (2 * self._random() - 1))
        # The last attempt happens at the moment of expiry, so the DSN carries
        # the error of a try made then and not up to an interval earlier.
        return Decision(outcomes, min(now + delay, expires), self.other_node(node))


@provider(IPolicyPlugin)
class plugin:  # noqa: N801 - the entry point names this object
    """The ``standard`` policy plugin."""

    name = "standard"
    #: The keys of ``[policy]`` besides ``plugin`` (``mailhub.plugin``).
    config_keys = frozenset({"retry_minutes", "lifetime_days", "jitter", "hold_on_reject_after_deferral"})

    @staticmethod
    def check_config(config: Mapping[str, Any]) -> None:
        """
        Check the ``[policy]`` table as ``make`` would take it: a policy is a
        pure object, so this makes one and drops it.

        :raises ValueError: naming the key at fault.
        """
        hold = config.get("hold_on_reject_after_deferral", True)
        if not isinstance(hold, bool):
            raise ValueError(f"policy.hold_on_reject_after_deferral: must be true or false, not {hold!r}")
        plugin.make(config, None)

    @staticmethod
    def make(config: Mapping[str, Any], reactor: Any) -> StandardPolicy:
        def number(key: str, default: float) -> float:
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"policy.{key}: must be a number greater than 0, not {value!r}")
            return float(value)

        jitter = config.get("jitter", 0.1)
        if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
            raise ValueError(f"policy.jitter: must be a number from 0 to below 1, not {jitter!r}")
        return StandardPolicy(
            nodes=config.get("nodes", ()),
            retry_seconds=number("retry_minutes", 20) * 60,
            lifetime=number("lifetime_days", 7) * 86400,
            jitter=float(jitter),
            hold_on_reject_after_deferral=bool(config.get("hold_on_reject_after_deferral", True)),
        )

"""
Pacing of one route's deliveries on one node: how many attempts may run at
once, how fast they may start, and when to stop for a while.

An organisation's server that has just come back is easy to push over: the
backlog of a long outage arrives at once and Exchange answers
``452 4.3.1 Insufficient system resources`` (its back pressure), other servers
``421``.  The throttle keeps a concurrency window per route, as TCP does:

- attempts run at most ``min(window, share)`` at once, where ``share`` is
  this node's part of the route's ``max_connections`` for the whole hub
  (``IRouteCoordination.share``, asked for by the engine; without a store
  that coordinates, the whole ``max_connections``), and start at most
  ``rate`` a second (the node's part of ``max_rate``);
- a back-pressure reply halves the window and pauses new attempts for a
  short, jittered time (1 s at first, doubling while the pressure lasts, up
  to ``max_pause``), so that two nodes never resume in step; attempts
  already running go on, so the route is never left idle while the server
  has room;
- each delivered entry widens the window by ``1 / window`` (about one more
  connection per window's worth of deliveries) up to ``max_connections``;
- when a route that was down (every attempt deferred by connection failures
  or 4xx) delivers again, the window restarts at a quarter of the maximum and
  grows from there, so a recovered server sees its backlog ramp up instead of
  arriving at full concurrency.

This module is a plain object over an injected clock: no socket, no store.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from mailhub.model import Reply, is_back_pressure

_log = Logger()

__all__ = ["RouteThrottle", "is_back_pressure", "is_route_failure"]


def is_route_failure(reply: Reply) -> bool:
    """
    Whether a reply says the route itself is unreachable (refused, timed out,
    dropped, ``421`` service not available), not that one recipient or one
    message is refused for now (greylisting, a full mailbox).
    """
    return reply.temporary and (reply.code == 421 or reply.enhanced.startswith("4.4."))


#: How far ahead of its turn an attempt hears ``soon``, in windows.  One
#: window ahead is about one attempt's time, and a body read from the spool
#: (another thread, then the reactor's next turn) was still on its way for
#: more than half of the attempts when their slot came, holding the slot
#: (P3 drain on loopback: wait for the body 1.5 ms median, 1.7 ms mean with
#: one window; 0 median, 1.2 ms mean with two).
READ_AHEAD = 2


def _tell(soon: Callable[[], object]) -> None:
    """
    Call an ``acquire``'s ``soon``.  It is only a hint (read ahead): if it
    fails, the attempt goes on without it, and the queue with it.
    """
    try:
        soon()
    except Exception:
        _log.failure("read-ahead for a waiting attempt failed")


#: The first pause after back pressure, in seconds (before jitter).
FIRST_PAUSE = 1.0


class RouteThrottle:
    """
    :param maximum: the route's ``max_connections`` (for the whole hub when
        the engine coordinates shares, see ``share``).
    :param clock: an ``IReactorTime``.
    :param max_pause: the longest pause after back pressure (the domain's
        ``backpressure_pause``).
    :param probe: while the route is down, at most one real attempt per
        ``probe`` seconds; the others are deferred without connecting
        (``suspended``), as Postfix marks a dead destination.
    :param rate: attempts a second at most for the whole hub (``max_rate``),
        or ``None``; this node's part follows its share.
    :param on_demand: called (without arguments) when attempts wait that the
        share does not let run: time to ask for a bigger one.
    :param random: a ``random()``-like callable, for the pauses' jitter.
    """

    def __init__(
        self,
        maximum: int,
        clock: Any,
        max_pause: float = 30.0,
        probe: float = 30.0,
        rate: float | None = None,
        on_demand: Callable[[], object] | None = None,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.maximum = max(1, maximum)
        self.window = float(self.maximum)
        #: This node's share of ``maximum`` (set by the engine).
        self.share = self.maximum
        self.active = 0
        self.paused_until = 0.0
        self.pressure_since: float | None = None
        self.down = False
        self.down_since: float | None = None
        #: Deferred or refused since the last delivery: a 5xx now may be a
        #: rebuilt server rejecting everything, not one unknown user.
        self.troubled = False
        self.rate = rate
        self._next_start = float("-inf")
        self._on_demand = on_demand
        self._random = random
        self._clock = clock
        self._pause = FIRST_PAUSE
        self._max_pause = max(max_pause, FIRST_PAUSE)
        self._probe = probe
        self.peak_demand = 0
        self._last_try = float("-inf")
        self._waiting: deque[Deferred[None]] = deque()
        # The ``soon`` callbacks of waiters not yet told, and how many
        # waiters at the front of the queue have been told.
        self._soon: dict[Deferred[None], Callable[[], object]] = {}
        self._told = 0
        self._timer: IDelayedCall | None = None
        self.delivered = 0
        self.deferred = 0
        self.failed = 0
        self.back_pressure = 0
        self.last_reply: Reply | None = None
        self._recent: deque[float] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def limit(self) -> int:
        """How many attempts may run at once now: the window, within the share."""
        return max(0, min(int(self.window), self.share))

    def demand(self) -> int:
        """How many connections this node could use now (what it asks its share for)."""
        return min(int(self.window), self.active + len(self._waiting))

    def set_share(self, share: int) -> None:
        """The engine was given ``share`` connections of the route for this node."""
        self.share = max(0, share)
        self._pump()

    def acquire(self, soon: Callable[[], object] | None = None) -> Deferred[None]:
        """
        Fires when an attempt on the route may start; call ``release`` after it.

        :param soon: called once, when this attempt is among the next
            ``READ_AHEAD`` windows' worth to start (at once if it already
            is): time to read what it will send, and no earlier, so that the
            bodies read ahead are bounded however long the queue.
        """
        d: Deferred[None] = Deferred(self._forget)
        self._waiting.append(d)
        if soon is not None:
            self._soon[d] = soon
        self._pump()
        self._note_demand()
        return d

    def _note_demand(self) -> None:
        demand = self.demand()
        self.peak_demand = max(self.peak_demand, demand)
        if demand > self.share and self._on_demand is not None:
            self._on_demand()

    def _forget(self, d: Deferred[None]) -> None:
        if d in self._waiting:
            if self._waiting.index(d) < self._told:
                self._told -= 1
            self._waiting.remove(d)
            self._soon.pop(d, None)

    def _tell(self) -> None:
        """Call the ``soon`` of the waiters now among the next ``READ_AHEAD`` windows to start."""
        while self._told < min(len(self._waiting), READ_AHEAD * int(self.window)):
            soon = self._soon.pop(self._waiting[self._told], None)
            self._told += 1
            if soon is not None:
                _tell(soon)

    def release(self, replies: Iterable[Reply]) -> bool:
        """
        An attempt finished with these replies (one per recipient tried).

        :returns: whether the route just came back up (it was down and now
            delivered): the engine then lets the route's backlog flow.
        """
        self.active -= 1
        recovered = self._learn(list(replies))
        self._pump()
        return recovered

    def suspended(self) -> bool:
        """
        Whether to skip an attempt without connecting: the route is down and
        was tried less than ``probe`` seconds ago.  When it returns ``False``
        for a down route, the caller's attempt is the probe.
        """
        if not self.down:
            return False
        now = self._clock.seconds()
        if now - self._last_try >= self._probe:
            self._last_try = now
            return False
        return True

    def would_suspend(self) -> bool:
        """
        Whether ``suspended`` would now say to skip an attempt, without taking
        the probe when one is due (``suspended`` does: its ``False`` for a down
        route makes the caller's attempt the probe).
        """
        return self.down and self._clock.seconds() - self._last_try < self._probe

    def probe_overdue(self, grace: float) -> bool:
        """
        Whether the route is down and its probe has been due for ``grace``
        seconds without an attempt taking it (a new message would have).
        """
        return self.down and self._clock.seconds() - self._last_try >= self._probe + grace

    def cancel_waiting(self) -> None:
        """Fail every waiting ``acquire`` with ``CancelledError`` (the node is stopping)."""
        while self._waiting:
            self._waiting[0].cancel()

    def retry_now(self) -> None:
        """
        The operator asked for delivery now (``mailhub queue flush``): stop
        deferring without connecting, and start again at a quarter of the
        window, as after a recovery.  If the route is still down, the next
        failures say so again.
        """
        if self.down:
            self.down = False
            self.slow_start()

    def came_back(self) -> bool:
        """
        The route delivered (here, or on another node, which this one may
        have seen down and not tried since): it is up.

        :returns: whether this node had it down.
        """
        self.troubled = False
        if not self.down:
            return False
        self.down = False
        self.down_since = None
        self.slow_start()
        return True

    def slow_start(self) -> None:
        """The route just came back: restart the window at a quarter of the maximum."""
        self.window = min(self.window, max(1.0, self.maximum / 4))

    def state(self) -> str:
        """``"down"``, ``"back-pressure"`` (paused, or pushed back within a minute) or ``"up"``."""
        if self.down:
            return "down"
        now = self._clock.seconds()
        if self.pressure_since is not None and (now < self.paused_until or now - self.paused_until < 60):
            return "back-pressure"
        return "up"

    def delivered_per_minute(self) -> int:
        self._trim()
        return len(self._recent)

    def pace_per_minute(self) -> int:
        """
        Deliveries a minute at the pace of the last minute's, counted from
        the first of them: a drain that began ten seconds ago is not
        averaged over a minute of which fifty seconds were idle (which made
        ``mailhub status`` promise minutes for what took seconds).  At
        least five seconds are counted, so that a first few deliveries do
        not promise a pace not yet seen.
        """
        self._trim()
        if not self._recent:
            return 0
        span = min(60.0, max(5.0, self._clock.seconds() - self._recent[0]))
        return round(len(self._recent) * 60.0 / span)

    def status(self) -> dict[str, Any]:
        now = self._clock.seconds()
        paused_for = max(0.0, round(self.paused_until - now, 1))
        why = None
        if paused_for:
            why = f"back pressure since {_clock_time(self.pressure_since)} ({self.last_reply})"
        elif self.down:
            due = max(0.0, self._last_try + self._probe - now)
            why = (
                f"route down since {_clock_time(self.down_since)}; next probe in {due:.0f} s"
                f" (last: {self.last_reply})"
            )
        elif self.waiting and self.active >= self.limit:
            if self.share < int(self.window):
                why = f"waiting for a connection: this node's share is {self.share} of {self.maximum}"
            else:
                why = f"waiting for a connection: window {self.window:.1f}"
        return {
            "state": self.state(),
            "why": why,
            "window": round(self.window, 2),
            "max_connections": self.maximum,
            "share": self.share,
            "rate": self.rate,
            "active": self.active,
            "waiting": self.waiting,
            "paused_for": paused_for,
            "down": self.down,
            "delivered": self.delivered,
            "deferred": self.deferred,
            "failed": self.failed,
            "back_pressure": self.back_pressure,
            "delivered_last_minute": self.delivered_per_minute(),
            "pace_per_minute": self.pace_per_minute(),
            "last_reply": str(self.last_reply) if self.last_reply else None,
        }

    def _trim(self) -> None:
        horizon = self._clock.seconds() - 60
        while self._recent and self._recent[0] < horizon:
            self._recent.popleft()

    def _learn(self, replies: list[Reply]) -> bool:
        """Adjust the window; returns whether the route just came back up."""
        if not replies:
            return False
        now = self._clock.seconds()
        self._last_try = now
        self.last_reply = replies[0]
        ok = sum(r.ok for r in replies)
        if any(is_back_pressure(r) for r in replies):
            self.back_pressure += 1
            self.deferred += 1
            if now < self.paused_until:
                # Attempts that were already running when the server pushed
                # back report the same episode: react to it once, as TCP
                # halves its window once per loss event.
                return False
            if self.pressure_since is None:
                self.pressure_since = now
            self.window = max(1.0, self.window / 2)
            # Jitter, so that nodes pushed back together do not come back together.
            self.paused_until = now + self._pause * (0.5 + self._random())
            self._pause = min(self._pause * 2, self._max_pause)
            return False
        if ok:
            self.delivered += 1
            self._recent.append(now)
            self._trim()
            self._pause = FIRST_PAUSE
            if now >= self.paused_until:
                self.pressure_since = None
            if self.came_back():
                return True
            self.window = min(float(self.maximum), self.window + 1 / self.window)
            self._note_demand()
            return False
        if all(r.permanent for r in replies):
            self.failed += 1
            return False
        self.deferred += 1
        self.troubled = True
        if all(is_route_failure(r) for r in replies):
            if not self.down:
                self.down_since = now
            self.down = True
        return False

    def _pump(self) -> None:
        now = self._clock.seconds()
        if now < self.paused_until:
            self._wake_at(self.paused_until)
            return
        while self._waiting and self.active < self.limit:
            if self.rate:
                # This node's part of the hub's rate follows its share.
                interval = self.maximum / (self.rate * max(1, self.share))
                if now < self._next_start:
                    self._wake_at(self._next_start)
                    break
                self._next_start = max(now, self._next_start) + interval
            self.active += 1
            d = self._waiting.popleft()
            self._told = max(0, self._told - 1)
            soon = self._soon.pop(d, None)
            if soon is not None:
                _tell(soon)
            d.callback(None)
        self._tell()

    def _wake_at(self, when: float) -> None:
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= when:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._pump)


def _clock_time(when: float | None) -> str | None:
    """A time of day for status texts (UTC, as the log's)."""
    if when is None:
        return None
    return time.strftime("%H:%M:%S", time.gmtime(when))

"""
The delivery engine of one node: claims due entries, hands them to the route's
transport, asks the policy what the replies mean and records the verdict.

- The node that accepts a message tries it at once (``kick``), without
  waiting for a scan.
- Otherwise the engine sleeps until the spool says the next entry is due
  (``ISpoolStore.next_due``), capped at ``max_scan_interval`` so entries that
  other processes add are seen too.  An idle spool costs one query a cap.
- A route's ``max_connections`` (and ``max_rate``) bound all nodes together:
  each node asks the store for its share (``IRouteCoordination.share``) when
  it has more to send than its share allows and every ``share_seconds``
  while it uses one, and its transport keeps no more connections open, idle
  ones included (``IPooledTransport``).  A node that dies stops asking and
  its share lapses.  At most ``batch`` entries are leased by the node at a
  time.
- A route that was down or deferring and comes back answering 5xx to every
  recipient is a rebuilt server rejecting everything, not a set of unknown
  users: the rejected entries are held instead of bounced, and once
  ``reject_storm_recipients`` distinct recipients were rejected within
  ``reject_storm_window`` the route enters the hub-wide state
  ``rejecting`` (``IRouteCoordination.set_route_state``): its entries are
  held, new mail for it too, one probe per ``probe_seconds`` still goes, and
  the state ends when a probe is delivered or an operator acts
  (``mailhub route release``/``confirm``).

The engine owns no socket and no clock of its own: the store, the transports,
the policy and the reactor are given to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import evolve
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.archive.route import is_archive_route
from mailhub.config import DeliveryConfig
from mailhub.delivery.throttle import FIRST_PAUSE, RouteThrottle, is_route_failure
from mailhub.interfaces import (
    IDeliveryPolicy,
    IPooledTransport,
    IRouteCoordination,
    ISpoolControl,
    ISpoolStore,
    ITransport,
)
from mailhub.model import (
    Action,
    Address,
    Attempt,
    Decision,
    Entry,
    EntryFilter,
    Envelope,
    Lease,
    LeaseLost,
    Outcome,
    Reply,
    StoreUnavailable,
    is_back_pressure,
    new_entries,
)
from mailhub.stats import DeliveryStats

__all__ = ["DeliveryEngine"]

Bounce = Callable[[Entry, Sequence[Outcome], bytes, float], Deferred]
Delivered = Callable[[Entry, Sequence[Address], float], None]


class DeliveryEngine(Service):
    """
    :param node: this node's name.
    :param transport_for: gives the ``ITransport`` of a route (text form).
    :param pacing_for: gives ``(max_connections, longest back-pressure pause in
        seconds[, max_rate])`` of a route, for the whole hub.
    :param bounce: enqueues the DSN for failed outcomes; the engine waits for
        it before recording the attempt, so a crash can repeat a DSN but never
        lose one.
    :param delivered: told of the recipients of an entry that its route's
        server accepted, and when (``mailhub.archive.delivered``); it must
        return at once, the engine does not wait for it.
    :param delay_notices: a ``mailhub.delivery.delay.DelayNotices``, or
        ``None`` for no delay notices.
    """

    log = Logger()

    def __init__(
        self,
        node: str,
        store: ISpoolStore,
        policy: IDeliveryPolicy,
        transport_for: Callable[[str], ITransport],
        pacing_for: Callable[[str], tuple[Any, ...]],
        bounce: Bounce,
        clock: IReactorTime,
        settings: DeliveryConfig,
        delivered: Delivered | None = None,
        delay_notices: Any = None,
        later: Callable[[str, float], tuple[float, Reply] | None] | None = None,
    ) -> None:
        self.node = node
        #: ``later(route, created)``: for an entry of ``route`` accepted at
        #: ``created``, ``(when, reply)`` to defer it until ``when`` without
        #: trying it (the archive yielding to a burst: ``ArchiveGate.later``),
        #: or ``None`` to try it now.
        self._later = later
        self._delivered = delivered
        self._delay_notices = delay_notices
        self._store = store
        self._policy = policy
        self._transport_for = transport_for
        self._pacing_for = pacing_for
        self._bounce = bounce
        self._clock = clock
        self._settings = settings
        self._throttles: dict[str, RouteThrottle] = {}
        self._recovered_at: dict[str, float] = {}
        self._active: set[Deferred[None]] = set()
        self._timer: IDelayedCall | None = None
        self._scanning = False
        self._rescan = False
        self._more = False
        self._reserved = 0
        self._recording = 0
        self._arriving: set[Deferred[None]] = set()
        self.attempts_made = 0
        #: Plain counts for the metrics (``mailhub.web.metrics``).
        self.stats = DeliveryStats(clock)
        self._coordination = IRouteCoordination(store, None)
        self._asking: set[str] = set()
        self._ask_again: set[str] = set()
        self._short: set[str] = set()
        #: Routes whose last share was less than this node held then: once
        #: it holds no more than its share, it says so at once
        #: (``_shrunk``), so that the other nodes get their part of the
        #: route without waiting a tick.
        self._over: set[str] = set()
        self._share_failing = False
        self._tick_timer: IDelayedCall | None = None
        #: Routes given less than they asked for: asked again a quarter of a
        #: tick later (``_reask``), as the node holding the rest gives it
        #: back when its attempts end, not at a tick.
        self._reasks: dict[str, IDelayedCall] = {}
        self._ticking: Deferred[None] | None = None
        #: Hub-wide route states (``rejecting``), as last read from the store.
        self.route_states: dict[str, dict[str, Any]] = {}
        self._watches: dict[str, _RejectWatch] = {}
        self._probed_at: dict[str, float] = {}
        self._probe_released: dict[str, float] = {}
        self._probe_ids: set[str] = set()
        self._suspended_count: dict[str, int] = {}
        self._suspended_logged: dict[str, float] = {}
        self._drains: dict[str, dict[str, Any]] = {}
        self.last_drains: dict[str, dict[str, Any]] = {}
        self._drain_checked = float("-inf")

    # -- service ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.wake()
        self._schedule_tick()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._tick_timer is not None and self._tick_timer.active():
            self._tick_timer.cancel()
        self._tick_timer = None
        for call in self._reasks.values():
            if call.active():
                call.cancel()
        self._reasks.clear()
        for throttle in self._throttles.values():
            throttle.cancel_waiting()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await self._settle()
        if self._ticking is not None:
            await DeferredList([self._ticking], consumeErrors=True)
        # Give the shares back at once: the other nodes need not wait for them to lapse.
        if self._coordination is not None:
            now = self._clock.seconds()
            gives = [
                self._coordination.share(route, self.node, 0, 0, t.maximum, now, self._share_ttl())
                for route, t in self._throttles.items()
                if t.share
            ]
            await DeferredList(gives, consumeErrors=True)

    async def _settle(self) -> None:
        """
        Wait for the attempts in flight and for leases still on their way
        from the store (``accept``): those are given back as they come, and
        the givings back waited for too, so that none is left to expire in a
        store closed after this.
        """
        while self._active or self._arriving:
            await DeferredList(list(self._active | self._arriving), consumeErrors=True)

    # -- scheduling ------------------------------------------------------

    def _room(self) -> int:
        """
        How many more entries this node may lease: ``batch`` less those it
        holds that are waiting for or on their route, or on their way
        (``accept``).  Attempts done with their route and only being
        recorded do not count: the spool's write is not the route's business,
        and a backlog must not stall behind the writer's latency.
        """
        return self._settings.batch - (self.in_flight - self._recording) - self._reserved

    def _refill(self) -> None:
        """Claim more once half the batch is free, if the last claim left some behind."""
        if self._more and self._room() >= self._settings.batch // 2:
            self.wake()

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def accept(
        self, envelope: Envelope, message: bytes, routes: Mapping[str, Sequence[Address]]
    ) -> Deferred[str]:
        """
        Spool a message this node accepted, one entry per route, and make its
        first attempt at once.

        With room in ``batch``, the entries are stored already leased to this
        node (``ISpoolStore.enqueue_leased``: one write, no claim), those of a
        route known to be down with that first attempt already decided
        (``decide_while_down``), and the attempts start with the message in
        hand.  Without room (or with the engine stopped) they are stored
        reserved for this node, and claimed as room frees up.

        :returns: a Deferred firing with the first entry id once the spool has
            the message durably; it fails if the store could not take it.
        """
        count = len(routes)
        if not count or not self.running or self._room() < count:
            enqueued = self.stats.timed("enqueue", self._store.enqueue(envelope, message, routes, self.node))
            return enqueued.addCallback(self._spooled, message)
        # The room is kept until the leases come back: other claims must not take it.
        self._reserved += count
        try:
            decided = {}
            down = {route: rcpts for route, rcpts in routes.items() if self.route_suspended(route)}
            for entry in new_entries(envelope, len(message), down, self.node, "", lambda: ""):
                settled = self.decide_while_down(entry)
                if settled is not None:
                    decided[entry.route] = settled
            yielded = self._defer_new(envelope, message, routes, down)
            decided.update(yielded)
            d = self.stats.timed("enqueue_leased", self._store.enqueue_leased(
                envelope, message, routes, self.node, self._settings.lease_seconds, decided or None
            ))
        except BaseException:
            # A policy or store that raises here must not keep the room.
            self._reserved -= count
            raise
        # Stopping waits for these leases, to give them back rather than let
        # them expire in a store closed after the engine.
        arrived: Deferred[None] = Deferred()
        self._arriving.add(arrived)

        def stored(results: list[Lease | Entry]) -> str:
            self._reserved -= count
            self._attempt_leased([r for r in results if isinstance(r, Lease)], message)
            for r in results:
                if isinstance(r, Entry) and r.route in yielded:
                    self.stats.count(r.route, "yielded")
                elif isinstance(r, Entry):
                    self.attempts_made += 1
                    self._suspended_count[r.route] = self._suspended_count.get(r.route, 0) + 1
                    self.stats.count(r.route, "suspended")
            first = results[0]
            return first.entry.id if isinstance(first, Lease) else first.id

        def failed(f: Failure) -> Failure:
            self._reserved -= count
            return f

        def done(result: object) -> object:
            self._arriving.discard(arrived)
            arrived.callback(None)
            return result

        return d.addCallbacks(stored, failed).addBoth(done)

    def _defer_new(
        self, envelope: Envelope, message: bytes, routes: Mapping[str, Sequence[Address]],
        down: Mapping[str, Sequence[Address]],
    ) -> dict[str, tuple[Attempt, Decision]]:
        """
        The new entries ``later`` defers (``accept``): each stored with a
        deferral, as a route that is down stores its first attempt, instead
        of being leased, so that none waits on its route while holding a
        place in the batch.
        """
        if self._later is None:
            return {}
        now = self._clock.seconds()
        wanted = {}
        for route, rcpts in routes.items():
            if route not in down:
                later = self._later(route, envelope.received_at)
                if later is not None:
                    wanted[route] = (rcpts, later)
        if not wanted:
            return {}
        entries = new_entries(envelope, len(message), {r: w[0] for r, w in wanted.items()}, self.node, "", lambda: "")
        out = {}
        for entry in entries:
            when, reply = wanted[entry.route][1]
            replies = tuple((a, reply) for a in entry.pending)
            out[entry.route] = (
                Attempt("", self.node, now, now, replies),
                Decision(tuple(Outcome(a, Action.RETRY, reply) for a in entry.pending), next_attempt=when),
            )
        return out

    def _spooled(self, ids: list[str], message: bytes) -> str:
        if self.running:
            self.kick(ids, message).addErrback(
                lambda f: self.log.failure("immediate attempt of {ids} failed", f, ids=ids)
            )
        return ids[0]

    def _attempt_leased(self, leases: Sequence[Lease], message: bytes) -> None:
        """Try entries this node holds leases on from ``accept``; an engine stopped since gives them back."""
        if not self.running:
            now = self._clock.seconds()
            for lease in leases:
                released = self._store.release(lease, now).addErrback(
                    lambda f, entry: self.log.failure("could not release {entry}", f, entry=entry),
                    lease.entry.id,
                )
                self._active.add(released)
                released.addBoth(lambda _, d=released: self._active.discard(d))
            return
        for lease in leases:
            self._dispatch(lease, message)

    def route_suspended(self, route: str) -> bool:
        """
        Whether attempts on ``route`` are being deferred without connecting
        right now (it is down and no probe is due): ``decide_while_down``
        can only decide for such a route.
        """
        throttle = self._throttles.get(route)
        # would_suspend, not suspended: a probe that is due is left to the
        # entry's own attempt, which takes it.
        return bool(self.running) and throttle is not None and throttle.would_suspend()

    def decide_while_down(self, entry: Entry) -> tuple[Attempt, Decision] | None:
        """
        The first attempt of a new entry, decided at once if its route is down
        on this node and not due for a probe: deferred without connecting, as
        every attempt on the route is until a probe gets through.  The node
        then stores the entry with that attempt (``ISpoolStore.enqueue_leased``
        with ``decided``) instead of leasing it, attempting it and recording
        the same deferral in a second write.

        :param entry: the entry as it will be stored (its id does not matter).
        :returns: the attempt (``entry_id`` left empty) and the decision, or
            ``None``: attempt the entry as usual (the route is up, or this
            entry is its probe, or the policy wants more than a retry).
        """
        if not self.route_suspended(entry.route):
            return None
        now = self._clock.seconds()
        replies = self._suspended_replies(entry, self._throttles[entry.route])
        decision = self._policy.decide(entry, replies, now, self.node)
        if decision.next_attempt is None or any(o.action is not Action.RETRY for o in decision.outcomes):
            return None
        return Attempt("", self.node, now, now, tuple((a, replies[a]) for a in entry.pending)), decision

    def kick(self, ids: Sequence[str], message: bytes | None = None) -> Deferred[int]:
        """
        Claim and try the given entries now: the accepting node's first attempt.

        Beyond ``batch`` entries in flight the node takes no more leases: the
        entries stay reserved for it and the next scan claims them, so no lease
        can run out while its entry waits behind hundreds of others.

        :returns: a Deferred firing with the number of entries claimed.
        """
        room = self._room()
        if room < len(ids):
            self._more = True
            if room <= 0:
                return succeed(0)
        return ensureDeferred(self._claim(list(ids)[: max(room, 0)], message=message))

    def retry_now(self) -> None:
        """
        The operator made entries due (``mailhub queue flush``/``release``):
        routes this node saw down are tried again rather than deferred
        without connecting for up to ``probe_seconds`` (each would be
        deferred another retry interval), and the spool is scanned now.
        """
        for throttle in self._throttles.values():
            throttle.retry_now()
        self.wake()

    def wake(self) -> None:
        """Scan the spool for due entries as soon as possible."""
        if not self.running:
            return
        if self._scanning:
            self._rescan = True
            return
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self._clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._scan)

    def _scan(self) -> Deferred[None]:
        self._timer = None
        return ensureDeferred(self._scan_once())

    async def _scan_once(self) -> None:
        if self._scanning or not self.running:
            return
        self._scanning = True
        delay = self._settings.max_scan_interval
        try:
            while self.running:
                self._rescan = False
                room = self._room()
                if room <= 0:
                    self._more = True
                    break
                claimed = await self._claim(None, room)
                self._more = claimed == room
                if not self._more and not self._rescan:
                    break
            now = self._clock.seconds()
            due = await self.stats.timed("next_due", self._store.next_due(self.node, now, self._settings.takeover_seconds))
            if due is not None:
                # An entry due now that we could not claim is racing another
                # node's claim, or waits for room: look again shortly, never
                # in a tight loop.
                wait = due - now
                delay = min(wait if wait > 0 else 1.0, delay)
        except StoreUnavailable as e:
            self.log.warn("scan of the spool failed: {why}; trying again in 5 s", why=str(e))
            delay = 5.0
        except Exception:
            self.log.failure("scan of the spool failed; trying again in 5 s")
            delay = 5.0
        finally:
            self._scanning = False
        if self.running:
            self._schedule(delay)

    async def _claim(self, ids: list[str] | None, limit: int | None = None, message: bytes | None = None) -> int:
        s = self._settings
        leases = await self.stats.timed("claim", self._store.claim(
            self.node,
            self._clock.seconds(),
            limit if limit is not None else len(ids or ()),
            s.lease_seconds,
            s.takeover_seconds,
            ids,
        ))
        for lease in leases:
            self._dispatch(lease, message)
        return len(leases)

    def _dispatch(self, lease: Lease, message: bytes | None = None) -> None:
        d = ensureDeferred(self._attempt(lease, message))
        self._active.add(d)

        def done(result: object) -> None:
            self._active.discard(d)
            self._refill()

        d.addErrback(self._attempt_failed, lease)
        d.addBoth(done)

    def _attempt_failed(self, failure: Failure, lease: Lease) -> None:
        if failure.check(StoreUnavailable):
            # The store is down: the lease will expire and the entry be tried
            # again; one line per attempt is enough to say so.
            self.log.warn(
                "entry {entry}: attempt not recorded, spool store unavailable ({why}); it will be retried",
                entry=lease.entry.id,
                why=failure.getErrorMessage(),
            )
        else:
            self.log.failure("attempt on {entry} failed", failure, entry=lease.entry.id)

    def throttle(self, route: str) -> RouteThrottle:
        """The pacing of ``route`` on this node."""
        throttle = self._throttles.get(route)
        if throttle is None:
            pacing = tuple(self._pacing_for(route))
            maximum, pause = int(pacing[0]), float(pacing[1])
            rate = float(pacing[2]) if len(pacing) > 2 and pacing[2] else None
            throttle = self._throttles[route] = RouteThrottle(
                maximum,
                self._clock,
                max_pause=pause,
                probe=self._settings.probe_seconds,
                rate=rate,
                on_demand=lambda: self._ask_share(route),
            )
            if self._coordination is not None:
                # Nothing may start before the store gives this node a share:
                # ask for one at once, for the attempt that is about to wait.
                throttle.share = 0
                self._ask_share(route, 1)
        return throttle

    def repace(self) -> None:
        """
        Read every route's pacing again (``pacing_for``: after a reload of
        the configuration).  A route's window, state and counts stay; the
        new ``max_connections`` applies from the next attempt.
        """
        for route, throttle in self._throttles.items():
            pacing = tuple(self._pacing_for(route))
            maximum, pause = max(1, int(pacing[0])), max(float(pacing[1]), FIRST_PAUSE)
            rate = float(pacing[2]) if len(pacing) > 2 and pacing[2] else None
            if (maximum, pause, rate) == (throttle.maximum, throttle._max_pause, throttle.rate):
                continue
            if self._coordination is None:
                throttle.share = maximum  # with shares, the next ask says the new maximum
            throttle.maximum, throttle.rate, throttle._max_pause = maximum, rate, pause
            throttle.window = min(throttle.window, float(maximum))
            throttle.set_share(min(throttle.share, maximum))

    def status(self) -> dict[str, Any]:
        """What this node's engine is doing, per route: for operators watching a backlog drain."""
        routes = {}
        for route, t in sorted(self._throttles.items()):
            status = t.status()
            state = self.route_states.get(route)
            if state is not None and state.get("state") == "rejecting":
                status["state"] = "rejecting"
                status["why"] = (
                    f"REJECTING since {_utc(state.get('since'))}: every recipient refused"
                    f" ({state.get('reply')}); its entries are held, no DSN is sent;"
                    f" 'mailhub route release {route}' retries them,"
                    f" 'mailhub route confirm {route}' bounces them"
                )
            if route in self._drains:
                status["drain"] = dict(self._drains[route])
            if route in self.last_drains:
                status["last_drain"] = dict(self.last_drains[route])
            routes[route] = status
        return {
            "node": self.node,
            "in_flight": self.in_flight,
            "attempts": self.attempts_made,
            "routes": routes,
            "route_states": dict(self.route_states),
        }

    # -- the hub-wide budget -----------------------------------------------

    def _share_ttl(self) -> float:
        s = self._settings
        return max(3 * s.heartbeat_seconds, 5 * s.share_seconds)

    def _ask_share(self, route: str, want: int | None = None) -> None:
        """Ask the store for this node's share of ``route``'s connections (one request at a time)."""
        if self._coordination is None or not self.running:
            return
        throttle = self._throttles.get(route)
        if throttle is None:
            return
        if want is None:
            if route in self._short:
                # The last answer gave less than asked: the others hold the
                # rest; ask again at the next tick, not at every attempt.
                return
            want = throttle.demand()
        if route in self._asking:
            self._ask_again.add(route)
            return
        self._asking.add(route)
        d = self._coordination.share(
            route, self.node, want, throttle.active, throttle.maximum, self._clock.seconds(), self._share_ttl()
        )

        def given(share: int) -> None:
            if share < want:
                self._short.add(route)
                call = self._reasks.get(route)
                if self.running and (call is None or not call.active()):
                    self._reasks[route] = self._clock.callLater(self._settings.share_seconds / 4, self._reask, route)
            if share < throttle.active:
                self._over.add(route)
            else:
                self._over.discard(route)
            if share != throttle.share:
                throttle.set_share(share)
                pooled = IPooledTransport(self._transport_for(route), None)
                if pooled is not None:
                    pooled.limit_connections(share)
            if self._share_failing:
                self.log.info("route shares answered again")
                self._share_failing = False

        def failed(f: Failure) -> None:
            if not self._share_failing:
                self.log.warn(
                    "share of {route} not given: {why}; keeping {share}",
                    route=route,
                    why=f.getErrorMessage(),
                    share=throttle.share,
                )
            self._share_failing = True

        def done(_: object) -> None:
            self._asking.discard(route)
            if route in self._ask_again:
                self._ask_again.discard(route)
                if throttle.demand() > throttle.share:
                    self._ask_share(route)

        d.addCallbacks(given, failed).addBoth(done)

    def _reask(self, route: str) -> None:
        self._reasks.pop(route, None)
        throttle = self._throttles.get(route)
        if throttle is not None and throttle.demand() > throttle.share:
            self._ask_share(route, throttle.demand())

    def _shrunk(self, route: str, throttle: RouteThrottle) -> None:
        """Tell the store as soon as this node holds no more than a share it was given below what it held."""
        if route in self._over and throttle.active <= throttle.share:
            self._over.discard(route)
            self._ask_share(route, throttle.demand())

    def _schedule_tick(self) -> None:
        if self.running:
            self._tick_timer = self._clock.callLater(self._settings.share_seconds, self._on_tick)

    def _on_tick(self) -> None:
        self._tick_timer = None
        if self._ticking is None:
            self._ticking = ensureDeferred(self._tick())

            def done(_: object) -> None:
                self._ticking = None

            self._ticking.addErrback(lambda f: self.log.failure("route upkeep failed", f)).addBoth(done)
        self._schedule_tick()

    async def _tick(self) -> None:
        """Every ``share_seconds``: renew shares, read route states, log what waited, see drains end."""
        now = self._clock.seconds()
        self._short.clear()
        for route, throttle in list(self._throttles.items()):
            want = max(throttle.peak_demand, throttle.demand())
            throttle.peak_demand = throttle.demand()
            if self._coordination is not None and (want or throttle.share):
                if want < throttle.share:
                    # Close what this node will give back before the others
                    # may take it: the server never sees both at once.
                    pooled = IPooledTransport(self._transport_for(route), None)
                    if pooled is not None:
                        pooled.limit_connections(max(want, throttle.active))
                self._ask_share(route, want)
            self._log_suspended(route, now)
        if self._coordination is not None:
            try:
                states = await self._coordination.route_states()
            except Exception as e:
                self.log.debug("route states not read: {why}", why=str(e))
            else:
                await self._states_read(states)
        await self._probe_rejecting(now)
        await self._probe_down(now)
        if self._drains and now - self._drain_checked >= 5 * self._settings.share_seconds:
            self._drain_checked = now
            await self._check_drains(now)

    # -- reject storms -----------------------------------------------------

    async def _states_read(self, states: dict[str, dict[str, Any]]) -> None:
        before = self.route_states
        self.route_states = dict(states)
        for route, state in before.items():
            if state.get("state") == "rejecting" and route not in states:
                self.log.info("route {route} is no longer REJECTING", route=route)
                self._watches.pop(route, None)
                self._start_drain(route)
                self.wake()
            elif state.get("state") == "down" and route not in states:
                # Another node delivered on it (_clear_down): the route is up
                # here too, or this node would go on deferring new mail
                # without connecting and holding a 5xx as a rebuilt server's.
                throttle = self._throttles.get(route)
                if throttle is not None and throttle.came_back():
                    self.log.info("route {route} is back (another node delivered on it)", route=route)
                    self.wake()

    def _publish_down(self, route: str, throttle: RouteThrottle) -> None:
        """
        Tell the other nodes that ``route`` is down: a node that did not see
        the outage then treats a 5xx for new mail as a suspected reject
        storm too, not as one unknown user.
        """
        if self._coordination is None or route in self.route_states:
            return
        state = {"state": "down", "since": self._clock.seconds(), "reply": str(throttle.last_reply), "node": self.node}
        self.route_states[route] = state
        self._coordination.set_route_state(route, state).addErrback(
            lambda f: self.log.debug("route state not written: {why}", why=f.getErrorMessage())
        )

    def _clear_down(self, route: str) -> None:
        if self._coordination is None or self.route_states.get(route, {}).get("state") != "down":
            return
        del self.route_states[route]
        self._coordination.set_route_state(route, None).addErrback(
            lambda f: self.log.debug("route state not cleared: {why}", why=f.getErrorMessage())
        )

    def route_down_since(self, route: str) -> float | None:
        """Since when ``route`` is down, as this node saw it or another node said; ``None`` if it is not."""
        state = self.route_states.get(route) or {}
        if state.get("state") == "down" and isinstance(state.get("since"), int | float):
            return float(state["since"])
        throttle = self._throttles.get(route)
        return throttle.down_since if throttle is not None and throttle.down else None

    def _rejecting(self, route: str) -> dict[str, Any] | None:
        state = self.route_states.get(route)
        return state if state is not None and state.get("state") == "rejecting" else None

    def _storm_decision(
        self, entry: Entry, replies: Mapping[Address, Reply], decision: Decision, now: float
    ) -> Decision:
        """
        The policy's decision, unless the route is (or looks like) a server
        rejecting everything: then rejected recipients are held, not failed.
        """
        route = entry.route
        delivered = any(o.action is Action.DELIVERED for o in decision.outcomes)
        rejected = [o for o in decision.outcomes if o.action in (Action.FAILED, Action.HOLD) and o.reply.permanent]
        if self._rejecting(route) is not None:
            if delivered:
                ensureDeferred(self._end_storm(route, f"it delivered {entry.id}"))
            return _held(decision)
        threshold = self._settings.reject_storm_recipients
        if threshold <= 0:
            return decision
        watch = self._watches.get(route)
        if delivered:
            held = watch.clear() if watch is not None else []
            if held:
                ensureDeferred(self._release_entries(route, held))
            return decision
        if not (rejected and replies and all(r.permanent for r in replies.values())):
            return decision
        if watch is None:
            watch = self._watches[route] = _RejectWatch(self._settings.reject_storm_window)
        last = entry.last_reply
        suspect = (
            self.throttle(route).troubled
            or watch.recent(now)
            or (last is not None and last.temporary)
            or self.route_states.get(route, {}).get("state") == "down"
        )
        if not suspect:
            return decision
        count = watch.add(now, [o.recipient for o in rejected], entry.id)
        if count >= threshold:
            ensureDeferred(self._start_storm(route, rejected[0].reply, now, count))
        return _held(decision)

    async def _start_storm(self, route: str, reply: Reply, now: float, count: int) -> None:
        if self._rejecting(route) is not None:
            return
        state = {"state": "rejecting", "since": now, "reply": str(reply), "node": self.node, "recipients": count}
        self.route_states[route] = state
        self.log.error(
            "route {route} is REJECTING: {count} recipients refused ({reply}) after it was down or"
            " deferring; its entries are held and no DSN is sent.  When the server is fixed:"
            " 'mailhub route release {route}' (or it ends by itself when a probe is delivered);"
            " if the rejections are real: 'mailhub route confirm {route}' bounces them",
            route=route,
            count=count,
            reply=str(reply),
        )
        try:
            if self._coordination is not None:
                await self._coordination.set_route_state(route, state)
            held = await hold_route(self._store, route)
        except Exception:
            self.log.failure("could not hold the entries of {route}", route=route)
            return
        self.log.info("route {route}: {count} entries held while it is REJECTING", route=route, count=held)

    async def _end_storm(self, route: str, why: str) -> None:
        if self._rejecting(route) is None:
            return
        self.route_states.pop(route, None)
        self._watches.pop(route, None)
        try:
            if self._coordination is not None:
                await self._coordination.set_route_state(route, None)
            released = await release_route(self._store, route, self._clock.seconds())
        except Exception:
            self.log.failure("could not release the entries of {route}", route=route)
            return
        self.log.info(
            "route {route} accepts mail again ({why}): no longer REJECTING, {count} held entries released",
            route=route,
            why=why,
            count=released,
        )
        self._start_drain(route)
        self.wake()

    async def _release_entries(self, route: str, ids: Sequence[str]) -> None:
        """Entries held because the route looked like it was rejecting everything, and was not."""
        now = self._clock.seconds()
        for entry_id in ids:
            try:
                await self._store.release_held(entry_id, now)
            except Exception:
                self.log.failure("could not release {entry}", entry=entry_id)
        self.log.info(
            "route {route} delivers again: {count} entries held on suspicion of a reject storm released",
            route=route,
            count=len(ids),
        )
        self.wake()

    async def _probe_rejecting(self, now: float) -> None:
        """While a route is rejecting, one held entry per ``probe_seconds`` goes again: the probe."""
        every = self._settings.probe_seconds
        for route in [r for r in self.route_states if self._rejecting(r) is not None]:
            last = max(self._probed_at.get(route, float("-inf")), self._probe_released.get(route, float("-inf")))
            if now - last < every:
                continue
            self._probe_released[route] = now
            try:
                held = await self._store.entries(EntryFilter(route=route, held=True), 0, 1)
                if held:
                    self._probe_ids.add(held[0].id)
                    await self._store.release_held(held[0].id, now)
                    self.wake()
            except Exception as e:
                self.log.debug("probe of {route} not released: {why}", route=route, why=str(e))

    async def _probe_down(self, now: float) -> None:
        """
        While a route is down on this node, its probe goes every
        ``probe_seconds`` even when none of its entries is due: the one due
        soonest is made due now and tried, once the probe has waited a tick
        for a new message to take it.  Otherwise a server that came back
        would be found only at the backlog's next retry, up to a retry
        interval later, while ``mailhub status`` said a probe was due.
        """
        control = ISpoolControl(self._store, None)
        if control is None:
            return
        grace = self._settings.share_seconds
        for route, throttle in list(self._throttles.items()):
            if not throttle.probe_overdue(grace) or throttle.active or self._rejecting(route) is not None:
                continue
            if now - self._probe_released.get(route, float("-inf")) < self._settings.probe_seconds:
                continue
            self._probe_released[route] = now
            try:
                first = await self._store.entries(EntryFilter(route=route, held=False), 0, 1)
                # One that is due is tried by the scan anyway: it is the probe.
                if first and first[0].next_attempt > now and await control.requeue(first[0].id, now) == "requeued":
                    self.log.debug("probe of {route}: entry {entry}", route=route, entry=first[0].id)
                    await self.kick([first[0].id])
            except Exception as e:
                self.log.debug("probe of {route} not made: {why}", route=route, why=str(e))

    def _probe_due(self, route: str) -> bool:
        now = self._clock.seconds()
        if now - self._probed_at.get(route, float("-inf")) >= self._settings.probe_seconds:
            self._probed_at[route] = now
            return True
        return False

    # -- drains --------------------------------------------------------------

    def _start_drain(self, route: str) -> None:
        if route not in self._drains:
            self._drains[route] = {
                "started": self._clock.seconds(),
                "delivered": 0,
                "deferred": 0,
                "back_pressure": 0,
                "failed": 0,
                "peak_connections": 0,
            }

    def _count_drain(self, route: str, concurrent: int, replies: Sequence[Reply]) -> None:
        """Count an attempt in the route's drain; ``concurrent``: the connections open with it."""
        drain = self._drains.get(route)
        if drain is None or not replies:
            return
        drain["peak_connections"] = max(drain["peak_connections"], concurrent)
        if any(r.ok for r in replies):
            drain["delivered"] += 1
        elif any(is_back_pressure(r) for r in replies):
            drain["back_pressure"] += 1
        elif all(r.permanent for r in replies):
            drain["failed"] += 1
        else:
            drain["deferred"] += 1

    async def _check_drains(self, now: float) -> None:
        try:
            counts = await self._store.counts()
        except Exception:
            return
        backlog = counts.get("routes", {})
        for route, drain in list(self._drains.items()):
            if backlog.get(route, 0):
                continue
            del self._drains[route]
            if not any(drain[k] for k in ("delivered", "deferred", "back_pressure", "failed")):
                continue  # the other nodes drained it: nothing to report from here
            report = dict(drain, finished=now, seconds=round(max(0.0, now - drain["started"]), 1))
            self.last_drains[route] = report
            self.log.info(
                "{line}",
                line=(
                    f"route {route} drained: {report['delivered']} entries delivered by {self.node} in"
                    f" {report['seconds']} s, peak {report['peak_connections']} connections from this node,"
                    f" {report['back_pressure']} back-pressure replies, {report['deferred']} other 4xx,"
                    f" {report['failed']} failed"
                ),
            )

    # -- suspended attempts ------------------------------------------------

    def _log_suspended(self, route: str, now: float) -> None:
        """One line per route and ``probe_seconds`` for attempts deferred without connecting."""
        count = self._suspended_count.get(route, 0)
        if not count or now - self._suspended_logged.get(route, float("-inf")) < self._settings.probe_seconds:
            return
        self._suspended_count[route] = 0
        self._suspended_logged[route] = now
        throttle = self._throttles.get(route)
        if throttle is not None and not throttle.down:
            # It came back since: say what happened while it was down, not that it is.
            self.log.info(
                "route {route} was down: {count} attempts were deferred without connecting before it came back",
                route=route,
                count=count,
            )
            return
        self.log.info(
            "route {route} is down: {count} attempts deferred without connecting since the last line"
            " (last probe: {reply})",
            route=route,
            count=count,
            reply=str(throttle.last_reply) if throttle else None,
        )

    async def _flush_route(self, route: str) -> None:
        try:
            count = await self._store.flush(route, self._clock.seconds())
        except Exception:
            self.log.failure("could not release the backlog of {route}", route=route)
            return
        self.log.info("route {route} is back: {count} deferred entries due now", route=route, count=count)
        self.wake()

    # -- one attempt -----------------------------------------------------

    async def _attempt(self, lease: Lease, message: bytes | None = None) -> None:
        entry = lease.entry
        later = None if self._later is None else self._later(entry.route, entry.created)
        if later is not None:
            await self._put_off(lease, *later)
            return
        throttle = self.throttle(entry.route)
        body: Deferred[bytes] | None = None

        def read_ahead() -> None:
            # Read the body while the attempt waits for its turn on the route.
            nonlocal body
            body = self.stats.timed("body", self._store.body(entry.message_id))

        tries = 0
        while True:
            try:
                await throttle.acquire(read_ahead if message is None and _prefetch(entry, throttle) else None)
            except CancelledError:
                # Stopping while this entry waited for its turn: give it back.
                _drop(body)
                await self._store.release(lease, self._clock.seconds())
                return
            if self._clock.seconds() > lease.expires - self._settings.lease_seconds / 2:
                # It waited (back pressure) for half its lease: a fresh claim is
                # safer than an attempt that may outlive the lease.
                _drop(body)
                throttle.release(())
                await self._store.release(lease, self._clock.seconds())
                self.wake()
                return
            later = None if self._later is None else self._later(entry.route, entry.created)
            if later is not None:
                # Put off while it waited for its turn: give the turn back.
                _drop(body)
                throttle.release(())
                await self._put_off(lease, *later)
                return
            suspended = throttle.suspended()
            started = self._clock.seconds()
            replies: dict[Address, Reply] = {}
            storm = self._rejecting(entry.route)
            probe = entry.id in self._probe_ids
            self._probe_ids.discard(entry.id)
            if storm is not None and not suspended and not probe and self._coordination is not None:
                # An operator may have ended the state a moment ago (and
                # released this entry): ask the store, not the last tick.
                try:
                    await self._states_read(await self._coordination.route_states())
                except Exception as e:
                    self.log.debug("route states not read: {why}", why=str(e))
                storm = self._rejecting(entry.route)
            if storm is not None and not suspended and not (probe or self._probe_due(entry.route)):
                # Held without connecting: the route refuses everything, and its
                # probe for this interval went already.
                _drop(body)
                throttle.release(())
                # The storm's reply by its code only: its text was for another
                # recipient, and this reply may reach this entry's sender.
                code = " ".join(str(storm.get("reply") or "").split()[:2])
                reply = Reply(
                    450, "4.7.1", f"held: {entry.route} is REJECTING every recipient since {_utc(storm.get('since'))}"
                    f" ({code}); not tried"
                )
                await self._conclude(lease, message, dict.fromkeys(entry.pending, reply), started, held=True)
                return
            try:
                if not self.running:
                    _drop(body)
                    await self._store.release(lease, self._clock.seconds())
                    return
                if suspended:
                    _drop(body)
                    replies = self._suspended_replies(entry, throttle)
                else:
                    if message is None:
                        try:
                            message = await (body or self.stats.timed("body", self._store.body(entry.message_id)))
                        except KeyError:
                            self.log.error(
                                "entry {entry}: message body {message} is missing",
                                entry=entry.id,
                                message=entry.message_id,
                            )
                            return
                    replies = await self._send(entry, message)
            finally:
                # The route's slot is free as soon as the transport is done: the
                # record below is the spool's business, not the route's.  A
                # suspended attempt taught nothing about the route.
                was_down = throttle.down
                # This attempt's and the others' connections, before the release lets a waiting one start.
                concurrent = throttle.active
                recovered = throttle.release(() if suspended or not replies else replies.values())
                self._shrunk(entry.route, throttle)
                if throttle.down and not was_down:
                    self._publish_down(entry.route, throttle)
                if not suspended:
                    self._count_drain(entry.route, concurrent, list(replies.values()))
            if (
                not suspended
                and replies
                and all(is_back_pressure(r) for r in replies.values())
                and tries < BACK_PRESSURE_TRIES
                and self.running
            ):
                # "Too many of us": the window narrowed (and paused a
                # moment); the entry waits for a slot in it, rather than for
                # the retry schedule, so the drain slows but does not stop.
                tries += 1
                body = None
                continue
            break
        # An entry deferred because its route was unreachable and delivered
        # now says the route is back, even if this node never saw it down.
        last = entry.last_reply
        if any(r.ok for r in replies.values()) and last is not None and is_route_failure(last):
            recovered = True
        if recovered:
            self._route_recovered(entry.route, throttle)
        if any(r.ok for r in replies.values()) and self.route_states.get(entry.route, {}).get("state") == "down":
            self._clear_down(entry.route)
        self._recording += 1
        self._refill()
        try:
            await self._conclude(lease, message, replies, started, suspended=suspended)
        finally:
            self._recording -= 1

    def _route_recovered(self, route: str, throttle: RouteThrottle) -> None:
        now = self._clock.seconds()
        if now - self._recovered_at.get(route, float("-inf")) < self._settings.lease_seconds:
            return
        self._recovered_at[route] = now
        throttle.slow_start()
        fresh = route not in self._drains
        self._start_drain(route)
        if fresh:
            # The delivery that found the route back is the drain's first.
            self._drains[route]["delivered"] += 1
            self._drains[route]["peak_connections"] = max(1, self._drains[route]["peak_connections"])
        if self._settings.flush_on_recovery:
            ensureDeferred(self._flush_route(route))

    def _suspended_replies(self, entry: Entry, throttle: RouteThrottle) -> dict[Address, Reply]:
        """The replies of an attempt deferred without connecting: the route is down (not a reply it got)."""
        # These replies reach this entry's sender in delay notices and DSNs:
        # the last probe's text only when it says how the route failed
        # (connection refused, timed out); a server's reply was to another
        # entry and may name another recipient (550 5.1.1 <eve@...>).
        last = throttle.last_reply
        if last is None:
            probe = "none yet"
        elif is_route_failure(last):
            probe = str(last)
        else:
            probe = f"{last.code} {last.enhanced}".strip()
        reply = Reply(
            451,
            "4.4.1",
            f"delivery to {entry.route} suspended: route down since {_utc(throttle.down_since)},"
            f" not tried (last probe: {probe})",
        )
        return dict.fromkeys(entry.pending, reply)

    async def _send(self, entry: Entry, message: bytes) -> dict[Address, Reply]:
        """Hand the entry to its route's transport: a reply for every pending recipient."""
        try:
            replies = dict(await self._transport_for(entry.route).deliver(entry, message))
        except Exception as e:
            self.log.failure("transport for {route} raised", route=entry.route, entry=entry.id)
            replies = {}
            failure_reply = Reply(451, "4.3.0", f"transport error: {e}")
        else:
            failure_reply = Reply(451, "4.3.0", "no reply from transport")
        for address in entry.pending:
            replies.setdefault(address, failure_reply)
        return replies

    async def _conclude(
        self,
        lease: Lease,
        message: bytes | None,
        replies: dict[Address, Reply],
        started: float,
        suspended: bool = False,
        held: bool = False,
    ) -> None:
        """
        After an attempt: decide, bounce, record, log.

        :param message: the message if the attempt had it, else it is read
            from the spool if a DSN needs it.
        :param suspended: deferred without connecting (the route is down):
            logged once per route and interval, not per entry.
        :param held: not tried, the route is rejecting: hold every recipient.
        """
        entry = lease.entry
        finished = self._clock.seconds()
        self.attempts_made += 1
        if held:
            decision = Decision(tuple(Outcome(a, Action.HOLD, replies[a]) for a in entry.pending))
        else:
            decision = self._policy.decide(entry, replies, finished, self.node)
            decision = self._storm_decision(entry, replies, decision, finished)
            decision = self._archive_kept(entry, decision, finished)
        attempt = Attempt(entry.id, self.node, started, finished, tuple((a, replies[a]) for a in entry.pending))
        if self._delivered is not None:
            accepted = [o.recipient for o in decision.outcomes if o.action is Action.DELIVERED]
            if accepted:
                try:
                    self._delivered(entry, accepted, finished)
                except Exception:
                    self.log.failure("entry {entry}: the delivery observer failed", entry=entry.id)
        bounced = [o for o in decision.outcomes if o.action in (Action.FAILED, Action.EXPIRED)]
        if bounced:
            if message is None:
                message = await self._store.body(entry.message_id)
            await self._bounce(entry, bounced, message, finished)
        if self._delay_notices is not None:
            decision, message = await self._notify_delay(entry, decision, message, finished)
        try:
            await self.stats.timed("record", self._store.record(lease, attempt, decision))
        except LeaseLost:
            self.log.warn("entry {entry}: lease lost during the attempt; another node owns it now", entry=entry.id)
            self.stats.count(entry.route, "lease_lost")
            return
        self.stats.attempt(entry, decision, suspended, finished)
        if suspended:
            self._suspended_count[entry.route] = self._suspended_count.get(entry.route, 0) + 1
            return
        self._log_attempt(entry, decision, finished)

    def _archive_kept(self, entry: Entry, decision: Decision, now: float) -> Decision:
        """
        An archive entry never expires: nothing acknowledged misses the
        archive, however long the archive stays down or full (an expired
        archive entry would drop the copy without a word, since it sends
        no DSN).  Past the policy's lifetime it is retried, every
        ``ARCHIVE_RETRY`` seconds, and the log says so at error level.
        """
        if not is_archive_route(entry.route) or not any(o.action is Action.EXPIRED for o in decision.outcomes):
            return decision
        self.log.error(
            "entry {entry} via {route}: the archive has not taken this message since {since}; kept and"
            " retried every {every:g} s, never given up ({reply})",
            entry=entry.id,
            route=entry.route,
            since=_utc(entry.created),
            every=ARCHIVE_RETRY,
            reply=str(next(o.reply for o in decision.outcomes if o.action is Action.EXPIRED)),
        )
        outcomes = tuple(
            Outcome(o.recipient, Action.RETRY, o.reply) if o.action is Action.EXPIRED else o for o in decision.outcomes
        )
        return Decision(outcomes, now + ARCHIVE_RETRY, decision.next_node)

    async def _put_off(self, lease: Lease, when: float, reply: Reply) -> None:
        """
        Defer a leased entry until ``when`` without trying it (``later``): one
        record, no policy, no log line per entry (the caller logs its state).
        """
        entry = lease.entry
        now = self._clock.seconds()
        attempt = Attempt(entry.id, self.node, now, now, tuple((a, reply) for a in entry.pending))
        decision = Decision(tuple(Outcome(a, Action.RETRY, reply) for a in entry.pending), next_attempt=when)
        try:
            await self._store.record(lease, attempt, decision)
        except LeaseLost:
            self.stats.count(entry.route, "lease_lost")
            return
        self.stats.count(entry.route, "yielded")

    async def _notify_delay(
        self, entry: Entry, decision: Decision, message: bytes | None, now: float
    ) -> tuple[Decision, bytes | None]:
        """
        Send the sender its delay notice if the attempt owes one
        (``mailhub.delivery.delay``), and mark the decision so the entry
        records it.  A notice that cannot be spooled is logged and left to
        a later attempt.
        """
        late = self._delay_notices.due(entry, decision, now)
        if not late:
            return decision, message
        try:
            if message is None:
                message = await self._store.body(entry.message_id)
            await self._delay_notices.send(entry, late, message, now)
        except Exception as e:
            self.log.warn("entry {entry}: delay notice not sent: {why}", entry=entry.id, why=str(e) or repr(e))
            return decision, message
        self.log.info(
            "entry {entry}: delay notice sent to <{sender}> for {recipients}",
            entry=entry.id,
            sender=str(entry.sender),
            recipients=", ".join(f"<{o.recipient}>" for o in late),
        )
        return evolve(decision, delay_notified=True), message

    def _log_attempt(self, entry: Entry, decision: Decision, finished: float) -> None:
        """
        One line per attempt, the mail log an operator greps: who, where,
        what each recipient got, and what happens next.  (Made as one
        f-string and logged as "{line}": see the server's "accepted message"
        line.)
        """
        later = ""
        if decision.next_attempt is not None:
            later = f"; next attempt in {decision.next_attempt - finished:.0f} s by {decision.next_node or 'any node'}"
        outcomes = ", ".join(f"<{o.recipient}> {o.action.value} ({o.reply})" for o in decision.outcomes)
        self.log.info(
            "{line}",
            line=f"entry {entry.id} via {entry.route}: {outcomes}{later}",
            entry=entry.id,
            route=entry.route,
        )


#: How many times an attempt pushed back by the server (``452 4.3.1``) waits
#: for another slot on its route before its entry goes back to the schedule.
BACK_PRESSURE_TRIES = 3

#: Bodies up to this size are read while their attempt waits for its turn.
PREFETCH_MAX_SIZE = 1024 * 1024


def _prefetch(entry: Entry, throttle: RouteThrottle) -> bool:
    """
    Whether to read an entry's body before its attempt gets its turn (once
    it is among the next ``window`` to start: ``RouteThrottle.acquire``'s
    ``soon``, so that a window's worth of bodies waits in memory, not a
    batch's): not for a route that is down (the attempt will likely be
    deferred without it), nor for a large message.
    """
    return not throttle.down and entry.size <= PREFETCH_MAX_SIZE


def _drop(body: Deferred[bytes] | None) -> None:
    """Let a prefetched body go unused (its failure, if any, is not an error)."""
    if body is not None:
        body.addErrback(lambda f: None)


#: How often an archive entry past the policy's lifetime is tried again (``_archive_kept``).
ARCHIVE_RETRY = 600.0

def _held(decision: Decision) -> Decision:
    """``decision`` with every failed recipient held instead (no DSN)."""
    if not any(o.action is Action.FAILED for o in decision.outcomes):
        return decision
    outcomes = tuple(
        Outcome(o.recipient, Action.HOLD, o.reply) if o.action is Action.FAILED else o for o in decision.outcomes
    )
    return Decision(outcomes, decision.next_attempt, decision.next_node)


class _RejectWatch:
    """The distinct recipients a route rejected lately, and the entries held for it."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._seen: dict[Address, float] = {}
        self._held: list[str] = []

    def recent(self, now: float) -> bool:
        self._trim(now)
        return bool(self._seen)

    def add(self, now: float, recipients: Sequence[Address], entry_id: str) -> int:
        for address in recipients:
            self._seen[address] = now
        self._held.append(entry_id)
        self._trim(now)
        return len(self._seen)

    def clear(self) -> list[str]:
        held, self._held = self._held, []
        self._seen.clear()
        return held

    def _trim(self, now: float) -> None:
        for address, when in list(self._seen.items()):
            if now - when > self._window:
                del self._seen[address]


async def hold_route(store: ISpoolStore, route: str, page: int = 500) -> int:
    """Hold every entry of ``route`` not held yet; returns how many."""
    count = 0
    while True:
        batch = await store.entries(EntryFilter(route=route, held=False), 0, page)
        if not batch:
            return count
        found = await DeferredList([store.hold(e.id) for e in batch], consumeErrors=True)
        count += sum(1 for ok, result in found if ok and result)
        if len(batch) < page:
            return count


async def release_route(store: ISpoolStore, route: str | None, now: float, limit: int | None = None) -> int:
    """
    Release held entries of ``route`` (every route for ``None``), oldest
    first, at most ``limit`` of them; returns how many.
    """
    count = 0
    page = 500
    while limit is None or count < limit:
        want = page if limit is None else min(page, limit - count)
        batch = await store.entries(EntryFilter(route=route, held=True), 0, want)
        if not batch:
            break
        found = await DeferredList([store.release_held(e.id, now) for e in batch], consumeErrors=True)
        released = sum(1 for ok, result in found if ok and result)
        count += released
        if len(batch) < want or not released:
            break
    return count


def _utc(when: Any) -> str:
    """A time for log and status texts."""
    if not isinstance(when, int | float):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))

"""
The delivery engine of one node: claims due entries, hands them to the route's
transport, asks the policy what the replies mean and records the verdict.

- The node that accepts a message tries it at once (``kick``), without
  waiting for a scan.
- Otherwise the engine sleeps until the spool says the next entry is due
  (``ISpoolStore.next_due``), capped at ``max_scan_interval`` so entries that
  other processes add are seen too.  An idle spool costs one query a cap.
- At most ``max_connections`` attempts run at once per route, and at most
  ``batch`` entries are leased by the node at a time.

The engine owns no socket and no clock of its own: the store, the transports,
the policy and the reactor are given to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.config import DeliveryConfig
from mailhub.delivery.throttle import RouteThrottle, is_route_failure
from mailhub.interfaces import IDeliveryPolicy, ISpoolStore, ITransport
from mailhub.model import (
    Action,
    Address,
    Attempt,
    Decision,
    Entry,
    Envelope,
    Lease,
    LeaseLost,
    Outcome,
    Reply,
    StoreUnavailable,
    new_entries,
)

__all__ = ["DeliveryEngine"]

Bounce = Callable[[Entry, Sequence[Outcome], bytes, float], Deferred]


class DeliveryEngine(Service):
    """
    :param node: this node's name.
    :param transport_for: gives the ``ITransport`` of a route (text form).
    :param pacing_for: gives ``(max_connections, back-pressure pause in seconds)`` of a route.
    :param bounce: enqueues the DSN for failed outcomes; the engine waits for
        it before recording the attempt, so a crash can repeat a DSN but never
        lose one.
    """

    log = Logger()

    def __init__(
        self,
        node: str,
        store: ISpoolStore,
        policy: IDeliveryPolicy,
        transport_for: Callable[[str], ITransport],
        pacing_for: Callable[[str], tuple[int, float]],
        bounce: Bounce,
        clock: IReactorTime,
        settings: DeliveryConfig,
    ) -> None:
        self.node = node
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

    # -- service ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.wake()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for throttle in self._throttles.values():
            throttle.cancel_waiting()
        return ensureDeferred(self._settle())

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
            return self._store.enqueue(envelope, message, routes, self.node).addCallback(self._spooled, message)
        # The room is kept until the leases come back: other claims must not take it.
        self._reserved += count
        try:
            decided = {}
            down = {route: rcpts for route, rcpts in routes.items() if self.route_suspended(route)}
            for entry in new_entries(envelope, len(message), down, self.node, "", lambda: ""):
                settled = self.decide_while_down(entry)
                if settled is not None:
                    decided[entry.route] = settled
            d = self._store.enqueue_leased(
                envelope, message, routes, self.node, self._settings.lease_seconds, decided or None
            )
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
                if isinstance(r, Entry):
                    attempt, decision = decided[r.route]
                    self.attempts_made += 1
                    self._log_attempt(r, decision, attempt.finished)
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
            due = await self._store.next_due(self.node, now, self._settings.takeover_seconds)
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
        leases = await self._store.claim(
            self.node,
            self._clock.seconds(),
            limit if limit is not None else len(ids or ()),
            s.lease_seconds,
            s.takeover_seconds,
            ids,
        )
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
            maximum, pause = self._pacing_for(route)
            throttle = self._throttles[route] = RouteThrottle(
                maximum, self._clock, pause=pause, probe=self._settings.probe_seconds
            )
        return throttle

    def status(self) -> dict[str, Any]:
        """What this node's engine is doing, per route: for operators watching a backlog drain."""
        return {
            "node": self.node,
            "in_flight": self.in_flight,
            "attempts": self.attempts_made,
            "routes": {route: t.status() for route, t in sorted(self._throttles.items())},
        }

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
        throttle = self.throttle(entry.route)
        body: Deferred[bytes] | None = None

        def read_ahead() -> None:
            # Read the body while the attempt waits for its turn on the route.
            nonlocal body
            body = self._store.body(entry.message_id)

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
        suspended = throttle.suspended()
        started = self._clock.seconds()
        replies: dict[Address, Reply] = {}
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
                        message = await (body or self._store.body(entry.message_id))
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
            recovered = throttle.release(() if suspended or not replies else replies.values())
        # An entry deferred because its route was unreachable and delivered
        # now says the route is back, even if this node never saw it down.
        last = entry.last_reply
        if any(r.ok for r in replies.values()) and last is not None and is_route_failure(last):
            recovered = True
        if recovered:
            self._route_recovered(entry.route, throttle)
        self._recording += 1
        self._refill()
        try:
            await self._conclude(lease, message, replies, started)
        finally:
            self._recording -= 1

    def _route_recovered(self, route: str, throttle: RouteThrottle) -> None:
        now = self._clock.seconds()
        if now - self._recovered_at.get(route, float("-inf")) < self._settings.lease_seconds:
            return
        self._recovered_at[route] = now
        throttle.slow_start()
        if self._settings.flush_on_recovery:
            ensureDeferred(self._flush_route(route))

    def _suspended_replies(self, entry: Entry, throttle: RouteThrottle) -> dict[Address, Reply]:
        """The replies of an attempt deferred without connecting: the route is down."""
        reply = Reply(451, "4.4.1", f"delivery to {entry.route} suspended: route down ({throttle.last_reply})")
        return dict.fromkeys(entry.pending, reply)

    async def _send(self, entry: Entry, message: bytes) -> dict[Address, Reply]:
        """Hand the entry to its route's transport: a reply for every pending recipient."""
        try:
            replies = dict(await self._transport_for(entry.route).deliver(entry, message))
        except Exception as e:
            self.log.failure("transport for {route} raised", route=entry.route)
            replies = {}
            failure_reply = Reply(451, "4.3.0", f"transport error: {e}")
        else:
            failure_reply = Reply(451, "4.3.0", "no reply from transport")
        for address in entry.pending:
            replies.setdefault(address, failure_reply)
        return replies

    async def _conclude(
        self, lease: Lease, message: bytes | None, replies: dict[Address, Reply], started: float
    ) -> None:
        """
        After an attempt: decide, bounce, record, log.

        :param message: the message if the attempt had it, else it is read
            from the spool if a DSN needs it.
        """
        entry = lease.entry
        finished = self._clock.seconds()
        self.attempts_made += 1
        decision = self._policy.decide(entry, replies, finished, self.node)
        attempt = Attempt(entry.id, self.node, started, finished, tuple((a, replies[a]) for a in entry.pending))
        bounced = [o for o in decision.outcomes if o.action in (Action.FAILED, Action.EXPIRED)]
        if bounced:
            if message is None:
                message = await self._store.body(entry.message_id)
            await self._bounce(entry, bounced, message, finished)
        try:
            await self._store.record(lease, attempt, decision)
        except LeaseLost:
            self.log.warn("entry {entry}: lease lost during the attempt; another node owns it now", entry=entry.id)
            return
        self._log_attempt(entry, decision, finished)

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

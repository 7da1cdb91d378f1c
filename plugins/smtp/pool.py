"""
The ``smtp`` transport's connection pool: connections kept after a
delivery for the next one to the same host, at most ``max_connections``
open for the route, each closed after ``idle_timeout`` unused.

The pool counts slots and keeps idle connections; it opens none itself
(the transport does, after ``acquire`` reserved a slot) and knows nothing
of SMTP transactions beyond ``QUIT``.  Time comes from the injected reactor.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall

from mailhub.model import ROUTE_MAX_CONNECTIONS
from mailhub.smtp.client import SMTPClientProtocol

__all__ = ["Connection", "ConnectionPool", "Key"]

Key = tuple[str, int]
"""A destination: host name (or address) and port."""


@define(eq=False)
class Connection:
    """A connection of the pool, and the destination it goes to."""

    protocol: SMTPClientProtocol
    key: Key
    deliveries: int = 0
    idle_timer: IDelayedCall | None = None
    counted: bool = True


@define(eq=False)
class ConnectionPool:
    """
    The connections of one route.

    :param reactor: an ``IReactorTime`` (idle timers).
    :param max_connections: open at once, busy or idle.
    :param idle_timeout: seconds an idle connection is kept.
    """

    _reactor: Any
    max_connections: int = ROUTE_MAX_CONNECTIONS
    _idle_timeout: float = 30.0
    _open: int = field(init=False, default=0)
    _idle: dict[Key, list[Connection]] = field(init=False, factory=dict)
    _slot_waiters: deque[Deferred[None]] = field(init=False, factory=deque)
    _closed: bool = field(init=False, default=False)

    def close(self) -> Deferred[None]:
        """Close every idle connection (a busy one closes when it is released)."""
        self._closed = True
        waits: list[Deferred[Any]] = []
        for connections in list(self._idle.values()):
            for conn in list(connections):
                waits.append(conn.protocol.lost)
                self.drop(conn, quit=True)
        self._idle.clear()
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def limit(self, count: int) -> None:
        """
        Keep at most ``count`` connections open: idle ones above it are
        closed now with QUIT, busy ones as they are released.
        """
        self.max_connections = max(0, count)
        for connections in list(self._idle.values()):
            for conn in list(connections):
                if self._open <= self.max_connections:
                    return
                self.drop(conn, quit=True)

    async def acquire(self, key: Key, fresh_only: bool) -> Connection | None:
        """
        An idle connection to ``key`` to reuse, or ``None`` once a slot for a
        new connection is reserved (``adopt`` it, or ``free_slot`` if the
        connection could not be made); waits while ``max_connections`` are busy.
        """
        while True:
            idle = self._idle.get(key)
            if idle and not fresh_only:
                conn = idle.pop()
                if conn.idle_timer is not None and conn.idle_timer.active():
                    conn.idle_timer.cancel()
                conn.idle_timer = None
                return conn
            # A share of 0 still lets a delivery the engine started open one.
            if self._open < max(1, self.max_connections):
                self._open += 1
                return None
            victim = next((c for cs in self._idle.values() for c in cs), None)
            if victim is not None:
                # Make room: an idle connection is worth less than this delivery,
                # which takes over its slot.
                victim.counted = False
                self.drop(victim, quit=True)
                return None
            waiter: Deferred[None] = Deferred()
            self._slot_waiters.append(waiter)
            await waiter

    def adopt(self, protocol: SMTPClientProtocol, key: Key) -> Connection:
        """A new connection, in the slot ``acquire`` reserved for it."""
        conn = Connection(protocol, key)
        protocol.on_lost = lambda _: self._lost(conn)
        return conn

    def release(self, conn: Connection) -> None:
        """A delivery is done with ``conn``: keep it idle, or close it."""
        if conn.protocol.broken or self._closed or self._open > self.max_connections:
            self.drop(conn, quit=True)
            return
        self._idle.setdefault(conn.key, []).append(conn)
        conn.idle_timer = self._reactor.callLater(self._idle_timeout, self._idle_expired, conn)
        self._wake()

    def drop(self, conn: Connection, quit: bool = False, abort: bool = False) -> None:
        """Close ``conn`` and forget it; its slot is free at once."""
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        if conn.idle_timer is not None and conn.idle_timer.active():
            conn.idle_timer.cancel()
        conn.idle_timer = None
        if quit and not abort:
            conn.protocol.quit()
        else:
            conn.protocol.abort()
        if conn.counted:
            conn.counted = False
            self.free_slot()

    def free_slot(self) -> None:
        """A slot ``acquire`` reserved is free again (its connection failed)."""
        self._open -= 1
        self._wake()

    def _idle_expired(self, conn: Connection) -> None:
        conn.idle_timer = None
        self.drop(conn, quit=True)

    def _lost(self, conn: Connection) -> None:
        """The connection closed under us (server timeout, say)."""
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            self.drop(conn)

    def _wake(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.called:  # a cancelled delivery no longer waits
                waiter.callback(None)
                return

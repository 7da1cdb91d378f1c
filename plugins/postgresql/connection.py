"""
The ``postgresql`` archive's threads and connections: a thread pool of its
own (``pool_size`` threads), each thread with one psycopg 3 connection, made
when first needed and again after it broke.  Every call is one transaction
on a pool thread, never on the reactor thread; its ``Deferred`` fires after
the ``COMMIT``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg import sql
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mailhub.model import StoreFull, StoreUnavailable

from .schema import ensure_schema

__all__ = ["TRIES", "Connections"]

T = TypeVar("T")

#: How often a transaction that lost a race (serialization failure,
#: deadlock, a row deleted or added under it) is tried.
TRIES = 5
_RETRY_STATES = {"40001", "40P01", "23503", "23505"}


class Connections:
    """
    The threads and connections of one archive, which runs its statements
    with ``_call``; the schema is made ready on first use
    (``schema.ensure_schema``).

    :param reactor: the reactor the ``Deferred`` fire in.
    :param conninfo: a libpq connection string.
    :param pool_size: threads (and so connections) of the pool.
    :param schema: the schema that holds the archive's tables.
    """

    def __init__(self, reactor: Any, conninfo: str, pool_size: int, schema: str) -> None:
        self._reactor = reactor
        self._conninfo = conninfo
        self._schema = schema
        self._pool = ThreadPool(minthreads=0, maxthreads=pool_size, name="archive-postgresql")
        self._local = threading.local()
        self._connections: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._ready = False
        self._pending: set[Deferred[Any]] = set()
        self._closed = False
        self._pool.start()
        self._trigger = reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)

    # -- threads and connections

    def _call(
        self, work: Callable[[psycopg.Connection[Any]], T], retry: bool = True
    ) -> Deferred[T]:
        if self._closed:
            return fail(StoreUnavailable("the archive is closed"))
        d: Deferred[T] = deferToThreadPool(self._reactor, self._pool, self._run, work, retry)
        self._pending.add(d)

        def done(result: object) -> object:
            self._pending.discard(d)
            return result

        d.addBoth(done)
        return d

    def _connection(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            self._forget(conn)
        conn = psycopg.connect(self._conninfo, autocommit=False)
        try:
            conn.execute(
                sql.SQL("SET search_path TO {}, public").format(sql.Identifier(self._schema))
            )
            # Short queries: compiling one (JIT, when the planner expects many
            # rows) costs more than running it.
            conn.execute("SET jit TO off")
            row = conn.execute("SHOW synchronous_commit").fetchone()
            if row is not None and row[0] == "off":
                # "Fires once durable": never acknowledge a commit that is
                # only in the server's memory.
                conn.execute("SET synchronous_commit TO on")
            conn.commit()
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    def _forget(self, conn: psycopg.Connection[Any]) -> None:
        self._local.conn = None
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        try:
            conn.close()
        except Exception:
            pass

    def _run(self, work: Callable[[psycopg.Connection[Any]], T], retry: bool) -> T:
        """Run ``work`` in one transaction, on this pool thread's connection."""
        tries = TRIES if retry else 1
        for attempt in range(tries):
            conn: psycopg.Connection[Any] | None = None
            fresh = getattr(self._local, "conn", None) is None
            try:
                conn = self._connection()
                if not self._ready:
                    self._ensure_schema(conn)
                with conn.transaction():
                    return work(conn)
            except psycopg.errors.DiskFull as e:
                raise StoreFull(f"the archive's database is full: {e}")
            except psycopg.Error as e:
                broken = conn is None or conn.closed or conn.broken
                if conn is not None and broken:
                    self._forget(conn)
                if e.sqlstate in _RETRY_STATES and attempt + 1 < tries:
                    continue
                if broken and conn is not None and not fresh and attempt + 1 < tries:
                    # A connection that broke while it was idle (the server
                    # restarted): once more, on a new one.
                    continue
                if isinstance(e, psycopg.OperationalError | psycopg.InterfaceError):
                    raise StoreUnavailable(f"the archive's database: {e}".strip())
                raise
        raise AssertionError("not reached")

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        ensure_schema(conn, self._schema)
        self._ready = True

    def close(self) -> Deferred[None]:
        """Wait for the calls under way, close every connection, stop the threads."""
        if self._closed:
            return succeed(None)
        self._closed = True
        waiting = [_quiet(d) for d in self._pending if not d.called]
        idle: Deferred[Any] = DeferredList(waiting) if waiting else succeed(None)

        def disconnect(_: object) -> Deferred[None]:
            return deferToThreadPool(self._reactor, self._pool, self._disconnect)

        def stop(result: object) -> None:
            self._pool.stop()
            self._reactor.removeSystemEventTrigger(self._trigger)

        idle.addCallback(disconnect)
        idle.addBoth(stop)
        return idle

    def _disconnect(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except Exception:
                pass


def _quiet(d: Deferred[Any]) -> Deferred[None]:
    """A ``Deferred`` that fires when ``d`` does, leaving ``d``'s result to its caller."""
    done: Deferred[None] = Deferred()

    def passthrough(result: object) -> object:
        done.callback(None)
        return result

    d.addBoth(passthrough)
    return done

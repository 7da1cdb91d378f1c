"""
The sqlite archive's threads: the writer (the one thread that writes: each
batch of waiting jobs in one ``BEGIN IMMEDIATE`` transaction, each job in a
savepoint, one commit for all of them, i.e. group commit) and the reader
(read-only jobs beside it).  A job is a function of the connection; its
result is handed back to the reactor thread.  No statement ever runs on the
reactor thread.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from mailhub.model import StoreUnavailable

from ..workers import Worker as SqliteWorker
from ..workers import unavailable as _unavailable
from .schema import migrate

__all__ = ["DEFAULT_BUSY_TIMEOUT", "Job", "Reader", "Worker", "Writer", "unavailable"]

Job = Callable[[sqlite3.Connection], Any]

DEFAULT_BUSY_TIMEOUT = 10.0


def unavailable(e: BaseException) -> StoreUnavailable:
    return _unavailable(e, "archive database")


class Worker(SqliteWorker):
    """
    A thread that owns one connection to the archive's database, and its
    queue of jobs: the spool's worker (``plugins/sqlite/workers.py``), named
    for the archive, connecting on its first job.
    """

    _what = "archive database"
    _prefix = "mailhub-archive"
    _max_batch = 500

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        raise NotImplementedError()


class Writer(Worker):
    """
    The one thread that writes: each batch of waiting jobs in one
    ``BEGIN IMMEDIATE`` transaction, each job in a savepoint.

    :ivar commits: how many transactions were committed.
    :ivar listeners: called on the writer thread with ``True`` after each
        commit and ``False`` after each rollback, of a job's savepoint or of
        the whole transaction.
    :ivar ready: the schema has been made (set once, on the writer thread;
        until then reads run on the writer too).
    """

    _role = "writer"

    def __init__(self, path: str, busy_timeout: float, reactor: Any, max_size: int | None) -> None:
        self.commits = 0
        self.ready = False
        self.listeners: list[Callable[[bool], None]] = []
        self._max_size = max_size
        super().__init__(path, busy_timeout, reactor)

    def _connect(self) -> sqlite3.Connection:
        conn = self._open()
        try:
            deadline = time.monotonic() + self._busy_timeout
            while True:
                try:
                    conn.execute("PRAGMA journal_mode=WAL").fetchall()
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA temp_store=MEMORY")
            if self._max_size is not None:
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count={max(1, self._max_size // page_size)}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                migrate(conn, self._path)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        self.ready = True
        return conn

    def _ended(self, ok: bool) -> None:
        for listener in self.listeners:
            listener(ok)

    def _run_batch(
        self, batch: list[tuple[Job, Deferred[Any]]]
    ) -> list[tuple[Deferred[Any], bool, Any]]:
        try:
            results = self._run_transaction(batch)
        except BaseException:
            self._ended(False)  # the worker drops the connection: all of it is gone
            raise
        self._ended(all(ok for _, ok, _ in results))
        return results

    def _run_transaction(
        self, batch: list[tuple[Job, Deferred[Any]]]
    ) -> list[tuple[Deferred[Any], bool, Any]]:
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
        except (sqlite3.Error, OSError) as e:
            return [(d, False, unavailable(e)) for _, d in batch]
        results: list[tuple[Deferred[Any], bool, Any]] = []
        for job, d in batch:
            conn.execute("SAVEPOINT job")
            try:
                value = job(conn)
            except BaseException as e:
                error = unavailable(e) if isinstance(e, sqlite3.Error) else e
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (I/O error, disk
                    # full): the jobs before this one are lost too.
                    if not isinstance(error, StoreUnavailable):
                        error = StoreUnavailable(f"archive database: {error}")
                    return [(d2, False, error) for _, d2 in batch]
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                results.append((d, False, error))
            else:
                conn.execute("RELEASE job")
                results.append((d, True, value))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._drop_connection()
            return [(d, False, unavailable(e)) for _, d in batch]
        self.commits += 1
        return results


class Reader(Worker):
    """The thread that runs read-only jobs, each in a read transaction of its own."""

    _role = "reader"

    def _connect(self) -> sqlite3.Connection:
        conn = self._open()
        try:
            conn.execute("PRAGMA query_only=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _run_batch(
        self, batch: list[tuple[Job, Deferred[Any]]]
    ) -> list[tuple[Deferred[Any], bool, Any]]:
        results: list[tuple[Deferred[Any], bool, Any]] = []
        for job, d in batch:
            try:
                conn = self._connection()
                conn.execute("BEGIN")
                try:
                    value = job(conn)
                finally:
                    if conn.in_transaction:
                        conn.execute("COMMIT")
            except (sqlite3.Error, OSError) as e:
                self._drop_connection()
                results.append((d, False, unavailable(e)))
            except BaseException as e:
                results.append((d, False, e))
            else:
                results.append((d, True, value))
        return results

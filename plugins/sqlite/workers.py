"""
The sqlite store's threads: the writer (one per database: each batch of
waiting jobs in one transaction, one fsync for all of them, i.e. group
commit), the reader (batches of read-only jobs, one read transaction each)
and the checkpointer (the write-ahead log copied back beside the writer).

A job is a function of the connection, run on the worker's thread; its
result is handed back to the reactor thread with ``callFromThread``.  No
statement ever runs on the reactor thread.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from mailhub.model import StoreFull, StoreUnavailable

from .bodylog import BodyLog
from .schema import PAGE_SIZE, SCHEMA, add_missing_columns

__all__ = [
    "CHECKPOINT_EVERY", "WAL_AUTOCHECKPOINT", "Checkpointer", "Job", "Reader", "Writer",
    "run_merged", "unavailable",
]

_T = TypeVar("_T")
Job = Callable[[sqlite3.Connection], Any]
"""A job: a function of the worker's connection."""

MAX_BATCH = 1000
"""Jobs run in one batch at most."""


def _create_private(path: str) -> None:
    """
    Create the database file, if it is new, readable by its owner only
    (0600): it holds every message, and the archive's also the accounts'
    password hashes and second-factor secrets.  SQLite gives the ``-wal``
    and ``-shm`` files the database's mode.  A file that exists is left as
    it is (the README says how to make an older one private).
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass


def unavailable(e: BaseException, what: str = "spool database") -> StoreUnavailable:
    """``e`` as the store's error: ``StoreFull`` when the disk or the size limit is reached."""
    if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StoreFull(f"{what} is full: {e}")
    return StoreUnavailable(f"{what}: {e}")


class Worker:
    """
    A thread that owns one connection to a store's database, and its queue of
    jobs.  A job is a function of the connection; what it returns or raises
    goes to the ``Deferred`` that ``submit`` returned, fired on the reactor
    thread.  Subclasses say how a batch of jobs is run (and the archive's,
    ``plugins/sqlite/archive/writer.py``, what they are called).
    """

    _STOP = object()
    _role = "worker"
    #: The database, as errors name it.
    _what = "spool database"
    #: Before the role in the thread's name.
    _prefix = "mailhub-sqlite"
    #: Jobs run in one batch at most.
    _max_batch = MAX_BATCH

    def __init__(self, path: str, busy_timeout: float, reactor: Any) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._reactor = reactor
        self._queue: queue.Queue[Any] = queue.Queue()
        self._conn: sqlite3.Connection | None = None
        self._stopped: Deferred[None] = Deferred()
        self._closing = False
        self._thread = threading.Thread(
            target=self._run, name=f"{self._prefix}-{self._role} {path}", daemon=True
        )
        self._thread.start()

    def submit(self, job: Callable[[sqlite3.Connection], _T]) -> Deferred[_T]:
        """Queue ``job``; only ever called on the reactor thread."""
        if self._closing:
            return fail(StoreUnavailable(f"{self._what} is closed"))
        d: Deferred[_T] = Deferred()
        self._queue.put((job, d))
        return d

    def stop(self) -> Deferred[None]:
        """Run the jobs already queued, close the database, end the thread."""
        if not self._closing:
            self._closing = True
            self._queue.put(self._STOP)
        return self._stopped

    # -- on the worker's thread -------------------------------------------

    def _run(self) -> None:
        try:
            stopping = False
            while not stopping:
                batch = [self._queue.get()]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if self._STOP in batch:
                    stopping = True
                    batch = [job for job in batch if job is not self._STOP]
                if batch:
                    try:
                        results = self._run_batch(batch)
                    except Exception as e:
                        # A broken connection (say, a failed SAVEPOINT): start afresh.
                        self._drop_connection()
                        results = [(d, False, StoreUnavailable(f"{self._what}: {e}")) for _, d in batch]
                    finally:
                        self._batch_over()
                    self._fire(results)
                    self._between_batches()
        finally:
            self._before_close()
            if self._conn is not None:
                self._conn.close()
            self._reactor.callFromThread(self._stopped.callback, None)

    def _before_close(self) -> None:
        """On the worker's thread, once its last job has run, before its connection closes."""

    def _batch_over(self) -> None:
        """On the worker's thread, after each batch, however it ended."""

    def _between_batches(self) -> None:
        """On the worker's thread, after a batch's results are on their way."""

    def _run_batch(
        self, batch: list[tuple[Job, Deferred[Any]]]
    ) -> list[tuple[Deferred[Any], bool, Any]]:
        raise NotImplementedError()

    def _open(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(self._path) or ".", exist_ok=True)
        _create_private(self._path)
        return sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=256,
        )

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _fire(self, results: list[tuple[Deferred[Any], bool, Any]]) -> None:
        def fire() -> None:
            for d, ok, value in results:
                if ok:
                    d.callback(value)
                else:
                    d.errback(Failure(value))

        self._reactor.callFromThread(fire)


class Writer(Worker):
    """
    The one thread that writes to a store's database: each batch of waiting
    jobs runs in one ``BEGIN IMMEDIATE`` transaction, each job in a savepoint.

    :ivar commits: how many transactions were committed (group commit makes it
        far smaller than the number of jobs).
    :ivar ready: the database has been opened and its schema made (set once,
        on the writer thread; until then reads run on the writer too).
    """

    _role = "writer"

    def __init__(self, path: str, busy_timeout: float, reactor: Any) -> None:
        self.commits = 0
        self.ready = False
        self.checkpointer: Checkpointer | None = None
        self.bodies = BodyLog(path)
        super().__init__(path, busy_timeout, reactor)

    def _connect(self) -> sqlite3.Connection:
        conn = self._open()
        try:
            # Only a new, empty file takes the page size (before WAL is set).
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            self._set_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
            # Savepoints' statement journals in memory, not in a temporary
            # file opened and deleted per batch.
            conn.execute("PRAGMA temp_store=MEMORY")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
            add_missing_columns(conn)
        except BaseException:
            conn.close()
            raise
        self.ready = True
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        """
        Switch to WAL.  Two stores opening a new file at once (two nodes, two
        processes) race for the exclusive lock this needs, and SQLite does
        not wait on its busy handler for it: retry here (the writer thread,
        never the reactor's) until the busy timeout.
        """
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL").fetchall()
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _run_batch(
        self, batch: list[tuple[Job, Deferred[Any]]]
    ) -> list[tuple[Deferred[Any], bool, Any]]:
        """
        Run the batch in one transaction.  First optimistically, the jobs one
        after the other with nothing between them; if one fails, that
        transaction is rolled back and the batch runs again with each job in
        a savepoint of its own, so the failing job fails alone.  (A job is a
        function of the database: running it twice is safe.  A batch of one
        job goes straight to the savepoint run.)

        The optimistic pass exists for the reactor thread's sake: every
        statement releases the GIL around SQLite's work and takes it back
        after, and taking it back waits while the reactor thread runs Python.
        Two savepoint statements per job doubled an enqueue's statements,
        and the time the writer spent waiting for the GIL with them.
        """
        try:
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
        except (sqlite3.Error, OSError) as e:
            return self._everyone_fails(batch, e)
        if len(batch) > 1:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except (sqlite3.Error, OSError) as e:
                return self._everyone_fails(batch, e)
            try:
                values = run_merged(conn, [job for job, _ in batch])
            except BaseException:
                self._abort(conn)
                if self._conn is None:
                    return self._everyone_fails(batch, StoreUnavailable("spool database: connection lost"))
            else:
                return self._commit(conn, batch, [(d, True, v) for (_, d), v in zip(batch, values, strict=True)])
        return self._run_isolated(conn, batch)

    def _everyone_fails(
        self, batch: list[tuple[Job, Deferred[Any]]], error: BaseException
    ) -> list[tuple[Deferred[Any], bool, Any]]:
        if isinstance(error, OSError):
            error = sqlite3.OperationalError(str(error))
        if isinstance(error, sqlite3.Error):
            error = unavailable(error)
        return [(d, False, error) for _, d in batch]

    def _run_isolated(
        self, conn: sqlite3.Connection, batch: list[tuple[Job, Deferred[Any]]]
    ) -> list[tuple[Deferred[Any], bool, Any]]:
        """The batch in one transaction, each job in its own savepoint."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except (sqlite3.Error, OSError) as e:
            return self._everyone_fails(batch, e)
        results: list[tuple[Deferred[Any], bool, Any]] = []
        for job, d in batch:
            conn.execute("SAVEPOINT job")
            try:
                value = job(conn)
            except BaseException as e:
                error = unavailable(e) if isinstance(e, sqlite3.Error) else e
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (I/O error, disk
                    # full): the work of the jobs before this one is lost too.
                    if not isinstance(error, StoreUnavailable):
                        error = StoreUnavailable(f"spool database: {error}")
                    return self._everyone_fails(batch, error)
                try:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                except sqlite3.Error as e2:
                    self._abort(conn)
                    return self._everyone_fails(batch, e2)
                results.append((d, False, error))
            else:
                conn.execute("RELEASE job")
                results.append((d, True, value))
        return self._commit(conn, batch, results)

    def _commit(
        self,
        conn: sqlite3.Connection,
        batch: list[tuple[Job, Deferred[Any]]],
        results: list[tuple[Deferred[Any], bool, Any]],
    ) -> list[tuple[Deferred[Any], bool, Any]]:
        """
        Commit the batch's transaction: ``results`` if it holds, every job
        failed if not.  The bodies the batch appended to the body log are
        made durable first: a row never refers to octets a crash could lose.
        """
        try:
            self.bodies.sync()
        except StoreUnavailable as e:
            self._abort(conn)
            return self._everyone_fails(batch, e)
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._abort(conn)
            return self._everyone_fails(batch, e)
        self.commits += 1
        if self.checkpointer is not None and self.commits % CHECKPOINT_EVERY == 0:
            self.checkpointer.want()
        return results

    def _batch_over(self) -> None:
        # Committed or not, the batch's closed segments may be swept now.
        self.bodies.batch_over()

    def _between_batches(self) -> None:
        conn = self._conn
        if conn is not None and not conn.in_transaction:
            self.bodies.sweep_now_and_then(conn)

    def _before_close(self) -> None:
        self.bodies.close()
        # The checkpointer's connection goes first (waited for here, not on
        # the reactor thread), so the writer's close is the database's last
        # and folds the log back in.
        if self.checkpointer is not None:
            self.checkpointer.stop()
            self.checkpointer.join(self._busy_timeout + 5.0)

    def _abort(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            # The connection is unusable: reconnect for the next batch.
            self._drop_connection()


class Checkpointer:
    """
    Copies the write-ahead log back into the database file on a thread and
    connection of its own (``wal_checkpoint(PASSIVE)``: beside the writer,
    never blocking it), when the writer says the log has grown
    (``CHECKPOINT_EVERY`` commits) and once a second.

    Left to SQLite, the checkpoint runs inside whichever ``COMMIT`` finds the
    log past ``wal_autocheckpoint`` pages: with 100 KB messages that is one
    commit in a hundred or so stopping every session waiting on it while
    16 MB are copied and the database fsync'd.  The writer keeps a larger
    automatic checkpoint only as a bound on the log should this thread fall
    behind.
    """

    def __init__(self, path: str, busy_timeout: float) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._wanted = threading.Event()
        self._stopping = False
        self.checkpoints = 0
        self._thread = threading.Thread(
            target=self._run, name=f"mailhub-sqlite-checkpointer {path}", daemon=True
        )
        self._thread.start()

    def want(self) -> None:
        """Ask for a checkpoint soon (any thread)."""
        self._wanted.set()

    def stop(self) -> None:
        """End the thread after the checkpoint it may be running (any thread)."""
        self._stopping = True
        self._wanted.set()

    def join(self, timeout: float) -> None:
        """Wait for the thread to end (never on the reactor thread)."""
        self._thread.join(timeout)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while not self._stopping:
                self._wanted.wait(1.0)
                self._wanted.clear()
                if self._stopping:
                    break
                try:
                    if conn is None:
                        if self._stopping or not os.path.exists(self._path):
                            continue
                        conn = sqlite3.connect(
                            self._path, timeout=self._busy_timeout, isolation_level=None,
                            check_same_thread=False,
                        )
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error:
                    # The writer reports what is wrong with the database; a
                    # checkpoint is retried on the next round.
                    if conn is not None:
                        conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()


#: Commits between the writer's requests for a checkpoint.
CHECKPOINT_EVERY = 100

#: The writer's own automatic checkpoint, in pages: only a bound on the log
#: if the checkpointer falls behind (64 MB with 16 KB pages).
WAL_AUTOCHECKPOINT = 4000


class Reader(Worker):
    """
    The thread that runs a store's read-only jobs, each batch of them in one
    read transaction (a consistent snapshot of what was committed when the
    batch began), on a connection of its own that may not write
    (``query_only``).
    """

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
        """
        Run the batch's jobs in one read transaction: it begins after every
        job of the batch was submitted, so each sees all that was committed
        before it was asked, and a burst of reads (the bodies of a claimed
        batch) costs one ``BEGIN``/``COMMIT`` instead of one per read.  A job
        whose statement fails ends that transaction; the jobs after it run
        in a new one.
        """
        results: list[tuple[Deferred[Any], bool, Any]] = []
        conn: sqlite3.Connection | None = None
        for job, d in batch:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                conn = self._conn
                if not conn.in_transaction:
                    conn.execute("BEGIN")
                value = job(conn)
            except sqlite3.Error as e:
                # Start afresh: the connection may be broken.
                self._drop_connection()
                results.append((d, False, unavailable(e)))
            except OSError as e:
                self._drop_connection()
                results.append((d, False, unavailable(sqlite3.OperationalError(str(e)))))
            except BaseException as e:
                results.append((d, False, e))
            else:
                results.append((d, True, value))
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error:
                self._drop_connection()
        return results


def run_merged(conn: sqlite3.Connection, jobs: list[Job]) -> list[Any]:
    """
    Run ``jobs`` in order on ``conn`` and return their values, each run of
    neighbouring jobs of a class with a static ``run_together(conn, jobs)``
    (the store's inserts and removals) together, a few statements
    for all of them.  An exception leaves the transaction to the caller (the
    writer rolls it back and runs the batch again, each job alone).
    """
    values: list[Any] = []
    i = 0
    while i < len(jobs):
        kind = type(jobs[i])
        together = getattr(kind, "run_together", None)
        if together is None:
            values.append(jobs[i](conn))
            i += 1
            continue
        j = i + 1
        while j < len(jobs) and type(jobs[j]) is kind:
            j += 1
        values.extend(together(conn, jobs[i:j]))
        i = j
    return values

"""
The ``sqlite`` spool store: the embedded default, for nodes on one host.

Every statement runs on one of the store's two threads, never on the reactor
thread.  The writer thread takes all the jobs waiting in its queue, runs them
in one transaction, each inside its own savepoint, commits once and then fires
their ``Deferred`` from the reactor thread: concurrent SMTP sessions share one
fsync (group commit).  The batch runs without savepoints; if a job fails,
it is rolled back and run again with a savepoint per job, so a job that
fails rolls back only its own work.

Calls that only read (``body``, ``get``, ``attempts``, ``entries``,
``counts``, ``next_due``, ``nodes``, ``route_states``) run on a reader
thread with its own connection, each batch of them in one read transaction:
in WAL mode they run beside the writer without taking its lock or joining
its batches.  A write's ``Deferred`` fires only after its ``COMMIT``, so a
read issued after that sees the write.

Leasing is atomic across stores and processes because a claim runs inside
``BEGIN IMMEDIATE``, which takes SQLite's write lock before reading.  Claiming
sets ``next_attempt`` to the lease's expiry, so an abandoned lease needs no
sweep: its entry is simply due again.  ``record`` and ``release`` act only
while the row still carries their lease's token.  A leased row also names
the incarnation of the node that took it (``lease_incarnation``), so that a
restarted node takes back at once what its dead process held
(``reclaim``).  A route's ``share`` and ``reclaim`` are one writer job each,
so they too are atomic across stores and processes.

Bodies over ``LOG_THRESHOLD`` octets (16 KB) are not stored in the database
but appended to segment files in ``<path>.bodies/`` (``_BodyLog``), each
segment's new bodies fdatasync'd before the ``COMMIT`` that refers to them: a
100 KB body is written to disk once, where in the database it was written to
the log and then copied by the checkpoint into the database file.  A segment
is deleted once no message refers to it (and no writer holds it); one that
is mostly unused has its bodies still in use copied forward first
(``_BodyLog.compact``), so a long-deferred message keeps no whole segment.  The
database and its ``.bodies`` directory are one spool: back them up, move them
and delete them together.  The spool's schema is in ``PRAGMA user_version``
(``SCHEMA_VERSION``); a store refuses a spool of a newer schema.

Configuration (the ``[store]`` table)::

    plugin = "sqlite"
    path = "var/spool.db"     # relative to the configuration file's directory
    busy_timeout = 10         # seconds to wait for another process's lock
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import json
import os
import queue
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.interfaces import (
    ILeaseReclaim,
    INodeRegistry,
    IRouteCoordination,
    ISpoolStore,
    IStorePlugin,
)
from mailhub.model import (
    Address,
    Attempt,
    Decision,
    Entry,
    EntryFilter,
    Envelope,
    Lease,
    LeaseLost,
    Recipient,
    RecipientState,
    Reply,
    StoreFull,
    StoreUnavailable,
    apply_decision,
    fair_share,
    new_entries,
)

__all__ = ["SqliteSpoolStore", "plugin"]

_T = TypeVar("_T")
_Job = Callable[[sqlite3.Connection], Any]

DEFAULT_BUSY_TIMEOUT = 10.0
_MAX_BATCH = 1000

#: The page size of a new spool file (an existing file keeps its own).  Bodies
#: of 100 KB span fewer overflow pages, so writing and freeing them costs less:
#: measured against 4096, enqueue and record of 100 KB messages +30-45 %, of
#: 32 KB +8 %; of 4 KB 10-25 % slower (every dirty page written is larger).
PAGE_SIZE = 16384

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    log_segment TEXT,
    log_offset INTEGER,
    log_length INTEGER
);
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES messages (id),
    route TEXT NOT NULL,
    sender TEXT,
    recipients TEXT NOT NULL,
    created REAL NOT NULL,
    next_attempt REAL NOT NULL,
    node TEXT,
    lease_node TEXT,
    lease_token TEXT,
    lease_incarnation TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL,
    helo TEXT NOT NULL DEFAULT '',
    client TEXT NOT NULL DEFAULT '',
    smtputf8 INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entries_due ON entries (held, next_attempt);
CREATE INDEX IF NOT EXISTS entries_message ON entries (message_id);
CREATE INDEX IF NOT EXISTS entries_route ON entries (route, next_attempt);
CREATE TABLE IF NOT EXISTS attempts (
    entry_id TEXT NOT NULL,
    node TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    replies TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_entry ON attempts (entry_id);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    last_seen REAL NOT NULL,
    info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS route_shares (
    route TEXT NOT NULL,
    node TEXT NOT NULL,
    given INTEGER NOT NULL,
    want INTEGER NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (route, node)
);
CREATE TABLE IF NOT EXISTS route_states (
    route TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
"""

_ENTRY_COLUMNS = (
    "id, message_id, route, sender, recipients, created, next_attempt, node,"
    " attempts, held, size, helo, client, smtputf8"
)

#: The claim query.  The index ``entries_due`` gives the due rows in order, so
#: a claim reads only those, however large the spool.
CLAIM_SQL = (
    f"SELECT {_ENTRY_COLUMNS} FROM entries"
    " WHERE held = 0 AND next_attempt <= :now"
    " AND (node IS NULL OR node = :node OR next_attempt + :takeover <= :now)"
    " ORDER BY next_attempt LIMIT :limit"
)

#: The claim query for given ids (``{ids}`` is the list of parameters).  The
#: unary ``+`` keeps SQLite off ``entries_due``: looking the few ids up by
#: primary key beats walking a backlog of due entries.
CLAIM_IDS_SQL = (
    f"SELECT {_ENTRY_COLUMNS} FROM entries"
    " WHERE id IN ({ids}) AND +held = 0 AND +next_attempt <= :now"
    " AND (node IS NULL OR node = :node OR next_attempt + :takeover <= :now)"
    " ORDER BY next_attempt LIMIT :limit"
)


#: Leases the rows a claim selected, in one statement (``{ids}`` is the list of
#: parameters, at most ``_CLAIM_UPDATE_CHUNK``).  It runs in the claim query's
#: ``BEGIN IMMEDIATE`` transaction, so no other claim sees those rows as due in
#: between.  (Not ``UPDATE ... RETURNING``: that returns the rows as updated,
#: and the lease must carry the entry as it stood, due time and node included.)
CLAIM_UPDATE_SQL = (
    "UPDATE entries SET lease_node = ?, lease_token = ?, lease_incarnation = ?,"
    " next_attempt = ?, node = NULL WHERE id IN ({ids})"
)
_CLAIM_UPDATE_CHUNK = 500


def _address(text: str) -> Address:
    # A domain never contains "@", so the last one splits the address exactly.
    local, _, domain = text.rpartition("@")
    return Address(local, domain)



def _id_maker() -> Callable[[], str]:
    """
    A maker of ids unique in the spool: 96 random bits drawn once per store,
    then a counter.  Several stores and processes share one file, so the random
    part keeps them apart; the counter spares ``os.urandom`` per id.
    """
    prefix = os.urandom(12).hex()
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter):x}"


def _reply_json(reply: Reply | None) -> list[Any] | None:
    return None if reply is None else [reply.code, reply.enhanced, reply.text]


def _recipients_json(recipients: Iterable[Recipient]) -> str:
    return json.dumps(
        [
            {"address": str(r.address), "state": r.state.value, "reply": _reply_json(r.reply)}
            for r in recipients
        ],
        ensure_ascii=False,
    )


def _pending_json(recipients: Iterable[Address]) -> str:
    """``_recipients_json`` of new (pending, no reply) recipients, built directly."""
    return json.dumps(
        [{"address": str(a), "state": "pending", "reply": None} for a in recipients],
        ensure_ascii=False,
    )


def _recipients(text: str) -> tuple[Recipient, ...]:
    return tuple(
        Recipient(
            _address(r["address"]),
            RecipientState(r["state"]),
            None if r["reply"] is None else Reply(*r["reply"]),
        )
        for r in json.loads(text)
    )


def _entry(row: Sequence[Any]) -> Entry:
    (id, message_id, route, sender, recipients, created, next_attempt, node) = row[:8]
    (attempts, held, size, helo, client, smtputf8) = row[8:]
    return Entry(
        id=id,
        message_id=message_id,
        route=route,
        sender=None if sender is None else _address(sender),
        recipients=tuple(_recipients(recipients)),
        created=created,
        next_attempt=next_attempt,
        node=node,
        attempts=attempts,
        held=bool(held),
        size=size,
        envelope_helo=helo,
        envelope_client=client,
        smtputf8=bool(smtputf8),
    )


def _unavailable(e: sqlite3.Error) -> StoreUnavailable:
    if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StoreFull(f"spool database is full: {e}")
    return StoreUnavailable(f"spool database: {e}")


class _Worker:
    """
    A thread that owns one connection to a store's database, and its queue of
    jobs.  A job is a function of the connection; what it returns or raises
    goes to the ``Deferred`` that ``submit`` returned, fired on the reactor
    thread.  Subclasses say how a batch of jobs is run.
    """

    _STOP = object()
    _role = "worker"

    def __init__(self, path: str, busy_timeout: float, reactor: Any) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._reactor = reactor
        self._queue: queue.Queue[Any] = queue.Queue()
        self._conn: sqlite3.Connection | None = None
        self._stopped: Deferred[None] = Deferred()
        self._closing = False
        self._thread = threading.Thread(
            target=self._run, name=f"mailhub-sqlite-{self._role} {path}", daemon=True
        )
        self._thread.start()

    def submit(self, job: Callable[[sqlite3.Connection], _T]) -> Deferred[_T]:
        """Queue ``job``; only ever called on the reactor thread."""
        if self._closing:
            return fail(StoreUnavailable("spool store is closed"))
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
                while len(batch) < _MAX_BATCH:
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
                        results = [
                            (d, False, StoreUnavailable(f"spool database: {e}")) for _, d in batch
                        ]
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
        self, batch: list[tuple[_Job, Deferred[Any]]]
    ) -> list[tuple[Deferred[Any], bool, Any]]:
        raise NotImplementedError()

    def _open(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(self._path) or ".", exist_ok=True)
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


class _Writer(_Worker):
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
        self.checkpointer: _Checkpointer | None = None
        self.bodies = _BodyLog(path)
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
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
            _add_missing_columns(conn)
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
        self, batch: list[tuple[_Job, Deferred[Any]]]
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
                values = _run_merged(conn, [job for job, _ in batch])
            except BaseException:
                self._abort(conn)
                if self._conn is None:
                    return self._everyone_fails(batch, StoreUnavailable("spool database: connection lost"))
            else:
                return self._commit(conn, batch, [(d, True, v) for (_, d), v in zip(batch, values, strict=True)])
        return self._run_isolated(conn, batch)

    def _everyone_fails(
        self, batch: list[tuple[_Job, Deferred[Any]]], error: BaseException
    ) -> list[tuple[Deferred[Any], bool, Any]]:
        if isinstance(error, OSError):
            error = sqlite3.OperationalError(str(error))
        if isinstance(error, sqlite3.Error):
            error = _unavailable(error)
        return [(d, False, error) for _, d in batch]

    def _run_isolated(
        self, conn: sqlite3.Connection, batch: list[tuple[_Job, Deferred[Any]]]
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
                error = _unavailable(e) if isinstance(e, sqlite3.Error) else e
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
        batch: list[tuple[_Job, Deferred[Any]]],
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


class _Checkpointer:
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


#: Bodies larger than this (octets) go to the body log, not into the database.
#: Below it SQLite is the cheaper place: a 4 KB body shares its page.
LOG_THRESHOLD = 16 * 1024

#: A segment of the body log is closed once it holds this much: it is
#: deleted when its last message is, so smaller segments give space back
#: sooner (at the cost of a directory fsync each).
SEGMENT_SIZE = 16 * 1024 * 1024

#: Seconds between the writer's sweeps for segments no message refers to.
SWEEP_INTERVAL = 10.0

#: A closed segment at most this fraction of which is still in use, with
#: at least ``COMPACT_MIN_DEAD`` octets not in use, has its bodies still in
#: use copied to the open segment (``_BodyLog.compact``), so that it can go.
COMPACT_LIVE_FRACTION = 0.25
COMPACT_MIN_DEAD = 4 * 1024 * 1024
#: ... and last written this many seconds ago: what is still in use then is
#: mail that waits (a deferral is 20 minutes), not mail about to be delivered.
COMPACT_MIN_AGE = 600.0

_SEGMENT_NAME = re.compile(r"[0-9a-f]{12}-[0-9]{6,}\Z")
#: A segment being created (locked, not yet named); left behind only by a crash.
_NEW_SEGMENT_NAME = re.compile(r"[0-9a-f]{12}-[0-9]{6,}\.new\Z")


class _BodyLog:
    """
    The large bodies of a store, appended to segment files in the directory
    ``<database path>.bodies``; used by the writer thread, except ``read``
    (any thread).

    A batch's bodies are written with ``pwrite`` as its jobs run and made
    durable with one ``fdatasync`` (``sync``) before its ``COMMIT``.

    Several stores (nodes, processes) may share the database, each with
    segments of its own (named by a random token).  A segment is deleted by
    whichever store's sweep finds that no message refers to it and can take
    the segment's ``flock``; its writer holds that lock from before the
    segment has its name until the batch that last appended to it is
    committed, so no sweep deletes a segment that a commit is about to
    refer to.
    """

    def __init__(self, path: str) -> None:
        self.directory = path + ".bodies"
        self._token = secrets.token_hex(6)
        self._sequence = 0
        self._fd: int | None = None
        self._name = ""
        self._size = 0
        self._unsynced = False
        # A failed fdatasync of a segment closed during the current batch: the
        # batch's bodies there may be lost, so the whole batch fails.
        self._lost: StoreUnavailable | None = None
        # Segments closed during the current batch: locked until it commits.
        self._retired: list[int] = []
        self._directory_synced = False
        self._next_sweep = 0.0
        # Segments the last sweep found unused: deleted if the next finds
        # them unused too.  (A reader that has a body's row in its snapshot
        # opens the segment a moment later; the time between sweeps covers it.)
        self._unused: set[str] = set()
        #: Segments this log deleted, and compacted (for tests and metrics).
        self.swept = 0
        self.compacted = 0

    def _path(self, segment: str) -> str:
        return os.path.join(self.directory, segment)

    def usage(self) -> dict[str, int]:
        """The segments on disk and their octets (any thread)."""
        segments = octets = 0
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            names = []
        for name in names:
            if _SEGMENT_NAME.match(name):
                with contextlib.suppress(FileNotFoundError):
                    octets += os.stat(self._path(name)).st_size
                    segments += 1
        return {"segments": segments, "octets": octets}

    def append(self, body: bytes) -> tuple[str, int]:
        """Write ``body`` to the open segment: its (segment, offset), durable after ``sync``."""
        if self._fd is None or (self._size > 0 and self._size + len(body) > SEGMENT_SIZE):
            self._next_segment()
        assert self._fd is not None
        offset = self._size
        try:
            with memoryview(body) as view:
                done = 0
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as e:
            # What was written is never referred to; the next append starts
            # after it (a short write leaves the rest of the file unknown).
            self._size = offset + len(body)
            raise _body_log_error(e, self._path(self._name)) from e
        self._size += len(body)
        self._unsynced = True
        return self._name, offset

    def sync(self) -> None:
        """
        Make what the batch appended durable (before its ``COMMIT``), or
        raise: then the batch must not commit.
        """
        lost, self._lost = self._lost, None
        if lost is not None:
            raise lost
        self._sync_open_segment()

    def _sync_open_segment(self) -> None:
        if self._fd is not None and self._unsynced:
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                # After a failed fdatasync the page cache no longer says what
                # is on disk: nothing more goes to this segment.
                self._retire()
                raise _body_log_error(e, self._path(self._name)) from e
            self._unsynced = False

    def batch_over(self) -> None:
        """
        The batch is over, committed or not (writer thread, after every
        batch): the segments closed during it may be swept, and what it
        appended and did not commit is no row's.
        """
        self._lost = None
        self._unsynced = False
        retired, self._retired = self._retired, []
        for fd in retired:
            try:
                os.close(fd)
            except OSError:
                # The lock goes with the descriptor, closed or not.
                pass

    def close(self) -> None:
        self._retire()
        self.batch_over()

    def read(self, segment: str, offset: int, length: int) -> bytes:
        """The body at ``offset`` in ``segment`` (any thread)."""
        if not _SEGMENT_NAME.match(segment):
            raise StoreUnavailable(f"spool database names a body segment {segment!r} that is not one")
        path = self._path(segment)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreUnavailable(f"spool body file {path} is missing") from None
        except OSError as e:
            raise _body_log_error(e, path) from e
        try:
            return _read_exactly(fd, offset, length, path)
        finally:
            os.close(fd)

    def _retire(self) -> None:
        if self._fd is not None:
            self._retired.append(self._fd)
            self._fd = None
            # Its unsynced octets, if any, are no row's: nothing commits them now.
            self._unsynced = False

    def _next_segment(self) -> None:
        if self._fd is not None:
            # The batch's bodies in it are made durable now; its lock is
            # kept until the batch commits.
            try:
                self._sync_open_segment()
            except StoreUnavailable as e:
                self._lost = e
                raise
            self._retire()
        try:
            if not self._directory_synced:
                # Whoever made the directory, its entry must be durable before
                # a row refers to a segment in it.
                os.makedirs(self.directory, exist_ok=True)
                _fsync_directory(os.path.dirname(os.path.abspath(self.directory)))
                self._directory_synced = True
            self._sequence += 1
            name = f"{self._token}-{self._sequence:06d}"
            # Locked under a name no sweep looks at, then renamed: a sweep
            # never sees this segment unlocked.
            fresh = self._path(name + ".new")
            fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(fresh, self._path(name))
                _fsync_directory(self.directory)
            except BaseException:
                os.close(fd)
                raise
        except OSError as e:
            raise _body_log_error(e, self.directory) from e
        self._fd, self._name, self._size = fd, name, 0

    def sweep_now_and_then(self, conn: sqlite3.Connection) -> None:
        """
        Between batches: ``sweep``, then ``compact`` one segment, if
        ``SWEEP_INTERVAL`` has passed since the last time.
        """
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            try:
                self.sweep(conn)
                self.compact(conn)
            except (OSError, sqlite3.Error, StoreUnavailable):
                # Retried at the next sweep; the space is only freed later.
                pass

    def compact(self, conn: sqlite3.Connection, now: float | None = None) -> bool:
        """
        Copy the bodies still in use in a closed segment that is mostly
        unused (at most ``COMPACT_LIVE_FRACTION`` of it in use, at least
        ``COMPACT_MIN_DEAD`` octets unused, last written ``COMPACT_MIN_AGE``
        seconds before ``now``) to the open segment, and point
        their rows there, in one transaction committed after the copies are
        fdatasync'd.  The old segment, now unused, goes at a later sweep.
        Without this, one long-deferred message would keep a whole segment.
        Writer thread; one segment at a time.  Outside a transaction it runs
        in one of its own; inside a writer batch's, that batch's commit
        makes the copies durable first.

        :returns: whether a segment was compacted.
        """
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return False
        for name in names:
            if not _SEGMENT_NAME.match(name) or name == self._name:
                continue
            count, live = conn.execute(
                "SELECT count(*), coalesce(sum(log_length), 0) FROM messages WHERE log_segment = ?",
                (name,),
            ).fetchone()
            path = self._path(name)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            size, dead = stat.st_size, stat.st_size - live
            if count == 0 or live > size * COMPACT_LIVE_FRACTION or dead < COMPACT_MIN_DEAD:
                continue
            if (time.time() if now is None else now) - stat.st_mtime < COMPACT_MIN_AGE:
                continue
            if self._compact(conn, name, path):
                return True
        return False

    def _compact(self, conn: sqlite3.Connection, name: str, path: str) -> bool:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its writer still holds it
            # Run as a job of a batch (a test's, an operator's), the batch's
            # commit makes the copies durable first, as for any new body.
            own = not conn.in_transaction
            if own:
                conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(
                    "SELECT id, log_offset, log_length FROM messages WHERE log_segment = ?", (name,)
                ).fetchall()
                for message_id, offset, length in rows:
                    body = _read_exactly(fd, offset, length, path)
                    segment, new_offset = self.append(body)
                    conn.execute(
                        "UPDATE messages SET log_segment = ?, log_offset = ? WHERE id = ?",
                        (segment, new_offset, message_id),
                    )
                if own:
                    self.sync()
                    conn.execute("COMMIT")
            except BaseException:
                if own and conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                if own:
                    self.batch_over()
            self.compacted += 1
            return True
        finally:
            os.close(fd)

    def sweep(self, conn: sqlite3.Connection, now: float | None = None) -> int:
        """
        Delete the segments that no message refers to, that the previous
        sweep found unused too, and that no writer holds (writer thread,
        outside a transaction): how many.  Also a ``.new`` file a crash left
        behind, an hour on.
        """
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return 0
        unused = set()
        deleted = 0
        for name in sorted(names):
            if _NEW_SEGMENT_NAME.match(name):
                path = self._path(name)
                with contextlib.suppress(OSError):
                    if (time.time() if now is None else now) - os.stat(path).st_mtime > 3600:
                        deleted += self._delete_if_free(path, None, conn)
                continue
            if not _SEGMENT_NAME.match(name) or name == self._name or self._used(conn, name):
                continue
            if name not in self._unused:
                unused.add(name)
                continue
            if not self._delete_if_free(self._path(name), name, conn):
                unused.add(name)  # held by a writer: not yet
            else:
                deleted += 1
        self._unused = unused
        self.swept += deleted
        return deleted

    @staticmethod
    def _used(conn: sqlite3.Connection, name: str) -> bool:
        return (
            conn.execute("SELECT 1 FROM messages WHERE log_segment = ? LIMIT 1", (name,)).fetchone()
            is not None
        )

    def _delete_if_free(self, path: str, name: str | None, conn: sqlite3.Connection) -> int:
        """Delete ``path`` if no writer holds it and (for a segment) still no row uses it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a writer appends to it, or its batch is not committed
            # Asked again under the lock: a batch that committed a row using
            # it after the first question released the lock only after that.
            if name is not None and self._used(conn, name):
                return 0
            os.unlink(path)
            return 1
        finally:
            os.close(fd)


def _read_exactly(fd: int, offset: int, length: int, path: str) -> bytes:
    """``length`` octets at ``offset`` of the segment open as ``fd`` (at ``path``)."""
    parts = []
    done = 0
    try:
        while done < length:
            part = os.pread(fd, length - done, offset + done)
            if not part:
                raise StoreUnavailable(
                    f"spool body file {path} ends at {offset + done} octets,"
                    f" where the database says a body runs to {offset + length}"
                )
            parts.append(part)
            done += len(part)
    except OSError as e:
        raise _body_log_error(e, path) from e
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _body_log_error(e: OSError, path: str) -> StoreUnavailable:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"spool body file {path}: {e.strerror}")
    return StoreUnavailable(f"spool body file {path}: {e.strerror or e}")


class _Reader(_Worker):
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
        self, batch: list[tuple[_Job, Deferred[Any]]]
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
                results.append((d, False, _unavailable(e)))
            except OSError as e:
                self._drop_connection()
                results.append((d, False, _unavailable(sqlite3.OperationalError(str(e)))))
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


@implementer(ISpoolStore, INodeRegistry, IRouteCoordination, ILeaseReclaim)
@define
class SqliteSpoolStore:
    """
    An ``ISpoolStore`` in one SQLite file, shared safely by several stores and
    processes on one host.  Build it with ``SqliteSpoolStore.open``.
    """

    _writer: _Writer
    _clock: Any
    _reader: _Reader
    _new_id: Callable[[], str]
    #: node -> the incarnation its leases are held under (``ILeaseReclaim``)
    _incarnations: dict[str, str] = field(factory=dict)

    @classmethod
    def open(
        cls,
        path: str,
        reactor: Any,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        clock: Any = None,
    ) -> SqliteSpoolStore:
        """
        Start the writer thread for the database at ``path`` (created with its
        directory if missing; a failure to open shows as ``StoreUnavailable``
        from the first calls, and is retried on every later one).

        :param reactor: the reactor results are delivered to (``callFromThread``).
        :param busy_timeout: seconds to wait for a lock another process holds.
        :param clock: an ``IReactorTime`` for ``counts()``; the reactor by default.
        """
        writer = _Writer(path, busy_timeout, reactor)
        reader = _Reader(path, busy_timeout, reactor)
        # Last, so that nothing above can fail and leave its thread running.
        writer.checkpointer = _Checkpointer(path, busy_timeout)
        return cls(writer, reactor if clock is None else clock, reader, _id_maker())

    @property
    def commits(self) -> int:
        """How many transactions this store has committed (for tests and metrics)."""
        return self._writer.commits

    def run(self, job: Callable[[sqlite3.Connection], _T]) -> Deferred[_T]:
        """
        Run ``job(connection)`` on the writer thread inside a transaction (for
        tests and maintenance).  Its result or exception goes to the ``Deferred``.
        """
        return self._writer.submit(job)

    def _read(self, job: Callable[[sqlite3.Connection], _T]) -> Deferred[_T]:
        """
        Run the read-only ``job`` on the reader thread; on the writer until the
        writer has made the schema (a new file has no tables before that).
        """
        if self._writer.ready:
            return self._reader.submit(job)
        return self._writer.submit(job)

    # -- ISpoolStore ----------------------------------------------------

    def enqueue(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
    ) -> Deferred[list[str]]:
        job = self._new_message(envelope, message, routes, node, None, None)
        if job is None:
            return succeed([])
        return self._writer.submit(job).addCallback(lambda stored: [cast(Entry, e).id for e in stored])

    def enqueue_leased(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
        lease_seconds: float,
        decided: Mapping[str, tuple[Attempt, Decision]] | None = None,
    ) -> Deferred[list[Lease | Entry]]:
        expires = envelope.received_at + lease_seconds
        job = self._new_message(envelope, message, routes, node, expires, decided)
        if job is None:
            return succeed([])
        return self._writer.submit(job)

    def _new_message(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
        expires: float | None,
        decided: Mapping[str, tuple[Attempt, Decision]] | None,
    ) -> _Inserts | None:
        """
        The writer job that stores a new message and its entries (``None``
        without routes: nothing to store).  Its result has one item per
        route: the entry; with ``expires``, a lease on it to this node until
        then; for a route in ``decided``, the entry as ``record`` leaves it
        after that first attempt.
        """
        # A bytes subclass (the server's CheckedMessage) binds as it is: no copy.
        body = message if isinstance(message, bytes) else bytes(message)
        message_id = self._new_id()
        token = "" if expires is None else self._new_id()
        entries = new_entries(envelope, len(body), routes, node, message_id, self._new_id)
        if not entries:
            return None
        sender = None if envelope.sender is None else str(envelope.sender)
        common = (envelope.received_at, len(body), envelope.helo, envelope.client, int(envelope.smtputf8))
        stored: list[Lease | Entry] = []
        rows: list[tuple[Any, ...]] = []
        attempts = []
        incarnation = None if expires is None else self._incarnations.get(node)
        for e in entries:
            head = (e.id, message_id, e.route, sender)
            if decided and e.route in decided:
                # Stored as record() leaves it after that attempt.
                attempt, decision = decided[e.route]
                after = apply_decision(e, decision)
                stored.append(after)
                rows.append(
                    head
                    + (_recipients_json(after.recipients),)
                    + common
                    + (after.next_attempt, after.node, None, None, after.attempts, int(after.held), None)
                )
                attempts.append(_attempt_row(evolve(attempt, entry_id=e.id)))
            elif expires is None:
                stored.append(e)
                rows.append(
                    head
                    + (_pending_json(routes[e.route]),)
                    + common
                    + (e.next_attempt, e.node, None, None, 0, 0, None)
                )
            else:
                # In the row, the lease's expiry stands in for the due time,
                # as after claim; the lease carries the entry as enqueued.
                stored.append(Lease(e, node, token, expires))
                rows.append(
                    head
                    + (_pending_json(routes[e.route]),)
                    + common
                    + (expires, None, node, token, 0, 0, incarnation)
                )
        return _Inserts([(message_id, body)], rows, attempts, stored, self._writer.bodies)

    def claim(
        self,
        node: str,
        now: float,
        limit: int,
        lease_seconds: float,
        takeover_seconds: float,
        ids: Iterable[str] | None = None,
    ) -> Deferred[list[Lease]]:
        wanted = None if ids is None else list(ids)
        new_id = self._new_id
        incarnation = self._incarnations.get(node)

        def job(conn: sqlite3.Connection) -> list[Lease]:
            if wanted is not None and not wanted:
                return []
            params: dict[str, Any] = {
                "now": now,
                "node": node,
                "takeover": takeover_seconds,
                "limit": limit,
            }
            sql = CLAIM_SQL
            if wanted is not None:
                names = [f"id{i}" for i in range(len(wanted))]
                sql = CLAIM_IDS_SQL.format(ids=", ".join(":" + n for n in names))
                params.update(zip(names, wanted, strict=True))
            rows = conn.execute(sql, params).fetchall()
            if not rows:
                return []
            expires = now + lease_seconds
            # One token for this claim: a row carries it only while this
            # claim's lease on it lasts, which is all record and release check.
            token = new_id()
            for i in range(0, len(rows), _CLAIM_UPDATE_CHUNK):
                chunk = [row[0] for row in rows[i : i + _CLAIM_UPDATE_CHUNK]]
                conn.execute(
                    CLAIM_UPDATE_SQL.format(ids=", ".join("?" * len(chunk))),
                    (node, token, incarnation, expires, *chunk),
                )
            return [Lease(_entry(row), node, token, expires) for row in rows]

        return self._writer.submit(job)

    def body(self, message_id: str) -> Deferred[bytes]:
        bodies = self._writer.bodies

        def job(conn: sqlite3.Connection) -> bytes:
            row = conn.execute(
                "SELECT body, log_segment, log_offset, log_length FROM messages WHERE id = ?",
                (message_id,),
            ).fetchone()
            if row is None:
                raise KeyError(message_id)
            if row[1] is not None:
                return bodies.read(row[1], row[2], row[3])
            return bytes(row[0])

        return self._read(job)

    def record(self, lease: Lease, attempt: Attempt, decision: Decision) -> Deferred[Entry | None]:
        if not apply_decision(lease.entry, decision).pending:
            # Every recipient the lease covers is done (the usual case: all
            # delivered), and only the lease's holder changes recipients, so
            # the entry goes whatever its row holds: no read, no decoding on
            # the writer, one statement fewer.
            entry = lease.entry
            return self._writer.submit(
                _Removal(entry.id, lease.token, entry.message_id, entry.attempts > 0)
            )

        def job(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(
                f"SELECT {_ENTRY_COLUMNS}, lease_token FROM entries WHERE id = ?",
                (lease.entry.id,),
            ).fetchone()
            if row is None or row[-1] != lease.token:
                raise LeaseLost(lease.entry.id)
            # The entry as claimed: its due time then, not the lease's expiry.
            current = _entry(row[:6] + (lease.entry.next_attempt,) + row[7:-1])
            entry = apply_decision(current, decision)
            if not entry.pending:
                _remove(conn, entry.id, entry.message_id)
                return None
            conn.execute(
                "UPDATE entries SET recipients = ?, attempts = ?, next_attempt = ?, node = ?,"
                " held = ?, lease_node = NULL, lease_token = NULL WHERE id = ?",
                (
                    _recipients_json(entry.recipients),
                    entry.attempts,
                    entry.next_attempt,
                    entry.node,
                    int(entry.held),
                    entry.id,
                ),
            )
            conn.execute(_insert_sql("attempts", 1), _attempt_row(attempt))
            return entry

        return self._writer.submit(job)

    def release(self, lease: Lease, now: float) -> Deferred[None]:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE entries SET next_attempt = ?, node = NULL, lease_node = NULL,"
                " lease_token = NULL WHERE id = ? AND lease_token = ?",
                (now, lease.entry.id, lease.token),
            )

        return self._writer.submit(job)

    def next_due(
        self, node: str, now: float, takeover_seconds: float = 0.0
    ) -> Deferred[float | None]:
        def job(conn: sqlite3.Connection) -> float | None:
            # Walk the due index in order; an entry reserved for another node is
            # due later, so stop once no later row can beat the best found.
            best: float | None = None
            rows = conn.execute(
                "SELECT next_attempt, node FROM entries WHERE held = 0 ORDER BY next_attempt"
            )
            for next_attempt, reserved_for in rows:
                if best is not None and next_attempt >= best:
                    break
                due = next_attempt
                if reserved_for is not None and reserved_for != node:
                    due += takeover_seconds
                best = due if best is None else min(best, due)
            return best

        return self._read(job)

    def get(self, entry_id: str) -> Deferred[Entry | None]:
        def job(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = ?", (entry_id,)
            ).fetchone()
            return None if row is None else _entry(row)

        return self._read(job)

    def attempts(self, entry_id: str) -> Deferred[list[Attempt]]:
        def job(conn: sqlite3.Connection) -> list[Attempt]:
            rows = conn.execute(
                "SELECT entry_id, node, started, finished, replies FROM attempts"
                " WHERE entry_id = ? ORDER BY rowid",
                (entry_id,),
            )
            return [
                Attempt(
                    entry_id,
                    node,
                    started,
                    finished,
                    tuple(
                        (_address(a), Reply(code, enhanced, text))
                        for a, code, enhanced, text in json.loads(replies)
                    ),
                )
                for entry_id, node, started, finished, replies in rows
            ]

        return self._read(job)

    def entries(
        self, filter: EntryFilter | None = None, offset: int = 0, limit: int = 100
    ) -> Deferred[list[Entry]]:
        where = []
        params: list[Any] = []
        if filter is not None:
            if filter.route is not None:
                where.append("route = ?")
                params.append(filter.route)
            if filter.held is not None:
                where.append("held = ?")
                params.append(int(filter.held))
            if filter.recipient is not None:
                where.append(
                    "EXISTS (SELECT 1 FROM json_each(entries.recipients)"
                    " WHERE lower(json_extract(value, '$.address')) = lower(?))"
                )
                params.append(filter.recipient)
        sql = f"SELECT {_ENTRY_COLUMNS} FROM entries"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY next_attempt, rowid LIMIT ? OFFSET ?"
        params += [limit, offset]

        def job(conn: sqlite3.Connection) -> list[Entry]:
            return [_entry(row) for row in conn.execute(sql, params)]

        return self._read(job)

    def counts(self) -> Deferred[dict[str, Any]]:
        now = self._clock.seconds()
        bodies = self._writer.bodies

        def job(conn: sqlite3.Connection) -> dict[str, Any]:
            entries, held, leased = conn.execute(
                "SELECT count(*), coalesce(sum(held), 0),"
                " coalesce(sum(lease_token IS NOT NULL AND next_attempt > ?), 0) FROM entries",
                (now,),
            ).fetchone()
            (recipients,) = conn.execute(
                "SELECT count(*) FROM entries, json_each(entries.recipients)"
                " WHERE json_extract(value, '$.state') = 'pending'"
            ).fetchone()
            routes = dict(conn.execute("SELECT route, count(*) FROM entries GROUP BY route"))
            (in_use,) = conn.execute(
                "SELECT coalesce(sum(log_length), 0) FROM messages WHERE log_segment IS NOT NULL"
            ).fetchone()
            return {
                "entries": entries,
                "held": held,
                "leased": leased,
                "recipients": recipients,
                "routes": routes,
                "body_log": {**bodies.usage(), "in_use": in_use},
            }

        return self._read(job)

    def hold(self, entry_id: str) -> Deferred[bool]:
        def job(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute("UPDATE entries SET held = 1 WHERE id = ?", (entry_id,)).rowcount > 0
            )

        return self._writer.submit(job)

    def release_held(self, entry_id: str, now: float) -> Deferred[bool]:
        def job(conn: sqlite3.Connection) -> bool:
            found = conn.execute("SELECT 1 FROM entries WHERE id = ?", (entry_id,)).fetchone()
            # An entry still being delivered keeps its lease's expiry as due time.
            conn.execute(
                "UPDATE entries SET held = 0, node = NULL, next_attempt = CASE"
                " WHEN lease_token IS NOT NULL AND next_attempt > :now THEN next_attempt"
                " ELSE :now END WHERE id = :id AND held = 1",
                {"now": now, "id": entry_id},
            )
            return found is not None

        return self._writer.submit(job)

    def flush(self, route: str | None, now: float) -> Deferred[int]:
        def job(conn: sqlite3.Connection) -> int:
            where = " WHERE held = 0 AND NOT (lease_token IS NOT NULL AND next_attempt > :now)"
            if route is not None:
                where += " AND route = :route"
            params = {"now": now, "route": route}
            # Rows already due for any node are left as they are: a second
            # flush (the operator's, then the engine's when the route comes
            # back) would otherwise rewrite the whole backlog for nothing.
            conn.execute(
                "UPDATE entries SET next_attempt = min(next_attempt, :now), node = NULL"
                + where
                + " AND (next_attempt > :now OR node IS NOT NULL)",
                params,
            )
            (count,) = conn.execute("SELECT count(*) FROM entries" + where, params).fetchone()
            return int(count)

        return self._writer.submit(job)

    def delete(self, entry_id: str) -> Deferred[bool]:
        def job(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT message_id FROM entries WHERE id = ?", (entry_id,)
            ).fetchone()
            if row is None:
                return False
            _remove(conn, entry_id, row[0])
            return True

        return self._writer.submit(job)

    # -- ILeaseReclaim -----------------------------------------------------

    def reclaim(self, node: str, incarnation: str, now: float) -> Deferred[int]:
        self._incarnations[node] = incarnation

        def job(conn: sqlite3.Connection) -> int:
            # One writer job: its BEGIN IMMEDIATE orders it with every claim
            # of every process on the file.
            cursor = conn.execute(
                "UPDATE entries SET next_attempt = ?, node = ?, lease_node = NULL,"
                " lease_token = NULL, lease_incarnation = NULL"
                " WHERE lease_node = ? AND lease_token IS NOT NULL AND next_attempt > ?"
                " AND (lease_incarnation IS NULL OR lease_incarnation != ?)",
                (now, node, node, now, incarnation),
            )
            return int(cursor.rowcount)

        return self._writer.submit(job)

    # -- INodeRegistry -----------------------------------------------------

    def heartbeat(self, node: str, now: float, info: Mapping[str, Any]) -> Deferred[None]:
        text = json.dumps(dict(info), ensure_ascii=False)

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO nodes (name, last_seen, info) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen, info = excluded.info",
                (node, now, text),
            )

        return self._writer.submit(job)

    def nodes(self, now: float) -> Deferred[list[dict[str, Any]]]:
        def job(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {
                name: {"name": name, "last_seen": seen, "info": json.loads(info), "leased": 0, "reserved": 0}
                for name, seen, info in conn.execute("SELECT name, last_seen, info FROM nodes")
            }

            def of(name: str) -> dict[str, Any]:
                return found.setdefault(
                    name, {"name": name, "last_seen": None, "info": {}, "leased": 0, "reserved": 0}
                )

            for name, n in conn.execute(
                "SELECT lease_node, count(*) FROM entries WHERE lease_token IS NOT NULL"
                " AND next_attempt > ? GROUP BY lease_node",
                (now,),
            ):
                of(name)["leased"] = n
            for name, n in conn.execute(
                "SELECT node, count(*) FROM entries WHERE node IS NOT NULL AND held = 0 GROUP BY node"
            ):
                of(name)["reserved"] = n
            return [found[name] for name in sorted(found)]

        return self._read(job)

    # -- IRouteCoordination -----------------------------------------------

    def share(
        self, route: str, node: str, want: int, holding: int, limit: int, now: float, ttl: float
    ) -> Deferred[int]:
        # One writer job: its BEGIN IMMEDIATE makes the read and the write one
        # step for every store and process on the file.
        def job(conn: sqlite3.Connection) -> int:
            conn.execute(
                "DELETE FROM route_shares WHERE route = ? AND (expires <= ? OR node = ?)",
                (route, now, node),
            )
            others = 0
            wants: dict[str, int] = {}
            for name, given, wanted in conn.execute(
                "SELECT node, given, want FROM route_shares WHERE route = ?", (route,)
            ):
                others += given
                wants[name] = wanted
            wants[node] = want
            given = max(holding, min(want, fair_share(limit, wants, node), limit - others))
            # A share of nothing, wanting nothing, counts for nothing: no row
            # keeps it (an idle route leaves the table empty).
            if given or want:
                conn.execute(
                    "INSERT INTO route_shares (route, node, given, want, expires)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (route, node, given, want, now + ttl),
                )
            return given

        return self._writer.submit(job)

    def route_states(self) -> Deferred[dict[str, dict[str, Any]]]:
        def job(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            return {
                route: json.loads(state)
                for route, state in conn.execute("SELECT route, state FROM route_states")
            }

        return self._read(job)

    def set_route_state(self, route: str, state: Mapping[str, Any] | None) -> Deferred[None]:
        if state is None:

            def job(conn: sqlite3.Connection) -> None:
                conn.execute("DELETE FROM route_states WHERE route = ?", (route,))

        else:
            try:
                text = json.dumps(dict(state), ensure_ascii=False)
            except (TypeError, ValueError):
                return fail()

            def job(conn: sqlite3.Connection) -> None:
                conn.execute(
                    "INSERT INTO route_states (route, state) VALUES (?, ?)"
                    " ON CONFLICT (route) DO UPDATE SET state = excluded.state",
                    (route, text),
                )

        return self._writer.submit(job)

    def close(self) -> Deferred[None]:
        stopped = gatherResults([self._writer.stop(), self._reader.stop()])
        return stopped.addCallback(lambda _: None)


#: Columns added to ``entries`` after its first release: a spool file written
#: before them gets them (with their default) when it is opened.
_ADDED_COLUMNS = {"smtputf8": "INTEGER NOT NULL DEFAULT 0", "lease_incarnation": "TEXT"}


#: Columns added to ``messages`` since: where a body kept in the body log is.
_ADDED_MESSAGE_COLUMNS = {"log_segment": "TEXT", "log_offset": "INTEGER", "log_length": "INTEGER"}


#: The spool's schema, in ``PRAGMA user_version``.  1: bodies may be in the
#: body log (a hub before it would read them as empty: it must not open such
#: a spool, and any later one refuses a spool of a schema it does not know).
#: Tables added since (``route_shares``, ``route_states``) need no new
#: version: ``_SCHEMA`` creates whichever is missing when a spool is opened,
#: and a hub before them reads the rest of the spool as it always did.
SCHEMA_VERSION = 1


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring a spool of an earlier schema up to ``SCHEMA_VERSION`` (in one transaction)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"the spool was written by a newer mailhub (schema {version};"
                f" this one knows up to {SCHEMA_VERSION})"
            )
        for table, added in (("entries", _ADDED_COLUMNS), ("messages", _ADDED_MESSAGE_COLUMNS)):
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            for name, definition in added.items():
                if name not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
        # The sweep asks, per segment, whether any message still uses it.
        conn.execute(
            "CREATE INDEX IF NOT EXISTS messages_log_segment ON messages (log_segment)"
            " WHERE log_segment IS NOT NULL"
        )
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class _Inserts:
    """
    A writer job that only inserts rows (``enqueue``'s and
    ``enqueue_leased``'s): a message, its entries, their decided attempts,
    and what the job returns.  A large body goes to the body log as the job
    runs (``message_rows``).

    Run alone it is an ``executemany`` per table.  In the writer's
    optimistic pass, neighbouring ``_Inserts`` run together
    (:func:`_run_merged`): one multi-row ``INSERT`` per table for all of
    them.  That is for the GIL's sake: every statement step releases the GIL
    around SQLite's work and takes it back after, and taking it back waits
    while the reactor thread runs Python.  Sixteen messages arriving together
    were 32 or more such waits; merged they are two or three.
    """

    __slots__ = ("bodies", "entries", "attempts", "result", "_log", "_messages")

    def __init__(
        self,
        bodies: list[tuple[str, bytes]],
        entries: list[tuple[Any, ...]],
        attempts: list[tuple[Any, ...]],
        result: Any,
        log: _BodyLog,
    ) -> None:
        #: (message id, body) of each message.
        self.bodies = bodies
        self.entries = entries
        self.attempts = attempts
        self.result = result
        self._log = log
        self._messages: list[tuple[Any, ...]] | None = None

    def message_rows(self) -> list[tuple[Any, ...]]:
        """
        The ``messages`` rows: a large body goes to the body log (on the
        writer thread, the first time only: run again after a rollback, the
        job refers to the octets it already wrote) and its row says where.
        """
        if self._messages is None:
            rows: list[tuple[Any, ...]] = []
            for message_id, body in self.bodies:
                if len(body) > LOG_THRESHOLD:
                    segment, offset = self._log.append(body)
                    rows.append((message_id, b"", segment, offset, len(body)))
                else:
                    rows.append((message_id, body, None, None, None))
            self._messages = rows
        return self._messages

    def __call__(self, conn: sqlite3.Connection) -> Any:
        for table, rows in self.tables():
            if rows:
                conn.executemany(_insert_sql(table, 1), rows)
        return self.result

    def tables(self) -> tuple[tuple[str, list[tuple[Any, ...]]], ...]:
        """The rows per table, in the order they are inserted (a row's parent first)."""
        return (("messages", self.message_rows()), ("entries", self.entries), ("attempts", self.attempts))

    @staticmethod
    def run_together(conn: sqlite3.Connection, group: Sequence[_Inserts]) -> list[Any]:
        for t, (table, _) in enumerate(group[0].tables()):
            rows = [row for job in group for row in job.tables()[t][1]]
            for chunk in _chunks(rows, _MAX_PARAMETERS // len(_INSERT_COLUMNS[table])):
                conn.execute(_insert_sql(table, len(chunk)), [v for row in chunk for v in row])
        return [job.result for job in group]


class _Removal:
    """
    A writer job that removes an entry whose recipients are all done
    (``record``'s usual case, the end of a delivery): the entry if the lease
    still holds it, its attempts, and its message once no entry uses it.

    Neighbouring removals run together, like ``_Inserts`` and for the same
    reason: three statements for a batch of them, not up to three each.
    """

    __slots__ = ("entry_id", "token", "message_id", "logged")

    def __init__(self, entry_id: str, token: str, message_id: str, logged: bool) -> None:
        self.entry_id = entry_id
        self.token = token
        self.message_id = message_id
        #: Whether the entry has attempts to remove (it was tried before).
        self.logged = logged

    def __call__(self, conn: sqlite3.Connection) -> None:
        deleted = conn.execute(
            "DELETE FROM entries WHERE id = ? AND lease_token = ?", (self.entry_id, self.token)
        ).rowcount
        if not deleted:
            raise LeaseLost(self.entry_id)
        if self.logged:
            conn.execute("DELETE FROM attempts WHERE entry_id = ?", (self.entry_id,))
        conn.execute(_DELETE_UNUSED_MESSAGE_SQL, (self.message_id, self.message_id))

    @staticmethod
    def run_together(conn: sqlite3.Connection, group: Sequence[_Removal]) -> list[Any]:
        # Each row goes only with its own lease's token: the CASE gives each
        # id its token, and the id list lets SQLite find the rows by key (a
        # row value IN scans the table).
        for chunk in _chunks(group, _MAX_PARAMETERS // 3):
            marks = ", ".join("?" * len(chunk))
            cases = " ".join(["WHEN ? THEN ?"] * len(chunk))
            deleted = conn.execute(
                f"DELETE FROM entries WHERE id IN ({marks}) AND lease_token = CASE id {cases} END",
                [job.entry_id for job in chunk] + [v for job in chunk for v in (job.entry_id, job.token)],
            ).rowcount
            if deleted != len(chunk):
                # A lease was lost: the writer runs the batch again job by
                # job, and only the removal that lost its lease fails.
                raise LeaseLost("one of a batch of removals")
        for ids in _chunks([job.entry_id for job in group if job.logged], _MAX_PARAMETERS):
            conn.execute(f"DELETE FROM attempts WHERE entry_id IN ({', '.join('?' * len(ids))})", ids)
        messages = list(dict.fromkeys(job.message_id for job in group))
        for ids in _chunks(messages, _MAX_PARAMETERS):
            conn.execute(
                f"DELETE FROM messages WHERE id IN ({', '.join('?' * len(ids))})"
                " AND NOT EXISTS (SELECT 1 FROM entries WHERE message_id = messages.id)",
                ids,
            )
        return [None] * len(group)


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    """``items`` in slices of at most ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


#: The columns ``_Inserts`` fills, per table.
_INSERT_COLUMNS = {
    "messages": ("id", "body", "log_segment", "log_offset", "log_length"),
    "entries": (
        "id", "message_id", "route", "sender", "recipients", "created", "size", "helo",
        "client", "smtputf8", "next_attempt", "node", "lease_node", "lease_token", "attempts",
        "held", "lease_incarnation",
    ),
    "attempts": ("entry_id", "node", "started", "finished", "replies"),
}

#: Parameters per statement: SQLite's limit before 3.32 (32,766 since).
_MAX_PARAMETERS = 999


@functools.lru_cache(maxsize=256)
def _insert_sql(table: str, rows: int) -> str:
    """``INSERT INTO table (columns) VALUES (?, ...), ...`` for ``rows`` rows."""
    columns = _INSERT_COLUMNS[table]
    row = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([row] * rows)


def _run_merged(conn: sqlite3.Connection, jobs: list[_Job]) -> list[Any]:
    """
    Run ``jobs`` in order on ``conn`` and return their values, each run of
    neighbouring ``_Inserts`` (or ``_Removal``) together, a few statements
    for all of them.  An exception leaves the transaction to the caller (the
    writer rolls it back and runs the batch again, each job alone).
    """
    values: list[Any] = []
    i = 0
    while i < len(jobs):
        kind = type(jobs[i])
        if kind not in _MERGED:
            values.append(jobs[i](conn))
            i += 1
            continue
        j = i + 1
        while j < len(jobs) and type(jobs[j]) is kind:
            j += 1
        values.extend(kind.run_together(conn, jobs[i:j]))  # type: ignore[attr-defined,arg-type]
        i = j
    return values


#: The jobs that run together with their like neighbours.
_MERGED = (_Inserts, _Removal)


def _attempt_row(attempt: Attempt) -> tuple[Any, ...]:
    return (
        attempt.entry_id,
        attempt.node,
        attempt.started,
        attempt.finished,
        json.dumps(
            [[str(a), r.code, r.enhanced, r.text] for a, r in attempt.replies],
            ensure_ascii=False,
        ),
    )


_DELETE_UNUSED_MESSAGE_SQL = (
    "DELETE FROM messages WHERE id = ? AND NOT EXISTS (SELECT 1 FROM entries WHERE message_id = ?)"
)


def _remove(conn: sqlite3.Connection, entry_id: str, message_id: str) -> None:
    """Remove an entry, its attempts, and its message once no entry uses it."""
    conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
    conn.execute("DELETE FROM attempts WHERE entry_id = ?", (entry_id,))
    conn.execute(_DELETE_UNUSED_MESSAGE_SQL, (message_id, message_id))


@implementer(IStorePlugin)
@frozen
class SqliteStorePlugin:
    """Makes a ``SqliteSpoolStore`` from the ``[store]`` table."""

    name: str = "sqlite"
    #: The keys of ``[store]`` besides ``plugin`` (``mailhub.plugin``).
    config_keys: frozenset[str] = frozenset({"path", "busy_timeout"})

    def check_config(self, config: Mapping[str, Any]) -> None:
        """
        Check the ``[store]`` table as ``make`` does, without opening the database.

        :raises ValueError: naming the key at fault.
        """
        path = config.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("store.path: the sqlite store needs a database file path")
        busy_timeout = config.get("busy_timeout", DEFAULT_BUSY_TIMEOUT)
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float) or busy_timeout < 0:
            raise ValueError("store.busy_timeout: must be a number of seconds, 0 or more")

    def make(self, config: Mapping[str, Any], reactor: Any) -> SqliteSpoolStore:
        """
        :param config: ``path`` (relative to ``config_dir``), optional
            ``busy_timeout`` in seconds.
        :param reactor: the reactor; results come back to its thread.
        :raises ValueError: naming the key, when ``path`` or ``busy_timeout`` is wrong.
        """
        path = config.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("store.path: the sqlite store needs a database file path")
        busy_timeout = config.get("busy_timeout", DEFAULT_BUSY_TIMEOUT)
        if (
            isinstance(busy_timeout, bool)
            or not isinstance(busy_timeout, int | float)
            or busy_timeout < 0
        ):
            raise ValueError("store.busy_timeout: must be a number of seconds, 0 or more")
        path = os.path.join(str(config.get("config_dir", ".")), os.path.expanduser(path))
        return SqliteSpoolStore.open(path, reactor, float(busy_timeout))


plugin = SqliteStorePlugin()

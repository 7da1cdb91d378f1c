"""
The ``sqlite`` archive: the embedded default, for hubs on one host.

Every statement runs on one of the archive's two threads, never on the
reactor thread.  The writer thread takes all the jobs waiting in its queue,
runs them in one ``BEGIN IMMEDIATE`` transaction, each in a savepoint of its
own (a failing job rolls back only its own work), commits once and then
fires their ``Deferred`` on the reactor thread.  The database is in WAL mode
with ``synchronous=FULL``: ``add`` fires only once its ``COMMIT`` is on disk.
Reads (``search``, ``count``, ``get``, ``holds``, ``audit_log``) run on a
reader thread with a connection of its own, beside the writer.

Tables:

- ``messages``: one row per archive id (what a search shows, the envelope
  sender, the hash of the bytes, the ``ArchiveText`` as compressed JSON).
- ``bodies``: the message bytes, zlib-compressed, once per SHA-256: a message
  for a hundred mailboxes, or imported twice under two ids, is stored once.
- ``mailboxes``: one row per (mailbox, message), with the domain and the
  message's time, indexed for newest-first walks of a mailbox and of a domain.
- ``text_index``: FTS5 (``unicode61 remove_diacritics 2``: case and accents
  folded) over subject, sender (``From:`` and envelope), recipients
  (``To:``/``Cc:``), body and attachment names, keyed by the messages' rowid;
  contentless, as the text is kept in ``messages``.
- ``holds`` and ``audit``.
- ``accounts`` (``IAccountStore``): one row per LiveArchive account, keyed
  by its address (UTF-8 of ``str(Address)``, as a BLOB: any character),
  with the domain for listings and the ``Account`` as JSON.
- ``read_flags``: one row per (account, archive id) read.
- ``sent``: each account's Sent folder, the bytes zlib-compressed, indexed
  for newest-first pages of one account.
- ``delivered``: what the hub delivered, one row per (mailbox, archive id)
  (``record_delivered``, one writer job per batch), indexed by domain and
  time for expiry; with an index of ``messages`` by Message-ID, ``delivered``
  finds a delivery of the same message under another archive id.

Searches page by keyset on ``(received_at, id)``, so a page deep into the
results costs about what the first does; the cursor is opaque (base64 of
JSON).  A full-text search walks its scope newest first a chunk of rows at
a time and asks the text index only about each chunk's range of rowids, so
that a word in most messages costs about what the page does, not what the
list of its matches does; when the matches turn out rare, it starts from
them if the index lists few, else reads their whole list
(``_Search._walk``).  ``count`` is exact: from the few matches, or with
the whole list of them.  User text reaches FTS5 only inside a quoted
string, its quotes doubled: it is never query syntax.  ``expire`` removes a batch in one
transaction.  The schema is in ``PRAGMA user_version`` (``SCHEMA_VERSION``);
an archive of a newer schema is refused, one of an older schema gains what
it lacks when opened (version 1 had no accounts, read flags nor Sent folder;
version 2 no delivery records).

Configuration (the ``[archive]`` table)::

    plugin = "sqlite"
    path = "var/archive.db"   # relative to the configuration file's directory
    max_size_mb = 10000       # optional: beyond it, add fails with StoreFull
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from attrs import define, frozen
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.interfaces import IAccountStore, IArchive, IArchivePlugin
from mailhub.model import (
    Account,
    Address,
    ArchivedMessage,
    ArchivePage,
    ArchiveQuery,
    ArchiveScope,
    ArchiveSummary,
    ArchiveText,
    AuditEvent,
    SentMessage,
    StoreFull,
    StoreUnavailable,
    archive_words,
    decode_archive_cursor,
    encode_archive_cursor,
)

__all__ = ["SCHEMA_VERSION", "SqliteArchive", "plugin"]

_T = TypeVar("_T")
_Job = Callable[[sqlite3.Connection], Any]

DEFAULT_BUSY_TIMEOUT = 10.0
_MAX_BATCH = 500
#: A full-text search walks its scope a chunk of rows at a time, this many
#: first, then one chunk more if it is expected to fill the page within
#: ``_WALK_LIMIT`` rows; beyond, it reads the index's whole list of matches.
_FIRST_CHUNK = 128
_WALK_LIMIT = 20_000
#: Up to this many matches in the whole index, a search starts from them
#: (``_DRIVEN``): their messages, then those in scope, sorted.
_FEW = 5000
#: ... asked only when the first chunk found fewer matches than this.
_FEW_SEEN = 4
_DRIVEN = "driven"

#: The archive's schema, in ``PRAGMA user_version``: 2 added the accounts'
#: tables (``_ACCOUNTS_SCHEMA``), 3 the delivery records
#: (``_DELIVERED_SCHEMA``).
SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    received_at REAL NOT NULL,
    sender TEXT,
    size INTEGER NOT NULL,
    has_attachment INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    from_text TEXT NOT NULL,
    body_hash BLOB NOT NULL,
    text BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_time ON messages (received_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS messages_body ON messages (body_hash);
CREATE TABLE IF NOT EXISTS bodies (
    hash BLOB PRIMARY KEY,
    data BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mailboxes (
    message_id TEXT NOT NULL,
    mailbox TEXT NOT NULL,
    domain TEXT NOT NULL,
    received_at REAL NOT NULL,
    words TEXT NOT NULL,
    PRIMARY KEY (mailbox, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS mailboxes_time ON mailboxes (mailbox, received_at DESC, message_id DESC);
CREATE INDEX IF NOT EXISTS mailboxes_domain ON mailboxes (domain, received_at DESC, message_id DESC);
CREATE INDEX IF NOT EXISTS mailboxes_message ON mailboxes (message_id);
CREATE VIRTUAL TABLE IF NOT EXISTS text_index USING fts5 (
    subject, sender, recipients, body, attachments,
    content = '', tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TABLE IF NOT EXISTS holds (
    scope TEXT PRIMARY KEY,
    mailbox TEXT,
    domain TEXT,
    reason TEXT NOT NULL,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    scope TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE INDEX IF NOT EXISTS audit_actor ON audit (actor, at);
"""

# Schema 2.  Every statement is "IF NOT EXISTS": opening an archive of
# schema 1 creates these tables, and that is the whole migration.
_ACCOUNTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    address BLOB PRIMARY KEY,
    domain BLOB NOT NULL,
    data TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS accounts_domain ON accounts (domain);
CREATE TABLE IF NOT EXISTS read_flags (
    account BLOB NOT NULL,
    archive_id TEXT NOT NULL,
    PRIMARY KEY (account, archive_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sent (
    seq INTEGER PRIMARY KEY,
    account BLOB NOT NULL,
    id TEXT NOT NULL,
    sent_at REAL NOT NULL,
    message BLOB NOT NULL,
    UNIQUE (account, id)
);
CREATE INDEX IF NOT EXISTS sent_time ON sent (account, sent_at DESC, id DESC);
"""

# Schema 3, made the same way: what the hub delivered to which mailbox
# (``record_delivered``), and the messages by their Message-ID, to find a
# delivery of the same message under another archive id (``delivered``).
# Opening an archive of schema 2 builds the index over its messages once.
_DELIVERED_SCHEMA = """
CREATE TABLE IF NOT EXISTS delivered (
    mailbox TEXT NOT NULL,
    archive_id TEXT NOT NULL,
    domain TEXT NOT NULL,
    route TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (mailbox, archive_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS delivered_expiry ON delivered (domain, at);
CREATE INDEX IF NOT EXISTS messages_header_id ON messages (message_id) WHERE message_id <> '';
"""





def _clean(text: str) -> str:
    """``text`` as SQLite can take it (lone surrogates replaced)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _address(text: str) -> Address:
    # A domain never contains "@", so the last one splits the address exactly.
    local, _, domain = text.rpartition("@")
    return Address(local, domain)


def _as_tuple(items: Iterable[Any]) -> Any:
    # mypy cannot solve the attrs ``converter=tuple`` of the model's fields.
    return tuple(items)






def _text_blob(text: ArchiveText) -> bytes:
    data = {
        "subject": text.subject,
        "sender": text.sender,
        "recipients": text.recipients,
        "body": text.body,
        "attachments": list(text.attachments),
        "message_id": text.message_id,
        "date": text.date,
    }
    return zlib.compress(json.dumps(data).encode("ascii"))


def _text(blob: bytes) -> ArchiveText:
    data = json.loads(zlib.decompress(blob))
    data["attachments"] = _as_tuple(data["attachments"])
    return ArchiveText(**data)


def _index_row(text: ArchiveText, sender: str | None) -> tuple[str, ...]:
    """The values of ``text_index``'s columns for a message (``delete`` needs them again)."""
    return (
        _clean(text.subject),
        _clean(f"{text.sender}\n{sender or ''}"),
        _clean(text.recipients),
        _clean(text.body),
        _clean("\n".join(text.attachments)),
    )


def _fts_string(term: str, prefix: bool) -> str:
    """
    ``term`` as one FTS5 string: quoted, its quotes doubled, so that nothing
    in it is syntax; the tokenizer splits it into the words of a phrase.
    """
    return '"' + term.replace('"', '""') + '"' + (" *" if prefix else "")


def _unavailable(e: BaseException) -> StoreUnavailable:
    if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StoreFull(f"archive database is full: {e}")
    return StoreUnavailable(f"archive database: {e}")


class _NewerSchema(sqlite3.DatabaseError):
    """The archive was written by a newer mailhub."""


class _Worker:
    """
    A thread that owns one connection to the archive's database, and its
    queue of jobs.  A job is a function of the connection; what it returns or
    raises goes to the ``Deferred`` that ``submit`` returned, fired on the
    reactor thread.
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
        self.thread = threading.Thread(
            target=self._run, name=f"mailhub-archive-{self._role} {path}", daemon=True
        )
        self.thread.start()

    def submit(self, job: Callable[[sqlite3.Connection], _T]) -> Deferred[_T]:
        """Queue ``job``; only ever called on the reactor thread."""
        if self._closing:
            return fail(StoreUnavailable("archive is closed"))
        d: Deferred[_T] = Deferred()
        self._queue.put((job, d))
        return d

    def stop(self) -> Deferred[None]:
        """Run the jobs already queued, close the database, end the thread."""
        if not self._closing:
            self._closing = True
            self._queue.put(self._STOP)
        return self._stopped

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
                        self._drop_connection()
                        results = [(d, False, _unavailable(e)) for _, d in batch]
                    self._fire(results)
        finally:
            self._drop_connection()
            self._reactor.callFromThread(self._stopped.callback, None)

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

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        raise NotImplementedError()

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
    The one thread that writes: each batch of waiting jobs in one
    ``BEGIN IMMEDIATE`` transaction, each job in a savepoint.

    :ivar commits: how many transactions were committed.
    :ivar ready: the schema has been made (set once, on the writer thread;
        until then reads run on the writer too).
    """

    _role = "writer"

    def __init__(self, path: str, busy_timeout: float, reactor: Any, max_size: int | None) -> None:
        self.commits = 0
        self.ready = False
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
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise _NewerSchema(
                        f"{self._path} was written by a newer mailhub (archive schema"
                        f" {version}; this one knows up to {SCHEMA_VERSION})"
                    )
                for statement in (_SCHEMA + _ACCOUNTS_SCHEMA + _DELIVERED_SCHEMA).split(";"):
                    if statement.strip():
                        conn.execute(statement)
                if version < SCHEMA_VERSION:
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
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

    def _run_batch(
        self, batch: list[tuple[_Job, Deferred[Any]]]
    ) -> list[tuple[Deferred[Any], bool, Any]]:
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
        except (sqlite3.Error, OSError) as e:
            return [(d, False, _unavailable(e)) for _, d in batch]
        results: list[tuple[Deferred[Any], bool, Any]] = []
        for job, d in batch:
            conn.execute("SAVEPOINT job")
            try:
                value = job(conn)
            except BaseException as e:
                error = _unavailable(e) if isinstance(e, sqlite3.Error) else e
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
            return [(d, False, _unavailable(e)) for _, d in batch]
        self.commits += 1
        return results


class _Reader(_Worker):
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
        self, batch: list[tuple[_Job, Deferred[Any]]]
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
                results.append((d, False, _unavailable(e)))
            except BaseException as e:
                results.append((d, False, e))
            else:
                results.append((d, True, value))
        return results


# -- the jobs ------------------------------------------------------------------

_SUMMARY_COLUMNS = (
    "m.id, m.received_at, m.sender, m.from_text, m.subject, m.size, m.has_attachment, m.message_id"
)


def _summary(row: Sequence[Any], mailboxes: Sequence[Address]) -> ArchiveSummary:
    archive_id, received_at, sender, from_text, subject, size, has_attachment, message_id = row[:8]
    return ArchiveSummary(
        id=archive_id,
        received_at=received_at,
        sender=from_text or (sender or ""),
        subject=subject,
        mailboxes=_as_tuple(mailboxes),
        size=size,
        has_attachment=bool(has_attachment),
        message_id=message_id,
    )


def _add(message: ArchivedMessage) -> _Job:
    def job(conn: sqlite3.Connection) -> None:
        row = conn.execute(
            "SELECT received_at FROM messages WHERE id = ?", (message.id,)
        ).fetchone()
        if row is None:
            received_at = message.received_at
            text = message.text
            body_hash = hashlib.sha256(message.message).digest()
            if conn.execute("SELECT 1 FROM bodies WHERE hash = ?", (body_hash,)).fetchone() is None:
                conn.execute(
                    "INSERT INTO bodies (hash, data) VALUES (?, ?)",
                    (body_hash, zlib.compress(message.message, 6)),
                )
            sender = None if message.sender is None else str(message.sender)
            seq = conn.execute(
                "INSERT INTO messages (id, received_at, sender, size, has_attachment,"
                " message_id, subject, from_text, body_hash, text)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message.id,
                    received_at,
                    None if sender is None else _clean(sender),
                    len(message.message),
                    int(text.has_attachment),
                    _clean(text.message_id),
                    _clean(text.subject),
                    _clean(text.sender),
                    body_hash,
                    _text_blob(text),
                ),
            ).lastrowid
            conn.execute(
                "INSERT INTO text_index (rowid, subject, sender, recipients, body, attachments)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (seq, *_index_row(text, sender)),
            )
        else:
            received_at = row[0]
        conn.executemany(
            "INSERT OR IGNORE INTO mailboxes (message_id, mailbox, domain, received_at, words)"
            " VALUES (?, ?, ?, ?, ?)",
            [
                (message.id, _clean(str(m)), m.domain, received_at, " ".join(archive_words(str(m))))
                for m in message.mailboxes
            ],
        )

    return job


def _remove_message(conn: sqlite3.Connection, archive_id: str) -> None:
    """Remove a message that has no mailbox left, its index entry, and its body once unused."""
    row = conn.execute(
        "SELECT seq, sender, body_hash, text FROM messages WHERE id = ?", (archive_id,)
    ).fetchone()
    if row is None:
        return
    seq, sender, body_hash, blob = row
    conn.execute(
        "INSERT INTO text_index (text_index, rowid, subject, sender, recipients, body,"
        " attachments) VALUES ('delete', ?, ?, ?, ?, ?, ?)",
        (seq, *_index_row(_text(blob), sender)),
    )
    conn.execute("DELETE FROM messages WHERE seq = ?", (seq,))
    conn.execute(
        "DELETE FROM bodies WHERE hash = ?"
        " AND NOT EXISTS (SELECT 1 FROM messages WHERE body_hash = ?)",
        (body_hash, body_hash),
    )


def _expire(domain: str, before: float, limit: int) -> _Job:
    def job(conn: sqlite3.Connection) -> int:
        if conn.execute("SELECT 1 FROM holds WHERE scope = ?", (f"domain {domain}",)).fetchone():
            return 0
        pairs = conn.execute(
            "SELECT mailbox, message_id FROM mailboxes"
            " WHERE domain = ? AND received_at < ?"
            " AND mailbox NOT IN (SELECT mailbox FROM holds WHERE mailbox IS NOT NULL)"
            " ORDER BY received_at, message_id LIMIT ?",
            (domain, before, limit),
        ).fetchall()
        conn.executemany("DELETE FROM mailboxes WHERE mailbox = ? AND message_id = ?", pairs)
        for archive_id in dict.fromkeys(message_id for _, message_id in pairs):
            if not conn.execute(
                "SELECT 1 FROM mailboxes WHERE message_id = ?", (archive_id,)
            ).fetchone():
                _remove_message(conn, archive_id)
        records = conn.execute(
            "SELECT mailbox, archive_id FROM delivered"
            " WHERE domain = ? AND at < ?"
            " AND mailbox NOT IN (SELECT mailbox FROM holds WHERE mailbox IS NOT NULL)"
            " ORDER BY at LIMIT ?",
            (domain, before, limit),
        ).fetchall()
        conn.executemany("DELETE FROM delivered WHERE mailbox = ? AND archive_id = ?", records)
        return max(len(pairs), len(records))

    return job


def _record_delivered(records: Iterable[tuple[str, Address, str, float]]) -> _Job:
    rows = [
        (_clean(str(mailbox)), archive_id, mailbox.domain, _clean(route), at)
        for archive_id, mailbox, route, at in records
    ]

    def job(conn: sqlite3.Connection) -> None:
        # One row per pair: the latest delivery (and its route) wins.
        conn.executemany(
            "INSERT INTO delivered (mailbox, archive_id, domain, route, at)"
            " VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (mailbox, archive_id) DO UPDATE SET route = excluded.route, at = excluded.at"
            " WHERE excluded.at >= delivered.at",
            rows,
        )

    return job


def _delivered(pairs: Iterable[tuple[str, Address]]) -> _Job:
    wanted = list(dict.fromkeys(pairs))

    def job(conn: sqlite3.Connection) -> set[tuple[str, Address]]:
        found: set[tuple[str, Address]] = set()
        for archive_id, mailbox in wanted:
            box = _clean(str(mailbox))
            # This archive id, or another with the same Message-ID (the
            # partial index of messages by Message-ID finds those).
            row = conn.execute(
                "SELECT 1 FROM delivered WHERE mailbox = ? AND archive_id = ?"
                " UNION ALL SELECT 1 FROM messages m"
                " JOIN messages o ON o.message_id = m.message_id AND o.message_id <> ''"
                " JOIN delivered d ON d.mailbox = ? AND d.archive_id = o.id"
                " WHERE m.id = ? AND m.message_id <> '' LIMIT 1",
                (box, archive_id, box, archive_id),
            ).fetchone()
            if row is not None:
                found.add((archive_id, mailbox))
        return found

    return job


@define
class _Search:
    """The SQL of one search or count: its conditions and parameters."""

    scope: ArchiveScope
    query: ArchiveQuery
    conditions: list[str]
    params: dict[str, Any]
    #: The columns of the (received_at, id) order.
    time: str
    id: str
    #: How many of ``conditions`` say which rows are in scope (the scope
    #: and the time range): a walk of the scope's index checks only these.
    walked: int = 0
    #: Whether ``params["match"]`` is a full-text condition every result must meet.
    matches: bool = False
    #: Whether that condition is on every column (a field's own words are
    #: fewer: their whole list, once, costs less than walking chunks).
    everywhere: bool = False

    @classmethod
    def of(cls, scope: ArchiveScope, query: ArchiveQuery) -> _Search:
        params: dict[str, Any] = {}
        conditions: list[str] = []
        if scope.mailbox is not None:
            conditions.append("b.mailbox = :mailbox")
            params["mailbox"] = _clean(str(scope.mailbox))
            time_column, id_column = "b.received_at", "b.message_id"
        elif scope.domain is not None:
            conditions.append("b.domain = :domain")
            params["domain"] = scope.domain
            time_column, id_column = "b.received_at", "b.message_id"
        else:
            time_column, id_column = "m.received_at", "m.id"
        if query.before is not None:
            conditions.append(f"{time_column} < :before")
            params["before"] = query.before
        if query.after is not None:
            conditions.append(f"{time_column} >= :after")
            params["after"] = query.after
        walked = len(conditions)
        if query.has_attachment is not None:
            conditions.append("m.has_attachment = :has_attachment")
            params["has_attachment"] = int(query.has_attachment)

        match: list[str] = []
        for word in query.words:
            if archive_words(word):
                match.append(f"({_fts_string(word, True)})")
        for phrase in query.phrases:
            if archive_words(phrase):
                match.append(f"({_fts_string(phrase, False)})")
        for column, terms in (("sender", query.sender), ("subject", query.subject)):
            for term in terms:
                if archive_words(term):
                    match.append(f"{{{column}}} : ({_fts_string(term, True)})")
        for n, term in enumerate(query.recipient):
            wanted = archive_words(term)
            if not wanted:
                continue
            in_text = f"{{recipients}} : ({_fts_string(term, True)})"
            if scope.mailbox is not None:
                # The one mailbox in scope either matches, or only the text can.
                if not _mailbox_matches(wanted, scope.mailbox):
                    match.append(in_text)
                continue
            params[f"r{n}"] = in_text
            params[f"rw{n}"] = "% " + " ".join(wanted) + "%"
            in_domain = "" if scope.domain is None else " AND r.domain = :domain"
            conditions.append(
                f"(+m.seq IN (SELECT rowid FROM text_index WHERE text_index MATCH :r{n})"
                f" OR EXISTS (SELECT 1 FROM mailboxes r WHERE r.message_id = m.id{in_domain}"
                f" AND (' ' || r.words) LIKE :rw{n}))"
            )
        everywhere = not any(m.startswith("{") for m in match)
        if match:
            params["match"] = " AND ".join(match)
        return cls(
            scope,
            query,
            conditions,
            params,
            time_column,
            id_column,
            walked,
            bool(match),
            everywhere,
        )

    def source(self, rowids: str = "") -> str:
        """
        The ``FROM`` clause; with ``rowids`` ``_DRIVEN``, from the text
        index's list of matches (few) to their messages and mailboxes.
        """
        if rowids == _DRIVEN:
            driven = (
                "FROM (SELECT rowid AS seq FROM text_index WHERE text_index MATCH :match) f"
                " CROSS JOIN messages m ON m.seq = f.seq"
            )
            if self.scope.mailbox is None and self.scope.domain is None:
                return driven
            # By message: the planner would rather walk the domain for each.
            return (
                driven + " CROSS JOIN mailboxes b INDEXED BY mailboxes_message"
                " ON b.message_id = m.id"
            )
        if self.scope.mailbox is None and self.scope.domain is None:
            return "FROM messages m"
        return "FROM mailboxes b JOIN messages m ON m.id = b.message_id"

    def few(self, conn: sqlite3.Connection) -> bool:
        """Whether the text index lists at most ``_FEW`` messages for the full-text condition."""
        row = conn.execute(
            "SELECT count(*) FROM (SELECT rowid FROM text_index WHERE text_index MATCH :match"
            " LIMIT :few)",
            {"match": self.params["match"], "few": _FEW + 1},
        ).fetchone()
        return int(row[0]) <= _FEW

    def where(self, extra: Sequence[str] = (), rowids: str = "") -> str:
        """
        The ``WHERE`` clause: every condition, ``extra``, and the full-text
        one (its rowids limited by ``rowids``, a condition on ``rowid``).
        """
        conditions = [*self.conditions, *extra]
        if self.matches and rowids != _DRIVEN:
            conditions.append(
                "+m.seq IN (SELECT rowid FROM text_index WHERE text_index MATCH :match"
                + (f" AND {rowids}" if rowids else "")
                + ")"
            )
        return (" WHERE " + " AND ".join(conditions)) if conditions else ""

    def page(self, conn: sqlite3.Connection, cursor: str | None, limit: int) -> ArchivePage:
        params = dict(self.params)
        extra: list[str] = []
        if cursor is not None:
            params["cursor_time"], params["cursor_id"] = decode_archive_cursor(cursor)
            extra.append(f"({self.time}, {self.id}) < (:cursor_time, :cursor_id)")
        found: list[tuple[Sequence[Any], list[Address]]] = []
        if self.matches and self.everywhere:
            self._walk(conn, params, extra, found, limit)
        else:
            self._collect(conn, params, extra, "", found, limit)
        items = [_summary(row, sorted(mailboxes)) for row, mailboxes in found[:limit]]
        more = len(found) > limit and items
        next_cursor = encode_archive_cursor(items[-1].received_at, items[-1].id) if more else None
        return ArchivePage(_as_tuple(items), next_cursor)

    def _collect(
        self,
        conn: sqlite3.Connection,
        params: dict[str, Any],
        extra: Sequence[str],
        rowids: str,
        found: list[tuple[Sequence[Any], list[Address]]],
        limit: int,
    ) -> None:
        """Add to ``found`` the next results (newest first) until it holds ``limit + 1``."""
        order = f" ORDER BY {self.time} DESC, {self.id} DESC"
        params = {**params, "limit": limit + 1 - len(found)}
        where = self.where(extra, rowids)
        source = self.source(rowids)
        if self.scope.mailbox is not None:
            sql = f"SELECT {_SUMMARY_COLUMNS} {source}{where}{order} LIMIT :limit"
            found += [(row, [self.scope.mailbox]) for row in conn.execute(sql, params)]
        elif self.scope.domain is not None:
            # One row per mailbox of the domain; a message's rows come together.
            sql = f"SELECT {_SUMMARY_COLUMNS}, b.mailbox {source}{where}{order}"
            for row in conn.execute(sql, params):
                if found and found[-1][0][0] == row[0]:
                    found[-1][1].append(_address(row[8]))
                    continue
                if len(found) > limit:
                    break
                found.append((row, [_address(row[8])]))
        else:
            sql = f"SELECT {_SUMMARY_COLUMNS} {source}{where}{order} LIMIT :limit"
            found += [
                (row, _mailboxes_of(conn, row[0]) if len(found) + i < limit else [])
                for i, row in enumerate(conn.execute(sql, params).fetchall())
            ]

    def _chunk(
        self, conn: sqlite3.Connection, params: dict[str, Any], extra: Sequence[str], size: int
    ) -> tuple[int, float, str, int, int] | None:
        """
        The next ``size`` rows of the scope in the search's order, whatever
        the text: how many, the last one's (received_at, id), and the least
        and greatest rowid of their messages; ``None`` at the scope's end.
        """
        conditions = [*self.conditions[: self.walked], *extra]
        where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
        sql = (
            f"WITH c AS MATERIALIZED (SELECT {self.time} AS t, {self.id} AS i, m.seq AS seq"
            f" {self.source()}{where} ORDER BY {self.time} DESC, {self.id} DESC LIMIT :chunk)"
            " SELECT (SELECT count(*) FROM c), t, i, (SELECT min(seq) FROM c),"
            " (SELECT max(seq) FROM c) FROM c ORDER BY t, i LIMIT 1"
        )
        row = conn.execute(sql, {**params, "chunk": size}).fetchone()
        return None if row is None else tuple(row)

    def _walk(
        self,
        conn: sqlite3.Connection,
        params: dict[str, Any],
        extra: list[str],
        found: list[tuple[Sequence[Any], list[Address]]],
        limit: int,
    ) -> None:
        """
        Find a page of a full-text search by walking the scope newest first,
        a chunk of rows at a time, asking the text index only about the
        rowids of each chunk's messages (the index reads its lists from the
        chunk's least rowid to its greatest, and archive rowids grow with
        time): the cost follows the page, not how many messages match, for
        a word in most messages.  If the first chunk does not fill the page
        and the index lists at most ``_FEW`` matches in all, the rest starts
        from them; else one more chunk, sized for the density seen (at most
        ``_WALK_LIMIT`` rows), then the whole list of matches at once.

        Every word is a prefix query for FTS5 (``"rep" *`` finds
        ``report``), which merges the doclists of the prefix's terms over
        the whole table whatever the rowid range: each chunk costs that
        merge, about 14 ms for a word in 180,000 messages.
        """
        walked = 0
        size = max(_FIRST_CHUNK, 2 * (limit + 1))
        while len(found) <= limit:
            chunk = self._chunk(conn, params, extra, size)
            if chunk is None:
                return
            n, last_time, last_id, low, high = chunk
            within = [
                *extra,
                f"({self.time}, {self.id}) >= (:chunk_time, :chunk_id)",
            ]
            chunk_params = {**params, "chunk_time": last_time, "chunk_id": last_id}
            chunk_params.update(low=low, high=high)
            self._collect(conn, chunk_params, within, "rowid BETWEEN :low AND :high", found, limit)
            if len(found) > limit or n < size:
                return
            walked += n
            # From here on, only what comes after this chunk.
            params = {**params, "cursor_time": last_time, "cursor_id": last_id}
            if not any(":cursor_time" in e for e in extra):
                extra = [*extra, f"({self.time}, {self.id}) < (:cursor_time, :cursor_id)"]
            # Each chunk costs FTS5 a merge of the prefix's whole lists: one
            # more chunk at most, sized to fill the page at the density seen.
            if walked > n:
                self._collect(conn, params, extra, "", found, limit)
                return
            if len(found) < _FEW_SEEN and self.few(conn):
                self._collect(conn, params, extra, _DRIVEN, found, limit)
                return
            density = max(len(found), 1) / walked
            size = int((limit + 1 - len(found)) / density * 1.5) + _FIRST_CHUNK
            if size > _WALK_LIMIT:
                self._collect(conn, params, extra, "", found, limit)
                return

    def count(self, conn: sqlite3.Connection) -> int:
        what = "count(*)" if self.scope.domain is None else "count(DISTINCT b.message_id)"
        if not self.matches:
            sql = f"SELECT {what} {self.source()}{self.where()}"
            return int(conn.execute(sql, self.params).fetchone()[0])
        if self.few(conn):
            sql = f"SELECT {what} {self.source(_DRIVEN)}{self.where((), _DRIVEN)}"
            return int(conn.execute(sql, self.params).fetchone()[0])
        # Exact, with the whole list of matches (a walk in chunks would merge
        # the prefix's lists once a chunk: slower for a count, see ``_walk``).
        sql = f"SELECT {what} {self.source()}{self.where()}"
        return int(conn.execute(sql, self.params).fetchone()[0])


def _mailbox_matches(wanted: Sequence[str], mailbox: Address) -> bool:
    """Whether the words ``wanted`` occur in a row in ``mailbox``, the last as a start."""
    return (" " + " ".join(archive_words(str(mailbox)))).find(" " + " ".join(wanted)) >= 0


def _mailboxes_of(conn: sqlite3.Connection, archive_id: str) -> list[Address]:
    return [
        _address(row[0])
        for row in conn.execute(
            "SELECT mailbox FROM mailboxes WHERE message_id = ? ORDER BY mailbox", (archive_id,)
        )
    ]


def _get(archive_id: str) -> _Job:
    def job(conn: sqlite3.Connection) -> ArchivedMessage | None:
        row = conn.execute(
            "SELECT m.received_at, m.sender, m.text, b.data FROM messages m"
            " JOIN bodies b ON b.hash = m.body_hash WHERE m.id = ?",
            (archive_id,),
        ).fetchone()
        if row is None:
            return None
        received_at, sender, blob, data = row
        return ArchivedMessage(
            id=archive_id,
            received_at=received_at,
            sender=None if sender is None else _address(sender),
            mailboxes=_as_tuple(_mailboxes_of(conn, archive_id)),
            message=zlib.decompress(data),
            text=_text(blob),
        )

    return job


def _set_hold(scope: ArchiveScope, held: bool, reason: str, at: float) -> _Job:
    key = str(scope)

    def job(conn: sqlite3.Connection) -> None:
        if not held:
            conn.execute("DELETE FROM holds WHERE scope = ?", (key,))
            return
        mailbox = None if scope.mailbox is None else _clean(str(scope.mailbox))
        conn.execute(
            "INSERT OR IGNORE INTO holds (scope, mailbox, domain, reason, since)"
            " VALUES (?, ?, ?, ?, ?)",
            (_clean(key), mailbox, None if mailbox else scope.domain, reason, at),
        )

    return job


def _holds(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [
        {"scope": scope, "mailbox": mailbox, "domain": domain, "reason": reason, "since": since}
        for scope, mailbox, domain, reason, since in conn.execute(
            "SELECT scope, mailbox, domain, reason, since FROM holds ORDER BY since, scope"
        )
    ]


def _audit_log(
    actor: str | None, action: str | None, since: float | None, until: float | None, limit: int
) -> _Job:
    conditions = []
    params: dict[str, Any] = {"limit": limit}
    for name, value, condition in (
        ("actor", actor, "actor = :actor"),
        ("action", action, "action = :action"),
        ("since", since, "at >= :since"),
        ("until", until, "at < :until"),
    ):
        if value is not None:
            conditions.append(condition)
            params[name] = value
    where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
    sql = (
        f"SELECT at, actor, action, scope, detail FROM audit{where}"
        " ORDER BY at DESC, seq DESC LIMIT :limit"
    )

    def job(conn: sqlite3.Connection) -> list[AuditEvent]:
        return [AuditEvent(*row) for row in conn.execute(sql, params)]

    return job


# -- the accounts' jobs --------------------------------------------------------

#: Ids per statement of ``read_ids`` (SQLite limits a statement's parameters).
_IDS_PER_STATEMENT = 500


def _key(address: Address) -> bytes:
    """An address as the accounts' tables key it: exact, any character."""
    return str(address).encode("utf-8", "surrogatepass")






def _put_account(account: Account, new: bool) -> _Job:
    key = _key(account.address)
    row = (key, account.address.domain.encode("utf-8", "surrogatepass"), account.to_json())

    def job(conn: sqlite3.Connection) -> None:
        exists = conn.execute("SELECT 1 FROM accounts WHERE address = ?", (key,)).fetchone()
        if new and exists:
            raise KeyError(f"an account of {account.address} exists")
        if not new and not exists:
            raise KeyError(f"no account of {account.address}")
        conn.execute(
            "INSERT OR REPLACE INTO accounts (address, domain, data) VALUES (?, ?, ?)", row
        )

    return job


def _accounts(domain: str | None) -> _Job:
    def job(conn: sqlite3.Connection) -> list[Account]:
        if domain is None:
            rows = conn.execute("SELECT data FROM accounts")
        else:
            rows = conn.execute(
                "SELECT data FROM accounts WHERE domain = ?",
                (domain.lower().encode("utf-8", "surrogatepass"),),
            )
        return sorted((Account.from_json(data) for (data,) in rows), key=lambda a: a.address)

    return job


def _set_read(account: Address, archive_ids: Iterable[str], read: bool) -> _Job:
    key = _key(account)
    rows = [(key, archive_id) for archive_id in dict.fromkeys(archive_ids)]

    def job(conn: sqlite3.Connection) -> None:
        if read:
            conn.executemany(
                "INSERT OR IGNORE INTO read_flags (account, archive_id) VALUES (?, ?)", rows
            )
        else:
            conn.executemany("DELETE FROM read_flags WHERE account = ? AND archive_id = ?", rows)

    return job


def _read_ids(account: Address, archive_ids: Iterable[str]) -> _Job:
    key = _key(account)
    wanted = list(dict.fromkeys(archive_ids))

    def job(conn: sqlite3.Connection) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(wanted), _IDS_PER_STATEMENT):
            chunk = wanted[start : start + _IDS_PER_STATEMENT]
            marks = ", ".join("?" * len(chunk))
            found.update(
                archive_id
                for (archive_id,) in conn.execute(
                    "SELECT archive_id FROM read_flags"
                    f" WHERE account = ? AND archive_id IN ({marks})",
                    (key, *chunk),
                )
            )
        return found

    return job


def _add_sent(sent: SentMessage) -> _Job:
    row = (_key(sent.account), sent.id, sent.sent_at, zlib.compress(sent.message, 6))

    def job(conn: sqlite3.Connection) -> None:
        # The same id again is a retry: the first stays.
        conn.execute(
            "INSERT OR IGNORE INTO sent (account, id, sent_at, message) VALUES (?, ?, ?, ?)", row
        )

    return job


def _sent(account: Address, before: float | None, limit: int) -> _Job:
    key = _key(account)

    def job(conn: sqlite3.Connection) -> list[SentMessage]:
        rows = conn.execute(
            "SELECT id, sent_at, message FROM sent"
            " WHERE account = ? AND (? IS NULL OR sent_at < ?)"
            " ORDER BY sent_at DESC, id DESC LIMIT ?",
            (key, before, before, max(0, limit)),
        )
        return [
            SentMessage(id, account, sent_at, zlib.decompress(data)) for id, sent_at, data in rows
        ]

    return job


def _sent_message(account: Address, sent_id: str) -> _Job:
    key = _key(account)

    def job(conn: sqlite3.Connection) -> SentMessage | None:
        row = conn.execute(
            "SELECT sent_at, message FROM sent WHERE account = ? AND id = ?", (key, sent_id)
        ).fetchone()
        if row is None:
            return None
        return SentMessage(sent_id, account, row[0], zlib.decompress(row[1]))

    return job


@implementer(IArchive, IAccountStore)
@define
class SqliteArchive:
    """
    An ``IArchive`` and ``IAccountStore`` in one SQLite file.  Build it with
    ``SqliteArchive.open``.
    """

    _writer: _Writer
    _reader: _Reader

    @classmethod
    def open(
        cls,
        path: str,
        reactor: Any,
        max_size: int | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> SqliteArchive:
        """
        Start the archive's threads for the database at ``path`` (created with
        its directory if missing; a failure to open shows as
        ``StoreUnavailable`` from the calls, and is retried on every later one).

        :param reactor: the reactor results are delivered to (``callFromThread``).
        :param max_size: octets the database may grow to (``StoreFull`` beyond), or ``None``.
        :param busy_timeout: seconds to wait for a lock another process holds.
        """
        writer = _Writer(path, busy_timeout, reactor, max_size)
        reader = _Reader(path, busy_timeout, reactor)
        return cls(writer, reader)

    @property
    def commits(self) -> int:
        """How many transactions the archive has committed (for tests and metrics)."""
        return self._writer.commits

    def run(self, job: Callable[[sqlite3.Connection], _T]) -> Deferred[_T]:
        """Run ``job(connection)`` on the writer thread in a transaction (tests, maintenance)."""
        return self._writer.submit(job)

    def _read(self, job: Callable[[sqlite3.Connection], _T]) -> Deferred[_T]:
        """Run ``job`` on the reader thread (on the writer until the schema is made)."""
        if self._writer.ready:
            return self._reader.submit(job)
        return self._writer.submit(job)

    # -- IArchive ---------------------------------------------------------

    def add(self, message: ArchivedMessage) -> Deferred[None]:
        return self._writer.submit(_add(message))

    def search(
        self,
        scope: ArchiveScope,
        query: ArchiveQuery,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Deferred[ArchivePage]:
        try:
            search = _Search.of(scope, query)
            if cursor is not None:
                decode_archive_cursor(cursor)
        except ValueError:
            return fail()
        return self._read(lambda conn: search.page(conn, cursor, limit))

    def count(self, scope: ArchiveScope, query: ArchiveQuery) -> Deferred[int]:
        search = _Search.of(scope, query)
        return self._read(search.count)

    def get(self, archive_id: str) -> Deferred[ArchivedMessage | None]:
        return self._read(_get(archive_id))

    def expire(self, domain: str, before: float, limit: int) -> Deferred[int]:
        return self._writer.submit(_expire(domain.lower(), before, limit))

    def record_delivered(self, records: Iterable[tuple[str, Address, str, float]]) -> Deferred[None]:
        # One job, so one savepoint in the writer's next group commit, whatever its size.
        return self._writer.submit(_record_delivered(records))

    def delivered(self, pairs: Iterable[tuple[str, Address]]) -> Deferred[set[tuple[str, Address]]]:
        return self._read(_delivered(pairs))

    def set_hold(self, scope: ArchiveScope, held: bool, reason: str, at: float) -> Deferred[None]:
        if scope.mailbox is None and scope.domain is None:
            return fail(ValueError("a hold is on a mailbox or a domain, not the whole archive"))
        return self._writer.submit(_set_hold(scope, held, reason, at))

    def holds(self) -> Deferred[list[dict[str, Any]]]:
        return self._read(_holds)

    def record_audit(self, event: AuditEvent) -> Deferred[None]:
        row = (event.at, event.actor, event.action, event.scope, event.detail)

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO audit (at, actor, action, scope, detail) VALUES (?, ?, ?, ?, ?)",
                tuple(_clean(v) if isinstance(v, str) else v for v in row),
            )

        return self._writer.submit(job)

    def audit_log(
        self,
        actor: str | None,
        action: str | None,
        since: float | None,
        until: float | None,
        limit: int,
    ) -> Deferred[list[AuditEvent]]:
        return self._read(_audit_log(actor, action, since, until, limit))

    # -- IAccountStore ---------------------------------------------------

    def add_account(self, account: Account) -> Deferred[None]:
        return self._writer.submit(_put_account(account, new=True))

    def update_account(self, account: Account) -> Deferred[None]:
        return self._writer.submit(_put_account(account, new=False))

    def account(self, address: Address) -> Deferred[Account | None]:
        key = _key(address)

        def job(conn: sqlite3.Connection) -> Account | None:
            row = conn.execute("SELECT data FROM accounts WHERE address = ?", (key,)).fetchone()
            return None if row is None else Account.from_json(row[0])

        return self._read(job)

    def accounts(self, domain: str | None) -> Deferred[list[Account]]:
        return self._read(_accounts(domain))

    def set_read(self, account: Address, archive_ids: Iterable[str], read: bool) -> Deferred[None]:
        return self._writer.submit(_set_read(account, archive_ids, read))

    def read_ids(self, account: Address, archive_ids: Iterable[str]) -> Deferred[set[str]]:
        return self._read(_read_ids(account, archive_ids))

    def add_sent(self, sent: SentMessage) -> Deferred[None]:
        return self._writer.submit(_add_sent(sent))

    def sent(
        self, account: Address, before: float | None, limit: int
    ) -> Deferred[list[SentMessage]]:
        return self._read(_sent(account, before, limit))

    def sent_message(self, account: Address, sent_id: str) -> Deferred[SentMessage | None]:
        return self._read(_sent_message(account, sent_id))

    def close(self) -> Deferred[None]:
        reader = self._reader.stop()
        return self._writer.stop().addCallback(lambda _: reader)


@implementer(IArchivePlugin)
@frozen
class SqliteArchivePlugin:
    """Makes a ``SqliteArchive`` from the ``[archive]`` table."""

    name: str = "sqlite"
    #: Several processes may open the same archive: the hub archives in a worker process.
    shareable: bool = True
    #: The keys of ``[archive]`` besides the core's (``mailhub.plugin``).
    config_keys: frozenset[str] = frozenset({"path", "max_size_mb"})

    def check_config(self, config: Mapping[str, Any]) -> None:
        """
        Check the ``[archive]`` table as ``make`` does, without opening the database.

        :raises ValueError: naming the key at fault.
        """
        path = config.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("archive.path: the sqlite archive needs a database file path")
        size = config.get("max_size_mb")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int | float) or size <= 0):
            raise ValueError("archive.max_size_mb: must be a number of megabytes, more than 0")

    def make(self, config: Mapping[str, Any], reactor: Any) -> SqliteArchive:
        """
        :param config: ``path`` (relative to ``config_dir``), optional
            ``max_size_mb``.
        :param reactor: the reactor; results come back to its thread.
        :raises ValueError: naming the key, when ``path`` or ``max_size_mb`` is wrong.
        """
        path = config.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("archive.path: the sqlite archive needs a database file path")
        max_size_mb = config.get("max_size_mb")
        if max_size_mb is not None and (
            isinstance(max_size_mb, bool)
            or not isinstance(max_size_mb, int | float)
            or max_size_mb <= 0
        ):
            raise ValueError("archive.max_size_mb: must be a number of megabytes, more than 0")
        path = os.path.join(str(config.get("config_dir", ".")), os.path.expanduser(path))
        max_size = None if max_size_mb is None else int(max_size_mb * 1024 * 1024)
        return SqliteArchive.open(path, reactor, max_size)


plugin = SqliteArchivePlugin()

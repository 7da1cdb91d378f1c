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
  contentless, as the text is kept in ``messages``.  A sixth column,
  ``scope`` (schema 5), holds a token for each of the message's mailboxes
  and their domains (``rows.scope_tokens``), so that a search of a mailbox
  asks FTS5 for its matches there (``AND {scope} : token``); whatever
  changes a message's mailboxes (an ``add`` for another mailbox, an expiry
  that keeps it for others) writes its row again.
- ``terms``: the text index's terms, noted as messages are added
  (``terms.Terms``), so that a search asks FTS5 for a word's start as the
  exact terms that begin with it (``terms.expand``), not as a prefix query.
- ``holds`` and ``audit``.
- ``accounts`` (``IAccountStore``): one row per LiveArchive account, keyed
  by its folded address (UTF-8 of ``str(Address.folded())``, as a BLOB:
  any character),
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
a time and asks the text index only about each chunk's messages, so
that a word in most messages costs about what the page does, not what the
list of its matches does; when the matches turn out rare, it starts from
them if the index lists few, else reads their whole list
(``Search._walk``).  A word is a word's start (``rep`` finds ``report``):
asked of FTS5 as the exact terms that begin with it, which FTS5 reads only
over the rowids asked about, unless more than 64 terms do or one of them
was folded from a word that was not ASCII (then a prefix query, which FTS5
merges over the whole index).  ``count`` is exact: from the few matches, or with
the whole list of them.  User text reaches FTS5 only inside a quoted
string, its quotes doubled: it is never query syntax.  ``expire`` removes a batch in one
transaction.  The schema is in ``PRAGMA user_version`` (``SCHEMA_VERSION``);
an archive of a newer schema is refused, one of an older schema gains what
it lacks when opened (version 1 had no accounts, read flags nor Sent folder;
version 2 no delivery records; version 3 no terms, read once from the text
index when opened: about 15 s for a million messages; version 5 kept
mailboxes as given, folded when opened, ``schema._fold_mailboxes``).

Configuration (the ``[archive]`` table)::

    plugin = "sqlite"
    path = "var/archive.db"   # relative to the configuration file's directory
    max_size_mb = 10000       # optional: beyond it, add fails with StoreFull
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from attrs import define, frozen
from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from mailhub.interfaces import IAccountStore, IArchive, IArchivePlugin
from mailhub.model import (
    Account,
    Address,
    ArchivedMessage,
    ArchivePage,
    ArchiveQuery,
    ArchiveScope,
    AuditEvent,
    SentMessage,
    archive_words,
    decode_archive_cursor,
)

from .rows import (
    INDEX_INSERT,
    account_key,
    address_of,
    as_tuple,
    clean,
    index_row,
    mailboxes_of,
    reindex,
    text_blob,
    text_of,
)
from .schema import SCHEMA_VERSION
from .search import Search
from .terms import Terms
from .writer import DEFAULT_BUSY_TIMEOUT, Job, Reader, Writer

__all__ = ["SCHEMA_VERSION", "SqliteArchive", "plugin"]

_T = TypeVar("_T")


# -- the jobs ------------------------------------------------------------------


def _add(message: ArchivedMessage, terms: Terms) -> Job:
    def job(conn: sqlite3.Connection) -> None:
        row = conn.execute(
            "SELECT received_at, seq, sender, text FROM messages WHERE id = ?", (message.id,)
        ).fetchone()
        mailboxes = [clean(str(m)) for m in message.mailboxes]
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
                    None if sender is None else clean(sender),
                    len(message.message),
                    int(text.has_attachment),
                    clean(text.message_id),
                    clean(text.subject),
                    clean(text.sender),
                    body_hash,
                    text_blob(text),
                ),
            ).lastrowid
            columns = index_row(text, sender, mailboxes)
            conn.execute(INDEX_INSERT, (seq, *columns))
            terms.note(conn, columns[:-1])
        else:
            received_at, seq, sender, blob = row
            before = _mailboxes(conn, message.id)
            if not before.issuperset(mailboxes):
                reindex(conn, seq, sender, blob, before, before.union(mailboxes))
        conn.executemany(
            "INSERT OR IGNORE INTO mailboxes (message_id, mailbox, domain, received_at, words)"
            " VALUES (?, ?, ?, ?, ?)",
            [
                (message.id, clean(str(m)), m.domain, received_at, " ".join(archive_words(str(m))))
                for m in message.mailboxes
            ],
        )

    return job


def _mailboxes(conn: sqlite3.Connection, archive_id: str) -> set[str]:
    return {row[0] for row in conn.execute("SELECT mailbox FROM mailboxes WHERE message_id = ?", (archive_id,))}


def _remove_message(conn: sqlite3.Connection, archive_id: str, before: set[str]) -> None:
    """
    Remove a message that has no mailbox left (it had ``before``), its index
    entry, and its body once unused.
    """
    row = conn.execute(
        "SELECT seq, sender, body_hash, text FROM messages WHERE id = ?", (archive_id,)
    ).fetchone()
    if row is None:
        return
    seq, sender, body_hash, blob = row
    reindex(conn, seq, sender, blob, before, None)
    conn.execute("DELETE FROM messages WHERE seq = ?", (seq,))
    conn.execute(
        "DELETE FROM bodies WHERE hash = ?"
        " AND NOT EXISTS (SELECT 1 FROM messages WHERE body_hash = ?)",
        (body_hash, body_hash),
    )


def _expire(domain: str, before: float, limit: int) -> Job:
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
        gone: dict[str, set[str]] = {}
        for mailbox, archive_id in pairs:
            gone.setdefault(archive_id, set()).add(mailbox)
        # Each message's mailboxes before: its index row was written for them.
        had = {archive_id: _mailboxes(conn, archive_id) for archive_id in gone}
        conn.executemany("DELETE FROM mailboxes WHERE mailbox = ? AND message_id = ?", pairs)
        for archive_id, mailboxes in had.items():
            left = mailboxes - gone[archive_id]
            if not left:
                _remove_message(conn, archive_id, mailboxes)
            elif left != mailboxes:
                seq, sender, blob = conn.execute(
                    "SELECT seq, sender, text FROM messages WHERE id = ?", (archive_id,)
                ).fetchone()
                reindex(conn, seq, sender, blob, mailboxes, left)
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


def _record_delivered(records: Iterable[tuple[str, Address, str, float]]) -> Job:
    rows = [
        (clean(str(mailbox.folded())), archive_id, mailbox.domain, clean(route), at)
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


def _delivered(pairs: Iterable[tuple[str, Address]]) -> Job:
    wanted = list(dict.fromkeys(pairs))

    def job(conn: sqlite3.Connection) -> set[tuple[str, Address]]:
        found: set[tuple[str, Address]] = set()
        for archive_id, mailbox in wanted:
            box = clean(str(mailbox.folded()))
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


def _get(archive_id: str) -> Job:
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
            sender=None if sender is None else address_of(sender),
            mailboxes=as_tuple(mailboxes_of(conn, archive_id)),
            message=zlib.decompress(data),
            text=text_of(blob),
        )

    return job


def _set_hold(scope: ArchiveScope, held: bool, reason: str, at: float) -> Job:
    key = str(scope)

    def job(conn: sqlite3.Connection) -> None:
        if not held:
            conn.execute("DELETE FROM holds WHERE scope = ?", (key,))
            return
        mailbox = None if scope.mailbox is None else clean(str(scope.mailbox))
        conn.execute(
            "INSERT OR IGNORE INTO holds (scope, mailbox, domain, reason, since)"
            " VALUES (?, ?, ?, ?, ?)",
            (clean(key), mailbox, None if mailbox else scope.domain, reason, at),
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
) -> Job:
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






def _put_account(account: Account, new: bool) -> Job:
    key = account_key(account.address)
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


def _accounts(domain: str | None) -> Job:
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


def _set_read(account: Address, archive_ids: Iterable[str], read: bool) -> Job:
    key = account_key(account)
    rows = [(key, archive_id) for archive_id in dict.fromkeys(archive_ids)]

    def job(conn: sqlite3.Connection) -> None:
        if read:
            conn.executemany(
                "INSERT OR IGNORE INTO read_flags (account, archive_id) VALUES (?, ?)", rows
            )
        else:
            conn.executemany("DELETE FROM read_flags WHERE account = ? AND archive_id = ?", rows)

    return job


def _read_ids(account: Address, archive_ids: Iterable[str]) -> Job:
    key = account_key(account)
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


def _add_sent(sent: SentMessage) -> Job:
    row = (account_key(sent.account), sent.id, sent.sent_at, zlib.compress(sent.message, 6))

    def job(conn: sqlite3.Connection) -> None:
        # The same id again is a retry: the first stays.
        conn.execute(
            "INSERT OR IGNORE INTO sent (account, id, sent_at, message) VALUES (?, ?, ?, ?)", row
        )

    return job


def _sent(account: Address, before: float | None, limit: int) -> Job:
    key = account_key(account)

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


def _sent_message(account: Address, sent_id: str) -> Job:
    key = account_key(account)

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

    _writer: Writer
    _reader: Reader
    _terms: Terms

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
        writer = Writer(path, busy_timeout, reactor, max_size)
        reader = Reader(path, busy_timeout, reactor)
        terms = Terms()
        writer.listeners.append(terms.ended)
        return cls(writer, reader, terms)

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
        return self._writer.submit(_add(message, self._terms))

    def search(
        self,
        scope: ArchiveScope,
        query: ArchiveQuery,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Deferred[ArchivePage]:
        try:
            search = Search.of(scope, query)
            if cursor is not None:
                decode_archive_cursor(cursor)
        except ValueError:
            return fail()
        return self._read(lambda conn: search.page(conn, cursor, limit))

    def count(self, scope: ArchiveScope, query: ArchiveQuery) -> Deferred[int]:
        search = Search.of(scope, query)
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
                tuple(clean(v) if isinstance(v, str) else v for v in row),
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
        key = account_key(address)

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

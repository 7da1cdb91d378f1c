"""
The ``postgresql`` archive: one PostgreSQL database that the nodes of every
site read and write, searched with PostgreSQL's text search (``tsvector``,
``tsquery``, a GIN index).

Every statement runs on a thread of the archive's own pool
(``twisted.python.threadpool.ThreadPool``, ``pool_size`` threads), each
thread with its own psycopg 3 connection, never on the reactor thread.  Each
call is one transaction; its ``Deferred`` fires after the ``COMMIT``, which
with ``synchronous_commit`` on (the archive turns it on for its sessions if
the server's default is ``off``) means the WAL is fsync'd, and with a
synchronous standby (``synchronous_standby_names``) that the standby has it
too.  A connection that fails is dropped and the next call on that thread
makes a new one: the archive reconnects by itself when the server is back.
Failures to reach the server are ``StoreUnavailable``, a full disk
``StoreFull``.

The schema (in ``schema``, created with its tables when missing, under an
advisory lock so that nodes starting together do not race):

``bodies``
    each distinct message, by its SHA-256, once (``bytea``: TOAST compresses
    it, with lz4 where the server has it);
``messages``
    one row per archive id: the envelope, the ``ArchiveText`` (as UTF-8
    ``bytea``: it may hold NUL, which ``text`` cannot), the ``tsvector`` and
    its GIN index;
``mailboxes``
    one row per (mailbox, message), with the domain and ``received_at``
    copied, indexed for keyset paging per mailbox and per domain, and the
    mailbox's words as a ``tsvector`` of its own;
``holds``, ``audit``, ``meta``
    legal holds, the audit log, and the schema's version;
``accounts``, ``read_flags``, ``sent``
    the LiveArchive's accounts (``IAccountStore``): each keyed by its
    folded address as UTF-8 ``bytea`` (any character), the ``Account`` as JSON;
    one row per (account, archive id) read; each account's Sent folder,
    indexed for newest-first pages (TOAST compresses the bytes).  Schema 1
    had none of them: an archive of schema 1 gains them (under the same
    lock) when a node of this version first uses it.
``delivered``
    what the hub delivered (``record_delivered``): one row per (mailbox,
    archive id), the latest delivery's route and time, indexed by domain
    and time for expiry; with a partial index of ``messages`` by
    Message-ID, ``delivered`` finds a delivery of the same message under
    another archive id.  Added by schema 3 (the same way).

Mailboxes are kept folded (``Address.folded``); schema 5 folded those an
older mailhub kept as given, in every table (``schema._fold_mailboxes``).

Words are what ``mailhub.testing.archive_contract`` says: case and accents
folded, split at every character that is not a letter or a digit
(``alice@example.com`` is ``alice example com``).  The archive makes the
words itself, in Python, and gives PostgreSQL the ``tsvector`` and the
``tsquery`` as values (``%s::tsquery``), every lexeme quoted: no text parser,
dictionary, locale or extension of the server changes what matches, and
user text is never SQL nor query syntax.  The vector's weights say where a
word is: ``A`` the subject, ``B`` the sender (``From:`` and the envelope
sender), ``C`` the ``To:``/``Cc:`` text, ``D`` the body and the attachments'
names; each field starts one position after the end of the one before, so
a phrase never runs from one into the next.  Results are newest first,
never by rank: the weights serve to match ``sender``, ``recipient`` and
``subject``.  Words become prefix terms (``invoice:*``), phrases and
words of several parts ``<->`` chains.  ``recipient`` also matches the
message's mailboxes within the search's scope (their own vectors), never
another's.  The first ``MAX_INDEXED_BODY`` characters of a body are
indexed.

Paging is by keyset on (``received_at`` DESC, id DESC): a cursor is that
pair, base64-encoded, so a page deep into the results costs what the first
does.  When the planner's statistics say a search's words are in few
messages (at most ``FEW``), a page of a mailbox or a domain starts from the
GIN index's matches; every search is planned for its own values.
``expire`` removes at most ``limit`` (mailbox, message) pairs per call, oldest first, then the messages and bodies nothing refers to any
more; it checks holds under an advisory lock per domain that ``set_hold``
takes too, so a hold set while a batch runs is never overtaken by it.

Configuration (the ``[archive]`` table)::

    plugin = "postgresql"
    dsn = "host=db.hub.example dbname=mailhub user=mailhub"   # libpq string or URI
    # or, instead of dsn (or beside it, to override parts of it):
    # host = "db.hub.example", port = 5432, dbname = "mailhub",
    # user = "mailhub", password = "..."
    pool_size = 4          # threads, each with one connection
    connect_timeout = 5    # seconds
    schema = "mailhub_archive"
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import psycopg
import psycopg.errors
from attrs import frozen
from psycopg import sql
from twisted.internet.defer import Deferred, fail, succeed
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
    ArchiveText,
    AuditEvent,
    SentMessage,
    decode_archive_cursor,
)

from . import search as _search
from .connection import Connections
from .schema import LOCK_HOLDS
from .search import (
    FIELDS,
    MAX_INDEXED_BODY,
    SCOPE_LEXEMES,
    Plan,
    fields_vector,
    from_matches,
    matching,
    page,
    summaries,
    tsvector,
)
from .settings import settings
from .values import account_key, as_tuple, clean_text, decode_text, parse_address, utf8

__all__ = ["PostgresArchive", "PostgresArchivePlugin", "plugin"]


# -- the archive ------------------------------------------------------------------


@implementer(IArchive, IAccountStore)
class PostgresArchive(Connections):
    """
    An ``IArchive`` and ``IAccountStore`` over one PostgreSQL database (see
    the module docstring).

    :param reactor: the reactor the ``Deferred`` fire in.
    :param conninfo: a libpq connection string.
    :param pool_size: threads (and so connections) of the archive's pool.
    :param schema: the schema that holds the archive's tables.
    """

    # -- IArchive: add and get

    def add(self, message: ArchivedMessage) -> Deferred[None]:
        text = message.text
        body = bytes(message.message)
        digest = hashlib.sha256(body).digest()
        sender = str(message.sender) if message.sender is not None else None
        mailboxes = list(dict.fromkeys(str(m) for m in message.mailboxes))
        row = {
            "id": message.id,
            "received_at": message.received_at,
            "envelope_sender": sender,
            "sha256": digest,
            "size": len(body),
            "subject": utf8(text.subject),
            "from_text": utf8(text.sender),
            "recipients_text": utf8(text.recipients),
            "body_text": utf8(text.body),
            "attachments": [utf8(a) for a in text.attachments],
            "has_attachment": text.has_attachment,
            "message_id": utf8(text.message_id),
            "date": text.date,
            "tsv": tsvector(
                [
                    ("A", [text.subject]),
                    ("B", [text.sender, sender or ""]),
                    ("C", [text.recipients]),
                    ("D", [text.body[:MAX_INDEXED_BODY], *text.attachments]),
                ]
            ),
            # The same words at the same positions: A, B and C come first.
            "fields": fields_vector(text.subject, [text.sender, sender or ""], text.recipients),
        }

        def work(conn: psycopg.Connection[Any]) -> None:
            found = conn.execute(
                "SELECT received_at FROM messages WHERE id = %s FOR UPDATE", (message.id,)
            ).fetchone()
            if found is None:
                conn.execute(
                    "INSERT INTO bodies (sha256, data) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    (digest, body),
                )
                inserted = conn.execute(
                    "INSERT INTO messages (id, received_at, envelope_sender, body_sha256, size,"
                    " subject, from_text, recipients_text, body_text, attachments,"
                    " has_attachment, message_id, date, tsv)"
                    " VALUES (%(id)s, %(received_at)s, %(envelope_sender)s, %(sha256)s,"
                    " %(size)s, %(subject)s, %(from_text)s, %(recipients_text)s,"
                    " %(body_text)s, %(attachments)s::bytea[], %(has_attachment)s,"
                    " %(message_id)s, %(date)s, %(tsv)s::tsvector)"
                    " ON CONFLICT (id) DO NOTHING RETURNING received_at",
                    row,
                ).fetchone()
                if inserted is None:
                    # Another node added it since our SELECT: start again.
                    raise psycopg.errors.UniqueViolation("archive id added concurrently")
                received_at = message.received_at
            else:
                received_at = found[0]
            conn.execute(
                "INSERT INTO mailboxes (mailbox, domain, received_at, id, tsv)"
                " SELECT t.mailbox, t.domain, %s, %s, t.tsv::tsvector"
                " FROM unnest(%s::text[], %s::text[], %s::text[]) AS t(mailbox, domain, tsv)"
                " ON CONFLICT DO NOTHING",
                (
                    received_at,
                    message.id,
                    mailboxes,
                    [m.rpartition("@")[2] for m in mailboxes],
                    [tsvector([("D", [m])]) for m in mailboxes],
                ),
            )
            # After the mailboxes: the scope lexemes are made from them.  A
            # message added again keeps the words it was first added with, as
            # its row does, and is locked FOR UPDATE above: two nodes adding
            # mailboxes to it do not lose each other's.
            conn.execute(
                "INSERT INTO fields (id, received_at, tsv)"
                " SELECT %(id)s, %(received_at)s, %(fields)s::tsvector || "
                + SCOPE_LEXEMES.format(id="%(id)s")
                + " ON CONFLICT (id) DO UPDATE SET tsv = "
                + FIELDS.format(tsv="fields.tsv", id="fields.id"),
                {"id": message.id, "received_at": received_at, "fields": row["fields"]},
            )

        return self._call(work)

    def get(self, archive_id: str) -> Deferred[ArchivedMessage | None]:
        def work(conn: psycopg.Connection[Any]) -> ArchivedMessage | None:
            row = conn.execute(
                "SELECT m.received_at, m.envelope_sender, b.data, m.subject, m.from_text,"
                " m.recipients_text, m.body_text, m.attachments, m.message_id, m.date,"
                " ARRAY(SELECT x.mailbox FROM mailboxes x WHERE x.id = m.id ORDER BY x.mailbox)"
                " FROM messages m JOIN bodies b ON b.sha256 = m.body_sha256 WHERE m.id = %s",
                (archive_id,),
            ).fetchone()
            if row is None:
                return None
            return ArchivedMessage(
                id=archive_id,
                received_at=row[0],
                sender=parse_address(row[1]) if row[1] is not None else None,
                mailboxes=as_tuple(parse_address(m) for m in row[10]),
                message=bytes(row[2]),
                text=ArchiveText(
                    subject=decode_text(row[3]),
                    sender=decode_text(row[4]),
                    recipients=decode_text(row[5]),
                    body=decode_text(row[6]),
                    attachments=as_tuple(decode_text(a) for a in row[7]),
                    message_id=decode_text(row[8]),
                    date=row[9],
                ),
            )

        return self._call(work)

    # -- IArchive: search and count

    def _plan(
        self, conn: psycopg.Connection[Any], scope: ArchiveScope, query: ArchiveQuery
    ) -> Plan:
        """How to find ``query`` in a mailbox or a domain (``search.plan``)."""
        return _search.plan(conn, scope, query)

    def search(
        self,
        scope: ArchiveScope,
        query: ArchiveQuery,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Deferred[ArchivePage]:
        try:
            after = decode_archive_cursor(cursor) if cursor is not None else None
        except ValueError:
            return fail(Failure())
        limit = max(0, int(limit))

        def work(conn: psycopg.Connection[Any]) -> ArchivePage:
            scoped = scope.mailbox is not None or scope.domain is not None
            planned = self._plan(conn, scope, query) if scoped else Plan()
            if planned.how:
                from_matches(conn)
            rows = page(conn, scope, query, after, limit, planned)
            return summaries(rows, limit)

        return self._call(work)

    def count(self, scope: ArchiveScope, query: ArchiveQuery) -> Deferred[int]:
        def work(conn: psycopg.Connection[Any]) -> int:
            scoped = scope.mailbox is not None or scope.domain is not None
            planned = self._plan(conn, scope, query) if scoped else Plan()
            found = matching(scope, query, planned=planned)
            if found is None:
                return 0
            if planned.how:
                from_matches(conn)
            key, clause, params = found
            what = "count(DISTINCT b.id)" if key == "b" and scope.mailbox is None else "count(*)"
            row = conn.execute(
                sql.SQL("SELECT {} {}").format(sql.SQL(what), clause), params, prepare=False
            ).fetchone()
            return int(row[0]) if row else 0

        return self._call(work)

    # -- IArchive: expiry and holds

    def expire(self, domain: str, before: float, limit: int) -> Deferred[int]:
        domain = domain.lower()

        def work(conn: psycopg.Connection[Any]) -> int:
            conn.execute(LOCK_HOLDS.format(shared="_shared"), (domain,))  # type: ignore[arg-type]
            held = conn.execute(
                "SELECT 1 FROM holds WHERE kind = 'domain' AND name = %s", (domain,)
            ).fetchone()
            if held is not None or limit <= 0:
                return 0
            removed = conn.execute(
                "WITH doomed AS ("
                " SELECT b.mailbox, b.id FROM mailboxes b"
                " WHERE b.domain = %s AND b.received_at < %s"
                " AND NOT EXISTS (SELECT 1 FROM holds h"
                "  WHERE h.kind = 'mailbox' AND h.name = b.mailbox)"
                " ORDER BY b.received_at, b.id, b.mailbox LIMIT %s FOR UPDATE OF b SKIP LOCKED)"
                " DELETE FROM mailboxes b USING doomed d"
                " WHERE b.mailbox = d.mailbox AND b.id = d.id RETURNING b.id",
                (domain, before, limit),
            ).fetchall()
            ids = sorted({r[0] for r in removed})
            if ids:
                # The messages locked, as add locks one: another node's expiry
                # or add of the same messages is then committed, and the
                # statements below (each with a fresh snapshot) see its
                # mailboxes.  Without the lock, two expiries of a message's
                # two mailboxes each saw the other's row and kept the
                # message, and a fields row was rewritten from a snapshot
                # that missed a mailbox added meanwhile.
                conn.execute(
                    "SELECT 1 FROM messages WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,)
                )
                bodies = conn.execute(
                    "DELETE FROM messages m WHERE m.id = ANY(%s)"
                    " AND NOT EXISTS (SELECT 1 FROM mailboxes x WHERE x.id = m.id)"
                    " RETURNING m.body_sha256",
                    (ids,),
                ).fetchall()
                # A message kept for other mailboxes is no longer in these.
                conn.execute(
                    "UPDATE fields f SET tsv = "
                    + FIELDS.format(tsv="f.tsv", id="f.id")
                    + " WHERE f.id = ANY(%s)",
                    (ids,),
                )
                if bodies:
                    conn.execute(
                        "DELETE FROM bodies b WHERE b.sha256 = ANY(%s)"
                        " AND NOT EXISTS (SELECT 1 FROM messages m"
                        "  WHERE m.body_sha256 = b.sha256)",
                        ([r[0] for r in bodies],),
                    )
            records = conn.execute(
                "WITH doomed AS ("
                " SELECT d.mailbox, d.archive_id FROM delivered d"
                " WHERE d.domain = %s AND d.at < %s"
                " AND NOT EXISTS (SELECT 1 FROM holds h"
                "  WHERE h.kind = 'mailbox' AND h.name = d.mailbox)"
                " ORDER BY d.at LIMIT %s FOR UPDATE OF d SKIP LOCKED)"
                " DELETE FROM delivered d USING doomed x"
                " WHERE d.mailbox = x.mailbox AND d.archive_id = x.archive_id RETURNING 1",
                (domain, before, limit),
            ).fetchall()
            return max(len(removed), len(records))

        return self._call(work)

    # -- IArchive: what the hub delivered

    def record_delivered(self, records: Iterable[tuple[str, Address, str, float]]) -> Deferred[None]:
        # One row per pair (an upsert cannot touch a row twice), sorted: two
        # nodes writing overlapping batches lock the rows in one order.
        latest: dict[tuple[str, str], tuple[str, str, float]] = {}
        for archive_id, mailbox, route, at in records:
            key = (str(mailbox.folded()), archive_id)
            if key not in latest or latest[key][2] <= at:
                latest[key] = (mailbox.domain, clean_text(route), at)
        rows = sorted(latest.items())
        if not rows:
            return succeed(None)
        columns = (
            [k[0] for k, _ in rows],
            [k[1] for k, _ in rows],
            [v[0] for _, v in rows],
            [v[1] for _, v in rows],
            [v[2] for _, v in rows],
        )

        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO delivered (mailbox, archive_id, domain, route, at)"
                " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[],"
                " %s::double precision[])"
                " ON CONFLICT (mailbox, archive_id) DO UPDATE"
                " SET route = EXCLUDED.route, at = EXCLUDED.at WHERE EXCLUDED.at >= delivered.at",
                columns,
            )

        return self._call(work)

    def delivered(self, pairs: Iterable[tuple[str, Address]]) -> Deferred[set[tuple[str, Address]]]:
        wanted = list(dict.fromkeys(pairs))
        if not wanted:
            return succeed(set())

        def work(conn: psycopg.Connection[Any]) -> set[tuple[str, Address]]:
            rows = conn.execute(
                "SELECT q.n FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS q(archive_id, mailbox, n)"
                " WHERE EXISTS (SELECT 1 FROM delivered d"
                "  WHERE d.mailbox = q.mailbox AND d.archive_id = q.archive_id)"
                " OR EXISTS (SELECT 1 FROM messages m"
                "  JOIN messages o ON o.message_id = m.message_id AND o.message_id <> ''::bytea"
                "  JOIN delivered d ON d.archive_id = o.id AND d.mailbox = q.mailbox"
                "  WHERE m.id = q.archive_id AND m.message_id <> ''::bytea)",
                ([a for a, _ in wanted], [str(m.folded()) for _, m in wanted]),
            ).fetchall()
            return {wanted[n - 1] for (n,) in rows}

        return self._call(work)

    def set_hold(self, scope: ArchiveScope, held: bool, reason: str, at: float) -> Deferred[None]:
        if scope.mailbox is not None:
            kind, name, domain = "mailbox", str(scope.mailbox), scope.mailbox.domain
        elif scope.domain is not None:
            kind, name, domain = "domain", scope.domain, scope.domain
        else:
            return fail(ValueError("a hold is on a mailbox or a domain, not the whole archive"))

        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute(LOCK_HOLDS.format(shared=""), (domain,))  # type: ignore[arg-type]
            if held:
                conn.execute(
                    "INSERT INTO holds (kind, name, reason, since) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (kind, name) DO NOTHING",
                    (kind, name, clean_text(reason), at),
                )
            else:
                conn.execute("DELETE FROM holds WHERE kind = %s AND name = %s", (kind, name))

        return self._call(work)

    def holds(self) -> Deferred[list[dict[str, Any]]]:
        def work(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT kind, name, reason, since FROM holds ORDER BY since, kind, name"
            ).fetchall()
            return [
                {
                    "scope": f"{kind} {name}",
                    "mailbox": name if kind == "mailbox" else None,
                    "domain": name if kind == "domain" else None,
                    "reason": reason,
                    "since": since,
                }
                for kind, name, reason, since in rows
            ]

        return self._call(work)

    # -- IArchive: audit

    def record_audit(self, event: AuditEvent) -> Deferred[None]:
        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO audit (at, actor, action, scope, detail) VALUES (%s, %s, %s, %s, %s)",
                (
                    event.at,
                    clean_text(event.actor),
                    clean_text(event.action),
                    clean_text(event.scope),
                    utf8(event.detail),
                ),
            )

        # Not tried again on a new connection: a commit whose answer was
        # lost would be recorded twice.
        return self._call(work, retry=False)

    def audit_log(
        self,
        actor: str | None,
        action: str | None,
        since: float | None,
        until: float | None,
        limit: int,
    ) -> Deferred[list[AuditEvent]]:
        conditions: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("actor = %s", None if actor is None else clean_text(actor)),
            ("action = %s", None if action is None else clean_text(action)),
            ("at >= %s", since),
            ("at < %s", until),
        ):
            if value is not None:
                conditions.append(clause)
                params.append(value)
        where = (" WHERE " + " AND ".join(conditions)) if conditions else ""

        def work(conn: psycopg.Connection[Any]) -> list[AuditEvent]:
            rows = conn.execute(
                "SELECT at, actor, action, scope, detail FROM audit"  # type: ignore[arg-type]
                + where
                + " ORDER BY at DESC, n DESC LIMIT %s",
                [*params, max(0, int(limit))],
            ).fetchall()
            return [AuditEvent(at, who, what, scope, decode_text(d)) for at, who, what, scope, d in rows]

        return self._call(work)

    # -- IAccountStore

    def add_account(self, account: Account) -> Deferred[None]:
        row = (account_key(account.address), utf8(account.address.domain), account.to_json())

        def work(conn: psycopg.Connection[Any]) -> None:
            added = conn.execute(
                "INSERT INTO accounts (address, domain, data) VALUES (%s, %s, %s)"
                " ON CONFLICT (address) DO NOTHING RETURNING 1",
                row,
            ).fetchone()
            if added is None:
                raise KeyError(f"an account of {account.address} exists")

        return self._call(work)

    def update_account(self, account: Account) -> Deferred[None]:
        row = (utf8(account.address.domain), account.to_json(), account_key(account.address))

        def work(conn: psycopg.Connection[Any]) -> None:
            updated = conn.execute(
                "UPDATE accounts SET domain = %s, data = %s WHERE address = %s RETURNING 1", row
            ).fetchone()
            if updated is None:
                raise KeyError(f"no account of {account.address}")

        return self._call(work)

    def account(self, address: Address) -> Deferred[Account | None]:
        def work(conn: psycopg.Connection[Any]) -> Account | None:
            row = conn.execute(
                "SELECT data FROM accounts WHERE address = %s", (account_key(address),)
            ).fetchone()
            return None if row is None else Account.from_json(row[0])

        return self._call(work)

    def accounts(self, domain: str | None) -> Deferred[list[Account]]:
        def work(conn: psycopg.Connection[Any]) -> list[Account]:
            if domain is None:
                rows = conn.execute("SELECT data FROM accounts").fetchall()
            else:
                rows = conn.execute(
                    "SELECT data FROM accounts WHERE domain = %s", (utf8(domain.lower()),)
                ).fetchall()
            # In ``Address`` order, which no collation of the server gives.
            return sorted((Account.from_json(r[0]) for r in rows), key=lambda a: a.address)

        return self._call(work)

    def set_read(self, account: Address, archive_ids: Iterable[str], read: bool) -> Deferred[None]:
        # Sorted: two nodes marking overlapping ids lock them in one order.
        ids = sorted(set(archive_ids))

        def work(conn: psycopg.Connection[Any]) -> None:
            if read:
                conn.execute(
                    "INSERT INTO read_flags (account, archive_id)"
                    " SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING",
                    (account_key(account), ids),
                )
            else:
                conn.execute(
                    "DELETE FROM read_flags WHERE account = %s AND archive_id = ANY(%s::text[])",
                    (account_key(account), ids),
                )

        return self._call(work)

    def read_ids(self, account: Address, archive_ids: Iterable[str]) -> Deferred[set[str]]:
        ids = list(set(archive_ids))

        def work(conn: psycopg.Connection[Any]) -> set[str]:
            rows = conn.execute(
                "SELECT archive_id FROM read_flags"
                " WHERE account = %s AND archive_id = ANY(%s::text[])",
                (account_key(account), ids),
            ).fetchall()
            return {r[0] for r in rows}

        return self._call(work)

    def add_sent(self, sent: SentMessage) -> Deferred[None]:
        row = (account_key(sent.account), sent.id, sent.sent_at, bytes(sent.message))

        def work(conn: psycopg.Connection[Any]) -> None:
            # The same id again is a retry: the first stays.
            conn.execute(
                "INSERT INTO sent (account, id, sent_at, message) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (account, id) DO NOTHING",
                row,
            )

        return self._call(work)

    def sent(
        self, account: Address, before: float | None, limit: int
    ) -> Deferred[list[SentMessage]]:
        def work(conn: psycopg.Connection[Any]) -> list[SentMessage]:
            rows = conn.execute(
                "SELECT id, sent_at, message FROM sent"
                " WHERE account = %s AND (%s::double precision IS NULL OR sent_at < %s)"
                " ORDER BY sent_at DESC, id DESC LIMIT %s",
                (account_key(account), before, before, max(0, int(limit))),
            ).fetchall()
            return [SentMessage(i, account, at, bytes(data)) for i, at, data in rows]

        return self._call(work)

    def sent_message(self, account: Address, sent_id: str) -> Deferred[SentMessage | None]:
        def work(conn: psycopg.Connection[Any]) -> SentMessage | None:
            row = conn.execute(
                "SELECT sent_at, message FROM sent WHERE account = %s AND id = %s",
                (account_key(account), sent_id),
            ).fetchone()
            return None if row is None else SentMessage(sent_id, account, row[0], bytes(row[1]))

        return self._call(work)


# -- the plugin ----------------------------------------------------------------------


@implementer(IArchivePlugin)
@frozen
class PostgresArchivePlugin:
    """Makes a ``PostgresArchive`` from the ``[archive]`` table (see the module docstring)."""

    name: str = "postgresql"
    #: Several processes may open the same archive: the hub archives in a worker process.
    shareable: bool = True
    #: The keys of ``[archive]`` besides the core's (``mailhub.plugin``).
    config_keys: frozenset[str] = frozenset(
        {"dsn", "host", "port", "dbname", "user", "password", "connect_timeout", "pool_size", "schema"}
    )

    def check_config(self, config: Mapping[str, Any]) -> None:
        """
        Check the ``[archive]`` table as ``make`` does, without connecting.

        :raises ValueError: naming the key at fault.
        """
        settings(config)

    def make(self, config: Mapping[str, Any], reactor: Any) -> PostgresArchive:
        """
        Check the configuration and start the archive's threads; nothing
        connects until the first call (which creates the schema if missing).

        :param config: the ``[archive]`` table.
        :param reactor: the reactor (``IReactorThreads``, system event triggers).
        :raises ValueError: naming the key, when the configuration is wrong.
        """
        given = settings(config)
        return PostgresArchive(reactor, given.conninfo, given.pool_size, given.schema)


plugin = PostgresArchivePlugin()

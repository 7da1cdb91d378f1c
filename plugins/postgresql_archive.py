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
    address as UTF-8 ``bytea`` (any character), the ``Account`` as JSON;
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
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.conninfo
import psycopg.errors
from attrs import frozen
from psycopg import sql
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
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

__all__ = ["SCHEMA_VERSION", "PostgresArchive", "PostgresArchivePlugin", "plugin"]

T = TypeVar("T")

#: 2 added the accounts' tables, 3 the delivery records (``_MIGRATIONS``).
SCHEMA_VERSION = 3
DEFAULT_POOL_SIZE = 4
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_SCHEMA = "mailhub_archive"
#: Characters of a message's body text that are indexed (a ``tsvector``
#: holds at most 1 MB).
MAX_INDEXED_BODY = 256 * 1024
#: PostgreSQL's limits: a lexeme's bytes, a position, positions per lexeme.
MAX_LEXEME = 2046
MAX_POSITION = 16383
MAX_POSITIONS = 255
#: How often a transaction that lost a race (serialization failure,
#: deadlock, a row deleted or added under it) is tried.
TRIES = 5
#: A search whose words the planner expects in at most this many messages
#: starts from them (``PostgresArchive._from_matches``).
FEW = 5000
_RETRY_STATES = {"40001", "40P01", "23503", "23505"}


def _as_tuple(items: Iterable[Any]) -> Any:
    # mypy cannot solve the attrs ``converter=tuple`` of the model's fields.
    return tuple(items)


# -- words, vectors and queries --------------------------------------------------




def _lexeme(word: str) -> str:
    return "'" + word.replace("\\", "\\\\").replace("'", "''") + "'"


def tsvector(fields: Iterable[tuple[str, Iterable[str]]]) -> str:
    """
    The ``tsvector`` text of ``(weight, text)`` fields, in order: each
    field's words at consecutive positions, one position left free between
    fields.
    """
    positions: dict[str, dict[int, str]] = {}
    position = 0
    for weight, texts in fields:
        for text in texts:
            position += 1  # the gap between two fields
            for word in archive_words(text):
                position += 1
                if len(word.encode()) > MAX_LEXEME:
                    continue
                at = positions.setdefault(word, {})
                if len(at) < MAX_POSITIONS:
                    at.setdefault(min(position, MAX_POSITION), weight)
    return " ".join(
        _lexeme(word) + ":" + ",".join(f"{p}{w}" for p, w in at.items())
        for word, at in positions.items()
    )


def _chain(tokens: Sequence[str], weight: str, prefix: bool) -> str:
    """``'a':W <-> 'b':W <-> 'c':*W``: consecutive words, the last maybe a start."""
    terms = []
    for i, token in enumerate(tokens):
        flags = ("*" if prefix and i == len(tokens) - 1 else "") + weight
        terms.append(_lexeme(token) + (":" + flags if flags else ""))
    return "(" + " <-> ".join(terms) + ")" if len(terms) > 1 else terms[0]


class _Nothing(Exception):
    """A term no indexed word can match (a word longer than PostgreSQL indexes)."""


def _tokens(text: str) -> list[str]:
    """
    The words of a term; none if it has no letter or digit (it matches
    everything).

    :raises _Nothing: if a word is longer than PostgreSQL indexes.
    """
    tokens = archive_words(text)
    if any(len(t.encode()) > MAX_LEXEME for t in tokens):
        raise _Nothing(text)
    return tokens


def tsquery(query: ArchiveQuery) -> tuple[str | None, list[tuple[str, str]]]:
    """
    The ``tsquery`` texts of ``query``'s text parts.

    :returns: one ``tsquery`` that a message's vector must match (words,
        phrases, ``sender``, ``subject``), or ``None``; and for each
        ``recipient`` value, the ``tsquery`` for the ``To:``/``Cc:`` text and
        the one for a mailbox (either may match).
    :raises _Nothing: if a term cannot match anything.
    """
    terms: list[str] = []
    for parts, weight, prefix in (
        (query.words, "", True),
        (query.phrases, "", False),
        (query.sender, "B", True),
        (query.subject, "A", True),
    ):
        for part in parts:
            tokens = _tokens(part)
            if tokens:
                terms.append(_chain(tokens, weight, prefix))
    recipients: list[tuple[str, str]] = []
    for part in query.recipient:
        tokens = _tokens(part)
        if tokens:
            recipients.append((_chain(tokens, "C", True), _chain(tokens, "", True)))
    return (" & ".join(terms) if terms else None), recipients






def _address(text: str) -> Address:
    local, _, domain = text.rpartition("@")
    return Address(local, domain)


def _utf8(text: str) -> bytes:
    """Any ``str`` as bytes that give it back exactly (NUL, lone surrogates and all)."""
    return text.encode("utf-8", "surrogatepass")


def _text(data: bytes | memoryview) -> str:
    return bytes(data).decode("utf-8", "surrogatepass")


def _clean(text: str) -> str:
    """Text that a ``text`` column takes: no NUL, no lone surrogates."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


# -- the schema ---------------------------------------------------------------------

_TABLES = """
CREATE TABLE meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE bodies (
    sha256 bytea PRIMARY KEY,
    data bytea {compression} NOT NULL
);
CREATE TABLE messages (
    id text COLLATE "C" PRIMARY KEY,
    received_at double precision NOT NULL,
    envelope_sender text,
    body_sha256 bytea NOT NULL REFERENCES bodies (sha256),
    size bigint NOT NULL,
    subject bytea NOT NULL,
    from_text bytea NOT NULL,
    recipients_text bytea NOT NULL,
    body_text bytea NOT NULL,
    attachments bytea[] NOT NULL,
    has_attachment boolean NOT NULL,
    message_id bytea NOT NULL,
    date double precision,
    tsv tsvector NOT NULL
);
CREATE INDEX messages_page ON messages (received_at DESC, id DESC);
CREATE INDEX messages_tsv ON messages USING gin (tsv);
CREATE INDEX messages_body ON messages (body_sha256);
CREATE TABLE mailboxes (
    mailbox text COLLATE "C" NOT NULL,
    domain text COLLATE "C" NOT NULL,
    received_at double precision NOT NULL,
    id text COLLATE "C" NOT NULL REFERENCES messages (id),
    tsv tsvector NOT NULL,
    PRIMARY KEY (mailbox, id)
);
CREATE INDEX mailboxes_mailbox_page ON mailboxes (mailbox, received_at DESC, id DESC);
CREATE INDEX mailboxes_domain_page ON mailboxes (domain, received_at DESC, id DESC);
CREATE INDEX mailboxes_id ON mailboxes (id);
CREATE TABLE holds (
    kind text NOT NULL CHECK (kind IN ('mailbox', 'domain')),
    name text COLLATE "C" NOT NULL,
    reason text NOT NULL,
    since double precision NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE audit (
    n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at double precision NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    scope text NOT NULL,
    detail bytea NOT NULL
);
CREATE INDEX audit_at ON audit (at DESC, n DESC);
"""

#: What makes each version of the schema from the one before; a new archive
#: runs them all after ``_TABLES``.
_MIGRATIONS = {
    2: """
CREATE TABLE accounts (
    address bytea PRIMARY KEY,
    domain bytea NOT NULL,
    data text NOT NULL
);
CREATE INDEX accounts_domain ON accounts (domain);
CREATE TABLE read_flags (
    account bytea NOT NULL,
    archive_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (account, archive_id)
);
CREATE TABLE sent (
    account bytea NOT NULL,
    id text COLLATE "C" NOT NULL,
    sent_at double precision NOT NULL,
    message bytea NOT NULL,
    PRIMARY KEY (account, id)
);
CREATE INDEX sent_page ON sent (account, sent_at DESC, id DESC);
""",
    3: """
CREATE TABLE delivered (
    mailbox text COLLATE "C" NOT NULL,
    archive_id text COLLATE "C" NOT NULL,
    domain text COLLATE "C" NOT NULL,
    route text NOT NULL,
    at double precision NOT NULL,
    PRIMARY KEY (mailbox, archive_id)
);
CREATE INDEX delivered_expiry ON delivered (domain, at);
CREATE INDEX messages_header_id ON messages (message_id) WHERE message_id <> ''::bytea;
""",
}

_LOCK_SCHEMA = "SELECT pg_advisory_xact_lock(hashtext('mailhub archive schema ' || %s))"
_LOCK_HOLDS = "SELECT pg_advisory_xact_lock{shared}(hashtext('mailhub archive holds ' || %s))"


def _migrate(conn: psycopg.Connection[Any], version: int) -> None:
    """Bring the schema from ``version`` to ``SCHEMA_VERSION`` (in the caller's transaction)."""
    for step in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute(_MIGRATIONS[step])  # type: ignore[arg-type]
    conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))


# -- accounts ---------------------------------------------------------------------


def _key(address: Address) -> bytes:
    """An address as the accounts' tables key it: exact, any character."""
    return _utf8(str(address))






# -- the archive ------------------------------------------------------------------


@implementer(IArchive, IAccountStore)
class PostgresArchive:
    """
    An ``IArchive`` and ``IAccountStore`` over one PostgreSQL database (see
    the module docstring).

    :param reactor: the reactor the ``Deferred`` fire in.
    :param conninfo: a libpq connection string.
    :param pool_size: threads (and so connections) of the archive's pool.
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
        with conn.transaction():
            conn.execute(_LOCK_SCHEMA, (self._schema,))
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self._schema))
            )
            exists = conn.execute(
                "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'meta'",
                (self._schema,),
            ).fetchone()
            if exists is None:
                self._create(conn)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) < SCHEMA_VERSION:
                _migrate(conn, int(row[0]))
                row = (str(SCHEMA_VERSION),)
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the archive's schema {self._schema!r} is version {version}, newer than "
                f"this mailhub knows ({SCHEMA_VERSION}): upgrade mailhub"
            )
        self._ready = True

    @staticmethod
    def _create(conn: psycopg.Connection[Any]) -> None:
        compression = "COMPRESSION lz4"
        try:
            with conn.transaction():
                conn.execute("CREATE TEMPORARY TABLE lz4_probe (b bytea COMPRESSION lz4)")
                conn.execute("DROP TABLE lz4_probe")
        except psycopg.Error:
            # Built without lz4 (or PostgreSQL 13, before COMPRESSION):
            # pglz, TOAST's default.
            compression = ""
        conn.execute(_TABLES.replace("{compression}", compression))  # type: ignore[arg-type]
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
        _migrate(conn, 1)

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
            "subject": _utf8(text.subject),
            "from_text": _utf8(text.sender),
            "recipients_text": _utf8(text.recipients),
            "body_text": _utf8(text.body),
            "attachments": [_utf8(a) for a in text.attachments],
            "has_attachment": text.has_attachment,
            "message_id": _utf8(text.message_id),
            "date": text.date,
            "tsv": tsvector(
                [
                    ("A", [text.subject]),
                    ("B", [text.sender, sender or ""]),
                    ("C", [text.recipients]),
                    ("D", [text.body[:MAX_INDEXED_BODY], *text.attachments]),
                ]
            ),
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
                sender=_address(row[1]) if row[1] is not None else None,
                mailboxes=_as_tuple(_address(m) for m in row[10]),
                message=bytes(row[2]),
                text=ArchiveText(
                    subject=_text(row[3]),
                    sender=_text(row[4]),
                    recipients=_text(row[5]),
                    body=_text(row[6]),
                    attachments=_as_tuple(_text(a) for a in row[7]),
                    message_id=_text(row[8]),
                    date=row[9],
                ),
            )

        return self._call(work)

    # -- IArchive: search and count

    def _matching(
        self,
        scope: ArchiveScope,
        query: ArchiveQuery,
        after: tuple[float, str] | None = None,
    ) -> tuple[str, sql.Composable, list[Any]] | None:
        """
        What finds the messages of ``scope`` that match ``query``.

        :returns: the alias whose ``received_at`` and ``id`` page (``b``, the
            mailboxes, for a mailbox or a domain; ``m``, the messages, for
            the whole archive), the ``FROM ... WHERE ...`` clause and its
            parameters; ``None`` if nothing can match.  With ``after``, only
            what comes after that (``received_at``, id) in the search's order.
        """
        try:
            vector_query, recipients = tsquery(query)
        except _Nothing:
            return None
        # Which rows of the scope (on the alias that pages), then what their
        # messages must hold.
        in_scope_conditions: list[str] = []
        in_scope_params: list[Any] = []
        conditions: list[str] = []
        params: list[Any] = []
        in_scope, scope_param = "", ""
        if scope.mailbox is not None:
            key = "b"
            in_scope_conditions.append("b.mailbox = %s")
            in_scope_params.append(str(scope.mailbox))
            in_scope, scope_param = " AND x.mailbox = %s", str(scope.mailbox)
        elif scope.domain is not None:
            key = "b"
            in_scope_conditions.append("b.domain = %s")
            in_scope_params.append(scope.domain)
            in_scope, scope_param = " AND x.domain = %s", scope.domain
        else:
            key = "m"
        if query.after is not None:
            in_scope_conditions.append(f"{key}.received_at >= %s")
            in_scope_params.append(query.after)
        if query.before is not None:
            in_scope_conditions.append(f"{key}.received_at < %s")
            in_scope_params.append(query.before)
        if after is not None:
            in_scope_conditions.append(f"({key}.received_at, {key}.id) < (%s, %s)")
            in_scope_params += [after[0], after[1]]
        if query.has_attachment is not None:
            conditions.append("m.has_attachment = %s")
            params.append(query.has_attachment)
        if vector_query is not None:
            conditions.append("m.tsv @@ %s::tsquery")
            params.append(vector_query)
        for to_cc, plain in recipients:
            # The To:/Cc: text, or a mailbox of the message within the scope
            # (never another's: a Bcc stays hidden).
            conditions.append(
                "(m.tsv @@ %s::tsquery OR EXISTS (SELECT 1 FROM mailboxes x"
                f" WHERE x.id = m.id{in_scope} AND x.tsv @@ %s::tsquery))"
            )
            params += [to_cc, scope_param, plain] if in_scope else [to_cc, plain]
        if key == "m":
            source = "FROM messages m"
        else:
            source = "FROM mailboxes b JOIN messages m ON m.id = b.id"
        conditions = in_scope_conditions + conditions
        where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
        return key, sql.SQL(source + where), in_scope_params + params  # type: ignore[arg-type]

    def _plan(self, conn: psycopg.Connection[Any], query: ArchiveQuery) -> str:
        """
        How to find ``query`` in a mailbox or a domain, from the number of
        messages the planner expects its words in (the vectors' statistics,
        without running the query): ``"few"`` when at most ``FEW``, to start
        from them; else ``""``, the planner's choice.  (Walking the scope
        newest first for words in most messages was tried, 7036850, and was
        slower than the planner's own plan: see bench/README.md.)
        """
        try:
            vector_query, _ = tsquery(query)
        except _Nothing:
            return ""
        if vector_query is None:
            return ""
        plan = conn.execute(
            "EXPLAIN (FORMAT JSON) SELECT 1 FROM messages WHERE tsv @@ %s::tsquery",
            (vector_query,),
        ).fetchone()
        if plan is None:
            return ""
        return "few" if float(plan[0][0]["Plan"]["Plan Rows"]) <= FEW else ""

    @staticmethod
    def _from_matches(conn: psycopg.Connection[Any]) -> None:
        """
        For this transaction, start from the GIN index's matches and look
        their mailboxes up by id: with a ``LIMIT``, the planner would walk a
        large mailbox testing every message for a word that is in few.
        """
        for setting in ("enable_seqscan", "enable_hashjoin", "enable_mergejoin"):
            conn.execute(sql.SQL("SET LOCAL {} = off").format(sql.Identifier(setting)))

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
            plan = self._plan(conn, query) if scoped else ""
            if plan == "few":
                self._from_matches(conn)
            rows = self._page(conn, scope, query, after, limit, fenced=plan == "few")
            return self._summaries(rows, limit)

        return self._call(work)

    def _page(
        self,
        conn: psycopg.Connection[Any],
        scope: ArchiveScope,
        query: ArchiveQuery,
        after: tuple[float, str] | None,
        limit: int,
        fenced: bool = False,
    ) -> list[Any]:
        """
        The rows of a page and one more.  ``fenced``: every match found
        before the page is sorted (the planner then plans for all of them,
        not for the first ``limit``).
        """
        matching = self._matching(scope, query, after)
        if matching is None:
            return []
        key, clause, params = matching
        # A message for two mailboxes of a domain is two rows: DISTINCT.
        distinct = "DISTINCT " if scope.mailbox is None and scope.domain is not None else ""
        template = (
            "SELECT * FROM (SELECT {distinct}{k}.received_at, {k}.id {clause}"
            " OFFSET 0) f ORDER BY f.received_at DESC, f.id DESC LIMIT %s"
            if fenced
            else "SELECT {distinct}{k}.received_at, {k}.id {clause}"
            " ORDER BY {k}.received_at DESC, {k}.id DESC LIMIT %s"
        )
        page = sql.SQL(template).format(
            distinct=sql.SQL(distinct),
            k=sql.SQL(key),
            clause=clause,
        )
        params.append(limit + 1)
        own: list[Any] = []
        within = ""
        if scope.mailbox is not None:
            within = " AND x.mailbox = %s"
            own.append(str(scope.mailbox))
        elif scope.domain is not None:
            within = " AND x.domain = %s"
            own.append(scope.domain)
        return conn.execute(
            sql.SQL(
                "SELECT p.id, p.received_at, mm.from_text, mm.envelope_sender,"
                " mm.subject, mm.size, mm.has_attachment, mm.message_id,"
                " ARRAY(SELECT x.mailbox FROM mailboxes x WHERE x.id = p.id" + within + ""
                " ORDER BY x.mailbox)"
                " FROM ({page}) p JOIN messages mm ON mm.id = p.id"
                " ORDER BY p.received_at DESC, p.id DESC"
            ).format(page=page),
            own + params,
            # Planned for these values each time: a prepared statement's
            # generic plan cannot tell a rare word from a common one.
            prepare=False,
        ).fetchall()

    @staticmethod
    def _summaries(rows: list[Any], limit: int) -> ArchivePage:
        more = len(rows) > limit
        rows = rows[:limit]
        items = [
            ArchiveSummary(
                id=r[0],
                received_at=r[1],
                sender=_text(r[2]) or r[3] or "",
                subject=_text(r[4]),
                mailboxes=_as_tuple(_address(m) for m in r[8]),
                size=r[5],
                has_attachment=r[6],
                message_id=_text(r[7]),
            )
            for r in rows
        ]
        following = encode_archive_cursor(rows[-1][1], rows[-1][0]) if more and rows else None
        return ArchivePage(_as_tuple(items), following)

    def count(self, scope: ArchiveScope, query: ArchiveQuery) -> Deferred[int]:
        def work(conn: psycopg.Connection[Any]) -> int:
            matching = self._matching(scope, query)
            if matching is None:
                return 0
            if (scope.mailbox is not None or scope.domain is not None) and self._plan(
                conn, query
            ) == "few":
                self._from_matches(conn)
            key, clause, params = matching
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
            conn.execute(_LOCK_HOLDS.format(shared="_shared"), (domain,))  # type: ignore[arg-type]
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
                bodies = conn.execute(
                    "DELETE FROM messages m WHERE m.id = ANY(%s)"
                    " AND NOT EXISTS (SELECT 1 FROM mailboxes x WHERE x.id = m.id)"
                    " RETURNING m.body_sha256",
                    (ids,),
                ).fetchall()
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
            key = (str(mailbox), archive_id)
            if key not in latest or latest[key][2] <= at:
                latest[key] = (mailbox.domain, _clean(route), at)
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
                ([a for a, _ in wanted], [str(m) for _, m in wanted]),
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
            conn.execute(_LOCK_HOLDS.format(shared=""), (domain,))  # type: ignore[arg-type]
            if held:
                conn.execute(
                    "INSERT INTO holds (kind, name, reason, since) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (kind, name) DO NOTHING",
                    (kind, name, _clean(reason), at),
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
                    _clean(event.actor),
                    _clean(event.action),
                    _clean(event.scope),
                    _utf8(event.detail),
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
            ("actor = %s", None if actor is None else _clean(actor)),
            ("action = %s", None if action is None else _clean(action)),
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
            return [AuditEvent(at, who, what, scope, _text(d)) for at, who, what, scope, d in rows]

        return self._call(work)

    # -- IAccountStore

    def add_account(self, account: Account) -> Deferred[None]:
        row = (_key(account.address), _utf8(account.address.domain), account.to_json())

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
        row = (_utf8(account.address.domain), account.to_json(), _key(account.address))

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
                "SELECT data FROM accounts WHERE address = %s", (_key(address),)
            ).fetchone()
            return None if row is None else Account.from_json(row[0])

        return self._call(work)

    def accounts(self, domain: str | None) -> Deferred[list[Account]]:
        def work(conn: psycopg.Connection[Any]) -> list[Account]:
            if domain is None:
                rows = conn.execute("SELECT data FROM accounts").fetchall()
            else:
                rows = conn.execute(
                    "SELECT data FROM accounts WHERE domain = %s", (_utf8(domain.lower()),)
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
                    (_key(account), ids),
                )
            else:
                conn.execute(
                    "DELETE FROM read_flags WHERE account = %s AND archive_id = ANY(%s::text[])",
                    (_key(account), ids),
                )

        return self._call(work)

    def read_ids(self, account: Address, archive_ids: Iterable[str]) -> Deferred[set[str]]:
        ids = list(set(archive_ids))

        def work(conn: psycopg.Connection[Any]) -> set[str]:
            rows = conn.execute(
                "SELECT archive_id FROM read_flags"
                " WHERE account = %s AND archive_id = ANY(%s::text[])",
                (_key(account), ids),
            ).fetchall()
            return {r[0] for r in rows}

        return self._call(work)

    def add_sent(self, sent: SentMessage) -> Deferred[None]:
        row = (_key(sent.account), sent.id, sent.sent_at, bytes(sent.message))

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
                (_key(account), before, before, max(0, int(limit))),
            ).fetchall()
            return [SentMessage(i, account, at, bytes(data)) for i, at, data in rows]

        return self._call(work)

    def sent_message(self, account: Address, sent_id: str) -> Deferred[SentMessage | None]:
        def work(conn: psycopg.Connection[Any]) -> SentMessage | None:
            row = conn.execute(
                "SELECT sent_at, message FROM sent WHERE account = %s AND id = %s",
                (_key(account), sent_id),
            ).fetchone()
            return None if row is None else SentMessage(sent_id, account, row[0], bytes(row[1]))

        return self._call(work)

    # -- closing

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


# -- configuration -------------------------------------------------------------------


@frozen
class _Settings:
    conninfo: str
    pool_size: int
    schema: str


def _string(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"archive.{key}: must be a non-empty string")
    return value


def _number(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"archive.{key}: must be a number of seconds, more than 0")
    return float(value)


def _settings(config: Mapping[str, Any]) -> _Settings:
    dsn = _string(config, "dsn")
    parts: dict[str, Any] = {}
    for key in ("host", "dbname", "user", "password"):
        value = _string(config, key)
        if value is not None:
            parts[key] = value
    if "port" in config:
        port = config["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("archive.port: must be a TCP port number")
        parts["port"] = port
    if dsn is None and "host" not in parts and "dbname" not in parts:
        raise ValueError(
            "archive.dsn: is required for the postgresql archive (a libpq connection "
            "string such as 'host=db.hub.example dbname=mailhub user=mailhub'), "
            "or give archive.host and archive.dbname"
        )
    try:
        given = psycopg.conninfo.conninfo_to_dict(dsn or "")
    except psycopg.Error:
        # Not the error's text: it may quote a password.
        raise ValueError(
            "archive.dsn: not a libpq connection string ('host=... dbname=...') "
            "or URI ('postgresql://...')"
        )
    defaults: dict[str, Any] = {
        "connect_timeout": max(
            1, round(_number(config, "connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        ),
        "application_name": "mailhub-archive",
        # A server that vanished (a site down) is noticed in seconds, not
        # after the kernel's two hours.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }
    extra = {k: v for k, v in defaults.items() if k not in given and k not in parts}
    if "connect_timeout" in config:
        extra["connect_timeout"] = defaults["connect_timeout"]
    pool_size = config.get("pool_size", DEFAULT_POOL_SIZE)
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
        raise ValueError("archive.pool_size: must be a whole number, 1 or more")
    schema = _string(config, "schema") or DEFAULT_SCHEMA
    if len(schema.encode()) > 63:
        raise ValueError("archive.schema: at most 63 bytes (PostgreSQL's limit for a name)")
    try:
        conninfo = psycopg.conninfo.make_conninfo(dsn or "", **parts, **extra)
    except psycopg.Error:
        raise ValueError("archive.dsn: the connection settings do not make a connection string")
    return _Settings(conninfo, pool_size, schema)


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
        _settings(config)

    def make(self, config: Mapping[str, Any], reactor: Any) -> PostgresArchive:
        """
        Check the configuration and start the archive's threads; nothing
        connects until the first call (which creates the schema if missing).

        :param config: the ``[archive]`` table.
        :param reactor: the reactor (``IReactorThreads``, system event triggers).
        :raises ValueError: naming the key, when the configuration is wrong.
        """
        settings = _settings(config)
        return PostgresArchive(reactor, settings.conninfo, settings.pool_size, settings.schema)


plugin = PostgresArchivePlugin()

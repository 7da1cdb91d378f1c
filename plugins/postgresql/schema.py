"""
The ``postgresql`` archive's tables (in the schema the configuration names),
the schema's version and the migrations from each version to the next.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from mailhub.model import Account

from .search import FIELDS
from .values import account_key, parse_address

__all__ = ["LOCK_HOLDS", "SCHEMA_VERSION", "ensure_schema"]

#: 2 added the accounts' tables, 3 the delivery records, 4 the fields'
#: vectors, 5 folded the mailboxes (``_MIGRATIONS``).
SCHEMA_VERSION = 5

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

def _renames(conn: psycopg.Connection[Any], query: str) -> tuple[list[str], list[str]]:
    """The values ``query`` selects that are not folded, and their folded forms."""
    old = [m for (m,) in conn.execute(query).fetchall() if str(parse_address(m).folded()) != m]  # type: ignore[arg-type]
    return old, [str(parse_address(m).folded()) for m in old]


#: The (old, new) pairs of ``_renames``, as a table in SQL.
_FOLDING = "unnest(%s::text[], %s::text[]) AS f(old, new)"


def _fold_mailboxes(conn: psycopg.Connection[Any]) -> None:
    """
    Schema 5: the archive keeps its mailboxes folded (``Address.folded``),
    so that mail to ``John.Smith@`` and to ``john.smith@`` is one mailbox's
    and a search for either finds both.  Rows of a mailbox written as
    given by an older mailhub are folded, merged with the folded mailbox's
    where both exist: a message's mailboxes (and the scope lexemes of its
    ``fields`` row, made again from them as ``add`` does: only the affected
    messages'), the delivery records (the latest delivery wins), holds, and
    the accounts with their read flags and Sent folders.  An account whose
    folded address another account has already is left as it was (which
    of two people's passwords would win?): the login reaches the folded one.
    """
    renames = _renames(conn, "SELECT DISTINCT mailbox FROM mailboxes")
    if renames[0]:
        conn.execute(
            "INSERT INTO mailboxes (mailbox, domain, received_at, id, tsv)"
            " SELECT f.new, b.domain, b.received_at, b.id, b.tsv FROM mailboxes b"
            f" JOIN {_FOLDING} ON b.mailbox = f.old ON CONFLICT DO NOTHING",
            renames,
        )
        affected = conn.execute(
            f"DELETE FROM mailboxes b USING {_FOLDING} WHERE b.mailbox = f.old RETURNING b.id", renames
        ).fetchall()
        conn.execute(
            "UPDATE fields SET tsv = " + FIELDS.format(tsv="fields.tsv", id="fields.id")  # type: ignore[arg-type]
            + " WHERE id = ANY(%s::text[])",
            (sorted({i for (i,) in affected}),),
        )
    renames = _renames(conn, "SELECT DISTINCT mailbox FROM delivered")
    if renames[0]:
        # One row per folded pair (an upsert cannot touch a row twice): the latest.
        conn.execute(
            "INSERT INTO delivered (mailbox, archive_id, domain, route, at)"
            " SELECT DISTINCT ON (f.new, d.archive_id) f.new, d.archive_id, d.domain, d.route, d.at"
            f" FROM delivered d JOIN {_FOLDING} ON d.mailbox = f.old"
            " ORDER BY f.new, d.archive_id, d.at DESC"
            " ON CONFLICT (mailbox, archive_id) DO UPDATE"
            " SET route = EXCLUDED.route, at = EXCLUDED.at WHERE EXCLUDED.at > delivered.at",
            renames,
        )
        conn.execute(f"DELETE FROM delivered d USING {_FOLDING} WHERE d.mailbox = f.old", renames)
    renames = _renames(conn, "SELECT name FROM holds WHERE kind = 'mailbox'")
    if renames[0]:
        conn.execute(
            "INSERT INTO holds (kind, name, reason, since)"
            f" SELECT 'mailbox', f.new, h.reason, h.since FROM holds h JOIN {_FOLDING}"
            " ON h.kind = 'mailbox' AND h.name = f.old ORDER BY h.since ON CONFLICT DO NOTHING",
            renames,
        )
        conn.execute(f"DELETE FROM holds h USING {_FOLDING} WHERE h.kind = 'mailbox' AND h.name = f.old", renames)
    for key, data in conn.execute("SELECT address, data FROM accounts").fetchall():
        account = Account.from_json(data)
        new_key = account_key(account.address)
        if new_key == bytes(key) or conn.execute("SELECT 1 FROM accounts WHERE address = %s", (new_key,)).fetchone():
            continue
        conn.execute("UPDATE accounts SET address = %s, data = %s WHERE address = %s", (new_key, account.to_json(), key))
        conn.execute(
            "UPDATE read_flags r SET account = %s WHERE account = %s AND NOT EXISTS"
            " (SELECT 1 FROM read_flags o WHERE o.account = %s AND o.archive_id = r.archive_id)",
            (new_key, key, new_key),
        )
        conn.execute(
            "UPDATE sent s SET account = %s WHERE account = %s AND NOT EXISTS"
            " (SELECT 1 FROM sent o WHERE o.account = %s AND o.id = s.id)",
            (new_key, key, new_key),
        )
        conn.execute("DELETE FROM read_flags WHERE account = %s", (key,))
        conn.execute("DELETE FROM sent WHERE account = %s", (key,))


#: What makes each version of the schema from the one before (SQL, or a
#: function of the connection); a new archive runs them all after ``_TABLES``.
_MIGRATIONS: dict[int, str | Callable[[psycopg.Connection[Any]], None]] = {
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
    # Made from the messages' vectors and mailboxes (search.FIELDS): about
    # a minute for 1,000,000 messages.  The statistics of the messages'
    # words are ten times the default, so that the planner knows the
    # 10,000 most common words, not 1,000: a word's start (every word of a
    # search is one) is then seen to be in many messages when its words
    # are, not taken for a rare word (search.plan; ANALYZE takes 10 s at
    # 1,000,000 messages).
    4: """
CREATE TABLE fields (
    id text COLLATE "C" PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    received_at double precision NOT NULL,
    tsv tsvector NOT NULL
);
INSERT INTO fields (id, received_at, tsv) SELECT m.id, m.received_at, """
    + FIELDS.format(tsv="m.tsv", id="m.id")
    + """ FROM messages m;
CREATE INDEX fields_tsv ON fields USING gin (tsv);
ANALYZE fields;
ALTER TABLE messages ALTER COLUMN tsv SET STATISTICS 1000;
ANALYZE messages;
""",
    5: _fold_mailboxes,
}

_LOCK_SCHEMA = "SELECT pg_advisory_xact_lock(hashtext('mailhub archive schema ' || %s))"
LOCK_HOLDS = "SELECT pg_advisory_xact_lock{shared}(hashtext('mailhub archive holds ' || %s))"


def _migrate(conn: psycopg.Connection[Any], version: int) -> None:
    """Bring the schema from ``version`` to ``SCHEMA_VERSION`` (in the caller's transaction)."""
    for step in range(version + 1, SCHEMA_VERSION + 1):
        migration = _MIGRATIONS[step]
        if callable(migration):
            migration(conn)
        else:
            conn.execute(migration)  # type: ignore[arg-type]
    conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))



def ensure_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    """
    Create ``schema`` and its tables if missing, or bring them to
    ``SCHEMA_VERSION``, under an advisory lock (nodes starting together do
    not race).

    :raises RuntimeError: if the schema is newer than this mailhub knows.
    """
    with conn.transaction():
        conn.execute(_LOCK_SCHEMA, (schema,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        exists = conn.execute(
            "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'meta'",
            (schema,),
        ).fetchone()
        if exists is None:
            _create(conn)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None and int(row[0]) < SCHEMA_VERSION:
            _migrate(conn, int(row[0]))
            row = (str(SCHEMA_VERSION),)
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"the archive's schema {schema!r} is version {version}, newer than "
            f"this mailhub knows ({SCHEMA_VERSION}): upgrade mailhub"
        )


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

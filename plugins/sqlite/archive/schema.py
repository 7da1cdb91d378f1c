"""
The sqlite archive's tables (messages, bodies, mailboxes, the FTS5 text
index, holds, audit; accounts, read flags and the Sent folder; delivery
records), its schema version and the migration of an older archive.
"""

from __future__ import annotations

import json
import sqlite3

from mailhub.model import Account

from .rows import INDEX_COLUMNS, INDEX_INSERT, account_key, address_of, index_row, reindex, text_of

__all__ = [
    "ACCOUNTS_SCHEMA",
    "DELIVERED_SCHEMA",
    "SCHEMA",
    "SCHEMA_VERSION",
    "TERMS_SCHEMA",
    "NewerSchema",
    "migrate",
]

#: The archive's schema, in ``PRAGMA user_version``: 2 added the accounts'
#: tables (``ACCOUNTS_SCHEMA``), 3 the delivery records
#: (``DELIVERED_SCHEMA``), 4 the text index's terms (``TERMS_SCHEMA``), 5
#: the text index's ``scope`` column, 6 mailboxes folded
#: (``Address.folded``: ``_fold_mailboxes``).
SCHEMA_VERSION = 6

#: The FTS5 text index (``rows.INDEX_COLUMNS``), as ``SCHEMA`` makes it
#: and schema 5's rebuild makes it again.
TEXT_INDEX = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS text_index USING fts5 ({INDEX_COLUMNS},"
    " content = '', tokenize = 'unicode61 remove_diacritics 2')"
)

SCHEMA = f"""
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
{TEXT_INDEX};
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
ACCOUNTS_SCHEMA = """
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
DELIVERED_SCHEMA = """
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

# Schema 4: the terms of the text index, so that a search can ask FTS5 for a
# word's start as the exact terms it stands for (``"rep" OR "report" OR
# "reply"``), which FTS5 reads only over the rowids asked for, rather than as
# a prefix query (``"rep" *``), whose lists FTS5 merges over the whole index
# every time.  ``exact`` is 1 when ``term`` is the text index's own term, 0
# when it is only the archive's folding of a word that was not ASCII (FTS5
# may have folded it otherwise): a search for a start that such a term has
# asks FTS5 for the prefix after all.  Terms are never removed (a term whose
# messages expired matches nothing).  Opening an archive of schema 3 or older
# reads the text index's own vocabulary once (``fts5vocab``).
TERMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS terms (
    term TEXT PRIMARY KEY,
    exact INTEGER NOT NULL
) WITHOUT ROWID;
"""


class NewerSchema(sqlite3.DatabaseError):
    """The archive was written by a newer mailhub."""


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """
    Give the archive at ``path`` (``conn``, in a write transaction) the
    tables and indexes of ``SCHEMA_VERSION`` that it lacks.

    :raises NewerSchema: the archive was written by a newer mailhub.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise NewerSchema(
            f"{path} was written by a newer mailhub (archive schema"
            f" {version}; this one knows up to {SCHEMA_VERSION})"
        )
    for statement in (SCHEMA + ACCOUNTS_SCHEMA + DELIVERED_SCHEMA + TERMS_SCHEMA).split(";"):
        if statement.strip():
            conn.execute(statement)
    if version < 4:
        conn.execute("CREATE VIRTUAL TABLE temp.text_terms USING fts5vocab(main, text_index, 'row')")
        try:
            conn.execute("INSERT OR IGNORE INTO terms (term, exact) SELECT term, 1 FROM temp.text_terms")
        finally:
            conn.execute("DROP TABLE temp.text_terms")
    if _index_columns(conn) < 6 or 0 < version < 5:
        # Also an index of six columns in a file that says schema 4 or
        # older: set back by hand, or written since by an older mailhub,
        # its scope tokens cannot be trusted.
        _rebuild_text_index(conn)
    if 0 < version < 6:
        _fold_mailboxes(conn)
    if version < SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _index_columns(conn: sqlite3.Connection) -> int:
    return len(conn.execute("PRAGMA table_info(text_index)").fetchall())


#: Messages read and indexed at a time by the rebuild of schema 5.
_REBUILD_BATCH = 2000


def _rebuild_text_index(conn: sqlite3.Connection) -> None:
    """
    Schema 5: the text index gains the ``scope`` column (a token for each
    of a message's mailboxes, ``rows.scope_token``), so that FTS5 finds a
    search's matches within one mailbox itself.  FTS5 cannot add a column:
    the index is written again from each message's kept text (about
    10,000 messages a second).  The old one goes first, in the same
    transaction (a failure takes it all back): the rebuild reads only
    ``messages`` and ``mailboxes``, and an archive near its ``max_size_mb``
    has no room for two indexes.
    """
    conn.execute("DROP TABLE text_index")
    conn.execute(TEXT_INDEX)
    last = -1
    while True:
        rows = conn.execute(
            "SELECT seq, id, sender, text FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
            (last, _REBUILD_BATCH),
        ).fetchall()
        if not rows:
            break
        ids = [row[1] for row in rows]
        mailboxes: dict[str, list[str]] = {}
        for message_id, mailbox in conn.execute(
            "SELECT message_id, mailbox FROM mailboxes WHERE message_id IN"
            " (SELECT value FROM json_each(?))",
            (json.dumps(ids),),
        ):
            mailboxes.setdefault(message_id, []).append(mailbox)
        conn.executemany(
            INDEX_INSERT,
            [
                (seq, *index_row(text_of(blob), sender, mailboxes.get(message_id, ())))
                for seq, message_id, sender, blob in rows
            ],
        )
        last = rows[-1][0]


def _folded(mailbox: str) -> str:
    return str(address_of(mailbox).folded())


def _renames(conn: sqlite3.Connection, sql: str) -> dict[str, str]:
    """The values ``sql`` selects that are not folded, each with its folded form."""
    return {m: f for (m,) in conn.execute(sql) if (f := _folded(m)) != m}


def _fold_mailboxes(conn: sqlite3.Connection) -> None:
    """
    Schema 6: the archive keeps its mailboxes folded (``Address.folded``),
    so that mail to ``John.Smith@`` and to ``john.smith@`` is one mailbox's
    and a search for either finds both.  Rows of a mailbox written as given
    by an older mailhub are folded, merged with the folded mailbox's where
    both exist: the mailboxes of a message (and the scope tokens of its
    text index row, written again, ``rows.reindex``: only the affected
    messages'), its delivery records (the latest delivery wins, as in
    ``record_delivered``), holds, and the accounts with their read flags
    and Sent folders.  An account whose folded address another account has
    already is left as it was (which of two people's passwords would win?):
    the login reaches the folded one.
    """
    renames = _renames(conn, "SELECT DISTINCT mailbox FROM mailboxes")
    if renames:
        affected = {
            archive_id
            for old in renames
            for (archive_id,) in conn.execute("SELECT message_id FROM mailboxes WHERE mailbox = ?", (old,))
        }
        for archive_id in sorted(affected):
            before = {m for (m,) in conn.execute("SELECT mailbox FROM mailboxes WHERE message_id = ?", (archive_id,))}
            seq, sender, blob = conn.execute(
                "SELECT seq, sender, text FROM messages WHERE id = ?", (archive_id,)
            ).fetchone()
            reindex(conn, seq, sender, blob, before, {renames.get(m, m) for m in before})
        for old, new in renames.items():
            # A row the folded mailbox has already stays; the other goes.
            conn.execute("UPDATE OR IGNORE mailboxes SET mailbox = ? WHERE mailbox = ?", (new, old))
            conn.execute("DELETE FROM mailboxes WHERE mailbox = ?", (old,))
    for old, new in _renames(conn, "SELECT DISTINCT mailbox FROM delivered").items():
        conn.execute(
            "INSERT INTO delivered (mailbox, archive_id, domain, route, at)"
            " SELECT ?, archive_id, domain, route, at FROM delivered WHERE mailbox = ? AND true"
            " ON CONFLICT (mailbox, archive_id) DO UPDATE SET route = excluded.route, at = excluded.at"
            " WHERE excluded.at > delivered.at",
            (new, old),
        )
        conn.execute("DELETE FROM delivered WHERE mailbox = ?", (old,))
    for old, new in _renames(conn, "SELECT mailbox FROM holds WHERE mailbox IS NOT NULL").items():
        conn.execute(
            "INSERT OR IGNORE INTO holds (scope, mailbox, domain, reason, since)"
            " SELECT ?, ?, domain, reason, since FROM holds WHERE mailbox = ?",
            (f"mailbox {new}", new, old),
        )
        conn.execute("DELETE FROM holds WHERE mailbox = ?", (old,))
    for key, data in conn.execute("SELECT address, data FROM accounts").fetchall():
        account = Account.from_json(data)
        new_key = account_key(account.address)
        if new_key == key or conn.execute("SELECT 1 FROM accounts WHERE address = ?", (new_key,)).fetchone():
            continue
        conn.execute("UPDATE accounts SET address = ?, data = ? WHERE address = ?", (new_key, account.to_json(), key))
        for table in ("read_flags", "sent"):
            conn.execute(f"UPDATE OR IGNORE {table} SET account = ? WHERE account = ?", (new_key, key))
            conn.execute(f"DELETE FROM {table} WHERE account = ?", (key,))

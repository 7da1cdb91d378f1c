"""
The sqlite store's schema: its tables, the spool's schema version
(``PRAGMA user_version``) and the migration of a spool written by an
earlier mailhub.  Run by the writer when it opens the database; nothing
here runs on the reactor thread.
"""

from __future__ import annotations

import sqlite3

__all__ = ["ENTRY_COLUMNS", "PAGE_SIZE", "SCHEMA", "SCHEMA_VERSION", "add_missing_columns"]

#: The page size of a new spool file (an existing file keeps its own).  Bodies
#: of 100 KB span fewer overflow pages, so writing and freeing them costs less:
#: measured against 4096, enqueue and record of 100 KB messages +30-45 %, of
#: 32 KB +8 %; of 4 KB 10-25 % slower (every dirty page written is larger).
PAGE_SIZE = 16384

SCHEMA = """
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
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    delay_notified INTEGER NOT NULL DEFAULT 0
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
    holding INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (route, node)
);
CREATE TABLE IF NOT EXISTS route_states (
    route TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
"""

ENTRY_COLUMNS = (
    "id, message_id, route, sender, recipients, created, next_attempt, node,"
    " attempts, held, size, helo, client, smtputf8, delay_notified"
)


#: Columns added to ``entries`` after its first release: a spool file written
#: before them gets them (with their default) when it is opened.
_ADDED_COLUMNS = {
    "smtputf8": "INTEGER NOT NULL DEFAULT 0",
    "lease_incarnation": "TEXT",
    "delay_notified": "INTEGER NOT NULL DEFAULT 0",
}


#: Columns added to ``messages`` since: where a body kept in the body log is.
_ADDED_MESSAGE_COLUMNS = {"log_segment": "TEXT", "log_offset": "INTEGER", "log_length": "INTEGER"}

#: ``route_shares``: what each node said it held (counted against the others).
_ADDED_SHARE_COLUMNS = {"holding": "INTEGER NOT NULL DEFAULT 0"}


#: The spool's schema, in ``PRAGMA user_version``.  1: bodies may be in the
#: body log (a hub before it would read them as empty: it must not open such
#: a spool, and any later one refuses a spool of a schema it does not know).
#: Tables added since (``route_shares``, ``route_states``) need no new
#: version: ``SCHEMA`` creates whichever is missing when a spool is opened,
#: and a hub before them reads the rest of the spool as it always did.
SCHEMA_VERSION = 1


def add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring a spool of an earlier schema up to ``SCHEMA_VERSION`` (in one transaction)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"the spool was written by a newer mailhub (schema {version};"
                f" this one knows up to {SCHEMA_VERSION})"
            )
        for table, added in (
            ("entries", _ADDED_COLUMNS), ("messages", _ADDED_MESSAGE_COLUMNS), ("route_shares", _ADDED_SHARE_COLUMNS)
        ):
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

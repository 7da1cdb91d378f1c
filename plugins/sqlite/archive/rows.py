"""
The sqlite archive's rows: text as SQLite takes it, addresses, the
compressed text of a message and its text index row, search result
summaries.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

from mailhub.model import (
    Address,
    ArchiveSummary,
    ArchiveText,
)

__all__ = [
    "INDEX_COLUMNS", "INDEX_DELETE", "INDEX_INSERT", "SCOPE_MARK", "SUMMARY_COLUMNS", "account_key", "address_of",
    "as_tuple", "clean", "domain_token", "index_row", "mailboxes_of", "reindex", "scope_token", "scope_tokens",
    "summary_of", "text_blob", "text_of",
]


def clean(text: str) -> str:
    """``text`` as SQLite can take it (lone surrogates replaced)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def address_of(text: str) -> Address:
    # A domain never contains "@", so the last one splits the address exactly.
    local, _, domain = text.rpartition("@")
    return Address(local, domain)


def account_key(address: Address) -> bytes:
    """An address as the accounts' tables key it: folded (``Address.folded``), any character."""
    return str(address.folded()).encode("utf-8", "surrogatepass")


def as_tuple(items: Iterable[Any]) -> Any:
    # mypy cannot solve the attrs ``converter=tuple`` of the model's fields.
    return tuple(items)






def text_blob(text: ArchiveText) -> bytes:
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


def text_of(blob: bytes) -> ArchiveText:
    data = json.loads(zlib.decompress(blob))
    data["attachments"] = as_tuple(data["attachments"])
    return ArchiveText(**data)


#: ``text_index``'s columns, in order; the last, ``scope``, holds a token
#: for each of the message's mailboxes and their domains (``scope_tokens``).
INDEX_COLUMNS = "subject, sender, recipients, body, attachments, scope"

#: Writes a message's row (``rowid``, then ``index_row``'s values) ...
INDEX_INSERT = f"INSERT INTO text_index (rowid, {INDEX_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
#: ... and takes it out again, given the very values it was written with.
INDEX_DELETE = (
    f"INSERT INTO text_index (text_index, rowid, {INDEX_COLUMNS}) VALUES ('delete', ?, ?, ?, ?, ?, ?, ?)"
)

#: What a scope token starts with: a character of Unicode's private use
#: area, which FTS5's ``unicode61`` tokenizer keeps in a token and which no
#: archive counts in a word (``archive_words`` keeps letters and digits;
#: this is neither).  A search takes it out of what was typed
#: (``search._fts``), so that no word typed, nor its start, matches a
#: scope token.
SCOPE_MARK = "\ue000"


def scope_token(mailbox: str) -> str:
    """
    The text index's term for one mailbox (as ``mailboxes.mailbox`` holds
    it), or for a domain given as ``"@" + domain`` (which no mailbox is):
    ``SCOPE_MARK`` and a hash of the text.  Two scopes that share a token (a
    hash collision) only make a search read more rows: what a search shows
    is checked against ``mailboxes``.
    """
    return SCOPE_MARK + hashlib.blake2b(mailbox.encode("utf-8"), digest_size=8).hexdigest()


def domain_token(domain: str) -> str:
    """The text index's term for a domain (``scope_token`` of ``"@" + domain``)."""
    return scope_token("@" + domain)


def scope_tokens(mailboxes: Iterable[str]) -> str:
    """The ``scope`` column of a message in ``mailboxes``: a token for each, and for each of their domains."""
    unique = set(mailboxes)
    tokens = {scope_token(m) for m in unique} | {domain_token(m.rpartition("@")[2]) for m in unique}
    return " ".join(sorted(tokens))


def index_row(text: ArchiveText, sender: str | None, mailboxes: Iterable[str]) -> tuple[str, ...]:
    """
    The values of ``text_index``'s columns (``INDEX_COLUMNS``) for a message
    in ``mailboxes`` (``mailboxes.mailbox`` values); ``delete`` needs exactly
    these again, so the scope's tokens are sorted.
    """
    return (
        clean(text.subject),
        clean(f"{text.sender}\n{sender or ''}"),
        clean(text.recipients),
        clean(text.body),
        clean("\n".join(text.attachments)),
        scope_tokens(mailboxes),
    )


def reindex(conn: sqlite3.Connection, seq: int, sender: str | None, blob: bytes, before: set[str],
            after: set[str] | None) -> None:
    """
    Take a message's row out of the text index, where it was written for
    the mailboxes ``before`` (a contentless index needs the very values
    again), and write it back for those ``after`` (``None``: not at all).
    """
    text = text_of(blob)
    conn.execute(INDEX_DELETE, (seq, *index_row(text, sender, before)))
    if after is not None:
        conn.execute(INDEX_INSERT, (seq, *index_row(text, sender, after)))


SUMMARY_COLUMNS = (
    "m.id, m.received_at, m.sender, m.from_text, m.subject, m.size, m.has_attachment, m.message_id"
)


def summary_of(row: Sequence[Any], mailboxes: Sequence[Address]) -> ArchiveSummary:
    archive_id, received_at, sender, from_text, subject, size, has_attachment, message_id = row[:8]
    return ArchiveSummary(
        id=archive_id,
        received_at=received_at,
        sender=from_text or (sender or ""),
        subject=subject,
        mailboxes=as_tuple(mailboxes),
        size=size,
        has_attachment=bool(has_attachment),
        message_id=message_id,
    )


def mailboxes_of(conn: sqlite3.Connection, archive_id: str) -> list[Address]:
    return [
        address_of(row[0])
        for row in conn.execute(
            "SELECT mailbox FROM mailboxes WHERE message_id = ? ORDER BY mailbox", (archive_id,)
        )
    ]

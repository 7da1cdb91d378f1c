"""
The ``sqlite`` archive against the ``memory`` archive (the contract's
reference), through random sequences of adds, adds of a message again for
other mailboxes, and expiries: after each sequence the text index's terms,
per column, are exactly what the messages and their mailboxes say (the
scope tokens kept up by every write), and every search, page by page, and
every count agree in every scope.  The search's thresholds are set low at
random so that every path of the walk is taken on a small archive.
(Written by a second read of schema 5.)
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailhub.model import Address, ArchivedMessage, ArchiveQuery, ArchiveScope
from mailhub.plugins.memory.archive import MemoryArchive
from mailhub.plugins.sqlite.archive import SqliteArchive, plugin
from mailhub.plugins.sqlite.archive import search as archive_search
from mailhub.plugins.sqlite.archive import terms as archive_terms
from mailhub.plugins.sqlite.archive.rows import index_row, text_of
from mailhub.testing.archive_contract import NOW, archived

DOMAINS = ("a.example", "b.example", "c.example")
BOXES = [Address(local, domain) for local in ("al", "bo", "cy") for domain in DOMAINS]
WORDS = ["apple", "apricot", "banana", "band", "cherry", "zeta", "zest"]
COLUMNS = ("subject", "sender", "recipients", "body", "attachments", "scope")


async def check_index(archive: SqliteArchive) -> None:
    """The index's terms per column are those of each message's text and mailboxes; FTS5's own check passes."""

    def read(conn: sqlite3.Connection) -> tuple[dict[Any, int], dict[Any, int]]:
        conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.v USING fts5vocab (main, text_index, 'col')")
        got = {(term, column): docs for term, column, docs in conn.execute("SELECT term, col, doc FROM temp.v")}
        want: dict[Any, int] = {}
        for _seq, message_id, sender, blob in conn.execute("SELECT seq, id, sender, text FROM messages").fetchall():
            boxes = [r[0] for r in conn.execute("SELECT mailbox FROM mailboxes WHERE message_id = ?", (message_id,))]
            for name, value in zip(COLUMNS, index_row(text_of(blob), sender, boxes), strict=True):
                for term in set(value.lower().replace("@", " ").replace(".", " ").split()):
                    want[(term, name)] = want.get((term, name), 0) + 1
        conn.execute("INSERT INTO text_index (text_index, rank) VALUES ('integrity-check', 0)")
        return got, want

    got, want = await archive.run(read)
    assert got == want


@pytest.mark.parametrize("seed", range(8))
@pytest_twisted.ensureDeferred
async def test_the_sqlite_archive_finds_what_the_memory_archive_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    rnd = random.Random(seed)
    monkeypatch.setattr(archive_search, "_FIRST_CHUNK", rnd.choice([2, 4, 128]))
    monkeypatch.setattr(archive_search, "_FEW", rnd.choice([0, 3, 5000]))
    monkeypatch.setattr(archive_search, "_SPARSE", rnd.choice([0, 1, 64]))
    monkeypatch.setattr(archive_search, "_WALK_LIMIT", rnd.choice([10, 20_000]))
    monkeypatch.setattr(archive_search, "_SPARSE_LIMIT", rnd.choice([10, 2000]))
    monkeypatch.setattr(archive_terms, "MAX_EXPANSION", rnd.choice([-1, 64]))
    sq = plugin.make({"path": "a.db", "config_dir": str(tmp_path)}, reactor)
    mem = MemoryArchive()
    try:
        ids: list[str] = []
        messages: dict[str, ArchivedMessage] = {}
        for i in range(150):
            if ids and rnd.random() < 0.25:
                # The same message again, for one or two other mailboxes.
                first = messages[rnd.choice(ids)]
                m = archived(
                    first.id, first.received_at, tuple(rnd.sample(BOXES, rnd.randint(1, 2))),
                    body=first.text.body, subject=first.text.subject,
                    attachments=first.text.attachments, recipients=first.text.recipients,
                )
            else:
                m = archived(
                    f"m{i:03d}", NOW - 1000 + rnd.randint(0, 900),
                    tuple(rnd.sample(BOXES, rnd.randint(0 if rnd.random() < 0.05 else 1, 3))),
                    body=" ".join(rnd.choices(WORDS, k=rnd.randint(1, 4))),
                    subject=rnd.choice(WORDS), recipients=rnd.choice(["", "al@a.example", "zed@q.example"]),
                    attachments=rnd.choice([(), ("plan.pdf",)]),
                )
                ids.append(m.id)
                messages[m.id] = m
            await sq.add(m)
            await mem.add(m)
            if rnd.random() < 0.05:
                domain, before = rnd.choice(DOMAINS), NOW - 1000 + rnd.randint(0, 900)
                assert await sq.expire(domain, before, 10_000) == await mem.expire(domain, before, 10_000)
        await check_index(sq)
        scopes = [
            ArchiveScope(), *(ArchiveScope(mailbox=b) for b in BOXES), *(ArchiveScope(domain=d) for d in DOMAINS)
        ]
        queries = [
            ArchiveQuery(words=("ap",)), ArchiveQuery(words=("band",)), ArchiveQuery(words=("z",), has_attachment=True),
            ArchiveQuery(phrases=("apple banana",)), ArchiveQuery(subject=("ch",)), ArchiveQuery(recipient=("al",)),
            ArchiveQuery(recipient=("zed",), words=("a",)),
            ArchiveQuery(words=("apple",), after=NOW - 600, before=NOW - 300),
            ArchiveQuery(has_attachment=False), ArchiveQuery(recipient=("b example",)),
            ArchiveQuery(words=("zest",), has_attachment=False),
        ]
        for scope in scopes:
            for query in queries:
                for limit in (3, 50):
                    found = []
                    for archive in (sq, mem):
                        items: list[Any] = []
                        cursor = None
                        while True:
                            page = await archive.search(scope, query, cursor, limit)
                            items += [(item.id, tuple(item.mailboxes)) for item in page.items]
                            cursor = page.next
                            if cursor is None:
                                break
                        found.append(items)
                    assert found[0] == found[1], (scope, query, limit)
                assert await sq.count(scope, query) == await mem.count(scope, query), (scope, query)
    finally:
        await sq.close()

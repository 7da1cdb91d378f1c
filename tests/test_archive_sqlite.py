"""The ``sqlite`` archive: the contracts, and what only a database on disk can show."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from zope.interface.verify import verifyObject

from mailhub.archive.query import parse_query
from mailhub.interfaces import IArchive, IArchivePlugin
from mailhub.model import (
    Account,
    Address,
    ArchiveQuery,
    ArchiveScope,
    Role,
    SentMessage,
    StoreFull,
    StoreUnavailable,
    archive_words,
)
from mailhub.plugin import load_plugin
from mailhub.plugins.sqlite.archive import SCHEMA_VERSION, SqliteArchive, plugin
from mailhub.plugins.sqlite.archive import schema as archive_schema
from mailhub.plugins.sqlite.archive import search as archive_search
from mailhub.plugins.sqlite.archive import terms as archive_terms
from mailhub.plugins.sqlite.archive.rows import (
    INDEX_DELETE,
    SCOPE_MARK,
    index_row,
    reindex,
    scope_token,
    text_of,
)
from mailhub.plugins.sqlite.archive.schema import migrate
from mailhub.plugins.sqlite.archive.search import Search
from mailhub.plugins.sqlite.archive.terms import Terms
from mailhub.testing.account_contract import AccountStoreContract, account
from mailhub.testing.archive_contract import (
    ALICE,
    BOB,
    DAVE,
    NOW,
    ODD_MESSAGE,
    ArchiveContract,
    archived,
)


def _as_tuple(items: Any) -> Any:
    # mypy cannot solve the attrs ``converter=tuple`` of the model's fields.
    return tuple(items)


def open_archive(path: Path, **config: Any) -> SqliteArchive:
    return plugin.make({"path": path.name, "config_dir": str(path.parent), **config}, reactor)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "archive.db"


@pytest.fixture
def archive(db: Path) -> Iterator[SqliteArchive]:
    archive = open_archive(db)
    yield archive
    pytest_twisted.blockon(archive.close())


class TestSqliteArchive(ArchiveContract, AccountStoreContract):
    """The contracts, over a fresh database file (the module's ``archive`` fixture)."""


# -- the plugin ------------------------------------------------------------


def test_plugin_provides_archive_plugin() -> None:
    """The entry point object is an ``IArchivePlugin`` named ``sqlite``."""
    assert verifyObject(IArchivePlugin, plugin)
    assert plugin.name == "sqlite"


def test_plugin_found_by_name() -> None:
    """The core finds the archive through its entry point."""
    assert load_plugin("mailhub.archives", "sqlite") is plugin


@pytest.mark.parametrize(
    "config, key",
    [
        ({}, "archive.path"),
        ({"path": ""}, "archive.path"),
        ({"path": 5}, "archive.path"),
        ({"path": "a.db", "max_size_mb": "big"}, "archive.max_size_mb"),
        ({"path": "a.db", "max_size_mb": 0}, "archive.max_size_mb"),
        ({"path": "a.db", "max_size_mb": True}, "archive.max_size_mb"),
    ],
)
def test_bad_config_names_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        plugin.make({**config, "config_dir": "/nonexistent"}, reactor)


@pytest_twisted.ensureDeferred
async def test_path_is_relative_to_config_dir(tmp_path: Path) -> None:
    """``path`` is resolved against the configuration's directory, made if missing."""
    archive = plugin.make({"path": "var/archive.db", "config_dir": str(tmp_path)}, reactor)
    try:
        assert verifyObject(IArchive, archive)
        await archive.add(archived("x"))
    finally:
        await archive.close()
    assert (tmp_path / "var" / "archive.db").is_file()


# -- on disk ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_wal_and_full_sync(archive: SqliteArchive) -> None:
    """The database runs in WAL mode with ``synchronous=FULL``: a commit is on disk."""

    def pragmas(conn: sqlite3.Connection) -> tuple[str, int]:
        return (
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA synchronous").fetchone()[0],
        )

    assert await archive.run(pragmas) == ("wal", 2)


@pytest_twisted.ensureDeferred
async def test_work_runs_off_the_reactor_thread(archive: SqliteArchive) -> None:
    """Writes run on the writer thread, reads on a reader thread; results come back on ours."""
    await archive.add(archived("x"))
    main = threading.get_ident()
    writer = await archive.run(lambda conn: threading.get_ident())
    reader = await archive._read(lambda conn: threading.get_ident())
    assert len({main, writer, reader}) == 3
    assert threading.get_ident() == main


@pytest_twisted.ensureDeferred
async def test_messages_survive_close_and_reopen(db: Path) -> None:
    archive = open_archive(db)
    await archive.add(archived("odd", mailboxes=(ALICE, DAVE), message=ODD_MESSAGE, body="budget"))
    await archive.set_hold(ArchiveScope(mailbox=ALICE), True, "case 17", NOW)
    await archive.close()
    archive = open_archive(db)
    try:
        got = await archive.get("odd")
        assert got.message == ODD_MESSAGE
        assert sorted(got.mailboxes) == sorted((ALICE, DAVE))
        page = await archive.search(
            ArchiveScope(mailbox=DAVE), ArchiveQuery(words=_as_tuple(["budg"]))
        )
        assert [s.id for s in page.items] == ["odd"]
        assert [h["scope"] for h in await archive.holds()] == [f"mailbox {ALICE}"]
    finally:
        await archive.close()


async def rows(archive: SqliteArchive, sql: str) -> list[Any]:
    return await archive.run(lambda conn: conn.execute(sql).fetchall())


@pytest_twisted.ensureDeferred
async def test_same_bytes_are_stored_once(archive: SqliteArchive) -> None:
    """Two ids with the same bytes share one body, which stays until the last goes."""
    body = b"Subject: same\r\n\r\n" + b"the same text\r\n" * 100
    await archive.add(archived("one", NOW - 10, (ALICE,), message=body))
    await archive.add(archived("two", NOW - 10, (DAVE,), message=body))
    assert await rows(archive, "SELECT count(*) FROM bodies") == [(1,)]
    assert await archive.expire("a.example", NOW, 10) == 1
    assert (await archive.get("two")).message == body
    assert await archive.expire("b.example", NOW, 10) == 1
    assert await rows(archive, "SELECT count(*) FROM bodies") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_bodies_are_compressed(archive: SqliteArchive) -> None:
    body = b"Subject: big\r\n\r\n" + b"a very compressible line of text\r\n" * 3000
    await archive.add(archived("big", message=body))
    [(data,)] = await rows(archive, "SELECT data FROM bodies")
    assert len(data) < len(body) // 10
    assert zlib.decompress(data) == body


@pytest_twisted.ensureDeferred
async def test_expired_message_leaves_no_index_entry(archive: SqliteArchive) -> None:
    """What expires is gone from the text index too (nothing left to match)."""
    await archive.add(archived("old", NOW - 10, (BOB,), body="zebra"))
    assert await archive.expire("a.example", NOW, 10) == 1
    assert await rows(archive, "SELECT rowid FROM text_index WHERE text_index MATCH 'zebra'") == []
    assert await rows(archive, "SELECT count(*) FROM messages") == [(0,)]


async def scope_terms(archive: SqliteArchive) -> dict[str, int]:
    """
    The index's scope terms and how many messages each is in, against what
    ``mailboxes`` says they should be: both, as ``{mailbox: count}``.
    """

    def read(conn: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int]]:
        conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.scope_vocab USING fts5vocab (main, text_index, 'col')")
        indexed = dict(conn.execute("SELECT term, doc FROM temp.scope_vocab WHERE col = 'scope'").fetchall())
        wanted = dict(conn.execute("SELECT mailbox, count(*) FROM mailboxes GROUP BY mailbox").fetchall())
        domains = dict(
            conn.execute("SELECT '@' || domain, count(DISTINCT message_id) FROM mailboxes GROUP BY domain").fetchall()
        )
        return indexed, wanted, domains

    indexed, wanted, domains = await archive.run(read)
    assert indexed == {scope_token(m): n for m, n in {**wanted, **domains}.items()}, (
        "the scope terms and the mailboxes disagree"
    )
    return wanted


@pytest_twisted.ensureDeferred
async def test_a_mailboxs_search_asks_fts5_for_its_messages_only(archive: SqliteArchive) -> None:
    """
    A search of one mailbox (or domain) adds its scope term to its
    full-text condition: FTS5 finds the matches in it, not in the archive.
    No word typed can match a scope term, nor can its start.
    """
    await archive.add(archived("a", NOW - 3, (ALICE,), body="see you soon"))
    await archive.add(archived("b", NOW - 2, (BOB,), body="see you soon"))
    await archive.add(archived("ab", NOW - 1, (ALICE, BOB), body="see you later"))
    search = Search.of(ArchiveScope(mailbox=ALICE), ArchiveQuery(phrases=("see you",)))
    await archive._read(search.bind)
    assert search.params["match"].endswith(f' AND {{scope}} : "{scope_token(str(ALICE))}"')
    search = Search.of(ArchiveScope(domain="a.example"), ArchiveQuery(phrases=("see you",)))
    await archive._read(search.bind)
    assert search.params["match"].endswith(f' AND {{scope}} : "{scope_token("@a.example")}"')
    assert await scope_terms(archive) == {str(ALICE): 2, str(BOB): 2}
    page = await archive.search(ArchiveScope(mailbox=ALICE), ArchiveQuery(phrases=("see you",)), None, 10)
    assert [m.id for m in page.items] == ["ab", "a"]
    assert await archive.count(ArchiveScope(mailbox=BOB), ArchiveQuery(phrases=("you soon",))) == 1
    page = await archive.search(ArchiveScope(domain="a.example"), ArchiveQuery(phrases=("see you",)), None, 10)
    assert [m.id for m in page.items] == ["ab", "b", "a"]
    hexdigits = scope_token(str(ALICE))[1:]
    for typed in (hexdigits, hexdigits[:3]):
        assert (await archive.search(ArchiveScope(), ArchiveQuery(words=(typed,)), None, 10)).items == ()


@pytest_twisted.ensureDeferred
async def test_a_typed_scope_mark_matches_no_scope_token(archive: SqliteArchive) -> None:
    """
    Anyone can compute an address's token; typed into the search box, the
    mark and the hash's start would tell a user which of her messages also
    went to bob (a Bcc) or to a domain.  A search drops the mark from what
    was typed, as every archive drops it from words.
    """
    await archive.add(archived("only-alice", NOW - 2, (ALICE,), body="hello"))
    await archive.add(archived("bcc-bob", NOW - 1, (ALICE, BOB), body="hello"))
    await archive.add(archived("bcc-dave", NOW - 0.5, (ALICE, DAVE), body="hello"))
    for typed in (SCOPE_MARK + scope_token(str(BOB))[1:5], scope_token(str(BOB)), scope_token("@b.example")):
        for scope in (ArchiveScope(mailbox=ALICE), ArchiveScope(domain="a.example"), ArchiveScope()):
            query = parse_query(typed)
            assert (await archive.search(scope, query, None, 10)).items == (), (typed, scope)
            assert await archive.count(scope, query) == 0
            assert await archive.count(scope, ArchiveQuery(phrases=(typed,))) == 0
            assert await archive.count(scope, ArchiveQuery(sender=(typed,))) == 0


@pytest_twisted.ensureDeferred
async def test_a_message_added_again_for_another_mailbox_is_found_in_it(archive: SqliteArchive) -> None:
    """The index row is written again with the new mailbox's term (and the old one's delete is exact)."""
    await archive.add(archived("m", NOW - 1, (ALICE,), body="quarterly figures"))
    await archive.add(archived("m", NOW - 1, (BOB,), body="quarterly figures"))
    await archive.add(archived("m", NOW - 1, (BOB,), body="quarterly figures"))  # nothing new: unchanged
    assert await scope_terms(archive) == {str(ALICE): 1, str(BOB): 1}
    for mailbox in (ALICE, BOB):
        page = await archive.search(ArchiveScope(mailbox=mailbox), ArchiveQuery(phrases=("quarterly figures",)), None, 10)
        assert [m.id for m in page.items] == ["m"], mailbox


@pytest_twisted.ensureDeferred
async def test_a_message_kept_for_another_domain_loses_the_expired_mailboxs_term(archive: SqliteArchive) -> None:
    await archive.add(archived("m", NOW - 10, (ALICE, DAVE), body="quarterly figures"))
    await archive.add(archived("n", NOW - 10, (ALICE,), body="quarterly figures"))
    assert await archive.expire("a.example", NOW, 10) == 2
    assert await scope_terms(archive) == {str(DAVE): 1}
    page = await archive.search(ArchiveScope(mailbox=DAVE), ArchiveQuery(words=("quarterly",)), None, 10)
    assert [m.id for m in page.items] == ["m"]
    assert (await archive.search(ArchiveScope(mailbox=ALICE), ArchiveQuery(words=("quarterly",)), None, 10)).items == ()


@pytest_twisted.ensureDeferred
async def test_an_archive_of_schema_4_gains_the_scope_terms(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Opening an archive whose text index has no ``scope`` column writes the
    index again from the messages' kept text, with each one's mailboxes.
    """
    archive = open_archive(db)
    await archive.add(archived("a", NOW - 2, (ALICE, DAVE), subject="Budget", body="see you soon"))
    await archive.add(archived("b", NOW - 1, (BOB,), body="see you later", attachments=("plan.pdf",)))
    await archive.close()
    as_schema_4(db)  # the same index without the scope column

    monkeypatch.setattr(archive_schema, "_REBUILD_BATCH", 1)  # batches, as a large archive has
    archive = open_archive(db)
    try:
        assert await rows(archive, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert await scope_terms(archive) == {str(ALICE): 1, str(DAVE): 1, str(BOB): 1}
        for scope, query, ids in (
            (ArchiveScope(mailbox=ALICE), ArchiveQuery(phrases=("see you",)), ["a"]),
            (ArchiveScope(mailbox=BOB), ArchiveQuery(phrases=("see you",)), ["b"]),
            (ArchiveScope(mailbox=DAVE), ArchiveQuery(subject=("budg",)), ["a"]),
            (ArchiveScope(), ArchiveQuery(words=("plan",)), ["b"]),
            (ArchiveScope(domain="a.example"), ArchiveQuery(words=("see",)), ["b", "a"]),
        ):
            page = await archive.search(scope, query, None, 10)
            assert [m.id for m in page.items] == ids, (scope, query)
        # And it is kept up as before.
        assert await archive.expire("a.example", NOW, 10) == 2
        assert await scope_terms(archive) == {str(DAVE): 1}
    finally:
        await archive.close()


def insert_as_schema_4(conn: sqlite3.Connection, seq: int, sender: str | None, blob: bytes) -> None:
    """A message's text index row as mailhub wrote it before schema 5: five columns, no scope."""
    conn.execute(
        "INSERT INTO text_index (rowid, subject, sender, recipients, body, attachments) VALUES (?, ?, ?, ?, ?, ?)",
        (seq, *index_row(text_of(blob), sender, ())[:5]),
    )


def as_schema_4(db: Path) -> None:
    """Give the archive at ``db`` the text index of schema 4 (no scope column)."""
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE text_index")
    conn.execute(
        "CREATE VIRTUAL TABLE text_index USING fts5 (subject, sender, recipients, body, attachments,"
        " content = '', tokenize = 'unicode61 remove_diacritics 2')"
    )
    for seq, sender, blob in conn.execute("SELECT seq, sender, text FROM messages").fetchall():
        insert_as_schema_4(conn, seq, sender, blob)
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()


@pytest_twisted.ensureDeferred
async def test_an_archive_of_schema_4_at_its_size_limit_still_migrates(db: Path) -> None:
    """
    The old index goes before the new one is written: an archive with no
    room for two indexes migrates (else every call, reads too, would fail
    at every open).
    """
    archive = open_archive(db, max_size_mb=1)
    added = 0
    try:
        while True:
            body = " ".join(f"w{(added * 7919 + i) % 100003}x{i}" for i in range(300))
            try:
                await archive.add(archived(f"m{added}", NOW - 10_000 + added, (ALICE, DAVE), body=body))
            except StoreUnavailable:  # StoreFull: the archive is at its limit
                break
            added += 1
    finally:
        await archive.close()
    assert added > 10
    as_schema_4(db)
    archive = open_archive(db, max_size_mb=1)
    try:
        assert await rows(archive, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert await scope_terms(archive) == {str(ALICE): added, str(DAVE): added}
        assert await archive.count(ArchiveScope(mailbox=DAVE), ArchiveQuery(words=("w0x0",))) == 1
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_a_scope_index_in_a_file_set_back_to_schema_4_is_written_again(db: Path) -> None:
    """
    An older mailhub writing into a file of schema 5 (set back by hand)
    leaves rows without their scope: opening it with this one again writes
    the index again, whatever its columns.
    """
    archive = open_archive(db)
    await archive.add(archived("a", NOW - 2, (ALICE,), body="see you"))
    await archive.close()
    conn = sqlite3.connect(db)
    seq, sender, blob = conn.execute("SELECT seq, sender, text FROM messages").fetchone()
    # What the older code did: the row again, without the scope column.
    conn.execute(INDEX_DELETE, (seq, *index_row(text_of(blob), sender, [str(ALICE)])))
    insert_as_schema_4(conn, seq, sender, blob)
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()
    archive = open_archive(db)
    try:
        assert await scope_terms(archive) == {str(ALICE): 1}
        assert await archive.count(ArchiveScope(mailbox=ALICE), ArchiveQuery(phrases=("see you",))) == 1
    finally:
        await archive.close()


def with_mailboxes_as_given(conn: sqlite3.Connection, archive_id: str, mailboxes: list[str]) -> None:
    """Give a message the mailboxes (and their index row) as mailhub wrote them before schema 6: as given."""
    seq, sender, blob, received_at = conn.execute(
        "SELECT seq, sender, text, received_at FROM messages WHERE id = ?", (archive_id,)
    ).fetchone()
    before = {m for (m,) in conn.execute("SELECT mailbox FROM mailboxes WHERE message_id = ?", (archive_id,))}
    reindex(conn, seq, sender, blob, before, set(mailboxes))
    conn.execute("DELETE FROM mailboxes WHERE message_id = ?", (archive_id,))
    conn.executemany(
        "INSERT INTO mailboxes (message_id, mailbox, domain, received_at, words) VALUES (?, ?, ?, ?, ?)",
        [(archive_id, m, m.rpartition("@")[2], received_at, " ".join(archive_words(m))) for m in mailboxes],
    )


def account_as_given(conn: sqlite3.Connection, local: str, domain: str, session_version: int) -> None:
    """An account row as mailhub wrote it before schema 6: keyed by the address as given."""
    data = json.loads(Account(Address("x", domain), session_version=session_version).to_json())
    data["address"] = [local, domain]
    key = f"{local}@{domain}".encode()
    conn.execute("INSERT INTO accounts (address, domain, data) VALUES (?, ?, ?)", (key, domain.encode(), json.dumps(data)))


@pytest_twisted.ensureDeferred
async def test_an_archive_of_schema_5_folds_its_mailboxes(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Mail archived for ``Alice@a.example`` by an older mailhub is
    ``alice@a.example``'s once the archive is opened: its mailboxes are
    folded (two that fold to one merged), the index rows of those messages
    only are written again with the folded scope tokens, and delivery
    records, holds and accounts (with their read flags and Sent folders)
    follow.
    """
    archive = open_archive(db)
    await archive.add(archived("upper", NOW - 3, (ALICE,), body="budget"))
    await archive.add(archived("both", NOW - 2, (ALICE, BOB, DAVE), body="budget"))
    await archive.add(archived("lower", NOW - 1, (ALICE,), body="budget"))
    await archive.add(archived("other", NOW - 1, (BOB,), body="budget"))
    await archive.close()
    conn = sqlite3.connect(db)
    with_mailboxes_as_given(conn, "upper", ["Alice@a.example"])
    with_mailboxes_as_given(conn, "both", ["Alice@a.example", "alice@a.example", "BOB@a.example", "dave@b.example"])
    conn.executemany(
        "INSERT INTO delivered (mailbox, archive_id, domain, route, at) VALUES (?, ?, 'a.example', ?, ?)",
        [("Alice@a.example", "upper", "smtp:new:25", NOW), ("alice@a.example", "upper", "smtp:old:25", NOW - 5),
         ("ALICE@a.example", "both", "smtp:old:25", NOW - 5)],
    )  # fmt: skip
    conn.execute("INSERT INTO holds VALUES ('mailbox Alice@a.example', 'Alice@a.example', NULL, 'case 17', ?)", (NOW,))
    account_as_given(conn, "Carol", "a.example", 1)
    conn.execute("INSERT INTO read_flags (account, archive_id) VALUES (?, 'upper')", (b"Carol@a.example",))
    conn.execute(
        "INSERT INTO sent (account, id, sent_at, message) VALUES (?, 's1', ?, ?)",
        (b"Carol@a.example", NOW, zlib.compress(b"sent\r\n")),
    )
    # Two accounts that fold to one: the folded one is kept, the other left as it was.
    account_as_given(conn, "Dave", "b.example", 1)
    account_as_given(conn, "dave", "b.example", 2)
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    seqs = dict(conn.execute("SELECT id, seq FROM messages").fetchall())
    conn.close()

    reindexed: list[int] = []

    def counting(conn: sqlite3.Connection, seq: int, *rest: Any) -> None:
        reindexed.append(seq)
        reindex(conn, seq, *rest)

    monkeypatch.setattr(archive_schema, "reindex", counting)
    archive = open_archive(db)
    try:
        assert await rows(archive, "PRAGMA user_version") == [(6,)]
        assert sorted(reindexed) == sorted([seqs["upper"], seqs["both"]])
        for scope in (ArchiveScope(mailbox=Address("alice", "a.example")), ArchiveScope(mailbox=Address("Alice", "a.example"))):
            page = await archive.search(scope, ArchiveQuery(), None, 10)
            assert [(m.id, m.mailboxes) for m in page.items] == [("lower", (ALICE,)), ("both", (ALICE,)), ("upper", (ALICE,))]
            assert await archive.count(scope, ArchiveQuery()) == 3
            assert await archive.count(scope, ArchiveQuery(words=("budget",))) == 3
            page = await archive.search(scope, ArchiveQuery(words=("budg",)), None, 1)
            assert [m.id for m in page.items] == ["lower"] and page.next is not None
        assert await archive.count(ArchiveScope(mailbox=BOB), ArchiveQuery(words=("budget",))) == 2
        assert sorted((await archive.get("both")).mailboxes) == [ALICE, BOB, DAVE]
        assert await scope_terms(archive) == {str(ALICE): 3, str(BOB): 2, str(DAVE): 1}
        await archive.run(
            lambda c: c.execute("INSERT INTO text_index (text_index, rank) VALUES ('integrity-check', 0)")
        )
        assert await rows(archive, "SELECT mailbox, archive_id, route, at FROM delivered ORDER BY archive_id") == [
            (str(ALICE), "both", "smtp:old:25", NOW - 5), (str(ALICE), "upper", "smtp:new:25", NOW),
        ]  # fmt: skip
        assert await archive.delivered([("upper", ALICE), ("both", Address("Alice", "a.example"))]) == {
            ("upper", ALICE), ("both", Address("Alice", "a.example")),
        }  # fmt: skip
        assert [(h["scope"], h["mailbox"]) for h in await archive.holds()] == [(f"mailbox {ALICE}", str(ALICE))]
        # The hold is alice@a.example's: only bob's two go.
        assert await archive.expire("a.example", NOW, 100) == 2
        assert await archive.count(ArchiveScope(mailbox=ALICE), ArchiveQuery()) == 3
        carol = Address("carol", "a.example")
        got = await archive.account(Address("CAROL", "a.example"))
        assert got is not None and got.address == carol and got.session_version == 1
        assert await archive.read_ids(carol, ["upper"]) == {"upper"}
        assert [m.id for m in await archive.sent(carol, None, 10)] == ["s1"]
        assert (await archive.account(Address("Dave", "b.example"))).session_version == 2
        assert await rows(archive, "SELECT address FROM accounts WHERE domain = X'622e6578616d706c65' ORDER BY address") == [
            (b"Dave@b.example",), (b"dave@b.example",),
        ]  # fmt: skip
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_full_database_fails_with_store_full(tmp_path: Path) -> None:
    """Past ``max_size_mb``, ``add`` fails with ``StoreFull``; what is there stays readable."""
    archive = open_archive(tmp_path / "archive.db", max_size_mb=1)
    try:
        await archive.add(archived("small"))
        with pytest.raises(StoreFull):
            for i in range(10):
                await archive.add(archived(f"big{i}", message=os.urandom(300_000)))
        assert (await archive.get("small")) is not None
        await archive.add(archived("small", mailboxes=(ALICE, BOB)))
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_unopenable_database_fails_with_store_unavailable(tmp_path: Path) -> None:
    """A database that cannot be created makes every call fail with ``StoreUnavailable``."""
    (tmp_path / "afile").write_text("not a directory")
    archive = plugin.make({"path": "afile/archive.db", "config_dir": str(tmp_path)}, reactor)
    try:
        with pytest.raises(StoreUnavailable):
            await archive.add(archived("x"))
        with pytest.raises(StoreUnavailable):
            await archive.search(ArchiveScope(), ArchiveQuery())
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_not_a_database_fails_with_store_unavailable(db: Path) -> None:
    junk = b"this is not a database" * 100
    db.write_bytes(junk)
    archive = open_archive(db)
    try:
        with pytest.raises(StoreUnavailable):
            await archive.add(archived("x"))
    finally:
        await archive.close()
    assert db.read_bytes() == junk


@pytest_twisted.ensureDeferred
async def test_newer_schema_is_refused(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    archive = open_archive(db)
    try:
        with pytest.raises(StoreUnavailable, match="newer mailhub"):
            await archive.add(archived("x"))
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_schema_version_is_recorded(archive: SqliteArchive) -> None:
    assert await rows(archive, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


@pytest_twisted.ensureDeferred
async def test_concurrent_adds_share_commits(archive: SqliteArchive) -> None:
    """Adds issued together are committed in fewer transactions than adds."""
    await archive.add(archived("first"))
    before = archive.commits
    await gatherResults([archive.add(archived(f"m{i}", NOW + i)) for i in range(50)])
    assert archive.commits - before < 50
    assert await archive.count(ArchiveScope(), ArchiveQuery()) == 51


@pytest_twisted.ensureDeferred
async def test_bad_cursor_fails_with_value_error(archive: SqliteArchive) -> None:
    with pytest.raises(ValueError):
        await archive.search(ArchiveScope(), ArchiveQuery(), "not a cursor", 10)


@pytest_twisted.ensureDeferred
async def test_closed_archive_fails_with_store_unavailable(db: Path) -> None:
    archive = open_archive(db)
    await archive.close()
    with pytest.raises(StoreUnavailable):
        await archive.add(archived("x"))


# -- accounts ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_accounts_survive_close_and_reopen(db: Path) -> None:
    """Accounts, read flags and the Sent folder are in the file, not in memory."""
    alice = account(ALICE, password_hash="$argon2id$x", role=Role.HUB_ADMIN, mailboxes=[BOB])
    message = SentMessage("s1", ALICE, NOW, ODD_MESSAGE)
    archive = open_archive(db)
    await archive.add_account(alice)
    await archive.set_read(ALICE, ["m1", "m2"], True)
    await archive.add_sent(message)
    await archive.close()
    archive = open_archive(db)
    try:
        assert await archive.account(ALICE) == alice
        assert await archive.read_ids(ALICE, ["m1", "m2", "m3"]) == {"m1", "m2"}
        assert await archive.sent(ALICE, None, 10) == [message]
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_account_writes_are_committed_before_they_fire(archive: SqliteArchive) -> None:
    """Each write of ``IAccountStore`` runs on the writer and fires after its commit."""
    for write in (
        lambda: archive.add_account(account(ALICE)),
        lambda: archive.update_account(account(ALICE, disabled=True)),
        lambda: archive.set_read(ALICE, ["m1"], True),
        lambda: archive.add_sent(SentMessage("s1", ALICE, NOW, b"x")),
    ):
        before = archive.commits
        await write()
        assert archive.commits > before
    # What fired is what another connection to the file sees.
    conn = sqlite3.connect(archive._writer._path)
    try:
        assert conn.execute("SELECT count(*) FROM read_flags").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM sent").fetchone() == (1,)
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_sent_messages_are_compressed(archive: SqliteArchive) -> None:
    body = b"Subject: big\r\n\r\n" + b"a very compressible line of text\r\n" * 3000
    await archive.add_sent(SentMessage("big", ALICE, NOW, body))
    [(data,)] = await rows(archive, "SELECT message FROM sent")
    assert len(data) < len(body) // 10
    assert (await archive.sent_message(ALICE, "big")).message == body


def as_schema(db: Path, version: int, *statements: str) -> None:
    """Make the archive at ``db`` look as an older mailhub left it."""
    conn = sqlite3.connect(db)
    for statement in statements:
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()


@pytest_twisted.ensureDeferred
async def test_archive_of_schema_1_gains_the_account_tables(db: Path) -> None:
    """A file written before the accounts opens, keeps its messages and takes accounts."""
    archive = open_archive(db)
    await archive.add(archived("old", mailboxes=(ALICE,), message=ODD_MESSAGE, body="budget"))
    await archive.close()
    # As schema 1 left it: no accounts' tables, no delivery records, no terms.
    as_schema(
        db, 1, *(f"DROP TABLE {t}" for t in ("accounts", "read_flags", "sent", "delivered", "terms")),
        "DROP INDEX messages_header_id",
    )

    archive = open_archive(db)
    try:
        assert (await archive.get("old")).message == ODD_MESSAGE
        assert await rows(archive, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert SCHEMA_VERSION == 6
        tables = await rows(archive, "SELECT name FROM sqlite_master WHERE type = 'table'")
        assert {"accounts", "read_flags", "sent"} <= {name for (name,) in tables}
        await archive.add_account(account(ALICE))
        await archive.set_read(ALICE, ["old"], True)
        await archive.add_sent(SentMessage("s1", ALICE, NOW, b"sent\r\n"))
        assert await archive.account(ALICE) == account(ALICE)
        assert await archive.read_ids(ALICE, ["old"]) == {"old"}
        assert [m.id for m in await archive.sent(ALICE, None, 10)] == ["s1"]
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_archive_of_schema_2_gains_the_delivery_records(db: Path) -> None:
    """A file written before the delivery records opens, indexes its messages' Message-IDs and takes records."""
    archive = open_archive(db)
    await archive.add(archived("old", mailboxes=(ALICE,), message_id="q1@outside.example"))
    await archive.add_account(account(ALICE))
    await archive.close()
    as_schema(db, 2, "DROP TABLE delivered", "DROP INDEX messages_header_id", "DROP TABLE terms")

    archive = open_archive(db)
    try:
        await archive.record_delivered([("m1", ALICE, "smtp:mail.a.example:25", NOW)])
        assert await rows(archive, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert await archive.account(ALICE) == account(ALICE)
        await archive.add(archived("m1", mailboxes=(ALICE,), message_id="q1@outside.example"))
        assert await archive.delivered([("old", ALICE)]) == {("old", ALICE)}
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_delivered_looks_message_ids_up_in_the_index(archive: SqliteArchive) -> None:
    """The other copies of a Message-ID are found through the partial index, not by a scan of messages."""
    plan = await rows(
        archive,
        "EXPLAIN QUERY PLAN SELECT 1 FROM messages m"
        " JOIN messages o ON o.message_id = m.message_id AND o.message_id <> ''"
        " JOIN delivered d ON d.mailbox = 'a' AND d.archive_id = o.id"
        " WHERE m.id = 'x' AND m.message_id <> ''",
    )
    steps = " | ".join(str(row[-1]) for row in plan)
    assert "messages_header_id" in steps, steps
    assert "SCAN" not in steps, steps


@pytest_twisted.ensureDeferred
async def test_a_batch_of_delivery_records_is_one_job(archive: SqliteArchive) -> None:
    """However many records a batch holds, it costs the writer one savepoint in one commit."""
    await archive.add(archived("first"))
    before = archive.commits
    records = [(f"m{i}", Address(f"user{i}", "a.example"), "smtp:mail.a.example:25", NOW) for i in range(500)]
    await archive.record_delivered(records)
    assert archive.commits - before == 1
    assert await rows(archive, "SELECT count(*) FROM delivered") == [(500,)]


@pytest_twisted.ensureDeferred
async def test_account_reads_run_on_the_reader_thread(archive: SqliteArchive) -> None:
    """``account`` and the other reads do not queue behind the writer's work."""
    await archive.add_account(account(ALICE))
    seen: list[Any] = []
    original = archive._reader.submit

    def submit(job: Any) -> Any:
        seen.append(job)
        return original(job)

    archive._reader.submit = submit  # type: ignore[method-assign]
    await archive.account(ALICE)
    await archive.accounts(None)
    await archive.read_ids(ALICE, ["x"])
    await archive.sent(ALICE, None, 1)
    await archive.sent_message(ALICE, "x")
    assert len(seen) == 5


@pytest_twisted.ensureDeferred
async def test_account_key_keeps_any_character(archive: SqliteArchive) -> None:
    """An address the database's text could not hold (a lone surrogate) is still exact."""
    odd = Address("odd\udcff", "a.example")
    await archive.add_account(account(odd))
    assert await archive.account(odd) == account(odd)
    assert await archive.account(Address("odd\ufffd", "a.example")) is None


# -- full-text searches that walk their scope ----------------------------------


def _walk_corpus(shuffled: bool) -> list[Any]:
    """
    700 messages for ALICE (a fifth also for BOB): ``broad`` in 9 of 10,
    ``half`` in every other, ``rare`` in 1 of 100, ``broadly`` (which a
    search for ``broad`` finds too) in 1 of 7, ``broadcast`` in the subject
    of 1 of 3, an attachment on 1 of 4; added in time order, or
    shuffled (then rowids do not grow with time).
    """
    import random

    messages = []
    for i in range(700):
        words = ["broad"] if i % 10 else []
        words += ["half"] if i % 2 else []
        words += ["rare"] if i % 100 == 7 else []
        words += ["broadly"] if i % 7 == 3 else []
        boxes = (ALICE, BOB) if i % 5 == 0 else (ALICE,)
        subject = "broadcast news" if i % 3 == 0 else "other"
        messages.append(
            archived(
                f"m{i:04d}", NOW + i * 60 + (i % 3), boxes, body=" ".join(words) or "none",
                subject=subject, attachments=("plan.pdf",) if i % 4 == 1 else (),
            )
        )
    if shuffled:
        random.Random(7).shuffle(messages)
    return messages


@pytest.mark.parametrize("few", [0, 5000], ids=["walk-only", "few-from-the-index"])
@pytest.mark.parametrize("shuffled", [False, True], ids=["in-time-order", "shuffled"])
@pytest.mark.parametrize("walk_limit", [20_000, 30], ids=["walk", "early-switch"])
@pytest.mark.parametrize("sparse", [32, 0], ids=["by-range", "row-by-row"])
@pytest.mark.parametrize("expansion", [64, -1], ids=["terms", "fts5-prefix"])
@pytest_twisted.ensureDeferred
async def test_word_search_pages_match_whole_list(
    archive: SqliteArchive,
    monkeypatch: pytest.MonkeyPatch,
    shuffled: bool,
    walk_limit: int,
    few: int,
    sparse: int,
    expansion: int,
) -> None:
    """
    A word search that walks its scope in chunks (broad words), or switches
    to the index's whole list of matches or starts from them (rare ones),
    pages through exactly the matching messages, newest first, and counts
    them exactly: whether each chunk is asked about by its range of rowids
    or row by row, and whether a word's start is asked as the terms the
    archive knows begin with it or as an FTS5 prefix.
    """
    monkeypatch.setattr(archive_search, "_WALK_LIMIT", walk_limit)
    monkeypatch.setattr(archive_search, "_SPARSE_LIMIT", walk_limit)
    monkeypatch.setattr(archive_search, "_FEW", few)
    monkeypatch.setattr(archive_search, "_SPARSE", sparse)
    monkeypatch.setattr(archive_terms, "MAX_EXPANSION", expansion)
    messages = _walk_corpus(shuffled)
    await gatherResults([archive.add(m) for m in messages])
    newest_first = sorted(messages, key=lambda m: (m.received_at, m.id), reverse=True)
    for scope in (
        ArchiveScope(mailbox=ALICE),
        ArchiveScope(mailbox=BOB),
        ArchiveScope(domain="a.example"),
        ArchiveScope(),
    ):
        for word in (
            "broad", "half", "rare", "broad half", "broadly", '"broad half"', "subject:broad",
            "half+attachment",
        ):
            phrase = word.startswith('"')
            field = word.startswith("subject:")
            attached = word.endswith("+attachment")
            bare = word.strip('"').removeprefix("subject:").removesuffix("+attachment")
            wanted = [
                m.id
                for m in newest_first
                if (
                    f" {bare} " in f" {m.text.body} "
                    if phrase
                    else any(s.startswith(bare) for s in m.text.subject.split())
                    if field
                    else all(
                        any(b.startswith(w) for b in (m.text.body + " " + m.text.subject).split())
                        for w in bare.split()
                    )
                )
                and (not attached or m.text.has_attachment)
                and (scope.mailbox is None or scope.mailbox in m.mailboxes)
            ]
            query = (
                ArchiveQuery(phrases=(bare,))
                if phrase
                else ArchiveQuery(subject=(bare,))
                if field
                else ArchiveQuery(words=tuple(bare.split()), has_attachment=attached or None)
            )
            got: list[str] = []
            cursor = None
            while True:
                page = await archive.search(scope, query, cursor, limit=37)
                got += [item.id for item in page.items]
                cursor = page.next
                if cursor is None:
                    break
            assert got == wanted, (scope, word)
            assert await archive.count(scope, query) == len(wanted), (scope, word)


# -- a word's start as the terms the archive knows (schema 4) ---------------------


async def bound(archive: SqliteArchive, query: ArchiveQuery) -> Search:
    """The search of ``query`` over the archive, its full-text condition written as the archive would."""
    search = Search.of(ArchiveScope(), query)

    def bind(conn: sqlite3.Connection) -> Search:
        search.bind(conn)
        return search

    return await archive._read(bind)


async def found(archive: SqliteArchive, query: ArchiveQuery) -> list[str]:
    page = await archive.search(ArchiveScope(mailbox=ALICE), query, None, 100)
    return sorted(item.id for item in page.items)


@pytest_twisted.ensureDeferred
async def test_a_words_start_is_asked_as_the_terms_it_begins(archive: SqliteArchive) -> None:
    """``rep`` becomes ``"rep" OR "reply" OR "report"``: no FTS5 prefix query, whose lists FTS5 merges."""
    await archive.add(archived("a", body="the report is late"))
    await archive.add(archived("b", NOW + 1, body="a reply came", subject="Rep. Smith"))
    await archive.add(archived("c", NOW + 2, body="nothing here"))
    search = await bound(archive, ArchiveQuery(words=("rep",)))
    assert search.params["match"] == '("rep" OR "reply" OR "report")'
    assert not search.merged
    assert await found(archive, ArchiveQuery(words=("rep",))) == ["a", "b"]
    # The last word of a term is its start; the words before it are whole.
    search = await bound(archive, ArchiveQuery(subject=("rep smi",)))
    assert search.params["match"] == '{subject} : ("rep smi" OR "rep smith")'
    assert await found(archive, ArchiveQuery(subject=("rep smi",))) == ["b"]
    # A phrase is exact: nothing to expand.
    assert (await bound(archive, ArchiveQuery(phrases=("the rep",)))).params["match"] == '("the rep")'


@pytest_twisted.ensureDeferred
async def test_a_start_the_archive_only_folded_is_an_fts5_prefix(archive: SqliteArchive) -> None:
    """
    A word that was not ASCII may be FTS5's term in another form than the
    archive's folding (``Straße``): a start it shares is asked as an FTS5
    prefix, and the message is found as before.
    """
    await archive.add(archived("a", body="Straße und Café"))
    await archive.add(archived("b", NOW + 1, body="strange things"))
    search = await bound(archive, ArchiveQuery(words=("stra",)))
    assert search.params["match"] == '("stra" *)'
    assert search.merged
    assert await found(archive, ArchiveQuery(words=("stra",))) == ["a", "b"]
    assert await found(archive, ArchiveQuery(words=("caf",))) == ["a"]
    assert await found(archive, ArchiveQuery(words=("strang",))) == ["b"]


@pytest_twisted.ensureDeferred
async def test_a_start_of_too_many_terms_is_an_fts5_prefix(
    archive: SqliteArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive_terms, "MAX_EXPANSION", 3)
    await archive.add(archived("a", body="dog doge dogma dogs"))
    await archive.add(archived("b", NOW + 1, body="dogwood"))
    search = await bound(archive, ArchiveQuery(words=("dog",)))
    assert search.params["match"] == '("dog" *)'
    assert await found(archive, ArchiveQuery(words=("dog",))) == ["a", "b"]
    assert (await bound(archive, ArchiveQuery(words=("dogm",)))).params["match"] == '("dogm" OR "dogma")'


@pytest_twisted.ensureDeferred
async def test_an_archive_of_schema_3_gains_its_terms(db: Path) -> None:
    """Opening an archive written before the terms reads them from the text index once."""
    archive = open_archive(db)
    await archive.add(archived("a", body="quarterly report"))
    await archive.close()
    as_schema(db, 3, "DROP TABLE terms")

    archive = open_archive(db)
    try:
        assert (await bound(archive, ArchiveQuery(words=("quart",)))).params["match"] == (
            '("quart" OR "quarterly")'
        )
        assert await found(archive, ArchiveQuery(words=("quart",))) == ["a"]
        [(version,)] = await archive._read(lambda c: c.execute("PRAGMA user_version").fetchall())
        assert version == SCHEMA_VERSION
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_the_writers_listeners_hear_of_a_transaction_that_broke(
    archive: SqliteArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails outside any job's savepoint is gone whole: the terms noted in it are forgotten."""
    await archive.add(archived("first"))
    heard: list[bool] = []
    archive._writer.listeners.append(heard.append)

    def broken(batch: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(archive._writer, "_run_transaction", broken)
    with pytest.raises(StoreUnavailable):
        await archive.add(archived("second", body="unheard"))
    assert heard == [False]
    monkeypatch.undo()
    await archive.add(archived("third", body="heard"))
    assert heard == [False, True]


def test_terms_are_written_once_and_again_after_a_rollback() -> None:
    """The writer's notes cost a lookup once per term, and forget what a rollback took back."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE terms (term TEXT PRIMARY KEY, exact INTEGER NOT NULL) WITHOUT ROWID")
    terms = Terms()
    conn.execute("BEGIN")
    terms.note(conn, ["Budget for Q3"])
    conn.execute("COMMIT")
    terms.ended(True)
    before = conn.total_changes
    conn.execute("BEGIN")
    terms.note(conn, ["budget q3 FOR"])
    assert conn.total_changes == before  # all known
    terms.note(conn, ["memo"])
    conn.execute("ROLLBACK")
    terms.ended(False)
    conn.execute("BEGIN")
    terms.note(conn, ["memo"])
    conn.execute("COMMIT")
    terms.ended(True)
    assert conn.execute("SELECT term, exact FROM terms ORDER BY term").fetchall() == [
        ("budget", 1), ("for", 1), ("memo", 1), ("q3", 1)
    ]
    # A term seen folded from a word that was not ASCII is marked so, even if known.
    terms.note(conn, ["Mémo"])
    assert conn.execute("SELECT exact FROM terms WHERE term = 'memo'").fetchone() == (0,)


# -- the writer's terms against FTS5's own -------------------------------------

_ALPHABET = st.sampled_from(
    list("abcXYZ019 -_.'@\t\n") + ["é", "ß", "ﬁ", "İ", "\u0301", "К", "ж", "中", "ǅ", "Å", "ø", "²", "٣"]
)


def _fts5_terms(conn: sqlite3.Connection, text: str) -> set[str]:
    conn.execute("INSERT INTO text_index (text_index) VALUES ('delete-all')")
    conn.execute("INSERT INTO text_index (rowid, body) VALUES (1, ?)", (text,))
    return {term for (term,) in conn.execute("SELECT term FROM temp.vocabulary")}


@pytest.fixture(scope="module")
def fts5() -> Iterator[sqlite3.Connection]:
    """An archive's tables, in memory, and its text index's own terms (``fts5vocab``)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn, ":memory:")
    conn.execute("CREATE VIRTUAL TABLE temp.vocabulary USING fts5vocab (main, text_index, 'row')")
    yield conn
    conn.close()


@settings(max_examples=300, deadline=None)
@given(text=st.text(_ALPHABET, max_size=30))
def test_every_fts5_term_is_noted_or_its_start_asked_as_a_prefix(fts5: Any, text: str) -> None:
    """
    For any text, every term FTS5 makes of it is either noted as exact, or
    shares its ASCII start with a term noted as folded (``exact`` 0), so that
    a search for that start asks FTS5 for the prefix: no start of a word in
    an archived message is ever expanded into terms that miss it.
    """
    fts5.execute("DELETE FROM terms")
    Terms().note(fts5, [text])
    noted = dict(fts5.execute("SELECT term, exact FROM terms"))
    for term in _fts5_terms(fts5, text):
        if noted.get(term) == 1:
            continue
        head = ""
        for c in term:
            if not c.isascii():
                break
            head += c
        if not head:
            continue  # a start that is not ASCII is always asked as a prefix
        for n in range(1, len(head) + 1):
            start = head[:n]
            assert any(
                t.startswith(start) and exact == 0 for t, exact in noted.items()
            ) or (noted.get(term) == 1), (text, term, start, noted)

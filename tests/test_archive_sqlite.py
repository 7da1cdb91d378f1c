"""The ``sqlite`` archive: the contract, and what only a database on disk can show."""

from __future__ import annotations

import os
import sqlite3
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from zope.interface.verify import verifyObject

from mailhub.interfaces import IArchive, IArchivePlugin
from mailhub.model import ArchiveQuery, ArchiveScope, StoreFull, StoreUnavailable
from mailhub.plugin import load_plugin
from mailhub.plugins import sqlite_archive
from mailhub.plugins.sqlite_archive import SqliteArchive, plugin
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


class TestSqliteArchive(ArchiveContract):
    """The contract, over a fresh database file (the module's ``archive`` fixture)."""


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
    conn.execute(f"PRAGMA user_version = {sqlite_archive.SCHEMA_VERSION + 1}")
    conn.close()
    archive = open_archive(db)
    try:
        with pytest.raises(StoreUnavailable, match="newer mailhub"):
            await archive.add(archived("x"))
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_schema_version_is_recorded(archive: SqliteArchive) -> None:
    assert await rows(archive, "PRAGMA user_version") == [(sqlite_archive.SCHEMA_VERSION,)]


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

"""The ``sqlite`` store: the contract, and what only a database on disk can show."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from zope.interface.verify import verifyObject

from mailhub.interfaces import IStorePlugin
from mailhub.model import Action, Address, Lease, LeaseLost, Reply, StoreFull, StoreUnavailable
from mailhub.plugin import load_plugin
from mailhub.plugins.sqlite import bodylog, schema
from mailhub.plugins.sqlite import store as sqlite_store
from mailhub.plugins.sqlite.store import CLAIM_IDS_SQL, CLAIM_SQL, SqliteSpoolStore, plugin
from mailhub.testing.store_contract import (
    NOW,
    ODD_MESSAGE,
    RETRY_AT,
    LeaseReclaimContract,
    NodeRegistryContract,
    RouteCoordinationContract,
    SpoolControlContract,
    SpoolStoreContract,
    attempt_for,
    decision,
    deferred_at_once,
    envelope,
)
from mailhub.testing.store_contract import (
    SUSPENDED as SUSPENDED_REPLY,
)

ROUTE = "smtp:mail.a.example:25"
ALICE = Address("alice", "a.example")
ENVELOPE = envelope(NOW)


class TestSqliteSpoolStore(
    SpoolStoreContract, NodeRegistryContract, RouteCoordinationContract, LeaseReclaimContract,
    SpoolControlContract,
):
    """The contract, over a fresh database file (the module's ``store`` fixture)."""


# -- the plugin ------------------------------------------------------------


def test_plugin_provides_store_plugin() -> None:
    """The entry point object is an ``IStorePlugin`` named ``sqlite``."""
    assert verifyObject(IStorePlugin, plugin)
    assert plugin.name == "sqlite"


def test_plugin_found_by_name() -> None:
    """The core finds the store through its entry point."""
    assert load_plugin("mailhub.stores", "sqlite") is plugin


@pytest.mark.parametrize(
    "config, key",
    [
        ({}, "store.path"),
        ({"path": ""}, "store.path"),
        ({"path": 5}, "store.path"),
        ({"path": "s.db", "busy_timeout": "soon"}, "store.busy_timeout"),
        ({"path": "s.db", "busy_timeout": -1}, "store.busy_timeout"),
    ],
)
def test_bad_config_names_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        plugin.make({**config, "config_dir": "/nonexistent"}, reactor)


# -- on disk ---------------------------------------------------------------


def open_store(path: Path) -> SqliteSpoolStore:
    return plugin.make({"path": path.name, "config_dir": str(path.parent)}, reactor)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "spool.db"


@pytest.fixture
def store(db: Path) -> Iterator[SqliteSpoolStore]:
    store = open_store(db)
    yield store
    pytest_twisted.blockon(store.close())


async def enqueue(
    store: SqliteSpoolStore, message: bytes = b"hello\r\n", node: str = "dallas"
) -> str:
    [entry_id] = await store.enqueue(ENVELOPE, message, {ROUTE: [ALICE]}, node)
    return entry_id


async def table_sizes(store: SqliteSpoolStore) -> tuple[int, int, int]:
    def job(conn: sqlite3.Connection) -> tuple[int, int, int]:
        return tuple(  # type: ignore[return-value]
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("messages", "entries", "attempts")
        )

    return await store.run(job)


@pytest_twisted.ensureDeferred
async def test_path_is_relative_to_config_dir(tmp_path: Path) -> None:
    """``path`` is resolved against the configuration's directory, made if missing."""
    store = plugin.make({"path": "var/spool.db", "config_dir": str(tmp_path)}, reactor)
    try:
        await enqueue(store)
    finally:
        await store.close()
    assert (tmp_path / "var" / "spool.db").is_file()


@pytest_twisted.ensureDeferred
async def test_a_new_spool_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """Every message is in it: 0600 for the database, its WAL and body log, whatever the umask."""
    old = os.umask(0o022)
    try:
        store = plugin.make({"path": "var/spool.db", "config_dir": str(tmp_path)}, reactor)
        try:
            await enqueue(store)
            await enqueue(store, b"x" * (bodylog.LOG_THRESHOLD + 1))  # a body for the log
            var = tmp_path / "var"
            # While it is open: the WAL and shared memory files are there too.
            modes = {p.name: p.stat().st_mode & 0o777 for p in [*var.iterdir(), *(var / "spool.db.bodies").iterdir()]}
        finally:
            await store.close()
    finally:
        os.umask(old)
    assert modes.pop("spool.db.bodies") == 0o700
    assert {"spool.db", "spool.db-wal", "spool.db-shm"} <= set(modes) and len(modes) == 4, modes
    assert set(modes.values()) == {0o600}, modes


@pytest_twisted.ensureDeferred
async def test_wal_and_full_sync(store: SqliteSpoolStore) -> None:
    """The database runs in WAL mode with ``synchronous=FULL``: a commit is on disk."""

    def pragmas(conn: sqlite3.Connection) -> tuple[str, int]:
        return (
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA synchronous").fetchone()[0],
        )

    assert await store.run(pragmas) == ("wal", 2)


@pytest_twisted.ensureDeferred
async def test_database_work_runs_off_the_reactor_thread(store: SqliteSpoolStore) -> None:
    """Jobs run on the store's writer thread; their results come back on the reactor thread."""
    main = threading.get_ident()
    seen = await store.run(lambda conn: threading.get_ident())
    assert seen != main
    assert await store.run(lambda conn: threading.get_ident()) == seen
    assert threading.get_ident() == main


@pytest_twisted.ensureDeferred
async def test_entries_survive_close_and_reopen(db: Path) -> None:
    """What ``enqueue`` acknowledged is there after the store is closed and opened again."""
    first = open_store(db)
    entry_id = await enqueue(first, ODD_MESSAGE)
    await first.close()
    second = open_store(db)
    try:
        entry = await second.get(entry_id)
        assert entry is not None and entry.pending == (ALICE,)
        assert await second.body(entry.message_id) == ODD_MESSAGE
        [lease] = await second.claim("dallas", NOW, 10, 60, 60)
        assert lease.entry == entry
    finally:
        await second.close()


#: ``entries`` as the first release made it, before ``smtputf8``.
_OLD_ENTRIES = """
CREATE TABLE messages (id TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE entries (
    id TEXT PRIMARY KEY, message_id TEXT NOT NULL REFERENCES messages (id),
    route TEXT NOT NULL, sender TEXT, recipients TEXT NOT NULL, created REAL NOT NULL,
    next_attempt REAL NOT NULL, node TEXT, lease_node TEXT, lease_token TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, held INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL, helo TEXT NOT NULL DEFAULT '', client TEXT NOT NULL DEFAULT ''
);
INSERT INTO messages VALUES ('m1', X'6869');
INSERT INTO entries (id, message_id, route, sender, recipients, created, next_attempt, size)
VALUES ('e1', 'm1', 'smtp:mail.a.example:25', 'sender@outside.example',
        '[{"address": "alice@a.example", "state": "pending", "reply": null}]', 1, 1, 2);
"""


@pytest_twisted.ensureDeferred
async def test_spool_file_without_smtputf8_column_still_opens(db: Path) -> None:
    """
    A spool written before ``entries.smtputf8`` existed gets the column when
    opened: its entries read as not SMTPUTF8, and new ones keep the flag.
    """
    old = sqlite3.connect(db)
    old.executescript(_OLD_ENTRIES)
    old.close()
    store = open_store(db)
    try:
        entry = await store.get("e1")
        assert entry is not None and entry.pending == (ALICE,) and entry.smtputf8 is False
        utf8 = envelope(NOW)
        [new_id] = await store.enqueue(
            attrs.evolve(utf8, smtputf8=True), b"x\r\n", {ROUTE: [ALICE]}, "dallas"
        )
        assert (await store.get(new_id)).smtputf8 is True
        # Its messages table gets the body log's columns: old bodies read as
        # before, new large ones go to the log.
        assert await store.body("m1") == b"hi"
        large = b"y" * (bodylog.LOG_THRESHOLD + 1)
        [large_id] = await store.enqueue(ENVELOPE, large, {ROUTE: [ALICE]}, "dallas")
        entry = await store.get(large_id)
        assert entry is not None and await store.body(entry.message_id) == large
        assert (await body_row(store, entry.message_id))[0] == b""
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_lease_in_a_spool_from_before_incarnations_is_taken_back(db: Path) -> None:
    """
    A spool written before ``entries.lease_incarnation`` gets the column when
    opened; a lease its hub held when it died has no incarnation, so the
    node's next start takes it back.
    """
    old = sqlite3.connect(db)
    old.executescript(_OLD_ENTRIES)
    old.execute(
        "UPDATE entries SET lease_node = 'dallas', lease_token = 't1', next_attempt = ?",
        (NOW + 600,),
    )
    old.commit()
    old.close()
    store = open_store(db)
    try:
        assert await store.reclaim("losangeles", "1-la", NOW) == 0
        assert await store.reclaim("dallas", "2-dallas", NOW) == 1
        [lease] = await store.claim("dallas", NOW, 10, 60, 60)
        assert lease.entry.id == "e1" and lease.entry.next_attempt == NOW
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_spool_file_without_route_tables_gets_them(db: Path) -> None:
    """
    A spool written before ``IRouteCoordination`` (no ``route_shares``, no
    ``route_states``) gets both tables when opened, keeps its schema version
    and its entries, and shares and route states work on it.
    """
    first = open_store(db)
    entry_id = await enqueue(first)
    await first.close()
    old = sqlite3.connect(db)
    old.executescript("DROP TABLE route_shares; DROP TABLE route_states;")
    old.close()
    store = open_store(db)
    try:
        assert (await store.get(entry_id)) is not None
        assert await store.route_states() == {}
        assert await store.share(ROUTE, "dallas", 2, 0, 3, NOW, 30.0) == 2
        assert await store.share(ROUTE, "losangeles", 5, 0, 3, NOW, 30.0) == 1
        await store.set_route_state(ROUTE, {"state": "rejecting", "since": NOW})
        assert await store.route_states() == {ROUTE: {"state": "rejecting", "since": NOW}}
        version = await store.run(lambda c: c.execute("PRAGMA user_version").fetchone()[0])
        assert version == schema.SCHEMA_VERSION
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_route_state_and_shares_survive_close_and_reopen(db: Path) -> None:
    """A route state is committed before its ``Deferred`` fires; so is a share."""
    first = open_store(db)
    await first.set_route_state(ROUTE, {"state": "rejecting", "reply": "550 5.1.1 nö"})
    assert await first.share(ROUTE, "dallas", 3, 0, 3, NOW, 30.0) == 3
    await first.close()
    second = open_store(db)
    try:
        assert await second.route_states() == {
            ROUTE: {"state": "rejecting", "reply": "550 5.1.1 nö"}
        }
        assert await second.share(ROUTE, "losangeles", 3, 0, 3, NOW + 1, 30.0) == 0
    finally:
        await second.close()


@pytest_twisted.ensureDeferred
async def test_a_spool_whose_shares_lack_holding_gains_it(db: Path) -> None:
    """A spool written before shares noted what a node holds opens, and its shares count as holding nothing."""
    first = open_store(db)
    assert await first.share(ROUTE, "dallas", 2, 0, 3, NOW, 30.0) == 2
    await first.close()
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE route_shares DROP COLUMN holding")
    conn.commit()
    conn.close()
    second = open_store(db)
    try:
        assert await second.share(ROUTE, "losangeles", 3, 0, 3, NOW + 1, 30.0) == 1
        assert await second.share(ROUTE, "dallas", 2, 2, 3, NOW + 1, 30.0) == 2
    finally:
        await second.close()


@pytest_twisted.ensureDeferred
async def test_a_share_asked_for_nothing_leaves_no_row(store: SqliteSpoolStore) -> None:
    """A node that gives everything back and wants nothing is not kept: an idle route holds no row."""
    count = lambda: store.run(  # noqa: E731
        lambda c: c.execute("SELECT count(*) FROM route_shares").fetchone()[0]
    )
    assert await store.share(ROUTE, "dallas", 2, 0, 3, NOW, 30.0) == 2
    assert await count() == 1
    assert await store.share(ROUTE, "dallas", 0, 0, 3, NOW + 1, 30.0) == 0
    assert await count() == 0


@pytest_twisted.ensureDeferred
async def test_a_state_json_cannot_encode_fails_the_call(store: SqliteSpoolStore) -> None:
    with pytest.raises(TypeError):
        await store.set_route_state(ROUTE, {"state": object()})
    assert await store.route_states() == {}


@pytest_twisted.ensureDeferred
async def test_closed_store_refuses_work(db: Path) -> None:
    """After ``close`` every call fails with ``StoreUnavailable``."""
    store = open_store(db)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await enqueue(store)


# -- group commit ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_group_commit_batches_concurrent_enqueues(store: SqliteSpoolStore) -> None:
    """200 enqueues waiting together share a handful of transactions."""
    await store.counts()  # the database is open and the schema made
    before = store.commits
    results = await gatherResults(
        [Deferred.fromCoroutine(enqueue(store, b"m%d\r\n" % i)) for i in range(200)]
    )
    assert len(set(results)) == 200
    assert store.commits - before < 20
    assert await table_sizes(store) == (200, 200, 0)


@pytest_twisted.ensureDeferred
async def test_failing_job_does_not_poison_its_batch(store: SqliteSpoolStore) -> None:
    """A job that fails rolls back only its own work; the rest of its batch commits."""
    await store.counts()
    started, gate = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> bool:
        started.set()
        return gate.wait(10)

    before = store.commits
    blocker = store.run(block)
    # Hold the writer in its own batch, so that the jobs below queue up into the next.
    assert started.wait(10)

    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO messages (id, body) VALUES ('bad', x'00')")
        raise sqlite3.IntegrityError("this job breaks")

    def bad_python(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO messages (id, body) VALUES ('worse', x'00')")
        raise ZeroDivisionError()

    jobs = [
        Deferred.fromCoroutine(enqueue(store, b"one\r\n")),
        store.run(bad),
        Deferred.fromCoroutine(enqueue(store, b"two\r\n")),
        store.run(bad_python),
        Deferred.fromCoroutine(enqueue(store, b"three\r\n")),
    ]
    gate.set()
    assert await blocker is True
    results = await DeferredList(jobs, consumeErrors=True)
    ok = [success for success, _ in results]
    assert ok == [True, False, True, False, True]
    assert results[1][1].check(StoreUnavailable)
    assert results[3][1].check(ZeroDivisionError)
    # The blocker's batch and one for the five jobs.
    assert store.commits - before == 2
    assert await table_sizes(store) == (3, 3, 0)


async def run_in_one_batch(
    store: SqliteSpoolStore, jobs: list[Callable[[sqlite3.Connection], Any]]
) -> list[tuple[bool, Any]]:
    """
    Run ``jobs`` in one batch of the writer (each job's success and result or
    ``Failure``, in order): the writer is held in a batch of its own while
    they queue up, so that they are taken together.
    """
    return await submitted_in_one_batch(store, [lambda job=job: store.run(job) for job in jobs])


async def submitted_in_one_batch(
    store: SqliteSpoolStore, calls: list[Callable[[], Deferred[Any]]]
) -> list[tuple[bool, Any]]:
    """``run_in_one_batch`` for store calls: each of ``calls`` submits its writer jobs."""
    started, gate = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> bool:
        started.set()
        return gate.wait(10)

    blocker = store.run(block)
    assert started.wait(10)
    submitted = [call() for call in calls]
    gate.set()
    assert await blocker is True
    return await DeferredList(submitted, consumeErrors=True)


def insert_message(name: str, result: Any = None) -> Callable[[sqlite3.Connection], Any]:
    def job(conn: sqlite3.Connection) -> Any:
        conn.execute("INSERT INTO messages (id, body) VALUES (?, x'00')", (name,))
        return result

    return job


async def message_ids(store: SqliteSpoolStore) -> set[str]:
    return set(
        await store.run(lambda conn: [row[0] for row in conn.execute("SELECT id FROM messages")])
    )


@pytest_twisted.ensureDeferred
async def test_batch_of_jobs_runs_each_once_in_one_transaction_without_savepoints(
    store: SqliteSpoolStore,
) -> None:
    """
    A batch whose jobs all succeed costs one commit: each job runs once, one
    after the other, with no savepoint statement between them.
    """
    await store.counts()
    statements: list[str] = []
    runs: list[int] = []

    def job(i: int) -> Callable[[sqlite3.Connection], int]:
        def run(conn: sqlite3.Connection) -> int:
            if i == 0:
                conn.set_trace_callback(statements.append)
            runs.append(i)
            insert_message(f"m{i}")(conn)
            if i == 4:
                conn.set_trace_callback(None)
            return i * 10

        return run

    before = store.commits
    results = await run_in_one_batch(store, [job(i) for i in range(5)])
    assert results == [(True, i * 10) for i in range(5)]
    # The holding batch, and one for the five.
    assert store.commits - before == 2
    assert runs == [0, 1, 2, 3, 4]
    assert len([s for s in statements if s.startswith("INSERT")]) == 5
    assert not [s for s in statements if "SAVEPOINT" in s.upper() or "RELEASE" in s.upper()]
    assert await message_ids(store) == {f"m{i}" for i in range(5)}


@pytest.mark.parametrize("position", [0, 1, 2], ids=["first", "middle", "last"])
@pytest_twisted.ensureDeferred
async def test_failing_job_fails_alone_and_its_write_is_undone(
    store: SqliteSpoolStore, position: int
) -> None:
    """
    In a batch of several jobs, one that writes and then raises fails with its
    own exception and leaves nothing behind; the others' writes are committed
    (once each) and their Deferreds fire with their results, in one commit.
    """
    await store.counts()

    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO messages (id, body) VALUES ('bad', x'00')")
        raise ValueError("this job breaks")

    jobs: list[Callable[[sqlite3.Connection], Any]] = [
        insert_message("g1", "one"),
        insert_message("g2", "two"),
    ]
    jobs.insert(position, bad)
    before = store.commits
    results = await run_in_one_batch(store, jobs)
    assert store.commits - before == 2
    failure = results.pop(position)
    assert failure[0] is False
    assert failure[1].check(ValueError) and failure[1].getErrorMessage() == "this job breaks"
    assert results == [(True, "one"), (True, "two")]
    assert await message_ids(store) == {"g1", "g2"}
    # The writer goes on as before.
    await enqueue(store)
    assert await table_sizes(store) == (3, 1, 0)


# -- enqueue_leased in a batch: one INSERT per table ------------------------


def leased_call(
    store: SqliteSpoolStore,
    message: bytes,
    routes: dict[str, list[Address]],
    decided: dict[str, Any] | None = None,
) -> Callable[[], Deferred[Any]]:
    return lambda: store.enqueue_leased(ENVELOPE, message, routes, "dallas", 300, decided)


def tracing(statements: list[str], on: bool) -> Callable[[sqlite3.Connection], None]:
    def job(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(statements.append if on else None)

    return job


@pytest_twisted.ensureDeferred
async def test_enqueue_leased_together_is_one_insert_per_table(store: SqliteSpoolStore) -> None:
    """
    Messages arriving together are stored by one multi-row INSERT per table
    (messages, entries, decided attempts), in the batch's one transaction;
    every message, entry and attempt is there, as each call said.
    """
    await store.counts()
    statements: list[str] = []
    other = "smtp:mail.b.example:25"
    bob = Address("bob", "b.example")
    attempt, retry = deferred_at_once([bob])
    calls = [lambda: store.run(tracing(statements, True))]
    for i in range(6):
        decided = {other: (attempt, retry)} if i % 2 else None
        calls.append(
            leased_call(store, b"message %d\r\n" % i, {ROUTE: [ALICE], other: [bob]}, decided)
        )
    calls.append(lambda: store.run(tracing(statements, False)))
    before = store.commits
    results = await submitted_in_one_batch(store, calls)
    assert all(ok for ok, _ in results), results
    assert store.commits - before == 2  # the holding batch, and one for the rest
    inserts = [s.split(" (")[0] for s in statements if s.startswith("INSERT")]
    assert inserts == ["INSERT INTO messages", "INSERT INTO entries", "INSERT INTO attempts"]
    assert not [s for s in statements if "SAVEPOINT" in s.upper()]
    stored = [value for _, value in results[1:-1]]
    assert await table_sizes(store) == (6, 12, 3)
    for i, (first, second) in enumerate(stored):
        assert isinstance(first, Lease) and first.entry.route == ROUTE
        assert await store.body(first.entry.message_id) == b"message %d\r\n" % i
        again = await store.get(first.entry.id)
        assert again is not None and again.recipients == first.entry.recipients
        if i % 2:
            # Decided while down: stored as that attempt left it, with the attempt.
            assert not isinstance(second, Lease)
            assert second.next_attempt == RETRY_AT
            assert [a.replies for a in await store.attempts(second.id)] == [attempt.replies]
        else:
            assert isinstance(second, Lease) and second.entry.route == other
            assert await store.attempts(second.entry.id) == []


@pytest_twisted.ensureDeferred
async def test_merged_inserts_keep_their_place_among_other_jobs(store: SqliteSpoolStore) -> None:
    """A job between two enqueues sees the first one's rows and not the second's."""
    await store.counts()

    def count(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])

    results = await submitted_in_one_batch(
        store,
        [
            leased_call(store, b"one\r\n", {ROUTE: [ALICE]}),
            leased_call(store, b"two\r\n", {ROUTE: [ALICE]}),
            lambda: store.run(count),
            leased_call(store, b"three\r\n", {ROUTE: [ALICE]}),
            lambda: store.run(count),
        ],
    )
    assert [ok for ok, _ in results] == [True] * 5
    assert results[2][1] == 2
    assert results[4][1] == 3


@pytest_twisted.ensureDeferred
async def test_many_rows_span_several_insert_statements(store: SqliteSpoolStore) -> None:
    """
    More rows than one statement's parameters allow (SQLite's limit before
    3.32, set here on the writer's connection): split over several
    statements, all stored, without falling back to one job at a time.
    """
    await store.counts()
    statements: list[str] = []

    def limit(conn: sqlite3.Connection) -> None:
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        conn.set_trace_callback(statements.append)

    routes = {f"smtp:mx{i}.example:25": [ALICE] for i in range(100)}
    results = await submitted_in_one_batch(
        store,
        [lambda: store.run(limit)]
        + [leased_call(store, b"m%d\r\n" % i, routes) for i in range(4)]
        + [lambda: store.run(tracing(statements, False))],
    )
    assert [ok for ok, _ in results] == [True] * 6
    assert await table_sizes(store) == (4, 400, 0)
    for _, leases in results[1:-1]:
        assert [lease.entry.route for lease in leases] == list(routes)
    entries = [s for s in statements if s.startswith("INSERT INTO entries")]
    assert len(entries) == 7  # 400 rows of 16 parameters, 62 rows a statement
    assert not [s for s in statements if "SAVEPOINT" in s.upper()]


@pytest_twisted.ensureDeferred
async def test_a_failing_merged_insert_fails_only_its_own_job(
    store: SqliteSpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Two messages given the same id: the merged INSERT fails, the batch runs
    again job by job, and only the second of the two fails; the others are
    stored.
    """
    await store.counts()
    ids = iter(["m1", "t1", "e1", "m2", "t2", "e2", "m1", "t3", "e3", "m4", "t4", "e4"])
    monkeypatch.setattr(store, "_new_id", lambda: next(ids))
    results = await submitted_in_one_batch(
        store, [leased_call(store, b"m%d\r\n" % i, {ROUTE: [ALICE]}) for i in range(4)]
    )
    assert [ok for ok, _ in results] == [True, True, False, True]
    assert results[2][1].check(StoreUnavailable)
    assert await message_ids(store) == {"m1", "m2", "m4"}
    assert await store.body("m1") == b"m0\r\n"
    assert await table_sizes(store) == (3, 3, 0)


# -- record of a finished entry in a batch: a few DELETEs for all -----------

DELIVERED = Reply(250, "2.0.0", "OK")


def finish(store: SqliteSpoolStore, lease: Lease) -> Callable[[], Deferred[Any]]:
    """``record`` of an attempt that delivered every recipient of ``lease``."""
    replies = dict.fromkeys(lease.entry.pending, DELIVERED)
    done = decision({a: (Action.DELIVERED, DELIVERED) for a in lease.entry.pending})
    return lambda: store.record(lease, attempt_for(lease, replies), done)


async def leased(store: SqliteSpoolStore, count: int, routes: int = 1) -> list[Lease]:
    """``count`` messages, each with an entry for each of ``routes`` routes, leased to dallas."""
    leases: list[Lease] = []
    for i in range(count):
        message_routes = {f"smtp:mx{r}.example:25": [ALICE] for r in range(routes)}
        got = await store.enqueue_leased(ENVELOPE, b"m%d\r\n" % i, message_routes, "dallas", 300)
        leases.extend(got)
    return leases


@pytest_twisted.ensureDeferred
async def test_finished_entries_together_are_one_delete_per_table(store: SqliteSpoolStore) -> None:
    """
    Entries finished together go in one DELETE per table, in the batch's one
    transaction: the entries, the attempts of those tried before, and each
    message no entry uses any more (one whose other entry stays, stays).
    """
    await store.counts()
    # Three messages of two entries each; a fourth with an attempt on record.
    leases = await leased(store, 3, routes=2)
    [earlier] = await store.enqueue_leased(ENVELOPE, b"tried\r\n", {ROUTE: [ALICE]}, "dallas", 300)
    retry = decision({ALICE: (Action.RETRY, SUSPENDED_REPLY)}, NOW + 60, "dallas")
    await store.record(earlier, attempt_for(earlier, {ALICE: SUSPENDED_REPLY}), retry)
    [tried] = await store.claim("dallas", NOW + 120, 10, 300, 600)
    assert tried.entry.attempts == 1
    # Both entries of message 0, the first of messages 1 and 2, and the tried one.
    finished = [leases[0], leases[1], leases[2], leases[4], tried]
    statements: list[str] = []
    before = store.commits
    results = await submitted_in_one_batch(
        store,
        [lambda: store.run(tracing(statements, True))]
        + [finish(store, lease) for lease in finished]
        + [lambda: store.run(tracing(statements, False))],
    )
    assert results == [(True, None)] * 7
    assert store.commits - before == 2
    deletes = [s.split(" WHERE")[0] for s in statements if s.startswith("DELETE")]
    assert deletes == ["DELETE FROM entries", "DELETE FROM attempts", "DELETE FROM messages"]
    assert not [s for s in statements if "SAVEPOINT" in s.upper()]
    remaining = {lease.entry.id for lease in leases} - {lease.entry.id for lease in finished}
    assert {e.id for e in await store.entries(None, 0, 100)} == remaining
    assert await store.attempts(tried.entry.id) == []
    assert await message_ids(store) == {leases[3].entry.message_id, leases[5].entry.message_id}


@pytest_twisted.ensureDeferred
async def test_a_lost_lease_in_a_batch_of_removals_fails_alone(store: SqliteSpoolStore) -> None:
    """
    One entry of the batch was taken over (its lease token is another's): its
    record fails with ``LeaseLost`` and the entry stays; the others go.
    """
    await store.counts()
    leases = await leased(store, 4)

    def take_over(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE entries SET lease_token = ?, lease_node = 'losangeles' WHERE id = ?",
            # Another batch's token, so that a token check across the batch
            # (not row by row) would take the row.
            (leases[0].token, leases[2].entry.id),
        )

    await store.run(take_over)
    results = await submitted_in_one_batch(store, [finish(store, lease) for lease in leases])
    assert [ok for ok, _ in results] == [True, True, False, True]
    assert results[2][1].check(LeaseLost)
    assert [e.id for e in await store.entries(None, 0, 100)] == [leases[2].entry.id]
    assert await message_ids(store) == {leases[2].entry.message_id}


@pytest_twisted.ensureDeferred
async def test_many_removals_span_several_statements(store: SqliteSpoolStore) -> None:
    """More removals than one statement's parameters allow: split, all done, no fallback."""
    await store.counts()
    leases = await leased(store, 400)
    statements: list[str] = []

    def limit(conn: sqlite3.Connection) -> None:
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        conn.set_trace_callback(statements.append)

    results = await submitted_in_one_batch(
        store,
        [lambda: store.run(limit)]
        + [finish(store, lease) for lease in leases]
        + [lambda: store.run(tracing(statements, False))],
    )
    assert all(ok for ok, _ in results)
    assert await table_sizes(store) == (0, 0, 0)
    assert len([s for s in statements if s.startswith("DELETE FROM entries")]) == 2
    assert not [s for s in statements if "SAVEPOINT" in s.upper()]


# -- reads beside the writer ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reads_run_beside_a_busy_writer(store: SqliteSpoolStore) -> None:
    """
    Reads run on their own thread (not the reactor's, not the writer's) and
    answer while the writer is held inside its transaction.
    """
    entry_id = await enqueue(store, b"body\r\n")
    entry = await store.get(entry_id)
    assert entry is not None
    started, gate = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> int:
        started.set()
        gate.wait(10)
        return threading.get_ident()

    blocker = store.run(block)
    try:
        assert started.wait(10)
        assert (await store.get(entry_id)) == entry
        assert await store.body(entry.message_id) == b"body\r\n"
        assert (await store.counts())["entries"] == 1
        assert [e.id for e in await store.entries()] == [entry_id]
        assert await store.next_due("dallas", NOW) == NOW
        assert await store.attempts(entry_id) == []
        assert [n["name"] for n in await store.nodes(NOW)] == ["dallas"]
        reader = await store._read(lambda conn: threading.get_ident())
    finally:
        gate.set()
    writer = await blocker
    assert len({reader, writer, threading.get_ident()}) == 3


@pytest_twisted.ensureDeferred
async def test_reads_do_not_commit(store: SqliteSpoolStore) -> None:
    """Reads add no transaction to the writer's count, and their connection cannot write."""
    entry_id = await enqueue(store)
    before = store.commits
    await gatherResults([store.get(entry_id) for _ in range(20)] + [store.counts()])
    assert store.commits == before
    with pytest.raises(StoreUnavailable):
        await store._read(lambda conn: conn.execute("DELETE FROM entries"))
    assert await store.get(entry_id) is not None


@pytest_twisted.ensureDeferred
async def test_read_after_a_write_fired_sees_it(store: SqliteSpoolStore) -> None:
    """Once a write's ``Deferred`` has fired, a read issued next sees the write."""
    alice = Reply(250, "2.0.0", "ok")
    for i in range(30):
        message = b"m%d\r\n" % i
        entry_id = await enqueue(store, message)
        entry = await store.get(entry_id)
        assert entry is not None
        assert await store.body(entry.message_id) == message
        assert await store.hold(entry_id) is True
        assert (await store.get(entry_id)).held is True  # type: ignore[union-attr]
        assert await store.release_held(entry_id, NOW) is True
        [lease] = await store.claim("dallas", NOW, 1, 60, 60, ids=[entry_id])
        assert (await store.get(entry_id)).next_attempt == lease.expires  # type: ignore[union-attr]
        done = decision({ALICE: (Action.DELIVERED, alice)})
        assert await store.record(lease, attempt_for(lease, {ALICE: alice}), done) is None
        assert await store.get(entry_id) is None
        with pytest.raises(KeyError):
            await store.body(entry.message_id)


class HeldReader:
    """
    The store's reader held inside a batch of its own, in a read transaction
    that began before ``hold`` returned: reads submitted meanwhile queue up
    and are taken together as the next batch once ``let_go`` is awaited.
    """

    def __init__(self, store: SqliteSpoolStore, trace: list[str] | None = None) -> None:
        self._started, self._gate = threading.Event(), threading.Event()
        self._trace = trace

        def block(conn: sqlite3.Connection) -> bool:
            # A snapshot taken now, before the writes the test makes next.
            conn.execute("SELECT count(*) FROM messages").fetchone()
            self._started.set()
            released = self._gate.wait(10)
            if self._trace is not None:
                conn.set_trace_callback(self._trace.append)
            return released

        self._blocker = store._read(block)
        assert self._started.wait(10)

    async def let_go(self) -> None:
        self._gate.set()
        assert await self._blocker is True


async def message_id_of(store: SqliteSpoolStore, entry_id: str) -> str:
    """The entry's message id, asked of the writer (the reader may be held)."""
    row = await store.run(
        lambda conn: conn.execute(
            "SELECT message_id FROM entries WHERE id = ?", (entry_id,)
        ).fetchone()
    )
    return str(row[0])


@pytest_twisted.ensureDeferred
async def test_reads_submitted_together_share_one_read_transaction(store: SqliteSpoolStore) -> None:
    """
    Reads submitted in one reactor turn run as one batch in one read
    transaction (one ``BEGIN`` for them all), and every one of them sees
    what was committed before it was submitted, even though the reader's
    previous batch began before those commits.
    """
    await store.counts()
    statements: list[str] = []
    held = HeldReader(store, statements)
    bodies = [b"m%d\r\n" % i for i in range(5)]
    ids = [await enqueue(store, body) for body in bodies]
    message_ids = [await message_id_of(store, entry_id) for entry_id in ids]
    reads = (
        [store.body(m) for m in message_ids]
        + [store.get(entry_id) for entry_id in ids]
        + [store.counts(), store.attempts(ids[0])]
    )
    untraced = store._read(lambda conn: conn.set_trace_callback(None))
    await held.let_go()
    results = await gatherResults(reads)
    await untraced
    assert results[:5] == bodies
    assert [e.id for e in results[5:10]] == ids
    assert results[10]["entries"] == 5 and results[11] == []
    # The held batch's COMMIT, then the batch of reads in one transaction.
    words = [s.split()[0].upper() for s in statements]
    assert words[0] == "COMMIT"
    assert words[1] == "BEGIN" and words.count("BEGIN") == 1 and "COMMIT" not in words[1:]
    assert len(words) - 2 >= len(reads)


@pytest_twisted.ensureDeferred
async def test_failing_read_fails_alone_in_its_batch(store: SqliteSpoolStore) -> None:
    """
    In one batch of reads, a job whose statement fails (``sqlite3.Error``)
    fails alone with ``StoreUnavailable``, as does a read failing with its
    own error (a body that is gone: ``KeyError``); the reads after each
    still run and see the data, and the reader goes on.
    """
    first, second = await enqueue(store, b"one\r\n"), await enqueue(store, b"two\r\n")
    m1, m2 = await message_id_of(store, first), await message_id_of(store, second)
    held = HeldReader(store)
    reads = [
        store.body(m1),
        store._read(lambda conn: conn.execute("SELECT nonsense FROM nowhere").fetchall()),
        store.body(m2),
        store.body("nosuchmessage"),
        store.get(second),
    ]
    await held.let_go()
    results = await DeferredList(reads, consumeErrors=True)
    assert [ok for ok, _ in results] == [True, False, True, False, True]
    assert results[0][1] == b"one\r\n" and results[2][1] == b"two\r\n"
    assert results[1][1].check(StoreUnavailable) and "nowhere" in results[1][1].getErrorMessage()
    assert results[3][1].check(KeyError)
    assert results[4][1].id == second
    assert await store.body(m1) == b"one\r\n"


# -- ids, claims, pages ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ids_unique_across_stores_on_one_file(db: Path) -> None:
    """Two stores on one file (as two processes would) never make the same id."""
    a, b = open_store(db), open_store(db)
    try:
        routes = {f"smtp:r{i}": [ALICE] for i in range(3)}
        made = await gatherResults(
            [s.enqueue(ENVELOPE, b"x\r\n", routes, "dallas") for s in (a, b) for _ in range(50)]
        )
        [lease] = await a.claim("dallas", NOW, 1, 60, 60)
        [other] = await b.claim("dallas", NOW, 1, 60, 60)

        def message_ids(conn: sqlite3.Connection) -> list[str]:
            return [row[0] for row in conn.execute("SELECT id FROM messages")]

        messages = await a.run(message_ids)
    finally:
        await a.close()
        await b.close()
    entry_ids = [i for ids in made for i in ids]
    assert len(set(entry_ids)) == len(entry_ids) == 300
    assert len(messages) == 100
    assert not set(messages) & set(entry_ids)
    assert lease.token != other.token


@pytest_twisted.ensureDeferred
async def test_claim_leases_its_rows_in_one_update(store: SqliteSpoolStore) -> None:
    """However many rows a claim takes, it writes them with one UPDATE statement."""
    ids = await store.enqueue(ENVELOPE, b"x\r\n", {f"smtp:r{i}": [ALICE] for i in range(40)}, "x")
    statements: list[str] = []
    await store.run(lambda conn: conn.set_trace_callback(statements.append))
    try:
        leases = await store.claim("dallas", NOW + 3600, 100, 60, 60)
    finally:
        await store.run(lambda conn: conn.set_trace_callback(None))
    assert sorted(lease.entry.id for lease in leases) == sorted(ids)
    assert len([s for s in statements if s.lstrip().upper().startswith("UPDATE")]) == 1
    # Every row carries the lease: none can be claimed again, each can be recorded.
    assert await store.claim("losangeles", NOW + 3600, 100, 60, 60) == []
    reply = Reply(250, "2.0.0", "ok")
    done = decision({ALICE: (Action.DELIVERED, reply)})
    for lease in leases:
        assert await store.record(lease, attempt_for(lease, {ALICE: reply}), done) is None
    assert await table_sizes(store) == (0, 0, 0)


@pytest_twisted.ensureDeferred
async def test_claim_of_many_rows_spans_update_chunks(store: SqliteSpoolStore) -> None:
    """A claim of more rows than one UPDATE takes still leases each exactly once."""
    n = sqlite_store._CLAIM_UPDATE_CHUNK + 7
    ids = await store.enqueue(ENVELOPE, b"x\r\n", {f"smtp:r{i}": [ALICE] for i in range(n)}, "x")
    leases = await store.claim("dallas", NOW + 3600, n + 10, 60, 60)
    assert sorted(lease.entry.id for lease in leases) == sorted(ids)

    def leased(conn: sqlite3.Connection) -> int:
        return conn.execute(
            "SELECT count(*) FROM entries WHERE lease_token = ?", (leases[0].token,)
        ).fetchone()[0]

    assert await store.run(leased) == n


def _page_size(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA page_size").fetchone()[0]


@pytest_twisted.ensureDeferred
async def test_new_spool_file_gets_the_page_size(store: SqliteSpoolStore) -> None:
    """A new spool file is made with ``PAGE_SIZE`` pages, still in WAL mode."""
    await enqueue(store)
    assert await store.run(_page_size) == schema.PAGE_SIZE


@pytest_twisted.ensureDeferred
async def test_existing_spool_file_keeps_its_page_size(db: Path) -> None:
    """A spool file made with other pages opens as it is, and works."""
    old = sqlite3.connect(db)
    old.execute("PRAGMA page_size=4096")
    old.executescript(_OLD_ENTRIES)
    old.close()
    store = open_store(db)
    try:
        entry_id = await enqueue(store, b"y" * 100_000)
        entry = await store.get(entry_id)
        assert entry is not None and await store.body(entry.message_id) == b"y" * 100_000
        assert await store.run(_page_size) == 4096
    finally:
        await store.close()


# -- indexes ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_claim_query_uses_due_index(store: SqliteSpoolStore) -> None:
    """Claiming walks the (held, next_attempt) index and never scans the spool."""
    for _ in range(50):
        await enqueue(store)
    params = {"now": NOW, "node": "dallas", "takeover": 60.0, "limit": 10, "id0": "x"}

    def plan(sql: str) -> Callable[[sqlite3.Connection], str]:
        def job(conn: sqlite3.Connection) -> str:
            conn.execute("ANALYZE")
            rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
            return "\n".join(row[-1] for row in rows)

        return job

    due = await store.run(plan(CLAIM_SQL))
    assert "USING INDEX entries_due (held=? AND next_attempt<?)" in due
    assert "SCAN" not in due and "TEMP B-TREE" not in due
    by_id = await store.run(plan(CLAIM_IDS_SQL.format(ids=":id0")))
    assert "SEARCH entries USING INDEX sqlite_autoindex_entries_1 (id=?)" in by_id
    assert "SCAN" not in by_id


# -- sharing one file --------------------------------------------------------


async def drain(store: SqliteSpoolStore, node: str, limit: int) -> list[str]:
    """
    Claim until nothing is left; the ids leased, in order.  A short pause between
    claims lets the other claimant in (SQLite's locks are not fair), so the two
    really do claim side by side.
    """
    got: list[str] = []
    while True:
        leases = await store.claim(node, NOW + 3600, limit, 3600, 60)
        if not leases:
            return got
        got += [lease.entry.id for lease in leases]
        await deferLater(reactor, 0.001)


@pytest_twisted.ensureDeferred
async def test_two_stores_on_one_file_never_lease_the_same_entry(db: Path) -> None:
    """Two nodes in one process over one file share out the spool without overlap."""
    a, b = open_store(db), open_store(db)
    try:
        ids = set(
            await a.enqueue(ENVELOPE, b"x\r\n", {f"smtp:r{i}": [ALICE] for i in range(300)}, "x")
        )
        got_a, got_b = await gatherResults(
            [
                Deferred.fromCoroutine(drain(a, "dallas", 7)),
                Deferred.fromCoroutine(drain(b, "losangeles", 7)),
            ]
        )
    finally:
        await a.close()
        await b.close()
    assert len(got_a) == len(set(got_a)) and len(got_b) == len(set(got_b))
    assert not set(got_a) & set(got_b)
    assert set(got_a) | set(got_b) == ids
    assert got_a and got_b


@pytest_twisted.ensureDeferred
async def test_restarted_node_takes_back_the_dead_process_leases(db: Path) -> None:
    """
    Dallas's process dies holding leases (the first store, never used
    again); its next process (a second store on the file) takes them back
    at once and only them: Los Angeles, in a third, keeps its lease.
    """
    dead, losangeles = open_store(db), open_store(db)
    restarted = None
    try:
        await dead.reclaim("dallas", "1-dead", NOW)
        await losangeles.reclaim("losangeles", "2-la", NOW)
        for node in ("dallas", "dallas", "losangeles"):
            await enqueue(dead, node=node)
        held = await dead.claim("dallas", NOW, 10, 60, 60)
        [theirs] = await losangeles.claim("losangeles", NOW, 10, 60, 60)
        [accepted] = await dead.enqueue_leased(ENVELOPE, b"x\r\n", {ROUTE: [ALICE]}, "dallas", 60)
        restarted = open_store(db)
        assert await restarted.reclaim("dallas", "3-restarted", NOW + 5) == 3
        again = await restarted.claim("dallas", NOW + 5, 10, 60, 60)
        assert {a.entry.id for a in again} == {a.entry.id for a in [*held, accepted]}
        assert await restarted.reclaim("dallas", "3-restarted", NOW + 6) == 0
        with pytest.raises(LeaseLost):
            await finish(dead, held[0])()
        assert await finish(losangeles, theirs)() is None
        for lease in again:
            assert await finish(restarted, lease)() is None
        assert await table_sizes(restarted) == (0, 0, 0)
    finally:
        for store in (dead, losangeles, restarted):
            if store is not None:
                await store.close()


@pytest_twisted.ensureDeferred
async def test_two_stores_on_one_file_never_share_out_more_than_the_limit(db: Path) -> None:
    """
    Nodes on two stores over one file, asking all at once and each holding
    all it was given (or, given less, still holding its last share as they
    ask), never hold more than the route's limit together.
    """
    a, b = open_store(db), open_store(db)
    limit = 5
    held = {f"n{i}": 0 for i in range(6)}
    given = dict(held)
    try:
        for step in range(20):
            asked = [
                (a if i % 2 else b).share(ROUTE, name, 4, held[name], limit, NOW + step, 3600.0)
                for i, name in enumerate(sorted(held))
            ]
            for name, share in zip(sorted(held), await gatherResults(asked), strict=True):
                given[name] = share
            assert sum(max(given[n], held[n]) for n in held) <= limit
            held = dict(given)  # attempts above a share end; up to it, connections open
            assert sum(held.values()) <= limit
    finally:
        await a.close()
        await b.close()
    assert sum(given.values()) == limit


CHILD = """
import json, os, sys
from twisted.internet import defer, task
from mailhub.plugins.sqlite import plugin


async def main(reactor, path, ready, go, now):
    store = plugin.make({"path": path, "config_dir": "/"}, reactor)
    await store.counts()
    open(ready, "w").close()
    while not os.path.exists(go):
        await task.deferLater(reactor, 0.005)
    got = []
    while True:
        leases = await store.claim("losangeles", float(now), 1, 3600, 60)
        if not leases:
            break
        got += [lease.entry.id for lease in leases]
        await task.deferLater(reactor, 0.001)
    await store.close()
    print(json.dumps(got))


task.react(lambda reactor, *args: defer.ensureDeferred(main(reactor, *args)), sys.argv[1:])
"""


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_two_processes_on_one_file_never_lease_the_same_entry(
    db: Path, store: SqliteSpoolStore, tmp_path: Path
) -> None:
    """A node in another process claims from the same file: no entry is leased twice."""
    ids = set(
        await store.enqueue(ENVELOPE, b"x\r\n", {f"smtp:r{i}": [ALICE] for i in range(400)}, "x")
    )
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ready, go = tmp_path / "ready", tmp_path / "go"
    child = getProcessOutputAndValue(
        sys.executable,
        [str(script), str(db), str(ready), str(go), str(NOW + 3600)],
        env=os.environ,
    )
    while not ready.exists():
        await deferLater(reactor, 0.01)
    go.touch()
    got_here = await drain(store, "dallas", 1)
    out, err, code = await child
    assert code == 0, err.decode()
    got_there = json.loads(out)
    assert not set(got_here) & set(got_there)
    assert set(got_here) | set(got_there) == ids
    assert got_here and got_there


# -- failures ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unopenable_database_fails_with_store_unavailable(tmp_path: Path) -> None:
    """A database that cannot be created makes every call fail with ``StoreUnavailable``."""
    (tmp_path / "afile").write_text("not a directory")
    store = plugin.make({"path": "afile/spool.db", "config_dir": str(tmp_path)}, reactor)
    try:
        with pytest.raises(StoreUnavailable):
            await enqueue(store)
        with pytest.raises(StoreUnavailable):
            await store.counts()
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_not_a_database_fails_with_store_unavailable(tmp_path: Path) -> None:
    """A file that is not an SQLite database gives ``StoreUnavailable``, and is left alone."""
    junk = b"this is not a database" * 100
    (tmp_path / "spool.db").write_bytes(junk)
    store = open_store(tmp_path / "spool.db")
    try:
        with pytest.raises(StoreUnavailable):
            await enqueue(store)
    finally:
        await store.close()
    assert (tmp_path / "spool.db").read_bytes() == junk


@pytest_twisted.ensureDeferred
async def test_failure_half_way_through_enqueue_stores_nothing(store: SqliteSpoolStore) -> None:
    """If the second entry of a message cannot be written, neither entry nor body stays."""
    calls = []

    def flaky(entry_id: str) -> int:
        calls.append(entry_id)
        if len(calls) == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return 0

    def fail_the_second_entry(conn: sqlite3.Connection) -> None:
        # On the writer's connection: each entry's insert calls flaky first.
        conn.create_function("flaky", 1, flaky)
        conn.execute(
            "CREATE TEMP TRIGGER flaky_entry BEFORE INSERT ON entries"
            " BEGIN SELECT flaky(NEW.id); END"
        )

    await store.run(fail_the_second_entry)
    with pytest.raises(StoreUnavailable):
        await store.enqueue(ENVELOPE, b"x\r\n", {"smtp:a": [ALICE], "smtp:b": [ALICE]}, "dallas")
    assert len(calls) == 2
    assert await table_sizes(store) == (0, 0, 0)


@pytest_twisted.ensureDeferred
async def test_broken_connection_is_replaced(store: SqliteSpoolStore) -> None:
    """If the connection breaks, its batch fails ``StoreUnavailable`` and the next call reconnects."""
    entry_id = await enqueue(store)
    with pytest.raises(StoreUnavailable):
        await store.run(lambda conn: conn.close())
    assert (await store.get(entry_id)) is not None


@pytest_twisted.ensureDeferred
async def test_full_disk_fails_with_store_full(store: SqliteSpoolStore) -> None:
    """When the database cannot grow, enqueue fails with ``StoreFull`` and stores nothing."""
    await enqueue(store)

    def cap(more: int) -> Callable[[sqlite3.Connection], None]:
        def run(conn: sqlite3.Connection) -> None:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages + more}")

        return run

    await store.run(cap(0))
    with pytest.raises(StoreFull):
        # The largest body kept in the database itself: a page and more.
        await enqueue(store, b"x" * bodylog.LOG_THRESHOLD)
    assert await table_sizes(store) == (1, 1, 0)
    # Given room again, the store goes on working.
    await store.run(cap(2))
    await enqueue(store, b"small\r\n")
    assert await table_sizes(store) == (2, 2, 0)


@pytest_twisted.ensureDeferred
async def test_enqueue_leased_without_routes_stores_nothing(store: SqliteSpoolStore) -> None:
    """No routes, no entries: not even the message row (nothing would ever delete it)."""
    await store.counts()
    before = store.commits
    assert await store.enqueue_leased(ENVELOPE, b"m\r\n", {}, "dallas", 300) == []
    assert store.commits == before
    assert await table_sizes(store) == (0, 0, 0)


# -- the body log: large bodies in segment files beside the database --------

LARGE = b"".join(b"%07d " % i + b"x" * 90 + b"\r\n" for i in range(1000))  # 100 KB


async def body_row(store: SqliteSpoolStore, message_id: str) -> tuple[Any, ...]:
    """The ``messages`` row of ``message_id``: body, segment, offset, length."""

    def job(conn: sqlite3.Connection) -> tuple[Any, ...]:
        return tuple(
            conn.execute(
                "SELECT body, log_segment, log_offset, log_length FROM messages WHERE id = ?",
                (message_id,),
            ).fetchone()
        )

    return await store.run(job)


async def message_of(store: SqliteSpoolStore, entry_id: str) -> str:
    entry = await store.get(entry_id)
    assert entry is not None
    return entry.message_id


def segments(db: Path) -> list[str]:
    directory = Path(str(db) + ".bodies")
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


async def deliver_all(store: SqliteSpoolStore) -> None:
    """Claim every entry and record it delivered (its message goes too)."""
    for lease in await store.claim("dallas", NOW + 3600, 1000, 60, 60):
        await finish(store, lease)()


@pytest_twisted.ensureDeferred
async def test_large_bodies_go_to_the_body_log_small_ones_stay_in_the_database(
    store: SqliteSpoolStore, db: Path
) -> None:
    at_threshold = b"t" * bodylog.LOG_THRESHOLD
    above = b"a" * (bodylog.LOG_THRESHOLD + 1)
    ids = [await message_of(store, await enqueue(store, m)) for m in (at_threshold, above, LARGE)]
    rows = [await body_row(store, i) for i in ids]
    assert rows[0] == (at_threshold, None, None, None)
    [segment] = segments(db)
    # Appended one after the other to the same segment.
    assert rows[1] == (b"", segment, 0, len(above))
    assert rows[2] == (b"", segment, len(above), len(LARGE))
    assert [await store.body(i) for i in ids] == [at_threshold, above, LARGE]


async def in_one_batch(
    store: SqliteSpoolStore, messages: list[bytes], *jobs: Callable[[sqlite3.Connection], Any]
) -> list[tuple[bool, Any]]:
    """
    Enqueue ``messages`` (then submit ``jobs``) so that the writer runs them
    in one batch: queued behind a held job.
    """
    started, gate = threading.Event(), threading.Event()
    held = store.run(lambda conn: (started.set(), gate.wait(10)))
    # Alone in its batch once it runs: what comes now waits for the next.
    while not started.is_set():
        await deferLater(reactor, 0.001, lambda: None)
    before = store.commits
    waits = [Deferred.fromCoroutine(enqueue(store, m)) for m in messages]
    waits += [store.run(job) for job in jobs]
    gate.set()
    await held
    results = await DeferredList(waits, consumeErrors=True)
    # The held job's batch, and at most one more.
    assert store.commits - before <= 2
    return results


@asynccontextmanager
async def writes_and_statements(
    store: SqliteSpoolStore, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[list[str]]:
    """
    In order: the writer's SQL statements, and the body log's ``pwrite`` and
    ``fdatasync`` calls as ``"pwrite SEGMENT"``, ``"fdatasync SEGMENT"``.
    """
    events: list[str] = []
    real_sync, real_write = os.fdatasync, os.pwrite

    def name(fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def fdatasync(fd: int) -> None:
        events.append("fdatasync " + name(fd))
        real_sync(fd)

    def pwrite(fd: int, data: Any, offset: int) -> int:
        events.append("pwrite " + name(fd))
        return real_write(fd, data, offset)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "pwrite", pwrite)
    await store.run(lambda conn: conn.set_trace_callback(events.append))
    try:
        yield events
    finally:
        await store.run(lambda conn: conn.set_trace_callback(None))


def synced_after_last_write(events: list[str], segment: str, before: int) -> bool:
    """Whether ``segment`` was fdatasync'd after its last write before ``events[before]``."""
    last_write = max(i for i, e in enumerate(events[:before]) if e == f"pwrite {segment}")
    return any(last_write < i < before for i, e in enumerate(events) if e == f"fdatasync {segment}")


@pytest_twisted.ensureDeferred
async def test_every_segment_a_commit_refers_to_is_fdatasyncd_before_it(
    store: SqliteSpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also when the batch's bodies span two segments (one closed in its middle)."""
    monkeypatch.setattr(bodylog, "SEGMENT_SIZE", len(LARGE) + 100)
    async with writes_and_statements(store, monkeypatch) as events:
        results = await in_one_batch(store, [LARGE, LARGE + b"2\r\n"])
    assert [ok for ok, _ in results] == [True, True]
    rows = [await body_row(store, await message_of(store, entry_id)) for _, entry_id in results]
    assert rows[0][1] != rows[1][1]
    commit = max(i for i, e in enumerate(events) if e == "COMMIT")
    for _, segment, _, _ in rows:
        assert synced_after_last_write(events, segment, commit), events


@pytest_twisted.ensureDeferred
async def test_a_failed_fdatasync_of_a_segment_closed_mid_batch_fails_the_whole_batch(
    store: SqliteSpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The first body goes to a segment that the second closes; that segment's
    fdatasync fails.  The batch's commit would make the first body's row
    point at octets that may be lost: every job of the batch fails.
    """
    monkeypatch.setattr(bodylog, "SEGMENT_SIZE", len(LARGE) + 100)
    real = os.fdatasync
    calls = []

    def fails_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fails_once)
    results = await in_one_batch(store, [LARGE, LARGE + b"2\r\n"])
    assert [ok for ok, _ in results] == [False, False]
    assert all(f.check(StoreUnavailable) for _, f in results)
    assert await table_sizes(store) == (0, 0, 0)
    monkeypatch.undo()
    entry_id = await enqueue(store, LARGE)
    assert await store.body(await message_of(store, entry_id)) == LARGE


@pytest_twisted.ensureDeferred
async def test_a_failed_fdatasync_fails_the_whole_batch_and_the_segment_is_left(
    store: SqliteSpoolStore, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await enqueue(store, LARGE)
    [first] = segments(db)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    results = await DeferredList(
        [Deferred.fromCoroutine(enqueue(store, m)) for m in (LARGE, b"small\r\n")],
        consumeErrors=True,
    )
    # Both failed if they shared the batch; a large body never got a 250.
    assert not results[0][0]
    failure = results[0][1]
    assert failure.check(StoreUnavailable) and not failure.check(StoreFull)
    assert "Input/output error" in str(failure.value)
    assert await table_sizes(store) == (1 + int(results[1][0]),) * 2 + (0,)
    monkeypatch.undo()
    # The next body goes to a new segment: after a failed fdatasync the old
    # one's state on disk is unknown.
    entry_id = await enqueue(store, LARGE)
    assert (await body_row(store, await message_of(store, entry_id)))[1] != first
    assert len(segments(db)) == 2
    assert await store.body(await message_of(store, entry_id)) == LARGE


@pytest_twisted.ensureDeferred
async def test_no_room_for_a_body_is_store_full_and_stores_nothing(
    store: SqliteSpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await enqueue(store, b"small\r\n")

    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StoreFull, match="No space left"):
        await enqueue(store, LARGE)
    assert await table_sizes(store) == (1, 1, 0)
    # What needs no body log still works; so does the log once there is room.
    await enqueue(store, b"small\r\n")
    monkeypatch.undo()
    entry_id = await enqueue(store, LARGE)
    assert await store.body(await message_of(store, entry_id)) == LARGE


@pytest_twisted.ensureDeferred
async def test_bodies_in_the_log_survive_close_and_reopen(db: Path) -> None:
    store = open_store(db)
    entry_id = await enqueue(store, LARGE)
    await store.close()
    store = open_store(db)
    try:
        assert await store.body(await message_of(store, entry_id)) == LARGE
        # A reopened store writes a segment of its own, never after another's end.
        await enqueue(store, LARGE + b"again\r\n")
        assert len(segments(db)) == 2
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_segments_rotate_and_the_sweep_deletes_only_unused_ones(
    store: SqliteSpoolStore, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bodylog, "SEGMENT_SIZE", 2 * len(LARGE) + 100)
    ids = [await enqueue(store, LARGE + b"%d\r\n" % i) for i in range(5)]
    messages = [await message_of(store, i) for i in ids]
    names = [(await body_row(store, m))[1] for m in messages]
    # Two bodies per segment (the third would not fit).
    assert names[0] == names[1] != names[2] == names[3] != names[4]
    assert segments(db) == sorted(set(names))
    sweep = lambda: store.run(store._writer.bodies.sweep)  # noqa: E731
    assert await sweep() == 0
    # Deliver the first three: the first segment is unused; the second still
    # has message 3, the third is the open one.
    for lease in await store.claim("dallas", NOW + 3600, 3, 60, 60, ids=ids[:3]):
        await finish(store, lease)()
    # Unused at two sweeps in a row, then deleted.
    assert await sweep() == 0
    assert await sweep() == 1
    assert segments(db) == sorted({names[2], names[4]})
    assert [await store.body(m) for m in messages[3:]] == [LARGE + b"3\r\n", LARGE + b"4\r\n"]
    await deliver_all(store)
    # The open segment stays, unused, for the next body.
    assert await sweep() == 0
    assert await sweep() == 1
    assert segments(db) == [names[4]]


@pytest_twisted.ensureDeferred
async def test_the_sweep_spares_a_segment_another_writer_still_holds(db: Path) -> None:
    a, b = open_store(db), open_store(db)
    try:
        entry_id = await enqueue(a, LARGE)
        [held] = segments(db)
        # Unused, but a's open segment: b's sweep leaves it.
        await deliver_all(b)
        assert await a.get(entry_id) is None
        assert await b.run(b._writer.bodies.sweep) == 0
        assert await b.run(b._writer.bodies.sweep) == 0
        assert segments(db) == [held]
        await a.close()
        # Its writer gone, the segment is anyone's to sweep.
        assert await b.run(b._writer.bodies.sweep) == 1
        assert segments(db) == []
    finally:
        await gatherResults([a.close(), b.close()])


@pytest_twisted.ensureDeferred
async def test_a_missing_or_short_segment_is_a_clear_error(store: SqliteSpoolStore, db: Path) -> None:
    message_id = await message_of(store, await enqueue(store, LARGE))
    [segment] = segments(db)
    path = Path(str(db) + ".bodies") / segment
    os.truncate(path, len(LARGE) - 1)
    with pytest.raises(StoreUnavailable, match=f"{path} ends at {len(LARGE) - 1} octets"):
        await store.body(message_id)
    path.unlink()
    with pytest.raises(StoreUnavailable, match=f"{path} is missing"):
        await store.body(message_id)


@pytest_twisted.ensureDeferred
async def test_short_writes_and_reads_are_continued(
    store: SqliteSpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write, real_read = os.pwrite, os.pread
    monkeypatch.setattr(os, "pwrite", lambda fd, data, at: real_write(fd, data[:7000], at))
    monkeypatch.setattr(os, "pread", lambda fd, n, at: real_read(fd, min(n, 5000), at))
    ids = [await enqueue(store, m) for m in (LARGE, LARGE[::-1])]
    for entry_id, body in zip(ids, (LARGE, LARGE[::-1]), strict=True):
        assert await store.body(await message_of(store, entry_id)) == body


@pytest_twisted.ensureDeferred
async def test_a_segment_number_past_six_digits_is_still_a_segment(
    store: SqliteSpoolStore, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bodylog, "SEGMENT_SIZE", len(LARGE) + 100)
    await enqueue(store, b"small\r\n")  # the writer (and its body log) is up
    store._writer.bodies._sequence = 999_999
    message_id = await message_of(store, await enqueue(store, LARGE))
    assert (await body_row(store, message_id))[1].endswith("-1000000")
    assert await store.body(message_id) == LARGE
    await deliver_all(store)
    store._writer.bodies._sequence = 5_000_000
    await enqueue(store, LARGE)  # the next segment: -1000000 is no longer open
    sweep = lambda: store.run(store._writer.bodies.sweep)  # noqa: E731
    assert [await sweep(), await sweep()] == [0, 1]
    assert [name[-8:] for name in segments(db)] == ["-5000001"]


@pytest_twisted.ensureDeferred
async def test_a_batch_that_ends_without_a_commit_leaves_nothing_for_the_next(
    store: SqliteSpoolStore, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A batch whose transaction SQLite rolled back (here, a job that ends it)
    after a segment's fdatasync failed: the next batch neither inherits the
    failure nor keeps the closed segment locked.
    """
    monkeypatch.setattr(bodylog, "SEGMENT_SIZE", len(LARGE) + 100)
    real = os.fdatasync
    calls: list[int] = []

    def fails_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    def ends_the_transaction(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("the transaction was rolled back")

    monkeypatch.setattr(os, "fdatasync", fails_once)
    results = await in_one_batch(store, [LARGE, LARGE + b"2\r\n"], ends_the_transaction)
    assert not any(ok for ok, _ in results)
    assert await table_sizes(store) == (0, 0, 0)
    # The next batch, small or large, is not failed by what came before.
    await enqueue(store, b"small\r\n")
    entry_id = await enqueue(store, LARGE)
    assert await store.body(await message_of(store, entry_id)) == LARGE
    # The two segments of the failed batch are no one's now: swept.
    sweep = lambda: store.run(store._writer.bodies.sweep)  # noqa: E731
    assert [await sweep(), await sweep()] == [0, 2]


@pytest_twisted.ensureDeferred
async def test_a_spool_of_a_newer_schema_is_refused(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    conn.close()
    store = open_store(db)
    try:
        with pytest.raises(StoreUnavailable, match="written by a newer mailhub"):
            await enqueue(store)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_new_file_left_by_a_crash_is_swept_an_hour_on(store: SqliteSpoolStore, db: Path) -> None:
    await enqueue(store, LARGE)
    directory = Path(str(db) + ".bodies")
    left = directory / "0123456789ab-000001.new"
    left.write_bytes(b"half")
    bodies = store._writer.bodies
    assert await store.run(lambda conn: bodies.sweep(conn, now=left.stat().st_mtime + 60)) == 0
    assert left.exists()
    assert await store.run(lambda conn: bodies.sweep(conn, now=left.stat().st_mtime + 3601)) == 1
    assert not left.exists()


@pytest_twisted.ensureDeferred
async def test_the_sweep_asks_again_under_the_lock(db: Path) -> None:
    """
    Between the sweep's question (no row uses the segment) and its taking
    the lock, the segment's writer may commit a row using it and let go:
    under the lock the sweep asks again, and keeps the segment.
    """
    a = open_store(db)
    message_id = await message_of(a, await enqueue(a, LARGE))
    [name] = segments(db)
    await a.close()
    b = open_store(db)
    try:
        path = str(Path(str(db) + ".bodies") / name)
        bodies = b._writer.bodies
        assert await b.run(lambda conn: bodies._delete_if_free(path, name, conn)) == 0
        assert await b.body(message_id) == LARGE
    finally:
        await b.close()


async def four_in_a_segment_one_left(
    store: SqliteSpoolStore, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str, str]:
    """
    Four large bodies fill a (small) segment, a fifth opens the next; the
    first three are delivered.  Returns the closed segment, the message left
    in it and the open segment.
    """
    monkeypatch.setattr(bodylog, "SEGMENT_SIZE", 4 * len(LARGE) + 100)
    monkeypatch.setattr(bodylog, "COMPACT_MIN_DEAD", 0)
    monkeypatch.setattr(bodylog, "COMPACT_MIN_AGE", 0.0)
    ids = [await enqueue(store, LARGE + b"%d\r\n" % i) for i in range(5)]
    rows = [await body_row(store, await message_of(store, i)) for i in ids]
    assert len({r[1] for r in rows[:4]}) == 1 and rows[4][1] != rows[0][1]
    for lease in await store.claim("dallas", NOW + 3600, 3, 60, 60, ids=ids[:3]):
        await finish(store, lease)()
    return rows[0][1], await message_of(store, ids[3]), rows[4][1]


@pytest_twisted.ensureDeferred
async def test_a_mostly_unused_segment_is_compacted_then_swept(
    store: SqliteSpoolStore, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed, left, open_segment = await four_in_a_segment_one_left(store, monkeypatch)
    bodies = store._writer.bodies
    assert await store.run(bodies.compact) is True
    body, segment, offset, length = await body_row(store, left)
    assert (body, segment, length) == (b"", open_segment, len(LARGE) + 3)
    assert offset == len(LARGE) + 3  # after the fifth message's body
    assert await store.body(left) == LARGE + b"3\r\n"
    # Nothing is left to compact; the old segment goes at the second sweep.
    assert await store.run(bodies.compact) is False
    sweep = lambda: store.run(bodies.sweep)  # noqa: E731
    assert [await sweep(), await sweep()] == [0, 1]
    assert segments(db) == [open_segment]
    assert closed not in segments(db)


@pytest_twisted.ensureDeferred
async def test_compaction_commits_only_after_the_copies_are_fdatasyncd(
    store: SqliteSpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, left, open_segment = await four_in_a_segment_one_left(store, monkeypatch)
    async with writes_and_statements(store, monkeypatch) as events:
        assert await store.run(store._writer.bodies.compact) is True
    update = events.index(next(e for e in events if e.startswith("UPDATE messages")))
    commit = events.index("COMMIT", update)
    assert synced_after_last_write(events, open_segment, commit), events
    assert (await body_row(store, left))[1] == open_segment


@pytest_twisted.ensureDeferred
async def test_a_failed_compaction_leaves_every_row_where_it_was(
    store: SqliteSpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed, left, _ = await four_in_a_segment_one_left(store, monkeypatch)
    before = await body_row(store, left)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        await store.run(store._writer.bodies.compact)
    monkeypatch.setattr(os, "fdatasync", os.fsync)
    assert await body_row(store, left) == before
    assert before[1] == closed
    assert await store.body(left) == LARGE + b"3\r\n"
    # The store goes on: new bodies and a later compaction work.
    entry_id = await enqueue(store, LARGE + b"new\r\n")
    assert await store.body(await message_of(store, entry_id)) == LARGE + b"new\r\n"
    assert await store.run(store._writer.bodies.compact) is True
    assert await store.body(left) == LARGE + b"3\r\n"


@pytest_twisted.ensureDeferred
async def test_compaction_leaves_well_used_segments_and_ones_a_writer_holds(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bodylog, "COMPACT_MIN_DEAD", 0)
    monkeypatch.setattr(bodylog, "COMPACT_MIN_AGE", 0.0)
    a, b = open_store(db), open_store(db)
    try:
        ids = [await enqueue(a, LARGE + b"%d\r\n" % i) for i in range(4)]
        # a's open segment, 3/4 unused: b leaves it (a holds it).
        for lease in await b.claim("dallas", NOW + 3600, 3, 60, 60, ids=ids[:3]):
            await finish(b, lease)()
        assert await b.run(b._writer.bodies.compact) is False
        await a.close()
        assert await b.run(b._writer.bodies.compact) is True
        # Now in b's open segment, alone: well used, left alone.
        assert await b.run(b._writer.bodies.compact) is False
        assert await b.body(await message_of(b, ids[3])) == LARGE + b"3\r\n"
    finally:
        await gatherResults([a.close(), b.close()])


@pytest_twisted.ensureDeferred
async def test_the_writer_compacts_between_batches_in_a_transaction_of_its_own(
    store: SqliteSpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the hub runs it: sweeps and compaction after a batch, every ``SWEEP_INTERVAL``."""
    _, left, open_segment = await four_in_a_segment_one_left(store, monkeypatch)
    async with writes_and_statements(store, monkeypatch) as events:
        monkeypatch.setattr(bodylog, "SWEEP_INTERVAL", 0.0)
        store._writer.bodies._next_sweep = 0.0
        await enqueue(store, b"small\r\n")  # a batch; after it, the writer's own work
        await store.run(lambda conn: None)  # and one more batch, to wait for it
    assert store._writer.bodies.compacted == 1
    assert (await body_row(store, left))[1] == open_segment
    assert await store.body(left) == LARGE + b"3\r\n"
    update = next(i for i, e in enumerate(events) if e.startswith("UPDATE messages"))
    begin = max(i for i, e in enumerate(events[:update]) if e.startswith("BEGIN"))
    commit = events.index("COMMIT", update)
    assert events[begin] == "BEGIN IMMEDIATE"
    assert synced_after_last_write(events, open_segment, commit), events


@pytest_twisted.ensureDeferred
async def test_a_closed_segment_still_half_in_use_is_left_alone(
    store: SqliteSpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bodylog, "SEGMENT_SIZE", 4 * len(LARGE) + 100)
    monkeypatch.setattr(bodylog, "COMPACT_MIN_DEAD", 0)
    monkeypatch.setattr(bodylog, "COMPACT_MIN_AGE", 0.0)
    ids = [await enqueue(store, LARGE + b"%d\r\n" % i) for i in range(5)]
    closed = (await body_row(store, await message_of(store, ids[0])))[1]
    for lease in await store.claim("dallas", NOW + 3600, 2, 60, 60, ids=ids[:2]):
        await finish(store, lease)()
    assert await store.run(store._writer.bodies.compact) is False
    assert (await body_row(store, await message_of(store, ids[3])))[1] == closed
    # Unused space below COMPACT_MIN_DEAD is not worth a copy either.
    for lease in await store.claim("dallas", NOW + 3600, 1, 60, 60, ids=ids[2:3]):
        await finish(store, lease)()
    monkeypatch.setattr(bodylog, "COMPACT_MIN_DEAD", 3 * len(LARGE) + 100)
    assert await store.run(store._writer.bodies.compact) is False
    monkeypatch.setattr(bodylog, "COMPACT_MIN_DEAD", 3 * len(LARGE))
    assert await store.run(store._writer.bodies.compact) is True



@pytest_twisted.ensureDeferred
async def test_a_segment_written_lately_is_not_compacted(
    store: SqliteSpoolStore, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What is still in use in a young segment is mail about to be delivered: no copy."""
    closed, left, _ = await four_in_a_segment_one_left(store, monkeypatch)
    monkeypatch.setattr(bodylog, "COMPACT_MIN_AGE", 600.0)
    written = (Path(str(db) + ".bodies") / closed).stat().st_mtime
    bodies = store._writer.bodies
    assert await store.run(lambda conn: bodies.compact(conn, now=written + 599)) is False
    assert await store.run(lambda conn: bodies.compact(conn, now=written + 601)) is True
    assert await store.body(left) == LARGE + b"3\r\n"


@pytest_twisted.ensureDeferred
async def test_counts_say_what_the_body_log_holds_on_disk_and_in_use(
    store: SqliteSpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await store.counts())["body_log"] == {"segments": 0, "octets": 0, "in_use": 0}
    monkeypatch.setattr(bodylog, "SEGMENT_SIZE", 2 * len(LARGE) + 100)
    ids = [await enqueue(store, m) for m in (LARGE, LARGE + b"1\r\n", LARGE + b"22\r\n", b"small\r\n")]
    on_disk = 3 * len(LARGE) + 3 + 4
    assert (await store.counts())["body_log"] == {"segments": 2, "octets": on_disk, "in_use": on_disk}
    for lease in await store.claim("dallas", NOW + 3600, 1, 60, 60, ids=ids[:1]):
        await finish(store, lease)()
    assert (await store.counts())["body_log"] == {
        "segments": 2,
        "octets": on_disk,
        "in_use": on_disk - len(LARGE),
    }

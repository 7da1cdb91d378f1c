"""
The ``postgresql`` archive against a real PostgreSQL (``initdb``/``pg_ctl``
in a temporary directory, as an unprivileged user when the tests run as
root): the archive and account-store contracts, then what only a shared
server shows: two archives (two nodes) on one database, outages, a crash
after ``add``, configuration errors, the schema's migration, and that no
statement runs on the reactor thread.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest
import pytest_twisted
from psycopg import sql
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.python import threadable
from zope.interface.verify import verifyObject

from mailhub.interfaces import IArchive, IArchivePlugin
from mailhub.model import (
    Account,
    Address,
    ArchiveQuery,
    ArchiveScope,
    AuditEvent,
    Role,
    SentMessage,
    StoreFull,
    StoreUnavailable,
)
from mailhub.plugin import load_plugin
from mailhub.plugins.postgresql import SCHEMA_VERSION, PostgresArchive, plugin
from mailhub.plugins.postgresql.search import FIELDS, Plan, fields_query, terms, tsvector
from mailhub.testing.account_contract import AccountStoreContract, account
from mailhub.testing.archive_contract import (
    ALICE,
    BOB,
    DAVE,
    NOW,
    ODD_MESSAGE,
    ArchiveContract,
    archived,
    query,
)
from mailhub.testing.postgres_server import PostgresServer
from mailhub.testing.redis_server import free_port

pytestmark = pytest.mark.integration

_names = itertools.count()


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One server for the module; each archive gets a schema of its own."""
    server = PostgresServer.start(tmp_path_factory.mktemp("pg"))
    yield server
    # A throwaway cluster: no shutdown checkpoint (it would fsync every
    # file of every test's schema).
    server.stop(mode="immediate")


@pytest.fixture
def own_pg(tmp_path: Path) -> Iterator[PostgresServer]:
    """A server of the test's own, for tests that stop or restart it."""
    server = PostgresServer.start(tmp_path / "pg")
    yield server
    server.stop()


@pytest.fixture
def archives(pg: PostgresServer) -> Iterator[Any]:
    """Makes archives; every one made is closed after the test."""
    made: list[PostgresArchive] = []

    def make(**config: Any) -> PostgresArchive:
        config.setdefault("dsn", pg.dsn())
        config.setdefault("schema", f"test_{next(_names)}_{int(time.time() * 1000) % 100000}")
        archive = plugin.make(config, reactor)
        made.append(archive)
        return archive

    yield make
    pytest_twisted.blockon(gatherResults([a.close() for a in made]))


@pytest.fixture
def archive(archives: Any) -> PostgresArchive:
    archive: PostgresArchive = archives()
    return archive


class TestPostgresArchive(ArchiveContract, AccountStoreContract):
    """The contracts, each test in a fresh schema of the module's server."""


def rows(pg: PostgresServer, schema: str, query: str) -> str:
    return pg.psql(f"SET search_path TO {schema}; {query}")


# -- the plugin ------------------------------------------------------------------


def test_plugin_provides_archive_plugin() -> None:
    assert verifyObject(IArchivePlugin, plugin)
    assert plugin.name == "postgresql"


def test_plugin_found_by_name() -> None:
    assert load_plugin("mailhub.archives", "postgresql") is plugin


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({}, "archive.dsn"),
        ({"dsn": 17}, "archive.dsn"),
        ({"dsn": ""}, "archive.dsn"),
        ({"dsn": "host=db secret-password"}, "archive.dsn"),
        ({"host": "db", "dbname": "mailhub", "port": "5432"}, "archive.port"),
        ({"host": "db", "dbname": "mailhub", "port": 70000}, "archive.port"),
        ({"dsn": "host=db", "user": 5}, "archive.user"),
        ({"dsn": "host=db", "pool_size": 0}, "archive.pool_size"),
        ({"dsn": "host=db", "pool_size": True}, "archive.pool_size"),
        ({"dsn": "host=db", "connect_timeout": -1}, "archive.connect_timeout"),
        ({"dsn": "host=db", "schema": "x" * 64}, "archive.schema"),
    ],
)
def test_configuration_errors_name_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as e:
        plugin.make(config, reactor)
    assert "secret-password" not in str(e.value)


@pytest_twisted.ensureDeferred
async def test_host_port_dbname_user_instead_of_dsn(pg: PostgresServer, archives: Any) -> None:
    archive = archives(dsn=None, host="127.0.0.1", port=pg.port, dbname="postgres", user="mailhub")
    await archive.add(archived("x"))
    assert (await archive.get("x")).id == "x"


def test_archive_provides_interface(archive: PostgresArchive) -> None:
    assert verifyObject(IArchive, archive)


# -- the schema ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_schema_is_created_in_an_empty_database(pg: PostgresServer, archives: Any) -> None:
    dsn = pg.create_database(f"empty_{next(_names)}")
    archive = archives(dsn=dsn, schema="mailhub_archive")
    await archive.add(archived("x"))
    tables = pg.psql(
        "SELECT string_agg(tablename, ' ' ORDER BY tablename) FROM pg_tables"
        " WHERE schemaname = 'mailhub_archive'",
        dsn.rpartition("=")[2],
    )
    assert tables == "accounts audit bodies delivered fields holds mailboxes messages meta read_flags sent"
    # The planner knows the 10,000 most common words (search.plan).
    target = pg.psql(
        "SELECT attstattarget FROM pg_attribute"
        " WHERE attrelid = 'mailhub_archive.messages'::regclass AND attname = 'tsv'",
        dsn.rpartition("=")[2],
    )
    assert target == "1000"
    # A second archive (another node) uses what is there.
    other = archives(dsn=dsn, schema="mailhub_archive")
    assert (await other.get("x")).id == "x"


@pytest_twisted.ensureDeferred
async def test_newer_schema_is_refused(pg: PostgresServer, archives: Any) -> None:
    first = archives()
    await first.add(archived("x"))
    pg.psql(f"UPDATE {first._schema}.meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(RuntimeError, match="newer"):
        await archives(schema=first._schema).get("x")


@pytest_twisted.ensureDeferred
async def test_search_uses_the_text_index(pg: PostgresServer, archive: PostgresArchive) -> None:
    """With sequential scans off, a word search is a scan of the GIN index."""
    await archive.add(archived("x", body="zebra"))
    vector_query = terms(query(words=("zeb",))).body[0]
    plan = rows(
        pg,
        archive._schema,
        "SET enable_seqscan = off; EXPLAIN SELECT id FROM messages"
        f" WHERE tsv @@ $q${vector_query}$q$::tsquery",
    )
    assert "messages_tsv" in plan


@pytest_twisted.ensureDeferred
async def test_delivered_finds_copies_through_the_message_id_index(
    pg: PostgresServer, archive: PostgresArchive
) -> None:
    """With sequential scans off, the other copies of a Message-ID come from the partial index."""
    await archive.add(archived("x", message_id="q1@outside.example"))
    plan = rows(
        pg,
        archive._schema,
        "SET enable_seqscan = off; EXPLAIN SELECT o.id FROM messages m"
        " JOIN messages o ON o.message_id = m.message_id AND o.message_id <> ''::bytea"
        " WHERE m.id = 'x' AND m.message_id <> ''::bytea",
    )
    assert "messages_header_id" in plan


@pytest_twisted.ensureDeferred
async def test_a_body_is_stored_once(pg: PostgresServer, archive: PostgresArchive) -> None:
    same = b"Subject: the same\r\n\r\nbytes\r\n"
    await archive.add(archived("one", NOW - 2 * 86400, (ALICE,), message=same))
    await archive.add(archived("two", NOW, (DAVE,), message=same))
    assert rows(pg, archive._schema, "SELECT count(*) FROM bodies") == "1"
    assert await archive.expire("a.example", NOW - 86400, 100) == 1
    assert (await archive.get("two")).message == same
    assert rows(pg, archive._schema, "SELECT count(*) FROM bodies") == "1"
    assert await archive.expire("b.example", NOW + 1, 100) == 1
    assert rows(pg, archive._schema, "SELECT count(*) FROM bodies") == "0"


# -- two nodes -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_one_archive(archives: Any) -> None:
    """What one node adds, the other finds at once; adds of one id from both are one message."""
    dallas = archives()
    losangeles = archives(schema=dallas._schema)
    await dallas.add(archived("x", mailboxes=(ALICE,), body="hello"))
    assert [s.id for s in (await losangeles.search(ArchiveScope(), ArchiveQuery())).items] == ["x"]
    adds = []
    for i in range(20):
        adds.append(dallas.add(archived(f"race{i}", mailboxes=(ALICE,))))
        adds.append(losangeles.add(archived(f"race{i}", mailboxes=(BOB,))))
    await gatherResults(adds)
    for i in range(20):
        got = await losangeles.get(f"race{i}")
        assert sorted(got.mailboxes) == [ALICE, BOB]
    assert await dallas.count(ArchiveScope(), ArchiveQuery()) == 21


# -- outages ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_server_down_is_store_unavailable_and_back_is_seen(own_pg: PostgresServer) -> None:
    archive = plugin.make({"dsn": own_pg.dsn(), "pool_size": 2}, reactor)
    try:
        await archive.add(archived("before"))
        own_pg.stop(remove=False)
        with pytest.raises(StoreUnavailable):
            await archive.add(archived("during"))
        with pytest.raises(StoreUnavailable):
            await archive.search(ArchiveScope(), ArchiveQuery())
        own_pg.restart()
        # The next call on each thread connects again.
        for _ in range(4):
            await archive.add(archived("after"))
        page = await archive.search(ArchiveScope(), ArchiveQuery())
        assert [s.id for s in page.items] == ["before", "after"]
        assert await archive.get("during") is None
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_nothing_listening_is_store_unavailable() -> None:
    archive = plugin.make({"dsn": f"host=127.0.0.1 port={free_port()} user=x dbname=x"}, reactor)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await archive.get("x")
        assert time.monotonic() - started < 5
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_added_message_survives_a_crash(own_pg: PostgresServer) -> None:
    """``add`` fires after the commit is on disk: an immediate shutdown (no checkpoint) keeps it."""
    archive = plugin.make({"dsn": own_pg.dsn()}, reactor)
    try:
        await archive.add(archived("durable", body="kept"))
        own_pg.stop(remove=False, mode="immediate")
        own_pg.restart()
        got = await archive.get("durable")
        assert got is not None and got.text.body == "kept"
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_disk_full_is_store_full(archive: PostgresArchive) -> None:
    def full(conn: psycopg.Connection[Any]) -> None:
        raise psycopg.errors.DiskFull("could not extend file: No space left on device")

    with pytest.raises(StoreFull):
        await archive._call(full)


@pytest_twisted.ensureDeferred
async def test_calls_after_close_fail(archives: Any) -> None:
    archive = archives()
    pending = archive.add(archived("x"))
    await archive.close()
    await pending  # the call under way finished before the close did
    with pytest.raises(StoreUnavailable):
        await archive.get("x")


# -- threads -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_statement_runs_on_the_reactor_thread(
    archive: PostgresArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connecting and every statement happen on the archive's pool threads."""
    on_reactor: list[str] = []
    statements: list[str] = []
    execute, connect = psycopg.Connection.execute, psycopg.Connection.connect

    def watched_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        statements.append(str(query)[:40])
        if threadable.isInIOThread():
            on_reactor.append(str(query)[:40])
        return execute(self, query, *args, **kwargs)

    def watched_connect(cls: Any, *args: Any, **kwargs: Any) -> Any:
        if threadable.isInIOThread():
            on_reactor.append("connect")
        return connect.__func__(cls, *args, **kwargs)  # type: ignore[attr-defined]

    monkeypatch.setattr(psycopg.Connection, "execute", watched_execute)
    monkeypatch.setattr(psycopg.Connection, "connect", classmethod(watched_connect))
    await archive.add(archived("x", NOW, (ALICE, BOB), body="words"))
    await archive.search(ArchiveScope(domain="a.example"), query(words=("wor",)))
    await archive.count(ArchiveScope(mailbox=ALICE), ArchiveQuery())
    await archive.get("x")
    await archive.set_hold(ArchiveScope(mailbox=BOB), True, "case", NOW)
    await archive.holds()
    await archive.expire("a.example", NOW + 1, 10)
    await archive.record_audit(AuditEvent(NOW, "operator:root", "read", "x"))
    await archive.audit_log(None, None, None, None, 10)
    await archive.record_delivered([("x", ALICE, "smtp:mail.a.example:25", NOW)])
    await archive.delivered([("x", ALICE)])
    assert len(statements) >= 11
    assert on_reactor == []


@pytest_twisted.ensureDeferred
async def test_pool_size_bounds_connections(pg: PostgresServer, archives: Any) -> None:
    archive = archives(pool_size=2)
    await gatherResults([archive.add(archived(f"m{i}", body="x")) for i in range(30)])
    assert len(archive._connections) <= 2
    assert await archive.count(ArchiveScope(), ArchiveQuery()) == 30


# -- words ---------------------------------------------------------------------


def test_query_text_is_quoted_lexemes_only() -> None:
    found = terms(
        query(
            words=("it's", "a|b", "x:*"),
            phrases=("annual budget",),
            sender=("zoe@zoo",),
            subject=("Ré",),
            recipient=("bob",),
        )
    )
    assert found.body == ["('it' <-> 's':*)", "('a' <-> 'b':*)", "'x':*", "('annual' <-> 'budget')"]
    assert found.fields == ["('zoe':B <-> 'zoo':*B)", "'re':*A"]
    assert found.recipients == [("'bob':*C", "'bob':*", ["bob"])]


def test_fields_are_asked_within_the_scope() -> None:
    """
    The fields' vector is asked for the scope's lexeme with the field
    words; a recipient is the scope's mailbox (always or never), or a
    mailbox of the domain by its words; only several words in a domain,
    or the whole archive, are checked against the mailboxes too.
    """
    found = terms(query(sender=("zoe",), recipient=("bob",)))
    assert fields_query(ArchiveScope(mailbox=ALICE), found) == (
        "'zoe':*B & 'bob':*C & '@alice@a.example'",
        [],
    )
    assert fields_query(ArchiveScope(mailbox=BOB), found) == ("'zoe':*B & '@bob@a.example'", [])
    assert fields_query(ArchiveScope(domain="a.example"), found) == (
        "'zoe':*B & ('bob':*C | '@a.example:bob':*) & '@@a.example'",
        [],
    )
    assert fields_query(ArchiveScope(), found) == ("'zoe':*B", [("'bob':*C", "'bob':*")])
    two = terms(query(recipient=("bob smith",)))
    assert fields_query(ArchiveScope(domain="a.example"), two) == (
        "(('bob':C <-> 'smith':*C) | '@a.example:bob' & '@a.example:smith':*) & '@@a.example'",
        [("('bob':C <-> 'smith':*C)", "('bob' <-> 'smith':*)")],
    )
    assert fields_query(ArchiveScope(mailbox=BOB), terms(query(words=("x",)))) == (None, [])


def test_vector_leaves_a_gap_between_fields() -> None:
    vector = tsvector([("A", ["one two"]), ("B", ["three"])])
    assert vector == "'one':2A 'two':3A 'three':5B"


@pytest_twisted.ensureDeferred
async def test_a_phrase_does_not_run_across_fields(archive: PostgresArchive) -> None:
    await archive.add(archived("x", subject="annual", from_text="budget", body="report"))
    found = await archive.search(ArchiveScope(), query(phrases=("annual budget",)))
    assert found.items == ()


@pytest_twisted.ensureDeferred
async def test_long_body_is_indexed_up_to_the_limit(archive: PostgresArchive) -> None:
    body = " ".join(f"w{i}" for i in range(200_000)) + " lastword"
    await archive.add(archived("big", body=body))
    assert (await archive.get("big")).text.body == body
    assert await archive.count(ArchiveScope(), query(words=("w100",))) == 1
    assert await archive.count(ArchiveScope(), query(words=("lastword",))) == 0


@pytest_twisted.ensureDeferred
async def test_mailbox_with_non_ascii_local_part(archive: PostgresArchive) -> None:
    jose = Address("josé", "a.example")
    await archive.add(archived("x", NOW, (jose,)))
    assert (await archive.get("x")).mailboxes == (jose,)
    page = await archive.search(ArchiveScope(mailbox=jose), query(recipient=("jose",)))
    assert [s.id for s in page.items] == ["x"]


# -- accounts ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_accounts_survive_close_and_reopen(archives: Any) -> None:
    """Accounts, read flags and the Sent folder are in the database, not in memory."""
    alice = account(ALICE, password_hash="$argon2id$x", role=Role.HUB_ADMIN, mailboxes=[BOB])
    message = SentMessage("s1", ALICE, NOW, ODD_MESSAGE)
    first = archives()
    await first.add_account(alice)
    await first.set_read(ALICE, ["m1", "m2"], True)
    await first.add_sent(message)
    await first.close()
    again = archives(schema=first._schema)
    assert await again.account(ALICE) == alice
    assert await again.read_ids(ALICE, ["m1", "m2", "m3"]) == {"m1", "m2"}
    assert await again.sent(ALICE, None, 10) == [message]


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_the_accounts(archives: Any) -> None:
    """What one node writes the other reads at once; one address added on both is one account."""
    dallas = archives()
    losangeles = archives(schema=dallas._schema)
    await dallas.add_account(account(ALICE))
    await dallas.set_read(ALICE, ["m1"], True)
    assert await losangeles.account(ALICE) == account(ALICE)
    assert await losangeles.read_ids(ALICE, ["m1"]) == {"m1"}
    adds = [
        node.add_account(account(Address(f"u{i}", "a.example"), session_version=n))
        for i in range(10)
        for n, node in enumerate((dallas, losangeles))
    ]
    results = await gatherResults([d.addErrback(lambda f: f.trap(KeyError)) for d in adds])
    assert len([r for r in results if r is KeyError]) == 10
    assert len(await dallas.accounts("a.example")) == 11
    marks = [
        node.set_read(BOB, [f"m{j}" for j in range(50)], True)
        for _ in range(5)
        for node in (dallas, losangeles)
    ]
    await gatherResults(marks)
    assert len(await losangeles.read_ids(BOB, [f"m{j}" for j in range(50)])) == 50


@pytest_twisted.ensureDeferred
async def test_schema_1_gains_the_account_tables(pg: PostgresServer, archives: Any) -> None:
    """An archive made before the accounts keeps its messages and takes accounts."""
    old = archives()
    await old.add(archived("old", message=ODD_MESSAGE, body="budget"))
    await old.close()
    schema = old._schema
    # As schema 1 left it.
    pg.psql(
        f"DROP TABLE {schema}.accounts, {schema}.read_flags, {schema}.sent, {schema}.delivered,"
        f" {schema}.fields;"
        f" DROP INDEX {schema}.messages_header_id;"
        f" UPDATE {schema}.meta SET value = '1' WHERE key = 'schema_version'"
    )
    archive = archives(schema=schema)
    assert (await archive.get("old")).message == ODD_MESSAGE
    assert rows(pg, schema, "SELECT value FROM meta WHERE key = 'schema_version'") == str(SCHEMA_VERSION)
    assert SCHEMA_VERSION == 5
    await archive.add_account(account(ALICE))
    await archive.set_read(ALICE, ["old"], True)
    await archive.add_sent(SentMessage("s1", ALICE, NOW, b"sent\r\n"))
    assert await archive.account(ALICE) == account(ALICE)
    assert await archive.read_ids(ALICE, ["old"]) == {"old"}
    assert [m.id for m in await archive.sent(ALICE, None, 10)] == ["s1"]


@pytest_twisted.ensureDeferred
async def test_schema_2_gains_the_delivery_records(pg: PostgresServer, archives: Any) -> None:
    """An archive made before the delivery records keeps everything and matches Message-IDs it had."""
    old = archives()
    await old.add(archived("old", message_id="q1@outside.example"))
    await old.add_account(account(ALICE))
    await old.close()
    schema = old._schema
    # As schema 2 left it.
    pg.psql(
        f"DROP TABLE {schema}.delivered, {schema}.fields; DROP INDEX {schema}.messages_header_id;"
        f" UPDATE {schema}.meta SET value = '2' WHERE key = 'schema_version'"
    )
    archive = archives(schema=schema)
    await archive.record_delivered([("m1", ALICE, "smtp:mail.a.example:25", NOW)])
    assert rows(pg, schema, "SELECT value FROM meta WHERE key = 'schema_version'") == str(SCHEMA_VERSION)
    assert await archive.account(ALICE) == account(ALICE)
    await archive.add(archived("m1", message_id="q1@outside.example"))
    assert await archive.delivered([("old", ALICE)]) == {("old", ALICE)}


@pytest_twisted.ensureDeferred
async def test_schema_3_gains_the_fields_vectors(pg: PostgresServer, archives: Any) -> None:
    """
    An archive made before the fields' vectors gets them from its messages'
    vectors and mailboxes: the same vectors ``add`` writes, so ``from:``,
    ``to:`` and ``subject:`` find in a mailbox and a domain what they did.
    """
    old = archives()
    await old.add(
        archived(
            "m1",
            NOW,
            (ALICE, DAVE),
            subject="Quarterly budget",
            from_text="Zoë Keeper <zoe@zoo.example>",
            recipients="Alice <alice@a.example>",
            body="budget attached",
        )
    )
    await old.add(archived("m2", NOW + 1, (BOB,), body="zoe budget"))
    await old.add(archived("m1", NOW, (BOB,)))  # the same message for one more mailbox
    await old.close()
    schema = old._schema
    written = rows(pg, schema, "SELECT id, tsv FROM fields ORDER BY id")
    assert "'@@b.example'" in written and "'@a.example:bob'" in written
    pg.psql(f"DROP TABLE {schema}.fields; UPDATE {schema}.meta SET value = '3' WHERE key = 'schema_version'")
    archive = archives(schema=schema)
    assert (await archive.get("m1")) is not None
    assert rows(pg, schema, "SELECT value FROM meta WHERE key = 'schema_version'") == str(SCHEMA_VERSION)
    assert rows(pg, schema, "SELECT id, tsv FROM fields ORDER BY id") == written

    async def ids(scope: ArchiveScope, search: ArchiveQuery) -> list[str]:
        return [item.id for item in (await archive.search(scope, search)).items]

    assert await ids(ArchiveScope(mailbox=BOB), query(sender="zoe")) == ["m1"]
    assert await ids(ArchiveScope(domain="b.example"), query(subject="quart")) == ["m1"]
    assert await ids(ArchiveScope(domain="a.example"), query(recipient="bob")) == ["m2", "m1"]
    assert await ids(ArchiveScope(mailbox=DAVE), query(recipient="alice")) == ["m1"]
    assert await ids(ArchiveScope(mailbox=DAVE), query(recipient="bob")) == []


def account_as_given(schema: str, local: str, domain: str, session_version: int) -> str:
    """The SQL of an account row as mailhub wrote it before schema 5: keyed by the address as given."""
    data = json.loads(Account(Address("x", domain), session_version=session_version).to_json())
    data["address"] = [local, domain]
    return (
        f"INSERT INTO {schema}.accounts VALUES (convert_to('{local}@{domain}', 'UTF8'),"
        f" convert_to('{domain}', 'UTF8'), '{json.dumps(data)}');"
    )


@pytest_twisted.ensureDeferred
async def test_schema_4_folds_its_mailboxes(pg: PostgresServer, archives: Any) -> None:
    """
    Mail archived for ``Alice@a.example`` by an older mailhub is
    ``alice@a.example``'s once the archive is opened: its mailboxes are
    folded (two that fold to one merged), the ``fields`` rows of those
    messages made again (as ``add`` makes them for the folded mailboxes),
    and delivery records, holds and accounts (with their read flags and
    Sent folders) follow.
    """
    old = archives()
    await old.add(archived("upper", NOW - 3, (ALICE,), body="budget"))
    await old.add(archived("both", NOW - 2, (ALICE, BOB, DAVE), body="budget"))
    await old.add(archived("lower", NOW - 1, (ALICE,), body="budget"))
    await old.close()
    schema = old._schema
    written = rows(pg, schema, "SELECT id, tsv FROM fields ORDER BY id")
    # As schema 4 left it: mailboxes as given, and the scope lexemes made from them.
    pg.psql(
        f"SET search_path TO {schema};"
        " INSERT INTO mailboxes SELECT 'Alice@a.example', domain, received_at, id, tsv FROM mailboxes"
        "  WHERE mailbox = 'alice@a.example' AND id IN ('upper', 'both');"
        " INSERT INTO mailboxes SELECT 'BOB@a.example', domain, received_at, id, tsv FROM mailboxes"
        "  WHERE mailbox = 'bob@a.example';"
        " DELETE FROM mailboxes WHERE (mailbox = 'alice@a.example' AND id = 'upper') OR mailbox = 'bob@a.example';"
        " UPDATE fields SET tsv = " + FIELDS.format(tsv="fields.tsv", id="fields.id") + ";"
        " INSERT INTO delivered VALUES"
        f"  ('Alice@a.example', 'upper', 'a.example', 'smtp:new:25', {NOW}),"
        f"  ('alice@a.example', 'upper', 'a.example', 'smtp:old:25', {NOW - 5}),"
        f"  ('ALICE@a.example', 'both', 'a.example', 'smtp:old:25', {NOW - 5}),"
        f"  ('Alice@a.example', 'both', 'a.example', 'smtp:older:25', {NOW - 7});"
        f" INSERT INTO holds VALUES ('mailbox', 'Alice@a.example', 'case 17', {NOW});"
        + account_as_given(schema, "Carol", "a.example", 1)
        + " INSERT INTO read_flags VALUES (convert_to('Carol@a.example', 'UTF8'), 'upper');"
        f" INSERT INTO sent VALUES (convert_to('Carol@a.example', 'UTF8'), 's1', {NOW}, 'sent'::bytea);"
        # Two accounts that fold to one: the folded one is kept, the other left as it was.
        + account_as_given(schema, "Dave", "b.example", 1)
        + account_as_given(schema, "dave", "b.example", 2)
        + " UPDATE meta SET value = '4' WHERE key = 'schema_version'"
    )
    assert rows(pg, schema, "SELECT id, tsv FROM fields ORDER BY id") != written
    archive = archives(schema=schema)
    assert (await archive.get("both")) is not None
    assert rows(pg, schema, "SELECT value FROM meta WHERE key = 'schema_version'") == "5"
    assert rows(pg, schema, "SELECT id, tsv FROM fields ORDER BY id") == written
    assert rows(pg, schema, "SELECT DISTINCT mailbox FROM mailboxes ORDER BY 1") == "alice@a.example\nbob@a.example\ndave@b.example"
    for scope in (ArchiveScope(mailbox=ALICE), ArchiveScope(mailbox=Address("Alice", "a.example"))):
        page = await archive.search(scope, ArchiveQuery(), None, 10)
        assert [(m.id, m.mailboxes) for m in page.items] == [("lower", (ALICE,)), ("both", (ALICE,)), ("upper", (ALICE,))]
        assert await archive.count(scope, ArchiveQuery()) == 3
        assert await archive.count(scope, query(words="budget")) == 3
        assert await archive.count(scope, query(recipient="alice")) == 3
    assert await archive.count(ArchiveScope(mailbox=BOB), query(words="budget")) == 1
    assert sorted((await archive.get("both")).mailboxes) == [ALICE, BOB, DAVE]
    assert rows(pg, schema, "SELECT mailbox, archive_id, route FROM delivered ORDER BY archive_id") == (
        "alice@a.example|both|smtp:old:25\nalice@a.example|upper|smtp:new:25"
    )
    assert [(h["scope"], h["mailbox"]) for h in await archive.holds()] == [(f"mailbox {ALICE}", str(ALICE))]
    assert await archive.expire("a.example", NOW, 100) == 1  # bob's; alice's are held
    carol = Address("carol", "a.example")
    got = await archive.account(Address("CAROL", "a.example"))
    assert got is not None and got.address == carol and got.session_version == 1
    assert await archive.read_ids(carol, ["upper"]) == {"upper"}
    assert [m.id for m in await archive.sent(carol, None, 10)] == ["s1"]
    assert (await archive.account(Address("Dave", "b.example"))).session_version == 2
    assert rows(pg, schema, "SELECT convert_from(address, 'UTF8') FROM accounts WHERE domain = 'b.example'::bytea ORDER BY 1") == (
        "Dave@b.example\ndave@b.example"
    )


@pytest_twisted.ensureDeferred
async def test_expiry_takes_a_kept_message_out_of_the_expired_mailboxes(
    pg: PostgresServer, archive: PostgresArchive
) -> None:
    """
    A message kept for a held mailbox is no longer found by the expired
    mailbox's words in the domain, nor by its scope lexeme.
    """
    await archive.add(archived("m", NOW - 10 * 86400, (ALICE, BOB), body="x"))
    await archive.set_hold(ArchiveScope(mailbox=ALICE), True, "case 7", NOW)
    assert await archive.count(ArchiveScope(domain="a.example"), query(recipient="bob")) == 1
    assert await archive.expire("a.example", NOW, 100) == 1
    assert await archive.count(ArchiveScope(domain="a.example"), query(recipient="bob")) == 0
    assert await archive.count(ArchiveScope(domain="a.example"), query(recipient="alice")) == 1
    vector = rows(pg, archive._schema, "SELECT tsv FROM fields")
    assert "bob" not in vector and "'@alice@a.example'" in vector


@pytest_twisted.ensureDeferred
async def test_two_nodes_expiring_a_messages_two_mailboxes_at_once_remove_it(
    pg: PostgresServer, archive: PostgresArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Node 1 expires Alice's copy and node 2 Bob's, at once: the message
    goes, with its fields (not kept with Alice's lexemes and no mailbox,
    found by a search of her mailbox by its fields alone).
    """
    await archive.add(archived("m", NOW - 10 * 86400, (ALICE, BOB), subject="hello"))
    schema = archive._schema
    node1 = psycopg.connect(pg.dsn())
    try:
        # Node 1, mid-expiry with the plugin's own statements: Alice's row
        # gone, the message locked, kept (Bob's row is there), its fields
        # rewritten; not committed yet.
        node1.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        node1.execute("DELETE FROM mailboxes WHERE mailbox = %s AND id = 'm'", (str(ALICE),))
        node1.execute("SELECT 1 FROM messages WHERE id = 'm' FOR UPDATE")
        node1.execute(
            "DELETE FROM messages m WHERE m.id = 'm'"
            " AND NOT EXISTS (SELECT 1 FROM mailboxes x WHERE x.id = m.id)"
        )
        node1.execute(
            "UPDATE fields f SET tsv = " + FIELDS.format(tsv="f.tsv", id="f.id") + " WHERE f.id = 'm'"
        )
        # Node 2 takes Bob's row (Alice's is locked) and waits for node 1.
        expiring = archive.expire("a.example", NOW, 100)
        await deferLater(reactor, 0.5, lambda: None)
        assert not expiring.called
        node1.commit()
        assert await expiring == 1
    finally:
        node1.close()
    assert await archive.get("m") is None
    assert rows(pg, schema, "SELECT count(*) FROM fields") == "0"
    monkeypatch.setattr(PostgresArchive, "_plan", lambda self, conn, scope, query: Plan("fields"))
    assert (await archive.search(ArchiveScope(mailbox=ALICE), query(subject="hello"))).items == ()


@pytest_twisted.ensureDeferred
async def test_two_nodes_record_overlapping_deliveries_at_once(archives: Any) -> None:
    """Batches of two nodes naming the same pairs, in any order, all commit: one record per pair."""
    dallas = archives()
    losangeles = archives(schema=dallas._schema)
    boxes = [Address(f"user{i}", "a.example") for i in range(40)]
    batches = [
        [(f"m{j}", box, "smtp:mail.a.example:25", NOW + n) for j in range(5) for box in order]
        for n, order in enumerate([boxes, boxes[::-1]] * 3)
    ]
    await gatherResults(
        [node.record_delivered(b) for node, b in zip([dallas, losangeles] * 3, batches, strict=True)]
    )
    found = await losangeles.delivered([(f"m{j}", box) for j in range(5) for box in boxes])
    assert len(found) == 200
    assert await dallas.expire("a.example", NOW + 5, 1000) == 0
    assert await dallas.expire("a.example", NOW + 6, 1000) == 200


@pytest_twisted.ensureDeferred
async def test_account_text_with_nul_round_trips(archive: PostgresArchive) -> None:
    """Text a ``text`` column refuses (NUL, a lone surrogate) is kept exactly."""
    odd = Address("odd\udcff", "a.example")
    added = account(odd, recovery="nul\x00inside", password_hash="\udcfe")
    await archive.add_account(added)
    assert await archive.account(odd) == added
    assert await archive.account(Address("odd\ufffd", "a.example")) is None


@pytest_twisted.ensureDeferred
async def test_account_calls_run_off_the_reactor_thread(
    archive: PostgresArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_reactor: list[str] = []
    execute = psycopg.Connection.execute

    def watched_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if threadable.isInIOThread():
            on_reactor.append(str(query)[:40])
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", watched_execute)
    await archive.add_account(account(ALICE))
    await archive.update_account(account(ALICE, disabled=True))
    await archive.account(ALICE)
    await archive.accounts(None)
    await archive.set_read(ALICE, ["x"], True)
    await archive.read_ids(ALICE, ["x"])
    await archive.add_sent(SentMessage("s", ALICE, NOW, b"x"))
    await archive.sent(ALICE, None, 10)
    await archive.sent_message(ALICE, "s")
    assert on_reactor == []


# -- searches planned from the words' expected matches -----------------------------


@pytest.mark.parametrize(
    "plan", ["fields", "few", ""], ids=["by-fields", "from-few-matches", "planners-choice"]
)
@pytest_twisted.ensureDeferred
async def test_search_pages_and_counts_whatever_the_plan(
    archive: PostgresArchive, monkeypatch: pytest.MonkeyPatch, plan: str
) -> None:
    """
    A search the planner expects in few messages starts from them, one
    whose field words are in few messages of the scope is found by the
    fields' vectors alone; any other is the planner's choice: each pages
    through exactly the matching messages, newest first, and counts them.
    """
    def planned(self: PostgresArchive, conn: Any, scope: ArchiveScope, search: ArchiveQuery) -> Plan:
        body = terms(search).body
        # As search.plan: by the fields, every body word tested; from few,
        # the first looked up and the others tested.
        return Plan(plan, tuple(body if plan == "fields" else body[1:]) if plan else ())

    monkeypatch.setattr(PostgresArchive, "_plan", planned)
    messages = []
    for i in range(300):
        words = (["broad"] if i % 10 else []) + (["rare"] if i % 50 == 7 else [])
        boxes = (ALICE, BOB) if i % 5 == 0 else (ALICE,)
        messages.append(
            archived(
                f"m{i:04d}",
                NOW + i * 60,
                boxes,
                from_text="Zed <zed@z.example>" if i % 7 == 0 else "",
                recipients="Bob <bob@a.example>" if i % 4 == 0 else "",
                body=" ".join(words) or "none",
                attachments=["a.pdf"] if i % 3 else [],
            )
        )
    await gatherResults([archive.add(m) for m in messages])
    newest_first = sorted(messages, key=lambda m: (m.received_at, m.id), reverse=True)
    for scope in (
        ArchiveScope(mailbox=ALICE),
        ArchiveScope(mailbox=BOB),
        ArchiveScope(domain="a.example"),
    ):
        for search in (
            ArchiveQuery(words=("broad",)),
            ArchiveQuery(words=("rare",)),
            ArchiveQuery(words=("rare", "broad")),
            ArchiveQuery(words=("broad",), has_attachment=False, after=NOW + 3000),
            ArchiveQuery(sender=("zed",)),
            ArchiveQuery(sender=("zed",), has_attachment=True, before=NOW + 15000),
            ArchiveQuery(words=("broad",), recipient=("bob",)),
        ):
            wanted = [
                m.id
                for m in newest_first
                if all(w in m.text.body.split() for w in search.words)
                and (scope.mailbox is None or scope.mailbox in m.mailboxes)
                and (not search.sender or "zed" in m.text.sender)
                and (
                    not search.recipient
                    or "bob" in m.text.recipients
                    or (BOB in m.mailboxes and scope.mailbox in (None, BOB))
                )
                and (search.has_attachment in (None, m.text.has_attachment))
                and (search.after is None or m.received_at >= search.after)
                and (search.before is None or m.received_at < search.before)
            ]
            got: list[str] = []
            cursor = None
            while True:
                page = await archive.search(scope, search, cursor, limit=23)
                got += [item.id for item in page.items]
                cursor = page.next
                if cursor is None:
                    break
            assert got == wanted, (scope, search)
            assert await archive.count(scope, search) == len(wanted), (scope, search)

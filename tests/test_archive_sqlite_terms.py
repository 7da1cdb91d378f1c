"""
The sqlite archive's terms (schema 4): a word's start asked of FTS5 as the
exact terms that begin with it, and the writer's notes of those terms.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from mailhub.model import ArchiveQuery, ArchiveScope
from mailhub.plugins.sqlite.archive import SqliteArchive, merge, plugin
from mailhub.plugins.sqlite.archive import terms as archive_terms
from mailhub.plugins.sqlite.archive.search import Search
from mailhub.plugins.sqlite.archive.terms import Terms, _words
from mailhub.testing.archive_contract import ALICE, NOW, archived


def open_archive(path: Path) -> SqliteArchive:
    return plugin.make({"path": path.name, "config_dir": str(path.parent)}, reactor)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "archive.db"


@pytest.fixture
def archive(db: Path) -> Iterator[SqliteArchive]:
    archive = open_archive(db)
    yield archive
    pytest_twisted.blockon(archive.close())


async def bound(archive: SqliteArchive, query: ArchiveQuery) -> Search:
    """The search of ``query`` in ALICE's mailbox, its full-text condition written as the archive would."""
    search = Search.of(ArchiveScope(mailbox=ALICE), query)

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
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE terms")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()

    archive = open_archive(db)
    try:
        assert (await bound(archive, ArchiveQuery(words=("quart",)))).params["match"] == (
            '("quart" OR "quarterly")'
        )
        assert await found(archive, ArchiveQuery(words=("quart",))) == ["a"]
        [(version,)] = await archive._read(lambda c: c.execute("PRAGMA user_version").fetchall())
        assert version == 4
    finally:
        await archive.close()


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
    conn.execute("DELETE FROM t")
    conn.execute("INSERT INTO t (body) VALUES (?)", (text,))
    return {term for (term,) in conn.execute("SELECT term FROM v")}


@pytest.fixture(scope="module")
def fts5() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5 (body, tokenize = 'unicode61 remove_diacritics 2')")
    conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab (t, 'row')")
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
    noted = _words([text])
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


# -- the text index merged into one segment --------------------------------------


@pytest_twisted.ensureDeferred
async def test_merge_steps_leave_one_segment_and_the_same_answers(
    archive: SqliteArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Small commits leave the text index in many segments; the merger's steps,
    each a bounded writer job, merge them into one, and every search answers
    as before.
    """
    filler = " ".join(f"filler{n}" for n in range(300))
    for i in range(40):  # one commit each: a segment each, until FTS5 merges some
        await archive.add(
            archived(f"m{i:02d}", NOW + i, body=f"word{i % 7} common report{i} {filler}{i}")
        )
    before = await archive._read(merge.segments)
    assert len(before) > 2
    query = ArchiveQuery(words=("word3", "rep"))
    wanted = await found(archive, query)
    assert wanted == [f"m{i:02d}" for i in range(40) if i % 7 == 3]
    steps = 1
    while await archive.run(merge.merge_step(steps > 1, pages=1)) and steps < 1000:
        steps += 1
    assert steps > 1  # a step at a time
    assert len(await archive._read(merge.segments)) == 1
    assert await found(archive, query) == wanted
    # Merged: nothing to do until the others hold a tenth of it again.
    assert await archive.run(merge.merge_step(False)) is False


def test_the_merger_checks_then_steps_until_done_then_checks_again() -> None:
    clock = Clock()
    answers = [False, True, True, False, True]
    asked: list[bool] = []

    class Writer:
        def submit(self, job: Any) -> Any:
            asked.append(job.__closure__[0].cell_contents)  # the step's ``merging``
            return succeed(answers.pop(0))

    merger = merge.IndexMerger(Writer(), clock)  # type: ignore[arg-type]
    merger.start()
    merger.start()  # once
    clock.advance(merge.CHECK_SECONDS - 1)
    assert asked == []
    clock.advance(1)
    assert asked == [False]  # not due
    clock.advance(merge.CHECK_SECONDS)
    assert asked == [False, False]  # due: it merged a step
    clock.advance(merge.STEP_PAUSE)
    assert asked == [False, False, True]
    clock.advance(merge.STEP_PAUSE)
    assert asked == [False, False, True, True]  # done
    clock.advance(merge.STEP_PAUSE)
    assert len(asked) == 4
    merger.stop()
    clock.advance(merge.CHECK_SECONDS)
    assert len(asked) == 4
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_the_merger_runs_where_the_archive_is_added_to(db: Path) -> None:
    """A process that only reads the archive (the web pages, the shell) never merges; close stops it."""
    archive = open_archive(db)
    try:
        await archive.search(ArchiveScope(mailbox=ALICE), ArchiveQuery(), None, 10)
        assert archive._merger._call is None
        await archive.add(archived("a"))
        assert archive._merger._call is not None and archive._merger._call.active()
    finally:
        await archive.close()
    assert archive._merger._call is None

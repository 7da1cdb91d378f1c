"""
The terms of the sqlite archive's text index (the ``terms`` table, schema
4): noted by the writer as messages are added, read by a search to ask FTS5
for the start of a word as the exact terms that begin with it.

Why: FTS5 answers a prefix query (``"rep" *``) by merging the lists of every
term with that start over the whole index, whatever rowids the query asks
about; at a million messages that is 30-140 ms for a frequent word, paid by
every chunk of a search's walk (``search.Search._walk``).  An exact term
(``"report"``) is read only over the rowids asked for: 0.2-2 ms.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable

from mailhub.model import archive_words

__all__ = ["MAX_EXPANSION", "Terms", "expand"]

#: A word's start that more terms than this begin with is asked of FTS5 as a
#: prefix: the merge costs less than so many lists read side by side.
MAX_EXPANSION = 64

#: How many terms the writer remembers having written (then it starts again).
_REMEMBERED = 500_000

# For ASCII text, FTS5's unicode61 tokenizer makes the same terms as this:
# runs of letters and digits, lower-cased.
_ASCII_WORD = re.compile(r"[a-z0-9]+")


def _words(texts: Iterable[str]) -> dict[str, int]:
    """The terms of ``texts`` as FTS5 makes them, each with whether that is certain."""
    found: dict[str, int] = {}
    for text in texts:
        if text.isascii():
            found.update(dict.fromkeys(_ASCII_WORD.findall(text.lower()), 1))
            continue
        # Whitespace separates terms for both; within a run that is not
        # ASCII, FTS5 may fold or split otherwise than the archive does.
        for run in text.split():
            if run.isascii():
                found.update(dict.fromkeys(_ASCII_WORD.findall(run.lower()), 1))
            else:
                for word in archive_words(run):
                    found[word] = 0
    return found


class Terms:
    """
    The writer's side: ``note`` writes the terms of a message's text that
    the ``terms`` table may lack.  It remembers what it wrote once the
    transaction is committed (``ended``), so that a term is written
    about once per process, not once per message.  Used on the writer
    thread only.
    """

    def __init__(self) -> None:
        self._known: dict[str, int] = {}
        self._pending: dict[str, int] = {}

    def note(self, conn: sqlite3.Connection, texts: Iterable[str]) -> None:
        """Write the terms of ``texts`` (a message's indexed columns) that are not known to be there."""
        known, pending = self._known, self._pending
        new = []
        for term, exact in _words(texts).items():
            have = pending.get(term)
            if have is None:
                have = known.get(term)
            if have is None or have > exact:
                new.append((term, exact))
        if not new:
            return
        conn.executemany(
            "INSERT INTO terms (term, exact) VALUES (?, ?)"
            " ON CONFLICT (term) DO UPDATE SET exact = 0 WHERE excluded.exact = 0",
            new,
        )
        pending.update(new)

    def ended(self, ok: bool) -> None:
        """
        The writer committed its transaction (``ok``), or rolled back all or
        part of it: what was written since is then forgotten (written again
        if seen again, which costs a lookup, not a wrong answer).
        """
        if ok:
            if len(self._known) + len(self._pending) > _REMEMBERED:
                self._known.clear()
            for term, exact in self._pending.items():
                self._known[term] = min(exact, self._known.get(term, 1))
        self._pending.clear()


def expand(conn: sqlite3.Connection, word: str) -> list[str] | None:
    """
    The terms of the ``terms`` table that ``word`` (one ASCII term) is the
    start of, itself first whether there or not; ``None`` if FTS5 must be
    asked for the prefix instead (more than ``MAX_EXPANSION``, or a term
    the archive only folded).
    """
    upper = word[:-1] + chr(ord(word[-1]) + 1)
    rows = conn.execute(
        "SELECT term, exact FROM terms WHERE term >= ? AND term < ? LIMIT ?",
        (word, upper, MAX_EXPANSION + 2),
    ).fetchall()
    longer = [term for term, _ in rows if term != word]
    if len(longer) > MAX_EXPANSION or any(exact == 0 for _, exact in rows):
        return None
    return [word, *longer]

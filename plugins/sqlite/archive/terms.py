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
# runs of letters and digits, lower-cased; every other octet a separator.
_SEPARATORS = bytes(
    c if chr(c).isascii() and chr(c).isalnum() else 0x20 for c in range(256)
).lower()


def _ascii_terms(text: str) -> set[bytes]:
    return set(text.encode("ascii").translate(_SEPARATORS).lower().split())


def _terms(text: str) -> tuple[set[bytes], set[str]]:
    """
    The terms of ``text``: those certainly FTS5's (ASCII, as bytes), and
    those only the archive's folding of a word.
    """
    if text.isascii():
        return _ascii_terms(text), set()
    exact: set[bytes] = set()
    folded: set[str] = set()
    # Whitespace separates terms for both; within a run that is not ASCII,
    # FTS5 may fold or split otherwise than the archive does.
    for run in text.split():
        if run.isascii():
            exact |= _ascii_terms(run)
        else:
            folded.update(archive_words(run))
    return exact, folded


class Terms:
    """
    The writer's side: ``note`` writes the terms of a message's text that
    the ``terms`` table may lack.  It remembers what it wrote once the
    transaction is committed (``ended``), so that a term is written about
    once per process, not once per message.  Used on the writer thread
    only.
    """

    def __init__(self) -> None:
        self._known: set[bytes] = set()
        self._known_folded: set[str] = set()
        self._pending: set[bytes] = set()
        self._pending_folded: set[str] = set()

    def note(self, conn: sqlite3.Connection, texts: Iterable[str]) -> None:
        """Write the terms of ``texts`` (a message's indexed columns) that are not known to be there."""
        exact, folded = _terms("\n".join(texts))
        new = exact - self._known - self._pending
        new_folded = folded - self._known_folded - self._pending_folded
        if not new and not new_folded:
            return
        conn.executemany(
            "INSERT INTO terms (term, exact) VALUES (?, ?)"
            " ON CONFLICT (term) DO UPDATE SET exact = 0 WHERE excluded.exact = 0",
            [*((term.decode(), 1) for term in new), *((term, 0) for term in new_folded)],
        )
        self._pending |= new
        self._pending_folded |= new_folded

    def ended(self, ok: bool) -> None:
        """
        The writer committed its transaction (``ok``), or rolled back all or
        part of it: what was written since is then forgotten (written again
        if seen again, which costs a lookup, not a wrong answer).
        """
        if ok:
            if len(self._known) + len(self._pending) > _REMEMBERED:
                self._known.clear()
                self._known_folded.clear()
            self._known |= self._pending
            self._known_folded |= self._pending_folded
        self._pending.clear()
        self._pending_folded.clear()


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

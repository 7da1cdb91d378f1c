"""
The sqlite archive's searches: the SQL of a search or count (keyset pages on
``(received_at, id)``, user text only inside quoted FTS5 strings) and the
chunked walk of a full-text search over its scope.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from attrs import Factory, define

from mailhub.model import (
    Address,
    ArchivePage,
    ArchiveQuery,
    ArchiveScope,
    archive_words,
    archive_words_occur,
    decode_archive_cursor,
    encode_archive_cursor,
)

from .rows import (
    SCOPE_MARK,
    SUMMARY_COLUMNS,
    address_of,
    as_tuple,
    clean,
    domain_token,
    mailboxes_of,
    scope_token,
    summary_of,
)
from .terms import expand

__all__ = ["Search", "fts_string"]

#: A full-text search walks its scope a chunk of rows at a time, this many
#: first, then chunks sized for the density seen while the walk is expected
#: to fill the page within ``_WALK_LIMIT`` rows (``_SPARSE_LIMIT`` when the
#: rows are asked about one by one); beyond, it reads the index's whole list
#: of matches.  When FTS5 is asked a prefix, which it merges whatever rows
#: are asked about, one chunk more at most.
_FIRST_CHUNK = 128
_WALK_LIMIT = 20_000
_SPARSE_LIMIT = 2_000
#: A chunk whose rowids spread over more than this many times its rows, per
#: term asked, is asked about row by row (FTS5 seeks each row in each term's
#: lists), not as a range of rowids (FTS5 reads its lists over the range: an
#: ordinary mailbox's 128 messages span a tenth of a large archive).
_SPARSE = 64
#: Up to this many matches in the whole index, a search starts from them
#: (``_DRIVEN``): their messages, then those in scope, sorted.
_FEW = 5000
#: ... asked only when the first chunk found fewer matches than this.
_FEW_SEEN = 4
_DRIVEN = "driven"


def fts_string(term: str, prefix: bool) -> str:
    """
    ``term`` as one FTS5 string: quoted, its quotes doubled, so that nothing
    in it is syntax; the tokenizer splits it into the words of a phrase.
    """
    return '"' + term.replace('"', '""') + '"' + (" *" if prefix else "")


@define
class Search:
    """The SQL of one search or count: its conditions and parameters."""

    scope: ArchiveScope
    query: ArchiveQuery
    conditions: list[str]
    params: dict[str, Any]
    #: The columns of the (received_at, id) order.
    time: str
    id: str
    #: How many of ``conditions`` a walk of the scope's index checks itself
    #: (the scope, the time range, attachments): the text index is asked
    #: only about the rows that meet them.
    walked: int = 0
    #: Whether ``params["match"]`` is a full-text condition every result must meet.
    matches: bool = False
    #: Whether that condition is on every column (for a field's words, FTS5
    #: reads positions to tell the column: a walk of them is kept short,
    #: and left at once for their whole list where the scope is sparse).
    everywhere: bool = False
    #: The full-text conditions, by parameter: ``(column filter, term,
    #: whether the last word may be a start)``, all to be met; ``bind``
    #: writes them into ``params``.
    texts: dict[str, list[tuple[str, str, bool]]] = Factory(dict)
    #: Whether ``bind`` asked FTS5 for a prefix (each use merges its lists).
    merged: bool = False
    #: How many terms ``bind`` asked FTS5 about.
    terms: int = 0
    #: For a search of one mailbox or domain, its term in the index's
    #: ``scope`` column (``rows.scope_token``): ``bind`` adds it to the
    #: full-text condition, so that FTS5 itself keeps to the scope's
    #: messages (and reads a phrase's positions only in them).
    scope_term: str | None = None

    @classmethod
    def of(cls, scope: ArchiveScope, query: ArchiveQuery) -> Search:
        params: dict[str, Any] = {}
        conditions: list[str] = []
        if scope.mailbox is not None:
            conditions.append("b.mailbox = :mailbox")
            params["mailbox"] = clean(str(scope.mailbox))
            time_column, id_column = "b.received_at", "b.message_id"
        elif scope.domain is not None:
            conditions.append("b.domain = :domain")
            params["domain"] = scope.domain
            time_column, id_column = "b.received_at", "b.message_id"
        else:
            time_column, id_column = "m.received_at", "m.id"
        if query.before is not None:
            conditions.append(f"{time_column} < :before")
            params["before"] = query.before
        if query.after is not None:
            conditions.append(f"{time_column} >= :after")
            params["after"] = query.after
        if query.has_attachment is not None:
            conditions.append("m.has_attachment = :has_attachment")
            params["has_attachment"] = int(query.has_attachment)
        walked = len(conditions)

        match: list[tuple[str, str, bool]] = []
        for word in query.words:
            if archive_words(word):
                match.append(("", word, True))
        for phrase in query.phrases:
            if archive_words(phrase):
                match.append(("", phrase, False))
        for column, terms in (("sender", query.sender), ("subject", query.subject)):
            for term in terms:
                if archive_words(term):
                    match.append((f"{{{column}}} : ", term, True))
        texts: dict[str, list[tuple[str, str, bool]]] = {}
        for n, term in enumerate(query.recipient):
            wanted = archive_words(term)
            if not wanted:
                continue
            in_text = ("{recipients} : ", term, True)
            if scope.mailbox is not None:
                # The one mailbox in scope either matches, or only the text can.
                if not _mailbox_matches(wanted, scope.mailbox):
                    match.append(in_text)
                continue
            texts[f"r{n}"] = [in_text]
            params[f"rw{n}"] = "% " + " ".join(wanted) + "%"
            in_domain = "" if scope.domain is None else " AND r.domain = :domain"
            conditions.append(
                f"(+m.seq IN (SELECT rowid FROM text_index WHERE text_index MATCH :r{n})"
                f" OR EXISTS (SELECT 1 FROM mailboxes r WHERE r.message_id = m.id{in_domain}"
                f" AND (' ' || r.words) LIKE :rw{n}))"
            )
        everywhere = not any(column for column, _, _ in match)
        if match:
            texts["match"] = match
        return cls(
            scope,
            query,
            conditions,
            params,
            time_column,
            id_column,
            walked,
            bool(match),
            everywhere,
            texts,
            scope_term=_scope_term(scope, params) if match else None,
        )

    @property
    def scope_match(self) -> str:
        """The full-text condition that keeps to ``scope_term``'s messages."""
        assert self.scope_term is not None
        return f"{{scope}} : {fts_string(self.scope_term, False)}"

    def bind(self, conn: sqlite3.Connection) -> None:
        """
        Write the full-text conditions into ``params``, each word's start as
        the terms that begin with it where the archive knows them
        (``terms.expand``), else as an FTS5 prefix query; count the terms
        asked (``terms``) and whether FTS5 is asked a prefix (``merged``).
        """
        for name, parts in self.texts.items():
            if name in self.params:
                continue
            asked = [(column, *_fts(conn, term, prefix)) for column, term, prefix in parts]
            self.params[name] = " AND ".join(f"{column}({text})" for column, text, _, _ in asked)
            if name == "match" and self.scope_term is not None:
                self.params[name] += " AND " + self.scope_match
            self.terms += sum(n for _, _, n, _ in asked)
            self.merged = self.merged or any(merged for _, _, _, merged in asked)

    def source(self, rowids: str = "") -> str:
        """
        The ``FROM`` clause; with ``rowids`` ``_DRIVEN``, from the text
        index's list of matches (few) to their messages and mailboxes.
        """
        if rowids == _DRIVEN:
            driven = (
                "FROM (SELECT rowid AS seq FROM text_index WHERE text_index MATCH :match) f"
                " CROSS JOIN messages m ON m.seq = f.seq"
            )
            if self.scope.mailbox is None and self.scope.domain is None:
                return driven
            # By message: the planner would rather walk the domain for each.
            return (
                driven + " CROSS JOIN mailboxes b INDEXED BY mailboxes_message"
                " ON b.message_id = m.id"
            )
        if self.scope.mailbox is None and self.scope.domain is None:
            return "FROM messages m"
        return "FROM mailboxes b JOIN messages m ON m.id = b.message_id"

    def few(self, conn: sqlite3.Connection) -> bool:
        """
        Whether the text index lists at most ``_FEW`` messages for the
        full-text condition: when one of its terms (a word, a word's
        start, a word of a phrase) is in at most that many, each counted
        with a ``LIMIT`` (a phrase of two frequent words that seldom follow
        each other is counted as frequent: its own count would read every
        message with both).
        """
        sql = (
            "SELECT count(*) FROM (SELECT rowid FROM text_index WHERE text_index MATCH :match"
            " LIMIT :few)"
        )
        if self.scope_term is not None:
            # A mailbox (or domain) of at most that many messages.
            if int(conn.execute(sql, {"match": self.scope_match, "few": _FEW + 1}).fetchone()[0]) <= _FEW:
                return True
        for _column, term, prefix in self.texts.get("match", ()):
            parts = [(term, True)] if prefix else [(w, False) for w in archive_words(term)]
            for word, start in parts:
                # Without its column: as many or more, and no positions to read.
                match = f"({_fts(conn, word, start)[0]})"
                if int(conn.execute(sql, {"match": match, "few": _FEW + 1}).fetchone()[0]) <= _FEW:
                    return True
        return False

    def where(self, extra: Sequence[str] = (), rowids: str = "") -> str:
        """
        The ``WHERE`` clause: every condition, ``extra``, and the full-text
        one (its rowids limited by ``rowids``, a condition on ``rowid``).
        """
        conditions = [*self.conditions, *extra]
        if self.matches and rowids != _DRIVEN:
            conditions.append(
                "+m.seq IN (SELECT rowid FROM text_index WHERE text_index MATCH :match"
                + (f" AND {rowids}" if rowids else "")
                + ")"
            )
        return (" WHERE " + " AND ".join(conditions)) if conditions else ""

    def page(self, conn: sqlite3.Connection, cursor: str | None, limit: int) -> ArchivePage:
        self.bind(conn)
        params = dict(self.params)
        extra: list[str] = []
        if cursor is not None:
            params["cursor_time"], params["cursor_id"] = decode_archive_cursor(cursor)
            extra.append(f"({self.time}, {self.id}) < (:cursor_time, :cursor_id)")
        found: list[tuple[Sequence[Any], list[Address]]] = []
        # A field's own words asked as a prefix: their whole list, once,
        # costs less than chunks that each merge it.
        if self.matches and (self.everywhere or not self.merged):
            self._walk(conn, params, extra, found, limit)
        else:
            self._collect(conn, params, extra, "", found, limit)
        items = [summary_of(row, sorted(mailboxes)) for row, mailboxes in found[:limit]]
        more = len(found) > limit and items
        next_cursor = encode_archive_cursor(items[-1].received_at, items[-1].id) if more else None
        return ArchivePage(as_tuple(items), next_cursor)

    def _collect(
        self,
        conn: sqlite3.Connection,
        params: dict[str, Any],
        extra: Sequence[str],
        rowids: str,
        found: list[tuple[Sequence[Any], list[Address]]],
        limit: int,
    ) -> None:
        """Add to ``found`` the next results (newest first) until it holds ``limit + 1``."""
        order = f" ORDER BY {self.time} DESC, {self.id} DESC"
        params = {**params, "limit": limit + 1 - len(found)}
        where = self.where(extra, rowids)
        source = self.source(rowids)
        if self.scope.mailbox is not None:
            sql = f"SELECT {SUMMARY_COLUMNS} {source}{where}{order} LIMIT :limit"
            found += [(row, [self.scope.mailbox]) for row in conn.execute(sql, params)]
        elif self.scope.domain is not None:
            # One row per mailbox of the domain; a message's rows come together.
            sql = f"SELECT {SUMMARY_COLUMNS}, b.mailbox {source}{where}{order}"
            for row in conn.execute(sql, params):
                if found and found[-1][0][0] == row[0]:
                    found[-1][1].append(address_of(row[8]))
                    continue
                if len(found) > limit:
                    break
                found.append((row, [address_of(row[8])]))
        else:
            sql = f"SELECT {SUMMARY_COLUMNS} {source}{where}{order} LIMIT :limit"
            found += [
                (row, mailboxes_of(conn, row[0]) if len(found) + i < limit else [])
                for i, row in enumerate(conn.execute(sql, params).fetchall())
            ]

    def _chunk(
        self, conn: sqlite3.Connection, params: dict[str, Any], extra: Sequence[str], size: int
    ) -> tuple[int, float, str, int, int, str] | None:
        """
        The next ``size`` rows of the scope in the search's order, whatever
        the text: how many, the last one's (received_at, id), the least and
        greatest rowid of their messages and the rowids as a JSON array;
        ``None`` at the scope's end.
        """
        conditions = [*self.conditions[: self.walked], *extra]
        where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
        sql = (
            f"WITH c AS MATERIALIZED (SELECT {self.time} AS t, {self.id} AS i, m.seq AS seq"
            f" {self.source()}{where} ORDER BY {self.time} DESC, {self.id} DESC LIMIT :chunk)"
            " SELECT (SELECT count(*) FROM c), t, i, (SELECT min(seq) FROM c),"
            " (SELECT max(seq) FROM c), (SELECT json_group_array(seq) FROM c)"
            " FROM c ORDER BY t, i LIMIT 1"
        )
        row = conn.execute(sql, {**params, "chunk": size}).fetchone()
        return None if row is None else tuple(row)

    def _walk(
        self,
        conn: sqlite3.Connection,
        params: dict[str, Any],
        extra: list[str],
        found: list[tuple[Sequence[Any], list[Address]]],
        limit: int,
    ) -> None:
        """
        Find a page of a full-text search by walking the scope newest first,
        a chunk of rows at a time, asking the text index only about each
        chunk's messages: by their range of rowids (archive rowids grow with
        time) when the chunk is dense in it, else one by one (``_SPARSE``).
        The cost follows the page, not how many messages match, for a word
        in most messages.  If the first chunk does not fill the page and a
        term of the search is in at most ``_FEW`` messages, the rest starts
        from the index's matches; else more chunks, sized for the density
        seen, while the page is expected to fill within ``_WALK_LIMIT`` rows
        (``_SPARSE_LIMIT`` one by one, or for a field's words), then the
        whole list of matches; a field's words in a sparse chunk go to their
        whole list at once.

        A word's start FTS5 is asked as a prefix (``bind``) costs a merge of
        the prefix's lists over the whole index for every chunk: then one
        more chunk at most.
        """
        walked = 0
        chunks = 0
        size = max(_FIRST_CHUNK, 2 * (limit + 1))
        while len(found) <= limit:
            chunk = self._chunk(conn, params, extra, size)
            if chunk is None:
                return
            n, last_time, last_id, low, high, seqs = chunk
            within = [
                *extra,
                f"({self.time}, {self.id}) >= (:chunk_time, :chunk_id)",
            ]
            chunk_params = {**params, "chunk_time": last_time, "chunk_id": last_id}
            sparse = high - low + 1 > _SPARSE * n * max(self.terms, 1)
            if sparse and (not self.everywhere or self.scope_term is not None):
                # A field's words: FTS5 reads their positions to tell the
                # column, a seek for each row; their whole list costs less.
                # So does the list of a mailbox's matches, which FTS5 finds
                # by the mailbox's term (a phrase: 6 ms over a mailbox of
                # 1,000 in an archive of 1,000,000, against 70 asked row by row).
                self._collect(conn, params, extra, "", found, limit)
                return
            if sparse:
                chunk_params["seqs"] = seqs
                fence = "rowid IN (SELECT value FROM json_each(:seqs))"
            else:
                chunk_params.update(low=low, high=high)
                fence = "rowid BETWEEN :low AND :high"
            self._collect(conn, chunk_params, within, fence, found, limit)
            if len(found) > limit or n < size:
                return
            walked += n
            chunks += 1
            # From here on, only what comes after this chunk.
            params = {**params, "cursor_time": last_time, "cursor_id": last_id}
            if not any(":cursor_time" in e for e in extra):
                extra = [*extra, f"({self.time}, {self.id}) < (:cursor_time, :cursor_id)"]
            if self.merged and chunks > 1:
                self._collect(conn, params, extra, "", found, limit)
                return
            if chunks == 1 and len(found) < _FEW_SEEN and self.few(conn):
                self._collect(conn, params, extra, _DRIVEN, found, limit)
                return
            density = max(len(found), 1) / walked
            size = int((limit + 1 - len(found)) / density * 1.5) + _FIRST_CHUNK
            # A field's words, like rows asked about one by one, cost more
            # a row: a shorter walk before their whole list.
            if walked + size > (_SPARSE_LIMIT if sparse or not self.everywhere else _WALK_LIMIT):
                self._collect(conn, params, extra, "", found, limit)
                return

    def count(self, conn: sqlite3.Connection) -> int:
        self.bind(conn)
        what = "count(*)" if self.scope.domain is None else "count(DISTINCT b.message_id)"
        if not self.matches:
            sql = f"SELECT {what} {self.source()}{self.where()}"
            return int(conn.execute(sql, self.params).fetchone()[0])
        if self.few(conn):
            sql = f"SELECT {what} {self.source(_DRIVEN)}{self.where((), _DRIVEN)}"
            return int(conn.execute(sql, self.params).fetchone()[0])
        # Exact, with the whole list of matches: a count needs every one.
        sql = f"SELECT {what} {self.source()}{self.where()}"
        return int(conn.execute(sql, self.params).fetchone()[0])


def _fts(conn: sqlite3.Connection, term: str, prefix: bool) -> tuple[str, int, bool]:
    """
    ``term`` as FTS5 query text (its last word a start if ``prefix``), how
    many terms that asks about, and whether FTS5 is asked a prefix.

    What was typed loses every ``SCOPE_MARK``: FTS5 would keep it in a
    term (``unicode61`` counts private-use characters as letters), and a
    typed ``SCOPE_MARK`` and the start of an address's hash (which anyone
    can compute) would match that mailbox's scope tokens, telling a user
    which of the messages she may see went to whom (a Bcc too).  No archive
    counts the mark as part of a word (``archive_words``).
    """
    term = term.replace(SCOPE_MARK, " ")
    words = archive_words(term)
    if prefix and term.isascii():
        expanded = expand(conn, words[-1])
        if expanded is not None:
            text = " OR ".join(fts_string(" ".join([*words[:-1], t]), False) for t in expanded)
            return text, len(words) - 1 + len(expanded), False
    return fts_string(term, prefix), len(words), prefix


def _scope_term(scope: ArchiveScope, params: dict[str, Any]) -> str | None:
    """The scope's term in the text index's ``scope`` column: a mailbox's, a domain's, or none for the archive."""
    if scope.mailbox is not None:
        return scope_token(params["mailbox"])
    if scope.domain is not None:
        return domain_token(scope.domain)
    return None


def _mailbox_matches(wanted: Sequence[str], mailbox: Address) -> bool:
    """Whether the words ``wanted`` occur in a row in ``mailbox``, the last as a start."""
    return archive_words_occur(wanted, archive_words(str(mailbox)))

"""
The ``postgresql`` archive's text search: the ``tsvector`` of a message and
the ``tsquery`` of a search, made in Python (see the ``archive`` module), and
the SQL that finds a page of a scope's matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from mailhub.model import (
    ArchivePage,
    ArchiveQuery,
    ArchiveScope,
    ArchiveSummary,
    archive_words,
    encode_archive_cursor,
)

from .values import as_tuple, decode_text, parse_address

__all__ = [
    "FEW", "MAX_INDEXED_BODY", "MAX_LEXEME", "MAX_POSITION", "MAX_POSITIONS", "Nothing",
    "from_matches", "matching", "page", "plan", "summaries", "tsquery", "tsvector",
]

#: Characters of a message's body text that are indexed (a ``tsvector``
#: holds at most 1 MB).
MAX_INDEXED_BODY = 256 * 1024
#: PostgreSQL's limits: a lexeme's bytes, a position, positions per lexeme.
MAX_LEXEME = 2046
MAX_POSITION = 16383
MAX_POSITIONS = 255
#: A search whose words the planner expects in at most this many messages
#: starts from them (``from_matches``).
FEW = 5000


# -- words, vectors and queries --------------------------------------------------


def _lexeme(word: str) -> str:
    return "'" + word.replace("\\", "\\\\").replace("'", "''") + "'"


def tsvector(fields: Iterable[tuple[str, Iterable[str]]]) -> str:
    """
    The ``tsvector`` text of ``(weight, text)`` fields, in order: each
    field's words at consecutive positions, one position left free between
    fields.
    """
    positions: dict[str, dict[int, str]] = {}
    position = 0
    for weight, texts in fields:
        for text in texts:
            position += 1  # the gap between two fields
            for word in archive_words(text):
                position += 1
                if len(word.encode()) > MAX_LEXEME:
                    continue
                at = positions.setdefault(word, {})
                if len(at) < MAX_POSITIONS:
                    at.setdefault(min(position, MAX_POSITION), weight)
    return " ".join(
        _lexeme(word) + ":" + ",".join(f"{p}{w}" for p, w in at.items())
        for word, at in positions.items()
    )


def _chain(tokens: Sequence[str], weight: str, prefix: bool) -> str:
    """``'a':W <-> 'b':W <-> 'c':*W``: consecutive words, the last maybe a start."""
    terms = []
    for i, token in enumerate(tokens):
        flags = ("*" if prefix and i == len(tokens) - 1 else "") + weight
        terms.append(_lexeme(token) + (":" + flags if flags else ""))
    return "(" + " <-> ".join(terms) + ")" if len(terms) > 1 else terms[0]


class Nothing(Exception):
    """A term no indexed word can match (a word longer than PostgreSQL indexes)."""


def _tokens(text: str) -> list[str]:
    """
    The words of a term; none if it has no letter or digit (it matches
    everything).

    :raises Nothing: if a word is longer than PostgreSQL indexes.
    """
    tokens = archive_words(text)
    if any(len(t.encode()) > MAX_LEXEME for t in tokens):
        raise Nothing(text)
    return tokens


def tsquery(query: ArchiveQuery) -> tuple[str | None, list[tuple[str, str]]]:
    """
    The ``tsquery`` texts of ``query``'s text parts.

    :returns: one ``tsquery`` that a message's vector must match (words,
        phrases, ``sender``, ``subject``), or ``None``; and for each
        ``recipient`` value, the ``tsquery`` for the ``To:``/``Cc:`` text and
        the one for a mailbox (either may match).
    :raises Nothing: if a term cannot match anything.
    """
    terms: list[str] = []
    for parts, weight, prefix in (
        (query.words, "", True),
        (query.phrases, "", False),
        (query.sender, "B", True),
        (query.subject, "A", True),
    ):
        for part in parts:
            tokens = _tokens(part)
            if tokens:
                terms.append(_chain(tokens, weight, prefix))
    recipients: list[tuple[str, str]] = []
    for part in query.recipient:
        tokens = _tokens(part)
        if tokens:
            recipients.append((_chain(tokens, "C", True), _chain(tokens, "", True)))
    return (" & ".join(terms) if terms else None), recipients


# -- finding a page of matches -----------------------------------------------------


def matching(
    scope: ArchiveScope,
    query: ArchiveQuery,
    after: tuple[float, str] | None = None,
) -> tuple[str, sql.Composable, list[Any]] | None:
    """
    What finds the messages of ``scope`` that match ``query``.

    :returns: the alias whose ``received_at`` and ``id`` page (``b``, the
        mailboxes, for a mailbox or a domain; ``m``, the messages, for
        the whole archive), the ``FROM ... WHERE ...`` clause and its
        parameters; ``None`` if nothing can match.  With ``after``, only
        what comes after that (``received_at``, id) in the search's order.
    """
    try:
        vector_query, recipients = tsquery(query)
    except Nothing:
        return None
    # Which rows of the scope (on the alias that pages), then what their
    # messages must hold.
    in_scope_conditions: list[str] = []
    in_scope_params: list[Any] = []
    conditions: list[str] = []
    params: list[Any] = []
    in_scope, scope_param = "", ""
    if scope.mailbox is not None:
        key = "b"
        in_scope_conditions.append("b.mailbox = %s")
        in_scope_params.append(str(scope.mailbox))
        in_scope, scope_param = " AND x.mailbox = %s", str(scope.mailbox)
    elif scope.domain is not None:
        key = "b"
        in_scope_conditions.append("b.domain = %s")
        in_scope_params.append(scope.domain)
        in_scope, scope_param = " AND x.domain = %s", scope.domain
    else:
        key = "m"
    if query.after is not None:
        in_scope_conditions.append(f"{key}.received_at >= %s")
        in_scope_params.append(query.after)
    if query.before is not None:
        in_scope_conditions.append(f"{key}.received_at < %s")
        in_scope_params.append(query.before)
    if after is not None:
        in_scope_conditions.append(f"({key}.received_at, {key}.id) < (%s, %s)")
        in_scope_params += [after[0], after[1]]
    if query.has_attachment is not None:
        conditions.append("m.has_attachment = %s")
        params.append(query.has_attachment)
    if vector_query is not None:
        conditions.append("m.tsv @@ %s::tsquery")
        params.append(vector_query)
    for to_cc, plain in recipients:
        # The To:/Cc: text, or a mailbox of the message within the scope
        # (never another's: a Bcc stays hidden).
        conditions.append(
            "(m.tsv @@ %s::tsquery OR EXISTS (SELECT 1 FROM mailboxes x"
            f" WHERE x.id = m.id{in_scope} AND x.tsv @@ %s::tsquery))"
        )
        params += [to_cc, scope_param, plain] if in_scope else [to_cc, plain]
    if key == "m":
        source = "FROM messages m"
    else:
        source = "FROM mailboxes b JOIN messages m ON m.id = b.id"
    conditions = in_scope_conditions + conditions
    where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
    return key, sql.SQL(source + where), in_scope_params + params  # type: ignore[arg-type]


def plan(conn: psycopg.Connection[Any], query: ArchiveQuery) -> str:
    """
    How to find ``query`` in a mailbox or a domain, from the number of
    messages the planner expects its words in (the vectors' statistics,
    without running the query): ``"few"`` when at most ``FEW``, to start
    from them; else ``""``, the planner's choice.  (Walking the scope
    newest first for words in most messages was tried, 7036850, and was
    slower than the planner's own plan: see bench/README.md.)
    """
    try:
        vector_query, _ = tsquery(query)
    except Nothing:
        return ""
    if vector_query is None:
        return ""
    explained = conn.execute(
        "EXPLAIN (FORMAT JSON) SELECT 1 FROM messages WHERE tsv @@ %s::tsquery",
        (vector_query,),
    ).fetchone()
    if explained is None:
        return ""
    return "few" if float(explained[0][0]["Plan"]["Plan Rows"]) <= FEW else ""


def from_matches(conn: psycopg.Connection[Any]) -> None:
    """
    For this transaction, start from the GIN index's matches and look
    their mailboxes up by id: with a ``LIMIT``, the planner would walk a
    large mailbox testing every message for a word that is in few.
    """
    for setting in ("enable_seqscan", "enable_hashjoin", "enable_mergejoin"):
        conn.execute(sql.SQL("SET LOCAL {} = off").format(sql.Identifier(setting)))


def page(
    conn: psycopg.Connection[Any],
    scope: ArchiveScope,
    query: ArchiveQuery,
    after: tuple[float, str] | None,
    limit: int,
    fenced: bool = False,
) -> list[Any]:
    """
    The rows of a page and one more.  ``fenced``: every match found
    before the page is sorted (the planner then plans for all of them,
    not for the first ``limit``).
    """
    found = matching(scope, query, after)
    if found is None:
        return []
    key, clause, params = found
    # A message for two mailboxes of a domain is two rows: DISTINCT.
    distinct = "DISTINCT " if scope.mailbox is None and scope.domain is not None else ""
    template = (
        "SELECT * FROM (SELECT {distinct}{k}.received_at, {k}.id {clause}"
        " OFFSET 0) f ORDER BY f.received_at DESC, f.id DESC LIMIT %s"
        if fenced
        else "SELECT {distinct}{k}.received_at, {k}.id {clause}"
        " ORDER BY {k}.received_at DESC, {k}.id DESC LIMIT %s"
    )
    inner = sql.SQL(template).format(
        distinct=sql.SQL(distinct),
        k=sql.SQL(key),
        clause=clause,
    )
    params.append(limit + 1)
    own: list[Any] = []
    within = ""
    if scope.mailbox is not None:
        within = " AND x.mailbox = %s"
        own.append(str(scope.mailbox))
    elif scope.domain is not None:
        within = " AND x.domain = %s"
        own.append(scope.domain)
    return conn.execute(
        sql.SQL(
            "SELECT p.id, p.received_at, mm.from_text, mm.envelope_sender,"
            " mm.subject, mm.size, mm.has_attachment, mm.message_id,"
            " ARRAY(SELECT x.mailbox FROM mailboxes x WHERE x.id = p.id" + within + ""
            " ORDER BY x.mailbox)"
            " FROM ({page}) p JOIN messages mm ON mm.id = p.id"
            " ORDER BY p.received_at DESC, p.id DESC"
        ).format(page=inner),
        own + params,
        # Planned for these values each time: a prepared statement's
        # generic plan cannot tell a rare word from a common one.
        prepare=False,
    ).fetchall()


def summaries(rows: list[Any], limit: int) -> ArchivePage:
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        ArchiveSummary(
            id=r[0],
            received_at=r[1],
            sender=decode_text(r[2]) or r[3] or "",
            subject=decode_text(r[4]),
            mailboxes=as_tuple(parse_address(m) for m in r[8]),
            size=r[5],
            has_attachment=r[6],
            message_id=decode_text(r[7]),
        )
        for r in rows
    ]
    following = encode_archive_cursor(rows[-1][1], rows[-1][0]) if more and rows else None
    return ArchivePage(as_tuple(items), following)

"""
The ``postgresql`` archive's text search: the ``tsvector`` of a message and
the ``tsquery`` of a search, made in Python (see the ``archive`` module), and
the SQL that finds a page of a scope's matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from attrs import define
from psycopg import sql

from mailhub.model import (
    ArchivePage,
    ArchiveQuery,
    ArchiveScope,
    ArchiveSummary,
    archive_words,
    archive_words_occur,
    encode_archive_cursor,
)

from .values import as_tuple, decode_text, parse_address

__all__ = [
    "FEW", "MAX_INDEXED_BODY", "MAX_LEXEME", "MAX_POSITION", "MAX_POSITIONS", "Nothing",
    "FIELDS", "FIELDS_FEW", "SCOPE_LEXEMES", "Plan", "Terms", "WALK", "fields_query", "fields_vector", "from_matches",
    "matching", "page", "plan", "summaries", "terms", "tsvector",
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
#: A search whose field words the planner expects in at most this many
#: messages of its scope finds them by the fields' vectors alone (``plan``):
#: about 7 us a match at 1,000,000 messages, against a walk of the scope
#: that can pass thousands of messages between two rare matches (and
#: finds a page of frequent ones in 5-15 ms).
FIELDS_FEW = 6000


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


@define
class Terms:
    """
    The ``tsquery`` texts of a search's text parts, by the vector each is
    asked of.

    :ivar body: each word and phrase, asked of the message's vector (every
        field and the body).
    :ivar fields: ``sender`` and ``subject`` terms, asked of the fields'
        vector (``FIELDS``), which holds the subject, sender and recipients'
        words alone, with the same positions and weights.
    :ivar recipients: for each ``recipient`` value: the ``tsquery`` for the
        ``To:``/``Cc:`` text, the one for a mailbox's address, and its words.
    """

    body: list[str]
    fields: list[str]
    recipients: list[tuple[str, str, list[str]]]


@define(frozen=True)
class Plan:
    """
    How a search is run (``plan``).

    :ivar how: ``"few"``, from the index's matches of its rarer body words;
        ``"fields"``, by the fields' vectors alone; ``""``, the planner's
        choice (which walks the scope newest first).
    :ivar tested: body words tested in each match's vector rather than
        looked up in the index: a word in most messages is a list of most
        messages to merge (a word's start, ``'zotipi':*``, at 500,000: 40 ms)
        where a test of 300 vectors takes 5.
    """

    how: str = ""
    tested: tuple[str, ...] = ()


#: The planner's choice.
WALK = Plan()


def terms(query: ArchiveQuery) -> Terms:
    """
    The ``tsquery`` texts of ``query``'s text parts.

    :raises Nothing: if a term cannot match anything.
    """
    body: list[str] = []
    fields: list[str] = []
    for parts, weight, prefix, into in (
        (query.words, "", True, body),
        (query.phrases, "", False, body),
        (query.sender, "B", True, fields),
        (query.subject, "A", True, fields),
    ):
        for part in parts:
            tokens = _tokens(part)
            if tokens:
                into.append(_chain(tokens, weight, prefix))
    recipients: list[tuple[str, str, list[str]]] = []
    for part in query.recipient:
        tokens = _tokens(part)
        if tokens:
            recipients.append((_chain(tokens, "C", True), _chain(tokens, "", True), tokens))
    return Terms(body, fields, recipients)


# -- the fields' vector: what is asked of it, and how it is made ----------------------
#
# Beside the message's own vector, each message has a small one in
# ``fields``: its subject, sender and recipients' words (weights A, B, C,
# as in the message's vector) and lexemes naming where it is archived:
# ``@`` and a mailbox, ``@@`` and a domain, and ``@``, a domain, ``:`` and
# a word of one of the domain's mailboxes (``to:`` in a domain).  No word
# of a search starts with ``@``.  A field's words in a mailbox or a domain
# are then one GIN lookup that finds only the scope's matches; asked of the
# message's vector, they were the whole archive's matches of the word,
# each rechecked for its weight in a vector read from TOAST (bench/README.md).

#: The SQL for a message's scope lexemes, from its rows in ``mailboxes``
#: (``{id}``: the SQL naming the message's id).
SCOPE_LEXEMES = (
    "array_to_tsvector(ARRAY(SELECT DISTINCT s FROM mailboxes x,"
    " LATERAL (SELECT '@' || x.mailbox UNION ALL SELECT '@@' || x.domain"
    " UNION ALL SELECT '@' || x.domain || ':' || w FROM unnest(tsvector_to_array(x.tsv)) w)"
    " AS v(s) WHERE x.id = {id}))"
)
#: The fields' vector of a message from its own (``{tsv}``) and its mailboxes.
FIELDS = "ts_filter({tsv}, '{{a,b,c}}') || " + SCOPE_LEXEMES


def fields_vector(subject: str, senders: Sequence[str], recipients: str) -> str:
    """The fields' words of a new message, as in its vector (without the scope lexemes)."""
    return tsvector([("A", [subject]), ("B", senders), ("C", [recipients])])


def _in_scope(scope: ArchiveScope) -> str | None:
    if scope.mailbox is not None:
        return _lexeme("@" + str(scope.mailbox))
    if scope.domain is not None:
        return _lexeme("@@" + scope.domain)
    return None


def fields_query(scope: ArchiveScope, found: Terms) -> tuple[str | None, list[tuple[str, str]]]:
    """
    What is asked of the fields' vector for ``found`` in ``scope``.

    :returns: the ``tsquery`` text (``None`` if nothing is), and the
        recipients that must also be checked against the scope's mailboxes
        (``(to_cc, plain)``: the whole archive, or a domain and several words).
    """
    parts = list(found.fields)
    checked: list[tuple[str, str]] = []
    for to_cc, plain, tokens in found.recipients:
        if scope.mailbox is not None:
            # The scope's own address either matches or does not, for every message.
            if archive_words_occur(tokens, archive_words(str(scope.mailbox))):
                continue
            parts.append(to_cc)
        elif scope.domain is not None:
            words = [_lexeme(f"@{scope.domain}:{t}") for t in tokens]
            words[-1] += ":*"
            parts.append(f"({to_cc} | {' & '.join(words)})")
            if len(tokens) > 1:
                checked.append((to_cc, plain))  # the words' order is checked too
        else:
            checked.append((to_cc, plain))
    if not parts:
        return None, checked
    within = _in_scope(scope)
    return " & ".join(parts + ([within] if within else [])), checked


# -- finding a page of matches -----------------------------------------------------


def matching(
    scope: ArchiveScope,
    query: ArchiveQuery,
    after: tuple[float, str] | None = None,
    planned: Plan = WALK,
) -> tuple[str, sql.Composable, list[Any]] | None:
    """
    What finds the messages of ``scope`` that match ``query``.

    :param planned: ``"fields"``: if the query has field words
        (``fields_query``), find the scope's messages by the fields' vectors
        alone (their scope lexemes are kept exact by ``add`` and
        ``expire``); the body words in ``planned.tested`` are tested, not
        looked up.
    :returns: the alias whose ``received_at`` and ``id`` page (``b``, the
        mailboxes, for a mailbox or a domain; ``m``, the messages, for
        the whole archive; ``f``, the fields, planned ``"fields"``), the ``FROM
        ... WHERE ...`` clause and its parameters; ``None`` if nothing can
        match.  With ``after``, only what comes after that (``received_at``,
        id) in the search's order.
    """
    try:
        found = terms(query)
    except Nothing:
        return None
    fields, checked = fields_query(scope, found)
    by_fields = planned.how == "fields" and fields is not None
    # Which rows of the scope (on the alias that pages), then what their
    # messages must hold.
    in_scope_conditions: list[str] = []
    in_scope_params: list[Any] = []
    conditions: list[str] = []
    params: list[Any] = []
    column = "mailbox" if scope.mailbox is not None else "domain" if scope.domain is not None else ""
    scope_param = str(scope.mailbox) if scope.mailbox is not None else scope.domain or ""
    in_scope = f" AND x.{column} = %s" if column else ""
    if by_fields:
        key = "f"  # the scope is in the fields' query
    elif column:
        key = "b"
        in_scope_conditions.append(f"b.{column} = %s")
        in_scope_params.append(scope_param)
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
    looked_up = [t for t in found.body if t not in planned.tested]
    if looked_up:
        conditions.append("m.tsv @@ %s::tsquery")
        params.append(" & ".join(looked_up))
    for tested in found.body:
        if tested in planned.tested:
            # The function, not the operator: never an index condition.
            conditions.append("ts_match_vq(m.tsv, %s::tsquery)")
            params.append(tested)
    if fields is not None:
        conditions.append("f.tsv @@ %s::tsquery")
        params.append(fields)
    for to_cc, plain in checked:
        # The To:/Cc: text, or a mailbox of the message within the scope
        # (never another's: a Bcc stays hidden).
        conditions.append(
            "(f.tsv @@ %s::tsquery OR EXISTS (SELECT 1 FROM mailboxes x"
            f" WHERE x.id = {key}.id{in_scope} AND x.tsv @@ %s::tsquery))"
        )
        params += [to_cc, scope_param, plain] if in_scope else [to_cc, plain]
    joins = ""
    if key != "m" and (found.body or query.has_attachment is not None):
        joins += f" JOIN messages m ON m.id = {key}.id"
    if key != "f" and (fields is not None or checked):
        joins += f" JOIN fields f ON f.id = {key}.id"
    source = {"m": "FROM messages m", "b": "FROM mailboxes b", "f": "FROM fields f"}[key] + joins
    conditions = in_scope_conditions + conditions
    where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
    return key, sql.SQL(source + where), in_scope_params + params  # type: ignore[arg-type]


def plan(conn: psycopg.Connection[Any], scope: ArchiveScope, query: ArchiveQuery) -> Plan:
    """
    How to find ``query`` in a mailbox or a domain, from the number of
    messages the planner expects (the vectors' statistics, without running
    the query): by the fields' vectors alone when its field words are in at
    most ``FIELDS_FEW`` messages of the scope; from the index's matches of
    its body words that are in at most ``FEW`` messages of the archive
    (the others tested in each match), or of all its body words if they
    meet in at most ``FEW``; else the planner's choice, which walks the
    scope newest first.  (Walking the scope ourselves for words in most
    messages was tried, 7036850, and was slower than the planner's own
    plan: see bench/README.md.)
    """
    try:
        found = terms(query)
    except Nothing:
        return Plan()
    fields, _ = fields_query(scope, found)
    # A match found by its fields is one more vector read if it must also
    # hold body words: fewer of them.
    if fields is not None and _expected(conn, "fields", fields) <= (
        FIELDS_FEW // 2 if found.body else FIELDS_FEW
    ):
        return Plan("fields", tuple(found.body))
    if not found.body:
        return Plan()
    common = tuple(t for t in found.body if _expected(conn, "messages", t) > FEW)
    if len(common) < len(found.body):
        return Plan("few", common)
    if len(found.body) > 1 and _expected(conn, "messages", " & ".join(found.body)) <= FEW:
        return Plan("few")
    return Plan()


def _expected(conn: psycopg.Connection[Any], table: str, tsquery: str) -> float:
    """How many rows of ``table`` the planner expects to match ``tsquery``."""
    explained = conn.execute(
        sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {} WHERE tsv @@ %s::tsquery").format(
            sql.Identifier(table)
        ),
        (tsquery,),
    ).fetchone()
    return float(explained[0][0]["Plan"]["Plan Rows"]) if explained is not None else float("inf")


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
    planned: Plan = WALK,
) -> list[Any]:
    """
    The rows of a page and one more, found as ``planned`` says.  Planned
    ``"few"`` or ``"fields"``, every match found before the page is sorted
    (the planner then plans for all of them, not for the first ``limit``).
    """
    found = matching(scope, query, after, planned)
    if found is None:
        return []
    # One process: parallel workers each walk the scope ahead of the
    # LIMIT, and a page that one process finds after 1,000 messages took
    # the three of them 19,000 (5 to 10 times as long at 1,000,000).
    conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
    key, clause, params = found
    # A message for two mailboxes of a domain is two rows: DISTINCT.
    distinct = "DISTINCT " if key == "b" and scope.mailbox is None else ""
    template = (
        "SELECT * FROM (SELECT {distinct}{k}.received_at, {k}.id {clause}"
        " OFFSET 0) f ORDER BY f.received_at DESC, f.id DESC LIMIT %s"
        if planned.how
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

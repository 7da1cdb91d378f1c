"""
The archive's search language, as users and operators type it::

    invoice "march 2026" from:alice to:bob subject:report
    after:2026-03-01 before:2026-04-01 has:attachment

Words must all occur (a word matches words starting with it); a quoted
phrase must occur as written; ``from:``, ``to:`` and ``subject:`` look in
that field only (``from:"Alice Smith"`` takes a phrase); ``after:`` and
``before:`` take a date ``YYYY-MM-DD`` (UTC midnight) or a date and time
``YYYY-MM-DDTHH:MM``; ``has:attachment`` keeps messages with attachments,
``-has:attachment`` those without.  A word with a colon whose prefix is not
one of these (``re:``, ``http://...``) is an ordinary word.

Parsing never touches a backend: it gives a ``mailhub.model.ArchiveQuery``
that every archive plugin translates into its own search.
"""

from __future__ import annotations

import calendar
import re
import time
from typing import Any

from mailhub.model import ArchiveQuery

__all__ = ["QueryError", "parse_date", "parse_query"]

#: A token: an optional ``-``, an optional ``name:``, then a quoted phrase
#: or a run of non-blank characters.
_TOKEN = re.compile(r'(-?)(?:([A-Za-z]+):)?(?:"([^"]*)"?|(\S+))')
_FIELDS = {"from", "to", "subject", "before", "after", "has"}
#: Longest query accepted, and most terms: a search box is not a script.
MAX_QUERY = 1000
MAX_TERMS = 32


class QueryError(ValueError):
    """The query cannot be understood; the message says why, for the user."""


def parse_date(text: str, what: str = "date") -> float:
    """
    ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM[:SS]`` (UTC) as POSIX seconds.

    :raises QueryError: naming ``what`` and the form expected.
    """
    for form in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"):
        try:
            return float(calendar.timegm(time.strptime(text, form)))
        except ValueError:
            continue
    raise QueryError(f"{what}: {text!r} is not a date (YYYY-MM-DD, or YYYY-MM-DDTHH:MM, UTC)")


def parse_query(text: str) -> ArchiveQuery:
    """
    :param text: what the user typed.
    :returns: the ``ArchiveQuery`` (empty text: everything).
    :raises QueryError: a query too long, a bad date, or ``has:`` with
        anything but ``attachment``.
    """
    if len(text) > MAX_QUERY:
        raise QueryError(f"the query is longer than {MAX_QUERY} characters")
    words: list[str] = []
    phrases: list[str] = []
    fields: dict[str, list[str]] = {"from": [], "to": [], "subject": []}
    before = after = None
    has_attachment = None
    terms = 0
    for match in _TOKEN.finditer(text):
        negated, name, quoted, bare = match.groups()
        value = quoted if quoted is not None else (bare or "")
        name = name.lower() if name else None
        if name is not None and name not in _FIELDS:
            # ``re:``, ``http://`` and the like are words.
            value, name = f"{match.group(2)}:{value}", None
        terms += 1
        if terms > MAX_TERMS:
            raise QueryError(f"the query has more than {MAX_TERMS} terms")
        if name == "has":
            if value.lower() != "attachment":
                raise QueryError(f"has:{value}: only has:attachment (or -has:attachment) is known")
            has_attachment = not negated
            continue
        if name in ("before", "after"):
            when = parse_date(value, f"{name}:")
            if name == "before":
                before = when
            else:
                after = when
            continue
        value = " ".join(value.split())
        if not value:
            continue
        if name is not None:
            fields[name].append(value)
        elif quoted is not None and " " in value:
            phrases.append(value)
        else:
            words.extend(_words(value))
    return ArchiveQuery(
        words=_tuple(words),
        phrases=_tuple(phrases),
        sender=_tuple(fields["from"]),
        recipient=_tuple(fields["to"]),
        subject=_tuple(fields["subject"]),
        before=before,
        after=after,
        has_attachment=has_attachment,
    )


def _tuple(items: list[str]) -> Any:
    # mypy cannot solve the attrs ``converter=tuple`` of the model's fields.
    return tuple(items)


def _words(value: str) -> list[str]:
    """A bare token as the words a full-text index sees (``alice@example.com`` stays one term)."""
    value = value.strip("\"'()[]{}<>,;!?")
    return [value] if value else []

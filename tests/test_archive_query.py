"""The archive's search language: what users type, as an ``ArchiveQuery``."""

import calendar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailhub.archive.query import MAX_TERMS, QueryError, parse_query
from mailhub.model import ArchiveQuery


def day(text: str) -> float:
    y, m, d = map(int, text.split("-"))
    return float(calendar.timegm((y, m, d, 0, 0, 0)))


def test_empty_query_matches_everything():
    assert parse_query("") == ArchiveQuery()
    assert parse_query("   ") == ArchiveQuery()


def test_words_phrases_and_fields():
    q = parse_query('invoice "march  2026" from:alice to:"Bob Smith" subject:report')
    assert q.words == ("invoice",)
    assert q.phrases == ("march 2026",)
    assert q.sender == ("alice",)
    assert q.recipient == ("Bob Smith",)
    assert q.subject == ("report",)


def test_dates_and_attachments():
    q = parse_query("after:2026-03-01 before:2026-04-01T12:30 has:attachment")
    assert q.after == day("2026-03-01")
    assert q.before == day("2026-04-01") + 12 * 3600 + 30 * 60
    assert q.has_attachment is True
    assert parse_query("-has:attachment").has_attachment is False


def test_unknown_prefixes_are_words():
    q = parse_query("re:meeting http://example.com/x")
    assert q.words == ("re:meeting", "http://example.com/x")


def test_field_names_any_case():
    assert parse_query("FROM:alice").sender == ("alice",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("before:yesterday", "before:: 'yesterday' is not a date"),
        ("after:2026-13-01", "is not a date"),
        ("has:pictures", "only has:attachment"),
        ("x" * 1001, "longer than 1000"),
        (" ".join(["w"] * (MAX_TERMS + 1)), f"more than {MAX_TERMS} terms"),
    ],
)
def test_bad_queries_say_why(text, message):
    with pytest.raises(QueryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_query(text)


@given(st.text(max_size=200))
def test_any_text_parses_or_says_why(text):
    try:
        q = parse_query(text)
    except QueryError as e:
        assert str(e)
        return
    assert all(w and not w.isspace() for w in q.words + q.phrases + q.sender + q.recipient + q.subject)

"""
The archive contract: what every ``IArchive`` must do.

An archive plugin's tests subclass ``ArchiveContract`` and provide an
``archive`` fixture that returns a fresh, empty archive (and closes it
afterwards)::

    class TestMyArchive(ArchiveContract):
        @pytest.fixture
        def archive(self, tmp_path):
            archive = plugin.make({"path": "archive.db", "config_dir": str(tmp_path)}, reactor)
            yield archive
            pytest_twisted.blockon(archive.close())

What the suite settles where ``IArchive`` leaves room:

- A query term (a word, or a ``sender``, ``recipient`` or ``subject``
  value) is split into words at every character that is not a letter or a
  digit; it matches when those words occur one after the other in a field,
  the last one as a word or a word's start (``"rep"`` finds ``report``,
  ``"port"`` does not).  A phrase is the same without the prefix.  A term
  without any letter or digit matches everything.  Matching ignores case;
  it ignores accents too unless the subclass sets ``ACCENT_INSENSITIVE =
  False`` (a backend that cannot).
- ``sender`` matches the ``From:`` text and the envelope sender;
  ``recipient`` the ``To:``/``Cc:`` text and the message's mailboxes within
  the search's scope (never another user's: a ``Bcc:`` stays hidden).
- ``ArchiveSummary.sender`` is the ``From:`` text, or the envelope sender
  when there is none (``""`` for ``<>``); ``subject``, ``has_attachment`` and
  ``message_id`` come from the ``ArchiveText``, ``size`` is the message's
  length.
- ``before`` is exclusive, ``after`` inclusive (as for ``audit_log``'s
  ``until`` and ``since``).
- A mailbox is one whatever the case of its local part: the archive keeps
  and compares mailboxes folded (``Address.folded``), in searches,
  counts, summaries, ``get``, holds and delivery records alike.
- ``holds()`` gives a mailbox as text (``str(Address)``, folded).
- ``set_hold`` of the whole archive (neither mailbox nor domain) fails with
  ``ValueError``.

The tests are ``async`` (pytest-twisted's ``ensureDeferred``), so an archive
whose ``Deferred`` fire later, from a thread or the network, runs them as
well as one whose ``Deferred`` fire at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from mailhub.interfaces import IArchive
from mailhub.model import (
    Address,
    ArchivedMessage,
    ArchivePage,
    ArchiveQuery,
    ArchiveScope,
    ArchiveSummary,
    ArchiveText,
    AuditEvent,
)

__all__ = [
    "ALICE",
    "ArchiveContract",
    "BOB",
    "DAVE",
    "NOW",
    "ODD_MESSAGE",
    "SENDER",
    "archived",
]

#: The time the suite's messages arrive at (about; each test spaces them out).
NOW = 1_700_000_000.0
DAY = 86400.0

ALICE = Address("alice", "a.example")
BOB = Address("bob", "a.example")
CAROL = Address("carol", "a.example")
DAVE = Address("dave", "b.example")
SENDER = Address("sender", "outside.example")
#: The route of the suite's delivery records.
ROUTE = "smtp:mail.a.example:25"

#: A message that is not 7-bit text: every byte value, UTF-8, NUL, lone CR and LF.
ODD_MESSAGE = (
    b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n\r\n"
    + "grüße, 你好\r\n".encode()
    + bytes(range(256))
    + b"\x00\r\n.\r\nlone\rcr and lone\nlf\xff"
)

EVERYTHING = ArchiveScope()


def _as_tuple(items: Iterable[Any]) -> Any:
    # mypy cannot solve the attrs ``converter=tuple`` of the model's fields.
    return tuple(items)


def archived(
    id: str,
    received_at: float = NOW,
    mailboxes: Sequence[Address] = (ALICE,),
    sender: Address | None = SENDER,
    message: bytes | None = None,
    subject: str = "",
    from_text: str = "",
    recipients: str = "",
    body: str = "",
    attachments: Sequence[str] = (),
    message_id: str = "",
    date: float | None = None,
) -> ArchivedMessage:
    """An ``ArchivedMessage`` whose bytes, unless given, are made from its text."""
    if message is None:
        message = f"Subject: {subject}\r\nFrom: {from_text}\r\n\r\n{body}\r\n".encode()
    text = ArchiveText(
        subject=subject,
        sender=from_text,
        recipients=recipients,
        body=body,
        attachments=_as_tuple(attachments),
        message_id=message_id,
        date=date,
    )
    return ArchivedMessage(id, received_at, sender, _as_tuple(mailboxes), message, text)


def query(**parts: Any) -> ArchiveQuery:
    """An ``ArchiveQuery``; a string given for a tuple part is one term."""
    for name in ("words", "phrases", "sender", "recipient", "subject"):
        if isinstance(parts.get(name), str):
            parts[name] = (parts[name],)
    return ArchiveQuery(**parts)


def mailbox(address: Address) -> ArchiveScope:
    return ArchiveScope(mailbox=address)


def domain(name: str) -> ArchiveScope:
    return ArchiveScope(domain=name)


class ArchiveContract:
    """
    Tests every ``IArchive`` passes.

    The tests ask for an ``archive`` fixture: a fresh, empty archive per test.
    Define it on the subclass, or in the test module or a ``conftest.py``.
    """

    #: Whether plain words match without their accents (``cafe`` finds ``café``).
    ACCENT_INSENSITIVE = True

    # -- helpers ---------------------------------------------------------

    async def add(self, archive: Any, *messages: ArchivedMessage) -> None:
        for message in messages:
            await archive.add(message)

    async def ids(
        self,
        archive: Any,
        q: ArchiveQuery | None = None,
        scope: ArchiveScope = EVERYTHING,
        limit: int = 1000,
    ) -> list[str]:
        """The ids ``search`` finds, in order, on one page."""
        page: ArchivePage = await archive.search(scope, q or ArchiveQuery(), None, limit)
        assert page.next is None
        return [s.id for s in page.items]

    async def all_pages(
        self, archive: Any, q: ArchiveQuery, scope: ArchiveScope, limit: int
    ) -> list[ArchiveSummary]:
        items: list[ArchiveSummary] = []
        cursor = None
        for _ in range(1000):
            page: ArchivePage = await archive.search(scope, q, cursor, limit)
            assert len(page.items) <= limit
            items.extend(page.items)
            if page.next is None:
                return items
            cursor = page.next
        raise AssertionError("paging does not end")

    async def several(
        self, archive: Any, count: int, mailboxes: Sequence[Address] = (ALICE,)
    ) -> list[str]:
        """Add ``count`` messages, some of them at the same time; their ids, newest first."""
        for i in range(count):
            await archive.add(archived(f"m{i:03d}", NOW + (i // 3), mailboxes, subject=f"n{i}"))
        return [f"m{i:03d}" for i in reversed(range(count))]

    # -- the interface --------------------------------------------------

    def test_provides_interface(self, archive: Any) -> None:
        """The archive provides every method of ``IArchive``."""
        assert verifyObject(IArchive, archive)

    # -- add and get ----------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_get_unknown_id_is_none(self, archive: Any) -> None:
        assert await archive.get("no-such-id") is None

    @pytest_twisted.ensureDeferred
    async def test_add_then_get_round_trips_exactly(self, archive: Any) -> None:
        """Every byte (NUL, 8-bit, lone CR/LF) and every field of the text come back as added."""
        message = archived(
            "odd",
            NOW + 0.25,
            (ALICE, DAVE),
            message=ODD_MESSAGE,
            subject="grüße 你好",
            from_text="Zoë <zoe@outside.example>",
            recipients='Alice <alice@a.example>, "Dave" <dave@b.example>',
            body="grüße, 你好\n\x00 nul and tab\t",
            attachments=("résumé.pdf", "a.txt"),
            message_id="abc@outside.example",
            date=NOW - 60.5,
        )
        await archive.add(message)
        got = await archive.get("odd")
        assert got.message == ODD_MESSAGE
        assert got.text == message.text
        assert (got.id, got.received_at, got.sender) == ("odd", NOW + 0.25, SENDER)
        assert sorted(got.mailboxes) == sorted((ALICE, DAVE))

    @pytest_twisted.ensureDeferred
    async def test_null_sender_and_empty_message_round_trip(self, archive: Any) -> None:
        await archive.add(archived("null", sender=None, message=b""))
        got = await archive.get("null")
        assert (got.sender, got.message, got.text) == (None, b"", ArchiveText())

    @pytest_twisted.ensureDeferred
    async def test_add_again_adds_only_new_mailboxes(self, archive: Any) -> None:
        """Adding an id again unions its mailboxes."""
        await archive.add(archived("x", mailboxes=(ALICE, BOB)))
        await archive.add(archived("x", mailboxes=(BOB, DAVE)))
        got = await archive.get("x")
        assert sorted(got.mailboxes) == sorted((ALICE, BOB, DAVE))
        assert await self.ids(archive, scope=mailbox(DAVE)) == ["x"]

    @pytest_twisted.ensureDeferred
    async def test_add_again_changes_nothing_else(self, archive: Any) -> None:
        """The first add's bytes, time, sender and text stay; the message is found once."""
        first = archived("x", NOW, subject="first", body="one")
        await archive.add(first)
        await archive.add(archived("x", NOW + 5, sender=None, subject="second", body="two"))
        got = await archive.get("x")
        assert (got.message, got.received_at, got.sender, got.text) == (
            first.message,
            NOW,
            SENDER,
            first.text,
        )
        assert await self.ids(archive) == ["x"]
        assert await self.ids(archive, query(words="two")) == []

    # -- scopes ------------------------------------------------------------

    async def three_mailboxes(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("to-alice", NOW + 1, (ALICE,)),
            archived("to-bob", NOW + 2, (BOB,)),
            archived("to-dave", NOW + 3, (DAVE,)),
            archived("to-alice-and-dave", NOW + 4, (ALICE, DAVE)),
        )

    @pytest_twisted.ensureDeferred
    async def test_mailbox_search_sees_only_that_mailbox(self, archive: Any) -> None:
        await self.three_mailboxes(archive)
        assert await self.ids(archive, scope=mailbox(ALICE)) == ["to-alice-and-dave", "to-alice"]
        assert await self.ids(archive, scope=mailbox(BOB)) == ["to-bob"]
        assert await self.ids(archive, scope=mailbox(CAROL)) == []

    @pytest_twisted.ensureDeferred
    async def test_mailbox_scope_compares_the_whole_address(self, archive: Any) -> None:
        """``alice@a.example`` is another mailbox than ``alice@b.example`` or ``alice.x@a.example``."""
        await archive.add(archived("b", mailboxes=(Address("alice", "b.example"), Address("alice.x", "a.example"))))
        assert await self.ids(archive, scope=mailbox(ALICE)) == []
        assert await self.ids(archive, scope=mailbox(Address("Alice", "B.EXAMPLE"))) == ["b"]

    @pytest_twisted.ensureDeferred
    async def test_a_mailbox_is_one_whatever_the_case_of_its_local_part(self, archive: Any) -> None:
        """
        Mail archived for ``Alice@Example``-style spellings is the folded
        mailbox's: a search, a count, the pages an export walks and ``get``
        find and show it under ``alice@a.example``, however the scope's
        mailbox is spelt.
        """
        upper = Address("Alice", "A.Example")
        await self.add(
            archive,
            archived("upper", NOW + 1, (upper,), body="budget"),
            archived("lower", NOW + 2, (ALICE,), body="budget"),
            archived("both", NOW + 3, (upper, ALICE, Address("ALICE", "a.example"), BOB), body="budget"),
        )
        await archive.add(archived("upper", NOW + 1, (ALICE,), body="budget"))  # nothing new
        for scope in (mailbox(ALICE), mailbox(upper), mailbox(Address("aLiCe", "a.example"))):
            assert await self.ids(archive, scope=scope) == ["both", "lower", "upper"], scope
            assert await archive.count(scope, ArchiveQuery()) == 3
            assert await archive.count(scope, query(words="budget")) == 3
            pages = await self.all_pages(archive, query(words="budg"), scope, 1)
            assert [(s.id, s.mailboxes) for s in pages] == [(i, (ALICE,)) for i in ("both", "lower", "upper")]
        assert (await archive.get("upper")).mailboxes == (ALICE,)
        assert sorted((await archive.get("both")).mailboxes) == [ALICE, BOB]
        found = await self.all_pages(archive, query(recipient="Alice@a.example"), domain("a.example"), 10)
        assert [(s.id, sorted(s.mailboxes)) for s in found] == [
            ("both", [ALICE, BOB]), ("lower", [ALICE]), ("upper", [ALICE]),
        ]  # fmt: skip

    @pytest_twisted.ensureDeferred
    async def test_domain_search_sees_only_that_domain(self, archive: Any) -> None:
        await self.three_mailboxes(archive)
        assert await self.ids(archive, scope=domain("a.example")) == [
            "to-alice-and-dave",
            "to-bob",
            "to-alice",
        ]
        assert await self.ids(archive, scope=domain("B.Example")) == [
            "to-alice-and-dave",
            "to-dave",
        ]
        assert await self.ids(archive, scope=domain("c.example")) == []

    @pytest_twisted.ensureDeferred
    async def test_whole_archive_search_sees_every_message(self, archive: Any) -> None:
        await self.three_mailboxes(archive)
        assert await self.ids(archive) == ["to-alice-and-dave", "to-dave", "to-bob", "to-alice"]

    @pytest_twisted.ensureDeferred
    async def test_summary_lists_the_mailboxes_within_the_scope_only(self, archive: Any) -> None:
        await archive.add(archived("x", mailboxes=(ALICE, BOB, DAVE)))

        async def mailboxes(scope: ArchiveScope) -> list[Address]:
            page = await archive.search(scope, ArchiveQuery())
            [summary] = page.items
            return sorted(summary.mailboxes)

        assert await mailboxes(mailbox(BOB)) == [BOB]
        assert await mailboxes(domain("a.example")) == sorted((ALICE, BOB))
        assert await mailboxes(EVERYTHING) == sorted((ALICE, BOB, DAVE))

    @pytest_twisted.ensureDeferred
    async def test_summary_describes_the_message(self, archive: Any) -> None:
        message = archived(
            "x",
            NOW + 0.5,
            subject="Quarterly report",
            from_text="Zoë <zoe@outside.example>",
            attachments=("q3.xlsx",),
            message_id="q3@outside.example",
        )
        await archive.add(message)
        page = await archive.search(EVERYTHING, ArchiveQuery())
        assert page.items == (
            ArchiveSummary(
                id="x",
                received_at=NOW + 0.5,
                sender="Zoë <zoe@outside.example>",
                subject="Quarterly report",
                mailboxes=_as_tuple((ALICE,)),
                size=len(message.message),
                has_attachment=True,
                message_id="q3@outside.example",
            ),
        )
        assert page.next is None

    @pytest_twisted.ensureDeferred
    async def test_summary_sender_falls_back_to_the_envelope(self, archive: Any) -> None:
        await self.add(archive, archived("env", NOW + 1), archived("null", NOW, sender=None))
        page = await archive.search(EVERYTHING, ArchiveQuery())
        assert [s.sender for s in page.items] == [str(SENDER), ""]

    # -- order -------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_newest_first_then_highest_id(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("b", NOW),
            archived("old", NOW - DAY),
            archived("c", NOW),
            archived("new", NOW + DAY),
            archived("a", NOW),
        )
        assert await self.ids(archive) == ["new", "c", "b", "a", "old"]

    @pytest_twisted.ensureDeferred
    async def test_empty_query_matches_every_message(self, archive: Any) -> None:
        await self.add(archive, archived("x", subject="hello"), archived("y", NOW + 1))
        assert await self.ids(archive, ArchiveQuery()) == ["y", "x"]

    # -- words and phrases --------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_word_is_found_in_every_field(self, archive: Any) -> None:
        """Subject, ``From:``, ``To:``/``Cc:``, body and attachment names are searched."""
        await self.add(
            archive,
            archived("subject", NOW + 1, subject="about zebras"),
            archived("from", NOW + 2, from_text="Zebra Keeper <keeper@zoo.example>"),
            archived("to", NOW + 3, recipients="zebra@zoo.example"),
            archived("body", NOW + 4, body="three zebras were seen"),
            archived("attachment", NOW + 5, attachments=("zebra.jpg",)),
            archived("none", NOW + 6, subject="lions", body="a lion"),
        )
        assert await self.ids(archive, query(words="zebra")) == [
            "attachment",
            "body",
            "to",
            "from",
            "subject",
        ]

    @pytest_twisted.ensureDeferred
    async def test_word_matches_the_start_of_a_word_only(self, archive: Any) -> None:
        await archive.add(archived("x", body="the quarterly report"))
        assert await self.ids(archive, query(words="rep")) == ["x"]
        assert await self.ids(archive, query(words="report")) == ["x"]
        assert await self.ids(archive, query(words="port")) == []
        assert await self.ids(archive, query(words="reports")) == []

    @pytest_twisted.ensureDeferred
    async def test_every_word_must_match(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("both", NOW + 1, subject="budget", body="meeting"),
            archived("one", NOW + 2, body="budget"),
        )
        assert await self.ids(archive, query(words=("budget", "meeting"))) == ["both"]
        assert await self.ids(archive, query(words=("meeting", "budget"))) == ["both"]

    @pytest_twisted.ensureDeferred
    async def test_words_ignore_case(self, archive: Any) -> None:
        await archive.add(archived("x", subject="Quarterly REPORT"))
        assert await self.ids(archive, query(words="report")) == ["x"]
        assert await self.ids(archive, query(words="QUARTERLY")) == ["x"]
        assert await self.ids(archive, query(words="rEp")) == ["x"]

    @pytest_twisted.ensureDeferred
    async def test_words_ignore_accents(self, archive: Any) -> None:
        if not self.ACCENT_INSENSITIVE:
            pytest.skip("this backend matches accents exactly")
        await self.add(
            archive,
            archived("accented", NOW + 1, body="le café est prêt"),
            archived("plain", NOW + 2, body="the cafe is ready"),
        )
        assert await self.ids(archive, query(words="cafe")) == ["plain", "accented"]
        assert await self.ids(archive, query(words="CAFÉ")) == ["plain", "accented"]
        assert await self.ids(archive, query(words="pret")) == ["accented"]

    @pytest_twisted.ensureDeferred
    async def test_non_ascii_words_are_found(self, archive: Any) -> None:
        await archive.add(archived("x", subject="Grüße aus Köln", body="Привет, мир"))
        assert await self.ids(archive, query(words="köln")) == ["x"]
        assert await self.ids(archive, query(words="ПРИВЕТ")) == ["x"]
        assert await self.ids(archive, query(words="мир")) == ["x"]

    @pytest_twisted.ensureDeferred
    async def test_word_with_punctuation_matches_its_words_in_a_row(self, archive: Any) -> None:
        """``alice@a.ex`` is the words ``alice``, ``a`` and the start ``ex``, one after the other."""
        await self.add(
            archive,
            archived("in-a-row", NOW + 1, body="write to alice@a.example today"),
            archived("apart", NOW + 2, body="alice lives at a example street"),
            archived("reordered", NOW + 3, body="example a alice"),
        )
        assert await self.ids(archive, query(words="alice@a.ex")) == ["in-a-row"]
        assert await self.ids(archive, query(words="a.example")) == ["apart", "in-a-row"]

    @pytest_twisted.ensureDeferred
    async def test_phrase_matches_consecutive_words_only(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("phrase", NOW + 1, body="please find the annual budget attached"),
            archived("apart", NOW + 2, body="the budget is annual"),
            archived("longer", NOW + 3, body="annual budgeting"),
        )
        assert await self.ids(archive, query(phrases="annual budget")) == ["phrase"]
        assert await self.ids(archive, query(phrases="ANNUAL, Budget")) == ["phrase"]

    @pytest_twisted.ensureDeferred
    async def test_query_syntax_in_user_text_is_taken_literally(self, archive: Any) -> None:
        """Quotes, operators, stars, colons and brackets in a term are text, never syntax."""
        await archive.add(archived("x", subject='say "NEAR" AND (not) OR body:x*'))
        for word in ('"near"', "AND", "NOT", "or", "body:x", "x*", "(not)", '"', "*", "-", "^say"):
            assert await self.ids(archive, query(words=word)) == ["x"], word
        for phrase in ('say "near', "and (not) or", 'NEAR" AND'):
            assert await self.ids(archive, query(phrases=phrase)) == ["x"], phrase
        assert await self.ids(archive, query(words='"missing"')) == []
        assert await self.ids(archive, query(subject="body:x")) == ["x"]

    # -- filters -------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_sender_matches_from_text(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("from", NOW + 1, from_text="Zoë Keeper <zoe@zoo.example>"),
            archived("body", NOW + 2, body="zoe wrote this"),
        )
        assert await self.ids(archive, query(sender="zoe")) == ["from"]
        assert await self.ids(archive, query(sender="keeper")) == ["from"]
        assert await self.ids(archive, query(sender="zoe@zoo.example")) == ["from"]

    @pytest_twisted.ensureDeferred
    async def test_sender_matches_the_envelope_sender(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("envelope", NOW + 1, sender=Address("bounces", "lists.example")),
            archived("other", NOW + 2, body="bounces"),
        )
        assert await self.ids(archive, query(sender="bounces@lists")) == ["envelope"]
        assert await self.ids(archive, query(sender="lists.example")) == ["envelope"]

    @pytest_twisted.ensureDeferred
    async def test_recipient_matches_to_and_cc_text(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("to", NOW + 1, recipients="Board <board@a.example>, Erin <erin@c.example>"),
            archived("body", NOW + 2, body="to the board"),
        )
        assert await self.ids(archive, query(recipient="board")) == ["to"]
        assert await self.ids(archive, query(recipient="erin@c.example")) == ["to"]

    @pytest_twisted.ensureDeferred
    async def test_recipient_matches_the_mailboxes_in_scope(self, archive: Any) -> None:
        """A message without ``To:`` text is found by the mailbox it was archived for."""
        await self.add(
            archive,
            archived("bcc", NOW + 1, (BOB,)),
            archived("alice", NOW + 2, (ALICE,)),
        )
        assert await self.ids(archive, query(recipient="bob")) == ["bcc"]
        assert await self.ids(archive, query(recipient="bob@a.example"), domain("a.example")) == [
            "bcc"
        ]
        assert await self.ids(archive, query(recipient="bob"), mailbox(BOB)) == ["bcc"]

    @pytest_twisted.ensureDeferred
    async def test_recipient_does_not_reveal_other_mailboxes(self, archive: Any) -> None:
        """Searching one mailbox for another recipient does not find that recipient's ``Bcc:``."""
        await archive.add(archived("x", mailboxes=(ALICE, DAVE)))
        assert await self.ids(archive, query(recipient="dave"), mailbox(ALICE)) == []
        assert await self.ids(archive, query(recipient="dave"), domain("a.example")) == []
        assert await self.ids(archive, query(recipient="alice"), mailbox(ALICE)) == ["x"]

    @pytest_twisted.ensureDeferred
    async def test_subject_matches_the_subject_only(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("subject", NOW + 1, subject="Invoice 2024-17"),
            archived("body", NOW + 2, body="invoice attached"),
        )
        assert await self.ids(archive, query(subject="invoice")) == ["subject"]
        assert await self.ids(archive, query(subject="inv")) == ["subject"]
        assert await self.ids(archive, query(subject="2024-17")) == ["subject"]

    @pytest_twisted.ensureDeferred
    async def test_before_is_exclusive_and_after_inclusive(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("early", NOW - DAY),
            archived("at", NOW),
            archived("late", NOW + DAY),
        )
        assert await self.ids(archive, query(before=NOW)) == ["early"]
        assert await self.ids(archive, query(after=NOW)) == ["late", "at"]
        assert await self.ids(archive, query(after=NOW - DAY + 1, before=NOW + DAY)) == ["at"]

    @pytest_twisted.ensureDeferred
    async def test_has_attachment(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("with", NOW + 1, attachments=("a.pdf",)),
            archived("without", NOW + 2),
        )
        assert await self.ids(archive, query(has_attachment=True)) == ["with"]
        assert await self.ids(archive, query(has_attachment=False)) == ["without"]
        assert await self.ids(archive, query(has_attachment=None)) == ["without", "with"]

    @pytest_twisted.ensureDeferred
    async def test_every_part_of_a_query_must_match(self, archive: Any) -> None:
        everything = dict(
            subject="budget 2025",
            from_text="Zoë <zoe@zoo.example>",
            recipients="board@a.example",
            body="the annual budget, as promised",
            attachments=("budget.xlsx",),
        )
        await self.add(
            archive,
            archived("all", NOW, **everything),  # type: ignore[arg-type]
            archived("no-attachment", NOW + 1, **{**everything, "attachments": ()}),  # type: ignore[arg-type]
            archived("other-sender", NOW + 2, **{**everything, "from_text": "max@x.example"}),  # type: ignore[arg-type]
            archived("too-late", NOW + DAY, **everything),  # type: ignore[arg-type]
        )
        q = query(
            words=("budget", "promis"),
            phrases="annual budget",
            sender="zoe",
            recipient="board",
            subject="2025",
            before=NOW + 10,
            after=NOW - 10,
            has_attachment=True,
        )
        assert await self.ids(archive, q) == ["all"]

    @pytest_twisted.ensureDeferred
    async def test_several_values_of_a_filter_must_all_match(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("both", NOW + 1, subject="budget meeting"),
            archived("one", NOW + 2, subject="budget"),
        )
        assert await self.ids(archive, query(subject=("budget", "meeting"))) == ["both"]

    @pytest_twisted.ensureDeferred
    async def test_query_within_a_mailbox(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("alice-budget", NOW + 1, (ALICE,), body="budget"),
            archived("bob-budget", NOW + 2, (BOB,), body="budget"),
            archived("alice-other", NOW + 3, (ALICE,), body="other"),
        )
        assert await self.ids(archive, query(words="budget"), mailbox(ALICE)) == ["alice-budget"]
        assert await self.ids(archive, query(words="budget"), domain("a.example")) == [
            "bob-budget",
            "alice-budget",
        ]

    # -- paging --------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_pages_together_are_one_search(self, archive: Any) -> None:
        expected = await self.several(archive, 23)
        items = await self.all_pages(archive, ArchiveQuery(), mailbox(ALICE), 5)
        assert [s.id for s in items] == expected

    @pytest_twisted.ensureDeferred
    async def test_page_limit_is_kept(self, archive: Any) -> None:
        await self.several(archive, 8)
        page = await archive.search(EVERYTHING, ArchiveQuery(), None, 3)
        assert len(page.items) == 3
        assert page.next is not None

    @pytest_twisted.ensureDeferred
    async def test_last_full_page_has_no_next(self, archive: Any) -> None:
        """When the results end exactly at a page's end, that page says so."""
        expected = await self.several(archive, 6)
        first = await archive.search(EVERYTHING, ArchiveQuery(), None, 3)
        second = await archive.search(EVERYTHING, ArchiveQuery(), first.next, 3)
        assert [s.id for s in first.items + second.items] == expected
        assert second.next is None

    @pytest_twisted.ensureDeferred
    async def test_pages_of_a_query(self, archive: Any) -> None:
        for i in range(30):
            body = "budget" if i % 3 else "other"
            await archive.add(archived(f"m{i:02d}", NOW + i // 4, (ALICE,), body=body))
        q = query(words="budget")
        expected = await self.ids(archive, q)
        assert len(expected) == 20
        assert [s.id for s in await self.all_pages(archive, q, mailbox(ALICE), 3)] == expected

    @pytest_twisted.ensureDeferred
    async def test_domain_pages_list_a_message_once(self, archive: Any) -> None:
        """A message for two mailboxes of the domain is on one page, once."""
        expected = await self.several(archive, 12, (ALICE, BOB, DAVE))
        items = await self.all_pages(archive, ArchiveQuery(), domain("a.example"), 4)
        assert [s.id for s in items] == expected
        assert all(sorted(s.mailboxes) == sorted((ALICE, BOB)) for s in items)

    @pytest_twisted.ensureDeferred
    async def test_newer_messages_do_not_shift_later_pages(self, archive: Any) -> None:
        expected = await self.several(archive, 15)
        first = await archive.search(mailbox(ALICE), ArchiveQuery(), None, 4)
        for i in range(5):
            await archive.add(archived(f"new{i}", NOW + DAY + i))
        items = list(first.items) + await self.all_pages_from(archive, first.next, 4)
        assert [s.id for s in items] == expected

    async def all_pages_from(self, archive: Any, cursor: str | None, limit: int) -> list[Any]:
        items: list[Any] = []
        while cursor is not None:
            page = await archive.search(mailbox(ALICE), ArchiveQuery(), cursor, limit)
            items.extend(page.items)
            cursor = page.next
        return items

    # -- count ---------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_count_is_the_number_of_results(self, archive: Any) -> None:
        for i in range(20):
            mailboxes = (ALICE, BOB) if i % 2 else (DAVE,)
            body = "budget" if i % 3 else "other"
            await archive.add(archived(f"m{i:02d}", NOW + i, mailboxes, body=body))
        for scope in (EVERYTHING, mailbox(ALICE), domain("a.example"), domain("b.example")):
            for q in (ArchiveQuery(), query(words="budget"), query(before=NOW + 7)):
                assert await archive.count(scope, q) == len(await self.ids(archive, q, scope))
        assert await archive.count(mailbox(CAROL), ArchiveQuery()) == 0

    # -- expiry ---------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_expire_removes_the_domains_old_messages(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("old", NOW - 2 * DAY, (ALICE,)),
            archived("old-b", NOW - 2 * DAY, (DAVE,)),
            archived("new", NOW, (ALICE,)),
        )
        assert await archive.expire("a.example", NOW - DAY, 100) == 1
        assert await archive.get("old") is None
        assert await self.ids(archive) == ["new", "old-b"]

    @pytest_twisted.ensureDeferred
    async def test_expire_keeps_messages_received_at_before(self, archive: Any) -> None:
        await archive.add(archived("at", NOW))
        assert await archive.expire("a.example", NOW, 100) == 0
        assert await self.ids(archive) == ["at"]

    @pytest_twisted.ensureDeferred
    async def test_message_stays_until_its_last_mailbox_expires(self, archive: Any) -> None:
        await archive.add(archived("shared", NOW - 2 * DAY, (ALICE, DAVE)))
        assert await archive.expire("a.example", NOW, 100) == 1
        got = await archive.get("shared")
        assert list(got.mailboxes) == [DAVE]
        assert await self.ids(archive, scope=mailbox(ALICE)) == []
        assert await self.ids(archive, scope=mailbox(DAVE)) == ["shared"]
        assert await archive.expire("b.example", NOW, 100) == 1
        assert await archive.get("shared") is None
        assert await self.ids(archive) == []

    @pytest_twisted.ensureDeferred
    async def test_expire_counts_pairs(self, archive: Any) -> None:
        """Two mailboxes of the domain are two pairs removed."""
        await archive.add(archived("shared", NOW - DAY, (ALICE, BOB)))
        assert await archive.expire("a.example", NOW, 100) == 2
        assert await archive.get("shared") is None

    @pytest_twisted.ensureDeferred
    async def test_expire_in_batches(self, archive: Any) -> None:
        """Each call removes at most ``limit`` pairs; fewer means done, oldest go first."""
        for i in range(7):
            await archive.add(archived(f"m{i}", NOW - DAY + i, (ALICE,)))
        await archive.add(archived("keep", NOW, (ALICE,)))
        assert await archive.expire("a.example", NOW, 3) == 3
        assert await self.ids(archive) == ["keep", "m6", "m5", "m4", "m3"]
        assert await archive.expire("a.example", NOW, 3) == 3
        assert await archive.expire("a.example", NOW, 3) == 1
        assert await archive.expire("a.example", NOW, 3) == 0
        assert await self.ids(archive) == ["keep"]

    @pytest_twisted.ensureDeferred
    async def test_held_mailbox_does_not_expire(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("alice", NOW - DAY, (ALICE,)),
            archived("bob", NOW - DAY, (BOB,)),
        )
        await archive.set_hold(mailbox(ALICE), True, "case 17", NOW)
        assert await archive.expire("a.example", NOW, 100) == 1
        assert await self.ids(archive) == ["alice"]

    @pytest_twisted.ensureDeferred
    async def test_held_domain_does_not_expire(self, archive: Any) -> None:
        await archive.add(archived("alice", NOW - DAY, (ALICE,)))
        await archive.set_hold(domain("a.example"), True, "case 17", NOW)
        assert await archive.expire("a.example", NOW, 100) == 0
        assert await self.ids(archive) == ["alice"]

    @pytest_twisted.ensureDeferred
    async def test_lifted_hold_lets_expiry_run(self, archive: Any) -> None:
        await archive.add(archived("alice", NOW - DAY, (ALICE,)))
        await archive.set_hold(mailbox(ALICE), True, "case 17", NOW)
        await archive.set_hold(mailbox(ALICE), False, "case closed", NOW + 1)
        assert await archive.expire("a.example", NOW, 100) == 1

    @pytest_twisted.ensureDeferred
    async def test_hold_on_another_domain_does_not_stop_expiry(self, archive: Any) -> None:
        await archive.add(archived("alice", NOW - DAY, (ALICE, DAVE)))
        await archive.set_hold(domain("b.example"), True, "case 17", NOW)
        assert await archive.expire("a.example", NOW, 100) == 1
        assert list((await archive.get("alice")).mailboxes) == [DAVE]

    # -- what the hub delivered ----------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_delivered_says_which_pairs_were_recorded(self, archive: Any) -> None:
        """A record is for one mailbox and one archive id, whether or not the archive has the copy yet."""
        odd = Address("o'brien \"x\"", "a.example")
        await archive.add(archived("m1", mailboxes=(ALICE, BOB, odd)))
        await archive.record_delivered(
            [("m1", ALICE, ROUTE, NOW), ("m1", odd, ROUTE, NOW), ("early", BOB, ROUTE, NOW)]
        )
        asked = [("m1", ALICE), ("m1", BOB), ("m1", odd), ("early", BOB), ("early", ALICE), ("m2", ALICE)]
        assert await archive.delivered(asked) == {("m1", ALICE), ("m1", odd), ("early", BOB)}
        assert await archive.delivered([]) == set()

    @pytest_twisted.ensureDeferred
    async def test_delivery_records_are_of_the_folded_mailbox(self, archive: Any) -> None:
        """
        A delivery to ``Alice@`` is one to ``alice@``: asked either way, the
        pair is found (and given back as asked), and the records of one
        folded pair are one record, with the latest time.
        """
        upper = Address("Alice", "a.example")
        await archive.add(archived("m1", NOW - 2 * DAY, (upper,)))
        await archive.record_delivered([("m1", upper, ROUTE, NOW), ("m2", Address("BOB", "a.example"), ROUTE, NOW)])
        await archive.record_delivered([("m1", ALICE, ROUTE, NOW - 2 * DAY)])
        asked = [("m1", ALICE), ("m1", Address("ALICE", "a.example")), ("m2", BOB), ("m2", ALICE)]
        assert await archive.delivered(asked) == {("m1", ALICE), ("m1", Address("ALICE", "a.example")), ("m2", BOB)}
        await archive.set_hold(mailbox(BOB), True, "case 17", NOW)
        # The message m1 expires; its one record (of NOW) and m2's held one stay.
        assert await archive.expire("a.example", NOW - DAY, 100) == 1
        assert await archive.delivered(asked) == {("m1", ALICE), ("m1", Address("ALICE", "a.example")), ("m2", BOB)}

    @pytest_twisted.ensureDeferred
    async def test_delivered_matches_another_copy_by_message_id(self, archive: Any) -> None:
        """An imported copy (another archive id) of a message the hub delivered counts as delivered."""
        await self.add(
            archive,
            archived("m1", mailboxes=(ALICE, BOB), message_id="q1@outside.example"),
            archived("import-1", mailboxes=(ALICE, BOB), message_id="q1@outside.example"),
            archived("other", mailboxes=(ALICE,), message_id="q2@outside.example"),
        )
        await archive.record_delivered([("m1", ALICE, ROUTE, NOW)])
        asked = [("import-1", ALICE), ("import-1", BOB), ("other", ALICE)]
        assert await archive.delivered(asked) == {("import-1", ALICE)}

    @pytest_twisted.ensureDeferred
    async def test_record_made_before_the_copy_matches_once_archived(self, archive: Any) -> None:
        """Delivery may come before the archive's copy: the Message-ID is the copy's, when it is there."""
        await archive.add(archived("import-1", message_id="q1@outside.example"))
        await archive.record_delivered([("m1", ALICE, ROUTE, NOW)])
        assert await archive.delivered([("import-1", ALICE)]) == set()
        await archive.add(archived("m1", message_id="q1@outside.example"))
        assert await archive.delivered([("import-1", ALICE)]) == {("import-1", ALICE)}

    @pytest_twisted.ensureDeferred
    async def test_message_without_message_id_matches_its_own_id_only(self, archive: Any) -> None:
        await self.add(archive, archived("m1"), archived("m2"))
        await archive.record_delivered([("m1", ALICE, ROUTE, NOW)])
        assert await archive.delivered([("m1", ALICE), ("m2", ALICE)]) == {("m1", ALICE)}

    @pytest_twisted.ensureDeferred
    async def test_message_ids_are_compared_exactly(self, archive: Any) -> None:
        await self.add(
            archive,
            archived("m1", message_id="Q1@outside.example"),
            archived("m2", message_id="q1@outside.example"),
            archived("m3", message_id="q1@outside.example "),
        )
        await archive.record_delivered([("m1", ALICE, ROUTE, NOW)])
        assert await archive.delivered([("m2", ALICE), ("m3", ALICE)]) == set()

    @pytest_twisted.ensureDeferred
    async def test_recording_again_keeps_one_record_with_the_latest_time(self, archive: Any) -> None:
        """The same pair twice, in one batch or two, in any order: one record, as old as the latest."""
        await archive.record_delivered(
            [("m1", ALICE, ROUTE, NOW), ("m1", ALICE, "smtp:other:25", NOW - 2 * DAY)]
        )
        await archive.record_delivered([("m1", ALICE, ROUTE, NOW - 3 * DAY)])
        assert await archive.expire("a.example", NOW - DAY, 100) == 0
        assert await archive.delivered([("m1", ALICE)]) == {("m1", ALICE)}
        assert await archive.expire("a.example", NOW + 1, 100) == 1
        assert await archive.delivered([("m1", ALICE)]) == set()

    @pytest_twisted.ensureDeferred
    async def test_expire_removes_the_domains_old_delivery_records(self, archive: Any) -> None:
        await archive.record_delivered(
            [
                ("old", ALICE, ROUTE, NOW - 2 * DAY),
                ("old", DAVE, ROUTE, NOW - 2 * DAY),
                ("new", ALICE, ROUTE, NOW),
            ]
        )
        assert await archive.expire("a.example", NOW - DAY, 100) == 1
        asked = [("old", ALICE), ("old", DAVE), ("new", ALICE)]
        assert await archive.delivered(asked) == {("old", DAVE), ("new", ALICE)}

    @pytest_twisted.ensureDeferred
    async def test_expire_removes_delivery_records_in_batches(self, archive: Any) -> None:
        """At most ``limit`` records a call; the count is the larger of records and pairs."""
        await archive.record_delivered([(f"m{i}", ALICE, ROUTE, NOW - DAY + i) for i in range(5)])
        await archive.add(archived("a", NOW - DAY, (ALICE,)))
        assert await archive.expire("a.example", NOW, 2) == 2
        assert await archive.delivered([("m0", ALICE), ("m1", ALICE), ("m2", ALICE)]) == {("m2", ALICE)}
        assert await archive.expire("a.example", NOW, 2) == 2
        assert await archive.expire("a.example", NOW, 2) == 1
        assert await archive.expire("a.example", NOW, 2) == 0

    @pytest_twisted.ensureDeferred
    async def test_held_mailbox_and_domain_keep_their_delivery_records(self, archive: Any) -> None:
        await archive.record_delivered(
            [("m", ALICE, ROUTE, NOW - DAY), ("m", BOB, ROUTE, NOW - DAY), ("m", DAVE, ROUTE, NOW - DAY)]
        )
        await archive.set_hold(mailbox(ALICE), True, "case 17", NOW)
        await archive.set_hold(domain("b.example"), True, "case 18", NOW)
        assert await archive.expire("a.example", NOW, 100) == 1
        assert await archive.expire("b.example", NOW, 100) == 0
        asked = [("m", ALICE), ("m", BOB), ("m", DAVE)]
        assert await archive.delivered(asked) == {("m", ALICE), ("m", DAVE)}

    # -- holds --------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_holds_round_trip(self, archive: Any) -> None:
        await archive.set_hold(mailbox(ALICE), True, "case 17", NOW)
        await archive.set_hold(domain("B.example"), True, "audit 2025", NOW + 1)
        holds = sorted(await archive.holds(), key=lambda h: h["scope"])
        assert holds == [
            {"scope": "domain b.example", "mailbox": None, "domain": "b.example",
             "reason": "audit 2025", "since": NOW + 1},
            {"scope": "mailbox alice@a.example", "mailbox": "alice@a.example", "domain": None,
             "reason": "case 17", "since": NOW},
        ]  # fmt: skip

    @pytest_twisted.ensureDeferred
    async def test_a_hold_is_on_the_folded_mailbox(self, archive: Any) -> None:
        """A hold given for ``Alice@`` holds ``alice@``'s mail, and is lifted as ``ALICE@``."""
        await archive.add(archived("old", NOW - DAY, (ALICE,)))
        await archive.set_hold(mailbox(Address("Alice", "a.example")), True, "case 17", NOW)
        await archive.set_hold(mailbox(ALICE), True, "case 18", NOW + 1)
        assert [(h["scope"], h["mailbox"]) for h in await archive.holds()] == [
            ("mailbox alice@a.example", "alice@a.example")
        ]
        assert await archive.expire("a.example", NOW, 100) == 0
        await archive.set_hold(mailbox(Address("ALICE", "a.example")), False, "closed", NOW + 2)
        assert await archive.holds() == []
        assert await archive.expire("a.example", NOW, 100) == 1

    @pytest_twisted.ensureDeferred
    async def test_holding_twice_is_one_hold(self, archive: Any) -> None:
        await archive.set_hold(mailbox(ALICE), True, "case 17", NOW)
        await archive.set_hold(mailbox(ALICE), True, "case 18", NOW + 1)
        assert [h["scope"] for h in await archive.holds()] == ["mailbox alice@a.example"]

    @pytest_twisted.ensureDeferred
    async def test_lifting_a_hold_removes_it(self, archive: Any) -> None:
        await archive.set_hold(mailbox(ALICE), True, "case 17", NOW)
        await archive.set_hold(mailbox(BOB), True, "case 17", NOW)
        await archive.set_hold(mailbox(ALICE), False, "closed", NOW + 1)
        await archive.set_hold(domain("c.example"), False, "never held", NOW + 1)
        assert [h["scope"] for h in await archive.holds()] == ["mailbox bob@a.example"]

    @pytest_twisted.ensureDeferred
    async def test_hold_of_the_whole_archive_is_refused(self, archive: Any) -> None:
        with pytest.raises(ValueError):
            await archive.set_hold(EVERYTHING, True, "everything", NOW)
        assert await archive.holds() == []

    # -- audit --------------------------------------------------------------

    async def audit_events(self, archive: Any) -> list[AuditEvent]:
        events = [
            AuditEvent(
                NOW + 1, "user:alice@a.example", "search", "mailbox alice@a.example", "budget"
            ),
            AuditEvent(NOW + 2, "operator:root@mx1", "read", "m1"),
            AuditEvent(NOW + 3, "user:alice@a.example", "read", "m2", "ünïcode\x00detail"),
            AuditEvent(NOW + 4, "operator:root@mx1", "export", "domain a.example", "12 messages"),
        ]
        for event in events:
            await archive.record_audit(event)
        return events

    @pytest_twisted.ensureDeferred
    async def test_audit_log_is_newest_first(self, archive: Any) -> None:
        events = await self.audit_events(archive)
        assert await archive.audit_log(None, None, None, None, 100) == events[::-1]

    @pytest_twisted.ensureDeferred
    async def test_audit_log_by_actor_and_action(self, archive: Any) -> None:
        events = await self.audit_events(archive)
        assert await archive.audit_log("operator:root@mx1", None, None, None, 100) == [
            events[3],
            events[1],
        ]
        assert await archive.audit_log(None, "read", None, None, 100) == [events[2], events[1]]
        assert await archive.audit_log("user:alice@a.example", "read", None, None, 100) == [
            events[2]
        ]
        assert await archive.audit_log("nobody", None, None, None, 100) == []

    @pytest_twisted.ensureDeferred
    async def test_audit_log_since_inclusive_until_exclusive(self, archive: Any) -> None:
        events = await self.audit_events(archive)
        assert await archive.audit_log(None, None, NOW + 2, NOW + 4, 100) == [events[2], events[1]]

    @pytest_twisted.ensureDeferred
    async def test_audit_log_limit_keeps_the_newest(self, archive: Any) -> None:
        events = await self.audit_events(archive)
        assert await archive.audit_log(None, None, None, None, 2) == [events[3], events[2]]

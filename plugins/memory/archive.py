"""
The ``memory`` archive: every message in a dict, for tests of the core.

It keeps the same rules as the durable archives (the contract suite in
``mailhub.testing.archive_contract`` checks all of them) and fires every
``Deferred`` at once.  Words are matched as the suite says: folded case and
accents, split at every character that is not a letter or a digit, the last
word of a term matching a word's start.  It keeps the LiveArchive's
accounts too (``IAccountStore``), as the contract in
``mailhub.testing.account_contract`` says.  Nothing survives the process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mailhub.interfaces import IAccountStore, IArchive, IArchivePlugin
from mailhub.model import (
    Account,
    Address,
    ArchivedMessage,
    ArchivePage,
    ArchiveQuery,
    ArchiveScope,
    ArchiveSummary,
    AuditEvent,
    SentMessage,
    StoreUnavailable,
    archive_words,
    archive_words_occur,
    decode_archive_cursor,
    encode_archive_cursor,
)

__all__ = ["MemoryArchive", "plugin"]

_T = TypeVar("_T")


def _as_tuple(items: Iterable[Any]) -> Any:
    # mypy cannot solve the attrs ``converter=tuple`` of the model's fields.
    return tuple(items)


def _in_any(term: str, fields: Iterable[Sequence[str]], prefix: bool = True) -> bool:
    wanted = archive_words(term)
    return any(archive_words_occur(wanted, f, prefix) for f in fields)






@define
class _Stored:
    """A message as the archive holds it, with its words per field."""

    message: ArchivedMessage
    mailboxes: set[Address]
    subject: list[str]
    sender: list[str]
    envelope_sender: list[str]
    recipients: list[str]
    body: list[str]
    attachments: list[list[str]]

    @classmethod
    def of(cls, message: ArchivedMessage) -> _Stored:
        text = message.text
        return cls(
            message=message,
            mailboxes=set(message.mailboxes),
            subject=archive_words(text.subject),
            sender=archive_words(text.sender),
            envelope_sender=archive_words(str(message.sender or "")),
            recipients=archive_words(text.recipients),
            body=archive_words(text.body),
            attachments=[archive_words(a) for a in text.attachments],
        )

    def everywhere(self) -> list[Sequence[str]]:
        return [
            self.subject,
            self.sender,
            self.envelope_sender,
            self.recipients,
            self.body,
            *self.attachments,
        ]


def _in_scope(mailboxes: Iterable[Address], scope: ArchiveScope) -> list[Address]:
    if scope.mailbox is not None:
        return [m for m in mailboxes if m == scope.mailbox]
    if scope.domain is not None:
        return sorted(m for m in mailboxes if m.domain == scope.domain)
    return sorted(mailboxes)


def _matches(stored: _Stored, query: ArchiveQuery, in_scope: Sequence[Address]) -> bool:
    received_at = stored.message.received_at
    if query.before is not None and not received_at < query.before:
        return False
    if query.after is not None and not received_at >= query.after:
        return False
    if query.has_attachment is not None:
        if stored.message.text.has_attachment != query.has_attachment:
            return False
    everywhere = stored.everywhere()
    mailbox_words = [archive_words(str(m)) for m in in_scope]
    return (
        all(_in_any(w, everywhere) for w in query.words)
        and all(_in_any(p, everywhere, prefix=False) for p in query.phrases)
        and all(_in_any(s, [stored.sender, stored.envelope_sender]) for s in query.sender)
        and all(_in_any(r, [stored.recipients, *mailbox_words]) for r in query.recipient)
        and all(_in_any(s, [stored.subject]) for s in query.subject)
    )


def summary(message: ArchivedMessage, mailboxes: Sequence[Address]) -> ArchiveSummary:
    """The search result line of ``message`` (``mailboxes``: those in the scope)."""
    text = message.text
    return ArchiveSummary(
        id=message.id,
        received_at=message.received_at,
        sender=text.sender or str(message.sender or ""),
        subject=text.subject,
        mailboxes=tuple(mailboxes),
        size=len(message.message),
        has_attachment=text.has_attachment,
        message_id=text.message_id,
    )


@implementer(IArchive, IAccountStore)
@define
class MemoryArchive:
    """
    An ``IArchive`` and ``IAccountStore`` in memory.

    :ivar unavailable: set it to make every method fail with
        ``StoreUnavailable``, to test how callers cope with an archive that is down.
    """

    _clock: Any = None
    unavailable: bool = False
    _messages: dict[str, _Stored] = field(factory=dict)
    _holds: dict[str, dict[str, Any]] = field(factory=dict)
    _audit: list[AuditEvent] = field(factory=list)
    _accounts: dict[Address, Account] = field(factory=dict)
    _read: dict[Address, set[str]] = field(factory=dict)
    _sent: dict[Address, dict[str, SentMessage]] = field(factory=dict)
    #: (mailbox, archive id) -> (route, at): what the hub delivered.
    _deliveries: dict[tuple[Address, str], tuple[str, float]] = field(factory=dict)

    def _call(self, fn: Callable[[], _T]) -> Deferred[_T]:
        if self.unavailable:
            return fail(StoreUnavailable("memory archive marked unavailable"))
        try:
            return succeed(fn())
        except Exception:
            return fail()

    def add(self, message: ArchivedMessage) -> Deferred[None]:
        def do() -> None:
            stored = self._messages.get(message.id)
            if stored is None:
                self._messages[message.id] = _Stored.of(message)
            else:
                stored.mailboxes.update(message.mailboxes)

        return self._call(do)

    def _found(
        self, scope: ArchiveScope, query: ArchiveQuery
    ) -> list[tuple[_Stored, list[Address]]]:
        found = []
        for stored in self._messages.values():
            in_scope = _in_scope(stored.mailboxes, scope)
            if (in_scope or scope == ArchiveScope()) and _matches(stored, query, in_scope):
                found.append((stored, in_scope))
        found.sort(key=lambda f: (f[0].message.received_at, f[0].message.id), reverse=True)
        return found

    def search(
        self,
        scope: ArchiveScope,
        query: ArchiveQuery,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Deferred[ArchivePage]:
        def do() -> ArchivePage:
            found = self._found(scope, query)
            if cursor is not None:
                after = decode_archive_cursor(cursor)
                found = [f for f in found if (f[0].message.received_at, f[0].message.id) < after]
            items = [summary(s.message, m) for s, m in found[:limit]]
            more = len(found) > limit and items
            return ArchivePage(
                _as_tuple(items),
                encode_archive_cursor(items[-1].received_at, items[-1].id) if more else None,
            )

        return self._call(do)

    def count(self, scope: ArchiveScope, query: ArchiveQuery) -> Deferred[int]:
        return self._call(lambda: len(self._found(scope, query)))

    def get(self, archive_id: str) -> Deferred[ArchivedMessage | None]:
        def do() -> ArchivedMessage | None:
            stored = self._messages.get(archive_id)
            if stored is None:
                return None
            return evolve(stored.message, mailboxes=tuple(sorted(stored.mailboxes)))

        return self._call(do)

    def expire(self, domain: str, before: float, limit: int) -> Deferred[int]:
        def do() -> int:
            domain_ = domain.lower()
            if f"domain {domain_}" in self._holds:
                return 0
            pairs = sorted(
                (stored.message.received_at, stored.message.id, mailbox)
                for stored in self._messages.values()
                if stored.message.received_at < before
                for mailbox in stored.mailboxes
                if mailbox.domain == domain_ and f"mailbox {mailbox}" not in self._holds
            )[:limit]
            for _, archive_id, mailbox in pairs:
                stored = self._messages[archive_id]
                stored.mailboxes.discard(mailbox)
                if not stored.mailboxes:
                    del self._messages[archive_id]
            records = sorted(
                (at, key)
                for key, (_, at) in self._deliveries.items()
                if at < before and key[0].domain == domain_ and f"mailbox {key[0]}" not in self._holds
            )[:limit]
            for _, key in records:
                del self._deliveries[key]
            return max(len(pairs), len(records))

        return self._call(do)

    def record_delivered(self, records: Iterable[tuple[str, Address, str, float]]) -> Deferred[None]:
        def do() -> None:
            for archive_id, mailbox, route, at in records:
                key = (mailbox.folded(), archive_id)
                if key not in self._deliveries or self._deliveries[key][1] <= at:
                    self._deliveries[key] = (route, at)

        return self._call(do)

    def delivered(self, pairs: Iterable[tuple[str, Address]]) -> Deferred[set[tuple[str, Address]]]:
        def header_id(archive_id: str) -> str:
            stored = self._messages.get(archive_id)
            return "" if stored is None else stored.message.text.message_id

        def do() -> set[tuple[str, Address]]:
            found: set[tuple[str, Address]] = set()
            for archive_id, mailbox in pairs:
                wanted = header_id(archive_id)
                folded = mailbox.folded()
                if (folded, archive_id) in self._deliveries or (
                    wanted
                    and any(
                        m == folded and header_id(other) == wanted for m, other in self._deliveries
                    )
                ):
                    found.add((archive_id, mailbox))
            return found

        return self._call(do)

    def set_hold(self, scope: ArchiveScope, held: bool, reason: str, at: float) -> Deferred[None]:
        def do() -> None:
            if scope.mailbox is None and scope.domain is None:
                raise ValueError("a hold is on a mailbox or a domain, not the whole archive")
            key = str(scope)
            if not held:
                self._holds.pop(key, None)
            elif key not in self._holds:
                self._holds[key] = {
                    "scope": key,
                    "mailbox": None if scope.mailbox is None else str(scope.mailbox),
                    "domain": None if scope.mailbox is not None else scope.domain,
                    "reason": reason,
                    "since": at,
                }

        return self._call(do)

    def holds(self) -> Deferred[list[dict[str, Any]]]:
        return self._call(lambda: [dict(h) for h in self._holds.values()])

    def record_audit(self, event: AuditEvent) -> Deferred[None]:
        return self._call(lambda: self._audit.append(event))

    def audit_log(
        self,
        actor: str | None,
        action: str | None,
        since: float | None,
        until: float | None,
        limit: int,
    ) -> Deferred[list[AuditEvent]]:
        def do() -> list[AuditEvent]:
            found = [
                e
                for e in reversed(self._audit)
                if (actor is None or e.actor == actor)
                and (action is None or e.action == action)
                and (since is None or e.at >= since)
                and (until is None or e.at < until)
            ]
            found.sort(key=lambda e: e.at, reverse=True)
            return found[:limit]

        return self._call(do)

    # -- IAccountStore ---------------------------------------------------

    def add_account(self, account: Account) -> Deferred[None]:
        def do() -> None:
            if account.address in self._accounts:
                raise KeyError(f"an account of {account.address} exists")
            self._accounts[account.address] = account

        return self._call(do)

    def update_account(self, account: Account) -> Deferred[None]:
        def do() -> None:
            if account.address not in self._accounts:
                raise KeyError(f"no account of {account.address}")
            self._accounts[account.address] = account

        return self._call(do)

    def account(self, address: Address) -> Deferred[Account | None]:
        return self._call(lambda: self._accounts.get(address.folded()))

    def accounts(self, domain: str | None) -> Deferred[list[Account]]:
        def do() -> list[Account]:
            wanted = None if domain is None else domain.lower()
            return [
                self._accounts[address]
                for address in sorted(self._accounts)
                if wanted is None or address.domain == wanted
            ]

        return self._call(do)

    def set_read(self, account: Address, archive_ids: Iterable[str], read: bool) -> Deferred[None]:
        def do() -> None:
            ids = self._read.setdefault(account.folded(), set())
            if read:
                ids.update(archive_ids)
            else:
                ids.difference_update(archive_ids)

        return self._call(do)

    def read_ids(self, account: Address, archive_ids: Iterable[str]) -> Deferred[set[str]]:
        return self._call(lambda: self._read.get(account.folded(), set()).intersection(archive_ids))

    def add_sent(self, sent: SentMessage) -> Deferred[None]:
        def do() -> None:
            self._sent.setdefault(sent.account, {}).setdefault(sent.id, sent)

        return self._call(do)

    def sent(
        self, account: Address, before: float | None, limit: int
    ) -> Deferred[list[SentMessage]]:
        def do() -> list[SentMessage]:
            found = sorted(
                (
                    m
                    for m in self._sent.get(account.folded(), {}).values()
                    if before is None or m.sent_at < before
                ),
                key=lambda m: (m.sent_at, m.id),
                reverse=True,
            )
            return found[: max(0, limit)]

        return self._call(do)

    def sent_message(self, account: Address, sent_id: str) -> Deferred[SentMessage | None]:
        return self._call(lambda: self._sent.get(account.folded(), {}).get(sent_id))

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(IArchivePlugin)
@frozen
class MemoryArchivePlugin:
    """Makes a ``MemoryArchive``; the ``[archive]`` table needs no keys."""

    name: str = "memory"
    #: ``[archive]`` has no key of the plugin's, only the core's (``mailhub.plugin``).
    config_keys: frozenset[str] = frozenset()

    def make(self, config: Mapping[str, Any], reactor: Any) -> MemoryArchive:
        """
        :param config: ignored.
        :param reactor: kept for symmetry with the durable archives.
        """
        return MemoryArchive(reactor)


plugin = MemoryArchivePlugin()

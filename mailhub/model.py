"""
Value types shared by the core and every plugin.

Everything here is an immutable attrs class: a store hands out copies and takes
changes only through its own methods, so no two parts of the hub ever share
mutable state by accident.  This module does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence

from attrs import evolve, field, frozen

__all__ = [
    "ROUTE_BACKPRESSURE_PAUSE",
    "ROUTE_MAX_CONNECTIONS",
    "Account",
    "Action",
    "Address",
    "AddressError",
    "ArchivePage",
    "ArchiveQuery",
    "ArchiveScope",
    "ArchiveSummary",
    "ArchiveText",
    "ArchivedMessage",
    "Attempt",
    "AuditEvent",
    "Decision",
    "Entry",
    "EntryFilter",
    "Envelope",
    "Lease",
    "LeaseLost",
    "Outcome",
    "Recipient",
    "RecipientState",
    "Reply",
    "Role",
    "Route",
    "SentMessage",
    "StoreFull",
    "StoreUnavailable",
    "apply_decision",
    "archive_words",
    "archive_words_occur",
    "decode_archive_cursor",
    "encode_archive_cursor",
    "fair_share",
    "has_bare_lf",
    "has_bare_line_end",
    "is_back_pressure",
    "new_entries",
]

#: A route's connections open at once for the whole hub, when its domain's
#: table does not say (``[domains."..."] max_connections``).  The one
#: default: the configuration, the node's pacing and the transports read it
#: from here.
ROUTE_MAX_CONNECTIONS = 10

#: Seconds a route pauses after a back-pressure reply (``452 4.3.1``) when
#: its domain's table does not say (``backpressure_pause``).
ROUTE_BACKPRESSURE_PAUSE = 30.0


class AddressError(ValueError):
    """
    A mailbox could not be parsed, or uses a form the hub does not relay.

    ``code`` and ``enhanced`` are the SMTP reply the server gives for it.
    """

    def __init__(self, message: str, code: int = 501, enhanced: str = "5.1.3") -> None:
        super().__init__(message)
        self.code = code
        self.enhanced = enhanced


class StoreUnavailable(Exception):
    """The spool store cannot take or give data right now (a temporary failure)."""


class StoreFull(StoreUnavailable):
    """The spool has reached its configured size limit."""


class LeaseLost(Exception):
    """The lease given is no longer held: it expired and another node may hold the entry."""


# A dot-atom local part (RFC 5322 3.2.3) or a quoted string without "@" or
# routing characters.  Anything else is refused: relaying tricks (percent hack,
# bang paths, source routes, quoted "@") hide a second destination in the local part.
_ATEXT = r"[A-Za-z0-9!#$&'*+/=?^_`{|}~\-\x80-\U0010ffff]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED = re.compile(r'"(?:[^"\\\r\n]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9\-\x80-\U0010ffff]{1,63}(?<!-)\Z")


def _lower(text: str) -> str:
    return text.lower()


def _addresses(items: Iterable[Address]) -> tuple[Address, ...]:
    return tuple(items)


def _folded(address: Address) -> Address:
    return address.folded()


def _folded_or_none(address: Address | None) -> Address | None:
    return None if address is None else address.folded()


def _mailboxes(items: Iterable[Address]) -> tuple[Address, ...]:
    # The archive's mailboxes: folded (``Address.folded``), each once, in order.
    return tuple(dict.fromkeys(a.folded() for a in items))


def _recipients(items: Iterable[Recipient]) -> tuple[Recipient, ...]:
    return tuple(items)


def _replies(items: Iterable[tuple[Address, Reply]]) -> tuple[tuple[Address, Reply], ...]:
    return tuple(items)


def _outcomes(items: Iterable[Outcome]) -> tuple[Outcome, ...]:
    return tuple(items)


@frozen(order=True)
class Address:
    """
    A mailbox ``local@domain``.  The domain is kept lower case; the local part
    as given (it is the customer server's business whether it folds case).
    """

    local: str
    domain: str = field(converter=_lower)

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    def folded(self) -> Address:
        """
        The mailbox as the archive and its users know it: the local part in
        lower case too.  Mail to ``John.Smith@example.com`` and to
        ``john.smith@example.com`` is one person's, as every mail server
        the hub stands in front of (Exchange, Postfix's maps, Dovecot) takes
        it; the relay still passes the address on as it was given.
        """
        local = self.local.lower()
        return self if local == self.local else Address(local, self.domain)

    @classmethod
    def parse(cls, text: str) -> Address:
        """
        Parse a mailbox as it appears inside ``<...>`` in MAIL and RCPT.

        :raises AddressError: for anything that is not a plain mailbox: source
            routes, percent hacks, bang paths, quoted local parts that carry
            ``@``, ``%`` or ``!``, address literals and malformed domains.
        """
        if not text:
            raise AddressError("empty address", 501, "5.1.3")
        if len(text) > 254:
            raise AddressError("address too long", 501, "5.1.3")
        if text.startswith("@"):
            raise AddressError("source routes are not accepted", 550, "5.7.1")
        local, sep, domain = text.rpartition("@")
        if not sep or not local:
            raise AddressError("address must be local@domain", 501, "5.1.3")
        if local.startswith('"'):
            if not _QUOTED.match(local):
                raise AddressError("malformed quoted local part", 501, "5.1.3")
            inner = local[1:-1]
            if any(c in inner for c in "@%!"):
                raise AddressError("routing characters in local part", 550, "5.7.1")
        else:
            if any(c in local for c in "@%!"):
                raise AddressError("routing characters in local part", 550, "5.7.1")
            if not _DOT_ATOM.match(local):
                raise AddressError("malformed local part", 501, "5.1.3")
        if len(local) > 64:
            raise AddressError("local part too long", 501, "5.1.3")
        if domain.startswith("["):
            raise AddressError("address literals are not accepted", 550, "5.7.1")
        domain = domain.rstrip(".") if domain.endswith(".") and not domain.endswith("..") else domain
        labels = domain.split(".")
        if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
            raise AddressError("malformed domain", 501, "5.1.2")
        return cls(local, domain)


@frozen
class Reply:
    """An SMTP reply (or a transport's equivalent): code, enhanced status, text."""

    code: int
    enhanced: str = ""
    text: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


def is_back_pressure(reply: Reply) -> bool:
    """
    Whether a reply says "you are sending too much", as opposed to "not now":
    Exchange's ``452 4.3.1``, ``421``/``451 4.3.2`` (system not accepting
    network messages), ``4.7.0``-style rate limits, or a ``421`` greeting.
    """
    if not reply.temporary:
        return False
    return reply.enhanced in ("4.3.1", "4.3.2", "4.7.0", "4.7.1") or (
        reply.code == 452 and not reply.enhanced
    )


def fair_share(limit: int, wants: Mapping[str, int], node: str) -> int:
    """
    ``node``'s part of ``limit`` connections when the nodes in ``wants`` each
    want as many (max-min fairness: a node wanting less than an equal part
    gets what it wants, the others split the rest; what does not split
    evenly goes to the first nodes by name).  For stores that coordinate a
    route's connections between nodes (``IRouteCoordination.share``).

    :param limit: the route's connections for the whole hub.
    :param wants: each node's demand (nodes wanting nothing may be left out).
    :param node: the node asking; it must be in ``wants``.
    :returns: at most ``wants[node]``.
    """
    left = max(0, limit)
    pending = sorted((w, name) for name, w in wants.items() if w > 0)
    given: dict[str, int] = {}
    while pending:
        equal = left // len(pending)
        want, name = pending[0]
        if want <= equal:
            given[name] = want
            left -= want
            pending.pop(0)
            continue
        # Everyone left wants more than an equal part: split what is left.
        extra = left - equal * len(pending)
        for i, name in enumerate(sorted(n for _, n in pending)):
            given[name] = equal + (1 if i < extra else 0)
        break
    return min(given.get(node, 0), max(0, wants.get(node, 0)))


@frozen
class Route:
    """
    Where a domain's mail goes: a transport plugin name and its target.

    The text form is ``transport:target``, e.g. ``smtp:mail.example.com:25``.
    """

    transport: str
    target: str

    @classmethod
    def parse(cls, text: str) -> Route:
        transport, sep, target = text.partition(":")
        if not sep or not transport or not target:
            raise ValueError(f"route {text!r} is not of the form 'transport:target'")
        return cls(transport, target)

    def __str__(self) -> str:
        return f"{self.transport}:{self.target}"


#: A CR with no LF after it (within the range searched: a CR at its end is bare).
_BARE_CR = re.compile(rb"\r(?!\n)")
#: An LF without a CR in front (the lookbehind ends at the LF itself, so it
#: sees the octet before the LF, within the range searched or not).
_BARE_LF = re.compile(rb"\n(?<!\r\n)")


def has_bare_line_end(data: bytes | bytearray, lo: int = 0, hi: int | None = None) -> bool:
    """
    Whether ``data[lo:hi]`` has a bare CR or LF: a CR not followed by an LF,
    or an LF not after a CR (both within the range).

    Two searches, each led by one literal octet, so that the regular
    expression engine's own scan finds the candidates: 58 us for 100 KB,
    where one pattern for both (led by a choice of octets) steps through
    every position and takes ten times as long.

    The SMTP transport checks a message read back from the spool with it.
    (The SMTP server finds bare CRs in the same scan that finds the end of
    DATA, then bare LFs with ``has_bare_lf``.)
    """
    if hi is None:
        hi = len(data)
    if hi <= lo:
        return False
    if data[lo] == 0x0A:
        # The range's first LF is bare whatever precedes it outside the range.
        return True
    return _BARE_CR.search(data, lo, hi) is not None or has_bare_lf(data, lo, hi)


def has_bare_lf(data: bytes | bytearray, lo: int = 0, hi: int | None = None) -> bool:
    """Whether ``data[lo:hi]`` has an LF without a CR in front (the octet before ``lo`` counts)."""
    return _BARE_LF.search(data, lo, len(data) if hi is None else hi) is not None


class CheckedMessage(bytes):
    """
    A message as the SMTP server accepted it, with what its checks found:
    its line ends are all CRLF (no bare CR or LF), and ``dot_lines`` says
    whether any line starts with a dot.

    It travels with the message to the accepting node's first attempt, so
    the transport does not scan 100 KB again for what the server already
    knows (``mailhub.smtp.client.wire_data``).  A message read back from
    the spool is plain ``bytes`` and is checked afresh.
    """

    #: Whether any line starts with ".", so that it needs dot-stuffing on
    #: the wire (True, the safe answer, unless the server said otherwise).
    dot_lines: bool = True

    @classmethod
    def of(cls, data: bytes, dot_lines: bool) -> CheckedMessage:
        message = cls(data)
        message.dot_lines = dot_lines
        return message


@frozen
class Envelope:
    """
    The SMTP envelope of an accepted message.

    :ivar sender: the reverse path; ``None`` is the null sender ``<>``.
    :ivar recipients: the accepted forward paths, in order.
    :ivar received_at: POSIX time the message was accepted.
    :ivar client: the client's address, ``"ip"``.
    :ivar helo: what the client said in HELO/EHLO.
    :ivar smtputf8: the client gave MAIL the SMTPUTF8 parameter (RFC 6531).
    :ivar body_8bit: the client gave MAIL ``BODY=8BITMIME``.
    """

    sender: Address | None
    recipients: tuple[Address, ...] = field(converter=_addresses)
    received_at: float = 0.0
    client: str = ""
    helo: str = ""
    smtputf8: bool = False
    body_8bit: bool = False


class RecipientState(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"


@frozen
class Recipient:
    """One recipient of an entry and where it stands; ``reply`` is the last one heard."""

    address: Address
    state: RecipientState = RecipientState.PENDING
    reply: Reply | None = None


@frozen
class Entry:
    """
    One message for one route, as the spool holds it.

    :ivar id: the entry's id, unique in the spool.
    :ivar message_id: the id of the spooled message body (shared by the entries of
        one message that went to several routes); pass it to ``ISpoolStore.body``.
    :ivar route: the route in text form (``Route.parse`` reads it).
    :ivar created: when the message was accepted.
    :ivar next_attempt: when the entry is due next.
    :ivar node: the node that should make the next attempt, or ``None`` for any.
    :ivar attempts: how many attempts have been recorded.
    :ivar held: held entries are never claimed until an operator releases them.
    :ivar smtputf8: the message was received with SMTPUTF8 (RFC 6531): its
        addresses or headers may hold UTF-8, so a transport may relay it only
        to a server that offers SMTPUTF8.  Stores set it from
        ``Envelope.smtputf8`` at ``enqueue`` and keep it.
    :ivar delay_notified: the sender was sent a "delayed" DSN for this entry
        (``Decision.delay_notified``): no attempt sends another.  Stores keep
        it as ``record`` sets it (``apply_decision``).
    """

    id: str
    message_id: str
    route: str
    sender: Address | None
    recipients: tuple[Recipient, ...] = field(converter=_recipients)
    created: float = 0.0
    next_attempt: float = 0.0
    node: str | None = None
    attempts: int = 0
    held: bool = False
    size: int = 0
    envelope_helo: str = ""
    envelope_client: str = ""
    smtputf8: bool = False
    delay_notified: bool = False

    @property
    def pending(self) -> tuple[Address, ...]:
        """The recipients still to deliver."""
        return tuple(r.address for r in self.recipients if r.state is RecipientState.PENDING)

    @property
    def last_reply(self) -> Reply | None:
        for r in self.recipients:
            if r.state is RecipientState.PENDING and r.reply is not None:
                return r.reply
        return None


@frozen
class Lease:
    """
    A node's time-limited claim on an entry.

    ``token`` identifies this claim: once the lease expires and another node
    claims the entry, the old token no longer works (``LeaseLost``).
    """

    entry: Entry
    node: str
    token: str
    expires: float


@frozen
class Attempt:
    """
    One try to deliver an entry, with the replies heard per recipient.

    ``replies`` pairs each tried recipient with its reply; a connection-level
    failure (refused, timeout, dropped) gives every recipient the same reply.
    """

    entry_id: str
    node: str
    started: float
    finished: float
    replies: tuple[tuple[Address, Reply], ...] = field(converter=_replies)


class Action(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"
    EXPIRED = "expired"
    HOLD = "hold"


@frozen
class Outcome:
    """What the policy decided for one recipient."""

    recipient: Address
    action: Action
    reply: Reply


@frozen
class Decision:
    """
    The policy's verdict on an attempt.

    :ivar outcomes: one per recipient that was tried.
    :ivar next_attempt: when the entry is due again, if any recipient is to be
        retried (``Action.RETRY``); ``None`` otherwise.
    :ivar next_node: the node that should make that attempt, or ``None`` for any.
    :ivar delay_notified: the attempt sent the sender a "delayed" DSN: the
        entry records it (``Entry.delay_notified``), once and for good.
    """

    outcomes: tuple[Outcome, ...] = field(converter=_outcomes)
    next_attempt: float | None = None
    next_node: str | None = None
    delay_notified: bool = False

    @property
    def hold(self) -> bool:
        return any(o.action is Action.HOLD for o in self.outcomes)

    def with_action(self, action: Action) -> Iterable[Outcome]:
        return (o for o in self.outcomes if o.action is action)


@frozen
class EntryFilter:
    """Which entries an operator wants to see; every field set must match."""

    route: str | None = None
    held: bool | None = None
    recipient: str | None = None


def new_entries(
    envelope: Envelope,
    size: int,
    routes: Mapping[str, Sequence[Address]],
    node: str,
    message_id: str,
    new_id: Callable[[], str],
) -> list[Entry]:
    """
    The entries ``ISpoolStore.enqueue`` stores for one accepted message: one
    per route, due at once and reserved for the accepting ``node``.  Stores
    use this so they all agree on what a new entry is.

    :param new_id: makes a fresh entry id.
    """
    return [
        Entry(
            id=new_id(),
            message_id=message_id,
            route=route,
            sender=envelope.sender,
            recipients=tuple(Recipient(a) for a in recipients),
            created=envelope.received_at,
            next_attempt=envelope.received_at,
            node=node,
            size=size,
            envelope_helo=envelope.helo,
            envelope_client=envelope.client,
            smtputf8=envelope.smtputf8,
        )
        for route, recipients in routes.items()
    ]


def apply_decision(entry: Entry, decision: Decision) -> Entry:
    """
    The entry as it stands after ``decision``: recipient states updated,
    next attempt and node set.  Stores use this so they all agree on the rules.
    """
    states = {
        Action.DELIVERED: RecipientState.DELIVERED,
        Action.FAILED: RecipientState.FAILED,
        Action.EXPIRED: RecipientState.EXPIRED,
    }
    by_address = {o.recipient: o for o in decision.outcomes}
    recipients = []
    for r in entry.recipients:
        o = by_address.get(r.address)
        if o is None or r.state is not RecipientState.PENDING:
            recipients.append(r)
        else:
            recipients.append(
                Recipient(r.address, states.get(o.action, RecipientState.PENDING), o.reply)
            )
    return evolve(
        entry,
        recipients=tuple(recipients),
        attempts=entry.attempts + 1,
        next_attempt=decision.next_attempt if decision.next_attempt is not None else entry.next_attempt,
        node=decision.next_node,
        held=entry.held or decision.hold,
        delay_notified=entry.delay_notified or decision.delay_notified,
    )


# -- the archive ---------------------------------------------------------------


@frozen
class ArchiveText:
    """
    What the archive searches in a message, decoded by the core (never by a
    plugin): header fields as text, the text of its text parts (HTML reduced
    to text) and its attachments' names.

    :ivar subject: the decoded ``Subject:``.
    :ivar sender: the decoded ``From:`` (display names and addresses).
    :ivar recipients: the decoded ``To:`` and ``Cc:``.
    :ivar body: the text of the message, as far as it can be decoded.
    :ivar attachments: file names of its attachments.
    :ivar message_id: its ``Message-ID:`` (without ``<>``), or ``""``.
    :ivar date: its ``Date:`` as POSIX time, or ``None``.
    """

    subject: str = ""
    sender: str = ""
    recipients: str = ""
    body: str = ""
    attachments: tuple[str, ...] = field(default=(), converter=tuple)
    message_id: str = ""
    date: float | None = None

    @property
    def has_attachment(self) -> bool:
        return bool(self.attachments)


@frozen
class ArchivedMessage:
    """
    One archived message and the hub's mailboxes it was for.

    :ivar id: the archive id: the spool's message id of the accepted message
        (``Entry.message_id``), or one an import made.  Adding the same id
        again only adds mailboxes.
    :ivar received_at: when the hub accepted it (an import: when it was first
        received, as far as known).
    :ivar sender: the envelope sender; ``None`` for ``<>``.
    :ivar mailboxes: the recipients in the hub's domains it is archived for,
        folded (``Address.folded``) and each once: mail to
        ``John.Smith@example.com`` and to ``john.smith@example.com`` is in
        one mailbox, ``john.smith@example.com``, whatever a caller gives.
    :ivar message: the message as accepted, byte for byte.
    :ivar text: its searchable text (``ArchiveText``).
    """

    id: str
    received_at: float
    sender: Address | None
    mailboxes: tuple[Address, ...] = field(converter=_mailboxes)
    message: bytes = b""
    text: ArchiveText = ArchiveText()


@frozen
class ArchiveScope:
    """
    Whose messages: one mailbox, every mailbox of a domain, or (neither set)
    the whole archive, for operators.  The mailbox is kept folded
    (``Address.folded``), as the archive keeps its mailboxes: a scope made
    from what a user or an operator typed finds the mail however either
    spelled the local part.
    """

    mailbox: Address | None = field(default=None, converter=_folded_or_none)
    domain: str | None = field(default=None, converter=lambda d: None if d is None else d.lower())

    def __str__(self) -> str:
        if self.mailbox is not None:
            return f"mailbox {self.mailbox}"
        if self.domain is not None:
            return f"domain {self.domain}"
        return "the whole archive"

    def contains(self, mailbox: Address) -> bool:
        """Whether ``mailbox`` is within this scope."""
        if self.mailbox is not None:
            return mailbox.folded() == self.mailbox
        if self.domain is not None:
            return mailbox.domain == self.domain
        return True


@frozen
class ArchiveQuery:
    """
    A search, every part of which must match (``mailhub.archive.query``
    parses the text form ``words "a phrase" from:x to:y subject:z
    before:2026-01-31 after:2026-01-01 has:attachment``).

    :ivar words: each must occur, as a word or a word's start, in the
        sender, recipients, subject, body or attachment names.
    :ivar phrases: each must occur as consecutive words in one of them.
    :ivar sender: each must occur in the ``From:`` or the envelope sender.
    :ivar recipient: each must occur in ``To:``/``Cc:`` or the mailboxes.
    :ivar subject: each must occur in the subject.
    :ivar before: received before this time.
    :ivar after: received at or after this time.
    :ivar has_attachment: with (``True``) or without (``False``) attachments.
    """

    words: tuple[str, ...] = field(default=(), converter=tuple)
    phrases: tuple[str, ...] = field(default=(), converter=tuple)
    sender: tuple[str, ...] = field(default=(), converter=tuple)
    recipient: tuple[str, ...] = field(default=(), converter=tuple)
    subject: tuple[str, ...] = field(default=(), converter=tuple)
    before: float | None = None
    after: float | None = None
    has_attachment: bool | None = None


@frozen
class ArchiveSummary:
    """One line of a search result."""

    id: str
    received_at: float
    sender: str
    subject: str
    mailboxes: tuple[Address, ...] = field(converter=_mailboxes)
    size: int = 0
    has_attachment: bool = False
    message_id: str = ""


@frozen
class ArchivePage:
    """
    One page of a search, newest first.

    :ivar items: the summaries.
    :ivar next: an opaque cursor for the next page, or ``None`` at the end.
    """

    items: tuple[ArchiveSummary, ...] = field(converter=tuple)
    next: str | None = None


@frozen
class AuditEvent:
    """
    Who did what to the archive, and when.

    :ivar at: POSIX time.
    :ivar actor: who (``"operator:root@mx1"``, ``"user:alice@example.com"``).
    :ivar action: ``search``, ``read``, ``export``, ``redeliver``, ``import``,
        ``hold``, ``release``, ``expire``.
    :ivar scope: whose messages (``str(ArchiveScope)``) or an archive id.
    :ivar detail: the query, counts, ... as text.
    """

    at: float
    actor: str
    action: str
    scope: str
    detail: str = ""


#: A word, for the archive: a run of letters and digits.
_ARCHIVE_WORD = re.compile(r"[^\W_]+")


def archive_words(text: str) -> list[str]:
    """
    The words of ``text`` as every archive compares them (the contract in
    ``mailhub.testing.archive_contract``): case and accents folded, runs of
    letters and digits.  For archive plugins.
    """
    folded = text.casefold()
    if not folded.isascii():
        plain = "".join(c for c in unicodedata.normalize("NFKD", folded) if not unicodedata.combining(c))
        folded = unicodedata.normalize("NFC", plain)
    return _ARCHIVE_WORD.findall(folded)


def archive_words_occur(wanted: Sequence[str], words: Sequence[str], prefix: bool = True) -> bool:
    """
    Whether the words ``wanted`` (``archive_words``) occur in a row in
    ``words``, the last as a start if ``prefix``, as a search term matches a
    field in every archive.  For archive plugins.
    """
    if not wanted:
        return True
    n = len(wanted)
    for i in range(len(words) - n + 1):
        if list(words[i : i + n - 1]) != list(wanted[:-1]):
            continue
        last = words[i + n - 1]
        if last == wanted[-1] or (prefix and last.startswith(wanted[-1])):
            return True
    return False


def encode_archive_cursor(received_at: float, archive_id: str) -> str:
    """The opaque ``ArchivePage.next`` after the summary ``(received_at, archive_id)``.  For archive plugins."""
    return base64.urlsafe_b64encode(json.dumps([received_at, archive_id]).encode()).decode()


def decode_archive_cursor(cursor: str) -> tuple[float, str]:
    """
    :returns: the ``(received_at, archive_id)`` of a cursor ``encode_archive_cursor`` made.
    :raises ValueError: for anything else.
    """
    try:
        received_at, archive_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (binascii.Error, ValueError, TypeError) as e:
        raise ValueError(f"not an archive cursor: {cursor!r}") from e
    if not isinstance(received_at, int | float) or not isinstance(archive_id, str):
        raise ValueError(f"not an archive cursor: {cursor!r}")
    return float(received_at), archive_id


# -- accounts of the LiveArchive -------------------------------------------------


class Role(enum.Enum):
    """What an account may see: its own mailboxes, its domain's, or everything."""

    USER = "user"
    DOMAIN_ADMIN = "domain-admin"
    HUB_ADMIN = "hub-admin"


@frozen
class Account:
    """
    A person who logs in to the LiveArchive, local to the hub: login never
    depends on the organisation's own directory, which may be down with its
    server.

    :ivar address: the login, the person's own mailbox, folded
        (``Address.folded``) as the archive's mailboxes are: ``Alice@`` and
        ``alice@`` are one account.
    :ivar password_hash: an argon2 hash (``mailhub.archive.accounts``), or ``""``
        for an account invited but without a password yet.
    :ivar role: ``Role``.
    :ivar mailboxes: more mailboxes the person may read (shared ones), folded.
    :ivar totp_secret: base32 secret of a second factor, or ``""``.
    :ivar recovery: an address outside the hub for password resets, or ``""``.
    :ivar disabled: cannot log in; sessions end.
    :ivar session_version: the session generation: every session carries the
        value it was issued under and is refused, on every node, once it is
        raised (a new password, a reset, disabling, "log out everywhere").
    :ivar created: POSIX time.
    :ivar ended_sessions: the sessions ended by logging out, each with the
        time after which it would have expired anyway, kept with the account
        so that every node, after a restart too, refuses their cookies.
    """

    address: Address = field(converter=_folded)
    password_hash: str = ""
    role: Role = Role.USER
    mailboxes: tuple[Address, ...] = field(default=(), converter=_mailboxes)
    totp_secret: str = ""
    recovery: str = ""
    disabled: bool = False
    session_version: int = 0
    created: float = 0.0
    ended_sessions: tuple[tuple[str, float], ...] = field(default=(), converter=lambda items: tuple(
        (str(i), float(t)) for i, t in items))

    def can_read(self, mailbox: Address) -> bool:
        """Whether this account may read ``mailbox``'s mail."""
        if self.disabled:
            return False
        if self.role is Role.HUB_ADMIN:
            return True
        if self.role is Role.DOMAIN_ADMIN and mailbox.domain == self.address.domain:
            return True
        mailbox = mailbox.folded()
        return mailbox == self.address or mailbox in self.mailboxes

    def to_json(self) -> str:
        """The account as ASCII JSON (``from_json`` gives it back exactly), for stores."""
        return json.dumps(
            {
                "address": [self.address.local, self.address.domain],
                "password_hash": self.password_hash,
                "role": self.role.value,
                "mailboxes": [[m.local, m.domain] for m in self.mailboxes],
                "totp_secret": self.totp_secret,
                "recovery": self.recovery,
                "disabled": self.disabled,
                "session_version": self.session_version,
                "created": self.created,
                "ended_sessions": [list(s) for s in self.ended_sessions],
            }
        )

    @classmethod
    def from_json(cls, data: str) -> Account:
        """
        The account ``to_json`` gave.  A field missing from the JSON (an
        account stored by an older mailhub) takes its default: only the
        address is required.
        """
        fields = json.loads(data)
        return cls(
            address=Address(*fields["address"]),
            password_hash=fields.get("password_hash", ""),
            role=Role(fields.get("role", Role.USER.value)),
            mailboxes=tuple(Address(local, domain) for local, domain in fields.get("mailboxes", ())),
            totp_secret=fields.get("totp_secret", ""),
            recovery=fields.get("recovery", ""),
            disabled=fields.get("disabled", False),
            session_version=fields.get("session_version", 0),
            created=fields.get("created", 0.0),
            ended_sessions=fields.get("ended_sessions", ()),
        )


@frozen
class SentMessage:
    """A message a person sent from the LiveArchive, for their Sent folder (``account`` folded)."""

    id: str
    account: Address = field(converter=_folded)
    sent_at: float
    message: bytes

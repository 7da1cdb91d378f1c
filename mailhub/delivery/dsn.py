"""
Delivery status notifications (RFC 3464): the bounce a sender gets when the
hub fails or gives up on some recipients of an entry (``build_dsn``), and the
delay notice (``Action: delayed``) it gets once when an entry is still not
delivered after ``warn_after`` (``build_delay_dsn``).

Building a DSN is pure: this module returns bytes and an envelope; the engine
enqueues them through the hub like any other message.  A DSN is never sent to
the null sender ``<>`` (RFC 5321 6.1: that is how bounce loops start).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

from mailhub.model import Action, Entry, Envelope, Outcome, Route

__all__ = ["build_delay_dsn", "build_dsn"]


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def _status(outcome: Outcome) -> str:
    if outcome.action is Action.EXPIRED:
        return "4.4.7"
    reply = outcome.reply
    if reply.enhanced and reply.enhanced[0] == "5":
        return reply.enhanced
    return "5.0.0"


def _clean(text: str) -> str:
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def build_dsn(
    hostname: str,
    entry: Entry,
    outcomes: Sequence[Outcome],
    message: bytes,
    now: float,
) -> tuple[Envelope, bytes] | None:
    """
    Build the DSN for the failed or expired ``outcomes`` of ``entry``.

    :param hostname: the hub's name (``Reporting-MTA``, ``From:``).
    :param message: the original message; its header block is returned to
        the sender as ``text/rfc822-headers``.
    :returns: ``(envelope, bytes)`` to enqueue, or ``None`` when there is no one
        to tell (null sender, nothing failed).
    """
    if entry.sender is None or not outcomes:
        return None
    if all(o.action is Action.EXPIRED for o in outcomes):
        days = max(1, round((now - entry.created) / 86400))
        text = [
            f"Your message could not be delivered to the recipients below for {days} day(s) "
            "and the hub has stopped trying."
        ]
    else:
        text = ["Your message could not be delivered to the recipients below."]
    return _report(hostname, entry, outcomes, message, now, "Failure", text, "failed", _status, [])


def build_delay_dsn(
    hostname: str,
    entry: Entry,
    outcomes: Sequence[Outcome],
    message: bytes,
    now: float,
    retry_until: float | None,
) -> tuple[Envelope, bytes] | None:
    """
    Build the "delayed" DSN (RFC 3464 ``Action: delayed``) for the recipients
    of ``entry`` that are still being retried: the sender learns that the
    message is not lost and need not be sent again.

    :param outcomes: the recipients still deferred (``Action.RETRY``), with
        their last reply.
    :param message: the original message; its header block goes back as
        ``text/rfc822-headers``.
    :param retry_until: when the hub gives up (``Will-Retry-Until``), or
        ``None`` if unknown.
    :returns: ``(envelope, bytes)`` to enqueue (from the null sender), or
        ``None`` for a null sender or no recipient.
    """
    if entry.sender is None or not outcomes:
        return None
    text = [
        f"Your message has not yet been delivered to the recipients below after {_waited(now - entry.created)}.",
        "The hub keeps it and keeps trying"
        + (f" until {_date(retry_until)}" if retry_until is not None else "")
        + ": you need not send it again.",
        "This is a warning only; you will hear again only if the hub gives up.",
    ]
    until = [] if retry_until is None else [f"Will-Retry-Until: {_date(retry_until)}"]
    return _report(hostname, entry, outcomes, message, now, "Delay", text, "delayed", _temporary_status, until)


def _temporary_status(outcome: Outcome) -> str:
    reply = outcome.reply
    if reply.enhanced and reply.enhanced[0] == "4":
        return reply.enhanced
    return "4.0.0"


def _report(
    hostname: str,
    entry: Entry,
    outcomes: Sequence[Outcome],
    message: bytes,
    now: float,
    kind: str,
    text: Sequence[str],
    action: str,
    status: Callable[[Outcome], str],
    extra: Sequence[str],
) -> tuple[Envelope, bytes]:
    """The ``multipart/report`` both kinds of DSN are, to the entry's sender, from the null sender."""
    assert entry.sender is not None
    boundary = f"mailhub-{uuid.uuid4().hex}"
    route = Route.parse(entry.route)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{entry.sender}>",
        f"Subject: Delivery Status Notification ({kind})",
        f"Date: {_date(now)}",
        f"Message-ID: <{uuid.uuid4().hex}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"This is the mail system at {hostname}.",
        "",
        *text,
        "",
    ]
    for o in outcomes:
        lines.append(f"<{o.recipient}>: {_clean(str(o.reply))}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-Mailhub-Entry: {entry.id}",
        f"Arrival-Date: {_date(entry.created)}",
        "",
    ]
    for o in outcomes:
        lines += [
            f"Final-Recipient: rfc822; {o.recipient}",
            f"Action: {action}",
            f"Status: {status(o)}",
        ]
        if route.transport in ("smtp", "lmtp") and route.target != "mx" and not route.target.startswith("unix:"):
            lines.append(f"Remote-MTA: dns; {route.target.rsplit(':', 1)[0]}")
        lines += [
            f"Diagnostic-Code: smtp; {_clean(str(o.reply))}",
            f"Last-Attempt-Date: {_date(now)}",
            *extra,
            "",
        ]
    lines += [
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    tail = f"\r\n--{boundary}--\r\n".encode()
    body = head + _header_block(message).rstrip(b"\r\n") + b"\r\n" + tail
    envelope = Envelope(sender=None, recipients=(entry.sender,), received_at=now, helo=hostname)
    return envelope, body


def _waited(seconds: float) -> str:
    """How long a message has waited, in words: ``45 minutes``, ``1 hour``, ``3 hours``, ``2 days``."""
    minutes = max(1, round(seconds / 60))
    if minutes < 90:
        return f"{minutes} minute" + ("" if minutes == 1 else "s")
    hours = round(seconds / 3600)
    if hours < 48:
        return f"{hours} hour" + ("" if hours == 1 else "s")
    days = round(seconds / 86400)
    return f"{days} days"

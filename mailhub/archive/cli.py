"""
``mailhub archive``: the archive from the shell.

    mailhub archive [-c FILE] search [--mailbox M | --domain D] [--limit N] [--cursor C] [--json] [QUERY...]
    mailhub archive [-c FILE] show ID [--raw | --json]
    mailhub archive [-c FILE] redeliver (--mailbox M | --domain D) [--skip-delivered] [--dry-run] [--json] [QUERY...]
    mailhub archive [-c FILE] import (--mbox FILE | --maildir DIR) --mailbox M
    mailhub archive [-c FILE] export (--mailbox M | --domain D | --all) --output FILE [--format mbox|eml-zip] [QUERY...]
    mailhub archive [-c FILE] hold (--mailbox M | --domain D) [--reason TEXT] [--release]
    mailhub archive [-c FILE] holds [--json]
    mailhub archive [-c FILE] audit [--actor A] [--action X] [--since DATE] [--until DATE] [--limit N] [--json]

Every search, read, export, import, re-delivery and hold is written to the
archive's audit log, with the operator's name (``operator:USER@HOST``).
The command opens the configured archive and spool itself, like ``mailhub
queue``: the hub may be running.  Files are read and written in threads.
"""

from __future__ import annotations

import argparse
import calendar
import getpass
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from twisted.internet.threads import deferToThread

from mailhub.archive.query import QueryError, parse_date, parse_query
from mailhub.config import HubConfig
from mailhub.model import (
    Address,
    AddressError,
    ArchivedMessage,
    ArchiveQuery,
    ArchiveScope,
    ArchiveSummary,
    AuditEvent,
    Envelope,
)
from mailhub.plugin import load_plugin

__all__ = ["add_parser", "run"]

#: Messages read or written between two progress lines.
PROGRESS_EVERY = 100


def add_parser(sub: Any, config_default: str) -> None:
    """Add ``archive`` and its subcommands to the ``mailhub`` parser."""
    a = sub.add_parser("archive", help="search, read, re-deliver, import and export the archive")
    a.add_argument("-c", "--config", default=config_default,
                   help="the hub's configuration (default: $MAILHUB_CONFIG or mailhub.toml)")
    s = a.add_subparsers(dest="action", required=True)

    def scope_args(p: Any, everything: bool = False) -> None:
        p.add_argument("--mailbox", help="one mailbox, local@domain")
        p.add_argument("--domain", help="every mailbox of a domain")
        if everything:
            p.add_argument("--all", action="store_true", help="the whole archive")

    p = s.add_parser("search", help="find messages, newest first")
    scope_args(p)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--cursor", help="the 'next' of the page before")
    p.add_argument("--json", action="store_true")
    p.add_argument("query", nargs="*", help='words, "phrases", from: to: subject: after: before: has:attachment')

    p = s.add_parser("show", help="one message")
    p.add_argument("id")
    p.add_argument("--raw", action="store_true", help="the message as received, byte for byte")
    p.add_argument("--json", action="store_true")

    p = s.add_parser("redeliver", help="put archived messages back into the spool, for their route")
    scope_args(p)
    p.add_argument("--dry-run", action="store_true", help="only count what would be re-delivered")
    p.add_argument(
        "--skip-delivered",
        action="store_true",
        help="not to a mailbox the hub itself delivered the message to (by Message-ID)",
    )
    p.add_argument("--json", action="store_true", help="the counts as JSON")
    p.add_argument("query", nargs="*")

    p = s.add_parser("import", help="load a mailbox's history from an mbox file or a Maildir")
    p.add_argument("--mbox")
    p.add_argument("--maildir")
    p.add_argument("--mailbox", required=True, help="whose history it is, local@domain")

    p = s.add_parser("export", help="a selection as an mbox file or a zip of .eml files")
    scope_args(p, everything=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=["mbox", "eml-zip"], default="mbox")
    p.add_argument("query", nargs="*")

    p = s.add_parser("hold", help="legal hold: nothing of a mailbox or domain expires")
    scope_args(p)
    p.add_argument("--reason", default="")
    p.add_argument("--release", action="store_true", help="lift the hold")

    p = s.add_parser("holds", help="the holds in force")
    p.add_argument("--json", action="store_true")

    p = s.add_parser("audit", help="who searched, read, exported or re-delivered what, and when")
    p.add_argument("--actor")
    p.add_argument("--action", dest="audit_action")
    p.add_argument("--since")
    p.add_argument("--until")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")


class UsageError(Exception):
    """A mistake in the command line; exit 2 with the message."""


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return f"operator:{user}@{socket.gethostname()}"


def _scope(args: argparse.Namespace, everything: bool = False) -> ArchiveScope:
    """
    The scope the command line names.

    :param everything: without ``--mailbox``/``--domain``, the whole archive
        (``search``; ``export`` with ``--all``); otherwise one is required.
    """
    chosen = [k for k in ("mailbox", "domain", "all") if getattr(args, k, None)]
    if len(chosen) > 1:
        raise UsageError("give only one of --mailbox, --domain, --all")
    if args.mailbox:
        try:
            return ArchiveScope(mailbox=Address.parse(args.mailbox))
        except AddressError as e:
            raise UsageError(f"--mailbox {args.mailbox}: {e}") from None
    if args.domain:
        return ArchiveScope(domain=args.domain)
    if everything or getattr(args, "all", False):
        return ArchiveScope()
    raise UsageError("give --mailbox or --domain" + (" or --all" if hasattr(args, "all") else ""))


def _query(args: argparse.Namespace) -> ArchiveQuery:
    try:
        return parse_query(" ".join(args.query))
    except QueryError as e:
        raise UsageError(f"query: {e}") from None


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def summary_json(s: ArchiveSummary) -> dict[str, Any]:
    return {
        "id": s.id,
        "received_at": s.received_at,
        "sender": s.sender,
        "subject": s.subject,
        "mailboxes": [str(m) for m in s.mailboxes],
        "size": s.size,
        "has_attachment": s.has_attachment,
        "message_id": s.message_id,
    }


async def _matches(archive: Any, scope: ArchiveScope, query: ArchiveQuery) -> AsyncIterator[ArchiveSummary]:
    """Every message ``search`` finds, page by page."""
    cursor = None
    while True:
        page = await archive.search(scope, query, cursor, 200)
        for item in page.items:
            yield item
        if page.next is None or not page.items:
            return
        cursor = page.next


class _Progress:
    """A line on stderr every ``PROGRESS_EVERY`` items (or rewritten in place on a terminal)."""

    def __init__(self, what: str, total: int | None) -> None:
        self._what = what
        self._total = total
        self._tty = sys.stderr.isatty()
        self.done = 0

    def step(self) -> None:
        self.done += 1
        if self.done % PROGRESS_EVERY == 0 or self.done == self._total:
            of = f"/{self._total}" if self._total is not None else ""
            end = "\r" if self._tty and self.done != self._total else "\n"
            sys.stderr.write(f"{self._what}: {self.done}{of}{end}")
            sys.stderr.flush()


async def run(reactor: Any, args: argparse.Namespace, config: HubConfig) -> int:
    """``mailhub archive ...``; returns the exit status."""
    if config.archive is None:
        sys.stderr.write(f"mailhub: {config.path} has no [archive] table: the hub keeps no archive\n")
        return 1
    try:
        archive = load_plugin("mailhub.archives", config.archive["plugin"]).make(config.archive_section(), reactor)
    except ValueError as e:
        sys.stderr.write(f"mailhub: {config.path}: {e}\n")
        return 2
    try:
        return await _run(reactor, args, config, archive)
    except UsageError as e:
        sys.stderr.write(f"mailhub archive {args.action}: {e}\n")
        return 2
    finally:
        await archive.close()


async def _audit(archive: Any, reactor: Any, action: str, scope: str, detail: str) -> None:
    await archive.record_audit(AuditEvent(reactor.seconds(), _actor(), action, scope, detail))


async def _run(reactor: Any, args: argparse.Namespace, config: HubConfig, archive: Any) -> int:
    out = sys.stdout
    action = args.action
    if action == "search":
        scope, query = _scope(args, everything=True), _query(args)
        total = await archive.count(scope, query)
        page = await archive.search(scope, query, args.cursor, args.limit)
        await _audit(archive, reactor, "search", str(scope), f"{' '.join(args.query)!r}: {total} found")
        if args.json:
            json.dump({"total": total, "items": [summary_json(s) for s in page.items], "next": page.next}, out, indent=2)
            out.write("\n")
            return 0
        out.write(f"{total} message{'' if total == 1 else 's'} in {scope}\n")
        for s in page.items:
            clip = "+" if s.has_attachment else " "
            out.write(f"{s.id:34} {_when(s.received_at)} {clip} {s.sender[:30]:30} {s.subject[:60]}\n")
        if page.next:
            out.write(f"more: --cursor {page.next}\n")
        return 0
    if action == "show":
        message = await archive.get(args.id)
        if message is None:
            sys.stderr.write(f"mailhub: no message {args.id} in the archive\n")
            return 1
        await _audit(archive, reactor, "read", args.id, "raw" if args.raw else "")
        if args.raw:
            sys.stdout.flush()
            sys.stdout.buffer.write(message.message)
            return 0
        text = message.text
        data = {
            "id": message.id,
            "received_at": message.received_at,
            "envelope_sender": str(message.sender) if message.sender else "",
            "mailboxes": [str(m) for m in message.mailboxes],
            "size": len(message.message),
            "from": text.sender,
            "to": text.recipients,
            "subject": text.subject,
            "date": text.date,
            "message_id": text.message_id,
            "attachments": list(text.attachments),
            "body": text.body,
        }
        if args.json:
            json.dump(data, out, indent=2)
            out.write("\n")
            return 0
        out.write(f"id           {message.id}\nreceived     {_when(message.received_at)} UTC\n")
        out.write(f"envelope     <{data['envelope_sender']}> to {', '.join(data['mailboxes'])}\n")
        out.write(f"from         {text.sender}\nto           {text.recipients}\nsubject      {text.subject}\n")
        if text.attachments:
            out.write(f"attachments  {', '.join(text.attachments)}\n")
        out.write(f"size         {len(message.message)} octets\n\n{text.body}\n")
        return 0
    if action == "hold":
        scope = _scope(args)
        await archive.set_hold(scope, not args.release, args.reason, reactor.seconds())
        await _audit(archive, reactor, "release" if args.release else "hold", str(scope), args.reason)
        out.write(f"{'hold lifted for' if args.release else 'legal hold on'} {scope}\n")
        return 0
    if action == "holds":
        holds = await archive.holds()
        if args.json:
            json.dump(holds, out, indent=2)
            out.write("\n")
        for h in [] if args.json else holds:
            out.write(f"{h['scope']}: since {_when(h['since'])} UTC" + (f" ({h['reason']})" if h["reason"] else "") + "\n")
        if not holds and not args.json:
            out.write("no holds\n")
        return 0
    if action == "audit":
        since = parse_date(args.since, "--since") if args.since else None
        until = parse_date(args.until, "--until") if args.until else None
        events = await archive.audit_log(args.actor, args.audit_action, since, until, args.limit)
        if args.json:
            json.dump([_event(e) for e in events], out, indent=2)
            out.write("\n")
            return 0
        for e in events:
            out.write(f"{_when(e.at)} {e.actor} {e.action} {e.scope} {e.detail}\n")
        return 0
    if action == "export":
        return await _export(reactor, args, archive, out)
    if action == "import":
        return await _import(reactor, args, config, archive, out)
    if action == "redeliver":
        return await _redeliver(reactor, args, config, archive, out)
    raise AssertionError(action)


def _event(e: AuditEvent) -> dict[str, Any]:
    return {"at": e.at, "actor": e.actor, "action": e.action, "scope": e.scope, "detail": e.detail}


async def _export(reactor: Any, args: argparse.Namespace, archive: Any, out: Any) -> int:
    scope, query = _scope(args), _query(args)
    total = await archive.count(scope, query)
    writer = await deferToThread(_Writer, args.output, args.format)
    progress = _Progress("exported", total)
    try:
        async for s in _matches(archive, scope, query):
            message = await archive.get(s.id)
            if message is None:
                continue  # expired meanwhile
            await deferToThread(writer.add, message)
            progress.step()
    finally:
        await deferToThread(writer.close)
    await _audit(archive, reactor, "export", str(scope), f"{' '.join(args.query)!r}: {progress.done} to {args.output}")
    out.write(f"{progress.done} messages of {scope} written to {args.output} ({args.format})\n")
    return 0


class _Writer:
    """An mbox file (mboxrd quoting) or a zip of ``.eml`` files, written in a thread."""

    def __init__(self, path: str, form: str) -> None:
        import zipfile

        self._form = form
        if form == "mbox":
            self._file: Any = open(path, "wb")
        else:
            self._file = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED)

    def add(self, message: ArchivedMessage) -> None:
        if self._form == "mbox":
            sender = str(message.sender) if message.sender else "MAILER-DAEMON"
            stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(message.received_at))
            body = message.message.replace(b"\r\n", b"\n")
            lines = []
            for line in body.split(b"\n"):
                # mboxrd: any ">*From " line gets one more ">".
                if line.lstrip(b">").startswith(b"From "):
                    line = b">" + line
                lines.append(line)
            data = b"\n".join(lines)
            self._file.write(f"From {sender} {stamp}\n".encode() + data + (b"" if data.endswith(b"\n") else b"\n") + b"\n")
        else:
            name = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(message.received_at))}-{message.id}.eml"
            self._file.writestr(name, message.message)

    def close(self) -> None:
        self._file.close()


def _read_folder(args: argparse.Namespace) -> list[tuple[bytes, float | None]]:
    """Every message of the mbox or Maildir with the time it was received, if known (in a thread)."""
    import email.utils
    import mailbox

    found: list[tuple[bytes, float | None]] = []
    if args.mbox:
        box: Any = mailbox.mbox(args.mbox, create=False)
    else:
        box = mailbox.Maildir(args.maildir, create=False)
    for key in box.iterkeys():
        data = box.get_bytes(key)
        when: float | None = None
        if args.mbox:
            from_line = box.get_message(key).get_from() or ""
            parts = from_line.split(None, 1)
            if len(parts) == 2:
                try:
                    when = float(calendar.timegm(time.strptime(parts[1].strip(), "%a %b %d %H:%M:%S %Y")))
                except ValueError:
                    when = None
        else:
            when = float(box.get_message(key).get_date())
        if when is None:
            header = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
            for line in header.splitlines():
                if line.lower().startswith(b"date:"):
                    parsed = email.utils.parsedate_tz(line[5:].decode("latin-1").strip())
                    if parsed:
                        when = float(email.utils.mktime_tz(parsed))
                    break
        # The archive keeps messages as the hub relays them: CRLF line ends.
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        found.append((data, when))
    return found


async def _import(reactor: Any, args: argparse.Namespace, config: HubConfig, archive: Any, out: Any) -> int:
    from mailhub.archive.text import extract

    if bool(args.mbox) == bool(args.maildir):
        raise UsageError("give --mbox FILE or --maildir DIR")
    try:
        mailbox = Address.parse(args.mailbox)
    except AddressError as e:
        raise UsageError(f"--mailbox {args.mailbox}: {e}") from None
    if config.route_for(mailbox.domain) is None:
        raise UsageError(f"--mailbox {mailbox}: {mailbox.domain} is not a domain of this hub")
    source = args.mbox or args.maildir
    try:
        messages = await deferToThread(_read_folder, args)
    except (OSError, Exception) as e:
        sys.stderr.write(f"mailhub archive import: cannot read {source}: {e}\n")
        return 1
    progress = _Progress("imported", len(messages))
    now = reactor.seconds()
    for data, when in messages:
        text = await deferToThread(extract, data)
        archive_id = "import-" + hashlib.sha256(data).hexdigest()[:32]
        await archive.add(
            ArchivedMessage(archive_id, when if when is not None else now, None, (mailbox,), data, text)
        )
        progress.step()
    await _audit(archive, reactor, "import", f"mailbox {mailbox}", f"{progress.done} messages from {source}")
    out.write(f"{progress.done} messages imported for {mailbox} from {source}\n")
    return 0


async def _redeliver(reactor: Any, args: argparse.Namespace, config: HubConfig, archive: Any, out: Any) -> int:
    """
    Re-spool a selection for its routes.  With ``--skip-delivered``, a
    message goes only to its mailboxes the hub has not delivered it to
    (``IArchive.delivered``: the same Message-ID delivered to that mailbox
    counts), and a message left with none is skipped.
    """
    from mailhub.archive.delivered import respooled_client
    from mailhub.node import routes_for

    scope, query = _scope(args), _query(args)
    total = await archive.count(scope, query)
    words = " ".join(args.query)
    if args.dry_run and not args.skip_delivered:
        if args.json:
            _dump({"scope": str(scope), "selected": total, "redelivered": total, "skipped": 0, "dry_run": True}, out)
        else:
            out.write(f"{total} messages of {scope} would be re-delivered\n")
        return 0

    def eligible(s: ArchiveSummary) -> list[Address]:
        # The summary lists the message's mailboxes within the scope.
        return [m for m in s.mailboxes if scope.contains(m) and config.route_for(m.domain)]

    async def pages() -> AsyncIterator[list[tuple[ArchiveSummary, list[Address]]]]:
        """The selection a page at a time, each message with the mailboxes to re-deliver it to."""
        cursor = None
        while True:
            page = await archive.search(scope, query, cursor, 200)
            chosen = [(s, eligible(s)) for s in page.items]
            if args.skip_delivered:
                done = await archive.delivered([(s.id, m) for s, boxes in chosen for m in boxes])
                chosen = [(s, [m for m in boxes if (s.id, m) not in done]) for s, boxes in chosen]
            yield chosen
            if page.next is None or not page.items:
                return
            cursor = page.next

    skipped = redelivered = entries = 0
    if args.dry_run:
        async for chosen in pages():
            for s, boxes in chosen:
                if boxes:
                    redelivered += 1
                elif eligible(s):
                    skipped += 1
        if args.json:
            _dump({"scope": str(scope), "selected": total, "redelivered": redelivered, "skipped": skipped,
                   "dry_run": True}, out)
        else:
            out.write(
                f"{total} messages of {scope} selected: {redelivered} would be re-delivered, {skipped} skipped"
                " (the hub delivered them to those mailboxes already)\n"
            )
        return 0

    from mailhub.cli import _open_store, _wake_local_nodes

    store = _open_store(config, reactor)
    node = next(iter(config.nodes))
    progress = _Progress("re-delivered or skipped" if args.skip_delivered else "re-delivered", total)
    try:
        async for chosen in pages():
            for s, boxes in chosen:
                if not boxes:
                    if eligible(s):
                        skipped += 1
                        progress.step()
                    continue
                message = await archive.get(s.id)
                if message is None:
                    continue  # expired meanwhile
                mailboxes = [m for m in message.mailboxes if m in boxes]
                if not mailboxes:
                    continue
                envelope = Envelope(
                    message.sender,
                    tuple(mailboxes),
                    received_at=reactor.seconds(),
                    # Its delivery is then recorded for this archive copy.
                    client=respooled_client(message.id),
                    helo=config.hostname,
                )
                # No archive route: the archive has it already.
                routes = routes_for(config, mailboxes)
                ids = await store.enqueue(envelope, message.message, routes, node)
                entries += len(ids)
                redelivered += 1
                progress.step()
        detail = f"{words!r}: {redelivered} messages" + (f", {skipped} skipped as delivered" if args.skip_delivered else "")
        await _audit(archive, reactor, "redeliver", str(scope), detail)
        if args.json:
            _dump({"scope": str(scope), "selected": total, "redelivered": redelivered, "skipped": skipped,
                   "entries": entries, "dry_run": False}, out)
        else:
            out.write(
                f"{redelivered} messages of {scope} re-delivered: {entries} spool entries, delivered at the"
                " route's pace (watch with: mailhub status, mailhub queue list)"
                + (f"; {skipped} skipped (the hub delivered them to those mailboxes already)" if args.skip_delivered else "")
                + "\n"
            )
        # With --json, stdout is the JSON alone.
        await _wake_local_nodes(
            store, reactor.seconds(), config.delivery.heartbeat_seconds, sys.stderr if args.json else out
        )
    finally:
        await store.close()
    return 0


def _dump(data: Any, out: Any) -> None:
    json.dump(data, out, indent=2)
    out.write("\n")

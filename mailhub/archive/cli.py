"""
``mailhub archive``: the archive from the shell.

    mailhub archive [-c FILE] search [--mailbox M | --domain D] [--limit N] [--cursor C] [--json] [QUERY...]
    mailhub archive [-c FILE] show ID [--raw | --json]
    mailhub archive [-c FILE] redeliver (--mailbox M | --domain D) [--skip-delivered] [--dry-run] [--json] [QUERY...]
    mailhub archive [-c FILE] import (--mbox FILE | --maildir DIR [--folders]) --mailbox M [--allow-expiry] [--json]
    mailhub archive [-c FILE] export (--mailbox M | --domain D | --all) --output FILE [--force] [--format mbox|eml-zip] [--json] [QUERY...]
    mailhub archive [-c FILE] hold (--mailbox M | --domain D) [--reason TEXT] [--release] [--json]
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
import re
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
    p.add_argument("--limit", type=_page_size, default=50, help=f"messages a page, 1 to {MAX_PAGE} (default 50)")
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
    p.add_argument("--mbox", help="an mbox file (mboxrd, as export writes it)")
    p.add_argument("--maildir", help="a Maildir (its cur/ and new/)")
    p.add_argument("--folders", action="store_true",
                   help="with --maildir, also its Maildir++ subfolders (.Sent, .Archive, ...)")
    p.add_argument("--mailbox", required=True, help="whose history it is, local@domain")
    p.add_argument("--allow-expiry", action="store_true",
                   help="import messages older than the domain's retention although the next expiry removes them")
    p.add_argument("--json", action="store_true", help="the counts as JSON")

    p = s.add_parser("export", help="a selection as an mbox file or a zip of .eml files")
    scope_args(p, everything=True)
    p.add_argument("--output", required=True)
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    p.add_argument("--format", choices=["mbox", "eml-zip"], default="mbox")
    p.add_argument("--json", action="store_true", help="the counts as JSON")
    p.add_argument("query", nargs="*")

    p = s.add_parser("hold", help="legal hold: nothing of a mailbox or domain expires")
    scope_args(p)
    p.add_argument("--reason", default="")
    p.add_argument("--release", action="store_true", help="lift the hold")
    p.add_argument("--json", action="store_true", help="the hold as JSON")

    p = s.add_parser("holds", help="the holds in force")
    p.add_argument("--json", action="store_true")

    p = s.add_parser("audit", help="who searched, read, exported or re-delivered what, and when")
    p.add_argument("--actor")
    p.add_argument("--action", dest="audit_action",
                   help="search, read (show), export, import, redeliver, hold, release, ... (as the log names them)")
    p.add_argument("--since", help="YYYY-MM-DD or YYYY-MM-DDTHH:MM, UTC")
    p.add_argument("--until", help="YYYY-MM-DD or YYYY-MM-DDTHH:MM, UTC")
    p.add_argument("--limit", type=_page_size, default=100, help=f"events, 1 to {MAX_PAGE} (default 100)")
    p.add_argument("--json", action="store_true")


#: The most messages (or audit events) one page may hold.
MAX_PAGE = 1000


def _page_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= n <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"{n} is not between 1 and {MAX_PAGE}")
    return n


class UsageError(Exception):
    """A mistake in the command line; exit 2 with the message."""


class Failed(Exception):
    """The command could not do what it was asked (a file, the archive); exit 1 with the message."""


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
    names = ("mailbox", "domain", "all") if hasattr(args, "all") else ("mailbox", "domain")
    chosen = [k for k in names if getattr(args, k, None)]
    if len(chosen) > 1:
        raise UsageError("give only one of " + ", ".join(f"--{k}" for k in names))
    if args.mailbox:
        try:
            # The archive knows a mailbox by its folded form (Address.folded).
            return ArchiveScope(mailbox=Address.parse(args.mailbox).folded())
        except AddressError as e:
            raise UsageError(f"--mailbox {args.mailbox}: {e}") from None
    if args.domain:
        return ArchiveScope(domain=args.domain)
    if everything or getattr(args, "all", False):
        return ArchiveScope()
    raise UsageError("give --mailbox or --domain" + (" or --all" if hasattr(args, "all") else ""))


def _hub_domain(config: HubConfig, scope: ArchiveScope) -> str | None:
    """The domain ``scope`` names if it is not one of the hub's (``None`` if it is, or names none)."""
    domain = scope.mailbox.domain if scope.mailbox is not None else scope.domain
    if domain is None or config.route_for(domain) is not None:
        return None
    return domain


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
    except Failed as e:
        sys.stderr.write(f"mailhub archive {args.action}: {e}\n")
        return 1
    finally:
        await archive.close()


async def _audit(archive: Any, reactor: Any, action: str, scope: str, detail: str) -> None:
    await archive.record_audit(AuditEvent(reactor.seconds(), _actor(), action, scope, detail))


async def _run(reactor: Any, args: argparse.Namespace, config: HubConfig, archive: Any) -> int:
    out = sys.stdout
    action = args.action
    if action == "search":
        scope, query = _scope(args, everything=True), _query(args)
        outside = _hub_domain(config, scope)
        if outside is not None:
            # Read anyway: mail of a domain the hub no longer serves may still be archived.
            sys.stderr.write(f"mailhub archive search: note: {outside} is not a domain of this hub\n")
        total = await archive.count(scope, query)
        try:
            page = await archive.search(scope, query, args.cursor, args.limit)
        except ValueError as e:
            if args.cursor is None:
                raise
            raise UsageError(f"--cursor: {e} (give the 'next' a search printed)") from None
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
        outside = _hub_domain(config, scope)
        held = {h["scope"] for h in await archive.holds()}
        if args.release:
            if str(scope) not in held:
                raise Failed(f"no hold on {scope} (mailhub archive holds lists them)")
        elif outside is not None:
            raise UsageError(f"{outside} is not a domain of this hub: a hold on it would keep nothing")
        await archive.set_hold(scope, not args.release, args.reason, reactor.seconds())
        await _audit(archive, reactor, "release" if args.release else "hold", str(scope), args.reason)
        if args.json:
            _dump({"scope": str(scope), "held": not args.release, "reason": args.reason,
                   "already": not args.release and str(scope) in held}, out)
        elif not args.release and str(scope) in held:
            out.write(f"legal hold on {scope} (it was on already)\n")
        else:
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
        try:
            since = parse_date(args.since, "--since") if args.since else None
            until = parse_date(args.until, "--until") if args.until else None
        except QueryError as e:
            raise UsageError(str(e)) from None
        # "show" is what the command is called; the log calls reading a message "read".
        wanted = "read" if args.audit_action == "show" else args.audit_action
        events = await archive.audit_log(args.actor, wanted, since, until, args.limit)
        if args.json:
            json.dump([_event(e) for e in events], out, indent=2)
            out.write("\n")
            return 0
        for event in events:
            out.write(f"{_when(event.at)} {event.actor} {event.action} {event.scope} {event.detail}\n")
        if not events:
            out.write("no audit events match\n")
        return 0
    if action == "export":
        return await _export(reactor, args, config, archive, out)
    if action == "import":
        return await _import(reactor, args, config, archive, out)
    if action == "redeliver":
        return await _redeliver(reactor, args, config, archive, out)
    raise AssertionError(action)


def _event(e: AuditEvent) -> dict[str, Any]:
    return {"at": e.at, "actor": e.actor, "action": e.action, "scope": e.scope, "detail": e.detail}


async def _export(reactor: Any, args: argparse.Namespace, config: HubConfig, archive: Any, out: Any) -> int:
    scope, query = _scope(args), _query(args)
    outside = _hub_domain(config, scope)
    if outside is not None:
        sys.stderr.write(f"mailhub archive export: note: {outside} is not a domain of this hub\n")
    path = os.path.abspath(args.output)
    if os.path.isdir(path):
        raise UsageError(f"--output {args.output} is a directory: name the file to write")
    # A device or a pipe (/dev/stdout) is written as it is; a file is replaced whole, when asked.
    replacing = os.path.isfile(path)
    in_place = os.path.exists(path) and not replacing
    if replacing and not args.force:
        raise UsageError(f"--output {args.output} exists: add --force to replace it")
    total = await archive.count(scope, query)
    try:
        writer = await deferToThread(_Writer, os.path.realpath(path), args.format, in_place)
    except OSError as e:
        raise Failed(f"cannot write {args.output}: {e.strerror or e}") from None
    progress = _Progress("exported", total)
    try:
        async for s in _matches(archive, scope, query):
            message = await archive.get(s.id)
            if message is None:
                continue  # expired meanwhile
            await deferToThread(writer.add, message)
            progress.step()
        await deferToThread(writer.close)
    except OSError as e:
        await deferToThread(writer.discard)
        raise Failed(
            f"writing {args.output} failed after {progress.done} messages: {e.strerror or e}"
            + (" (the file it was to replace is untouched)" if replacing else "")
        ) from None
    except BaseException:
        await deferToThread(writer.discard)
        raise
    await _audit(archive, reactor, "export", str(scope), f"{' '.join(args.query)!r}: {progress.done} to {path}")
    if args.json:
        _dump({"scope": str(scope), "exported": progress.done, "output": path, "format": args.format}, out)
    else:
        out.write(f"{_messages(progress.done)} of {scope} written to {args.output} ({args.format})\n")
    return 0


class _Writer:
    """
    An mbox file (mboxrd quoting) or a zip of ``.eml`` files, written in a
    thread.  A file is written beside ``path`` and renamed over it by
    ``close``, so that a failed export neither leaves half a file nor spoils
    the one it was to replace; ``in_place`` (a device, a pipe) is written as
    it is.
    """

    def __init__(self, path: str, form: str, in_place: bool = False) -> None:
        import zipfile

        self._form = form
        self._path = path
        self._part = path if in_place else f"{path}.part"
        self._in_place = in_place
        if form == "mbox":
            self._file: Any = open(self._part, "wb")
        else:
            self._file = zipfile.ZipFile(self._part, "w", compression=zipfile.ZIP_DEFLATED)

    def add(self, message: ArchivedMessage) -> None:
        if self._form == "mbox":
            sender = str(message.sender) if message.sender else "MAILER-DAEMON"
            stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(message.received_at))
            # mboxrd: any ">*From " line gets one more ">" (import takes it off).
            data = _MBOXRD_QUOTE.sub(rb">\1", message.message.replace(b"\r\n", b"\n"))
            self._file.write(f"From {sender} {stamp}\n".encode() + data + (b"" if data.endswith(b"\n") else b"\n") + b"\n")
        else:
            name = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(message.received_at))}-{message.id}.eml"
            self._file.writestr(name, message.message)

    def close(self) -> None:
        self._file.close()
        if self._in_place:
            return
        with open(self._part, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._part, self._path)

    def discard(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # the error being reported already
        if not self._in_place:
            try:
                os.unlink(self._part)
            except FileNotFoundError:
                pass


#: mboxrd quoting: a line that is "From " after any number of ">".
_MBOXRD_QUOTE = re.compile(rb"^(>*From )", re.MULTILINE)
_MBOXRD_UNQUOTE = re.compile(rb"^>(>*From )", re.MULTILINE)


class _Folder:
    """What ``_read_folder`` found: each message with the time it was received, if known."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, float | None]] = []
        #: Maildir++ subfolders read (``--folders``), or left out.
        self.folders: list[str] = []
        self.skipped_folders: list[str] = []


def _read_folder(args: argparse.Namespace) -> _Folder:
    """
    Every message of the mbox or Maildir (in a thread).

    :raises Failed: the source is missing, unreadable, or not an mbox.
    """
    import mailbox

    source = args.mbox or args.maildir
    found = _Folder()
    try:
        if args.mbox:
            with open(args.mbox, "rb") as f:
                first = f.read(5)
            if first and first != b"From ":
                raise Failed(
                    f"{source} does not start with a 'From ' line: it is not an mbox file, and nothing was"
                    " imported (for single .eml files, put them in a Maildir's new/ and give --maildir)"
                )
            _read_box(mailbox.mbox(args.mbox, create=False), True, found)
        else:
            if not all(os.path.isdir(os.path.join(args.maildir, d)) for d in ("cur", "new")):
                raise Failed(f"{source} is not a Maildir (it has no cur/ and new/): nothing was imported")
            box = mailbox.Maildir(args.maildir, create=False)
            _read_box(box, False, found)
            for name in sorted(box.list_folders()):
                if args.folders:
                    _read_box(box.get_folder(name), False, found)
                    found.folders.append(name)
                else:
                    found.skipped_folders.append(name)
    except FileNotFoundError:
        raise Failed(f"{source}: no such file or directory") from None
    except OSError as e:
        raise Failed(f"cannot read {source}: {e.strerror or e}") from None
    except mailbox.Error as e:
        raise Failed(f"cannot read {source}: {e}") from None
    return found


def _read_box(box: Any, mbox: bool, found: _Folder) -> None:
    import email.utils

    for key in box.iterkeys():
        data = box.get_bytes(key)
        when: float | None = None
        if mbox:
            # Undo the mboxrd quoting of lines that read "From " (export writes it).
            data = _MBOXRD_UNQUOTE.sub(rb"\1", data)
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
        found.messages.append((data, when))


async def _import(reactor: Any, args: argparse.Namespace, config: HubConfig, archive: Any, out: Any) -> int:
    from mailhub.archive.text import extract

    if bool(args.mbox) == bool(args.maildir):
        raise UsageError("give --mbox FILE or --maildir DIR")
    if args.folders and not args.maildir:
        raise UsageError("--folders goes with --maildir")
    try:
        mailbox = Address.parse(args.mailbox).folded()
    except AddressError as e:
        raise UsageError(f"--mailbox {args.mailbox}: {e}") from None
    if config.route_for(mailbox.domain) is None:
        raise UsageError(f"--mailbox {mailbox}: {mailbox.domain} is not a domain of this hub")
    source = os.path.abspath(args.mbox or args.maildir)
    folder = await deferToThread(_read_folder, args)
    messages = folder.messages
    now = reactor.seconds()
    await _check_retention(archive, config, mailbox, messages, now, args)
    progress = _Progress("imported", len(messages))
    added = already = 0
    for data, when in messages:
        text = await deferToThread(extract, data)
        archive_id = "import-" + hashlib.sha256(data).hexdigest()[:32]
        if await _archived_already(archive, mailbox, archive_id, when, text.message_id):
            already += 1
        else:
            await archive.add(
                ArchivedMessage(archive_id, when if when is not None else now, None, (mailbox,), data, text)
            )
            added += 1
        progress.step()
    detail = f"{added} messages from {source}" + (f", {already} there already" if already else "")
    await _audit(archive, reactor, "import", f"mailbox {mailbox}", detail)
    if args.json:
        _dump({"mailbox": str(mailbox), "source": source, "read": len(messages), "imported": added,
               "already": already, "folders": folder.folders, "skipped_folders": folder.skipped_folders}, out)
    else:
        out.write(
            f"{_messages(added)} imported for {mailbox} from {args.mbox or args.maildir}"
            + (f"; {already} {'was' if already == 1 else 'were'} in the archive already" if already else "")
            + ("" if messages else " (it holds no messages)")
            + "\n"
        )
    if folder.skipped_folders:
        names = ", ".join(folder.skipped_folders)
        sys.stderr.write(
            f"mailhub archive import: note: {len(folder.skipped_folders)} subfolder"
            + ("" if len(folder.skipped_folders) == 1 else "s")
            + f" not imported ({names}): add --folders to import "
            + ("it" if len(folder.skipped_folders) == 1 else "them")
            + " too\n"
        )
    return 0


async def _check_retention(
    archive: Any, config: HubConfig, mailbox: Address, messages: list[tuple[bytes, float | None]],
    now: float, args: argparse.Namespace,
) -> None:
    """
    Refuse, before anything is added, an import of which the next expiry
    would remove part (history older than the domain's retention), unless a
    legal hold keeps the mailbox or the domain, or ``--allow-expiry`` says so.
    """
    days = config.archive_retention_days(mailbox.domain)
    before = now - days * 86400
    old = [when for _, when in messages if when is not None and when < before]
    if not old or args.allow_expiry:
        return
    held = {h["scope"] for h in await archive.holds()}
    if {str(ArchiveScope(mailbox=mailbox)), str(ArchiveScope(domain=mailbox.domain))} & held:
        return
    raise Failed(
        f"{len(old)} of {len(messages)} messages are older than {mailbox.domain}'s retention of {days:g} days"
        f" (received before {_when(before)} UTC; the oldest {_when(min(old))}), so the next expiry would remove"
        f" them.  Nothing was imported.  Keep them with a legal hold (mailhub archive hold --mailbox {mailbox})"
        f" or a longer archive_retention_days for {mailbox.domain}, then import again; or add --allow-expiry"
    )


async def _archived_already(archive: Any, mailbox: Address, archive_id: str, when: float | None, message_id: str) -> bool:
    """
    Whether the mailbox has this message already: imported before (the same
    content), or received by the hub and exported (the same Message-ID,
    received within the second the mbox's "From " line gives).
    """
    existing = await archive.get(archive_id)
    if existing is not None and mailbox in existing.mailboxes:
        return True
    if not message_id or when is None:
        return False
    page = await archive.search(ArchiveScope(mailbox=mailbox), ArchiveQuery(after=when - 1, before=when + 2), None, 50)
    return any(s.message_id == message_id for s in page.items)


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
    outside = _hub_domain(config, scope)
    if outside is not None:
        raise UsageError(f"{outside} is not a domain of this hub: there is no route to re-deliver to")
    total = await archive.count(scope, query)
    words = " ".join(args.query)
    if not total:
        if args.json:
            _dump({"scope": str(scope), "selected": 0, "redelivered": 0, "skipped": 0, "entries": 0,
                   "dry_run": args.dry_run}, out)
        else:
            out.write(f"no messages of {scope} match: nothing to re-deliver\n")
        return 0
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


def _messages(n: int) -> str:
    """``1 message``, ``2 messages``."""
    return f"{n} message" + ("" if n == 1 else "s")

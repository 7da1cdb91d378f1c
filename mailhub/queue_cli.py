"""
``mailhub queue``: look at and act on the spool, in bulk, locally or through
a node's admin API.

    mailhub queue [-c FILE | --url URL --token-file F] ACTION [ID ...] [SELECTION] [--json]

ACTION is ``list``, ``count``, ``show``, ``hold``, ``release [--first N]``,
``flush``, ``redirect --to ROUTE``, ``bounce [--reason TEXT]`` or ``delete
[--dsn]``; SELECTION is any of ``--route``, ``--domain``, ``--sender``,
``--recipient``, ``--state``, ``--older-than``, ``--reply`` (all given must
match) or ``--all`` (``mailhub.queue_select.Selection``).  Locally the
command opens the configured spool store itself (the hub may be running:
every store is safe to share); with ``--url`` it asks the node's
``/api/queue``, with the same results.  Bulk actions go in batches
(``--batch``), with a progress line on standard error and a summary;
``bounce`` and ``delete`` of more than one entry ask first (``--yes`` for
scripts).  An error is one line on standard error and a non-zero exit:
``2`` for a command that cannot be used as given, ``1`` for one that
failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from attrs import evolve

from mailhub.queue_select import (
    STATES,
    QueueControl,
    Selection,
    SelectionError,
    merge,
    narrower_than_route,
    parse_age,
    summary,
)

__all__ = ["add_parser", "run"]

#: The actions that change the spool.
_ACTING = ("hold", "release", "flush", "redirect", "bounce", "delete")


class CommandFailed(Exception):
    """A command that failed: ``str()`` is its one line; ``code`` the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_parser(sub: Any, default_config: str) -> None:
    """Add ``queue`` and its actions to the ``mailhub`` parser's subparsers."""
    q = sub.add_parser("queue", help="look at and act on the spool, in bulk, locally or through a node's API")
    q.add_argument("-c", "--config", default=default_config,
                   help="the hub's configuration (default: $MAILHUB_CONFIG or mailhub.toml)")
    q.add_argument("--url", default=os.environ.get("MAILHUB_URL"),
                   help="act through this node's admin API (http[s]://host:port) instead of opening the spool"
                        " (default: $MAILHUB_URL)")
    q.add_argument("--token-file", default=os.environ.get("MAILHUB_TOKEN_FILE"),
                   help="the file holding the API token, with --url (default: $MAILHUB_TOKEN_FILE)")
    q.add_argument("--cafile", default=os.environ.get("MAILHUB_CAFILE"),
                   help="with an https --url: trust the certificates signed by this PEM file (the node's own,"
                        " self-signed one: tls/cert.pem beside the spool) instead of the system's"
                        " (default: $MAILHUB_CAFILE)")
    qs = q.add_subparsers(dest="action", required=True)

    def selection(p: argparse.ArgumentParser, ids: bool = True) -> None:
        if ids:
            p.add_argument("id", nargs="*", help="entry ids")
        p.add_argument("--route", help="entries of this route (its text, as in queue list)")
        p.add_argument("--domain", help="entries of this hub domain's route")
        p.add_argument("--sender", help="user@domain, @domain or <> (the null sender)")
        p.add_argument("--recipient", help="a pending recipient: user@domain or @domain")
        p.add_argument("--state", choices=STATES, help="deferred (waiting), held, or leased (being delivered)")
        p.add_argument("--older-than", metavar="AGE", help="accepted at least AGE ago: 90s, 30m, 2h, 3d, 1w")
        p.add_argument("--reply", metavar="TEXT", help="TEXT in a pending recipient's last reply (any case)")
        p.add_argument("--all", action="store_true", help="every entry")
        p.add_argument("--json", action="store_true", help="JSON on standard output, for scripts")

    ql = qs.add_parser("list", help="the selected entries, oldest first")
    selection(ql, ids=False)
    ql.add_argument("--held", action="store_true", help="only held entries (--state held)")
    ql.add_argument("--limit", type=int, default=1000)
    ql.add_argument("--offset", type=int, default=0)
    qc = qs.add_parser("count", help="how many entries are selected, by route and state")
    selection(qc, ids=False)
    qsh = qs.add_parser("show", help="one entry, its recipients, its attempts and its message (like postcat)")
    qsh.add_argument("id")
    qsh.add_argument("--json", action="store_true")
    qsh.add_argument("--raw", action="store_true", help="only the message, exactly as spooled")
    for name, text in (
        ("hold", "hold the selected entries"),
        ("release", "release the selected held entries (--first N: a test batch of the N oldest)"),
        ("flush", "make the selected entries due now (every entry without a selection)"),
        ("redirect", "move the selected entries to another route (--to), due now"),
        ("bounce", "send each selected entry's sender a DSN, then remove the entry"),
        ("delete", "remove the selected entries (--dsn: with a DSN to each sender, as bounce)"),
    ):
        qa = qs.add_parser(name, help=text)
        selection(qa)
        qa.add_argument("--batch", type=int, default=200, metavar="N", help="entries per round (default 200)")
        if name == "release":
            qa.add_argument("--first", type=int, metavar="N", help="only the N oldest: a test batch")
        if name == "redirect":
            qa.add_argument("--to", required=True, metavar="ROUTE", help="the route (smtp:backup.example:25)")
        if name == "bounce":
            qa.add_argument("--reason", help="said in the DSN")
        if name == "delete":
            qa.add_argument("--dsn", action="store_true", help="send each sender a DSN first (a bounce)")
        if name in ("bounce", "delete"):
            qa.add_argument("--yes", action="store_true", help="do not ask before acting on more than one entry")


def _selection(args: argparse.Namespace) -> Selection:
    ids = args.id if isinstance(getattr(args, "id", None), list) else []
    state = args.state
    if getattr(args, "held", False):
        if state not in (None, "held"):
            raise SelectionError("--held and --state: give one of them")
        state = "held"
    return Selection.make(
        ids=tuple(ids),
        route=args.route,
        domain=args.domain,
        sender=args.sender,
        recipient=args.recipient,
        state=state,
        older_than=None if args.older_than is None else parse_age(args.older_than),
        reply=args.reply,
        all=args.all,
    )


async def run(reactor: Any, args: argparse.Namespace, config: Any) -> int:
    """``mailhub queue ...``; returns the exit status."""
    out = sys.stdout
    backend: _Local | _Remote
    try:
        selection = _selection(args) if args.action != "show" else Selection()
        if args.url:
            backend = _Remote(args.url, read_token_file(args.token_file), reactor, args.cafile)
        else:
            if config is None:
                raise CommandFailed("give the hub's configuration (-c FILE), or --url and --token-file", 2)
            backend = _Local(config, reactor)
    except SelectionError as e:
        sys.stderr.write(f"mailhub: {e}\n")
        return 2
    except CommandFailed as e:
        sys.stderr.write(f"mailhub: {e}\n")
        return e.code
    try:
        if args.action == "list":
            return await _list(backend, args, selection, out)
        if args.action == "count":
            return await _count(backend, args, selection, out)
        if args.action == "show":
            return await _show(backend, args, out)
        return await _act(backend, args, selection, config, out)
    except SelectionError as e:
        sys.stderr.write(f"mailhub: {e}\n")
        return 2
    except CommandFailed as e:
        sys.stderr.write(f"mailhub: {e}\n")
        return e.code
    except BrokenPipeError:
        raise  # the reader went away (| head): mailhub.cli ends quietly
    except Exception as e:  # noqa: BLE001 - one line, not a traceback, for a store or a node that fails
        from mailhub.model import StoreUnavailable

        what = "spool store unavailable" if isinstance(e, StoreUnavailable) else type(e).__name__
        sys.stderr.write(f"mailhub: {what}: {e}\n")
        return 1
    finally:
        await backend.close()


def read_token_file(path: str | None) -> str:
    if not path:
        raise CommandFailed("--url needs --token-file FILE (a file holding the API token)", 2)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.split("#", 1)[0].split() for line in f]
    except OSError as e:
        raise CommandFailed(f"--token-file {path}: {e.strerror or e}", 2) from None
    for words in lines:
        if words:
            # A bare token, as `mailhub token create` prints it, or a line of the tokens file.
            return words[1] if len(words) > 1 else words[0]
    raise CommandFailed(f"--token-file {path}: no token in it", 2)


def https_policy(cafile: str | None) -> Any:
    """
    How a node's API is trusted over ``https``: the system's CAs, or only
    the certificate in ``cafile`` (``--cafile``, for a node's self-signed one).

    :raises CommandFailed: ``cafile`` unreadable or not a PEM certificate.
    """
    from twisted.web.client import BrowserLikePolicyForHTTPS

    if not cafile:
        return BrowserLikePolicyForHTTPS()
    from twisted.internet.ssl import Certificate

    try:
        with open(cafile, "rb") as f:
            root = Certificate.loadPEM(f.read())
    except (OSError, ValueError) as e:
        raise CommandFailed(f"--cafile {cafile}: {getattr(e, 'strerror', None) or e}", 2) from None
    except Exception as e:  # noqa: BLE001 - OpenSSL's own errors: not a PEM certificate
        raise CommandFailed(f"--cafile {cafile}: not a PEM certificate ({e})", 2) from None
    return BrowserLikePolicyForHTTPS(trustRoot=root)


# -- the two ways to the spool ----------------------------------------------


class _Local:
    """The spool store, opened by this command."""

    def __init__(self, config: Any, reactor: Any) -> None:
        from mailhub.cli import _open_store

        self.config = config
        self._reactor = reactor
        self.store = _open_store(config, reactor)
        self.queue = QueueControl(self.store, config, reactor, self._spool_dsn)

    async def _spool_dsn(self, envelope: Any, message: bytes) -> None:
        from mailhub.node import routes_for

        await self.store.enqueue(envelope, message, routes_for(self.config, envelope.recipients), next(iter(self.config.nodes)))

    async def spool(self) -> dict[str, Any]:
        counts: dict[str, Any] = await self.store.counts()
        return counts

    async def listing(self, selection: Selection, offset: int, limit: int) -> dict[str, Any]:
        return await self.queue.listing(selection, offset, limit)

    async def count(self, selection: Selection) -> dict[str, Any]:
        return await self.queue.count(selection)

    async def show(self, entry_id: str) -> dict[str, Any] | None:
        return await self.queue.show(entry_id)

    async def message(self, entry_id: str) -> bytes | None:
        return await self.queue.message(entry_id)

    async def act(self, action: str, selection: Selection, **options: Any) -> dict[str, Any]:
        options.pop("confirm", None)
        return await self.queue.act(action, selection, **options)

    def describe(self, selection: Selection) -> str:
        return selection.resolve(self.config).describe()

    async def close(self) -> None:
        await self.store.close()


class _Remote:
    """A node's admin API (``mailhub.web.admin_api``)."""

    def __init__(self, url: str, token: str, reactor: Any, cafile: str | None = None) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        self._url = url.rstrip("/")
        if not self._url.startswith(("http://", "https://")):
            raise CommandFailed(f"--url {url}: give http://host:port or https://host:port", 2)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._http = HTTPClient(Agent(reactor, contextFactory=https_policy(cafile), pool=self._pool))
        self._headers: dict[bytes | str, bytes | str] = {"Authorization": f"Bearer {token}"}

    async def _call(self, method: str, path: str, params: Mapping[str, Any] | None = None,
                    body: Any = None, raw: bool = False) -> Any:
        url = self._url + path
        try:
            if method == "GET":
                response = await self._http.get(url, params=dict(params or {}), headers=self._headers, timeout=120)
            else:
                response = await self._http.post(url, json=body, headers=self._headers, timeout=600)
            data = await response.content()
        except Exception as e:  # noqa: BLE001 - refused, timed out, TLS: one line
            raise CommandFailed(f"cannot reach {url}: {e}") from None
        if response.code == 200:
            return data if raw else json.loads(data)
        try:
            error = json.loads(data)["error"]
        except (ValueError, KeyError, TypeError):
            error = data[:200].decode("utf-8", "replace").strip()
        if response.code == 404 and "/entries/" in path:
            return None  # no such entry: the caller says so
        if response.code == 400:
            raise SelectionError(error)
        raise CommandFailed(f"{url}: {response.code} {error}")

    async def spool(self) -> dict[str, Any]:
        spool: dict[str, Any] = (await self._call("GET", "/api/queue/count", {"ids": "-"}))["spool"]
        return spool

    async def listing(self, selection: Selection, offset: int, limit: int) -> dict[str, Any]:
        listing: dict[str, Any] = await self._call(
            "GET", "/api/queue", {**_query(selection), "offset": offset, "limit": limit}
        )
        return listing

    async def count(self, selection: Selection) -> dict[str, Any]:
        counts: dict[str, Any] = await self._call("GET", "/api/queue/count", _query(selection))
        return counts

    async def show(self, entry_id: str) -> dict[str, Any] | None:
        shown: dict[str, Any] | None = await self._call("GET", f"/api/queue/entries/{_quote(entry_id)}")
        return shown

    async def message(self, entry_id: str) -> bytes | None:
        message: bytes | None = await self._call("GET", f"/api/queue/entries/{_quote(entry_id)}/message", raw=True)
        return message

    async def act(self, action: str, selection: Selection, **options: Any) -> dict[str, Any]:
        body = {"selection": selection.to_json(), **{k: v for k, v in options.items() if v is not None}}
        result: dict[str, Any] = await self._call("POST", f"/api/queue/{action}", body=body)
        return result

    def describe(self, selection: Selection) -> str:
        return selection.describe()

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


def _query(selection: Selection) -> dict[str, Any]:
    return {k: (",".join(v) if k == "ids" else str(v).lower() if isinstance(v, bool) else v)
            for k, v in selection.to_json().items()}


def _quote(entry_id: str) -> str:
    from urllib.parse import quote

    return quote(entry_id, safe="")


# -- the actions --------------------------------------------------------------


async def _all_entries(backend: _Local | _Remote, selection: Selection) -> list[dict[str, Any]]:
    """Every selected entry (as JSON), oldest first, a page at a time."""
    entries: list[dict[str, Any]] = []
    while True:
        page = await backend.listing(selection, len(entries), 10_000)
        entries += page["entries"]
        if not page["entries"] or len(entries) >= page["total"]:
            return entries


async def _list(backend: _Local | _Remote, args: argparse.Namespace, selection: Selection, out: Any) -> int:
    from mailhub.cli import _megabytes, _when

    listing = await backend.listing(selection, max(0, args.offset), max(1, args.limit))
    entries = listing["entries"]
    if args.json:
        json.dump(entries, out, indent=2)
        out.write("\n")
        return 0
    now = time.time()
    counts = await backend.spool()
    out.write(
        f"{counts.get('entries', 0)} entries, {counts.get('recipients', 0)} recipients, "
        f"{counts.get('held', 0)} held, {counts.get('leased', 0)} being delivered\n"
    )
    log = counts.get("body_log")
    if log:
        out.write(
            f"body log: {log['segments']} segments, {_megabytes(log['octets'])} on disk, "
            f"{_megabytes(log['in_use'])} of bodies in use\n"
        )
    if selection.criteria:
        out.write(f"{listing['total']} selected: {backend.describe(selection)}\n")
    if entries:
        out.write(f"{'ID':32}  {'ROUTE':28} {'TRIES':>5}  {'NEXT ATTEMPT':32} {'NODE':12} RECIPIENTS / LAST REPLY\n")
    for e in entries:
        state = e.get("state")
        nxt = "being delivered" if state == "leased" else "held" if e["held"] else _when(e["next_attempt"], now)
        pending = [r for r in e["recipients"] if r["state"] == "pending"]
        last = next((r["reply"] for r in pending if r["reply"]), None)
        out.write(
            f"{e['id']:32}  {e['route']:28} {e['attempts']:>5}  {nxt:32} {e['node'] or 'any':12} "
            + ", ".join(r["address"] for r in pending)
            + (f"  [{last}]" if last else "")
            + "\n"
        )
    if listing["total"] > listing["offset"] + len(entries):
        out.write(f"(the first {len(entries)} of {listing['total']}: --limit, --offset for more)\n")
    return 0


async def _count(backend: _Local | _Remote, args: argparse.Namespace, selection: Selection, out: Any) -> int:
    from mailhub.cli import _when

    counts = await backend.count(selection)
    if args.json:
        json.dump(counts, out, indent=2)
        out.write("\n")
        return 0
    states = ", ".join(f"{counts['by_state'].get(s, 0)} {s}" for s in STATES)
    out.write(f"{counts['entries']} entries ({counts['recipients']} recipients) of {backend.describe(selection)}:"
              f" {states}\n")
    if counts["oldest"] is not None:
        out.write(f"oldest accepted {_when(counts['oldest'], time.time())}\n")
    for route, n in sorted(counts["by_route"].items(), key=lambda kv: (-kv[1], kv[0])):
        out.write(f"  {n:>8}  {route}\n")
    return 0


async def _show(backend: _Local | _Remote, args: argparse.Namespace, out: Any) -> int:
    from mailhub.cli import _when

    if args.raw:
        message = await backend.message(args.id)
        if message is None:
            raise CommandFailed(f"no entry {args.id} in the spool")
        out.flush()
        sys.stdout.buffer.write(message)
        sys.stdout.buffer.flush()
        return 0
    entry = await backend.show(args.id)
    if entry is None:
        raise CommandFailed(f"no entry {args.id} in the spool")
    message = await backend.message(args.id)
    text = None if message is None else message.decode("utf-8", "replace").replace("\r\n", "\n")
    if args.json:
        json.dump({**entry, "message": text}, out, indent=2)
        out.write("\n")
        return 0
    now = time.time()
    out.write(f"entry        {entry['id']}\n")
    out.write(f"message      {entry['message_id']} ({entry['size']} bytes)\n")
    out.write(f"route        {entry['route']}\n")
    out.write(f"sender       <{entry['sender']}>\n")
    out.write(f"accepted     {_when(entry['created'], now)}\n")
    if entry.get("state") == "leased":
        out.write("next attempt being delivered now\n")
    elif entry["held"]:
        out.write("next attempt held (release with: mailhub queue release ID)\n")
    else:
        out.write(f"next attempt {_when(entry['next_attempt'], now)} by {entry['node'] or 'any node'}\n")
    out.write("recipients\n")
    for r in entry["recipients"]:
        out.write(f"  <{r['address']}> {r['state']}" + (f": {r['reply']}" if r["reply"] else "") + "\n")
    attempts = entry["attempt_log"]
    out.write(f"attempts     {len(attempts)}\n")
    for a in attempts:
        out.write(f"  {_when(a['finished'], now)} by {a['node']} ({a['finished'] - a['started']:.2f} s)\n")
        for reply in a["replies"]:
            out.write(f"    <{reply['recipient']}>: {reply['reply']}\n")
    if text is None:
        out.write("*** MESSAGE: gone from the spool ***\n")
    else:
        out.write(f"*** MESSAGE ({len(message or b'')} bytes) ***\n{text}")
        if not text.endswith("\n"):
            out.write("\n")
        out.write("*** END OF MESSAGE ***\n")
    return 0


async def _act(
    backend: _Local | _Remote, args: argparse.Namespace, selection: Selection, config: Any, out: Any
) -> int:
    action = "bounce" if args.action == "delete" and args.dsn else args.action
    options: dict[str, Any] = {}
    if action == "redirect":
        options["route"] = args.to
    if action == "bounce" and getattr(args, "reason", None):
        options["reason"] = args.reason
    if getattr(args, "first", None) is not None:
        if args.first < 1:
            raise SelectionError("--first: give a number of entries of 1 or more")
    if args.batch < 1:
        raise SelectionError("--batch: give a number of entries of 1 or more")
    if not (selection.criteria or selection.all):
        if action != "flush":
            raise SelectionError(
                "which entries? give an entry id, or exactly one of --route, --domain, --all,"
                " or narrow the selection with --sender, --recipient, --state, --older-than, --reply"
            )
        selection = Selection(all=True)
    single = len(selection.ids) == 1 and not _narrowed(selection)
    where = backend.describe(selection)
    if single or (action == "flush" and not narrower_than_route(selection)):
        # One entry, or a whole route flushed by the store at once.
        result = await backend.act(action, selection, **options)
        if single and not result["selected"]:
            raise CommandFailed(f"no entry {selection.ids[0]} in the spool")
        if single and not result["done"] and action in ("flush", "redirect", "bounce", "delete"):
            why = ", ".join(result["skipped"]) or "gone"
            raise CommandFailed(f"{args.action} {selection.ids[0]}: not done: {why}")
    else:
        entries = await _all_entries(backend, selection)
        ids = [e["id"] for e in entries]
        # What is left out here is counted as the node would count it.
        left_out: dict[str, int] = {}
        if action == "release":
            ids = [e["id"] for e in entries if e["held"]]
            left_out["not held"] = len(entries) - len(ids)
            if args.first:
                ids = ids[: args.first]
        if action in ("bounce", "delete"):
            ids = [e["id"] for e in entries if e.get("state") != "leased"]
            left_out["being delivered"] = len(entries) - len(ids)
            if len(ids) > 1 and not args.yes:
                await _confirm(action, len(ids), where)
        results = []
        started, done = time.monotonic(), 0
        for i in range(0, len(ids), args.batch):
            batch = ids[i : i + args.batch]
            results.append(await backend.act(action, evolve(selection, ids=tuple(batch), all=False),
                                             confirm=True if action in ("bounce", "delete") else None, **options))
            done += len(batch)
            if len(ids) > args.batch:
                _progress(action, done, len(ids), started)
        result = merge(results) if results else {
            "action": action, "selected": 0, "done": 0, "ids": [], "skipped": {}, **(
                {"route": options["route"]} if action == "redirect" else {})}
        result["selected"] = len(entries)
        for why, count in left_out.items():
            if count:
                result["skipped"][why] = result["skipped"].get(why, 0) + count
        if action == "release":
            result["still_held"] = sum(1 for e in entries if e["held"]) - result["done"]
        if action == "bounce":
            result.setdefault("dsn", 0)
            result.setdefault("no_dsn", 0)
    result["selection"] = where
    if args.json:
        json.dump(result, out, indent=2)
        out.write("\n")
    elif single:
        out.write(f"{args.action}: {selection.ids[0]}"
                  + (f" ({', '.join(result['skipped'])})" if result["skipped"] else "") + "\n")
    else:
        line = summary(result)
        if action == "release" and result.get("still_held"):
            line += f"; {result['still_held']} still held (release them with the same selection once these are delivered)"
        out.write(line + "\n")
    if isinstance(backend, _Local) and action in ("release", "flush", "redirect"):
        # Always, as before bulk actions: a flush asks for a scan even when the store had nothing to change.
        from mailhub.cli import _wake_local_nodes

        await _wake_local_nodes(backend.store, backend._reactor.seconds(), config.delivery.heartbeat_seconds,
                                sys.stderr if args.json else out)
    return 0


def _narrowed(selection: Selection) -> bool:
    return bool(selection.route or selection.domain or selection.sender or selection.recipient
                or selection.state or selection.older_than is not None or selection.reply)


def _progress(action: str, done: int, total: int, started: float) -> None:
    err = sys.stderr
    line = f"{action}: {done}/{total} entries ({100 * done // total}%), {time.monotonic() - started:.1f} s"
    if err.isatty():
        err.write("\r" + line + ("\n" if done >= total else ""))
    else:
        err.write(line + "\n")
    err.flush()


async def _confirm(action: str, count: int, where: str) -> None:
    if not sys.stdin.isatty():
        raise CommandFailed(f"{action} of {count} entries of {where}: add --yes to go ahead", 2)
    from twisted.internet.threads import deferToThread

    what = "bounce (a DSN to each sender, then remove)" if action == "bounce" else "delete"
    answer = await deferToThread(input, f"{what} {count} entries of {where}? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise CommandFailed("nothing done", 1)

"""
``mailhub``: the operator's command.

    mailhub check-config [-c] FILE
    mailhub queue [--config FILE | --url URL --token-file F] list|count [SELECTION] [--json]
    mailhub queue [...] show ID [--json | --raw]
    mailhub queue [...] hold|release|flush|redirect|bounce|delete [ID ...] [SELECTION] [--json]
        SELECTION: --route R --domain D --sender S --recipient R --state deferred|held|leased
                   --older-than AGE --reply TEXT, or --all; release --first N; redirect --to ROUTE;
                   bounce --reason TEXT; delete --dsn; bounce and delete --yes
    mailhub token [--config FILE] create NAME [--role read-only|operator]
    mailhub route [--config FILE] list [--json]
    mailhub route [--config FILE] release|confirm ROUTE
    mailhub archive [--config FILE] search|show|redeliver|import|export|hold|holds|audit ...
    mailhub nodes [--config FILE] [--json]
    mailhub status [--config FILE] [--json]
    mailhub reload [--config FILE] [--node NAME | --url URL --token-file F] [--json]
    mailhub drill DOMAIN [--node NAME | --url URL --token-file F] [--to ADDRESS] [--timeout S]
                  [--smtp HOST:PORT] [--json]
    mailhub --version
    mailhub sink --listen ENDPOINT [--maildir DIR]

The queue commands open the configured spool store themselves (the hub may be
running: every store is safe to share), so they work for every store plugin;
with ``--url`` they go through a node's admin API instead (``mailhub.queue_cli``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from mailhub.config import ConfigError, HubConfig, describe, load
from mailhub.model import EntryFilter

__all__ = ["main"]


def _megabytes(octets: int) -> str:
    return f"{octets / 1_000_000:.1f} MB"


def _when(ts: float, now: float) -> str:
    delta = ts - now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    if abs(delta) < 1:
        rel = "now"
    elif delta > 0:
        rel = f"in {_span(delta)}"
    else:
        rel = f"{_span(-delta)} ago"
    return f"{stamp} ({rel})"


def _span(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _open_store(config: HubConfig, reactor: Any) -> Any:
    from mailhub.plugin import load_plugin

    factory = load_plugin("mailhub.stores", config.store["plugin"])
    return factory.make(config.plugin_section("store"), reactor)


async def _queue(reactor: Any, args: argparse.Namespace, config: HubConfig | None) -> int:
    """``mailhub queue ...`` (``mailhub.queue_cli``)."""
    from mailhub.queue_cli import run

    return await run(reactor, args, config)


async def _wake_local_nodes(store: Any, now: float, heartbeat_seconds: float, out: Any) -> None:
    """
    Tell the hub processes on this host, by their heartbeats, to scan the
    spool now (``mailhub.service.WAKE_SIGNAL``).  Nodes elsewhere see the
    change at their next scan, within ``[delivery] max_scan_interval``.
    """
    import socket

    from mailhub.interfaces import WAKE_SIGNAL, INodeRegistry

    registry = INodeRegistry(store, None)
    if registry is None:
        return
    host = socket.gethostname()
    # Only a process that said, in a recent heartbeat, that it handles the
    # signal: its default action ends a process, and a pid is reused.
    recent = now - DOWN_AFTER_HEARTBEATS * heartbeat_seconds
    pids: dict[int, float] = {}
    for n in await registry.nodes(now):
        pid, seen = n["info"].get("pid"), n["last_seen"] or 0
        if (
            n["info"].get("host") == host
            and isinstance(pid, int)
            and n["info"].get("wake_signal") == int(WAKE_SIGNAL)
            and seen >= recent
        ):
            pids[pid] = max(seen, pids.get(pid, 0))
    woken = 0
    for pid, seen in sorted(pids.items()):
        if not _is_hub_process(pid, seen):
            continue
        try:
            os.kill(pid, WAKE_SIGNAL)
        except (ProcessLookupError, PermissionError):
            continue  # a node that stopped since its last heartbeat
        woken += 1
    if woken:
        out.write(f"woke {woken} hub process{'es' if woken > 1 else ''} on this host\n")


async def _route(reactor: Any, args: argparse.Namespace, config: HubConfig) -> int:
    """``mailhub route list|release|confirm``: routes' hub-wide states (``rejecting``)."""
    from mailhub.delivery.engine import release_route
    from mailhub.interfaces import IRouteCoordination

    store = _open_store(config, reactor)
    out = sys.stdout
    now = reactor.seconds()
    try:
        coordination = IRouteCoordination(store, None)
        if coordination is None:
            sys.stderr.write(f"mailhub: the {config.store.get('plugin')} store keeps no route states\n")
            return 1
        states = await coordination.route_states()
        if args.action == "list":
            if args.json:
                json.dump(states, out, indent=2)
                out.write("\n")
                return 0
            if not states:
                out.write("no route is in a special state\n")
            for route, state in sorted(states.items()):
                what = state.get("state", "?")
                since = _when(state.get("since") or now, now)
                if what == "rejecting":
                    detail = f"{state.get('recipients', '?')} recipients refused ({state.get('reply')})"
                else:
                    detail = f"last reply {state.get('reply')}"
                out.write(f"{route}: {what.upper()} since {since}, {detail}, seen by {state.get('node')}\n")
            return 0
        route = args.route
        if route not in states:
            sys.stderr.write(f"mailhub: route {route} is in no special state (see: mailhub route list)\n")
            return 1
        if args.action == "release":
            await coordination.set_route_state(route, None)
            count = await release_route(store, route, now)
            out.write(f"route {route}: no longer {states[route].get('state', '').upper()}; {count} held entries"
                      " released, to be retried now\n")
        else:
            bounced, silent = await _confirm(store, config, route, states[route], now)
            await coordination.set_route_state(route, None)
            out.write(f"route {route}: rejections confirmed; {bounced} entries bounced (DSN to their senders),"
                      f" {silent} without a DSN (null sender)\n")
        await _wake_local_nodes(store, now, config.delivery.heartbeat_seconds, out)
        return 0
    finally:
        await store.close()


async def _confirm(store: Any, config: HubConfig, route: str, state: dict[str, Any], now: float) -> tuple[int, int]:
    """
    Bounce every held entry of ``route``: a DSN to its sender with each
    pending recipient's rejection (or the route's, for one never tried while
    it was rejecting), then the entry leaves the spool.
    """
    from mailhub.delivery.dsn import build_dsn
    from mailhub.model import Action, Outcome, Reply
    from mailhub.node import routes_for

    fallback = _parse_reply(str(state.get("reply", ""))) or Reply(550, "5.0.0", "rejected by the route's server")
    first_node = next(iter(config.nodes))
    bounced = silent = 0
    while True:
        batch = await store.entries(EntryFilter(route=route, held=True), 0, 200)
        if not batch:
            return bounced, silent
        for entry in batch:
            outcomes = [
                Outcome(r.address, Action.FAILED, r.reply if r.reply is not None and r.reply.permanent else fallback)
                for r in entry.recipients
                if r.state.value == "pending"
            ]
            try:
                message = await store.body(entry.message_id)
            except KeyError:
                message = b""
            dsn = build_dsn(config.hostname, entry, outcomes, message, now)
            if dsn is None:
                silent += 1
            else:
                envelope, data = dsn
                # The DSN is safely spooled before the entry goes.
                await store.enqueue(envelope, data, routes_for(config, envelope.recipients), first_node)
                bounced += 1
            await store.delete(entry.id)


def _parse_reply(text: str) -> Any:
    from mailhub.model import Reply

    code, _, rest = text.partition(" ")
    if not code.isdigit():
        return None
    enhanced, _, words = rest.partition(" ")
    if not (enhanced[:1].isdigit() and enhanced.count(".") == 2):
        enhanced, words = "", rest
    return Reply(int(code), enhanced, words)


def _is_hub_process(pid: int, last_seen: float) -> bool:
    """
    Whether ``pid`` is still the mailhub process whose heartbeat was seen at
    ``last_seen``: its command line names mailhub, and it started before
    that heartbeat (a pid taken over since by another process did not).
    Without ``/proc`` to tell, no: the signal's default action would end
    whatever process holds the pid now.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"mailhub" not in f.read():
                return False
        with open(f"/proc/{pid}/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    started = boot + ticks / os.sysconf("SC_CLK_TCK")
    # btime is whole seconds: allow for its rounding.
    return started <= last_seen + 1.0


#: A node is DOWN when it has missed this many heartbeats.
DOWN_AFTER_HEARTBEATS = 3


async def _nodes(reactor: Any, args: argparse.Namespace, config: HubConfig) -> int:
    """``mailhub nodes``: every node, when it was last seen, and what it holds."""
    from mailhub.interfaces import INodeRegistry

    store = _open_store(config, reactor)
    try:
        registry = INodeRegistry(store, None)
        if registry is None:
            sys.stderr.write(
                f"mailhub: the {config.store['plugin']!r} store keeps no node heartbeats\n"
            )
            return 1
        now = reactor.seconds()
        listed = {n["name"]: n for n in await registry.nodes(now)}
    finally:
        await store.close()
    limit = DOWN_AFTER_HEARTBEATS * config.delivery.heartbeat_seconds
    rows = []
    # The configuration's nodes first, in its order, even if never seen.
    for name in [*config.nodes, *sorted(set(listed) - set(config.nodes))]:
        n = listed.get(name) or {"name": name, "last_seen": None, "info": {}, "leased": 0, "reserved": 0}
        seen = n["last_seen"]
        age = None if seen is None else max(0.0, now - seen)
        if seen is None:
            state = "never seen"
        elif n["info"].get("stopped"):
            state = "stopped"  # its last heartbeat said so: a clean stop, not an outage
        elif age is not None and age > limit:
            state = "DOWN"
        else:
            state = "up"
        rows.append({**n, "age": age, "state": state, "down": state not in ("up", "stopped"),
                     "stopped_at": seen if state == "stopped" else None,
                     "configured": name in config.nodes})
    out = sys.stdout
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return 0
    out.write(f"{'NODE':14} {'STATE':10} {'LAST SEEN':36} {'LEASED':>6} {'RESERVED':>8}  HOST / PID / IN FLIGHT\n")
    for r in rows:
        info = r["info"]
        where = " / ".join(str(info.get(k, "-")) for k in ("host", "pid", "in_flight")) if info else "-"
        last = "never" if r["last_seen"] is None else _when(r["last_seen"], now)
        out.write(f"{r['name']:14} {r['state']:10} {last:36} {r['leased']:>6} {r['reserved']:>8}  {where}\n")
    out.write(
        f"(DOWN: no heartbeat for {DOWN_AFTER_HEARTBEATS} x [delivery] heartbeat_seconds = {limit:g} s;"
        " its leases expire and the other nodes take its entries.  stopped: stopped cleanly at LAST SEEN,"
        " its leases given back)\n"
    )
    return 0


def _web_url(endpoint: str) -> str | None:
    from twisted.internet.endpoints import _parseServer  # type: ignore[attr-defined]

    kind, args, kw = _parseServer(endpoint, None)
    if kind != "TCP":
        return None
    host = kw.get("interface") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{args[0]}/status"


def _status(config: HubConfig, as_json: bool) -> int:
    """Ask every node with a ``web`` listener for its status (this command is a client, not the hub)."""
    import urllib.error
    import urllib.request

    results: dict[str, Any] = {}
    for node in config.nodes.values():
        url = _web_url(node.web) if node.web else None
        if url is None:
            results[node.name] = {"error": "no tcp web listener configured"}
            continue
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                results[node.name] = json.loads(response.read())
        except (OSError, ValueError, urllib.error.URLError) as e:
            results[node.name] = {"error": f"{url}: {e}"}
    if any("error" in r for r in results.values()):
        # A node that does not answer may have stopped cleanly: its last heartbeat says when.
        for name, at in _stopped_nodes(config).items():
            if "error" in results.get(name, {}):
                results[name].update(state="stopped", stopped_at=at)
    if as_json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0 if all("error" not in r for r in results.values()) else 1
    failed = False
    # Deliveries a minute per route, all nodes together: the drain's pace
    # (a node of an older version gives only the last minute's count).
    pace: dict[str, int] = {}
    for r in results.values():
        for route, t in r.get("engine", {}).get("routes", {}).items():
            pace[route] = pace.get(route, 0) + t.get("pace_per_minute", t["delivered_last_minute"])
    for name, r in results.items():
        if "error" in r:
            failed = True
            if r.get("state") == "stopped":
                sys.stdout.write(f"{name}: stopped at {_when(r['stopped_at'], time.time())}\n")
            else:
                sys.stdout.write(f"{name}: UNREACHABLE ({r['error']})\n")
            continue
        spool = r.get("spool", {})
        sys.stdout.write(
            f"{name}: {r['engine']['in_flight']} attempts in flight; spool {spool.get('entries', 0)} entries "
            f"({spool.get('held', 0)} held)\n"
        )
        backlog = spool.get("routes", {})
        for route, t in r["engine"]["routes"].items():
            sys.stdout.write(f"  {route}: {_route_line(t, backlog.get(route, 0), pace.get(route, 0))}\n")
    return 1 if failed else 0


def _stopped_nodes(config: HubConfig) -> dict[str, float]:
    """
    The nodes whose last heartbeat says that they stopped cleanly, with the
    time; empty when the store keeps no heartbeats or cannot be read.
    """
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    from mailhub.interfaces import INodeRegistry

    stopped: dict[str, float] = {}

    async def read(reactor: Any) -> None:
        try:
            store = _open_store(config, reactor)
        except Exception:
            return  # status still says the node does not answer
        try:
            registry = INodeRegistry(store, None)
            if registry is not None:
                for n in await registry.nodes(reactor.seconds()):
                    if n["info"].get("stopped") and n["last_seen"] is not None:
                        stopped[n["name"]] = n["last_seen"]
        except Exception:
            pass  # the store does not answer: the same
        finally:
            await store.close()

    try:
        task.react(lambda reactor: ensureDeferred(read(reactor)))
    except SystemExit:
        pass
    return stopped


def _route_line(t: dict[str, Any], backlog: int, per_minute: int) -> str:
    """One route of ``mailhub status``: its state and why, the budget, the progress."""
    state = str(t.get("state") or ("down" if t["down"] else "up")).upper()
    if t["paused_for"]:
        state += " (paused %ss)" % t["paused_for"]
    share = t.get("share", t["max_connections"])
    line = (
        f"{state}, backlog {backlog}, window {t['window']}/{t['max_connections']}, share {share} of"
        f" {t['max_connections']} for the hub, {t['active']} running, {t['waiting']} waiting,"
        f" {t['delivered_last_minute']} delivered in the last minute ({per_minute}/min by all nodes)"
    )
    if backlog and per_minute and state.startswith(("UP", "BACK-PRESSURE")):
        line += f", about {_span(60.0 * backlog / per_minute)} left"
    line += f"; {t['delivered']} delivered, {t['deferred']} deferred, {t['back_pressure']} back-pressure"
    if t.get("why"):
        line += f"\n      why: {t['why']}"
    if t.get("drain"):
        d = t["drain"]
        line += f"\n      draining: {d['delivered']} delivered, {d['back_pressure']} back-pressure so far"
    elif t.get("last_drain"):
        d = t["last_drain"]
        line += (
            f"\n      last drain: {d['delivered']} delivered in {d['seconds']} s, peak {d['peak_connections']}"
            f" connections, {d['back_pressure']} back-pressure, {d['deferred']} deferred, {d['failed']} failed"
        )
    if t["last_reply"]:
        line += f"\n      last reply: {t['last_reply']}"
    return line




def _token(config: HubConfig, args: argparse.Namespace) -> int:
    """
    ``mailhub token create NAME [--role R]``: append ``NAME TOKEN ROLE`` to
    ``[web] api_tokens_file`` (made, readable by its owner only, if
    missing) and print the token: it is shown this once.
    """
    import secrets

    from mailhub.web.archive_api import read_token_roles

    path = config.web.get("api_tokens_file")
    if not path:
        sys.stderr.write(f"mailhub: {config.path}: set [web] api_tokens_file (the file the nodes read tokens from)\n")
        return 2
    name = args.name
    if not name or any(c.isspace() for c in name) or "#" in name:
        sys.stderr.write(f"mailhub: token name {name!r}: one word, without '#'\n")
        return 2
    try:
        known = read_token_roles(path) if os.path.exists(path) else {}
    except (OSError, ValueError) as e:
        sys.stderr.write(f"mailhub: {config.path}: web.api_tokens_file: {e}\n")
        return 1
    if any(n == name for n, _ in known.values()):
        sys.stderr.write(f"mailhub: {path} has a token named {name} already: choose another name\n")
        return 2
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as f:
            if f.tell() > 0:
                with open(path, "rb") as current:
                    current.seek(-1, os.SEEK_END)
                    if current.read(1) != b"\n":
                        f.write(b"\n")
            f.write(f"{name} {token} {args.role}\n".encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        sys.stderr.write(f"mailhub: {path}: {e.strerror or e}\n")
        return 1
    sys.stdout.write(token + "\n")
    sys.stderr.write(
        f"mailhub: token {name} ({args.role}) added to {path}; it is not shown again."
        " Nodes read the file when they start: restart them to use it.\n"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    from mailhub import __version__

    p = argparse.ArgumentParser(prog="mailhub", description="Operate a mailhub hub.")
    p.add_argument("--version", action="version", version=f"mailhub {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    cc = sub.add_parser(
        "check-config",
        help="check a configuration file (the core's tables, the plugins' tables, the routes' targets)"
        " and print it resolved",
    )
    cc.add_argument("file", nargs="?", help="the configuration, or -c FILE")
    cc.add_argument("-c", "--config", default=os.environ.get("MAILHUB_CONFIG", "mailhub.toml"),
                    help="the hub's configuration (default: $MAILHUB_CONFIG or mailhub.toml)")

    from mailhub.queue_cli import add_parser as add_queue_parser

    add_queue_parser(sub, os.environ.get("MAILHUB_CONFIG", "mailhub.toml"))

    from mailhub.node_cli import add_parsers as add_node_parsers

    add_node_parsers(sub, os.environ.get("MAILHUB_CONFIG", "mailhub.toml"))

    tk = sub.add_parser("token", help="API tokens of the nodes' admin API ([web] api_tokens_file)")
    tk.add_argument("-c", "--config", default=os.environ.get("MAILHUB_CONFIG", "mailhub.toml"),
                    help="the hub's configuration (default: $MAILHUB_CONFIG or mailhub.toml)")
    tks = tk.add_subparsers(dest="action", required=True)
    tc = tks.add_parser("create", help="add a new random token to [web] api_tokens_file and print it, once")
    tc.add_argument("name", help="who or what uses it (a word: ops-alice, prometheus)")
    tc.add_argument("--role", choices=("read-only", "operator"), default="read-only",
                    help="read-only (the default) reads; operator may act on the spool too")

    r = sub.add_parser("route", help="routes' hub-wide states: a server rejecting everything")
    r.add_argument("-c", "--config", default=os.environ.get("MAILHUB_CONFIG", "mailhub.toml"),
                   help="the hub's configuration (default: $MAILHUB_CONFIG or mailhub.toml)")
    rs = r.add_subparsers(dest="action", required=True)
    rl = rs.add_parser("list", help="routes in a special state (REJECTING), since when, with what reply")
    rl.add_argument("--json", action="store_true")
    rs.add_parser("release", help="the server is fixed: end REJECTING and retry every held entry").add_argument(
        "route"
    )
    rs.add_parser(
        "confirm", help="the rejections are real: bounce the held entries (DSNs) and end REJECTING"
    ).add_argument("route")

    from mailhub.archive.cli import add_parser as add_archive_parser

    add_archive_parser(sub, os.environ.get("MAILHUB_CONFIG", "mailhub.toml"))

    from mailhub.archive.accounts_cli import add_parser as add_user_parser

    add_user_parser(sub, os.environ.get("MAILHUB_CONFIG", "mailhub.toml"))

    n = sub.add_parser("nodes", help="the hub's nodes, when each was last seen, and what each holds")
    n.add_argument("-c", "--config", default=os.environ.get("MAILHUB_CONFIG", "mailhub.toml"),
                   help="the hub's configuration (default: $MAILHUB_CONFIG or mailhub.toml)")
    n.add_argument("--json", action="store_true")

    st = sub.add_parser("status", help="each node's delivery progress per route (from its web listener)")
    st.add_argument("-c", "--config", default=os.environ.get("MAILHUB_CONFIG", "mailhub.toml"))
    st.add_argument("--json", action="store_true")

    s = sub.add_parser("sink", help="run a test SMTP server that accepts and prints mail")
    s.add_argument("--listen", default="tcp:2500:interface=127.0.0.1")
    s.add_argument("--maildir")
    s.add_argument("--mode", default="accept", choices=["accept", "reject", "tempfail", "busy", "drop"],
                   help="rehearse an outage: reject (550 5.1.1 to everyone, a rebuilt server), tempfail (451),"
                        " busy (421), drop (close)")
    s.add_argument("--max-connections", type=int, metavar="N",
                   help="452 4.3.1 at MAIL above N connections, as Exchange's back pressure")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """
    The reader of our output went away (``mailhub archive search | head``):
    say nothing more, as other Unix tools, and keep Python from complaining
    when it flushes standard output at exit.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 1


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        try:
            checked = load(args.file or args.config)
        except ConfigError as e:
            sys.stderr.write(f"{e}\n")
            return 2
        print(describe(checked))
        return 0
    if args.command == "sink":
        from mailhub.sink import main as sink_main

        sink_args = ["--listen", args.listen, "--mode", args.mode] + (["--maildir", args.maildir] if args.maildir else [])
        if args.max_connections:
            sink_args += ["--max-connections", str(args.max_connections)]
        return sink_main(sink_args) or 0
    config: Any = None
    # Through a node's API the queue commands need no configuration.
    if not (args.command in ("queue", "reload", "drill") and args.url and not getattr(args, "node", None)):
        try:
            # status reads the nodes' web endpoints; the others listen on nothing.
            config = load(args.config, endpoints=args.command == "status")
        except ConfigError as e:
            if args.command == "reload":
                # As the node itself answers a reload of a broken file (README).
                sys.stderr.write(f"mailhub: reload refused: the hub keeps running its configuration\n{e}\n")
                return 1
            sys.stderr.write(f"{e}\n")
            return 2
    if args.command == "status":
        return _status(config, args.json)
    if args.command == "token":
        return _token(config, args)
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    result: list[int] = []

    async def run(reactor: Any) -> None:
        from mailhub.archive.accounts_cli import run as _user
        from mailhub.archive.cli import run as _archive
        from mailhub.node_cli import run as _node

        command = {"nodes": _nodes, "route": _route, "archive": _archive, "user": _user,
                   "reload": _node, "drill": _node}.get(args.command, _queue)
        from mailhub.model import StoreUnavailable

        try:
            result.append(await command(reactor, args, config))
        except BrokenPipeError:
            result.append(_reader_gone())
        except StoreUnavailable as e:
            # `mailhub nodes` is what an operator runs when Redis is in trouble: one line.
            sys.stderr.write(f"mailhub: spool store unavailable: {e}\n")
            result.append(1)

    try:
        task.react(lambda reactor: ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code:
            return int(e.code)
    return result[0] if result else 1

if __name__ == "__main__":
    sys.exit(main())

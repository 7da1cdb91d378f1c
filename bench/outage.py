"""
The outage scenario of issue 11, end to end, with a printed report.

    .venv/bin/python bench/outage.py [--store sqlite|redis|both] [--messages N]
        [--storm-messages 20] [--limit 3] [--timeout 600] [--json FILE]

For each store it starts a real hub exactly as the README does (``twistd -n
--pidfile= mailhub --config FILE``): ``sqlite`` is the embedded default, both
nodes (dallas, losangeles) in one process over one SQLite spool; ``redis`` is
two processes (``--node dallas``, ``--node losangeles``) over one private
``redis-server``.  The organisation's server is a ``DownstreamServer``
(``mailhub.testing.downstream``) running in this process's reactor; a second
one is the hub's ``[hub] outbound``: every DSN (bounce) lands there.

The scenario:

1. **down**: the server is not listening; N messages are sent, split over both
   nodes' SMTP ports (smtplib, in threads); every one must get ``250``.
2. **rejecting**: the server comes back rebuilt, answering every RCPT with
   ``550 5.1.1``; the storm messages arrive meanwhile.  What the operator sees
   (``mailhub status``, ``mailhub queue list``) is recorded.
3. **fixed**: the server accepts everyone, behind a connection limit: above
   ``--limit`` open connections, ``MAIL`` gets ``452 4.3.1`` (back pressure).
4. **release**: the operator releases the held entries and flushes.
5. **drain**: until every accepted message is delivered or bounced, or the
   timeout.

Then a **reference** run on a fresh hub: the same N messages spooled while the
server is down, the server brought up healthy behind the same limit, the hub's
``max_connections`` set so the nodes together stay within it, flush, drain.

Every message has its own recipient (``outage-17@example.com``,
``storm-3@example.com``) and Message-ID, so deliveries, duplicates (by
Message-ID at the server), bounces (the DSN names the recipient and carries
the original headers) and what is left in the spool are counted per message.
Time above the limit is measured from the server's connection open and close
events, not sampled.

A benchmark asserts no time.  It exits 1 when mail was lost (accepted, yet
neither delivered, bounced nor in the spool) or when outage or storm mail was
bounced: both are correctness failures, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BenchError, free_port, smtp_banner, stop_process, wait_for  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.dirname(sys.executable)
MAILHUB = os.path.join(VENV_BIN, "mailhub")
NODES = ("dallas", "losangeles")
SENDER = "bench@source.test"
DOMAIN = "example.com"
TAG = re.compile(rb"\b((?:outage|storm)-\d+)(?:\.[0-9a-f]+@bench\.test|@example\.com)", re.IGNORECASE)
MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*<([^>]*)>", re.IGNORECASE | re.MULTILINE)


# The servers, in this process's reactor (a thread of its own)


class Reactor:
    """The Twisted reactor, run in a daemon thread; ``call`` runs a function in it and waits."""

    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.thread = threading.Thread(
            target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True, name="reactor"
        )
        self.thread.start()

    def call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        from twisted.internet.threads import blockingCallFromThread

        return blockingCallFromThread(self.reactor, fn, *args, **kw)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.reactor.callFromThread(self.reactor.stop)
            self.thread.join(10)


def make_downstream(reactor: Any, limit: int, hostname: str) -> Any:
    """
    A ``DownstreamServer`` that also measures, from its own connection open and
    close events, how long more than ``limit`` connections were open, and keeps
    every message's Message-ID and arrival time.
    """
    from mailhub.testing.downstream import DownstreamServer

    class Downstream(DownstreamServer):
        def __init__(self) -> None:
            self.limit = limit
            self._active = 0
            self._above_since: float | None = None
            self.above_seconds = 0.0
            self.received: list[tuple[bytes, float]] = []  # (the raw message, monotonic time)
            super().__init__(reactor, hostname=hostname)
            self.on_message = lambda m: self.received.append((m.message, time.monotonic()))

        @property  # type: ignore[override]
        def active_connections(self) -> int:
            return self._active

        @active_connections.setter
        def active_connections(self, n: int) -> None:
            now = time.monotonic()
            self._active = n
            if n > self.limit and self._above_since is None:
                self._above_since = now
            elif n <= self.limit and self._above_since is not None:
                self.above_seconds += now - self._above_since
                self._above_since = None

        def above(self) -> float:
            """Seconds above the limit since ``restart_measures``, including a stretch going on now."""
            extra = time.monotonic() - self._above_since if self._above_since is not None else 0.0
            return self.above_seconds + extra

        def restart_measures(self) -> None:
            """Runs in the reactor: peak, time above the limit and counters start from now."""
            self.peak_connections = self._active
            self.above_seconds = 0.0
            self._above_since = time.monotonic() if self._active > self.limit else None
            self.deferrals = 0
            self.rejections = 0

    return Downstream()


# The hub


class Hub:
    """One hub: its configuration in ``workdir``, one twistd (sqlite) or two plus a redis-server (redis)."""

    def __init__(self, workdir: str, store: str, route_port: int, dsn_port: int, max_connections: int) -> None:
        self.dir = workdir
        self.store = store
        self.config = os.path.join(workdir, "hub.toml")
        self.smtp_ports = {n: free_port() for n in NODES}
        self.web_ports = {n: free_port() for n in NODES}
        self.route_port = route_port
        self.dsn_port = dsn_port
        self.max_connections = max_connections
        self.route = f"smtp:127.0.0.1:{route_port}"
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.redis: Any = None
        self._logs: list[Any] = []

    def setup(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        if self.store == "redis":
            from mailhub.testing.redis_server import RedisServer, redis_server_binary

            if redis_server_binary() is None:
                raise BenchError("redis-server is not installed (apt-get install redis-server)")
            self.redis = RedisServer.start(Path(self.dir) / "redis")
            store = f'plugin = "redis"\nhost = "127.0.0.1"\nport = {self.redis.port}\n'
        else:
            store = 'plugin = "sqlite"\npath = "spool.db"\n'
        nodes = "".join(
            f'[nodes.{n}]\nsmtp = "tcp:{self.smtp_ports[n]}:interface=127.0.0.1"\n'
            f'web = "tcp:{self.web_ports[n]}:interface=127.0.0.1"\n\n'
            for n in NODES
        )
        text = f"""\
[hub]
hostname = "mx.hub.test"
# DSNs go to the bench's second server, which counts them.
outbound = "smtp:127.0.0.1:{self.dsn_port}"

[smtp]
# All the load comes from 127.0.0.1 (see bench/README.md).
max_messages_per_minute_per_ip = 100000000

[store]
{store}
[policy]
plugin = "standard"
# Short timings, so the scenario runs in minutes: each node retries an entry
# every 6 s (the entry every 3 s, alternating).
retry_minutes = 0.1

[delivery]
probe_seconds = 1
max_scan_interval = 1
heartbeat_seconds = 1
lease_seconds = 30
takeover_seconds = 2

{nodes}[domains."{DOMAIN}"]
route = "smtp:127.0.0.1:{self.route_port}"
max_connections = {self.max_connections}
"""
        with open(self.config, "w") as f:
            f.write(text)
        res = subprocess.run([MAILHUB, "check-config", self.config], capture_output=True, text=True)
        if res.returncode != 0:
            raise BenchError(f"mailhub check-config refused the bench's configuration: {res.stderr.strip()}")

    def start(self, timeout: float = 60.0) -> None:
        runs = [("hub", [])] if self.store == "sqlite" else [(n, ["--node", n]) for n in NODES]
        for name, extra in runs:
            log = open(os.path.join(self.dir, f"twistd-{name}.log"), "ab")
            self._logs.append(log)
            argv = [
                os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=",
                "--logfile", os.path.join(self.dir, f"{name}.log"),
                "mailhub", "--config", self.config, *extra,
            ]
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
            self.procs.append((name, proc))

        def ready() -> bool:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise BenchError(f"twistd ({name}) exited with {proc.returncode}: {self.log_tail()}")
            return all(smtp_banner(p) for p in self.smtp_ports.values()) and all(
                self.status(n) is not None for n in NODES
            )

        wait_for(ready, timeout, f"the hub ({self.store}) to listen on SMTP and web", interval=0.2)

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise BenchError(f"twistd ({name}) exited with {proc.returncode}")

    def log_tail(self, lines: int = 8) -> str:
        out: list[str] = []
        for path in sorted(Path(self.dir).glob("*.log")):
            try:
                out += [f"{path.name}: {x}" for x in path.read_text(errors="replace").strip().splitlines()[-lines:]]
            except OSError:
                pass
        return "\n  ".join(out) or "(no log)"

    def status(self, node: str) -> dict | None:
        """``GET /status`` of one node, or ``None`` if it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_ports[node]}/status", timeout=5) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([MAILHUB, *args], capture_output=True, text=True, timeout=timeout)

    def queue(self, *args: str) -> subprocess.CompletedProcess:
        return self.cli("queue", "--config", self.config, *args)

    def spool(self, held: bool = False) -> list[dict]:
        res = self.queue("list", "--json", "--limit", "10000000", *(["--held"] if held else []))
        if res.returncode != 0:
            raise BenchError(f"mailhub queue list failed: {res.stderr.strip()}")
        return json.loads(res.stdout)

    def stop(self) -> None:
        for _name, proc in self.procs:
            stop_process(proc, timeout=30)
        self.procs = []
        for log in self._logs:
            log.close()
        self._logs = []

    def destroy(self, keep: bool = False) -> None:
        self.stop()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# What the operator sees


def route_line(node: str, s: dict | None) -> str:
    """One line per node from ``/status``: the route's state and pacing, the spool's counts."""
    if s is None:
        return f"{node}: /status does not answer"
    spool = s.get("spool", {})
    parts = [f"{node}: spool {spool.get('entries', '?')} entries, {spool.get('held', '?')} held, "
             f"{spool.get('leased', '?')} leased"]
    for route, t in s.get("engine", {}).get("routes", {}).items():
        state = "DOWN" if t.get("down") else (f"PAUSED {t['paused_for']}s" if t.get("paused_for") else "up")
        parts.append(
            f"{route} {state}, window {t.get('window')}/{t.get('max_connections')}, "
            f"{t.get('active')} running, {t.get('waiting')} waiting, {t.get('delivered')} delivered, "
            f"{t.get('deferred')} deferred, {t.get('back_pressure')} back-pressure"
            + (f"; last: {t['last_reply']}" if t.get("last_reply") else "")
        )
    return "; ".join(parts)


def compact_state(node: str, s: dict | None, route: str) -> str:
    """The route of example.com on one node, in a few words."""
    if s is None:
        return f"{node}: no /status"
    t = s.get("engine", {}).get("routes", {}).get(route)
    if t is None:
        return f"{node}: idle"
    state = "DOWN" if t.get("down") else (f"PAUSED {float(t['paused_for']):.0f}s" if t.get("paused_for") else "up")
    return (f"{node}: {state}, window {t.get('window')}/{t.get('max_connections')}, "
            f"{t.get('active')} running, {t.get('waiting')} waiting")


def operator_view(hub: Hub, label: str, t0: float) -> dict:
    """What ``mailhub status`` and ``mailhub queue list`` print now."""
    st = hub.cli("status", "--config", hub.config)
    ql = hub.queue("list", "--limit", "0")
    lines = (st.stdout.strip() or st.stderr.strip()).splitlines()
    lines.append("queue list: " + (ql.stdout.strip().splitlines() or [ql.stderr.strip()])[0])
    return {"at": round(time.monotonic() - t0, 1), "phase": label, "lines": lines}


# The senders


def message(tag: str, run_id: str) -> tuple[str, bytes]:
    rcpt = f"{tag}@{DOMAIN}"
    body = "".join(f"line {i:03d} of the body of {tag}, a message of the outage bench\r\n" for i in range(16))
    text = (
        f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}.{run_id}@bench.test>\r\nDate: {formatdate(localtime=False)}\r\n"
        f"\r\n{body}"
    )
    return rcpt, text.encode()


def send(port: int, items: list[tuple[str, str, bytes]], tries: int = 6) -> tuple[list[str], list[str]]:
    """
    Send ``(tag, rcpt, data)`` over one connection (reconnecting as needed),
    retrying a 4xx like an MTA; returns the tags answered 250 and the refused ones.
    """
    accepted: list[str] = []
    refused: list[str] = []
    conn: smtplib.SMTP | None = None
    for tag, rcpt, data in items:
        for attempt in range(tries):
            try:
                if conn is None:
                    conn = smtplib.SMTP("127.0.0.1", port, local_hostname="source.test", timeout=60)
                conn.sendmail(SENDER, [rcpt], data)
                accepted.append(tag)
                break
            except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as e:
                code = getattr(e, "smtp_code", None)
                if code is None and isinstance(e, smtplib.SMTPRecipientsRefused):
                    code = next(iter(e.recipients.values()))[0]
                if code is not None and 400 <= code < 500 and attempt < tries - 1:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                refused.append(f"{tag}: {e}")
                break
            except (smtplib.SMTPException, OSError) as e:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
                conn = None
                if attempt < tries - 1:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                refused.append(f"{tag}: {e}")
    if conn is not None:
        try:
            conn.quit()
        except Exception:
            conn.close()
    return accepted, refused


def send_many(ports: list[int], tags: list[str], run_id: str, threads: int = 8, per_connection: int = 50) -> tuple[list[str], list[str], float]:
    items = [(tag, *message(tag, run_id)) for tag in tags]
    chunks = [items[i : i + per_connection] for i in range(0, len(items), per_connection)]
    t0 = time.monotonic()
    accepted: list[str] = []
    refused: list[str] = []
    with ThreadPoolExecutor(threads) as pool:
        for a, r in pool.map(lambda ic: send(ports[ic[0] % len(ports)], ic[1]), enumerate(chunks)):
            accepted += a
            refused += r
    return accepted, refused, time.monotonic() - t0


# The release, through the store's public API (like ``mailhub queue release``)


def release_helper(config_path: str) -> int:
    """``outage.py --release-held CONFIG`` < ids: ``release_held`` each id, like ``mailhub queue release``."""
    from twisted.internet import defer, task

    from mailhub.config import load
    from mailhub.plugin import load_plugin

    ids = json.load(sys.stdin)
    out: dict[str, int] = {}

    async def run(reactor: Any) -> None:
        config = load(config_path)
        store = load_plugin("mailhub.stores", config.store["plugin"]).make(config.plugin_section("store"), reactor)
        sem = defer.DeferredSemaphore(32)
        try:
            found = await defer.gatherResults(
                [sem.run(store.release_held, i, reactor.seconds()) for i in ids], consumeErrors=True
            )
            out["released"] = sum(1 for f in found if f)
        finally:
            await store.close()

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    return 0  # not reached: react exits


def export_commit(rev: str, dest: str) -> str:
    """``git archive REV`` of the repository into ``dest``; returns ``dest``."""
    os.makedirs(dest)
    repo = os.path.dirname(HERE)
    archive = subprocess.run(["git", "-C", repo, "archive", "--format=tar", rev], capture_output=True)
    if archive.returncode != 0:
        raise BenchError(f"git archive {rev} failed: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return dest


# One run


class Scenario:
    def __init__(self, args: argparse.Namespace, store: str, rx: Reactor, reference: bool) -> None:
        self.args = args
        self.store = store
        self.rx = rx
        self.reference = reference
        self.limit = args.limit
        self.run_id = os.urandom(4).hex()
        self.t0 = time.monotonic()
        self.views: list[dict] = []
        self.notes: list[str] = []
        self.result: dict[str, Any] = {"store": store, "run": "reference" if reference else "outage"}

    def say(self, text: str) -> None:
        print(f"  [{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    def view(self, hub: Hub, label: str) -> None:
        v = operator_view(hub, label, self.t0)
        self.views.append(v)
        for line in v["lines"]:
            self.say(f"    | {line}")

    def run(self, workdir: str) -> dict:
        args, rx = self.args, self.rx
        down = rx.call(make_downstream, rx.reactor, self.limit, "downstream.test")
        dsn = rx.call(make_downstream, rx.reactor, 10**6, "dsn.test")
        route_port = rx.call(down.start, 0)
        dsn_port = rx.call(dsn.start, 0)
        rx.call(lambda: setattr(down, "mode", "down"))
        per_node = args.reference_max_connections if self.reference else self.limit
        hub = Hub(workdir, self.store, route_port, dsn_port, per_node)
        self.result["hub_max_connections_per_node"] = per_node
        try:
            hub.setup()
            hub.start()
            self.say(f"hub up ({self.store}, {'2 processes' if self.store == 'redis' else '1 process, 2 nodes'}), "
                     f"max_connections = {per_node} per node, server limit {self.limit}")
            return self._phases(hub, down, dsn)
        except BaseException:
            self.say(f"hub log tail:\n  {hub.log_tail()}")
            raise
        finally:
            hub.destroy(keep=args.keep)
            rx.call(down.stop)
            rx.call(dsn.stop)

    def _phases(self, hub: Hub, down: Any, dsn: Any) -> dict:
        args, rx, res = self.args, self.rx, self.result
        ports = list(hub.smtp_ports.values())

        # 1. down: spool the backlog
        tags = [f"outage-{i}" for i in range(args.messages)]
        accepted, refused, secs = send_many(ports, tags, self.run_id)
        self.say(f"phase 1 (server down): {len(accepted)}/{len(tags)} accepted (250) in {secs:.1f} s")
        if refused:
            self.notes.append(f"{len(refused)} outage messages not accepted, e.g. {refused[0]}")
        res["accepted_outage"] = len(accepted)
        kind = dict.fromkeys(accepted, "outage")

        def settled() -> bool:
            hub.check_alive()
            s = hub.status(NODES[0])
            spool = (s or {}).get("spool", {})
            return spool.get("entries", 0) >= len(accepted) and spool.get("leased", 1) == 0

        wait_for(settled, 120, "every outage entry deferred", interval=0.5)
        self.view(hub, "server down, backlog spooled")

        if self.reference:
            return self._reference_drain(hub, down, dsn, kind)

        # 2. rejecting: the rebuilt server; storm mail arrives meanwhile
        def rejecting() -> None:
            down.known_users = set()
            down.mode = "accept"
            down.restart_measures()

        rx.call(rejecting)
        t_storm = time.monotonic()
        self.say("phase 2: server back, rejecting every recipient (550 5.1.1)")
        storm_tags = [f"storm-{i}" for i in range(args.storm_messages)]
        storm_done: dict[str, Any] = {}

        def storm() -> None:
            a_all: list[str] = []
            r_all: list[str] = []
            gap = 3.0 / max(1, len(storm_tags))
            for i, tag in enumerate(storm_tags):
                time.sleep(gap)
                a, r = send(ports[i % len(ports)], [(tag, *message(tag, self.run_id))])
                a_all += a
                r_all += r
            storm_done.update(accepted=a_all, refused=r_all)

        st = threading.Thread(target=storm, daemon=True)
        st.start()
        st.join(120)
        if not storm_done:
            raise BenchError("the storm messages were not sent within 120 s")
        self.say(f"phase 2: {len(storm_done['accepted'])}/{len(storm_tags)} storm messages accepted")
        if storm_done["refused"]:
            self.notes.append(f"{len(storm_done['refused'])} storm messages not accepted, e.g. {storm_done['refused'][0]}")
        for tag in storm_done["accepted"]:
            kind[tag] = "storm"
        res["accepted_storm"] = len(storm_done["accepted"])

        # Let a few retry rounds run; then until the held count is stable.
        last: tuple = ()
        stable_since = time.monotonic()
        while True:
            time.sleep(1)
            s = hub.status(NODES[0]) or {}
            spool = s.get("spool", {})
            now_counts = (spool.get("entries"), spool.get("held"))
            if now_counts != last:
                last, stable_since = now_counts, time.monotonic()
            elapsed = time.monotonic() - t_storm
            if elapsed >= args.storm_seconds and time.monotonic() - stable_since >= 3:
                break
            if elapsed >= args.storm_seconds + 60:
                self.notes.append("the spool's counts were still changing 60 s into the rejecting phase")
                break
        res["storm_phase"] = {
            "seconds": round(time.monotonic() - t_storm, 1),
            "rejections_550": down.rejections,
            "peak_connections": down.peak_connections,
            "dsns_so_far": len(dsn.received),
        }
        self.say(f"phase 2 after {res['storm_phase']['seconds']} s: server gave {down.rejections} x 550, "
                 f"{len(dsn.received)} DSNs so far")
        self.view(hub, "server rejecting everything")

        # 3. fixed, behind a connection limit
        def fixed() -> None:
            down.known_users = None
            down.max_concurrent_connections = self.limit
            down.restart_measures()

        rx.call(fixed)
        self.say(f"phase 3: server fixed, {self.limit} connections at most (452 4.3.1 at MAIL above)")
        t_fix = time.monotonic()

        # 4. release the held entries, then flush
        t_release = time.monotonic()
        release = self._release(hub)
        res["release"] = release
        self.say(f"phase 4: released {release['released']} held entries ({release['how']}) in "
                 f"{release['seconds']:.1f} s; flush: {release['flush']}")

        # 5. drain
        return self._drain(hub, down, dsn, kind, t_release, t_fix)

    def _release(self, hub: Hub) -> dict:
        t = time.monotonic()
        help_text = hub.queue("release", "--help").stdout
        out: dict[str, Any] = {}
        ids = [e["id"] for e in hub.spool(held=True)]
        if "--all" in help_text:
            res = hub.queue("release", "--all")
            if res.returncode != 0:
                raise BenchError(f"mailhub queue release --all failed: {res.stderr.strip()}")
            out.update(how="mailhub queue release --all", released=len(ids), output=res.stdout.strip()[-300:])
        else:
            # The operator's tool, one id at a time, for a sample; the rest
            # with the same store call in one process (``release_held``).
            sample = ids[: self.args.cli_releases]
            t_cli = time.monotonic()
            for i in sample:
                r = hub.queue("release", i)
                if r.returncode != 0:
                    raise BenchError(f"mailhub queue release {i} failed: {r.stderr.strip()}")
            cli_secs = time.monotonic() - t_cli
            rest = ids[len(sample):]
            if rest:
                r = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--release-held", hub.config],
                    input=json.dumps(rest), capture_output=True, text=True, timeout=600,
                )
                if r.returncode != 0:
                    raise BenchError(f"releasing through the store failed: {r.stderr.strip()[-600:]}")
            per = cli_secs / len(sample) if sample else 0.0
            out.update(
                how=(f"no 'release --all': 'mailhub queue release ID' for {len(sample)} "
                     f"({per:.2f} s each), the other {len(rest)} through the store's release_held"),
                released=len(ids),
                cli_seconds_each=round(per, 3),
                operator_estimate_seconds=round(per * len(ids), 1),
            )
        out["left_held"] = len(hub.spool(held=True))
        f = hub.queue("flush")
        out["flush"] = (f.stdout.strip().splitlines() or [f.stderr.strip()])[0]
        out["seconds"] = round(time.monotonic() - t, 2)
        return out

    def _reference_drain(self, hub: Hub, down: Any, dsn: Any, kind: dict[str, str]) -> dict:
        def healthy() -> None:
            down.known_users = None
            down.max_concurrent_connections = self.limit
            down.mode = "accept"
            down.restart_measures()

        t_up = time.monotonic()
        self.rx.call(healthy)
        f = hub.queue("flush")
        self.say(f"reference: server up and healthy (limit {self.limit}); flush: "
                 f"{(f.stdout.strip().splitlines() or [f.stderr.strip()])[0]}")
        return self._drain(hub, down, dsn, kind, t_up, t_up)

    def _drain(self, hub: Hub, down: Any, dsn: Any, kind: dict[str, str], t_start: float, t_fix: float) -> dict:
        args, res = self.args, self.result
        accepted = set(kind)
        deadline = t_start + args.timeout
        next_view = time.monotonic() + args.status_every
        samples: list[dict] = []
        drained = False
        while time.monotonic() < deadline:
            hub.check_alive()
            delivered = {t for t in (self._tag(m) for m, _ in down.received) if t}
            bounced = self._bounced(dsn)
            if accepted <= (delivered | bounced):
                drained = True
                break
            if time.monotonic() >= next_view:
                next_view += args.status_every
                sample = {
                    "at": round(time.monotonic() - t_start, 1),
                    "delivered": len(delivered & accepted),
                    "open_at_server": down.active_connections,
                    "nodes": [route_line(n, hub.status(n)) for n in NODES],
                }
                samples.append(sample)
                states = "; ".join(compact_state(n, hub.status(n), hub.route) for n in NODES)
                sample["compact"] = states
                self.say(f"drain +{sample['at']:.0f}s: {sample['delivered']}/{len(accepted)} delivered, "
                         f"{sample['open_at_server']} open at the server, {down.deferrals} x 452 so far | {states}")
            time.sleep(0.05)
        t_end = time.monotonic()
        # Attempts still in flight (waiting for a slot, say) could deliver
        # again what is already delivered: wait until no node has any, then count.
        settle_deadline = time.monotonic() + args.settle
        in_flight: dict[str, Any] = {}
        while True:
            in_flight = {n: (hub.status(n) or {}).get("engine", {}).get("in_flight") for n in NODES}
            if all(v == 0 for v in in_flight.values()) or time.monotonic() >= settle_deadline:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # late duplicates and DSNs
        late = sum(1 for _, ts in down.received if ts > t_end)
        res["after_drain"] = {
            "seconds": round(time.monotonic() - t_end, 1),
            "in_flight": in_flight,
            "deliveries": late,
        }
        if any(v for v in in_flight.values()):
            self.notes.append(f"attempts still in flight {time.monotonic() - t_end:.0f} s after the drain: {in_flight}")
        if late:
            self.notes.append(f"{late} deliveries after the drain ended (attempts still in flight then)")
        self.view(hub, "end" if drained else f"timeout after {args.timeout:.0f} s")

        tags = [self._tag(m) for m, _ in down.received]
        ids = [self._message_id(m) for m, _ in down.received]
        delivered = {t for t in tags if t}
        last = max((ts for (m, ts) in down.received if self._tag(m) in accepted), default=t_start)
        bounced = self._bounced(dsn)
        spool = hub.spool()
        in_spool: dict[str, bool] = {}
        for e in spool:
            for r in e.get("recipients", []):
                tag = r["address"].split("@")[0]
                if tag in accepted:
                    in_spool[tag] = bool(e.get("held"))
        outage = {t for t, k in kind.items() if k == "outage"}
        storm = {t for t, k in kind.items() if k == "storm"}
        lost = accepted - delivered - bounced - set(in_spool)
        res.update(
            accepted=len(accepted),
            delivered=len(delivered & accepted),
            deliveries=len(ids),
            duplicates=len(ids) - len(set(ids)),
            bounced_outage=len(bounced & outage),
            bounced_storm=len(bounced & storm),
            dsns=len(dsn.received),
            dsn_reasons=self._dsn_reasons(dsn),
            delivered_and_bounced=len(delivered & bounced),
            lost=len(lost),
            lost_examples=sorted(lost)[:5],
            in_spool=len(in_spool),
            held_in_spool=sum(in_spool.values()),
            drained=drained,
            drain_seconds=round((last if drained else t_end) - t_start, 2),
            drain_from="the flush (server up)" if self.reference else "the release",
            seconds_from_fix=round((last if drained else t_end) - t_fix, 2),
            limit=self.limit,
            peak_connections=down.peak_connections,
            seconds_above_limit=round(down.above(), 2),
            server_452s=down.deferrals,
            status_samples=samples,
            operator_views=self.views,
            notes=self.notes,
        )
        return res

    @staticmethod
    def _tag(raw: bytes) -> str | None:
        m = MESSAGE_ID.search(raw.split(b"\r\n\r\n", 1)[0])
        if m is None:
            return None
        t = TAG.search(b"<" + m.group(1) + b">") or TAG.search(m.group(1))
        return t.group(1).decode().lower() if t else None

    @staticmethod
    def _message_id(raw: bytes) -> str:
        m = MESSAGE_ID.search(raw.split(b"\r\n\r\n", 1)[0])
        return m.group(1).decode(errors="replace") if m else f"(none:{hash(raw)})"

    @staticmethod
    def _dsn_reasons(dsn: Any) -> dict[str, int]:
        reasons: dict[str, int] = {}
        for raw, _ in list(dsn.received):
            for m in re.findall(rb"^Diagnostic-Code:[ \t]*([^\r\n]*)", raw, re.IGNORECASE | re.MULTILINE):
                text = re.sub(r"<[^>]*>", "<...>", m.decode(errors="replace"))[:100]
                reasons[text] = reasons.get(text, 0) + 1
        return reasons

    @staticmethod
    def _bounced(dsn: Any) -> set[str]:
        out: set[str] = set()
        for raw, _ in list(dsn.received):
            out.update(t.decode().lower() for t in TAG.findall(raw))
        return out


# The report


def report(results: list[dict], args: argparse.Namespace) -> tuple[str, bool]:
    lines: list[str] = []
    ok = True
    w = lines.append
    w("")
    w(f"outage bench: {args.messages} messages spooled while the server is down, "
      f"{args.storm_messages} arriving while it rejects everything, server limit {args.limit} connections")
    for r in results:
        if r.get("error"):
            w(f"\n== {r['store']} / {r['run']}: FAILED: {r['error']}")
            ok = False
            continue
        ref = r["run"] == "reference"
        w("")
        w(f"== {r['store']} / {r['run']} (hub max_connections {r['hub_max_connections_per_node']} per node, 2 nodes)")
        w(f"accepted           {r['accepted']} ({r.get('accepted_outage', 0)} outage"
          + ("" if ref else f", {r.get('accepted_storm', 0)} storm") + ")")
        w(f"delivered          {r['delivered']} unique ({r['deliveries']} deliveries, {r['duplicates']} duplicates)")
        w(f"bounced            {r['bounced_outage']} outage, {r['bounced_storm']} storm ({r['dsns']} DSNs received"
          + (f"; {r['delivered_and_bounced']} both delivered and bounced" if r["delivered_and_bounced"] else "") + ")")
        for reason, n in r.get("dsn_reasons", {}).items():
            w(f"  bounce reason    {n} x {reason}")
        w(f"lost               {r['lost']}" + (f" (e.g. {', '.join(r['lost_examples'])})" if r["lost"] else ""))
        w(f"left in spool      {r['in_spool']} ({r['held_in_spool']} held)")
        w(f"peak connections   {r['peak_connections']} (limit {r['limit']}); {r['seconds_above_limit']} s above the limit")
        w(f"452s               {r['server_452s']}")
        w(f"drain              {r['drain_seconds']} s from {r['drain_from']}"
          + ("" if r["drained"] else " — NOT DRAINED before the timeout")
          + ("" if ref else f" ({r['seconds_from_fix']} s from the fix)"))
        ad = r.get("after_drain")
        if ad:
            w(f"after the drain    {ad['deliveries']} more deliveries in {ad['seconds']} s; attempts in flight "
              f"then: {', '.join(f'{n} {v}' for n, v in ad['in_flight'].items())}")
        if not ref:
            sp = r.get("storm_phase", {})
            w(f"rejecting phase    {sp.get('seconds')} s: {sp.get('rejections_550')} x 550 from the server, "
              f"peak {sp.get('peak_connections')} connections, {sp.get('dsns_so_far')} DSNs by its end")
            rel = r.get("release", {})
            w(f"release            {rel.get('released')} entries: {rel.get('how')}; {rel.get('seconds')} s"
              + (f"; one by one with the CLI that would be ~{rel['operator_estimate_seconds']} s"
                 if "operator_estimate_seconds" in rel else ""))
        for note in r.get("notes", []):
            w(f"note               {note}")
        w("what the operator saw:")
        for v in r["operator_views"]:
            w(f"  at {v['at']} s, {v['phase']}:")
            for line in v["lines"]:
                w(f"    {line}")
        if r["status_samples"]:
            w("  during the drain (GET /status of each node):")
            samples = r["status_samples"]
            step = max(1, -(-len(samples) // 12))
            for s in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
                w(f"    +{s['at']} s: {s['delivered']} delivered, {s['open_at_server']} open at the server | "
                  f"{s.get('compact', '')}")
        failures = []
        if r["lost"]:
            failures.append(f"{r['lost']} messages lost")
        if r["bounced_outage"] or r["bounced_storm"]:
            failures.append(f"{r['bounced_outage']} outage and {r['bounced_storm']} storm messages bounced")
        if failures:
            ok = False
            w("CORRECTNESS FAILURE: " + "; ".join(failures))
    w("")
    w("summary")
    w(f"{'store':8} {'run':10} {'acc':>5} {'deliv':>5} {'dup':>4} {'bounce':>6} {'lost':>4} {'spool':>5} "
      f"{'peak':>4} {'>lim s':>7} {'452s':>5} {'drain s':>8} {'ratio':>6}")
    by = {(r["store"], r["run"]): r for r in results if not r.get("error")}
    for r in results:
        if r.get("error"):
            w(f"{r['store']:8} {r['run']:10} FAILED")
            continue
        ref = by.get((r["store"], "reference"))
        ratio = ""
        if r["run"] == "outage" and ref and ref["drained"] and ref["drain_seconds"] > 0:
            ratio = f"{r['drain_seconds'] / ref['drain_seconds']:.1f}x" + ("" if r["drained"] else "+")
            r["ratio_to_reference"] = round(r["drain_seconds"] / ref["drain_seconds"], 2)
        w(f"{r['store']:8} {r['run']:10} {r['accepted']:5} {r['delivered']:5} {r['duplicates']:4} "
          f"{r['bounced_outage'] + r['bounced_storm']:6} {r['lost']:4} {r['in_spool']:5} "
          f"{r['peak_connections']:4} {r['seconds_above_limit']:7} {r['server_452s']:5} "
          f"{str(r['drain_seconds']) + ('' if r['drained'] else '+'):>8} {ratio:>6}")
    w("(ratio: drain of the outage run / drain of the reference run, same store; '+': not drained by the timeout)")
    w("")
    w("RESULT: " + ("no mail lost, no outage or storm mail bounced" if ok else "CORRECTNESS FAILURE (see above)"))
    return "\n".join(lines), ok


def main() -> int:
    p = argparse.ArgumentParser(description="The outage scenario of issue 11 against a real hub, with a report.")
    p.add_argument("--store", choices=("sqlite", "redis", "both"), default="both")
    p.add_argument("--messages", type=int, default=2000, help="messages spooled while the server is down")
    p.add_argument("--storm-messages", type=int, default=20, help="messages arriving while it rejects everything")
    p.add_argument("--limit", type=int, default=3, help="the server's connection limit (452 4.3.1 above it)")
    p.add_argument("--reference-max-connections", type=int, default=None,
                   help="the hub's max_connections in the reference run (default: limit // 2, at least 1: "
                        "the nodes together within the limit, max_connections being per node)")
    p.add_argument("--storm-seconds", type=float, default=10.0, help="at least this long rejecting everything")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for each drain")
    p.add_argument("--cli-releases", type=int, default=20,
                   help="without 'release --all': release this many with the CLI, one by one, and time them")
    p.add_argument("--settle", type=float, default=120.0,
                   help="after the drain, wait up to this long for the nodes' attempts in flight to end "
                        "(they could deliver again), then count duplicates")
    p.add_argument("--status-every", type=float, default=10.0, help="seconds between /status samples in a drain")
    p.add_argument("--no-reference", action="store_true", help="skip the reference runs")
    p.add_argument("--commit", help="run the hub (and the CLI) from this commit of the repository, exported with "
                   "git archive into the work directory, instead of the working tree")
    p.add_argument("--keep", action="store_true", help="keep the work directories (logs, spools)")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--release-held", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.release_held:
        return release_helper(args.release_held)
    if args.reference_max_connections is None:
        args.reference_max_connections = max(1, args.limit // len(NODES))
    stores = ["sqlite", "redis"] if args.store == "both" else [args.store]

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    results: list[dict] = []
    top = tempfile.mkdtemp(prefix="mailhub-outage-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    commit = subprocess.run(
        ["git", "-C", HERE, "rev-parse", "--short", args.commit or "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if args.commit:
        try:
            code = export_commit(args.commit, os.path.join(top, "code"))
        except BenchError as e:
            shutil.rmtree(top, ignore_errors=True)
            print(f"bench/outage.py: {e}", file=sys.stderr)
            return 2
        # Every subprocess (twistd, mailhub, the release helper) and this
        # process's DownstreamServer import mailhub from there.
        os.environ["PYTHONPATH"] = code + os.pathsep + os.environ.get("PYTHONPATH", "")
        sys.path.insert(0, code)
        commit += " (exported)"
    else:
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        commit += " + uncommitted changes" if dirty else ""
    print(f"bench/outage.py {' '.join(sys.argv[1:])}  ({started}, commit {commit or '?'}, {os.cpu_count()} CPUs)", flush=True)
    rx = Reactor()
    try:
        for store in stores:
            runs = [False] if args.no_reference else [False, True]
            for reference in runs:
                sc = Scenario(args, store, rx, reference)
                print(f"\n{store} / {sc.result['run']}", flush=True)
                try:
                    results.append(sc.run(os.path.join(top, f"{store}-{sc.result['run']}")))
                except BenchError as e:
                    print(f"  FAILED: {e}", flush=True)
                    results.append({**sc.result, "error": str(e)})
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", flush=True)
        return 130
    finally:
        rx.stop()
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)
        else:
            print(f"work directories kept in {top}")
    text, ok = report(results, args)
    print(text, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "started": started, "commit": commit, "results": results}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""
The LiveArchive's page speed (issue 13, item 3): the mailbox, a search and a
message on a mailbox of 100,000 messages, over real HTTP.  Nothing here
asserts a time; it prints p50/p95/max per page kind.

    .venv/bin/python bench/web.py                                # sqlite, 100,000 messages, 200 requests a kind
    .venv/bin/python bench/web.py --keep                         # keep the archive (its path is printed) ...
    .venv/bin/python bench/web.py --archive /var/tmp/.../archive.db   # ... and time it again without filling
    .venv/bin/python bench/web.py --plugin postgresql            # a private PostgreSQL (mailhub.testing.postgres_server)

The archive is filled through the plugin's public API (``IArchive.add``,
``IAccountStore.add_account``) with the messages of ``bench/archive.py``'s
``Corpus`` (Zipf-distributed words, subjects, outside senders, a year of
received times), every one of them for one mailbox; a third of them are
made ``multipart/alternative`` with an HTML part (paragraphs, a table, a
link, a remote image) and those the corpus gives attachments carry them
(2-20 KB, base64).  The hub is started as users start it,
``twistd -n --pidfile= mailhub --config FILE``, with that archive, a node
``web`` listener on 127.0.0.1 and ``[web] secret_file``; ``retention_days``
is long enough that the year of mail is not expired under the benchmark.

The client is this process (``http.client``, one keep-alive connection,
the session cookie of one login), one request at a time: latency, not
throughput.  The kinds, shuffled together so machine noise spreads over
all of them:

- ``mailbox``: ``/mail``, page 1;
- ``deep``: page ~100 (the ``Older messages`` links followed 95-105 times,
  those pages timed apart as ``walk``);
- ``search-*``: ``/mail?q=``: a rare word, the ~50 % word, ``from:`` a
  frequent outside sender, ``subject:`` a frequent word, ``after:``/``before:``
  30 days apart;
- ``message-plain``, ``message-html``: ``/mail/msg/ID`` of random messages of
  the mailbox; ``body-html``: the HTML's frame (``/mail/msg/ID/body``),
  which a browser loads with the page.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import archive as corpus_bench  # noqa: E402  (bench/archive.py: the corpus and the fill)
from common import free_port, stop_process, wait_for  # noqa: E402

from mailhub.archive.accounts import hash_password  # noqa: E402
from mailhub.model import Account, ArchivedMessage  # noqa: E402

VENV_BIN = os.path.dirname(sys.executable)
PASSWORD = "bench password 1234"
SEED = 13
KINDS = {
    "mailbox": "/mail, page 1",
    "deep": "/mail, page ~100 (cursor links followed untimed)",
    "walk": "/mail, pages 2-~100 on the way to 'deep'",
    "search-rare": "q = a word in ~0.05 % of messages",
    "search-common": "q = the ~50 % word",
    "search-from": "q = from: a frequent outside sender's surname",
    "search-subject": "q = subject: a frequent word",
    "search-range": "q = after: and before: 30 days apart",
    "message-plain": "/mail/msg/ID, a text/plain message",
    "message-html": "/mail/msg/ID, a multipart/alternative message with HTML",
    "body-html": "/mail/msg/ID/body, the HTML's sandboxed frame",
}
HEADLINE = ("mailbox", "deep", "search", "message")


# -- the messages ---------------------------------------------------------------------------


def is_html(i: int) -> bool:
    return i % 3 == 0


def message(corpus: Any, i: int) -> ArchivedMessage:
    """Message ``i`` of the corpus, with an HTML alternative (a third) and its attachments as parts."""
    m = corpus.message(i)
    head, _, body = m.message.decode().partition("\r\n\r\n")
    rng = random.Random(SEED * 1_000_003 + i)
    head += f"\r\nDate: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime(m.text.date))}\r\nMIME-Version: 1.0"
    text = body.rstrip("\r\n")
    plain = f"Content-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
    if is_html(i):
        sentences = [s.strip() for s in text.split(".") if s.strip()]
        paragraphs = "".join(f"<p>{s}.</p>\r\n" for s in sentences)
        rows = "".join(
            f"<tr><td>{w}</td><td align=\"right\">{rng.randrange(10000)}</td></tr>" for w in text.split()[:6]
        )
        html = (
            "<!doctype html><html><head><style>p{margin:0 0 1em}</style></head><body>\r\n"
            f"<div style=\"font-family:Arial\">{paragraphs}"
            f"<table border=\"1\" cellpadding=\"4\">{rows}</table>\r\n"
            f"<p><a href=\"https://www.ext{i % 400}.example/account?id={i}\">Your account</a></p>\r\n"
            f"<img src=\"https://cdn.ext{i % 400}.example/logo.png\" alt=\"logo\" width=\"120\">\r\n"
            "</div></body></html>\r\n"
        )
        b = f"alt{i:x}"
        content = (
            f"Content-Type: multipart/alternative; boundary=\"{b}\"\r\n\r\n"
            f"--{b}\r\n{plain}--{b}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}--{b}--\r\n"
        )
    else:
        content = plain
    if m.text.attachments:
        b = f"mix{i:x}"
        parts = [f"--{b}\r\n{content}"]
        for name in m.text.attachments:
            data = base64.encodebytes(rng.randbytes(rng.randint(2000, 20000))).decode().replace("\n", "\r\n")
            parts.append(
                f"--{b}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Disposition: attachment; filename=\"{name}\"\r\n"
                f"Content-Transfer-Encoding: base64\r\n\r\n{data}"
            )
        content = f"Content-Type: multipart/mixed; boundary=\"{b}\"\r\n\r\n" + "".join(parts) + f"--{b}--\r\n"
    return attrs.evolve(m, message=f"{head}\r\n{content}".encode())


class _Corpus:
    """``bench/archive.py``'s corpus, its messages made MIME as above (what ``fill`` calls)."""

    def __init__(self, corpus: Any) -> None:
        self._corpus = corpus
        self.messages = corpus.messages

    def message(self, i: int) -> ArchivedMessage:
        return message(self._corpus, i)


# -- the archive and the hub ------------------------------------------------------------------


async def build(reactor: Any, target: Any, corpus: Any, fresh: bool) -> dict[str, Any]:
    """Fill the archive (unless reused) and add the mailbox's account."""
    out: dict[str, Any] = {}
    if fresh:
        target.fresh()
    archive = target.open(reactor)
    try:
        if fresh:
            out["fill"] = await corpus_bench.fill(archive, _Corpus(corpus), target.window)
        address = corpus.mailboxes[corpus.big]
        password_hash = await defer.Deferred.fromCoroutine(_hash())
        if await archive.account(address) is None:
            await archive.add_account(Account(address, password_hash))
        else:
            await archive.update_account(attrs.evolve(await archive.account(address), password_hash=password_hash))
    finally:
        await archive.close()
    return out


async def _hash() -> str:
    from twisted.internet.threads import deferToThread

    return str(await deferToThread(hash_password, PASSWORD))


def hub_config(workdir: Path, archive: str, web_port: int, smtp_port: int, domain: str) -> Path:
    text = f"""\
[hub]
hostname = "mx.hub.test"
outbound = "smtp:127.0.0.1:9"

[store]
plugin = "sqlite"
path = "spool.db"

[archive]
{archive}
# The corpus is a year of mail: none of it may expire under the benchmark.
retention_days = 36500

[policy]
plugin = "standard"

[web]
secret_file = "web-secret"

[nodes.dallas]
smtp = "tcp:{smtp_port}:interface=127.0.0.1"
web = "tcp:{web_port}:interface=127.0.0.1"

[domains."{domain}"]
route = "smtp:127.0.0.1:9"
"""
    path = workdir / "hub.toml"
    path.write_text(text)
    return path


class Hub:
    def __init__(self, workdir: Path, config: Path, port: int) -> None:
        self.dir, self.config, self.port = workdir, config, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        argv = [os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "--logfile", str(self.dir / "hub.log"),
                "mailhub", "--config", str(self.config)]
        started = time.monotonic()
        with open(self.dir / "twistd.out", "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.proc.returncode}: see {self.dir}/hub.log")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                c.getresponse().read()
                c.close()
                return True
            except OSError:
                return False

        wait_for(ready, 120, "the hub's web listener")
        return time.monotonic() - started

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=60)
            self.proc = None


# -- the client ------------------------------------------------------------------------------------


class Client:
    """One keep-alive connection with the session cookie; ``get`` returns (ms, status, body)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def _cookie_header(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())

    def request(self, method: str, path: str, body: str | None = None) -> tuple[float, int, str, Any]:
        headers = {"Cookie": self._cookie_header()} if self.cookies else {}
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        started = time.perf_counter()
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            raise
        elapsed = (time.perf_counter() - started) * 1000
        for name, value in response.getheaders():
            if name.lower() == "set-cookie":
                key, _, rest = value.partition("=")
                v = rest.split(";", 1)[0]
                if v:
                    self.cookies[key.strip()] = v
                else:
                    self.cookies.pop(key.strip(), None)
        return elapsed, response.status, data.decode("utf-8", "replace"), response

    def get(self, path: str) -> tuple[float, int, str]:
        elapsed, status, text, _ = self.request("GET", path)
        return elapsed, status, text

    def login(self, address: str) -> None:
        _, _, page = self.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        if token is None:
            raise RuntimeError("no CSRF token on /login")
        form = urllib.parse.urlencode({"csrf": token.group(1), "address": address, "password": PASSWORD, "code": ""})
        _, status, _, response = self.request("POST", "/login", form)
        if status != 303 or response.getheader("location") != "/mail":
            raise RuntimeError(f"login failed: {status}")


_NEXT = re.compile(r'<p class="more"><a href="([^"]+)">Older messages</a>')


def older(page: str) -> str | None:
    found = _NEXT.search(page)
    return found.group(1).replace("&amp;", "&") if found else None


def plan(corpus: Any, requests: int) -> list[tuple[str, str]]:
    """The timed requests: (kind, path), seeded and shuffled."""
    rng = random.Random(SEED)
    mailbox = urllib.parse.quote(str(corpus.mailboxes[corpus.big]))
    out: list[tuple[str, str]] = []
    top = corpus.vocab[:20]

    def q(text: str) -> str:
        return f"/mail?mailbox={mailbox}&q={urllib.parse.quote(text)}"

    for _ in range(requests):
        out.append(("mailbox", "/mail"))
        out.append(("search-rare", q(rng.choice(corpus.rare))))
        out.append(("search-common", q(corpus.common)))
        outside = corpus.outside[min(int(rng.expovariate(1 / 10)), 199)][0].split()[1]
        out.append(("search-from", q(f"from:{outside}")))
        out.append(("search-subject", q(f"subject:{rng.choice(top)}")))
        after = corpus_bench.START + rng.random() * (corpus_bench.YEAR - 31 * 86400)
        day = time.strftime("%Y-%m-%d", time.gmtime(after))
        until = time.strftime("%Y-%m-%d", time.gmtime(after + 30 * 86400))
        out.append(("search-range", q(f"after:{day} before:{until}")))
        for kind, html in (("message-plain", False), ("message-html", True), ("body-html", True)):
            while True:
                i = rng.randrange(corpus.messages)
                if is_html(i) == html:
                    break
            ident = urllib.parse.quote(corpus.message(i).id, safe="")
            suffix = "/body" if kind == "body-html" else ""
            out.append((kind, f"/mail/msg/{ident}{suffix}?mailbox={mailbox}"))
    for _ in range(max(3, requests // 20)):
        # (a smaller mailbox, as in a quick run: about its middle page)
        out.append(("deep", str(min(rng.randint(95, 105), corpus.messages // corpus_bench.PAGE // 2))))
    rng.shuffle(out)
    return out


def run_plan(client: Client, requests: Sequence[tuple[str, str]]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for n, (kind, path) in enumerate(requests):
        if kind == "deep":
            _, status, page = client.get("/mail")
            for _ in range(int(path)):
                nxt = older(page)
                if nxt is None:
                    raise RuntimeError("the mailbox ended before the deep page")
                elapsed, status, page = client.get(nxt)
                times.setdefault("walk", []).append(elapsed)
            nxt = older(page)
            assert nxt is not None
            elapsed, status, page = client.get(nxt)
        else:
            elapsed, status, page = client.get(path)
        if status != 200:
            raise RuntimeError(f"{kind} {path}: {status} {page[:300]}")
        if kind.startswith("message") and "<h1" not in page:
            raise RuntimeError(f"{kind} {path}: not a message page")
        times.setdefault(kind, []).append(elapsed)
        if (n + 1) % 200 == 0:
            print(f"  {n + 1}/{len(requests)} requests", file=sys.stderr, flush=True)
    return times


# -- the report ----------------------------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p95": corpus_bench._pct(values, 95),
        "max": max(values),
    }


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {kind: stats(times[kind]) for kind in KINDS if kind in times}
    for group in HEADLINE:
        values = [v for kind, vs in times.items() if kind.split("-")[0] == group and kind != "walk" for v in vs]
        if values:
            out[f"all {group}"] = stats(values)
    out["overall"] = stats([v for kind, vs in times.items() if kind != "walk" for v in vs])
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| page | n | p50 ms | p95 ms | max ms | p95 < 100 ms |", "|---|---:|---:|---:|---:|:---:|"]
    for kind, f in summary.items():
        what = KINDS.get(kind, "")
        ok = "yes" if f["p95"] < 100 else "**no**"
        lines.append(
            f"| {kind}{' (' + what + ')' if what else ''} | {f['n']:.0f} | {f['p50']:.1f} | {f['p95']:.1f} | {f['max']:.1f} | {ok} |"
        )
    return "\n".join(lines)


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


class SqliteAt:
    """An existing sqlite archive file (``--archive``)."""

    name = "sqlite"
    window = 2000

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dir = path.parent

    def open(self, reactor: Any) -> Any:
        from mailhub.plugin import load_plugin

        return load_plugin("mailhub.archives", "sqlite").make({"path": str(self.path)}, reactor)

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob(self.path.name + "*"))

    def stop(self, keep: bool) -> None:
        pass


async def main(reactor: Any, args: argparse.Namespace) -> None:
    base = Path(args.workdir) / "mailhub-web-bench"
    base.mkdir(parents=True, exist_ok=True)
    corpus = corpus_bench.Corpus(args.messages, args.mailboxes, args.messages)
    address = str(corpus.mailboxes[corpus.big])
    target: Any
    fresh = True
    if args.archive:
        target, fresh = SqliteAt(Path(args.archive).resolve()), False
    elif args.plugin == "sqlite":
        target = corpus_bench.SqliteTarget(base)
    else:
        target = corpus_bench.PostgresTarget(base, args.pool_size)
    hub: Hub | None = None
    results: dict[str, Any] = {"args": vars(args), "mailbox": address}
    try:
        print(f"== {'filling' if fresh else 'reusing'} the archive ({args.plugin}): {args.messages:,} messages for {address}",
              file=sys.stderr, flush=True)
        results.update(await build(reactor, target, corpus, fresh))
        if "fill" in results:
            f = results["fill"]
            print(f"  filled in {f['seconds']:.0f} s ({f['rate']:,.0f} msg/s)", file=sys.stderr, flush=True)
        if args.plugin == "postgresql" and not args.archive:
            target.analyze()
            archive_table = f'plugin = "postgresql"\ndsn = "{target.dsn}"\npool_size = {args.pool_size}'
        else:
            path = target.path if isinstance(target, SqliteAt) else target.dir / "archive.db"
            archive_table = f'plugin = "sqlite"\npath = "{path}"'
        results["archive_bytes"] = target.size()
        hub_dir = base / "hub"
        shutil.rmtree(hub_dir, ignore_errors=True)
        hub_dir.mkdir(parents=True)
        port = free_port()
        config = hub_config(hub_dir, archive_table, port, free_port(), corpus.mailboxes[corpus.big].domain)
        hub = Hub(hub_dir, config, port)
        results["hub_start_seconds"] = hub.start()
        print(f"  twistd up in {results['hub_start_seconds']:.1f} s (pid {hub.proc.pid if hub.proc else '?'})",
              file=sys.stderr, flush=True)
        client = Client(port)
        client.login(address)
        requests = plan(corpus, args.requests)
        # Warm up: the OS's cache and SQLite's after a fill or a reuse.
        run_plan(client, [r for r in requests if r[0] != "deep"][:50])
        results["load_before"] = _load()
        started = time.time()
        times = run_plan(client, requests)
        results["seconds"] = time.time() - started
        results["load_after"] = _load()
        results["times"] = times
    finally:
        if hub is not None:
            hub.stop()
        target.stop(args.keep)
    results["summary"] = summarise(times)
    text = report(results, args, corpus, target)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.keep or args.archive:
        print(f"archive kept: {getattr(target, 'path', target.dir / 'archive.db')}")
    else:
        shutil.rmtree(base, ignore_errors=True)


def report(results: dict[str, Any], args: argparse.Namespace, corpus: Any, target: Any) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "mailhub/web", "plugins"], capture_output=True, text=True,
                           cwd=Path(__file__).parent.parent).stdout.strip()
    s = results["summary"]
    lines = [
        f"# mailhub LiveArchive page speed, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"commit {commit}{' (mailhub/web or plugins modified)' if dirty else ''}, {platform.node()},"
        f" {os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"archive: {args.plugin}, {args.messages:,} messages all for {results['mailbox']}"
        f" ({args.mailboxes} mailboxes named, a tenth of the messages also for a colleague),"
        f" {results['archive_bytes'] / 1e6:,.0f} MB"
        + (f"; filled in {results['fill']['seconds']:.0f} s" if "fill" in results else " (reused)"),
        f"hub: twistd mailhub, one node, web on 127.0.0.1; started in {results['hub_start_seconds']:.1f} s",
        f"client: http.client in another process, one keep-alive connection, one request at a time;"
        f" {args.requests} requests a kind ({max(3, args.requests // 20)} deep pages), in {results['seconds']:.0f} s",
        f"load before: {results['load_before']}",
        f"load after:  {results['load_after']}",
        "",
        table(s),
        "",
        "target: p95 < 100 ms for the mailbox, a search and a message: "
        + ", ".join(f"{g} {s[f'all {g}']['p95']:.1f} ms" for g in HEADLINE if f"all {g}" in s)
        + f"; overall p50 {s['overall']['p50']:.1f}, p95 {s['overall']['p95']:.1f}, max {s['overall']['max']:.1f} ms",
    ]
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--plugin", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--messages", type=int, default=100_000, help="in the one mailbox")
    p.add_argument("--mailboxes", type=int, default=100, help="mailboxes named in To: (a tenth of the mail is also theirs)")
    p.add_argument("--requests", type=int, default=200, help="timed requests per page kind")
    p.add_argument("--workdir", default="/var/tmp", help="where the archive and the hub live (a real disk)")
    p.add_argument("--archive", help="an existing sqlite archive file (of a --keep run with the same --messages)")
    p.add_argument("--pool-size", type=int, default=4, help="the postgresql plugin's pool_size")
    p.add_argument("--keep", action="store_true", help="keep the archive")
    p.add_argument("--json", help="write the raw results here")
    args = p.parse_args(argv)
    if args.archive:
        args.plugin = "sqlite"
    return args


if __name__ == "__main__":
    arguments = parse()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))

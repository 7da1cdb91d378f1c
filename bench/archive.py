"""
The archive's figures (issue 12): search latency on a large archive, and
write throughput while it fills.  Nothing here asserts a time; it prints.

    .venv/bin/python bench/archive.py                          # both plugins, 1,000,000 messages
    .venv/bin/python bench/archive.py --plugin sqlite --messages 200000
    .venv/bin/python bench/archive.py --keep ... ; ... --reuse   # fill once, search many times

The archive is filled through the plugin's public API only
(``IArchivePlugin.make``, ``IArchive.add``), many ``add`` calls in flight so
the plugin can group its commits, with its durability as configured (the
``sqlite`` plugin: WAL, ``synchronous=FULL``; ``postgresql``: a private
server from ``mailhub.testing.postgres_server``, ``fsync`` and
``synchronous_commit`` on).  The messages are made from a seeded vocabulary
whose words are drawn with a Zipf distribution (the word of rank r with
probability proportional to 1/r): subjects of 3-8 words, senders from a pool
of outside people (also Zipf), ``To:`` text naming the mailboxes, bodies of
50-300 words, attachments on 15 %, received times spread over one year in
order, as a live archive grows.  ``--mailboxes`` mailboxes in 10 domains;
``--big-mailbox`` of the messages are for one mailbox, the others for one
of the rest at random, a tenth of them for a second mailbox of its domain
too.

Then a fixed, seeded mix of searches runs one at a time (latency, not
throughput), shuffled so that machine noise spreads over every kind, in
three scopes: an ordinary mailbox (a different one each time), a domain,
and the big mailbox.  The kinds are listed in ``KINDS``; ``deep500`` walks
499 pages (limit 50) untimed and times the 500th.  Each kind runs
``--queries`` times per scope (``deep*``: at most 3).  The report gives
p50/p95/max per kind and scope, and overall.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from mailhub.model import Address, ArchivedMessage, ArchiveQuery, ArchiveScope, ArchiveText
from mailhub.plugin import load_plugin

#: 2026-01-01 00:00 UTC: the archive holds the year that follows.
START = 1_767_225_600.0
YEAR = 365 * 86400.0
DOMAINS = 10
PAGE = 50
SEED = 12

KINDS: dict[str, str] = {
    "empty": "no condition, page 1",
    "deep500": "no condition, page 500 (499 pages walked untimed)",
    "deep500-common": "the ~50 % word, page 500",
    "rare": "a word in ~0.05 % of messages",
    "common": "a word in ~50 % of messages",
    "very-common": "a word in ~90 % of messages",
    "prefix": "the first three letters of a word (matches many words)",
    "phrase": "two frequent words in a row",
    "from": "from: a frequent outside sender's surname",
    "to": "to: a colleague's surname",
    "subject": "subject: a frequent word",
    "range": "after: and before: 30 days apart",
    "attachment": "has:attachment",
    "combo-common-att": "the ~50 % word and has:attachment",
    "combo-from-range": "the ~90 % word, from: and a 90-day range",
    "combo-rare-common": "a rare word and the ~50 % word",
    "count-empty": "count, no condition",
    "count-rare": "count of a rare word",
    "count-common": "count of the ~50 % word",
    "count-very-common": "count of the ~90 % word",
}
SCOPES = ("mailbox", "domain", "big")


# -- the corpus ------------------------------------------------------------------------


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    """``size`` made-up words, none the start of another (so a word's share is its own)."""
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    made: set[str] = set()
    while len(made) < size * 1.5:
        made.add("".join(rng.choice(syllables) for _ in range(rng.choice((2, 2, 3, 3, 3, 4)))))
    ordered = sorted(made)
    free = [w for w, after in zip(ordered, ordered[1:] + [""], strict=True) if not after.startswith(w)]
    rng.shuffle(free)
    return free[:size]


def _share(p: float, low: int = 50, high: int = 300) -> float:
    """The expected share of messages (bodies of ``low``-``high`` words) that hold a word of probability ``p``."""
    q = 1.0 - p
    n = high - low + 1
    return 1.0 - q**low * (1.0 - q**n) / ((1.0 - q) * n)


FIRST = "anna ben carla david eva frank greta hugo iris jonas kira leon maja nils olga paul rosa sven tara ulf vera walter xenia yann zoe".split()
LAST = "adler becker conrad dietz engel fischer graf hahn imhof jung keller lange meyer neumann otto peters quast richter schulz thiel urban vogel weber zander".split()


class Corpus:
    """The messages of the archive, the same for a given seed and size."""

    def __init__(self, messages: int, mailboxes: int, big: int, seed: int = SEED) -> None:
        rng = random.Random(seed)
        self.seed = seed
        self.messages = messages
        self.vocab = _vocabulary(rng, 40000)
        h = sum(1.0 / (r + 1) for r in range(len(self.vocab)))
        self.p = [1.0 / ((r + 1) * h) for r in range(len(self.vocab))]
        self.cum = list(itertools.accumulate(self.p))
        shares = [_share(p) for p in self.p]

        def nearest(target: float) -> int:
            return min(range(len(shares)), key=lambda r: abs(shares[r] - target))

        self.very_common = self.vocab[nearest(0.90)]
        self.common = self.vocab[nearest(0.50)]
        self.shares = shares
        rare_rank = nearest(0.0005)
        self.rare = self.vocab[rare_rank : rare_rank + 200]
        self.domains = [f"corp{d}.example" for d in range(DOMAINS)]
        self.mailboxes: list[Address] = []
        self.names: list[str] = []
        used: set[str] = set()
        for k in range(mailboxes):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            local = f"{first}.{last}"
            while local in used:
                local = f"{first}.{last}{rng.randrange(100)}"
            used.add(local)
            self.mailboxes.append(Address(local, self.domains[k % DOMAINS]))
            self.names.append(f"{first.title()} {last.title()}")
        self.by_domain = {d: [k for k in range(mailboxes) if k % DOMAINS == i] for i, d in enumerate(self.domains)}
        self.outside = []
        for k in range(5000):
            first, last = rng.choice(FIRST), f"{rng.choice(self.vocab[:3000])}{rng.choice(LAST)}"
            self.outside.append((f"{first.title()} {last.title()}", f"{first}.{last}@ext{k % 400}.example"))
        hs = sum(1.0 / (r + 1) for r in range(len(self.outside)))
        self.outside_cum = list(itertools.accumulate(1.0 / ((r + 1) * hs) for r in range(len(self.outside))))
        big = min(big, messages)
        self.big = 0  # the big mailbox is mailbox 0, of domain 0
        self.big_indexes = set(random.Random(seed + 1).sample(range(messages), big)) if big else set()

    def _words(self, rng: random.Random, n: int) -> list[str]:
        return rng.choices(self.vocab, cum_weights=self.cum, k=n)

    def message(self, i: int) -> ArchivedMessage:
        rng = random.Random(self.seed * 1_000_003 + i)
        received_at = START + YEAR * i / self.messages + rng.random() * 30
        if i in self.big_indexes:
            first = self.big
        else:
            first = rng.randrange(1, len(self.mailboxes))
        boxes = [first]
        if rng.random() < 0.1:
            same = self.by_domain[self.mailboxes[first].domain]
            other = same[rng.randrange(len(same))]
            if other not in (first, self.big):
                boxes.append(other)
        name, address = self.outside[bisect.bisect_left(self.outside_cum, rng.random() * self.outside_cum[-1])]
        words = self._words(rng, rng.randint(50, 300))
        for at in range(12, len(words), rng.randint(8, 16)):
            words[at] += "."
        body = " ".join(words)
        subject = " ".join(self._words(rng, rng.randint(3, 8))).capitalize()
        to = ", ".join(f"{self.names[k]} <{self.mailboxes[k]}>" for k in boxes)
        attachments: tuple[str, ...] = ()
        if rng.random() < 0.15:
            attachments = tuple(
                f"{self._words(rng, 1)[0]}-{rng.randrange(1000)}.{rng.choice(('pdf', 'docx', 'xlsx', 'png'))}"
                for _ in range(rng.randint(1, 2))
            )
        message_id = f"{i}.{rng.getrandbits(40):x}@ext.example"
        data = (
            f"From: {name} <{address}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{message_id}>\r\n\r\n{body}\r\n"
        ).encode()
        text = ArchiveText(
            subject=subject,
            sender=f"{name} <{address}>",
            recipients=to,
            body=body,
            attachments=attachments,
            message_id=message_id,
            date=received_at - 5,
        )
        return ArchivedMessage(
            id=f"{rng.getrandbits(64):016x}",
            received_at=received_at,
            sender=Address(*address.split("@")),
            mailboxes=tuple(self.mailboxes[k] for k in boxes),
            message=data,
            text=text,
        )


# -- the searches ----------------------------------------------------------------------


def plan(corpus: Corpus, repeats: int) -> list[tuple[str, str, ArchiveScope, ArchiveQuery]]:
    """The searches: (kind, scope class, scope, query), seeded and shuffled."""
    rng = random.Random(SEED + 2)
    out = []
    top = corpus.vocab[:20]
    mid = corpus.vocab[200:2000]
    for scope_class in SCOPES:
        for kind in KINDS:
            n = min(repeats, 3) if kind.startswith("deep") else repeats
            if kind.startswith("deep") and scope_class == "mailbox":
                continue  # an ordinary mailbox has fewer than 500 pages
            for _ in range(n):
                if scope_class == "mailbox":
                    k = rng.randrange(1, len(corpus.mailboxes))
                    scope = ArchiveScope(mailbox=corpus.mailboxes[k])
                    domain = corpus.mailboxes[k].domain
                elif scope_class == "domain":
                    domain = rng.choice(corpus.domains)
                    scope = ArchiveScope(domain=domain)
                else:
                    scope = ArchiveScope(mailbox=corpus.mailboxes[corpus.big])
                    domain = corpus.mailboxes[corpus.big].domain
                after = START + rng.random() * (YEAR - 91 * 86400)
                rare = rng.choice(corpus.rare)
                colleague = corpus.names[rng.choice(corpus.by_domain[domain])].split()[1]
                outside = corpus.outside[min(int(rng.expovariate(1 / 10)), 199)][0].split()[1]
                q = {
                    "empty": ArchiveQuery(),
                    "deep500": ArchiveQuery(),
                    "deep500-common": ArchiveQuery(words=(corpus.common,)),
                    "rare": ArchiveQuery(words=(rare,)),
                    "common": ArchiveQuery(words=(corpus.common,)),
                    "very-common": ArchiveQuery(words=(corpus.very_common,)),
                    "prefix": ArchiveQuery(words=(rng.choice(mid)[:3],)),
                    "phrase": ArchiveQuery(phrases=(f"{rng.choice(top)} {rng.choice(top)}",)),
                    "from": ArchiveQuery(sender=(outside,)),
                    "to": ArchiveQuery(recipient=(colleague,)),
                    "subject": ArchiveQuery(subject=(rng.choice(top),)),
                    "range": ArchiveQuery(after=after, before=after + 30 * 86400),
                    "attachment": ArchiveQuery(has_attachment=True),
                    "combo-common-att": ArchiveQuery(words=(corpus.common,), has_attachment=True),
                    "combo-from-range": ArchiveQuery(
                        words=(corpus.very_common,), sender=(outside,), after=after, before=after + 90 * 86400
                    ),
                    "combo-rare-common": ArchiveQuery(words=(rare, corpus.common)),
                    "count-empty": ArchiveQuery(),
                    "count-rare": ArchiveQuery(words=(rare,)),
                    "count-common": ArchiveQuery(words=(corpus.common,)),
                    "count-very-common": ArchiveQuery(words=(corpus.very_common,)),
                }[kind]
                out.append((kind, scope_class, scope, q))
    rng.shuffle(out)
    return out


async def run_searches(archive: Any, searches: Sequence[tuple[str, str, ArchiveScope, ArchiveQuery]]) -> dict[str, Any]:
    times: dict[str, dict[str, list[float]]] = {}
    hits: dict[str, dict[str, list[int]]] = {}
    for n, (kind, scope_class, scope, query) in enumerate(searches):
        cursor = None
        if kind.startswith("deep"):
            for _ in range(499):
                page = await archive.search(scope, query, cursor, PAGE)
                cursor = page.next
                if cursor is None:
                    break
            if cursor is None:
                print(f"  {kind} {scope}: fewer than 500 pages", file=sys.stderr)
                continue
        started = time.perf_counter()
        if kind.startswith("count"):
            found = await archive.count(scope, query)
        else:
            page = await archive.search(scope, query, cursor, PAGE)
            found = len(page.items)
        elapsed = (time.perf_counter() - started) * 1000
        times.setdefault(kind, {}).setdefault(scope_class, []).append(elapsed)
        hits.setdefault(kind, {}).setdefault(scope_class, []).append(found)
        if (n + 1) % 200 == 0:
            print(f"  {n + 1}/{len(searches)} searches", file=sys.stderr, flush=True)
    return {"ms": times, "found": hits}


def _pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))]


def summarise(times: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, by_scope in times.items():
        for scope_class, values in by_scope.items():
            out.setdefault(kind, {})[scope_class] = {
                "n": len(values),
                "p50": statistics.median(values),
                "p95": _pct(values, 95),
                "max": max(values),
            }
    for label, keep in (
        ("all searches", lambda k: not k.startswith("count")),
        ("all counts", lambda k: k.startswith("count")),
    ):
        for scope_class in (*SCOPES, "all"):
            values = [
                v
                for kind, by_scope in times.items()
                if keep(kind)
                for s, vs in by_scope.items()
                if scope_class in ("all", s)
                for v in vs
            ]
            if values:
                out.setdefault(label, {})[scope_class] = {
                    "n": len(values),
                    "p50": statistics.median(values),
                    "p95": _pct(values, 95),
                    "max": max(values),
                }
    return out


def table(summary: dict[str, Any]) -> str:
    head = "| kind | " + " | ".join(f"{s} p50 | p95 | max" for s in SCOPES) + " |"
    lines = [head, "|---|" + "---:|" * (3 * len(SCOPES))]
    for kind in [*KINDS, "all searches", "all counts"]:
        if kind not in summary:
            continue
        cells = []
        for s in SCOPES:
            f = summary[kind].get(s)
            cells += [f"{f['p50']:.1f}", f"{f['p95']:.1f}", f"{f['max']:.1f}"] if f else ["", "", ""]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    for label in ("all searches", "all counts"):
        f = summary.get(label, {}).get("all")
        if f:
            lines.append(f"{label}, every scope: p50 {f['p50']:.1f} ms, p95 {f['p95']:.1f} ms, max {f['max']:.1f} ms (n={f['n']})")
    return "\n".join(lines)


# -- the fill ----------------------------------------------------------------------------


async def fill(archive: Any, corpus: Corpus, window: int) -> dict[str, Any]:
    slots = defer.DeferredSemaphore(window)
    errors: list[Any] = []
    started = last = time.perf_counter()
    marks = []
    step = max(1, corpus.messages // 10)
    for i in range(corpus.messages):
        await slots.acquire()
        d = archive.add(corpus.message(i))
        d.addErrback(errors.append)
        d.addBoth(lambda _: slots.release())
        if (i + 1) % step == 0:
            now = time.perf_counter()
            marks.append({"messages": i + 1, "seconds": now - started, "rate": step / (now - last)})
            print(
                f"  {i + 1:,} added, {step / (now - last):,.0f} msg/s over the last {step:,}",
                file=sys.stderr,
                flush=True,
            )
            last = now
    while slots.tokens < window:
        await task.deferLater(_reactor(), 0.01, lambda: None)
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} adds failed, the first: {errors[0]}")
    return {"messages": corpus.messages, "seconds": seconds, "rate": corpus.messages / seconds, "marks": marks}


def generator_rate(corpus: Corpus, n: int = 3000) -> float:
    started = time.perf_counter()
    for i in range(n):
        corpus.message(i)
    return n / (time.perf_counter() - started)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# -- the plugins ---------------------------------------------------------------------------


def _plugin(name: str, module_path: str | None) -> Any:
    """
    The plugin ``name``, or the ``plugin`` of the module at ``module_path``
    (another version of it): one file, or a package's directory (or its
    ``__init__.py``), whose modules import each other relatively.
    """
    if not module_path:
        return load_plugin("mailhub.archives", name)
    import importlib.util
    import sys

    path = Path(module_path)
    if path.is_dir():
        path = path / "__init__.py"
    module_name = f"bench_{name}_archive"
    if path.name == "__init__.py":
        spec = importlib.util.spec_from_file_location(
            module_name, path, submodule_search_locations=[str(path.parent)]
        )
    else:
        spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # for the package's relative imports
    spec.loader.exec_module(module)
    return module.plugin


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


class SqliteTarget:
    name = "sqlite"
    window = 2000

    def __init__(self, base: Path, module: str | None = None) -> None:
        self.dir = base / "sqlite"
        self.module = module

    def fresh(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def open(self, reactor: Any) -> Any:
        plugin = _plugin("sqlite", self.module)
        return plugin.make({"path": str(self.dir / "archive.db")}, reactor)

    def size(self) -> int:
        return _du(self.dir)

    def config(self) -> str:
        return "WAL, synchronous=FULL (the plugin's own settings)"

    def stop(self, keep: bool) -> None:
        pass


class PostgresTarget:
    name = "postgresql"
    window = 400

    def __init__(
        self, base: Path, pool_size: int, module: str | None = None, settings: dict[str, str] | None = None
    ) -> None:
        self.dir = base / "postgresql"
        self.module = module
        self.pool_size = pool_size
        self.settings = settings or {}
        self.server: Any = None
        self.dsn = ""

    def fresh(self) -> None:
        from mailhub.testing.postgres_server import PostgresServer

        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        tempfile.tempdir = str(self.dir.parent)  # the cluster on the work directory's disk
        self.server = PostgresServer.start(self.dir, settings=self.settings)
        self.dsn = self.server.create_database("archive")
        (self.dir / "dsn").write_text(self.dsn)

    def reuse(self) -> bool:
        import psycopg

        try:
            self.dsn = (self.dir / "dsn").read_text()
            psycopg.connect(self.dsn, connect_timeout=3).close()
            return True
        except Exception:
            return False

    def open(self, reactor: Any) -> Any:
        return _plugin("postgresql", self.module).make(
            {"dsn": self.dsn, "pool_size": self.pool_size}, reactor
        )

    def size(self) -> int:
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            return int(row[0]) if row else 0

    def config(self) -> str:
        import psycopg

        # What the server runs with (a --reuse run finds it as it was started).
        with psycopg.connect(self.dsn) as conn:
            shown = ", ".join(
                f"{name}={conn.execute(f'SHOW {name}').fetchone()[0]}"  # type: ignore[index]
                for name in ("fsync", "synchronous_commit", "shared_buffers")
            )
        return f"PostgreSQL from mailhub.testing.postgres_server ({shown}), pool_size={self.pool_size}"

    def analyze(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")

    def stop(self, keep: bool) -> None:
        if self.server is not None and not keep:
            self.server.stop()


# -- main ------------------------------------------------------------------------------------


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


async def bench_one(reactor: Any, target: Any, corpus: Corpus, args: argparse.Namespace) -> dict[str, Any]:
    print(f"== {target.name}", file=sys.stderr, flush=True)
    meta_path = target.dir / "bench.json"
    wanted = {"messages": args.messages, "mailboxes": args.mailboxes, "big": args.big_mailbox, "seed": SEED}
    result: dict[str, Any] = {}
    reused = False
    if args.reuse and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("corpus") == wanted and (not hasattr(target, "reuse") or target.reuse()):
            reused = True
            result["fill"] = meta["fill"]
            print("  reusing the filled archive", file=sys.stderr)
    if not reused:
        target.fresh()
        fill_config = target.config()
        archive = target.open(reactor)
        result["load_before_fill"] = _load()
        try:
            result["fill"] = await fill(archive, corpus, target.window)
        finally:
            await archive.close()
        result["fill"]["load_after"] = _load()
        result["fill"]["config"] = fill_config
        if hasattr(target, "analyze"):
            started = time.perf_counter()
            target.analyze()
            result["fill"]["vacuum_analyze_seconds"] = time.perf_counter() - started
        result["fill"]["bytes"] = target.size()
        meta_path.write_text(json.dumps({"corpus": wanted, "fill": result["fill"]}))
    # As the searches run (a reused archive may have been filled with other settings).
    result["config"] = target.config()
    result["fill"].setdefault("config", "not recorded")
    print(f"  {result['config']}", file=sys.stderr, flush=True)
    f = result["fill"]
    print(
        f"  fill: {f['messages']:,} messages in {f['seconds']:.0f} s = {f['rate']:,.0f} msg/s;"
        f" {f['bytes'] / 1e9:.2f} GB",
        file=sys.stderr,
        flush=True,
    )
    archive = target.open(reactor)
    try:
        searches = plan(corpus, args.queries)
        # Warm up (the caches after a fill are warm already; after --reuse they are not).
        await run_searches(archive, searches[: min(50, len(searches))])
        result["load_before_searches"] = _load()
        measured = await run_searches(archive, searches)
        result["load_after_searches"] = _load()
    finally:
        await archive.close()
    result["searches"] = measured
    result["summary"] = summarise(measured["ms"])
    return result


def report(results: dict[str, Any], args: argparse.Namespace, corpus: Corpus) -> str:
    lines = [
        f"# mailhub archive benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"commit {results['commit']}, {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"archive: {args.messages:,} messages, {args.mailboxes:,} mailboxes in {DOMAINS} domains,"
        f" the big mailbox {min(args.big_mailbox, args.messages):,}; pages of {PAGE};"
        f" {args.queries} searches per kind and scope (deep pages: {min(args.queries, 3)})",
        f"words: ~90 % {corpus.very_common!r} (expected {corpus.shares[corpus.vocab.index(corpus.very_common)]:.2f}),"
        f" ~50 % {corpus.common!r}, rare: ranks near {corpus.vocab.index(corpus.rare[0])}",
        "",
    ]
    for name, r in results["plugins"].items():
        f = r["fill"]
        lines += [
            f"## {name}: {r['config']}",
            f"fill: {f['messages']:,} messages in {f['seconds']:.0f} s = {f['rate']:,.0f} msg/s"
            f" (per tenth: {', '.join(format(m['rate'], ',.0f') for m in f['marks'])});"
            f" on disk {f['bytes'] / 1e9:.2f} GB; load after the fill: {f.get('load_after', '?')};"
            f" filled with: {f.get('config', 'not recorded')}",
            f"searches, ms (load before: {r['load_before_searches']}; after: {r['load_after_searches']})",
            "",
            table(r["summary"]),
            "",
        ]
        found = r["searches"]["found"]
        lines.append(
            "found in the big mailbox (median): "
            + ", ".join(
                f"{k} {statistics.median(found[k]['big']):,.0f}"
                for k in ("count-empty", "count-rare", "count-common", "count-very-common")
                if "big" in found.get(k, {})
            )
        )
        lines.append("")
    return "\n".join(lines)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    base = Path(args.workdir) / "mailhub-archive-bench"
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    corpus = Corpus(args.messages, args.mailboxes, args.big_mailbox)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "plugins/"], capture_output=True, text=True, cwd=Path(__file__).parent.parent
    ).stdout.strip()
    results: dict[str, Any] = {
        "commit": commit + (" (plugins modified)" if dirty else ""),
        "args": vars(args),
        "generator_rate": generator_rate(corpus),
        "plugins": {},
    }
    print(f"generating messages alone: {results['generator_rate']:,.0f} msg/s", file=sys.stderr)
    targets: list[Any] = []
    if args.plugin in ("sqlite", "both"):
        targets.append(SqliteTarget(base, args.plugin_module))
    if args.plugin in ("postgresql", "both"):
        settings = dict(args.pg_setting)
        targets.append(PostgresTarget(base, args.pool_size, args.plugin_module, settings))
    for target in targets:
        try:
            results["plugins"][target.name] = await bench_one(reactor, target, corpus, args)
        finally:
            target.stop(args.keep)
    text = report(results, args, corpus)
    print(text)
    print(f"generating messages alone (reactor thread): {results['generator_rate']:,.0f} msg/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


def _setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. shared_buffers=4GB)")
    return name, value


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--plugin", choices=("sqlite", "postgresql", "both"), default="both")
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--mailboxes", type=int, default=1_000)
    p.add_argument("--big-mailbox", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=20, help="searches per kind and scope")
    p.add_argument("--workdir", default="/var/tmp", help="where the archives live (a real disk)")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--pool-size", type=int, default=4, help="the postgresql plugin's pool_size")
    p.add_argument(
        "--pg-setting",
        action="append",
        default=[],
        type=_setting,
        metavar="NAME=VALUE",
        help="a setting for the PostgreSQL server a fresh run starts (shared_buffers=4GB); repeatable",
    )
    p.add_argument(
        "--plugin-module",
        help="the plugin from this file or package directory instead (an A/B run with --reuse)",
    )
    p.add_argument("--keep", action="store_true", help="keep the archives (and the PostgreSQL server running)")
    p.add_argument("--reuse", action="store_true", help="search an archive a --keep run left, if of the same size")
    return p.parse_args(argv)


def run(argv: Sequence[str] | None = None, react: Callable[..., Any] = task.react) -> None:
    args = parse(argv)
    react(lambda reactor: defer.ensureDeferred(main(reactor, args)))


if __name__ == "__main__":
    run()

"""
mailhub against Postfix, side by side, on this machine.

    .venv/bin/python bench/run.py                # default: 10,000 messages, 3 rounds
    .venv/bin/python bench/run.py --quick        # a smoke run: small counts, 1 round
    .venv/bin/python bench/run.py --full         # P3 with 100,000 and P4 with 1,000,000 entries

Needs root (Postfix runs a private instance) and Debian's ``postfix`` package
(``smtp-source``, ``smtp-sink``, ``postfix``, ``postqueue``).  See bench/README.md
for what each figure means and how both systems are configured.

Figures (ratio > 1 means mailhub is better):
  P1 ingest   16 sessions, downstream down: messages accepted per second.
  P2 relay    16 sessions, downstream up: messages per second, accepted to
              counted at the sink.
  P3 drain    N deferred, then the downstream comes up and the operator
              flushes: seconds until the sink has all N.  Also the restart time
              (to the SMTP greeting) and memory (PSS) with N deferred.
  P4 scale    mailhub only (Postfix has no spool-store API; its queue is files
              and its restart does not read them): claim latency with a small
              vs a large spool, restart time and RSS with the large spool.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from common import BenchError, Sink, free_port, parallel_smtp_source, rss_mb
from hub import HubInstance, TwistedSinkInstance, store_plugins
from postfix import PostfixInstance, postfix_version

SESSIONS = 16


def parse_size(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    if t.endswith("k"):
        mult, t = 1024, t[:-1]
    elif t.endswith("m"):
        mult, t = 1024 * 1024, t[:-1]
    return int(float(t) * mult)


def size_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def pss_mb(pids: list[int]) -> float:
    """Proportional set size summed over processes (shared pages split), MB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total / 1024.0


# -- systems ---------------------------------------------------------------


class System:
    """A factory for fresh instances of one system under test."""

    def __init__(self, name: str, make: Callable[[str, int, int], Any], is_hub: bool,
                 figures: frozenset[str] = frozenset({"P1", "P2", "P3", "P4"})) -> None:
        self.name = name
        self._make = make
        self.is_hub = is_hub
        #: The figures it takes part in (a reference that relays nothing has only P1).
        self.figures = figures

    def make(self, base: str, sink_port: int, concurrency: int) -> Any:
        workdir = tempfile.mkdtemp(prefix=f"{self.name}-", dir=base)
        return self._make(workdir, sink_port, concurrency)


def build_systems(args: argparse.Namespace) -> list[System]:
    systems = [
        System("postfix", lambda d, s, c: PostfixInstance(d, free_port(), s, c), False),
        # A reference, not a mail server: what one Twisted process takes when it stores nothing.
        System("twisted-sink", lambda d, s, c: TwistedSinkInstance(d, free_port()), True, frozenset({"P1"})),
        System(
            "mailhub-sqlite-1node",
            lambda d, s, c: HubInstance(d, [free_port()], s, c, "sqlite"),
            True,
        ),
        System(
            "mailhub-sqlite-1node-noarchive",
            lambda d, s, c: HubInstance(d, [free_port()], s, c, "sqlite", archive=False),
            True,
        ),
        System(
            "mailhub-sqlite-1node-inprocess",
            lambda d, s, c: HubInstance(
                d, [free_port()], s, c, "sqlite", archive_options="processes = 0\n", suffix="-inprocess"
            ),
            True,
        ),
        System(
            "mailhub-sqlite-2node",
            lambda d, s, c: HubInstance(d, [free_port(), free_port()], s, c, "sqlite"),
            True,
        ),
    ]
    if "redis" in store_plugins() and shutil.which("redis-server"):
        systems += [
            System(
                "mailhub-redis-1node",
                lambda d, s, c: HubInstance(d, [free_port()], s, c, "redis"),
                True,
            ),
            System(
                "mailhub-redis-1node-noarchive",
                lambda d, s, c: HubInstance(d, [free_port()], s, c, "redis", archive=False),
                True,
            ),
            # The two-site shape: one twistd per node over one Redis, the load split across them.
            System(
                "mailhub-redis-2proc-noarchive",
                lambda d, s, c: HubInstance(d, [free_port(), free_port()], s, c, "redis", archive=False, processes=2),
                True,
            ),
            # The same, every write also confirmed by a replica (WAIT 1).
            System(
                "mailhub-redis-2proc-replica-noarchive",
                lambda d, s, c: HubInstance(
                    d, [free_port(), free_port()], s, c, "redis", archive=False, processes=2, replica=True
                ),
                True,
            ),
        ]
    if args.systems:
        wanted = set(args.systems.split(","))
        unknown = wanted - {s.name for s in systems}
        if unknown:
            raise SystemExit(f"unknown or unavailable systems: {', '.join(sorted(unknown))}")
        systems = [s for s in systems if s.name in wanted]
    return systems


# -- the figures -------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_ingest(system: System, args: argparse.Namespace, size: int, out: dict[str, float]) -> None:
    """P1: downstream down (nothing listens on the route's port)."""
    inst = system.make(args.workdir, free_port(), args.connections)
    try:
        inst.setup()
        inst.start()
        t0 = time.monotonic()
        secs = parallel_smtp_source(inst.ports, args.messages, SESSIONS, size, args.timeout)
        out["P1"] = args.messages / secs
        if getattr(inst, "archive", False):
            # The archive works behind the 250: how long until it has every message.
            inst.wait_archived(args.timeout)
            out["P1archived"] = args.messages / (time.monotonic() - t0)
    finally:
        inst.destroy()


def run_relay(system: System, args: argparse.Namespace, size: int, out: dict[str, float]) -> None:
    """P2: downstream up; end to end, from the first connection to the last message at the sink."""
    sink = Sink(free_port()).start()
    inst = system.make(args.workdir, sink.port, args.connections)
    try:
        inst.setup()
        inst.start()
        t0 = time.monotonic()
        accepted = parallel_smtp_source(inst.ports, args.messages, SESSIONS, size, args.timeout)
        out["P2accept"] = args.messages / accepted
        end = sink.wait_count(args.messages, args.timeout)
        out["P2"] = args.messages / (end - t0)
        if getattr(inst, "archive", False):
            # As in P1: the archive works behind the 250, so its pace is a figure of its own.
            inst.wait_archived(args.timeout)
            out["P2archived"] = args.messages / (time.monotonic() - t0)
    finally:
        inst.destroy()
        sink.stop()


def run_drain(system: System, args: argparse.Namespace, size: int, out: dict[str, float]) -> None:
    """
    P3: fill N entries with the downstream down, wait until every one has had
    its first attempt and is deferred, restart the system (timed, and its
    memory measured with N deferred), bring the downstream up, flush, time
    until the sink has all N.
    """
    sink_port = free_port()
    inst = system.make(args.workdir, sink_port, args.connections)
    sink = Sink(sink_port)
    n = args.drain
    try:
        inst.setup()
        inst.start()
        t0 = time.monotonic()
        parallel_smtp_source(inst.ports, n, SESSIONS, size, args.timeout)
        out["P3fill"] = time.monotonic() - t0
        inst.wait_deferred(n, args.timeout)
        out["P3settle"] = time.monotonic() - t0
        inst.stop()
        out["P3restart"] = inst.start()
        time.sleep(2)
        out["P3mem"] = pss_mb(inst.pids())
        sink.start()
        t0 = time.monotonic()
        inst.flush()
        end = sink.wait_count(n, args.timeout)
        out["P3"] = end - t0
    finally:
        inst.destroy()
        sink.stop()


def run_scale(system: System, args: argparse.Namespace, out: dict[str, float]) -> None:
    """P4 (mailhub only): claim latency small vs large spool; restart and RSS with the large one."""
    for label, n in (("small", args.scale_small), ("large", args.scale_large)):
        inst = system.make(args.workdir, free_port(), args.connections)
        try:
            inst.setup()
            log(f"  {system.name}: filling {n} entries through the store API")
            filled = inst.fill(n, args.scale_size)
            out[f"P4fill_{label}"] = filled["per_second"]
            out[f"P4claim_{label}"] = inst.claim_latency()["median_ms"]
            if label == "large":
                out["P4claim_ratio"] = out["P4claim_large"] / out["P4claim_small"]
            if label == "large":
                out["P4restart"] = inst.start(timeout=args.timeout)
                time.sleep(5)
                out["P4rss"] = rss_mb(inst.pid)
        finally:
            inst.destroy()


# -- the table ---------------------------------------------------------------

# key, label, unit, higher_is_better
FIGURES = [
    ("P1", "P1 ingest {size} (msg/s)", True),
    ("P1archived", "P1 {size}: archived, from the first connection (msg/s)", True),
    ("P2", "P2 relay {size} end-to-end (msg/s)", True),
    ("P2accept", "P2 relay {size}: accepted (msg/s)", True),
    ("P2archived", "P2 relay {size}: archived, from the first connection (msg/s)", True),
    ("P3fill", "P3 fill: {n} accepted, downstream down (s)", False),
    ("P3settle", "P3 fill: until all {n} deferred (s)", False),
    ("P3", "P3 drain {n} deferred (s)", False),
    ("P3restart", "P3 restart with {n} deferred (s)", False),
    ("P3mem", "P3 memory (PSS) with {n} deferred (MB)", False),
]
SCALE_FIGURES = [
    ("P4fill_small", "P4 store fill rate, {small} entries (entries/s)"),
    ("P4claim_small", "P4 claim(100) latency, {small} queued (ms)"),
    ("P4fill_large", "P4 store fill rate, {large} entries (entries/s)"),
    ("P4claim_large", "P4 claim(100) latency, {large} queued (ms)"),
    ("P4claim_ratio", "P4 claim latency ratio {large}/{small}"),
    ("P4restart", "P4 restart with {large} queued (s)"),
    ("P4rss", "P4 RSS with {large} queued (MB)"),
]


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if v >= 0.01 else f"{v:.2g}"


def table(results: dict[str, dict[str, list[float]]], errors: dict[str, list[str]], args: argparse.Namespace,
          systems: list[System]) -> str:
    hubs: list[str | None] = [s.name for s in systems if s.is_hub] or [None]
    takes = {s.name: s.figures for s in systems}
    has_postfix = any(not s.is_hub for s in systems)
    rows = ["| figure | system | mailhub | Postfix | ratio |", "|---|---|---:|---:|---:|"]

    def med(system: str, key: str) -> float | None:
        vals = results.get(system, {}).get(key)
        return statistics.median(vals) if vals else None

    for size in args.sizes:
        for key, label, higher in FIGURES:
            if key.startswith("P3") and size != args.sizes[0]:
                continue
            k = key if key.startswith("P3") else f"{key}@{size_label(size)}"
            name = label.format(size=size_label(size), n=args.drain)
            pf = med("postfix", k) if has_postfix else None
            for hub in hubs:
                hv = med(hub, k) if hub else None
                if hv is None and (pf is None or key[:2] not in takes.get(hub or "", frozenset({key[:2]}))):
                    continue
                ratio = None
                if hv and pf:
                    ratio = hv / pf if higher else pf / hv
                rows.append(f"| {name} | {hub or '-'} | {fmt(hv)} | {fmt(pf)} | {fmt(ratio) + '×' if ratio else '-'} |")
    for key, label in SCALE_FIGURES:
        name = label.format(small=f"{args.scale_small:,}", large=f"{args.scale_large:,}")
        for hub in hubs:
            hv = med(hub, key) if hub else None
            if hv is not None:
                rows.append(f"| {name} | {hub} | {fmt(hv)} | n/a | - |")
    out = "\n".join(rows)
    if errors:
        out += "\n\nFailed runs:\n" + "\n".join(f"- {s}: {e}" for s, es in errors.items() for e in es)
    return out


def machine(workdir: str) -> str:
    def sh(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()

    cpu = sh("lscpu | grep -E '^(Model name|CPU\\(s\\)|Thread|Core)' | sed 's/  */ /g'")
    mem = sh("free -m | awk '/^Mem:/ {print $2 \" MB\"}'")
    return (
        f"date: {sh('date -u')}\nnproc: {os.cpu_count()}\n{cpu}\nmemory: {mem}\n"
        f"kernel: {sh('uname -r')}\npostfix: {postfix_version()}\npython: {sys.version.split()[0]}\n"
        f"disk for spools: {sh(f'df -T {workdir} | tail -1')}"
    )


# -- main --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="mailhub against Postfix, side by side (see bench/README.md).")
    p.add_argument("--quick", action="store_true", help="smoke run: 1,000 messages, 1 round, small P4")
    p.add_argument("--full", action="store_true", help="P3 with 100,000 deferred, P4 with 1,000,000 queued")
    p.add_argument("--messages", type=int, help="messages per P1/P2 run (default 10000)")
    p.add_argument("--size", dest="sizes", action="append", help="message size, e.g. 4k (repeatable; default 4k and 100k)")
    p.add_argument("--drain", type=int, help="deferred entries for P3 (default 10000; 100000 with --full)")
    p.add_argument("--rounds", type=int, help="rounds per figure; systems alternate order (default 3: the median of 3 leaves out one outlying round)")
    p.add_argument("--connections", type=int, default=20,
                   help="destination concurrency: hub max_connections = Postfix relay_destination_concurrency_limit"
                   " (default 20, Postfix's default)")
    p.add_argument("--systems", help="comma-separated subset, e.g. postfix,mailhub-sqlite-1node")
    p.add_argument("--figures", default="P1,P2,P3,P4", help="comma-separated subset of P1,P2,P3,P4")
    p.add_argument("--workdir", default="/var/tmp", help="where instances put their spools (a real disk)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before one step counts as failed")
    p.add_argument("--json", help="also write the raw results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.messages = args.messages or 1000
        args.drain = args.drain or 1000
        args.rounds = args.rounds or 1
        args.scale_small, args.scale_large = 1000, 10000
    else:
        args.messages = args.messages or 10000
        args.drain = args.drain or (100000 if args.full else 10000)
        args.rounds = args.rounds or 3
        args.scale_small, args.scale_large = 10000, (1000000 if args.full else 100000)
    args.sizes = [parse_size(s) for s in (args.sizes or ["4k", "100k"])]
    args.scale_size = 4096
    figures = set(args.figures.upper().split(","))
    if os.geteuid() != 0:
        raise SystemExit("run as root: the Postfix peer is a private instance started with postfix -c")
    for tool in ("postfix", "smtp-source", "smtp-sink", "postqueue"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise SystemExit(f"{tool} not found: apt-get install postfix")

    systems = build_systems(args)
    log(f"systems: {', '.join(s.name for s in systems)}")
    results: dict[str, dict[str, list[float]]] = {}
    errors: dict[str, list[str]] = {}

    def record(system: System, what: str, fn: Callable[[dict[str, float]], None], suffix: str = "") -> None:
        """Run one measurement; keep what it measured even if a later step of it fails."""
        log(f"{what}: {system.name}")
        got: dict[str, float] = {}
        try:
            fn(got)
        except (BenchError, OSError, subprocess.SubprocessError, ValueError) as e:
            log(f"  FAILED: {str(e)[-500:]}")
            errors.setdefault(system.name, []).append(f"{what}: {str(e)[-500:]}")
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
        for k, v in got.items():
            results.setdefault(system.name, {}).setdefault(k + suffix, []).append(v)
        if got:
            log("  " + ", ".join(f"{k}={fmt(v)}" for k, v in got.items()))

    def alternate(figure: str, what: str, fn: Callable[[System, dict[str, float]], None], suffix: str = "",
                  only_hubs: bool = False) -> None:
        pool = [s for s in systems if (s.is_hub or not only_hubs) and figure in s.figures]
        for r in range(args.rounds):
            order = pool[r % len(pool):] + pool[: r % len(pool)]
            if r % 2:
                order.reverse()
            for system in order:
                record(system, f"{what} (round {r + 1})", lambda out, s=system: fn(s, out), suffix)

    started = time.monotonic()
    for size in args.sizes:
        label = size_label(size)
        if "P1" in figures:
            alternate("P1", f"P1 ingest {label}", lambda s, out, z=size: run_ingest(s, args, z, out), f"@{label}")
        if "P2" in figures:
            alternate("P2", f"P2 relay {label}", lambda s, out, z=size: run_relay(s, args, z, out), f"@{label}")
    if "P3" in figures:
        alternate("P3", f"P3 drain {args.drain}", lambda s, out: run_drain(s, args, args.sizes[0], out))
    if "P4" in figures:
        for system in systems:
            if system.is_hub and "P4" in system.figures:
                record(system, "P4 scale", lambda out, s=system: run_scale(s, args, out))
    elapsed = time.monotonic() - started

    out = table(results, errors, args, systems)
    header = (
        f"{machine(args.workdir)}\n"
        f"messages per P1/P2 run: {args.messages}; sessions: {SESSIONS}; rounds: {args.rounds} (median);"
        f" connections: {args.connections}; bench time: {elapsed / 60:.1f} min\n"
    )
    print(header)
    print(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(args.workdir), "args": {k: v for k, v in vars(args).items()},
                       "results": results, "errors": errors}, f, indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

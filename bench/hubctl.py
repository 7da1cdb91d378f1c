"""
Direct access to a hub's spool store for the benchmark, through the public
API only (``mailhub.config.load``, ``mailhub.plugin.load_plugin`` and
``ISpoolStore``), so it works for every store plugin.  Run as a subprocess by
``bench/run.py``; prints one JSON object.

    hubctl.py counts CONFIG
    hubctl.py fill CONFIG --entries N [--size BYTES] [--node NAME]
    hubctl.py claim CONFIG [--repeats 20] [--limit 100] [--node NAME]

``fill`` enqueues entries the way the SMTP server does (``enqueue`` with the
same route the configuration gives example.com), many at once so the store can
group its commits, due between 10 and 30 minutes from now: a backlog whose
retries are spread over the policy's 20-minute cycle, none due at the start.

``claim`` times ``ISpoolStore.claim(node, now, limit)`` with ``now`` an hour
ahead, so every entry is due: the latency the delivery engine sees per batch.
The leases are released (untimed) after each claim, so every claim sees the
same spool.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any

from twisted.internet import defer, task

from mailhub.config import load
from mailhub.model import Address, Envelope
from mailhub.plugin import load_plugin


def open_store(config_path: str, reactor: Any) -> tuple[Any, Any]:
    config = load(config_path)
    factory = load_plugin("mailhub.stores", config.store["plugin"])
    return config, factory.make(config.plugin_section("store"), reactor)


async def counts(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    _config, store = open_store(args.config, reactor)
    try:
        c = await store.counts()
        out = {k: c[k] for k in ("entries", "held", "leased")}
        out["archive"] = (c.get("routes") or {}).get("archive:local", 0)
        return out
    finally:
        await store.close()


async def fill(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    config, store = open_store(args.config, reactor)
    route = config.route_for("example.com")
    node = args.node or config.node_names()[0]
    body = _message(args.size)
    sender = Address("bench", "source.test")
    now = time.time()
    rnd = random.Random(1)
    started = time.monotonic()
    done = 0
    sem = defer.DeferredSemaphore(args.concurrency)

    def one(i: int) -> defer.Deferred:
        env = Envelope(
            sender,
            (Address(f"user{i}", "example.com"),),
            received_at=now + 600 + rnd.random() * 1200,
            client="127.0.0.1",
            helo="source.test",
        )
        return store.enqueue(env, body, {route: env.recipients}, node)

    try:
        pending = []
        for i in range(args.entries):
            pending.append(sem.run(one, i))
            if len(pending) >= args.concurrency * 4:
                await defer.gatherResults(pending, consumeErrors=True)
                done += len(pending)
                pending = []
                if args.progress and done % 100000 == 0:
                    print(f"  filled {done}", file=sys.stderr, flush=True)
        await defer.gatherResults(pending, consumeErrors=True)
        elapsed = time.monotonic() - started
        return {"entries": args.entries, "seconds": elapsed, "per_second": args.entries / elapsed}
    finally:
        await store.close()


async def claim(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    config, store = open_store(args.config, reactor)
    node = args.node or config.node_names()[0]
    try:
        # Warm up (opening the database, first page reads) outside the timing.
        await store.next_due(node, time.time(), 300.0)
        latencies = []
        got = 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            leases = await store.claim(node, time.time() + 3600, args.limit, 600.0, 300.0)
            latencies.append((time.perf_counter() - t0) * 1000)
            got += len(leases)
            # Give them back (untimed) so every claim sees the same spool.
            await defer.gatherResults([store.release(lease, time.time()) for lease in leases])
        return {
            "median_ms": statistics.median(latencies),
            "max_ms": max(latencies),
            "claimed": got,
        }
    finally:
        await store.close()


def _message(size: int) -> bytes:
    head = (
        b"Received: from source.test (127.0.0.1) by mx.hub.test\r\n"
        b"From: <bench@source.test>\r\nTo: <user@example.com>\r\nSubject: mailhub bench\r\n\r\n"
    )
    line = b"x" * 78 + b"\r\n"
    return head + line * max(1, size // len(line))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("counts")
    c.add_argument("config")
    f = sub.add_parser("fill")
    f.add_argument("config")
    f.add_argument("--entries", type=int, required=True)
    f.add_argument("--size", type=int, default=1024)
    f.add_argument("--node")
    f.add_argument("--concurrency", type=int, default=500)
    f.add_argument("--progress", action="store_true")
    k = sub.add_parser("claim")
    k.add_argument("config")
    k.add_argument("--repeats", type=int, default=20)
    k.add_argument("--limit", type=int, default=100)
    k.add_argument("--node")
    args = p.parse_args()
    fn = {"counts": counts, "fill": fill, "claim": claim}[args.cmd]

    async def run(reactor: Any) -> None:
        print(json.dumps(await fn(reactor, args)))

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()

"""
CPU per message under the P1 load, by thread: where a message's cost is
spent, as a figure steadier than msg/s on a machine whose speed drifts.

    .venv/bin/python bench/cpu.py                     # sqlite hub, with and without archive, and the sink
    .venv/bin/python bench/cpu.py --store redis --size 100k --shapes hub
    .venv/bin/python bench/cpu.py --shapes hub,sink --rounds 5

Shapes, alternated round by round (median printed last):

- ``hub``: the hub without an archive (``bench/hub.py``, one node);
- ``hub-archive``: the same with the ``sqlite`` archive;
- ``sink``: ``mailhub sink``, one Twisted process that stores nothing (the
  ceiling of a Twisted front door on this machine).

For each: msg/s; the main (reactor) thread's CPU per message; the other
threads' (the store's writer and reader); the hub's child processes' (the
archive worker) and threads that ended during the run; the store's
server (``redis-server``) when it has one; and ``smtp-source``'s.  Times are
user + system CPU from ``/proc``, in microseconds per message.  Nothing is
asserted: see bench/README.md, "What this machine allows".
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

from common import free_port, parallel_smtp_source
from hub import HubInstance, TwistedSinkInstance
from run import parse_size

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """Seconds of CPU of each thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended since the listing
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def process_cpu(pid: int, children: bool = False) -> float:
    """Seconds of CPU of ``pid`` (with ``children``: and of its children it has waited for)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])
    return (own + (int(fields[13]) + int(fields[14]) if children else 0)) / TICK


def live_children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def measure(shape: str, args: argparse.Namespace, size: int) -> tuple[float, ...]:
    workdir = tempfile.mkdtemp(prefix=f"bench-cpu-{shape}-", dir=args.workdir)
    inst: HubInstance | TwistedSinkInstance
    if shape == "sink":
        inst = TwistedSinkInstance(workdir, free_port())
    else:
        # Nothing listens on the route's port: P1's downstream is down.
        inst = HubInstance(workdir, [free_port()], free_port(), 20, args.store, archive=shape == "hub-archive")
    try:
        inst.setup()
        inst.start()
        time.sleep(1.0)
        pids = inst.pids()
        pid = pids[0]
        server = pids[1] if len(pids) > 1 else None  # the private redis-server
        threads0 = thread_cpu(pid)
        proc0 = process_cpu(pid, children=True)
        kids0 = {c: process_cpu(c) for c in live_children(pid)}
        server0 = process_cpu(server) if server else 0.0
        source0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds = parallel_smtp_source(inst.ports, args.messages, 16, size, 3600)
        source1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        threads1 = thread_cpu(pid)
        proc1 = process_cpu(pid, children=True)
        kids1 = {c: process_cpu(c) for c in live_children(pid)}
        server1 = process_cpu(server) if server else 0.0
    finally:
        inst.destroy()
    n = args.messages
    main = threads1.get(pid, 0.0) - threads0.get(pid, 0.0)
    others = sum(t - threads0.get(tid, 0.0) for tid, t in threads1.items() if tid != pid)
    waited = (proc1 - sum(threads1.values())) - (proc0 - sum(threads0.values()))
    children = max(0.0, waited) + sum(t - kids0.get(c, 0.0) for c, t in kids1.items())
    source = (source1.ru_utime + source1.ru_stime) - (source0.ru_utime + source0.ru_stime)
    per = 1e6 / n
    return (n / seconds, main * per, others * per, children * per, (server1 - server0) * per, source * per)


COLUMNS = ("msg/s", "main us", "threads us", "children us", "server us", "source us")


def line(label: str, row: tuple[float, ...]) -> str:
    return f"{label:24}" + "".join(f"{v:>13.0f}" for v in row)


def main() -> int:
    p = argparse.ArgumentParser(description="CPU per message under the P1 load, by thread (bench/README.md)")
    p.add_argument("--store", default="sqlite", help="the hub's store plugin (sqlite, redis, memory)")
    p.add_argument("--size", default="4k")
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", default="hub,hub-archive,sink", help="comma-separated: hub, hub-archive, sink")
    p.add_argument("--workdir", default="/var/tmp")
    args = p.parse_args()
    size = parse_size(args.size)
    shapes = args.shapes.split(",")
    for shape in shapes:
        if shape not in ("hub", "hub-archive", "sink"):
            raise SystemExit(f"--shapes: unknown shape {shape!r} (hub, hub-archive, sink)")
    rows: dict[str, list[tuple[float, ...]]] = {s: [] for s in shapes}
    print(f"P1, {args.messages} x {args.size}, store {args.store}; CPU per message (user + system)")
    print(f"{'':24}" + "".join(f"{c:>13}" for c in COLUMNS))
    for r in range(args.rounds):
        order = shapes[r % len(shapes):] + shapes[: r % len(shapes)]
        for shape in order:
            row = measure(shape, args, size)
            rows[shape].append(row)
            print(line(f"{shape} (round {r + 1})", row), flush=True)
    for shape, got in rows.items():
        print(line(f"{shape} (median)", tuple(statistics.median(c) for c in zip(*got, strict=True))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
Profile the hub under the P1 or P2 load with py-spy (sampling, from outside the
process: the hub runs exactly as in the benchmark).

    .venv/bin/pip install py-spy
    .venv/bin/python bench/hubprofile.py --figure P2 [--messages 10000] [--size 4k] [--out /tmp/prof]

Writes ``OUT/FIGURE.raw`` (collapsed stacks, one line per stack with its
sample count, threads separated) and ``OUT/FIGURE.svg`` (a flame graph) and
prints, per thread, the functions with the most samples on top of the stack
(self) and anywhere on it (inclusive).  An idle thread's samples (waiting in
epoll or on its queue) are left out unless ``--idle``.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import Sink, free_port, parallel_smtp_source
from hub import VENV_BIN, HubInstance


def parse_size(text: str) -> int:
    t = text.lower()
    return int(t[:-1]) * 1024 if t.endswith("k") else int(t)


def summarise(raw: str, top: int) -> str:
    per_thread_self: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_thread_incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                # py-spy names a thread by what it shows; a name with a
                # newline in it (a log line) splits its stack's line.
                continue
            n = int(count)
            frames = stack.split(";")
            thread, frames = frames[0], frames[1:]
            totals[thread] += n
            if frames:
                per_thread_self[thread][frames[-1]] += n
            for fr in set(frames):
                per_thread_incl[thread][fr] += n
    out = []
    for thread, total in totals.most_common():
        out.append(f"\n== {thread}: {total} samples")
        out.append(f"-- self (top {top})")
        for fr, n in per_thread_self[thread].most_common(top):
            out.append(f"{100.0 * n / total:6.1f}%  {fr}")
        out.append(f"-- inclusive (top {top})")
        for fr, n in per_thread_incl[thread].most_common(top):
            out.append(f"{100.0 * n / total:6.1f}%  {fr}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description="py-spy profile of the hub under P1/P2 load")
    p.add_argument("--figure", choices=["P1", "P2"], default="P2")
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--size", default="4k")
    p.add_argument("--store", default="sqlite")
    p.add_argument("--nodes", type=int, default=1, choices=[1, 2])
    p.add_argument("--no-archive", action="store_true", help="a hub without an [archive] table")
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--idle", action="store_true", help="keep idle samples")
    p.add_argument("--gil", action="store_true",
                   help="only samples of the thread holding the GIL (what costs CPU in Python, not waits)")
    p.add_argument("--out", default="bench-profile")
    p.add_argument("--workdir", default="/var/tmp")
    args = p.parse_args()
    pyspy = shutil.which("py-spy") or os.path.join(VENV_BIN, "py-spy")
    if not os.path.exists(pyspy):
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    os.makedirs(args.out, exist_ok=True)
    size = parse_size(args.size)
    sink = Sink(free_port())
    if args.figure == "P2":
        sink.start()
    workdir = tempfile.mkdtemp(prefix="mailhub-profile-", dir=args.workdir)
    hub = HubInstance(
        workdir, [free_port() for _ in range(args.nodes)], sink.port, args.connections, args.store,
        archive=not args.no_archive,
    )
    raw = os.path.join(args.out, f"{args.figure}.raw")
    svg = os.path.join(args.out, f"{args.figure}.svg")
    try:
        hub.setup()
        hub.start()
        spies = []
        for fmt, path in (("raw", raw), ("flamegraph", svg)):
            argv = [pyspy, "record", "--pid", str(hub.pid), "--rate", str(args.rate), "--threads",
                    "--format", fmt, "--output", path, "--nonblocking"]
            if args.idle:
                argv.append("--idle")
            if args.gil:
                argv.append("--gil")
            spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(1.0)
        t0 = time.monotonic()
        accepted = parallel_smtp_source(hub.ports, args.messages, 16, size, 3600)
        line = f"{args.figure}: {args.messages} x {args.size}: accepted {args.messages / accepted:.0f} msg/s"
        if args.figure == "P2":
            end = sink.wait_count(args.messages, 3600)
            line += f", end-to-end {args.messages / (end - t0):.0f} msg/s"
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
        print(line)
        print(f"(profiled with py-spy --rate {args.rate}; some slowdown from sampling)")
        print(summarise(raw, args.top))
        print(f"\nraw stacks: {raw}\nflame graph: {svg}")
    finally:
        hub.destroy()
        sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

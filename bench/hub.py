"""
A mailhub for the benchmark: a configuration in a temporary directory and
``twistd -n --pidfile= mailhub --config FILE`` as a subprocess, exactly as the
README starts it.  Variants: one node or the two-node embedded default (both
nodes in one process), over the ``sqlite`` store or ``redis`` (a private
``redis-server`` with AOF and ``appendfsync always``); over ``redis``, also
the two-site shape, one ``twistd mailhub --node NAME`` process per node
(``processes=2``), and a replica on the same machine that every write waits
for (``replica=True``: ``wait_replicas = 1``).

Durability is the store's default: SQLite with WAL and ``synchronous=FULL``,
Redis acknowledging only after the fsync of its AOF.  The configuration differs
from ``examples/hub.toml`` only in ports, paths, the absence of an archive when
no archive plugin is installed, the per-IP message rate limit (lifted: all the
load comes from 127.0.0.1, which Postfix exempts from its client limits by
default), and ``[delivery] max_scan_interval = 1`` so a
flush made by ``mailhub queue flush`` (another process) is seen within a second,
as Postfix's qmgr sees ``postqueue -f`` at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from common import BenchError, smtp_banner, stop_process, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.dirname(sys.executable)
NODE_NAMES = ("dallas", "losangeles")


def store_plugins() -> list[str]:
    return sorted({ep.name for ep in entry_points(group="mailhub.stores")})


def archive_plugins() -> list[str]:
    return sorted({ep.name for ep in entry_points(group="mailhub.archives")})


class HubInstance:
    """
    :param workdir: an empty directory of its own (deleted by ``destroy``).
    :param ports: one SMTP port per node (one or two).
    :param sink_port: the route of example.com.
    :param concurrency: ``max_connections`` of example.com.
    :param store: ``sqlite`` or ``redis``.
    :param processes: 1: every node in one twistd; 2: one ``twistd --node`` per node.
    :param replica: (``redis``) a replica server, and ``wait_replicas = 1``.
    """

    def __init__(
        self, workdir: str, ports: list[int], sink_port: int, concurrency: int, store: str = "sqlite",
        archive: bool = True,
        archive_options: str = "",
        suffix: str = "",
        processes: int = 1,
        replica: bool = False,
    ) -> None:
        self.dir = workdir
        self.ports = ports
        self.sink_port = sink_port
        self.concurrency = concurrency
        self.store = store
        self.archive = archive
        self.archive_options = archive_options
        self.processes = processes
        self.replica = replica
        shape = f"{len(ports)}node" if processes == 1 else f"{processes}proc"
        self.name = (
            f"mailhub-{store}-{shape}" + ("-replica" if replica else "") + ("" if archive else "-noarchive") + suffix
        )
        self.config = os.path.join(workdir, "hub.toml")
        self.proc: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []
        self.redis = None
        self.redis_replica = None
        self._log: object | None = None

    def setup(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        if self.store == "redis":
            from mailhub.testing.redis_server import RedisServer

            self.redis = RedisServer.start(Path(self.dir) / "redis")
            store = f'plugin = "redis"\nhost = "127.0.0.1"\nport = {self.redis.port}\n'
            if self.replica:
                self.redis_replica = RedisServer.start(Path(self.dir) / "redis-replica", replica_of=self.redis.address)
                self.redis_replica.wait_for_replication(30)
                store += "wait_replicas = 1\n"
        else:
            # Each store plugin refuses keys it does not read: only sqlite has a path.
            store = f'plugin = "{self.store}"\n' + ('path = "spool.db"\n' if self.store == "sqlite" else "")
        archive = ""
        if self.archive and "sqlite" in archive_plugins():
            archive = '[archive]\nplugin = "sqlite"\npath = "archive.db"\n' + self.archive_options
        nodes = "".join(
            f'[nodes.{name}]\nsmtp = "tcp:{port}:interface=127.0.0.1"\n\n'
            for name, port in zip(NODE_NAMES, self.ports, strict=False)
        )
        text = f"""\
[hub]
hostname = "mx.hub.test"
# DSNs to outside senders: none are expected in the bench.
outbound = "smtp:127.0.0.1:9"

[smtp]
# The load comes from one IP (smtp-source on 127.0.0.1) standing for many
# MTAs; Postfix exempts $mynetworks from its per-client limits by default
# (smtpd_client_event_limit_exceptions), so the hub's per-IP rate is lifted.
max_messages_per_minute_per_ip = 100000000

[store]
{store}
{archive}
[policy]
plugin = "standard"

[delivery]
max_scan_interval = 1.0

{nodes}[domains."example.com"]
route = "smtp:127.0.0.1:{self.sink_port}"
max_connections = {self.concurrency}
"""
        with open(self.config, "w") as f:
            f.write(text)

    def start(self, timeout: float = 120.0) -> float:
        """Start twistd (one per node with ``processes=2``); return the seconds until every node's SMTP port greets."""
        log = open(os.path.join(self.dir, "twistd.log"), "ab")
        self._log = log
        runs: list[tuple[str, list[str]]] = [("hub", [])]
        if self.processes > 1:
            runs = [(name, ["--node", name]) for name in NODE_NAMES[: len(self.ports)]]
        t0 = time.monotonic()
        self.procs = []
        for name, extra in runs:
            argv = [
                os.path.join(VENV_BIN, "twistd"),
                "-n",
                "--pidfile=",
                "--logfile", os.path.join(self.dir, f"{name}.log"),
                "mailhub",
                "--config", self.config,
                *extra,
            ]  # fmt: skip
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir))
        self.proc = self.procs[0]

        def ready() -> bool:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise BenchError(f"{self.name}: twistd exited with {proc.returncode}: {self.log_tail()}")
            return all(smtp_banner(p) for p in self.ports)

        wait_for(ready, timeout, f"{self.name} to listen")
        return time.monotonic() - t0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The hub's processes, and the redis-servers when the store is a private Redis."""
        pids = [p.pid for p in self.procs if p.poll() is None]
        for server in (self.redis, self.redis_replica):
            process = getattr(server, "_process", None)
            if process is not None and process.poll() is None:
                pids.append(process.pid)
        return pids

    def log_tail(self, lines: int = 5) -> str:
        out = []
        for name in ("twistd.log", "hub.log", *(f"{n}.log" for n in NODE_NAMES)):
            try:
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    out += f.read().strip().splitlines()[-lines:]
            except OSError:
                pass
        return " | ".join(out) or "(no log)"

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc, timeout=60)
        self.procs = []
        self.proc = None
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def _ctl(self, *args: str, timeout: float = 3600) -> dict:
        res = subprocess.run(
            [sys.executable, os.path.join(HERE, "hubctl.py"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode != 0:
            raise BenchError(f"hubctl {args[0]} failed: {res.stderr.strip()[-600:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    def counts(self) -> dict:
        return self._ctl("counts", self.config)

    def fill(self, entries: int, size: int) -> dict:
        return self._ctl("fill", self.config, "--entries", str(entries), "--size", str(size), "--progress")

    def claim_latency(self) -> dict:
        return self._ctl("claim", self.config)

    def flush(self) -> None:
        """What an operator does when the downstream is back: ``mailhub queue flush``."""
        res = subprocess.run(
            [os.path.join(VENV_BIN, "mailhub"), "queue", "--config", self.config, "flush"],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise BenchError(f"mailhub queue flush failed: {res.stderr.strip() or res.stdout.strip()}")

    def wait_deferred(self, n: int, timeout: float) -> None:
        """
        Wait until ``n`` entries are spooled and none is being attempted, and
        with an archive until it has every message (P3 times the relay's
        drain, which Postfix has alone: the archive's own backlog, put off
        while the fill ran, is not part of it).
        """

        def settled() -> bool:
            c = self.counts()
            if self.archive and c["archive"]:
                return False
            return c["entries"] >= n and c["leased"] == 0

        wait_for(settled, timeout, f"{n} entries deferred by {self.name}", interval=0.5)

    def wait_archived(self, timeout: float) -> None:
        """Wait until the archive has every message: no ``archive:local`` entry left in the spool."""
        wait_for(lambda: self.counts()["archive"] == 0, timeout, f"{self.name}'s archive to catch up", interval=0.25)

    def destroy(self) -> None:
        self.stop()
        for server in (self.redis_replica, self.redis):
            if server is not None:
                server.stop()
        self.redis = self.redis_replica = None
        shutil.rmtree(self.dir, ignore_errors=True)


class TwistedSinkInstance:
    """
    The machine's ceiling for a Twisted front door, for P1 only: ``mailhub
    sink`` (our own SMTP protocol on Twisted, one process) accepts every
    message and stores nothing.  Next to Postfix in the same run, it shows
    how fast one Python process can take mail on this machine at all, so
    that the hub's ratio to Postfix can be read against what the machine
    allows (the ratio moves with the machine: see bench/README.md, "What
    this machine allows").
    """

    name = "twisted-sink"
    archive = False

    def __init__(self, workdir: str, port: int) -> None:
        self.dir = workdir
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def ports(self) -> list[int]:
        return [self.port]

    def setup(self) -> None:
        os.makedirs(self.dir, exist_ok=True)

    def start(self, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        # Its one line per message goes to a file, as the hub's log line does.
        with open(os.path.join(self.dir, "sink.log"), "ab") as log:
            self.proc = subprocess.Popen(
                [os.path.join(VENV_BIN, "mailhub"), "sink", "--listen", f"tcp:{self.port}:interface=127.0.0.1"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"mailhub sink exited with {self.proc.returncode}")
            return smtp_banner(self.port)

        wait_for(ready, timeout, "mailhub sink to listen")
        return time.monotonic() - t0

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def destroy(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

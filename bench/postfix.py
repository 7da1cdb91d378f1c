"""
A private Postfix instance for the benchmark: its own config_directory and
queue_directory under a temporary directory, started with ``postfix -c DIR``,
listening on a free port of 127.0.0.1, relaying ``example.com`` to the sink.

It is configured as a relay (an MX in front of the organisation's server, the
job mailhub does) and otherwise left at Postfix's defaults (compatibility level
3.6), in particular every durability default: the queue file is fsync'd before
the "250" to DATA.  The settings that differ from an empty main.cf are listed
in ``MAIN_CF`` below, with why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from common import BenchError, smtp_banner, wait_for

# Upstream Postfix's master.cf services (Debian's, without the pipe(8)
# examples), with chroot off: a chroot needs copies of /etc files in the queue
# directory, which Debian's init script makes and a private instance lacks.
# chroot is a security setting, not a performance or durability one.
MASTER_CF = """\
{port}  inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
        -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
# Modern defaults (no backwards-compatibility shims).
compatibility_level = 3.6
# The private instance's own directories.
queue_directory = {dir}/queue
data_directory = {dir}/data
# No syslog daemon here: postlogd writes the log to a file (Postfix >= 3.4).
maillog_file = {dir}/maillog
# Listen on 127.0.0.1 only; the port is in master.cf.
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.bench.test
mydomain = bench.test
# Nothing is delivered locally: this is a relay.
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
mynetworks = 127.0.0.0/8
# The hub's job: MX for example.com, relaying to the organisation's server
# (here the smtp-sink) - mailhub's [domains."example.com"] route.
relay_domains = example.com
transport_maps = inline:{{example.com=relay:[127.0.0.1]:{sink_port}}}
# The same per-destination connection limit as the hub's max_connections
# (Postfix's default is 20; the bench uses 20 on both sides by default).
relay_destination_concurrency_limit = {concurrency}
"""

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


def postfix_version() -> str:
    out = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


class PostfixInstance:
    """
    :param workdir: an empty directory of its own (deleted by ``destroy``).
    :param port: the SMTP port on 127.0.0.1.
    :param sink_port: where example.com's mail goes.
    :param concurrency: the destination concurrency limit.
    """

    name = "postfix"

    def __init__(self, workdir: str, port: int, sink_port: int, concurrency: int) -> None:
        self.dir = workdir
        self.port = port
        self.sink_port = sink_port
        self.concurrency = concurrency
        self.config_dir = os.path.join(workdir, "etc")
        self.queue_dir = os.path.join(workdir, "queue")

    @property
    def ports(self) -> list[int]:
        return [self.port]

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(["postfix", "-c", self.config_dir, *args], capture_output=True, text=True)
        if check and res.returncode != 0:
            why = res.stderr.strip() or res.stdout.strip() or self.log_tail()
            raise BenchError(f"postfix {' '.join(args)} failed: {why}")
        return res

    def setup(self) -> None:
        os.makedirs(self.config_dir, exist_ok=True)
        os.makedirs(self.queue_dir, exist_ok=True)
        # Postfix's daemons run as user postfix and must reach the queue.
        os.chmod(self.dir, 0o755)
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.write(MAIN_CF.format(dir=self.dir, sink_port=self.sink_port, concurrency=self.concurrency))
        with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(port=f"127.0.0.1:{self.port}"))
        res = subprocess.run(["postconf", "-c", self.config_dir, "-n"], capture_output=True, text=True)
        if res.returncode != 0 or "warning" in res.stderr:
            raise BenchError(f"postconf rejects the bench main.cf: {res.stderr.strip()}")
        # Creates the queue directories with Postfix's own owners and modes.
        self._postfix("check")

    def log_tail(self, lines: int = 3) -> str:
        try:
            with open(os.path.join(self.dir, "maillog")) as f:
                return " | ".join(f.read().strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> float:
        """Start; return the seconds until the SMTP port greets."""
        t0 = time.monotonic()
        self._postfix("start")
        wait_for(lambda: smtp_banner(self.port), 30, f"postfix on port {self.port}")
        return time.monotonic() - t0

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def pids(self) -> list[int]:
        """The master and all its children (for resident memory)."""
        master = self.master_pid()
        if master is None:
            return []
        pids = [master]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    if int(fields[1]) == master:
                        pids.append(int(entry))
                except (OSError, IndexError, ValueError):
                    pass
        return pids

    def stop(self) -> None:
        pid = self.master_pid()
        self._postfix("stop", check=False)
        if pid is not None:
            def gone() -> bool:
                try:
                    os.kill(pid, 0)
                    return False
                except ProcessLookupError:
                    return True

            wait_for(gone, 30, "the postfix master to exit")

    def flush(self) -> None:
        """What an operator does when the downstream is back: ``postqueue -f``."""
        res = subprocess.run(["postqueue", "-c", self.config_dir, "-f"], capture_output=True, text=True)
        if res.returncode != 0:
            raise BenchError(f"postqueue -f failed: {res.stderr.strip()}")

    def queued(self, queues: tuple[str, ...] = QUEUES) -> int:
        """Messages in the named queues (counted as queue files)."""
        n = 0
        for q in queues:
            for _root, _dirs, files in os.walk(os.path.join(self.queue_dir, q)):
                n += len(files)
        return n

    def wait_deferred(self, n: int, timeout: float) -> None:
        """Wait until ``n`` messages sit in the deferred queue and nothing is in flight."""
        wait_for(
            lambda: self.queued(("deferred",)) >= n and self.queued(("maildrop", "incoming", "active")) == 0,
            timeout,
            f"{n} messages deferred by postfix",
            interval=0.5,
        )

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

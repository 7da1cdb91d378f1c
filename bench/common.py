"""
Shared pieces of the benchmark: free ports, the smtp-sink downstream with its
message counter, the smtp-source load generator, waiting and measuring helpers.

Everything here talks to processes by the pid it started; nothing kills by name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

SENDER = "bench@source.test"
RECIPIENT = "user@example.com"
HELO = "source.test"


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll ``predicate`` until true; return the seconds it took."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def smtp_banner(port: int, timeout: float = 1.0) -> bool:
    """True once something on 127.0.0.1:port answers with a 220 greeting."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            data = s.recv(512)
            ok = data.startswith(b"220")
            try:
                s.sendall(b"QUIT\r\n")
                s.recv(512)
            except OSError:
                pass
            return ok
    except OSError:
        return False


def rss_mb(pid: int) -> float:
    """Resident set size of one process, in MB (from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise BenchError(f"no VmRSS for pid {pid}")


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process we started, SIGKILL it if it does not go."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Sink:
    """
    ``smtp-sink`` on a port of 127.0.0.1: the downstream server ("the
    organisation's own server") for both systems.  It accepts every message
    and throws it away; ``-c`` makes it print a running message counter, which a
    reader thread follows, so ``count`` is the number of messages delivered.
    """

    _COUNTER = re.compile(rb"mesg=(\d+)")

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self.proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._last_change = time.monotonic()

    def start(self) -> Sink:
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        argv = [exe, "-c", f"127.0.0.1:{self.port}", "1024"]
        if os.geteuid() == 0:
            argv[1:1] = ["-u", "nobody"]
        self.count = 0
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
        self._thread = threading.Thread(target=self._follow, args=(self.proc,), daemon=True)
        self._thread.start()
        wait_for(lambda: smtp_banner(self.port), 10, f"smtp-sink on port {self.port}")
        # The probe's own session is not a message: mesg stays 0.
        return self

    def _follow(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        buf = b""
        while True:
            chunk = proc.stdout.read(65536)
            if not chunk:
                return
            buf = (buf + chunk)[-4096:]
            found = self._COUNTER.findall(buf)
            if found:
                n = int(found[-1])
                if n != self.count:
                    self.count = n
                    self._last_change = time.monotonic()

    def wait_count(self, n: int, timeout: float) -> float:
        """Wait until the sink has received ``n`` messages; return the monotonic time it happened."""
        deadline = time.monotonic() + timeout
        while self.count < n:
            if time.monotonic() > deadline:
                raise BenchError(f"sink got {self.count} of {n} messages within {timeout:.0f} s")
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"smtp-sink exited with {self.proc.returncode}")
            time.sleep(0.02)
        return self._last_change

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            if self._thread is not None:
                self._thread.join(2)
            self.proc = None


def smtp_source(
    port: int,
    messages: int,
    sessions: int,
    size: int,
    timeout: float,
    reuse: bool = False,
) -> float:
    """
    Run ``smtp-source`` against 127.0.0.1:port and return the wall-clock seconds
    until every message was answered with 250 after DATA.  One message per
    connection (smtp-source's default, like independent MTAs sending to an MX)
    unless ``reuse``.  Any non-2xx reply makes smtp-source stop with an error.
    """
    exe = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    argv = [
        exe,
        "-4",
        "-s", str(sessions),
        "-m", str(messages),
        "-l", str(size),
        "-f", SENDER,
        "-t", RECIPIENT,
        "-M", HELO,
        "-S", "mailhub bench",
    ]
    if reuse:
        argv.append("-d")
    argv.append(f"127.0.0.1:{port}")
    start = time.monotonic()
    try:
        res = subprocess.run(argv, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source did not finish {messages} messages within {timeout:.0f} s")
    elapsed = time.monotonic() - start
    if res.returncode != 0:
        err = (res.stderr or res.stdout).decode(errors="replace").strip().splitlines()
        raise BenchError(f"smtp-source failed ({res.returncode}): {' | '.join(err[-3:])}")
    return elapsed


def parallel_smtp_source(
    ports: list[int], messages: int, sessions: int, size: int, timeout: float
) -> float:
    """
    Split the load over several listeners (the nodes of a two-node hub): one
    smtp-source per port, sessions and messages divided evenly, run at once.
    Returns the wall-clock seconds until the last one finished.
    """
    if len(ports) == 1:
        return smtp_source(ports[0], messages, sessions, size, timeout)
    results: list[float | BaseException] = []
    lock = threading.Lock()
    per_msgs = messages // len(ports)
    per_sess = max(1, sessions // len(ports))

    def one(port: int, count: int) -> None:
        try:
            r: float | BaseException = smtp_source(port, count, per_sess, size, timeout)
        except BaseException as e:  # reported below
            r = e
        with lock:
            results.append(r)

    start = time.monotonic()
    threads = []
    for i, port in enumerate(ports):
        count = per_msgs + (messages - per_msgs * len(ports) if i == 0 else 0)
        t = threading.Thread(target=one, args=(port, count))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return time.monotonic() - start

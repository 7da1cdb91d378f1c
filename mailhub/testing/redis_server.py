"""
A real ``redis-server`` for tests: started on a free port in a scratch
directory, stopped and restarted on the same port to simulate an outage.

The server runs with AOF and ``appendfsync always`` (what the ``redis`` store's
documentation recommends) and no RDB snapshots, so a restart keeps every
acknowledged write.  ``replica_of`` starts a replica of another server, for
tests of ``wait_replicas``.

Every call here blocks (it waits for the process): call it from fixtures, or
between the steps of a test, never from code the reactor runs::

    server = RedisServer.start(tmp_path)
    try:
        ...  # plugin.make({"port": server.port, ...}, reactor)
        server.stop()      # the outage
        server.restart()   # same port, same data
    finally:
        server.stop()

``command()`` speaks just enough RESP to inspect the server (``KEYS``,
``INFO``, ``FLUSHALL``) without a Redis client library.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from attrs import define, field

__all__ = ["RedisError", "RedisServer", "free_port", "redis_server_binary"]


class RedisError(Exception):
    """The server answered a ``command()`` with an error reply."""


def redis_server_binary() -> str | None:
    """The path of ``redis-server``, or ``None`` if it is not installed."""
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _encode(args: tuple[str | bytes | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        data = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n + 2:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n + 2 :]
        return data

    def reply(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exactly(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ConnectionError(f"unexpected reply {line!r}")


@define
class RedisServer:
    """
    One ``redis-server`` process that a test owns.

    :ivar port: the port it listens on (127.0.0.1), kept across restarts.
    :ivar directory: its working directory (AOF, log).
    :ivar replica_of: ``(host, port)`` of the master if this is a replica.
    """

    port: int
    directory: Path
    replica_of: tuple[str, int] | None = None
    extra_args: tuple[str, ...] = ()
    sentinel_for: tuple[str, str, int] | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        directory: Path,
        port: int | None = None,
        replica_of: tuple[str, int] | None = None,
        extra_args: tuple[str, ...] = (),
        timeout: float = 10.0,
    ) -> RedisServer:
        """
        Start a server in ``directory`` (created if needed) and wait until it
        answers ``PING``.

        :raises RuntimeError: if ``redis-server`` is missing or does not come up.
        """
        directory.mkdir(parents=True, exist_ok=True)
        server = cls(port or free_port(), directory, replica_of, extra_args)
        server.restart(timeout)
        return server

    @classmethod
    def start_sentinel(
        cls, directory: Path, master: str, master_address: tuple[str, int], timeout: float = 10.0
    ) -> RedisServer:
        """
        Start a Sentinel (``redis-server --sentinel``) that monitors one master
        under the name ``master``, with a quorum of 1 and short timeouts: it
        declares the master down after 0.5 s without an answer.
        """
        directory.mkdir(parents=True, exist_ok=True)
        server = cls(free_port(), directory, sentinel_for=(master, *master_address))
        server.restart(timeout)
        return server

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _argv(self) -> list[str]:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        if self.sentinel_for is not None:
            # Sentinel rewrites its configuration file: write it only once.
            conf = self.directory / "sentinel.conf"
            if not conf.exists():
                name, host, port = self.sentinel_for
                conf.write_text(
                    f"sentinel monitor {name} {host} {port} 1\n"
                    f"sentinel down-after-milliseconds {name} 500\n"
                    f"sentinel failover-timeout {name} 2000\n"
                )
            return [
                binary, str(conf), "--sentinel",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--daemonize", "no",
                "--logfile", str(self.directory / "redis.log"),
            ]  # fmt: skip
        argv = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
            # A replica that connects is synced at once, not 5 s later.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if self.replica_of is not None:
            argv += ["--replicaof", self.replica_of[0], str(self.replica_of[1])]
        return argv + list(self.extra_args)

    def restart(self, timeout: float = 10.0) -> None:
        """
        Start the server again on the same port with the same data (if it is
        running, stop it first), and wait until it answers ``PING``.
        """
        if self.running:
            self.stop()
        self._process = subprocess.Popen(
            self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start; see {self.directory}/redis.log")
            try:
                if self.command("PING") == "PONG":
                    return
            except (OSError, RedisError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down cleanly (``SIGTERM``) and wait for it to exit."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Kill the server at once (``SIGKILL``), as a crash would."""
        self._end(signal.SIGKILL, 10.0)

    def pause(self) -> None:
        """Freeze the server (``SIGSTOP``): connections stay open, nothing answers."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause``."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def command(self, *args: str | bytes | int, db: int = 0, timeout: float = 5.0) -> object:
        """
        Run one command in database ``db`` on a fresh connection and return
        its reply (bytes for bulk strings, ``str`` for status replies, lists,
        ints, ``None``).

        :raises RedisError: for an error reply.
        :raises OSError: if the server cannot be reached.
        """
        with socket.create_connection(self.address, timeout=timeout) as sock:
            reader = _Reader(sock)
            if db:
                sock.sendall(_encode(("SELECT", db)))
                reader.reply()
            sock.sendall(_encode(args))
            return reader.reply()

    def keys(self, prefix: str, db: int = 0) -> list[bytes]:
        """Every key that starts with ``prefix``, sorted."""
        found = self.command("KEYS", prefix + "*", db=db)
        assert isinstance(found, list)
        return sorted(found)

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as a dict."""
        raw = self.command("INFO", section)
        assert isinstance(raw, bytes)
        pairs = (line.split(":", 1) for line in raw.decode().splitlines() if ":" in line)
        return {k: v for k, v in pairs}

    def wait_for_replication(self, timeout: float = 10.0) -> None:
        """
        For a replica: wait until its link to the master is up and synced, and
        it has written its first AOF (until then it refuses a clean shutdown).
        """
        deadline = time.monotonic() + timeout
        while (
            self.info("replication").get("master_link_status") != "up"
            or self.info("persistence").get("aof_rewrite_in_progress") != "0"
            or self.info("persistence").get("aof_rewrite_scheduled") != "0"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica on port {self.port} did not sync")
            time.sleep(0.05)

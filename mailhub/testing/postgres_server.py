"""
A real PostgreSQL server for tests and benchmarks: a cluster made with
``initdb`` in a scratch directory and run with ``pg_ctl`` on a free port of
127.0.0.1, its unix socket inside that directory.

The binaries are Debian's (``apt-get install postgresql``), found in the
newest ``/usr/lib/postgresql/NN/bin``, else on ``PATH``; ``MAILHUB_PG_BINDIR``
names another directory.  PostgreSQL refuses to run as root, so when the
tests run as root (CI does) every command runs as an unprivileged user
(``runuser -u USER --``): ``mailhub-test``, a system user without a home or a
shell that is created if missing (``nobody`` if it cannot be).  The cluster
lives in a directory of its own under the system's temporary directory (a
unix socket's path must be short, and pytest's directories are private to
their owner), owned by the server's user; ``directory`` gets a symbolic link
``pgdata`` to it and, once the server is stopped, a copy of its log;
``stop()`` removes the cluster.

The server runs with ``fsync`` on, as a real archive must; only ``initdb``'s
own final sync is skipped (a test cluster is thrown away after a crash).

Every call here blocks (it waits for the process): call it from fixtures, or
between the steps of a test, never from code the reactor runs::

    server = PostgresServer.start(tmp_path)
    try:
        dsn = server.create_database("test1")
        ...  # plugin.make({"dsn": dsn}, reactor)
        server.stop()      # the outage
        server.restart()   # same port, same data
    finally:
        server.stop()
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from attrs import define, field

from mailhub.testing.redis_server import free_port

__all__ = ["PostgresServer", "postgres_bindir"]

#: The unprivileged user the server runs as when the tests run as root.
TEST_USER = "mailhub-test"
#: The cluster's superuser; ``trust`` authentication on 127.0.0.1 and the socket.
SUPERUSER = "mailhub"


def _version_key(path: str) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", Path(path).parent.name)
    return tuple(int(n) for n in numbers)


def postgres_bindir() -> Path | None:
    """
    The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or ``None``
    if PostgreSQL's server is not installed.
    """
    candidates: list[str] = []
    if os.environ.get("MAILHUB_PG_BINDIR"):
        candidates.append(os.environ["MAILHUB_PG_BINDIR"])
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(os.path.realpath(on_path)).parent))
    for candidate in candidates:
        bindir = Path(candidate)
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _unprivileged_user() -> str:
    """The user to run the server as when we are root; created if missing."""
    try:
        pwd.getpwnam(TEST_USER)
        return TEST_USER
    except KeyError:
        pass
    made = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", TEST_USER],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    if made.returncode in (0, 9):  # 9: it exists (another test process made it)
        return TEST_USER
    return "nobody"


@define
class PostgresServer:
    """
    One PostgreSQL cluster and server that a test owns.

    :ivar port: the TCP port on 127.0.0.1, kept across restarts.
    :ivar directory: the directory given to ``start`` (the log is there).
    :ivar data: the cluster's directory (``PGDATA``); the socket is in its
        ``socket`` subdirectory.
    :ivar user: the user the server runs as, or ``None`` for ourselves.
    :ivar bindir: where ``initdb``, ``pg_ctl`` and ``postgres`` are.
    :ivar settings: server settings over the test defaults of ``restart``
        (``{"shared_buffers": "4GB"}`` for a benchmark).
    """

    port: int
    directory: Path
    data: Path
    bindir: Path
    user: str | None
    _private: Path | None = field(default=None, repr=False)
    _running: bool = field(default=False, repr=False)
    settings: dict[str, str] = field(factory=dict)

    @classmethod
    def start(
        cls,
        directory: Path,
        port: int | None = None,
        timeout: float = 60.0,
        settings: dict[str, str] | None = None,
    ) -> PostgresServer:
        """
        Make a cluster (``initdb``) and start its server, waiting until it
        accepts connections.

        :param directory: a scratch directory (created if needed).
        :raises RuntimeError: if PostgreSQL is not installed, naming what is
            missing and where it was looked for, or if the server does not
            come up (with the end of its log).
        """
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError(
                "PostgreSQL's server programs (initdb, pg_ctl, postgres) are not installed: "
                "looked in $MAILHUB_PG_BINDIR, /usr/lib/postgresql/*/bin and PATH "
                "(Debian: apt-get install postgresql)"
            )
        directory.mkdir(parents=True, exist_ok=True)
        user: str | None = None
        # The cluster lives in a short path of its own: a unix socket's path
        # has at most 107 bytes, and pytest's directories are private to
        # their owner (the server's user could not reach them).
        private = Path(tempfile.mkdtemp(prefix="mailhub-pg-"))
        if os.geteuid() == 0:
            user = _unprivileged_user()
            entry = pwd.getpwnam(user)
            os.chown(private, entry.pw_uid, entry.pw_gid)
        data = private / "data"
        link = directory / "pgdata"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(data)
        server = cls(
            port or free_port(), directory, data, bindir, user, private, settings=settings or {}
        )
        try:
            server._run(
                "initdb",
                "--pgdata", str(data),
                "--username", SUPERUSER,
                "--auth", "trust",
                "--encoding", "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            )  # fmt: skip
            (data / "socket").mkdir(mode=0o700)
            if user is not None:
                entry = pwd.getpwnam(user)
                os.chown(data / "socket", entry.pw_uid, entry.pw_gid)
            server.restart(timeout)
        except BaseException:
            server.stop(mode="immediate")
            raise
        return server

    @property
    def socket_dir(self) -> Path:
        return self.data / "socket"

    @property
    def log(self) -> Path:
        """The server's log (beside the cluster, where the server's user can write)."""
        return (self._private or self.directory) / "postgres.log"

    @property
    def running(self) -> bool:
        return self._running

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string for database ``dbname`` over TCP."""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname}"

    def _run(self, program: str, *args: str, timeout: float = 120.0) -> str:
        argv = [str(self.bindir / program), *args]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        done = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=timeout,
            cwd="/",
        )  # fmt: skip
        output = done.stdout.decode(errors="replace")
        if done.returncode != 0:
            tail = ""
            if self.log.exists():
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"{program} failed ({done.returncode}):\n{output}\n{tail}")
        return output

    def restart(self, timeout: float = 60.0) -> None:
        """
        Start the server again on the same port with the same data (if it is
        running, stop it first), and wait until it accepts connections.
        """
        if self._running:
            self.stop(remove=False)
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "on",
            "synchronous_commit": "on",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "logging_collector": "off",
            **self.settings,
        }
        options = " ".join(
            shlex.quote(part) for k, v in settings.items() for part in ("-c", f"{k}={v}")
        )
        self._run(
            "pg_ctl", "start", "--pgdata", str(self.data), "--wait",
            "--timeout", str(int(timeout)), "--log", str(self.log), "--options", options,
            "--silent",
        )  # fmt: skip
        self._running = True

    def stop(self, remove: bool = True, mode: str = "fast") -> None:
        """
        Shut the server down and wait for it to exit.

        :param remove: also delete the cluster (its log is copied to
            ``directory`` first); ``restart`` is then impossible.
        :param mode: ``pg_ctl``'s shutdown mode: ``fast`` (the default:
            sessions are ended, a clean shutdown) or ``immediate`` (as a crash).
        """
        try:
            if self._running:
                self._running = False
                self._run("pg_ctl", "stop", "--pgdata", str(self.data), "--mode", mode,
                          "--wait", "--silent")  # fmt: skip
        finally:
            if remove and self._private is not None:
                if self.log.exists():
                    shutil.copy(self.log, self.directory / "postgres.log")
                shutil.rmtree(self._private, ignore_errors=True)
                self._private = None

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with ``psql`` (as the superuser) and return its output."""
        return self._run(
            "psql", "--no-psqlrc", "--quiet", "--tuples-only", "--no-align",
            "--host", str(self.socket_dir), "--port", str(self.port),
            "--username", SUPERUSER, "--dbname", dbname,
            "--set", "ON_ERROR_STOP=1", "--command", sql,
        ).strip()  # fmt: skip

    def create_database(self, name: str) -> str:
        """
        Make an empty database (from ``template0``) and return its DSN.

        :param name: letters, digits and ``_`` only.
        """
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: letters, digits and _ only")
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn(name)

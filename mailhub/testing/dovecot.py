"""
A real Dovecot LMTP server for tests: Debian's ``dovecot-core`` and
``dovecot-lmtpd`` (``apt-get install dovecot-core dovecot-lmtpd``), run with a
configuration of its own in a scratch directory, listening for LMTP (RFC
2033) on a free port of 127.0.0.1 and on a unix socket.

Its users are plain names in a ``passwd-file`` (both userdb and passdb);
the domain of a recipient does not matter (``auth_username_format = %Ln``:
``alice@example.com`` is the user ``alice``), an unknown name is refused at
RCPT with ``550 5.1.1``.  Each user's mail lands in ``~/Maildir`` under the
scratch directory.  Users named in ``full`` have a mailbox that is over
its quota: a message to them is refused after DATA with ``452 4.2.2``
(``quota_full_tempfail``), while the other recipients of the same message
get it: LMTP's per-recipient replies.

Dovecot refuses to deliver as root, so when the tests run as root (CI does)
the users and Dovecot's own unprivileged processes get the uid of
``mailhub-test`` (made if missing, as for ``mailhub.testing.postgres_server``);
otherwise they run as whoever runs the tests.  The master process runs in
the foreground (``dovecot -F``), a child of the test process, and ``stop``
ends it.

Every call here blocks (it waits for the process or reads files): call it
from fixtures, or between the steps of a test, never from code the reactor
runs::

    server = DovecotServer.start(tmp_path, users=("alice", "bob"), full=("full",))
    try:
        target = f"127.0.0.1:{server.port}"      # route "lmtp:127.0.0.1:PORT"
        ...
        server.messages("alice")                  # what landed in alice's Maildir
        server.stop(remove=False)                 # the outage
        server.restart()                          # same port, same mail
    finally:
        server.stop()
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from attrs import define, field

# The same unprivileged user as the PostgreSQL server's (one helper makes it).
from mailhub.testing.postgres_server import _unprivileged_user
from mailhub.testing.redis_server import free_port

__all__ = ["DovecotServer", "dovecot_binary"]


def dovecot_binary() -> str | None:
    """The ``dovecot`` program (``/usr/sbin/dovecot``), or ``None`` if it is not installed."""
    found = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        return None
    # The LMTP server is a separate package on Debian.
    if not any(Path(d, "lmtp").is_file() for d in ("/usr/lib/dovecot", "/usr/libexec/dovecot")):
        return None
    return found


_CONFIG = """\
# Written by mailhub.testing.dovecot for one test run.
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
instance_name = mailhub-test-{port}
protocols = lmtp
listen = 127.0.0.1
ssl = no
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = maildir:~/Maildir
mail_plugins = quota
quota_full_tempfail = yes
lmtp_add_received_header = no
lmtp_hdr_delivery_address = none
auth_username_format = %Ln
passdb {{
  driver = passwd-file
  args = {base}/users
}}
userdb {{
  driver = passwd-file
  args = {base}/users
}}
plugin {{
  quota = maildir:User quota
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""


@define
class DovecotServer:
    """
    One Dovecot LMTP server that a test owns.

    :ivar port: the LMTP port on 127.0.0.1, kept across restarts.
    :ivar directory: the directory given to ``start`` (the log is copied
        there when the server is removed).
    :ivar base: the server's own directory (short, in the system's
        temporary directory: a unix socket's path has at most 107 bytes).
    :ivar users: the users that take mail; ``full``: those whose mailbox is full.
    """

    port: int
    directory: Path
    base: Path
    users: tuple[str, ...]
    full: tuple[str, ...]
    _program: str = field(repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _removed: bool = field(default=False, repr=False)

    @classmethod
    def start(
        cls,
        directory: Path,
        users: Sequence[str] = ("alice", "bob"),
        full: Sequence[str] = (),
        port: int | None = None,
        timeout: float = 30.0,
    ) -> DovecotServer:
        """
        Write the configuration and start the server, waiting until it
        greets on its port.

        :param directory: a scratch directory (created if needed).
        :param users: the names that take mail.
        :param full: names whose mailbox is over quota (``452 4.2.2`` after DATA).
        :raises RuntimeError: if Dovecot's LMTP server is not installed, or
            does not come up (with the end of its log).
        """
        program = dovecot_binary()
        if program is None:
            raise RuntimeError(
                "Dovecot's LMTP server is not installed (looked for dovecot on PATH and "
                "lib/dovecot/lmtp; Debian: apt-get install dovecot-core dovecot-lmtpd)"
            )
        for name in (*users, *full):
            if not name.isalnum() or not name.isascii():
                raise ValueError(f"user name {name!r}: letters and digits only")
        directory.mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix="mailhub-dovecot-"))
        server = cls(port or free_port(), directory, base, tuple(users), tuple(full), program)
        try:
            server._configure()
            server.restart(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _configure(self) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(_unprivileged_user())
        else:
            entry = pwd.getpwuid(os.getuid())
        group = _group_name(entry.pw_gid)
        uid, gid = entry.pw_uid, entry.pw_gid
        # The users' processes (not root) must reach their homes.
        os.chmod(self.base, 0o755)
        for sub in ("run", "state", "home"):
            (self.base / sub).mkdir()
        os.chown(self.base / "home", uid, gid)
        lines = [f"{name}:{{PLAIN}}unused:{uid}:{gid}::{self.home(name)}::" for name in self.users]
        lines += [
            f"{name}:{{PLAIN}}unused:{uid}:{gid}::{self.home(name)}::userdb_quota_rule=*:storage=1B"
            for name in self.full
        ]
        (self.base / "users").write_text("\n".join(lines) + "\n")
        (self.base / "dovecot.conf").write_text(
            _CONFIG.format(
                base=self.base, port=self.port, user=entry.pw_name, group=group, uid=uid, gid=gid
            )
        )

    @property
    def socket_path(self) -> Path:
        """The LMTP unix socket (route ``lmtp:unix:PATH``)."""
        return self.base / "run" / "lmtp"

    @property
    def log(self) -> Path:
        return self.base / "dovecot.log"

    @property
    def running(self) -> bool:
        return self._process is not None

    def home(self, user: str) -> Path:
        return self.base / "home" / user

    def messages(self, user: str) -> list[bytes]:
        """
        The messages in ``user``'s Maildir (``new`` and ``cur``), oldest first,
        as Dovecot stored them: LF line ends, a ``Return-Path:`` header first.
        """
        found: list[tuple[float, str, bytes]] = []
        for sub in ("new", "cur"):
            folder = self.home(user) / "Maildir" / sub
            if folder.is_dir():
                for path in folder.iterdir():
                    found.append((path.stat().st_mtime, path.name, path.read_bytes()))
        return [data for _, _, data in sorted(found)]

    def restart(self, timeout: float = 30.0) -> None:
        """
        Start the server (stopping it first if it runs) on the same port with
        the same mail, and wait until it greets.
        """
        if self._removed:
            raise RuntimeError("this Dovecot server was removed")
        self.stop(remove=False)
        output = open(self.base / "dovecot.out", "ab")  # noqa: SIM115 - the child keeps it
        try:
            self._process = subprocess.Popen(
                [self._program, "-F", "-c", str(self.base / "dovecot.conf")],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, cwd="/",
            )  # fmt: skip
        finally:
            output.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise RuntimeError(f"dovecot exited ({code}) at start:\n{self._tail()}")
            if _greets(self.port) and self.socket_path.exists():
                return
            if time.monotonic() > deadline:
                self.stop(remove=False)
                raise RuntimeError(f"dovecot did not greet on port {self.port} in {timeout:g}s:\n{self._tail()}")
            time.sleep(0.05)

    def stop(self, remove: bool = True) -> None:
        """
        Stop the server and wait for it to exit.

        :param remove: also delete its directory (the log is copied to
            ``directory`` first); ``restart`` is then impossible.
        """
        process, self._process = self._process, None
        try:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                # The master's children go with it; their sockets close.
                deadline = time.monotonic() + 10
                while _accepts(self.port) and time.monotonic() < deadline:
                    time.sleep(0.05)
        finally:
            if remove and not self._removed:
                self._removed = True
                if self.log.exists():
                    shutil.copy(self.log, self.directory / "dovecot.log")
                shutil.rmtree(self.base, ignore_errors=True)

    def _tail(self) -> str:
        texts = []
        for path in (self.base / "dovecot.out", self.log):
            if path.exists():
                texts += path.read_text(errors="replace").splitlines()[-20:]
        return "\n".join(texts)


def _group_name(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _greets(port: int) -> bool:
    """Whether an LMTP server on ``port`` says ``220`` (then says QUIT)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            greeting = s.recv(512)
            s.sendall(b"QUIT\r\n")
            return greeting.startswith(b"220")
    except OSError:
        return False

"""
The disk fills up: under the SQLite spool, and under the archive.

Each test mounts a small ``tmpfs`` of its own (``mount -t tmpfs -o size=``,
as root, as CI runs) for the spool or the archive, runs the embedded
default (``twistd mailhub``) over it, and fills the filesystem with a file
until ``ENOSPC``.  Where it cannot mount (no privilege), or with
``MAILHUB_FAULTS_DISK=injected``, the hub runs with ``tests/faults/inject``'s
``sitecustomize`` instead, which makes SQLite's writes and the body log's
under that directory fail as on a full disk (``SQLITE_FULL``, ``ENOSPC``)
while a flag file exists.  The promises:

- spool full: a client gets ``452 4.3.1`` and keeps its message; nothing
  half-written is left behind (no refused message is ever delivered, the
  database passes ``PRAGMA integrity_check``, the spool ends empty);
  acceptance resumes by itself as soon as space returns, without a restart;
- archive full: the hub keeps accepting into the spool and delivering, the
  archive's entries (``archive:local``) wait in the spool, and once space
  returns every acknowledged message reaches the archive.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from faults.tally import Tally
from hubprocess import HubProcess, eventually, free_port, hub_config, message, send
from mailhub.testing.downstream import DownstreamServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: Bigger than the sqlite store's ``LOG_THRESHOLD`` (16 KB): the body goes to
#: a body-log segment, which needs new blocks on the full filesystem.
BIG = 40 * 1024
DELIVERY = "[delivery]\nlease_seconds = 5\ntakeover_seconds = 2\nmax_scan_interval = 1\n"
EXTRA = "[smtp]\nmax_messages_per_minute_per_ip = 100000\n"


INJECT = Path(__file__).parent / "inject"


class Disk:
    """
    A directory whose filesystem the test fills and frees: a 24 MB ``tmpfs``
    of its own, or (``injected``) a plain directory with the failures
    injected into the hub's processes.

    :ivar path: the directory, for the spool or the archive.
    :ivar env: the hub's environment.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "disk"
        self.path.mkdir()
        self._flag = tmp_path / "disk-is-full"
        self.env = dict(os.environ)
        self.kind = "tmpfs"
        if os.environ.get("MAILHUB_FAULTS_DISK") != "injected":
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(self.path)],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return
        self.kind = "injected"
        self.env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")])),
            MAILHUB_FAULT_FULL_FLAG=str(self._flag),
            MAILHUB_FAULT_FULL_UNDER=str(self.path),
        )

    async def fill(self) -> None:
        if self.kind == "tmpfs":
            await deferToThread(fill, self.path)
        else:
            self._flag.touch()

    def free(self) -> None:
        if self.kind == "tmpfs":
            os.unlink(self.path / "filler")
        else:
            self._flag.unlink()

    def unmount(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


class Hub(HubProcess):
    """``twistd mailhub`` with the disk's environment."""

    def __init__(self, directory: Path, config: str, disk: Disk) -> None:
        super().__init__(directory, config)
        self._env = disk.env

    def start(self) -> None:
        self.process = subprocess.Popen(self.command(), cwd="/", stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, env=self._env)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Disk]:
    disk = Disk(tmp_path)
    try:
        yield disk
    finally:
        disk.unmount()


def fill(directory: Path) -> int:
    """Write ``directory/filler`` until the filesystem is full (blocking); the octets written."""
    written = 0
    chunk = b"\0" * 65536
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                written += os.write(fd, chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return written
                chunk = chunk[: len(chunk) // 16 or 1]
    finally:
        os.close(fd)


def big_message(tag: str) -> bytes:
    lines = b"X" * 76 + b"\r\n"
    return message(tag).replace(b"Body of", lines * (BIG // len(lines)) + b"Body of")


async def sent(tally: Tally, port: int, tag: str, data: bytes) -> tuple[int, str]:
    code, text = await send(port, data)
    tally.reply(tag, code)
    return code, text


@pytest_twisted.ensureDeferred
async def test_spool_disk_full_gives_452_and_acceptance_resumes_by_itself(
    tmp_path: Path, small_disk: Disk, downstream: DownstreamServer
) -> None:
    port = free_port()
    spool = small_disk.path / "spool.db"
    hub = Hub(tmp_path, hub_config(spool, downstream.port, {"dallas": port}, delivery=DELIVERY, extra=EXTRA),
              small_disk)
    tally = Tally()
    hub.start()
    try:
        await hub.started(port)
        for i in range(3):
            assert (await sent(tally, port, f"before-{i}", big_message(f"before-{i}")))[0] == 250
        await small_disk.fill()
        replies = [await sent(tally, port, f"full-{i}", big_message(f"full-{i}")) for i in range(4)]
        # Small ones may still fit in pages SQLite already has: 250 or 452, never anything else.
        small = [await sent(tally, port, f"small-{i}", message(f"small-{i}")) for i in range(4)]
        small_disk.free()
        freed = time.monotonic()
        i = 0
        while True:
            code, _ = await sent(tally, port, f"after-{i}", big_message(f"after-{i}"))
            i += 1
            if code == 250 or time.monotonic() - freed > 30:
                break
        recovered = time.monotonic() - freed
        await eventually(lambda: tally.acknowledged <= set(Tally.delivered(downstream.messages)),
                         timeout=30, what="every acknowledged message delivered")

        async def empty() -> bool:
            return await hub.queue() == []

        await eventually(empty, timeout=30, what="an empty spool")
    finally:
        await hub.stop(signal.SIGTERM)
    tally.report("disk full under the SQLite spool", downstream.messages, recovered,
                 note=f"{small_disk.kind}; {sum(c == 452 for c in tally.refused.values())} transactions got 452")
    assert all(code == 452 and "4.3.1" in text for code, text in replies), replies
    assert all(code == 250 or (code == 452 and "4.3.1" in text) for code, text in small), small
    assert code == 250 and recovered < 5, "acceptance did not resume when space returned"
    # Nothing half-written: what was refused never reaches the server, what was acknowledged does.
    assert set(Tally.delivered(downstream.messages)) == tally.acknowledged
    assert tally.lost(downstream.messages) == set()
    integrity = await deferToThread(_integrity, spool)
    assert integrity == "ok"


def _integrity(path: Path) -> str:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


@pytest_twisted.ensureDeferred
async def test_archive_disk_full_keeps_accepting_and_archives_later(
    tmp_path: Path, small_disk: Disk, downstream: DownstreamServer
) -> None:
    port = free_port()
    archive = f'[archive]\nplugin = "sqlite"\npath = "{small_disk.path / "archive.db"}"\n'
    hub = Hub(tmp_path, hub_config(tmp_path / "spool.db", downstream.port, {"dallas": port},
                                   retry_minutes=0.02, delivery=DELIVERY, extra=EXTRA + archive), small_disk)
    tally = Tally()
    hub.start()
    try:
        await hub.started(port)
        assert (await sent(tally, port, "before", big_message("before")))[0] == 250

        async def archived_first() -> bool:
            return await archived(hub) == {"before"}

        await eventually(archived_first, timeout=30, what="the first message archived")
        await small_disk.fill()
        for i in range(6):
            code, text = await sent(tally, port, f"full-{i}", big_message(f"full-{i}"))
            assert code == 250, text
        await eventually(lambda: tally.acknowledged <= set(Tally.delivered(downstream.messages)),
                         timeout=30, what="every message delivered while the archive is full")

        async def waiting() -> int:
            return sum(e["route"] == "archive:local" for e in await hub.queue())

        # The archive's copies wait in the spool (some may have found room in pages SQLite had).
        backlog = await eventually(waiting, timeout=30, what="archive entries waiting in the spool")
        small_disk.free()
        freed = time.monotonic()

        async def archived_all() -> bool:
            return await archived(hub) == tally.acknowledged

        await eventually(archived_all, timeout=60, what="every acknowledged message archived")
        recovered = time.monotonic() - freed
        assert await waiting() == 0
    finally:
        await hub.stop(signal.SIGTERM)
    tally.report("disk full under the archive", downstream.messages, recovered,
                 note=f"{small_disk.kind}; {backlog} archive entries waited in the spool")
    assert Tally.delivered(downstream.messages) == {tag: 1 for tag in tally.acknowledged}


async def archived(hub: HubProcess) -> set[str]:
    """The subjects (tags) of alice's archived messages, from ``mailhub archive search``."""
    out = await deferToThread(
        hub.cli, "archive", "search", "--mailbox", "alice@example.com", "--limit", "1000", "--json"
    )
    if out.returncode != 0:
        return set()
    found = json.loads(out.stdout)
    items = found["items"] if isinstance(found, dict) else found
    return {item["subject"] for item in items}

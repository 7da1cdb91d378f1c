"""
The archive's worker process (``mailhub.archive.worker``): a real child
process with the real ``sqlite`` archive, on the real reactor.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from mailhub.archive.worker import MAX_FRAME, ArchiveProcess, FrameDecoder, frame
from mailhub.model import Address, ArchivedMessage, ArchiveQuery, ArchiveScope, StoreUnavailable
from mailhub.plugin import load_plugin

ALICE = Address("alice", "example.com")
BOB = Address("bob", "example.com")


def message(n: int, subject: str = "quarterly report") -> ArchivedMessage:
    body = (
        f"From: Carol <carol@outside.example>\r\nTo: alice@example.com\r\n"
        f"Subject: =?utf-8?q?{subject.replace(' ', '_')}_n=C2=B0{n}?=\r\nMessage-ID: <m{n}@outside.example>\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\nthe figures for zanzibar{n}\r\n"
    ).encode()
    return ArchivedMessage(
        id=f"msg-{n}", received_at=1_700_000_000.0 + n, sender=Address("carol", "outside.example"),
        mailboxes=(ALICE, BOB) if n % 2 else (ALICE,), message=body,
    )


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def test_frames_split_and_joined() -> None:
    decoder = FrameDecoder()
    stream = frame(b"one") + frame(b"") + frame(b"x" * 70000)
    got = []
    for i in range(0, len(stream), 7):
        got += decoder.feed(stream[i : i + 7])
    assert got == [b"one", b"", b"x" * 70000]
    assert decoder.feed(b"") == []


def test_oversized_frame_refused() -> None:
    with pytest.raises(ValueError):
        FrameDecoder().feed((MAX_FRAME + 1).to_bytes(4, "big"))


def open_archive(path: Path):  # type: ignore[no-untyped-def]
    return load_plugin("mailhub.archives", "sqlite").make({"path": str(path), "config_dir": "/"}, reactor)


@pytest_twisted.ensureDeferred
async def test_child_decodes_indexes_and_commits(tmp_path: Path) -> None:
    path = tmp_path / "archive.db"
    worker = ArchiveProcess("sqlite", {"path": str(path), "config_dir": "/"}, reactor, nice=5)
    try:
        await gatherResults([worker.add(message(n)) for n in range(40)], consumeErrors=True)
        assert worker.pending == 0
    finally:
        await worker.close()
    archive = open_archive(path)
    try:
        # Decoded in the child: the RFC 2047 subject, the body's words, per mailbox.
        page = await archive.search(ArchiveScope(mailbox=ALICE), ArchiveQuery(words=("zanzibar7",)), None, 10)
        assert [s.id for s in page.items] == ["msg-7"]
        assert "n°7" in page.items[0].subject
        assert await archive.count(ArchiveScope(mailbox=ALICE), ArchiveQuery()) == 40
        assert await archive.count(ArchiveScope(mailbox=BOB), ArchiveQuery()) == 20
        stored = await archive.get("msg-3")
        assert stored is not None and stored.message == message(3).message
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_close_lets_the_child_finish_what_it_has(tmp_path: Path) -> None:
    path = tmp_path / "archive.db"
    worker = ArchiveProcess("sqlite", {"path": str(path), "config_dir": "/"}, reactor)
    adds = [worker.add(message(n)) for n in range(25)]
    closed = worker.close()
    await gatherResults(adds, consumeErrors=True)
    await closed
    # After close, adds are refused at once (the spool keeps the entry).
    with pytest.raises(StoreUnavailable):
        await worker.add(message(99))
    archive = open_archive(path)
    try:
        assert await archive.count(ArchiveScope(mailbox=ALICE), ArchiveQuery()) == 25
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_a_killed_child_fails_its_adds_and_is_restarted(tmp_path: Path) -> None:
    path = tmp_path / "archive.db"
    worker = ArchiveProcess("sqlite", {"path": str(path), "config_dir": "/"}, reactor)
    # Longer than this test takes to reach the refused add, however loaded
    # the machine (it counts from the child's start); then none.
    worker.RESTART_SECONDS = 600
    try:
        await worker.add(message(1))
        assert worker._child is not None and worker._child.transport is not None
        pid = worker._child.transport.pid
        # Many adds in flight, then SIGKILL: each either committed or failed, none hangs.
        adds = [worker.add(message(n)) for n in range(2, 200)]
        os.kill(pid, signal.SIGKILL)
        results = []
        for d in adds:
            try:
                await d
                results.append("ok")
            except StoreUnavailable:
                results.append("retry")
        assert "retry" in results
        # Within RESTART_SECONDS: refused at once, no fork storm.
        with pytest.raises(StoreUnavailable):
            await worker.add(message(500))
        worker.RESTART_SECONDS = 0
        await worker.add(message(501))
        assert worker._child is not None and worker._child.transport.pid != pid
    finally:
        await worker.close()
    archive = open_archive(path)
    try:
        assert await archive.get("msg-501") is not None
    finally:
        await archive.close()


@pytest_twisted.ensureDeferred
async def test_a_child_that_cannot_open_the_archive_fails_adds(tmp_path: Path) -> None:
    # A directory where the database file should be: the plugin cannot open it.
    (tmp_path / "archive.db").mkdir()
    worker = ArchiveProcess("sqlite", {"path": str(tmp_path / "archive.db"), "config_dir": "/"}, reactor)
    try:
        with pytest.raises(StoreUnavailable):
            await worker.add(message(1))
    finally:
        await worker.close()


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_hub_archives_through_its_worker_and_survives_its_death(tmp_path: Path, downstream) -> None:  # type: ignore[no-untyped-def]
    """A real ``twistd mailhub``: the worker is its child; killed, what it had is archived anyway."""
    from test_archive_integration import archive_hub, cli_json
    from twisted.internet.threads import deferToThread

    from hubprocess import eventually, message, send

    hub, port, _web = archive_hub(tmp_path, downstream)
    hub.start()
    try:
        await hub.started(port)
        for i in range(5):
            code, _ = await send(port, message(f"before-{i}"), recipients=["alice@example.com"])
            assert code == 250

        async def archived(n: int) -> bool:
            found = await cli_json(hub, "archive", "search", "--mailbox", "alice@example.com", "--json")
            return found["total"] == n  # type: ignore[index]

        await eventually(lambda: archived(5), timeout=30, what="5 archived")
        assert hub.process is not None
        [worker] = children_of(hub.process.pid)
        assert b"mailhub.archive.worker" in Path(f"/proc/{worker}/cmdline").read_bytes()
        os.kill(worker, signal.SIGKILL)
        for i in range(5):
            code, _ = await send(port, message(f"after-{i}"), recipients=["alice@example.com"])
            assert code == 250
        await eventually(lambda: archived(10), timeout=60, what="10 archived after the worker died")
        assert "archive worker ended (signal 9)" in hub.log()
        [again] = await deferToThread(children_of, hub.process.pid)
        assert again != worker
    finally:
        await hub.stop()
    # The worker stops with the hub.
    await eventually(lambda: not Path(f"/proc/{again}").exists(), timeout=10, what="the worker gone")


def test_the_child_ends_when_its_hub_dies_without_closing_it(tmp_path: Path) -> None:
    """
    A hub killed with SIGKILL closes nothing: the child sees its standard
    input and output go and must end by itself, not linger holding the
    archive open (found after the kill -9 tests left children behind).
    """
    import json
    import subprocess
    import sys
    import time

    child = subprocess.Popen(
        [sys.executable, "-m", "mailhub.archive.worker"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        setup = {"plugin": "sqlite", "config": {"path": str(tmp_path / "archive.db"), "config_dir": "/"}}
        child.stdin.write(frame(json.dumps(setup).encode()))
        child.stdin.flush()
        time.sleep(1.0)  # opened
        assert child.poll() is None
        # What the kernel does for a hub that dies: both pipes' other ends close.
        child.stdin.close()
        child.stdout.close()
        child.wait(timeout=15)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

"""
The archive's worker process: decoding and indexing out of the hub's process.

Archiving a message costs more CPU than accepting it: the MIME is parsed
and reduced to text (``mailhub.archive.text``), the words are indexed, the
body is compressed and hashed.  Done in the hub's process, that work holds
the interpreter lock the front door needs, and ingest drops to less than
half.  So when the archive plugin says that several processes may open the
same archive (``IArchivePlugin.shareable``), the hub archives through a
child process of its own (``[archive] processes = 1``, the default), run at
a lower CPU priority (``[archive] nice = 10``): under a burst the front door
and the relay keep the CPU, the archive's backlog grows in the spool (its
``archive:local`` entries, visible in ``mailhub status``) and is worked off
as soon as the CPU is free.  Nothing changes for durability: the spool entry
leaves only when the child answers that the copy is committed, and a child
that dies, or cannot start, fails its pending adds with ``StoreUnavailable``
(the entries are deferred and retried; the hub starts a new child, at most
once every ``RESTART_SECONDS``).

The hub's own process keeps its ``IArchive`` for everything else (search,
the web pages, retention, accounts): only ``add`` of the archive route goes
to the child.

The pipe carries frames: a 4-byte big-endian length, then that many bytes.
The parent sends one ``setup`` frame (JSON: the plugin's name, its
``[archive]`` table, the nice increment), then per message two frames, a
JSON header (``n``, ``id``, ``received_at``, ``sender``, ``mailboxes``) and
the message's bytes; the child answers each with one JSON frame
(``{"n": N}`` when committed, ``{"n": N, "error": "unavailable"|"full"|"error",
"why": TEXT}`` when not).  The child's stderr goes to the hub's log.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.model import Address, ArchivedMessage, StoreFull, StoreUnavailable

__all__ = ["ArchiveProcess", "FrameDecoder", "frame", "main"]

_LENGTH = struct.Struct(">I")

#: The largest frame either side accepts (a message is one frame).
MAX_FRAME = 1 << 30


def frame(payload: bytes) -> bytes:
    """``payload`` as one frame of the pipe."""
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frames; ``feed`` returns the complete ones."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        start = 0
        buffer = self._buffer
        while len(buffer) - start >= 4:
            (size,) = _LENGTH.unpack_from(buffer, start)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes")
            if len(buffer) - start - 4 < size:
                break
            frames.append(bytes(buffer[start + 4 : start + 4 + size]))
            start += 4 + size
        del buffer[:start]
        return frames


def _header(message: ArchivedMessage, n: int) -> bytes:
    return json.dumps(
        {
            "n": n,
            "id": message.id,
            "received_at": message.received_at,
            "sender": None if message.sender is None else [message.sender.local, message.sender.domain],
            "mailboxes": [[m.local, m.domain] for m in message.mailboxes],
        }
    ).encode("utf-8")


class _ChildProtocol(ProcessProtocol):
    def __init__(self, owner: ArchiveProcess) -> None:
        self._owner = owner
        self._frames = FrameDecoder()
        self._stderr = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            try:
                replies = self._frames.feed(data)
            except ValueError as e:
                self._owner.log.error("archive worker: bad reply ({why}); stopping it", why=str(e))
                assert self.transport is not None
                self.transport.signalProcess("KILL")
                return
            for payload in replies:
                self._owner._reply(json.loads(payload))
        else:
            self._stderr += data
            *lines, self._stderr = self._stderr.split(b"\n")
            for line in lines:
                if line.strip():
                    self._owner.log.warn(
                        "archive worker: {line}", line=line.decode("utf-8", "replace")
                    )

    def processEnded(self, reason: Failure) -> None:
        self._owner._ended(self, reason)


class ArchiveProcess:
    """
    The parent's side: ``add`` sends a message to the child and fires once
    the child has committed it.

    :param plugin: the archive plugin's name (``[archive] plugin``).
    :param config: its table as ``IArchivePlugin.make`` takes it (JSON-able).
    :param nice: the child's CPU priority increment (``os.nice``).
    :param spawn: ``reactor.spawnProcess`` (tests may give another).
    """

    log = Logger()

    #: Seconds between two starts of the child after it ended.
    RESTART_SECONDS = 5.0

    def __init__(
        self,
        plugin: str,
        config: dict[str, Any],
        reactor: Any,
        nice: int = 10,
        spawn: Callable[..., Any] | None = None,
    ) -> None:
        self._setup = json.dumps({"plugin": plugin, "config": config, "nice": nice}).encode("utf-8")
        self._reactor = reactor
        self._spawn = spawn if spawn is not None else reactor.spawnProcess
        self._child: _ChildProtocol | None = None
        self._pending: dict[int, Deferred[None]] = {}
        self._next = 0
        self._started_at: float | None = None
        self._closing: Deferred[None] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """How many adds the child has not answered yet."""
        return len(self._pending)

    def add(self, message: ArchivedMessage) -> Deferred[None]:
        if self._closed:
            return fail(StoreUnavailable("the archive worker is stopping"))
        child = self._child
        if child is None:
            now = self._reactor.seconds()
            if self._started_at is not None and now - self._started_at < self.RESTART_SECONDS:
                return fail(StoreUnavailable("the archive worker ended; it is restarted shortly"))
            self._started_at = now
            try:
                child = self._start()
            except Exception as e:
                return fail(StoreUnavailable(f"the archive worker could not start: {e}"))
        self._next += 1
        n = self._next
        d: Deferred[None] = Deferred()
        self._pending[n] = d
        assert child.transport is not None
        child.transport.writeSequence([frame(_header(message, n)), frame(message.message)])
        return d

    def _start(self) -> _ChildProtocol:
        child = _ChildProtocol(self)
        self._spawn(
            child,
            sys.executable,
            [sys.executable, "-m", "mailhub.archive.worker"],
            env=os.environ.copy(),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        assert child.transport is not None
        child.transport.write(frame(self._setup))
        self._child = child
        self.log.info("archive worker started (pid {pid})", pid=getattr(child.transport, "pid", None))
        return child

    def _reply(self, reply: dict[str, Any]) -> None:
        if "fatal" in reply:
            self.log.error("archive worker cannot archive: {why}", why=reply["fatal"])
            return
        d = self._pending.pop(reply["n"], None)
        if d is None:
            return
        error = reply.get("error")
        if error is None:
            d.callback(None)
        elif error == "full":
            d.errback(StoreFull(reply.get("why", "archive full")))
        elif error == "unavailable":
            d.errback(StoreUnavailable(reply.get("why", "archive unavailable")))
        else:
            d.errback(RuntimeError(reply.get("why", "archive worker error")))

    def _ended(self, child: _ChildProtocol, reason: Failure) -> None:
        if child is self._child:
            self._child = None
        pending, self._pending = self._pending, {}
        if not self._closed or not reason.check(ProcessDone):
            why = reason.value
            if isinstance(why, ProcessTerminated):
                text = f"exit status {why.exitCode}" if why.signal is None else f"signal {why.signal}"
            else:
                text = str(why)
            if not self._closed:
                self.log.error(
                    "archive worker ended ({why}); {n} adds to retry", why=text, n=len(pending)
                )
        for d in pending.values():
            d.errback(StoreUnavailable("the archive worker ended before committing"))
        if self._closing is not None:
            closing, self._closing = self._closing, None
            closing.callback(None)

    def close(self, timeout: float = 30.0) -> Deferred[None]:
        """Let the child finish what it has, close its archive and end (killed after ``timeout``)."""
        self._closed = True
        child = self._child
        if child is None or child.transport is None:
            return succeed(None)
        self._closing = Deferred()
        child.transport.closeStdin()
        transport = child.transport
        killer = self._reactor.callLater(timeout, lambda: transport.signalProcess("KILL"))

        def done(result: None) -> None:
            if killer.active():
                killer.cancel()

        return self._closing.addCallback(done)


@implementer(IHalfCloseableProtocol)
class _Worker(Protocol):
    """The child's side, on its standard input and output."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._frames = FrameDecoder()
        self._archive: Any = None
        self._header: dict[str, Any] | None = None
        self._inflight: set[Deferred[None]] = set()
        self._finishing = False
        self._ended = False

    def dataReceived(self, data: bytes) -> None:
        for payload in self._frames.feed(data):
            if self._archive is None:
                self._open(json.loads(payload))
            elif self._header is None:
                self._header = json.loads(payload)
            else:
                header, self._header = self._header, None
                d = ensureDeferred(self._add(header, payload))
                self._inflight.add(d)
                d.addBoth(self._landed, d)

    def _landed(self, result: object, d: Deferred[None]) -> object:
        self._inflight.discard(d)
        return result

    def _open(self, setup: dict[str, Any]) -> None:
        from mailhub.plugin import load_plugin

        nice = int(setup.get("nice", 0))
        if nice:
            os.nice(nice)
        try:
            factory = load_plugin("mailhub.archives", setup["plugin"])
            self._archive = factory.make(setup["config"], self._reactor)
        except Exception as e:
            self._send({"fatal": f"{type(e).__name__}: {e}"})
            assert self.transport is not None
            self.transport.loseConnection()

    async def _add(self, header: dict[str, Any], message: bytes) -> None:
        from twisted.internet.threads import deferToThreadPool

        from mailhub.archive.text import extract

        reply: dict[str, Any] = {"n": header["n"]}
        try:
            pool = self._reactor.getThreadPool()
            text = await deferToThreadPool(self._reactor, pool, extract, message)
            sender = header["sender"]
            await self._archive.add(
                ArchivedMessage(
                    id=header["id"],
                    received_at=header["received_at"],
                    sender=None if sender is None else Address(*sender),
                    mailboxes=tuple(Address(*m) for m in header["mailboxes"]),
                    message=message,
                    text=text,
                )
            )
        except StoreFull as e:
            reply.update(error="full", why=str(e))
        except StoreUnavailable as e:
            reply.update(error="unavailable", why=str(e))
        except Exception as e:
            reply.update(error="error", why=f"{type(e).__name__}: {e}")
        self._send(reply)

    def _send(self, reply: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(frame(json.dumps(reply).encode("utf-8")))

    def readConnectionLost(self) -> None:
        # The hub closed our stdin: finish what is in flight, then end.
        ensureDeferred(self._finish())

    def writeConnectionLost(self) -> None:
        # The hub is gone: nobody can take an answer; end as cleanly as we can.
        ensureDeferred(self._finish())

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._end()

    def _end(self) -> None:
        if self._reactor.running and not self._ended:
            self._ended = True
            self._reactor.stop()

    async def _finish(self) -> None:
        if self._finishing:
            return
        self._finishing = True
        try:
            if self._inflight:
                await DeferredList(list(self._inflight))
            if self._archive is not None:
                await self._archive.close()
        finally:
            assert self.transport is not None
            self.transport.loseConnection()
            # loseConnection writes what is buffered, then connectionLost
            # ends the reactor; with both pipes already gone (a hub killed
            # outright) StandardIO never calls it: end a moment later all
            # the same.
            self._reactor.callLater(1.0, self._end)


def main() -> None:
    """The child's entry point: ``python -m mailhub.archive.worker``."""
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO

    worker = _Worker(reactor)
    StandardIO(worker, reactor=reactor)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()

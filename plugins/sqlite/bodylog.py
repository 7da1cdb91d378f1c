"""
The sqlite store's body log: bodies over ``LOG_THRESHOLD`` octets appended
to segment files in ``<database path>.bodies/`` rather than stored in the
database, fdatasync'd before the ``COMMIT`` that refers to them, swept when
no message refers to a segment and compacted when few do.  Used on the
writer's thread (``read`` on any); never on the reactor thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import sqlite3
import time

from mailhub.model import StoreFull, StoreUnavailable

__all__ = ["LOG_THRESHOLD", "SEGMENT_SIZE", "BodyLog", "read_exactly"]

#: Bodies larger than this (octets) go to the body log, not into the database.
#: Below it SQLite is the cheaper place: a 4 KB body shares its page.
LOG_THRESHOLD = 16 * 1024

#: A segment of the body log is closed once it holds this much: it is
#: deleted when its last message is, so smaller segments give space back
#: sooner (at the cost of a directory fsync each).
SEGMENT_SIZE = 16 * 1024 * 1024

#: Seconds between the writer's sweeps for segments no message refers to.
SWEEP_INTERVAL = 10.0

#: A closed segment at most this fraction of which is still in use, with
#: at least ``COMPACT_MIN_DEAD`` octets not in use, has its bodies still in
#: use copied to the open segment (``BodyLog.compact``), so that it can go.
COMPACT_LIVE_FRACTION = 0.25
COMPACT_MIN_DEAD = 4 * 1024 * 1024
#: ... and last written this many seconds ago: what is still in use then is
#: mail that waits (a deferral is 20 minutes), not mail about to be delivered.
COMPACT_MIN_AGE = 600.0

_SEGMENT_NAME = re.compile(r"[0-9a-f]{12}-[0-9]{6,}\Z")
#: A segment being created (locked, not yet named); left behind only by a crash.
_NEW_SEGMENT_NAME = re.compile(r"[0-9a-f]{12}-[0-9]{6,}\.new\Z")


class BodyLog:
    """
    The large bodies of a store, appended to segment files in the directory
    ``<database path>.bodies``; used by the writer thread, except ``read``
    (any thread).

    A batch's bodies are written with ``pwrite`` as its jobs run and made
    durable with one ``fdatasync`` (``sync``) before its ``COMMIT``.

    Several stores (nodes, processes) may share the database, each with
    segments of its own (named by a random token).  A segment is deleted by
    whichever store's sweep finds that no message refers to it and can take
    the segment's ``flock``; its writer holds that lock from before the
    segment has its name until the batch that last appended to it is
    committed, so no sweep deletes a segment that a commit is about to
    refer to.
    """

    def __init__(self, path: str) -> None:
        self.directory = path + ".bodies"
        self._token = secrets.token_hex(6)
        self._sequence = 0
        self._fd: int | None = None
        self._name = ""
        self._size = 0
        self._unsynced = False
        # A failed fdatasync of a segment closed during the current batch: the
        # batch's bodies there may be lost, so the whole batch fails.
        self._lost: StoreUnavailable | None = None
        # Segments closed during the current batch: locked until it commits.
        self._retired: list[int] = []
        self._directory_synced = False
        self._next_sweep = 0.0
        # Segments the last sweep found unused: deleted if the next finds
        # them unused too.  (A reader that has a body's row in its snapshot
        # opens the segment a moment later; the time between sweeps covers it.)
        self._unused: set[str] = set()
        #: Segments this log deleted, and compacted (for tests and metrics).
        self.swept = 0
        self.compacted = 0

    def _path(self, segment: str) -> str:
        return os.path.join(self.directory, segment)

    def usage(self) -> dict[str, int]:
        """The segments on disk and their octets (any thread)."""
        segments = octets = 0
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            names = []
        for name in names:
            if _SEGMENT_NAME.match(name):
                with contextlib.suppress(FileNotFoundError):
                    octets += os.stat(self._path(name)).st_size
                    segments += 1
        return {"segments": segments, "octets": octets}

    def append(self, body: bytes) -> tuple[str, int]:
        """Write ``body`` to the open segment: its (segment, offset), durable after ``sync``."""
        if self._fd is None or (self._size > 0 and self._size + len(body) > SEGMENT_SIZE):
            self._next_segment()
        assert self._fd is not None
        offset = self._size
        try:
            with memoryview(body) as view:
                done = 0
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as e:
            # What was written is never referred to; the next append starts
            # after it (a short write leaves the rest of the file unknown).
            self._size = offset + len(body)
            raise body_log_error(e, self._path(self._name)) from e
        self._size += len(body)
        self._unsynced = True
        return self._name, offset

    def sync(self) -> None:
        """
        Make what the batch appended durable (before its ``COMMIT``), or
        raise: then the batch must not commit.
        """
        lost, self._lost = self._lost, None
        if lost is not None:
            raise lost
        self._sync_open_segment()

    def _sync_open_segment(self) -> None:
        if self._fd is not None and self._unsynced:
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                # After a failed fdatasync the page cache no longer says what
                # is on disk: nothing more goes to this segment.
                self._retire()
                raise body_log_error(e, self._path(self._name)) from e
            self._unsynced = False

    def batch_over(self) -> None:
        """
        The batch is over, committed or not (writer thread, after every
        batch): the segments closed during it may be swept, and what it
        appended and did not commit is no row's.
        """
        self._lost = None
        self._unsynced = False
        retired, self._retired = self._retired, []
        for fd in retired:
            try:
                os.close(fd)
            except OSError:
                # The lock goes with the descriptor, closed or not.
                pass

    def close(self) -> None:
        self._retire()
        self.batch_over()

    def read(self, segment: str, offset: int, length: int) -> bytes:
        """The body at ``offset`` in ``segment`` (any thread)."""
        if not _SEGMENT_NAME.match(segment):
            raise StoreUnavailable(f"spool database names a body segment {segment!r} that is not one")
        path = self._path(segment)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreUnavailable(f"spool body file {path} is missing") from None
        except OSError as e:
            raise body_log_error(e, path) from e
        try:
            return read_exactly(fd, offset, length, path)
        finally:
            os.close(fd)

    def _retire(self) -> None:
        if self._fd is not None:
            self._retired.append(self._fd)
            self._fd = None
            # Its unsynced octets, if any, are no row's: nothing commits them now.
            self._unsynced = False

    def _next_segment(self) -> None:
        if self._fd is not None:
            # The batch's bodies in it are made durable now; its lock is
            # kept until the batch commits.
            try:
                self._sync_open_segment()
            except StoreUnavailable as e:
                self._lost = e
                raise
            self._retire()
        try:
            if not self._directory_synced:
                # Whoever made the directory, its entry must be durable before
                # a row refers to a segment in it.
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                fsync_directory(os.path.dirname(os.path.abspath(self.directory)))
                self._directory_synced = True
            self._sequence += 1
            name = f"{self._token}-{self._sequence:06d}"
            # Locked under a name no sweep looks at, then renamed: a sweep
            # never sees this segment unlocked.
            fresh = self._path(name + ".new")
            fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(fresh, self._path(name))
                fsync_directory(self.directory)
            except BaseException:
                os.close(fd)
                raise
        except OSError as e:
            raise body_log_error(e, self.directory) from e
        self._fd, self._name, self._size = fd, name, 0

    def sweep_now_and_then(self, conn: sqlite3.Connection) -> None:
        """
        Between batches: ``sweep``, then ``compact`` one segment, if
        ``SWEEP_INTERVAL`` has passed since the last time.
        """
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            try:
                self.sweep(conn)
                self.compact(conn)
            except (OSError, sqlite3.Error, StoreUnavailable):
                # Retried at the next sweep; the space is only freed later.
                pass

    def compact(self, conn: sqlite3.Connection, now: float | None = None) -> bool:
        """
        Copy the bodies still in use in a closed segment that is mostly
        unused (at most ``COMPACT_LIVE_FRACTION`` of it in use, at least
        ``COMPACT_MIN_DEAD`` octets unused, last written ``COMPACT_MIN_AGE``
        seconds before ``now``) to the open segment, and point
        their rows there, in one transaction committed after the copies are
        fdatasync'd.  The old segment, now unused, goes at a later sweep.
        Without this, one long-deferred message would keep a whole segment.
        Writer thread; one segment at a time.  Outside a transaction it runs
        in one of its own; inside a writer batch's, that batch's commit
        makes the copies durable first.

        :returns: whether a segment was compacted.
        """
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return False
        for name in names:
            if not _SEGMENT_NAME.match(name) or name == self._name:
                continue
            count, live = conn.execute(
                "SELECT count(*), coalesce(sum(log_length), 0) FROM messages WHERE log_segment = ?",
                (name,),
            ).fetchone()
            path = self._path(name)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            size, dead = stat.st_size, stat.st_size - live
            if count == 0 or live > size * COMPACT_LIVE_FRACTION or dead < COMPACT_MIN_DEAD:
                continue
            if (time.time() if now is None else now) - stat.st_mtime < COMPACT_MIN_AGE:
                continue
            if self._compact(conn, name, path):
                return True
        return False

    def _compact(self, conn: sqlite3.Connection, name: str, path: str) -> bool:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its writer still holds it
            # Run as a job of a batch (a test's, an operator's), the batch's
            # commit makes the copies durable first, as for any new body.
            own = not conn.in_transaction
            if own:
                conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(
                    "SELECT id, log_offset, log_length FROM messages WHERE log_segment = ?", (name,)
                ).fetchall()
                for message_id, offset, length in rows:
                    body = read_exactly(fd, offset, length, path)
                    segment, new_offset = self.append(body)
                    conn.execute(
                        "UPDATE messages SET log_segment = ?, log_offset = ? WHERE id = ?",
                        (segment, new_offset, message_id),
                    )
                if own:
                    self.sync()
                    conn.execute("COMMIT")
            except BaseException:
                if own and conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                if own:
                    self.batch_over()
            self.compacted += 1
            return True
        finally:
            os.close(fd)

    def sweep(self, conn: sqlite3.Connection, now: float | None = None) -> int:
        """
        Delete the segments that no message refers to, that the previous
        sweep found unused too, and that no writer holds (writer thread,
        outside a transaction): how many.  Also a ``.new`` file a crash left
        behind, an hour on.
        """
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return 0
        unused = set()
        deleted = 0
        for name in sorted(names):
            if _NEW_SEGMENT_NAME.match(name):
                path = self._path(name)
                with contextlib.suppress(OSError):
                    if (time.time() if now is None else now) - os.stat(path).st_mtime > 3600:
                        deleted += self._delete_if_free(path, None, conn)
                continue
            if not _SEGMENT_NAME.match(name) or name == self._name or self._used(conn, name):
                continue
            if name not in self._unused:
                unused.add(name)
                continue
            if not self._delete_if_free(self._path(name), name, conn):
                unused.add(name)  # held by a writer: not yet
            else:
                deleted += 1
        self._unused = unused
        self.swept += deleted
        return deleted

    @staticmethod
    def _used(conn: sqlite3.Connection, name: str) -> bool:
        return (
            conn.execute("SELECT 1 FROM messages WHERE log_segment = ? LIMIT 1", (name,)).fetchone()
            is not None
        )

    def _delete_if_free(self, path: str, name: str | None, conn: sqlite3.Connection) -> int:
        """Delete ``path`` if no writer holds it and (for a segment) still no row uses it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a writer appends to it, or its batch is not committed
            # Asked again under the lock: a batch that committed a row using
            # it after the first question released the lock only after that.
            if name is not None and self._used(conn, name):
                return 0
            os.unlink(path)
            return 1
        finally:
            os.close(fd)


def read_exactly(fd: int, offset: int, length: int, path: str) -> bytes:
    """``length`` octets at ``offset`` of the segment open as ``fd`` (at ``path``)."""
    parts = []
    done = 0
    try:
        while done < length:
            part = os.pread(fd, length - done, offset + done)
            if not part:
                raise StoreUnavailable(
                    f"spool body file {path} ends at {offset + done} octets,"
                    f" where the database says a body runs to {offset + length}"
                )
            parts.append(part)
            done += len(part)
    except OSError as e:
        raise body_log_error(e, path) from e
    return parts[0] if len(parts) == 1 else b"".join(parts)


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def body_log_error(e: OSError, path: str) -> StoreUnavailable:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"spool body file {path}: {e.strerror}")
    return StoreUnavailable(f"spool body file {path}: {e.strerror or e}")

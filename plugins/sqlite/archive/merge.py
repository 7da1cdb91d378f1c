"""
Keeping the sqlite archive's text index in one large segment.

FTS5 writes each commit's terms as a new segment and merges segments of a
size together as they pile up (``automerge``), so an index that grew by a
million messages is ten segments or so, three of them large; every search
then looks each term up in every segment.  Merged into one, the same
searches took a third of the time at a million messages (``bench/README.md``).
FTS5's ``optimize`` does that in one transaction, which would stop the
archive's writes for as long (about 20 s a million messages); its ``merge``
with a negative number of pages does the same work a step at a time.

``IndexMerger`` checks, every ``CHECK_SECONDS``, whether the segments other
than the largest hold more than ``SHARE`` of its leaf pages (FTS5's
structure record lists the segments), and if so merges them all, one step
of ``STEP_PAGES`` pages per writer job (until the merge ends, its inputs
stay beside its output, and FTS5 takes what comes in meanwhile into it;
it is over when FTS5's structure record says no level is being merged,
or pauses until the next check after writing twice the index), ``STEP_PAUSE`` apart so that the
adds waiting go in between.  Rewriting the index once every time it grows
by a tenth costs about ten times the index in writes over the archive's
life, and keeps every search reading about one segment.  It runs in the
process that adds to the archive (it starts at the first ``add``), not in
those that only read it.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .writer import Writer

__all__ = ["CHECK_SECONDS", "SHARE", "STEP_PAGES", "STEP_PAUSE", "IndexMerger", "merge_step", "segments", "structure"]

CHECK_SECONDS = 300.0
SHARE = 0.1
STEP_PAGES = 500
STEP_PAUSE = 0.05


#: The first octets of FTS5's structure record when its segments carry
#: their origins too (SQLite 3.45 and later, for tombstones).
_STRUCTURE_V2 = b"\xff\x00\x00\x01"


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """SQLite's variable-length integer at ``data[i]``, and where the next begins."""
    value = 0
    for _ in range(8):
        byte = data[i]
        i += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, i
    return (value << 8) | data[i], i + 1


def structure(conn: sqlite3.Connection) -> list[tuple[int, list[tuple[int, int]]]]:
    """
    The text index's levels, as FTS5's structure record has them: for
    each, how many of its segments a merge under way is taking, and its
    segments as (id, leaf pages).

    :raises ValueError: for a record this does not know how to read.
    """
    row = conn.execute("SELECT block FROM text_index_data WHERE id = 10").fetchone()
    if row is None:
        return []
    data = bytes(row[0])
    extra = 5 if data[:4] == _STRUCTURE_V2 else 0
    try:
        i = 4
        levels_n, i = _varint(data, i)
        _segments_n, i = _varint(data, i)
        _writes, i = _varint(data, i)
        levels = []
        for _ in range(levels_n):
            merging, i = _varint(data, i)
            count, i = _varint(data, i)
            segs = []
            for _ in range(count):
                segid, i = _varint(data, i)
                first, i = _varint(data, i)
                last, i = _varint(data, i)
                for _ in range(extra):
                    _, i = _varint(data, i)
                segs.append((segid, last - first + 1))
            levels.append((merging, segs))
    except IndexError:
        raise ValueError("FTS5 structure record of an unknown form") from None
    return levels


def segments(conn: sqlite3.Connection) -> dict[int, int]:
    """The text index's segments: their leaf pages, by id."""
    return {segid: pages for _, segs in structure(conn) for segid, pages in segs}


def _scattered(sizes: list[int], share: float) -> bool:
    """Whether the segments other than the largest hold more than ``share`` of what it holds."""
    return len(sizes) > 1 and sum(sizes) - max(sizes) > max(sizes) * share


def merge_step(merging: bool, pages: int = STEP_PAGES) -> Any:
    """
    A writer job: one step of merging the text index into one segment, if
    a merge is under way (``merging``) or due (``SHARE``).  It returns,
    while FTS5's structure says the merge is not over, the index's leaf
    pages; else ``None``.  What comes in meanwhile, FTS5 takes into the
    merge; it does not start another.
    """

    def job(conn: sqlite3.Connection) -> int | None:
        try:
            sizes = list(segments(conn).values())
        except ValueError:
            return None  # a newer FTS5: leave its index as it keeps it
        if not merging and not _scattered(sizes, SHARE):
            return None
        conn.execute("INSERT INTO text_index (text_index, rank) VALUES ('merge', ?)", (-pages,))
        if any(n for n, _ in structure(conn)):
            return sum(sizes)
        return None

    return job


class IndexMerger:
    """Runs ``merge_step`` on the archive's writer, paced by ``clock``."""

    log = Logger()

    def __init__(self, writer: Writer, clock: Any) -> None:
        self._writer = writer
        self._clock = clock
        self._call: IDelayedCall | None = None
        self._merging = False
        self._steps = 0
        self._budget = 0
        self._started_at = 0.0
        self._running = False
        self._stopped = False

    def start(self) -> None:
        """Check from ``CHECK_SECONDS`` on (again and again), unless started or stopped already."""
        if self._running or self._stopped:
            return
        self._running = True
        self._schedule(CHECK_SECONDS)

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, delay: float) -> None:
        if not self._stopped:
            self._call = self._clock.callLater(delay, self._step)

    def _step(self) -> None:
        self._call = None
        d = self._writer.submit(merge_step(self._merging))
        d.addCallbacks(self._stepped, self._failed)

    def _stepped(self, step: int | None) -> None:
        if step is not None and not self._merging:
            self._started_at = self._clock.seconds()
            self._steps = 0
            self._budget = 2 * step // STEP_PAGES + 10
            self.log.info("archive: merging the text index into one segment, a step at a time")
        if step is not None:
            self._steps += 1
            if self._steps > self._budget:
                # Mail comes in faster than the merge takes it: next time.
                self.log.info(
                    "archive: merging the text index paused after {steps} steps", steps=self._steps
                )
                step = None
        elif self._merging:
            self.log.info(
                "archive: text index merged in {steps} steps, {seconds:.0f} s",
                steps=self._steps,
                seconds=self._clock.seconds() - self._started_at,
            )
        self._merging = step is not None
        self._schedule(CHECK_SECONDS if step is None else STEP_PAUSE)

    def _failed(self, failure: Failure) -> None:
        self.log.warn(
            "archive: merging the text index failed ({why}); trying again later",
            why=failure.getErrorMessage(),
        )
        self._schedule(CHECK_SECONDS)

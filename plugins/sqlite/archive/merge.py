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
than the largest hold more than ``SHARE`` of what it holds (FTS5's page
index lists each segment's leaf pages), and if so merges them all, one step
of ``STEP_PAGES`` pages per writer job (until the merge ends, its inputs
stay beside its output; FTS5 takes what comes in meanwhile into it, and
it ends once its inputs are gone, or pauses until the next check after
writing twice the index), ``STEP_PAUSE`` apart so that the
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

__all__ = ["CHECK_SECONDS", "SHARE", "STEP_PAGES", "STEP_PAUSE", "IndexMerger", "merge_step", "segments"]

CHECK_SECONDS = 300.0
SHARE = 0.1
STEP_PAGES = 500
STEP_PAUSE = 0.05


def segments(conn: sqlite3.Connection) -> dict[int, int]:
    """The text index's segments: how many entries each has in FTS5's page index."""
    return dict(conn.execute("SELECT segid, count(*) FROM text_index_idx GROUP BY segid"))


def _scattered(sizes: list[int], share: float) -> bool:
    """Whether the segments other than the largest hold more than ``share`` of what it holds."""
    return len(sizes) > 1 and sum(sizes) - max(sizes) > max(sizes) * share


def merge_step(inputs: frozenset[int] | None, pages: int = STEP_PAGES) -> Any:
    """
    A writer job: one step of merging the text index into one segment.
    ``inputs`` are the segments a merge under way started from, or ``None``
    to start one if it is due (``SHARE``).  It returns the inputs and the
    index's size (entries of the page index, about its leaf pages) when the
    merge started, while any input is left; else ``None``.  What comes in
    meanwhile, FTS5 takes into the merge; it does not start another.
    """

    def job(conn: sqlite3.Connection) -> tuple[frozenset[int], int] | None:
        sizes = segments(conn)
        if inputs is None and not _scattered(list(sizes.values()), SHARE):
            return None
        started = frozenset(sizes) if inputs is None else inputs
        conn.execute("INSERT INTO text_index (text_index, rank) VALUES ('merge', ?)", (-pages,))
        return (started, sum(sizes.values())) if started & segments(conn).keys() else None

    return job


class IndexMerger:
    """Runs ``merge_step`` on the archive's writer, paced by ``clock``."""

    log = Logger()

    def __init__(self, writer: Writer, clock: Any) -> None:
        self._writer = writer
        self._clock = clock
        self._call: IDelayedCall | None = None
        self._merging: frozenset[int] | None = None
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

    def _stepped(self, step: tuple[frozenset[int], int] | None) -> None:
        if step is not None and self._merging is None:
            self._started_at = self._clock.seconds()
            self._steps = 0
            self._budget = 2 * step[1] // STEP_PAGES + 10
            self.log.info("archive: merging the text index into one segment, a step at a time")
        if step is not None:
            self._steps += 1
            if self._steps > self._budget:
                # Mail comes in faster than the merge takes it: next time.
                self.log.info(
                    "archive: merging the text index paused after {steps} steps", steps=self._steps
                )
                step = None
        elif self._merging is not None:
            self.log.info(
                "archive: text index merged in {steps} steps, {seconds:.0f} s",
                steps=self._steps,
                seconds=self._clock.seconds() - self._started_at,
            )
        self._merging = None if step is None else step[0]
        self._schedule(CHECK_SECONDS if step is None else STEP_PAUSE)

    def _failed(self, failure: Failure) -> None:
        self.log.warn(
            "archive: merging the text index failed ({why}); trying again later",
            why=failure.getErrorMessage(),
        )
        self._schedule(CHECK_SECONDS)

"""
How every accepted message reaches the archive, and none is lost on the way.

The archive is a route of the spool like any other: when an archive is
configured, each accepted message gets, in the same durable write that
makes the ``250`` true, one more entry for the route ``archive:local`` with
the message's recipients in the hub's domains.  Its "transport" decodes the
message (``mailhub.archive.text``, in a thread) and adds it to the archive
(``IArchive.add``), and the entry leaves the spool only once the archive
says the copy is durable.  So:

- a crash at any point loses no archived copy: until the archive has it, the
  spool has the message and the entry, and a node retries it (a message may
  be added twice; ``add`` is idempotent by id);
- an archive that is down or full never costs mail: the entry is deferred
  (``451 4.3.0 archive unavailable``) and retried by the policy's schedule,
  the hub goes on accepting and delivering, and ``mailhub status`` shows the
  archive route's backlog; the log says why at each attempt;
- the archive's writes are paced like a route's (``[archive]
  max_connections``, 64, for the whole hub) and seen in the same status;
- under a burst or a drain the archive yields to the mail (``ArchiveGate``):
  while this process accepts or delivers more than ``[archive]
  yield_above`` messages a second (50), archive entries are put off (stored
  deferred, in the same write) until the rate falls or the message is
  ``[archive] max_lag`` seconds old (120).  Mail is not held up, only its
  archive copy; the ``250`` does not wait for it either way.

An archive entry is never bounced: nobody should get a DSN because the
hub's own copy could not be made (``Node.bounce`` only logs it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from mailhub.interfaces import IArchive, ITransport
from mailhub.model import Address, ArchivedMessage, Entry, Reply, StoreFull, StoreUnavailable

__all__ = ["ARCHIVE_ROUTE", "ArchiveGate", "ArchiveTransport", "MailMeter", "is_archive_route"]

#: The route of the spool's archive entries.
ARCHIVE_ROUTE = "archive:local"


def is_archive_route(route: str) -> bool:
    return route == ARCHIVE_ROUTE


class MailMeter:
    """
    Messages this process accepted or delivered over the last second, in
    quarter-second buckets: one ``tick`` per message accepted and per entry
    delivered (every node of the process ticks the same meter), ``rate``
    when asked.
    """

    BUCKETS = 4

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._buckets: deque[list[int]] = deque()

    def tick(self, n: int = 1) -> None:
        bucket = int(self._clock.seconds() * self.BUCKETS)
        if self._buckets and self._buckets[-1][0] == bucket:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([bucket, n])
            if len(self._buckets) > self.BUCKETS:
                self._buckets.popleft()

    def rate(self) -> float:
        """Messages a second over the last full second (the current quarter included)."""
        oldest = int(self._clock.seconds() * self.BUCKETS) - self.BUCKETS + 1
        return float(sum(n for bucket, n in self._buckets if bucket >= oldest))


class ArchiveGate:
    """
    The archive yields to the mail: to the front door under a burst, to the
    relay while a backlog drains.

    Archiving a message costs about what accepting it costs (decoding,
    indexing, a second durable commit), so during a burst the archive would
    halve ingest, and while a backlog drains it would take much of the
    node's batch from the relay.  Instead, while the ``MailMeter`` reads
    more than ``yield_above`` messages a second accepted or delivered, the
    archive route's entries are put off: stored deferred until ``max_lag``
    after their message was accepted (``later``, which the delivery engine
    asks when it stores a new entry, and before and after an entry waits for
    its turn on the route, so none waits in the batch).  When the rate falls
    to ``yield_above`` or below, the gate makes the put-off entries due at
    once (one ``flush`` of the route in ``store``) and calls its
    ``on_resume`` callbacks (each node wakes its engine); a load that
    never ends is archived at most ``max_lag`` behind.  Nothing is lost
    meanwhile: every put-off entry is in the spool.  ``stop`` puts nothing
    off (a stopping node), ``start`` does again.

    :param clock: ``IReactorTime``.
    :param yield_above: ``[archive] yield_above`` (0: never put off).
    :param max_lag: ``[archive] max_lag``, seconds.
    :param store: the spool the archive's entries are in (``None``: leave
        them to their ``max_lag``; tests).
    :param poll: seconds between looks at the rate while yielding.
    """

    log = Logger()

    def __init__(
        self, meter: MailMeter, clock: Any, yield_above: float, max_lag: float, store: Any = None,
        poll: float = 0.25,
    ) -> None:
        self.meter = meter
        self.yield_above = yield_above
        self.max_lag = max_lag
        self._clock = clock
        self._store = store
        self._poll = poll
        self._timer: Any = None
        self._stopped = False
        self._started = False
        self._resume: list[Callable[[], object]] = []
        #: Archive entries put off (``later``) since the gate started yielding.
        self.put_off = 0

    @property
    def yielding(self) -> bool:
        """Whether the archive is yielding now (until the rate is next looked at)."""
        return self._timer is not None

    def on_resume(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` each time the archive stops yielding."""
        self._resume.append(callback)

    def busy(self) -> bool:
        """
        Whether this process accepts or delivers more than ``yield_above``
        messages a second now: the archive's writes wait (archive entries,
        and the delivery records of ``DeliveryRecorder`` short of a batch).
        """
        return not self._stopped and self.yield_above > 0 and self.meter.rate() > self.yield_above

    def _holds(self, created: float, now: float) -> bool:
        return now - created < self.max_lag and self.busy()

    def _yield(self) -> None:
        if self._timer is None:
            self.log.info(
                "archive yielding to the front door ({rate:.0f} messages/s accepted or delivered, above {limit:g});"
                " archiving resumes below it, or {lag:g} s after a message was accepted",
                rate=self.meter.rate(), limit=self.yield_above, lag=self.max_lag,
            )
            self._timer = self._clock.callLater(self._poll, self._look)

    def later(self, route: str, created: float) -> tuple[float, Reply] | None:
        """
        The delivery engine's ``later``: for an archive entry accepted at
        ``created``, ``(when, reply)`` while the archive yields, else ``None``.
        """
        if not is_archive_route(route) or not self._holds(created, self._clock.seconds()):
            return None
        self._yield()
        self.put_off += 1
        return created + self.max_lag, Reply(451, "4.3.0", "archive yielding to the front door; archived after the burst")

    def _look(self) -> None:
        self._timer = None
        if self.busy():
            self._timer = self._clock.callLater(self._poll, self._look)
            return
        self._resumed()

    def _resumed(self) -> None:
        put_off, self.put_off = self.put_off, 0
        self.log.info(
            "archive resumed ({rate:.0f} messages/s accepted or delivered; {n} entries put off are due now)",
            rate=self.meter.rate(), n=put_off,
        )
        self._take_up()

    def _take_up(self) -> None:
        """Make the put-off archive entries due (one flush), then call the ``on_resume`` callbacks."""

        def due(_: object) -> None:
            for callback in self._resume:
                try:
                    callback()
                except Exception:
                    self.log.failure("an archive resume callback failed")

        if self._store is None:
            due(None)
            return
        d = self._store.flush(ARCHIVE_ROUTE, self._clock.seconds())
        d.addCallbacks(due, lambda f: self.log.failure("could not make the put-off archive entries due", f))

    def start(self) -> None:
        """
        Put archive entries off under a burst again (after ``stop``); the
        first start also takes up what an earlier run put off (a crash or a
        stop while yielding), rather than leave it to ``max_lag``.
        """
        self._stopped = False
        if not self._started:
            self._started = True
            self._take_up()

    def stop(self) -> None:
        """Put nothing off from now on (a stopping node)."""
        self._stopped = True
        self._started = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


@implementer(ITransport)
class ArchiveTransport:
    """
    The archive route's transport: decode, then ``IArchive.add``.

    :param archive: the hub's ``IArchive``.
    :param reactor: for its thread pool (decoding is CPU work, off the reactor
        thread); a reactor without threads (a test's ``Clock``) decodes in line.
    :param decode: ``mailhub.archive.text.extract`` (tests may give another).
    :param writer: where ``add`` goes instead of ``archive`` (decoding
        included): the archive's worker process (``mailhub.archive.worker``),
        or ``None`` to decode and add in this process.
    """

    log = Logger()

    def __init__(
        self,
        archive: IArchive,
        reactor: Any,
        decode: Callable[[bytes], Any] | None = None,
        writer: Any = None,
    ) -> None:
        if decode is None:
            from mailhub.archive.text import extract

            decode = extract
        self._archive = archive
        self._reactor = reactor
        self._decode: Callable[[bytes], Any] = decode
        self._writer = writer

    def deliver(self, entry: Entry, message: bytes) -> Deferred[dict[Address, Reply]]:
        return ensureDeferred(self._deliver(entry, message))

    async def _deliver(self, entry: Entry, message: bytes) -> dict[Address, Reply]:
        # The recipients as given: the engine wants a reply for each.  The
        # archive's mailboxes are folded and each once (``ArchivedMessage``
        # does it): mail to John.Smith@ and john.smith@ is one mailbox's copy.
        mailboxes = entry.pending
        try:
            if self._writer is not None:
                # The worker process decodes it too: only the envelope and the bytes go.
                await self._writer.add(
                    ArchivedMessage(
                        id=entry.message_id,
                        received_at=entry.created,
                        sender=entry.sender,
                        mailboxes=mailboxes,
                        message=message,
                    )
                )
                return dict.fromkeys(mailboxes, Reply(250, "2.0.0", "archived"))
            if IReactorThreads.providedBy(self._reactor):
                text = await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._decode, message)
            else:
                # A reactor without threads (a test's Clock): decode in line.
                text = self._decode(message)
            await self._archive.add(
                ArchivedMessage(
                    id=entry.message_id,
                    received_at=entry.created,
                    sender=entry.sender,
                    mailboxes=mailboxes,
                    message=message,
                    text=text,
                )
            )
        except (StoreUnavailable, StoreFull) as e:
            self.log.warn(
                "archive unavailable for {entry}: {why}; the spool keeps it and tries again",
                entry=entry.id,
                why=str(e),
            )
            return dict.fromkeys(mailboxes, Reply(451, "4.3.0", f"archive unavailable: {e}"))
        except Exception as e:
            self.log.failure("archiving {entry} failed; the spool keeps it and tries again", entry=entry.id)
            return dict.fromkeys(mailboxes, Reply(451, "4.3.0", f"archive error: {e}"))
        return dict.fromkeys(mailboxes, Reply(250, "2.0.0", "archived"))

    def close(self) -> Deferred[None]:
        return succeed(None)

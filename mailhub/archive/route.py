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
  max_connections``, 10, for the whole hub) and seen in the same status.

An archive entry is never bounced: nobody should get a DSN because the
hub's own copy could not be made (``Node.bounce`` only logs it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from mailhub.interfaces import IArchive, ITransport
from mailhub.model import Address, ArchivedMessage, Entry, Reply, StoreFull, StoreUnavailable

__all__ = ["ARCHIVE_ROUTE", "ArchiveTransport", "is_archive_route"]

#: The route of the spool's archive entries.
ARCHIVE_ROUTE = "archive:local"


def is_archive_route(route: str) -> bool:
    return route == ARCHIVE_ROUTE


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

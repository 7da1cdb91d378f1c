"""
What the hub delivered, for ``mailhub archive redeliver --skip-delivered``.

The delivery engine tells a ``DeliveryRecorder`` (its ``delivered``
observer, which the node gives it when an archive is configured) of every
recipient whose route's server accepted an entry (a 2xx).  The recorder
keeps, for each mailbox of the hub's domains, the message's archive id, the
route and the time, and writes them to the archive
(``IArchive.record_delivered``) in batches, beside delivery and never in
its way: noting a delivery is a list append on the reactor thread, one
write is in flight at a time, and what arrives meanwhile goes in the next
one (the ``sqlite`` archive commits it with whatever else its writer has
waiting).  The Message-ID is not parsed here: the archive has it from its
own copy of the message (``ArchiveText.message_id``) and matches on it when
asked (``IArchive.delivered``).

Under a burst or a drain (the ``ArchiveGate`` says the process is busy),
records are written only a full batch at a time (``MAX_BATCH``), and what
is short of one when the rate falls: each write is a durable commit of the
archive, on the disk the spool commits every ``250`` to, and one for every
few deliveries became one for 500.  (On the benchmark's VM, whose disk
does not charge for a commit, the relay's rate did not move either way:
bench/README.md.)

This is best-effort by design.  A record is lost when the archive stays
unreachable past a retry, when more than ``MAX_PENDING`` wait, or when the
process dies with records not yet written; the cost is at worst that a
re-delivery which skips delivered messages sends that one again.  Mail is
never lost nor held up for it: the spool and the engine do not wait for a
record.

A message that ``mailhub archive redeliver`` put back into the spool is
spooled under a new message id; its envelope's client names its archive
copy (``respooled_client``), so that its delivery is recorded under the
archive id, and a second re-delivery skips it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.archive.route import is_archive_route
from mailhub.config import HubConfig
from mailhub.interfaces import IArchive
from mailhub.model import Address, Entry

__all__ = [
    "HOLD_SECONDS",
    "MAX_BATCH",
    "MAX_PENDING",
    "RETRY_SECONDS",
    "DeliveryRecorder",
    "archive_id_of",
    "respooled_client",
]

#: Records in one ``IArchive.record_delivered`` call, at most.
MAX_BATCH = 500
#: Records waiting to be written, at most; beyond, new ones are dropped (and counted).
MAX_PENDING = 20_000
#: Seconds before a batch the archive refused is tried again (once).
RETRY_SECONDS = 30.0
#: Seconds between looks at the gate while records short of a batch wait for a burst to pass.
HOLD_SECONDS = 1.0

_RESPOOLED = "archive:"


def respooled_client(archive_id: str) -> str:
    """The ``Envelope.client`` of a message re-spooled from the archive copy ``archive_id``."""
    return _RESPOOLED + archive_id


def archive_id_of(entry: Entry) -> str:
    """The archive id of an entry's message: its spool message id, or the copy it was re-spooled from."""
    client = entry.envelope_client
    if client.startswith(_RESPOOLED) and len(client) > len(_RESPOOLED):
        return client[len(_RESPOOLED) :]
    return entry.message_id


class DeliveryRecorder:
    """
    The engine's ``delivered`` observer: queues a record per delivered
    mailbox and writes them to the archive in batches.

    :param archive: the hub's ``IArchive``.
    :param config: which recipients are mailboxes of the hub's domains
        (others, a DSN's outside recipients, are not recorded).
    :param clock: ``IReactorTime``, for the retry after a failed write.
    :param gate: the process's ``ArchiveGate`` (its ``busy()``), or ``None``
        to write whenever records wait.
    :ivar written: records written since the start.
    :ivar lost: records dropped or refused twice since the start.
    """

    log = Logger()

    def __init__(
        self,
        archive: IArchive,
        config: HubConfig,
        clock: Any,
        max_batch: int = MAX_BATCH,
        max_pending: int = MAX_PENDING,
        gate: Any = None,
    ) -> None:
        self._archive = archive
        self._gate = gate
        #: A look at the gate while records short of a batch wait (``HOLD_SECONDS``).
        self._held: IDelayedCall | None = None
        self._config = config
        self._clock = clock
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._pending: list[tuple[str, Address, str, float]] = []
        #: A batch the archive refused once, tried again after ``RETRY_SECONDS``.
        self._refused: list[tuple[str, Address, str, float]] = []
        self._retry: IDelayedCall | None = None
        self._writing = False
        self._failing = False
        self._dropped = 0
        self._final = False
        self._idle: list[Deferred[None]] = []
        self.written = 0
        self.lost = 0

    def __call__(self, entry: Entry, recipients: Sequence[Address], at: float) -> None:
        """
        Note that ``recipients`` of ``entry`` were delivered at ``at``: a
        record per mailbox of the hub's domains (folded, as the archive keeps
        its mailboxes), unless ``entry`` is the archive's own.  Returns at
        once; never raises.
        """
        if is_archive_route(entry.route):
            return
        archive_id = archive_id_of(entry)
        for address in recipients:
            if self._config.route_for(address.domain) is None:
                continue
            if len(self._pending) >= self._max_pending:
                if not self._dropped:
                    self.log.warn(
                        "delivery records dropped: {pending} wait for the archive; redeliver"
                        " --skip-delivered may send those messages again",
                        pending=len(self._pending),
                    )
                self._dropped += 1
                self.lost += 1
                continue
            # The archive's mailbox (folded, ``Address.folded``): a delivery to
            # John.Smith@ is one to the mailbox a re-delivery asks about, john.smith@.
            self._pending.append((archive_id, address.folded(), entry.route, at))
        self._write()

    def _write(self) -> None:
        """
        Start the next write, unless one is under way or waits for its
        retry, or the process is busy and less than a batch waits.
        """
        if self._writing or self._retry is not None:
            return
        if (
            self._pending
            and not self._refused
            and not self._final
            and len(self._pending) < self._max_batch
            and self._gate is not None
            and self._gate.busy()
        ):
            if self._held is None:
                self._held = self._clock.callLater(HOLD_SECONDS, self._hold_over)
            return
        if self._refused:
            batch, self._refused, again = self._refused, [], True
        elif self._pending:
            batch, again = self._pending[: self._max_batch], False
            del self._pending[: len(batch)]
        else:
            idle, self._idle = self._idle, []
            for waiting in idle:
                waiting.callback(None)
            return
        self._writing = True
        try:
            d: Deferred[None] = self._archive.record_delivered(batch)
        except Exception:
            d = fail(Failure())
        d.addCallbacks(
            self._written, self._not_written, callbackArgs=(batch,), errbackArgs=(batch, again)
        ).addBoth(self._next)

    def _written(self, _: object, batch: list[Any]) -> None:
        self.written += len(batch)
        if self._failing:
            self.log.info("delivery records written again")
            self._failing = False
        if self._dropped and len(self._pending) < self._max_pending:
            self.log.warn("{count} delivery records were dropped", count=self._dropped)
            self._dropped = 0

    def _not_written(self, f: Failure, batch: list[Any], again: bool) -> None:
        if again or self._final:
            self.lost += len(batch)
            self.log.warn(
                "{count} delivery records lost ({why}); redeliver --skip-delivered may send those"
                " messages again",
                count=len(batch),
                why=f.getErrorMessage(),
            )
            return
        if not self._failing:
            self.log.warn(
                "delivery records not written ({why}); trying again in {seconds:g} s",
                why=f.getErrorMessage(),
                seconds=RETRY_SECONDS,
            )
        self._failing = True
        self._refused = batch
        self._retry = self._clock.callLater(RETRY_SECONDS, self._retry_now)

    def _next(self, _: object) -> None:
        self._writing = False
        self._write()

    def _retry_now(self) -> None:
        self._retry = None
        self._write()

    def _hold_over(self) -> None:
        self._held = None
        self._write()

    def flush(self) -> Deferred[None]:
        """
        Write everything that waits, a batch waiting for its retry at once,
        and give up on what the archive refuses now: the node calls this
        when it stops, before the archive closes.  Fires when nothing is
        left to write; never fails.
        """
        self._final = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._held is not None:
            self._held.cancel()
            self._held = None
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        self._write()
        return d

"""
Counting messages through a fault, by a unique id each.

Every message a fault test sends is made by ``hubprocess.message(tag)``: its
``Message-ID`` is ``<TAG@outside.example>`` and its subject ``TAG``.  A
``Tally`` keeps the sets the suite compares: sent, acknowledged (``250``),
refused (any other reply), delivered at the real downstream server (with how
many times each), and bounced (a DSN naming the tag).  ``report`` prints one
line and, when ``MAILHUB_FAULT_REPORT`` names a file, appends the same
figures to it as one JSON line, for ``bench/faults``' table.  ``Load``
keeps clients sending to a hub until told to stop, into a ``Tally``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterable

from attrs import define, field
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults

from hubprocess import message, send, sleep
from mailhub.testing.downstream import ReceivedMessage

__all__ = ["Load", "Tally", "message_ids"]

_MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)@outside\.example>\r?$", re.MULTILINE | re.IGNORECASE)
REPORT_ENV = "MAILHUB_FAULT_REPORT"


def message_ids(message: ReceivedMessage) -> list[str]:
    """The tags of the fault suite's messages in ``message`` (a DSN quotes its message's)."""
    return [m.decode() for m in _MESSAGE_ID.findall(message.message)]


@define
class Tally:
    """The sets of one fault, by tag."""

    sent: list[str] = field(factory=list)
    acknowledged: set[str] = field(factory=set)
    refused: dict[str, int] = field(factory=dict)

    def reply(self, tag: str, code: int) -> None:
        """Record one transaction: ``tag`` was sent and got ``code`` (0: no reply at all)."""
        self.sent.append(tag)
        if code == 250:
            self.acknowledged.add(tag)
        else:
            self.refused[tag] = code

    @staticmethod
    def delivered(messages: Iterable[ReceivedMessage]) -> Counter[str]:
        """How many times the server received each tag (DSNs, whose sender is ``<>``, apart)."""
        found: Counter[str] = Counter()
        for m in messages:
            if m.sender:
                ids = message_ids(m)
                assert len(ids) == 1, m.message[:300]
                found[ids[0]] += 1
        return found

    @staticmethod
    def bounced(messages: Iterable[ReceivedMessage]) -> set[str]:
        """The tags that DSNs (null sender) received by the server are about."""
        return {tag for m in messages if not m.sender for tag in message_ids(m)}

    def lost(self, messages: Iterable[ReceivedMessage]) -> set[str]:
        """Acknowledged and neither delivered nor bounced."""
        messages = list(messages)
        return self.acknowledged - set(self.delivered(messages)) - self.bounced(messages)

    def report(self, fault: str, messages: Iterable[ReceivedMessage], recovered: float | None,
               note: str = "") -> str:
        """
        Print the fault's figures and append them to ``$MAILHUB_FAULT_REPORT``.

        :param recovered: seconds from the end of the fault until the hub
            works again (what that means is the test's to say), or ``None``.
        :returns: the line printed.
        """
        messages = list(messages)
        delivered = self.delivered(messages)
        row = {
            "fault": fault,
            "sent": len(self.sent),
            "acknowledged": len(self.acknowledged),
            "delivered": len(delivered),
            "duplicates": sum(n - 1 for n in delivered.values()),
            "bounced": len(self.bounced(messages)),
            "lost": len(self.lost(messages)),
            "recovered": recovered,
            "note": note,
        }
        recover = "-" if recovered is None else f"{recovered:.1f} s"
        line = (
            f"\n{fault}: sent {row['sent']}, acknowledged {row['acknowledged']},"
            f" delivered {row['delivered']}, duplicates {row['duplicates']},"
            f" bounced {row['bounced']}, lost {row['lost']}, recovered in {recover}"
            + (f" ({note})" if note else "")
        )
        print(line)
        path = os.environ.get(REPORT_ENV)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return line


class Load:
    """
    ``workers`` SMTP clients, each sending one message after the other to
    the ports in turn until ``stop``; each transaction is kept as ``(tag,
    port, code, started, ended)`` (``time.monotonic``) and counted in ``tally``.
    """

    def __init__(self, tally: Tally, ports: list[int], workers: int = 4, prefix: str = "load") -> None:
        self.tally = tally
        self.transactions: list[tuple[str, int, int, float, float]] = []
        self.running = True
        self._done: Deferred[list[None]] = gatherResults(
            [ensureDeferred(self._worker(w, ports[w % len(ports)], prefix)) for w in range(workers)]
        )

    async def _worker(self, worker: int, port: int, prefix: str) -> None:
        i = 0
        while self.running:
            tag = f"{prefix}-{worker}-{i}"
            i += 1
            started = time.monotonic()
            code, _ = await send(port, message(tag))
            self.tally.reply(tag, code)
            self.transactions.append((tag, port, code, started, time.monotonic()))
            if code != 250:
                await sleep(0.1)

    async def stop(self) -> None:
        self.running = False
        await self._done

    def ended_between(self, start: float, end: float) -> list[int]:
        """The codes of the transactions answered after ``start`` and before ``end``."""
        return [code for _, _, code, _, e in self.transactions if start < e < end]

    def first_250_after(self, moment: float, port: int) -> float | None:
        """When the first transaction on ``port`` begun after ``moment`` got its ``250``."""
        ends = [e for _, p, code, s, e in self.transactions if p == port and code == 250 and s >= moment]
        return min(ends) if ends else None

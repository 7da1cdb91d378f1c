"""
Fakes for unit tests of the engine, policies and third-party plugins.

``ScriptedTransport`` answers each delivery from a script instead of a socket.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mailhub.interfaces import ITransport
from mailhub.model import Address, Entry, Reply

Script = Callable[[Entry, bytes], Mapping[Address, Reply] | Reply | Deferred[Any]]


@implementer(ITransport)
@define
class ScriptedTransport:
    """
    An ``ITransport`` whose answers come from ``script``.

    ``script(entry, message)`` returns one ``Reply`` for every pending
    recipient, a dict of replies, or a ``Deferred`` of either.  The default
    script accepts everything.  ``deliveries`` records ``(entry, message)``.
    """

    script: Script = field(default=lambda entry, message: Reply(250, "2.0.0", "OK"))
    deliveries: list[tuple[Entry, bytes]] = field(factory=list)
    closed: bool = False

    def deliver(self, entry: Entry, message: bytes) -> Deferred[dict[Address, Reply]]:
        self.deliveries.append((entry, message))
        result = self.script(entry, message)
        d = result if isinstance(result, Deferred) else succeed(result)
        return d.addCallback(lambda r: {a: r for a in entry.pending} if isinstance(r, Reply) else dict(r))

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)

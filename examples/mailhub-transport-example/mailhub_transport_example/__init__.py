"""
An example third-party transport for mailhub: ``directory``, which writes
each message as a file into a directory per recipient.

Route target: an absolute path, ``route = "directory:/srv/mail"``; the mail
of ``alice@example.com`` goes to ``/srv/mail/example.com/alice/``, which
must exist (the directory is the mailbox: no directory, no mailbox).

It imports only what a third party may: ``mailhub.interfaces`` and
``mailhub.model``.  File I/O runs in the reactor's thread pool, never on
the reactor thread.  See ``README.md`` beside this package for how it is
registered (an entry point in the group ``mailhub.transports``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from attrs import define, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from mailhub.interfaces import ITransport, ITransportPlugin
from mailhub.model import Address, Entry, Reply

__all__ = ["DirectoryTransport", "DirectoryTransportPlugin", "plugin"]

# Only names that cannot climb out of the base directory or hide a file.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9._+=-]*\Z")


def _mailbox(base: str, address: Address) -> str | None:
    """The directory of ``address`` under ``base``, or ``None`` if its name is not one we write to."""
    if not _SAFE_NAME.match(address.local) or not _SAFE_NAME.match(address.domain):
        return None
    return os.path.join(base, address.domain, address.local)


def _file_name(message_id: str) -> str:
    name = message_id if _SAFE_NAME.match(message_id) else message_id.encode().hex()
    return name + ".eml"


def _write(base: str, entry: Entry, recipients: list[Address], message: bytes) -> dict[Address, Reply]:
    """Write ``message`` for each recipient (runs in a thread)."""
    if not os.path.isdir(base):
        return dict.fromkeys(recipients, Reply(421, "4.4.1", f"{base} is not there (not mounted?)"))
    replies: dict[Address, Reply] = {}
    for address in recipients:
        mailbox = _mailbox(base, address)
        if mailbox is None or not os.path.lexists(mailbox):
            replies[address] = Reply(550, "5.1.1", f"<{address}>: no such mailbox")
            continue
        final = os.path.join(mailbox, _file_name(entry.message_id))
        partial = os.path.join(mailbox, "." + _file_name(entry.message_id) + ".part")
        try:
            with open(partial, "wb") as f:
                f.write(message)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, final)
        except OSError as e:
            replies[address] = Reply(451, "4.3.0", f"<{address}>: cannot write: {e.strerror or e}")
        else:
            replies[address] = Reply(250, "2.0.0", f"<{address}>: written")
    return replies


@implementer(ITransport)
@define(eq=False)
class DirectoryTransport:
    """
    An ``ITransport``: each message as a file in each recipient's directory.

    :param reactor: an ``IReactorThreads`` (its thread pool does the writing).
    :param base: the route's directory.
    """

    _reactor: Any
    _base: str

    def deliver(self, entry: Entry, message: bytes) -> Deferred[dict[Address, Reply]]:
        recipients = list(entry.pending)
        if not recipients:
            return succeed({})
        d: Deferred[dict[Address, Reply]] = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), _write, self._base, entry, recipients,
            bytes(message),
        )  # fmt: skip
        # The contract: a reply per recipient, never an errback.
        d.addErrback(lambda f: dict.fromkeys(recipients, Reply(451, "4.3.0", f"transport error: {f.getErrorMessage()}")))
        return d

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(ITransportPlugin)
@frozen
class DirectoryTransportPlugin:
    """Makes a ``DirectoryTransport`` for a route ``directory:/path``."""

    name: str = "directory"
    #: No options of its own: any other key of the domain's table is an error.
    config_keys: frozenset[str] = frozenset()

    def check_config(self, config: Mapping[str, Any]) -> None:
        """:raises ValueError: ``"target: ..."`` for a target that is not an absolute path."""
        self.make(config, None)

    def make(self, config: Mapping[str, Any], reactor: Any) -> DirectoryTransport:
        target = config.get("target")
        if not isinstance(target, str) or not os.path.isabs(target) or "\0" in target:
            raise ValueError(f"target: must be an absolute path, 'directory:/srv/mail', not {target!r}")
        return DirectoryTransport(reactor, os.path.normpath(target))


plugin = DirectoryTransportPlugin()

"""
Drills: a probe message sent through a node and followed to its route's
server, to prove that the path works before a customer finds out it does not.

A node drills through itself: it connects to its own SMTP listener (or to
the ``host:port`` it is given), sends one small message for a recipient of
the domain (``postmaster@DOMAIN`` unless told otherwise) with a unique
Message-ID, the subject ``mailhub drill ID`` and the null sender (a probe
that fails makes no DSN), and follows it through its steps:

- ``accepted``: the listener answered the end of data with ``250`` and a
  queue id (the id of the entry for the domain's route);
- ``archived`` (only with an archive): the archive has the message
  (``IArchive.get`` of the entry's message id);
- ``delivered``: the engine saw the route's server accept it (the engine's
  ``delivered`` observer, on this node; for an entry another node delivered,
  the archive's delivery record).  A deferral (a ``4xx``, a refused
  connection), a hold or a ``5xx`` ends the drill at once with this step
  failed and the reply as its detail, without waiting for the timeout.

Each step's time is counted in seconds from the start of the drill, on the
injected clock.  ``[drills] every`` schedules drills of the configured domains
on every node, each through itself (each node proves its own path; two
nodes send two probes a round); the last result per domain is served by the
node's ``GET /api/drills`` and ``/metrics``.  This module sends mail and reads the
spool and the archive; it never changes an entry.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mailhub.model import Action, Address, AddressError, Entry, Outcome, RecipientState
from mailhub.smtp import client

__all__ = ["STEPS", "DrillError", "DrillResult", "DrillStep", "Drills", "smtp_address"]

#: The steps of a drill, in order (``archived`` only with an archive).
STEPS = ("accepted", "archived", "delivered")
#: Seconds between two looks at the spool and the archive while following a probe.
POLL = 0.1
#: The longest a drill may be told to wait, in seconds.
MAX_TIMEOUT = 3600.0

_QUEUED = re.compile(r"queued as (\S+)", re.IGNORECASE)


class DrillError(ValueError):
    """A drill that cannot be started (an unknown domain, a bad address): ``str()`` says why."""


@frozen
class DrillStep:
    """
    One step of a drill.

    :ivar name: one of ``STEPS``.
    :ivar ok: whether the step was reached.
    :ivar seconds: when it was reached (or found failed), from the start of
        the drill; ``None`` if it was never decided.
    :ivar detail: the reply, the queue id or what went wrong.
    """

    name: str
    ok: bool
    seconds: float | None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"step": self.name, "ok": self.ok, "seconds": self.seconds, "detail": self.detail}


@frozen
class DrillResult:
    """
    What a drill found.

    :ivar id: the drill's id (in the subject and the Message-ID).
    :ivar failed: the first step that failed, or ``None``.
    :ivar started: when the drill started (the clock's seconds).
    """

    id: str
    domain: str
    node: str
    recipient: str
    message_id: str
    queue_id: str
    started: float
    steps: tuple[DrillStep, ...]

    @property
    def failed(self) -> str | None:
        return next((s.name for s in self.steps if not s.ok), None)

    @property
    def ok(self) -> bool:
        return self.failed is None

    @property
    def duration(self) -> float:
        return max((s.seconds or 0.0 for s in self.steps), default=0.0)

    def line(self) -> str:
        """One line for the log and the CLI: ``drill ID of example.com ...: ok: accepted 0.01 s, ...``."""
        head = f"drill {self.id} of {self.domain} through node {self.node} to {self.recipient}"
        steps = ", ".join(
            f"{s.name} {s.seconds:.2f} s" if s.ok and s.seconds is not None else f"{s.name} FAILED ({s.detail})"
            for s in self.steps
        )
        return f"{head}: {'ok' if self.ok else 'failed at ' + str(self.failed)}: {steps}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "domain": self.domain, "node": self.node, "recipient": self.recipient,
            "message_id": self.message_id, "queue_id": self.queue_id, "started": self.started,
            "ok": self.ok, "failed": self.failed, "duration": self.duration,
            "steps": [s.to_json() for s in self.steps],
        }


def smtp_address(endpoint: str) -> tuple[str, int, bool]:
    """
    Where to reach a node's SMTP listener from its own host: ``(host, port,
    tls)`` of a ``tcp:`` or ``ssl:`` endpoint string (its ``interface``, or
    the loopback address when it listens on every address).

    :raises DrillError: for another kind of endpoint.
    """
    from twisted.internet.endpoints import _parseServer  # type: ignore[attr-defined]

    kind, args, kw = _parseServer(endpoint, None)
    if kind not in ("TCP", "SSL"):
        raise DrillError(f"cannot drill through the listener {endpoint}: give the address to send to (smtp)")
    host = kw.get("interface") or "127.0.0.1"
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(args[0]), kind == "SSL"


class Drills:
    """
    A node's drills: runs them (``run``, ``run_scheduled``), keeps the last
    result per domain, and is told by the node of what its engine delivered
    and bounced (only the probes' own entries are noted).

    :param node: the ``mailhub.node.Node`` (its ``config``, ``store``,
        ``archive`` and name).
    :param reactor: ``IReactorTime`` and ``IReactorTCP``/``IReactorSSL``.
    :ivar last: the last result per domain.
    :ivar last_success: per domain, when its last successful drill started.
    """

    log = Logger()

    def __init__(self, node: Any, reactor: Any, poll: float = POLL) -> None:
        self._node = node
        self._reactor = reactor
        self._poll = poll
        self.last: dict[str, DrillResult] = {}
        self.last_success: dict[str, float] = {}
        #: Probe recipients of the drills under way, with how many drills use each.
        self._watched: dict[Address, int] = {}
        #: What the engine did to the probes' entries: entry id -> (delivered?, detail, entry).
        self._seen: dict[str, tuple[bool, str, Entry]] = {}

    # -- what the node tells -------------------------------------------------

    def delivered(self, entry: Entry, recipients: Sequence[Address], at: float) -> None:
        """The engine's ``delivered`` observer: notes a probe's entry; returns at once."""
        if self._watched and entry.sender is None and any(r in self._watched for r in recipients):
            self._seen[entry.id] = (True, "", entry)

    def bounced(self, entry: Entry, outcomes: Iterable[Outcome]) -> None:
        """Told by the node of failed (``5xx``) or expired recipients: notes a probe's entry."""
        if not self._watched or entry.sender is not None:
            return
        for outcome in outcomes:
            if outcome.recipient in self._watched:
                what = "expired" if outcome.action is Action.EXPIRED else "failed"
                self._seen[entry.id] = (False, f"{what}: {outcome.reply}", entry)

    # -- running -----------------------------------------------------------------

    def recipient_for(self, domain: str, to: str | None = None) -> Address:
        """
        The probe's recipient: ``to`` (an address in one of the hub's
        domains, or a local part of ``domain``), by default ``postmaster@domain``.

        :raises DrillError: for a domain that is not the hub's, or a bad address.
        """
        config = self._node.config
        domain = domain.strip().lower()
        if domain not in config.domains:
            raise DrillError(f"{domain!r} is not a domain of the hub ({', '.join(config.domains) or 'none'})")
        to = (to or config.drills.to or "postmaster").strip()
        try:
            recipient = Address.parse(to if "@" in to else f"{to}@{domain}")
        except AddressError as e:
            raise DrillError(f"to: {to!r} is not an address ({e})") from None
        if config.route_for(recipient.domain) is None:
            raise DrillError(f"to: {recipient} is not in a domain of the hub: a drill follows mail the hub relays")
        return recipient

    def run(self, domain: str, to: str | None = None, timeout: float | None = None,
            smtp: str | None = None) -> Deferred[DrillResult]:
        """
        Send a probe for ``domain`` through this node and follow it.

        :param to: the recipient (see ``recipient_for``).
        :param timeout: seconds to wait for every step (``[drills] timeout``).
        :param smtp: ``host:port`` to send to instead of the node's own listener.
        :returns: a Deferred firing with the ``DrillResult`` (also kept in
            ``last``); it fails with ``DrillError`` only for bad arguments,
            before anything is sent.
        """
        try:
            recipient = self.recipient_for(domain, to)
            wait = float(timeout if timeout is not None else self._node.config.drills.timeout)
            if not 0 < wait <= MAX_TIMEOUT:
                raise DrillError(f"timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} seconds, not {timeout!r}")
            if smtp:
                try:
                    host, port = client.parse_target(smtp)
                except ValueError as e:
                    raise DrillError(f"smtp: {smtp!r} is not host:port ({e})") from None
                tls = False
            else:
                host, port, tls = smtp_address(self._node.config.nodes[self._node.name].smtp)
        except DrillError as e:
            return fail(e)
        return ensureDeferred(self._run(domain.strip().lower(), recipient, wait, host, port, tls))

    def run_scheduled(self) -> Deferred[None]:
        """
        ``[drills] every``: a drill of each configured domain in turn (every
        domain by default).

        :returns: a Deferred that fires when they are done and never fails.
        """
        return ensureDeferred(self._run_scheduled())

    async def _run_scheduled(self) -> None:
        config = self._node.config
        for domain in config.drills.domains or tuple(config.domains):
            try:
                await self.run(domain)
            except Exception:
                self.log.failure("drill of {domain} could not run", domain=domain)

    async def _run(self, domain: str, recipient: Address, timeout: float, host: str, port: int, tls: bool) -> DrillResult:
        clock = self._reactor
        started = clock.seconds()
        drill_id = f"{int(started)}.{secrets.token_hex(4)}"
        hostname = self._node.config.hostname
        message_id = f"<mailhub-drill.{drill_id}@{hostname}>"
        self._watched[recipient] = self._watched.get(recipient, 0) + 1
        queue_id = ""
        try:
            steps = []
            reply = await self._send(recipient, _probe(drill_id, message_id, recipient, hostname, started),
                                     host, port, tls, timeout)
            found = _QUEUED.search(reply.text) if reply.ok else None
            elapsed = clock.seconds() - started
            if found is None:
                steps.append(DrillStep("accepted", False, elapsed, str(reply)))
            else:
                queue_id = found.group(1)
                steps.append(DrillStep("accepted", True, elapsed, str(reply)))
                steps.extend(await self._follow(queue_id, recipient, started, timeout))
        finally:
            self._watched[recipient] -= 1
            if not self._watched[recipient]:
                del self._watched[recipient]
            self._seen.pop(queue_id, None)
            if not self._watched:
                self._seen.clear()
        result = DrillResult(drill_id, domain, str(self._node.name), str(recipient), message_id, queue_id,
                             started, tuple(steps))
        self.last[domain] = result
        if result.ok:
            self.last_success[domain] = started
            self.log.info("{line}", line=result.line())
        else:
            self.log.warn("{line}", line=result.line())
        return result

    async def _send(self, recipient: Address, message: bytes, host: str, port: int, tls: bool,
                    timeout: float) -> Any:
        """The probe over SMTP; the reply to its end of data, or the first that refused it."""
        from mailhub.model import Reply

        peer = client.peer_name(host, port)
        if tls:
            from twisted.internet.endpoints import SSL4ClientEndpoint
            from twisted.internet.ssl import CertificateOptions

            # The node's own listener: its certificate is often self-signed.
            endpoint: Any = SSL4ClientEndpoint(self._reactor, host, port, CertificateOptions(verify=False),
                                               timeout=timeout)
        else:
            endpoint = client.client_endpoint(self._reactor, host, port, timeout)
        try:
            protocol = await client.connect(self._reactor, endpoint, peer, timeout, timeout)
        except Exception as e:
            reply = client.connect_error_reply(e, host, peer, timeout)
            return reply if reply is not None else Reply(421, "4.4.1", f"cannot connect to {peer}: {e}")
        try:
            if not (reply := await protocol.banner).ok:
                return reply
            if not (reply := await protocol.hello(self._node.config.hostname, timeout)).ok:
                return reply
            for command in (b"MAIL FROM:<>", b"RCPT TO:<" + str(recipient).encode() + b">", b"DATA"):
                if (reply := await protocol.command(command, timeout)).code >= 400:
                    return reply
            return await protocol.data(client.wire_data(message), timeout)
        finally:
            protocol.quit()

    async def _follow(self, queue_id: str, recipient: Address, started: float, timeout: float) -> list[DrillStep]:
        """The ``archived`` and ``delivered`` steps of the probe spooled as ``queue_id``."""
        clock = self._reactor
        store, archive = self._node.store, self._node.archive
        archived: DrillStep | None = None if archive is not None else DrillStep("archived", True, None, "no archive")
        delivered: DrillStep | None = None
        spool_message_id = ""
        gone = False
        while True:
            now = clock.seconds() - started
            seen = self._seen.get(queue_id)
            if seen is not None:
                spool_message_id = seen[2].message_id
                if delivered is None:
                    delivered = DrillStep("delivered", seen[0], now, seen[1] or f"entry {queue_id}")
            if delivered is None or not spool_message_id:
                entry = await store.get(queue_id)
                gone = entry is None
                if entry is not None:
                    spool_message_id = entry.message_id
                    if delivered is None:
                        delivered = _stuck(entry, recipient, now)
                elif delivered is None and (seen := self._seen.get(queue_id)) is not None:
                    continue  # noted while the spool was asked: read it above
                elif delivered is None and archive is not None and spool_message_id:
                    # Delivered by another node: its delivery record says so.
                    if await archive.delivered([(spool_message_id, recipient)]):
                        delivered = DrillStep("delivered", True, now, f"entry {queue_id}, by another node")
            if archived is None and spool_message_id and await archive.get(spool_message_id) is not None:
                archived = DrillStep("archived", True, clock.seconds() - started, f"message {spool_message_id}")
            if archived is not None and delivered is not None:
                break
            if now >= timeout or not self._node.running:
                # A stopping node does not wait out its drills' timeouts.
                why = f"not seen within {timeout:g} s" if self._node.running else "the node stopped first"
                if delivered is None and gone:
                    why += f" (entry {queue_id} left the spool, not delivered by this node)"
                archived = archived or DrillStep("archived", False, None, why)
                delivered = delivered or DrillStep("delivered", False, None, why)
                break
            await deferLater(clock, self._poll, lambda: None)
        return [archived, delivered] if archive is not None else [delivered]


def _stuck(entry: Entry, recipient: Address, now: float) -> DrillStep | None:
    """The ``delivered`` step failed, if the probe's entry is held or was deferred; ``None`` while it may still go."""
    for r in entry.recipients:
        if r.address != recipient or r.state is not RecipientState.PENDING:
            continue
        if entry.held:
            return DrillStep("delivered", False, now, f"held: {r.reply or 'by an operator'}")
        if entry.attempts and r.reply is not None and not r.reply.ok:
            return DrillStep("delivered", False, now, f"deferred: {r.reply}")
    return None


def _probe(drill_id: str, message_id: str, recipient: Address, hostname: str, now: float) -> bytes:
    """The probe message: plain text, marked as automatic."""
    return (
        f"From: mailhub drill <mailhub-drill@{hostname}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: mailhub drill {drill_id}\r\n"
        f"Date: {email.utils.formatdate(now)}\r\n"
        f"Message-ID: {message_id}\r\n"
        "Auto-Submitted: auto-generated\r\n"
        f"X-Mailhub-Drill: {drill_id}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        f"This is a drill of the mail hub {hostname}: a probe that proves mail for\r\n"
        f"{recipient.domain} is accepted, archived and delivered.  It can be deleted.\r\n"
    ).encode("ascii")

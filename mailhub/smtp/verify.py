"""
Recipient verification by probing the route's server: a small SMTP client
that says EHLO, ``MAIL FROM:<>``, ``RCPT TO:<address>``, ``RSET`` and
``QUIT``, and never DATA, so no message is ever sent.

The probe only reports what the server said to RCPT.  Caching the answers,
and what to do while the route is down, is ``mailhub.smtp.recipients``'s
business.  This module does I/O only through the endpoint it is given and
reads time only from the injected clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from mailhub.model import Address, Reply

__all__ = ["ProbeFailed", "probe_recipient"]

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)\Z", re.DOTALL)
_ENHANCED = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3}) ?(.*)\Z", re.DOTALL)
_MAX_REPLY = 64 * 1024


class ProbeFailed(Exception):
    """
    The probe got no answer to RCPT that says whether the recipient exists:
    the connection was refused, timed out or dropped, or the server answered
    4xx (or refused the session before RCPT).
    """


class _Prober(Protocol):
    """
    One probe session; ``result`` fires with the RCPT ``Reply`` (2xx or 5xx)
    or fails with ``ProbeFailed``.
    """

    def __init__(self, hostname: str, address: Address) -> None:
        self._hostname = hostname
        self._address = address
        self._buffer = b""
        self._lines: list[bytes] = []
        self._step = "greeting"
        self._extensions: set[str] = set()
        self.result: Deferred[Reply] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > _MAX_REPLY:
            self._fail("reply too long")
            return
        while not self.result.called or self._step in ("rset", "quit"):
            nl = self._buffer.find(b"\n")
            if nl < 0:
                return
            line = self._buffer[:nl].rstrip(b"\r")
            self._buffer = self._buffer[nl + 1 :]
            m = _REPLY_LINE.match(line)
            if m is None:
                self._fail(f"malformed reply {line[:80]!r}")
                return
            self._lines.append(m.group(3))
            if m.group(2) == b"-":
                continue
            lines, self._lines = self._lines, []
            self._reply(int(m.group(1)), [x.decode("utf-8", "replace") for x in lines])
            if self._step == "done":
                return

    def _reply(self, code: int, lines: list[str]) -> None:
        step = self._step
        if step == "greeting":
            if code != 220:
                self._fail(f"greeting {code}")
                return
            self._send(f"EHLO {self._hostname}", "ehlo")
        elif step in ("ehlo", "helo"):
            if code != 250:
                if step == "ehlo" and code >= 500:
                    self._send(f"HELO {self._hostname}", "helo")
                else:
                    self._fail(f"{step.upper()} answered {code}")
                return
            self._extensions = {x.split(" ", 1)[0].upper() for x in lines[1:]}
            params = ""
            if not str(self._address).isascii():
                if "SMTPUTF8" not in self._extensions:
                    self._succeed(Reply(553, "5.6.7", "The route's server does not support SMTPUTF8"))
                    return
                params = " SMTPUTF8"
            self._send(f"MAIL FROM:<>{params}", "mail")
        elif step == "mail":
            if code != 250:
                self._fail(f"MAIL FROM:<> answered {code}")
                return
            self._send(f"RCPT TO:<{self._address}>", "rcpt")
        elif step == "rcpt":
            if 400 <= code < 500:
                self._fail(f"RCPT answered {code} {' '.join(lines)}")
                return
            text = " ".join(lines)
            m = _ENHANCED.match(text)
            enhanced, text = (m.group(1), m.group(2)) if m else ("", text)
            self._succeed(Reply(code, enhanced, text))
        elif step == "rset":
            self._send("QUIT", "quit")
        elif step == "quit":
            self._step = "done"
            self._close()

    def _send(self, line: str, step: str) -> None:
        self._step = step
        assert self.transport is not None
        self.transport.write(line.encode("utf-8") + b"\r\n")

    def _succeed(self, reply: Reply) -> None:
        self.result.callback(reply)
        # Be polite: end the transaction and the session; the answer is already given.
        self._send("RSET", "rset")

    def _fail(self, why: str) -> None:
        self._step = "done"
        if not self.result.called:
            self.result.errback(ProbeFailed(why))
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.result.called:
            self.result.errback(ProbeFailed(f"connection lost: {reason.getErrorMessage()}"))


def probe_recipient(
    reactor: Any,
    target: str,
    address: Address,
    hostname: str,
    timeout: float,
    endpoint: Callable[[str, int], IStreamClientEndpoint] | None = None,
) -> Deferred[Reply]:
    """
    Ask the server at ``target`` whether it takes mail for ``address``.

    :param reactor: provides ``IReactorTCP`` and ``IReactorTime``.
    :param target: ``host:port`` (the route's target).
    :param address: the recipient to ask about.
    :param hostname: the name to give in EHLO (the hub's).
    :param timeout: seconds the whole probe may take.
    :param endpoint: builds the client endpoint from host and port
        (default: ``HostnameEndpoint``).
    :returns: a Deferred firing with the server's ``Reply`` to RCPT (2xx or
        5xx; a ``553 5.6.7`` when ``address`` needs SMTPUTF8 and the server
        does not offer it), or failing with ``ProbeFailed``.
    """
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if endpoint is None:
        ep: IStreamClientEndpoint = HostnameEndpoint(reactor, host, int(port), timeout=timeout)
    else:
        ep = endpoint(host, int(port))
    prober = _Prober(hostname, address)
    result: Deferred[Reply] = Deferred()
    connecting = connectProtocol(ep, prober)

    def timed_out() -> None:
        if not result.called:
            result.errback(ProbeFailed(f"no answer from {target} within {timeout:g}s"))
        connecting.cancel()
        if prober.transport is not None:
            prober.transport.abortConnection()  # type: ignore[attr-defined]

    timer = reactor.callLater(timeout, timed_out)

    def connect_failed(f: Failure) -> None:
        finished(Failure(ProbeFailed(f"cannot connect to {target}: {f.getErrorMessage()}")))

    def finished(outcome: object) -> None:
        if timer.active():
            timer.cancel()
        if not result.called:
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)  # type: ignore[arg-type]

    connecting.addErrback(connect_failed)
    prober.result.addBoth(finished)
    return result

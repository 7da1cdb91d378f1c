"""
Writing to a TCP connection without waiting for the reactor's next turn.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["send_now", "write_now"]


def send_now(transport: Any, data: bytes) -> bytes:
    """
    Send ``data`` on a plain TCP transport at once if nothing is queued
    before it; return what is left for the caller to ``write`` as usual (all
    of it for another transport, TLS, queued output or a socket error, which
    the transport then meets and reports itself).

    Data given to ``transport.write`` waits for the next turn of the reactor:
    register for writability, poll, send, unregister: two ``epoll_ctl``
    calls and a loop turn each time.  For the SMTP server that is seven
    times per message from a client that does not pipeline, the larger part
    of the reactor's work per message after the kernel's; for the SMTP
    client it is the wait behind every other ready connection's events
    before each command group and each message goes out.  The socket's
    buffer is nearly always empty, so the data goes out at once.

    This reads ``twisted.internet.tcp.Connection``'s buffers (``dataBuffer``,
    ``_tempDataBuffer``): only the exact classes ``tcp.Server`` and
    ``tcp.Client`` are trusted, anything else (a subclass, a TLS transport,
    a test's ``StringTransport``) is written as usual.
    """
    if (
        type(transport) not in _PLAIN_TCP
        or transport.TLS
        or not transport.connected
        or transport._writeDisconnected
        or transport.dataBuffer
        or transport._tempDataBuffer
    ):
        return data
    try:
        sent = transport.socket.send(data)
    except OSError:
        return data
    return data[sent:]


def write_now(transport: Any, data: bytes) -> None:
    """``send_now``, then ``write`` what it left."""
    rest = send_now(transport, data)
    if rest:
        transport.write(rest)


_PLAIN_TCP = (tcp.Server, tcp.Client)

"""
``mailhub.netio``: data sent at once on the SMTP client's plain TCP
connections too (the server's side is tested in test_smtp_server.py).
"""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol

from mailhub.netio import send_now, write_now


class _Client(Protocol):
    def __init__(self, connected: Deferred[Protocol]) -> None:
        self._connected = connected

    def connectionMade(self) -> None:
        self._connected.callback(self)


async def _client_connection() -> tuple[tcp.Client, socket.socket, socket.socket]:
    """A real ``tcp.Client`` transport to a plain listening socket, and that socket's end."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    connected: Deferred[Protocol] = Deferred()
    factory = ClientFactory()
    factory.protocol = lambda: _Client(connected)  # type: ignore[assignment,misc]
    reactor.connectTCP("127.0.0.1", listener.getsockname()[1], factory)  # type: ignore[attr-defined]
    protocol = await connected
    server, _ = listener.accept()
    return protocol.transport, server, listener  # type: ignore[return-value]


@pytest_twisted.ensureDeferred
async def test_client_connection_sends_at_once() -> None:
    transport, server, listener = await _client_connection()
    try:
        assert type(transport) is tcp.Client
        assert send_now(transport, b"MAIL FROM:<a@b.example>\r\n") == b""
        # No turn of the reactor in between: the peer can read it already.
        server.settimeout(5)
        assert server.recv(100) == b"MAIL FROM:<a@b.example>\r\n"
    finally:
        transport.abortConnection()
        server.close()
        listener.close()


@pytest_twisted.ensureDeferred
async def test_write_now_queues_behind_earlier_writes_in_order() -> None:
    transport, server, listener = await _client_connection()
    try:
        transport.write(b"first ")
        write_now(transport, b"second")
        # Not sent ahead of the queued data: both go at the reactor's turn, in order.
        server.setblocking(False)
        received = b""
        for _ in range(500):
            await _turn()
            try:
                received += server.recv(100)
            except BlockingIOError:
                continue
            if len(received) >= 12:
                break
        assert received == b"first second"
    finally:
        transport.abortConnection()
        server.close()
        listener.close()


async def _turn() -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(0.01, d.callback, None)  # type: ignore[attr-defined]
    await d

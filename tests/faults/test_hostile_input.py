"""
Hostile input through the whole hub, as users run it (``twistd mailhub``,
real sockets): what reaches the downstream server is never something it
could misread, and a sender with an address literal gets its bounce.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred

from hubprocess import HubProcess, eventually, free_port, hub_config, message, send
from mailhub.testing.downstream import DownstreamServer

pytestmark = pytest.mark.integration


class Hub:
    """The embedded default with ``nul_bytes = "remove"``; DSNs go to the downstream server too."""

    def __init__(self, tmp_path: Path, downstream: DownstreamServer) -> None:
        self.port = free_port()
        text = hub_config(
            tmp_path / "spool.db", downstream.port, {"dallas": self.port},
            extra='[smtp]\nnul_bytes = "remove"\n',
        )
        self.process = HubProcess(tmp_path, text)


@pytest.fixture
def hub(tmp_path: Path, downstream: DownstreamServer) -> Iterator[Hub]:
    running = Hub(tmp_path, downstream)
    running.process.start()
    pytest_twisted.blockon(ensureDeferred(running.process.started(running.port)))
    yield running
    pytest_twisted.blockon(ensureDeferred(running.process.stop(signal.SIGTERM)))


@pytest_twisted.ensureDeferred
async def test_nul_before_a_dot_reaches_the_server_as_one_message_without_nul(
    hub: Hub, downstream: DownstreamServer
) -> None:
    """
    CRLF NUL "." CRLF followed by a second transaction: the server gets one
    message, with no NUL, whose line "." is dot-stuffed on the wire.
    """
    smuggled = message("smuggle").replace(
        b"Body of smuggle.\r\n",
        b"Body of smuggle.\r\n\x00.\r\nMAIL FROM:<evil@elsewhere.example>\r\n"
        b"RCPT TO:<victim@example.com>\r\nDATA\r\nsmuggled\r\n",
    )
    code, _ = await send(hub.port, smuggled)
    assert code == 250
    [got] = await downstream.wait_for(1)
    assert got.recipients == ["alice@example.com"]
    assert b"\x00" not in got.raw
    assert got.message.endswith(smuggled.replace(b"\x00", b""))
    assert b"\r\nBody of smuggle.\r\n..\r\nMAIL FROM:<evil@elsewhere.example>\r\n" in got.raw


@pytest.mark.parametrize("sender", ["bouncer@[192.0.2.1]", "bouncer@[IPv6:2001:db8::1]"])
@pytest_twisted.ensureDeferred
async def test_bounce_to_an_address_literal_sender_is_sent(
    hub: Hub, downstream: DownstreamServer, sender: str
) -> None:
    """The sender is accepted; when the server refuses the recipient, its DSN goes out to it."""
    downstream.recipient_replies = {"alice@example.com": "550 5.1.1 no such user"}
    code, text = await send(hub.port, message("literal"), sender=sender)
    assert code == 250, text
    [dsn] = await downstream.wait_for(1)
    assert dsn.sender == ""
    assert [r.lower() for r in dsn.recipients] == [sender.lower()]
    assert b"Content-Type: multipart/report; report-type=delivery-status" in dsn.message
    assert b"alice@example.com" in dsn.message

    async def spool_empty() -> bool:
        return await hub.process.queue() == []

    # Both the refused message and its DSN are done with: nothing waits in the spool.
    await eventually(spool_empty, timeout=10, what="an empty spool")

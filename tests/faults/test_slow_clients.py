"""
Clients that take the hub's time: many connections that trickle bytes, and
one message of tens of megabytes sent at line speed.  Meanwhile an ordinary
client sends ordinary messages, one after the other: each session's latency
is printed (times are not asserted beyond "well within the session
timeout": the machine is shared), and every message is delivered.

One ``twistd mailhub`` (the embedded default, one node) per test; the
long part (``--slow``) trickles over more connections and sends 50 MB
instead of 8 MB.
"""

from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall

from faults.tally import Tally
from hubprocess import HubProcess, eventually, free_port, hub_config, message, send, sleep
from mailhub.testing.downstream import DownstreamServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: The hub's default ``[smtp] idle_timeout``: what a session may take between commands.
SESSION_TIMEOUT = 300.0
#: "Well within" it: an ordinary session that took this long has been starved.
WELL_WITHIN = SESSION_TIMEOUT / 10


class Hub:
    def __init__(self, directory: Path, downstream: DownstreamServer) -> None:
        self.port = free_port()
        extra = "[smtp]\nmax_messages_per_minute_per_ip = 100000\nmax_connections_per_ip = 1000\n"
        self.process = HubProcess(directory, hub_config(directory / "spool.db", downstream.port,
                                                        {"dallas": self.port}, extra=extra))


@pytest.fixture
def hub(tmp_path: Path, downstream: DownstreamServer) -> Iterator[Hub]:
    running = Hub(tmp_path, downstream)
    running.process.start()
    pytest_twisted.blockon(ensureDeferred(running.process.started(running.port)))
    yield running
    pytest_twisted.blockon(ensureDeferred(running.process.stop(signal.SIGTERM)))


class Trickler(Protocol):
    """Sends a session one byte every ``interval`` seconds, and never finishes it."""

    SCRIPT = (
        b"EHLO trickle.outside.example\r\nMAIL FROM:<trickle@outside.example>\r\n"
        b"RCPT TO:<alice@example.com>\r\nDATA\r\n" + b"Subject: never ends\r\n\r\n" + b"x" * 100000
    )

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.sent = 0
        self.closed = False
        self._loop = LoopingCall(self._one)

    def connectionMade(self) -> None:
        self._loop.clock = reactor
        self._loop.start(self.interval, now=False)

    def _one(self) -> None:
        assert self.transport is not None
        self.transport.write(self.SCRIPT[self.sent : self.sent + 1])
        self.sent += 1

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        if self._loop.running:
            self._loop.stop()

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class Probe:
    """An ordinary client: one message after another until ``stop``, each session timed."""

    def __init__(self, tally: Tally, port: int) -> None:
        self.tally = tally
        self.latencies: list[float] = []
        self.running = True
        self._done: Deferred[None] = ensureDeferred(self._run(port))

    async def _run(self, port: int) -> None:
        i = 0
        while self.running:
            tag = f"ordinary-{i}"
            i += 1
            started = time.monotonic()
            code, _ = await send(port, message(tag))
            self.latencies.append(time.monotonic() - started)
            self.tally.reply(tag, code)
            await sleep(0.2)

    async def stop(self) -> None:
        self.running = False
        await self._done

    def summary(self) -> str:
        lat = sorted(self.latencies)
        return (f"{len(lat)} ordinary sessions: median {statistics.median(lat) * 1000:.0f} ms,"
                f" max {lat[-1] * 1000:.0f} ms")


@pytest_twisted.ensureDeferred
async def test_trickling_connections_do_not_starve_an_ordinary_client(
    hub: Hub, downstream: DownstreamServer, slow: bool
) -> None:
    count = 400 if slow else 60
    trickling = 30.0 if slow else 5.0
    tricklers: list[Trickler] = []
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", hub.port)
    for _ in range(count):
        tricklers.append(await connectProtocol(endpoint, Trickler(interval=0.2)))
    tally = Tally()
    probe = Probe(tally, hub.port)
    await sleep(trickling)
    await probe.stop()
    still_open = sum(not t.closed for t in tricklers)
    for t in tricklers:
        t.stop()
    await eventually(lambda: tally.acknowledged <= set(Tally.delivered(downstream.messages)),
                     timeout=30, what="every ordinary message delivered")
    tally.report(f"{count} connections trickling a byte every 0.2 s", downstream.messages, None,
                 note=probe.summary() + f"; {still_open} trickling connections still open")
    assert len(probe.latencies) >= 3
    assert tally.acknowledged == set(tally.sent)
    assert max(probe.latencies) < WELL_WITHIN
    # Nothing of the never-ending sessions was delivered.
    assert all(m.sender != "trickle@outside.example" for m in downstream.messages)


@pytest_twisted.ensureDeferred
async def test_a_huge_message_at_line_speed_does_not_starve_an_ordinary_client(
    hub: Hub, downstream: DownstreamServer, slow: bool
) -> None:
    size = (50 * 1024 * 1024 - 64 * 1024) if slow else 8 * 1024 * 1024
    downstream.max_size = size * 2
    line = b"y" * 998 + b"\r\n"
    huge = message("huge").replace(b"Body of", line * (size // len(line)) + b"Body of")
    tally = Tally()
    probe = Probe(tally, hub.port)
    started = time.monotonic()
    code, text = await send(hub.port, huge)
    took = time.monotonic() - started
    tally.reply("huge", code)
    assert code == 250, text
    await eventually(lambda: "huge" in Tally.delivered(downstream.messages), timeout=120,
                     what="the huge message delivered")
    await probe.stop()
    await eventually(lambda: tally.acknowledged <= set(Tally.delivered(downstream.messages)),
                     timeout=30, what="every ordinary message delivered")
    tally.report(f"one {len(huge) / 2**20:.0f} MB message", downstream.messages, None,
                 note=f"accepted in {took:.1f} s; " + probe.summary())
    [got] = [m for m in downstream.messages if m.sender and "huge" in Tally.delivered([m])]
    assert got.message.endswith(huge)
    assert tally.acknowledged == set(tally.sent)
    assert max(probe.latencies) < WELL_WITHIN

"""
The organisation's server misbehaves: it drops the connection after storing
a message but before its reply, answers one byte a second, says ``421`` in
the middle of a session, stalls its TLS handshake, or answers ``250`` to
DATA twice.  Each time every acknowledged message is delivered (again, where
the server may have it already: at least once, as the README promises), no
connection stays open past the route's timeouts, and the spool ends empty.

One ``twistd mailhub`` (the embedded default, one node) for the module,
with short route timeouts (``command_timeout = 1``), retries after 1.2 s and
a route probe every second; the server is a real
``mailhub.testing.downstream.DownstreamServer`` told how to misbehave.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults

from faults.tally import Tally
from hubprocess import HubProcess, eventually, free_port, hub_config, message, send
from mailhub.smtp.tls import generate_self_signed
from mailhub.testing.downstream import DownstreamServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

COMMAND_TIMEOUT = 1.0
IDLE_TIMEOUT = 1.0
#: A connection the hub gives up on is closed within its timeout and this much.
SLACK = 2.0


class Hub:
    def __init__(self, directory: Path, downstream: DownstreamServer) -> None:
        self.port = free_port()
        route_options = (
            f"connect_timeout = 2\ncommand_timeout = {COMMAND_TIMEOUT:g}\ndata_timeout = 3\n"
            f"idle_timeout = {IDLE_TIMEOUT:g}\n"
        )
        text = hub_config(
            directory / "spool.db", downstream.port, {"dallas": self.port}, retry_minutes=0.02,
            delivery="[delivery]\nlease_seconds = 30\ntakeover_seconds = 5\nmax_scan_interval = 1\n"
            "probe_seconds = 1\n",
            extra=route_options + "[smtp]\nmax_messages_per_minute_per_ip = 100000\n",
        )
        self.process = HubProcess(directory, text)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DownstreamServer]:
    s = DownstreamServer(reactor)
    pytest_twisted.blockon(s.start(port=0))
    yield s
    pytest_twisted.blockon(s.stop())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    generate_self_signed("downstream.test", cert, key, time.time())
    return cert, key


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, server: DownstreamServer) -> Iterator[Hub]:
    running = Hub(tmp_path_factory.mktemp("hub"), server)
    running.process.start()
    pytest_twisted.blockon(ensureDeferred(running.process.started(running.port)))
    yield running
    pytest_twisted.blockon(ensureDeferred(running.process.stop(signal.SIGTERM)))


@pytest.fixture
def downstream(server: DownstreamServer) -> Iterator[DownstreamServer]:
    """The module's server, behaving again and with its records cleared, for each test."""
    server.reset()
    yield server
    server.mode = "accept"
    server.drip = 0.0
    server.starttls_stall = False
    server.tls_certificate = server.tls_key = None


@pytest.fixture
def count(slow: bool) -> int:
    return 12 if slow else 4


async def send_all(tally: Tally, port: int, tags: list[str]) -> None:
    async def one(tag: str) -> None:
        code, _ = await send(port, message(tag))
        tally.reply(tag, code)

    await gatherResults([ensureDeferred(one(tag)) for tag in tags])
    assert set(tags) <= tally.acknowledged, tally.refused


async def all_delivered(tally: Tally, downstream: DownstreamServer, timeout: float = 30) -> float:
    """Wait until every acknowledged message reached the server; the seconds it took."""
    started = time.monotonic()
    await eventually(
        lambda: tally.acknowledged <= set(Tally.delivered(downstream.messages)),
        timeout=timeout, what="every acknowledged message delivered",
    )
    return time.monotonic() - started


async def settled(hub: Hub, downstream: DownstreamServer) -> None:
    """The spool is empty and the hub has closed every connection (its idle timeout fired)."""

    async def empty() -> bool:
        return await hub.process.queue() == []

    await eventually(empty, timeout=20, what="an empty spool")
    await eventually(lambda: downstream.active_connections == 0, timeout=IDLE_TIMEOUT + 2 * SLACK,
                     what="every connection to the server closed")


@pytest_twisted.ensureDeferred
async def test_server_that_drops_after_storing_gets_the_dropped_messages_again(
    hub: Hub, downstream: DownstreamServer, count: int
) -> None:
    """
    The server stores each message it is sent and closes before its reply:
    the hub cannot know, defers, and sends again once the server answers.
    After that every message arrives exactly once, so the duplicates are
    exactly the messages that were in flight at a drop.
    """
    downstream.mode = "store-drop"
    tally = Tally()
    tags = [f"store-drop-{i}" for i in range(count)]
    await send_all(tally, hub.port, tags)
    # Every first attempt, and the route's probes once it is down.
    await eventually(lambda: len(downstream.messages) >= count, timeout=30, what="messages stored and dropped")
    downstream.mode = "accept"
    fixed, started = reactor.seconds(), time.monotonic()
    await eventually(
        lambda: set(Tally.delivered(m for m in downstream.messages if m.received_at >= fixed)) >= set(tags),
        timeout=30, what="every message delivered with a reply",
    )
    recovered = time.monotonic() - started
    await settled(hub, downstream)
    dropped = Tally.delivered(m for m in downstream.messages if m.received_at < fixed)
    answered = Tally.delivered(m for m in downstream.messages if m.received_at >= fixed)
    delivered = Tally.delivered(downstream.messages)
    tally.report("server drops after storing, before its 250", downstream.messages, recovered,
                 note=f"{sum(dropped.values())} copies dropped before a reply")
    assert dropped and set(dropped) <= set(tags)
    # After the server answers again each message is delivered once, and only once.
    assert answered == {tag: 1 for tag in tags}
    assert delivered == {tag: dropped[tag] + 1 for tag in tags}
    assert tally.lost(downstream.messages) == set()


@pytest_twisted.ensureDeferred
async def test_server_answering_one_byte_a_second_is_timed_out_then_delivered_once(
    hub: Hub, downstream: DownstreamServer, count: int
) -> None:
    """
    A greeting one byte a second never completes within ``command_timeout``:
    the hub closes each such connection after the timeout (the timer runs
    per reply, not per byte) and retries; once the server is quick again,
    every message arrives once.
    """
    downstream.drip = 1.0
    tally = Tally()
    tags = [f"drip-{i}" for i in range(count)]
    await send_all(tally, hub.port, tags)
    await eventually(lambda: len(downstream.durations) >= 2, timeout=30,
                     what="two connections given up by the hub")
    assert downstream.messages == []
    assert max(downstream.durations) < COMMAND_TIMEOUT + SLACK, downstream.durations
    downstream.drip = 0.0
    recovered = await all_delivered(tally, downstream)
    await settled(hub, downstream)
    tally.report("server answers one byte a second", downstream.messages, recovered,
                 note=f"{len(downstream.durations)} connections, longest {max(downstream.durations):.1f} s")
    assert Tally.delivered(downstream.messages) == {tag: 1 for tag in tags}


@pytest_twisted.ensureDeferred
async def test_421_in_the_middle_of_a_session_defers_then_delivers_once(
    hub: Hub, downstream: DownstreamServer, count: int
) -> None:
    """``421`` to MAIL closes the session: nothing was stored, the entries are deferred, then delivered once."""
    downstream.mode = "shutdown"
    tally = Tally()
    tags = [f"shutdown-{i}" for i in range(count)]
    await send_all(tally, hub.port, tags)
    await eventually(lambda: sum(c.upper().startswith(b"MAIL") for c in downstream.commands) >= 2,
                     timeout=30, what="two sessions ended by 421")
    downstream.mode = "accept"
    recovered = await all_delivered(tally, downstream)
    await settled(hub, downstream)
    tally.report("server says 421 mid-session", downstream.messages, recovered)
    assert Tally.delivered(downstream.messages) == {tag: 1 for tag in tags}


@pytest_twisted.ensureDeferred
async def test_stalled_tls_handshake_times_out_and_the_message_goes_in_clear(
    hub: Hub, downstream: DownstreamServer, certificate: tuple[str, str], count: int
) -> None:
    """
    STARTTLS gets ``220`` and then no handshake: after ``command_timeout``
    the hub gives up on that connection and, as ``tls = "opportunistic"``
    says, sends the message over a new one in clear.  Nothing waits for a
    retry, nothing is delivered twice.
    """
    downstream.tls_certificate, downstream.tls_key = certificate
    downstream.starttls_stall = True
    tally = Tally()
    tags = [f"tls-stall-{i}" for i in range(count)]
    started = time.monotonic()
    await send_all(tally, hub.port, tags)
    await all_delivered(tally, downstream)
    delivered_after = time.monotonic() - started
    await settled(hub, downstream)
    stalls = sum(c.upper() == b"STARTTLS" for c in downstream.commands)
    tally.report("TLS handshake stalls", downstream.messages, None,
                 note=f"{stalls} stalled handshakes; all delivered in clear {delivered_after:.1f} s after the first send")
    assert stalls >= 1
    assert Tally.delivered(downstream.messages) == {tag: 1 for tag in tags}
    assert not any(m.tls for m in downstream.messages)
    assert max(downstream.durations) < COMMAND_TIMEOUT + IDLE_TIMEOUT + SLACK, downstream.durations


@pytest_twisted.ensureDeferred
async def test_250_twice_to_data_delivers_each_message_once(
    hub: Hub, downstream: DownstreamServer, count: int
) -> None:
    """
    A second ``250`` after the end of DATA is a reply to nothing: the hub
    ends that connection rather than take it for the reply to its next
    command, and every message is delivered once.
    """
    downstream.mode = "data-twice"
    tally = Tally()
    tags = [f"data-twice-{i}" for i in range(count)]
    for tag in tags:
        # One after the other, so that each could reuse the connection of the one before.
        await send_all(tally, hub.port, [tag])
        await all_delivered(tally, downstream)
    await settled(hub, downstream)
    tally.report("server answers 250 to DATA twice", downstream.messages, None,
                 note=f"{downstream.connections} connections for {count} messages")
    assert Tally.delivered(downstream.messages) == {tag: 1 for tag in tags}
    assert downstream.connections == count

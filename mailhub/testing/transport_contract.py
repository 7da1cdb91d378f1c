"""
The transport contract: what every ``ITransport`` (and its
``ITransportPlugin``) must do, whatever it speaks.

A transport plugin's tests subclass ``TransportContract`` (and, for a
transport that connects to a server over TCP, ``NetworkTransportContract``
too) and provide a ``harness`` fixture: a ``TransportHarness`` for a fresh
target (a server, a directory, ...) that the test controls::

    class TestMyTransport(TransportContract, NetworkTransportContract):
        @pytest.fixture
        def harness(self, my_server):
            return MyHarness(my_server)

What the suite checks, for every transport: the factory and its transports
provide their interfaces; ``check_config`` refuses a bad target with a
one-line ``target: ...`` error (and accepts the harness's own); a message
reaches every recipient, byte for byte; each recipient gets its own reply,
2xx, 4xx (a recipient the target cannot take now) or 5xx (one it does not
know), in one delivery; only the entry's pending recipients are tried; a
target that is down is a 4xx for every recipient, and the next delivery
after it is back succeeds; ``deliver`` never errbacks.  For a network
transport, besides: a refused connection, a server that never answers (with
the harness's short timeouts) and a server that drops the connection at
once are each a 4xx for every recipient, within the time given.

The tests are ``async`` (pytest-twisted's ``ensureDeferred``) and run on the
global reactor, against real targets.
"""

from __future__ import annotations

import abc
import inspect
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, ServerFactory
from zope.interface.verify import verifyObject

from mailhub.interfaces import ITransport, ITransportPlugin
from mailhub.model import Address, Entry, Recipient, RecipientState, Reply
from mailhub.plugin import check_plugin_config
from mailhub.testing.redis_server import free_port

__all__ = ["CONTRACT_MESSAGE", "NetworkTransportContract", "TransportContract", "TransportHarness"]

SENDER = Address("sender", "outside.example")

#: The suite's message: dot lines, 8-bit text, a long line; CRLF line ends.
CONTRACT_MESSAGE = (
    b"From: sender@outside.example\r\n"
    b"Subject: contract\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"..and one with two\r\n"
    b".\r\n"
    + "gr\u00fc\u00dfe, \u4f60\u597d\r\n".encode()
    + b"x" * 900
    + b"\r\nend\r\n"
)


class TransportHarness(abc.ABC):
    """
    What a transport's tests give the contract: its plugin, a target the
    test controls, and addresses that the target takes, defers or refuses.

    :ivar plugin: the ``ITransportPlugin`` under test.
    :ivar known: two addresses the target takes mail for.
    :ivar unknown: an address the target refuses for good (a 5xx).
    :ivar deferred: an address the target cannot take now (a 4xx: a full
        mailbox, say), while it takes the others of the same message.
    :ivar bad_targets: route targets that ``check_config`` must refuse.
    """

    plugin: Any
    known: tuple[Address, Address]
    unknown: Address
    deferred: Address
    bad_targets: Sequence[str]

    @abc.abstractmethod
    def config(self, **options: Any) -> dict[str, Any]:
        """
        What ``plugin.make`` takes for the target: ``target``, ``hostname``
        and ``options`` (the route's options).
        """

    @abc.abstractmethod
    def received(self, recipient: Address) -> Any:
        """
        The messages the target has delivered to ``recipient`` since the
        harness was made, as the transport was given them (the harness
        removes what its server adds, such as ``Return-Path:``, and gives
        CRLF line ends), oldest first: a list of ``bytes``, or an awaitable
        of one.
        """

    @abc.abstractmethod
    def down(self) -> Any:
        """Make the target unreachable (stop the server); may return an awaitable."""

    @abc.abstractmethod
    def up(self) -> Any:
        """Make it reachable again, at the same target; may return an awaitable."""


async def _settle(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _entry(*recipients: Address, delivered: Sequence[Address] = (), sender: Address | None = SENDER) -> Entry:
    return Entry(
        id="contract-entry",
        message_id="contract-message",
        route="contract",
        sender=sender,
        recipients=[Recipient(a) for a in recipients]
        + [Recipient(a, RecipientState.DELIVERED) for a in delivered],
    )


def _codes(replies: Mapping[Address, Reply]) -> dict[Address, int]:
    return {a: r.code for a, r in replies.items()}


class TransportContract:
    """
    The tests every transport passes; the subclass provides a ``harness``
    fixture returning a ``TransportHarness``.
    """

    @pytest.fixture
    def make_transport(self, harness: TransportHarness) -> Iterator[Any]:
        """Makes transports through the plugin; closes them after the test."""
        made: list[Any] = []

        def make(**options: Any) -> Any:
            transport = harness.plugin.make(harness.config(**options), reactor)
            made.append(transport)
            return transport

        yield make
        for transport in made:
            pytest_twisted.blockon(transport.close())

    def test_plugin_provides_its_interface(self, harness: TransportHarness) -> None:
        assert verifyObject(ITransportPlugin, harness.plugin)
        assert isinstance(harness.plugin.name, str) and harness.plugin.name

    def test_transport_provides_its_interface(self, make_transport: Any) -> None:
        assert verifyObject(ITransport, make_transport())

    def test_check_config_takes_the_harness_target(self, harness: TransportHarness) -> None:
        assert check_plugin_config(harness.plugin, harness.config(), "domains.example") is None

    def test_check_config_refuses_a_bad_target_in_one_line(self, harness: TransportHarness) -> None:
        assert harness.bad_targets, "a harness names at least one bad target"
        for target in harness.bad_targets:
            problem = check_plugin_config(
                harness.plugin, {**harness.config(), "target": target}, "domains.example"
            )
            assert problem is not None, f"check_config took the target {target!r}"
            key, what = problem
            assert key == "target", (target, problem)
            assert what and "\n" not in what, (target, what)

    @pytest_twisted.ensureDeferred
    async def test_message_reaches_every_recipient_intact(self, harness, make_transport) -> None:
        first, second = harness.known
        replies = await make_transport().deliver(_entry(first, second), CONTRACT_MESSAGE)
        assert set(replies) == {first, second}
        assert all(200 <= r.code < 300 for r in replies.values()), replies
        for address in (first, second):
            assert await _settle(harness.received(address)) == [CONTRACT_MESSAGE]

    @pytest_twisted.ensureDeferred
    async def test_null_sender_is_delivered(self, harness, make_transport) -> None:
        first, _ = harness.known
        replies = await make_transport().deliver(_entry(first, sender=None), CONTRACT_MESSAGE)
        assert 200 <= replies[first].code < 300, replies
        assert len(await _settle(harness.received(first))) == 1

    @pytest_twisted.ensureDeferred
    async def test_each_recipient_gets_its_own_reply(self, harness, make_transport) -> None:
        first, second = harness.known
        entry = _entry(first, harness.unknown, harness.deferred, second)
        replies = await make_transport().deliver(entry, CONTRACT_MESSAGE)
        assert set(replies) == {first, second, harness.unknown, harness.deferred}
        assert 200 <= replies[first].code < 300 and 200 <= replies[second].code < 300, replies
        assert replies[harness.unknown].permanent, replies
        assert replies[harness.deferred].temporary, replies
        assert await _settle(harness.received(first)) == [CONTRACT_MESSAGE]
        assert await _settle(harness.received(second)) == [CONTRACT_MESSAGE]
        assert await _settle(harness.received(harness.deferred)) == []

    @pytest_twisted.ensureDeferred
    async def test_only_pending_recipients_are_tried(self, harness, make_transport) -> None:
        first, second = harness.known
        replies = await make_transport().deliver(_entry(first, delivered=[second]), CONTRACT_MESSAGE)
        assert list(replies) == [first]
        assert await _settle(harness.received(second)) == []

    @pytest_twisted.ensureDeferred
    async def test_entry_without_pending_recipients_gets_no_replies(self, harness, make_transport) -> None:
        first, _ = harness.known
        assert await make_transport().deliver(_entry(delivered=[first]), CONTRACT_MESSAGE) == {}
        assert await _settle(harness.received(first)) == []

    @pytest_twisted.ensureDeferred
    async def test_target_down_is_temporary_and_the_next_delivery_succeeds(
        self, harness, make_transport
    ) -> None:
        first, second = harness.known
        transport = make_transport()
        # A first delivery, so that a transport that keeps connections has one.
        assert (await transport.deliver(_entry(first), CONTRACT_MESSAGE))[first].ok
        await _settle(harness.down())
        try:
            replies = await transport.deliver(_entry(first, second), CONTRACT_MESSAGE)
        finally:
            await _settle(harness.up())
        assert set(replies) == {first, second}
        assert all(r.temporary for r in replies.values()), replies
        replies = await transport.deliver(_entry(first, second), CONTRACT_MESSAGE)
        assert all(r.ok for r in replies.values()), replies
        assert len(await _settle(harness.received(second))) == 1

    @pytest_twisted.ensureDeferred
    async def test_close_fires(self, harness, make_transport) -> None:
        transport = make_transport()
        first, _ = harness.known
        await transport.deliver(_entry(first), CONTRACT_MESSAGE)
        result = transport.close()
        assert isinstance(result, Deferred)
        await result


class _Silent(Protocol):
    """Accepts a connection and never says a word."""


class _Hangup(Protocol):
    """Accepts a connection and closes it at once."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class NetworkTransportContract:
    """
    The tests of a transport that connects to a server over TCP; the
    harness also has ``tcp_target(host, port)`` (the route target for a
    server at that address) and ``timeout_options(seconds)`` (the route
    options that make every wait of the transport last ``seconds``).
    """

    #: Seconds each wait may last in the timeout tests.
    TIMEOUT = 0.5

    def _make(self, harness: Any, port: int, **options: Any) -> Any:
        config = {**harness.config(**options), "target": harness.tcp_target("127.0.0.1", port)}
        return harness.plugin.make(config, reactor)

    def _serve(self, protocol: type[Protocol]) -> Any:
        """:returns: the ``IListeningPort`` of a server on 127.0.0.1."""
        listen: Any = reactor.listenTCP  # type: ignore[attr-defined]
        return listen(0, ServerFactory.forProtocol(protocol), interface="127.0.0.1")

    @pytest_twisted.ensureDeferred
    async def test_connection_refused_is_temporary(self, harness) -> None:
        first, second = harness.known
        transport = self._make(harness, free_port())
        try:
            replies = await transport.deliver(_entry(first, second), CONTRACT_MESSAGE)
        finally:
            await transport.close()
        assert set(replies) == {first, second}
        assert all(r.temporary for r in replies.values()), replies

    @pytest_twisted.ensureDeferred
    async def test_server_that_never_answers_times_out_as_temporary(self, harness) -> None:
        first, second = harness.known
        listening = self._serve(_Silent)
        transport = self._make(
            harness, listening.getHost().port, **harness.timeout_options(self.TIMEOUT)
        )
        started = time.monotonic()
        try:
            replies = await transport.deliver(_entry(first, second), CONTRACT_MESSAGE)
        finally:
            await transport.close()
            await listening.stopListening()
        assert set(replies) == {first, second}
        assert all(r.temporary for r in replies.values()), replies
        assert time.monotonic() - started < 20 * self.TIMEOUT

    @pytest_twisted.ensureDeferred
    async def test_dropped_connection_is_temporary(self, harness) -> None:
        first, second = harness.known
        listening = self._serve(_Hangup)
        transport = self._make(
            harness, listening.getHost().port, **harness.timeout_options(self.TIMEOUT)
        )
        try:
            replies = await transport.deliver(_entry(first, second), CONTRACT_MESSAGE)
        finally:
            await transport.close()
            await listening.stopListening()
        assert set(replies) == {first, second}
        assert all(r.temporary for r in replies.values()), replies

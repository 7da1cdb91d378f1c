"""
The transport contract (``mailhub.testing.transport_contract``), run for
every built-in transport against a real target, and for the third-party
example package in ``examples/mailhub-transport-example``:

- ``smtp``: the ``DownstreamServer`` on 127.0.0.1;
- ``lmtp``: a real Dovecot LMTP server (``mailhub.testing.dovecot``), over
  TCP and over its unix socket;
- ``http``: a ``twisted.web`` receiver (``mailhub.testing.http_receiver``);
- ``directory``: the example package, imported from its directory as an
  installed distribution would be found by its entry point.
"""

from __future__ import annotations

import importlib
import os
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailhub.model import Address
from mailhub.plugin import load_plugin
from mailhub.testing.dovecot import DovecotServer
from mailhub.testing.downstream import DownstreamServer
from mailhub.testing.http_receiver import HTTPReceiver
from mailhub.testing.transport_contract import (
    NetworkTransportContract,
    TransportContract,
    TransportHarness,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mailhub-transport-example"

KNOWN = (Address("alice", "example.com"), Address("bob", "example.com"))
UNKNOWN = Address("nobody", "example.com")
DEFERRED = Address("full", "example.com")


# smtp


class SMTPHarness(TransportHarness):
    def __init__(self, server: DownstreamServer) -> None:
        self.plugin = load_plugin("mailhub.transports", "smtp")
        self.server = server
        self.known, self.unknown, self.deferred = KNOWN, UNKNOWN, DEFERRED
        self.bad_targets = ["127.0.0.1:25x", "host:0", "host:99999", "[2001:db8::1"]
        server.known_users = {str(a) for a in (*KNOWN, DEFERRED)}
        server.recipient_replies = {str(DEFERRED): "452 4.2.2 Mailbox full"}

    def config(self, **options: Any) -> dict[str, Any]:
        return {"target": self.tcp_target("127.0.0.1", self.server.port), "hostname": "hub.test", **options}

    def tcp_target(self, host: str, port: int) -> str:
        return f"{host}:{port}"

    def timeout_options(self, seconds: float) -> dict[str, Any]:
        return {"connect_timeout": seconds, "command_timeout": seconds, "data_timeout": seconds}

    def received(self, recipient: Address) -> list[bytes]:
        return [m.message for m in self.server.messages if str(recipient) in m.recipients]

    def down(self) -> Any:
        return self.server.stop()

    def up(self) -> Any:
        return self.server.start(port=self.server.port)


class TestSMTPTransportContract(TransportContract, NetworkTransportContract):
    @pytest.fixture
    def harness(self, downstream: DownstreamServer) -> SMTPHarness:
        return SMTPHarness(downstream)


# lmtp, against Dovecot


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    server = DovecotServer.start(
        tmp_path_factory.mktemp("dovecot"), users=("alice", "bob"), full=("full",)
    )
    yield server
    server.stop()


class LMTPHarness(TransportHarness):
    """Dovecot's Maildirs as the record; ``unix`` reaches it over its socket."""

    def __init__(self, server: DovecotServer, unix: bool = False) -> None:
        self.plugin = load_plugin("mailhub.transports", "lmtp")
        self.server = server
        self.unix = unix
        self.known, self.unknown, self.deferred = KNOWN, UNKNOWN, DEFERRED
        self.bad_targets = ["127.0.0.1:24x", "unix:relative/socket", "unix:", "host:0"]
        # Only what arrives from now on (the server lives for the module).
        self._before = {
            a: len(server.messages(a.local)) for a in (*KNOWN, DEFERRED) if server.running
        }

    def config(self, **options: Any) -> dict[str, Any]:
        target = (
            f"unix:{self.server.socket_path}" if self.unix
            else self.tcp_target("127.0.0.1", self.server.port)
        )  # fmt: skip
        return {"target": target, "hostname": "hub.test", **options}

    def tcp_target(self, host: str, port: int) -> str:
        return f"{host}:{port}"

    def timeout_options(self, seconds: float) -> dict[str, Any]:
        return {"connect_timeout": seconds, "command_timeout": seconds, "data_timeout": seconds}

    def received(self, recipient: Address) -> list[bytes]:
        stored = self.server.messages(recipient.local)[self._before.get(recipient, 0) :]
        return [_as_given(m) for m in stored]

    def down(self) -> None:
        self.server.stop(remove=False)

    def up(self) -> None:
        self.server.restart()


def _as_given(stored: bytes) -> bytes:
    """A Maildir file as the transport sent it: without Dovecot's ``Return-Path:``, CRLF line ends."""
    first, _, rest = stored.partition(b"\n")
    assert first.startswith(b"Return-Path: <"), stored[:80]
    return rest.replace(b"\n", b"\r\n")


class TestLMTPTransportContract(TransportContract, NetworkTransportContract):
    @pytest.fixture
    def harness(self, dovecot: DovecotServer) -> LMTPHarness:
        return LMTPHarness(dovecot)


class TestLMTPUnixSocketTransportContract(TransportContract):
    @pytest.fixture
    def harness(self, dovecot: DovecotServer) -> LMTPHarness:
        return LMTPHarness(dovecot, unix=True)


# http, against twisted.web


class HTTPHarness(TransportHarness):
    def __init__(self, receiver: HTTPReceiver) -> None:
        self.plugin = load_plugin("mailhub.transports", "http")
        self.receiver = receiver
        self.known, self.unknown, self.deferred = KNOWN, UNKNOWN, DEFERRED
        self.bad_targets = [
            "ftp://example.com/x", "https://", "https://user:secret@example.com/",
            "http://example.com:99999/", "example.com/mail", "https://example.com/a b",
        ]  # fmt: skip
        receiver.known_users = {str(a) for a in (*KNOWN, DEFERRED)}
        receiver.recipient_replies = {str(DEFERRED): "452 4.2.2 Mailbox full"}

    def config(self, **options: Any) -> dict[str, Any]:
        return {"target": self.tcp_target("127.0.0.1", self.receiver.port), "hostname": "hub.test", **options}

    def tcp_target(self, host: str, port: int) -> str:
        return f"http://{host}:{port}/mail"

    def timeout_options(self, seconds: float) -> dict[str, Any]:
        return {"connect_timeout": seconds, "timeout": seconds}

    def received(self, recipient: Address) -> list[bytes]:
        return self.receiver.messages_for(str(recipient))

    def down(self) -> Any:
        return self.receiver.stop()

    def up(self) -> Any:
        return self.receiver.start(port=self.receiver.port)


@pytest.fixture
def receiver() -> Iterator[HTTPReceiver]:
    server = HTTPReceiver(reactor)
    pytest_twisted.blockon(server.start())
    yield server
    pytest_twisted.blockon(server.stop())


class TestHTTPTransportContract(TransportContract, NetworkTransportContract):
    @pytest.fixture
    def harness(self, receiver: HTTPReceiver) -> HTTPHarness:
        return HTTPHarness(receiver)


# The third-party example


def _example_plugin() -> Any:
    """The example's plugin, found through the entry point its pyproject.toml declares."""
    with open(EXAMPLE / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["entry-points"]["mailhub.transports"]
    module_name, _, attribute = declared["directory"].partition(":")
    sys.path.insert(0, str(EXAMPLE))
    try:
        module = importlib.import_module(module_name)
    finally:
        sys.path.remove(str(EXAMPLE))
    return getattr(module, attribute)


class DirectoryHarness(TransportHarness):
    def __init__(self, base: Path) -> None:
        self.plugin = _example_plugin()
        self.base = base
        self.known, self.unknown, self.deferred = KNOWN, UNKNOWN, DEFERRED
        self.bad_targets = ["relative/path", ""]
        base.mkdir()
        for address in KNOWN:
            (base / address.domain / address.local).mkdir(parents=True)
        # A mailbox that exists but cannot be written: a file where its directory should be.
        (base / DEFERRED.domain / DEFERRED.local).write_bytes(b"")

    def config(self, **options: Any) -> dict[str, Any]:
        return {"target": str(self.base), "hostname": "hub.test", **options}

    def received(self, recipient: Address) -> list[bytes]:
        mailbox = self.base / recipient.domain / recipient.local
        if not mailbox.is_dir():
            return []
        return [p.read_bytes() for p in sorted(mailbox.glob("*.eml"))]

    def down(self) -> None:
        os.rename(self.base, str(self.base) + ".away")

    def up(self) -> None:
        os.rename(str(self.base) + ".away", self.base)


class TestExampleDirectoryTransportContract(TransportContract):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> DirectoryHarness:
        return DirectoryHarness(tmp_path / "mail")


def test_example_declares_its_entry_point_in_the_transports_group():
    plugin = _example_plugin()
    assert plugin.name == "directory"
    assert plugin.__class__.__module__ == "mailhub_transport_example"

"""
Tests written for mutants that ``scripts/mutate`` found alive: each one pins
a behaviour a promise of the README rests on ("What the hub promises",
"Security") that no other test looked at closely enough.  Deterministic:
``StringTransport``, ``Clock``, the memory store.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from zope.interface import implementer

from mailhub.config import ConfigError, SmtpConfig, parse
from mailhub.model import (
    Action,
    Address,
    AddressError,
    Attempt,
    Decision,
    Envelope,
    Outcome,
    Reply,
    StoreUnavailable,
)
from mailhub.plugins.memory_store import MemorySpoolStore
from mailhub.plugins.sqlite import SqliteSpoolStore
from mailhub.plugins.sqlite import plugin as sqlite_plugin
from mailhub.plugins.sqlite.workers import WAL_AUTOCHECKPOINT
from mailhub.smtp.server import SMTPFactory, SMTPServerProtocol, domain_check
from mailhub.smtp.tls import generate_self_signed, server_tls_options, tls_files

HOST = "mx.hub.example"


@implementer(ITLSTransport)
class _TLSTransport(StringTransport):
    """A ``StringTransport`` that can start TLS (and only records that it did)."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.9", 5000))
        self.tls_started = False

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_started = True


class _Received:
    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bytes]] = []

    def __call__(self, envelope: Envelope, message: bytes) -> Deferred[Any]:
        self.messages.append((envelope, message))
        return succeed("Q1")


def _session(**limits: Any) -> tuple[SMTPServerProtocol, _TLSTransport, _Received]:
    received = _Received()
    factory = SMTPFactory(
        HOST, SmtpConfig(**limits), domain_check(["example.com"], HOST), received, Clock(), tls=object()
    )
    transport = _TLSTransport()
    protocol = factory.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    transport.clear()
    return protocol, transport, received


def _codes(transport: StringTransport) -> list[str]:
    """``"250 2.1.0"``-style prefixes of the replies written since the last call."""
    out = transport.value()
    transport.clear()
    lines = [x for x in out.decode("ascii").split("\r\n")[:-1] if x[3:4] != "-"]
    return [" ".join(x.split(" ")[:2]) for x in lines]


# -- STARTTLS ---------------------------------------------------------------------


def test_starttls_forgets_a_mail_transaction_begun_in_clear_text() -> None:
    """
    A transaction begun before STARTTLS does not survive it (RFC 3207 4.2):
    after the handshake a RCPT without a new MAIL is refused, and nothing
    said in clear text can reach a message sent over TLS.
    """
    p, t, received = _session()
    p.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
    assert _codes(t)[-1] == "250 2.1.0"
    p.dataReceived(b"STARTTLS\r\n")
    assert t.tls_started
    t.clear()
    p.dataReceived(b"RCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert _codes(t) == ["503 5.5.1", "503 5.5.1"]
    p.dataReceived(b"EHLO c.example\r\nRCPT TO:<bob@example.com>\r\n")
    assert _codes(t)[-1] == "503 5.5.1"
    assert received.messages == []


# -- Address.parse ------------------------------------------------------------------
# The server answers some malformed addresses with 550 5.7.1 whatever
# ``Address.parse`` says (any routing character), which hid changes to the
# parser's own answers; ``mailhub.model`` is public, and these are its contract.


@pytest.mark.parametrize(
    ("text", "code", "enhanced"),
    [
        ("", 501, "5.1.3"),
        ("@example.com", 550, "5.7.1"),  # a leading @ is a source route, mailbox or not
        ("@relay.example:bob@example.com", 550, "5.7.1"),
        ("bob", 501, "5.1.3"),
        ('"bob@example.com', 501, "5.1.3"),  # unbalanced quote
        ('"bob@elsewhere.example"@example.com', 550, "5.7.1"),
        ('"bob%elsewhere.example"@example.com', 550, "5.7.1"),
        ('"bob!elsewhere"@example.com', 550, "5.7.1"),
        ("bob%elsewhere.example@example.com", 550, "5.7.1"),
        ("elsewhere!bob@example.com", 550, "5.7.1"),
        ("bob@elsewhere.example@example.com", 550, "5.7.1"),
        ("bo..b@example.com", 501, "5.1.3"),
        ("bob.@example.com", 501, "5.1.3"),
        ("bo b@example.com", 501, "5.1.3"),
        ("l" * 65 + "@example.com", 501, "5.1.3"),
        ("bob@[192.0.2.1]", 550, "5.7.1"),
        ("bob@example", 501, "5.1.2"),
        ("bob@-x.example", 501, "5.1.2"),
        ("bob@example..com", 501, "5.1.2"),
        ("bob@example.com..", 501, "5.1.2"),
        ("bob@" + "x" * 64 + ".example", 501, "5.1.2"),
    ],
)
def test_address_parse_refuses_with_the_reply_the_server_gives(text: str, code: int, enhanced: str) -> None:
    """Each malformed or routing address raises ``AddressError`` with its SMTP code and status."""
    with pytest.raises(AddressError) as e:
        Address.parse(text)
    assert (e.value.code, e.value.enhanced) == (code, enhanced)


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("bob@example.com", "bob", "example.com"),
        ("Bob.Smith@EXAMPLE.com", "Bob.Smith", "example.com"),
        ('"b o b"@example.com', '"b o b"', "example.com"),
        ("bob@example.com.", "bob", "example.com"),
        ("l" * 64 + "@example.com", "l" * 64, "example.com"),
        ("bob@" + "x" * 63 + ".example", "bob", "x" * 63 + ".example"),
    ],
)
def test_address_parse_keeps_the_local_part_and_lowers_the_domain(text: str, local: str, domain: str) -> None:
    """A plain mailbox parses: the local part as given, the domain lower case without a final dot."""
    assert Address.parse(text) == Address(local, domain)


# -- the SQLite spool ------------------------------------------------------------------


def _sqlite_store(tmp_path: Path) -> SqliteSpoolStore:
    return sqlite_plugin.make({"path": "spool.db", "config_dir": str(tmp_path)}, reactor)


@pytest_twisted.ensureDeferred
async def test_sqlite_writer_connection_settings(tmp_path: Path) -> None:
    """The writer's connection: foreign keys enforced, statement journals in memory, its checkpoint size."""
    store = _sqlite_store(tmp_path)

    def pragmas(conn: sqlite3.Connection) -> tuple[int, int, int]:
        return (
            conn.execute("PRAGMA foreign_keys").fetchone()[0],
            conn.execute("PRAGMA temp_store").fetchone()[0],
            conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0],
        )

    try:
        assert await store.run(pragmas) == (1, 2, WAL_AUTOCHECKPOINT)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_failed_commit_fails_the_batch_and_the_store_goes_on(tmp_path: Path) -> None:
    """
    A COMMIT that fails (here a deferred foreign key) fails the batch's
    callers with ``StoreUnavailable`` (so the SMTP client gets a 4xx, never a
    250), leaves nothing of it, and the next batch commits.
    """
    store = _sqlite_store(tmp_path)

    def violates_at_commit(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE parent (id TEXT PRIMARY KEY)")
        conn.execute(
            "CREATE TABLE child (parent TEXT REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)"
        )
        conn.execute("INSERT INTO child VALUES ('missing')")

    def tables(conn: sqlite3.Connection) -> list[str]:
        return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE name IN ('parent', 'child')")]

    try:
        with pytest.raises(StoreUnavailable):
            await store.run(violates_at_commit)
        assert await store.run(tables) == []
        envelope = Envelope(Address("a", "sender.example"), [Address("bob", "example.com")], received_at=1000.0)
        assert len(await store.enqueue(envelope, b"hi\r\n", {"smtp:mx.example.com:25": [Address("bob", "example.com")]}, "dallas")) == 1
    finally:
        await store.close()


# -- the listener's certificate ------------------------------------------------------

_CONFIG = b"""
[hub]
hostname = "mx.hub.example"
[store]
plugin = "sqlite"
path = "var/spool.db"
[nodes.dallas]
smtp = "tcp:0"
[domains."example.com"]
route = "smtp:127.0.0.1:2500"
"""
NOW = 1_700_000_000.0


def test_self_signed_pair_without_a_spool_path_is_beside_the_config(tmp_path: Path) -> None:
    """With a store that has no ``path`` (memory, redis), the generated pair goes in ``tls/`` beside the config."""
    config = parse(_CONFIG.replace(b'plugin = "sqlite"\npath = "var/spool.db"', b'plugin = "memory"'),
                   str(tmp_path / "hub.toml"))
    server_tls_options(config, NOW)
    assert tls_files(config) == (str(tmp_path / "tls" / "cert.pem"), str(tmp_path / "tls" / "key.pem"), False)
    assert (tmp_path / "tls" / "key.pem").is_file()


def test_self_signed_pair_missing_its_key_is_generated_again(tmp_path: Path) -> None:
    """A generated certificate whose key was lost is replaced by a new pair at the next start, not an error."""
    config = parse(_CONFIG, str(tmp_path / "hub.toml"))
    server_tls_options(config, NOW)
    cert, key, _ = tls_files(config)
    first = Path(cert).read_bytes()
    os.unlink(key)
    server_tls_options(config, NOW)
    assert Path(key).is_file()
    assert Path(cert).read_bytes() != first


def test_self_signed_generation_locks_beside_the_pair_not_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock that lets one node generate while the other waits is ``tls/.generate.lock``."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = parse(_CONFIG, str(tmp_path / "hub.toml"))
    server_tls_options(config, NOW)
    assert (tmp_path / "var" / "tls" / ".generate.lock").is_file()
    assert list(elsewhere.iterdir()) == []


def test_node_starting_while_another_generates_waits_and_uses_its_pair(tmp_path: Path) -> None:
    """
    Two nodes of one configuration started at once: while one holds the
    generation lock the other waits, then uses the pair the first wrote
    instead of writing its own over it.
    """
    config = parse(_CONFIG, str(tmp_path / "hub.toml"))
    cert, key, _ = tls_files(config)
    os.makedirs(os.path.dirname(key), mode=0o700)
    result: list[Any] = []
    with open(os.path.join(os.path.dirname(key), ".generate.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other node, generating
        other = threading.Thread(target=lambda: result.append(server_tls_options(config, NOW)))
        other.start()
        other.join(0.5)
        assert result == [] and not os.path.exists(key)  # it waits
        generate_self_signed(HOST, cert, key, NOW)
        ours = Path(cert).read_bytes()
        with capturedLogs() as events:
            fcntl.flock(lock, fcntl.LOCK_UN)
            other.join(30)
    assert len(result) == 1
    assert Path(cert).read_bytes() == ours
    assert not any("self-signed" in formatEvent(e) for e in events)


def test_second_start_does_not_log_a_generation(tmp_path: Path) -> None:
    """Only the start that generated the pair says so in the log."""
    config = parse(_CONFIG, str(tmp_path / "hub.toml"))
    server_tls_options(config, NOW)
    with capturedLogs() as events:
        server_tls_options(config, NOW)
    assert not any("self-signed" in formatEvent(e) for e in events)


def test_configured_certificate_with_another_key_is_a_config_error(tmp_path: Path) -> None:
    """A certificate and a key that do not match are refused at start, naming ``smtp.tls_certificate``."""
    generate_self_signed(HOST, str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), NOW)
    generate_self_signed(HOST, str(tmp_path / "c2.pem"), str(tmp_path / "k2.pem"), NOW)
    config = parse(_CONFIG + b'[smtp]\ntls_certificate = "c.pem"\ntls_key = "k2.pem"\n', str(tmp_path / "hub.toml"))
    with pytest.raises(ConfigError, match=r"hub.toml: smtp.tls_certificate: .*not a PEM certificate and matching key"):
        server_tls_options(config, NOW)


@pytest_twisted.ensureDeferred
async def test_sqlite_enqueue_without_routes_stores_nothing(tmp_path: Path) -> None:
    """A message with no route to go to (no recipient left) is no entry and no work for the writer."""
    store = _sqlite_store(tmp_path)
    envelope = Envelope(None, [Address("bob", "example.com")], received_at=1000.0)
    try:
        assert await store.enqueue(envelope, b"hi\r\n", {}, "dallas") == []
        assert await store.enqueue_leased(envelope, b"hi\r\n", {}, "dallas", 600.0) == []
        assert store.commits == 0
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_delivered_entry_leaves_no_attempts_behind(tmp_path: Path) -> None:
    """An entry deferred once, then delivered, is gone from the spool with its attempt log."""
    store = _sqlite_store(tmp_path)
    bob = Address("bob", "example.com")
    envelope = Envelope(Address("a", "sender.example"), [bob], received_at=1000.0)
    try:
        [entry_id] = await store.enqueue(envelope, b"hi\r\n", {"smtp:mx.example.com:25": [bob]}, "dallas")
        [lease] = await store.claim("dallas", 1000.0, 10, 600.0, 0.0)
        deferred = Reply(451, "4.3.0", "later")
        await store.record(
            lease,
            Attempt(entry_id, "dallas", 1000.0, 1001.0, [(bob, deferred)]),
            Decision([Outcome(bob, Action.RETRY, deferred)], 2000.0, "dallas"),
        )
        assert len(await store.attempts(entry_id)) == 1
        [lease] = await store.claim("dallas", 2000.0, 10, 600.0, 0.0)
        ok = Reply(250, "2.0.0", "ok")
        assert await store.record(
            lease,
            Attempt(entry_id, "dallas", 2000.0, 2001.0, [(bob, ok)]),
            Decision([Outcome(bob, Action.DELIVERED, ok)]),
        ) is None
        assert await store.get(entry_id) is None
        assert await store.attempts(entry_id) == []
        assert await store.run(lambda conn: conn.execute("SELECT count(*) FROM attempts").fetchone()[0]) == 0
    finally:
        await store.close()


# -- the memory spool --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_memory_lease_ends_at_its_expiry() -> None:
    """
    A lease protects its entry up to its expiry and not at it: at that
    moment ``flush`` moves the entry as it does any other, as ``claim``
    takes it.
    """
    store = MemorySpoolStore(Clock())
    bob = Address("bob", "example.com")
    envelope = Envelope(Address("a", "sender.example"), [bob], received_at=1000.0)
    await store.enqueue(envelope, b"hi\r\n", {"smtp:mx.example.com:25": [bob]}, "dallas")
    [lease] = await store.claim("dallas", 1000.0, 10, 600.0, 0.0)
    assert lease.expires == 1600.0
    assert await store.flush(None, 1599.0) == 0
    assert await store.flush(None, 1600.0) == 1

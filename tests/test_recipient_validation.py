"""
Recipient validation per domain (``mailhub.smtp.recipients``): static lists,
a recipients file reloaded when it changes, and verification by probing the
route's server, with cached answers and the route-down rules.

Deterministic tests first (``Clock``, a scripted probe); then the prober
against real servers on 127.0.0.1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport

from mailhub.config import ConfigError, SmtpConfig, parse
from mailhub.model import Address, Reply
from mailhub.smtp.recipients import (
    UNKNOWN_USER,
    UNVERIFIABLE,
    FileRecipients,
    RouteVerifier,
    StaticRecipients,
    recipient_validation,
)
from mailhub.smtp.server import SMTPFactory, chain_checks, domain_check
from mailhub.smtp.verify import ProbeFailed, route_probe

HOST = "mx.hub.example"
ALICE = Address("alice", "example.com")
MALLORY = Address("mallory", "example.com")


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def run_now(f: Any, *args: Any) -> Deferred[Any]:
    """A ``threads`` runner that runs at once (for the Clock tests)."""
    try:
        return succeed(f(*args))
    except Exception as e:  # noqa: BLE001
        return fail(e)


# -- static list ---------------------------------------------------------------


def test_listed_recipient_is_accepted() -> None:
    assert result_of(StaticRecipients(["alice@example.com"])(ALICE)) is None


def test_unlisted_recipient_is_550_5_1_1() -> None:
    reply = result_of(StaticRecipients(["alice@example.com"])(MALLORY))
    assert (reply.code, reply.enhanced) == (550, "5.1.1")


def test_listed_recipient_matches_without_case() -> None:
    assert result_of(StaticRecipients(["Alice@Example.COM"])(Address("ALICE", "example.com"))) is None


# -- recipients file -------------------------------------------------------------


def test_file_is_read_and_comments_skipped(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# staff\nalice@example.com  # Alice\n\n")
    check = FileRecipients(str(path), Clock(), run_now)
    assert result_of(check(ALICE)) is None
    assert result_of(check(MALLORY)) == UNKNOWN_USER


def test_file_is_reloaded_when_mtime_changes_after_check_interval(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("alice@example.com\n")
    clock = Clock()
    check = FileRecipients(str(path), clock, run_now, check_seconds=5.0)
    assert result_of(check(MALLORY)) == UNKNOWN_USER
    path.write_text("alice@example.com\nmallory@example.com\n")
    os.utime(path, ns=(1, 10**18))
    clock.advance(1)
    assert result_of(check(MALLORY)) == UNKNOWN_USER, "looked at again before the interval"
    clock.advance(5)
    # This call starts the reload; the answer comes from the new list.
    assert result_of(check(MALLORY)) is None


def test_file_is_not_read_again_when_mtime_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("alice@example.com\n")
    clock = Clock()
    reads: list[Any] = []

    def counting(f: Any, *args: Any) -> Deferred[Any]:
        d = run_now(f, *args)
        d.addCallback(lambda r: reads.append(r[1] is not None) or r)
        return d

    check = FileRecipients(str(path), clock, counting, check_seconds=5.0)
    for _ in range(3):
        result_of(check(ALICE))
        clock.advance(6)
    assert reads == [True, False, False]


def test_file_read_runs_in_thread_and_checks_wait_for_first_load(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("alice@example.com\n")
    pending: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def later(f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append((f, args, d))
        return d

    check = FileRecipients(str(path), Clock(), later)
    d1, d2 = check(ALICE), check(MALLORY)
    assert not d1.called and len(pending) == 1
    f, args, d = pending.pop()
    d.callback(f(*args))
    assert result_of(d1) is None and result_of(d2) == UNKNOWN_USER


def test_unreadable_file_keeps_last_list(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("alice@example.com\n")
    clock = Clock()
    check = FileRecipients(str(path), clock, run_now, check_seconds=5.0)
    result_of(check(ALICE))
    path.unlink()
    clock.advance(6)
    assert result_of(check(ALICE)) is None


def test_recipients_file_missing_at_start_is_config_error(tmp_path: Path) -> None:
    config = parse(CONFIG + b'recipients_file = "users.txt"\n', str(tmp_path / "hub.toml"))
    with pytest.raises(ConfigError, match=r'hub.toml: domains."example.com".recipients_file: no such file'):
        recipient_validation(config, Clock(), run_now)


# -- route verification: cache and route-down rules -----------------------------


class Probe:
    """A scripted probe: ``answers`` maps local parts to a Reply or ``"down"``."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.asked: list[Address] = []
        self.held: list[Deferred[Reply]] = []
        self.hold = False

    def __call__(self, address: Address) -> Deferred[Reply]:
        self.asked.append(address)
        if self.hold:
            d: Deferred[Reply] = Deferred()
            self.held.append(d)
            return d
        answer = self.answers.get(address.local, Reply(550, "5.1.1", "no such user"))
        if answer == "down":
            return fail(ProbeFailed("connection refused"))
        return succeed(answer)


OK = Reply(250, "2.1.5", "OK")


def verifier(probe: Probe, clock: Clock, **kw: Any) -> RouteVerifier:
    kw.setdefault("positive_seconds", 100.0)
    kw.setdefault("negative_seconds", 10.0)
    return RouteVerifier(probe, clock, **kw)


def test_route_positive_answer_accepts_and_is_cached() -> None:
    probe, clock = Probe(alice=OK), Clock()
    v = verifier(probe, clock)
    assert result_of(v(ALICE)) is None
    clock.advance(99)
    assert result_of(v(ALICE)) is None
    assert len(probe.asked) == 1
    clock.advance(2)
    result_of(v(ALICE))
    assert len(probe.asked) == 2


def test_route_negative_answer_is_550_5_1_1_and_cached_for_its_lifetime() -> None:
    probe, clock = Probe(), Clock()
    v = verifier(probe, clock)
    assert result_of(v(MALLORY)) == UNKNOWN_USER
    clock.advance(9)
    assert result_of(v(MALLORY)) == UNKNOWN_USER
    assert len(probe.asked) == 1
    clock.advance(2)
    result_of(v(MALLORY))
    assert len(probe.asked) == 2


def test_route_down_uses_expired_cached_answer() -> None:
    probe, clock = Probe(alice=OK), Clock()
    v = verifier(probe, clock)
    result_of(v(ALICE))
    result_of(v(MALLORY))
    clock.advance(1000)
    probe.answers = {"alice": "down", "mallory": "down"}
    assert result_of(v(ALICE)) is None
    assert result_of(v(MALLORY)) == UNKNOWN_USER


def test_route_down_without_cache_tempfails_451_4_4_1_by_default() -> None:
    v = verifier(Probe(alice="down"), Clock())
    reply = result_of(v(ALICE))
    assert reply == UNVERIFIABLE and (reply.code, reply.enhanced) == (451, "4.4.1")


def test_route_down_without_cache_accepts_when_configured() -> None:
    v = verifier(Probe(alice="down"), Clock(), unreachable="accept")
    assert result_of(v(ALICE)) is None


def test_route_4xx_to_rcpt_counts_as_down() -> None:
    probe = Probe()
    probe.answers = {"alice": "down"}
    v = verifier(probe, Clock())
    assert result_of(v(ALICE)) == UNVERIFIABLE


def test_route_down_is_not_probed_again_for_a_while() -> None:
    probe, clock = Probe(alice="down", bob="down"), Clock()
    v = verifier(probe, clock)
    result_of(v(ALICE))
    result_of(v(Address("bob", "example.com")))
    assert len(probe.asked) == 1
    clock.advance(31)
    result_of(v(ALICE))
    assert len(probe.asked) == 2


def test_concurrent_checks_of_one_address_probe_once() -> None:
    probe = Probe()
    probe.hold = True
    v = verifier(probe, Clock())
    d1, d2 = v(ALICE), v(ALICE)
    assert len(probe.asked) == 1
    probe.held[0].callback(OK)
    assert result_of(d1) is None and result_of(d2) is None


def test_route_without_smtputf8_refusal_is_passed_on() -> None:
    refusal = Reply(553, "5.6.7", "no SMTPUTF8")
    v = verifier(Probe(alice=refusal), Clock())
    assert result_of(v(ALICE)) == refusal


# -- config and composition ---------------------------------------------------

CONFIG = b"""
[hub]
hostname = "mx.hub.example"
[nodes.dallas]
smtp = "tcp:0"
[domains."other.example"]
route = "smtp:127.0.0.1:2500"
[domains."example.com"]
route = "smtp:127.0.0.1:2500"
"""


@pytest.mark.parametrize(
    "extra, key, words",
    [
        (b'verify = "maybe"\n', "verify", "'route' or 'none'"),
        (b'verify_unreachable = "shrug"\n', "verify_unreachable", "'accept' or 'tempfail'"),
        (b"verify_positive_seconds = -1\n", "verify_positive_seconds", "greater than 0"),
        (b"recipients = [\"nobody\"]\n", "recipients[0]", "local@domain"),
        (b"recipients = \"alice@example.com\"\n", "recipients", "a list"),
    ],
)
def test_validation_config_errors_name_file_and_key(extra: bytes, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(CONFIG + extra, "/etc/hub.toml")
    assert f'/etc/hub.toml: domains."example.com".{key}: ' in str(info.value)
    assert words in str(info.value)


def test_verify_route_needs_smtp_host_port_route() -> None:
    text = CONFIG.replace(b'route = "smtp:127.0.0.1:2500"\n', b'route = "smtp:mx"\n') + b'verify = "route"\n'
    with pytest.raises(ConfigError, match=r"verify: 'route' needs a route"):
        parse(text, "/etc/hub.toml")


def test_inline_list_applies_only_to_its_domain() -> None:
    config = parse(CONFIG + b'recipients = ["alice@example.com"]\n', "hub.toml")
    check = recipient_validation(config, Clock(), run_now)
    assert result_of(check(ALICE)) is None
    assert result_of(check(MALLORY)) == UNKNOWN_USER
    assert result_of(check(Address("anyone", "other.example"))) is None


def _smtp(check: Any) -> tuple[Any, StringTransport]:
    factory = SMTPFactory(HOST, SmtpConfig(), check, lambda e, m: succeed(None), Clock())
    t = StringTransport()
    p = factory.buildProtocol(None)
    p.makeConnection(t)
    t.clear()
    return p, t


def test_relay_rule_runs_before_validation() -> None:
    asked: list[Address] = []

    def validation(address: Address) -> Deferred[Any]:
        asked.append(address)
        return succeed(None)

    p, t = _smtp(chain_checks(domain_check(["example.com"], HOST), validation))
    p.dataReceived(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@elsewhere.example>\r\n")
    assert b"550 5.7.1" in t.value()
    assert asked == []
    p.dataReceived(b"RCPT TO:<alice@example.com>\r\n")
    assert asked == [ALICE]


def test_unknown_recipient_gets_550_5_1_1_over_smtp() -> None:
    config = parse(CONFIG + b'recipients = ["alice@example.com"]\n', "hub.toml")
    check = chain_checks(domain_check(config.domains, HOST), recipient_validation(config, Clock(), run_now))
    p, t = _smtp(check)
    p.dataReceived(
        b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n"
        b"RCPT TO:<mallory@example.com>\r\nRCPT TO:<alice@example.com>\r\n"
    )
    out = t.value().decode()
    assert "550 5.1.1" in out and out.rstrip().endswith("250 2.1.5 Recipient OK")


# -- the prober against real servers on 127.0.0.1 --------------------------------


class Scripted(Protocol):
    """A tiny SMTP server: ``users`` exist, everyone else is 550; records commands."""

    def __init__(self, users: set[str], rcpt_reply: bytes | None, commands: list[bytes]) -> None:
        self.users = users
        self.rcpt_reply = rcpt_reply
        self.commands = commands
        self.buffer = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"220 downstream ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-downstream\r\n250 PIPELINING\r\n")
            elif verb == b"RCPT":
                addr = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                if self.rcpt_reply is not None:
                    self.transport.write(self.rcpt_reply)
                elif addr in self.users:
                    self.transport.write(b"250 2.1.5 OK\r\n")
                else:
                    self.transport.write(b"550 5.1.1 <%s> no such user\r\n" % addr.encode())
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.loseConnection()
            else:
                self.transport.write(b"250 2.0.0 OK\r\n")


@pytest.fixture
def scripted() -> Any:
    state: dict[str, Any] = {"users": {"alice@example.com"}, "rcpt_reply": None, "commands": []}
    factory = Factory.forProtocol(lambda: Scripted(state["users"], state["rcpt_reply"], state["commands"]))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    state["target"] = f"127.0.0.1:{port.getHost().port}"
    yield state
    pytest_twisted.blockon(port.stopListening())


def probe_recipient(clock: Any, target: str, address: Address, hostname: str, timeout: float) -> Any:
    """Ask the ``smtp`` transport of route ``smtp:TARGET``, as ``verify = "route"`` does."""
    return route_probe(f"smtp:{target}", {}, hostname, clock, timeout)(address)


@pytest_twisted.ensureDeferred
async def test_probe_reports_known_and_unknown_without_data(scripted: dict[str, Any]) -> None:
    known = await probe_recipient(reactor, scripted["target"], ALICE, HOST, 5.0)
    unknown = await probe_recipient(reactor, scripted["target"], MALLORY, HOST, 5.0)
    assert known.code == 250
    assert (unknown.code, unknown.enhanced) == (550, "5.1.1")
    # The probe answers as soon as RCPT is answered; its QUIT may reach the
    # server after the next probe's first commands.  Wait for both QUITs.
    for _ in range(100):
        if sum(c.upper().startswith(b"QUIT") for c in scripted["commands"]) == 2:
            break
        await deferLater(reactor, 0.01, lambda: None)
    verbs = [c.split(b" ")[0].split(b":")[0].upper() for c in scripted["commands"]]
    assert b"DATA" not in verbs
    assert verbs[:4] == [b"EHLO", b"MAIL", b"RCPT", b"RSET"]
    assert verbs.count(b"QUIT") == 2
    assert scripted["commands"][1] == b"MAIL FROM:<>"


@pytest_twisted.ensureDeferred
async def test_probe_4xx_is_probe_failed(scripted: dict[str, Any]) -> None:
    scripted["rcpt_reply"] = b"451 4.3.0 try later\r\n"
    with pytest.raises(ProbeFailed):
        await probe_recipient(reactor, scripted["target"], ALICE, HOST, 5.0)


@pytest_twisted.ensureDeferred
async def test_probe_to_closed_port_is_probe_failed() -> None:
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    target = f"127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    with pytest.raises(ProbeFailed, match="Connection refused"):
        await probe_recipient(reactor, target, ALICE, HOST, 5.0)


@pytest_twisted.ensureDeferred
async def test_probe_to_silent_server_times_out() -> None:
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        with pytest.raises(ProbeFailed, match="no answer"):
            await probe_recipient(reactor, f"127.0.0.1:{port.getHost().port}", ALICE, HOST, 0.5)
    finally:
        await port.stopListening()


# -- the whole path: smtplib -> the node's listener -> probe of a real downstream --


class Hub:
    """A node's SMTP listener on 127.0.0.1 (the node's own wiring), not started."""

    def __init__(self, tmp_path: Path, downstream_port: int, **options: Any) -> None:
        from mailhub.node import Node
        from mailhub.plugins.memory_store import MemorySpoolStore
        from mailhub.plugins.standard_policy import StandardPolicy

        lines = [f'route = "smtp:127.0.0.1:{downstream_port}"', 'verify = "route"']
        lines += [f"{k} = {v!r}".replace("'", '"') for k, v in options.items()]
        text = (
            b'[hub]\nhostname = "mx.hub.example"\n[nodes.dallas]\nsmtp = "tcp:0:interface=127.0.0.1"\n'
            b'[domains."example.com"]\n' + "\n".join(lines).encode() + b"\n"
        )
        self.config = parse(text, str(tmp_path / "hub.toml"))
        self.store = MemorySpoolStore(reactor)
        self.node = Node("dallas", self.config, self.store, StandardPolicy(nodes=("dallas",)), reactor)
        self.port = reactor.listenTCP(0, self.node.smtp_factory, interface="127.0.0.1")

    def rcpt(self, *recipients: str) -> Deferred[list[tuple[int, str]]]:
        """RCPT each recipient in one session (smtplib, in a thread); the replies."""
        import smtplib

        port = self.port.getHost().port

        def client() -> list[tuple[int, str]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                s.ehlo("client.example")
                s.mail("someone@sender.example")
                out = []
                for r in recipients:
                    code, text = s.rcpt(r)
                    out.append((code, text.decode()))
                s.rset()
                return out

        from twisted.internet.threads import deferToThread

        return deferToThread(client)


@pytest.fixture
def downstream() -> Any:
    from mailhub.testing.downstream import DownstreamServer

    server = DownstreamServer(reactor)
    pytest_twisted.blockon(server.start(port=0))
    server.known_users = {"alice@example.com"}
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def hubs() -> Any:
    made: list[Hub] = []

    def make(*args: Any, **kw: Any) -> Hub:
        hub = Hub(*args, **kw)
        made.append(hub)
        return hub

    yield make
    for hub in made:
        pytest_twisted.blockon(hub.port.stopListening())


def _status(reply: tuple[int, str]) -> str:
    return f"{reply[0]} {reply[1].split(' ', 1)[0]}"


@pytest_twisted.ensureDeferred
async def test_known_user_accepted_unknown_550_5_1_1_and_no_data_sent(
    tmp_path: Path, downstream: Any, hubs: Any
) -> None:
    hub = hubs(tmp_path, downstream.port)
    replies = await hub.rcpt("alice@example.com", "mallory@example.com", "x@elsewhere.example")
    assert [_status(r) for r in replies] == ["250 2.1.5", "550 5.1.1", "550 5.7.1"]
    verbs = {c.split(b" ")[0].split(b":")[0].upper() for c in downstream.commands}
    assert b"DATA" not in verbs
    assert downstream.messages == []
    assert not any(b"elsewhere" in c for c in downstream.commands), "relay rule runs first"


@pytest_twisted.ensureDeferred
async def test_answers_are_cached(tmp_path: Path, downstream: Any, hubs: Any) -> None:
    hub = hubs(tmp_path, downstream.port)
    await hub.rcpt("alice@example.com", "mallory@example.com")
    asked = sum(1 for c in downstream.commands if c.upper().startswith(b"RCPT"))
    replies = await hub.rcpt("alice@example.com", "mallory@example.com")
    assert [_status(r) for r in replies] == ["250 2.1.5", "550 5.1.1"]
    assert sum(1 for c in downstream.commands if c.upper().startswith(b"RCPT")) == asked == 2


@pytest_twisted.ensureDeferred
async def test_downstream_down_uses_expired_cache(tmp_path: Path, downstream: Any, hubs: Any) -> None:
    hub = hubs(tmp_path, downstream.port, verify_positive_seconds=0.01, verify_negative_seconds=0.01)
    await hub.rcpt("alice@example.com", "mallory@example.com")
    await downstream.stop()
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.05, lambda: None)
    replies = await hub.rcpt("alice@example.com", "mallory@example.com")
    assert [_status(r) for r in replies] == ["250 2.1.5", "550 5.1.1"]


@pytest_twisted.ensureDeferred
async def test_downstream_down_without_cache_tempfails_451_4_4_1(tmp_path: Path, downstream: Any, hubs: Any) -> None:
    hub = hubs(tmp_path, downstream.port)
    await downstream.stop()
    replies = await hub.rcpt("alice@example.com")
    assert [_status(r) for r in replies] == ["451 4.4.1"]


@pytest_twisted.ensureDeferred
async def test_downstream_down_without_cache_accepts_when_configured(
    tmp_path: Path, downstream: Any, hubs: Any
) -> None:
    hub = hubs(tmp_path, downstream.port, verify_unreachable="accept")
    await downstream.stop()
    replies = await hub.rcpt("mallory@example.com")
    assert [_status(r) for r in replies] == ["250 2.1.5"]


@pytest_twisted.ensureDeferred
async def test_route_answering_4xx_counts_as_down(tmp_path: Path, downstream: Any, hubs: Any) -> None:
    hub = hubs(tmp_path, downstream.port)
    downstream.mode = "tempfail"
    replies = await hub.rcpt("alice@example.com")
    assert [_status(r) for r in replies] == ["451 4.4.1"]

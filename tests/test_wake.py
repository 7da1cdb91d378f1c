"""
Waking the hub: under ``twistd mailhub`` a hub scans its spool at once on
``SIGUSR2`` (``mailhub.service.WAKE_SIGNAL``) and says so in its nodes'
heartbeats; ``mailhub queue flush`` and ``release`` send the signal to the hub
processes on this host whose recent heartbeat says they handle it, and to no
other process (the signal's default action would end it).

The integration tests set ``max_scan_interval`` to 300 s: a deferred entry
that is delivered within seconds of ``flush`` was delivered because the hub
was woken, not because its periodic scan came round.  "Canary" processes
(a Python sleep with "mailhub" in its command line, which SIGUSR2 kills) show
whether the command signalled a process it should have left alone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from hubprocess import (
    BIN,
    HubProcess,
    eventually,
    free_port,
    hub_config,
    mailhub_cli,
    message,
    send,
    sleep,
)
from mailhub.config import load, parse
from mailhub.plugin import load_plugin
from mailhub.service import WAKE_SIGNAL, HubService, install_wake_signal, makeHubService
from mailhub.testing.downstream import DownstreamServer

HEARTBEAT = 2.0
#: The scan cap of the integration hubs: far longer than any wait below.
MAX_SCAN = 300
#: How long a woken hub may take to deliver, on a loaded machine.
DELIVERY_TIMEOUT = 30.0
assert DELIVERY_TIMEOUT < MAX_SCAN / 5

# A down route's probe (every probe_seconds, from the backlog if nothing is
# due) would find the downstream back by itself: these tests are about the
# wake, so the probe waits longer than any of them.
DELIVERY = (
    "[delivery]\nlease_seconds = 30\ntakeover_seconds = 5\n"
    f"max_scan_interval = {MAX_SCAN}\nprobe_seconds = {MAX_SCAN}\nheartbeat_seconds = {HEARTBEAT:g}\n"
)


# -- helpers -------------------------------------------------------------------


async def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await deferToThread(mailhub_cli, config, *args)


def cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


@pytest.fixture
def processes() -> Iterator[Any]:
    """Start bystander processes; every one is killed and reaped at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(30)


def canary(start: Any) -> subprocess.Popen[bytes]:
    """A process that looks like a hub to /proc (its command line says "mailhub") and dies of SIGUSR2."""
    p = start(sys.executable, "-c", "import time; time.sleep(600)", "mailhub-canary")
    deadline = time.monotonic() + 30
    # Once it has exec'd, its command line is what the CLI will read.
    while b"mailhub-canary" not in cmdline(p.pid):
        assert time.monotonic() < deadline, "canary did not start"
        time.sleep(0.02)
    return p


async def assert_alive(*procs: subprocess.Popen[bytes], wait: float = 1.0) -> None:
    # A signal sent by the CLI arrived before the CLI exited: a short wait
    # is enough for its default action to have ended the process.
    await sleep(wait)
    for p in procs:
        assert p.poll() is None, f"pid {p.pid} ended with {p.returncode}: it was signalled"


def spool_config(directory: Path, name: str, downstream_port: int = 1, nodes: dict[str, int] | None = None) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(hub_config(directory / f"{name}.db", downstream_port, nodes or {"dallas": free_port()},
                               retry_minutes=20, delivery=DELIVERY))
    return path


async def write_heartbeats(config: Path, rows: dict[str, tuple[float, dict[str, Any]]]) -> None:
    """Heartbeat rows written straight into a configuration's sqlite spool: name -> (last_seen, info)."""
    hub = load(str(config))
    store = load_plugin("mailhub.stores", "sqlite").make(hub.plugin_section("store"), reactor)
    try:
        for name, (seen, info) in rows.items():
            await store.heartbeat(name, seen, info)
    finally:
        await store.close()


def woke(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.startswith("woke")]


# -- real hub processes --------------------------------------------------------


class Hub:
    """A ``twistd mailhub`` process with two nodes, a 300 s scan cap and 1 s heartbeats."""

    def __init__(self, directory: Path, downstream: DownstreamServer) -> None:
        self.ports = {"dallas": free_port(), "losangeles": free_port()}
        self.process = HubProcess(directory, hub_config(directory / "spool.db", downstream.port, self.ports,
                                                        retry_minutes=20, delivery=DELIVERY))
        self.config = self.process.config_path

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid

    async def start(self) -> None:
        self.process.start()
        for port in self.ports.values():
            await self.process.started(port)

    def alive(self) -> bool:
        assert self.process.process is not None
        return self.process.process.poll() is None

    async def heartbeats(self) -> dict[str, dict[str, Any]]:
        out = await cli(self.config, "nodes", "--json")
        assert out.returncode == 0, out.stderr
        return {r["name"]: r for r in json.loads(out.stdout)}

    async def advertised(self) -> dict[str, dict[str, Any]]:
        """Wait for both nodes' heartbeats from this process, and return them."""

        async def check() -> dict[str, dict[str, Any]] | None:
            rows = await self.heartbeats()
            ok = all(rows.get(n, {}).get("info", {}).get("pid") == self.pid for n in self.ports)
            return rows if ok else None

        result: dict[str, dict[str, Any]] = await eventually(check, timeout=30, what="heartbeats of the hub")
        return result

    async def deferred_entry(self, downstream: DownstreamServer, tag: str) -> dict[str, Any]:
        """Send a message while the downstream is down; return its spool entry once its attempt is recorded."""
        code, text = await send(self.ports["dallas"], message(tag))
        assert code == 250, text

        async def attempted() -> dict[str, Any] | None:
            entries = await self.process.queue()
            assert len(entries) <= 1, entries
            return entries[0] if entries and entries[0]["attempts"] >= 1 else None

        entry: dict[str, Any] = await eventually(attempted, timeout=30, what=f"first attempt of {tag} recorded")
        # Deferred far beyond the scan cap: only a wake can deliver it soon.
        assert entry["next_attempt"] > time.time() + MAX_SCAN
        assert downstream.messages == []
        return entry


def subjects(downstream: DownstreamServer) -> list[str]:
    return [m.message.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in downstream.messages]


@pytest.fixture
def hub(tmp_path: Path, downstream: DownstreamServer) -> Iterator[Hub]:
    h = Hub(tmp_path, downstream)
    yield h
    pytest_twisted.blockon(ensureDeferred(h.process.stop(signal.SIGTERM)))


async def down_then_up(downstream: DownstreamServer, hub: Hub, tag: str) -> dict[str, Any]:
    """A message deferred while the downstream was down; the downstream up again, the hub not told."""
    port = downstream.port
    await downstream.stop()
    entry = await hub.deferred_entry(downstream, tag)
    await downstream.start(port=port)
    # The hub, left alone, would not look at the entry for minutes (its
    # retry, and the route's probe, are far off).
    await sleep(2.0)
    assert downstream.messages == [], "delivered without a wake: the test proves nothing"
    return entry


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_heartbeats_of_twistd_mailhub_say_it_handles_the_wake_signal(hub: Hub) -> None:
    await hub.start()
    rows = await hub.advertised()
    for name in hub.ports:
        info = rows[name]["info"]
        assert info["wake_signal"] == int(signal.SIGUSR2) == int(WAKE_SIGNAL)
        assert info["host"] == socket.gethostname()
        assert rows[name]["state"] == "up"


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_flush_wakes_the_hub_which_delivers_at_once(hub: Hub, downstream: DownstreamServer) -> None:
    await hub.start()
    await hub.advertised()
    await down_then_up(downstream, hub, "flushed")
    out = await cli(hub.config, "queue", "flush")
    assert out.returncode == 0, out.stderr
    assert "1 entries due now" in out.stdout
    # Two nodes, one process: signalled once.
    assert woke(out) == ["woke 1 hub process on this host"]
    await eventually(lambda: len(downstream.messages) == 1, timeout=DELIVERY_TIMEOUT, what="delivery after the wake")
    assert subjects(downstream) == ["flushed"]
    # The hub survived its signal and still works.
    assert hub.alive(), hub.process.log()
    code, text = await send(hub.ports["losangeles"], message("after-the-signal"))
    assert code == 250, text
    await eventually(lambda: len(downstream.messages) == 2, timeout=DELIVERY_TIMEOUT, what="delivery after the signal")
    await eventually(lambda: _empty(hub), timeout=30, what="empty spool")
    assert hub.alive()
    # And keeps saying it handles the signal.
    rows = await hub.heartbeats()
    assert all(rows[n]["info"].get("wake_signal") == int(WAKE_SIGNAL) for n in hub.ports)


async def _empty(hub: Hub) -> bool:
    return await hub.process.queue() == []


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_release_wakes_the_hub_which_delivers_the_released_entry(hub: Hub, downstream: DownstreamServer) -> None:
    await hub.start()
    await hub.advertised()
    port = downstream.port
    await downstream.stop()
    entry = await hub.deferred_entry(downstream, "held")
    held = await cli(hub.config, "queue", "hold", entry["id"])
    assert held.returncode == 0, held.stderr
    assert woke(held) == []  # holding needs no scan
    await downstream.start(port=port)
    await sleep(2.0)
    assert downstream.messages == []
    out = await cli(hub.config, "queue", "release", entry["id"])
    assert out.returncode == 0, out.stderr
    assert f"release: {entry['id']}" in out.stdout
    assert woke(out) == ["woke 1 hub process on this host"]
    await eventually(lambda: len(downstream.messages) == 1, timeout=DELIVERY_TIMEOUT, what="delivery after release")
    assert subjects(downstream) == ["held"]
    assert hub.alive(), hub.process.log()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_flush_signals_no_process_that_did_not_ask_for_it(
    hub: Hub, downstream: DownstreamServer, processes: Any, tmp_path: Path
) -> None:
    await hub.start()
    await hub.advertised()
    here = socket.gethostname()
    sig = int(WAKE_SIGNAL)
    no_signal, elsewhere, stale, wrong_signal = (canary(processes) for _ in range(4))
    sleeper = processes("sleep", "600")
    assert b"mailhub" not in cmdline(sleeper.pid)
    now = time.time()
    await write_heartbeats(hub.config, {
        # A hub process by its command line, but its heartbeat does not say it handles the signal
        # (an embedded hub, or an older mailhub).
        "ghost-no-signal": (now, {"host": here, "pid": no_signal.pid}),
        # Says it handles it, but its pid is not a mailhub process now (the pid was reused).
        "ghost-reused-pid": (now, {"host": here, "pid": sleeper.pid, "wake_signal": sig}),
        # Another host's pid numbers are not ours.
        "ghost-elsewhere": (now, {"host": "elsewhere.invalid", "pid": elsewhere.pid, "wake_signal": sig}),
        # Last seen more than 3 heartbeats ago: the process may be gone and its pid reused.
        "ghost-stale": (now - 3 * HEARTBEAT - 30, {"host": here, "pid": stale.pid, "wake_signal": sig}),
        # Handles another signal.
        "ghost-other-signal": (now, {"host": here, "pid": wrong_signal.pid, "wake_signal": int(signal.SIGUSR1)}),
    })
    out = await cli(hub.config, "queue", "flush")
    assert out.returncode == 0, out.stderr
    # Only the hub itself.
    assert woke(out) == ["woke 1 hub process on this host"]
    await assert_alive(no_signal, elsewhere, stale, wrong_signal, sleeper)
    assert hub.alive(), hub.process.log()

    # A stale heartbeat of the real hub's pid (in another spool: this hub's
    # own heartbeats are fresh) gets no signal either.
    other = spool_config(tmp_path, "other", downstream.port)
    await write_heartbeats(other, {"old-run": (time.time() - 3 * HEARTBEAT - 30,
                                               {"host": here, "pid": hub.pid, "wake_signal": sig})})
    out = await cli(other, "queue", "flush")
    assert out.returncode == 0, out.stderr
    assert woke(out) == []
    out = await cli(other, "queue", "release", "no-such-entry")
    assert out.returncode == 1 and woke(out) == []
    assert hub.alive()


@pytest_twisted.ensureDeferred
async def test_a_process_whose_fresh_heartbeat_asks_for_the_signal_gets_it(processes: Any, tmp_path: Path) -> None:
    """The canaries of the other tests die of the signal when it is sent: their survival means something."""
    c = canary(processes)
    bystander = canary(processes)
    config = spool_config(tmp_path, "spool")
    await write_heartbeats(config, {
        "dallas": (time.time(), {"host": socket.gethostname(), "pid": c.pid, "wake_signal": int(WAKE_SIGNAL)}),
        "losangeles": (time.time(), {"host": socket.gethostname(), "pid": bystander.pid}),
    })
    out = await cli(config, "queue", "flush")
    assert out.returncode == 0, out.stderr
    assert woke(out) == ["woke 1 hub process on this host"]
    await eventually(lambda: c.poll() is not None, timeout=30, what="the canary's end")
    assert c.returncode == -int(WAKE_SIGNAL)
    await assert_alive(bystander, wait=0)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_an_embedded_hub_is_never_signalled(tmp_path: Path, downstream: DownstreamServer) -> None:
    """
    ``makeHubService`` without ``install_wake_signal`` (examples/embed.tac):
    its heartbeats advertise nothing, so ``flush`` leaves it alone although
    its command line says "mailhub" and the signal would kill it.
    """
    ports = {"dallas": free_port(), "losangeles": free_port()}
    config = spool_config(tmp_path, "hub", downstream.port, ports)
    tac = Path(__file__).parent.parent / "examples" / "embed.tac"
    log = tmp_path / "mailhub-embedded.log"
    env = {**os.environ, "MAILHUB_CONFIG": str(config), "APP_WEB": f"tcp:{free_port()}:interface=127.0.0.1"}
    process = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(log), "-y", str(tac)],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        embedded = HubProcess(tmp_path, config.read_text(), name="unused")
        embedded.process = process
        embedded.log_path = log
        for port in ports.values():
            await embedded.started(port)
        assert b"mailhub" in cmdline(process.pid)

        async def heartbeats() -> dict[str, Any] | None:
            out = await cli(config, "nodes", "--json")
            rows = {r["name"]: r for r in json.loads(out.stdout)}
            if all(rows[n]["info"].get("pid") == process.pid for n in ports):
                return rows
            return None

        rows = await eventually(heartbeats, timeout=30, what="heartbeats of the embedded hub")
        assert all("wake_signal" not in rows[n]["info"] for n in ports)
        out = await cli(config, "queue", "flush")
        assert out.returncode == 0, out.stderr
        assert woke(out) == []
        await sleep(1.0)
        assert process.poll() is None, f"embedded hub ended with {process.returncode}: {embedded.log()}"
        code, text = await send(ports["dallas"], message("embedded-after-flush"))
        assert code == 250, text
        await eventually(lambda: len(downstream.messages) == 1, timeout=DELIVERY_TIMEOUT, what="delivery")
    finally:
        process.terminate()
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            await sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait(30)


# -- install_wake_signal and HubService.wake, in this process -------------------


@pytest.fixture
def restore_wake_signal() -> Iterator[None]:
    previous = signal.getsignal(WAKE_SIGNAL)
    try:
        yield
    finally:
        signal.signal(WAKE_SIGNAL, previous)


class FakeReactor:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.append((f, args))


class FakeHub:
    def __init__(self) -> None:
        self.nodes = {"dallas": SimpleNamespace(wake_signal=None), "losangeles": SimpleNamespace(wake_signal=None)}
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


def test_wake_signal_is_sigusr2() -> None:
    assert WAKE_SIGNAL == signal.SIGUSR2


def test_the_signal_wakes_the_hub_through_the_reactor(restore_wake_signal: None) -> None:
    hub, fake_reactor = FakeHub(), FakeReactor()
    install_wake_signal(hub, fake_reactor)  # type: ignore[arg-type]
    assert all(n.wake_signal == int(signal.SIGUSR2) for n in hub.nodes.values())
    os.kill(os.getpid(), signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not fake_reactor.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    # Not from the signal handler itself: through the reactor's thread-safe queue.
    assert fake_reactor.calls == [(hub.wake, ())]
    assert hub.woken == 0
    f, args = fake_reactor.calls[0]
    f(*args)
    assert hub.woken == 1
    # Each signal, one wake.
    os.kill(os.getpid(), signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while len(fake_reactor.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake_reactor.calls == [(hub.wake, ()), (hub.wake, ())]


HUB_CONFIG = b"""
[hub]
hostname = "mx.hub.example"
[store]
plugin = "memory"
[nodes.dallas]
smtp = "tcp:0:interface=127.0.0.1"
[nodes.losangeles]
smtp = "tcp:0:interface=127.0.0.1"
[domains."example.com"]
route = "smtp:127.0.0.1:2500"
"""


def heartbeat_infos(hub: HubService) -> dict[str, dict[str, Any]]:
    for node in hub.nodes.values():
        node.heartbeat()
    rows: list[dict[str, Any]] = []
    hub.store.nodes(0).addCallback(rows.extend)
    return {r["name"]: r["info"] for r in rows}


def test_an_embedded_hub_advertises_no_wake_signal(tmp_path: Path) -> None:
    hub = makeHubService(parse(HUB_CONFIG, str(tmp_path / "hub.toml")), Clock())
    assert isinstance(hub, HubService)
    infos = heartbeat_infos(hub)
    assert set(infos) == {"dallas", "losangeles"}
    assert all("wake_signal" not in info for info in infos.values())


def test_a_hub_with_the_signal_installed_advertises_it(restore_wake_signal: None, tmp_path: Path) -> None:
    clock = Clock()
    hub = makeHubService(parse(HUB_CONFIG, str(tmp_path / "hub.toml")), clock)
    assert isinstance(hub, HubService)
    install_wake_signal(hub, clock)
    assert signal.getsignal(WAKE_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    infos = heartbeat_infos(hub)
    assert {name: info.get("wake_signal") for name, info in infos.items()} == {
        "dallas": int(signal.SIGUSR2),
        "losangeles": int(signal.SIGUSR2),
    }


def test_hub_wake_wakes_every_node_engine(tmp_path: Path) -> None:
    hub = makeHubService(parse(HUB_CONFIG, str(tmp_path / "hub.toml")), Clock())
    assert isinstance(hub, HubService)
    woken: list[str] = []
    for name, node in hub.nodes.items():
        node.engine.wake = lambda name=name: woken.append(name)  # type: ignore[method-assign]
    hub.wake()
    assert sorted(woken) == ["dallas", "losangeles"]


def test_a_pid_taken_over_after_the_heartbeat_is_not_the_hub():
    """
    The CLI signals a pid only if that process started before the heartbeat
    that named it: a hub that died and whose pid went to a new process
    (even one with "mailhub" in its command line) is left alone.
    """
    from mailhub.cli import _is_hub_process

    canary = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)  # mailhub canary"]
    )
    try:
        deadline = time.monotonic() + 10
        while b"canary" not in Path(f"/proc/{canary.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the canary never started"
            time.sleep(0.01)
        now = time.time()
        assert _is_hub_process(canary.pid, now + 5)
        # A heartbeat from before the canary started names some earlier process.
        assert not _is_hub_process(canary.pid, now - 600)
    finally:
        canary.kill()
        canary.wait()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert not _is_hub_process(sleeper.pid, time.time() + 5)
    finally:
        sleeper.kill()
        sleeper.wait()

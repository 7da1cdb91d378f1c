"""
Node heartbeats: a node says it is alive at start and every
``heartbeat_seconds`` on the injected clock, a store outage does not stop it,
and ``mailhub nodes`` lists the nodes, flags the silent ones DOWN and shows
what each holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from zope.interface import implementer

from mailhub.config import parse
from mailhub.interfaces import ISpoolStore
from mailhub.model import Address, Envelope, Reply
from mailhub.node import Node
from mailhub.plugins.memory_store import MemorySpoolStore
from mailhub.plugins.sqlite import plugin as sqlite_plugin
from mailhub.plugins.standard_policy import StandardPolicy
from mailhub.testing.fakes import ScriptedTransport

CONFIG = b"""
[hub]
hostname = "mx.hub.example"
[delivery]
heartbeat_seconds = 5
[nodes.dallas]
smtp = "tcp:0:interface=127.0.0.1"
[nodes.losangeles]
smtp = "tcp:0:interface=127.0.0.1"
[domains."example.com"]
route = "smtp:127.0.0.1:2500"
"""


def make_node(store: Any, clock: Clock, name: str = "dallas") -> Node:
    config = parse(CONFIG, "hub.toml")
    return Node(name, config, store, StandardPolicy(("dallas", "losangeles")), clock)


def start_heartbeat(node: Node) -> Any:
    # Only the heartbeat: the SMTP listener would need a real reactor.
    service = node.getServiceNamed("heartbeat")
    service.startService()
    return service


def last_seen(store: MemorySpoolStore) -> dict[str, float]:
    seen: dict[str, float] = {}
    store.nodes(0).addCallback(lambda nodes: seen.update({n["name"]: n["last_seen"] for n in nodes}))
    return seen


def test_heartbeat_at_start_then_every_heartbeat_seconds() -> None:
    clock = Clock()
    clock.advance(1000)
    store = MemorySpoolStore(clock)
    heartbeat = start_heartbeat(make_node(store, clock))
    assert last_seen(store) == {"dallas": 1000}
    clock.advance(4.9)
    assert last_seen(store) == {"dallas": 1000}
    clock.advance(0.1)
    assert last_seen(store) == {"dallas": 1005}
    heartbeat.stopService()


def test_heartbeat_info_says_where_the_node_runs() -> None:
    clock = Clock()
    store = MemorySpoolStore(clock)
    heartbeat = start_heartbeat(make_node(store, clock, "losangeles"))
    nodes: list[dict[str, Any]] = []
    store.nodes(0).addCallback(nodes.extend)
    [node] = nodes
    assert node["name"] == "losangeles"
    assert node["info"]["pid"] == os.getpid()
    assert node["info"]["host"] and node["info"]["version"]
    assert node["info"]["in_flight"] == 0
    heartbeat.stopService()


def test_store_outage_does_not_stop_the_heartbeats() -> None:
    clock = Clock()
    store = MemorySpoolStore(clock)
    heartbeat = start_heartbeat(make_node(store, clock))
    store.unavailable = True
    clock.advance(5)
    clock.advance(5)
    store.unavailable = False
    assert last_seen(store) == {"dallas": 0}
    clock.advance(5)
    assert last_seen(store) == {"dallas": 15}
    heartbeat.stopService()


@implementer(ISpoolStore)
class StoreWithoutRegistry:
    """A store that keeps no heartbeats (``INodeRegistry`` is optional)."""


def test_store_without_registry_gets_no_heartbeats() -> None:
    node = make_node(StoreWithoutRegistry(), Clock())
    with pytest.raises(KeyError):
        node.getServiceNamed("heartbeat")


# -- the first attempt of a message for a route known to be down -------------


@pytest_twisted.ensureDeferred
async def test_message_for_a_down_route_costs_the_sqlite_store_one_commit(tmp_path: Path) -> None:
    """
    Over the sqlite store, a node whose route was just refused stores the
    next message for it with its first attempt decided in one transaction:
    deferred to the other node about ten minutes on, the attempt logged
    under the entry's id, nothing sent.
    """
    route = "smtp:127.0.0.1:2500"
    store = sqlite_plugin.make({"path": "spool.db", "config_dir": str(tmp_path)}, reactor)
    node = make_node(store, reactor)
    transport = ScriptedTransport(lambda entry, message: Reply(421, "4.4.1", "Connection refused"))
    node._transports = {route: transport}
    node.engine.startService()
    alice = Address("alice", "example.com")

    def envelope() -> Envelope:
        return Envelope(Address("s", "outside.example"), (alice,), received_at=reactor.seconds())

    try:
        first = await node.receive(envelope(), b"x\r\n")
        for _ in range(500):
            if await store.attempts(first):
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert node.engine.throttle(route).down
        before = store.commits
        received = reactor.seconds()
        second = await node.receive(envelope(), b"y\r\n")
        assert store.commits - before == 1
        assert node.engine.in_flight == 0  # no attempt left to record
        assert len(transport.deliveries) == 1
        entry = await store.get(second)
        assert entry is not None and entry.attempts == 1 and entry.node == "losangeles"
        assert 540 <= entry.next_attempt - received <= 660
        [attempt] = await store.attempts(second)
        assert attempt.entry_id == second and attempt.node == "dallas"
        assert [(a, r.code, r.enhanced) for a, r in attempt.replies] == [(alice, 451, "4.4.1")]
        assert await store.body(entry.message_id) == b"y\r\n"
    finally:
        await node.engine.stopService()
        await store.close()


# -- mailhub nodes -----------------------------------------------------------

BIN = Path(sys.executable).parent


def nodes_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "mailhub"), "nodes", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    config = tmp_path / "hub.toml"
    config.write_text(CONFIG.decode() + '[store]\nplugin = "sqlite"\npath = "spool.db"\n')
    return config


@pytest_twisted.ensureDeferred
async def test_nodes_command_flags_silent_node_down_and_shows_holdings(hub: Path) -> None:
    now = reactor.seconds()
    store = sqlite_plugin.make({"path": "spool.db", "config_dir": str(hub.parent)}, reactor)
    try:
        await store.heartbeat("dallas", now, {"host": "dal1", "pid": 11, "in_flight": 2})
        # Three heartbeats of 5 s missed, and more.
        await store.heartbeat("losangeles", now - 16, {"host": "la1", "pid": 12, "in_flight": 0})
        alice = Address("alice", "example.com")
        envelope = Envelope(Address("s", "outside.example"), (alice,), received_at=now)
        await store.enqueue(envelope, b"x\r\n", {"smtp:127.0.0.1:2500": [alice]}, "losangeles")
        await store.enqueue(envelope, b"y\r\n", {"smtp:127.0.0.1:2500": [alice]}, "dallas")
        await store.claim("dallas", now, 10, 600, 300, None)
    finally:
        await store.close()
    out = nodes_cli(hub, "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["dallas"]["state"] == "up" and not rows["dallas"]["down"]
    assert rows["dallas"]["leased"] == 1 and rows["dallas"]["reserved"] == 0
    assert rows["dallas"]["info"]["host"] == "dal1"
    assert rows["losangeles"]["state"] == "DOWN" and rows["losangeles"]["down"]
    assert rows["losangeles"]["reserved"] == 1
    text = nodes_cli(hub)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[1].split()[:2] == ["dallas", "up"]
    assert lines[2].split()[:2] == ["losangeles", "DOWN"]


def test_nodes_command_lists_configured_nodes_never_seen(hub: Path) -> None:
    out = nodes_cli(hub, "--json")
    assert out.returncode == 0, out.stderr
    assert [(r["name"], r["state"]) for r in json.loads(out.stdout)] == [
        ("dallas", "never seen"),
        ("losangeles", "never seen"),
    ]


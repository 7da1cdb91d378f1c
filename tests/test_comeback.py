"""
When the server comes back: two ``twistd mailhub --node`` processes (over one
``redis-server``, or over one SQLite spool) and a real downstream server that
allows 3 connections (``452 4.3.1`` at MAIL above that) and can be told to
reject every recipient.

- The backlog of an outage drains with never more connections open at the
  server than the route's ``max_connections`` for the whole hub.
- A server that comes back rejecting everything bounces nothing: the route
  becomes REJECTING in both nodes, its backlog and new mail are held, and
  once the server is fixed the next probe ends the state and it all flows.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread

from hubprocess import HubProcess, eventually, free_port, hub_config, message, send
from mailhub.testing.downstream import DownstreamServer
from mailhub.testing.redis_server import RedisServer

pytestmark = [pytest.mark.integration]

LIMIT = 3


class TwoNodes:
    """Dallas and Los Angeles as two processes over one spool; DSNs go to ``outbound``."""

    def __init__(
        self, tmp_path: Path, store: str, downstream: DownstreamServer, outbound: DownstreamServer
    ) -> None:
        self.ports = {"dallas": free_port(), "losangeles": free_port()}
        self.redis: RedisServer | None = None
        if store == "redis":
            self.redis = RedisServer.start(tmp_path / "redis")
            table = f'[store]\nplugin = "redis"\nport = {self.redis.port}\nkey_prefix = "hub:"\n'
        else:
            table = None
        delivery = (
            "[delivery]\nlease_seconds = 30\ntakeover_seconds = 2\nmax_scan_interval = 1\n"
            "heartbeat_seconds = 1\nprobe_seconds = 1\nshare_seconds = 0.5\n"
        )
        text = hub_config(
            tmp_path / "spool.db", downstream.port, self.ports, retry_minutes=0.1, store=table,
            delivery=delivery,
            extra="[smtp]\nmax_messages_per_minute_per_ip = 1000000\nmax_connections_per_ip = 100\n",
        )
        text = text.replace(f'outbound = "smtp:127.0.0.1:{downstream.port}"', f'outbound = "smtp:127.0.0.1:{outbound.port}"')
        text = text.replace("max_connections = 4", f"max_connections = {LIMIT}")
        for port in self.ports.values():
            listener = f'smtp = "tcp:{port}:interface=127.0.0.1"\n'
            text = text.replace(listener, listener + f'web = "tcp:{free_port()}:interface=127.0.0.1"\n')
        self.hubs = {name: HubProcess(tmp_path, text, node=name, name=name) for name in self.ports}

    async def start(self) -> None:
        for hub in self.hubs.values():
            hub.start()
        for name, hub in self.hubs.items():
            await hub.started(self.ports[name])

    async def stop(self) -> None:
        for hub in self.hubs.values():
            if hub.process is not None and hub.process.poll() is None:
                await hub.stop(signal.SIGTERM)
        if self.redis is not None:
            self.redis.stop()

    async def cli(self, *args: str) -> str:
        out = await deferToThread(self.hubs["dallas"].cli, *args)
        assert out.returncode == 0, out.stdout + out.stderr
        return str(out.stdout)

    async def send_many(self, tags: list[str]) -> None:
        """Send each tagged message to a recipient of its own, alternately to each node; all must get 250."""
        ports = list(self.ports.values())

        async def one(i: int, tag: str) -> None:
            code, text = await send(ports[i % 2], message(tag, to=f"{tag}@example.com"), recipients=[f"{tag}@example.com"])
            assert code == 250, (tag, code, text)

        for start in range(0, len(tags), 10):
            await gatherResults([ensureDeferred(one(i, t)) for i, t in enumerate(tags[start : start + 10], start)])


@pytest.fixture
def outbound() -> Iterator[DownstreamServer]:
    """Where DSNs go: a second downstream server that accepts everything."""
    server = DownstreamServer(reactor, hostname="outbound.test")
    pytest_twisted.blockon(server.start(port=0))
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture(params=["redis", "sqlite"])
def hub(request, tmp_path: Path, downstream: DownstreamServer, outbound: DownstreamServer) -> Iterator[TwoNodes]:
    nodes = TwoNodes(tmp_path, request.param, downstream, outbound)
    pytest_twisted.blockon(ensureDeferred(nodes.start()))
    yield nodes
    pytest_twisted.blockon(ensureDeferred(nodes.stop()))


def delivered_tags(downstream: DownstreamServer) -> Counter[str]:
    return Counter(
        m.message.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        for m in downstream.messages
        if b"Subject: " in m.message
    )


@pytest_twisted.ensureDeferred
async def test_backlog_drains_within_the_hub_wide_connection_limit(
    hub: TwoNodes, downstream: DownstreamServer, outbound: DownstreamServer
) -> None:
    """Both nodes together never open more than ``max_connections``: the server never pushes back."""
    downstream.mode = "down"
    tags = [f"backlog-{i}" for i in range(60)]
    await hub.send_many(tags)
    downstream.max_concurrent_connections = LIMIT
    downstream.delay = 0.02  # a server with some work per message, so connections overlap
    downstream.mode = "accept"
    await hub.cli("queue", "flush")
    await eventually(lambda: set(delivered_tags(downstream)) == set(tags), timeout=90, what="the backlog delivered")
    assert max(delivered_tags(downstream).values()) == 1
    assert downstream.peak_connections <= LIMIT
    assert downstream.deferrals == 0  # not one 452
    assert outbound.messages == []
    status = json.loads(await hub.cli("status", "--json"))
    route = next(iter(status["dallas"]["engine"]["routes"]))
    assert sum(status[n]["engine"]["routes"].get(route, {}).get("share", 0) for n in status) <= LIMIT


@pytest_twisted.ensureDeferred
async def test_server_rejecting_everything_after_an_outage_bounces_nothing(
    hub: TwoNodes, downstream: DownstreamServer, outbound: DownstreamServer
) -> None:
    downstream.mode = "down"
    backlog = [f"outage-{i}" for i in range(10)]
    await hub.send_many(backlog)

    async def all_tried() -> bool:
        entries = json.loads(await hub.cli("queue", "list", "--json"))
        return len(entries) == len(backlog) and all(e["attempts"] >= 1 for e in entries)

    await eventually(all_tried, timeout=30, what="every entry tried while the server is down")
    # Back, but rebuilt without its users: 550 5.1.1 to every recipient.
    downstream.known_users = set()
    downstream.mode = "accept"
    await hub.cli("queue", "flush")

    async def rejecting() -> bool:
        states = json.loads(await hub.cli("route", "list", "--json"))
        return any(s.get("state") == "rejecting" for s in states.values())

    await eventually(rejecting, timeout=60, what="the route REJECTING")
    status = await hub.cli("status")
    assert "REJECTING" in status and "550 5.1.1" in status
    # Mail arriving meanwhile (and an operator's flush) bounces nothing either.
    storm = [f"storm-{i}" for i in range(5)]
    await hub.send_many(storm)
    await hub.cli("queue", "flush")

    seen: list = []

    async def all_held() -> bool:
        entries = json.loads(await hub.cli("queue", "list", "--json"))
        seen[:] = [(e["held"], e["attempts"], e["recipients"][0]["reply"]) for e in entries]
        # Held, but for the probes: one entry a node and probe interval is released to be tried.
        return len(entries) == len(backlog) + len(storm) and sum(not e["held"] for e in entries) <= 2

    try:
        await eventually(all_held, timeout=60, what="every entry held")
    except AssertionError:
        raise AssertionError(seen) from None
    assert outbound.messages == []
    # Fixed: the next probe is delivered, the state ends by itself, everything flows.
    downstream.known_users = None
    everything = set(backlog + storm)
    await eventually(lambda: set(delivered_tags(downstream)) == everything, timeout=90, what="all delivered")
    assert max(delivered_tags(downstream).values()) == 1
    assert outbound.messages == []
    assert json.loads(await hub.cli("route", "list", "--json")) == {}
    logs = hub.hubs["dallas"].log() + hub.hubs["losangeles"].log()
    assert "is REJECTING" in logs and "accepts mail again" in logs

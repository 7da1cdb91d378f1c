"""
Two sites, one hub: Dallas and Los Angeles as two ``twistd -n mailhub --node``
processes over one real ``redis-server``, relaying to a real downstream SMTP
server, exactly as the README's "Two sites" section starts them.

The timings are shortened for tests (lease 10 s, takeover 2 s, heartbeat
1 s, retry every 0.1 minute); the failover times the tests print scale with
them (see README, "Failover timings").
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread

from hubprocess import HubProcess, eventually, free_port, hub_config, message, send, sleep
from mailhub.testing.downstream import DownstreamServer
from mailhub.testing.redis_server import RedisServer

pytestmark = [
    pytest.mark.integration,
]

LEASE = 10
TAKEOVER = 2
HEARTBEAT = 1


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer.start(tmp_path / "redis")
    yield server
    server.stop()


class Sites:
    """Dallas and Los Angeles, one ``twistd`` process each, one configuration."""

    def __init__(self, tmp_path: Path, downstream: DownstreamServer, redis: RedisServer) -> None:
        self.ports = {"dallas": free_port(), "losangeles": free_port()}
        self.downstream = downstream
        store = (
            f'[store]\nplugin = "redis"\nport = {redis.port}\nkey_prefix = "hub:"\n'
            "command_timeout = 2\nreconnect_max_delay = 0.5\n"
        )
        delivery = (
            f"[delivery]\nlease_seconds = {LEASE}\ntakeover_seconds = {TAKEOVER}\n"
            f"max_scan_interval = 1\nheartbeat_seconds = {HEARTBEAT}\n"
        )
        # The load generators send from one IP, faster than a real client may.
        extra = "[smtp]\nmax_messages_per_minute_per_ip = 1000000\nmax_connections_per_ip = 100\n"
        text = hub_config(
            tmp_path / "unused.db", downstream.port, self.ports, retry_minutes=0.1,
            store=store, delivery=delivery, extra=extra,
        )
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

    @property
    def cli(self) -> HubProcess:
        return self.hubs["losangeles"]

    async def nodes(self) -> dict[str, dict[str, Any]]:
        out = await deferToThread(self.cli.cli, "nodes", "--json")
        assert out.returncode == 0, out.stderr
        return {n["name"]: n for n in json.loads(out.stdout)}

    def subjects(self) -> set[str]:
        return {
            m.message.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            for m in self.downstream.messages
            if b"Subject: " in m.message
        }


@pytest.fixture
def sites(tmp_path: Path, downstream: DownstreamServer, redis: RedisServer) -> Iterator[Sites]:
    s = Sites(tmp_path, downstream, redis)
    yield s
    pytest_twisted.blockon(ensureDeferred(s.stop()))


class Load:
    """
    SMTP clients sending to both nodes until told to stop; every reply is
    kept with when the transaction started and ended.
    """

    def __init__(self, sites: Sites, workers: int = 6) -> None:
        self.sites = sites
        self.replies: list[tuple[str, str, int, float, float]] = []
        self.running = True
        self._done = gatherResults([ensureDeferred(self._worker(w)) for w in range(workers)])

    async def _worker(self, worker: int) -> None:
        node = "dallas" if worker % 2 else "losangeles"
        for i in range(100000):
            if not self.running:
                return
            tag = f"{node}-{worker}-{i}"
            started = time.monotonic()
            code, _ = await send(self.sites.ports[node], message(tag))
            self.replies.append((tag, node, code, started, time.monotonic()))
            if code == 0:
                # The node is gone (killed): nobody listens there now.
                await sleep(0.5)
            elif code != 250:
                await sleep(0.1)

    async def stop(self) -> None:
        self.running = False
        await self._done

    @property
    def acknowledged(self) -> set[str]:
        return {tag for tag, _, code, _, _ in self.replies if code == 250}


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_deferral_on_dallas_is_retried_by_losangeles_across_processes(
    sites: Sites, downstream: DownstreamServer
) -> None:
    await sites.start()
    downstream.mode = "tempfail"
    code, _ = await send(sites.ports["dallas"], message("alternation"))
    assert code == 250
    entries = await eventually(sites.cli.queue, what="the entry in the spool")
    entry_id = entries[0]["id"]

    async def three_attempts() -> dict[str, Any] | None:
        shown = await sites.cli.show(entry_id)
        return shown if len(shown["attempt_log"]) >= 3 else None

    shown = await eventually(three_attempts, timeout=60, what="three attempts")
    log = shown["attempt_log"]
    assert [a["node"] for a in log[:3]] == ["dallas", "losangeles", "dallas"]
    assert all(a["replies"][0]["reply"].startswith("4") for a in log)
    # Each node retries the entry every 6 s; the entry is tried every 3 s.
    assert 2 <= log[1]["started"] - log[0]["finished"] <= 5
    downstream.mode = "accept"
    await eventually(lambda: "alternation" in sites.subjects(), what="delivery after recovery")
    await eventually(lambda: _empty(sites), what="an empty spool")


async def _empty(sites: Sites) -> bool:
    return await sites.cli.queue() == []


@pytest.mark.timeout(180)
@pytest_twisted.ensureDeferred
async def test_sigkill_of_one_node_under_load_survivor_delivers_everything(
    sites: Sites, downstream: DownstreamServer
) -> None:
    await sites.start()
    # First the customer's server defers: entries pile up, reserved for the
    # other node after each deferral.  Then it accepts, slowly: attempts are
    # in flight, under lease, when Dallas dies.
    downstream.mode = "tempfail"
    load = Load(sites)
    await eventually(lambda: len(load.acknowledged) >= 60, what="60 acknowledged messages")
    downstream.mode = "accept"
    downstream.delay = 0.3
    await sleep(1)
    held = (await sites.nodes())["dallas"]
    killed_at = time.monotonic()
    sites.hubs["dallas"].kill(signal.SIGKILL)
    await sleep(3)
    await load.stop()
    acknowledged = load.acknowledged
    by_node = {n: sum(1 for _, node, code, _, _ in load.replies if node == n and code == 250)
               for n in sites.ports}
    assert by_node["dallas"] > 0 and by_node["losangeles"] > 0
    # The dead node held entries: leased ones and ones reserved for it.
    assert held["leased"] + held["reserved"] > 0, held
    downstream.delay = 0.0

    await eventually(lambda: acknowledged <= sites.subjects(), timeout=90,
                     what="every acknowledged message delivered by Los Angeles")
    took = time.monotonic() - killed_at
    print(f"\nfailover: dallas held {held['leased']} leased, {held['reserved']} reserved at the kill;"
          f" {len(acknowledged)} acknowledged messages all delivered {took:.1f} s after SIGKILL"
          f" (lease {LEASE} s, takeover {TAKEOVER} s)")
    assert took < LEASE + 30
    await eventually(lambda: _empty(sites), timeout=30, what="an empty spool")


@pytest.mark.timeout(240)
@pytest_twisted.ensureDeferred
async def test_redis_outage_under_load_gives_4xx_loses_nothing_and_both_nodes_resume(
    sites: Sites, downstream: DownstreamServer, redis: RedisServer
) -> None:
    await sites.start()
    downstream.delay = 0.02
    load = Load(sites)
    await eventually(lambda: len(load.acknowledged) >= 30, what="30 acknowledged messages")
    await deferToThread(redis.stop)
    down_at = time.monotonic()
    await sleep(30)
    up_at = time.monotonic()
    await deferToThread(redis.restart)

    def resumed() -> bool:
        return all(
            any(node == n and code == 250 and started > up_at for _, node, code, started, _ in load.replies)
            for n in sites.ports
        )

    await eventually(resumed, timeout=60, what="both nodes accepting again")
    resumed_after = max(
        min(end for _, node, code, started, end in load.replies
            if node == n and code == 250 and started > up_at)
        for n in sites.ports
    ) - up_at
    await load.stop()

    during = [(tag, code) for tag, _, code, started, end in load.replies
              if started >= down_at and end <= up_at]
    assert during, "no transaction during the outage"
    assert all(400 <= code < 500 for _, code in during), [c for _, c in during if not 400 <= c < 500]
    acknowledged = load.acknowledged
    await eventually(lambda: acknowledged <= sites.subjects(), timeout=90,
                     what="every acknowledged message delivered")
    print(f"\nredis outage: {len(during)} transactions during the 30 s outage, all 4xx;"
          f" both nodes answered 250 again {resumed_after:.1f} s after redis-server restarted;"
          f" {len(acknowledged)} acknowledged, all delivered")
    await eventually(lambda: _empty(sites), timeout=60, what="an empty spool")


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_mailhub_nodes_shows_both_then_the_killed_one_down(sites: Sites) -> None:
    await sites.start()

    async def both_up() -> dict[str, dict[str, Any]] | None:
        nodes = await sites.nodes()
        return nodes if all(nodes.get(n, {}).get("state") == "up" for n in sites.ports) else None

    nodes = await eventually(both_up, what="both nodes up")
    for name, hub in sites.hubs.items():
        assert hub.process is not None
        assert nodes[name]["info"]["pid"] == hub.process.pid
    killed_at = time.monotonic()
    sites.hubs["dallas"].kill(signal.SIGKILL)

    async def dallas_down() -> dict[str, dict[str, Any]] | None:
        nodes = await sites.nodes()
        return nodes if nodes["dallas"]["state"] == "DOWN" else None

    nodes = await eventually(dallas_down, timeout=30, what="dallas DOWN")
    took = time.monotonic() - killed_at
    assert nodes["losangeles"]["state"] == "up"
    assert took >= 3 * HEARTBEAT - 1
    text = await deferToThread(sites.cli.cli, "nodes")
    assert text.returncode == 0
    assert any(line.split()[:2] == ["dallas", "DOWN"] for line in text.stdout.splitlines())
    print(f"\nmailhub nodes: dallas DOWN {took:.1f} s after SIGKILL (heartbeat {HEARTBEAT} s)")

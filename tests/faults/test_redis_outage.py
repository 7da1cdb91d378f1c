"""
The ``redis`` store goes away under load: a real ``redis-server``
(``mailhub.testing.redis_server``) stopped and started again, and, in the
long part (``--slow``), a Sentinel failover with ``wait_replicas = 1``.
Meanwhile clients get ``4xx`` (never a ``250`` the store did not take, never
a ``5xx``); afterwards the hub answers ``250`` again by itself and delivers
every message it acknowledged.

The hub is the embedded default's two nodes in one ``twistd`` process over
Redis, with short store timeouts (``command_timeout = 2``,
``reconnect_max_delay = 0.5``).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from faults.tally import Load, Tally
from hubprocess import HubProcess, eventually, free_port, hub_config, sleep
from mailhub.testing.downstream import DownstreamServer
from mailhub.testing.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

STORE_OPTIONS = 'key_prefix = "hub:"\ncommand_timeout = 2\nreconnect_max_delay = 0.5\n'


def redis_hub(tmp_path: Path, downstream: DownstreamServer, store: str) -> tuple[HubProcess, list[int]]:
    ports = {"dallas": free_port(), "losangeles": free_port()}
    text = hub_config(
        tmp_path / "unused.db", downstream.port, ports, retry_minutes=0.05, store=store,
        delivery="[delivery]\nlease_seconds = 10\ntakeover_seconds = 2\nmax_scan_interval = 1\n"
        "heartbeat_seconds = 1\n",
        extra="[smtp]\nmax_messages_per_minute_per_ip = 1000000\nmax_connections_per_ip = 100\n",
    )
    return HubProcess(tmp_path, text), list(ports.values())


async def outage(
    hub: HubProcess, ports: list[int], downstream: DownstreamServer, fault: str,
    stop: object, restore: object, seconds: float, workers: int,
) -> None:
    """
    Load on both nodes; ``stop()`` (blocking, run in a thread); ``seconds``
    later ``restore()``; then check and report the sets.
    """
    tally = Tally()
    hub.start()
    try:
        for port in ports:
            await hub.started(port)
        load = Load(tally, ports, workers=workers, prefix="redis")
        await eventually(lambda: len(tally.acknowledged) >= 10, what="10 acknowledged messages")
        await deferToThread(stop)  # type: ignore[arg-type]
        down_at = time.monotonic()
        await sleep(seconds)
        await deferToThread(restore)  # type: ignore[arg-type]
        up_at = time.monotonic()
        await eventually(lambda: all(load.first_250_after(up_at, p) for p in ports), timeout=60,
                         what="both nodes answering 250 again")
        recovered = max(load.first_250_after(up_at, p) or 0.0 for p in ports) - up_at
        await load.stop()
        # Half a second for the replies already on their way when the store
        # went; until the first 250 after that, the hub had no store.
        gone = down_at + 0.5
        back = min(load.first_250_after(gone, p) or up_at for p in ports)
        during = load.ended_between(gone, back)
        await eventually(lambda: tally.acknowledged <= set(Tally.delivered(downstream.messages)),
                         timeout=60, what="every acknowledged message delivered")
    finally:
        await hub.stop(signal.SIGTERM)
    refused = sorted(set(during))
    tally.report(fault, downstream.messages, recovered,
                 note=f"no 250 for {back - down_at:.1f} s: {len(during)} replies, {refused}")
    assert during, "no transaction while the store was down"
    assert all(400 <= code < 500 for code in during), refused
    assert all(400 <= code < 500 for code in tally.refused.values()), tally.refused
    assert tally.lost(downstream.messages) == set()
    assert set(Tally.delivered(downstream.messages)) <= set(tally.sent)


@pytest_twisted.ensureDeferred
async def test_redis_stopped_under_load_gives_4xx_and_loses_nothing(
    tmp_path: Path, downstream: DownstreamServer, slow: bool
) -> None:
    redis = RedisServer.start(tmp_path / "redis")
    try:
        store = f'[store]\nplugin = "redis"\nport = {redis.port}\n{STORE_OPTIONS}'
        hub, ports = redis_hub(tmp_path, downstream, store)
        await outage(hub, ports, downstream, "redis-server stopped and restarted",
                     redis.stop, redis.restart, seconds=20 if slow else 4, workers=8 if slow else 4)
    finally:
        redis.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_sentinel_failover_under_load_gives_4xx_and_loses_nothing(
    tmp_path: Path, downstream: DownstreamServer
) -> None:
    """
    The master is killed; Sentinel promotes the replica.  With
    ``wait_replicas = 1`` a write needs a replica again, so acceptance comes
    back once the old master, restarted, has become the new master's replica.
    """
    master = RedisServer.start(tmp_path / "master")
    replica = RedisServer.start(tmp_path / "replica", replica_of=master.address)
    sentinel = RedisServer.start_sentinel(tmp_path / "sentinel", "spool", master.address)
    try:
        replica.wait_for_replication()
        store = (
            f'[store]\nplugin = "redis"\nsentinels = ["127.0.0.1:{sentinel.port}"]\nmaster = "spool"\n'
            f"wait_replicas = 1\n{STORE_OPTIONS}"
        )
        hub, ports = redis_hub(tmp_path, downstream, store)

        def promoted() -> None:
            deadline = time.monotonic() + 30
            while replica.info("replication").get("role") != "master":
                assert time.monotonic() < deadline, "Sentinel did not promote the replica"
                time.sleep(0.1)
            master.restart()

        await outage(hub, ports, downstream, "Redis Sentinel failover", master.kill, promoted,
                     seconds=1, workers=8)
    finally:
        sentinel.stop()
        replica.stop()
        master.stop()

"""
The ``redis`` store against a real ``redis-server``: the spool-store contract,
then what only a shared Redis shows: two nodes on two connections, leases
across them, the size limit, outages, replication and an empty spool that
holds no key.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, gatherResults
from twisted.internet.task import Clock, deferLater
from zope.interface.verify import verifyObject

from mailhub.interfaces import ISpoolStore, IStorePlugin
from mailhub.model import (
    Action,
    Address,
    Attempt,
    Decision,
    Envelope,
    Lease,
    LeaseLost,
    Outcome,
    Reply,
    StoreFull,
    StoreUnavailable,
)
from mailhub.plugin import load_plugin
from mailhub.plugins import memory_store
from mailhub.plugins.redis import RedisSpoolStore, plugin
from mailhub.testing.redis_server import RedisServer
from mailhub.testing.store_contract import (
    NOW,
    LeaseReclaimContract,
    NodeRegistryContract,
    RouteCoordinationContract,
    SpoolControlContract,
    SpoolStoreContract,
)

ROUTE = "smtp:mail.a.example:25"
OTHER_ROUTE = "smtp:mail.b.example:25"
ALICE = Address("alice", "a.example")
BOB = Address("bob", "b.example")
ENVELOPE = Envelope(Address("sender", "outside.example"), [ALICE, BOB], received_at=NOW)
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"
OK = Reply(250, "2.0.0", "ok")
LATER = Reply(451, "4.3.0", "later")
LEASE = 300.0
TAKEOVER = 600.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the module; each store gets its own key prefix."""
    server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, for tests that stop or restart it."""
    server = RedisServer.start(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def stores() -> Iterator[Callable[..., RedisSpoolStore]]:
    """Makes stores (``make(server, **config)``) and closes them after the test."""
    made: list[RedisSpoolStore] = []

    def make(server: RedisServer, **config: Any) -> RedisSpoolStore:
        settings = {"port": server.port, "key_prefix": f"t{uuid.uuid4().hex[:8]}:", **config}
        store = plugin.make(settings, reactor)
        made.append(store)
        return store

    yield make
    pytest_twisted.blockon(gatherResults([s.close() for s in made]))


class TestRedisSpoolStore(
    SpoolStoreContract, NodeRegistryContract, RouteCoordinationContract, LeaseReclaimContract,
    SpoolControlContract,
):
    """The contract, each test under a fresh key prefix."""

    @pytest.fixture
    def store(
        self, redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
    ) -> RedisSpoolStore:
        return stores(redis_server)


def deliver(lease: Lease) -> tuple[Attempt, Decision]:
    pending = lease.entry.pending
    attempt = Attempt(lease.entry.id, lease.node, NOW, NOW + 1, [(a, OK) for a in pending])
    return attempt, Decision([Outcome(a, Action.DELIVERED, OK) for a in pending])


def defer_to(lease: Lease, at: float, node: str | None) -> tuple[Attempt, Decision]:
    pending = lease.entry.pending
    attempt = Attempt(lease.entry.id, lease.node, NOW, NOW + 1, [(a, LATER) for a in pending])
    return attempt, Decision([Outcome(a, Action.RETRY, LATER) for a in pending], at, node)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


# -- the plugin ------------------------------------------------------------


def test_plugin_provides_store_plugin(
    redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """The entry point object is an ``IStorePlugin`` named ``redis`` making ``ISpoolStore``s."""
    assert verifyObject(IStorePlugin, plugin)
    assert plugin.name == "redis"
    assert verifyObject(ISpoolStore, stores(redis_server))


def test_plugin_found_by_name() -> None:
    """The core finds the store through its entry point."""
    assert load_plugin("mailhub.stores", "redis") is plugin


def test_module_import_installs_no_reactor() -> None:
    """Importing the plugin does not import txredisapi (which installs a reactor)."""
    code = (
        "import sys, mailhub.plugins.redis;"
        "assert 'txredisapi' not in sys.modules;"
        "assert 'twisted.internet.reactor' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "config, key",
    [
        ({"port": "6379"}, "store.port"),
        ({"port": 70000}, "store.port"),
        ({"db": -1}, "store.db"),
        ({"command_timeout": 0}, "store.command_timeout"),
        ({"command_timeout": "soon"}, "store.command_timeout"),
        ({"wait_replicas": -1}, "store.wait_replicas"),
        ({"wait_replicas": True}, "store.wait_replicas"),
        ({"max_spool_bytes": 1.5}, "store.max_spool_bytes"),
        ({"key_prefix": ""}, "store.key_prefix"),
        ({"url": "http://localhost"}, "store.url"),
        ({"url": "redis://localhost/zero"}, "store.url"),
        ({"sentinels": "127.0.0.1:26379", "master": "m"}, "store.sentinels"),
        ({"sentinels": ["127.0.0.1"], "master": "m"}, "store.sentinels"),
        ({"sentinels": ["127.0.0.1:26379"]}, "store.master"),
        ({"pool_size": 0}, "store.pool_size"),
    ],
)
def test_bad_configuration_names_the_key(config: dict[str, Any], key: str) -> None:
    """A wrong ``[store]`` table fails at once, naming the key, before connecting."""
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        plugin.make(config, reactor)


@pytest_twisted.ensureDeferred
async def test_url_selects_database(
    redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """``url = "redis://host:port/db"`` connects to that database."""
    store = stores(redis_server, url=f"redis://127.0.0.1:{redis_server.port}/3", key_prefix="u:")
    [entry_id] = await store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")
    assert f"u:e:{entry_id}".encode() in redis_server.keys("u:", db=3)
    assert redis_server.keys("u:", db=0) == []
    assert await store.delete(entry_id)


# -- two nodes, two connections --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_nodes_claiming_concurrently_get_disjoint_leases(
    redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """Nodes on separate connections, claiming at once and over again, never share an entry."""
    dallas = stores(redis_server)
    losangeles = stores(redis_server, key_prefix=dallas._prefix)
    ids: set[str] = set()
    for _ in range(100):
        ids.update(await dallas.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "elsewhere"))
    now = NOW + TAKEOVER
    calls = [
        store.claim(node, now, 7, LEASE, TAKEOVER)
        for _ in range(6)
        for store, node in ((dallas, "dallas"), (losangeles, "losangeles"))
    ]
    results = await DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)
    leased = [lease.entry.id for _, leases in results for lease in leases]
    assert len(leased) == len(set(leased)) == 6 * 2 * 7
    assert set(leased) <= ids
    by_node = {lease.node for _, leases in results for lease in leases}
    assert by_node == {"dallas", "losangeles"}


@pytest_twisted.ensureDeferred
async def test_expired_lease_is_claimable_by_other_node(
    redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """A node that dies holding a lease loses the entry to the other node when it expires."""
    dallas = stores(redis_server)
    losangeles = stores(redis_server, key_prefix=dallas._prefix)
    [entry_id] = await dallas.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")
    [old] = await dallas.claim("dallas", NOW, 10, LEASE, TAKEOVER)
    assert await losangeles.claim("losangeles", old.expires - 1, 10, LEASE, TAKEOVER) == []
    [new] = await losangeles.claim("losangeles", old.expires, 10, LEASE, TAKEOVER)
    assert new.entry.id == entry_id
    with pytest.raises(LeaseLost):
        await dallas.record(old, *deliver(old))
    assert await losangeles.record(new, *deliver(new)) is None


@pytest_twisted.ensureDeferred
async def test_deferral_alternates_nodes_across_connections(
    redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """After a deferral on Dallas for Los Angeles, Los Angeles has it; Dallas only after takeover."""
    dallas = stores(redis_server)
    losangeles = stores(redis_server, key_prefix=dallas._prefix)
    [entry_id] = await dallas.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")
    [lease] = await dallas.claim("dallas", NOW, 10, LEASE, TAKEOVER)
    retry_at = NOW + 600
    await dallas.record(lease, *defer_to(lease, retry_at, "losangeles"))
    assert await dallas.next_due("dallas", NOW, TAKEOVER) == retry_at + TAKEOVER
    assert await losangeles.next_due("losangeles", NOW, TAKEOVER) == retry_at
    assert await dallas.claim("dallas", retry_at, 10, LEASE, TAKEOVER) == []
    [again] = await losangeles.claim("losangeles", retry_at, 10, LEASE, TAKEOVER)
    assert again.entry.id == entry_id and again.entry.attempts == 1
    # Los Angeles dies holding it: the lease expires, then Dallas takes over.
    assert await dallas.claim("dallas", again.expires, 10, LEASE, TAKEOVER) != []
    attempts = await losangeles.attempts(entry_id)
    assert [a.node for a in attempts] == ["dallas"]


@pytest_twisted.ensureDeferred
async def test_restarted_node_takes_back_the_dead_process_leases(
    redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """
    Dallas's process dies holding leases (the first store, never used
    again); its next process (a second store on its own connection) takes
    them back at once, Los Angeles's lease included in neither count nor
    change, and the taken-back entries are due in Dallas's own schedule.
    """
    dead = stores(redis_server)
    losangeles = stores(redis_server, key_prefix=dead._prefix)
    await dead.reclaim("dallas", "1-dead", NOW)
    await losangeles.reclaim("losangeles", "2-la", NOW)
    for node in ("dallas", "dallas", "losangeles"):
        await dead.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, node)
    held = await dead.claim("dallas", NOW, 10, LEASE, TAKEOVER)
    [theirs] = await losangeles.claim("losangeles", NOW, 10, LEASE, TAKEOVER)
    [accepted] = await dead.enqueue_leased(ENVELOPE, MESSAGE, {ROUTE: [BOB]}, "dallas", LEASE)
    assert len(held) == 2
    restarted = stores(redis_server, key_prefix=dead._prefix)
    assert await restarted.reclaim("dallas", "3-restarted", NOW + 5) == 3
    assert await restarted.next_due("dallas", NOW + 5, TAKEOVER) == NOW + 5
    again = await restarted.claim("dallas", NOW + 5, 10, LEASE, TAKEOVER)
    assert {a.entry.id for a in again} == {a.entry.id for a in [*held, accepted]}
    # Its own new leases stay when it asks again; the dead process's records fail.
    assert await restarted.reclaim("dallas", "3-restarted", NOW + 6) == 0
    with pytest.raises(LeaseLost):
        await dead.record(held[0], *deliver(held[0]))
    assert await losangeles.record(theirs, *deliver(theirs)) is None
    for lease in again:
        assert await restarted.record(lease, *deliver(lease)) is None
    assert redis_server.keys(dead._prefix) == []


# -- limits and memory ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_size_limit_refuses_with_store_full(
    redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """At ``max_spool_bytes`` enqueue fails with ``StoreFull``, storing nothing; room comes back."""
    store = stores(redis_server, max_spool_bytes=1000)
    body = b"x" * 600
    await store.enqueue(ENVELOPE, body, {ROUTE: [ALICE], OTHER_ROUTE: [BOB]}, "dallas")
    with pytest.raises(StoreFull):
        await store.enqueue(ENVELOPE, body, {ROUTE: [ALICE]}, "dallas")
    assert (await store.counts())["entries"] == 2
    # A message shared by two routes counts once; the small one still fits.
    assert await store.enqueue(ENVELOPE, b"y" * 400, {ROUTE: [ALICE]}, "dallas")
    with pytest.raises(StoreFull):
        await store.enqueue(ENVELOPE, b"z", {ROUTE: [ALICE]}, "dallas")
    for lease in await store.claim("dallas", NOW, 10, LEASE, TAKEOVER):
        await store.record(lease, *deliver(lease))
    assert await store.enqueue(ENVELOPE, body, {ROUTE: [ALICE]}, "dallas")


@pytest_twisted.ensureDeferred
async def test_size_limit_refuses_enqueue_leased_with_store_full(
    redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """
    ``enqueue_leased`` keeps to ``max_spool_bytes`` as ``enqueue`` does: over
    it, ``StoreFull`` and nothing stored (no entry, no lease); a message that
    fits is stored leased, and counts against the limit.
    """
    store = stores(redis_server, max_spool_bytes=1000)
    body = b"x" * 600
    await store.enqueue(ENVELOPE, body, {ROUTE: [ALICE]}, "dallas")
    with pytest.raises(StoreFull):
        routes = {ROUTE: [ALICE], OTHER_ROUTE: [BOB]}
        await store.enqueue_leased(ENVELOPE, body, routes, "dallas", LEASE)
    counts = await store.counts()
    assert counts["entries"] == 1 and counts["leased"] == 0
    [lease] = await store.enqueue_leased(ENVELOPE, b"y" * 400, {ROUTE: [ALICE]}, "dallas", LEASE)
    assert (await store.counts())["entries"] == 2
    with pytest.raises(StoreFull):
        await store.enqueue(ENVELOPE, b"z", {ROUTE: [ALICE]}, "dallas")
    # Delivered under its lease, the message gives its room back.
    assert await store.record(lease, *deliver(lease)) is None
    assert await store.enqueue_leased(ENVELOPE, b"y" * 400, {ROUTE: [ALICE]}, "dallas", LEASE)


@pytest_twisted.ensureDeferred
async def test_spool_done_leaves_no_key_behind(
    redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """Delivered, failed, deleted and expired-lease entries free every key: bodies, logs, indexes."""
    store = stores(redis_server)
    prefix = store._prefix
    routes = {ROUTE: [ALICE], OTHER_ROUTE: [BOB]}
    for _ in range(3):
        await store.enqueue(ENVELOPE, MESSAGE * 100, routes, "dallas")
    [held] = await store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "losangeles")
    await store.hold(held)
    assert redis_server.keys(prefix)
    # One round of deferrals (attempts logged, reservations for another node)...
    for lease in await store.claim("dallas", NOW, 100, LEASE, TAKEOVER):
        await store.record(lease, *defer_to(lease, NOW + 100, "losangeles"))
    # ...a lease abandoned and taken over...
    [abandoned] = await store.claim("losangeles", NOW + 100, 1, LEASE, TAKEOVER)
    leases = await store.claim("dallas", NOW + 100 + TAKEOVER + LEASE, 100, LEASE, TAKEOVER)
    assert abandoned.entry.id in {lease.entry.id for lease in leases}
    assert len(leases) == 6
    # ...then everything done: delivered, failed, deleted.
    for i, lease in enumerate(leases):
        if i % 2:
            await store.record(lease, *deliver(lease))
        else:
            pending = lease.entry.pending
            no = Reply(550, "5.1.1", "no")
            await store.record(
                lease,
                Attempt(lease.entry.id, lease.node, NOW, NOW, [(a, no) for a in pending]),
                Decision([Outcome(a, Action.FAILED, no) for a in pending]),
            )
    assert await store.delete(held)
    assert redis_server.keys(prefix) == []
    assert await store.counts() == {
        "entries": 0, "held": 0, "leased": 0, "recipients": 0, "routes": {}
    }  # fmt: skip


# -- route coordination ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_shares_are_those_the_memory_store_gives(
    redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """
    The script's max-min fairness is ``fair_share``'s: the same requests,
    asked of the ``memory`` store and of Redis, get the same shares (names
    chosen so that their order by bytes is not a locale's).
    """
    store = stores(redis_server)
    memory = memory_store.plugin.make({}, Clock())
    rng = random.Random(11)
    names = ["dallas", "Dallas", "b", "ä-node", "a b", "losangeles-2", "losangeles-10"]
    held = dict.fromkeys(names, 0)
    for step in range(400):
        name = rng.choice(names)
        route = rng.choice([ROUTE, OTHER_ROUTE])
        want, limit = rng.randint(0, 9), rng.choice([0, 1, 3, 7, 10, 25])
        holding = rng.randint(0, held[name])
        ttl = rng.choice([5.0, 50.0, 1e6])
        now = NOW + step * 0.75
        args = (route, name, want, holding, limit, now, ttl)
        expected = await memory.share(*args)
        assert await store.share(*args) == expected, (step, args)
        held[name] = expected


@pytest_twisted.ensureDeferred
async def test_two_connections_never_share_out_more_than_the_limit(
    redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """
    Nodes on two stores asking all at once, each holding all it was given
    (or, given less, still holding its last share as they ask), stay within
    the limit, and the limit ends up shared out.
    """
    a = stores(redis_server)
    b = stores(redis_server, key_prefix=a._prefix)
    limit = 5
    held = {f"n{i}": 0 for i in range(6)}
    given = dict(held)
    for step in range(20):
        asked = [
            (a if i % 2 else b).share(ROUTE, name, 4, held[name], limit, NOW + step, 3600.0)
            for i, name in enumerate(sorted(held))
        ]
        for name, share in zip(sorted(held), await gatherResults(asked), strict=True):
            given[name] = share
        assert sum(max(given[n], held[n]) for n in held) <= limit
        held = dict(given)  # attempts above a share end; up to it, connections open
        assert sum(held.values()) <= limit
    assert sum(given.values()) == limit


@pytest_twisted.ensureDeferred
async def test_idle_routes_leave_no_key_behind(
    redis_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """Shares given back, expired shares and cleared states free their keys."""
    store = stores(redis_server)
    prefix = store._prefix
    assert await store.share(ROUTE, "dallas", 2, 0, 3, NOW, 10.0) == 2
    assert await store.share(ROUTE, "losangeles", 2, 0, 3, NOW, 10.0) == 1
    await store.set_route_state(ROUTE, {"state": "rejecting", "since": NOW})
    assert sorted(redis_server.keys(prefix)) == [
        f"{prefix}route_states".encode(), f"{prefix}shares:{ROUTE}".encode()
    ]
    await store.set_route_state(ROUTE, None)
    assert await store.share(ROUTE, "dallas", 0, 0, 3, NOW + 1, 10.0) == 0
    # losangeles stopped asking: its share lapses when dallas next asks.
    assert await store.share(ROUTE, "dallas", 0, 0, 3, NOW + 10, 10.0) == 0
    assert redis_server.keys(prefix) == []


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_route_state_waits_for_replicas_a_share_does_not(
    own_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """With ``wait_replicas = 1`` and no replica, a route state is not acknowledged; a share is."""
    store = stores(own_server, wait_replicas=1, command_timeout=1.0)
    with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
        await store.set_route_state(ROUTE, {"state": "rejecting"})
    assert await store.share(ROUTE, "dallas", 2, 0, 3, NOW, 10.0) == 2


# -- outages ----------------------------------------------------------------


async def until_works(store: RedisSpoolStore, within: float) -> float:
    """Retry an enqueue until it succeeds; returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            await store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")
            return time.monotonic() - started
        except StoreUnavailable:
            if time.monotonic() - started > within:
                raise
            await sleep(0.1)


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_redis_down_fails_fast_and_store_recovers_by_itself(
    own_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """
    With Redis stopped, calls fail with ``StoreUnavailable`` within the command
    timeout instead of hanging; once it is back, the same store works again.
    """
    store = stores(own_server, command_timeout=1.0, reconnect_max_delay=0.5)
    [kept] = await store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")
    own_server.stop()
    for call in (
        lambda: store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas"),
        lambda: store.claim("dallas", NOW, 10, LEASE, TAKEOVER),
        lambda: store.counts(),
    ):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await call()
        assert time.monotonic() - started < 1.5
    own_server.restart()
    assert await until_works(store, within=10.0) < 10.0
    assert (await store.get(kept)) is not None  # AOF: the acknowledged entry survived


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_redis_not_answering_fails_within_timeout(
    own_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """
    A Redis that accepts connections but never answers cannot hang a session,
    and the store keeps reconnecting through it (txredisapi alone gives up
    for good when the ``SELECT`` of a new connection times out).
    """
    store = stores(own_server, db=1, pool_size=1, command_timeout=1.0, reconnect_max_delay=0.5)
    await store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")
    own_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")
        assert 0.9 < time.monotonic() - started < 1.5
        # Reconnections meanwhile reach the frozen server and time out.
        await sleep(3.0)
    finally:
        own_server.resume()
    assert await until_works(store, within=10.0) < 10.0


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_route_coordination_fails_fast_when_redis_is_down(
    own_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    store = stores(own_server, command_timeout=1.0, reconnect_max_delay=0.5)
    await store.set_route_state(ROUTE, {"state": "rejecting"})
    own_server.stop()
    for call in (
        lambda: store.share(ROUTE, "dallas", 2, 0, 3, NOW, 10.0),
        lambda: store.route_states(),
        lambda: store.set_route_state(ROUTE, None),
    ):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await call()
        assert time.monotonic() - started < 1.5
    own_server.restart()
    assert await until_works(store, within=10.0) < 10.0
    assert await store.route_states() == {ROUTE: {"state": "rejecting"}}


# -- replication ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_wait_replicas_without_replica_is_unavailable(
    own_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    """With ``wait_replicas = 1`` and no replica, enqueue fails and takes its write back."""
    store = stores(own_server, wait_replicas=1, command_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
        await store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")
    assert time.monotonic() - started < 1.5
    for _ in range(50):
        if own_server.keys(store._prefix) == []:
            break
        await sleep(0.05)
    assert own_server.keys(store._prefix) == []


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_wait_replicas_with_replica_succeeds(
    own_server: RedisServer, tmp_path: Path, stores: Callable[..., RedisSpoolStore]
) -> None:
    """With a real replica, enqueue and record return once the replica has the write."""
    replica = RedisServer.start(tmp_path / "replica", replica_of=own_server.address)
    try:
        replica.wait_for_replication()
        store = stores(own_server, wait_replicas=1, command_timeout=2.0)
        [entry_id] = await store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")
        # WAIT returned: the replica already holds the entry, without polling.
        assert f"{store._prefix}e:{entry_id}".encode() in replica.keys(store._prefix)
        [lease] = await store.claim("dallas", NOW, 10, LEASE, TAKEOVER)
        updated = await store.record(lease, *defer_to(lease, NOW + 60, None))
        assert updated is not None and updated.attempts == 1
        assert replica.command("LLEN", f"{store._prefix}a:{entry_id}") == 1
    finally:
        replica.stop()


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_sentinel_failover_loses_no_acknowledged_entry(
    own_server: RedisServer, tmp_path: Path, stores: Callable[..., RedisSpoolStore]
) -> None:
    """
    Over Sentinel with ``wait_replicas = 1``: the master dies, Sentinel
    promotes the replica, and the store finds the new master by itself; every
    entry acknowledged before the failover is there.
    """
    master = own_server
    replica = RedisServer.start(tmp_path / "replica", replica_of=master.address)
    sentinel = RedisServer.start_sentinel(tmp_path / "sentinel", "spool", master.address)
    try:
        replica.wait_for_replication()
        store = stores(
            sentinel,
            sentinels=[f"127.0.0.1:{sentinel.port}"],
            master="spool",
            wait_replicas=1,
            command_timeout=2.0,
            reconnect_max_delay=0.5,
        )
        acknowledged: list[str] = []
        for _ in range(20):
            acknowledged += await store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")

        master.kill()
        started = time.monotonic()
        # Writes fail (4xx to clients) until the old master is back as a
        # replica of the promoted one: WAIT 1 needs a replica.
        with pytest.raises(StoreUnavailable):
            await store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")
        while replica.info("replication").get("role") != "master":
            assert time.monotonic() - started < 30, "Sentinel did not promote the replica"
            await sleep(0.1)
        promoted = time.monotonic() - started
        # Reads work as soon as the store has found the new master.
        while True:
            try:
                assert await store.get(acknowledged[0]) is not None
                break
            except StoreUnavailable:
                assert time.monotonic() - started < 30, "the store did not find the new master"
                await sleep(0.1)
        reading = time.monotonic() - started
        master.restart()
        took = await until_works(store, within=60.0)
        print(
            f"replica promoted after {promoted:.1f}s, store reading at {reading:.1f}s;"
            f" old master restarted, store writing again {took:.1f}s later"
        )
        for entry_id in acknowledged:
            assert await store.get(entry_id) is not None
    finally:
        sentinel.stop()
        replica.stop()


def script_calls(server: RedisServer) -> int:
    """How many scripts the server has run (EVALSHA and EVAL), from ``INFO commandstats``."""
    stats = server.info("commandstats")
    total = 0
    for command in ("cmdstat_evalsha", "cmdstat_eval"):
        if command in stats:
            total += int(stats[command].split(",")[0].split("=")[1])
    return total


@pytest_twisted.ensureDeferred
async def test_bodies_asked_for_in_one_turn_are_read_by_one_script(
    own_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    store = stores(own_server)
    bodies = [MESSAGE + b"%d\r\n" % i for i in range(5)]
    messages = []
    for body in bodies:
        [entry_id] = await store.enqueue(ENVELOPE, body, {ROUTE: [ALICE]}, "dallas")
        entry = await store.get(entry_id)
        assert entry is not None
        messages.append(entry.message_id)
    await store.body(messages[0])  # Redis learns the script (EVALSHA, then EVAL)
    before = script_calls(own_server)
    results = await DeferredList(
        [store.body(m) for m in messages[:3]] + [store.body("nosuch")] + [store.body(m) for m in messages[3:]],
        consumeErrors=True,
    )
    assert script_calls(own_server) - before == 1
    assert [value for ok, value in results if ok] == bodies
    # The one that is not there fails alone, as a lone read would.
    [(ok, failure)] = [r for r in results if not r[0]]
    assert failure.check(KeyError)


@pytest_twisted.ensureDeferred
async def test_records_made_in_one_turn_go_in_one_script_each_with_its_own_result(
    own_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    store = stores(own_server)
    for _ in range(4):
        await store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")
    first, *leases = await store.claim("dallas", NOW, 10, LEASE, TAKEOVER)
    assert len(leases) == 3
    await store.record(first, *deliver(first))  # Redis learns the script
    # The second lease is no longer this node's: its record fails alone.
    stolen = await store.claim("losangeles", leases[1].expires, 10, LEASE, TAKEOVER, ids=[leases[1].entry.id])
    assert len(stolen) == 1
    before = script_calls(own_server)
    results = await DeferredList(
        [
            store.record(leases[0], *deliver(leases[0])),
            store.record(leases[1], *deliver(leases[1])),
            store.record(leases[2], *defer_to(leases[2], NOW + 1200, "losangeles")),
        ],
        consumeErrors=True,
    )
    assert script_calls(own_server) - before == 1
    assert results[0] == (True, None)
    assert not results[1][0] and results[1][1].check(LeaseLost)
    assert results[2][0] and results[2][1].next_attempt == NOW + 1200
    assert await store.get(leases[0].entry.id) is None
    assert (await store.get(leases[2].entry.id)).node == "losangeles"  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_failed_shared_script_fails_every_call_that_was_in_it(
    own_server: RedisServer, stores: Callable[..., RedisSpoolStore]
) -> None:
    store = stores(own_server, command_timeout=1.0, reconnect_max_delay=0.5)
    [entry_id] = await store.enqueue(ENVELOPE, MESSAGE, {ROUTE: [ALICE]}, "dallas")
    entry = await store.get(entry_id)
    assert entry is not None
    [lease] = await store.claim("dallas", NOW, 10, LEASE, TAKEOVER)
    own_server.stop()
    results = await DeferredList(
        [store.body(entry.message_id), store.body(entry.message_id), store.record(lease, *deliver(lease))],
        consumeErrors=True,
    )
    assert [ok for ok, _ in results] == [False, False, False]
    assert all(f.check(StoreUnavailable) for _, f in results)


def test_replies_are_parsed_by_hiredis():
    """
    The redis store's replies go through hiredis's C parser (txredisapi uses
    it when it can import it): bodies of 100 KB and claimed batches parsed in
    Python cost a fifth of the drain (bench/README.md, issue 17).
    """
    import txredisapi

    assert txredisapi.RedisProtocol is txredisapi.HiredisProtocol

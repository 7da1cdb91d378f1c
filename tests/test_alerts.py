"""
Alerts (``mailhub.alerts``): what is announced, when, to whom, and that a
flapping condition does not make a storm.  Nodes over the memory store with a
scripted transport, a Clock and a fake webhook poster; then one real node on
127.0.0.1 whose downstream goes down, announced to a real twisted.web server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.web import resource, server
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hubprocess import eventually, free_port, message, send
from mailhub.alerts import AlertMonitor, IWebhookPoster, TreqPoster, alert_monitor
from mailhub.config import ConfigError, parse
from mailhub.model import Address, Envelope, Reply
from mailhub.node import Node
from mailhub.plugins.memory_store import MemorySpoolStore
from mailhub.plugins.standard_policy import StandardPolicy
from mailhub.testing.fakes import ScriptedTransport
from mailhub.web.metrics import SpoolSnapshot

ROUTE = "smtp:mail.example.com:25"
OPS = "smtp:mail.ops.example:25"
HOOK = "https://hooks.example/mailhub"
SENDER = Address("sender", "outside.example")
ALICE = Address("alice", "example.com")
REFUSED = Reply(421, "4.4.1", "connection refused")
OK = Reply(250, "2.0.0", "OK")
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"

BASE = (
    '[hub]\nhostname = "mx.hub.example"\n'
    '[nodes.dallas]\nsmtp = "tcp:0"\n[nodes.losangeles]\nsmtp = "tcp:0"\n'
    '[domains."example.com"]\nroute = "smtp:mail.example.com:25"\n'
    '[domains."ops.example"]\nroute = "smtp:mail.ops.example:25"\n'
)


@implementer(IWebhookPoster)
class FakePoster:
    """Answers each POST from ``codes`` (an int, or an exception to fail with), the last one forever."""

    def __init__(self, *codes: int | Exception) -> None:
        self.codes = list(codes) or [200]
        self.posts: list[tuple[float, str, dict[str, Any]]] = []
        self.clock: Clock | None = None

    def post(self, url: str, body: bytes) -> Deferred[int]:
        at = self.clock.seconds() if self.clock else 0.0
        self.posts.append((at, url, json.loads(body)))
        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        return fail(code) if isinstance(code, Exception) else succeed(code)

    def events(self) -> list[tuple[str, str]]:
        return [(p["state"], p["alert"]) for _, _, p in self.posts]


class Hub:
    """Nodes over one memory store and one Clock; the route's server is down until told."""

    def __init__(self, alerts: str = "", poster: FakePoster | None = None, names: tuple[str, ...] = ("dallas",)) -> None:
        table = alerts if "webhooks" in alerts else f'webhooks = ["{HOOK}"]\n{alerts}'
        self.config = parse(f"{BASE}[alerts]\n{table}".encode(), "hub.toml")
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = MemorySpoolStore(self.clock)
        self.up = False
        self.transport = ScriptedTransport(lambda e, m: OK if self.up or e.route != ROUTE else REFUSED)
        self.poster = poster or FakePoster()
        self.poster.clock = self.clock
        self.spool = SpoolSnapshot(self.store, self.clock, refresh=0.0, scan_every=0.0)
        self.nodes = [self.node(name) for name in names]
        self.monitor = self.monitor_of(self.nodes)

    def node(self, name: str) -> Node:
        node = Node(name, self.config, self.store, StandardPolicy(nodes=tuple(self.config.nodes), jitter=0.0), self.clock)
        node._transports = {ROUTE: self.transport, OPS: self.transport, "smtp:mx": self.transport}
        node.engine.startService()
        return node

    def monitor_of(self, nodes: list[Node]) -> AlertMonitor:
        monitor = AlertMonitor(
            self.config, nodes, self.store, 7 * 86400.0, self.clock, poster=self.poster, spool=self.spool
        )
        monitor.startService()
        return monitor

    def send(self, recipients: tuple[Address, ...] = (ALICE,)) -> None:
        ids: list[str] = []
        self.nodes[0].receive(Envelope(SENDER, recipients, received_at=self.clock.seconds()), MESSAGE).addCallback(
            ids.append
        )
        assert ids

    def advance(self, seconds: float, step: float = 1.0) -> None:
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step


def test_a_route_going_down_and_coming_back_is_announced_once_each() -> None:
    hub = Hub("min_interval = 60\ncheck_every = 5\n")
    hub.send()
    hub.advance(5)
    assert hub.poster.events() == [("firing", f"route_down {ROUTE}")]
    [(_, url, event)] = hub.poster.posts
    assert url == HOOK
    assert event["kind"] == "route_down" and event["hub"] == "mx.hub.example" and event["node"] == "dallas"
    assert event["details"]["route"] == ROUTE and "421 4.4.1 connection refused" in event["summary"]
    hub.advance(300)  # still down, checked 60 times: nothing new
    assert len(hub.poster.posts) == 1
    hub.up = True
    hub.advance(20 * 60)  # the entry's retry (10 min) finds it up
    assert hub.poster.events() == [("firing", f"route_down {ROUTE}"), ("resolved", f"route_down {ROUTE}")]
    assert hub.poster.posts[1][2]["summary"].startswith("resolved: route")


def test_a_flapping_route_makes_no_storm() -> None:
    """Within ``min_interval`` of an announcement nothing more is said; then the state as it is, once."""
    hub = Hub("min_interval = 600\ncheck_every = 5\n")
    monitor = hub.monitor
    monitor.stopService()
    hub.send()
    states = [True, False, True, False, True, False, True]
    made: list[Any] = []
    for down in states:
        # Drive the condition directly: the engine's view of the route.
        hub.nodes[0].engine.route_down_since = (lambda route, d=down: 1.0 if d and route == ROUTE else None)  # type: ignore[method-assign]
        ensureDeferred(monitor.check()).addCallback(made.extend)
        hub.advance(60)
    assert hub.poster.events() == [("firing", f"route_down {ROUTE}")]
    hub.advance(600)
    ensureDeferred(monitor.check()).addCallback(made.extend)
    ensureDeferred(monitor.check()).addCallback(made.extend)
    # Down at the last flap: nothing to say.  Then it comes back for good.
    assert len(hub.poster.posts) == 1
    hub.nodes[0].engine.route_down_since = lambda route: None  # type: ignore[method-assign]
    ensureDeferred(monitor.check()).addCallback(made.extend)
    assert hub.poster.events()[-1] == ("resolved", f"route_down {ROUTE}")
    assert len(made) == 2


def test_a_held_reject_storm_is_announced_and_its_end_too() -> None:
    hub = Hub("min_interval = 0\ncheck_every = 5\n")
    hub.store.set_route_state(ROUTE, {"state": "rejecting", "since": 1_000_000.0, "reply": "550 5.1.1 no", "recipients": 3})
    hub.advance(5)
    assert ("firing", f"route_rejecting {ROUTE}") in hub.poster.events()
    event = [p for _, _, p in hub.poster.posts if p["kind"] == "route_rejecting"][0]
    assert "mailhub route release" in event["summary"] and event["details"]["recipients"] == 3
    hub.store.set_route_state(ROUTE, None)
    hub.advance(5)
    assert hub.poster.events()[-1] == ("resolved", f"route_rejecting {ROUTE}")


def test_spool_size_oldest_age_and_entries_close_to_expiry() -> None:
    hub = Hub(
        "min_interval = 0\ncheck_every = 60\nspool_entries_max = 2\noldest_entry_age_max = 3600\n"
        "expiry_warn_before = 86400\n"
    )
    hub.send()
    hub.send()
    hub.advance(60)
    assert hub.poster.events() == [("firing", f"route_down {ROUTE}")]
    hub.send()
    hub.advance(60)
    assert hub.poster.events()[-1] == ("firing", "spool_entries")
    assert hub.poster.posts[-1][2]["details"]["entries"] == 3
    hub.advance(3600, step=60)
    assert hub.poster.events()[-1] == ("firing", f"oldest_entry_age {ROUTE}")
    # Six days on, the first entries expire within a day.
    hub.advance(6 * 86400 - 3600 - 60, step=600)
    expiring = [p for _, _, p in hub.poster.posts if p["kind"] == "entries_expiring"]
    assert [p["state"] for p in expiring] == ["firing"]
    assert expiring[0]["details"]["count"] >= 2 and expiring[0]["details"]["route"] == ROUTE


def test_archive_entries_are_never_announced_as_expiring() -> None:
    hub = Hub("min_interval = 0\ncheck_every = 60\nexpiry_warn_before = 86400\n")
    ids: list[str] = []
    env = Envelope(SENDER, (ALICE,), received_at=hub.clock.seconds())
    hub.store.enqueue(env, MESSAGE, {"archive:local": [ALICE]}, "dallas").addCallback(ids.extend)
    assert ids
    hub.advance(6 * 86400 + 3600, step=600)
    # It never expires (the engine keeps it), so no "their senders then get a DSN".
    assert [p for _, _, p in hub.poster.posts if p["kind"] == "entries_expiring"] == []


def test_a_node_not_seen_is_announced_and_a_clean_stop_is_not() -> None:
    hub = Hub("min_interval = 0\ncheck_every = 10\nnode_unseen_after = 60\n")
    now = hub.clock.seconds()
    hub.store.heartbeat("dallas", now, {"host": "a"})
    hub.store.heartbeat("losangeles", now, {"host": "la.example"})
    hub.advance(50, step=10)
    hub.store.heartbeat("dallas", hub.clock.seconds(), {"host": "a"})
    hub.advance(20, step=10)
    assert hub.poster.events() == [("firing", "node_unseen losangeles")]
    assert "la.example" in hub.poster.posts[0][2]["summary"]
    hub.store.heartbeat("losangeles", hub.clock.seconds(), {"host": "la.example", "stopped": True})
    hub.store.heartbeat("dallas", hub.clock.seconds(), {"host": "a"})
    hub.advance(10, step=10)
    assert hub.poster.events()[-1] == ("resolved", "node_unseen losangeles")
    hub.store.heartbeat("dallas", hub.clock.seconds(), {"host": "a"})
    hub.advance(200, step=10)
    assert len(hub.poster.posts) == 2  # stopped cleanly: not unseen


def test_only_the_first_live_node_sends_the_hubs_alerts() -> None:
    hub = Hub("min_interval = 0\ncheck_every = 5\n", names=("dallas", "losangeles"))
    hub.monitor.stopService()
    dallas = hub.monitor_of([hub.nodes[0]])
    losangeles = hub.monitor_of([hub.nodes[1]])
    hub.store.heartbeat("dallas", hub.clock.seconds(), {})
    hub.store.heartbeat("losangeles", hub.clock.seconds(), {})
    hub.send()
    hub.advance(5)
    assert dallas.leading and not losangeles.leading
    assert [p["node"] for _, _, p in hub.poster.posts] == ["dallas"]
    # Dallas's process dies: once it is not seen, losangeles speaks for the hub.
    dallas.stopService()
    hub.nodes[0].engine.stopService()
    for _ in range(15):
        hub.store.heartbeat("losangeles", hub.clock.seconds(), {})
        hub.advance(5)
    assert losangeles.leading
    assert ("firing", "node_unseen dallas") in hub.poster.events()
    assert {p["node"] for _, _, p in hub.poster.posts[1:]} == {"losangeles"}


def test_a_webhook_is_retried_with_a_doubling_pause_and_not_forever() -> None:
    poster = FakePoster(500, ConnectionRefusedError("refused"), 200)
    hub = Hub("min_interval = 0\ncheck_every = 5\nwebhook_attempts = 4\n", poster)
    hub.send()
    hub.advance(20)
    started = poster.posts[0][0]
    assert [at - started for at, _, _ in poster.posts] == [0, 1, 3]
    poster = FakePoster(503)
    hub = Hub("min_interval = 0\ncheck_every = 5\nwebhook_attempts = 4\n", poster)
    with capturedLogs() as events:
        hub.send()
        hub.advance(120)
    assert len(poster.posts) == 4
    lines = [formatEvent(e) for e in events]
    assert any("not delivered to the webhook https://hooks.example/mailhub after 4 tries: HTTP 503" in line for line in lines)


def test_a_webhook_answering_400_is_not_retried() -> None:
    poster = FakePoster(400)
    hub = Hub("min_interval = 0\ncheck_every = 5\n", poster)
    hub.send()
    hub.advance(120)
    assert len(poster.posts) == 1


def test_alerts_are_mailed_to_operators_through_the_hubs_spool() -> None:
    """The alert mail is spooled like any mail: the route that is down keeps its copy, the other delivers."""
    hub = Hub(
        'webhooks = []\nmail_to = ["ops@ops.example", "admin@example.com"]\nmin_interval = 0\ncheck_every = 5\n'
    )
    hub.send()
    hub.advance(5)
    to_ops = [(e, m) for e, m in hub.transport.deliveries if e.route == OPS]
    [(entry, mail)] = to_ops
    assert entry.sender is None and entry.pending == (Address("ops", "ops.example"),)
    assert b"Subject: [mailhub mx.hub.example] FIRING: route smtp:mail.example.com:25 is DOWN" in mail
    assert b'"kind": "route_down"' in mail
    # The copy for example.com waits in the spool with that route's other mail.
    waiting = hub.store.entries(None, 0, 10).result
    assert any(e.route == ROUTE and e.sender is None for e in waiting)


def test_no_monitor_when_alerts_go_nowhere() -> None:
    config = parse(BASE.encode())
    assert not config.alerts.enabled
    assert alert_monitor(config, [object()], None, None, Clock()) is None


def test_the_real_poster_provides_the_interface() -> None:
    assert verifyObject(IWebhookPoster, TreqPoster(Clock(), 5.0))


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('webhook = ["https://h.example/"]', 'alerts.webhook: unknown key (did you mean "webhooks"?)'),
        ('webhooks = ["ftp://h.example/"]', "alerts.webhooks[0]: must be an http or https URL"),
        ('mail_to = ["ops"]', "alerts.mail_to[0]: must be an address local@domain"),
        ("min_interval = -5", "alerts.min_interval: must be 0 (off) or more"),
        ("check_every = 0", "alerts.check_every: must be greater than 0"),
        ('spool_entries_max = "many"', "alerts.spool_entries_max: must be an integer or a number"),
    ],
)
def test_a_bad_alerts_table_is_refused_naming_the_key(table: str, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(f"{BASE}[alerts]\n{table}\n".encode(), "hub.toml")
    assert f"hub.toml: {error}" in str(raised.value)


# -- a real node, a real webhook receiver ------------------------------------------


class Receiver(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    def render_POST(self, request: Any) -> bytes:
        assert request.getHeader(b"content-type") == b"application/json"
        self.events.append(json.loads(request.content.read()))
        return b"ok"


@pytest_twisted.ensureDeferred
async def test_a_real_webhook_hears_a_real_downstream_go_down_and_come_back(tmp_path: Path, downstream: Any) -> None:
    receiver = Receiver()
    site = server.Site(receiver)
    site.noisy = False
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    smtp_port = free_port()
    route = f"smtp:127.0.0.1:{downstream.port}"
    config = parse(
        (
            '[hub]\nhostname = "mx.hub.example"\n'
            "[delivery]\nmax_scan_interval = 1\nprobe_seconds = 0.2\n"
            f'[nodes.dallas]\nsmtp = "tcp:{smtp_port}:interface=127.0.0.1"\n'
            f'[domains."example.com"]\nroute = "{route}"\n'
            f'[alerts]\nwebhooks = ["http://127.0.0.1:{port.getHost().port}/hook"]\n'
            "check_every = 0.1\nmin_interval = 0\n"
        ).encode(),
        str(tmp_path / "hub.toml"),
    )
    store = MemorySpoolStore(reactor)
    policy = StandardPolicy(("dallas",), retry_seconds=0.3, jitter=0.0)
    node = Node("dallas", config, store, policy, reactor)
    monitor = alert_monitor(config, [node], store, policy, reactor)
    assert monitor is not None
    node.startService()
    monitor.startService()
    try:
        downstream.mode = "down"
        code, _ = await send(smtp_port, message("while down"))
        assert code == 250

        def fired() -> Any:
            return [e for e in receiver.events if e["kind"] == "route_down"] or None

        [event] = await eventually(fired, timeout=10, interval=0.05, what="the route_down webhook")
        assert event["state"] == "firing" and event["details"]["route"] == route
        assert "Connection refused" in event["summary"] or "refused" in event["summary"].lower()
        downstream.mode = "accept"

        def resolved() -> Any:
            return [e for e in receiver.events if e["kind"] == "route_down" and e["state"] == "resolved"] or None

        await eventually(resolved, timeout=10, interval=0.05, what="the resolved webhook")
        assert len(downstream.messages) == 1
        assert [e["state"] for e in receiver.events if e["kind"] == "route_down"] == ["firing", "resolved"]
    finally:
        await monitor.stopService()
        await node.stopService()
        await port.stopListening()

"""
``/metrics``: a real node (real SMTP and web sockets on 127.0.0.1, a real
downstream SMTP server) answers in the Prometheus text format, its figures
move as mail is accepted, refused, deferred and delivered, and only the
allowed networks or a token holder may read them.  The plain counts behind
it (``mailhub.stats``) and the spool's reads are checked against a Clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from hubprocess import eventually, free_port, message, send
from mailhub.config import ConfigError, parse
from mailhub.model import Action, Address, Decision, Entry, Outcome, Reply
from mailhub.node import Node
from mailhub.plugin import load_plugin
from mailhub.plugins.memory_store import MemorySpoolStore
from mailhub.plugins.standard_policy import StandardPolicy
from mailhub.stats import DeliveryStats, refusal_reason
from mailhub.web.metrics import SpoolSnapshot

TOKEN = "metrics-token-0123456789abcdef"
ALICE = Address("alice", "example.com")
BOB = Address("bob", "example.com")


# -- the plain counts ---------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "what", "reason"),
    [
        (Reply(550, "5.7.1", "Relaying denied"), "RCPT <x@elsewhere.example>", "relay_denied"),
        (Reply(450, "4.7.1", "Too many messages from your address"), "MAIL", "rate_limit"),
        (Reply(421, "4.7.0", "Too many connections"), "connection", "too_many_connections"),
        (Reply(421, "4.7.0", "Too many messages in this connection"), "", "too_many_messages"),
        (Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"), "", "size"),
        (Reply(500, "5.5.2", "Command not recognized"), "", "bad_command"),
        (Reply(503, "5.5.1", "Need MAIL before RCPT"), "", "bad_command"),
        (Reply(550, "5.1.1", "User unknown"), "RCPT <nobody@example.com>", "unknown_recipient"),
        (Reply(550, "5.2.1", "Mailbox disabled"), "RCPT <old@example.com>", "recipient_refused"),
        (Reply(599, "5.9.9", "odd"), "", "other"),
    ],
)
def test_refusals_have_a_reason_from_a_fixed_set(reply: Reply, what: str, reason: str) -> None:
    assert refusal_reason(reply, what) == reason


def test_an_attempt_counts_by_the_outcome_of_its_recipients() -> None:
    clock = Clock()
    clock.advance(1000)
    stats = DeliveryStats(clock)
    entry = Entry("e1", "m1", "smtp:mx:25", None, (ALICE, BOB), created=990.0)
    ok, later = Reply(250, "2.0.0", "OK"), Reply(451, "4.3.0", "later")
    delivered = Decision((Outcome(ALICE, Action.DELIVERED, ok), Outcome(BOB, Action.DELIVERED, ok)))
    mixed = Decision((Outcome(ALICE, Action.DELIVERED, ok), Outcome(BOB, Action.RETRY, later)), 2000.0)
    deferred = Decision((Outcome(ALICE, Action.RETRY, later), Outcome(BOB, Action.RETRY, later)), 2000.0)
    stats.attempt(entry, delivered, False, 1000.0)
    stats.attempt(entry, mixed, False, 1000.0)
    stats.attempt(entry, deferred, False, 1000.0)
    stats.attempt(entry, deferred, True, 1000.0)
    assert stats.attempts == {
        ("smtp:mx:25", "delivered"): 1,
        ("smtp:mx:25", "mixed"): 1,
        ("smtp:mx:25", "deferred"): 1,
        ("smtp:mx:25", "suspended"): 1,
    }
    # Latency from acceptance, for the two attempts that delivered: 10 s each, in the "le 10" bucket.
    latency = stats.latency["smtp:mx:25"]
    assert (latency.count, latency.sum) == (2, 20.0)
    assert latency.counts[latency.bounds.index(10)] == 2


def test_a_store_call_is_timed_until_it_fires_either_way() -> None:
    clock = Clock()
    stats = DeliveryStats(clock)
    d: Deferred[str] = Deferred()
    got: list[object] = []
    stats.timed("claim", d).addBoth(got.append)
    clock.advance(0.02)
    d.errback(RuntimeError("store down"))
    assert got[0].check(RuntimeError)  # type: ignore[attr-defined]
    claim = stats.store["claim"]
    assert claim.count == 1 and claim.sum == pytest.approx(0.02)
    assert claim.counts[claim.bounds.index(0.025)] == 1


class SlowStore:
    """The read side of a spool store that answers when told to, and counts its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Deferred[Any]]] = []

    def counts(self) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred()
        self.calls.append(("counts", d))
        return d

    def entries(self, filter: object, offset: int, limit: int) -> Deferred[list[Entry]]:
        d: Deferred[list[Entry]] = Deferred()
        self.calls.append(("entries", d))
        return d

    def answer(self) -> None:
        calls, self.calls = self.calls, []
        for what, d in calls:
            d.callback({"entries": 0, "held": 0, "leased": 0, "routes": {}} if what == "counts" else [])


def test_the_spool_is_read_at_most_every_refresh_seconds_and_once_at_a_time() -> None:
    clock = Clock()
    store = SlowStore()
    snapshot = SpoolSnapshot(store, clock, refresh=5.0, scan_every=30.0)
    asked: list[str] = []
    for _ in range(4):
        snapshot.ready()
        asked += [what for what, _ in store.calls]
        store.answer()
        clock.advance(2)
    # Counts at 0 and 6 (not at 2 and 4); the scan once (the next after 30 s).
    assert asked == ["counts", "entries", "counts"]
    snapshot.ready()
    snapshot.ready()
    assert [what for what, _ in store.calls] == []  # 8 s: neither is due
    clock.advance(3)
    snapshot.ready()
    snapshot.ready()
    assert [what for what, _ in store.calls] == ["counts"]  # one read, however many scrapes
    assert snapshot.up and snapshot.counts is not None


def test_a_scrape_does_not_wait_long_for_a_store_that_does_not_answer() -> None:
    clock = Clock()
    store = SlowStore()
    snapshot = SpoolSnapshot(store, clock, wait=3.0)
    answered: list[object] = []
    snapshot.ready().addCallback(answered.append)
    clock.advance(2.9)
    assert answered == []
    clock.advance(0.1)
    assert answered == [None]
    assert not snapshot.up and snapshot.counts is None


def test_metrics_allow_must_name_networks() -> None:
    base = b'[hub]\nhostname="h.example"\n[nodes.a]\nsmtp="tcp:0"\n[domains."example.com"]\nroute="smtp:mx:25"\n'
    config = parse(base + b'[web]\nmetrics_allow = ["10.1.0.0/16", "::1"]\n')
    assert config.web["metrics_allow"] == ("10.1.0.0/16", "::1/128")
    with pytest.raises(ConfigError, match=r"web.metrics_allow: '10.1.0.1/16' is not an address or a network"):
        parse(base + b'[web]\nmetrics_allow = ["10.1.0.1/16"]\n')


# -- a real node ----------------------------------------------------------------


class RunningNode:
    """One node on real sockets, over the memory store and archive, delivering to ``downstream``."""

    def __init__(self, tmp_path: Path, downstream: Any, web: str = "") -> None:
        self.smtp_port, self.web_port = free_port(), free_port()
        tokens = tmp_path / "tokens"
        tokens.write_text(f"prometheus {TOKEN}\n")
        text = (
            '[hub]\nhostname = "mx.hub.example"\n'
            f'outbound = "smtp:127.0.0.1:{downstream.port}"\n'
            '[archive]\nplugin = "memory"\n'
            "[delivery]\nmax_scan_interval = 1\n"
            f'[nodes.dallas]\nsmtp = "tcp:{self.smtp_port}:interface=127.0.0.1"\n'
            f'web = "tcp:{self.web_port}:interface=127.0.0.1"\n'
            f'[domains."example.com"]\nroute = "smtp:127.0.0.1:{downstream.port}"\n'
            f'[web]\napi_tokens_file = "{tokens}"\n{web}'
        )
        config = parse(text.encode(), str(tmp_path / "hub.toml"))
        self.route = f"smtp:127.0.0.1:{downstream.port}"
        self.store = MemorySpoolStore(reactor)
        self.archive = load_plugin("mailhub.archives", "memory").make({}, reactor)
        policy = StandardPolicy(("dallas",), retry_seconds=0.3, jitter=0.0)
        self.node = Node("dallas", config, self.store, policy, reactor, archive=self.archive)
        self.metrics = self.node.getServiceNamed("web").factory.resource.children[b"metrics"]
        # Every scrape reads the spool: the test looks right after each change.
        self.metrics.spool.refresh = 0.0
        self.metrics.spool.scan_every = 0.0
        self.node.startService()

    async def get(self, token: str | None = None) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await treq.get(f"http://127.0.0.1:{self.web_port}/metrics", headers=headers, persistent=False)
        return response.code, (await treq.content(response)).decode()

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample by (name, sorted labels), as Prometheus parses the answer."""
        code, text = await self.get(TOKEN)
        assert code == 200, text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples


@pytest.fixture
def running(tmp_path: Path, downstream: Any) -> Any:
    nodes: list[RunningNode] = []

    def start(web: str = "") -> RunningNode:
        node = RunningNode(tmp_path, downstream, web)
        nodes.append(node)
        return node

    yield start
    for n in nodes:
        pytest_twisted.blockon(n.node.stopService())


def _value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest_twisted.ensureDeferred
async def test_the_metrics_follow_mail_accepted_refused_deferred_and_delivered(running: Any, downstream: Any) -> None:
    hub = running('metrics_allow = ["192.0.2.0/24"]\n')
    route = hub.route
    before = await hub.scrape()
    assert _value(before, "mailhub_smtp_sessions_total", node="dallas") == 0
    assert _value(before, "mailhub_spool_store_up") == 1
    assert _value(before, "mailhub_archive_backlog_entries") == 0

    code, _ = await send(hub.smtp_port, message("relay"), recipients=["victim@elsewhere.example"])
    assert code == 550
    # The archive is down and the route defers: both entries stay in the spool.
    hub.archive.unavailable = True
    downstream.mode = "tempfail"
    code, _ = await send(hub.smtp_port, message("deferred"))
    assert code == 250

    async def deferred_twice() -> Any:
        s = await hub.scrape()
        return s if (_value(s, "mailhub_delivery_attempts_total", node="dallas", route=route, result="deferred") or 0) >= 2 else None

    s = await eventually(deferred_twice, timeout=10, interval=0.05, what="two deferred attempts")
    assert _value(s, "mailhub_smtp_sessions_total", node="dallas") == 2
    assert _value(s, "mailhub_smtp_accepted_messages_total", node="dallas") == 1
    assert _value(s, "mailhub_smtp_refusals_total", node="dallas", reason="relay_denied") == 1
    assert _value(s, "mailhub_spool_entries", route=route) == 1
    assert _value(s, "mailhub_archive_backlog_entries") == 1
    assert _value(s, "mailhub_spool_entries", route="archive:local") == 1
    assert _value(s, "mailhub_archive_yielding") == 0  # two messages are no burst
    assert (_value(s, "mailhub_mail_rate") or 0) <= 1
    held = _value(s, "mailhub_spool_entries_by_state", state="held")
    waiting = (_value(s, "mailhub_spool_entries_by_state", state="deferred") or 0) + (
        _value(s, "mailhub_spool_entries_by_state", state="leased") or 0
    )
    assert (held, waiting) == (0, 2)
    age = _value(s, "mailhub_spool_oldest_entry_age_seconds", route=route)
    assert age is not None and 0 <= age < 10
    assert _value(s, "mailhub_route_state", node="dallas", route=route, state="up") == 1
    assert _value(s, "mailhub_route_max_connections", node="dallas", route=route) == 10
    assert (_value(s, "mailhub_store_call_seconds_count", node="dallas", call="record") or 0) >= 2
    assert _value(s, "mailhub_delivery_latency_seconds_count", node="dallas", route=route) is None

    downstream.mode = "accept"
    hub.archive.unavailable = False

    async def delivered() -> Any:
        s = await hub.scrape()
        return s if _value(s, "mailhub_delivery_attempts_total", node="dallas", route=route, result="delivered") else None

    s = await eventually(delivered, timeout=10, interval=0.05, what="delivery")
    assert len(downstream.messages) == 1
    assert _value(s, "mailhub_delivery_latency_seconds_count", node="dallas", route=route) == 1
    latency = _value(s, "mailhub_delivery_latency_seconds_sum", node="dallas", route=route)
    assert latency is not None and 0.3 <= latency < 10  # deferred at least twice, 0.3 s apart
    assert _value(s, "mailhub_delivery_latency_seconds_bucket", node="dallas", route=route, le="+Inf") == 1
    s = await eventually(
        lambda: _archived(hub), timeout=10, interval=0.05, what="the archive's backlog archived"
    )
    assert _value(s, "mailhub_spool_entries", route=route) is None
    assert _value(s, "mailhub_spool_oldest_entry_age_seconds", route=route) is None


@pytest_twisted.ensureDeferred
async def test_entries_by_route_and_state_follow_a_hold_and_a_release(running: Any, downstream: Any) -> None:
    hub = running()
    route = hub.route
    downstream.mode = "tempfail"
    for tag in ("one", "two"):
        code, _ = await send(hub.smtp_port, message(tag))
        assert code == 250

    def states(s: Any) -> dict[str, float | None]:
        return {st: _value(s, "mailhub_spool_route_entries_by_state", route=route, state=st) for st in ("held", "leased", "deferred")}

    async def both_waiting() -> Any:
        s = await hub.scrape()
        found = states(s)
        return found if found["held"] == 0 and (found["deferred"] or 0) + (found["leased"] or 0) == 2 else None

    await eventually(both_waiting, timeout=10, interval=0.05, what="two entries deferred")
    [first, _] = await hub.store.entries(None, 0, 10)
    assert await hub.store.hold(first.id)

    async def one_held() -> Any:
        found = states(await hub.scrape())
        return found if found["held"] == 1 and (found["deferred"] or 0) + (found["leased"] or 0) == 1 else None

    await eventually(one_held, timeout=10, interval=0.05, what="one entry held")
    # A lease taken now shows as leased.
    [lease] = await hub.store.claim("elsewhere", reactor.seconds() + 3600, 10, 600.0, 0.0)
    found = states(await hub.scrape())
    assert found == {"held": 1.0, "leased": 1.0, "deferred": 0.0}
    await hub.store.release(lease, reactor.seconds())
    downstream.mode = "accept"
    assert await hub.store.release_held(first.id, reactor.seconds())


async def _archived(hub: RunningNode) -> Any:
    s = await hub.scrape()
    return s if _value(s, "mailhub_archive_backlog_entries") == 0 and _value(s, "mailhub_spool_entries", route=hub.route) is None else None


@pytest_twisted.ensureDeferred
async def test_metrics_are_refused_outside_metrics_allow_without_a_token(running: Any) -> None:
    hub = running('metrics_allow = ["192.0.2.0/24", "2001:db8::/32"]\n')
    code, text = await hub.get()
    assert code == 403 and "metrics_allow" in text and "mailhub_" not in text
    code, _ = await hub.get("not-the-token-0123456789")
    assert code == 403
    code, text = await hub.get(TOKEN)
    assert code == 200 and "mailhub_spool_entries_by_state" in text


@pytest_twisted.ensureDeferred
async def test_loopback_may_read_the_metrics_by_default(running: Any) -> None:
    hub = running()
    code, text = await hub.get()
    assert code == 200
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"mailhub_smtp_refusals", "mailhub_delivery_attempts", "mailhub_spool_store_up"} <= families


# -- the Grafana dashboard --------------------------------------------------------

DASHBOARD = Path(__file__).parent.parent / "examples" / "grafana-mailhub.json"


def _dashboard_exprs() -> list[str]:
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def test_the_grafana_dashboard_is_a_dashboard_grafana_can_import() -> None:
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for p in dashboard["panels"]:
        assert set(p["gridPos"]) == {"x", "y", "w", "h"} and p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}" and "datasource" in variables
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


@pytest_twisted.ensureDeferred
async def test_every_metric_the_dashboard_asks_for_is_in_the_exposition(running: Any) -> None:
    import re

    hub = running()
    code, text = await hub.get(TOKEN)
    assert code == 200
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}

    def exposed(name: str) -> bool:
        if types.get(name) == "gauge":
            return True
        return any(
            name == family + suffix for family, kind in types.items() for suffix in suffixes.get(kind, ())
        )

    asked = {name for expr in _dashboard_exprs() for name in re.findall(r"\bmailhub_[a-z_]+", expr)}
    assert len(asked) >= 15
    assert sorted(n for n in asked if not exposed(n)) == []


def test_trusted_proxies_must_name_networks() -> None:
    base = b'[hub]\nhostname="h.example"\n[nodes.a]\nsmtp="tcp:0"\n[domains."example.com"]\nroute="smtp:mx:25"\n'
    config = parse(base + b'[web]\ntrusted_proxies = ["127.0.0.1", "10.0.0.0/8"]\n')
    assert config.web["trusted_proxies"] == ("127.0.0.1/32", "10.0.0.0/8")
    with pytest.raises(ConfigError, match=r"web.trusted_proxies: 'proxy.example' is not an address or a network"):
        parse(base + b'[web]\ntrusted_proxies = ["proxy.example"]\n')


@pytest.mark.parametrize(("listener", "public_url", "tls"), [
    ("ssl:8443:privateKey=k.pem", "", True),
    ("tcp:8025", "https://mail.example.com", True),  # behind a TLS proxy
    ("tcp:8025", "http://mail.example.com", False),
    ("tcp:8025", "", False),
])
def test_browsers_are_on_tls_behind_an_https_public_url_too(listener: str, public_url: str, tls: bool) -> None:
    from mailhub.node import browser_tls

    assert browser_tls(listener, {"public_url": public_url} if public_url else {}) is tls

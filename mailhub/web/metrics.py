"""
``GET /metrics`` on each node's web listener: the node and the spool in the
Prometheus text format, for Prometheus and Grafana
(``examples/grafana-mailhub.json``).

Served only to clients whose address is in ``[web] metrics_allow`` (CIDRs;
by default ``127.0.0.0/8`` and ``::1``), or that send ``Authorization:
Bearer TOKEN`` with a token of ``[web] api_tokens_file``; anyone else gets
``403``.  The address is the TCP peer's: behind a proxy, use a token.

Nothing here is on the hot path.  The engine and the SMTP server keep plain
counts (``mailhub.stats``); ``NodeCollector`` turns them into metrics when
scraped, in a ``CollectorRegistry`` of the node's own (never the global
one: two nodes may share a process).  The spool is asked for its counts at
most every ``SpoolSnapshot.refresh`` seconds, and only while someone scrapes;
its oldest entries are found by reading the spool a page at a time
(``ISpoolStore.entries``), at most every ``SpoolSnapshot.scan_every`` seconds
and never more than a tenth of the time.  A scrape waits at most
``SpoolSnapshot.wait`` seconds for either, then answers with what there is.
Nodes of one process over one store share these reads.

The metrics (spool figures are hub-wide and the same on every node: use
``max``, not ``sum``, across nodes):

- ``mailhub_spool_store_up``: 1 if the spool store answered its last count.
- ``mailhub_spool_entries{route}``: entries per route.
- ``mailhub_spool_entries_by_state{state}``: ``held``, ``leased`` (being
  delivered) and ``deferred`` (waiting for an attempt: the rest).
- ``mailhub_spool_held_entries{route}``,
  ``mailhub_spool_route_entries_by_state{route,state}`` (``held``,
  ``leased``, ``deferred``; ``leased`` only from a store providing
  ``ISpoolControl``) and ``mailhub_spool_oldest_entry_age_seconds{route}``:
  from the scan.
- ``mailhub_spool_recipients``: recipients still to deliver.
- ``mailhub_archive_backlog_entries``: entries of the archive's route.
- ``mailhub_delivery_attempts_total{node,route,result}``: ``mailhub.stats.DeliveryStats``.
- ``mailhub_delivery_latency_seconds{node,route}``: from acceptance to delivery.
- ``mailhub_delivery_in_flight{node}``: attempts this node is making.
- ``mailhub_route_state{node,route,state}``: 1 for the route's state
  (``up``, ``back-pressure``, ``down``, ``rejecting``), 0 for the others.
- ``mailhub_route_window{node,route}``, ``mailhub_route_share{node,route}``,
  ``mailhub_route_max_connections{node,route}``,
  ``mailhub_route_active_attempts{node,route}``,
  ``mailhub_route_waiting_attempts{node,route}``,
  ``mailhub_route_back_pressure_total{node,route}``.
- ``mailhub_smtp_sessions_total{node}``, ``mailhub_smtp_sessions_open{node}``,
  ``mailhub_smtp_accepted_messages_total{node}``,
  ``mailhub_smtp_refusals_total{node,reason}`` (``mailhub.stats.refusal_reason``),
  ``mailhub_smtp_timeouts_total{node}``.
- ``mailhub_store_call_seconds{node,call}``: the engine's store calls.
- ``mailhub_drill_last_ok{node,domain}`` (1 or 0),
  ``mailhub_drill_last_success_timestamp{node,domain}`` (when the last
  successful drill started, Unix time) and
  ``mailhub_drill_last_duration_seconds{node,domain,step}`` (seconds from
  the start of the last drill to each step it reached): ``mailhub.drill``.
"""

from __future__ import annotations

import hmac
import ipaddress
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.web import resource, server

from mailhub.archive.route import ARCHIVE_ROUTE
from mailhub.interfaces import ISpoolControl
from mailhub.stats import Buckets
from mailhub.web.archive_api import read_tokens

__all__ = ["DEFAULT_ALLOW", "MetricsResource", "NodeCollector", "SpoolSnapshot", "metrics_resource"]

#: Who may read ``/metrics`` without a token when ``[web] metrics_allow`` is not set.
DEFAULT_ALLOW = ("127.0.0.0/8", "::1/128")

#: The states ``mailhub_route_state`` knows.
ROUTE_STATES = ("up", "back-pressure", "down", "rejecting")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SpoolSnapshot:
    """
    The spool's figures as the metrics show them, read only when scraped.

    :ivar refresh: the counts (``ISpoolStore.counts``) are read at most this
        often (seconds).
    :ivar scan_every: the least time (seconds) between two scans of the
        spool for its oldest and held entries; a scan also waits nine times
        as long as the last one took.
    :ivar wait: how long a scrape waits (seconds) for a read under way.
    """

    log = Logger()
    _shared: weakref.WeakValueDictionary[int, SpoolSnapshot] = weakref.WeakValueDictionary()

    #: Entries read per page while scanning.
    PAGE = 1000

    def __init__(self, store: Any, clock: Any, refresh: float = 5.0, scan_every: float = 30.0, wait: float = 3.0) -> None:
        self._store = store
        self._clock = clock
        self.refresh = refresh
        self.scan_every = scan_every
        self.wait = wait
        #: The last counts the store gave, or ``None``.
        self.counts: dict[str, Any] | None = None
        #: Whether the store answered the last time it was asked.
        self.up = False
        #: Per route, the acceptance time of its oldest entry, and its held entries: the last scan's.
        self.oldest: dict[str, float] = {}
        self.held: dict[str, int] = {}
        #: Entries at least this old (seconds since accepted) are counted per
        #: route in ``aged`` by each scan (``mailhub.alerts``: close to expiry).
        self.aged_after: float | None = None
        self.aged: dict[str, int] = {}
        #: Per route, its entries by state (``held``, ``leased``, ``deferred``): the last scan's.
        self.states: dict[str, dict[str, int]] = {}
        self._reading: Deferred[None] | None = None
        self._scanning: Deferred[None] | None = None
        self._read_started = float("-inf")
        self._scan_next = float("-inf")
        self._failing = False

    @classmethod
    def shared(cls, store: Any, clock: Any) -> SpoolSnapshot:
        """The snapshot of ``store`` for this process: nodes over one store share it."""
        snapshot = cls._shared.get(id(store))
        if snapshot is None or snapshot._store is not store:
            snapshot = cls._shared[id(store)] = cls(store, clock)
        return snapshot

    def ready(self) -> Deferred[None]:
        """
        Start the reads that are due, and wait for those under way.

        :returns: a Deferred that fires once no read is under way, or after
            ``wait`` seconds; it never fails.
        """
        now = self._clock.seconds()
        if self._reading is None and now - self._read_started >= self.refresh:
            self._read_started = now
            self._reading = self._start(self._read(), "_reading")
        if self._scanning is None and now >= self._scan_next:
            self._scan_next = float("inf")  # set when the scan ends
            self._scanning = self._start(self._scan(now), "_scanning")
        work = [d for d in (self._reading, self._scanning) if d is not None]
        if not work:
            return succeed(None)
        answer: Deferred[None] = Deferred()

        def fire(_: object = None) -> None:
            if not answer.called:
                answer.callback(None)

        timer = self._clock.callLater(self.wait, fire)
        DeferredList(work, consumeErrors=True).addBoth(fire)
        return answer.addBoth(lambda _: timer.cancel() if timer.active() else None)

    def _start(self, coroutine: Any, attribute: str) -> Deferred[None] | None:
        d: Deferred[None] = ensureDeferred(coroutine)
        if d.called:
            return None  # done already (a store that answers at once)

        def done(result: object) -> object:
            setattr(self, attribute, None)
            return result

        return d.addBoth(done)

    async def _read(self) -> None:
        try:
            counts = await self._store.counts()
        except Exception as e:
            if not self._failing:
                self.log.warn("metrics: the spool store did not give its counts: {why}", why=str(e) or repr(e))
            self._failing = True
            self.up = False
            return
        self._failing = False
        self.counts = counts
        self.up = True

    async def _scan(self, started: float) -> None:
        oldest: dict[str, float] = {}
        held: dict[str, int] = {}
        aged: dict[str, int] = {}
        aged_before = float("-inf") if self.aged_after is None else started - self.aged_after
        states: dict[str, dict[str, int]] = {}
        seen: set[str] = set()
        offset = 0
        complete = False
        try:
            control = ISpoolControl(self._store, None)
            leased: set[str] = set() if control is None else await control.leased_entries(started)
            while True:
                page = await self._store.entries(None, offset, self.PAGE)
                for e in page:
                    # The spool moves while it is read a page at a time: an
                    # entry may come twice.
                    if e.id in seen:
                        continue
                    seen.add(e.id)
                    if e.created < oldest.get(e.route, float("inf")):
                        oldest[e.route] = e.created
                    if e.held:
                        held[e.route] = held.get(e.route, 0) + 1
                    if e.created <= aged_before:
                        aged[e.route] = aged.get(e.route, 0) + 1
                    state = "held" if e.held else "leased" if e.id in leased else "deferred"
                    counts = states.setdefault(e.route, {"held": 0, "leased": 0, "deferred": 0})
                    counts[state] += 1
                if len(page) < self.PAGE:
                    break
                offset += len(page)
            complete = True
        except Exception as e:
            self.log.debug("metrics: scan of the spool failed: {why}", why=str(e))
        finally:
            took = self._clock.seconds() - started
            self._scan_next = started + max(self.scan_every, 10 * took)
        if complete:
            self.oldest, self.held, self.aged, self.states = oldest, held, aged, states


class NodeCollector:
    """
    A ``prometheus_client`` collector of one node's metrics (see the
    module's docstring), made from its counts when scraped.

    :param node: the ``mailhub.node.Node``.
    :param spool: the hub's ``SpoolSnapshot``.
    :param clock: ``IReactorTime``, for ages.
    """

    def __init__(self, node: Any, spool: SpoolSnapshot, clock: Any) -> None:
        self._node = node
        self._spool = spool
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        yield from self._spool_metrics()
        yield from self._delivery_metrics()
        yield from self._route_metrics()
        yield from self._smtp_metrics()
        yield from self._drill_metrics()

    def _spool_metrics(self) -> Iterator[Metric]:
        spool = self._spool
        yield GaugeMetricFamily(
            "mailhub_spool_store_up", "Whether the spool store answered its last count (1) or not (0).",
            value=1 if spool.up else 0,
        )
        counts = spool.counts
        if counts is None:
            return
        routes: Mapping[str, int] = counts.get("routes", {})
        entries = GaugeMetricFamily("mailhub_spool_entries", "Spool entries per route (hub-wide).", labels=["route"])
        for route, n in sorted(routes.items()):
            entries.add_metric([route], n)
        yield entries
        total, held, leased = int(counts.get("entries", 0)), int(counts.get("held", 0)), int(counts.get("leased", 0))
        states = GaugeMetricFamily(
            "mailhub_spool_entries_by_state",
            "Spool entries held, leased (being delivered) and deferred (waiting for an attempt), hub-wide.",
            labels=["state"],
        )
        states.add_metric(["held"], held)
        states.add_metric(["leased"], leased)
        states.add_metric(["deferred"], max(0, total - held - leased))
        yield states
        yield GaugeMetricFamily(
            "mailhub_spool_recipients", "Recipients still to deliver (hub-wide).", value=int(counts.get("recipients", 0))
        )
        if self._node.archive is not None:
            yield GaugeMetricFamily(
                "mailhub_archive_backlog_entries",
                "Spool entries waiting to be archived (the route archive:local).",
                value=routes.get(ARCHIVE_ROUTE, 0),
            )
            gate = getattr(self._node, "archive_gate", None)
            if gate is not None:
                yield GaugeMetricFamily(
                    "mailhub_archive_yielding",
                    "1 while the archive yields to the mail ([archive] yield_above): its entries are put off.",
                    value=1 if gate.yielding else 0,
                )
                yield GaugeMetricFamily(
                    "mailhub_mail_rate", "Messages this process accepted or delivered over the last second.", value=gate.meter.rate()
                )
        now = self._clock.seconds()
        oldest = GaugeMetricFamily(
            "mailhub_spool_oldest_entry_age_seconds",
            "Age of the oldest spool entry per route, since the message was accepted (hub-wide).",
            labels=["route"],
        )
        held_by_route = GaugeMetricFamily(
            "mailhub_spool_held_entries", "Held spool entries per route (hub-wide).", labels=["route"]
        )
        by_state = GaugeMetricFamily(
            "mailhub_spool_route_entries_by_state",
            "Spool entries per route held, leased (being delivered) and deferred (hub-wide).",
            labels=["route", "state"],
        )
        for route, created in sorted(spool.oldest.items()):
            # The scan is older than the counts: a route emptied since has no oldest entry.
            if routes.get(route):
                oldest.add_metric([route], max(0.0, now - created))
                held_by_route.add_metric([route], spool.held.get(route, 0))
                for name, n in sorted(spool.states.get(route, {}).items()):
                    by_state.add_metric([route, name], n)
        yield oldest
        yield held_by_route
        yield by_state

    def _delivery_metrics(self) -> Iterator[Metric]:
        node = self._node.name
        engine = self._node.engine
        stats = engine.stats
        attempts = CounterMetricFamily(
            "mailhub_delivery_attempts",
            "Delivery attempts by result: delivered, deferred, failed, expired, held, mixed,"
            " suspended (route down: not tried), yielded (archive put off under a burst), lease_lost.",
            labels=["node", "route", "result"],
        )
        for (route, result), n in sorted(stats.attempts.items()):
            attempts.add_metric([node, route, result], n)
        yield attempts
        latency = HistogramMetricFamily(
            "mailhub_delivery_latency_seconds",
            "From the acceptance of a message to its delivery, per route.",
            labels=["node", "route"],
        )
        for route, buckets in sorted(stats.latency.items()):
            latency.add_metric([node, route], _cumulative(buckets), buckets.sum)
        yield latency
        store = HistogramMetricFamily(
            "mailhub_store_call_seconds", "Latency of the delivery engine's spool store calls.", labels=["node", "call"]
        )
        for call, buckets in sorted(stats.store.items()):
            store.add_metric([node, call], _cumulative(buckets), buckets.sum)
        yield store
        yield _gauge("mailhub_delivery_in_flight", "Entries this node is attempting (leased).", node, engine.in_flight)

    def _route_metrics(self) -> Iterator[Metric]:
        node = self._node.name
        status = self._node.engine.status()
        routes: dict[str, dict[str, Any]] = status["routes"]
        states = {route: t.get("state", "up") for route, t in routes.items()}
        for route, s in status["route_states"].items():
            # What another node said of a route this one has not used.
            states.setdefault(route, s.get("state", "down"))
        state = GaugeMetricFamily(
            "mailhub_route_state",
            "1 for the route's state as this node sees it (up, back-pressure, down, rejecting), 0 for the others.",
            labels=["node", "route", "state"],
        )
        for route, now in sorted(states.items()):
            for name in ROUTE_STATES:
                state.add_metric([node, route, name], 1 if now == name else 0)
        yield state
        figures = (
            ("window", "mailhub_route_window", "The route's connection window on this node (slow start, back pressure)."),
            ("share", "mailhub_route_share", "This node's share of the hub-wide connections of the route."),
            ("max_connections", "mailhub_route_max_connections", "The route's hub-wide connection limit."),
            ("active", "mailhub_route_active_attempts", "Attempts on the route running on this node."),
            ("waiting", "mailhub_route_waiting_attempts", "Attempts on the route waiting for a connection on this node."),
        )
        for key, name, text in figures:
            family = GaugeMetricFamily(name, text, labels=["node", "route"])
            for route, t in sorted(routes.items()):
                family.add_metric([node, route], float(t.get(key) or 0))
            yield family
        pressure = CounterMetricFamily(
            "mailhub_route_back_pressure",
            "Replies from the route's server saying it had too many connections.",
            labels=["node", "route"],
        )
        for route, t in sorted(routes.items()):
            pressure.add_metric([node, route], int(t.get("back_pressure") or 0))
        yield pressure

    def _smtp_metrics(self) -> Iterator[Metric]:
        node = self._node.name
        limiter = self._node.smtp_factory.limiter
        stats = limiter.stats
        yield _counter("mailhub_smtp_sessions", "SMTP sessions admitted.", node, stats.sessions)
        yield _gauge("mailhub_smtp_sessions_open", "SMTP sessions open now.", node, limiter.connections)
        yield _counter("mailhub_smtp_accepted_messages", "Messages accepted (250 after DATA).", node, stats.accepted)
        yield _counter("mailhub_smtp_timeouts", "SMTP sessions ended for idling (421 4.4.2).", node, stats.timeouts)
        refusals = CounterMetricFamily(
            "mailhub_smtp_refusals",
            "SMTP replies of 400 and above, by reason (relay_denied, rate_limit, too_many_connections, size, ...).",
            labels=["node", "reason"],
        )
        for reason, n in sorted(stats.refusals.items()):
            refusals.add_metric([node, reason], n)
        yield refusals


    def _drill_metrics(self) -> Iterator[Metric]:
        drills = getattr(self._node, "drills", None)
        if drills is None or not drills.last:
            return
        node = self._node.name
        ok = GaugeMetricFamily("mailhub_drill_last_ok", "Whether the last drill of the domain succeeded (1) or not (0).",
                               labels=["node", "domain"])
        success = GaugeMetricFamily("mailhub_drill_last_success_timestamp",
                                    "When the last successful drill of the domain started (Unix time).",
                                    labels=["node", "domain"])
        duration = GaugeMetricFamily("mailhub_drill_last_duration_seconds",
                                     "Seconds from the start of the domain's last drill to each step it reached.",
                                     labels=["node", "domain", "step"])
        for domain, result in sorted(drills.last.items()):
            ok.add_metric([node, domain], 1 if result.ok else 0)
            if domain in drills.last_success:
                success.add_metric([node, domain], drills.last_success[domain])
            for step in result.steps:
                if step.ok and step.seconds is not None:
                    duration.add_metric([node, domain, step.name], step.seconds)
        yield ok
        yield success
        yield duration


def _gauge(name: str, text: str, node: str, value: float) -> Metric:
    family = GaugeMetricFamily(name, text, labels=["node"])
    family.add_metric([node], value)
    return family


def _counter(name: str, text: str, node: str, value: float) -> Metric:
    family = CounterMetricFamily(name, text, labels=["node"])
    family.add_metric([node], value)
    return family


def _cumulative(buckets: Buckets) -> list[tuple[str, float]]:
    """A histogram's buckets as Prometheus counts them: cumulative, up to ``+Inf``."""
    found: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip((*buckets.bounds, float("inf")), buckets.counts, strict=True):
        total += n
        found.append((floatToGoString(bound), total))
    return found


class MetricsResource(resource.Resource):
    """
    ``/metrics``: the registry's metrics in the format the client asks for
    (Prometheus text, or OpenMetrics), to whom may read them.

    :param registry: the node's ``CollectorRegistry``.
    :param spool: its collector's ``SpoolSnapshot``, read before answering.
    :param allow: the networks served without a token.
    :param tokens: ``{token: name}`` (``mailhub.web.archive_api.read_tokens``).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self, registry: CollectorRegistry, spool: SpoolSnapshot, allow: Sequence[Network], tokens: Mapping[str, str]
    ) -> None:
        super().__init__()
        self.registry = registry
        self.spool = spool
        self._allow = tuple(allow)
        self._tokens = dict(tokens)

    def render_GET(self, request: Any) -> Any:
        if not self.permitted(request):
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            return (
                b"403 Forbidden: /metrics is served to the networks of [web] metrics_allow,"
                b" or with 'Authorization: Bearer TOKEN' and a token of [web] api_tokens_file\n"
            )
        ensureDeferred(self._answer(request))
        return server.NOT_DONE_YET

    def permitted(self, request: Any) -> bool:
        """Whether the client's address is allowed, or it gave a valid token."""
        host = getattr(request.getClientAddress(), "host", None)
        if host:
            try:
                address = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                pass
            else:
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                    address = address.ipv4_mapped
                if any(address in network for network in self._allow):
                    return True
        return self._token_ok(request)

    def _token_ok(self, request: Any) -> bool:
        # As the archive API checks its tokens (mailhub.web.archive_api).
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        given_bytes = given.strip().encode("latin-1")
        return any(hmac.compare_digest(token.encode(), given_bytes) for token in self._tokens)

    async def _answer(self, request: Any) -> None:
        code, content_type, body = 200, "", b""
        try:
            await self.spool.ready()
            accept = (request.getHeader(b"accept") or b"").decode("latin-1")
            encode, content_type = choose_encoder(accept)
            body = encode(self.registry)
        except Exception:
            self.log.failure("metrics: /metrics failed")
            code, content_type, body = 500, "text/plain; charset=utf-8", b"500 internal error\n"
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-store")
        request.write(body)
        request.finish()


def metrics_resource(node: Any, config: Any, clock: Any) -> MetricsResource:
    """
    The ``/metrics`` of ``node``, as ``config``'s ``[web]`` table says.

    :raises ValueError: naming the file and key, if ``[web]
        api_tokens_file`` cannot be read.
    """
    web: Mapping[str, Any] = config.web or {}
    tokens: dict[str, str] = {}
    if web.get("api_tokens_file"):
        try:
            tokens = read_tokens(web["api_tokens_file"])
        except (OSError, ValueError) as e:
            raise ValueError(f"{config.path}: web.api_tokens_file: {e}") from None
    allow = [ipaddress.ip_network(n) for n in web.get("metrics_allow", DEFAULT_ALLOW)]
    spool = SpoolSnapshot.shared(node.store, clock)
    registry = CollectorRegistry()
    registry.register(NodeCollector(node, spool, clock))
    return MetricsResource(registry, spool, allow, tokens)

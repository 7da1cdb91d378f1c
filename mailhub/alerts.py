"""
Alerts to operators (``[alerts]``): a route going down and coming back, a
held reject storm, the spool's size or its oldest entry's age above a
threshold, a node not seen, entries close to expiry.

Every ``check_every`` seconds the hub's ``AlertMonitor`` looks at what its
nodes' engines know of their routes (the hub-wide route states included),
at the spool (``mailhub.web.metrics.SpoolSnapshot``, shared with
``/metrics``) and at the node registry, and compares each alert's condition
with what it last announced.  Only a change is announced: ``firing`` when a
condition starts, ``resolved`` when it ends, and for one alert key (``route_down
smtp:mail.example.com:25``) at most one announcement per ``min_interval``: a
route that flaps is announced in its state when the interval has passed, not
at each flap.

An announcement is POSTed as JSON to each of ``webhooks`` (treq; retried
with a doubling pause up to ``webhook_attempts`` times, then logged and
dropped) and mailed to ``mail_to`` through the hub's own spool: a message
from the null sender, injected like any accepted mail (``Node.receive``),
so it is archived, retried and paced like the rest.  An operator address on
a route that is down waits in the spool with the other mail of that route:
give one address on another route (another domain, or a domain outside the
hub's, through ``[hub] outbound``) to hear of your own server's outage.

One process sends the hub's alerts: the one running the first node by name
among the nodes alive in the registry (``INodeRegistry``; a store without
one, or one that cannot be read: every process).  When that node stops or dies, the next takes over and
announces the conditions it finds, once.  Time comes from the reactor given.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from mailhub.archive.route import is_archive_route
from mailhub.config import AlertsConfig, HubConfig
from mailhub.interfaces import INodeRegistry
from mailhub.model import Address, Envelope
from mailhub.web.metrics import SpoolSnapshot

__all__ = ["Alert", "AlertMonitor", "IWebhookPoster", "TreqPoster", "alert_monitor"]

#: The longest pause (seconds) between two tries of one webhook.
MAX_BACKOFF = 300.0


@frozen
class Alert:
    """
    A condition that holds now.

    :ivar key: what the alert is about, unique: ``kind`` and its subject
        (``"route_down smtp:mail.example.com:25"``).
    :ivar kind: ``route_down``, ``route_rejecting``, ``spool_entries``,
        ``oldest_entry_age``, ``entries_expiring``, ``node_unseen``.
    :ivar summary: one line for people.
    :ivar details: JSON-encodable facts (``route``, ``since``, ``count``, ...).
    """

    key: str
    kind: str
    summary: str
    details: Mapping[str, Any]


class IWebhookPoster(Interface):
    """Sends one webhook request (a plugin point for tests: the real one is ``TreqPoster``)."""

    def post(url, body):
        """
        POST ``body`` (JSON bytes) to ``url``.

        :returns: a ``Deferred`` firing with the HTTP status code, or
            failing if no answer came (refused, timed out, ...).
        """


@implementer(IWebhookPoster)
class TreqPoster:
    """
    ``IWebhookPoster`` over treq, on the given reactor.

    :param timeout: seconds a request may take before it counts as failed.
    """

    def __init__(self, reactor: Any, timeout: float) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        self._reactor = reactor
        self._timeout = timeout
        self._client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    def post(self, url: str, body: bytes) -> Deferred[int]:
        from treq import content
        from twisted.web.http_headers import Headers

        d = self._client.post(url, data=body, headers=Headers({b"Content-Type": [b"application/json"]}))

        def answered(response: Any) -> Deferred[int]:
            # Read (and drop) the body: the connection is done with then.
            return content(response).addCallback(lambda _: int(response.code))

        d.addCallback(answered)
        return d.addTimeout(self._timeout, self._reactor)


class AlertMonitor(Service):
    """
    Watches the hub from this process and announces changes (see the
    module's docstring).

    :param config: the hub's configuration (``[alerts]``, ``hostname``).
    :param nodes: this process's ``Node`` objects; the first running one
        by name speaks for the process and injects the alert mails.
    :param store: the hub's spool store.
    :param lifetime: the policy's entry lifetime (seconds), for
        ``entries_expiring``; ``None``: not checked.
    :param reactor: ``IReactorTime`` (a ``Clock`` in tests).
    :param poster: the ``IWebhookPoster`` (default: ``TreqPoster``).
    :param spool: the ``SpoolSnapshot`` to read (default: the store's shared one).
    """

    log = Logger()

    def __init__(
        self,
        config: HubConfig,
        nodes: Sequence[Any],
        store: Any,
        lifetime: float | None,
        reactor: Any,
        poster: Any = None,
        spool: SpoolSnapshot | None = None,
    ) -> None:
        self.setName("alerts")
        self._config = config
        self._settings: AlertsConfig = config.alerts
        self._nodes = sorted(nodes, key=lambda n: str(n.name))
        self._store = store
        self._lifetime = lifetime
        self._clock = reactor
        self._poster = poster if poster is not None else TreqPoster(reactor, self._settings.webhook_timeout)
        self._spool = spool if spool is not None else SpoolSnapshot.shared(store, reactor)
        if lifetime is not None and self._settings.expiry_warn_before:
            self._spool.aged_after = max(0.0, lifetime - self._settings.expiry_warn_before)
        #: Per alert key: whether it was last announced firing, and when.
        self._announced: dict[str, tuple[bool, float]] = {}
        #: The alerts last announced firing, for their ``resolved``.
        self._firing: dict[str, Alert] = {}
        self._loop: LoopingCall | None = None
        self._checking: Deferred[Any] | None = None
        self._sending: set[Deferred[Any]] = set()
        #: Whether this process sent the hub's alerts at the last check.
        self.leading = False

    # -- service -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._settings.check_every, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for d in list(self._sending):
            d.cancel()
        checking = self._checking
        if checking is not None:
            return checking.addBoth(lambda _: None)
        return succeed(None)

    def _tick(self) -> None:
        if self._checking is not None:
            return  # the last check is still reading the store
        d: Deferred[Any] = ensureDeferred(self.check())
        self._checking = d

        def done(_: object) -> None:
            self._checking = None

        d.addErrback(lambda f: self.log.failure("alerts: check failed", f)).addBoth(done)

    # -- what holds now --------------------------------------------------------

    async def check(self) -> list[dict[str, Any]]:
        """
        Look at the hub once and announce what changed.

        :returns: the announcements made (the JSON objects sent), for tests.
        """
        now = self._clock.seconds()
        registry = await self._registry(now)
        self.leading = self._leads(registry, now)
        if not self.leading:
            return []
        current: dict[str, Alert] = {}
        for alert in self._route_alerts():
            current[alert.key] = alert
        for alert in await self._spool_alerts(now):
            current[alert.key] = alert
        for alert in self._node_alerts(registry, now):
            current[alert.key] = alert
        return self._announce(current, now)

    async def _registry(self, now: float) -> list[dict[str, Any]] | None:
        registry = INodeRegistry(self._store, None)
        if registry is None:
            return None
        try:
            nodes: list[dict[str, Any]] = await registry.nodes(now)
        except Exception as e:
            self.log.debug("alerts: node registry not read: {why}", why=str(e))
            return None
        return nodes

    def _alive(self, node: Mapping[str, Any], now: float) -> bool:
        seen = node.get("last_seen")
        info = node.get("info") or {}
        limit = self._settings.node_unseen_after or 3 * self._config.delivery.heartbeat_seconds
        return isinstance(seen, int | float) and now - seen <= limit and not info.get("stopped")

    def _leads(self, registry: list[dict[str, Any]] | None, now: float) -> bool:
        """Whether this process sends the hub's alerts: it runs the first live node by name."""
        mine = {str(n.name) for n in self._nodes if n.engine.running}
        if not mine:
            return False
        if registry is None:
            return True
        nodes = self._config.nodes
        alive = {str(n["name"]) for n in registry if str(n["name"]) in nodes and self._alive(n, now)} | mine
        return min(alive) in mine

    def _route_alerts(self) -> list[Alert]:
        down: dict[str, dict[str, Any]] = {}
        rejecting: dict[str, dict[str, Any]] = {}
        for node in self._nodes:
            engine = node.engine
            status = engine.status()
            routes = set(status["routes"]) | set(status["route_states"])
            for route in routes:
                state = status["route_states"].get(route) or {}
                if state.get("state") == "rejecting":
                    rejecting.setdefault(route, dict(state, seen_by=str(node.name)))
                    continue
                since = engine.route_down_since(route)
                if since is not None:
                    t = status["routes"].get(route) or {}
                    reply = t.get("last_reply") or state.get("reply")
                    down.setdefault(route, {"since": since, "last_reply": reply, "seen_by": str(node.name)})
        alerts = []
        for route, d in sorted(down.items()):
            alerts.append(Alert(
                f"route_down {route}", "route_down",
                f"route {route} is DOWN since {_utc(d['since'])} (last reply: {d['last_reply']});"
                " its mail waits in the spool",
                {"route": route, **d},
            ))
        for route, state in sorted(rejecting.items()):
            alerts.append(Alert(
                f"route_rejecting {route}", "route_rejecting",
                f"route {route} is REJECTING every recipient since {_utc(state.get('since'))}"
                f" ({state.get('reply')}): its entries are held, no DSN is sent;"
                f" 'mailhub route release {route}' or 'mailhub route confirm {route}'",
                {"route": route, "since": state.get("since"), "reply": state.get("reply"),
                 "recipients": state.get("recipients"), "seen_by": state.get("seen_by")},
            ))
        return alerts

    async def _spool_alerts(self, now: float) -> list[Alert]:
        s = self._settings
        spool = self._spool
        await spool.ready()
        counts = spool.counts
        if counts is None or not spool.up:
            return []
        alerts = []
        entries = int(counts.get("entries", 0))
        if s.spool_entries_max and entries > s.spool_entries_max:
            alerts.append(Alert(
                "spool_entries", "spool_entries",
                f"the spool holds {entries} entries (more than spool_entries_max = {s.spool_entries_max})",
                {"entries": entries, "max": s.spool_entries_max, "routes": dict(counts.get("routes", {}))},
            ))
        routes: Mapping[str, int] = counts.get("routes", {})
        for route, created in sorted(spool.oldest.items()):
            if not routes.get(route):
                continue  # emptied since the scan
            age = now - created
            if s.oldest_entry_age_max and age > s.oldest_entry_age_max:
                alerts.append(Alert(
                    f"oldest_entry_age {route}", "oldest_entry_age",
                    f"the oldest entry of route {route} was accepted {_duration(age)} ago"
                    f" (more than oldest_entry_age_max = {_duration(s.oldest_entry_age_max)})",
                    {"route": route, "age": round(age, 1), "max": s.oldest_entry_age_max},
                ))
            # An archive entry never expires (DeliveryEngine._archive_kept): its age is oldest_entry_age's.
            if self._lifetime is not None and s.expiry_warn_before and spool.aged.get(route) and not is_archive_route(route):
                left = created + self._lifetime - now
                alerts.append(Alert(
                    f"entries_expiring {route}", "entries_expiring",
                    f"{spool.aged[route]} entries of route {route} expire within"
                    f" {_duration(s.expiry_warn_before)} (the first in {_duration(max(0.0, left))}):"
                    " their senders then get a DSN and the hub stops trying",
                    {"route": route, "count": spool.aged[route], "first_expires": created + self._lifetime},
                ))
        return alerts

    def _node_alerts(self, registry: list[dict[str, Any]] | None, now: float) -> list[Alert]:
        after = self._settings.node_unseen_after
        if registry is None or not after:
            return []
        alerts = []
        here = {str(n.name) for n in self._nodes if n.engine.running}
        for n in registry:
            name = str(n.get("name"))
            seen = n.get("last_seen")
            info = n.get("info") or {}
            if name not in self._config.nodes or name in here:
                continue  # a node of another configuration, or running here (its heartbeat may lag)
            if not isinstance(seen, int | float) or info.get("stopped"):
                continue  # never seen, or stopped cleanly
            if now - seen > after:
                alerts.append(Alert(
                    f"node_unseen {name}", "node_unseen",
                    f"node {name} ({info.get('host', '?')}) has not been seen since {_utc(seen)}"
                    f" ({_duration(now - seen)}); the other nodes take over its entries",
                    {"node": name, "last_seen": seen, "host": info.get("host"), "leased": n.get("leased", 0)},
                ))
        return alerts

    # -- announcing --------------------------------------------------------------

    def _announce(self, current: Mapping[str, Alert], now: float) -> list[dict[str, Any]]:
        made = []
        for key in sorted(set(current) | set(self._firing)):
            firing = key in current
            was, at = self._announced.get(key, (False, float("-inf")))
            if firing == was:
                if firing:
                    self._firing[key] = current[key]  # the latest figures, for the resolved one
                continue
            if now - at < self._settings.min_interval:
                continue  # announced lately: the state as it is then, once the interval is over
            alert = current[key] if firing else self._firing.pop(key)
            if firing:
                self._firing[key] = alert
            self._announced[key] = (firing, now)
            made.append(self._send(alert, "firing" if firing else "resolved", now))
        return made

    def _send(self, alert: Alert, state: str, now: float) -> dict[str, Any]:
        sender = str(self._speaker().name)
        event = {
            "hub": self._config.hostname,
            "node": sender,
            "alert": alert.key,
            "kind": alert.kind,
            "state": state,
            "at": _utc(now),
            "time": now,
            "summary": alert.summary if state == "firing" else f"resolved: {alert.summary}",
            "details": dict(alert.details),
        }
        self.log.info(
            "alert {state}: {summary}", state=state.upper(), summary=alert.summary, alert=alert.key
        )
        body = json.dumps(event, sort_keys=True).encode()
        for url in self._settings.webhooks:
            self._track(ensureDeferred(self._post(url, body, alert.key)), cancel=True)
        if self._settings.mail_to:
            # Not cancelled at stop: the spool's write is under way or done.
            self._track(ensureDeferred(self._mail(event)), cancel=False)
        return event

    def _speaker(self) -> Any:
        """The node that speaks for this process: the first one running."""
        return next((n for n in self._nodes if n.engine.running), self._nodes[0])

    def _track(self, d: Deferred[Any], cancel: bool) -> None:
        if cancel:
            self._sending.add(d)

        def failed(f: Failure) -> None:
            if not f.check(CancelledError):  # cancelled: the monitor stopped
                self.log.failure("alerts: sending failed", f)

        d.addErrback(failed)
        d.addBoth(lambda _: self._sending.discard(d))

    async def _post(self, url: str, body: bytes, key: str) -> None:
        attempts = self._settings.webhook_attempts
        why = ""
        for attempt in range(1, attempts + 1):
            try:
                code = await self._poster.post(url, body)
            except CancelledError:
                raise
            except Exception as e:
                why = str(e) or repr(e)
            else:
                if 200 <= code < 300:
                    return
                why = f"HTTP {code}"
                if 400 <= code < 500 and code not in (408, 429):
                    break  # the request is wrong: the same again will not do
            if attempt < attempts:
                await deferLater(self._clock, min(MAX_BACKOFF, 2.0 ** (attempt - 1)), lambda: None)
        self.log.error(
            "alert {alert} not delivered to the webhook {url} after {tries} tries: {why}",
            alert=key, url=_safe_url(url), tries=attempt, why=why,
        )

    async def _mail(self, event: Mapping[str, Any]) -> None:
        node = self._speaker()
        recipients = tuple(Address.parse(a) for a in self._settings.mail_to)
        envelope = Envelope(None, recipients, received_at=self._clock.seconds(), helo=self._config.hostname)
        try:
            await node.receive(envelope, alert_mail(self._config, event))
        except Exception as e:
            self.log.error(
                "alert {alert} not mailed to {to}: the spool did not take it ({why})",
                alert=event["alert"], to=", ".join(self._settings.mail_to), why=str(e) or repr(e),
            )


def alert_mail(config: HubConfig, event: Mapping[str, Any]) -> bytes:
    """The alert mail for ``event``: plain text, the summary and the JSON of the webhooks."""
    sender = config.alerts.mail_from or f"mailhub@{config.hostname}"
    state = str(event["state"]).upper()
    subject = f"[mailhub {config.hostname}] {state}: {event['summary']}"
    subject = " ".join(subject.split())[:250]
    lines = [
        f"From: mailhub alerts <{sender}>",
        f"To: {', '.join(f'<{a}>' for a in config.alerts.mail_to)}",
        f"Subject: {subject}",
        f"Date: {format_datetime(datetime.fromtimestamp(float(event['time']), UTC))}",
        f"Message-ID: <{uuid.uuid4().hex}@{config.hostname}>",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"{state}: {event['summary']}",
        "",
        f"hub {event['hub']}, sent by node {event['node']} at {event['at']}",
        "",
        json.dumps(event, indent=2, sort_keys=True, ensure_ascii=False),
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


def alert_monitor(
    config: HubConfig, nodes: Sequence[Any], store: Any, policy: Any, reactor: Any
) -> AlertMonitor | None:
    """The hub's ``AlertMonitor`` for this process, or ``None`` when ``[alerts]`` sends nowhere."""
    if not config.alerts.enabled or not nodes:
        return None
    return AlertMonitor(config, nodes, store, getattr(policy, "lifetime", None), reactor)


def _utc(when: Any) -> str:
    if not isinstance(when, int | float):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _safe_url(url: str) -> str:
    """A webhook's URL for the log: no user, password, query or fragment (they may hold a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


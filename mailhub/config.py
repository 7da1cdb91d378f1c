"""
The hub's configuration: a TOML file read into attrs objects.

Every error names the file, the key and what is wrong with it, and all errors
of a file are reported together, so an operator fixes a config in one pass.
The core's tables are checked strictly: a key the core does not know is an
error, with the closest known key suggested.  The tables of plugins
(``[store]``, ``[archive]``, ``[policy]``) and a route's target and options
are checked by the plugins themselves (``mailhub.plugin``: ``config_keys``,
``check_config``), with errors in the same form.
This module reads one file and does no other I/O.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import asdict, evolve, field, fields, frozen

from mailhub.model import (
    ROUTE_BACKPRESSURE_PAUSE,
    ROUTE_MAX_CONNECTIONS,
    Address,
    AddressError,
    Route,
)
from mailhub.plugin import PluginNotFound, check_plugin_config, declared_keys, load_plugin

__all__ = ["AlertsConfig", "ConfigError", "DomainConfig", "DrillsConfig", "HubConfig", "NodeConfig", "SmtpConfig", "load", "parse"]


class ConfigError(Exception):
    """
    The configuration is wrong.  ``errors`` lists ``(key, message)`` pairs;
    ``str()`` gives one line per error, each starting with the file name.
    """

    def __init__(self, path: str, errors: list[tuple[str, str]]) -> None:
        self.path = path
        self.errors = errors
        super().__init__("\n".join(f"{path}: {key}: {msg}" for key, msg in errors))


@frozen
class NodeConfig:
    name: str
    smtp: str
    web: str | None = None


@frozen
class DomainConfig:
    """
    A ``[domains."..."]`` table.  Its defaults are the route's, for the whole
    hub: ``route_options`` passes them on, so that the node and the transport
    need none of their own.
    """

    name: str
    route: str
    max_connections: int = ROUTE_MAX_CONNECTIONS
    options: Mapping[str, Any] = field(factory=dict)


@frozen
class SmtpConfig:
    """Limits of the SMTP listener (``[smtp]``)."""

    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 1000
    max_line_length: int = 2048
    max_data_line_length: int = 10000
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    bare_line_endings: str = "reject"
    nul_bytes: str = "reject"
    banner: str = ""
    # STARTTLS: absolute paths of PEM files; both empty means the node uses a
    # self-signed pair it generates on first start (mailhub.smtp.tls).
    tls_certificate: str = ""
    tls_key: str = ""
    require_tls: bool = False
    max_connections: int = 500
    max_connections_per_ip: int = 20
    max_messages_per_connection: int = 100
    max_messages_per_minute_per_ip: int = 600
    max_header_size: int = 102400
    # DATA may take at most this long in all, however steadily the client trickles.
    data_total_timeout: float = 1800.0


@frozen
class DeliveryConfig:
    """How nodes claim and pace work (``[delivery]``)."""

    lease_seconds: float = 600.0
    takeover_seconds: float = 300.0
    batch: int = 100
    max_scan_interval: float = 60.0
    flush_on_recovery: bool = True
    # While a route is down, at most one real attempt this often; the rest
    # are deferred without connecting.
    probe_seconds: float = 30.0
    # Each node says it is alive this often; ``mailhub nodes`` calls a node
    # DOWN after three heartbeats missed.
    heartbeat_seconds: float = 10.0
    # How often a node renews its shares of routes' connections and reads
    # the routes' hub-wide states.
    share_seconds: float = 1.0
    # A route that was down or deferring and then rejects this many distinct
    # recipients (5xx to every recipient of an attempt) within the window is
    # REJECTING: its entries are held, no DSN is sent.  0 turns it off.
    reject_storm_recipients: int = 3
    reject_storm_window: float = 600.0
    # Seconds after acceptance before the sender of an entry still not
    # delivered gets one "delayed" DSN (mailhub.delivery.delay); 0: none.
    # A domain's own ``warn_after`` overrides it.
    warn_after: float = 4 * 3600.0


@frozen
class AlertsConfig:
    """
    Alerts to operators (``[alerts]``, ``mailhub.alerts``): where they go and
    when a condition is worth one.  Times in seconds; a threshold of 0 is off.
    """

    webhooks: tuple[str, ...] = ()
    mail_to: tuple[str, ...] = ()
    mail_from: str = ""
    check_every: float = 30.0
    min_interval: float = 900.0
    spool_entries_max: int = 0
    oldest_entry_age_max: float = 0.0
    expiry_warn_before: float = 86400.0
    node_unseen_after: float = 60.0
    webhook_attempts: int = 5
    webhook_timeout: float = 10.0

    @property
    def enabled(self) -> bool:
        """Whether alerts go anywhere."""
        return bool(self.webhooks or self.mail_to)


@frozen
class DrillsConfig:
    """
    Scheduled drills (``[drills]``, ``mailhub.drill``): each node sends a
    probe through itself to each domain every ``every`` seconds (0: never).

    :ivar domains: the domains drilled (empty: every domain of the hub).
    :ivar to: the local part of the probe's recipient in each drilled
        domain (``"postmaster"``: ``postmaster@DOMAIN``).
    :ivar timeout: seconds a drill waits for each probe to be delivered.
    """

    every: float = 0.0
    domains: tuple[str, ...] = ()
    to: str = "postmaster"
    timeout: float = 120.0


@frozen
class HubConfig:
    path: str
    hostname: str
    outbound: str
    smtp: SmtpConfig
    delivery: DeliveryConfig
    store: Mapping[str, Any]
    archive: Mapping[str, Any] | None
    policy: Mapping[str, Any]
    nodes: Mapping[str, NodeConfig]
    domains: Mapping[str, DomainConfig]
    #: ``[web]``: ``api_tokens_file`` (absolute), for the JSON API;
    #: ``secret_file``, the LiveArchive's session key; ``public_url`` (no
    #: trailing ``/``), where the links in the LiveArchive's mail point;
    #: ``metrics_allow``, the networks (``"127.0.0.0/8"``) served ``/metrics``.
    web: Mapping[str, Any] = {}
    alerts: AlertsConfig = AlertsConfig()
    drills: DrillsConfig = DrillsConfig()

    @property
    def config_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def plugin_section(self, name: str) -> dict[str, Any]:
        """A ``[store]``/``[archive]``/``[policy]`` table as a plugin's ``make`` takes it."""
        section: Mapping[str, Any] | None = getattr(self, name)
        result = dict(section or {})
        result["config_dir"] = self.config_dir
        if name == "policy":
            result["nodes"] = list(self.nodes)
        return result

    def route_for(self, domain: str) -> str | None:
        d = self.domains.get(domain.lower())
        return d.route if d else None

    def route_options(self, route: str) -> dict[str, Any]:
        """Options of the first domain using ``route`` (the transport's config)."""
        for d in self.domains.values():
            if d.route == route:
                return {"max_connections": d.max_connections, **d.options}
        return {"max_connections": fields(DomainConfig).max_connections.default}

    #: Archive writes in flight for the whole hub (``[archive] max_connections``):
    #: the worker's writer commits them together.
    ARCHIVE_MAX_CONNECTIONS = 64

    def pacing(self, route: str) -> tuple[int, float, float | None]:
        """A route's ``(max_connections, backpressure_pause, max_rate)``, for the whole hub."""
        if route.startswith("archive:"):
            return int((self.archive or {}).get("max_connections", self.ARCHIVE_MAX_CONNECTIONS)), ROUTE_BACKPRESSURE_PAUSE, None
        options = self.route_options(route)
        rate = options.get("max_rate")
        return (
            int(options["max_connections"]),
            float(options.get("backpressure_pause", ROUTE_BACKPRESSURE_PAUSE)),
            float(rate) if rate else None,
        )

    #: The ``[archive]`` keys the core reads; the rest is the plugin's.
    ARCHIVE_KEYS = (
        "plugin", "retention_days", "max_connections", "expire_every_minutes", "processes", "nice",
        "yield_above", "max_lag",
    )

    #: ``[archive] yield_above``: messages a second a process accepts or
    #: delivers above which archive entries are put off (``mailhub.archive.route.ArchiveGate``; 0: never).
    ARCHIVE_YIELD_ABOVE = 50.0
    #: ``[archive] max_lag``: seconds after which a message is archived however busy the front door is.
    ARCHIVE_MAX_LAG = 120.0

    def archive_yield(self) -> tuple[float, float]:
        """``([archive] yield_above, max_lag)``: when the archive yields to the front door (``ArchiveGate``)."""
        archive = self.archive or {}
        return (
            float(archive.get("yield_above", self.ARCHIVE_YIELD_ABOVE)),
            float(archive.get("max_lag", self.ARCHIVE_MAX_LAG)),
        )

    def archive_retention_days(self, domain: str) -> float:
        """Days the archive keeps ``domain``'s mail: the domain's ``archive_retention_days``, else ``[archive] retention_days`` (30)."""
        d = self.domains.get(domain.lower())
        if d is not None and "archive_retention_days" in d.options:
            return float(d.options["archive_retention_days"])
        return float((self.archive or {}).get("retention_days", 30))

    def archive_section(self) -> dict[str, Any]:
        """The ``[archive]`` table as the plugin's ``make`` takes it: its own keys and ``config_dir``."""
        section = {k: v for k, v in (self.archive or {}).items() if k not in self.ARCHIVE_KEYS}
        section["config_dir"] = self.config_dir
        return section

    def node_names(self) -> list[str]:
        return list(self.nodes)


_TOP = {"hub", "smtp", "delivery", "store", "archive", "policy", "nodes", "domains", "web", "alerts", "drills"}


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[tuple[str, str]] = []

    def err(self, key: str, msg: str) -> None:
        self.errors.append((key, msg))

    def unknown(self, table: Mapping[str, Any], prefix: str, known: Iterable[str], what: str = "key") -> None:
        """An error for each key of ``table`` not in ``known``, with the closest known key suggested."""
        names = sorted(set(known))
        for key in table:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f'did you mean "{close[0]}"?' if close else f"known: {', '.join(names)}"
                self.err(_key(prefix, key), f"unknown {what} ({hint})")

    def table(self, data: Mapping[str, Any], key: str, required: bool = False) -> dict[str, Any]:
        value = data.get(key.rsplit(".", 1)[-1])
        if value is None:
            if required:
                self.err(key, "missing table")
            return {}
        if not isinstance(value, dict):
            self.err(key, f"must be a table, not {type(value).__name__}")
            return {}
        return value

    def get(self, table: Mapping[str, Any], prefix: str, key: str, kind: type | tuple[type, ...],
            default: Any = None, required: bool = False, positive: bool = False) -> Any:
        full = f"{prefix}.{key}"
        if key not in table:
            if required:
                self.err(full, "missing")
            return default
        value: Any = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.err(full, f"must be {_kind_name(kinds)}, not a boolean")
            return default
        if not isinstance(value, kinds):
            self.err(full, f"must be {_kind_name(kinds)}, not {type(value).__name__} {value!r}")
            return default
        number: Any = value
        if positive and number <= 0:
            self.err(full, f"must be greater than 0, not {value!r}")
            return default
        return value


def _key(prefix: str, key: str) -> str:
    """``key`` of the table ``prefix`` as TOML writes it: ``smtp.banner``, ``domains."example.com"``."""
    name = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
    return f"{prefix}.{name}" if prefix else name


def _fields(cls: type) -> tuple[str, ...]:
    """The keys of a table read into the attrs class ``cls``: its field names."""
    return tuple(f.name for f in fields(cls))


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def load(path: str, endpoints: bool = True) -> HubConfig:
    """
    Read and check a configuration file.

    :param endpoints: check where the hub listens and connects too: the
        nodes' endpoint strings, and each route's target and domain table, by
        the route's transport (Twisted's parser and the transports: importing
        them costs a command-line tool that listens on nothing, like
        ``mailhub queue``, a third of its run).  The plugins' own tables
        (``[store]``, ``[archive]``, ``[policy]``) are checked either way.
    :raises ConfigError: listing every problem, each with the file and key.
    """
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, [("(file)", f"cannot read: {e.strerror}")])
    return parse(text, path, endpoints)


def parse(text: bytes, path: str = "<config>", endpoints: bool = True) -> HubConfig:
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(path, [("(file)", f"not UTF-8: {e}")])
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [("(file)", f"not valid TOML: {e}")])
    r = _Reader(path)
    r.unknown(data, "", _TOP, "table")

    hub = r.table(data, "hub", required=True)
    r.unknown(hub, "hub", ("hostname", "outbound"))
    hostname = r.get(hub, "hub", "hostname", str, required=True) or "localhost"
    outbound = r.get(hub, "hub", "outbound", str, default="smtp:mx")
    _check_route(r, "hub.outbound", outbound)

    s = r.table(data, "smtp")
    r.unknown(s, "smtp", _fields(SmtpConfig))
    num = (int, float)
    smtp = SmtpConfig(
        max_message_size=r.get(s, "smtp", "max_message_size", int, SmtpConfig().max_message_size, positive=True),
        max_recipients=r.get(s, "smtp", "max_recipients", int, 1000, positive=True),
        max_line_length=r.get(s, "smtp", "max_line_length", int, 2048, positive=True),
        max_data_line_length=r.get(s, "smtp", "max_data_line_length", int, 10000, positive=True),
        idle_timeout=float(r.get(s, "smtp", "idle_timeout", num, 300.0, positive=True)),
        data_timeout=float(r.get(s, "smtp", "data_timeout", num, 600.0, positive=True)),
        bare_line_endings=r.get(s, "smtp", "bare_line_endings", str, "reject"),
        nul_bytes=r.get(s, "smtp", "nul_bytes", str, "reject"),
        banner=r.get(s, "smtp", "banner", str, ""),
    )
    if smtp.bare_line_endings not in ("reject", "normalise"):
        r.err("smtp.bare_line_endings", f"must be 'reject' or 'normalise', not {smtp.bare_line_endings!r}")
    if smtp.nul_bytes not in ("reject", "remove"):
        r.err("smtp.nul_bytes", f"must be 'reject' or 'remove', not {smtp.nul_bytes!r}")
    smtp = _smtp_security(r, s, smtp, os.path.dirname(os.path.abspath(path)))

    dv = r.table(data, "delivery")
    r.unknown(dv, "delivery", _fields(DeliveryConfig))
    dd = DeliveryConfig()
    delivery = DeliveryConfig(
        lease_seconds=float(r.get(dv, "delivery", "lease_seconds", num, dd.lease_seconds, positive=True)),
        takeover_seconds=float(r.get(dv, "delivery", "takeover_seconds", num, dd.takeover_seconds, positive=True)),
        batch=r.get(dv, "delivery", "batch", int, dd.batch, positive=True),
        max_scan_interval=float(r.get(dv, "delivery", "max_scan_interval", num, dd.max_scan_interval, positive=True)),
        flush_on_recovery=r.get(dv, "delivery", "flush_on_recovery", bool, dd.flush_on_recovery),
        probe_seconds=float(r.get(dv, "delivery", "probe_seconds", num, dd.probe_seconds, positive=True)),
        heartbeat_seconds=float(r.get(dv, "delivery", "heartbeat_seconds", num, dd.heartbeat_seconds, positive=True)),
        share_seconds=float(r.get(dv, "delivery", "share_seconds", num, dd.share_seconds, positive=True)),
        reject_storm_recipients=r.get(dv, "delivery", "reject_storm_recipients", int, dd.reject_storm_recipients),
        reject_storm_window=float(
            r.get(dv, "delivery", "reject_storm_window", num, dd.reject_storm_window, positive=True)
        ),
    )
    if "warn_after" in dv:
        delivery = evolve(delivery, warn_after=_warn_after(r, "delivery.warn_after", dv["warn_after"]))
    if delivery.reject_storm_recipients < 0:
        r.err("delivery.reject_storm_recipients", "must be 0 (off) or more")

    store = r.table(data, "store") or {"plugin": "sqlite", "path": "var/spool.db"}
    if not isinstance(store.get("plugin", "sqlite"), str):
        r.err("store.plugin", "must be a string")
    store = {"plugin": "sqlite", **store}
    archive = r.table(data, "archive") or None
    if archive is not None:
        if not isinstance(archive.get("plugin"), str):
            r.err("archive.plugin", "must name an archive plugin (sqlite, postgresql, ...)")
        r.get(archive, "archive", "retention_days", num, positive=True)
        r.get(archive, "archive", "max_connections", int, positive=True)
        r.get(archive, "archive", "expire_every_minutes", num, positive=True)
        r.get(archive, "archive", "processes", int)
        if archive.get("processes", 0) not in (0, 1) and isinstance(archive.get("processes"), int):
            r.err("archive.processes", "must be 1 (archive in a worker process) or 0 (in the hub's own)")
        r.get(archive, "archive", "nice", int)
        yield_above = r.get(archive, "archive", "yield_above", num)
        if isinstance(yield_above, (int, float)) and yield_above < 0:
            r.err("archive.yield_above", "must be 0 (never yield) or more messages a second")
        r.get(archive, "archive", "max_lag", num, positive=True)
        if isinstance(archive.get("nice"), int) and not 0 <= archive["nice"] <= 19:
            r.err("archive.nice", "must be between 0 and 19")
    # The rest of these three tables is their plugins' to check (_check_plugins).
    policy = {"plugin": "standard", **r.table(data, "policy")}
    if not isinstance(policy["plugin"], str):
        r.err("policy.plugin", "must be a string")

    nodes: dict[str, NodeConfig] = {}
    for name, n in r.table(data, "nodes", required=True).items():
        prefix = f"nodes.{name}"
        if not isinstance(n, dict):
            r.err(prefix, "must be a table")
            continue
        r.unknown(n, prefix, ("smtp", "web"))
        smtp_ep = r.get(n, prefix, "smtp", str, required=True)
        web_ep = r.get(n, prefix, "web", str)
        for key, ep in (("smtp", smtp_ep), ("web", web_ep)):
            if ep is not None and endpoints:
                _check_endpoint(r, f"{prefix}.{key}", ep)
        if smtp_ep is not None:
            nodes[name] = NodeConfig(name, smtp_ep, web_ep)
    if "nodes" in data and not data.get("nodes"):
        r.err("nodes", "at least one node is needed")

    domains: dict[str, DomainConfig] = {}
    for name, d in r.table(data, "domains", required=True).items():
        prefix = _domain_prefix(name)
        if not isinstance(d, dict):
            r.err(prefix, "must be a table")
            continue
        route = r.get(d, prefix, "route", str, required=True)
        if route is not None:
            _check_route(r, f"{prefix}.route", route)
        maxc = r.get(d, prefix, "max_connections", int, fields(DomainConfig).max_connections.default, positive=True)
        if "backpressure_pause" in d:
            r.get(d, prefix, "backpressure_pause", (int, float), positive=True)
        if "max_rate" in d:
            r.get(d, prefix, "max_rate", (int, float), positive=True)
        if "warn_after" in d:
            _warn_after(r, f"{prefix}.warn_after", d["warn_after"])
        if "archive_retention_days" in d:
            r.get(d, prefix, "archive_retention_days", (int, float), positive=True)
        options = {k: v for k, v in d.items() if k not in ("route", "max_connections")}
        options = _recipient_options(r, prefix, route, options, os.path.dirname(os.path.abspath(path)))
        options = _route_tls_options(r, prefix, options, os.path.dirname(os.path.abspath(path)))
        if route is not None:
            domains[name.lower()] = DomainConfig(name.lower(), route, maxc, options)
    if "domains" in data and not data.get("domains"):
        r.err("domains", "at least one domain is needed")

    web = dict(r.table(data, "web"))
    r.unknown(web, "web", ("api_tokens_file", "metrics_allow", "public_url", "secret_file", "trusted_proxies"))
    r.get(web, "web", "secret_file", str)
    public_url = r.get(web, "web", "public_url", str)
    if public_url is not None:
        if _public_url_ok(public_url):
            web["public_url"] = public_url.rstrip("/")
        else:
            r.err(
                "web.public_url",
                "must be the LiveArchive's address as people reach it, like https://mail.example.com"
                f" (http or https, a host in ASCII, perhaps a port and a path; no query, fragment, user or spaces), not {public_url!r}",
            )
    tokens = r.get(web, "web", "api_tokens_file", str)
    if tokens is not None:
        web["api_tokens_file"] = os.path.join(os.path.dirname(os.path.abspath(path)), tokens)
    allow = r.get(web, "web", "metrics_allow", list)
    if allow is not None:
        web["metrics_allow"] = _networks(r, "web.metrics_allow", allow)
    proxies = r.get(web, "web", "trusted_proxies", list)
    if proxies is not None:
        web["trusted_proxies"] = _networks(r, "web.trusted_proxies", proxies)

    config = HubConfig(
        path=path, hostname=hostname, outbound=outbound, smtp=smtp, delivery=delivery,
        store=store, archive=archive, policy=policy, nodes=nodes, domains=domains, web=web,
        alerts=_alerts(r, r.table(data, "alerts")),
        drills=_drills(r, r.table(data, "drills"), domains),
    )
    _check_plugins(r, data, config, routes=endpoints)
    if r.errors:
        raise ConfigError(path, r.errors)
    return config


def _networks(r: _Reader, key: str, values: list[Any]) -> tuple[str, ...]:
    """Addresses or networks in CIDR form, each as ``ipaddress`` writes it; an error for each that is not one."""
    found = []
    for value in values:
        try:
            if not isinstance(value, str):
                raise ValueError("not a string")
            found.append(str(ipaddress.ip_network(value.strip())))
        except ValueError as e:
            r.err(key, f"{value!r} is not an address or a network like \"192.0.2.0/24\" or \"2001:db8::/32\" ({e})")
    return tuple(found)


def _alerts(r: _Reader, a: Mapping[str, Any]) -> AlertsConfig:
    """The ``[alerts]`` table, checked strictly."""
    r.unknown(a, "alerts", _fields(AlertsConfig))
    num = (int, float)
    d = AlertsConfig()
    webhooks = []
    for i, url in enumerate(r.get(a, "alerts", "webhooks", list, [])):
        if isinstance(url, str) and _webhook_ok(url):
            webhooks.append(url)
        else:
            r.err(f"alerts.webhooks[{i}]", f"must be an http or https URL (\"https://hooks.example/mailhub\"), not {url!r}")
    mail_to = []
    for i, address in enumerate(r.get(a, "alerts", "mail_to", list, [])):
        try:
            if not isinstance(address, str):
                raise AddressError("not a string")
            mail_to.append(str(Address.parse(address.strip())))
        except AddressError as e:
            r.err(f"alerts.mail_to[{i}]", f"must be an address local@domain, not {address!r} ({e})")
    mail_from = r.get(a, "alerts", "mail_from", str, "")
    if mail_from:
        try:
            mail_from = str(Address.parse(mail_from.strip()))
        except AddressError as e:
            r.err("alerts.mail_from", f"must be an address local@domain, not {mail_from!r} ({e})")

    def at_least_zero(key: str, default: float) -> float:
        value = r.get(a, "alerts", key, num, default)
        if value < 0:
            r.err(f"alerts.{key}", f"must be 0 (off) or more, not {value!r}")
            return default
        return float(value)

    return AlertsConfig(
        webhooks=tuple(webhooks),
        mail_to=tuple(mail_to),
        mail_from=mail_from,
        check_every=float(r.get(a, "alerts", "check_every", num, d.check_every, positive=True)),
        min_interval=at_least_zero("min_interval", d.min_interval),
        spool_entries_max=int(at_least_zero("spool_entries_max", d.spool_entries_max)),
        oldest_entry_age_max=at_least_zero("oldest_entry_age_max", d.oldest_entry_age_max),
        expiry_warn_before=at_least_zero("expiry_warn_before", d.expiry_warn_before),
        node_unseen_after=at_least_zero("node_unseen_after", d.node_unseen_after),
        webhook_attempts=r.get(a, "alerts", "webhook_attempts", int, d.webhook_attempts, positive=True),
        webhook_timeout=float(r.get(a, "alerts", "webhook_timeout", num, d.webhook_timeout, positive=True)),
    )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(r: _Reader, key: str, value: Any, default: float) -> float:
    """Seconds, as a number or as text with a unit (``"90s"``, ``"30m"``, ``"1h"``, ``"1d"``)."""
    if value is None:
        return default
    m = _DURATION.match(value) if isinstance(value, str) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if m is not None:
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    r.err(key, f"must be seconds, or a number with s, m, h or d (\"1h\", \"30m\"), not {value!r}")
    return default


def _drills(r: _Reader, t: Mapping[str, Any], domains: Mapping[str, DomainConfig]) -> DrillsConfig:
    """The ``[drills]`` table, checked strictly: its domains must be the hub's."""
    r.unknown(t, "drills", _fields(DrillsConfig))
    d = DrillsConfig()
    every = _duration(r, "drills.every", t.get("every"), d.every)
    timeout = _duration(r, "drills.timeout", t.get("timeout"), d.timeout)
    if "timeout" in t and timeout <= 0:
        r.err("drills.timeout", f"must be greater than 0, not {t['timeout']!r}")
        timeout = d.timeout
    names = []
    for i, name in enumerate(r.get(t, "drills", "domains", list, [])):
        if not isinstance(name, str) or name.lower() not in domains:
            r.err(f"drills.domains[{i}]", f"must be a domain of [domains] ({', '.join(domains) or 'none'}), not {name!r}")
        else:
            names.append(name.lower())
    to = r.get(t, "drills", "to", str, d.to).strip()
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+", to):
        # A local part: each domain's own mailbox gets its domain's probe.
        r.err("drills.to", f"must be a local part, like \"postmaster\" (each drilled domain's), not {to!r}")
        to = d.to
    return DrillsConfig(every=every, domains=tuple(names), to=to, timeout=timeout)


def _webhook_ok(text: str) -> bool:
    """Whether an ``[alerts] webhooks`` item is a URL to POST to: http or https, a host, no spaces."""
    try:
        parsed = urllib.parse.urlsplit(text)
        parsed.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.hostname) and all(32 < ord(c) < 127 for c in text)


def _warn_after(r: _Reader, key: str, value: Any) -> float:
    """A ``warn_after``: seconds (``0`` or ``false``: no delay notice)."""
    if value is False:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        r.err(key, f"must be a number of seconds (14400 for 4 hours), or 0 or false for no delay notice, not {value!r}")
        return 0.0
    return float(value)


def _public_url_ok(text: str) -> bool:
    """Whether ``[web] public_url`` is a base the links in mail can start with."""
    try:
        parsed = urllib.parse.urlsplit(text)
        parsed.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return False
    return (
        parsed.scheme in ("http", "https") and bool(parsed.hostname) and not parsed.query
        and not parsed.fragment and parsed.username is None and all(32 < ord(c) < 127 for c in text)
    )


def _smtp_security(r: _Reader, s: Mapping[str, Any], smtp: SmtpConfig, base: str) -> SmtpConfig:
    """The ``[smtp]`` keys of STARTTLS and of the per-client limits."""
    num = (int, float)
    defaults = SmtpConfig()
    cert = r.get(s, "smtp", "tls_certificate", str, "")
    key = r.get(s, "smtp", "tls_key", str, "")
    if bool(cert) != bool(key):
        missing = "smtp.tls_key" if cert else "smtp.tls_certificate"
        r.err(missing, "tls_certificate and tls_key must be given together (or neither: self-signed)")
    return evolve(
        smtp,
        tls_certificate=os.path.join(base, cert) if cert else "",
        tls_key=os.path.join(base, key) if key else "",
        require_tls=r.get(s, "smtp", "require_tls", bool, False),
        max_connections=r.get(s, "smtp", "max_connections", int, defaults.max_connections, positive=True),
        max_connections_per_ip=r.get(
            s, "smtp", "max_connections_per_ip", int, defaults.max_connections_per_ip, positive=True
        ),
        max_messages_per_connection=r.get(
            s, "smtp", "max_messages_per_connection", int, defaults.max_messages_per_connection,
            positive=True,
        ),
        max_messages_per_minute_per_ip=r.get(
            s, "smtp", "max_messages_per_minute_per_ip", int, defaults.max_messages_per_minute_per_ip,
            positive=True,
        ),
        max_header_size=r.get(s, "smtp", "max_header_size", int, defaults.max_header_size, positive=True),
        data_total_timeout=float(
            r.get(s, "smtp", "data_total_timeout", num, defaults.data_total_timeout, positive=True)
        ),
    )


VERIFY_UNREACHABLE = ("accept", "tempfail")


def _recipient_options(
    r: _Reader, prefix: str, route: str | None, options: dict[str, Any], base: str
) -> dict[str, Any]:
    """
    Check a domain's recipient-validation keys; ``recipients_file`` is made
    absolute (relative to the config file's directory).
    """
    num = (int, float)
    recipients = r.get(options, prefix, "recipients", list)
    if recipients is not None:
        for i, item in enumerate(recipients):
            if not isinstance(item, str) or "@" not in item:
                r.err(f"{prefix}.recipients[{i}]", f"must be an address local@domain, not {item!r}")
    rfile = r.get(options, prefix, "recipients_file", str)
    if rfile is not None:
        options["recipients_file"] = os.path.join(base, rfile)
    verify = r.get(options, prefix, "verify", str, "none")
    if verify not in ("none", "route"):
        r.err(f"{prefix}.verify", f"must be 'route' or 'none', not {verify!r}")
    elif verify == "route" and route is not None:
        try:
            parsed = Route.parse(route)
        except ValueError:
            pass
        else:
            host, sep, port = parsed.target.rpartition(":")
            if parsed.transport != "smtp" or not sep or not host or not port.isdigit():
                r.err(f"{prefix}.verify", f"'route' needs a route 'smtp:host:port', not {route!r}")
    for key in ("verify_positive_seconds", "verify_negative_seconds", "verify_timeout"):
        r.get(options, prefix, key, num, positive=True)
    unreachable = r.get(options, prefix, "verify_unreachable", str, "tempfail")
    if unreachable not in VERIFY_UNREACHABLE:
        r.err(f"{prefix}.verify_unreachable", f"must be 'accept' or 'tempfail', not {unreachable!r}")
    return options


def _route_tls_options(r: _Reader, prefix: str, options: dict[str, Any], base: str) -> dict[str, Any]:
    """
    Make a domain's ``tls_ca_file`` absolute (relative to the config file's
    directory) and check that it exists.  The transport checks its TLS keys
    (``check_config``): the modes and their defaults are its own.
    """
    ca_file = options.get("tls_ca_file")
    if isinstance(ca_file, str) and ca_file:
        options["tls_ca_file"] = os.path.join(base, ca_file)
        if not os.path.isfile(options["tls_ca_file"]):
            r.err(f"{prefix}.tls_ca_file", f"no such file: {options['tls_ca_file']}")
    return options


#: The keys of a ``[domains."..."]`` table that the core reads; the others
#: are the route's transport's (its ``config_keys``).
DOMAIN_KEYS = (
    "route", "max_connections", "max_rate", "backpressure_pause", "archive_retention_days",
    "recipients", "recipients_file", "verify", "verify_positive_seconds", "verify_negative_seconds",
    "verify_unreachable", "verify_timeout", "warn_after",
)


def _domain_prefix(name: str) -> str:
    return f'domains."{name}"' if "." in name else f"domains.{name}"


def _check_plugins(r: _Reader, data: Mapping[str, Any], config: HubConfig, routes: bool) -> None:
    """
    Have each plugin check its own table (``mailhub.plugin``): unknown keys
    against the core's and the plugin's ``config_keys``, values with its
    ``check_config``, given what its ``make`` would get.  With ``routes``,
    each route's transport checks the route's target and the rest of its
    domain's table too.
    """
    found: dict[tuple[str, str], Any] = {}

    def plugin(group: str, name: str, key: str) -> Any:
        if (group, name) not in found:
            try:
                found[group, name] = load_plugin(group, name)
            except PluginNotFound as e:
                found[group, name] = e
        if isinstance(found[group, name], PluginNotFound):
            r.err(key, str(found[group, name]))
            return None
        return found[group, name]

    def check(
        factory: Any, prefix: str, table: Mapping[str, Any] | None, core: Iterable[str],
        section: Mapping[str, Any], rename: Mapping[str, str],
    ) -> None:
        keys = declared_keys(factory)
        if table is not None and keys is not None:
            r.unknown(table, prefix, (*core, *keys))
        problem = check_plugin_config(factory, section, prefix)
        if problem is not None:
            key, what = problem
            error = ((rename.get(key) or _key(prefix, key)) if key else prefix, what)
            if error not in r.errors:
                r.err(*error)

    for table, group, core in (
        ("store", "mailhub.stores", ("plugin",)),
        ("archive", "mailhub.archives", HubConfig.ARCHIVE_KEYS),
        ("policy", "mailhub.policies", ("plugin",)),
    ):
        given: Mapping[str, Any] | None = getattr(config, table)
        if given is None or not isinstance(given.get("plugin"), str):
            continue
        factory = plugin(group, given["plugin"], f"{table}.plugin")
        if factory is not None:
            section = config.archive_section() if table == "archive" else config.plugin_section(table)
            check(factory, table, given, core, section, {})
    if not routes:
        return
    # The target is the transport's to parse; the hub's name is the core's.
    to_hub = {"hostname": "hub.hostname"}
    try:
        outbound = Route.parse(config.outbound)
    except ValueError:
        pass  # already said
    else:
        factory = plugin("mailhub.transports", outbound.transport, "hub.outbound")
        if factory is not None:
            # Only the target: a domain's options are checked with its domain.
            section = {
                "max_connections": fields(DomainConfig).max_connections.default,
                "target": outbound.target, "hostname": config.hostname,
            }
            check(factory, "hub.outbound", None, (), section, {**to_hub, "target": "hub.outbound"})
    tables = data.get("domains")
    for name, table in (tables if isinstance(tables, dict) else {}).items():
        domain = config.domains.get(name.lower())
        if domain is None or not isinstance(table, dict):
            continue
        try:
            route = Route.parse(domain.route)
        except ValueError:
            continue  # already said
        prefix = _domain_prefix(name)
        factory = plugin("mailhub.transports", route.transport, f"{prefix}.route")
        if factory is not None:
            section = {
                "max_connections": domain.max_connections, **domain.options,
                "target": route.target, "hostname": config.hostname,
            }
            check(factory, prefix, table, DOMAIN_KEYS, section, {**to_hub, "target": f"{prefix}.route"})


def _check_route(r: _Reader, key: str, route: str) -> None:
    try:
        Route.parse(route)
    except ValueError as e:
        r.err(key, str(e))


def _check_endpoint(r: _Reader, key: str, description: str) -> None:
    from twisted.internet.endpoints import _parseServer  # type: ignore[attr-defined]

    if key.endswith(".web") and description.startswith("ssl:") and "privatekey=" not in description.lower():
        # The node's own certificate (mailhub.node._web_endpoint), made at
        # start: Twisted's parser would look for server.pem.  Port and
        # interface are checked as for tcp.
        description = "tcp:" + description[4:]
    try:
        _parseServer(description, None)
    except Exception as e:  # noqa: BLE001 - any parse error is the operator's to see
        r.err(key, f"not a Twisted endpoint string ({e}): {description!r}")


def _toml(value: Any) -> str:
    """A value as TOML writes it, so the resolved configuration can be reused."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_shown(k, v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


#: Words in a key whose value ``describe`` does not print (passwords, tokens,
#: an ``Authorization`` header of the ``http`` transport).
_SECRET_WORDS = ("password", "secret", "token", "authorization", "cookie", "api_key", "apikey")


def _shown(key: Any, value: Any) -> str:
    """``value`` as TOML, or ``"(hidden)"`` when ``key`` names a secret."""
    if isinstance(key, str) and any(w in key.lower() for w in _SECRET_WORDS) and not key.endswith("_file"):
        return '"(hidden)"'
    return _toml(value)


def describe(config: HubConfig) -> str:
    """The resolved configuration, as ``mailhub check-config`` prints it."""
    lines = [f"# {config.path}: OK", "[hub]", f'hostname = "{config.hostname}"', f'outbound = "{config.outbound}"']
    tables: list[tuple[str, Any]] = [("smtp", config.smtp), ("delivery", config.delivery)]
    if config.alerts.enabled:
        tables.append(("alerts", config.alerts))
    if config.drills.every:
        tables.append(("drills", config.drills))
    for title, obj in tables:
        lines.append(f"[{title}]")
        for k, v in asdict(obj).items():
            lines.append(f"{k} = {_toml(v)}")
    for title in ("store", "archive", "policy", "web"):
        section = getattr(config, title)
        if section:
            lines.append(f"[{title}]")
            lines.extend(f"{k} = {_shown(k, v)}" for k, v in section.items())
    for n in config.nodes.values():
        lines.append(f"[nodes.{n.name}]")
        lines.append(f'smtp = "{n.smtp}"')
        if n.web:
            lines.append(f'web = "{n.web}"')
    for d in config.domains.values():
        lines.append(f'[domains."{d.name}"]')
        lines.append(f'route = "{d.route}"')
        lines.append(f"max_connections = {d.max_connections}")
        lines.extend(f"{k} = {_shown(k, v)}" for k, v in d.options.items())
    return "\n".join(lines)

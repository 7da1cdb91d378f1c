"""
The hub's configuration: a TOML file read into attrs objects.

Every error names the file, the key and what is wrong with it, and all errors
of a file are reported together, so an operator fixes a config in one pass.
This module reads one file and does no other I/O.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from attrs import asdict, evolve, field, frozen

from mailhub.model import Route

__all__ = ["ConfigError", "DomainConfig", "HubConfig", "NodeConfig", "SmtpConfig", "load", "parse"]


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
    name: str
    route: str
    max_connections: int = 10
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
    #: ``secret_file``, the LiveArchive's session key.
    web: Mapping[str, Any] = {}

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
        return {"max_connections": 10}

    #: The ``[archive]`` keys the core reads; the rest is the plugin's.
    ARCHIVE_KEYS = ("plugin", "retention_days", "max_connections", "expire_every_minutes")

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


_TOP = {"hub", "smtp", "delivery", "store", "archive", "policy", "nodes", "domains", "web"}


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[tuple[str, str]] = []

    def err(self, key: str, msg: str) -> None:
        self.errors.append((key, msg))

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


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def load(path: str, endpoints: bool = True) -> HubConfig:
    """
    Read and check a configuration file.

    :param endpoints: check the nodes' endpoint strings too (Twisted's parser:
        importing it costs a command-line tool that listens on nothing, like
        ``mailhub queue``, a third of its run).
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
    for key in data:
        if key not in _TOP:
            r.err(key, f"unknown table (known: {', '.join(sorted(_TOP))})")

    hub = r.table(data, "hub", required=True)
    hostname = r.get(hub, "hub", "hostname", str, required=True) or "localhost"
    outbound = r.get(hub, "hub", "outbound", str, default="smtp:mx")
    _check_route(r, "hub.outbound", outbound)

    s = r.table(data, "smtp")
    num = (int, float)
    smtp = SmtpConfig(
        max_message_size=r.get(s, "smtp", "max_message_size", int, SmtpConfig().max_message_size, positive=True),
        max_recipients=r.get(s, "smtp", "max_recipients", int, 1000, positive=True),
        max_line_length=r.get(s, "smtp", "max_line_length", int, 2048, positive=True),
        max_data_line_length=r.get(s, "smtp", "max_data_line_length", int, 10000, positive=True),
        idle_timeout=float(r.get(s, "smtp", "idle_timeout", num, 300.0, positive=True)),
        data_timeout=float(r.get(s, "smtp", "data_timeout", num, 600.0, positive=True)),
        bare_line_endings=r.get(s, "smtp", "bare_line_endings", str, "reject"),
        banner=r.get(s, "smtp", "banner", str, ""),
    )
    if smtp.bare_line_endings not in ("reject", "normalise"):
        r.err("smtp.bare_line_endings", f"must be 'reject' or 'normalise', not {smtp.bare_line_endings!r}")
    smtp = _smtp_security(r, s, smtp, os.path.dirname(os.path.abspath(path)))

    dv = r.table(data, "delivery")
    delivery = DeliveryConfig(
        lease_seconds=float(r.get(dv, "delivery", "lease_seconds", num, 600.0, positive=True)),
        takeover_seconds=float(r.get(dv, "delivery", "takeover_seconds", num, 300.0, positive=True)),
        batch=r.get(dv, "delivery", "batch", int, 100, positive=True),
        max_scan_interval=float(r.get(dv, "delivery", "max_scan_interval", num, 60.0, positive=True)),
        flush_on_recovery=r.get(dv, "delivery", "flush_on_recovery", bool, True),
        probe_seconds=float(r.get(dv, "delivery", "probe_seconds", num, 30.0, positive=True)),
        heartbeat_seconds=float(r.get(dv, "delivery", "heartbeat_seconds", num, 10.0, positive=True)),
        share_seconds=float(r.get(dv, "delivery", "share_seconds", num, 1.0, positive=True)),
        reject_storm_recipients=r.get(dv, "delivery", "reject_storm_recipients", int, 3),
        reject_storm_window=float(r.get(dv, "delivery", "reject_storm_window", num, 600.0, positive=True)),
    )
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
    policy = {"plugin": "standard", **r.table(data, "policy")}
    if "retry_minutes" in policy:
        r.get(policy, "policy", "retry_minutes", num, positive=True)
    if "lifetime_days" in policy:
        r.get(policy, "policy", "lifetime_days", num, positive=True)

    nodes: dict[str, NodeConfig] = {}
    for name, n in r.table(data, "nodes", required=True).items():
        prefix = f"nodes.{name}"
        if not isinstance(n, dict):
            r.err(prefix, "must be a table")
            continue
        for key in n:
            if key not in ("smtp", "web"):
                r.err(f"{prefix}.{key}", "unknown key (known: smtp, web)")
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
        prefix = f'domains."{name}"' if "." in name else f"domains.{name}"
        if not isinstance(d, dict):
            r.err(prefix, "must be a table")
            continue
        route = r.get(d, prefix, "route", str, required=True)
        if route is not None:
            _check_route(r, f"{prefix}.route", route)
        maxc = r.get(d, prefix, "max_connections", int, 10, positive=True)
        if "backpressure_pause" in d:
            r.get(d, prefix, "backpressure_pause", (int, float), positive=True)
        if "max_rate" in d:
            r.get(d, prefix, "max_rate", (int, float), positive=True)
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
    for key in web:
        if key not in ("api_tokens_file", "secret_file"):
            r.err(f"web.{key}", "unknown key (known: api_tokens_file, secret_file)")
    r.get(web, "web", "secret_file", str)
    tokens = r.get(web, "web", "api_tokens_file", str)
    if tokens is not None:
        web["api_tokens_file"] = os.path.join(os.path.dirname(os.path.abspath(path)), tokens)

    if r.errors:
        raise ConfigError(path, r.errors)
    return HubConfig(
        path=path, hostname=hostname, outbound=outbound, smtp=smtp, delivery=delivery,
        store=store, archive=archive, policy=policy, nodes=nodes, domains=domains, web=web,
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


ROUTE_TLS = ("opportunistic", "required", "none")


def _route_tls_options(r: _Reader, prefix: str, options: dict[str, Any], base: str) -> dict[str, Any]:
    """
    Check a domain's outbound STARTTLS keys (``tls``, ``tls_verify``,
    ``tls_ca_file``), which the route's transport reads; ``tls_ca_file`` is
    made absolute (relative to the config file's directory).
    """
    tls = r.get(options, prefix, "tls", str, "opportunistic")
    if tls not in ROUTE_TLS:
        r.err(f"{prefix}.tls", f"must be 'opportunistic', 'required' or 'none', not {tls!r}")
    verify = r.get(options, prefix, "tls_verify", bool, False)
    ca_file = r.get(options, prefix, "tls_ca_file", str)
    if tls == "none" and verify:
        r.err(f"{prefix}.tls_verify", "means nothing with tls = 'none'")
    if ca_file is not None:
        if not verify:
            r.err(f"{prefix}.tls_ca_file", "is used only with tls_verify = true")
        options["tls_ca_file"] = os.path.join(base, ca_file)
        if not os.path.isfile(options["tls_ca_file"]):
            r.err(f"{prefix}.tls_ca_file", f"no such file: {options['tls_ca_file']}")
    return options


def _check_route(r: _Reader, key: str, route: str) -> None:
    try:
        Route.parse(route)
    except ValueError as e:
        r.err(key, str(e))


def _check_endpoint(r: _Reader, key: str, description: str) -> None:
    from twisted.internet.endpoints import _parseServer  # type: ignore[attr-defined]

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
    return json.dumps(str(value))


def describe(config: HubConfig) -> str:
    """The resolved configuration, as ``mailhub check-config`` prints it."""
    lines = [f"# {config.path}: OK", "[hub]", f'hostname = "{config.hostname}"', f'outbound = "{config.outbound}"']
    for title, obj in (("smtp", config.smtp), ("delivery", config.delivery)):
        lines.append(f"[{title}]")
        for k, v in asdict(obj).items():
            lines.append(f"{k} = {_toml(v)}")
    for title in ("store", "archive", "policy"):
        section = getattr(config, title)
        if section:
            lines.append(f"[{title}]")
            lines.extend(f"{k} = {_toml(v)}" for k, v in section.items())
    for n in config.nodes.values():
        lines.append(f"[nodes.{n.name}]")
        lines.append(f'smtp = "{n.smtp}"')
        if n.web:
            lines.append(f'web = "{n.web}"')
    for d in config.domains.values():
        lines.append(f'[domains."{d.name}"]')
        lines.append(f'route = "{d.route}"')
        lines.append(f"max_connections = {d.max_connections}")
        lines.extend(f"{k} = {_toml(v)}" for k, v in d.options.items())
    return "\n".join(lines)

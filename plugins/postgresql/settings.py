"""
The ``postgresql`` archive's ``[archive]`` table, checked without connecting:
every error names its key (and never quotes a password).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
import psycopg.conninfo
from attrs import frozen

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_POOL_SIZE", "DEFAULT_SCHEMA", "Settings", "settings"]

DEFAULT_POOL_SIZE = 4
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_SCHEMA = "mailhub_archive"


@frozen
class Settings:
    conninfo: str
    pool_size: int
    schema: str


def _string(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"archive.{key}: must be a non-empty string")
    return value


def _number(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"archive.{key}: must be a number of seconds, more than 0")
    return float(value)


def settings(config: Mapping[str, Any]) -> Settings:
    dsn = _string(config, "dsn")
    parts: dict[str, Any] = {}
    for key in ("host", "dbname", "user", "password"):
        value = _string(config, key)
        if value is not None:
            parts[key] = value
    if "port" in config:
        port = config["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("archive.port: must be a TCP port number")
        parts["port"] = port
    if dsn is None and "host" not in parts and "dbname" not in parts:
        raise ValueError(
            "archive.dsn: is required for the postgresql archive (a libpq connection "
            "string such as 'host=db.hub.example dbname=mailhub user=mailhub'), "
            "or give archive.host and archive.dbname"
        )
    try:
        given = psycopg.conninfo.conninfo_to_dict(dsn or "")
    except psycopg.Error:
        # Not the error's text: it may quote a password.
        raise ValueError(
            "archive.dsn: not a libpq connection string ('host=... dbname=...') "
            "or URI ('postgresql://...')"
        )
    defaults: dict[str, Any] = {
        "connect_timeout": max(
            1, round(_number(config, "connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        ),
        "application_name": "mailhub-archive",
        # A server that vanished (a site down) is noticed in seconds, not
        # after the kernel's two hours.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }
    extra = {k: v for k, v in defaults.items() if k not in given and k not in parts}
    if "connect_timeout" in config:
        extra["connect_timeout"] = defaults["connect_timeout"]
    pool_size = config.get("pool_size", DEFAULT_POOL_SIZE)
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
        raise ValueError("archive.pool_size: must be a whole number, 1 or more")
    schema = _string(config, "schema") or DEFAULT_SCHEMA
    if len(schema.encode()) > 63:
        raise ValueError("archive.schema: at most 63 bytes (PostgreSQL's limit for a name)")
    try:
        conninfo = psycopg.conninfo.make_conninfo(dsn or "", **parts, **extra)
    except psycopg.Error:
        raise ValueError("archive.dsn: the connection settings do not make a connection string")
    return Settings(conninfo, pool_size, schema)


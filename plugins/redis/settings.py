"""
The redis store's ``[store]`` table: its keys, their defaults (here and
nowhere else) and their checks.  Nothing here connects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from attrs import frozen

__all__ = [
    "DEFAULT_COMMAND_TIMEOUT", "DEFAULT_POOL_SIZE", "DEFAULT_PREFIX", "DEFAULT_RECONNECT_MAX_DELAY",
    "KEYS", "Settings", "settings",
]

DEFAULT_PREFIX = "mailhub:"
DEFAULT_COMMAND_TIMEOUT = 5.0
DEFAULT_POOL_SIZE = 2
DEFAULT_RECONNECT_MAX_DELAY = 2.0

KEYS = frozenset({
    "host", "port", "db", "url", "password", "username", "key_prefix", "command_timeout",
    "wait_replicas", "max_spool_bytes", "sentinels", "master", "pool_size", "reconnect_max_delay",
})
"""The keys of ``[store]`` besides ``plugin``."""


@frozen
class Settings:
    """The ``[store]`` table, checked (``settings``)."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str | None = None
    username: str | None = None
    key_prefix: str = DEFAULT_PREFIX
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    wait_replicas: int = 0
    max_spool_bytes: int = 0
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    pool_size: int = DEFAULT_POOL_SIZE
    reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY


def _integer(config: Mapping[str, Any], key: str, default: int, least: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"store.{key}: must be a whole number, {least} or more")
    return value


def _seconds(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"store.{key}: must be a number of seconds, more than 0")
    return float(value)


def _string(config: Mapping[str, Any], key: str, default: str | None) -> str | None:
    value = config.get(key, default)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"store.{key}: must be a string")
    return value


def _host_port(text: Any, key: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not isinstance(text, str) or not sep or not host or not port.isdigit():
        raise ValueError(f"store.{key}: {text!r} is not 'host:port'")
    return host.strip("[]"), int(port)


def settings(config: Mapping[str, Any]) -> Settings:
    """
    The ``[store]`` table (besides ``plugin``), checked; see the package's
    docstring for its keys.

    :raises ValueError: naming the key at fault (``store.KEY: ...``).
    """
    host = _string(config, "host", "127.0.0.1")
    port = _integer(config, "port", 6379, 1)
    db = _integer(config, "db", 0, 0)
    password = _string(config, "password", None)
    username = _string(config, "username", None)
    url = _string(config, "url", None)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError(f"store.url: {url!r} is not 'redis://[:password@]host[:port][/db]'")
        host = parts.hostname
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"store.url: {url!r} has a bad port")
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"store.url: {url!r}: the database must be a number")
            db = int(path)
        if parts.password is not None:
            password = unquote(parts.password)
            username = unquote(parts.username) if parts.username else username
    if port > 65535:
        raise ValueError("store.port: must be a TCP port number")
    prefix = _string(config, "key_prefix", DEFAULT_PREFIX)
    if not prefix:
        raise ValueError("store.key_prefix: must not be empty")
    sentinels_raw = config.get("sentinels", [])
    if isinstance(sentinels_raw, str) or not isinstance(sentinels_raw, list | tuple):
        raise ValueError("store.sentinels: must be a list of 'host:port'")
    sentinels = tuple(_host_port(s, "sentinels") for s in sentinels_raw)
    master = _string(config, "master", "") or ""
    if sentinels and not master:
        raise ValueError("store.master: the Sentinel master's name is needed with sentinels")
    return Settings(
        host=host or "127.0.0.1",
        port=port,
        db=db,
        password=password,
        username=username,
        key_prefix=prefix,
        command_timeout=_seconds(config, "command_timeout", DEFAULT_COMMAND_TIMEOUT),
        wait_replicas=_integer(config, "wait_replicas", 0, 0),
        max_spool_bytes=_integer(config, "max_spool_bytes", 0, 0),
        sentinels=sentinels,
        master=master,
        pool_size=_integer(config, "pool_size", DEFAULT_POOL_SIZE, 1),
        reconnect_max_delay=_seconds(config, "reconnect_max_delay", DEFAULT_RECONNECT_MAX_DELAY),
    )

"""
The redis store's connections: a lazy, self-reconnecting txredisapi pool,
to one Redis or to the master a set of Sentinels names.

txredisapi installs the default reactor when imported, so it is imported
here only when a store is made, never at plugin discovery.  Its factories
are subclassed (``_factories``) where they would give up reconnecting for
good, or drop every connection to a Sentinel-named master: the one place
this plugin works around a library's behaviour, and why is said there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .settings import Settings

__all__ = ["connect"]

_log = Logger()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def connect(settings: Settings, reactor: Any) -> tuple[Any, Callable[[], Deferred[Any]]]:
    """
    Open a lazy, self-reconnecting connection pool: commands issued before it
    is up wait for it (bounded by the store's command timeout).

    :returns: the txredisapi handler and a function that closes everything.
    """
    import txredisapi  # installs the default reactor: only here, never at discovery

    plain_factory, sentinel_factory = _factories(txredisapi, settings.reconnect_max_delay)

    options = dict(
        charset=None,
        password=settings.password,
        replyTimeout=settings.command_timeout,
        convertNumbers=False,
        username=settings.username,
    )
    if settings.sentinels:
        sentinel = txredisapi.Sentinel(settings.sentinels)
        # Sentinels answer in milliseconds; by default a lookup made while no
        # master is fit (just after it died) waits 10 s before trying again.
        sentinel.discovery_timeout = min(1.0, settings.command_timeout)
        handler = sentinel.master_for(
            settings.master,
            factory_class=sentinel_factory,
            dbid=settings.db,
            poolsize=settings.pool_size,
            **options,
        )

        def close_sentinel() -> Deferred[Any]:
            return _gather([handler.disconnect(), sentinel.disconnect()])

        return handler, close_sentinel

    from twisted.internet.endpoints import HostnameEndpoint

    factory = plain_factory(
        f"{settings.host}:{settings.port}",
        settings.db,
        settings.pool_size,
        isLazy=True,
        handler=txredisapi.ConnectionHandler,
        **options,
    )
    factory.startConnecting(
        HostnameEndpoint(reactor, settings.host, settings.port, timeout=settings.command_timeout)
    )
    return factory.handler, factory.disconnect


def _gather(ds: list[Deferred[Any]]) -> Deferred[Any]:
    from twisted.internet.defer import gatherResults

    return gatherResults(ds, consumeErrors=True)


def _factories(txredisapi: Any, max_delay: float) -> tuple[Any, Any]:
    """
    txredisapi's connection factories (plain and Sentinel), fixed for a
    store that must never give up reconnecting:

    - txredisapi stops reconnecting *for good* when ``AUTH`` or ``SELECT``
      fails on a new connection, and a timeout counts: a Redis that accepts
      connections but does not answer (frozen, overloaded) would leave the
      node without a spool until it is restarted.  Here ``stopTrying`` does
      nothing; ``close()`` uses ``disconnect()``, which stops for real.
      Such failures are logged, not handed to a ``Deferred`` nobody watches.
    - The Sentinel protocol compares the ``ROLE`` reply with ``"master"``,
      but with ``charset=None`` the reply is ``bytes``, so it would drop
      every connection to the master.
    """

    def keep_trying(self: Any) -> Deferred[None]:
        return succeed(None)

    def log_error(self: Any, why: str) -> None:
        _log.warn("{why}; reconnecting", why=why)

    class Factory(txredisapi.RedisFactory):  # type: ignore[misc, name-defined]
        maxDelay = max_delay
        stopTrying = keep_trying
        connectionError = log_error

    class SentinelProtocol(txredisapi.SentinelRedisProtocol):  # type: ignore[misc, name-defined]
        def connectionMade(self) -> Any:
            def check_role(role: list[Any]) -> Any:
                if self.factory.is_master and _text(role[0]) != "master":
                    self.transport.loseConnection()
                    return None
                return txredisapi.RedisProtocol.connectionMade(self)

            def failed(_: Failure) -> None:
                self.transport.abortConnection()

            if self.password is not None:
                self.auth(self.password, self.username).addErrback(lambda _: None)
            return self.role().addCallbacks(check_role, failed)

    class SentinelFactory(txredisapi.SentinelConnectionFactory):  # type: ignore[misc, name-defined]
        protocol = SentinelProtocol
        maxDelay = max_delay
        stopTrying = keep_trying
        connectionError = log_error

    return Factory, SentinelFactory

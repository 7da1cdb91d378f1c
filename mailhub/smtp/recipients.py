"""
Recipient validation per domain, so the hub never accepts mail that could
only bounce later (backscatter): a static list of addresses (inline in the
config or in a file that is reloaded when it changes) and/or verification
by probing the route's server with RCPT (``mailhub.smtp.verify``), with the
answers cached.

Each check here is a ``RecipientCheck`` (``mailhub.smtp.server``): it fires
with ``None`` to accept or with the ``Reply`` to refuse with.  They run after
the relay rule (``domain_check``), so they only ever see the hub's domains.

No blocking I/O: the recipients file is read in a thread; time comes from
the injected clock.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.config import ConfigError, DomainConfig, HubConfig
from mailhub.model import Address, Reply
from mailhub.smtp.server import RecipientCheck
from mailhub.smtp.verify import ProbeFailed, route_probe

__all__ = [
    "UNKNOWN_USER",
    "UNVERIFIABLE",
    "FileRecipients",
    "RouteVerifier",
    "StaticRecipients",
    "recipient_validation",
]

_log = Logger(namespace="mailhub.smtp.recipients")

_T = TypeVar("_T")
Threads = Callable[..., "Deferred[Any]"]
"""Runs ``f(*args)`` in a thread: ``threads(f, *args) -> Deferred`` of its result."""

UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: User unknown")
UNVERIFIABLE = Reply(451, "4.4.1", "Recipient address verification unavailable, try later")

RECIPIENTS_CHECK_SECONDS = 5.0
"""How often a recipients file's modification time is looked at, at most."""
ROUTE_DOWN_SECONDS = 30.0
"""After a failed probe, how long the route counts as down (no new probes)."""


def _key(address: Address | str) -> str:
    # Comparing local parts without case: refusing "John.Doe" because the
    # list says "john.doe" would lose mail; accepting it costs nothing.
    return str(address).lower()


def parse_recipients(text: str) -> frozenset[str]:
    """One address a line; blank lines and ``#`` comments are skipped."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return frozenset(_key(line) for line in lines if line)


class StaticRecipients:
    """
    Accepts exactly the listed addresses.

    :param addresses: ``local@domain`` strings.
    """

    def __init__(self, addresses: Iterable[str]) -> None:
        self._addresses = frozenset(_key(a) for a in addresses)

    def __call__(self, address: Address) -> Deferred[Reply | None]:
        return succeed(None if _key(address) in self._addresses else UNKNOWN_USER)


def _read_if_changed(path: str, mtime: int | None) -> tuple[int, frozenset[str] | None]:
    """In a thread: the file's mtime, and its addresses if the mtime is not ``mtime``."""
    current = os.stat(path).st_mtime_ns
    if current == mtime:
        return current, None
    with open(path, encoding="utf-8") as f:
        return current, parse_recipients(f.read())


class FileRecipients:
    """
    Accepts the addresses listed in a file, one a line; the file is read
    again when its modification time changes, looked at no more often than
    every ``check_seconds``.  While a newer version is being read, answers
    come from the one already loaded.  If the file cannot be read, the last
    version loaded stays in force (and an error is logged); before any has
    been loaded the check fails (``451 4.3.0`` to the client).

    :param path: the file.
    :param clock: the time source.
    :param threads: runs the file reading in a thread.
    """

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        threads: Threads,
        check_seconds: float = RECIPIENTS_CHECK_SECONDS,
    ) -> None:
        self._path = path
        self._clock: Any = clock
        self._threads = threads
        self._check_seconds = check_seconds
        self._addresses: frozenset[str] | None = None
        self._mtime: int | None = None
        self._next_check = 0.0
        self._reading = False
        self._waiters: list[Deferred[frozenset[str]]] = []

    def __call__(self, address: Address) -> Deferred[Reply | None]:
        return self._current().addCallback(
            lambda addresses: None if _key(address) in addresses else UNKNOWN_USER
        )

    def _current(self) -> Deferred[frozenset[str]]:
        now = self._clock.seconds()
        if now >= self._next_check and not self._reading:
            self._next_check = now + self._check_seconds
            self._reading = True
            d = self._threads(_read_if_changed, self._path, self._mtime)
            d.addBoth(self._read)
        if self._addresses is not None:
            return succeed(self._addresses)
        waiter: Deferred[frozenset[str]] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _read(self, result: tuple[int, frozenset[str] | None] | Failure) -> None:
        self._reading = False
        if isinstance(result, Failure):
            _log.error(
                "cannot read recipients file {path}: {error}",
                path=self._path,
                error=result.getErrorMessage(),
            )
        else:
            mtime, addresses = result
            if addresses is not None:
                if self._addresses is not None:
                    _log.info(
                        "recipients file {path} reloaded: {count} addresses",
                        path=self._path,
                        count=len(addresses),
                    )
                self._addresses = addresses
                self._mtime = mtime
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if self._addresses is not None:
                w.callback(self._addresses)
            else:
                w.errback(result if isinstance(result, Failure) else RuntimeError("no recipients"))


@frozen
class _Answer:
    reply: Reply | None  # None: the recipient exists
    expires: float


class RouteVerifier:
    """
    Verifies recipients by probing the route's server, caching its answers.

    A positive answer is trusted for ``positive_seconds``, a negative one
    (any 5xx to RCPT; refused as ``550 5.1.1``) for ``negative_seconds``.
    When a probe fails (the route is down: refused, timeout, dropped, 4xx),
    the route counts as down for ``ROUTE_DOWN_SECONDS`` without new probes,
    and answers come from the cache, expired entries included; with nothing
    cached, ``unreachable`` decides: ``"accept"`` or ``"tempfail"``
    (``451 4.4.1``).  At most ``concurrency`` probes run at once, and one
    address is probed once however many sessions ask at the same time.

    :param probe: asks the route's server: ``probe(address) -> Deferred[Reply]``,
        failing with ``ProbeFailed`` when it cannot say.
    :param clock: the time source.
    """

    def __init__(
        self,
        probe: Callable[[Address], Deferred[Reply]],
        clock: IReactorTime,
        positive_seconds: float = 3600.0,
        negative_seconds: float = 600.0,
        unreachable: str = "tempfail",
        max_cached: int = 100_000,
        concurrency: int = 4,
        route: str = "",
    ) -> None:
        self._probe = probe
        self._clock: Any = clock
        self._positive = positive_seconds
        self._negative = negative_seconds
        self._unreachable = unreachable
        self._max_cached = max_cached
        self._route = route
        self._cache: dict[str, _Answer] = {}
        self._pending: dict[str, list[Deferred[Reply | None]]] = {}
        self._semaphore = DeferredSemaphore(concurrency)
        self._down_until = 0.0

    def __call__(self, address: Address) -> Deferred[Reply | None]:
        key = _key(address)
        now = self._clock.seconds()
        cached = self._cache.get(key)
        if cached is not None and (cached.expires > now or now < self._down_until):
            return succeed(cached.reply)
        if now < self._down_until:
            return succeed(self._when_unreachable(address))
        d: Deferred[Reply | None] = Deferred()
        waiters = self._pending.get(key)
        if waiters is not None:
            waiters.append(d)
            return d
        self._pending[key] = [d]
        self._semaphore.run(self._probe, address).addBoth(
            lambda result: self._answered(address, key, result)
        )
        return d

    def _answered(self, address: Address, key: str, result: Reply | Failure) -> None:
        now = self._clock.seconds()
        answer: Reply | None
        if isinstance(result, Reply) and (result.ok or result.permanent):
            if result.ok:
                answer = None
                lifetime = self._positive
            else:
                answer = result if result.enhanced == "5.6.7" else UNKNOWN_USER
                lifetime = self._negative
            self._cache.pop(key, None)
            self._cache[key] = _Answer(answer, now + lifetime)
            while len(self._cache) > self._max_cached:
                del self._cache[next(iter(self._cache))]
        else:
            why = result.getErrorMessage() if isinstance(result, Failure) else str(result)
            if isinstance(result, Failure) and not result.check(ProbeFailed):
                _log.failure(
                    "probing {route} for {address} failed", result, route=self._route, address=str(address)
                )
            self._down_until = now + ROUTE_DOWN_SECONDS
            cached = self._cache.get(key)
            answer = cached.reply if cached is not None else self._when_unreachable(address)
            _log.warn(
                "cannot verify {address} with route {route} ({why}): {what}",
                address=str(address),
                route=self._route,
                why=why,
                what="using the cached answer" if cached is not None else f"{self._unreachable}",
            )
        for d in self._pending.pop(key, []):
            d.callback(answer)

    def _when_unreachable(self, address: Address) -> Reply | None:
        return None if self._unreachable == "accept" else UNVERIFIABLE


def _domain_check(
    domain: DomainConfig, config: HubConfig, reactor: Any, threads: Threads
) -> RecipientCheck | None:
    options: Mapping[str, Any] = domain.options
    lists: list[RecipientCheck] = []
    if "recipients" in options:
        lists.append(StaticRecipients(options["recipients"]))
    if "recipients_file" in options:
        path = options["recipients_file"]
        if not os.path.isfile(path):
            key = f'domains."{domain.name}".recipients_file'
            raise ConfigError(config.path, [(key, f"no such file: {path}")])
        lists.append(FileRecipients(path, reactor, threads))
    verifier: RecipientCheck | None = None
    if options.get("verify", "none") == "route":
        timeout = float(options.get("verify_timeout", 10.0))
        probe = route_probe(domain.route, config.route_options(domain.route), config.hostname, reactor, timeout)
        verifier = RouteVerifier(
            probe,
            reactor,
            positive_seconds=float(options.get("verify_positive_seconds", 3600.0)),
            negative_seconds=float(options.get("verify_negative_seconds", 600.0)),
            unreachable=options.get("verify_unreachable", "tempfail"),
            route=domain.route,
        )
    if not lists:
        return verifier

    def check(address: Address) -> Deferred[Reply | None]:
        # Listed in any list: accepted; otherwise the route decides, if verified.
        remaining = list(lists)

        def next_list(result: Reply | None) -> Reply | None | Deferred[Reply | None]:
            if result is None:
                return None
            if remaining:
                return remaining.pop(0)(address).addCallback(next_list)
            return verifier(address) if verifier is not None else result

        return remaining.pop(0)(address).addCallback(next_list)

    return check


def recipient_validation(
    config: HubConfig, reactor: Any, threads: Threads | None = None
) -> RecipientCheck:
    """
    The recipient validation of every configured domain, as one check.

    :param config: the hub's configuration; a domain's ``recipients``,
        ``recipients_file`` and ``verify`` options say how its recipients are
        validated.  A domain with none of them accepts every recipient.
    :param reactor: the reactor (time, TCP, thread pool).
    :param threads: runs file reading in a thread (default: the reactor's pool).
    :raises ConfigError: when a ``recipients_file`` does not exist.
    :returns: a ``RecipientCheck`` to run after the relay rule.
    """
    if threads is None:

        def threads(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    checks: dict[str, RecipientCheck] = {}
    for name, domain in config.domains.items():
        check = _domain_check(domain, config, reactor, threads)
        if check is not None:
            checks[name.rstrip(".")] = check

    def validate(address: Address) -> Deferred[Any]:
        check = checks.get(address.domain.rstrip("."))
        return check(address) if check is not None else succeed(None)

    return validate

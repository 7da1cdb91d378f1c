"""
Recipient verification by asking the route's transport: ``verify = "route"``.

The route's transport plugin makes a transport for the route, with the
route's options (its TLS settings, say), and that transport, if it provides
``IRecipientProbe``, asks its server whether a recipient exists without
sending a message (the ``smtp`` transport: ``MAIL FROM:<>`` and ``RCPT``
over ``mailhub.smtp.client``).  This module bounds each probe's time and
turns an answer that says nothing (a 4xx, no answer in time) into
``ProbeFailed``.  Caching the answers, and what to do while the route is
down, is ``mailhub.smtp.recipients``'s business.  Whether a route's
transport can verify at all is checked with the configuration
(``mailhub.config``: its plugin's ``recipient_probe``).

Time is read only from the injected clock; I/O is the transport's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailhub.interfaces import IRecipientProbe
from mailhub.model import Address, Reply, Route
from mailhub.plugin import load_plugin

__all__ = ["ProbeFailed", "probe_with_timeout", "route_probe"]


class ProbeFailed(Exception):
    """
    The probe got no answer that says whether the recipient exists: the
    connection was refused, timed out or dropped, or the server answered
    4xx (or refused the session before RCPT).
    """


def route_probe(
    route: str, options: Mapping[str, Any], hostname: str, reactor: Any, timeout: float
) -> Callable[[Address], Deferred[Reply]]:
    """
    The probe of ``route``: asks a transport of the route's plugin, made for
    the route as the node makes the one it delivers with.

    :param route: the route, ``"smtp:mail.example.com:25"``.
    :param options: the route's options (``HubConfig.route_options``).
    :param hostname: the hub's name (EHLO).
    :param reactor: the reactor (time, TCP) the transport is made with.
    :param timeout: seconds one probe may take (``verify_timeout``).
    :raises ValueError: ``"verify: ..."``, when the route's transport cannot
        verify recipients (the configuration check refuses that first).
    :returns: ``probe(address)``, as ``probe_with_timeout``.
    """
    parsed = Route.parse(route)
    factory = load_plugin("mailhub.transports", parsed.transport)
    transport = factory.make({**options, "target": parsed.target, "hostname": hostname}, reactor)
    if not IRecipientProbe.providedBy(transport):
        raise ValueError(
            f"verify: 'route' needs a transport that can verify recipients; {parsed.transport!r} cannot"
        )

    def probe(address: Address) -> Deferred[Reply]:
        return probe_with_timeout(transport, address, reactor, timeout, route)

    return probe


def probe_with_timeout(
    prober: Any, address: Address, clock: Any, timeout: float, route: str = ""
) -> Deferred[Reply]:
    """
    Ask ``prober`` (an ``IRecipientProbe``) about ``address``, for at most
    ``timeout`` seconds; after that the probe is cancelled.

    :param clock: an ``IReactorTime``.
    :param route: the route, for the messages.
    :returns: a ``Deferred`` firing with the reply when it says whether the
        recipient exists (2xx or 5xx), or failing with ``ProbeFailed``
        saying why it does not (a 4xx, or no answer in time).
    """
    result: Deferred[Reply] = Deferred()
    asked: list[Deferred[Reply]] = []

    def timed_out() -> None:
        result.errback(ProbeFailed(f"no answer from {route or 'the route'} within {timeout:g}s"))
        asked[0].cancel()

    timer = clock.callLater(timeout, timed_out)

    def answered(outcome: Reply | Failure) -> None:
        if timer.active():
            timer.cancel()
        if result.called:
            return  # too late: the probe was cancelled, whatever it says now
        if isinstance(outcome, Failure):
            result.errback(outcome)  # a transport that broke its contract: logged as such
        elif outcome.temporary:
            result.errback(ProbeFailed(str(outcome)))
        else:
            result.callback(outcome)

    asked.append(prober.probe(address))
    asked[0].addBoth(answered)
    return result

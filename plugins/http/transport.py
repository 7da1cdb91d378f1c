"""
The ``http`` transport: delivers an entry as one HTTP POST of the raw
message to a URL (a ticketing system, a mail-to-webhook gateway, a
service's own inbound endpoint), with treq.

Route target: the URL, ``http://`` or ``https://``::

    route = "http:https://inbound.example.com/mail"
    route = "http:http://127.0.0.1:8080/hooks/mail"

The URL may not carry credentials (route texts appear in logs and in
``mailhub queue``): give them as a header (``headers`` below).

The request::

    POST /mail HTTP/1.1
    Content-Type: message/rfc822
    Mailhub-Envelope: {"sender": "a@outside.example", "recipients": ["b@example.com"],
                       "smtputf8": false, "message_id": "...", "entry": "..."}

    <the message, exactly as received, CRLF line ends>

``Mailhub-Envelope`` is one line of JSON, non-ASCII escaped (``\\uXXXX``):
``sender`` (``null`` for the null sender ``<>``), ``recipients`` (the
entry's pending recipients: after a retry, only those not yet settled),
``smtputf8``, and ``message_id`` and ``entry``, the same on every attempt
for one message, so that a receiver can drop a repeat (delivery is
at-least-once: a timeout after the receiver took the message is retried).

The response:

- ``2xx``: delivered, for every recipient, unless its body is JSON
  (``Content-Type: application/json``) of the form
  ``{"recipients": {"b@example.com": "550 5.1.1 no such user"}}``: each
  named recipient gets that SMTP reply instead (``452 4.2.2 ...`` defers
  it, ``5xx`` fails it with a bounce).
- ``429`` and ``5xx``: temporary, for every recipient (429 as ``451 4.7.0``,
  which the engine takes as back pressure).
- any other ``4xx``: permanent (``554 5.0.0``), for every recipient.
- ``1xx`` and ``3xx``: temporary (redirects are not followed: the route's
  URL is probably wrong, and the operator can fix it before the message
  expires).

A refused connection, a timeout, a dropped connection or a TLS failure is
temporary too (``421``).  Options (a domain's table):

- ``connect_timeout`` (30 s) for the connection, ``timeout`` (300 s) for the
  whole request, from connecting to the end of the response.
- ``tls_verify`` (true): verify an ``https`` server's certificate for the
  URL's host against the system's trusted CAs, or ``tls_ca_file`` (a PEM
  file of CA, or self-signed, certificates).  A verification failure is
  ``421 4.7.5``.  ``false`` encrypts without knowing who answers.
- ``headers``: a table of extra request headers, e.g.
  ``headers = { Authorization = "Bearer ..." }``; it cannot replace
  ``Content-Type``, ``Content-Length``, ``Host`` or ``Mailhub-Envelope``.

Connections are kept between deliveries (``max_connections`` per route,
each closed after 30 s unused).  Nothing here ever errbacks to the caller,
and no blocking call is made (``tls_ca_file`` is read in a thread).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import treq
from attrs import define, field, frozen
from OpenSSL.SSL import Error as SSLError
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.ssl import CertificateOptions, trustRootFromCertificates
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from mailhub.interfaces import ITransport, ITransportPlugin
from mailhub.model import Address, AddressError, Entry, Reply
from mailhub.smtp import client

__all__ = ["HTTPTransport", "HTTPTransportPlugin", "parse_target", "plugin", "reply_for_status"]

#: The most of a response body read (for per-recipient replies and the reply text).
MAX_RESPONSE = 64 * 1024
#: Seconds an idle connection is kept for the next delivery.
IDLE_TIMEOUT = 30
#: Headers the transport sets itself.
RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "mailhub-envelope", "transfer-encoding"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


def parse_target(target: str) -> str:
    """
    A route's target: an ``http://`` or ``https://`` URL with a host, without
    credentials or a fragment.

    :returns: the URL.
    :raises ValueError: ``"target: ..."``, saying what is wrong.
    """
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in target):
        raise ValueError(f"target: {target!r}: a URL has no spaces or control characters")
    try:
        url = urlsplit(target)
        port = url.port
    except ValueError as e:
        raise ValueError(f"target: {target!r} is not a URL ({e})")
    if url.scheme not in ("http", "https"):
        raise ValueError(f"target: {target!r} is not an http:// or https:// URL")
    if not url.hostname:
        raise ValueError(f"target: {target!r} names no host")
    if port == 0:
        raise ValueError(f"target: bad port in {target!r}")
    if url.username is not None or url.password is not None:
        raise ValueError(
            "target: the URL carries credentials, which would show in logs: "
            "give them as headers = { Authorization = \"...\" } instead"
        )
    if url.fragment:
        raise ValueError(f"target: {target!r}: a URL to POST to has no #fragment")
    return target


def reply_for_status(code: int, phrase: str, where: str) -> Reply:
    """
    The reply for every recipient of a request answered with HTTP status
    ``code``: see the module docstring.
    """
    said = f"HTTP {code} {phrase} from {where}".rstrip()
    if 200 <= code < 300:
        return Reply(250, "2.0.0", said)
    if code == 429:
        return Reply(451, "4.7.0", said)
    if 400 <= code < 500:
        return Reply(554, "5.0.0", said)
    if 500 <= code < 600:
        return Reply(451, "4.3.0", said)
    return Reply(451, "4.3.0", f"{said} (redirects are not followed: check the route's URL)")


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


@implementer(IPolicyForHTTPS)
class _NoVerification:
    """``tls_verify = false``: encrypt, without checking who answers."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> CertificateOptions:
        return CertificateOptions(verify=False)


class _TooLong(Exception):
    pass


class _TLSSetupError(Exception):
    pass


def _tls_failure(error: BaseException) -> str | None:
    """What OpenSSL said, if ``error`` (treq's) is a failed TLS handshake."""
    reasons = getattr(error, "reasons", None) or []
    for reason in reasons:
        if reason.check(VerificationError):
            return f"the certificate does not name the URL's host ({reason.value})"
        if reason.check(SSLError):
            texts = [e[-1] for e in (reason.value.args[0] if reason.value.args else [])
                     if isinstance(e, tuple) and e and e[-1]]  # fmt: skip
            return ", ".join(str(t) for t in texts) or reason.getErrorMessage()
    return None


@implementer(ITransport)
@define(eq=False)
class HTTPTransport:
    """
    An ``ITransport`` for one route: a POST of each entry to ``url``; see
    the module docstring.

    :param reactor: ``IReactorTime``, ``IReactorTCP`` and ``IReactorThreads``.
    :param url: the URL (``parse_target``).
    :param headers: extra request headers.
    """

    _reactor: Any
    _url: str
    _connect_timeout: float = 30.0
    _timeout: float = 300.0
    _tls_verify: bool = True
    _tls_ca_file: str | None = None
    _headers: Mapping[bytes | str, bytes | str] = field(factory=dict)
    _max_connections: int = 10
    _client: HTTPClient | None = field(init=False, default=None)
    _pool: HTTPConnectionPool | None = field(init=False, default=None)
    _log: ClassVar[Logger] = Logger()

    @property
    def _where(self) -> str:
        url = urlsplit(self._url)
        return f"{url.scheme}://{url.netloc}"

    # ITransport

    def deliver(self, entry: Entry, message: bytes) -> Deferred[dict[Address, Reply]]:
        return Deferred.fromCoroutine(self._deliver(entry, message))

    def close(self) -> Deferred[None]:
        """Close the connections kept for reuse."""
        pool, self._pool, self._client = self._pool, None, None
        if pool is None:
            return Deferred.fromCoroutine(_nothing())
        return pool.closeCachedConnections()

    # delivery

    async def _deliver(self, entry: Entry, message: bytes) -> dict[Address, Reply]:
        recipients = entry.pending
        if not recipients:
            return {}
        try:
            d = Deferred.fromCoroutine(self._post(entry, recipients, message))
            # Whatever the cancelled request failed with, the cause was the timeout.
            d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=_timed_out)
            return await d
        except CancelledError:
            raise
        except DeferredTimeout:
            reply = Reply(421, "4.4.2", f"no response from {self._where} within {self._timeout:g}s")
        except _TLSSetupError as e:
            reply = Reply(421, "4.7.5", str(e))
        except Exception as e:
            reply = self._failure_reply(e)
        return dict.fromkeys(recipients, reply)

    def _failure_reply(self, e: Exception) -> Reply:
        host = urlsplit(self._url).hostname or ""
        connect = client.connect_error_reply(e, host, self._where, self._connect_timeout)
        if connect is not None:
            return connect
        tls = _tls_failure(e)
        if tls is not None:
            return Reply(421, "4.7.5", f"TLS with {self._where} failed: {tls}")
        if isinstance(e, ResponseNeverReceived | ResponseFailed | RequestTransmissionFailed):
            why = "; ".join(r.getErrorMessage() for r in getattr(e, "reasons", [])) or _describe(e)
            return Reply(421, "4.4.2", f"connection to {self._where} lost before the response ({why})")
        self._log.failure("http delivery to {where} failed", where=self._where)
        return Reply(451, "4.3.0", f"transport error: {_describe(e)}")

    async def _http(self) -> HTTPClient:
        if self._client is None:
            policy: IPolicyForHTTPS
            if not self._tls_verify:
                policy = _NoVerification()
            elif self._tls_ca_file is not None:
                try:
                    certificates = await deferToThreadPool(
                        self._reactor, self._reactor.getThreadPool(), client.read_ca_file, self._tls_ca_file
                    )
                except Exception as e:
                    raise _TLSSetupError(f"tls_ca_file: cannot use {self._tls_ca_file}: {_describe(e)}")
                policy = BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(certificates))
            else:
                policy = BrowserLikePolicyForHTTPS()
            if self._client is None:  # not made meanwhile by another delivery
                self._pool = HTTPConnectionPool(self._reactor, persistent=True)
                self._pool.maxPersistentPerHost = self._max_connections
                self._pool.cachedConnectionTimeout = IDLE_TIMEOUT
                agent = Agent(self._reactor, policy, connectTimeout=self._connect_timeout, pool=self._pool)
                self._client = HTTPClient(agent)
        return self._client

    async def _post(
        self, entry: Entry, recipients: Sequence[Address], message: bytes
    ) -> dict[Address, Reply]:
        http = await self._http()
        envelope = {
            "sender": str(entry.sender) if entry.sender is not None else None,
            "recipients": [str(a) for a in recipients],
            "smtputf8": entry.smtputf8,
            "message_id": entry.message_id,
            "entry": entry.id,
        }
        headers: dict[bytes | str, bytes | str] = {
            **self._headers,
            "Content-Type": "message/rfc822",
            "Mailhub-Envelope": json.dumps(envelope, separators=(",", ":"), ensure_ascii=True),
        }
        response = await http.post(
            self._url, data=bytes(message), headers=headers, allow_redirects=False
        )
        where = self._where
        status = reply_for_status(response.code, response.phrase.decode("latin-1"), where)
        try:
            body = await _read(response, MAX_RESPONSE)
        except _TooLong:
            body = None
        except Exception as e:
            # The status came, the rest did not: what the body said of each
            # recipient is unknown, so nobody is settled.
            return dict.fromkeys(
                recipients,
                Reply(421, "4.4.2", f"connection to {where} lost in the response ({_describe(e)})"),
            )
        results = dict.fromkeys(recipients, status)
        if status.ok and body is not None and _is_json(response):
            results.update(self._per_recipient(body, recipients, where))
        elif not status.ok and body:
            detail = _first_line(body)
            if detail:
                results = dict.fromkeys(recipients, Reply(status.code, status.enhanced, f"{status.text}: {detail}"))
        return results

    def _per_recipient(
        self, body: bytes, recipients: Sequence[Address], where: str
    ) -> dict[Address, Reply]:
        """The replies a 2xx's JSON body gives some recipients (others are delivered)."""
        try:
            given = json.loads(body).get("recipients") or {}
        except (ValueError, AttributeError):
            return {}
        if not isinstance(given, dict):
            return {}
        wanted = {str(a): a for a in recipients}
        found: dict[Address, Reply] = {}
        for key, text in given.items():
            try:
                address = str(Address.parse(key)) if isinstance(key, str) else ""
            except AddressError:
                continue
            reply = client.parse_reply_text(text) if isinstance(text, str) else None
            if address in wanted and reply is not None:
                found[wanted[address]] = reply
            elif address in wanted:
                self._log.warn("{where} gave {recipient} no SMTP reply: {text!r}",
                               where=where, recipient=address, text=text)
        return found


def _timed_out(result: object, timeout: float) -> None:
    raise DeferredTimeout(timeout)


async def _nothing() -> None:
    return None


async def _read(response: Any, limit: int) -> bytes:
    """The response's body, at most ``limit`` octets (:raises _TooLong: beyond)."""
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise _TooLong()
        chunks.append(data)

    await treq.collect(response, collect)
    return b"".join(chunks)


def _is_json(response: Any) -> bool:
    types = response.headers.getRawHeaders(b"content-type") or [b""]
    return types[-1].split(b";")[0].strip().lower() == b"application/json"


def _first_line(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    line = text.splitlines()[0].strip() if text else ""
    return line[:200]


@implementer(ITransportPlugin)
@frozen
class HTTPTransportPlugin:
    """Makes an ``HTTPTransport`` for a route ``http:URL``."""

    name: str = "http"
    #: The keys of a route's ``[domains."..."]`` table that are the transport's (``mailhub.plugin``).
    config_keys: frozenset[str] = frozenset(
        {"connect_timeout", "timeout", "tls_verify", "tls_ca_file", "headers"}
    )

    def check_config(self, config: Mapping[str, Any]) -> None:
        """
        Check the route's target and options as ``make`` does (making a
        transport opens nothing).

        :raises ValueError: naming the key at fault (``target``: the route's target).
        """
        self.make(config, None)

    def make(self, config: Mapping[str, Any], reactor: Any) -> HTTPTransport:
        """
        :param config: ``target`` and the optional keys of the module
            docstring (``max_connections``, the domain's).
        :param reactor: an ``IReactorTime``, ``IReactorTCP`` and ``IReactorThreads``.
        :raises ValueError: naming the key at fault.
        """
        target = config.get("target")
        if not isinstance(target, str) or not target:
            raise ValueError("target: the route's target is missing")
        url = parse_target(target)

        def number(key: str, default: float) -> float:
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{key}: must be a number greater than 0, not {value!r}")
            return float(value)

        verify = config.get("tls_verify", True)
        if not isinstance(verify, bool):
            raise ValueError(f"tls_verify: must be true or false, not {verify!r}")
        ca_file = config.get("tls_ca_file")
        if ca_file is not None and (not isinstance(ca_file, str) or not ca_file):
            raise ValueError(f"tls_ca_file: must be the path of a PEM file, not {ca_file!r}")
        if ca_file is not None and not verify:
            raise ValueError("tls_ca_file: is used only with tls_verify = true")
        if ca_file is not None and not url.startswith("https:"):
            raise ValueError("tls_ca_file: means nothing for an http:// URL")
        headers = config.get("headers", {})
        if not isinstance(headers, Mapping):
            raise ValueError(f"headers: must be a table of header names and values, not {headers!r}")
        for name, value in headers.items():
            if not isinstance(name, str) or not _TOKEN.match(name):
                raise ValueError(f"headers: {name!r} is not a header name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"headers: {name} is set by the transport")
            if not isinstance(value, str) or any(ord(c) < 32 or ord(c) > 126 for c in value):
                raise ValueError(f"headers: the value of {name} must be printable ASCII text")
        count = config.get("max_connections", 10)
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ValueError(f"max_connections: must be a whole number greater than 0, not {count!r}")
        return HTTPTransport(
            reactor,
            url,
            connect_timeout=number("connect_timeout", 30),
            timeout=number("timeout", 300),
            tls_verify=verify,
            tls_ca_file=ca_file,
            headers=dict(headers),
            max_connections=count,
        )


plugin = HTTPTransportPlugin()

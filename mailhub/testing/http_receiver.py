"""
A real HTTP server to deliver to with the ``http`` transport: a
``twisted.web`` site on 127.0.0.1 (over TLS if given a certificate) that
takes the transport's POSTs and answers as a test tells it to.

By default it takes every message (``200``).  A test can make it refuse
recipients (``known_users``: the others get ``550 5.1.1`` in the JSON
body, ``recipient_replies``: any reply for one address), answer every
request with a status of its choosing (``status``), never answer
(``hang``), or be down (``stop``: its connections are closed too, so that
a client's kept connection does not outlive it)::

    receiver = HTTPReceiver(reactor)
    await receiver.start()
    route = "http:" + receiver.url()
    receiver.status = 503
    ...
    receiver.posts              # every request, as ReceivedPost
    await receiver.stop()
"""

from __future__ import annotations

import json
from typing import Any

from attrs import define, field
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509 import load_pem_x509_certificate
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mailhub.model import Address

__all__ = ["HTTPReceiver", "ReceivedPost"]


@define
class ReceivedPost:
    """
    One request the receiver took.

    :ivar path: the request's path.
    :ivar headers: the request's headers, names in lower case.
    :ivar envelope: the ``Mailhub-Envelope`` header, decoded (``{}`` without one).
    :ivar message: the body.
    :ivar status: the status it was answered with (``None``: never answered).
    :ivar accepted: the recipients it was delivered to (none unless 2xx).
    """

    path: str
    headers: dict[str, list[str]]
    envelope: dict[str, Any]
    message: bytes
    status: int | None
    accepted: list[str] = field(factory=list)


class _Mail(Resource):
    isLeaf = True

    def __init__(self, receiver: HTTPReceiver) -> None:
        super().__init__()
        self._receiver = receiver

    def render_POST(self, request: Request) -> bytes | int:
        return self._receiver._take(request)


class _Connections(WrappingFactory):
    """Keeps every open connection (so that ``stop`` can close them) and counts them."""

    def __init__(self, site: Site, receiver: HTTPReceiver) -> None:
        super().__init__(site)
        self._receiver = receiver

    def buildProtocol(self, addr: Any) -> Any:
        self._receiver.connections_made += 1
        return super().buildProtocol(addr)


@define(eq=False)
class HTTPReceiver:
    """
    The server; see the module docstring.

    :ivar known_users: if not ``None``, only these addresses take mail; the
        others get ``550 5.1.1`` in a 200's JSON body.
    :ivar recipient_replies: address to the reply text its JSON entry gives
        (``"452 4.2.2 Mailbox full"``).
    :ivar status: the status of every answer (``200`` by default).
    :ivar hang: never answer (the connection stays open).
    :ivar posts: every request taken, oldest first.
    :ivar connections_made: how many connections clients opened.
    """

    _reactor: Any
    known_users: set[str] | None = None
    recipient_replies: dict[str, str] = field(factory=dict)
    status: int = 200
    hang: bool = False
    posts: list[ReceivedPost] = field(factory=list)
    connections_made: int = 0
    port: int = 0
    tls: bool = False
    _listening: IListeningPort | None = None
    _connections: _Connections | None = None

    def start(self, port: int = 0, certificate: tuple[str, str] | None = None) -> Deferred[None]:
        """
        Listen on 127.0.0.1.

        :param port: ``0`` for a free port (``port`` then says which).
        :param certificate: ``(certificate PEM path, key PEM path)`` to speak
            HTTPS (read here, blocking: call it from a fixture).
        """
        site = Site(_Mail(self))
        site.displayTracebacks = False
        factory = self._connections = _Connections(site, self)
        if certificate is not None:
            cert_path, key_path = certificate
            with open(cert_path, "rb") as c, open(key_path, "rb") as k:
                pem = c.read() + k.read()
            options = CertificateOptions(
                privateKey=load_pem_private_key(pem, password=None),  # type: ignore[arg-type]
                certificate=load_pem_x509_certificate(pem),  # type: ignore[arg-type]
            )
            self._listening = self._reactor.listenSSL(port, factory, options, interface="127.0.0.1")
            self.tls = True
        else:
            self._listening = self._reactor.listenTCP(port, factory, interface="127.0.0.1")
            self.tls = False
        assert self._listening is not None
        address: Any = self._listening.getHost()
        self.port = address.port
        return succeed(None)

    def url(self, path: str = "/mail", host: str = "127.0.0.1") -> str:
        """The URL a route POSTs to (``http:`` + this)."""
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def stop(self) -> Deferred[None]:
        """Stop listening and close every connection (the server is down)."""
        listening, self._listening = self._listening, None
        connections, self._connections = self._connections, None
        for protocol in list(connections.protocols if connections is not None else ()):
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        if listening is None:
            return succeed(None)
        d = listening.stopListening()
        return d if isinstance(d, Deferred) else succeed(None)

    def messages_for(self, address: str) -> list[bytes]:
        """The messages delivered (answered 2xx and not refused) to ``address``."""
        return [p.message for p in self.posts if address in p.accepted]

    def _take(self, request: Request) -> bytes | int:
        assert request.content is not None
        message = request.content.read()
        headers = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        try:
            envelope = json.loads(headers.get("mailhub-envelope", ["{}"])[-1])
        except ValueError:
            envelope = {}
        path = request.path.decode("latin-1")
        if self.hang:
            self.posts.append(ReceivedPost(path, headers, envelope, message, None))
            return NOT_DONE_YET
        post = ReceivedPost(path, headers, envelope, message, self.status)
        self.posts.append(post)
        request.setResponseCode(self.status)
        if not 200 <= self.status < 300:
            request.setHeader(b"content-type", b"text/plain")
            return b"the receiver says %d\n" % self.status
        replies: dict[str, str] = {}
        for recipient in envelope.get("recipients", []):
            text = self.recipient_replies.get(recipient)
            if text is None and self.known_users is not None and recipient not in self.known_users:
                text = f"550 5.1.1 <{recipient}> no such user"
            if text is None:
                post.accepted.append(str(Address.parse(recipient)))
            else:
                replies[recipient] = text
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"recipients": replies}).encode()

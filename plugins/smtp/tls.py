"""
STARTTLS for the ``smtp`` transport (RFC 3207): the ``tls``, ``tls_verify``
and ``tls_ca_file`` options, the client TLS context, and the upgrade of a
greeted connection.

What a failure means for the message (a retry, or a new connection in
clear) is the transport's decision (``transport``); this module only says
what happened.  It opens no connection of its own; the CA file is read in
the reactor's thread pool, never on the reactor thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from attrs import define, field, frozen
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailhub.model import Reply
from mailhub.smtp.client import SMTPClientProtocol, read_ca_file

__all__ = ["TLS_MODES", "StartTLS", "TLSFailed", "TLSSetupError", "tls_config"]

TLS_MODES = ("opportunistic", "required", "none")
"""The values of the ``tls`` option."""


@frozen
class TLSFailed:
    """The TLS handshake with ``peer`` failed (the connection is closed)."""

    peer: str
    why: str


class TLSSetupError(Exception):
    """Our side of TLS cannot be set up (``tls_ca_file`` unreadable, say)."""


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def tls_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """
    The ``tls``, ``tls_verify`` and ``tls_ca_file`` options, checked.

    :raises ValueError: naming the key at fault.
    """
    tls = config.get("tls", "opportunistic")
    if tls not in TLS_MODES:
        raise ValueError(f"tls: must be one of {', '.join(map(repr, TLS_MODES))}, not {tls!r}")
    verify = config.get("tls_verify", False)
    if not isinstance(verify, bool):
        raise ValueError(f"tls_verify: must be true or false, not {verify!r}")
    ca_file = config.get("tls_ca_file")
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file):
        raise ValueError(f"tls_ca_file: must be the path of a PEM file, not {ca_file!r}")
    if tls == "none" and (verify or ca_file is not None):
        key = "tls_verify" if verify else "tls_ca_file"
        raise ValueError(f'{key}: means nothing with tls = "none"')
    if ca_file is not None and not verify:
        raise ValueError("tls_ca_file: is used only with tls_verify = true")
    return {"tls": tls, "tls_verify": verify, "tls_ca_file": ca_file}


@define(eq=False)
class StartTLS:
    """
    A route's STARTTLS settings, and the upgrade of its connections.

    :param reactor: its thread pool reads ``tls_ca_file`` (once).
    :param mode: ``"opportunistic"``, ``"required"`` or ``"none"``.
    :param verify: verify the server's certificate for the host connected to.
    :param ca_file: trust the CA certificates in this PEM file, rather than
        the system's, when verifying.
    """

    _reactor: Any
    mode: str = "opportunistic"
    verify: bool = False
    ca_file: str | None = None
    _ca_certificates: list[Certificate] | None = field(init=False, default=None)
    _log: ClassVar[Logger] = Logger()

    async def upgrade(
        self,
        protocol: SMTPClientProtocol,
        host: str,
        peer: str,
        hostname: str,
        timeout: float,
    ) -> Reply | TLSFailed | None:
        """
        Upgrade a greeted connection with STARTTLS and say EHLO again.

        :param host: the name the certificate is verified for.
        :param peer: the server, as log lines and replies name it.
        :param hostname: our EHLO name.
        :param timeout: for each reply.
        :returns: ``None`` when the connection may carry the message (over
            TLS, or in clear where ``tls = "opportunistic"`` allows it), else
            the reply for the recipients, or ``TLSFailed``.
        """
        required = self.mode == "required"
        if "STARTTLS" not in protocol.extensions:
            if required:
                return Reply(
                    421, "4.7.4", f"{peer} does not offer STARTTLS, and the route requires TLS"
                )
            return None
        reply = await protocol.command(b"STARTTLS", timeout)
        if reply.code != 220:
            if reply.code == 421 or protocol.broken:
                return reply
            if required:
                return Reply(
                    421, "4.7.4", f"{peer} refused STARTTLS ({reply}), and the route requires TLS"
                )
            # RFC 3207: the session goes on, in clear, as if STARTTLS was never offered.
            self._log.info("{peer} refused STARTTLS ({reply}): going on without TLS",
                           peer=peer, reply=str(reply))
            return None
        try:
            options = await self.options(host)
        except TLSSetupError as e:
            protocol.abort()
            return Reply(421, "4.7.5", str(e))
        failed = await protocol.start_tls(options, timeout)
        if failed is not None:
            return TLSFailed(peer, failed)
        # RFC 3207: forget everything learnt before TLS, and ask again.
        reply = await protocol.hello(hostname, timeout, helo_too=False)
        if not reply.ok:
            return reply
        return None

    async def options(self, host: str) -> IOpenSSLClientConnectionCreator | CertificateOptions:
        """
        The client TLS context for ``host``: no verification (``verify``
        false), else verification of ``host`` against ``ca_file`` (read
        once, in a thread) or the system's trusted CAs.

        :raises TLSSetupError: if ``ca_file`` cannot be read.
        """
        if not self.verify:
            # Encryption against eavesdropping only: customers' own servers
            # often have self-signed certificates.
            return CertificateOptions(verify=False)
        trust: Any  # IOpenSSLTrustRoot, which Twisted keeps private
        if self.ca_file is None:
            trust = platformTrust()
        else:
            if self._ca_certificates is None:
                try:
                    self._ca_certificates = await deferToThreadPool(
                        self._reactor, self._reactor.getThreadPool(), read_ca_file, self.ca_file
                    )
                except Exception as e:
                    raise TLSSetupError(f"tls_ca_file: cannot use {self.ca_file}: {_describe(e)}")
            trust = trustRootFromCertificates(self._ca_certificates)
        return optionsForClientTLS(host, trustRoot=trust)

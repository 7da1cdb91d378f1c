"""
The ``smtp`` transport plugin: routes ``smtp:HOST[:PORT]`` and ``smtp:mx``;
see ``transport`` (delivery), ``pool`` (the connection pool) and ``tls``
(STARTTLS).
"""

from .tls import TLS_MODES
from .transport import SMTPTransport, SMTPTransportPlugin, parse_target, plugin

__all__ = ["TLS_MODES", "SMTPTransport", "SMTPTransportPlugin", "parse_target", "plugin"]

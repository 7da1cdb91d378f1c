"""
The ``lmtp`` transport plugin (RFC 2033: Dovecot, Cyrus): routes
``lmtp:HOST:PORT`` and ``lmtp:unix:/path``; see ``transport``.
"""

from .transport import DEFAULT_PORT, LMTPTransport, LMTPTransportPlugin, parse_target, plugin

__all__ = ["DEFAULT_PORT", "LMTPTransport", "LMTPTransportPlugin", "parse_target", "plugin"]

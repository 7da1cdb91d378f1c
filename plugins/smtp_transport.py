"""Kept for old imports and for the entry points of installs made before
the ``smtp`` plugin became the package ``mailhub.plugins.smtp``: use that."""

from mailhub.plugins.smtp import SMTPTransport, SMTPTransportPlugin, parse_target, plugin

__all__ = ["SMTPTransport", "SMTPTransportPlugin", "parse_target", "plugin"]

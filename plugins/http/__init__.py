"""
The ``http`` transport plugin: each entry as a POST of the raw message to a
URL, with treq (routes ``http:https://host/path``); see ``transport``.
"""

from .transport import HTTPTransport, HTTPTransportPlugin, parse_target, plugin, reply_for_status

__all__ = ["HTTPTransport", "HTTPTransportPlugin", "parse_target", "plugin", "reply_for_status"]

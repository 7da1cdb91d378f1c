"""
The web listener's access log, without what must not be written down: the
token of a password link (``/reset/TOKEN``, ``/invite/TOKEN``: whoever
reads the log could set the password while the link works) and the values
of query strings (what people searched for, ``/mail?q=...``).  Otherwise
Twisted's combined log format, one line per request.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import provider

__all__ = ["access_log_line", "redacted_uri"]

_LINK = re.compile(rb"^(/(?:reset|invite)/)[^/?#]+")


def redacted_uri(uri: bytes) -> bytes:
    """``uri`` with a password link's token and every query value replaced by ``-``."""
    path, sep, query = uri.partition(b"?")
    path = _LINK.sub(rb"\1-", path)
    if sep:
        query = b"&".join(
            name + (b"=-" if has_value else b"")
            for name, has_value, _ in (part.partition(b"=") for part in query.split(b"&"))
        )
    return path + sep + query


class _Redacted:
    """The request as the log line sees it: its URI redacted, the rest as it is."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.uri = redacted_uri(request.uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


@provider(IAccessLogFormatter)
def access_log_line(timestamp: str, request: Any) -> str:
    """A combined-format line for ``request``, redacted (``redacted_uri``)."""
    return str(combinedLogFormatter(timestamp, _Redacted(request)))

"""The web access log writes no password link's token and no search terms."""

from __future__ import annotations

import pytest
from twisted.web.test.requesthelper import DummyRequest

from mailhub.web.accesslog import access_log_line, redacted_uri


@pytest.mark.parametrize(("uri", "logged"), [
    (b"/reset/eyJhIjoiYWxpY2UifQ.c2ln", b"/reset/-"),
    (b"/invite/eyJhIjoiYm9iIn0.c2ln?x=1", b"/invite/-?x=-"),
    (b"/mail?q=secretword&mailbox=alice%40example.com", b"/mail?q=-&mailbox=-"),
    (b"/mail?flag", b"/mail?flag"),
    (b"/login", b"/login"),
    (b"/resetting/abc", b"/resetting/abc"),
    (b"/mail/reset/abc", b"/mail/reset/abc"),
])
def test_links_and_query_values_are_not_logged(uri: bytes, logged: bytes) -> None:
    assert redacted_uri(uri) == logged


def test_the_line_is_twisteds_combined_format_with_the_uri_redacted() -> None:
    request = DummyRequest([b"reset", b"tok"])
    request.uri = b"/reset/eyJ0b2tlbiI6MX0.c2lnbmF0dXJl"
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    request.code = 200
    request.sentLength = 512
    line = access_log_line("[08/Dec/2026:00:00:00 +0000]", request)
    assert '"GET /reset/- HTTP/1.1" 200 512' in line
    assert "eyJ0b2tlbiI6MX0" not in line

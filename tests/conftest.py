"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailhub.testing.downstream import DownstreamServer


@pytest.fixture
def downstream() -> Iterator[DownstreamServer]:
    """A real downstream SMTP server ("the organisation's server") on 127.0.0.1, a free port."""
    server = DownstreamServer(reactor)
    pytest_twisted.blockon(server.start(port=0))
    yield server
    pytest_twisted.blockon(server.stop())

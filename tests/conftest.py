"""
Fixtures shared by the test modules, and the ``--slow`` flag: tests marked
``slow`` (the long part of the fault suite in ``tests/faults``: bigger
counts, Sentinel, a 50 MB message) are deselected unless pytest is given
``--slow`` or the environment has ``MAILHUB_SLOW=1``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailhub.testing.downstream import DownstreamServer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow", action="store_true", default=False,
        help="also run the tests marked slow (the long part of tests/faults); MAILHUB_SLOW=1 does the same",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: the long part of the fault suite; runs only with --slow or MAILHUB_SLOW=1")


def slow_enabled(config: pytest.Config) -> bool:
    """Whether the long part runs: ``--slow`` or ``MAILHUB_SLOW=1``."""
    return bool(config.getoption("--slow")) or os.environ.get("MAILHUB_SLOW", "") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if slow_enabled(config):
        return
    # Deselected, not skipped: without the flag they are not part of the run at all.
    deselected = [item for item in items if item.get_closest_marker("slow") is not None]
    if deselected:
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]
        config.hook.pytest_deselected(items=deselected)


@pytest.fixture
def slow(request: pytest.FixtureRequest) -> bool:
    """Whether the long part runs: tests scale their counts up with it."""
    return slow_enabled(request.config)


@pytest.fixture
def downstream() -> Iterator[DownstreamServer]:
    """A real downstream SMTP server ("the organisation's server") on 127.0.0.1, a free port."""
    server = DownstreamServer(reactor)
    pytest_twisted.blockon(server.start(port=0))
    yield server
    pytest_twisted.blockon(server.stop())

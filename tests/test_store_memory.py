"""The ``memory`` store against the spool-store contract."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mailhub.interfaces import IStorePlugin
from mailhub.model import Address, StoreUnavailable
from mailhub.plugin import load_plugin
from mailhub.plugins.memory_store import MemorySpoolStore, plugin
from mailhub.testing.store_contract import (
    LeaseReclaimContract,
    NodeRegistryContract,
    RouteCoordinationContract,
    SpoolControlContract,
    SpoolStoreContract,
    envelope,
)


class TestMemorySpoolStore(
    SpoolStoreContract, NodeRegistryContract, RouteCoordinationContract, LeaseReclaimContract,
    SpoolControlContract,
):
    @pytest.fixture
    def store(self) -> MemorySpoolStore:
        return plugin.make({}, Clock())


def test_plugin_provides_store_plugin() -> None:
    """The entry point object is an ``IStorePlugin`` named ``memory``."""
    assert verifyObject(IStorePlugin, plugin)
    assert plugin.name == "memory"


def test_plugin_found_by_name() -> None:
    """The core finds the store through its entry point."""
    assert load_plugin("mailhub.stores", "memory") is plugin


def test_unavailable_store_fails_every_call() -> None:
    """A test can make the store fail, to check how callers cope."""
    store = plugin.make({}, Clock())
    store.unavailable = True
    failures: list[object] = []
    store.enqueue(
        envelope(), b"x", {"smtp:b.example": [Address("a", "b.example")]}, "dallas"
    ).addErrback(failures.append)
    store.counts().addErrback(failures.append)
    assert len(failures) == 2
    assert all(f.check(StoreUnavailable) for f in failures)  # type: ignore[attr-defined]

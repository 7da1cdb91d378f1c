"""The ``memory`` archive against the archive and account-store contracts."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mailhub.interfaces import IArchivePlugin
from mailhub.model import ArchiveQuery, ArchiveScope, StoreUnavailable, archive_words_occur
from mailhub.model import archive_words as words
from mailhub.plugin import load_plugin
from mailhub.plugins.memory_archive import MemoryArchive, plugin
from mailhub.testing.account_contract import AccountStoreContract, account
from mailhub.testing.archive_contract import ALICE, ArchiveContract, archived


class TestMemoryArchive(ArchiveContract, AccountStoreContract):
    @pytest.fixture
    def archive(self) -> MemoryArchive:
        return plugin.make({}, Clock())


def test_plugin_provides_archive_plugin() -> None:
    """The entry point object is an ``IArchivePlugin`` named ``memory``."""
    assert verifyObject(IArchivePlugin, plugin)
    assert plugin.name == "memory"


def test_plugin_found_by_name() -> None:
    """The core finds the archive through its entry point."""
    assert load_plugin("mailhub.archives", "memory") is plugin


def test_words_fold_case_and_accents() -> None:
    assert words("Le CAFÉ, prêt_à-porter 你好") == ["le", "cafe", "pret", "a", "porter", "你好"]


def test_words_occur_in_a_row_the_last_as_a_start() -> None:
    """How every archive plugin matches a term's words against a field's (a mailbox's address in scope)."""
    address = words("bob.smith@a.example")
    assert archive_words_occur(["bob", "sm"], address)
    assert archive_words_occur(["smith", "a", "ex"], address)
    assert not archive_words_occur(["bob", "sm"], address, prefix=False)
    assert not archive_words_occur(["smith", "bob"], address)
    assert not archive_words_occur(["ob"], address)
    assert archive_words_occur([], address)


def test_unavailable_archive_fails_every_call() -> None:
    """A test can make the archive fail, to check how callers cope."""
    archive = plugin.make({}, Clock())
    archive.unavailable = True
    failures: list[object] = []
    archive.add(archived("x")).addErrback(failures.append)
    archive.search(ArchiveScope(), ArchiveQuery()).addErrback(failures.append)
    archive.get("x").addErrback(failures.append)
    assert len(failures) == 3
    assert all(f.check(StoreUnavailable) for f in failures)  # type: ignore[attr-defined]


def test_unavailable_archive_fails_account_calls() -> None:
    """The accounts are as unreachable as the messages when the archive is down."""
    archive = plugin.make({}, Clock())
    archive.unavailable = True
    failures: list[object] = []
    archive.add_account(account(ALICE)).addErrback(failures.append)
    archive.account(ALICE).addErrback(failures.append)
    archive.read_ids(ALICE, ["x"]).addErrback(failures.append)
    archive.sent(ALICE, None, 10).addErrback(failures.append)
    assert len(failures) == 4
    assert all(f.check(StoreUnavailable) for f in failures)  # type: ignore[attr-defined]

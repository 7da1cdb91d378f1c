"""
The account-store contract: what every ``IAccountStore`` must do.

An archive plugin that also keeps the LiveArchive's accounts adds
``AccountStoreContract`` to the bases of its test class, beside
``ArchiveContract``; both ask for the same ``archive`` fixture (a fresh,
empty archive per test)::

    class TestMyArchive(ArchiveContract, AccountStoreContract):
        @pytest.fixture
        def archive(self, tmp_path):
            ...

What the suite settles where ``IAccountStore`` leaves room:

- Accounts are keyed by their folded address (``Address.folded``: the
  local part and the domain in lower case): ``Alice@`` and ``alice@`` are
  one account, ``alice@``, and every method taking an account's address
  reaches it however the local part is written.  ``accounts(domain)``
  ignores the case of ``domain``.
- ``accounts`` gives the accounts in ``Address`` order (local part, then
  domain), as ``sorted()`` of the addresses does.
- Every field of an ``Account`` comes back as it went in: ``role`` a
  ``Role``, ``mailboxes`` a tuple of ``Address`` in the order given (folded,
  as ``Account`` keeps them), text with any character.
- ``set_read`` needs no account and no archived message of that id; marking
  read twice, or unread what was never read, is no error.  ``read_ids``
  fires with a ``set`` (or ``frozenset``) of ``str``.
- ``sent`` orders by ``sent_at`` newest first, messages sent at the same
  time by id, the greater first; ``before`` is exclusive.  Adding a
  ``SentMessage`` whose id its account already has keeps the first (a
  retry after a lost answer stores nothing twice); ids are per account.
- ``sent_message`` gives only the account's own message: asked with another
  account's address, it fires with ``None``.

That the accounts survive closing and opening the archive again is for the
plugin's own tests: the suite cannot reopen an archive.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from mailhub.interfaces import IAccountStore
from mailhub.model import Account, Address, Role, SentMessage
from mailhub.testing.archive_contract import ALICE, BOB, DAVE, NOW, ODD_MESSAGE

__all__ = ["AccountStoreContract", "account", "sent"]

#: An argon2 hash as ``mailhub.archive.accounts`` makes them (of nothing secret).
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2g"
ZOE = Address("zoë.ünïcode", "b.example")
SHARED = Address("shared", "a.example")


def _as_tuple(items: Iterable[Any]) -> Any:
    # mypy cannot solve the attrs ``converter=tuple`` of the model's fields.
    return tuple(items)


def account(address: Address, **fields: Any) -> Account:
    """An ``Account`` of ``address``; a list given for ``mailboxes`` becomes a tuple."""
    if "mailboxes" in fields:
        fields["mailboxes"] = _as_tuple(fields["mailboxes"])
    return Account(address, **fields)


def sent(
    id: str, who: Address = ALICE, at: float = NOW, message: bytes | None = None
) -> SentMessage:
    """A ``SentMessage``; its bytes, unless given, name its id."""
    if message is None:
        message = f"Subject: {id}\r\nFrom: {who}\r\n\r\nsent as {id}\r\n".encode()
    return SentMessage(id, who, at, message)


class AccountStoreContract:
    """
    Tests every ``IAccountStore`` passes.

    The tests ask for an ``archive`` fixture: a fresh, empty archive per test,
    that provides ``IAccountStore``.
    """

    # -- the interface --------------------------------------------------

    def test_provides_account_store(self, archive: Any) -> None:
        """The archive provides every method of ``IAccountStore``."""
        assert verifyObject(IAccountStore, archive)

    # -- accounts -------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_unknown_account_is_none(self, archive: Any) -> None:
        assert await archive.account(ALICE) is None

    @pytest_twisted.ensureDeferred
    async def test_account_round_trips_every_field(self, archive: Any) -> None:
        """Every field, unicode text and the order of the mailboxes come back as added."""
        added = account(
            ZOE,
            password_hash=HASH,
            role=Role.DOMAIN_ADMIN,
            mailboxes=[SHARED, Address("équipe", "b.example"), Address("Ops", "c.example")],
            totp_secret="JBSWY3DPEHPK3PXP",
            recovery="zoë@elsewhere.example",
            disabled=True,
            session_version=7,
            created=NOW + 0.25,
            ended_sessions=[("a1b2c3", NOW + 3600.5), ("d4e5f6", NOW + 7200.0)],
        )
        await archive.add_account(added)
        got = await archive.account(ZOE)
        assert got == added
        assert got.ended_sessions == (("a1b2c3", NOW + 3600.5), ("d4e5f6", NOW + 7200.0))
        assert got.role is Role.DOMAIN_ADMIN
        assert type(got.mailboxes) is tuple
        assert all(type(m) is Address for m in got.mailboxes)
        assert type(got.session_version) is int
        assert type(got.disabled) is bool

    @pytest_twisted.ensureDeferred
    async def test_account_with_defaults_round_trips(self, archive: Any) -> None:
        """An invited account: no password yet, no mailboxes, no second factor."""
        await archive.add_account(account(ALICE))
        got = await archive.account(ALICE)
        assert got == Account(ALICE)
        assert got.mailboxes == ()

    @pytest.mark.parametrize("role", list(Role))
    @pytest_twisted.ensureDeferred
    async def test_every_role_round_trips(self, archive: Any, role: Role) -> None:
        await archive.add_account(account(ALICE, role=role))
        assert (await archive.account(ALICE)).role is role

    @pytest_twisted.ensureDeferred
    async def test_adding_an_existing_address_fails_with_key_error(self, archive: Any) -> None:
        """A second add of one address fails and leaves the first account as it was."""
        first = account(ALICE, password_hash=HASH, session_version=3)
        await archive.add_account(first)
        with pytest.raises(KeyError):
            await archive.add_account(account(ALICE, role=Role.HUB_ADMIN))
        assert await archive.account(ALICE) == first

    @pytest_twisted.ensureDeferred
    async def test_update_replaces_the_account(self, archive: Any) -> None:
        await archive.add_account(account(ALICE, password_hash=HASH, mailboxes=[SHARED]))
        changed = account(
            ALICE,
            password_hash="",
            role=Role.HUB_ADMIN,
            mailboxes=[],
            totp_secret="KRSXG5CTMVRXEZLU",
            recovery="alice@home.example",
            disabled=True,
            session_version=1,
            created=NOW,
        )
        await archive.update_account(changed)
        assert await archive.account(ALICE) == changed

    @pytest_twisted.ensureDeferred
    async def test_update_leaves_other_accounts(self, archive: Any) -> None:
        await archive.add_account(account(ALICE))
        await archive.add_account(account(BOB, session_version=2))
        await archive.update_account(account(ALICE, disabled=True))
        assert await archive.account(BOB) == account(BOB, session_version=2)

    @pytest_twisted.ensureDeferred
    async def test_update_of_a_missing_account_fails_with_key_error(self, archive: Any) -> None:
        """Nothing is created by an update of an address without an account."""
        with pytest.raises(KeyError):
            await archive.update_account(account(ALICE, role=Role.HUB_ADMIN))
        assert await archive.account(ALICE) is None
        assert await archive.accounts(None) == []

    @pytest_twisted.ensureDeferred
    async def test_accounts_of_a_domain_only_by_address(self, archive: Any) -> None:
        """``accounts(domain)`` gives that domain's accounts, in ``Address`` order."""
        for address in (BOB, DAVE, Address("a.b", "a.example"), ALICE, Address("a", "a.example")):
            await archive.add_account(account(address))
        got = await archive.accounts("a.example")
        assert [a.address for a in got] == [
            Address("a", "a.example"),
            Address("a.b", "a.example"),
            ALICE,
            BOB,
        ]
        assert [a.address for a in await archive.accounts("b.example")] == [DAVE]
        assert await archive.accounts("c.example") == []

    @pytest_twisted.ensureDeferred
    async def test_accounts_of_a_domain_ignores_its_case(self, archive: Any) -> None:
        await archive.add_account(account(ALICE))
        assert [a.address for a in await archive.accounts("A.Example")] == [ALICE]

    @pytest_twisted.ensureDeferred
    async def test_accounts_of_none_is_every_account(self, archive: Any) -> None:
        addresses = [DAVE, BOB, ZOE, ALICE, Address("alice", "b.example")]
        for address in addresses:
            await archive.add_account(account(address))
        got = await archive.accounts(None)
        assert [a.address for a in got] == sorted(addresses)
        assert all(isinstance(a, Account) for a in got)

    @pytest_twisted.ensureDeferred
    async def test_accounts_come_back_whole(self, archive: Any) -> None:
        """The accounts of a listing are the accounts, every field."""
        added = account(ALICE, password_hash=HASH, role=Role.USER, mailboxes=[SHARED])
        await archive.add_account(added)
        assert await archive.accounts("a.example") == [added]

    @pytest_twisted.ensureDeferred
    async def test_an_account_is_one_whatever_the_case_of_its_local_part(self, archive: Any) -> None:
        """
        An account added as ``Alice@A.Example`` is ``alice@a.example``'s: a
        login typed ``ALICE@a.example`` reaches it, and a second account
        that only differs in case is refused.
        """
        upper = account(Address("Alice", "A.Example"), session_version=1, mailboxes=[Address("Shared", "a.example")])
        await archive.add_account(upper)
        for typed in (Address("Alice", "a.example"), Address("ALICE", "A.EXAMPLE"), ALICE):
            got = await archive.account(typed)
            assert got == upper, typed
            assert got.address == ALICE
            assert got.mailboxes == (SHARED,)
        with pytest.raises(KeyError):
            await archive.add_account(account(Address("aLiCe", "a.example")))
        await archive.update_account(account(Address("ALICE", "a.example"), session_version=2))
        assert (await archive.account(ALICE)).session_version == 2
        assert [a.address for a in await archive.accounts("a.example")] == [ALICE]

    @pytest_twisted.ensureDeferred
    async def test_read_flags_and_sent_of_an_account_whatever_its_case(self, archive: Any) -> None:
        """Read flags and the Sent folder belong to the folded address, as the account does."""
        await archive.set_read(Address("Alice", "a.example"), ["m1", "m2"], True)
        await archive.set_read(Address("ALICE", "a.example"), ["m2"], False)
        assert await archive.read_ids(ALICE, ["m1", "m2"]) == {"m1"}
        await archive.add_sent(sent("s1", Address("Alice", "a.example")))
        await archive.add_sent(sent("s1", ALICE))  # the same message: kept once
        assert [m.id for m in await archive.sent(Address("ALICE", "a.example"), None, 10)] == ["s1"]
        got = await archive.sent_message(Address("aLICE", "a.example"), "s1")
        assert got is not None and got.account == ALICE

    # -- read flags -----------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_nothing_is_read_at_first(self, archive: Any) -> None:
        assert set(await archive.read_ids(ALICE, ["m1", "m2"])) == set()
        assert set(await archive.read_ids(ALICE, [])) == set()

    @pytest_twisted.ensureDeferred
    async def test_read_ids_gives_only_the_ids_asked_for(self, archive: Any) -> None:
        await archive.set_read(ALICE, ["m1", "m2", "m3"], True)
        got = await archive.read_ids(ALICE, ["m1", "m3", "m4"])
        assert got == {"m1", "m3"}
        assert all(type(i) is str for i in got)
        assert await archive.read_ids(ALICE, ["m2"]) == {"m2"}
        assert await archive.read_ids(ALICE, []) == set()

    @pytest_twisted.ensureDeferred
    async def test_unread_again(self, archive: Any) -> None:
        await archive.set_read(ALICE, ["m1", "m2"], True)
        await archive.set_read(ALICE, ["m1"], False)
        assert await archive.read_ids(ALICE, ["m1", "m2"]) == {"m2"}
        await archive.set_read(ALICE, ["m1"], True)
        assert await archive.read_ids(ALICE, ["m1", "m2"]) == {"m1", "m2"}

    @pytest_twisted.ensureDeferred
    async def test_marking_twice_or_unread_never_read_is_no_error(self, archive: Any) -> None:
        await archive.set_read(ALICE, ["m1"], True)
        await archive.set_read(ALICE, ["m1", "m1"], True)
        await archive.set_read(ALICE, ["m2"], False)
        await archive.set_read(ALICE, [], True)
        assert await archive.read_ids(ALICE, ["m1", "m2"]) == {"m1"}

    @pytest_twisted.ensureDeferred
    async def test_read_flags_are_per_account(self, archive: Any) -> None:
        """What Alice reads stays unread for Bob, and Bob's unread leaves hers."""
        await archive.set_read(ALICE, ["m1", "m2"], True)
        await archive.set_read(BOB, ["m2"], True)
        await archive.set_read(BOB, ["m1", "m2"], False)
        assert await archive.read_ids(BOB, ["m1", "m2"]) == set()
        assert await archive.read_ids(ALICE, ["m1", "m2"]) == {"m1", "m2"}
        assert await archive.read_ids(Address("alice", "b.example"), ["m1", "m2"]) == set()

    @pytest_twisted.ensureDeferred
    async def test_read_flags_of_many_ids(self, archive: Any) -> None:
        """A page of a thousand and more ids (more than one SQL statement may take) at once."""
        ids = [f"id-{i:05d}" for i in range(2500)]
        await archive.set_read(DAVE, ids[::2], True)
        assert await archive.read_ids(DAVE, ids) == set(ids[::2])
        await archive.set_read(DAVE, ids, False)
        assert await archive.read_ids(DAVE, ids) == set()

    @pytest_twisted.ensureDeferred
    async def test_read_flags_of_unusual_ids(self, archive: Any) -> None:
        ids = ["ü-1", "with space", "a'quote\"", "x" * 300]
        await archive.set_read(ZOE, ids, True)
        assert await archive.read_ids(ZOE, [*ids, "other"]) == set(ids)

    # -- the Sent folder ------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_sent_is_empty_at_first(self, archive: Any) -> None:
        assert list(await archive.sent(ALICE, None, 10)) == []
        assert await archive.sent_message(ALICE, "s1") is None

    @pytest_twisted.ensureDeferred
    async def test_sent_message_round_trips_exactly(self, archive: Any) -> None:
        """Every byte (NUL, 8-bit, lone CR/LF) and every field come back as added."""
        message = sent("odd", ZOE, NOW + 0.5, ODD_MESSAGE)
        await archive.add_sent(message)
        got = await archive.sent_message(ZOE, "odd")
        assert got == message
        assert type(got.message) is bytes
        assert [m.message for m in await archive.sent(ZOE, None, 10)] == [ODD_MESSAGE]

    @pytest_twisted.ensureDeferred
    async def test_sent_is_newest_first(self, archive: Any) -> None:
        for i in (2, 0, 3, 1):
            await archive.add_sent(sent(f"s{i}", ALICE, NOW + i))
        got = await archive.sent(ALICE, None, 10)
        assert [m.id for m in got] == ["s3", "s2", "s1", "s0"]
        assert all(isinstance(m, SentMessage) for m in got)
        assert got[0] == sent("s3", ALICE, NOW + 3)

    @pytest_twisted.ensureDeferred
    async def test_sent_at_the_same_time_by_id(self, archive: Any) -> None:
        for id in ("b", "c", "a"):
            await archive.add_sent(sent(id, ALICE, NOW))
        await archive.add_sent(sent("z", ALICE, NOW - 1))
        assert [m.id for m in await archive.sent(ALICE, None, 10)] == ["c", "b", "a", "z"]

    @pytest_twisted.ensureDeferred
    async def test_sent_limit(self, archive: Any) -> None:
        for i in range(5):
            await archive.add_sent(sent(f"s{i}", ALICE, NOW + i))
        assert [m.id for m in await archive.sent(ALICE, None, 2)] == ["s4", "s3"]
        assert list(await archive.sent(ALICE, None, 0)) == []

    @pytest_twisted.ensureDeferred
    async def test_sent_before_is_exclusive_and_pages(self, archive: Any) -> None:
        """``before`` the oldest of a page gives the next page; all pages give every message once."""
        for i in range(7):
            await archive.add_sent(sent(f"s{i}", ALICE, NOW + i))
        assert [m.id for m in await archive.sent(ALICE, NOW + 3, 10)] == ["s2", "s1", "s0"]
        assert [m.id for m in await archive.sent(ALICE, NOW + 3, 2)] == ["s2", "s1"]
        assert list(await archive.sent(ALICE, NOW, 10)) == []
        seen: list[str] = []
        before = None
        for _ in range(10):
            page = list(await archive.sent(ALICE, before, 3))
            if not page:
                break
            assert len(page) <= 3
            seen += [m.id for m in page]
            before = page[-1].sent_at
        assert seen == [f"s{i}" for i in reversed(range(7))]

    @pytest_twisted.ensureDeferred
    async def test_sent_is_per_account(self, archive: Any) -> None:
        """Each account sees its own Sent folder; another's message is ``None``."""
        await archive.add_sent(sent("a1", ALICE, NOW))
        await archive.add_sent(sent("b1", BOB, NOW + 1))
        assert [m.id for m in await archive.sent(ALICE, None, 10)] == ["a1"]
        assert [m.id for m in await archive.sent(BOB, None, 10)] == ["b1"]
        assert await archive.sent_message(BOB, "a1") is None
        assert await archive.sent_message(ALICE, "b1") is None
        assert await archive.sent_message(Address("alice", "b.example"), "a1") is None
        assert (await archive.sent_message(ALICE, "a1")).account == ALICE
        assert list(await archive.sent(DAVE, None, 10)) == []

    @pytest_twisted.ensureDeferred
    async def test_sent_ids_are_per_account(self, archive: Any) -> None:
        """Two accounts may each have a message of one id; neither hides the other."""
        await archive.add_sent(sent("same", ALICE, NOW, b"from alice\r\n"))
        await archive.add_sent(sent("same", BOB, NOW, b"from bob\r\n"))
        assert (await archive.sent_message(ALICE, "same")).message == b"from alice\r\n"
        assert (await archive.sent_message(BOB, "same")).message == b"from bob\r\n"

    @pytest_twisted.ensureDeferred
    async def test_adding_a_sent_id_again_keeps_one(self, archive: Any) -> None:
        first = sent("s1", ALICE, NOW, b"first\r\n")
        await archive.add_sent(first)
        await archive.add_sent(sent("s1", ALICE, NOW + 5, b"again\r\n"))
        assert list(await archive.sent(ALICE, None, 10)) == [first]
        assert await archive.sent_message(ALICE, "s1") == first

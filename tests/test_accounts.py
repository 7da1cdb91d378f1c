"""mailhub.archive.accounts: passwords, policy, TOTP, throttling, sessions, CSRF, roles; ``mailhub user``."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import re
import stat
import subprocess
import sys

import pyotp
import pytest
import pytest_twisted
from argon2 import PasswordHasher
from attrs import evolve
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from mailhub.archive.accounts import (
    INVITE,
    RESET,
    AccountLinks,
    LoginThrottle,
    PasswordPolicyError,
    SessionSigner,
    TotpReplayGuard,
    can_manage,
    can_read,
    check_csrf,
    check_password_policy,
    csrf_token,
    hash_password,
    hash_password_async,
    link_mail,
    link_recipients,
    load_or_create_secret,
    needs_rehash,
    new_totp_secret,
    public_url,
    reset_throttle,
    totp_uri,
    verify_password,
    verify_password_async,
    verify_totp,
)
from mailhub.model import Account, Address, Role

ALICE = Address("alice", "example.com")
SECRET = b"k" * 32


# -- passwords --------------------------------------------------------------------


def test_hash_verifies_its_password_only():
    h = hash_password("correct horse battery")
    assert h.startswith("$argon2id$")
    assert verify_password(h, "correct horse battery")
    assert not verify_password(h, "correct horse batterY")
    assert not verify_password(h, "")


def test_same_password_hashes_differently_each_time():
    assert hash_password("correct horse battery") != hash_password("correct horse battery")


@pytest.mark.parametrize("bad", ["", "not a hash", "$argon2id$v=19$m=65536,t=3,p=4$xx$yy", "$2b$12$abc"])
def test_verify_never_raises_on_a_bad_or_empty_hash(bad):
    assert verify_password(bad, "correct horse battery") is False


def test_needs_rehash_for_weaker_parameters_not_for_defaults_or_no_password():
    assert not needs_rehash(hash_password("correct horse battery"))
    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("correct horse battery")
    assert needs_rehash(weak)
    assert needs_rehash("garbage")
    assert not needs_rehash("")


@pytest_twisted.ensureDeferred
async def test_async_helpers_hash_and_verify_in_a_thread():
    h = await hash_password_async("correct horse battery")
    assert await verify_password_async(h, "correct horse battery") is True
    assert await verify_password_async(h, "wrong horse battery") is False


# -- the password policy ----------------------------------------------------------


def test_policy_accepts_ten_characters():
    check_password_policy("abcdefghij", ALICE)


def test_policy_refuses_short_password_saying_the_minimum():
    with pytest.raises(PasswordPolicyError, match="at least 10 characters"):
        check_password_policy("abcdefghi", ALICE)


@pytest.mark.parametrize("pw", ["alice@example.com", "Alice@Example.COM", " alice@example.com "])
def test_policy_refuses_the_address_itself(pw):
    with pytest.raises(PasswordPolicyError, match="email address"):
        check_password_policy(pw, ALICE)


def test_policy_refuses_the_local_part_of_a_long_address():
    address = Address("jonathan.longname", "example.com")
    with pytest.raises(PasswordPolicyError, match="email address"):
        check_password_policy("Jonathan.Longname", address)


def test_policy_refuses_a_huge_password():
    with pytest.raises(PasswordPolicyError, match="too long"):
        check_password_policy("x" * 5000, ALICE)


# -- TOTP -------------------------------------------------------------------------

NOW = 1_700_000_000.0  # a multiple of 30 plus 20 seconds


def _code(secret: str, at: float) -> str:
    return pyotp.TOTP(secret).at(int(at))


def test_new_secret_is_base32_of_160_bits():
    s = new_totp_secret()
    assert len(s) == 32 and set(s) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    assert new_totp_secret() != s


def test_totp_uri_names_issuer_and_account():
    account = Account(ALICE, totp_secret="JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    uri = totp_uri(account, "mx.hub.example")
    assert uri.startswith("otpauth://totp/mx.hub.example:alice%40example.com?")
    assert "secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP" in uri and "issuer=mx.hub.example" in uri


def test_totp_uri_without_secret_is_an_error():
    with pytest.raises(ValueError):
        totp_uri(Account(ALICE), "hub")


def test_totp_current_code_is_accepted():
    s = new_totp_secret()
    assert verify_totp(s, _code(s, NOW), NOW, TotpReplayGuard())


def test_totp_code_with_spaces_is_accepted():
    s = new_totp_secret()
    code = _code(s, NOW)
    assert verify_totp(s, f"{code[:3]} {code[3:]}", NOW, TotpReplayGuard())


@pytest.mark.parametrize("offset", [-30, 30])
def test_totp_one_step_either_side_is_accepted(offset):
    s = new_totp_secret()
    assert verify_totp(s, _code(s, NOW + offset), NOW, TotpReplayGuard())


@pytest.mark.parametrize("offset", [-60, 60, -3600])
def test_totp_two_steps_away_is_refused(offset):
    s = new_totp_secret()
    code = _code(s, NOW + offset)
    if any(code == _code(s, NOW + d) for d in (-30, 0, 30)):
        pytest.skip("the codes happen to collide")
    assert not verify_totp(s, code, NOW, TotpReplayGuard())


def test_totp_code_reused_within_its_window_is_refused():
    s, guard = new_totp_secret(), TotpReplayGuard()
    code = _code(s, NOW)
    assert verify_totp(s, code, NOW, guard)
    assert not verify_totp(s, code, NOW + 5, guard)
    assert not verify_totp(s, code, NOW + 30, guard)


def test_totp_older_code_after_a_newer_one_is_refused():
    s, guard = new_totp_secret(), TotpReplayGuard()
    assert verify_totp(s, _code(s, NOW), NOW, guard)
    assert not verify_totp(s, _code(s, NOW - 30), NOW, guard)
    assert verify_totp(s, _code(s, NOW + 30), NOW + 30, guard)


def test_totp_used_step_is_per_secret():
    s1, s2, guard = new_totp_secret(), new_totp_secret(), TotpReplayGuard()
    assert verify_totp(s1, _code(s1, NOW), NOW, guard)
    assert verify_totp(s2, _code(s2, NOW), NOW, guard)


@pytest.mark.parametrize("code", ["", "12345", "1234567", "abcdef", "١٢٣٤٥٦"])
def test_totp_malformed_code_is_refused(code):
    assert not verify_totp(new_totp_secret(), code, NOW, TotpReplayGuard())


def test_totp_wrong_code_is_refused_and_does_not_burn_the_step():
    s, guard = new_totp_secret(), TotpReplayGuard()
    right = _code(s, NOW)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    assert not verify_totp(s, wrong, NOW, guard)
    assert verify_totp(s, right, NOW, guard)


def test_totp_bad_secret_is_refused_not_raised():
    assert not verify_totp("not base32!!", "123456", NOW, TotpReplayGuard())
    assert not verify_totp("", "123456", NOW, TotpReplayGuard())


def test_totp_default_guard_is_the_nodes():
    s = new_totp_secret()
    code = _code(s, NOW)
    assert verify_totp(s, code, NOW)
    assert not verify_totp(s, code, NOW)


# -- login throttling -------------------------------------------------------------


@pytest.fixture
def clock():
    c = Clock()
    c.advance(1_000_000)
    return c


def test_throttle_lets_four_failures_through_locks_at_the_fifth(clock):
    t = LoginThrottle(clock)
    for _ in range(4):
        assert t.check(ALICE, "192.0.2.1") == 0
        t.failed(ALICE, "192.0.2.1")
    assert t.check(ALICE, "192.0.2.1") == 0
    t.failed(ALICE, "192.0.2.1")
    assert t.check(ALICE, "192.0.2.1") == 60


def test_throttle_locks_the_account_from_every_address(clock):
    t = LoginThrottle(clock)
    for i in range(5):
        t.failed(ALICE, f"192.0.2.{i}")
    assert t.check(ALICE, "198.51.100.7") == 60
    assert t.check("bob@example.com", "192.0.2.1") == 0


def test_throttle_account_key_ignores_case(clock):
    t = LoginThrottle(clock)
    for _ in range(5):
        t.failed("Alice@Example.com", "192.0.2.1")
    assert t.check(ALICE, "198.51.100.7") == 60


def test_throttle_failures_leave_the_sliding_window(clock):
    t = LoginThrottle(clock)
    for _ in range(4):
        t.failed(ALICE, "192.0.2.1")
        clock.advance(60)
    clock.advance(15 * 60 - 4 * 60 + 1)  # the first failure is now older than 15 minutes
    t.failed(ALICE, "192.0.2.1")
    assert t.check(ALICE, "192.0.2.1") == 0


def test_throttle_locks_an_address_guessing_many_accounts(clock):
    t = LoginThrottle(clock)
    for i in range(19):
        t.failed(f"user{i}@example.com", "203.0.113.9")
    assert t.check("another@example.com", "203.0.113.9") == 0
    t.failed("user19@example.com", "203.0.113.9")
    assert t.check("another@example.com", "203.0.113.9") == 60
    assert t.check("another@example.com", "192.0.2.1") == 0


def test_throttle_counts_ipv6_per_64(clock):
    t = LoginThrottle(clock)
    for i in range(20):
        t.failed(f"user{i}@example.com", f"2001:db8:1:2::{i + 1:x}")
    assert t.check("another@example.com", "2001:db8:1:2:ffff::1") == 60
    assert t.check("another@example.com", "2001:db8:1:3::1") == 0


def test_throttle_lockout_doubles_while_failures_go_on(clock):
    t = LoginThrottle(clock, max_lockout=300)
    for _ in range(5):
        t.failed(ALICE, "192.0.2.1")
    waits = []
    for _ in range(5):
        wait = t.check(ALICE, "192.0.2.1")
        waits.append(wait)
        clock.advance(wait)
        assert t.check(ALICE, "192.0.2.1") == 0
        t.failed(ALICE, "192.0.2.1")
    assert waits == [60, 120, 240, 300, 300]


def test_throttle_forgets_a_lockout_after_a_quiet_window(clock):
    t = LoginThrottle(clock)
    for _ in range(5):
        t.failed(ALICE, "192.0.2.1")
    clock.advance(60 + 15 * 60)
    t.failed(ALICE, "192.0.2.1")
    assert t.check(ALICE, "192.0.2.1") == 0


def test_throttle_success_resets_the_account(clock):
    t = LoginThrottle(clock)
    for _ in range(4):
        t.failed(ALICE, "192.0.2.1")
    t.succeeded(ALICE, "192.0.2.1")
    for _ in range(4):
        t.failed(ALICE, "192.0.2.1")
    assert t.check(ALICE, "192.0.2.1") == 0


def test_throttle_success_on_one_account_does_not_reset_the_address_for_others(clock):
    t = LoginThrottle(clock)
    for i in range(19):
        t.failed(f"user{i}@example.com", "203.0.113.9")
    t.succeeded("mallory@example.com", "203.0.113.9")
    t.failed("user19@example.com", "203.0.113.9")
    assert t.check("another@example.com", "203.0.113.9") == 60


def test_throttle_success_forgets_the_owners_own_typos_at_the_address(clock):
    t = LoginThrottle(clock, per_ip=6)
    for _ in range(4):
        t.failed(ALICE, "203.0.113.9")
    t.succeeded(ALICE, "203.0.113.9")
    for i in range(5):
        t.failed(f"user{i}@example.com", "203.0.113.9")
    assert t.check("bob@example.com", "203.0.113.9") == 0


def test_throttle_forgets_expired_counters_when_full(clock):
    t = LoginThrottle(clock, max_keys=50)
    for i in range(40):
        t.failed(f"user{i}@example.com", "192.0.2.1")
    clock.advance(3 * 3600)
    for i in range(20):
        t.failed(f"other{i}@example.com", "198.51.100.1")
    assert len(t._counters) == 21


# -- sessions ---------------------------------------------------------------------


def _lookup(*accounts):
    table = {a.address: a for a in accounts}
    return lambda address: succeed(table.get(address))


@pytest.fixture
def signer(clock):
    return SessionSigner(SECRET, clock)


def _verify(signer, value, lookup):
    # The lookups answer at once, so the Deferred has fired on return.
    results = []
    signer.verify(value, lookup).addBoth(results.append)
    (result,) = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


def test_session_round_trip(signer, clock):
    account = Account(ALICE, session_version=3)
    value = signer.issue(account)
    session = _verify(signer, value, _lookup(account))
    assert session is not None
    assert session.address == ALICE and session.session_version == 3
    assert session.issued == clock.seconds() and session.account == account
    assert value.isascii() and not set(value) & set(' ;,"\\')


def test_session_ids_and_csrf_secrets_differ_per_login(signer):
    account = Account(ALICE)
    a, b = signer.decode(signer.issue(account)), signer.decode(signer.issue(account))
    assert a.id != b.id and a.csrf_secret != b.csrf_secret


def test_session_lookup_may_answer_directly(signer):
    account = Account(ALICE)
    assert _verify(signer, signer.issue(account), lambda a: account) is not None


def test_session_accepted_by_another_signer_with_the_same_secret(signer, clock):
    account = Account(ALICE)
    other_node = SessionSigner(SECRET, clock)
    assert _verify(other_node, signer.issue(account), _lookup(account)) is not None


def test_session_refused_with_another_secret(signer, clock):
    account = Account(ALICE)
    other = SessionSigner(b"x" * 32, clock)
    assert _verify(other, signer.issue(account), _lookup(account)) is None


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v: v[:-2] + ("AA" if not v.endswith("AA") else "BB"),
        lambda v: v.replace(".", ".x", 1),
        lambda v: "",
        lambda v: "garbage",
        lambda v: v.split(".")[0],
        lambda v: v + ".extra",
    ],
)
def test_tampered_session_is_refused(signer, tamper):
    account = Account(ALICE)
    assert _verify(signer, tamper(signer.issue(account)), _lookup(account)) is None


def test_session_with_a_forged_payload_is_refused(signer):
    import base64
    import json

    account = Account(ALICE)
    payload, mac = signer.issue(account).split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["a"] = "boss@example.com"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    boss = Account(Address("boss", "example.com"))
    assert _verify(signer, f"{forged}.{mac}", _lookup(account, boss)) is None


def test_session_expires_by_max_age_even_when_refreshed(signer, clock):
    account = Account(ALICE)
    value = signer.issue(account)
    for _ in range(12):
        clock.advance(3600 - 1)
        session = _verify(signer, value, _lookup(account))
        assert session is not None
        value = signer.refresh(session)
    clock.advance(13)
    assert _verify(signer, value, _lookup(account)) is None


def test_session_expires_when_idle(signer, clock):
    account = Account(ALICE)
    value = signer.issue(account)
    clock.advance(2 * 3600 - 1)
    assert _verify(signer, value, _lookup(account)) is not None
    clock.advance(2)
    assert _verify(signer, value, _lookup(account)) is None


def test_refresh_resets_the_idle_timer(signer, clock):
    account = Account(ALICE)
    value = signer.issue(account)
    clock.advance(2 * 3600 - 10)
    value = signer.refresh(_verify(signer, value, _lookup(account)))
    clock.advance(2 * 3600 - 10)
    session = _verify(signer, value, _lookup(account))
    assert session is not None and session.issued == clock.seconds() - 2 * (2 * 3600 - 10)


def test_session_issued_in_the_future_is_refused(clock):
    early = Clock()
    early.advance(clock.seconds() + 3600)
    account = Account(ALICE)
    value = SessionSigner(SECRET, early).issue(account)
    assert _verify(SessionSigner(SECRET, clock), value, _lookup(account)) is None


def test_session_ends_when_session_version_is_raised(signer):
    account = Account(ALICE, session_version=1)
    value = signer.issue(account)
    assert _verify(signer, value, _lookup(Account(ALICE, session_version=2))) is None


def test_session_ends_when_account_is_disabled_or_gone(signer):
    account = Account(ALICE)
    value = signer.issue(account)
    assert _verify(signer, value, _lookup(Account(ALICE, disabled=True))) is None
    assert _verify(signer, value, _lookup()) is None


def test_revoked_session_is_refused_others_are_not(signer):
    account = Account(ALICE)
    one, two = signer.issue(account), signer.issue(account)
    signer.revoke(signer.decode(one))
    assert _verify(signer, one, _lookup(account)) is None
    assert _verify(signer, two, _lookup(account)) is not None


def test_signer_refuses_a_short_secret(clock):
    with pytest.raises(ValueError):
        SessionSigner(b"short", clock)


# -- the secret file --------------------------------------------------------------


def test_secret_file_is_created_once_with_mode_0600(tmp_path):
    path = tmp_path / "var" / "web-secret"
    key = load_or_create_secret(str(path))
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret(str(path)) == key


def test_secret_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "web-secret"
    load_or_create_secret(str(path))
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_or_create_secret(str(path))


def test_short_secret_file_is_refused(tmp_path):
    path = tmp_path / "web-secret"
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        load_or_create_secret(str(path))


def test_secret_file_defaults_beside_the_spool(tmp_path):
    from mailhub.archive.accounts import secret_file
    from mailhub.config import load

    config_path = tmp_path / "hub.toml"
    config_path.write_text(CONFIG)
    assert secret_file(load(str(config_path))) == str(tmp_path / "var" / "web-secret")


# -- the links that set a password -----------------------------------------------

INVITED = Account(ALICE, "", recovery="alice@private.example", session_version=2)
WITH_PASSWORD = Account(ALICE, "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", recovery="alice@private.example")


@pytest.fixture
def links(clock):
    return AccountLinks(SECRET, clock)


def test_link_works_for_its_purpose_and_account_as_issued(links):
    token = links.issue(INVITE, INVITED)
    assert links.address(token, INVITE) == ALICE
    assert links.check(token, INVITE, INVITED)
    assert not links.check(token, RESET, INVITED)  # not a reset link
    assert links.address(token, RESET) is None
    assert AccountLinks(SECRET, links._clock).check(token, INVITE, INVITED)  # another node, the same secret
    assert not AccountLinks(b"x" * 32, links._clock).check(token, INVITE, INVITED)


def test_link_is_used_once_the_password_is_set(links):
    token = links.issue(INVITE, INVITED)
    assert not links.check(token, INVITE, evolve(INVITED, password_hash=hash_password("correct horse battery")))
    reset = links.issue(RESET, WITH_PASSWORD)
    # The same password set again is a new hash (a new salt): still used.
    assert not links.check(reset, RESET, evolve(WITH_PASSWORD, password_hash=hash_password("x" * 12)))


def test_link_dies_with_a_new_session_generation_or_when_disabled(links):
    token = links.issue(RESET, WITH_PASSWORD)
    assert not links.check(token, RESET, evolve(WITH_PASSWORD, session_version=WITH_PASSWORD.session_version + 1))
    assert not links.check(token, RESET, evolve(WITH_PASSWORD, disabled=True))
    assert not links.check(token, RESET, None)


@pytest.mark.parametrize(("purpose", "lifetime"), [(INVITE, 72 * 3600), (RESET, 3600)])
def test_link_expires(links, clock, purpose, lifetime):
    token = links.issue(purpose, INVITED)
    assert links.expires(token) == clock.seconds() + lifetime
    clock.advance(lifetime - 1)
    assert links.check(token, purpose, INVITED)
    clock.advance(1)
    assert not links.check(token, purpose, INVITED)
    assert links.address(token, purpose) is None


def test_link_for_another_account_is_refused(links):
    token = links.issue(RESET, WITH_PASSWORD)
    bob = evolve(WITH_PASSWORD, address=Address("bob", "example.com"))
    assert not links.check(token, RESET, bob)
    # The address in the token changed to bob's: the MAC no longer matches.
    payload, mac = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["a"] = ["bob", "example.com"]
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode() + "." + mac
    assert links.address(forged, RESET) == bob.address
    assert not links.check(forged, RESET, bob)
    # A later expiry, likewise.
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["e"] += 3600
    later = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode() + "." + mac
    assert not links.check(later, RESET, WITH_PASSWORD)


@pytest.mark.parametrize("token", ["", ".", "x", "a.b", "!!!.???", "e30.AAAA", "W10.AAAA", "bnVsbA.AAAA"])
def test_link_garbage_is_refused_not_raised(links, token):
    assert links.address(token, INVITE) is None
    assert not links.check(token, INVITE, INVITED)


def test_session_signer_carries_the_links_of_the_same_secret(clock):
    token = SessionSigner(SECRET, clock).links.issue(INVITE, INVITED)
    assert AccountLinks(SECRET, clock).check(token, INVITE, INVITED)
    assert not SessionSigner(b"x" * 32, clock).links.check(token, INVITE, INVITED)


def test_invitation_goes_to_the_address_and_the_recovery_address_reset_only_to_the_recovery():
    assert link_recipients(INVITE, INVITED) == (ALICE, Address("alice", "private.example"))
    assert link_recipients(INVITE, evolve(INVITED, recovery="")) == (ALICE,)
    assert link_recipients(RESET, INVITED) == (Address("alice", "private.example"),)
    assert link_recipients(RESET, evolve(INVITED, recovery="")) == ()


def test_link_mail_is_a_notification_with_the_link():
    url = "https://mail.hub.example/reset/TOKEN"
    envelope, data = link_mail(RESET, WITH_PASSWORD, url, "mx.hub.example", 1_000_000.0, 1_003_600.0, "192.0.2.7")
    assert envelope.sender is None and envelope.recipients == (Address("alice", "private.example"),)
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["To"] == "alice@private.example" and message["From"] == "LiveArchive <no-reply@mx.hub.example>"
    assert message["Auto-Submitted"] == "auto-generated"
    text = message.get_content()
    assert url in text and "192.0.2.7" in text and "alice@example.com" in text
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    with pytest.raises(ValueError, match="no recovery address"):
        link_mail(RESET, evolve(WITH_PASSWORD, recovery=""), url, "mx.hub.example", 0.0, 0.0)


def test_link_mail_to_a_non_ascii_address_asks_for_smtputf8():
    zoe = Account(Address("zoë", "example.com"))
    envelope, data = link_mail(INVITE, zoe, "https://h/invite/T", "mx.hub.example", 0.0, 0.0)
    assert envelope.smtputf8 and "zoë@example.com".encode() in data


def test_reset_throttle_allows_three_requests_per_address_then_waits(clock):
    t = reset_throttle(clock)
    for _ in range(3):
        assert t.check("alice@example.com", "192.0.2.1") == 0
        t.failed("alice@example.com", "192.0.2.1")
    assert t.check("alice@example.com", "198.51.100.9") > 0  # from anywhere
    assert t.check("bob@example.com", "192.0.2.1") == 0


def test_account_stored_by_an_older_hub_loads_with_defaults():
    old = json.dumps({"address": ["alice", "example.com"], "password_hash": "h", "role": "user"})
    account = Account.from_json(old)
    assert account == Account(ALICE, "h")
    assert Account.from_json(WITH_PASSWORD.to_json()) == WITH_PASSWORD


@pytest.mark.parametrize(
    ("url", "kept"),
    [("https://mail.hub.example/", "https://mail.hub.example"), ("http://10.0.0.1:8025/live", "http://10.0.0.1:8025/live")],
)
def test_public_url_is_kept_without_its_slash(url, kept):
    from mailhub.config import parse

    assert public_url(parse((CONFIG + f'[web]\npublic_url = "{url}"\n').encode(), endpoints=False)) == kept
    assert public_url(parse(CONFIG.encode(), endpoints=False)) is None


@pytest.mark.parametrize(
    "url", ["mail.hub.example", "ftp://mail.hub.example", "https://", "https://h/?q=1", "https://u:p@h", "https://h:x",
            "https://h/#top", "https://h/a b"],
)
def test_public_url_that_is_no_base_is_refused_by_name(url):
    from mailhub.config import ConfigError, parse

    with pytest.raises(ConfigError, match="web.public_url: must be the LiveArchive's address"):
        parse((CONFIG + f'[web]\npublic_url = "{url}"\n').encode(), endpoints=False)


# -- CSRF -------------------------------------------------------------------------


def test_csrf_token_passes_for_its_session_and_form(signer):
    session = signer.decode(signer.issue(Account(ALICE)))
    token = csrf_token(session, "compose")
    assert check_csrf(session, token)
    assert check_csrf(session, token, "compose")


def test_csrf_token_of_another_form_is_refused_when_named(signer):
    session = signer.decode(signer.issue(Account(ALICE)))
    assert not check_csrf(session, csrf_token(session, "logout"), "compose")


def test_csrf_token_of_another_session_is_refused(signer):
    account = Account(ALICE)
    one, two = signer.decode(signer.issue(account)), signer.decode(signer.issue(account))
    assert not check_csrf(two, csrf_token(one, "compose"))


@pytest.mark.parametrize("token", ["", "compose", "compose.", "compose.AAAA", ".", "x" * 500])
def test_csrf_garbage_is_refused(signer, token):
    session = signer.decode(signer.issue(Account(ALICE)))
    assert not check_csrf(session, token)


# -- who may do what --------------------------------------------------------------

EXAMPLE, OTHER = "example.com", "other.example"


def _acct(local, domain, role, **kw):
    return Account(Address(local, domain), role=role, **kw)


def test_can_read_own_and_shared_mailboxes_only_as_user():
    user = _acct("alice", EXAMPLE, Role.USER, mailboxes=[Address("sales", EXAMPLE)])
    assert can_read(user, Address("alice", EXAMPLE))
    assert can_read(user, Address("sales", EXAMPLE))
    assert not can_read(user, Address("bob", EXAMPLE))
    assert not can_read(user, Address("alice", OTHER))


def test_can_read_domain_as_domain_admin():
    admin = _acct("boss", EXAMPLE, Role.DOMAIN_ADMIN)
    assert can_read(admin, Address("bob", EXAMPLE))
    assert not can_read(admin, Address("bob", OTHER))


def test_can_read_everything_as_hub_admin_nothing_when_disabled():
    admin = _acct("root", EXAMPLE, Role.HUB_ADMIN)
    assert can_read(admin, Address("bob", OTHER))
    assert not can_read(_acct("root", EXAMPLE, Role.HUB_ADMIN, disabled=True), Address("root", EXAMPLE))
    assert not can_read(_acct("alice", EXAMPLE, Role.USER, disabled=True), Address("alice", EXAMPLE))


# Every role pair, in the manager's domain and in another: (manager, other's role, same domain) -> allowed.
MANAGE = {
    (Role.HUB_ADMIN, Role.USER, True): True,
    (Role.HUB_ADMIN, Role.DOMAIN_ADMIN, True): True,
    (Role.HUB_ADMIN, Role.HUB_ADMIN, True): True,
    (Role.HUB_ADMIN, Role.USER, False): True,
    (Role.HUB_ADMIN, Role.DOMAIN_ADMIN, False): True,
    (Role.HUB_ADMIN, Role.HUB_ADMIN, False): True,
    (Role.DOMAIN_ADMIN, Role.USER, True): True,
    (Role.DOMAIN_ADMIN, Role.DOMAIN_ADMIN, True): True,
    (Role.DOMAIN_ADMIN, Role.HUB_ADMIN, True): False,
    (Role.DOMAIN_ADMIN, Role.USER, False): False,
    (Role.DOMAIN_ADMIN, Role.DOMAIN_ADMIN, False): False,
    (Role.DOMAIN_ADMIN, Role.HUB_ADMIN, False): False,
    (Role.USER, Role.USER, True): False,
    (Role.USER, Role.DOMAIN_ADMIN, True): False,
    (Role.USER, Role.HUB_ADMIN, True): False,
    (Role.USER, Role.USER, False): False,
    (Role.USER, Role.DOMAIN_ADMIN, False): False,
    (Role.USER, Role.HUB_ADMIN, False): False,
}


@pytest.mark.parametrize(("manager", "role", "same"), list(MANAGE))
def test_can_manage_every_role_pair(manager, role, same):
    me = _acct("me", EXAMPLE, manager)
    other = _acct("them", EXAMPLE if same else OTHER, role)
    assert can_manage(me, other) is MANAGE[(manager, role, same)]


def test_user_cannot_manage_even_themselves():
    me = _acct("me", EXAMPLE, Role.USER)
    assert not can_manage(me, me)


def test_domain_admin_cannot_grant_another_domains_mailbox():
    admin = _acct("boss", EXAMPLE, Role.DOMAIN_ADMIN)
    assert can_manage(admin, _acct("bob", EXAMPLE, Role.USER, mailboxes=[Address("sales", EXAMPLE)]))
    assert not can_manage(admin, _acct("bob", EXAMPLE, Role.USER, mailboxes=[Address("ceo", OTHER)]))


@pytest.mark.parametrize("role", list(Role))
def test_disabled_account_manages_nobody(role):
    me = _acct("me", EXAMPLE, role, disabled=True)
    assert not can_manage(me, _acct("them", EXAMPLE, Role.USER))


# -- mailhub user -----------------------------------------------------------------

CONFIG = """
[hub]
hostname = "mx.hub.example"
[store]
plugin = "sqlite"
path = "var/spool.db"
[nodes.dallas]
smtp = "tcp:0"
[domains."example.com"]
route = "smtp:mail.example.com:25"
"""

HUB_CONFIG = CONFIG + """
recipients = ["alice@example.com", "Bob@example.com"]
recipients_file = "recipients.txt"
[archive]
plugin = "sqlite"
path = "var/archive.db"
[domains."other.example"]
route = "smtp:mail.other.example:25"
"""

STRONG = "correct horse battery"


@pytest.fixture
def hub(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text(HUB_CONFIG)
    (tmp_path / "recipients.txt").write_text("# from the directory\ncarol@example.com\ndan@example.com\n")
    return path


def mailhub(*args, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "mailhub.cli", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def user(hub, *args, stdin=""):
    return mailhub("user", "-c", str(hub), *args, stdin=stdin)


async def stored(hub, address):
    """The account as the sqlite archive has it, read in this process."""
    from mailhub.config import load
    from mailhub.plugin import load_plugin

    config = load(str(hub))
    archive = load_plugin("mailhub.archives", "sqlite").make(config.archive_section(), reactor)
    try:
        return await archive.account(Address.parse(address))
    finally:
        await archive.close()


def run_user(hub, *args, stdin=""):
    """``user`` in a thread, so the reactor keeps running while the subprocess works."""
    return deferToThread(user, hub, *args, stdin=stdin)


@pytest_twisted.ensureDeferred
async def test_cli_add_with_password_from_stdin(hub):
    r = await run_user(
        hub, "add", "alice@example.com", "--role", "domain-admin", "--mailbox", "sales@example.com",
        "--recovery", "alice@private.example", "--password-stdin", stdin=STRONG + "\n",
    )
    assert r.returncode == 0, r.stderr
    assert "added alice@example.com (domain-admin)" in r.stdout
    a = await stored(hub, "alice@example.com")
    assert a.role is Role.DOMAIN_ADMIN and a.mailboxes == (Address("sales", "example.com"),)
    assert a.recovery == "alice@private.example" and not a.disabled and a.created > 0
    assert a.password_hash.startswith("$argon2id$") and verify_password(a.password_hash, STRONG)
    audit = await deferToThread(mailhub, "archive", "-c", str(hub), "audit")
    assert "user-add account alice@example.com" in audit.stdout


@pytest_twisted.ensureDeferred
async def test_cli_add_without_password_makes_an_invited_account(hub):
    r = await run_user(hub, "add", "bob@example.com")
    assert r.returncode == 0, r.stderr
    assert "bob@example.com has no password yet" in r.stdout
    a = await stored(hub, "bob@example.com")
    assert a.password_hash == "" and a.role is Role.USER


def test_cli_add_twice_is_an_error(hub):
    assert user(hub, "add", "bob@example.com").returncode == 0
    r = user(hub, "add", "bob@example.com")
    assert r.returncode == 1 and "has an account already" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "x@elsewhere.org"], "elsewhere.org is not a domain of this hub (its domains: example.com, other.example)"),
        (["add", "not-an-address"], "address 'not-an-address'"),
        (["add", "bob@example.com", "--mailbox", "ceo@elsewhere.org"], "--mailbox ceo@elsewhere.org"),
        (["passwd", "x@elsewhere.org"], "not a domain of this hub"),
        (["totp", "x@elsewhere.org"], "not a domain of this hub"),
    ],
)
def test_cli_address_outside_the_hub_is_refused_with_exit_2(hub, args, message):
    r = user(hub, *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_cli_unknown_role_is_refused(hub):
    r = user(hub, "add", "bob@example.com", "--role", "god")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_cli_password_against_the_policy_adds_nothing(hub):
    r = user(hub, "add", "bob@example.com", "--password-stdin", stdin="short\n")
    assert r.returncode == 2 and "at least 10 characters" in r.stderr
    r = user(hub, "list", "--json")
    assert json.loads(r.stdout) == []


def test_cli_empty_password_on_stdin_is_refused(hub):
    r = user(hub, "add", "bob@example.com", "--password-stdin", stdin="")
    assert r.returncode == 2 and "stdin gave no password" in r.stderr


@pytest_twisted.ensureDeferred
async def test_cli_passwd_sets_password_and_ends_sessions(hub):
    await run_user(hub, "add", "bob@example.com")
    r = await run_user(hub, "passwd", "bob@example.com", "--password-stdin", stdin=STRONG + "\n")
    assert r.returncode == 0, r.stderr
    assert "every session of it has ended" in r.stdout
    a = await stored(hub, "bob@example.com")
    assert verify_password(a.password_hash, STRONG) and a.session_version == 1


def test_cli_passwd_asks_twice_on_a_terminal(hub):
    import pty

    user(hub, "add", "bob@example.com")
    for answers, code in (([STRONG, STRONG], 0), ([STRONG, STRONG + "x"], 2)):
        master, slave = pty.openpty()
        # A new session without a controlling terminal: getpass asks on stdin, the pty.
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailhub.cli", "user", "-c", str(hub), "passwd", "bob@example.com"],
            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        os.close(slave)
        try:
            err = b""
            for prompt, answer in zip((b"New password for bob@example.com", b"The same again: "), answers, strict=True):
                # getpass flushes what was typed before its prompt: answer each prompt once shown.
                while prompt not in err:
                    chunk = os.read(proc.stderr.fileno(), 1024)
                    assert chunk, err
                    err += chunk
                os.write(master, (answer + "\n").encode())
            out, rest = proc.communicate(timeout=60)
        finally:
            proc.kill()
            os.close(master)
        assert proc.returncode == code, err + rest
        assert (b"every session of it has ended" in out) if code == 0 else (b"differ" in rest)


def test_cli_passwd_needs_a_terminal_or_stdin(hub):
    user(hub, "add", "bob@example.com")
    r = user(hub, "passwd", "bob@example.com")
    assert r.returncode == 2 and "--password-stdin" in r.stderr


def test_cli_passwd_of_unknown_account(hub):
    r = user(hub, "passwd", "nobody@example.com", "--password-stdin", stdin=STRONG + "\n")
    assert r.returncode == 1 and "no account nobody@example.com" in r.stderr


@pytest_twisted.ensureDeferred
async def test_cli_disable_ends_sessions_and_enable_does_not_revive_them(hub):
    await run_user(hub, "add", "bob@example.com")
    r = await run_user(hub, "disable", "bob@example.com")
    assert r.returncode == 0, r.stderr
    a = await stored(hub, "bob@example.com")
    assert a.disabled and a.session_version == 1
    await run_user(hub, "enable", "bob@example.com")
    a = await stored(hub, "bob@example.com")
    assert not a.disabled and a.session_version == 1


@pytest_twisted.ensureDeferred
async def test_cli_import_csv(hub, tmp_path):
    await run_user(hub, "add", "alice@example.com")
    csv_path = tmp_path / "people.csv"
    csv_path.write_text(
        "address,role,recovery,password\n"
        f"alice@example.com,hub-admin,,{STRONG}\n"
        f"boss@example.com,domain-admin,boss@private.example,{STRONG}\n"
        "\n"
        "eve@other.example,,,\n"
    )
    r = await run_user(hub, "import", str(csv_path))
    assert r.returncode == 0, r.stderr
    assert "2 accounts added" in r.stdout and "1 existed already" in r.stdout
    boss = await stored(hub, "boss@example.com")
    assert boss.role is Role.DOMAIN_ADMIN and boss.recovery == "boss@private.example"
    assert verify_password(boss.password_hash, STRONG)
    eve = await stored(hub, "eve@other.example")
    assert eve.role is Role.USER and eve.password_hash == ""
    alice = await stored(hub, "alice@example.com")
    assert alice.role is Role.USER and alice.password_hash == ""  # left as it was


def test_cli_import_csv_with_errors_adds_nothing_and_names_the_lines(hub, tmp_path):
    csv_path = tmp_path / "people.csv"
    csv_path.write_text(
        "ok@example.com,user,,\n"
        "x@elsewhere.org,user,,\n"
        "bad@example.com,emperor,,\n"
        "weak@example.com,user,,short\n"
        "ok@example.com,user,,\n"
    )
    r = user(hub, "import", str(csv_path))
    assert r.returncode == 2
    errors = r.stderr.splitlines()
    for line, text in ((2, "elsewhere.org is not a domain"), (3, "'emperor'"), (4, "at least 10")):
        assert any(f"people.csv:{line}:" in e and text in e for e in errors), r.stderr
    assert "ok@example.com is listed twice" in r.stderr
    assert "4 errors in" in r.stderr and "no account was added" in r.stderr
    assert json.loads(user(hub, "list", "--json").stdout) == []


def test_cli_import_from_recipients(hub):
    r = user(hub, "import", "--from-recipients", "example.com")
    assert r.returncode == 0, r.stderr
    assert "4 accounts added" in r.stdout and "4 invited" in r.stdout
    listed = json.loads(user(hub, "list", "--json").stdout)
    assert sorted(a["address"] for a in listed) == [
        "alice@example.com", "bob@example.com", "carol@example.com", "dan@example.com",
    ]
    assert not any(a["password"] for a in listed)
    again = user(hub, "import", "--from-recipients", "example.com")
    assert "0 accounts added" in again.stdout and "4 existed already" in again.stdout


def test_cli_import_from_a_domain_without_recipients(hub):
    r = user(hub, "import", "--from-recipients", "other.example")
    assert r.returncode == 2 and "neither recipients nor recipients_file" in r.stderr


def test_cli_import_needs_a_file_or_a_domain(hub):
    assert user(hub, "import").returncode == 2


def test_cli_list_by_domain_never_shows_hashes_or_secrets(hub):
    user(hub, "add", "alice@example.com", "--password-stdin", stdin=STRONG + "\n")
    user(hub, "add", "eve@other.example")
    user(hub, "totp", "alice@example.com")
    r = user(hub, "list", "--domain", "example.com")
    assert "alice@example.com" in r.stdout and "eve@" not in r.stdout
    assert "password,totp" in r.stdout and "1 accounts in example.com" in r.stdout
    listed = json.loads(user(hub, "list", "--json").stdout)
    assert [a["address"] for a in listed] == ["alice@example.com", "eve@other.example"]
    text = json.dumps(listed) + r.stdout
    assert "argon2" not in text and "secret" not in text


@pytest_twisted.ensureDeferred
async def test_cli_totp_enrols_prints_once_and_removes(hub):
    await run_user(hub, "add", "alice@example.com")
    r = await run_user(hub, "totp", "alice@example.com")
    assert r.returncode == 0, r.stderr
    a = await stored(hub, "alice@example.com")
    assert len(a.totp_secret) == 32
    assert f"otpauth://totp/mx.hub.example:alice%40example.com?secret={a.totp_secret}" in r.stdout
    assert a.totp_secret in r.stdout.splitlines()[-1]
    now = reactor.seconds()
    assert verify_totp(a.totp_secret, pyotp.TOTP(a.totp_secret).at(int(now)), now, TotpReplayGuard())
    again = await run_user(hub, "totp", "alice@example.com")
    assert "previous second factor" in again.stdout
    assert (await stored(hub, "alice@example.com")).totp_secret != a.totp_secret
    r = await run_user(hub, "totp", "alice@example.com", "--remove")
    assert r.returncode == 0 and "removed" in r.stdout
    assert (await stored(hub, "alice@example.com")).totp_secret == ""


def test_cli_without_an_archive_says_where_accounts_live(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text(CONFIG)
    r = mailhub("user", "-c", str(path), "list")
    assert r.returncode == 2 and "has no [archive] table: accounts are kept in the archive" in r.stderr


# -- mailhub user: invitations, logout ----------------------------------------------


from mailhub.archive.route import ARCHIVE_ROUTE  # noqa: E402


async def spooled(hub):
    """Every spool entry with its message, as the sqlite spool has them, read in this process."""
    from mailhub.config import load
    from mailhub.model import EntryFilter
    from mailhub.plugin import load_plugin

    config = load(str(hub))
    store = load_plugin("mailhub.stores", "sqlite").make(config.plugin_section("store"), reactor)
    try:
        entries = await store.entries(EntryFilter(), 0, 100)
        return [(e, await store.body(e.message_id)) for e in entries]
    finally:
        await store.close()


def _links_of(hub):
    from mailhub.archive.accounts import secret_file
    from mailhub.config import load

    return AccountLinks(load_or_create_secret(secret_file(load(str(hub)))), reactor)


@pytest.fixture
def public_hub(hub):
    hub.write_text(hub.read_text() + '[web]\npublic_url = "https://mail.hub.example/"\n')
    return hub


@pytest_twisted.ensureDeferred
async def test_cli_add_invite_mails_the_link_to_the_address_and_the_recovery_address(public_hub):
    r = await run_user(public_hub, "add", "bob@example.com", "--invite", "--recovery", "bob@private.example")
    assert r.returncode == 0, r.stderr
    assert "invitation mailed to bob@example.com and bob@private.example" in r.stdout
    bob = await stored(public_hub, "bob@example.com")
    assert bob.password_hash == ""
    entries = await spooled(public_hub)
    # One message: bob's route, the archive's copy, and the outbound route for the recovery address.
    routes = {e.route: [r.address for r in e.recipients] for e, _ in entries}
    assert routes == {
        "smtp:mail.example.com:25": [Address("bob", "example.com")],
        ARCHIVE_ROUTE: [Address("bob", "example.com")],
        "smtp:mx": [Address("bob", "private.example")],
    }
    assert all(e.sender is None for e, _ in entries)
    text = email.message_from_bytes(entries[0][1], policy=email.policy.default).get_content()
    token = re.search(r"https://mail\.hub\.example/invite/([A-Za-z0-9_.-]+)", text).group(1)
    assert _links_of(public_hub).check(token, INVITE, bob)
    audit = await deferToThread(mailhub, "archive", "-c", str(public_hub), "audit")
    assert "user-invite account bob@example.com" in audit.stdout


@pytest_twisted.ensureDeferred
async def test_cli_invite_without_public_url_prints_the_link_and_says_it_is_not_mailed(hub):
    r = await run_user(hub, "add", "bob@example.com", "--invite")
    assert r.returncode == 0, r.stderr
    assert "has no [web] public_url: the invitations are NOT mailed" in r.stdout
    token = re.search(r"bob@example\.com  /invite/(\S+)", r.stdout).group(1)
    assert _links_of(hub).check(token, INVITE, await stored(hub, "bob@example.com"))
    assert await spooled(hub) == []


def test_cli_invite_and_a_password_exclude_each_other(hub):
    r = user(hub, "add", "bob@example.com", "--invite", "--password-stdin", stdin=STRONG + "\n")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


@pytest_twisted.ensureDeferred
async def test_cli_import_invite_mails_only_the_accounts_without_a_password(public_hub, tmp_path):
    csv_path = tmp_path / "people.csv"
    csv_path.write_text(f"boss@example.com,domain-admin,,{STRONG}\neve@other.example,,eve@home.example,\n")
    r = await run_user(public_hub, "import", str(csv_path), "--invite")
    assert r.returncode == 0, r.stderr
    assert "invitation mailed to eve@other.example and eve@home.example" in r.stdout
    assert "boss@" not in r.stdout.split("accounts added")[1]
    recipients = {str(r.address) for e, _ in await spooled(public_hub) for r in e.recipients}
    assert recipients == {"eve@other.example", "eve@home.example"}


def test_cli_invite_again_only_for_an_account_without_a_password(public_hub):
    user(public_hub, "add", "alice@example.com", "--password-stdin", stdin=STRONG + "\n")
    r = user(public_hub, "invite", "alice@example.com")
    assert r.returncode == 2 and "has a password already" in r.stderr
    user(public_hub, "add", "bob@example.com")
    r = user(public_hub, "invite", "bob@example.com")
    assert r.returncode == 0 and "invitation mailed to bob@example.com" in r.stdout, r.stderr
    r = user(public_hub, "invite", "nobody@example.com")
    assert r.returncode == 1 and "no account nobody@example.com" in r.stderr


@pytest_twisted.ensureDeferred
async def test_cli_logout_raises_the_session_generation(hub):
    await run_user(hub, "add", "bob@example.com", "--password-stdin", stdin=STRONG + "\n")
    before = await stored(hub, "bob@example.com")
    r = await run_user(hub, "logout", "bob@example.com")
    assert r.returncode == 0 and "every session of bob@example.com has ended, on every node" in r.stdout
    after = await stored(hub, "bob@example.com")
    assert after.session_version == before.session_version + 1 and after.password_hash == before.password_hash
    # A session of before is refused (by any node: the generation is in the archive).
    clock = Clock()
    clock.advance(reactor.seconds())
    value = SessionSigner(SECRET, clock).issue(before)
    assert _verify(SessionSigner(SECRET, clock), value, _lookup(after)) is None

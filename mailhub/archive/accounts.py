"""
The LiveArchive's accounts: passwords, the password policy, TOTP, login
throttling, signed sessions, CSRF tokens and who may read or manage what.

Login never depends on the organisation's own directory or server: they may
be down with the outage the hub is there for.  Accounts live in the archive
(``mailhub.interfaces.IAccountStore``); this module holds the decisions
about them.  It serves pages to nobody and touches no socket: the web and
``mailhub user`` call it.

Hashing a password costs tens of milliseconds of CPU: on the reactor thread
use ``hash_password_async`` and ``verify_password_async``.  The only file
this module reads or writes is the session key (``load_or_create_secret``),
at startup before the reactor runs, or in a thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import inspect
import ipaddress
import json
import os
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from functools import cache
from typing import TYPE_CHECKING, Any

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from attrs import evolve, field, frozen
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread

from mailhub.model import Account, Address, Role

if TYPE_CHECKING:
    from mailhub.config import HubConfig

__all__ = [
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "SECRET_BYTES",
    "LoginThrottle",
    "PasswordPolicyError",
    "Session",
    "SessionSigner",
    "TotpReplayGuard",
    "can_manage",
    "can_read",
    "check_csrf",
    "check_password_policy",
    "csrf_token",
    "hash_password",
    "hash_password_async",
    "load_or_create_secret",
    "needs_rehash",
    "new_totp_secret",
    "secret_file",
    "totp_uri",
    "verify_password",
    "verify_password_async",
    "verify_totp",
]


# -- passwords --------------------------------------------------------------------

# argon2-cffi's defaults (Argon2id, RFC 9106's low-memory profile): they
# follow the library's recommendation as it changes, and ``needs_rehash``
# says when a stored hash is older than them.
_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    """
    Hash a password with argon2id.  CPU-heavy (tens of milliseconds): not on
    the reactor thread (``hash_password_async``).

    :returns: the encoded hash (``$argon2id$v=19$...``), salt included.
    """
    return _hasher.hash(password)


@cache
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_hex(16))


def verify_password(password_hash: str, password: str) -> bool:
    """
    Whether ``password`` matches ``password_hash``.

    Never raises: an empty hash (an invited account without a password), a
    malformed one or a mismatch all give ``False``, and cost the same time as
    a real verification (a dummy hash is verified instead), so the time taken
    does not say whether an account exists or has a password.  The
    comparison itself is argon2's, in constant time.  CPU-heavy: not on the
    reactor thread (``verify_password_async``).
    """
    try:
        if password_hash:
            return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError, ValueError, TypeError):
        return False
    try:
        _hasher.verify(_dummy_hash(), password)
    except (VerificationError, InvalidHashError, ValueError, TypeError):
        pass
    return False


def needs_rehash(password_hash: str) -> bool:
    """
    Whether a hash was made with other parameters than today's defaults:
    after a successful login, hash the password again and store it.  An
    unreadable hash needs one too; an empty one (no password yet) does not.
    """
    if not password_hash:
        return False
    try:
        return _hasher.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True


def hash_password_async(password: str) -> Deferred[str]:
    """``hash_password`` in the reactor's thread pool."""
    return deferToThread(hash_password, password)


def verify_password_async(password_hash: str, password: str) -> Deferred[bool]:
    """``verify_password`` in the reactor's thread pool."""
    return deferToThread(verify_password, password_hash, password)


# -- the password policy ----------------------------------------------------------

#: The shortest password accepted, in characters.
MIN_PASSWORD_LENGTH = 10
#: The longest: hashing a megabyte on every login attempt would be a way to
#: burn the hub's CPU.
MAX_PASSWORD_LENGTH = 1024


class PasswordPolicyError(ValueError):
    """A password the policy refuses; the message says why, for the person."""


def check_password_policy(password: str, address: Address) -> None:
    """
    Check a new password for ``address``: at least ``MIN_PASSWORD_LENGTH``
    characters, at most ``MAX_PASSWORD_LENGTH``, not the address itself nor
    its local part.

    :raises PasswordPolicyError: with a message that says what is wrong.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PasswordPolicyError(
            f"the password is too short: at least {MIN_PASSWORD_LENGTH} characters, please"
            f" (this one has {len(password)})"
        )
    if len(password) > MAX_PASSWORD_LENGTH:
        raise PasswordPolicyError(f"the password is too long: at most {MAX_PASSWORD_LENGTH} characters")
    folded = password.strip().casefold()
    if folded in (str(address).casefold(), address.local.casefold()):
        raise PasswordPolicyError("the password must not be your email address")


# -- TOTP (a second factor) -------------------------------------------------------

#: Seconds in a TOTP time step (RFC 6238; what every authenticator app uses).
TOTP_STEP = 30
#: Steps accepted either side of the current one: a phone's clock may be off.
TOTP_WINDOW = 1


def new_totp_secret() -> str:
    """A new random TOTP secret: 160 bits, base32 (32 characters)."""
    return pyotp.random_base32()


def totp_uri(account: Account, issuer: str) -> str:
    """
    The ``otpauth://`` URI an authenticator app enrols from (as a QR code,
    or typed in as the secret).

    :param issuer: the name the app shows, the hub's name (``mx.hub.example``).
    :raises ValueError: if the account has no TOTP secret.
    """
    if not account.totp_secret:
        raise ValueError(f"{account.address} has no TOTP secret")
    return pyotp.TOTP(account.totp_secret).provisioning_uri(name=str(account.address), issuer_name=issuer)


class TotpReplayGuard:
    """
    The last time step a code was accepted for, per TOTP secret (so per
    account, and forgotten when the account enrols again): a code seen once
    is refused for the rest of its window, and so is any older one.

    In memory, per node: the other node of the hub (or the other site) does
    not know what this one accepted, so a code observed at one node could be
    replayed at the other within its 90 seconds.  The password is needed as
    well either way.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._last: dict[str, int] = {}
        self._max_entries = max_entries

    @staticmethod
    def _key(secret: str) -> str:
        # Not the secret itself: a dump of this dict gives nobody a factor.
        return hashlib.sha256(secret.encode()).hexdigest()

    def last_step(self, secret: str) -> int | None:
        """The last step accepted for ``secret``, or ``None``."""
        return self._last.get(self._key(secret))

    def use(self, secret: str, step: int) -> bool:
        """Record ``step`` as used; ``False`` (and nothing recorded) if it or a later one was."""
        key = self._key(secret)
        last = self._last.get(key)
        if last is not None and step <= last:
            return False
        if len(self._last) >= self._max_entries:
            # Steps older than the window can no longer be replayed anyway.
            newest = max(self._last.values())
            self._last = {k: s for k, s in self._last.items() if s >= newest - 2 * TOTP_WINDOW - 1}
        self._last[key] = step
        return True


_node_guard = TotpReplayGuard()


def verify_totp(secret: str, code: str, now: float, guard: TotpReplayGuard | None = None) -> bool:
    """
    Whether ``code`` is the TOTP of ``secret`` at ``now``, or one step
    (30 s) either side, and was not used before (``guard``).  Spaces in the
    code are ignored.  The codes are compared in constant time.

    :param now: POSIX time (the reactor's ``seconds()``).
    :param guard: where used steps are remembered; by default this node's
        (module-wide) ``TotpReplayGuard``.
    """
    if guard is None:
        guard = _node_guard
    code = "".join(code.split())
    if not secret or len(code) != 6 or not code.isascii() or not code.isdigit():
        return False
    try:
        totp = pyotp.TOTP(secret)
        current = int(now // TOTP_STEP)
        matched = None
        for step in range(current - TOTP_WINDOW, current + TOTP_WINDOW + 1):
            # Every candidate is computed and compared: the time taken does
            # not say which step matched.
            if hmac.compare_digest(totp.generate_otp(step), code) and matched is None:
                matched = step
    except (binascii.Error, ValueError, TypeError):
        return False
    return matched is not None and guard.use(secret, matched)


# -- login throttling -------------------------------------------------------------


class _Counter:
    """The recent failures of one account or one client address."""

    __slots__ = ("failures", "level", "locked_until")

    def __init__(self) -> None:
        #: (time, account) of each failure within the window.
        self.failures: deque[tuple[float, str]] = deque()
        #: How many lockouts in a row; the next one lasts ``base * 2**level``.
        self.level = 0
        self.locked_until = 0.0


class LoginThrottle:
    """
    Failed logins per account and per client address, in a sliding window,
    with lockouts that double while the failures go on.

    After ``per_account`` failures for one account within ``window``
    seconds (or ``per_ip`` from one client address, over any accounts), that
    account (or address) must wait ``lockout`` seconds; each further failure
    once the wait is over locks it again for twice as long as the time
    before, up to ``max_lockout``.  A full ``window`` without failures after
    a lockout ends forgets it.  A successful login forgets the account's
    failures, and the ones of that account from that client address (its
    owner's typos), but not that address's failures on other accounts: one
    valid account must not buy an attacker more guesses at the others.

    IPv6 clients are counted per /64, the block one host usually has.

    A pure object: no I/O, time from ``clock``; in memory, per node.  The
    caller asks ``check`` before verifying a password, and refuses without
    verifying while it says to wait.

    :param clock: the time source (the reactor; ``task.Clock`` in tests).
    """

    def __init__(
        self,
        clock: IReactorTime,
        per_account: int = 5,
        per_ip: int = 20,
        window: float = 15 * 60.0,
        lockout: float = 60.0,
        max_lockout: float = 60 * 60.0,
        max_keys: int = 100_000,
    ) -> None:
        self._clock = clock
        self._limits = {"account": per_account, "ip": per_ip}
        self._window = window
        self._lockout = lockout
        self._max_lockout = max_lockout
        self._max_keys = max_keys
        self._counters: dict[tuple[str, str], _Counter] = {}

    @staticmethod
    def _account_key(account: Address | str) -> str:
        return str(account).casefold()

    @staticmethod
    def _ip_key(ip: str) -> str:
        try:
            parsed = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        if isinstance(parsed, ipaddress.IPv6Address):
            if parsed.ipv4_mapped is not None:
                return str(parsed.ipv4_mapped)
            return str(ipaddress.IPv6Network((parsed, 64), strict=False))
        return str(parsed)

    def _keys(self, account: Address | str, ip: str) -> list[tuple[str, str]]:
        return [("account", self._account_key(account)), ("ip", self._ip_key(ip))]

    def _counter(self, key: tuple[str, str], now: float, create: bool) -> _Counter | None:
        counter = self._counters.get(key)
        if counter is not None:
            while counter.failures and counter.failures[0][0] <= now - self._window:
                counter.failures.popleft()
            if counter.level and now >= counter.locked_until + self._window:
                counter.level = 0
            if not counter.failures and not counter.level and not create:
                del self._counters[key]
                return None
        elif create:
            if len(self._counters) >= self._max_keys:
                self._sweep(now)
            counter = self._counters[key] = _Counter()
        return counter

    def _sweep(self, now: float) -> None:
        for key in list(self._counters):
            self._counter(key, now, create=False)

    def check(self, account: Address | str, ip: str) -> float:
        """
        :param account: the login as typed (an ``Address`` or its text).
        :param ip: the client's address.
        :returns: the seconds to wait before this account may try again from
            this address, or ``0`` if it may try now.
        """
        now = self._clock.seconds()
        wait = 0.0
        for key in self._keys(account, ip):
            counter = self._counter(key, now, create=False)
            if counter is not None:
                wait = max(wait, counter.locked_until - now)
        return wait

    def failed(self, account: Address | str, ip: str) -> None:
        """A failed login (wrong password or wrong code) of ``account`` from ``ip``."""
        now = self._clock.seconds()
        name = self._account_key(account)
        for key in self._keys(account, ip):
            counter = self._counter(key, now, create=True)
            assert counter is not None
            counter.failures.append((now, name))
            if counter.level or len(counter.failures) >= self._limits[key[0]]:
                counter.locked_until = now + min(self._max_lockout, self._lockout * 2**counter.level)
                counter.level += 1

    def succeeded(self, account: Address | str, ip: str) -> None:
        """A successful login: forget the account's failures (see the class)."""
        account_key, ip_key = self._keys(account, ip)
        self._counters.pop(account_key, None)
        counter = self._counters.get(ip_key)
        if counter is not None:
            counter.failures = deque(f for f in counter.failures if f[1] != account_key[1])


# -- sessions ---------------------------------------------------------------------

#: The length of the session key in ``[web] secret_file``.
SECRET_BYTES = 32


def secret_file(config: HubConfig) -> str:
    """
    Where the hub's session key is: ``[web] secret_file`` (relative to the
    configuration's directory), else ``web-secret`` beside the spool (the
    ``[store]``'s ``path``), else beside the configuration.
    """
    web: Any = config.web or {}
    configured = web.get("secret_file")
    if configured:
        return os.path.join(config.config_dir, os.path.expanduser(configured))
    spool = config.store.get("path")
    if isinstance(spool, str) and spool and spool != ":memory:":
        spool_path = os.path.join(config.config_dir, os.path.expanduser(spool))
        return os.path.join(os.path.dirname(spool_path), "web-secret")
    return os.path.join(config.config_dir, "web-secret")


def load_or_create_secret(path: str) -> bytes:
    """
    The session key in ``path``, created (``SECRET_BYTES`` random bytes,
    mode 0600) if the file does not exist.  Blocking: at startup, before the
    reactor runs, or in a thread.

    Every node of a hub must use the same key, or a session from one node is
    refused by the other: nodes of one process share the file; for two
    sites copy it (``scp -p``) to the other site before its first start.

    :raises ValueError: if the file exists but holds fewer than
        ``SECRET_BYTES`` bytes, or can be read by others than its owner.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        # Written and synced before anyone uses it: a node that issued
        # cookies with a key that a crash then lost would end every session.
        key = secrets.token_bytes(SECRET_BYTES)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        dirfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        return key
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise ValueError(f"{path}: readable by others than its owner (mode {mode & 0o777:o}): chmod 600 it")
    with open(path, "rb") as f:
        key = f.read()
    if len(key) < SECRET_BYTES:
        raise ValueError(f"{path}: a session key must have at least {SECRET_BYTES} bytes, this one has {len(key)}")
    return key


@frozen
class Session:
    """
    A logged-in person, as the session cookie says.

    :ivar address: the account's address.
    :ivar session_version: the account's ``session_version`` when issued.
    :ivar issued: when the person logged in (POSIX time).
    :ivar seen: the last time the cookie was issued or refreshed.
    :ivar id: random, unique per login.
    :ivar csrf_secret: random, the key of this session's CSRF tokens.
    :ivar account: the ``Account`` looked up by ``SessionSigner.verify``.
    """

    address: Address
    session_version: int
    issued: float
    seen: float
    id: str
    csrf_secret: str
    account: Account | None = field(default=None, eq=False)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


AccountLookup = Callable[[Address], "Awaitable[Account | None] | Account | None"]


class SessionSigner:
    """
    Issues and checks session cookies: ``base64url(JSON).base64url(HMAC)``,
    signed with HMAC-SHA256 under a key derived from the hub's secret.
    Nothing is kept on the server: every node that has the same secret
    accepts the same cookies.

    A session ends ``max_age`` seconds after login, after ``idle`` seconds
    without a ``refresh``, when the account is disabled or removed, and when
    its ``session_version`` changes (a new password: every session ends).
    ``revoke`` (logout) ends one session on this node only; the cookie is
    cleared in the browser as well, and "log out everywhere" raises the
    account's ``session_version``.

    :param secret: the key from ``load_or_create_secret``, the same on every node.
    :param clock: the time source.
    :param max_age: the longest a session lasts, in seconds.
    :param idle: the longest a session lasts without a refresh, in seconds.
    """

    #: How far in the future an issue time may be: the two sites' clocks differ a little.
    CLOCK_SKEW = 300.0

    def __init__(
        self, secret: bytes, clock: IReactorTime, max_age: float = 12 * 3600.0, idle: float = 2 * 3600.0
    ) -> None:
        if len(secret) < SECRET_BYTES:
            raise ValueError(f"the session secret must have at least {SECRET_BYTES} bytes")
        self._key = hmac.new(secret, b"mailhub session cookie v1", hashlib.sha256).digest()
        self._clock = clock
        self.max_age = max_age
        self.idle = idle
        self._revoked: dict[str, float] = {}

    def _sign(self, payload: bytes) -> str:
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()
        return f"{_b64(payload)}.{_b64(mac)}"

    def _encode(self, session: Session) -> str:
        data = {
            "a": str(session.address),
            "v": session.session_version,
            "i": session.issued,
            "s": session.seen,
            "n": session.id,
            "c": session.csrf_secret,
        }
        return self._sign(json.dumps(data, separators=(",", ":"), sort_keys=True).encode())

    def issue(self, account: Account) -> str:
        """
        A new session for ``account`` (at login).

        :returns: the cookie's value (ASCII, no characters a cookie forbids).
        """
        now = self._clock.seconds()
        session = Session(
            account.address,
            account.session_version,
            now,
            now,
            secrets.token_urlsafe(16),
            secrets.token_urlsafe(16),
        )
        return self._encode(session)

    def refresh(self, session: Session) -> str:
        """The cookie value of ``session`` seen now: resets the idle timer, not ``max_age``."""
        return self._encode(evolve(session, seen=self._clock.seconds(), account=None))

    def decode(self, value: str) -> Session | None:
        """
        The session in a cookie value if its signature is good and it has not
        expired (by ``max_age`` or ``idle``) nor been revoked on this node;
        otherwise ``None``.  The account is not looked at: see ``verify``.
        """
        now = self._clock.seconds()
        try:
            encoded, _, mac = value.partition(".")
            payload = _unb64(encoded)
            if not hmac.compare_digest(_unb64(mac), hmac.new(self._key, payload, hashlib.sha256).digest()):
                return None
            data = json.loads(payload)
            session = Session(
                Address.parse(data["a"]),
                int(data["v"]),
                float(data["i"]),
                float(data["s"]),
                str(data["n"]),
                str(data["c"]),
            )
        except (ValueError, TypeError, KeyError, AttributeError, binascii.Error):
            return None
        if session.issued > now + self.CLOCK_SKEW or session.seen < session.issued:
            return None
        if now - session.issued > self.max_age or now - session.seen > self.idle:
            return None
        if session.id in self._revoked:
            return None
        return session

    def verify(self, value: str, account_lookup: AccountLookup) -> Deferred[Session | None]:
        """
        The session of a cookie value, with its ``account``, or ``None``:
        expired, a bad signature, an account that is gone or disabled, or a
        ``session_version`` that changed since it was issued.

        :param account_lookup: gives the ``Account`` of an ``Address`` or
            ``None``, directly or by a ``Deferred``/coroutine
            (``IAccountStore.account``).
        :returns: a ``Deferred`` firing with the ``Session`` or ``None``.
        """
        return ensureDeferred(self._verify(value, account_lookup))

    async def _verify(self, value: str, account_lookup: AccountLookup) -> Session | None:
        session = self.decode(value)
        if session is None:
            return None
        found = account_lookup(session.address)
        account = await found if inspect.isawaitable(found) else found
        if account is None or account.disabled or account.session_version != session.session_version:
            return None
        return evolve(session, account=account)

    def revoke(self, session: Session) -> None:
        """Refuse ``session`` from now on, on this node (logout)."""
        now = self._clock.seconds()
        self._revoked = {k: t for k, t in self._revoked.items() if t > now}
        self._revoked[session.id] = session.issued + self.max_age


# -- CSRF -------------------------------------------------------------------------


def csrf_token(session: Session, form_name: str) -> str:
    """
    The token a form of this session carries: ``FORM.MAC``, the MAC an
    HMAC-SHA256 of the session's id and the form's name under the session's
    CSRF secret (which only the signed, ``HttpOnly`` cookie carries).

    :param form_name: which form (``"compose"``, ``"logout"``): a token taken
        from one form does not pass for another when the check names it.
    """
    if "." in form_name:
        raise ValueError("a form name has no '.'")
    mac = hmac.new(session.csrf_secret.encode(), f"{session.id}\0{form_name}".encode(), hashlib.sha256).digest()
    return f"{form_name}.{_b64(mac)}"


def check_csrf(session: Session, token: str, form_name: str | None = None) -> bool:
    """
    Whether ``token`` (from a submitted form) was made by ``csrf_token`` for
    this session, and for ``form_name`` when given.  Constant-time compare.
    """
    name, dot, _ = token.partition(".")
    if not dot or (form_name is not None and name != form_name):
        return False
    return hmac.compare_digest(csrf_token(session, name).encode(), token.encode())


# -- who may do what --------------------------------------------------------------


def can_read(account: Account, mailbox: Address) -> bool:
    """
    Whether ``account`` may read ``mailbox``'s mail: its own and shared
    mailboxes (a user), every mailbox of its domain (a domain
    administrator), every mailbox (a hub administrator); nothing once disabled.
    """
    return account.can_read(mailbox)


def can_manage(account: Account, other: Account) -> bool:
    """
    Whether ``account`` may create, change, disable or enrol ``other``.

    A hub administrator manages every account.  A domain administrator
    manages the accounts of their domain, except hub administrators, and
    only while every mailbox ``other`` may read is in that domain too (or a
    domain administrator could hand out another domain's mail).  A user
    manages nobody (their own password is not managing).  A disabled
    account manages nobody.
    """
    if account.disabled:
        return False
    if account.role is Role.HUB_ADMIN:
        return True
    if account.role is Role.DOMAIN_ADMIN:
        domain = account.address.domain
        return (
            other.role is not Role.HUB_ADMIN
            and other.address.domain == domain
            and all(m.domain == domain for m in other.mailboxes)
        )
    return False

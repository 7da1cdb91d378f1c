"""
The LiveArchive's accounts: passwords, the password policy, TOTP, login
throttling, signed sessions, CSRF tokens, the signed links that set a
password (invitation, reset) and their mail, and who may read or manage what.

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
import email.policy
import email.utils
import hashlib
import hmac
import inspect
import ipaddress
import json
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from functools import cache
from typing import TYPE_CHECKING, Any

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from attrs import evolve, field, frozen
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread

from mailhub.model import Account, Address, AddressError, Envelope, Role

if TYPE_CHECKING:
    from mailhub.config import HubConfig

__all__ = [
    "INVITE",
    "INVITE_SECONDS",
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "RESET",
    "RESET_SECONDS",
    "SECRET_BYTES",
    "AccountLinks",
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
    "link_mail",
    "link_recipients",
    "link_url",
    "load_or_create_secret",
    "needs_rehash",
    "new_totp_secret",
    "public_url",
    "reset_throttle",
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
    ``revoke`` (logout) ends one session on this node at once, and
    ``ended`` gives the account that keeps it ended on every node, after a
    restart too (``Account.ended_sessions``); the cookie is cleared in the
    browser as well.  "Log out everywhere" raises the
    account's ``session_version``, which every node reads from the archive
    at every request: the sessions issued before end on every node and site.

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
        #: The password links of the same hub secret (a key of their own).
        self.links = AccountLinks(secret, clock)

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
        if any(ended == session.id for ended, _ in account.ended_sessions):
            return None
        return evolve(session, account=account)

    #: The most logged-out sessions an account keeps (the oldest go first;
    #: each is kept only until it would have expired anyway).
    MAX_ENDED = 64

    def ended(self, account: Account, session: Session) -> Account:
        """``account`` keeping ``session`` ended (logout), for every node, until it would have expired."""
        now = self._clock.seconds()
        kept = [(i, t) for i, t in account.ended_sessions if t > now and i != session.id]
        kept.append((session.id, session.issued + self.max_age))
        return evolve(account, ended_sessions=tuple(kept[-self.MAX_ENDED :]))

    def revoke(self, session: Session) -> None:
        """Refuse ``session`` from now on, on this node (logout)."""
        now = self._clock.seconds()
        self._revoked = {k: t for k, t in self._revoked.items() if t > now}
        self._revoked[session.id] = session.issued + self.max_age


# -- links that set a password: invitation and reset -----------------------------

#: An invitation: the account has no password yet.
INVITE = "invite"
#: A password reset, mailed to the recovery address.
RESET = "reset"
#: How long an invitation link works: three days, over a weekend.
INVITE_SECONDS = 72 * 3600.0
#: How long a reset link works.
RESET_SECONDS = 3600.0


class AccountLinks:
    """
    The tokens of the links that set an account's password (``/invite/TOKEN``,
    ``/reset/TOKEN``): ``base64url(JSON).base64url(HMAC)``, the JSON naming
    the purpose, the account and the expiry, the HMAC-SHA256 under a key
    derived from the hub's secret (apart from the session key's) over the
    JSON *and the account's current password hash and session_version*,
    which the token does not carry.

    Nothing is kept on the server, and a token still works only once: the
    password it sets is a new hash (a new salt), after which the MAC no
    longer matches; raising the ``session_version`` ("log out everywhere",
    disabling, ``mailhub user passwd``) voids the links not used yet as
    well.  Every node with the same secret accepts the same links.

    :param secret: the hub's secret (``load_or_create_secret``).
    :param clock: the time source.
    """

    def __init__(self, secret: bytes, clock: IReactorTime) -> None:
        if len(secret) < SECRET_BYTES:
            raise ValueError(f"the secret must have at least {SECRET_BYTES} bytes")
        self._key = hmac.new(secret, b"mailhub account link v1", hashlib.sha256).digest()
        self._clock = clock
        self.lifetimes = {INVITE: INVITE_SECONDS, RESET: RESET_SECONDS}

    def _mac(self, payload: bytes, account: Account) -> bytes:
        bound = b"\0".join((payload, account.password_hash.encode(), str(account.session_version).encode()))
        return hmac.new(self._key, bound, hashlib.sha256).digest()

    def issue(self, purpose: str, account: Account) -> str:
        """
        A token for ``purpose`` (``INVITE`` or ``RESET``) of ``account`` as it
        is now, expiring after ``lifetimes[purpose]`` seconds.

        :returns: the token, URL-safe (base64url and one ``.``).
        """
        expires = int(self._clock.seconds() + self.lifetimes[purpose])
        data = {"p": purpose, "a": [account.address.local, account.address.domain], "e": expires}
        payload = json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload, account))}"

    @staticmethod
    def _payload(token: str) -> tuple[bytes, bytes, dict[str, Any]] | None:
        try:
            encoded, dot, mac = token.partition(".")
            if not dot:
                return None
            payload = _unb64(encoded)
            data = json.loads(payload)
            if not isinstance(data, dict):
                return None
            local, domain = data["a"]
            data["a"] = Address(str(local), str(domain))
            data["e"] = float(data["e"])
            return payload, _unb64(mac), data
        except (ValueError, TypeError, KeyError, binascii.Error):
            return None

    def address(self, token: str, purpose: str) -> Address | None:
        """
        The account a token of ``purpose`` names, if it has not expired, to
        look the account up: not yet a proof of anything (``check`` is).
        """
        parsed = self._payload(token)
        if parsed is None:
            return None
        _, _, data = parsed
        if data.get("p") != purpose or data["e"] <= self._clock.seconds():
            return None
        return data["a"] if isinstance(data["a"], Address) else None

    def expires(self, token: str) -> float | None:
        """When a token (checked or not) says it expires, or ``None``."""
        parsed = self._payload(token)
        return None if parsed is None else parsed[2]["e"]

    def check(self, token: str, purpose: str, account: Account | None) -> bool:
        """
        Whether ``token`` is a link of ``purpose`` for ``account`` as it is
        now: signed by this hub, not expired, not used (the same password
        hash and ``session_version`` as when issued), the account not
        disabled.  Constant-time compare.
        """
        parsed = self._payload(token)
        if parsed is None or account is None or account.disabled:
            return False
        payload, mac, data = parsed
        # Folded: a link issued before accounts were (to "Alice@") is still Alice's.
        if data.get("p") != purpose or data["a"].folded() != account.address or data["e"] <= self._clock.seconds():
            return False
        return hmac.compare_digest(mac, self._mac(payload, account))


def reset_throttle(clock: IReactorTime) -> LoginThrottle:
    """
    A ``LoginThrottle`` for requests of a password reset (each request is
    recorded with ``failed``, whether the account exists or not): 3 a
    quarter-hour for one address, 10 from one client address, then waits
    from 15 minutes, doubling up to a day while the requests go on.  Per
    node, in memory.
    """
    return LoginThrottle(clock, per_account=3, per_ip=10, window=15 * 60.0, lockout=15 * 60.0,
                         max_lockout=24 * 3600.0)


def public_url(config: HubConfig) -> str | None:
    """``[web] public_url`` (without its trailing ``/``), or ``None``: the links' base."""
    web: Any = config.web or {}
    url = web.get("public_url")
    return str(url).rstrip("/") if url else None


def link_url(base: str | None, purpose: str, token: str) -> str:
    """The link itself: ``BASE/invite/TOKEN``, or only its path without a base."""
    return f"{base or ''}/{purpose}/{token}"


def _recovery_address(account: Account) -> Address | None:
    if not account.recovery:
        return None
    try:
        return Address.parse(account.recovery)
    except AddressError:
        return None


def link_recipients(purpose: str, account: Account) -> tuple[Address, ...]:
    """
    Who gets a link's mail.  An invitation: the account's own address (read
    before an outage, when accounts are made) and its recovery address if it
    has one (read during one, when the own address's mail only reaches the
    archive, which the person cannot log in to yet).  A reset: the recovery
    address only, never the account's own address (its server may be the
    one that is down, and a link there would land in the archive it opens),
    nor anything the requester typed; none without a recovery address.
    """
    recovery = _recovery_address(account)
    if purpose == RESET:
        return (recovery,) if recovery is not None else ()
    if recovery is None or recovery == account.address:
        return (account.address,)
    return (account.address, recovery)


def link_mail(
    purpose: str, account: Account, url: str, hostname: str, now: float, expires: float, client: str = ""
) -> tuple[Envelope, bytes]:
    """
    The mail of an invitation or a reset link: the null sender (a
    notification: a bounce of it must not start a loop), from
    ``no-reply@HOSTNAME``, to ``link_recipients``, plain text.

    :param url: the full link (``link_url``).
    :param hostname: the hub's name (``[hub] hostname``).
    :param expires: when the link stops working (POSIX time).
    :param client: who asked (the client address of a reset request), said
        in a reset mail and kept in the envelope.
    :returns: the envelope and the message (CRLF line ends), for the hub's
        own outbound path (``Node.receive`` or the spool).
    :raises ValueError: when there is nobody to send it to (a reset of an
        account without a recovery address).
    """
    recipients = link_recipients(purpose, account)
    if not recipients:
        raise ValueError(f"{account.address} has no recovery address")
    until = _utc(expires)
    base = url.rsplit(f"/{purpose}/", 1)[0]
    login = f"{base}/login" if base else "the LiveArchive's login page"
    if purpose == INVITE:
        subject = f"Your LiveArchive account on {hostname}"
        body = (
            f"Hello,\n\nan account was made for you, {account.address}, on the LiveArchive of {hostname}:"
            f" there you read, search and answer your mail while your own mail server is down.\n\n"
            f"Choose your hub password here (the link works once, until {until}):\n\n  {url}\n\n"
            f"The hub password is not your usual mail password.  Keep it for the day your mail server is"
            f" down, and then log in at {login} with {account.address} and that password.\n\n"
            f"If you did not expect this mail, ignore it: nothing happens without the link.\n"
        )
    elif purpose == RESET:
        subject = f"Reset your LiveArchive password on {hostname}"
        asked = f" from {client}" if client else ""
        body = (
            f"Hello,\n\nsomebody{asked} asked to reset the hub password of {account.address} on the"
            f" LiveArchive of {hostname}.  This address is its recovery address.\n\n"
            f"Choose a new hub password here (the link works once, until {until}):\n\n  {url}\n\n"
            f"Every session of the account ends; if you enrolled a second factor, its code is still"
            f" needed to log in.\n\n"
            f"If you did not ask for this, ignore this mail: the password stays as it is.\n"
        )
    else:
        raise ValueError(f"no link mail for {purpose!r}")
    utf8 = not all(str(r).isascii() for r in recipients)
    msg = EmailMessage(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)
    msg["From"] = f"LiveArchive <no-reply@{hostname}>"
    msg["To"] = ", ".join(str(r) for r in recipients)
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(now, localtime=False)
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(body)
    envelope = Envelope(None, recipients, received_at=now, client=client or "livearchive", helo=hostname,
                        smtputf8=utf8)
    return envelope, msg.as_bytes()


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


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

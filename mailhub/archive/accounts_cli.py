"""
``mailhub user``: the LiveArchive's accounts from the shell.

    mailhub user [-c FILE] add ADDRESS [--role user|domain-admin|hub-admin] [--mailbox M ...] [--recovery ADDR] [--password-stdin | --invite]
    mailhub user [-c FILE] import FILE.csv | --from-recipients DOMAIN [--invite]
    mailhub user [-c FILE] invite ADDRESS
    mailhub user [-c FILE] passwd ADDRESS [--password-stdin]
    mailhub user [-c FILE] disable|enable|logout ADDRESS
    mailhub user [-c FILE] list [--domain D] [--json]
    mailhub user [-c FILE] totp ADDRESS [--remove]

Accounts live in the archive (its plugin must provide ``IAccountStore``):
the command opens the configured archive itself, like ``mailhub archive``,
and the hub may be running.  Every change is written to the archive's
audit log with the operator's name.  Passwords are hashed, files and the
terminal read, in threads.

An invitation is mailed through the hub's own outbound path: it goes into
the spool (and the archive's route, as any mail to the hub's mailboxes),
and the running hub delivers it.  Without ``[web] public_url`` there is no
address to put in a mail: the command prints each link instead.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import shutil
import sys
import time
from typing import Any

from attrs import evolve
from twisted.internet.threads import deferToThread

from mailhub.archive.accounts import (
    INVITE,
    AccountLinks,
    PasswordPolicyError,
    check_password_policy,
    hash_password,
    link_mail,
    link_url,
    load_or_create_secret,
    new_totp_secret,
    public_url,
    secret_file,
    totp_uri,
)
from mailhub.archive.cli import _actor
from mailhub.config import HubConfig
from mailhub.interfaces import IAccountStore
from mailhub.model import Account, Address, AddressError, AuditEvent, Role
from mailhub.plugin import load_plugin

__all__ = ["add_parser", "run"]

_ROLES = [r.value for r in Role]


def add_parser(sub: Any, config_default: str) -> None:
    """Add ``user`` and its subcommands to the ``mailhub`` parser."""
    u = sub.add_parser("user", help="the LiveArchive's accounts: add, import, passwords, TOTP")
    u.add_argument("-c", "--config", default=config_default,
                   help="the hub's configuration (default: $MAILHUB_CONFIG or mailhub.toml)")
    s = u.add_subparsers(dest="action", required=True)

    p = s.add_parser("add", help="one account; without a password it is invited (no login yet)")
    p.add_argument("address")
    p.add_argument("--role", choices=_ROLES, default=Role.USER.value)
    p.add_argument("--mailbox", action="append", default=[], metavar="M",
                   help="another mailbox the person may read (a shared one); repeat for more")
    p.add_argument("--recovery", default="", metavar="ADDR",
                   help="an address outside the hub for password resets")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true", help="read the password as one line from stdin")
    how.add_argument("--invite", action="store_true",
                     help="no password: mail the person a link to choose one (to the address and --recovery)")

    p = s.add_parser("import", help="many accounts, from a CSV file or from a domain's recipient list")
    p.add_argument("file", nargs="?", help="CSV: address,role,recovery[,password]; a header line is optional")
    p.add_argument("--from-recipients", metavar="DOMAIN",
                   help="an invited account for every address of the domain's recipients/recipients_file")
    p.add_argument("--invite", action="store_true",
                   help="mail every account added without a password a link to choose one")

    p = s.add_parser("invite", help="mail an account without a password its invitation (again)")
    p.add_argument("address")

    p = s.add_parser("passwd", help="set a password; every session of the account ends")
    p.add_argument("address")
    p.add_argument("--password-stdin", action="store_true", help="read the password as one line from stdin")

    for name, text in (
        ("disable", "no more logins; every session ends"),
        ("enable", "allow logins again"),
        ("logout", "end every session of the account, on every node"),
    ):
        s.add_parser(name, help=text).add_argument("address")

    p = s.add_parser("list", help="the accounts (never their hashes or secrets)")
    p.add_argument("--domain")
    p.add_argument("--json", action="store_true")

    p = s.add_parser("totp", help="enrol a second factor (prints it once), or --remove it")
    p.add_argument("address")
    p.add_argument("--remove", action="store_true")


class UsageError(Exception):
    """A mistake in the command line or its input; exit 2 with the message."""


class NotFound(Exception):
    """The account named does not exist (or already does); exit 1 with the message."""


async def run(reactor: Any, args: argparse.Namespace, config: HubConfig) -> int:
    """``mailhub user ...``; returns the exit status."""
    if config.archive is None:
        sys.stderr.write(
            f"mailhub: {config.path} has no [archive] table: accounts are kept in the archive\n"
        )
        return 2
    name = config.archive["plugin"]
    try:
        archive = load_plugin("mailhub.archives", name).make(config.archive_section(), reactor)
    except ValueError as e:
        sys.stderr.write(f"mailhub: {config.path}: {e}\n")
        return 2
    try:
        if not IAccountStore.providedBy(archive):
            sys.stderr.write(
                f"mailhub: {config.path}: the {name!r} archive keeps no accounts (it does not provide"
                f" IAccountStore); the sqlite and postgresql archives do\n"
            )
            return 2
        return await _run(reactor, args, config, archive)
    except UsageError as e:
        sys.stderr.write(f"mailhub user {args.action}: {e}\n")
        return 2
    except NotFound as e:
        sys.stderr.write(f"mailhub user {args.action}: {e}\n")
        return 1
    finally:
        await archive.close()


def _address(config: HubConfig, text: str, what: str) -> Address:
    """
    An address in one of the hub's domains, folded (``Address.folded``, as
    accounts and the archive's mailboxes are keyed), or a ``UsageError``
    that says why not.
    """
    try:
        address = Address.parse(text.strip())
    except AddressError as e:
        raise UsageError(f"{what} {text!r}: {e}") from None
    if config.route_for(address.domain) is None:
        raise UsageError(
            f"{what} {address}: {address.domain} is not a domain of this hub"
            f" (its domains: {', '.join(sorted(config.domains))})"
        )
    return address.folded()


def _recovery(config: HubConfig, text: str) -> str:
    if not text:
        return ""
    try:
        address = Address.parse(text.strip())
    except AddressError as e:
        raise UsageError(f"recovery address {text!r}: {e}") from None
    if config.route_for(address.domain) is not None:
        sys.stderr.write(
            f"warning: the recovery address {address} is in one of the hub's own domains: while that"
            f" domain's server is down, a reset mail to it is only in the archive\n"
        )
    return str(address)


def _read_line() -> str:
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def _ask_twice(address: Address, optional: bool) -> str:
    hint = " (Enter: none yet, the account is invited)" if optional else ""
    first = getpass.getpass(f"New password for {address}{hint}: ")
    if not first and optional:
        return ""
    second = getpass.getpass("The same again: ")
    if first != second:
        raise UsageError("the two passwords differ; nothing changed")
    return first


async def _new_password(args: argparse.Namespace, address: Address, optional: bool) -> str:
    """
    The password the operator gives: a line of stdin with
    ``--password-stdin``, asked twice on a terminal, else none; checked
    against the policy.  ``""`` for none (only when ``optional``).
    """
    if args.password_stdin:
        password = await deferToThread(_read_line)
        if password.endswith("\r"):
            password = password[:-1]
        if not password:
            raise UsageError("--password-stdin: stdin gave no password")
    elif sys.stdin.isatty():
        password = await deferToThread(_ask_twice, address, optional)
    elif optional:
        return ""
    else:
        raise UsageError("no terminal to ask the password on: give it on stdin with --password-stdin")
    if password:
        try:
            check_password_policy(password, address)
        except PasswordPolicyError as e:
            raise UsageError(str(e)) from None
    return password


async def _audit(archive: Any, reactor: Any, action: str, address: Address | str, detail: str) -> None:
    scope = f"account {address}" if isinstance(address, Address) else address
    await archive.record_audit(AuditEvent(reactor.seconds(), _actor(), action, scope, detail))


async def _existing(archive: Any, address: Address) -> Account:
    account = await archive.account(address)
    if account is None:
        raise NotFound(f"no account {address} (add it with: mailhub user add {address})")
    return account


async def _run(reactor: Any, args: argparse.Namespace, config: HubConfig, archive: Any) -> int:
    out = sys.stdout
    action = args.action
    if action == "add":
        address = _address(config, args.address, "address")
        mailboxes = tuple(_address(config, m, "--mailbox") for m in args.mailbox)
        recovery = _recovery(config, args.recovery)
        if await archive.account(address) is not None:
            raise NotFound(f"{address} has an account already (mailhub user passwd|enable|totp change it)")
        password = "" if args.invite else await _new_password(args, address, optional=True)
        account = Account(
            address,
            await deferToThread(hash_password, password) if password else "",
            Role(args.role),
            mailboxes,
            recovery=recovery,
            created=reactor.seconds(),
        )
        try:
            await archive.add_account(account)
        except KeyError:
            raise NotFound(f"{address} has an account already") from None
        await _audit(archive, reactor, "user-add", address, f"role {account.role.value}")
        out.write(f"added {address} ({account.role.value})\n")
        if args.invite:
            return await _invite(reactor, config, archive, [account], out)
        if not password:
            out.write(
                f"{address} has no password yet: it cannot log in until one is set"
                f" (mailhub user passwd {address})\n"
            )
        return 0
    if action == "import":
        return await _import(reactor, args, config, archive, out)
    if action == "invite":
        address = _address(config, args.address, "address")
        account = await _existing(archive, address)
        if account.password_hash:
            raise UsageError(
                f"{address} has a password already: it resets it through its recovery address on the"
                f" login page, or set one with: mailhub user passwd {address}"
            )
        if account.disabled:
            raise UsageError(f"{address} is disabled: enable it first (mailhub user enable {address})")
        return await _invite(reactor, config, archive, [account], out)
    if action == "logout":
        address = _address(config, args.address, "address")
        account = await _existing(archive, address)
        await archive.update_account(evolve(account, session_version=account.session_version + 1))
        await _audit(archive, reactor, "user-logout", address, "every session")
        out.write(f"every session of {address} has ended, on every node\n")
        return 0
    if action == "passwd":
        address = _address(config, args.address, "address")
        account = await _existing(archive, address)
        password = await _new_password(args, address, optional=False)
        new_hash = await deferToThread(hash_password, password)
        await archive.update_account(
            evolve(account, password_hash=new_hash, session_version=account.session_version + 1)
        )
        await _audit(archive, reactor, "user-passwd", address, "")
        out.write(f"password set for {address}; every session of it has ended\n")
        return 0
    if action in ("disable", "enable"):
        address = _address(config, args.address, "address")
        account = await _existing(archive, address)
        if action == "disable":
            # A new session_version too: enabling the account again does not revive old sessions.
            account = evolve(account, disabled=True, session_version=account.session_version + 1)
        else:
            account = evolve(account, disabled=False)
        await archive.update_account(account)
        await _audit(archive, reactor, f"user-{action}", address, "")
        out.write(
            f"{address} disabled: it cannot log in, every session of it has ended\n"
            if action == "disable"
            else f"{address} enabled\n"
        )
        return 0
    if action == "list":
        domain = args.domain.lower() if args.domain else None
        accounts = await archive.accounts(domain)
        if args.json:
            json.dump([_account_json(a) for a in accounts], out, indent=2)
            out.write("\n")
            return 0
        for a in accounts:
            flags = [
                "password" if a.password_hash else "invited",
                *(["totp"] if a.totp_secret else []),
                *(["DISABLED"] if a.disabled else []),
            ]
            line = f"{str(a.address):40} {a.role.value:12} {','.join(flags)}"
            if a.mailboxes:
                line += f"  also reads {', '.join(str(m) for m in a.mailboxes)}"
            if a.recovery:
                line += f"  recovery {a.recovery}"
            out.write(line + "\n")
        out.write(f"{len(accounts)} accounts" + (f" in {domain}" if domain else "") + "\n")
        return 0
    if action == "totp":
        return await _totp(reactor, args, config, archive, out)
    raise AssertionError(action)


def _account_json(a: Account) -> dict[str, Any]:
    return {
        "address": str(a.address),
        "role": a.role.value,
        "password": bool(a.password_hash),
        "totp": bool(a.totp_secret),
        "mailboxes": [str(m) for m in a.mailboxes],
        "recovery": a.recovery,
        "disabled": a.disabled,
        "session_version": a.session_version,
        "created": a.created,
    }


async def _totp(reactor: Any, args: argparse.Namespace, config: HubConfig, archive: Any, out: Any) -> int:
    address = _address(config, args.address, "address")
    account = await _existing(archive, address)
    if args.remove:
        if not account.totp_secret:
            out.write(f"{address} has no second factor\n")
            return 0
        await archive.update_account(evolve(account, totp_secret=""))
        await _audit(archive, reactor, "user-totp", address, "removed")
        out.write(f"second factor removed for {address}: the password alone logs in\n")
        return 0
    replaced = bool(account.totp_secret)
    account = evolve(account, totp_secret=new_totp_secret())
    await archive.update_account(account)
    await _audit(archive, reactor, "user-totp", address, "enrolled again" if replaced else "enrolled")
    uri = totp_uri(account, config.hostname)
    if replaced:
        out.write(f"the previous second factor of {address} no longer works\n")
    out.write(
        f"second factor enrolled for {address}; add it to an authenticator app now, it is shown only once:\n\n"
        f"  {uri}\n\n"
    )
    qr = await _qr(uri) if shutil.which("qrencode") else None
    if qr:
        out.write(qr + "\n")
    else:
        out.write("(install qrencode to see it as a QR code here)\n")
    out.write(f"secret, to type in by hand: {account.totp_secret}\n")
    return 0


async def _qr(uri: str) -> str | None:
    """The URI as a QR code for the terminal, by ``qrencode``, or ``None``."""
    from twisted.internet.utils import getProcessOutputAndValue

    qrencode = shutil.which("qrencode")
    if qrencode is None:
        return None
    stdout, _, code = await getProcessOutputAndValue(qrencode, ["-t", "UTF8", uri])
    return stdout.decode("utf-8", "replace") if code == 0 else None


def _read_csv(path: str) -> list[tuple[int, list[str]]]:
    """In a thread: the CSV's rows with their line numbers, blank ones skipped."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        return [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]


def _read_recipients(path: str) -> list[str]:
    from mailhub.smtp.recipients import parse_recipients

    with open(path, encoding="utf-8") as f:
        return sorted(parse_recipients(f.read()))


async def _import(reactor: Any, args: argparse.Namespace, config: HubConfig, archive: Any, out: Any) -> int:
    if bool(args.file) == bool(args.from_recipients):
        raise UsageError("give a CSV file or --from-recipients DOMAIN")
    # (address, role, recovery, password) per account, all checked before any is added.
    wanted: list[tuple[Address, Role, str, str]] = []
    errors: list[str] = []
    if args.file:
        source = args.file
        try:
            rows = await deferToThread(_read_csv, args.file)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UsageError(f"cannot read {args.file}: {e}") from None
        if rows and rows[0][1] and rows[0][1][0].strip().lower() == "address":
            rows = rows[1:]
        for line, row in rows:
            cells = [c.strip() for c in row] + [""] * (4 - len(row))
            if len(row) > 4:
                errors.append(f"{args.file}:{line}: {len(row)} columns, expected address,role,recovery[,password]")
                continue
            text, role_text, recovery_text, password = cells[0], cells[1], cells[2], row[3] if len(row) > 3 else ""
            try:
                address = _address(config, text, "address")
                if role_text and role_text not in _ROLES:
                    raise UsageError(f"role {role_text!r}: one of {', '.join(_ROLES)}")
                recovery = _recovery(config, recovery_text)
                if password:
                    check_password_policy(password, address)
            except (UsageError, PasswordPolicyError) as e:
                errors.append(f"{args.file}:{line}: {e}")
                continue
            wanted.append((address, Role(role_text or Role.USER.value), recovery, password))
    else:
        source = f"the recipients of {args.from_recipients}"
        domain = config.domains.get(args.from_recipients.lower())
        if domain is None:
            raise UsageError(
                f"--from-recipients {args.from_recipients}: not a domain of this hub"
                f" (its domains: {', '.join(sorted(config.domains))})"
            )
        texts: list[str] = list(domain.options.get("recipients", []))
        if "recipients_file" in domain.options:
            try:
                texts += await deferToThread(_read_recipients, domain.options["recipients_file"])
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"cannot read {domain.options['recipients_file']}: {e}") from None
        if not texts:
            raise UsageError(f"{domain.name} has neither recipients nor recipients_file in {config.path}")
        for text in texts:
            try:
                address = Address.parse(text.strip()).folded()
            except AddressError as e:
                errors.append(f"{source}: {text!r}: {e}")
                continue
            if address.domain != domain.name:
                sys.stderr.write(f"skipped {address}: not in {domain.name}\n")
                continue
            wanted.append((address, Role.USER, "", ""))
    seen: dict[str, Address] = {}
    for address, *_ in wanted:
        key = str(address).lower()
        if key in seen:
            errors.append(f"{source}: {address} is listed twice")
        seen[key] = address
    if errors:
        sys.stderr.write("".join(line + "\n" for line in errors))
        raise UsageError(f"{_count(len(errors), 'error')} in {source}; no account was added")
    added = invited = existing = 0
    now = reactor.seconds()
    to_invite: list[Account] = []
    for address, role, recovery, password in wanted:
        if await archive.account(address) is not None:
            existing += 1
            continue
        password_hash = await deferToThread(hash_password, password) if password else ""
        account = Account(address, password_hash, role, recovery=recovery, created=now)
        try:
            await archive.add_account(account)
        except KeyError:
            existing += 1
            continue
        added += 1
        if not password:
            invited += 1
            to_invite.append(account)
    await _audit(archive, reactor, "user-import", source, f"{added} added, {invited} invited, {existing} existed")
    out.write(
        f"{_count(added, 'account')} added from {source} ({added - invited} with a password, {invited} invited"
        f" without one); {existing} existed already and {'was' if existing == 1 else 'were'} left as"
        f" {'it was' if existing == 1 else 'they were'}\n"
    )
    if args.invite and to_invite:
        return await _invite(reactor, config, archive, to_invite, out)
    if invited:
        out.write(
            "an invited account cannot log in until a password is set (mailhub user invite ADDRESS mails it"
            " a link to choose one; mailhub user passwd ADDRESS sets one)\n"
        )
    return 0


async def _invite(reactor: Any, config: HubConfig, archive: Any, accounts: list[Account], out: Any) -> int:
    """
    Mail each account (none has a password) a link to choose one, through
    the spool; without ``[web] public_url``, print the links instead.
    """
    from mailhub.cli import _open_store, _wake_local_nodes
    from mailhub.node import routes_for

    path = secret_file(config)
    try:
        secret = await deferToThread(load_or_create_secret, path)
    except (OSError, ValueError) as e:
        raise UsageError(f"web.secret_file: {e}") from None
    links = AccountLinks(secret, reactor)
    base = public_url(config)
    if base is None:
        out.write(
            f"{config.path} has no [web] public_url: the invitations are NOT mailed.  Give each person"
            f" their link yourself, after the address of the hub's web pages (https://HOST/invite/...);"
            f" each works once, for {int(links.lifetimes[INVITE] // 3600)} hours:\n"
        )
        for account in accounts:
            out.write(f"  {account.address}  {link_url(None, INVITE, links.issue(INVITE, account))}\n")
            await _audit(archive, reactor, "user-invite", account.address, "link printed")
        return 0
    store = _open_store(config, reactor)
    first_node = next(iter(config.nodes))
    failed: list[str] = []
    try:
        for account in accounts:
            token = links.issue(INVITE, account)
            expires = links.expires(token) or 0.0
            envelope, data = link_mail(
                INVITE, account, link_url(base, INVITE, token), config.hostname, reactor.seconds(), expires,
                client="mailhub user",
            )
            routes = routes_for(config, envelope.recipients, archive=config.archive is not None)
            to = " and ".join(str(r) for r in envelope.recipients)
            try:
                await store.enqueue(envelope, data, routes, first_node)
            except Exception as e:
                failed.append(str(account.address))
                sys.stderr.write(f"the invitation of {account.address} could not be spooled: {e}\n")
                continue
            await _audit(archive, reactor, "user-invite", account.address, f"mailed to {to}")
            out.write(f"invitation mailed to {to}; the link works once, until {_utc(expires)}\n")
        await _wake_local_nodes(store, reactor.seconds(), config.delivery.heartbeat_seconds, out)
    finally:
        await store.close()
    if failed:
        sys.stderr.write(
            f"{len(failed)} invitations were not sent; send them again with: mailhub user invite ADDRESS"
            f" ({', '.join(failed)})\n"
        )
        return 1
    return 0


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _count(n: int, noun: str) -> str:
    """``1 error``, ``2 errors``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")

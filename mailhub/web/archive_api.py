"""
The archive as JSON, on each node's web listener, for operators' tools and
the LiveArchive pages: ``/api/archive/...``.

Every request needs ``Authorization: Bearer TOKEN`` with a token from
``[web] api_tokens_file`` (one ``NAME TOKEN [ROLE]`` a line, ``ROLE``
``read-only`` when left out, or ``operator``; ``#`` comments): any role reads
the archive.  Without
that file the API answers ``404``: it is off.  Every search and read is
written to the archive's audit log as ``api:NAME``.

- ``GET /api/archive/search?q=QUERY&mailbox=M&domain=D&cursor=C&limit=N``:
  ``{"total", "items": [summaries], "next"}``, newest first.
- ``GET /api/archive/messages/ID``: the message decoded (``mailbox=M``
  limits it to that mailbox's messages); ``?raw=1`` gives the message as
  received (``message/rfc822``, as a download).
- ``GET /api/archive/holds`` and ``GET /api/archive/audit?actor=&action=&limit=``.

Answers are JSON with ``Cache-Control: no-store``; errors are JSON
``{"error": ...}`` with ``400``, ``401``, ``404`` or ``503``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import resource, server

from mailhub.archive.query import QueryError, parse_query
from mailhub.model import Address, AddressError, ArchiveScope, AuditEvent, StoreUnavailable

__all__ = ["ROLES", "ArchiveAPI", "read_token_roles", "read_tokens"]

MAX_LIMIT = 200


#: The roles a token can have (``[web] api_tokens_file``): ``read-only``
#: reads (the archive, the spool, the OpenAPI document); ``operator`` may act
#: too (hold, release, flush, redirect, bounce, delete).
ROLES = ("read-only", "operator")


def read_token_roles(path: str) -> dict[str, tuple[str, str]]:
    """
    The API tokens, ``{token: (name, role)}``, from a file of ``NAME TOKEN
    [ROLE]`` lines; a line without a role (the file's first format) is
    ``read-only``.

    :raises ValueError: naming the file and line of a malformed one, a
        token shorter than 20 characters, or an unknown role.
    """
    tokens: dict[str, tuple[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) not in (2, 3):
                raise ValueError(f"{path}, line {number}: expected 'NAME TOKEN [ROLE]'")
            name, token = parts[:2]
            role = parts[2] if len(parts) == 3 else "read-only"
            if len(token) < 20:
                raise ValueError(f"{path}, line {number}: the token of {name} is shorter than 20 characters")
            if role not in ROLES:
                raise ValueError(f"{path}, line {number}: role {role!r} of {name}: give {' or '.join(ROLES)}")
            tokens[token] = (name, role)
    return tokens


def read_tokens(path: str) -> dict[str, str]:
    """
    The API tokens, ``{token: name}`` (``read_token_roles`` without the roles).

    :raises ValueError: as ``read_token_roles``.
    """
    return {token: name for token, (name, _) in read_token_roles(path).items()}


class ArchiveAPI(resource.Resource):
    """
    :param archive: the hub's ``IArchive``.
    :param tokens: ``{token: name}`` (``read_tokens``).
    :param clock: ``IReactorTime``, for the audit log's times.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, archive: Any, tokens: Mapping[str, str], clock: Any) -> None:
        super().__init__()
        self._archive = archive
        self._tokens = dict(tokens)
        self._clock = clock

    def render_GET(self, request: Any) -> Any:
        ensureDeferred(self._answer(request))
        return server.NOT_DONE_YET

    def _who(self, request: Any) -> str | None:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        for token, name in self._tokens.items():
            if hmac.compare_digest(token.encode(), given.strip().encode()):
                return name
        return None

    async def _answer(self, request: Any) -> None:
        code, body, raw = 200, None, None
        try:
            who = self._who(request)
            if who is None:
                request.setHeader(b"www-authenticate", b'Bearer realm="mailhub"')
                code, body = 401, {"error": "a valid API token is needed (Authorization: Bearer TOKEN)"}
            else:
                code, body, raw = await self._route(request, f"api:{who}")
        except StoreUnavailable as e:
            code, body = 503, {"error": f"archive unavailable: {e}"}
        except Exception:
            self.log.failure("archive API request failed")
            code, body = 500, {"error": "internal error"}
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.setResponseCode(code)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        if raw is not None:
            data, name = raw
            request.setHeader(b"content-type", b"message/rfc822")
            request.setHeader(b"content-disposition", f'attachment; filename="{name}.eml"'.encode())
            request.write(data)
        else:
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(body, indent=2).encode() + b"\n")
        request.finish()

    async def _route(self, request: Any, actor: str) -> tuple[int, Any, tuple[bytes, str] | None]:
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        args = {k.decode(): v[-1].decode("utf-8", "replace") for k, v in request.args.items()}
        now = self._clock.seconds()
        if path == ["search"]:
            try:
                scope = _scope(args)
                query = parse_query(args.get("q", ""))
                limit = max(1, min(MAX_LIMIT, int(args.get("limit", "50"))))
            except (QueryError, AddressError, ValueError) as e:
                return 400, {"error": str(e)}, None
            total = await self._archive.count(scope, query)
            page = await self._archive.search(scope, query, args.get("cursor") or None, limit)
            await self._archive.record_audit(AuditEvent(now, actor, "search", str(scope), f"{args.get('q', '')!r}"))
            from mailhub.archive.cli import summary_json

            return 200, {"total": total, "items": [summary_json(s) for s in page.items], "next": page.next}, None
        if len(path) == 2 and path[0] == "messages":
            message = await self._archive.get(path[1])
            try:
                scope = _scope(args)
            except (AddressError, ValueError) as e:
                return 400, {"error": str(e)}, None
            if message is None or not any(scope.contains(m) for m in message.mailboxes):
                return 404, {"error": f"no message {path[1]}"}, None
            await self._archive.record_audit(AuditEvent(now, actor, "read", path[1], "raw" if args.get("raw") else ""))
            if args.get("raw"):
                return 200, None, (message.message, message.id)
            t = message.text
            return 200, {
                "id": message.id,
                "received_at": message.received_at,
                "envelope_sender": str(message.sender) if message.sender else "",
                "mailboxes": [str(m) for m in message.mailboxes if scope.contains(m)],
                "size": len(message.message),
                "from": t.sender,
                "to": t.recipients,
                "subject": t.subject,
                "date": t.date,
                "message_id": t.message_id,
                "attachments": list(t.attachments),
                "body": t.body,
            }, None
        if path == ["holds"]:
            return 200, await self._archive.holds(), None
        if path == ["audit"]:
            limit = max(1, min(1000, int(args.get("limit", "100")) if args.get("limit", "100").isdigit() else 100))
            events = await self._archive.audit_log(args.get("actor"), args.get("action"), None, None, limit)
            return 200, [
                {"at": e.at, "actor": e.actor, "action": e.action, "scope": e.scope, "detail": e.detail} for e in events
            ], None
        return 404, {"error": "no such API path"}, None


def _scope(args: Mapping[str, str]) -> ArchiveScope:
    if args.get("mailbox"):
        return ArchiveScope(mailbox=Address.parse(args["mailbox"]))
    if args.get("domain"):
        return ArchiveScope(domain=args["domain"])
    return ArchiveScope()


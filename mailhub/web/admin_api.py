"""
The admin HTTP API on each node's web listener: ``/api/...``, JSON,
described by the OpenAPI 3 document the node serves at
``/api/openapi.json``.

Every request needs ``Authorization: Bearer TOKEN`` with a token of ``[web]
api_tokens_file`` (``NAME TOKEN [ROLE]`` lines; ``mailhub token create``
adds one): without a valid one the answer is ``401``, whatever the path.  A
``read-only`` token reads (the spool, the archive, the document); acting
needs an ``operator`` token, else ``403``.  Without ``api_tokens_file`` the
node serves no ``/api`` at all (``404``).

- ``GET /api/queue?SELECTION&offset=&limit=``, ``GET /api/queue/count?SELECTION``
- ``GET /api/queue/entries/ID`` and ``GET /api/queue/entries/ID/message``
  (the message as spooled, ``message/rfc822``)
- ``POST /api/queue/ACTION`` (``hold``, ``release``, ``flush``,
  ``redirect``, ``bounce``, ``delete``) with a JSON object: ``selection``
  (``mailhub.queue_select.Selection``), and ``first``, ``route``,
  ``reason``, ``dsn`` (``delete`` with a DSN: a bounce) and ``confirm``
  (``bounce`` and ``delete`` of more than one entry need it: ``409``
  otherwise, with the count)
- ``POST /api/reload`` (operator): read the configuration file again
  (``HubService.reload``); ``200`` with the ``ReloadResult`` when it
  applied, ``422`` with its ``errors`` when the file was refused (the
  running configuration stays)
- ``GET /api/drills``: the last drill of each domain (``mailhub.drill``);
  ``POST /api/drills`` (operator) with ``domain`` and perhaps ``to``,
  ``timeout``, ``smtp``: run a drill through this node now and answer its
  result (``200`` whether it succeeded or not: see ``ok`` and ``failed``)
- ``/api/archive/...``: ``mailhub.web.archive_api``

Answers are JSON with ``Cache-Control: no-store``; errors are ``{"error":
...}`` with ``400``, ``401``, ``403``, ``404``, ``405``, ``409`` or
``503`` (``422``: a reload refused).  Every action is logged with the token's name.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import resource, server

from mailhub import __version__
from mailhub.model import StoreUnavailable
from mailhub.queue_select import (
    ACTIONS,
    STATES,
    QueueControl,
    Selection,
    SelectionError,
    merge,
    summary,
)

__all__ = ["AdminAPI", "openapi_document"]

#: The largest request body read, in bytes.
MAX_BODY = 1_000_000
MAX_LIMIT = 10_000


class _Refusal(Exception):
    def __init__(self, code: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


class AdminAPI(resource.Resource):
    """
    ``/api``: checks the token of every request, then answers it.

    :param queue: the node's ``QueueControl``.
    :param tokens: ``{token: (name, role)}`` (``archive_api.read_token_roles``).
    :param archive_api: the resource for ``/api/archive/...``, or ``None``
        (no archive configured).
    :param reload: makes the hub read its configuration again and returns a
        Deferred firing with its ``ReloadResult``, or returns ``None`` when
        no hub can (``Node.reload_hub``); ``None``: ``/api/reload`` answers ``503``.
    :param drills: the node's ``mailhub.drill.Drills``, or ``None``.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self, queue: QueueControl, tokens: Mapping[str, tuple[str, str]], archive_api: resource.Resource | None = None,
        reload: Callable[[], Any] | None = None, drills: Any = None,
    ) -> None:
        super().__init__()
        self._queue = queue
        self._reload = reload
        self._drills = drills
        self._tokens = dict(tokens)
        self._archive = archive_api

    def _who(self, request: Any) -> tuple[str, str] | None:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        found = None
        for token, who in self._tokens.items():
            # Every token compared, in constant time each: no early exit to time.
            if hmac.compare_digest(token.encode(), given.strip().encode("latin-1")):
                found = who
        return found

    def render(self, request: Any) -> Any:
        who = self._who(request)
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        if who is None:
            request.setHeader(b"www-authenticate", b'Bearer realm="mailhub"')
            return _json(request, 401, {"error": "a valid API token is needed (Authorization: Bearer TOKEN)"})
        if path[:1] == ["archive"] and self._archive is not None:
            request.postpath = request.postpath[request.postpath.index(b"archive") + 1 :]
            return self._archive.render(request)
        ensureDeferred(self._answer(request, who, path))
        return server.NOT_DONE_YET

    async def _answer(self, request: Any, who: tuple[str, str], path: list[str]) -> None:
        raw: bytes | None = None
        try:
            code, body = 200, await self._route(request, who, path)
            if isinstance(body, bytes):
                raw, body = body, None
        except _Refusal as e:
            code, body = e.code, {"error": str(e), **e.extra}
        except SelectionError as e:
            code, body = 400, {"error": str(e)}
        except StoreUnavailable as e:
            code, body = 503, {"error": f"spool store unavailable: {e}"}
        except Exception:
            self.log.failure("admin API request failed")
            code, body = 500, {"error": "internal error"}
        if request.finished or getattr(request, "_disconnected", False):
            return
        if raw is not None:
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"x-content-type-options", b"nosniff")
            request.setHeader(b"content-type", b"message/rfc822")
            request.write(raw)
            request.finish()
            return
        request.write(_json(request, code, body))
        request.finish()

    async def _route(self, request: Any, who: tuple[str, str], path: list[str]) -> Any:
        method = request.method.decode("ascii", "replace")
        if path == ["openapi.json"]:
            _only(method, "GET")
            return openapi_document()
        if path == ["reload"]:
            _only(method, "POST")
            return await self._reload_config(who)
        if path == ["drills"] and self._drills is not None:
            if method == "GET":
                return {"drills": [r.to_json() for _, r in sorted(self._drills.last.items())]}
            _only(method, "POST")
            return await self._drill(who, _body(request))
        if not path or path[0] != "queue":
            raise _Refusal(404, "no such API path (see /api/openapi.json)")
        rest = path[1:]
        if rest in ([], ["count"]):
            _only(method, "GET")
            args = _args(request)
            offset, limit = _int(args.pop("offset", "0"), "offset", 0), _int(args.pop("limit", "1000"), "limit", 1)
            selection = Selection.from_json(args)
            if rest == ["count"]:
                return await self._queue.count(selection)
            return await self._queue.listing(selection, offset, min(limit, MAX_LIMIT))
        if len(rest) in (2, 3) and rest[0] == "entries" and rest[2:] in ([], ["message"]):
            _only(method, "GET")
            if len(rest) == 3:
                message = await self._queue.message(rest[1])
                if message is None:
                    raise _Refusal(404, f"no entry {rest[1]} in the spool")
                return message
            shown = await self._queue.show(rest[1])
            if shown is None:
                raise _Refusal(404, f"no entry {rest[1]} in the spool")
            return shown
        if len(rest) == 1 and rest[0] in ACTIONS:
            _only(method, "POST")
            name, role = who
            if role != "operator":
                raise _Refusal(403, f"the token {name} is {role}: acting on the spool needs an operator token")
            return await self._act(rest[0], _body(request), name)
        raise _Refusal(404, "no such API path (see /api/openapi.json)")

    async def _reload_config(self, who: tuple[str, str]) -> dict[str, Any]:
        name, role = who
        if role != "operator":
            raise _Refusal(403, f"the token {name} is {role}: reloading the configuration needs an operator token")
        running = None if self._reload is None else self._reload()
        if running is None:
            raise _Refusal(503, "this node is not run by a hub service: nothing to reload")
        result = await running
        if not result.ok:
            self.log.warn("api:{actor}: reload refused: {count} error(s)", actor=name, count=len(result.errors))
            raise _Refusal(422, f"the configuration file has {len(result.errors)} error(s);"
                           " the running configuration stays", **result.to_json())
        self.log.info("api:{actor}: configuration reloaded: {count} change(s)", actor=name, count=len(result.changes))
        answer: dict[str, Any] = result.to_json()
        return answer

    async def _drill(self, who: tuple[str, str], body: Mapping[str, Any]) -> dict[str, Any]:
        from mailhub.drill import DrillError

        name, role = who
        if role != "operator":
            raise _Refusal(403, f"the token {name} is {role}: a drill sends mail and needs an operator token")
        known = {"domain", "to", "timeout", "smtp"}
        unknown = set(body) - known
        if unknown:
            raise SelectionError(f"unknown field {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
        for key in ("domain", "to", "smtp"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise SelectionError(f"{key} must be a string")
        if not body.get("domain"):
            raise SelectionError("domain is needed: the hub domain to drill")
        timeout = body.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
            raise SelectionError("timeout must be a number of seconds")
        try:
            result = await self._drills.run(body["domain"], body.get("to"), timeout, body.get("smtp"))
        except DrillError as e:
            raise SelectionError(str(e)) from None
        self.log.info("api:{actor}: {line}", actor=name, line=result.line())
        answer: dict[str, Any] = result.to_json()
        return answer

    async def _act(self, action: str, body: Mapping[str, Any], actor: str) -> dict[str, Any]:
        known = {"selection", "first", "route", "reason", "dsn", "confirm"}
        unknown = set(body) - known
        if unknown:
            raise SelectionError(f"unknown field {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
        selection = Selection.from_json(body.get("selection"))
        first, route, reason = body.get("first"), body.get("route"), body.get("reason")
        if first is not None and (isinstance(first, bool) or not isinstance(first, int)):
            raise SelectionError("first must be a whole number")
        for key, value in (("route", route), ("reason", reason)):
            if value is not None and not isinstance(value, str):
                raise SelectionError(f"{key} must be a string")
        for key in ("dsn", "confirm"):
            if not isinstance(body.get(key, False), bool):
                raise SelectionError(f"{key} must be true or false")
        if body.get("dsn") and action == "delete":
            action = "bounce"
        if action in ("bounce", "delete") and not body.get("confirm"):
            count = len(await self._queue.find(selection))
            if count > 1:
                raise _Refusal(
                    409, f"{action} of {count} entries: send \"confirm\": true to go ahead", count=count
                )
        result = await self._queue.act(action, selection, first=first, route=route, reason=reason)
        self.log.info("api:{actor}: {line}", actor=actor, line=summary(merge([result])))
        return result


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise _Refusal(405, f"{method} is not allowed here: use {allowed}", allow=allowed)


def _args(request: Any) -> dict[str, str]:
    return {k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace") for k, v in request.args.items()}


def _int(text: str, key: str, least: int) -> int:
    if not text.isdigit() or int(text) < least:
        raise SelectionError(f"{key} must be a whole number of {least} or more")
    return int(text)


def _body(request: Any) -> dict[str, Any]:
    data = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(data) > MAX_BODY:
        raise _Refusal(413, f"the request body is larger than {MAX_BODY} bytes")
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SelectionError(f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise SelectionError("the request body must be a JSON object")
    return body


def _json(request: Any, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    if code == 405 and isinstance(body, dict) and body.get("allow"):
        request.setHeader(b"allow", body["allow"].encode())
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return json.dumps(body, indent=2).encode() + b"\n"


# -- the OpenAPI document ----------------------------------------------------

_SELECTION_PARAMETERS = [
    {"name": "ids", "in": "query", "schema": {"type": "string"}, "description": "entry ids, comma-separated"},
    {"name": "route", "in": "query", "schema": {"type": "string"}, "description": "a route's text, as listed"},
    {"name": "domain", "in": "query", "schema": {"type": "string"}, "description": "a hub domain: its route's entries"},
    {"name": "sender", "in": "query", "schema": {"type": "string"}, "description": "user@domain, @domain or <>"},
    {"name": "recipient", "in": "query", "schema": {"type": "string"},
     "description": "a pending recipient: user@domain or @domain"},
    {"name": "state", "in": "query", "schema": {"type": "string", "enum": list(STATES)}},
    {"name": "older_than", "in": "query", "schema": {"type": "string"},
     "description": "accepted at least this long ago: seconds, or 90s, 30m, 2h, 3d, 1w"},
    {"name": "reply", "in": "query", "schema": {"type": "string"},
     "description": "text in a pending recipient's last reply (any case)"},
]

_ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "503": {"$ref": "#/components/responses/Unavailable"},
}


def _ok(schema: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _action(action: str, text: str) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": _ok("ActionResult", "what was done"), **_ERRORS,
                                 "403": {"$ref": "#/components/responses/Forbidden"}}
    if action in ("bounce", "delete"):
        responses["409"] = {
            "description": "more than one entry selected and no \"confirm\": true",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return {
        "post": {
            "summary": text,
            "operationId": f"queue_{action}",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ActionRequest"}}}},
            "responses": responses,
        }
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3 document of the admin API (``GET /api/openapi.json``)."""
    entry_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    string = {"type": "string"}
    nullable_string = {"type": "string", "nullable": True}
    number = {"type": "number"}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "mailhub admin API",
            "version": __version__,
            "description": "The spool of a mailhub hub: list, count, show and act on entries in bulk."
            " Every request needs a bearer token of [web] api_tokens_file; acting needs an operator token.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/openapi.json": {"get": {"summary": "this document", "operationId": "openapi",
                                          "responses": {"200": {"description": "the document",
                                                                "content": {"application/json": {}}},
                                                        "401": _ERRORS["401"]}}},
            "/api/queue": {"get": {"summary": "the selected entries, oldest first", "operationId": "queue_list",
                                   "parameters": [*_SELECTION_PARAMETERS,
                                                  {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                                                  {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}}],
                                   "responses": {"200": _ok("Listing", "the entries"), **_ERRORS}}},
            "/api/queue/count": {"get": {"summary": "how many entries are selected, by route and state",
                                         "operationId": "queue_count", "parameters": _SELECTION_PARAMETERS,
                                         "responses": {"200": _ok("Count", "the counts"), **_ERRORS}}},
            "/api/queue/entries/{id}": {"get": {"summary": "one entry with its attempt log", "operationId": "queue_show",
                                                "parameters": [entry_id],
                                                "responses": {"200": _ok("EntryDetail", "the entry"), **_ERRORS,
                                                              "404": {"$ref": "#/components/responses/NotFound"}}}},
            "/api/queue/entries/{id}/message": {"get": {
                "summary": "the entry's message as spooled (headers and body)", "operationId": "queue_message",
                "parameters": [entry_id],
                "responses": {"200": {"description": "the message",
                                      "content": {"message/rfc822": {"schema": {"type": "string", "format": "binary"}}}},
                              **_ERRORS, "404": {"$ref": "#/components/responses/NotFound"}}}},
            "/api/queue/hold": _action("hold", "hold the selected entries"),
            "/api/queue/release": _action("release", "release the selected held entries (first: the oldest N only)"),
            "/api/queue/flush": _action("flush", "make the selected deferred entries due now"),
            "/api/queue/redirect": _action("redirect", "move the selected entries to another route, due now"),
            "/api/queue/bounce": _action("bounce", "a DSN to each selected entry's sender, then remove the entry"),
            "/api/queue/delete": _action("delete", "remove the selected entries (dsn: true bounces them)"),
            "/api/reload": {"post": {
                "summary": "read the configuration file again: domains, routes, limits, pacing, recipient lists",
                "operationId": "reload",
                "responses": {"200": _ok("ReloadResult", "applied (needs_restart: keys kept until a restart)"),
                              "401": _ERRORS["401"], "403": {"$ref": "#/components/responses/Forbidden"},
                              "422": _ok("ReloadRefused", "the file has errors: nothing changed"),
                              "503": {"$ref": "#/components/responses/Unavailable"}}}},
            "/api/drills": {
                "get": {"summary": "the last drill of each domain on this node", "operationId": "drills_list",
                        "responses": {"200": _ok("Drills", "the last results"), "401": _ERRORS["401"]}},
                "post": {"summary": "send a probe through this node and follow it (waits for the result)",
                         "operationId": "drill",
                         "requestBody": {"required": True, "content": {
                             "application/json": {"schema": {"$ref": "#/components/schemas/DrillRequest"}}}},
                         "responses": {"200": _ok("DrillResult", "the drill's result: see ok and failed"),
                                       "400": _ERRORS["400"], "401": _ERRORS["401"],
                                       "403": {"$ref": "#/components/responses/Forbidden"}}},
            },
            "/api/archive/search": {"get": {"summary": "search the archive (see mailhub.web.archive_api)",
                                            "operationId": "archive_search",
                                            "parameters": [{"name": k, "in": "query", "schema": {"type": "string"}}
                                                           for k in ("q", "mailbox", "domain", "cursor", "limit")],
                                            "responses": {"200": {"description": "a page of summaries",
                                                                  "content": {"application/json": {}}}, **_ERRORS}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                name: {"description": text,
                       "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                for name, text in (
                    ("BadRequest", "a malformed selection or request"),
                    ("Unauthorized", "no valid token"),
                    ("Forbidden", "a read-only token cannot act, reload or drill"),
                    ("NotFound", "no such entry"),
                    ("Unavailable", "the spool store does not answer (reload: no hub service runs this node)"),
                )
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": string,
                                                                                  "count": {"type": "integer"}}},
                "Selection": {
                    "type": "object", "additionalProperties": False,
                    "description": "every field given must match; an action needs at least one, or all: true",
                    "properties": {
                        "ids": {"type": "array", "items": string}, "route": string, "domain": string,
                        "sender": string, "recipient": string, "state": {"type": "string", "enum": list(STATES)},
                        "older_than": {"oneOf": [number, string]}, "reply": string, "all": {"type": "boolean"},
                    },
                },
                "ActionRequest": {
                    "type": "object", "additionalProperties": False, "required": ["selection"],
                    "properties": {
                        "selection": {"$ref": "#/components/schemas/Selection"},
                        "first": {"type": "integer", "minimum": 1, "description": "release: the oldest N only"},
                        "route": {"type": "string", "description": "redirect: the route to move the entries to"},
                        "reason": {"type": "string", "description": "bounce: said in the DSN"},
                        "dsn": {"type": "boolean", "description": "delete: send a DSN first (a bounce)"},
                        "confirm": {"type": "boolean", "description": "bounce, delete: more than one entry"},
                    },
                },
                "ActionResult": {
                    "type": "object", "required": ["action", "selection", "selected", "done", "ids", "skipped"],
                    "properties": {
                        "action": {"type": "string", "enum": list(ACTIONS)}, "selection": string,
                        "selected": {"type": "integer"}, "done": {"type": "integer"},
                        "ids": {"type": "array", "items": string, "description": (
                            "the entries acted on; empty for a flush of a whole route, domain or"
                            " the spool, which the store does in one statement without listing them")},
                        "skipped": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "still_held": {"type": "integer"}, "dsn": {"type": "integer"},
                        "no_dsn": {"type": "integer"}, "route": string,
                    },
                },
                "Recipient": {"type": "object", "properties": {
                    "address": string, "state": {"type": "string", "enum": ["pending", "delivered", "failed", "expired"]},
                    "reply": nullable_string}},
                "Entry": {"type": "object", "properties": {
                    "id": string, "message_id": string, "route": string, "sender": string, "created": number,
                    "next_attempt": number, "node": nullable_string, "attempts": {"type": "integer"},
                    "held": {"type": "boolean"}, "size": {"type": "integer"},
                    "state": {"type": "string", "enum": list(STATES)},
                    "recipients": {"type": "array", "items": {"$ref": "#/components/schemas/Recipient"}}}},
                "EntryDetail": {"allOf": [{"$ref": "#/components/schemas/Entry"}, {"type": "object", "properties": {
                    "attempt_log": {"type": "array", "items": {"type": "object", "properties": {
                        "node": string, "started": number, "finished": number,
                        "replies": {"type": "array", "items": {"type": "object", "properties": {
                            "recipient": string, "reply": string}}}}}}}}]},
                "ReloadResult": {"type": "object", "required": ["ok", "errors", "changes", "needs_restart"],
                                 "properties": {"ok": {"type": "boolean"},
                                                "errors": {"type": "array", "items": string},
                                                "changes": {"type": "array", "items": string},
                                                "needs_restart": {"type": "array", "items": string}}},
                "ReloadRefused": {"allOf": [{"$ref": "#/components/schemas/ReloadResult"},
                                            {"$ref": "#/components/schemas/Error"}]},
                "DrillRequest": {"type": "object", "additionalProperties": False, "required": ["domain"],
                                 "properties": {
                                     "domain": {"type": "string", "description": "a hub domain"},
                                     "to": {"type": "string", "description": "the recipient: an address or a local"
                                                                             " part (default postmaster)"},
                                     "timeout": {"type": "number", "description": "seconds to wait for each step"},
                                     "smtp": {"type": "string",
                                              "description": "host:port to send to instead of the node's listener"}}},
                "DrillResult": {"type": "object", "properties": {
                    "id": string, "domain": string, "node": string, "recipient": string, "message_id": string,
                    "queue_id": string, "started": number, "ok": {"type": "boolean"}, "failed": nullable_string,
                    "duration": number,
                    "steps": {"type": "array", "items": {"type": "object", "properties": {
                        "step": {"type": "string", "enum": ["accepted", "archived", "delivered"]},
                        "ok": {"type": "boolean"}, "seconds": {"type": "number", "nullable": True},
                        "detail": string}}}}},
                "Drills": {"type": "object", "properties": {
                    "drills": {"type": "array", "items": {"$ref": "#/components/schemas/DrillResult"}}}},
                "Listing": {"type": "object", "properties": {
                    "total": {"type": "integer"}, "offset": {"type": "integer"},
                    "entries": {"type": "array", "items": {"$ref": "#/components/schemas/Entry"}}}},
                "Count": {"type": "object", "properties": {
                    "entries": {"type": "integer"}, "recipients": {"type": "integer"},
                    "by_route": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "by_state": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "oldest": {"type": "number", "nullable": True},
                    "spool": {"type": "object"}}},
            },
        },
    }

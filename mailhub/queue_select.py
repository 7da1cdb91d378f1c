"""
Which spool entries an operator means, and what is done to them: the one
selection model and the bulk operations behind both ``mailhub queue`` and
the admin API's ``/api/queue`` (``mailhub.web.admin_api``).

A ``Selection`` names entries by id, or by route (or a hub domain's
route), sender, recipient, state (``deferred``, ``held``, ``leased``),
age and last reply; every criterion given must match.  ``QueueControl``
lists, counts, shows and acts on the entries a selection matches: hold,
release (the oldest ``first`` N only, for a test batch), flush, redirect to
another route, bounce (a DSN to the sender, then the entry leaves) and
delete.  It reads the spool through ``ISpoolStore`` and, for the
``leased`` state and for redirect and per-entry flush, ``ISpoolControl``.

This module never writes to a terminal or a socket: the CLI and the API
turn its results (plain dicts, the same JSON for both) into output.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, cast

from attrs import evolve, frozen
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.python.failure import Failure

from mailhub.archive.route import is_archive_route
from mailhub.interfaces import ISpoolControl
from mailhub.model import (
    Action,
    Address,
    Attempt,
    Entry,
    Envelope,
    Outcome,
    Reply,
    Route,
)

__all__ = [
    "ACTIONS",
    "STATES",
    "QueueControl",
    "Selection",
    "SelectionError",
    "attempt_json",
    "entry_json",
    "narrower_than_route",
    "parse_age",
]

#: The states an entry can be in, for ``Selection.state``: being delivered
#: now (under a lease), held by an operator or a reject storm, or waiting
#: for its next attempt.
STATES = ("deferred", "held", "leased")

#: What ``QueueControl.act`` does.
ACTIONS = ("hold", "release", "flush", "redirect", "bounce", "delete")

#: Entries read from the store at a time.
PAGE = 2000

#: Store calls an action makes at once.
PARALLEL = 100


class SelectionError(ValueError):
    """A selection or an action's arguments that cannot be used: ``str()`` says why, in one line."""


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """
    An age as an operator writes it: ``90s``, ``30m``, ``2h``, ``3d``, ``1w``
    or a number of seconds.

    :raises SelectionError: for anything else.
    """
    m = _AGE.match(str(text))
    if m is None:
        raise SelectionError(f"older than {text!r}: give a number with s, m, h, d or w (2h, 3d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _address_matches(pattern: str, address: Address | None) -> bool:
    """``user@domain`` (any case), ``@domain`` (every address there) or ``<>`` (the null sender)."""
    if pattern == "<>":
        return address is None
    if address is None:
        return False
    if pattern.startswith("@"):
        return address.domain.lower() == pattern[1:].lower()
    return str(address).lower() == pattern.lower()


def _check_address_pattern(key: str, pattern: str) -> str:
    pattern = pattern.strip()
    if pattern == "<>" or (pattern.startswith("@") and len(pattern) > 1 and "@" not in pattern[1:]):
        return pattern
    local, at, domain = pattern.rpartition("@")
    if not at or not local or not domain:
        raise SelectionError(f"{key} {pattern!r}: give an address (user@domain), @domain or <>")
    return pattern


@frozen
class Selection:
    """
    Which entries: every field given must match.  An empty selection
    matches every entry (``list``, ``count``); an action needs ``ids``,
    ``all`` or at least one criterion, so that no bulk action happens by
    accident.

    :ivar ids: only these entries.
    :ivar route: entries of this route (its text, as listed).
    :ivar domain: entries of this hub domain's route (``resolve`` sets
        ``route`` from it).
    :ivar sender: ``user@domain``, ``@domain`` or ``<>``.
    :ivar recipient: a pending recipient, ``user@domain`` or ``@domain``.
    :ivar state: ``deferred``, ``held`` or ``leased`` (``STATES``).
    :ivar older_than: accepted at least this many seconds ago.
    :ivar reply: text in a pending recipient's last reply (any case).
    :ivar all: every entry, said explicitly.
    """

    ids: tuple[str, ...] = ()
    route: str | None = None
    domain: str | None = None
    sender: str | None = None
    recipient: str | None = None
    state: str | None = None
    older_than: float | None = None
    reply: str | None = None
    all: bool = False

    @property
    def criteria(self) -> bool:
        """Whether anything narrows the selection."""
        return bool(
            self.ids or self.route or self.domain or self.sender or self.recipient
            or self.state or self.older_than is not None or self.reply
        )

    @classmethod
    def from_json(cls, data: Any) -> Selection:
        """
        A selection from the API's JSON object (or query arguments, all
        strings): the field names above, ``older_than`` in seconds or as
        ``parse_age`` reads it, ``ids`` a list.

        :raises SelectionError: naming the field that is wrong.
        """
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise SelectionError("selection: expected a JSON object")
        unknown = set(data) - {f for f in _FIELDS}
        if unknown:
            raise SelectionError(f"selection: unknown field {sorted(unknown)[0]!r} (known: {', '.join(_FIELDS)})")
        ids = data.get("ids") or ()
        if isinstance(ids, str):
            ids = [i for i in ids.split(",") if i]
        if not isinstance(ids, list | tuple) or not all(isinstance(i, str) and i for i in ids):
            raise SelectionError("selection: ids must be a list of entry ids")
        texts: dict[str, str | None] = {}
        for key in ("route", "domain", "sender", "recipient", "state", "reply"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise SelectionError(f"selection: {key} must be a string")
            texts[key] = value or None
        older = data.get("older_than")
        if isinstance(older, bool) or (older is not None and not isinstance(older, int | float | str)):
            raise SelectionError("selection: older_than must be seconds or an age such as 2h")
        every = data.get("all", False)
        if isinstance(every, str):
            every = every.lower() in ("1", "true", "yes")
        if not isinstance(every, bool):
            raise SelectionError("selection: all must be true or false")
        return cls.make(
            ids=tuple(ids),
            older_than=None if older in (None, "") else (parse_age(older) if isinstance(older, str) else float(older)),
            all=every,
            **texts,
        )

    @classmethod
    def make(cls, **fields: Any) -> Selection:
        """A checked selection (``SelectionError`` naming what is wrong)."""
        sel = cls(**fields)
        if sel.state is not None and sel.state not in STATES:
            raise SelectionError(f"state {sel.state!r}: give one of {', '.join(STATES)}")
        if sel.sender is not None:
            sel = evolve(sel, sender=_check_address_pattern("sender", sel.sender))
        if sel.recipient is not None:
            if sel.recipient.strip() == "<>":
                raise SelectionError("recipient '<>': a recipient is never the null address")
            sel = evolve(sel, recipient=_check_address_pattern("recipient", sel.recipient))
        if sel.older_than is not None and sel.older_than < 0:
            raise SelectionError("older than: an age cannot be negative")
        if sel.all and sel.criteria:
            raise SelectionError("--all (all) selects every entry: give it alone, without other criteria")
        if sel.route is not None:
            try:
                Route.parse(sel.route)
            except ValueError as e:
                raise SelectionError(f"route {sel.route!r}: {e}") from None
        return sel

    def resolve(self, config: Any) -> Selection:
        """
        Set ``route`` from ``domain`` with the hub's configuration.

        :raises SelectionError: for a domain the hub does not serve, or
            one whose route is not the ``route`` also given.
        """
        if self.domain is None:
            return self
        route = config.route_for(self.domain)
        if route is None:
            raise SelectionError(f"no domain {self.domain} in {config.path}")
        if self.route is not None and self.route != route:
            raise SelectionError(f"domain {self.domain} goes to route {route}, not to route {self.route}")
        return evolve(self, route=route)

    def to_json(self) -> dict[str, Any]:
        """The fields given, as ``from_json`` reads them."""
        out: dict[str, Any] = {}
        for key in _FIELDS:
            value = getattr(self, key)
            if value not in (None, (), False):
                out[key] = list(value) if key == "ids" else value
        return out

    def describe(self) -> str:
        """The selection in a few words, for summaries (``route R``, ``every route``)."""
        if self.all or not self.criteria:
            return "every route"
        parts = []
        if self.ids:
            parts.append(f"{len(self.ids)} given entr{'y' if len(self.ids) == 1 else 'ies'}")
        if self.route:
            parts.append(f"route {self.route}")
        elif self.domain:
            parts.append(f"domain {self.domain}")
        for key, label in (("sender", "sender"), ("recipient", "recipient"), ("state", "state")):
            if getattr(self, key):
                parts.append(f"{label} {getattr(self, key)}")
        if self.older_than is not None:
            parts.append(f"older than {_age_text(self.older_than)}")
        if self.reply:
            parts.append(f"last reply with {self.reply!r}")
        return ", ".join(parts)

    def matches(self, entry: Entry, state: str, now: float) -> bool:
        """Whether ``entry``, in ``state`` (``entry_state``) at ``now``, is selected."""
        if self.ids and entry.id not in self.ids:
            return False
        if self.route is not None and entry.route != self.route:
            return False
        if self.state is not None and state != self.state:
            return False
        if self.sender is not None and not _address_matches(self.sender, entry.sender):
            return False
        if self.recipient is not None and not any(_address_matches(self.recipient, a) for a in entry.pending):
            return False
        if self.older_than is not None and entry.created > now - self.older_than:
            return False
        if self.reply is not None:
            wanted = self.reply.lower()
            replies = [str(r.reply).lower() for r in entry.recipients if r.reply is not None and r.address in entry.pending]
            if not any(wanted in text for text in replies):
                return False
        return True


_FIELDS = ("ids", "route", "domain", "sender", "recipient", "state", "older_than", "reply", "all")


def _age_text(seconds: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def entry_state(entry: Entry, leased: set[str]) -> str:
    """``leased`` (being delivered now), else ``held``, else ``deferred``."""
    if entry.id in leased:
        return "leased"
    return "held" if entry.held else "deferred"


def entry_json(entry: Entry, state: str | None = None) -> dict[str, Any]:
    """An entry as ``mailhub queue list --json`` and ``GET /api/queue`` give it."""
    data: dict[str, Any] = {
        "id": entry.id,
        "message_id": entry.message_id,
        "route": entry.route,
        "sender": str(entry.sender) if entry.sender else "",
        "created": entry.created,
        "next_attempt": entry.next_attempt,
        "node": entry.node,
        "attempts": entry.attempts,
        "held": entry.held,
        "size": entry.size,
        "recipients": [
            {
                "address": str(r.address),
                "state": r.state.value,
                "reply": str(r.reply) if r.reply else None,
            }
            for r in entry.recipients
        ],
    }
    if state is not None:
        data["state"] = state
    return data


def attempt_json(a: Attempt) -> dict[str, Any]:
    return {
        "node": a.node,
        "started": a.started,
        "finished": a.finished,
        "replies": [{"recipient": str(r), "reply": str(reply)} for r, reply in a.replies],
    }


def check_route(config: Any, route: str) -> str:
    """
    A route an operator redirects entries to: its transport must be
    installed and take its target (as ``mailhub check-config`` checks a
    domain's route).

    :raises SelectionError: saying what is wrong.
    """
    from mailhub.plugin import PluginNotFound, check_plugin_config, load_plugin

    route = route.strip()
    try:
        parsed = Route.parse(route)
    except ValueError as e:
        raise SelectionError(f"route {route!r}: {e}") from None
    if is_archive_route(route):
        raise SelectionError(f"route {route}: the archive's route takes no redirected mail")
    try:
        factory = load_plugin("mailhub.transports", parsed.transport)
    except PluginNotFound as e:
        raise SelectionError(f"route {route}: {e}") from None
    section = {**config.route_options(route), "target": parsed.target, "hostname": config.hostname}
    problem = check_plugin_config(factory, section, "route")
    if problem is not None:
        raise SelectionError(f"route {route}: {problem[1]}")
    return str(parsed)


class QueueControl:
    """
    The bulk queue operations over one spool store.

    :param store: the hub's ``ISpoolStore`` (``ISpoolControl`` too, for the
        ``leased`` state, redirect and per-entry flush).
    :param config: the ``HubConfig`` (domains' routes, the hub's name for
        DSNs), or a function returning the one in force (a node's, which a
        reload replaces).
    :param clock: ``IReactorTime``.
    :param spool_dsn: ``(envelope, message) -> Deferred`` (or a coroutine): spools a DSN
        durably (a node's ``receive``; the CLI enqueues it itself).
    :param wake: called after entries became due (release, flush,
        redirect): tells the delivery engines to scan now.
    """

    def __init__(
        self,
        store: Any,
        config: Any,
        clock: Any,
        spool_dsn: Callable[[Envelope, bytes], Awaitable[Any]],
        wake: Callable[[], Any] | None = None,
    ) -> None:
        self._store = store
        self._get_config: Callable[[], Any] = config if callable(config) else (lambda: config)
        self._clock = clock
        self._spool_dsn = spool_dsn
        self._wake = wake

    @property
    def _config(self) -> Any:
        return self._get_config()

    async def _leased(self, selection: Selection, now: float) -> set[str]:
        control = ISpoolControl(self._store, None)
        if control is None:
            if selection.state == "leased":
                raise SelectionError(
                    f"the {self._config.store.get('plugin')} store cannot tell which entries are being delivered"
                )
            return set()
        leased: set[str] = await control.leased_entries(now)
        return leased

    async def find(self, selection: Selection) -> list[tuple[Entry, str]]:
        """
        The entries ``selection`` matches, with their states, oldest first
        (by acceptance time, then id).
        """
        selection = selection.resolve(self._config)
        await self._known_route(selection)
        now = self._clock.seconds()
        leased = await self._leased(selection, now)
        found: list[tuple[Entry, str]] = []
        if selection.ids:
            for entry_id in dict.fromkeys(selection.ids):
                entry = await self._store.get(entry_id)
                if entry is not None:
                    state = entry_state(entry, leased)
                    if selection.matches(entry, state, now):
                        found.append((entry, state))
        else:
            # Unfiltered pages: every store reads those in time linear in the
            # page (a filtered page may cost a scan from the start).
            offset = 0
            while True:
                page = await self._store.entries(None, offset, PAGE)
                for entry in page:
                    state = entry_state(entry, leased)
                    if selection.matches(entry, state, now):
                        found.append((entry, state))
                if len(page) < PAGE:
                    break
                offset += PAGE
        found.sort(key=lambda pair: (pair[0].created, pair[0].id))
        # One entry may show twice when the store's order moved under the
        # pages (an entry that became due meanwhile): keep its first.
        seen: set[str] = set()
        return [p for p in found if not (p[0].id in seen or seen.add(p[0].id))]  # type: ignore[func-returns-value]

    async def listing(self, selection: Selection, offset: int = 0, limit: int = 1000) -> dict[str, Any]:
        """``GET /api/queue``: ``{"total", "offset", "entries": [entry_json + "state"]}``."""
        found = await self.find(selection)
        page = found[offset : offset + limit]
        return {"total": len(found), "offset": offset, "entries": [entry_json(e, s) for e, s in page]}

    async def count(self, selection: Selection) -> dict[str, Any]:
        """
        ``GET /api/queue/count``: the entries and pending recipients
        selected, by route and by state, the oldest's acceptance time, and
        the whole spool's ``counts()``.
        """
        found = await self.find(selection)
        by_route: dict[str, int] = {}
        by_state = dict.fromkeys(STATES, 0)
        for entry, state in found:
            by_route[entry.route] = by_route.get(entry.route, 0) + 1
            by_state[state] += 1
        spool = await self._store.counts()
        return {
            "entries": len(found),
            "recipients": sum(len(e.pending) for e, _ in found),
            "by_route": by_route,
            "by_state": by_state,
            "oldest": found[0][0].created if found else None,
            "spool": {k: spool.get(k) for k in ("entries", "held", "leased", "recipients", "routes")},
        }

    async def show(self, entry_id: str) -> dict[str, Any] | None:
        """One entry with its state and its attempt log (``attempt_log``), or ``None``."""
        entry = await self._store.get(entry_id)
        if entry is None:
            return None
        leased = await self._leased(Selection(), self._clock.seconds())
        data = entry_json(entry, entry_state(entry, leased))
        data["attempt_log"] = [attempt_json(a) for a in await self._store.attempts(entry_id)]
        return data

    async def message(self, entry_id: str) -> bytes | None:
        """The message of an entry, exactly as spooled, or ``None`` if the entry (or its body) is gone."""
        entry = await self._store.get(entry_id)
        if entry is None:
            return None
        try:
            body: bytes = await self._store.body(entry.message_id)
        except KeyError:
            return None
        return body

    async def act(
        self,
        action: str,
        selection: Selection,
        first: int | None = None,
        route: str | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """
        Do ``action`` (``ACTIONS``) to the selected entries it applies to.

        :param first: ``release`` only: the oldest ``first`` held entries.
        :param route: ``redirect`` only: the route to move the entries to.
        :param reason: ``bounce`` only: said in the DSN.
        :returns: ``{"action", "selection": its description, "selected":
            entries matched, "done": entries acted on, "ids": their ids,
            "skipped": {why: count}}``; ``release`` adds ``"still_held"``
            (selected, held and not released), ``bounce`` ``"dsn"`` and
            ``"no_dsn"`` (null sender), ``redirect`` ``"route"``.
        :raises SelectionError: for an action, selection or route that
            cannot be used (nothing is done then).
        """
        if action not in ACTIONS:
            raise SelectionError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
        if not (selection.criteria or selection.all):
            raise SelectionError("which entries? give entry ids, a selection or all")
        if first is not None and (action != "release" or first < 1):
            raise SelectionError("first: only release takes it, with a number of entries of 1 or more")
        if action == "redirect":
            if not route:
                raise SelectionError("redirect needs the route to move the entries to")
            route = check_route(self._config, route)
        if action in ("redirect", "flush") and ISpoolControl(self._store, None) is None:
            if not (action == "flush" and not narrower_than_route(selection)):
                raise SelectionError(f"the {self._config.store.get('plugin')} store cannot {action} single entries")
        if action == "flush" and not narrower_than_route(selection):
            await self._known_route(selection)
            return await self._flush_whole(selection)
        found = await self.find(selection)
        now = self._clock.seconds()
        result: dict[str, Any] = {
            "action": action, "selection": selection.resolve(self._config).describe(),
            "selected": len(found), "done": 0, "ids": [], "skipped": {},
        }
        skipped: dict[str, int] = result["skipped"]

        def skip(why: str) -> None:
            skipped[why] = skipped.get(why, 0) + 1

        done: list[str] = result["ids"]

        async def each(entries: list[Entry], fn: Callable[[Entry], Awaitable[str | None]]) -> None:
            """``fn`` of each entry (``None``: done, else why not), ``PARALLEL`` at a time, counted in order."""
            for i in range(0, len(entries), PARALLEL):
                part = entries[i : i + PARALLEL]
                # At once: a store batches what arrives together (one commit for many).
                outcomes = await DeferredList([ensureDeferred(_coroutine(fn, e)) for e in part], consumeErrors=True)
                for entry, (ok, why) in zip(part, outcomes, strict=True):
                    if not ok:
                        cast(Failure, why).raiseException()
                    if why is None:
                        done.append(entry.id)
                    else:
                        skip(why)

        store = self._store
        if action == "hold":
            for _ in (e for e, _ in found if e.held):
                skip("already held")

            async def hold(e: Entry) -> str | None:
                return None if await store.hold(e.id) else "gone"

            await each([e for e, _ in found if not e.held], hold)
        elif action == "release":
            held = [e for e, _ in found if e.held]
            for _ in range(len(found) - len(held)):
                skip("not held")

            async def release(e: Entry) -> str | None:
                return None if await store.release_held(e.id, now) else "gone"

            await each(held[:first] if first else held, release)
            result["still_held"] = len(held) - len(done)
        elif action in ("flush", "redirect"):
            control = ISpoolControl(store)
            target = route if action == "redirect" else None
            if target is not None:
                result["route"] = target
            movable = []
            for entry, state in found:
                if action == "flush" and state != "deferred":
                    skip("held or being delivered")
                elif entry.route == target:
                    skip("already on that route")
                elif target is not None and is_archive_route(entry.route):
                    skip("the archive's copy")
                elif state == "leased":
                    skip("being delivered")
                else:
                    movable.append(entry)

            async def requeue(e: Entry) -> str | None:
                outcome = await control.requeue(e.id, now, target)
                return None if outcome == "requeued" else "being delivered" if outcome == "leased" else "gone"

            await each(movable, requeue)
        else:
            removable = []
            for entry, state in found:
                if state == "leased":
                    # Its server may be taking it right now: a DSN could
                    # lie, and deleting it could not stop the delivery.
                    skip("being delivered")
                elif action == "bounce" and is_archive_route(entry.route):
                    skip("the archive's copy")
                else:
                    removable.append(entry)
            if action == "bounce":
                result["dsn"] = result["no_dsn"] = 0
            why = "returned to the sender by the hub's operator" + (f": {reason}" if reason else "")

            async def remove(e: Entry) -> str | None:
                if action == "bounce":
                    sent = await self._bounce(e, why, now)
                    result["dsn" if sent else "no_dsn"] += 1
                return None if await store.delete(e.id) else "gone"

            await each(removable, remove)
        result["done"] = len(done)
        if done and action in ("release", "flush", "redirect") and self._wake is not None:
            self._wake()
        return result

    async def _known_route(self, selection: Selection) -> None:
        """
        A route to act on that neither the configuration nor the spool
        knows is a mistake (a typo), not an empty selection: say so rather
        than "held 0 entries".

        :raises SelectionError: naming the routes there are.
        """
        route = selection.route
        if route is None or selection.domain is not None or is_archive_route(route):
            return
        configured = {d.route for d in self._config.domains.values()} | {self._config.outbound}
        if route in configured:
            return
        spooled = set((await self._store.counts()).get("routes", {}))
        if route not in spooled:
            known = ", ".join(sorted(configured | spooled))
            raise SelectionError(f"no route {route} in {self._config.path} or in the spool (routes: {known})")

    async def _flush_whole(self, selection: Selection) -> dict[str, Any]:
        """
        Flush a whole route (or a domain's, or the spool) with the store's
        one statement, before anything else: after an outage the backlog is
        what is flushed, and listing it first (100,000 entries: seconds)
        would hold its delivery back for a report.  So the report counts
        (the store's counters before the flush) and names no entries:
        ``"ids"`` is empty.
        """
        resolved = selection.resolve(self._config)
        counts = await self._store.counts()
        selected = int(counts["entries"] if resolved.route is None else counts["routes"].get(resolved.route, 0))
        count = int(await self._store.flush(resolved.route, self._clock.seconds()))
        if count and self._wake is not None:
            self._wake()
        # Entries that arrived between the two calls may be among those flushed.
        selected = max(selected, count)
        skipped = {"held or being delivered": selected - count} if selected > count else {}
        return {
            "action": "flush", "selection": resolved.describe(), "selected": selected, "done": count,
            "ids": [], "skipped": skipped,
        }

    async def _bounce(self, entry: Entry, why: str, now: float) -> bool:
        """
        Spool the DSN that tells ``entry``'s sender that its pending
        recipients were returned; durable before the entry goes.

        :returns: ``False`` when there is no one to tell (null sender).
        """
        from mailhub.delivery.dsn import build_dsn

        outcomes = [
            Outcome(r.address, Action.FAILED, _bounce_reply(why, r.reply))
            for r in entry.recipients
            if r.address in entry.pending
        ]
        try:
            message = await self._store.body(entry.message_id)
        except KeyError:
            message = b""
        dsn = build_dsn(self._config.hostname, entry, outcomes, message, now)
        if dsn is None:
            return False
        await self._spool_dsn(*dsn)
        return True


async def _coroutine(fn: Callable[[Entry], Awaitable[str | None]], entry: Entry) -> str | None:
    return await fn(entry)


def narrower_than_route(selection: Selection) -> bool:
    """Whether the selection narrows more than a route (or a domain's) does."""
    return bool(
        selection.ids or selection.sender or selection.recipient or selection.state
        or selection.older_than is not None or selection.reply
    )


def _bounce_reply(why: str, last: Reply | None) -> Reply:
    """The reply a bounced recipient's DSN gives: the operator's word, with the last reply heard."""
    text = why + (f" (last reply: {last})" if last is not None else "")
    return Reply(550, "5.0.0", text)


def summary(result: Mapping[str, Any]) -> str:
    """One line saying what ``QueueControl.act`` did."""
    action, where, n = result["action"], result["selection"], result["done"]
    if action == "hold":
        line = f"held {n} entries of {where}"
    elif action == "release":
        line = f"released {n} held entries of {where}"
    elif action == "flush":
        line = f"{n} entries due now"
    elif action == "redirect":
        line = f"redirected {n} entries of {where} to route {result.get('route')}, due now"
    elif action == "bounce":
        line = (
            f"bounced {n} entries of {where}: {result.get('dsn', 0)} DSNs to their senders,"
            f" {result.get('no_dsn', 0)} without a DSN (null sender)"
        )
    else:
        line = f"deleted {n} entries of {where}"
    skipped: Mapping[str, int] = result.get("skipped") or {}
    if skipped:
        line += "; skipped " + ", ".join(f"{c} {why}" for why, c in sorted(skipped.items()))
    return line


def merge(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The results of one action done in batches, as one result."""
    total: dict[str, Any] = {}
    for r in results:
        if not total:
            total = {**r, "ids": list(r["ids"]), "skipped": dict(r["skipped"])}
            continue
        for key in ("selected", "done", "dsn", "no_dsn"):
            if key in r:
                total[key] = total.get(key, 0) + r[key]
        total["ids"] += r["ids"]
        for why, c in r["skipped"].items():
            total["skipped"][why] = total["skipped"].get(why, 0) + c
    return total

"""
The ``redis`` spool store: one spool shared by nodes on several hosts.

Every change is one Lua script (``EVAL``), so it is atomic across every node
of every process sharing the Redis: an enqueue stores all of its entries or
none, and a claim leases each due entry to exactly one node.  Claiming sets
``next_attempt`` to the lease's expiry, so an abandoned lease needs no sweep:
its entry is simply due again.  ``record`` and ``release`` act only while the
entry still carries their lease's token.

The ``record`` and ``body`` calls made in one turn of the reactor go to Redis
together, as one script each (``RECORD_MANY``, ``BODIES`` of ``scripts``),
each call still getting its own result: in a drain, deliveries end and bodies are read ahead
many at a time, and every call to Redis costs the reactor thread a reply to
parse and a timeout to arm.  If the shared script fails, every call in it does.

Durability is Redis's: run it with ``appendonly yes`` and ``appendfsync
always`` so that a reply means the write is on disk, and/or set
``wait_replicas`` so that ``enqueue`` and ``record`` also wait for ``WAIT``
to confirm that many replicas have the write.

Every command has a timeout (``command_timeout``): a Redis that is down, or
up but not answering, makes a call fail with ``StoreUnavailable`` within that
time, never hang.  Calls in flight when the connection drops fail at once.
The connections are re-established by themselves, at most
``reconnect_max_delay`` after Redis is back, however long it was away; with
Sentinel, on the master Sentinel names.  When ``WAIT`` does not confirm an
enqueue, its entries are taken back (best effort) since the client is told to
try again later.

txredisapi installs the default reactor when imported, so this module imports
it only when a store is made, never at plugin discovery.

Configuration (the ``[store]`` table)::

    plugin = "redis"
    host = "127.0.0.1"          # or url = "redis://:password@host:6379/0"
    port = 6379
    db = 0
    password = "..."            # optional; username = "..." for an ACL user
    key_prefix = "mailhub:"     # several hubs can share one Redis
    command_timeout = 5.0       # seconds
    wait_replicas = 0           # > 0: a write waits for WAIT N to confirm it
                                # (for half of command_timeout at most)
    max_spool_bytes = 0         # > 0: enqueue fails with StoreFull when the spooled
                                # message bodies would exceed it (so does Redis OOM)
    sentinels = ["10.0.0.1:26379", "10.0.0.2:26379"]   # with master = "mymaster"
    master = "mymaster"
    pool_size = 2               # connections per node
    reconnect_max_delay = 2.0   # seconds between reconnection attempts, at most

Keys (all under ``key_prefix``; one spool per prefix)::

    e:<entry>   hash: data (JSON), next, node, held, token, lnode (the node
                      that took the last lease), linc (its incarnation,
                      ``ILeaseReclaim``), route, mid, pending
    a:<entry>   list: the attempts log, JSON, oldest first
    m:<msg>     hash: body, refs (entries using it), size
    due         zset: unreserved, unheld entries by next attempt (leased ones
                      by lease expiry)
    due:<node>  zset: the same for entries reserved for <node>
    nodes       set:  the nodes that have a due:<node>
    all         zset: every entry by next attempt, for listings
    held, leased  sets of entry ids
    routes      hash: route -> entries;  recipients, bytes: counters
    heartbeats  hash: node -> JSON {"last_seen", "info"} (``INodeRegistry``)
    shares:<route>  hash: node -> "given want expires holding", the nodes' shares of
                      the route's connections (``IRouteCoordination.share``)
    route_states    hash: route -> JSON, routes' hub-wide states

A key is removed as soon as it is empty, so an empty spool holds no key
(``heartbeats`` excepted: it lives as long as the hub's nodes do; so does a
``shares:<route>`` until every node has given its share back, or its share
expired and a later ``share`` of the route dropped it).  The scripts name
keys they compute from the prefix, so the store needs one Redis (or a
Sentinel-managed master), not a Redis Cluster.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.interfaces import (
    ILeaseReclaim,
    INodeRegistry,
    IRouteCoordination,
    ISpoolControl,
    ISpoolStore,
    IStorePlugin,
)
from mailhub.model import (
    Address,
    Attempt,
    Decision,
    Entry,
    EntryFilter,
    Envelope,
    Lease,
    LeaseLost,
    Recipient,
    RecipientState,
    Reply,
    StoreFull,
    StoreUnavailable,
    apply_decision,
    new_entries,
)

from . import scripts
from .connection import connect
from .settings import DEFAULT_COMMAND_TIMEOUT, DEFAULT_PREFIX, KEYS, settings

__all__ = ["RedisSpoolStore", "plugin"]

_T = TypeVar("_T")
_log = Logger()

_PAGE = 500

# -- serialisation ----------------------------------------------------------


def _num(value: float) -> str:
    """A time as a string that reads back as exactly the same float."""
    return repr(float(value))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _address_json(a: Address | None) -> list[str] | None:
    return None if a is None else [a.local, a.domain]


def _address(data: list[str] | None) -> Address | None:
    return None if data is None else Address(data[0], data[1])


def _reply_json(r: Reply | None) -> list[Any] | None:
    return None if r is None else [r.code, r.enhanced, r.text]


def _reply(data: list[Any] | None) -> Reply | None:
    return None if data is None else Reply(data[0], data[1], data[2])


def _new_id() -> str:
    return uuid.uuid4().hex



def _entry_json(e: Entry) -> str:
    """The parts of an entry the scripts never look into."""
    data = {
        "id": e.id,
        "mid": e.message_id,
        "route": e.route,
        "sender": _address_json(e.sender),
        "rcpt": [
            [_address_json(r.address), r.state.value, _reply_json(r.reply)]
            for r in e.recipients
        ],
        "created": e.created,
        "attempts": e.attempts,
        "size": e.size,
        "helo": e.envelope_helo,
        "client": e.envelope_client,
        "utf8": e.smtputf8,
    }
    if e.delay_notified:
        data["delayed"] = True  # only then: most entries never need the key
    return json.dumps(data)


def _entry(data: bytes, next_attempt: bytes, node: bytes, held: bytes) -> Entry:
    d = json.loads(data)
    return Entry(
        id=d["id"],
        message_id=d["mid"],
        route=d["route"],
        sender=_address(d["sender"]),
        recipients=tuple(
            Recipient(_address(a), RecipientState(s), _reply(r))  # type: ignore[arg-type]
            for a, s, r in d["rcpt"]
        ),
        created=d["created"],
        next_attempt=float(next_attempt),
        node=_text(node) or None,
        attempts=d["attempts"],
        held=held == b"1",
        size=d["size"],
        envelope_helo=d["helo"],
        envelope_client=d["client"],
        smtputf8=bool(d.get("utf8", False)),
        delay_notified=bool(d.get("delayed", False)),
    )


def _attempt_json(a: Attempt) -> str:
    return json.dumps(
        {
            "entry": a.entry_id,
            "node": a.node,
            "started": a.started,
            "finished": a.finished,
            "replies": [[_address_json(addr), _reply_json(r)] for addr, r in a.replies],
        }
    )


def _attempt(data: bytes) -> Attempt:
    d = json.loads(data)
    return Attempt(
        d["entry"],
        d["node"],
        d["started"],
        d["finished"],
        tuple((Address(addr[0], addr[1]), Reply(r[0], r[1], r[2])) for addr, r in d["replies"]),
    )


def _matches(e: Entry, f: EntryFilter) -> bool:
    if f.route is not None and e.route != f.route:
        return False
    if f.held is not None and e.held != f.held:
        return False
    if f.recipient is not None:
        wanted = f.recipient.lower()
        if not any(str(r.address).lower() == wanted for r in e.recipients):
            return False
    return True


# -- the store --------------------------------------------------------------


class _OneTurn:
    """
    The calls of one kind made in one turn of the reactor, sent to Redis
    together: ``send(items)`` makes one call for all of them, whose list
    result gives each its own answer (or whose failure fails them all).  In
    a drain, deliveries end and bodies are read ahead many at a time, and
    every call to Redis costs the reactor thread a reply to parse and a
    timeout to arm.
    """

    def __init__(self, reactor: Any, send: Callable[[list[Any]], Deferred[list[Any]]]) -> None:
        self._reactor = reactor
        self._send = send
        self._pending: list[tuple[Any, Deferred[Any]]] = []

    def add(self, item: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._pending.append((item, d))
        if len(self._pending) == 1:
            self._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        pending, self._pending = self._pending, []

        def answered(results: list[Any]) -> None:
            for (_, each), result in zip(pending, results, strict=True):
                each.callback(result)

        def failed(failure: Failure) -> None:
            for _, each in pending:
                each.errback(failure)

        self._send([item for item, _ in pending]).addCallbacks(answered, failed)


@implementer(ISpoolStore, INodeRegistry, IRouteCoordination, ILeaseReclaim, ISpoolControl)
@define
class RedisSpoolStore:
    """
    An ``ISpoolStore`` in Redis.

    :ivar _redis: a txredisapi connection handler (``charset=None``,
        ``convertNumbers=False``: bulk replies are ``bytes``).
    :ivar _reactor: ``IReactorTime`` for command timeouts and ``counts()``.
    :ivar _prefix: prepended to every key.
    :ivar _timeout: seconds any one call may take before it fails with
        ``StoreUnavailable``.
    :ivar _wait_replicas: replicas ``WAIT`` must confirm after a write; 0 for none.
    :ivar _max_spool_bytes: the spool's message bytes limit; 0 for none.
    :ivar _disconnect: closes the connections (and Sentinel's).
    """

    _redis: Any
    _reactor: Any
    _prefix: str = DEFAULT_PREFIX
    _timeout: float = DEFAULT_COMMAND_TIMEOUT
    _wait_replicas: int = 0
    _max_spool_bytes: int = 0
    _disconnect: Callable[[], Deferred[Any]] = field(default=lambda: succeed(None))
    _records: _OneTurn = field(init=False)
    _bodies: _OneTurn = field(init=False)
    #: node -> the incarnation its leases are held under (``ILeaseReclaim``)
    _incarnations: dict[str, str] = field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._records = _OneTurn(self._reactor, self._send_records)
        self._bodies = _OneTurn(self._reactor, self._read_bodies)

    # -- plumbing -------------------------------------------------------

    def _unavailable(self, failure: Failure, what: str) -> Failure:
        if failure.check(StoreUnavailable):
            return failure
        if failure.check(TimeoutError):
            return Failure(
                StoreUnavailable(f"redis: {what} got no answer within {self._timeout:g}s")
            )
        error = failure.value
        sub = getattr(error, "subFailure", None)  # a pipeline's FirstError
        if sub is not None:
            error = sub.value
        if str(error).startswith("OOM"):
            return Failure(StoreFull(f"redis: {what}: {error}"))
        return Failure(StoreUnavailable(f"redis: {what}: {error}"))

    def _guard(self, d: Deferred[_T], what: str) -> Deferred[_T]:
        """Bound ``d`` by the command timeout and turn any failure into ``StoreUnavailable``."""
        d.addTimeout(self._timeout, self._reactor)
        return d.addErrback(self._unavailable, what)

    def _eval(self, script: str, what: str, *args: str | bytes | int) -> Deferred[Any]:
        """
        Run a script by its SHA1, sending its text only when Redis does not
        know it yet (txredisapi's own ``eval`` fallback is broken).
        """
        execute = self._redis.execute_command

        def unknown(failure: Failure) -> Any:
            if str(failure.value).startswith("NOSCRIPT"):
                return execute("EVAL", script, 0, self._prefix, *args)
            return failure

        try:
            d = execute("EVALSHA", scripts.sha1(script), 0, self._prefix, *args)
        except Exception:
            d = fail()
        return self._guard(d.addErrback(unknown), what)

    def _command(self, what: str, *args: str | bytes | int) -> Deferred[Any]:
        try:
            d = self._redis.execute_command(*args)
        except Exception:
            d = fail()
        return self._guard(d, what)

    def _eval_replicated(self, script: str, what: str, *args: str | bytes | int) -> Deferred[Any]:
        """
        Run a script that writes and, with ``wait_replicas``, ``WAIT`` for its
        replication on the same connection (``WAIT`` covers only the writes of
        the connection that sends it).
        """
        if not self._wait_replicas:
            return self._eval(script, what, *args)
        wait_ms = max(1, int(self._timeout * 500))

        async def run() -> Any:
            conn = await self._redis.pipeline()
            # EVAL, not EVALSHA: a NOSCRIPT retry would come after the WAIT.
            conn.execute_command("EVAL", script, 0, self._prefix, *args)
            conn.execute_command("WAIT", self._wait_replicas, wait_ms)
            result, acked = await conn.execute_pipeline()
            if acked < self._wait_replicas:
                raise StoreUnavailable(
                    f"redis: {what}: {acked} of {self._wait_replicas} replicas"
                    f" confirmed the write within {wait_ms} ms"
                )
            return result

        return self._guard(ensureDeferred(run()), what)

    # -- ISpoolStore ----------------------------------------------------

    def enqueue(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
    ) -> Deferred[list[str]]:
        d = self._enqueue(envelope, message, routes, node, None, None)
        return d.addCallback(lambda stored: [cast(Entry, e).id for e in stored])

    def enqueue_leased(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
        lease_seconds: float,
        decided: Mapping[str, tuple[Attempt, Decision]] | None = None,
    ) -> Deferred[list[Lease | Entry]]:
        lease = (uuid.uuid4().hex, envelope.received_at + lease_seconds)
        return self._enqueue(envelope, message, routes, node, lease, decided)

    def _enqueue(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
        lease: tuple[str, float] | None,
        decided: Mapping[str, tuple[Attempt, Decision]] | None,
    ) -> Deferred[list[Lease | Entry]]:
        if not routes:
            return succeed([])
        message = bytes(message)
        message_id = uuid.uuid4().hex
        entries = new_entries(envelope, len(message), routes, node, message_id, _new_id)
        ids = [e.id for e in entries]
        args: list[str | bytes | int] = [
            str(self._max_spool_bytes),
            message_id,
            message,
            len(message),
            node,
            self._incarnations.get(node, ""),
            len(routes),
        ]
        results: list[Lease | Entry] = []
        for i, entry in enumerate(entries, 1):
            if decided and entry.route in decided:
                attempt, decision = decided[entry.route]
                after = apply_decision(entry, decision)
                results.append(after)
                args += [entry.id, entry.route, _entry_json(after), len(after.pending),
                         _num(after.next_attempt), after.node or "", "",
                         _attempt_json(evolve(attempt, entry_id=entry.id))]
            elif lease is not None:
                token = f"{lease[0]}.{i}"
                results.append(Lease(entry, node, token, lease[1]))
                args += [entry.id, entry.route, _entry_json(entry), len(entry.recipients),
                         _num(lease[1]), "", token, ""]
            else:
                results.append(entry)
                args += [entry.id, entry.route, _entry_json(entry), len(entry.recipients),
                         _num(entry.next_attempt), node, "", ""]

        def stored(n: int) -> list[Lease | Entry]:
            if n < 0:
                raise StoreFull(f"redis: the spool holds max_spool_bytes={self._max_spool_bytes}")
            return results

        def not_undone(failure: Failure, entry_id: str) -> None:
            _log.warn(
                "could not take back unconfirmed entry {entry}: {why}",
                entry=entry_id,
                why=failure.getErrorMessage(),
            )

        def undo(failure: Failure) -> Failure:
            # The write may have reached the master even though WAIT did not
            # confirm it: the client is told 4xx and sends the message again,
            # so take this copy back (best effort; at worst a duplicate).
            if self._wait_replicas and failure.check(StoreUnavailable):
                for entry_id in ids:
                    self._eval(scripts.DELETE, "undo enqueue", entry_id).addErrback(not_undone, entry_id)
            return failure

        d = self._eval_replicated(scripts.ENQUEUE, "enqueue", *args)
        return d.addCallbacks(stored, undo)

    def claim(
        self,
        node: str,
        now: float,
        limit: int,
        lease_seconds: float,
        takeover_seconds: float,
        ids: Iterable[str] | None = None,
    ) -> Deferred[list[Lease]]:
        expires = now + lease_seconds
        args: list[str | bytes | int] = [
            node,
            _num(now),
            max(0, int(limit)),
            _num(expires),
            _num(takeover_seconds),
            uuid.uuid4().hex,
            self._incarnations.get(node, ""),
        ]
        if ids is None:
            args.append("due")
        else:
            args.append("ids")
            args += list(dict.fromkeys(ids))

        def leases(rows: list[list[bytes]]) -> list[Lease]:
            return [
                Lease(_entry(data, nxt, owner, held), node, _text(token), expires)
                for _id, token, data, nxt, owner, held in rows
            ]

        return self._eval(scripts.CLAIM, "claim", *args).addCallback(leases)

    def body(self, message_id: str) -> Deferred[bytes]:
        def found(body: bytes | None) -> bytes:
            if body is None:
                raise KeyError(message_id)
            return body

        return self._bodies.add(message_id).addCallback(found)

    def _read_bodies(self, message_ids: list[str]) -> Deferred[list[bytes | None]]:
        """The bodies asked for in one turn of the reactor (a claimed batch's), in one script."""
        return self._eval(scripts.BODIES, "body", *message_ids)

    def record(self, lease: Lease, attempt: Attempt, decision: Decision) -> Deferred[Entry | None]:
        entry = apply_decision(lease.entry, decision)

        def done(result: int) -> Entry | None:
            if result < 0:
                raise LeaseLost(lease.entry.id)
            if result == 0:
                return None
            return evolve(entry, held=result == 2)

        args = (
            entry.id,
            lease.token,
            _entry_json(entry),
            _num(entry.next_attempt),
            entry.node or "",
            len(entry.pending),
            "1" if entry.held else "0",
            _attempt_json(attempt),
        )
        return self._records.add(args).addCallback(done)

    def _send_records(self, records: list[tuple[str | int, ...]]) -> Deferred[list[int]]:
        """The records made in one turn of the reactor, in one script."""
        return self._eval_replicated(
            scripts.RECORD_MANY, "record", len(records), *(a for args in records for a in args)
        )

    def release(self, lease: Lease, now: float) -> Deferred[None]:
        d = self._eval(scripts.RELEASE, "release", lease.entry.id, lease.token, _num(now))
        return d.addCallback(lambda _: None)

    def next_due(
        self, node: str, now: float, takeover_seconds: float = 0.0
    ) -> Deferred[float | None]:
        def due(result: list[Any] | None) -> float | None:
            if not result:
                return None
            score, other = result
            return float(score) + (takeover_seconds if other else 0.0)

        return self._eval(scripts.NEXT_DUE, "next_due", node, _num(takeover_seconds)).addCallback(due)

    def get(self, entry_id: str) -> Deferred[Entry | None]:
        def found(f: list[bytes | None]) -> Entry | None:
            if f[0] is None:
                return None
            return _entry(*f)  # type: ignore[arg-type]

        key = f"{self._prefix}e:{entry_id}"
        d = self._command("get", "HMGET", key, "data", "next", "node", "held")
        return d.addCallback(found)

    def attempts(self, entry_id: str) -> Deferred[list[Attempt]]:
        key = f"{self._prefix}a:{entry_id}"
        d = self._command("attempts", "LRANGE", key, 0, -1)
        return d.addCallback(lambda rows: [_attempt(r) for r in rows or []])

    def _page(self, start: int, stop: int) -> Deferred[list[Entry]]:
        d = self._eval(scripts.PAGE, "entries", start, stop)
        return d.addCallback(lambda rows: [_entry(*row) for row in rows if row[0] is not None])

    def entries(
        self, filter: EntryFilter | None = None, offset: int = 0, limit: int = 100
    ) -> Deferred[list[Entry]]:
        if limit <= 0:
            return succeed([])
        if filter is None:
            return self._page(offset, offset + limit - 1)
        wanted = filter

        async def scan() -> list[Entry]:
            found: list[Entry] = []
            start = 0
            while len(found) < offset + limit:
                page = await self._page(start, start + _PAGE - 1)
                found += [e for e in page if _matches(e, wanted)]
                if len(page) < _PAGE:
                    break
                start += _PAGE
            return found[offset : offset + limit]

        return ensureDeferred(scan())

    def counts(self) -> Deferred[dict[str, Any]]:
        def report(r: list[Any]) -> dict[str, Any]:
            entries, held, leased, recipients, routes = r
            return {
                "entries": int(entries),
                "held": int(held),
                "leased": int(leased),
                "recipients": int(recipients),
                "routes": {
                    _text(k): int(v) for k, v in zip(routes[::2], routes[1::2], strict=True)
                },
            }

        d = self._eval(scripts.COUNTS, "counts", _num(self._reactor.seconds()))
        return d.addCallback(report)

    def hold(self, entry_id: str) -> Deferred[bool]:
        return self._eval(scripts.HOLD, "hold", entry_id).addCallback(bool)

    def release_held(self, entry_id: str, now: float) -> Deferred[bool]:
        return self._eval(scripts.RELEASE_HELD, "release_held", entry_id, _num(now)).addCallback(bool)

    def flush(self, route: str | None, now: float) -> Deferred[int]:
        d = self._eval(scripts.FLUSH, "flush", "0" if route is None else "1", route or "", _num(now))
        return d.addCallback(int)

    def delete(self, entry_id: str) -> Deferred[bool]:
        return self._eval(scripts.DELETE, "delete", entry_id).addCallback(bool)

    # -- ISpoolControl -----------------------------------------------------

    def requeue(self, entry_id: str, now: float, route: str | None = None) -> Deferred[str]:
        key = f"{self._prefix}e:{entry_id}"

        async def run() -> str:
            for _ in range(10):
                old = new = b""
                if route:
                    old = await self._command("requeue", "HGET", key, "data")
                    if old is None:
                        return "missing"
                    data = json.loads(old)
                    data["route"] = route
                    new = json.dumps(data).encode()
                result = int(
                    await self._eval_replicated(
                        scripts.REQUEUE, "requeue", entry_id, _num(now), route or "", old, new
                    )
                )
                if result != 2:
                    return ("missing", "leased", "", "requeued")[result]
            raise StoreUnavailable(f"redis: requeue of {entry_id}: the entry kept changing")

        return ensureDeferred(run())

    def leased_entries(self, now: float) -> Deferred[set[str]]:
        d = self._eval(scripts.LEASED, "leased_entries", _num(now))
        return d.addCallback(lambda ids: {_text(i) for i in ids or []})

    # -- ILeaseReclaim -----------------------------------------------------

    def reclaim(self, node: str, incarnation: str, now: float) -> Deferred[int]:
        self._incarnations[node] = incarnation
        d = self._eval_replicated(scripts.RECLAIM, "reclaim", node, incarnation, _num(now))
        return d.addCallback(int)

    # -- INodeRegistry -----------------------------------------------------

    def heartbeat(self, node: str, now: float, info: Mapping[str, Any]) -> Deferred[None]:
        value = json.dumps({"last_seen": now, "info": dict(info)})
        d = self._command("heartbeat", "HSET", f"{self._prefix}heartbeats", node, value)
        return d.addCallback(lambda _: None)

    def nodes(self, now: float) -> Deferred[list[dict[str, Any]]]:
        def report(r: list[Any]) -> list[dict[str, Any]]:
            beats, leased, reserved = r
            found: dict[str, dict[str, Any]] = {}

            def of(name: bytes) -> dict[str, Any]:
                key = _text(name)
                return found.setdefault(
                    key, {"name": key, "last_seen": None, "info": {}, "leased": 0, "reserved": 0}
                )

            for name, value in zip(beats[::2], beats[1::2], strict=True):
                beat = json.loads(value)
                of(name).update(last_seen=beat["last_seen"], info=beat["info"])
            for name, n in zip(leased[::2], leased[1::2], strict=True):
                of(name)["leased"] = int(n)
            for name, n in zip(reserved[::2], reserved[1::2], strict=True):
                of(name)["reserved"] = int(n)
            return [found[name] for name in sorted(found)]

        return self._eval(scripts.NODES, "nodes", _num(now)).addCallback(report)

    # -- IRouteCoordination -----------------------------------------------

    def share(
        self, route: str, node: str, want: int, holding: int, limit: int, now: float, ttl: float
    ) -> Deferred[int]:
        # Not replicated before it fires: a share lasts ttl seconds and is
        # asked for again; a failover that loses one loses only that.
        d = self._eval(
            scripts.SHARE, "share", route, node, int(want), int(holding), int(limit), _num(now),
            _num(now + ttl),
        )
        return d.addCallback(int)

    def route_states(self) -> Deferred[dict[str, dict[str, Any]]]:
        def report(r: list[bytes]) -> dict[str, dict[str, Any]]:
            return {_text(k): json.loads(v) for k, v in zip(r[::2], r[1::2], strict=True)}

        d = self._command("route_states", "HGETALL", f"{self._prefix}route_states")
        return d.addCallback(report)

    def set_route_state(self, route: str, state: Mapping[str, Any] | None) -> Deferred[None]:
        if state is None:
            args: tuple[str, ...] = (route, "0", "")
        else:
            try:
                args = (route, "1", json.dumps(dict(state)))
            except (TypeError, ValueError):
                return fail()
        d = self._eval_replicated(scripts.SET_ROUTE_STATE, "set_route_state", *args)
        return d.addCallback(lambda _: None)

    def close(self) -> Deferred[None]:
        d = self._disconnect()
        d.addTimeout(self._timeout, self._reactor)
        return d.addBoth(lambda _: None)


@implementer(IStorePlugin)
@frozen
class RedisStorePlugin:
    """Makes a ``RedisSpoolStore`` from the ``[store]`` table (see the module docstring)."""

    name: str = "redis"
    #: The keys of ``[store]`` besides ``plugin`` (``mailhub.plugin``).
    config_keys: frozenset[str] = KEYS

    def check_config(self, config: Mapping[str, Any]) -> None:
        """
        Check the ``[store]`` table as ``make`` does, without connecting.

        :raises ValueError: naming the key at fault.
        """
        settings(config)

    def make(self, config: Mapping[str, Any], reactor: Any) -> RedisSpoolStore:
        """
        Check the configuration and start connecting; the store is usable at
        once (calls wait for the connection, up to ``command_timeout``).

        :param config: the ``[store]`` table.
        :param reactor: a running reactor: time, timeouts, TCP.
        :raises ValueError: naming the key, when the configuration is wrong.
        """
        checked = settings(config)
        redis, disconnect = connect(checked, reactor)
        return RedisSpoolStore(
            redis,
            reactor,
            checked.key_prefix,
            checked.command_timeout,
            checked.wait_replicas,
            checked.max_spool_bytes,
            disconnect,
        )


plugin = RedisStorePlugin()

"""
The ``sqlite`` spool store: the embedded default, for nodes on one host.

Every statement runs on one of the store's two threads, never on the reactor
thread.  The writer thread takes all the jobs waiting in its queue, runs them
in one transaction, each inside its own savepoint, commits once and then fires
their ``Deferred`` from the reactor thread: concurrent SMTP sessions share one
fsync (group commit).  The batch runs without savepoints; if a job fails,
it is rolled back and run again with a savepoint per job, so a job that
fails rolls back only its own work.

Calls that only read (``body``, ``get``, ``attempts``, ``entries``,
``counts``, ``next_due``, ``nodes``, ``route_states``) run on a reader
thread with its own connection, each batch of them in one read transaction:
in WAL mode they run beside the writer without taking its lock or joining
its batches.  A write's ``Deferred`` fires only after its ``COMMIT``, so a
read issued after that sees the write.

Leasing is atomic across stores and processes because a claim runs inside
``BEGIN IMMEDIATE``, which takes SQLite's write lock before reading.  Claiming
sets ``next_attempt`` to the lease's expiry, so an abandoned lease needs no
sweep: its entry is simply due again.  ``record`` and ``release`` act only
while the row still carries their lease's token.  A leased row also names
the incarnation of the node that took it (``lease_incarnation``), so that a
restarted node takes back at once what its dead process held
(``reclaim``).  A route's ``share`` and ``reclaim`` are one writer job each,
so they too are atomic across stores and processes.

Bodies over ``LOG_THRESHOLD`` octets (16 KB) are not stored in the database
but appended to segment files in ``<path>.bodies/`` (``bodylog``), each
segment's new bodies fdatasync'd before the ``COMMIT`` that refers to them: a
100 KB body is written to disk once, where in the database it was written to
the log and then copied by the checkpoint into the database file.  A segment
is deleted once no message refers to it (and no writer holds it); one that
is mostly unused has its bodies still in use copied forward first
(``BodyLog.compact``), so a long-deferred message keeps no whole segment.  The
database and its ``.bodies`` directory are one spool: back them up, move them
and delete them together.  The spool's schema is in ``PRAGMA user_version``
(``SCHEMA_VERSION``); a store refuses a spool of a newer schema.

Configuration (the ``[store]`` table)::

    plugin = "sqlite"
    path = "var/spool.db"     # relative to the configuration file's directory
    busy_timeout = 10         # seconds to wait for another process's lock
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
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
    apply_decision,
    fair_share,
    new_entries,
)

from .bodylog import LOG_THRESHOLD, BodyLog
from .schema import ENTRY_COLUMNS
from .workers import Checkpointer, Reader, Writer

__all__ = ["SqliteSpoolStore", "plugin"]

_T = TypeVar("_T")

DEFAULT_BUSY_TIMEOUT = 10.0

#: The claim query.  The index ``entries_due`` gives the due rows in order, so
#: a claim reads only those, however large the spool.
CLAIM_SQL = (
    f"SELECT {ENTRY_COLUMNS} FROM entries"
    " WHERE held = 0 AND next_attempt <= :now"
    " AND (node IS NULL OR node = :node OR next_attempt + :takeover <= :now)"
    " ORDER BY next_attempt LIMIT :limit"
)

#: The claim query for given ids (``{ids}`` is the list of parameters).  The
#: unary ``+`` keeps SQLite off ``entries_due``: looking the few ids up by
#: primary key beats walking a backlog of due entries.
CLAIM_IDS_SQL = (
    f"SELECT {ENTRY_COLUMNS} FROM entries"
    " WHERE id IN ({ids}) AND +held = 0 AND +next_attempt <= :now"
    " AND (node IS NULL OR node = :node OR next_attempt + :takeover <= :now)"
    " ORDER BY next_attempt LIMIT :limit"
)


#: Leases the rows a claim selected, in one statement (``{ids}`` is the list of
#: parameters, at most ``_CLAIM_UPDATE_CHUNK``).  It runs in the claim query's
#: ``BEGIN IMMEDIATE`` transaction, so no other claim sees those rows as due in
#: between.  (Not ``UPDATE ... RETURNING``: that returns the rows as updated,
#: and the lease must carry the entry as it stood, due time and node included.)
CLAIM_UPDATE_SQL = (
    "UPDATE entries SET lease_node = ?, lease_token = ?, lease_incarnation = ?,"
    " next_attempt = ?, node = NULL WHERE id IN ({ids})"
)
_CLAIM_UPDATE_CHUNK = 500


def _address(text: str) -> Address:
    # A domain never contains "@", so the last one splits the address exactly.
    local, _, domain = text.rpartition("@")
    return Address(local, domain)



def _id_maker() -> Callable[[], str]:
    """
    A maker of ids unique in the spool: 96 random bits drawn once per store,
    then a counter.  Several stores and processes share one file, so the random
    part keeps them apart; the counter spares ``os.urandom`` per id.
    """
    prefix = os.urandom(12).hex()
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter):x}"


def _reply_json(reply: Reply | None) -> list[Any] | None:
    return None if reply is None else [reply.code, reply.enhanced, reply.text]


def _recipients_json(recipients: Iterable[Recipient]) -> str:
    return json.dumps(
        [
            {"address": str(r.address), "state": r.state.value, "reply": _reply_json(r.reply)}
            for r in recipients
        ],
        ensure_ascii=False,
    )


def _pending_json(recipients: Iterable[Address]) -> str:
    """``_recipients_json`` of new (pending, no reply) recipients, built directly."""
    return json.dumps(
        [{"address": str(a), "state": "pending", "reply": None} for a in recipients],
        ensure_ascii=False,
    )


def _recipients(text: str) -> tuple[Recipient, ...]:
    return tuple(
        Recipient(
            _address(r["address"]),
            RecipientState(r["state"]),
            None if r["reply"] is None else Reply(*r["reply"]),
        )
        for r in json.loads(text)
    )


def _entry(row: Sequence[Any]) -> Entry:
    (id, message_id, route, sender, recipients, created, next_attempt, node) = row[:8]
    (attempts, held, size, helo, client, smtputf8, delay_notified) = row[8:]
    return Entry(
        id=id,
        message_id=message_id,
        route=route,
        sender=None if sender is None else _address(sender),
        recipients=tuple(_recipients(recipients)),
        created=created,
        next_attempt=next_attempt,
        node=node,
        attempts=attempts,
        held=bool(held),
        size=size,
        envelope_helo=helo,
        envelope_client=client,
        smtputf8=bool(smtputf8),
        delay_notified=bool(delay_notified),
    )


@implementer(ISpoolStore, INodeRegistry, IRouteCoordination, ILeaseReclaim, ISpoolControl)
@define
class SqliteSpoolStore:
    """
    An ``ISpoolStore`` in one SQLite file, shared safely by several stores and
    processes on one host.  Build it with ``SqliteSpoolStore.open``.
    """

    _writer: Writer
    _clock: Any
    _reader: Reader
    _new_id: Callable[[], str]
    #: node -> the incarnation its leases are held under (``ILeaseReclaim``)
    _incarnations: dict[str, str] = field(factory=dict)

    @classmethod
    def open(
        cls,
        path: str,
        reactor: Any,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        clock: Any = None,
    ) -> SqliteSpoolStore:
        """
        Start the writer thread for the database at ``path`` (created with its
        directory if missing; a failure to open shows as ``StoreUnavailable``
        from the first calls, and is retried on every later one).

        :param reactor: the reactor results are delivered to (``callFromThread``).
        :param busy_timeout: seconds to wait for a lock another process holds.
        :param clock: an ``IReactorTime`` for ``counts()``; the reactor by default.
        """
        writer = Writer(path, busy_timeout, reactor)
        reader = Reader(path, busy_timeout, reactor)
        # Last, so that nothing above can fail and leave its thread running.
        writer.checkpointer = Checkpointer(path, busy_timeout)
        return cls(writer, reactor if clock is None else clock, reader, _id_maker())

    @property
    def commits(self) -> int:
        """How many transactions this store has committed (for tests and metrics)."""
        return self._writer.commits

    def run(self, job: Callable[[sqlite3.Connection], _T]) -> Deferred[_T]:
        """
        Run ``job(connection)`` on the writer thread inside a transaction (for
        tests and maintenance).  Its result or exception goes to the ``Deferred``.
        """
        return self._writer.submit(job)

    def _read(self, job: Callable[[sqlite3.Connection], _T]) -> Deferred[_T]:
        """
        Run the read-only ``job`` on the reader thread; on the writer until the
        writer has made the schema (a new file has no tables before that).
        """
        if self._writer.ready:
            return self._reader.submit(job)
        return self._writer.submit(job)

    # -- ISpoolStore ----------------------------------------------------

    def enqueue(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
    ) -> Deferred[list[str]]:
        job = self._new_message(envelope, message, routes, node, None, None)
        if job is None:
            return succeed([])
        return self._writer.submit(job).addCallback(lambda stored: [cast(Entry, e).id for e in stored])

    def enqueue_leased(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
        lease_seconds: float,
        decided: Mapping[str, tuple[Attempt, Decision]] | None = None,
    ) -> Deferred[list[Lease | Entry]]:
        expires = envelope.received_at + lease_seconds
        job = self._new_message(envelope, message, routes, node, expires, decided)
        if job is None:
            return succeed([])
        return self._writer.submit(job)

    def _new_message(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Mapping[str, Sequence[Address]],
        node: str,
        expires: float | None,
        decided: Mapping[str, tuple[Attempt, Decision]] | None,
    ) -> _Inserts | None:
        """
        The writer job that stores a new message and its entries (``None``
        without routes: nothing to store).  Its result has one item per
        route: the entry; with ``expires``, a lease on it to this node until
        then; for a route in ``decided``, the entry as ``record`` leaves it
        after that first attempt.
        """
        # A bytes subclass (the server's CheckedMessage) binds as it is: no copy.
        body = message if isinstance(message, bytes) else bytes(message)
        message_id = self._new_id()
        token = "" if expires is None else self._new_id()
        entries = new_entries(envelope, len(body), routes, node, message_id, self._new_id)
        if not entries:
            return None
        sender = None if envelope.sender is None else str(envelope.sender)
        common = (envelope.received_at, len(body), envelope.helo, envelope.client, int(envelope.smtputf8))
        stored: list[Lease | Entry] = []
        rows: list[tuple[Any, ...]] = []
        attempts = []
        incarnation = None if expires is None else self._incarnations.get(node)
        for e in entries:
            head = (e.id, message_id, e.route, sender)
            if decided and e.route in decided:
                # Stored as record() leaves it after that attempt.
                attempt, decision = decided[e.route]
                after = apply_decision(e, decision)
                stored.append(after)
                rows.append(
                    head
                    + (_recipients_json(after.recipients),)
                    + common
                    + (after.next_attempt, after.node, None, None, after.attempts, int(after.held), None)
                )
                attempts.append(_attempt_row(evolve(attempt, entry_id=e.id)))
            elif expires is None:
                stored.append(e)
                rows.append(
                    head
                    + (_pending_json(routes[e.route]),)
                    + common
                    + (e.next_attempt, e.node, None, None, 0, 0, None)
                )
            else:
                # In the row, the lease's expiry stands in for the due time,
                # as after claim; the lease carries the entry as enqueued.
                stored.append(Lease(e, node, token, expires))
                rows.append(
                    head
                    + (_pending_json(routes[e.route]),)
                    + common
                    + (expires, None, node, token, 0, 0, incarnation)
                )
        return _Inserts([(message_id, body)], rows, attempts, stored, self._writer.bodies)

    def claim(
        self,
        node: str,
        now: float,
        limit: int,
        lease_seconds: float,
        takeover_seconds: float,
        ids: Iterable[str] | None = None,
    ) -> Deferred[list[Lease]]:
        wanted = None if ids is None else list(ids)
        new_id = self._new_id
        incarnation = self._incarnations.get(node)

        def job(conn: sqlite3.Connection) -> list[Lease]:
            if wanted is not None and not wanted:
                return []
            params: dict[str, Any] = {
                "now": now,
                "node": node,
                "takeover": takeover_seconds,
                "limit": limit,
            }
            sql = CLAIM_SQL
            if wanted is not None:
                names = [f"id{i}" for i in range(len(wanted))]
                sql = CLAIM_IDS_SQL.format(ids=", ".join(":" + n for n in names))
                params.update(zip(names, wanted, strict=True))
            rows = conn.execute(sql, params).fetchall()
            if not rows:
                return []
            expires = now + lease_seconds
            # One token for this claim: a row carries it only while this
            # claim's lease on it lasts, which is all record and release check.
            token = new_id()
            for i in range(0, len(rows), _CLAIM_UPDATE_CHUNK):
                chunk = [row[0] for row in rows[i : i + _CLAIM_UPDATE_CHUNK]]
                conn.execute(
                    CLAIM_UPDATE_SQL.format(ids=", ".join("?" * len(chunk))),
                    (node, token, incarnation, expires, *chunk),
                )
            return [Lease(_entry(row), node, token, expires) for row in rows]

        return self._writer.submit(job)

    def body(self, message_id: str) -> Deferred[bytes]:
        bodies = self._writer.bodies

        def job(conn: sqlite3.Connection) -> bytes:
            row = conn.execute(
                "SELECT body, log_segment, log_offset, log_length FROM messages WHERE id = ?",
                (message_id,),
            ).fetchone()
            if row is None:
                raise KeyError(message_id)
            if row[1] is not None:
                return bodies.read(row[1], row[2], row[3])
            return bytes(row[0])

        return self._read(job)

    def record(self, lease: Lease, attempt: Attempt, decision: Decision) -> Deferred[Entry | None]:
        if not apply_decision(lease.entry, decision).pending:
            # Every recipient the lease covers is done (the usual case: all
            # delivered), and only the lease's holder changes recipients, so
            # the entry goes whatever its row holds: no read, no decoding on
            # the writer, one statement fewer.
            entry = lease.entry
            return self._writer.submit(
                _Removal(entry.id, lease.token, entry.message_id, entry.attempts > 0)
            )

        def job(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(
                f"SELECT {ENTRY_COLUMNS}, lease_token FROM entries WHERE id = ?",
                (lease.entry.id,),
            ).fetchone()
            if row is None or row[-1] != lease.token:
                raise LeaseLost(lease.entry.id)
            # The entry as claimed: its due time then, not the lease's expiry.
            current = _entry(row[:6] + (lease.entry.next_attempt,) + row[7:-1])
            entry = apply_decision(current, decision)
            if not entry.pending:
                _remove(conn, entry.id, entry.message_id)
                return None
            conn.execute(
                "UPDATE entries SET recipients = ?, attempts = ?, next_attempt = ?, node = ?,"
                " held = ?, delay_notified = ?, lease_node = NULL, lease_token = NULL WHERE id = ?",
                (
                    _recipients_json(entry.recipients),
                    entry.attempts,
                    entry.next_attempt,
                    entry.node,
                    int(entry.held),
                    int(entry.delay_notified),
                    entry.id,
                ),
            )
            conn.execute(_insert_sql("attempts", 1), _attempt_row(attempt))
            return entry

        return self._writer.submit(job)

    def release(self, lease: Lease, now: float) -> Deferred[None]:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE entries SET next_attempt = ?, node = NULL, lease_node = NULL,"
                " lease_token = NULL WHERE id = ? AND lease_token = ?",
                (now, lease.entry.id, lease.token),
            )

        return self._writer.submit(job)

    def next_due(
        self, node: str, now: float, takeover_seconds: float = 0.0
    ) -> Deferred[float | None]:
        def job(conn: sqlite3.Connection) -> float | None:
            # Walk the due index in order; an entry reserved for another node is
            # due later, so stop once no later row can beat the best found.
            best: float | None = None
            rows = conn.execute(
                "SELECT next_attempt, node FROM entries WHERE held = 0 ORDER BY next_attempt"
            )
            for next_attempt, reserved_for in rows:
                if best is not None and next_attempt >= best:
                    break
                due = next_attempt
                if reserved_for is not None and reserved_for != node:
                    due += takeover_seconds
                best = due if best is None else min(best, due)
            return best

        return self._read(job)

    def get(self, entry_id: str) -> Deferred[Entry | None]:
        def job(conn: sqlite3.Connection) -> Entry | None:
            row = conn.execute(
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE id = ?", (entry_id,)
            ).fetchone()
            return None if row is None else _entry(row)

        return self._read(job)

    def attempts(self, entry_id: str) -> Deferred[list[Attempt]]:
        def job(conn: sqlite3.Connection) -> list[Attempt]:
            rows = conn.execute(
                "SELECT entry_id, node, started, finished, replies FROM attempts"
                " WHERE entry_id = ? ORDER BY rowid",
                (entry_id,),
            )
            return [
                Attempt(
                    entry_id,
                    node,
                    started,
                    finished,
                    tuple(
                        (_address(a), Reply(code, enhanced, text))
                        for a, code, enhanced, text in json.loads(replies)
                    ),
                )
                for entry_id, node, started, finished, replies in rows
            ]

        return self._read(job)

    def entries(
        self, filter: EntryFilter | None = None, offset: int = 0, limit: int = 100
    ) -> Deferred[list[Entry]]:
        where = []
        params: list[Any] = []
        if filter is not None:
            if filter.route is not None:
                where.append("route = ?")
                params.append(filter.route)
            if filter.held is not None:
                where.append("held = ?")
                params.append(int(filter.held))
            if filter.recipient is not None:
                where.append(
                    "EXISTS (SELECT 1 FROM json_each(entries.recipients)"
                    " WHERE lower(json_extract(value, '$.address')) = lower(?))"
                )
                params.append(filter.recipient)
        sql = f"SELECT {ENTRY_COLUMNS} FROM entries"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY next_attempt, rowid LIMIT ? OFFSET ?"
        params += [limit, offset]

        def job(conn: sqlite3.Connection) -> list[Entry]:
            return [_entry(row) for row in conn.execute(sql, params)]

        return self._read(job)

    def counts(self) -> Deferred[dict[str, Any]]:
        now = self._clock.seconds()
        bodies = self._writer.bodies

        def job(conn: sqlite3.Connection) -> dict[str, Any]:
            entries, held, leased = conn.execute(
                "SELECT count(*), coalesce(sum(held), 0),"
                " coalesce(sum(lease_token IS NOT NULL AND next_attempt > ?), 0) FROM entries",
                (now,),
            ).fetchone()
            (recipients,) = conn.execute(
                "SELECT count(*) FROM entries, json_each(entries.recipients)"
                " WHERE json_extract(value, '$.state') = 'pending'"
            ).fetchone()
            routes = dict(conn.execute("SELECT route, count(*) FROM entries GROUP BY route"))
            (in_use,) = conn.execute(
                "SELECT coalesce(sum(log_length), 0) FROM messages WHERE log_segment IS NOT NULL"
            ).fetchone()
            return {
                "entries": entries,
                "held": held,
                "leased": leased,
                "recipients": recipients,
                "routes": routes,
                "body_log": {**bodies.usage(), "in_use": in_use},
            }

        return self._read(job)

    def hold(self, entry_id: str) -> Deferred[bool]:
        def job(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute("UPDATE entries SET held = 1 WHERE id = ?", (entry_id,)).rowcount > 0
            )

        return self._writer.submit(job)

    def release_held(self, entry_id: str, now: float) -> Deferred[bool]:
        def job(conn: sqlite3.Connection) -> bool:
            found = conn.execute("SELECT 1 FROM entries WHERE id = ?", (entry_id,)).fetchone()
            # An entry still being delivered keeps its lease's expiry as due time.
            conn.execute(
                "UPDATE entries SET held = 0, node = NULL, next_attempt = CASE"
                " WHEN lease_token IS NOT NULL AND next_attempt > :now THEN next_attempt"
                " ELSE :now END WHERE id = :id AND held = 1",
                {"now": now, "id": entry_id},
            )
            return found is not None

        return self._writer.submit(job)

    def flush(self, route: str | None, now: float) -> Deferred[int]:
        def job(conn: sqlite3.Connection) -> int:
            where = " WHERE held = 0 AND NOT (lease_token IS NOT NULL AND next_attempt > :now)"
            if route is not None:
                where += " AND route = :route"
            params = {"now": now, "route": route}
            # Rows already due for any node are left as they are: a second
            # flush (the operator's, then the engine's when the route comes
            # back) would otherwise rewrite the whole backlog for nothing.
            # Due oldest first: the earliest of its next attempt, its creation and now.
            conn.execute(
                "UPDATE entries SET next_attempt = min(next_attempt, created, :now), node = NULL"
                + where
                + " AND (next_attempt > :now OR node IS NOT NULL)",
                params,
            )
            (count,) = conn.execute("SELECT count(*) FROM entries" + where, params).fetchone()
            return int(count)

        return self._writer.submit(job)

    def delete(self, entry_id: str) -> Deferred[bool]:
        def job(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT message_id FROM entries WHERE id = ?", (entry_id,)
            ).fetchone()
            if row is None:
                return False
            _remove(conn, entry_id, row[0])
            return True

        return self._writer.submit(job)

    # -- ISpoolControl -----------------------------------------------------

    def requeue(self, entry_id: str, now: float, route: str | None = None) -> Deferred[str]:
        def job(conn: sqlite3.Connection) -> str:
            row = conn.execute(
                "SELECT lease_token, next_attempt FROM entries WHERE id = ?", (entry_id,)
            ).fetchone()
            if row is None:
                return "missing"
            if row[0] is not None and row[1] > now:
                return "leased"
            # An expired lease ends here: its holder's record fails with LeaseLost.
            conn.execute(
                "UPDATE entries SET next_attempt = :now, node = NULL, lease_token = NULL,"
                " route = coalesce(:route, route) WHERE id = :id",
                {"now": now, "route": route, "id": entry_id},
            )
            return "requeued"

        return self._writer.submit(job)

    def leased_entries(self, now: float) -> Deferred[set[str]]:
        def job(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute(
                "SELECT id FROM entries WHERE lease_token IS NOT NULL AND next_attempt > ?", (now,)
            )
            return {row[0] for row in rows}

        return self._read(job)

    # -- ILeaseReclaim -----------------------------------------------------

    def reclaim(self, node: str, incarnation: str, now: float) -> Deferred[int]:
        self._incarnations[node] = incarnation

        def job(conn: sqlite3.Connection) -> int:
            # One writer job: its BEGIN IMMEDIATE orders it with every claim
            # of every process on the file.
            cursor = conn.execute(
                "UPDATE entries SET next_attempt = ?, node = ?, lease_node = NULL,"
                " lease_token = NULL, lease_incarnation = NULL"
                " WHERE lease_node = ? AND lease_token IS NOT NULL AND next_attempt > ?"
                " AND (lease_incarnation IS NULL OR lease_incarnation != ?)",
                (now, node, node, now, incarnation),
            )
            return int(cursor.rowcount)

        return self._writer.submit(job)

    # -- INodeRegistry -----------------------------------------------------

    def heartbeat(self, node: str, now: float, info: Mapping[str, Any]) -> Deferred[None]:
        text = json.dumps(dict(info), ensure_ascii=False)

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO nodes (name, last_seen, info) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen, info = excluded.info",
                (node, now, text),
            )

        return self._writer.submit(job)

    def nodes(self, now: float) -> Deferred[list[dict[str, Any]]]:
        def job(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {
                name: {"name": name, "last_seen": seen, "info": json.loads(info), "leased": 0, "reserved": 0}
                for name, seen, info in conn.execute("SELECT name, last_seen, info FROM nodes")
            }

            def of(name: str) -> dict[str, Any]:
                return found.setdefault(
                    name, {"name": name, "last_seen": None, "info": {}, "leased": 0, "reserved": 0}
                )

            for name, n in conn.execute(
                "SELECT lease_node, count(*) FROM entries WHERE lease_token IS NOT NULL"
                " AND next_attempt > ? GROUP BY lease_node",
                (now,),
            ):
                of(name)["leased"] = n
            for name, n in conn.execute(
                "SELECT node, count(*) FROM entries WHERE node IS NOT NULL AND held = 0 GROUP BY node"
            ):
                of(name)["reserved"] = n
            return [found[name] for name in sorted(found)]

        return self._read(job)

    # -- IRouteCoordination -----------------------------------------------

    def share(
        self, route: str, node: str, want: int, holding: int, limit: int, now: float, ttl: float
    ) -> Deferred[int]:
        # One writer job: its BEGIN IMMEDIATE makes the read and the write one
        # step for every store and process on the file.
        def job(conn: sqlite3.Connection) -> int:
            conn.execute(
                "DELETE FROM route_shares WHERE route = ? AND (expires <= ? OR node = ?)",
                (route, now, node),
            )
            others = 0
            wants: dict[str, int] = {}
            for name, given, wanted, held in conn.execute(
                "SELECT node, given, want, holding FROM route_shares WHERE route = ?", (route,)
            ):
                others += max(given, held)
                wants[name] = wanted
            wants[node] = want
            given = max(0, min(want, fair_share(limit, wants, node), limit - others))
            # A share of nothing, wanting and holding nothing, counts for
            # nothing: no row keeps it (an idle route leaves the table empty).
            if given or want or holding:
                conn.execute(
                    "INSERT INTO route_shares (route, node, given, want, expires, holding)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (route, node, given, want, now + ttl, holding),
                )
            return given

        return self._writer.submit(job)

    def route_states(self) -> Deferred[dict[str, dict[str, Any]]]:
        def job(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            return {
                route: json.loads(state)
                for route, state in conn.execute("SELECT route, state FROM route_states")
            }

        return self._read(job)

    def set_route_state(self, route: str, state: Mapping[str, Any] | None) -> Deferred[None]:
        if state is None:

            def job(conn: sqlite3.Connection) -> None:
                conn.execute("DELETE FROM route_states WHERE route = ?", (route,))

        else:
            try:
                text = json.dumps(dict(state), ensure_ascii=False)
            except (TypeError, ValueError):
                return fail()

            def job(conn: sqlite3.Connection) -> None:
                conn.execute(
                    "INSERT INTO route_states (route, state) VALUES (?, ?)"
                    " ON CONFLICT (route) DO UPDATE SET state = excluded.state",
                    (route, text),
                )

        return self._writer.submit(job)

    def close(self) -> Deferred[None]:
        stopped = gatherResults([self._writer.stop(), self._reader.stop()])
        return stopped.addCallback(lambda _: None)


class _Inserts:
    """
    A writer job that only inserts rows (``enqueue``'s and
    ``enqueue_leased``'s): a message, its entries, their decided attempts,
    and what the job returns.  A large body goes to the body log as the job
    runs (``message_rows``).

    Run alone it is an ``executemany`` per table.  In the writer's
    optimistic pass, neighbouring ``_Inserts`` run together
    (:func:`run_merged`): one multi-row ``INSERT`` per table for all of
    them.  That is for the GIL's sake: every statement step releases the GIL
    around SQLite's work and takes it back after, and taking it back waits
    while the reactor thread runs Python.  Sixteen messages arriving together
    were 32 or more such waits; merged they are two or three.
    """

    __slots__ = ("bodies", "entries", "attempts", "result", "_log", "_messages")

    def __init__(
        self,
        bodies: list[tuple[str, bytes]],
        entries: list[tuple[Any, ...]],
        attempts: list[tuple[Any, ...]],
        result: Any,
        log: BodyLog,
    ) -> None:
        #: (message id, body) of each message.
        self.bodies = bodies
        self.entries = entries
        self.attempts = attempts
        self.result = result
        self._log = log
        self._messages: list[tuple[Any, ...]] | None = None

    def message_rows(self) -> list[tuple[Any, ...]]:
        """
        The ``messages`` rows: a large body goes to the body log (on the
        writer thread, the first time only: run again after a rollback, the
        job refers to the octets it already wrote) and its row says where.
        """
        if self._messages is None:
            rows: list[tuple[Any, ...]] = []
            for message_id, body in self.bodies:
                if len(body) > LOG_THRESHOLD:
                    segment, offset = self._log.append(body)
                    rows.append((message_id, b"", segment, offset, len(body)))
                else:
                    rows.append((message_id, body, None, None, None))
            self._messages = rows
        return self._messages

    def __call__(self, conn: sqlite3.Connection) -> Any:
        for table, rows in self.tables():
            if rows:
                conn.executemany(_insert_sql(table, 1), rows)
        return self.result

    def tables(self) -> tuple[tuple[str, list[tuple[Any, ...]]], ...]:
        """The rows per table, in the order they are inserted (a row's parent first)."""
        return (("messages", self.message_rows()), ("entries", self.entries), ("attempts", self.attempts))

    @staticmethod
    def run_together(conn: sqlite3.Connection, group: Sequence[_Inserts]) -> list[Any]:
        for t, (table, _) in enumerate(group[0].tables()):
            rows = [row for job in group for row in job.tables()[t][1]]
            for chunk in _chunks(rows, _MAX_PARAMETERS // len(_INSERT_COLUMNS[table])):
                conn.execute(_insert_sql(table, len(chunk)), [v for row in chunk for v in row])
        return [job.result for job in group]


class _Removal:
    """
    A writer job that removes an entry whose recipients are all done
    (``record``'s usual case, the end of a delivery): the entry if the lease
    still holds it, its attempts, and its message once no entry uses it.

    Neighbouring removals run together, like ``_Inserts`` and for the same
    reason: three statements for a batch of them, not up to three each.
    """

    __slots__ = ("entry_id", "token", "message_id", "logged")

    def __init__(self, entry_id: str, token: str, message_id: str, logged: bool) -> None:
        self.entry_id = entry_id
        self.token = token
        self.message_id = message_id
        #: Whether the entry has attempts to remove (it was tried before).
        self.logged = logged

    def __call__(self, conn: sqlite3.Connection) -> None:
        deleted = conn.execute(
            "DELETE FROM entries WHERE id = ? AND lease_token = ?", (self.entry_id, self.token)
        ).rowcount
        if not deleted:
            raise LeaseLost(self.entry_id)
        if self.logged:
            conn.execute("DELETE FROM attempts WHERE entry_id = ?", (self.entry_id,))
        conn.execute(_DELETE_UNUSED_MESSAGE_SQL, (self.message_id, self.message_id))

    @staticmethod
    def run_together(conn: sqlite3.Connection, group: Sequence[_Removal]) -> list[Any]:
        # Each row goes only with its own lease's token: the CASE gives each
        # id its token, and the id list lets SQLite find the rows by key (a
        # row value IN scans the table).
        for chunk in _chunks(group, _MAX_PARAMETERS // 3):
            marks = ", ".join("?" * len(chunk))
            cases = " ".join(["WHEN ? THEN ?"] * len(chunk))
            deleted = conn.execute(
                f"DELETE FROM entries WHERE id IN ({marks}) AND lease_token = CASE id {cases} END",
                [job.entry_id for job in chunk] + [v for job in chunk for v in (job.entry_id, job.token)],
            ).rowcount
            if deleted != len(chunk):
                # A lease was lost: the writer runs the batch again job by
                # job, and only the removal that lost its lease fails.
                raise LeaseLost("one of a batch of removals")
        for ids in _chunks([job.entry_id for job in group if job.logged], _MAX_PARAMETERS):
            conn.execute(f"DELETE FROM attempts WHERE entry_id IN ({', '.join('?' * len(ids))})", ids)
        messages = list(dict.fromkeys(job.message_id for job in group))
        for ids in _chunks(messages, _MAX_PARAMETERS):
            conn.execute(
                f"DELETE FROM messages WHERE id IN ({', '.join('?' * len(ids))})"
                " AND NOT EXISTS (SELECT 1 FROM entries WHERE message_id = messages.id)",
                ids,
            )
        return [None] * len(group)


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    """``items`` in slices of at most ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


#: The columns ``_Inserts`` fills, per table.
_INSERT_COLUMNS = {
    "messages": ("id", "body", "log_segment", "log_offset", "log_length"),
    "entries": (
        "id", "message_id", "route", "sender", "recipients", "created", "size", "helo",
        "client", "smtputf8", "next_attempt", "node", "lease_node", "lease_token", "attempts",
        "held", "lease_incarnation",
    ),
    "attempts": ("entry_id", "node", "started", "finished", "replies"),
}

#: Parameters per statement: SQLite's limit before 3.32 (32,766 since).
_MAX_PARAMETERS = 999


@functools.lru_cache(maxsize=256)
def _insert_sql(table: str, rows: int) -> str:
    """``INSERT INTO table (columns) VALUES (?, ...), ...`` for ``rows`` rows."""
    columns = _INSERT_COLUMNS[table]
    row = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([row] * rows)




def _attempt_row(attempt: Attempt) -> tuple[Any, ...]:
    return (
        attempt.entry_id,
        attempt.node,
        attempt.started,
        attempt.finished,
        json.dumps(
            [[str(a), r.code, r.enhanced, r.text] for a, r in attempt.replies],
            ensure_ascii=False,
        ),
    )


_DELETE_UNUSED_MESSAGE_SQL = (
    "DELETE FROM messages WHERE id = ? AND NOT EXISTS (SELECT 1 FROM entries WHERE message_id = ?)"
)


def _remove(conn: sqlite3.Connection, entry_id: str, message_id: str) -> None:
    """Remove an entry, its attempts, and its message once no entry uses it."""
    conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
    conn.execute("DELETE FROM attempts WHERE entry_id = ?", (entry_id,))
    conn.execute(_DELETE_UNUSED_MESSAGE_SQL, (message_id, message_id))


@implementer(IStorePlugin)
@frozen
class SqliteStorePlugin:
    """Makes a ``SqliteSpoolStore`` from the ``[store]`` table."""

    name: str = "sqlite"
    #: The keys of ``[store]`` besides ``plugin`` (``mailhub.plugin``).
    config_keys: frozenset[str] = frozenset({"path", "busy_timeout"})

    def check_config(self, config: Mapping[str, Any]) -> None:
        """
        Check the ``[store]`` table as ``make`` does, without opening the database.

        :raises ValueError: naming the key at fault.
        """
        path = config.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("store.path: the sqlite store needs a database file path")
        busy_timeout = config.get("busy_timeout", DEFAULT_BUSY_TIMEOUT)
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float) or busy_timeout < 0:
            raise ValueError("store.busy_timeout: must be a number of seconds, 0 or more")

    def make(self, config: Mapping[str, Any], reactor: Any) -> SqliteSpoolStore:
        """
        :param config: ``path`` (relative to ``config_dir``), optional
            ``busy_timeout`` in seconds.
        :param reactor: the reactor; results come back to its thread.
        :raises ValueError: naming the key, when ``path`` or ``busy_timeout`` is wrong.
        """
        path = config.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("store.path: the sqlite store needs a database file path")
        busy_timeout = config.get("busy_timeout", DEFAULT_BUSY_TIMEOUT)
        if (
            isinstance(busy_timeout, bool)
            or not isinstance(busy_timeout, int | float)
            or busy_timeout < 0
        ):
            raise ValueError("store.busy_timeout: must be a number of seconds, 0 or more")
        path = os.path.join(str(config.get("config_dir", ".")), os.path.expanduser(path))
        return SqliteSpoolStore.open(path, reactor, float(busy_timeout))


plugin = SqliteStorePlugin()

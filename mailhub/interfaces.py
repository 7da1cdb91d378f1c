"""
Every plugin point of mailhub, as zope.interface interfaces.

A third party writes a store, a transport, a policy or an archive from this
module alone, declares it under the matching entry-point group
(``mailhub.stores``, ``mailhub.transports``, ``mailhub.policies``,
``mailhub.archives``) and names it in the configuration.  The entry point names
an object providing the plugin-factory interface (``IStorePlugin``, ...), whose
``make`` builds the working object.

Value types (``Envelope``, ``Entry``, ``Lease``, ...) live in ``mailhub.model``.
Times are POSIX seconds as floats, always passed in by the caller (or read from
the reactor a plugin is given): no plugin reads the wall clock itself.
"""

from __future__ import annotations

import signal

from zope.interface import Attribute, Interface

__all__ = [
    "IAccountStore",
    "IArchive",
    "IArchivePlugin",
    "IDeliveryPolicy",
    "ILeaseReclaim",
    "INodeRegistry",
    "IPolicyPlugin",
    "IPooledTransport",
    "IRecipientProbe",
    "IRouteCoordination",
    "ISpoolControl",
    "ISpoolStore",
    "IStorePlugin",
    "ITransport",
    "ITransportPlugin",
]


class ISpoolStore(Interface):
    """
    The durable queue of entries not yet delivered, failed or expired.

    Every method returns a ``Deferred``.  A method that cannot reach its
    backend fails with ``mailhub.model.StoreUnavailable``; no method may block
    the reactor thread.
    """

    def enqueue(envelope, message, routes, node):
        """
        Store an accepted message durably, one entry per route.

        :param envelope: the ``mailhub.model.Envelope`` of the message.
        :param message: the message as ``bytes``, CRLF line ends, already
            dot-unstuffed, with the hub's ``Received:`` header.
        :param routes: a mapping of route text (``"smtp:host:25"``) to the
            sequence of ``Address`` recipients that go there.
        :param node: the name of the accepting node; each new entry is due at
            once (``envelope.received_at``) and reserved for that node, which
            makes the first attempt.
        :returns: a ``Deferred`` firing with the list of new entry ids, in the
            order of ``routes``, only once the message is durable (fsync'd or
            acknowledged by the store's replication).  Either every entry is
            stored or none is.
        :raises: (errback) ``StoreFull`` when the spool is at its size limit,
            ``StoreUnavailable`` when the backend cannot take it.
        """

    def enqueue_leased(envelope, message, routes, node, lease_seconds, decided=None):
        """
        ``enqueue``, with the new entries leased to ``node`` in the same atomic
        write: the accepting node's first attempt needs no ``claim`` (one
        write, one fsync, no second round trip before delivery starts).

        The leases expire at ``envelope.received_at + lease_seconds``; each
        ``Lease.entry`` is the entry as ``enqueue`` would have stored it (due at
        ``received_at``, reserved for ``node``).  Until the lease is recorded
        or released, the entry is due again only at its expiry, as after
        ``claim``.

        :param decided: for some routes, the first attempt already made and
            decided while the message was being accepted (the route is known
            to be down: deferred without connecting), as ``{route: (attempt,
            decision)}``; ``attempt.entry_id`` is ignored.  Such an entry is
            stored as ``record`` would leave it after that attempt (the
            decision applied, the attempt logged) and is not leased.  Every
            outcome of such a decision is ``Action.RETRY``.
        :returns: a ``Deferred`` firing, once the message is durable, with one
            item per route in the order of ``routes``: a ``Lease``, or for a
            decided route the ``Entry`` as stored.  The same errors as
            ``enqueue``.
        """

    def claim(node, now, limit, lease_seconds, takeover_seconds, ids=None):
        """
        Lease due entries to ``node``.

        An entry is due when it is not held and its ``next_attempt <= now``.
        An entry reserved for another node (``entry.node``) is only due to this
        node once ``next_attempt + takeover_seconds <= now``: the other node had
        its chance and may be dead.  Leasing is atomic across every node of
        every process sharing the store: no entry is ever leased to two nodes
        at once.  A lease expires at ``now + lease_seconds``; an entry whose
        lease expired without ``record`` or ``release`` is due again.

        :param ids: if given, claim only these entries (the accepting node's
            immediate first attempt); the reservation rule still applies.
        :returns: a ``Deferred`` firing with a list of ``Lease``, at most
            ``limit`` of them, earliest due first.
        """

    def body(message_id):
        """
        :returns: a ``Deferred`` firing with the message bytes of an entry
            (``entry.message_id``), or failing with ``KeyError`` if it is gone.
        """

    def record(lease, attempt, decision):
        """
        Record an attempt and apply the policy's decision.

        Recipients the decision delivered, failed or expired leave the entry;
        when none is left pending the entry leaves the spool (and its message
        body with it, once no other entry uses it).  Otherwise the entry is due
        again at ``decision.next_attempt`` for ``decision.next_node``, or held
        if the decision says so.  The lease ends either way.

        :param lease: the ``Lease`` under which the attempt was made.
        :param attempt: the ``Attempt`` to append to the entry's log.
        :param decision: the policy's ``Decision``.
        :returns: a ``Deferred`` firing with the updated ``Entry``, or ``None``
            if the entry left the spool.
        :raises: (errback) ``LeaseLost`` if ``lease`` is no longer held; nothing
            is changed then.
        """

    def release(lease, now):
        """
        Give an entry back without an attempt (shutting down, say): it is due
        again at ``now`` for any node.

        :returns: a ``Deferred`` firing with ``None``; releasing a lost lease
            does nothing.
        """

    def next_due(node, now, takeover_seconds=0.0):
        """
        :param takeover_seconds: as for ``claim``: an entry reserved for another
            node is due to ``node`` only ``takeover_seconds`` after its
            ``next_attempt``.
        :returns: a ``Deferred`` firing with the earliest time at which an entry
            will be due to ``node`` (possibly ``<= now``), or ``None`` if the
            spool holds nothing claimable.  Schedulers sleep until then.
        """

    def get(entry_id):
        """:returns: a ``Deferred`` firing with the ``Entry``, or ``None``."""

    def attempts(entry_id):
        """:returns: a ``Deferred`` firing with the entry's ``Attempt`` list, oldest first."""

    def entries(filter, offset, limit):
        """
        :param filter: a ``mailhub.model.EntryFilter`` or ``None`` for all.
        :returns: a ``Deferred`` firing with a list of ``Entry``, ordered by
            next attempt.
        """

    def counts():
        """
        :returns: a ``Deferred`` firing with a dict: ``"entries"``, ``"held"``,
            ``"leased"``, ``"recipients"`` and ``"routes"`` (a dict of route
            text to entry count); a store may add keys of its own (the
            ``sqlite`` store's ``"body_log"``: ``"segments"``, ``"octets"``
            on disk and ``"in_use"``, the octets of the bodies in them).
        """

    def hold(entry_id):
        """Hold an entry: it is not claimed until released.  Fires with ``True`` if found."""

    def release_held(entry_id, now):
        """Release a held entry, due at ``now``.  Fires with ``True`` if found."""

    def flush(route, now):
        """
        Make every entry of ``route`` (or every entry, for ``None``) that is not
        held due at ``now`` for any node.  Fires with the number of entries.

        A flushed entry's next attempt becomes the earliest of its own, its
        ``created`` and ``now``, so that claims (earliest next attempt first)
        hand out a flushed backlog oldest first, as an operator expects of a
        server that came back.
        """

    def delete(entry_id):
        """Remove an entry without delivering it.  Fires with ``True`` if found."""

    def close():
        """Release resources; fires when done.  No other method is called after."""


class ISpoolControl(Interface):
    """
    What an operator's bulk queue commands need beyond ``ISpoolStore``
    (``mailhub queue``, the admin API's ``/api/queue``): optional, a store
    may provide it besides ``ISpoolStore`` (the ``memory``, ``sqlite`` and
    ``redis`` stores do).  Without it the ``leased`` state cannot be told
    apart and ``redirect`` is refused.  Like every store method these
    return ``Deferred``s, fail with ``StoreUnavailable`` when the backend
    is unreachable and never block.
    """

    def requeue(entry_id, now, route=None):
        """
        Make an entry due at ``now`` for any node, and with ``route`` move
        it to that route (the route's text, ``"smtp:backup.example:25"``):
        its next attempt goes there.  Its recipients, their last replies,
        its attempt log and its held flag stay as they are (a held entry
        stays held, on its new route).  Atomic across every process sharing
        the store.

        An entry under a lease that has not expired at ``now`` is being
        delivered: it is left unchanged.

        :returns: a ``Deferred`` firing with ``"requeued"``, ``"leased"``
            (unchanged) or ``"missing"`` (no such entry).
        """

    def leased_entries(now):
        """
        :returns: a ``Deferred`` firing with the set of the ids of the
            entries under a lease that has not expired at ``now`` (being
            delivered: as many as the hub's attempts in flight).
        """


class ILeaseReclaim(Interface):
    """
    A restarted node takes back at once what it held when its process died:
    optional, a store may provide it besides ``ISpoolStore`` (the ``memory``,
    ``sqlite`` and ``redis`` stores do).  Without it, the entries leased to
    a node that died wait for their leases to expire (``[delivery]
    lease_seconds``), which is what lets another node take them over.

    Each start of a node is an incarnation: a string the node makes anew
    each time it starts, which no other start of any node ever uses.  A
    store that provides this interface remembers, per node name, the
    incarnation last given to ``reclaim`` on that store object, and every
    lease it then gives to that node (``claim``, ``enqueue_leased``) is
    held under that incarnation.  Like every store method these return
    ``Deferred``s, fail with ``StoreUnavailable`` when the backend is
    unreachable and never block.
    """

    def reclaim(node, incarnation, now):
        """
        Begin ``incarnation`` of ``node``, and make due at once the entries
        it leased in earlier incarnations.

        Before this returns, the store notes ``incarnation`` for ``node``:
        every lease given to ``node`` after the call is held under it.  Then,
        atomically across every process sharing the store, each entry under
        a lease that has not expired (at ``now``), held by ``node`` under
        another incarnation (or under none: a lease taken before this
        store object knew one), loses its lease and is due at ``now``,
        reserved for ``node`` (``Entry.node``), so that this node tries it
        first and another node only after ``takeover_seconds``.  A held
        entry stays held.  ``record`` under a lease taken back fails with
        ``LeaseLost``, ``release`` does nothing.  Leases held by other
        nodes, and by ``node`` under ``incarnation``, are untouched: the
        call may be repeated (after a ``StoreUnavailable``, say).

        A node name runs in one process at a time: the leases of another
        incarnation are a dead process's.

        :param node: the starting node's name.
        :param incarnation: this start's incarnation (a short, non-empty string).
        :param now: the node's clock.
        :returns: a ``Deferred`` firing with the number of entries taken back.
        """


#: The signal a hub process run by ``twistd mailhub`` answers by scanning its
#: spool at once; its nodes' heartbeats then carry ``"wake_signal"`` with its
#: number, and ``mailhub queue flush``/``release`` send it to such processes on
#: their host (``mailhub.service.install_wake_signal``).
WAKE_SIGNAL = signal.SIGUSR2


class INodeRegistry(Interface):
    """
    Where the nodes of a hub say that they are alive: optional, a store may
    provide it besides ``ISpoolStore`` (the ``memory``, ``sqlite`` and
    ``redis`` stores do).  A node sends a heartbeat when it starts and every
    ``[delivery] heartbeat_seconds``; ``mailhub nodes`` lists what the
    registry knows.  Like every store method these return ``Deferred``s, fail
    with ``StoreUnavailable`` when the backend is unreachable and never block.
    """

    def heartbeat(node, now, info):
        """
        Record that ``node`` is alive at ``now``, replacing its last heartbeat.

        :param node: the node's name.
        :param now: the time of the heartbeat (the node's clock).
        :param info: a small dict that ``json.dumps`` can encode (``host``,
            ``pid``, ``version``, ``in_flight``, ...), returned as given by
            ``nodes``.
        :returns: a ``Deferred`` firing with ``None`` once recorded.
        """

    def nodes(now):
        """
        Every node that sent a heartbeat or holds entries.

        :param now: the time to judge leases by (a lease that expired before
            ``now`` is no longer held).
        :returns: a ``Deferred`` firing with a list of dicts, by name:
            ``"name"``; ``"last_seen"``, the time of its last heartbeat (or
            ``None`` for a node that holds entries but never sent one);
            ``"info"``, the dict of that heartbeat (``{}`` without one);
            ``"leased"``, how many entries it holds under a lease that has not
            expired; ``"reserved"``, how many entries not held are due next
            for it (``Entry.node``).
        """


class IRouteCoordination(Interface):
    """
    What the nodes of a hub agree on per route, through the store they share:
    optional, a store may provide it besides ``ISpoolStore`` (the ``memory``,
    ``sqlite`` and ``redis`` stores do).  Without it each node keeps a route's
    limits on its own.  Like every store method these return ``Deferred``s,
    fail with ``StoreUnavailable`` when the backend is unreachable and never
    block.
    """

    def share(route, node, want, holding, limit, now, ttl):
        """
        Ask for ``node``'s share of a route's connections: the route's
        ``max_connections`` bound the connections of all nodes together, and
        each node opens no more than the share it was last given.

        Atomically across every node of every process sharing the store:
        shares whose ``ttl`` ran out (a node that died, or stopped asking) are
        forgotten; then ``node`` is given ``min(want, fair, free)`` (at least
        0) where ``fair`` is its part of ``limit`` among the nodes that want
        some (``mailhub.model.fair_share`` over the wants not yet expired) and
        ``free`` is ``limit`` less, for each other node, the larger of its
        share and what it said it held.  That becomes its share (with
        ``want`` its demand and ``holding`` what it holds) until ``now +
        ttl``.  A node given less than it holds starts nothing new until it
        holds less than its share; meanwhile its connections still count
        against the others' ``free``, so the connections open never add up
        to more than ``limit``, and a node that held every connection of a
        busy route gives the others their fair part as its attempts end
        (were a share never below what is held, a node kept busy would
        keep every connection for good).

        :param route: the route, as text.
        :param node: the asking node's name.
        :param want: how many connections it could use now (``0`` gives its
            share back down to ``holding``).
        :param holding: how many it has open now (counted against the others
            until it asks again).
        :param limit: the route's ``max_connections`` for the whole hub.
        :param now: the time of the request (the node's clock).
        :param ttl: seconds the share lasts unless asked for again.
        :returns: a ``Deferred`` firing with the share given (an ``int``).
        """

    def route_states():
        """
        :returns: a ``Deferred`` firing with a dict of route text to the state
            an engine or an operator set for it (``set_route_state``); routes
            without one are not in it.
        """

    def set_route_state(route, state):
        """
        Set or clear a route's hub-wide state.

        :param state: a small dict that ``json.dumps`` can encode, with at
            least ``"state"`` (``"rejecting"``: the route answers 5xx to
            everything and its entries are held), as given back by
            ``route_states``; ``None`` clears it.
        :returns: a ``Deferred`` firing with ``None`` once durable.
        """


class IArchive(Interface):
    """
    Every accepted message, per mailbox of the hub's domains, searchable,
    kept for a retention period: what users read while their own server is
    down, and what an operator re-delivers from.

    The core decodes each message (``mailhub.model.ArchiveText``) and parses
    queries (``mailhub.model.ArchiveQuery``); a plugin stores, indexes and
    finds.  Every method returns a ``Deferred``, fails with
    ``mailhub.model.StoreUnavailable`` when the backend cannot be reached,
    and never blocks the reactor thread.  Times are POSIX seconds.
    ``mailhub.testing.archive_contract`` is the suite every plugin passes.

    A mailbox is one whatever the case of its local part: the archive
    keeps and compares mailboxes folded (``mailhub.model.Address.folded``).
    ``ArchivedMessage``, ``ArchiveSummary`` and ``ArchiveScope`` fold
    theirs when made; the delivery records (``record_delivered``,
    ``delivered``) take addresses as given and a plugin folds them.  A
    plugin that kept mailboxes as given before folds them when it opens an
    older archive (merging those that fold to one), holds and delivery
    records included.
    """

    def add(message):
        """
        Archive a message durably, for its mailboxes.

        :param message: a ``mailhub.model.ArchivedMessage``.
        :returns: a ``Deferred`` firing with ``None`` once the message and its
            mailboxes are durable (fsync'd or acknowledged by replication).
            Adding an id that is there already adds the mailboxes it does not
            have yet and changes nothing else (the core may add a message
            twice after a crash).
        :raises: (errback) ``StoreFull`` when the archive cannot take more,
            ``StoreUnavailable`` when it cannot be reached.
        """

    def search(scope, query, cursor=None, limit=50):
        """
        Find messages, newest first (by ``received_at``, then by id).

        :param scope: a ``mailhub.model.ArchiveScope``: a mailbox, a domain,
            or everything.
        :param query: a ``mailhub.model.ArchiveQuery`` (every part must
            match; an empty query matches every message in scope).
        :param cursor: ``None`` for the first page, else the ``next`` of the
            page before.  A page deep into the results costs about what the
            first does.
        :param limit: at most this many summaries.
        :returns: a ``Deferred`` firing with a ``mailhub.model.ArchivePage``;
            each summary lists the message's mailboxes within ``scope``.
        """

    def count(scope, query):
        """:returns: a ``Deferred`` firing with how many messages ``search`` would find in all."""

    def get(archive_id):
        """
        :returns: a ``Deferred`` firing with the ``ArchivedMessage`` (its
            bytes exactly as added, every mailbox it is archived for, its
            ``ArchiveText``), or ``None`` if there is no such message.
        """

    def expire(domain, before, limit):
        """
        Remove the messages of ``domain``'s mailboxes received before
        ``before``, except for mailboxes and domains under hold.  A message
        archived for several mailboxes leaves with the last of them.

        :param domain: a domain (lower case).
        :param limit: remove at most this many (mailbox, message) pairs, so
            that one call stays short.
        :returns: a ``Deferred`` firing with how many pairs were removed
            (fewer than ``limit``: nothing more to expire now).

        The delivery records (``record_delivered``) of the domain's mailboxes
        made before ``before`` go too, at most ``limit`` of them a call, with
        the same exceptions for holds; the count is then the larger of the
        pairs and the records removed.
        """

    def record_delivered(records):
        """
        Remember what the hub delivered, for ``delivered`` (``mailhub archive
        redeliver --skip-delivered``).

        :param records: a sequence of ``(archive_id, mailbox, route, at)``
            tuples: the archive id of the message (for mail the hub accepted,
            its spool message id, ``Entry.message_id``: the archive may not
            have the copy yet, or ever), the ``Address`` of a mailbox of the
            hub's domains whose server accepted it (a 2xx), the route (text)
            and when.  One record per (archive id, mailbox) is kept, with the
            latest time and its route; a batch may name a pair twice.
        :returns: a ``Deferred`` firing with ``None`` once written.  The hub
            writes these best-effort, in batches, beside delivery and never
            in its way: a lost record means at worst that a re-delivery
            which skips delivered messages sends that one again.
        """

    def delivered(pairs):
        """
        Which of some messages the hub delivered to which mailboxes, by
        Message-ID.

        :param pairs: an iterable of ``(archive_id, mailbox)`` (an
            ``Address``).
        :returns: a ``Deferred`` firing with the set of those pairs (as
            tuples) for which a record (``record_delivered``) says that the
            hub delivered to that mailbox either that archive id or another
            whose archived copy has the same non-empty Message-ID
            (``ArchiveText.message_id``, compared exactly).  A record whose
            message has no archived copy matches its own archive id only, and
            so does a message without a Message-ID.
        """

    def set_hold(scope, held, reason, at):
        """
        Put a mailbox or a domain under legal hold (``held=True``: nothing of
        it expires) or lift it.

        :param scope: an ``ArchiveScope`` with ``mailbox`` or ``domain`` set.
        :returns: a ``Deferred`` firing with ``None``.
        """

    def holds():
        """
        :returns: a ``Deferred`` firing with a list of dicts, one per hold:
            ``"scope"`` (``str(ArchiveScope)``), ``"mailbox"`` or ``"domain"``
            (the other ``None``), ``"reason"``, ``"since"``.
        """

    def record_audit(event):
        """
        Append an ``mailhub.model.AuditEvent`` to the audit log, durably.

        :returns: a ``Deferred`` firing with ``None``.
        """

    def audit_log(actor, action, since, until, limit):
        """
        Search the audit log, newest first.

        :param actor: only this actor, or ``None``.
        :param action: only this action, or ``None``.
        :param since: events at or after this time, or ``None``.
        :param until: events before this time, or ``None``.
        :returns: a ``Deferred`` firing with a list of ``AuditEvent``, at
            most ``limit``.
        """

    def close():
        """Release resources; fires when done.  No other method is called after."""


class IAccountStore(Interface):
    """
    The LiveArchive's accounts and each person's own state (read flags, Sent
    folder), kept where the archive is so that every node of both sites
    sees the same: optional, an archive plugin provides it besides
    ``IArchive`` (the ``memory``, ``sqlite`` and ``postgresql`` archives
    do).  Every method returns a ``Deferred`` and fails with
    ``StoreUnavailable`` when the backend is unreachable.

    Accounts are keyed by their folded address (``Account.address`` is
    folded, ``mailhub.model.Address.folded``): every method taking an
    account's ``Address`` folds it, so that a login typed ``ALICE@`` reaches
    the account of ``alice@``.
    """

    def add_account(account):
        """
        :param account: a ``mailhub.model.Account``.
        :returns: a ``Deferred`` firing with ``None`` once durable.
        :raises: (errback) ``KeyError`` if an account with that address exists.
        """

    def update_account(account):
        """
        Replace the account with that address.

        :raises: (errback) ``KeyError`` if there is none.
        """

    def account(address):
        """:returns: a ``Deferred`` firing with the ``Account`` of ``address`` (an ``Address``), or ``None``."""

    def accounts(domain):
        """:returns: a ``Deferred`` firing with the accounts of ``domain`` (every account for ``None``), by address."""

    def set_read(account, archive_ids, read):
        """
        Mark messages read (``read=True``) or unread for ``account`` (an ``Address``).

        :returns: a ``Deferred`` firing with ``None``.
        """

    def read_ids(account, archive_ids):
        """:returns: a ``Deferred`` firing with the set of those of ``archive_ids`` that ``account`` has read."""

    def add_sent(sent):
        """Keep a ``mailhub.model.SentMessage`` in its account's Sent folder; fires with ``None`` once durable."""

    def sent(account, before, limit):
        """
        :param before: ``None`` for the newest, else only messages sent before this time.
        :returns: a ``Deferred`` firing with at most ``limit`` ``SentMessage``, newest first.
        """

    def sent_message(account, sent_id):
        """:returns: a ``Deferred`` firing with that ``SentMessage`` of ``account``, or ``None``."""


class ITransport(Interface):
    """
    How bytes reach one route's target.  One transport object serves one route
    and may keep connections open between entries.
    """

    def deliver(entry, message):
        """
        Try to deliver ``message`` to the pending recipients of ``entry``.

        :param entry: the ``Entry`` (sender, pending recipients, route).
        :param message: the message bytes, CRLF line ends.
        :returns: a ``Deferred`` firing with a dict of ``Address`` to ``Reply``
            for every pending recipient.  A failure to connect, a timeout or a
            dropped connection is a temporary ``Reply`` (4xx) for each, never an
            errback: the transport says what happened, the policy decides.
            An entry with ``smtputf8`` set goes with the ``SMTPUTF8`` MAIL
            parameter (RFC 6531) to a server that offers it; to one that does
            not, every recipient gets ``Reply(553, "5.6.7", ...)`` without
            sending, so the policy fails them with a DSN.
        """

    def close():
        """Close idle connections; fires when done."""


class IPooledTransport(Interface):
    """
    A transport that keeps connections open between entries (optional,
    besides ``ITransport``): the engine tells it how many it may keep, so
    that a route's connections stay within the node's share of the hub's
    limit (``IRouteCoordination.share``), idle ones included.
    """

    def limit_connections(count):
        """
        Keep at most ``count`` connections open from now on: idle ones above
        it are closed at once (with ``QUIT``), busy ones when their delivery
        ends.  ``0`` closes every idle connection; a delivery asked for then
        may still open one.
        """


class IRecipientProbe(Interface):
    """
    A transport that can ask its route's server whether a recipient exists,
    without sending a message (optional, besides ``ITransport``).  This is
    what ``verify = "route"`` in a ``[domains."..."]`` table uses: the hub
    refuses an unknown recipient at ``RCPT`` rather than bouncing its mail
    later.  The hub bounds each probe's time (``verify_timeout``), caches the
    answers and limits how many probes run at once: the transport only asks.

    A transport plugin whose transports provide this says so on its factory
    (``ITransportPlugin``) with the attribute ``recipient_probe = True`` (not
    declared there, so that ``verifyObject`` does not require it), so that
    the configuration can be checked before any transport is made:
    ``verify = "route"`` on a route whose plugin does not say so is an error
    at ``mailhub check-config`` and at start.  The factory's ``make`` (and
    ``check_config``) may still refuse ``verify = "route"`` for a target it
    cannot probe, with ``ValueError("verify: ...")`` (``smtp:mx`` does).
    ``mailhub.smtp.client.probe_rcpt`` asks an SMTP or LMTP server.
    """

    def probe(recipient):
        """
        Ask the route's server whether it takes mail for ``recipient``.  No
        message is sent (with SMTP: ``MAIL FROM:<>`` and ``RCPT``, never
        ``DATA``).

        :param recipient: the ``Address``, of one of the hub's domains.
        :returns: a ``Deferred`` firing with a ``Reply``: 2xx, the recipient
            exists; 5xx, it does not (``553 5.6.7``: the address needs
            SMTPUTF8, which the server lacks); 4xx, the probe cannot say now
            (refused, timed out, dropped, a 4xx from the server, or a refusal
            before RCPT, which says nothing of the recipient).  Never an
            errback, as with ``deliver``.  Cancelling it ends the probe and
            closes whatever connection it opened for it.
        """


class IDeliveryPolicy(Interface):
    """
    Decides from replies what happens next.  A pure object: it never touches
    a socket or a store, so every schedule can be tested with a fake clock.
    """

    lifetime = Attribute("Seconds an entry may stay in the spool before it expires.")

    def decide(entry, replies, now, node):
        """
        :param entry: the ``Entry`` as it was claimed.
        :param replies: a dict of ``Address`` to ``Reply`` for the pending
            recipients, as the transport returned them.
        :param now: the time the attempt finished.
        :param node: the node that made the attempt.
        :returns: a ``Decision``.
        """


class IStorePlugin(Interface):
    """
    Entry-point object of the ``mailhub.stores`` group.

    Optional members ``config_keys`` and ``check_config``: the plugin checks
    its own settings (``mailhub.plugin``).
    """

    name = Attribute("The name the configuration uses: ``[store] plugin = NAME``.")

    def make(config, reactor):
        """
        :param config: the ``[store]`` table (a mapping) plus ``"config_dir"``,
            the directory relative paths are resolved against.
        :param reactor: the reactor (``IReactorTime``, ``IReactorThreads``, ...).
        :returns: an ``ISpoolStore`` provider.
        :raises ValueError: naming the key, when the configuration is wrong.
        """


class IArchivePlugin(Interface):
    """
    Entry-point object of the ``mailhub.archives`` group.

    An optional attribute ``shareable`` (``False`` when absent; not declared
    here, so that ``verifyObject`` does not require it): ``True`` when
    several processes may open the same archive from the same table, so
    that the hub may archive in a worker process of its own
    (``mailhub.archive.worker``, ``[archive] processes``).  Optional members
    ``config_keys`` and ``check_config``: the plugin checks its own settings
    (``mailhub.plugin``).
    """

    name = Attribute("The name the configuration uses: ``[archive] plugin = NAME``.")

    def make(config, reactor):
        """:returns: an ``IArchive`` provider (see ``IStorePlugin.make``)."""


class ITransportPlugin(Interface):
    """
    Entry-point object of the ``mailhub.transports`` group.

    Optional members ``config_keys`` and ``check_config``: the plugin checks
    its own settings (``mailhub.plugin``).
    """

    name = Attribute("The transport part of a route: ``route = 'NAME:target'``.")

    def make(config, reactor):
        """
        :param config: a mapping with ``"target"`` (the route's target text),
            ``"hostname"`` (the hub's name, for EHLO) and the domain's options.
        :returns: an ``ITransport`` provider for that one route.
        :raises ValueError: naming the key, when the configuration is wrong.
        """


class IPolicyPlugin(Interface):
    """
    Entry-point object of the ``mailhub.policies`` group.

    Optional members ``config_keys`` and ``check_config``: the plugin checks
    its own settings (``mailhub.plugin``).
    """

    name = Attribute("The name the configuration uses: ``[policy] plugin = NAME``.")

    def make(config, reactor):
        """
        :param config: the ``[policy]`` table plus ``"nodes"``, the list of node
            names in configuration order.
        :returns: an ``IDeliveryPolicy`` provider.
        """

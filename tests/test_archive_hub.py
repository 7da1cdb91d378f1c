"""
The archive in the hub: every accepted message reaches it for each mailbox
of the hub's domains, none is lost on the way, and none bounces for it.
Nodes over the memory store and the memory archive, a scripted transport
and a Clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from mailhub.archive.retention import ArchiveRetention
from mailhub.archive.route import ARCHIVE_ROUTE
from mailhub.config import parse
from mailhub.model import Address, ArchiveQuery, ArchiveScope, Envelope, Reply
from mailhub.node import Node, routes_for
from mailhub.plugin import load_plugin
from mailhub.plugins.memory_store import MemorySpoolStore
from mailhub.plugins.standard_policy import StandardPolicy
from mailhub.testing.fakes import ScriptedTransport

ALICE = Address("alice", "example.com")
BOB = Address("bob", "example.org")
OUTSIDE = Address("someone", "outside.example")
ROUTE = "smtp:mail.example.com:25"
MESSAGE = b"From: someone@outside.example\r\nSubject: quarterly report\r\nMessage-ID: <q1@outside.example>\r\n\r\nthe figures\r\n"
OK = Reply(250, "2.0.0", "OK")
DAY = 86400.0

CONFIG = (
    b'[hub]\nhostname="h.example"\noutbound="smtp:smarthost:25"\n'
    b'[archive]\nplugin="memory"\nretention_days=30\n'
    b'[nodes.dallas]\nsmtp="tcp:0"\n[nodes.losangeles]\nsmtp="tcp:0"\n'
    b'[domains."example.com"]\nroute="smtp:mail.example.com:25"\n'
    b'[domains."example.org"]\nroute="smtp:mail.example.com:25"\narchive_retention_days=7\n'
)


class Hub:
    def __init__(self, script=None):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.config = parse(CONFIG)
        self.store = MemorySpoolStore(self.clock)
        self.archive = load_plugin("mailhub.archives", "memory").make({}, self.clock)
        self.transport = ScriptedTransport(script) if script else ScriptedTransport()
        policy = StandardPolicy(nodes=("dallas", "losangeles"), jitter=0.0)
        self.nodes = {
            name: Node(name, self.config, self.store, policy, self.clock, archive=self.archive)
            for name in ("dallas", "losangeles")
        }
        for node in self.nodes.values():
            node._transports[ROUTE] = self.transport
            node._transports["smtp:smarthost:25"] = self.transport
            node.engine.startService()

    def receive(self, *recipients, node="dallas", message=MESSAGE):
        ids = []
        env = Envelope(OUTSIDE, recipients, received_at=self.clock.seconds())
        self.nodes[node].receive(env, message).addCallback(ids.append)
        return ids[0]

    def found(self, scope, query=None):
        return [s.id for s in self.archive.search(scope, query or ArchiveQuery(), None, 100).result.items]

    def spool_routes(self):
        return self.store.counts().result["routes"]


def test_routes_include_the_archive_for_the_hubs_mailboxes_only():
    config = parse(CONFIG)
    routes = routes_for(config, [ALICE, OUTSIDE, BOB], archive=True)
    assert routes[ARCHIVE_ROUTE] == [ALICE, BOB]
    assert routes_for(config, [OUTSIDE], archive=True) == {"smtp:smarthost:25": [OUTSIDE]}
    assert ARCHIVE_ROUTE not in routes_for(config, [ALICE])


def test_every_accepted_message_is_archived_for_each_mailbox_and_leaves_the_spool():
    hub = Hub()
    hub.receive(ALICE, BOB)
    assert hub.spool_routes() == {}  # delivered and archived
    [archived] = hub.found(ArchiveScope(mailbox=ALICE))
    assert hub.found(ArchiveScope(mailbox=BOB)) == [archived]
    message = hub.archive.get(archived).result
    assert message.message == MESSAGE
    assert set(message.mailboxes) == {ALICE, BOB}
    assert message.sender == OUTSIDE
    assert message.text.subject == "quarterly report"
    assert hub.found(ArchiveScope(), ArchiveQuery(words=("figures",))) == [archived]


def test_an_archive_that_is_down_costs_no_mail_and_catches_up():
    hub = Hub()
    hub.archive.unavailable = True
    entry_id = hub.receive(ALICE)
    assert entry_id  # the 250 was given: the spool has it
    assert len(hub.transport.deliveries) == 1  # delivered all the same
    assert hub.spool_routes() == {ARCHIVE_ROUTE: 1}
    hub.archive.unavailable = False
    hub.clock.advance(11 * 60)  # the next attempt of the archive entry
    assert hub.spool_routes() == {}
    assert len(hub.found(ArchiveScope(mailbox=ALICE))) == 1


def test_an_archive_entry_never_bounces_nor_expires():
    hub = Hub()
    hub.archive.unavailable = True
    hub.receive(ALICE)
    for _ in range(8 * 24 * 6):
        hub.clock.advance(600)
    # Past the policy's lifetime it is still in the spool, and no DSN went out...
    assert hub.spool_routes() == {ARCHIVE_ROUTE: 1}
    assert [e.route for e, _ in hub.transport.deliveries] == [ROUTE]
    # ...so when the archive is back, the copy is archived.
    hub.archive.unavailable = False
    hub.clock.advance(11 * 60)
    assert hub.spool_routes() == {}
    assert len(hub.found(ArchiveScope(mailbox=ALICE))) == 1


def test_retention_per_domain_and_legal_hold():
    hub = Hub()
    hub.receive(ALICE, BOB)
    hub.clock.advance(10 * DAY)
    retention = ArchiveRetention(hub.archive, hub.config, hub.clock)
    retention.run()
    # example.org keeps 7 days, example.com 30.
    assert hub.found(ArchiveScope(mailbox=BOB)) == []
    assert len(hub.found(ArchiveScope(mailbox=ALICE))) == 1
    hub.archive.set_hold(ArchiveScope(domain="example.com"), True, "litigation", hub.clock.seconds())
    hub.clock.advance(30 * DAY)
    retention.run()
    assert len(hub.found(ArchiveScope(mailbox=ALICE))) == 1
    hub.archive.set_hold(ArchiveScope(domain="example.com"), False, "", hub.clock.seconds())
    retention.run()
    assert hub.found(ArchiveScope(mailbox=ALICE)) == []


def test_the_hub_records_each_mailbox_it_delivered_to():
    """A 2xx from the route's server is recorded per mailbox; a deferral is not, nor the archive's own entry."""
    hub = Hub(script=lambda entry, message: {a: OK if a == ALICE else Reply(451, "4.2.0", "later") for a in entry.pending})
    hub.receive(ALICE, BOB)
    [archived] = hub.found(ArchiveScope(mailbox=ALICE))
    assert hub.archive.delivered([(archived, ALICE), (archived, BOB)]).result == {(archived, ALICE)}
    assert hub.nodes["dallas"].delivered.written == 1


def test_a_copy_with_the_same_message_id_counts_as_delivered():
    """An imported copy of a message the hub delivered (same Message-ID, another archive id) is known as delivered."""
    from mailhub.archive.text import extract
    from mailhub.model import ArchivedMessage

    hub = Hub()
    hub.receive(ALICE)
    hub.archive.add(ArchivedMessage("import-1", 0.0, None, (ALICE, BOB), MESSAGE, extract(MESSAGE)))
    assert hub.archive.delivered([("import-1", ALICE), ("import-1", BOB)]).result == {("import-1", ALICE)}


def test_mail_to_a_capitalised_address_is_archived_for_the_folded_mailbox_and_relayed_as_given():
    """
    Mail to ``Bob.Smith@`` and ``bob.smith@`` is one mailbox's for the
    archive, ``bob.smith@``: one copy, found and recorded as delivered
    there.  The route's server still gets each address as it was given, and
    the archive entry leaves the spool (a reply for each recipient).
    """
    given, folded = Address("Bob.Smith", "example.com"), Address("bob.smith", "example.com")
    hub = Hub()
    hub.receive(given, Address("BOB.SMITH", "example.com"))
    assert hub.spool_routes() == {}
    [(entry, _)] = hub.transport.deliveries
    assert [r.address for r in entry.recipients] == [given, Address("BOB.SMITH", "example.com")]
    for scope in (ArchiveScope(mailbox=folded), ArchiveScope(mailbox=given)):
        [archived] = hub.found(scope)
    assert hub.archive.get(archived).result.mailboxes == (folded,)
    assert hub.archive.count(ArchiveScope(mailbox=folded), ArchiveQuery(words=("figures",))).result == 1
    assert hub.archive.delivered([(archived, folded), (archived, given)]).result == {(archived, folded), (archived, given)}

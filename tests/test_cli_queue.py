"""``mailhub queue``: the operator's view of the spool, over a real SQLite spool."""

import json
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from mailhub.config import load
from mailhub.model import Action, Address, Attempt, Decision, Envelope, Outcome, Reply
from mailhub.plugin import load_plugin

CONFIG = """
[hub]
hostname = "mx.hub.example"
[store]
plugin = "sqlite"
path = "spool.db"
[nodes.dallas]
smtp = "tcp:0"
[nodes.losangeles]
smtp = "tcp:0"
[domains."example.com"]
route = "smtp:mail.example.com:25"
"""


@pytest.fixture
def spool(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text(CONFIG)
    config = load(str(path))
    store = load_plugin("mailhub.stores", "sqlite").make(config.plugin_section("store"), reactor)

    async def fill():
        now = reactor.seconds()
        env = Envelope(Address("s", "outside.example"), (Address("alice", "example.com"),), received_at=now)
        (entry_id,) = await store.enqueue(env, b"Subject: x\r\n\r\nbody\r\n", {"smtp:mail.example.com:25": list(env.recipients)}, "dallas")
        (lease,) = await store.claim("dallas", now, 10, 60.0, 300.0, [entry_id])
        reply = Reply(451, "4.3.0", "try later")
        await store.record(
            lease,
            Attempt(entry_id, "dallas", now, now + 0.5, ((env.recipients[0], reply),)),
            Decision((Outcome(env.recipients[0], Action.RETRY, reply),), now + 600, "losangeles"),
        )
        await store.close()
        return entry_id

    entry_id = pytest_twisted.blockon(ensureDeferred(fill()))
    return path, entry_id


def mailhub(*args):
    return subprocess.run([sys.executable, "-m", "mailhub.cli", *args], capture_output=True, text=True, timeout=60)


def test_queue_list_shows_entry_route_next_attempt_node_and_last_reply(spool):
    path, entry_id = spool
    out = mailhub("queue", "--config", str(path), "list")
    assert out.returncode == 0, out.stderr
    assert "1 entries, 1 recipients, 0 held" in out.stdout
    # The spool's one body is small: in the database, none in the body log.
    assert "body log: 0 segments, 0.0 MB on disk, 0.0 MB of bodies in use" in out.stdout
    line = next(row for row in out.stdout.splitlines() if row.startswith(entry_id))
    assert "smtp:mail.example.com:25" in line
    assert "losangeles" in line
    assert "in 9m" in line or "in 10m" in line
    assert "451 4.3.0 try later" in line


def test_queue_show_gives_recipients_and_attempts_with_replies(spool):
    path, entry_id = spool
    out = mailhub("queue", "--config", str(path), "show", entry_id)
    assert out.returncode == 0, out.stderr
    assert "<alice@example.com> pending: 451 4.3.0 try later" in out.stdout
    assert "by losangeles" in out.stdout
    assert "attempts     1" in out.stdout and "by dallas" in out.stdout
    data = json.loads(mailhub("queue", "--config", str(path), "show", entry_id, "--json").stdout)
    assert data["attempt_log"][0]["replies"][0]["reply"] == "451 4.3.0 try later"
    assert data["node"] == "losangeles"


def test_queue_hold_release_flush_delete(spool):
    path, entry_id = spool
    assert mailhub("queue", "--config", str(path), "hold", entry_id).returncode == 0
    listed = json.loads(mailhub("queue", "--config", str(path), "list", "--held", "--json").stdout)
    assert [e["id"] for e in listed] == [entry_id]
    assert mailhub("queue", "--config", str(path), "release", entry_id).returncode == 0
    assert "1 entries due now" in mailhub("queue", "--config", str(path), "flush").stdout
    assert mailhub("queue", "--config", str(path), "delete", entry_id).returncode == 0
    assert json.loads(mailhub("queue", "--config", str(path), "list", "--json").stdout) == []


def test_queue_show_unknown_entry_says_so(spool):
    path, _ = spool
    out = mailhub("queue", "--config", str(path), "show", "nope")
    assert out.returncode == 1
    assert "no entry nope" in out.stderr


ROUTE = "smtp:mail.example.com:25"


def fill_held(path, count):
    """``count`` entries of ROUTE, each rejected (550) and held; returns their ids."""
    config = load(str(path))
    store = load_plugin("mailhub.stores", "sqlite").make(config.plugin_section("store"), reactor)

    async def fill():
        now = reactor.seconds()
        ids = []
        for i in range(count):
            rcpt = Address(f"user{i}", "example.com")
            env = Envelope(Address("s", "outside.example"), (rcpt,), received_at=now)
            (entry_id,) = await store.enqueue(env, b"Subject: x\r\n\r\nbody\r\n", {ROUTE: [rcpt]}, "dallas")
            (lease,) = await store.claim("dallas", now, 10, 60.0, 300.0, [entry_id])
            reply = Reply(550, "5.1.1", "no such user")
            await store.record(
                lease,
                Attempt(entry_id, "dallas", now, now, ((rcpt, reply),)),
                Decision((Outcome(rcpt, Action.HOLD, reply),)),
            )
            ids.append(entry_id)
        await store.set_route_state(ROUTE, {"state": "rejecting", "since": now, "reply": str(reply)})
        await store.close()
        return ids

    return pytest_twisted.blockon(ensureDeferred(fill()))


@pytest.fixture
def held(spool):
    """The spool, plus 6 entries of ROUTE held after a 550, and the route REJECTING."""
    return fill_held(spool[0], 6)


def held_ids(path):
    return {e["id"] for e in json.loads(mailhub("queue", "--config", str(path), "list", "--held", "--json").stdout)}


def test_release_a_test_batch_then_the_rest_by_domain(spool, held):
    """Many held entries are released in one command: a first batch of N, then the rest."""
    path, _ = spool
    ids = held
    out = mailhub("queue", "--config", str(path), "release", "--domain", "example.com", "--first", "2")
    assert out.returncode == 0, out.stderr
    assert "released 2 held entries of route smtp:mail.example.com:25" in out.stdout
    assert "4 still held" in out.stdout
    assert len(held_ids(path)) == 4
    out = mailhub("queue", "--config", str(path), "release", "--route", ROUTE)
    assert "released 4 held entries" in out.stdout
    assert held_ids(path) == set()
    assert mailhub("queue", "--config", str(path), "hold", "--all").stdout.startswith("held 7 entries")
    assert held_ids(path) == set(ids) | {spool[1]}


def test_bulk_needs_exactly_one_selection(spool):
    path, _ = spool
    out = mailhub("queue", "--config", str(path), "release")
    assert out.returncode == 2 and "exactly one of --route, --domain, --all" in out.stderr
    out = mailhub("queue", "--config", str(path), "release", "--domain", "nowhere.example")
    assert out.returncode == 2 and "no domain nowhere.example" in out.stderr
    # A route neither the configuration nor the spool has is a typo, not "held 0 entries".
    for action in ("hold", "release", "flush"):
        out = mailhub("queue", "--config", str(path), action, "--route", "smtp:nope.example:25")
        assert out.returncode == 2, (action, out.stdout, out.stderr)
        assert "no route smtp:nope.example:25 in" in out.stderr and ROUTE in out.stderr


def test_route_list_and_release_end_rejecting_and_retry_everything(spool, held):
    path, _ = spool
    ids = held
    out = mailhub("route", "--config", str(path), "list")
    assert out.returncode == 0, out.stderr
    assert f"{ROUTE}: REJECTING since" in out.stdout and "550 5.1.1 no such user" in out.stdout
    out = mailhub("route", "--config", str(path), "release", ROUTE)
    assert out.returncode == 0, out.stderr
    assert "6 held entries released" in out.stdout
    assert held_ids(path) == set()
    assert json.loads(mailhub("route", "--config", str(path), "list", "--json").stdout) == {}
    assert {e["id"] for e in json.loads(mailhub("queue", "--config", str(path), "list", "--json").stdout)} >= set(ids)


def test_route_confirm_bounces_held_entries_with_their_rejection(spool, held):
    """Confirmed rejections: each held entry becomes a DSN in the spool (for the outbound route), then leaves."""
    path, first = spool
    ids = held
    out = mailhub("route", "--config", str(path), "confirm", ROUTE)
    assert out.returncode == 0, out.stderr
    assert "6 entries bounced" in out.stdout
    entries = json.loads(mailhub("queue", "--config", str(path), "list", "--json").stdout)
    assert not set(ids) & {e["id"] for e in entries}
    dsns = [e for e in entries if e["id"] != first]
    assert len(dsns) == 6
    assert all(e["sender"] == "" and e["recipients"][0]["address"] == "s@outside.example" for e in dsns)
    assert {e["route"] for e in dsns} == {"smtp:mx"}  # the outbound route
    assert json.loads(mailhub("route", "--config", str(path), "list", "--json").stdout) == {}


def test_route_release_of_a_route_in_no_state_says_so(spool):
    path, _ = spool
    out = mailhub("route", "--config", str(path), "release", ROUTE)
    assert out.returncode == 1 and "in no special state" in out.stderr


# -- bulk control: one selection model, every operation ---------------------------


def test_count_and_list_by_state_reply_sender_and_age(spool, held):
    path, first = spool
    out = mailhub("queue", "--config", str(path), "count", "--json")
    counts = json.loads(out.stdout)
    assert counts["entries"] == 7 and counts["by_state"] == {"deferred": 1, "held": 6, "leased": 0}
    assert counts["by_route"] == {ROUTE: 7}
    out = mailhub("queue", "--config", str(path), "count", "--state", "held")
    assert out.stdout.startswith("6 entries (6 recipients) of state held: 0 deferred, 6 held, 0 leased")
    listed = json.loads(mailhub("queue", "--config", str(path), "list", "--reply", "try LATER", "--json").stdout)
    assert [e["id"] for e in listed] == [first] and listed[0]["state"] == "deferred"
    out = mailhub("queue", "--config", str(path), "list", "--recipient", "user3@example.com")
    assert "1 selected: recipient user3@example.com" in out.stdout and "user3@example.com" in out.stdout
    assert json.loads(mailhub("queue", "--config", str(path), "list", "--sender", "@outside.example",
                              "--older-than", "1h", "--json").stdout) == []
    assert len(json.loads(mailhub("queue", "--config", str(path), "list", "--sender", "s@OUTSIDE.example",
                                  "--json").stdout)) == 7


def test_show_prints_the_message_and_raw_gives_its_bytes(spool):
    path, entry_id = spool
    out = mailhub("queue", "--config", str(path), "show", entry_id)
    assert "*** MESSAGE (20 bytes) ***\nSubject: x\n\nbody\n*** END OF MESSAGE ***" in out.stdout
    raw = subprocess.run([sys.executable, "-m", "mailhub.cli", "queue", "--config", str(path), "show", entry_id,
                          "--raw"], capture_output=True, timeout=60)
    assert raw.returncode == 0 and raw.stdout == b"Subject: x\r\n\r\nbody\r\n"
    data = json.loads(mailhub("queue", "--config", str(path), "show", entry_id, "--json").stdout)
    assert data["message"] == "Subject: x\n\nbody\n" and data["state"] == "deferred"


def test_redirect_moves_spooled_entries_to_another_route(spool, held):
    path, first = spool
    out = mailhub("queue", "--config", str(path), "redirect", "--state", "held", "--to", "smtp:backup.example.com:25")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("redirected 6 entries of state held to route smtp:backup.example.com:25")
    moved = json.loads(mailhub("queue", "--config", str(path), "list", "--route", "smtp:backup.example.com:25",
                               "--json").stdout)
    assert {e["id"] for e in moved} == set(held) and all(e["held"] for e in moved)
    assert [e["id"] for e in json.loads(mailhub("queue", "--config", str(path), "list", "--route", ROUTE,
                                                "--json").stdout)] == [first]
    out = mailhub("queue", "--config", str(path), "redirect", "--all", "--to", "nosuch:backup")
    assert out.returncode == 2 and out.stderr.startswith("mailhub: route nosuch:backup: no plugin 'nosuch'")


def test_bounce_and_delete_of_many_need_yes_and_bounce_sends_dsns(spool, held):
    path, first = spool
    out = mailhub("queue", "--config", str(path), "bounce", "--state", "held")
    assert out.returncode == 2 and out.stderr == "mailhub: bounce of 6 entries of state held: add --yes to go ahead\n"
    out = mailhub("queue", "--config", str(path), "delete", "--all")
    assert out.returncode == 2 and "add --yes" in out.stderr
    assert len(json.loads(mailhub("queue", "--config", str(path), "list", "--json").stdout)) == 7
    out = mailhub("queue", "--config", str(path), "bounce", "--state", "held", "--yes", "--reason", "server rebuilt")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("bounced 6 entries of state held: 6 DSNs to their senders, 0 without a DSN")
    entries = json.loads(mailhub("queue", "--config", str(path), "list", "--json").stdout)
    dsns = [e for e in entries if e["id"] != first]
    assert len(dsns) == 6 and not set(held) & {e["id"] for e in entries}
    assert all(e["sender"] == "" and e["route"] == "smtp:mx" for e in dsns)
    shown = mailhub("queue", "--config", str(path), "show", dsns[0]["id"]).stdout
    assert "returned to the sender by the hub's operator: server rebuilt (last reply: 550 5.1.1 no such user)" in shown
    out = mailhub("queue", "--config", str(path), "delete", "--sender", "<>", "--yes", "--json")
    assert json.loads(out.stdout)["done"] == 6
    assert [e["id"] for e in json.loads(mailhub("queue", "--config", str(path), "list", "--json").stdout)] == [first]


def test_bulk_work_shows_progress_and_a_summary(spool, held):
    path, _ = spool
    out = mailhub("queue", "--config", str(path), "release", "--all", "--batch", "4")
    assert out.returncode == 0, out.stderr
    assert "release: 4/6 entries (66%)" in out.stderr and "release: 6/6 entries (100%)" in out.stderr
    assert out.stdout.startswith("released 6 held entries of every route")


def test_an_unreachable_store_is_one_line_and_exit_1(tmp_path):
    from hubprocess import free_port

    path = tmp_path / "hub.toml"
    path.write_text(CONFIG.replace('plugin = "sqlite"\npath = "spool.db"',
                                   f'plugin = "redis"\nport = {free_port()}\ncommand_timeout = 1.0'))
    out = mailhub("queue", "--config", str(path), "count")
    assert out.returncode == 1
    assert out.stderr.startswith("mailhub: spool store unavailable: redis") and out.stderr.count("\n") == 1


@pytest.fixture
def busy(spool):
    """The id of an entry leased to dallas for 10 minutes: being delivered."""
    path, _ = spool
    config = load(str(path))
    store = load_plugin("mailhub.stores", "sqlite").make(config.plugin_section("store"), reactor)

    async def lease():
        now = reactor.seconds()
        env = Envelope(Address("s", "outside.example"), (Address("bob", "example.com"),), received_at=now)
        (leased,) = await store.enqueue_leased(env, b"Subject: y\r\n\r\nbody\r\n", {ROUTE: list(env.recipients)},
                                               "dallas", 600.0)
        await store.close()
        return leased.entry.id

    return pytest_twisted.blockon(ensureDeferred(lease()))


def test_an_entry_being_delivered_is_left_alone_and_the_command_says_so(spool, busy):
    """``leased``: a node is delivering it now; delete, bounce and redirect leave it, with a non-zero exit."""
    path, first = spool
    listed = json.loads(mailhub("queue", "--config", str(path), "list", "--state", "leased", "--json").stdout)
    assert [e["id"] for e in listed] == [busy]
    for args in (("delete", busy), ("bounce", busy), ("redirect", busy, "--to", "smtp:backup.example.com:25")):
        out = mailhub("queue", "--config", str(path), *args)
        assert out.returncode == 1 and out.stderr == f"mailhub: {args[0]} {busy}: not done: being delivered\n"
    out = mailhub("queue", "--config", str(path), "delete", "--all", "--yes")
    assert out.stdout.startswith("deleted 1 entries of every route; skipped 1 being delivered")
    assert [e["id"] for e in json.loads(mailhub("queue", "--config", str(path), "list", "--json").stdout)] == [busy]

"""
The admin API (``/api``) of a real node: a hub node on 127.0.0.1 with its
web listener, a SQLite spool in a temporary directory, a real downstream
SMTP server, and HTTP requests with treq.  Every route refuses without a
valid token, a read-only token (the tokens file's first, role-less format)
reads but cannot act, malformed input gets a 400 naming what is wrong, and
the bulk operations do what they say to mail already spooled.  Then
``mailhub queue --url`` drives the same node from another process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from hubprocess import eventually, free_port
from mailhub.config import parse
from mailhub.model import Action, Address, Attempt, Decision, Envelope, Outcome, Reply
from mailhub.node import Node
from mailhub.plugin import load_plugin
from mailhub.plugins.standard_policy import StandardPolicy
from mailhub.smtp.tls import server_tls_options, tls_files
from mailhub.web.archive_api import read_token_roles

VIEWER = "viewer-token-0123456789abcdef"
OPERATOR = "operator-token-0123456789abcdef"
LATER = Reply(451, "4.3.0", "mailbox busy, try later")
FULL = Reply(452, "4.2.2", "Mailbox full")

#: Every route of the API: (method, path); ``{id}`` is an entry's id.
ROUTES = [
    ("GET", "/api/openapi.json"),
    ("GET", "/api/queue"),
    ("GET", "/api/queue/count"),
    ("GET", "/api/queue/entries/{id}"),
    ("GET", "/api/queue/entries/{id}/message"),
    ("POST", "/api/queue/hold"),
    ("POST", "/api/queue/release"),
    ("POST", "/api/queue/flush"),
    ("POST", "/api/queue/redirect"),
    ("POST", "/api/queue/bounce"),
    ("POST", "/api/queue/delete"),
    ("GET", "/api/archive/search"),
    ("POST", "/api/reload"),
    ("GET", "/api/drills"),
    ("POST", "/api/drills"),
]


class Hub:
    """One node (dallas) over a SQLite spool; its domain's route goes to a port where nothing listens."""

    def __init__(self, tmp_path: Path, downstream: Any, tls: bool = False) -> None:
        self.tmp_path = tmp_path
        self.web_port = free_port()
        self.dead = f"smtp:127.0.0.1:{free_port()}"
        self.live = f"smtp:127.0.0.1:{downstream.port}"
        self.tokens = tmp_path / "tokens"
        self.tokens.write_text(
            "# the first format (NAME TOKEN): read-only\n"
            f"viewer {VIEWER}\n"
            f"ops {OPERATOR} operator\n"
        )
        self.config_path = tmp_path / "hub.toml"
        self.config_path.write_text(
            f'[hub]\nhostname = "{"localhost" if tls else "mx.hub.example"}"\n'
            f'outbound = "{self.dead}"\n'
            '[store]\nplugin = "sqlite"\npath = "spool.db"\n'
            '[archive]\nplugin = "memory"\n'
            "[delivery]\nmax_scan_interval = 1\n"
            f'[nodes.dallas]\nsmtp = "tcp:{free_port()}:interface=127.0.0.1"\n'
            f'web = "{"ssl" if tls else "tcp"}:{self.web_port}:interface=127.0.0.1"\n'
            f'[domains."example.com"]\nroute = "{self.dead}"\n'
            f'[web]\napi_tokens_file = "{self.tokens}"\n'
        )
        config = parse(self.config_path.read_bytes(), str(self.config_path))
        self.store = load_plugin("mailhub.stores", "sqlite").make(config.plugin_section("store"), reactor)
        archive = load_plugin("mailhub.archives", "memory").make({}, reactor)
        policy = StandardPolicy(("dallas",), retry_seconds=3600, jitter=0.0)
        options = server_tls_options(config, reactor.seconds()) if tls else None
        self.node = Node("dallas", config, self.store, policy, reactor, tls=options, archive=archive)
        self.node.startService()
        self.url = f"https://localhost:{self.web_port}" if tls else f"http://127.0.0.1:{self.web_port}"
        self.certificate = tls_files(config)[0]

    async def spool(
        self, rcpt: str, sender: str | None = "s@outside.example", age: float = 0.0,
        reply: Reply = LATER, leased: bool = False, route: str | None = None,
    ) -> str:
        """
        An entry of ``route`` (the dead one) accepted ``age`` seconds ago,
        tried once and deferred for an hour (or, ``leased``, being delivered
        by another node now); returns its id.
        """
        now = reactor.seconds()
        address = Address(*rcpt.split("@"))
        env = Envelope(None if sender is None else Address(*sender.split("@")), (address,), received_at=now - age)
        data = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: for {rcpt}\r\n\r\nHello {rcpt}.\r\n".encode()
        # Leased to a node that is not running: the node's engine never sees it due.
        (lease,) = await self.store.enqueue_leased(env, data, {route or self.dead: [address]}, "elsewhere", age + 600)
        if not leased:
            await self.store.record(
                lease,
                Attempt(lease.entry.id, "elsewhere", now, now, ((address, reply),)),
                Decision((Outcome(address, Action.RETRY, reply),), now + 3600, "dallas"),
            )
        return str(lease.entry.id)

    async def call(self, method: str, path: str, token: str | None = OPERATOR, body: Any = None,
                   raw_body: bytes | None = None, params: dict[str, Any] | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if method == "GET":
            response = await treq.get(self.url + path, params=params or {}, headers=headers, persistent=False)
        else:
            data = raw_body if raw_body is not None else json.dumps(body if body is not None else {}).encode()
            response = await treq.request(method, self.url + path, data=data, headers=headers, persistent=False)
        content = await treq.content(response)
        if response.headers.getRawHeaders("content-type", [""])[0] == "application/json":
            return response.code, json.loads(content)
        return response.code, content

    async def ids(self, **selection: Any) -> list[str]:
        code, listing = await self.call("GET", "/api/queue", params=selection)
        assert code == 200, listing
        return [e["id"] for e in listing["entries"]]


@pytest.fixture
def hub(tmp_path: Path, downstream: Any) -> Any:
    h = Hub(tmp_path, downstream)
    yield h
    pytest_twisted.blockon(h.node.stopService())
    pytest_twisted.blockon(h.store.close())


# -- authentication -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_route_refuses_a_request_without_a_valid_token(hub: Hub) -> None:
    entry = await hub.spool("alice@example.com")
    for method, path in [*ROUTES, ("GET", "/api/no-such-path"), ("DELETE", "/api/queue")]:
        path = path.replace("{id}", entry)
        for token in (None, "not-a-token", VIEWER + "x", VIEWER[:-1]):
            code, body = await hub.call(method, path, token=token, body={"selection": {"all": True}})
            assert code == 401, (method, path, token, body)
            assert "token" in body["error"]
        # Another scheme with a valid token is no token either.
        response = await treq.request(method, hub.url + path, headers={"Authorization": f"Basic {OPERATOR}"},
                                      persistent=False)
        assert response.code == 401
        assert response.headers.getRawHeaders("www-authenticate") == ['Bearer realm="mailhub"']
        await treq.content(response)
    assert await hub.store.get(entry) is not None and not (await hub.store.get(entry)).held


@pytest_twisted.ensureDeferred
async def test_a_read_only_token_reads_everything_and_acts_on_nothing(hub: Hub) -> None:
    """The tokens file's first format (``NAME TOKEN``) is read-only: 200 to reads, 403 to every action."""
    entry = await hub.spool("alice@example.com")
    for method, path in ROUTES:
        path = path.replace("{id}", entry)
        code, body = await hub.call(method, path, token=VIEWER,
                                    body={"selection": {"ids": [entry]}, "route": hub.live, "confirm": True})
        if method == "GET":
            assert code == 200, (path, body)
        else:
            assert code == 403, (path, body)
            assert "viewer is read-only" in body["error"] and "operator token" in body["error"]
    after = await hub.store.get(entry)
    assert after is not None and not after.held and after.route == hub.dead


@pytest_twisted.ensureDeferred
async def test_the_openapi_document_describes_every_route(hub: Hub) -> None:
    code, doc = await hub.call("GET", "/api/openapi.json", token=VIEWER)
    assert code == 200
    assert doc["openapi"].startswith("3.") and doc["info"]["title"]
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert doc["security"] == [{"bearer": []}]
    assert {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops} == set(ROUTES)

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        target: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        assert isinstance(target, dict), ref
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert "401" in op["responses"], path
            assert op["operationId"]


# -- malformed input ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/api/queue/hold", {"selection": {"state": "frozen"}}, "state 'frozen'"),
        ("/api/queue/hold", {"selection": {"older_than": "two days"}}, "older than"),
        ("/api/queue/hold", {"selection": {"colour": "red"}}, "unknown field 'colour'"),
        ("/api/queue/hold", {"selection": {"sender": "nobody"}}, "sender 'nobody'"),
        ("/api/queue/hold", {"selection": {"all": True, "route": "smtp:x:25"}}, "give it alone"),
        ("/api/queue/hold", {"selection": {"domain": "nowhere.example"}}, "no domain nowhere.example"),
        ("/api/queue/hold", {"selection": {}}, "which entries"),
        ("/api/queue/hold", {"selection": {"ids": "one"}, "colour": 1}, "unknown field 'colour'"),
        ("/api/queue/hold", {"selection": {"ids": [1, 2]}}, "ids must be a list"),
        ("/api/queue/hold", {"selection": {"all": True}, "first": 2}, "first"),
        ("/api/queue/release", {"selection": {"all": True}, "first": "2"}, "first must be a whole number"),
        ("/api/queue/redirect", {"selection": {"all": True}}, "redirect needs the route"),
        ("/api/queue/redirect", {"selection": {"all": True}, "route": "nosuch:host"}, "no plugin 'nosuch'"),
        ("/api/queue/redirect", {"selection": {"all": True}, "route": "archive:local"}, "archive"),
        ("/api/queue/delete", {"selection": {"all": True}, "dsn": "yes"}, "dsn must be true or false"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_actions_get_400_and_change_nothing(hub: Hub, path: str, body: Any, words: str) -> None:
    entry = await hub.spool("alice@example.com")
    code, answer = await hub.call("POST", path, body=body)
    assert code == 400, answer
    assert words in answer["error"]
    after = await hub.store.get(entry)
    assert after is not None and not after.held and after.route == hub.dead


@pytest_twisted.ensureDeferred
async def test_malformed_requests_are_refused_with_what_is_wrong(hub: Hub) -> None:
    await hub.spool("alice@example.com")
    for raw, words in ((b"{not json", "not JSON"), (b"[1, 2]", "JSON object")):
        code, answer = await hub.call("POST", "/api/queue/hold", raw_body=raw)
        assert code == 400 and words in answer["error"]
    for params, words in (({"limit": "0"}, "limit"), ({"offset": "-1"}, "offset"), ({"colour": "red"}, "colour"),
                          ({"older_than": "soon"}, "older than")):
        code, answer = await hub.call("GET", "/api/queue", params=params)
        assert code == 400 and words in answer["error"], params
    code, answer = await hub.call("GET", "/api/queue/hold")
    assert code == 405 and "use POST" in answer["error"]
    code, answer = await hub.call("POST", "/api/queue")
    assert code == 405 and "use GET" in answer["error"]
    code, answer = await hub.call("GET", "/api/queue/entries/no-such-entry")
    assert code == 404 and "no entry no-such-entry" in answer["error"]
    code, answer = await hub.call("GET", "/api/queue/entries/no-such-entry/message")
    assert code == 404


# -- the operations -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_selection_by_sender_recipient_state_age_and_reply(hub: Hub) -> None:
    old = await hub.spool("alice@example.com", age=3 * 3600)
    spam = await hub.spool("bob@example.com", sender="spam@flood.example")
    full = await hub.spool("carol@example.com", reply=FULL)
    busy = await hub.spool("dave@example.com", leased=True)
    bounce = await hub.spool("erin@example.com", sender=None)
    assert await hub.ids() == [old, spam, full, busy, bounce]
    assert await hub.ids(sender="@flood.example") == [spam]
    assert await hub.ids(sender="<>") == [bounce]
    assert await hub.ids(recipient="CAROL@example.com") == [full]
    assert await hub.ids(state="leased") == [busy]
    assert set(await hub.ids(state="deferred")) == {old, spam, full, bounce}
    assert await hub.ids(older_than="2h") == [old]
    assert await hub.ids(reply="mailbox FULL") == [full]
    assert await hub.ids(domain="example.com", reply="try later") == [old, spam, bounce]
    code, count = await hub.call("GET", "/api/queue/count", params={"route": hub.dead})
    assert code == 200
    assert count["entries"] == 5 and count["by_route"] == {hub.dead: 5}
    assert count["by_state"] == {"deferred": 4, "held": 0, "leased": 1}
    code, shown = await hub.call("GET", f"/api/queue/entries/{full}")
    assert shown["state"] == "deferred" and shown["attempt_log"][0]["replies"][0]["reply"] == str(FULL)
    code, message = await hub.call("GET", f"/api/queue/entries/{full}/message")
    assert code == 200 and message == b"From: s@outside.example\r\nTo: carol@example.com\r\nSubject: for" \
        b" carol@example.com\r\n\r\nHello carol@example.com.\r\n"


@pytest_twisted.ensureDeferred
async def test_hold_then_release_a_test_batch_then_the_rest(hub: Hub) -> None:
    ids = [await hub.spool(f"user{i}@example.com", age=100 - i) for i in range(5)]
    code, result = await hub.call("POST", "/api/queue/hold", body={"selection": {"route": hub.dead}})
    assert code == 200 and result["done"] == 5 and result["selection"] == f"route {hub.dead}"
    code, result = await hub.call("POST", "/api/queue/release", body={"selection": {"state": "held"}, "first": 2})
    assert code == 200, result
    assert result["ids"] == ids[:2] and result["still_held"] == 3
    assert set(await hub.ids(state="held")) == set(ids[2:])
    # Released: due now, and the node tries them at once (its route is dead: a second deferral).

    async def tried_again() -> bool:
        return all([len(await hub.store.attempts(i)) == 2 for i in ids[:2]])

    await eventually(tried_again, timeout=20, what="the released entries tried again")
    assert [len(await hub.store.attempts(i)) for i in ids[2:]] == [1, 1, 1]
    code, result = await hub.call("POST", "/api/queue/release", body={"selection": {"all": True}})
    assert result["done"] == 3 and result["skipped"] == {"not held": 2}


@pytest_twisted.ensureDeferred
async def test_redirect_moves_spooled_entries_to_a_working_route_which_delivers_them(
    hub: Hub, downstream: Any
) -> None:
    """Entries waiting for a dead route go to another one and are delivered there at once."""
    moved = [await hub.spool(f"user{i}@example.com") for i in range(3)]
    busy = await hub.spool("dave@example.com", leased=True)
    code, result = await hub.call(
        "POST", "/api/queue/redirect", body={"selection": {"route": hub.dead}, "route": hub.live}
    )
    assert code == 200, result
    assert sorted(result["ids"]) == sorted(moved) and result["skipped"] == {"being delivered": 1}
    await eventually(lambda: len(downstream.messages) == 3, timeout=20, what="three redirected messages delivered")
    assert sorted(r for m in downstream.messages for r in m.recipients) == [f"user{i}@example.com" for i in range(3)]

    async def only_busy_left() -> bool:
        return await hub.ids() == [busy]

    await eventually(only_busy_left, timeout=10, what="the delivered entries gone from the spool")


@pytest_twisted.ensureDeferred
async def test_bounce_needs_confirmation_then_sends_each_sender_a_dsn(hub: Hub) -> None:
    first = await hub.spool("alice@example.com")
    second = await hub.spool("bob@example.com")
    silent = await hub.spool("carol@example.com", sender=None)
    code, answer = await hub.call("POST", "/api/queue/bounce", body={"selection": {"route": hub.dead}})
    assert code == 409 and answer["count"] == 3 and "confirm" in answer["error"]
    assert set(await hub.ids()) == {first, second, silent}
    code, result = await hub.call(
        "POST", "/api/queue/delete",
        body={"selection": {"route": hub.dead}, "dsn": True, "confirm": True},
    )
    assert code == 200, result
    assert result["action"] == "bounce" and result["done"] == 3 and (result["dsn"], result["no_dsn"]) == (2, 1)
    # The DSNs are in the spool, for the outbound route (dead: they stay), to the sender.
    dsns = (await hub.call("GET", "/api/queue"))[1]["entries"]
    assert len(dsns) == 2 and {e["id"] for e in dsns}.isdisjoint({first, second, silent})
    assert all(e["sender"] == "" and e["recipients"][0]["address"] == "s@outside.example" for e in dsns)
    code, dsn = await hub.call("GET", f"/api/queue/entries/{dsns[0]['id']}/message")
    assert b"multipart/report; report-type=delivery-status" in dsn
    assert b"returned to the sender by the hub's operator" in dsn and b"451 4.3.0" in dsn


@pytest_twisted.ensureDeferred
async def test_delete_one_needs_no_confirmation_and_leaves_entries_being_delivered(hub: Hub) -> None:
    one = await hub.spool("alice@example.com")
    busy = await hub.spool("bob@example.com", leased=True)
    code, result = await hub.call("POST", "/api/queue/delete", body={"selection": {"ids": [one]}})
    assert code == 200 and result["ids"] == [one]
    code, result = await hub.call("POST", "/api/queue/delete", body={"selection": {"all": True}})
    assert code == 200 and result["done"] == 0 and result["skipped"] == {"being delivered": 1}
    assert await hub.ids() == [busy]


@pytest_twisted.ensureDeferred
async def test_flush_makes_selected_entries_due_now_and_they_are_tried(hub: Hub, downstream: Any) -> None:
    """On the live route, a deferred entry flushed is delivered now, not in an hour."""
    waiting = await hub.spool("alice@example.com", route=hub.live)
    other = await hub.spool("bob@example.com", route=hub.live, sender="other@outside.example")
    code, result = await hub.call("POST", "/api/queue/flush", body={"selection": {"sender": "s@outside.example"}})
    assert code == 200 and result["ids"] == [waiting]
    await eventually(lambda: len(downstream.messages) == 1, timeout=20, what="the flushed entry delivered")
    assert downstream.messages[0].recipients == ["alice@example.com"]
    assert await hub.ids() == [other]


@pytest_twisted.ensureDeferred
async def test_a_whole_route_is_flushed_without_listing_the_backlog_first(
    hub: Hub, downstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    After an outage the backlog is what is flushed: the store flushes the
    route in one statement and the nodes go at once; the answer counts
    (held and leased entries skipped) and names no entry.
    """
    waiting = [await hub.spool(f"user{i}@example.com", route=hub.live) for i in range(3)]
    held = await hub.spool("held@example.com", route=hub.live)
    await hub.store.hold(held)
    await hub.spool("busy@example.com", route=hub.live, leased=True)
    elsewhere = await hub.spool("bob@example.com")  # the dead route: not selected
    listed: list[object] = []
    cls = type(hub.store)

    def counted(real: Any) -> Any:
        def listing(self: Any, *a: Any, **k: Any) -> Any:
            listed.append(a)
            return real(self, *a, **k)

        return listing

    monkeypatch.setattr(cls, "entries", counted(cls.entries))
    monkeypatch.setattr(cls, "get", counted(cls.get))
    code, result = await hub.call("POST", "/api/queue/flush", body={"selection": {"route": hub.live}})
    monkeypatch.undo()
    assert code == 200, result
    assert listed == []
    assert (result["selected"], result["done"], result["ids"]) == (5, 3, [])
    assert result["skipped"] == {"held or being delivered": 2}
    await eventually(lambda: len(downstream.messages) == 3, timeout=20, what="the flushed entries delivered")
    assert sorted(r for m in downstream.messages for r in m.recipients) == [
        f"user{i}@example.com" for i in range(3)
    ]
    assert not set(waiting) & set(await hub.ids())
    assert (await hub.store.get(elsewhere)) is not None


@pytest_twisted.ensureDeferred
async def test_the_archive_api_answers_under_the_same_tokens(hub: Hub) -> None:
    code, page = await hub.call("GET", "/api/archive/search", token=VIEWER, params={"q": "hello"})
    assert code == 200 and page["items"] == []
    code, _ = await hub.call("GET", "/api/archive/search", token=None)
    assert code == 401


# -- mailhub queue --url -----------------------------------------------------------


def mailhub(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailhub.cli", *args], capture_output=True, text=True, timeout=60)


@pytest_twisted.ensureDeferred
async def test_the_queue_command_through_a_nodes_api(hub: Hub, tmp_path: Path) -> None:
    """``mailhub queue --url`` with no configuration at all: the same commands, the same results."""
    ids = [await hub.spool(f"user{i}@example.com", age=100 - i) for i in range(5)]
    token_file = tmp_path / "op.token"
    token_file.write_text(OPERATOR + "\n")
    viewer_file = tmp_path / "viewer.token"
    viewer_file.write_text(VIEWER + "\n")
    remote = ["queue", "--url", hub.url, "--token-file", str(token_file)]

    def run(*args: str) -> Any:
        return deferToThread(mailhub, *args)

    out = await run(*remote, "list", "--json")
    assert out.returncode == 0, out.stderr
    assert [e["id"] for e in json.loads(out.stdout)] == ids
    out = await run(*remote, "hold", "--all", "--batch", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("held 5 entries of every route")
    assert "hold: 2/5 entries" in out.stderr and "hold: 5/5 entries" in out.stderr
    out = await run(*remote, "release", "--state", "held", "--first", "2", "--json")
    result = json.loads(out.stdout)
    assert result["ids"] == ids[:2] and result["still_held"] == 3
    out = await run(*remote, "count")
    assert "5 entries (5 recipients) of every route: 2 deferred, 3 held, 0 leased" in out.stdout
    out = await run(*remote, "show", ids[4])  # still held: not tried again since
    assert out.returncode == 0, out.stderr
    assert "<user4@example.com> pending: 451 4.3.0 mailbox busy" in out.stdout
    assert "next attempt held" in out.stdout
    assert "Subject: for user4@example.com\n\nHello user4@example.com.\n*** END OF MESSAGE ***" in out.stdout
    out = await run(*remote, "delete", "--all")
    assert out.returncode == 2 and "add --yes" in out.stderr and out.stderr.count("\n") == 1
    assert len(await hub.ids()) == 5
    # A read-only token: one line, non-zero, nothing changed.
    out = await run("queue", "--url", hub.url, "--token-file", str(viewer_file), "hold", ids[0])
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "403" in out.stderr and "read-only" in out.stderr
    out = await run(*remote, "hold", "--state", "frozen")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = await run(*remote, "hold", "--sender", "nobody")
    assert out.returncode == 2 and out.stderr == "mailhub: sender 'nobody': give an address (user@domain), @domain or <>\n"
    out = await run("queue", "--url", f"http://127.0.0.1:{free_port()}", "--token-file", str(token_file), "count")
    assert out.returncode == 1 and out.stderr.startswith("mailhub: cannot reach") and out.stderr.count("\n") == 1
    out = await run(*remote, "delete", "--all", "--yes")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("deleted 5 entries of every route")
    assert await hub.ids() == []


@pytest_twisted.ensureDeferred
async def test_the_queue_command_over_tls_trusts_the_nodes_certificate_when_told(tmp_path: Path, downstream: Any) -> None:
    """A web listener on ``ssl:`` with the node's self-signed certificate: ``--cafile`` trusts it, nothing else does."""
    hub = Hub(tmp_path, downstream, tls=True)
    try:
        await hub.spool("alice@example.com")
        token_file = tmp_path / "op.token"
        token_file.write_text(OPERATOR + "\n")
        remote = ["queue", "--url", hub.url, "--token-file", str(token_file)]
        out = await deferToThread(mailhub, *remote, "--cafile", hub.certificate, "count", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["entries"] == 1
        out = await deferToThread(mailhub, *remote, "count")
        assert out.returncode == 1 and out.stderr.startswith("mailhub: cannot reach") and out.stderr.count("\n") == 1
        # Plain HTTP to the TLS listener gets nowhere either.
        out = await deferToThread(mailhub, "queue", "--url", hub.url.replace("https", "http"), "--token-file",
                                  str(token_file), "count")
        assert out.returncode == 1 and out.stderr.count("\n") == 1
    finally:
        await hub.node.stopService()
        await hub.store.close()


def test_token_create_appends_a_token_with_its_role_and_prints_it_once(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"viewer {VIEWER}")  # the first format, without a final newline
    config = tmp_path / "hub.toml"
    config.write_text(
        '[hub]\nhostname = "mx.hub.example"\n[store]\nplugin = "sqlite"\npath = "spool.db"\n'
        '[nodes.dallas]\nsmtp = "tcp:0"\n[domains."example.com"]\nroute = "smtp:mail.example.com:25"\n'
        '[web]\napi_tokens_file = "tokens"\n'
    )
    out = mailhub("token", "-c", str(config), "create", "ops-alice", "--role", "operator")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert len(token) >= 40 and "\n" not in token
    assert "not shown again" in out.stderr
    assert read_token_roles(str(tokens)) == {VIEWER: ("viewer", "read-only"), token: ("ops-alice", "operator")}
    out = mailhub("token", "-c", str(config), "create", "ops-alice")
    assert out.returncode == 2 and "already" in out.stderr
    out = mailhub("token", "-c", str(config), "create", "prometheus")
    assert out.returncode == 0
    assert read_token_roles(str(tokens))[out.stdout.strip()] == ("prometheus", "read-only")
    # A new file is the owner's only.
    tokens.unlink()
    assert mailhub("token", "-c", str(config), "create", "first").returncode == 0
    assert tokens.stat().st_mode & 0o777 == 0o600


def test_a_tokens_file_with_an_unknown_role_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"viewer {VIEWER}\nops {OPERATOR} admin\n")
    with pytest.raises(ValueError, match=r"line 2: role 'admin' of ops: give read-only or operator"):
        read_token_roles(str(path))

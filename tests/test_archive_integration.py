"""
The LiveArchive with a real ``twistd mailhub`` over SQLite (spool and
archive), a real downstream server and the ``mailhub archive`` command, as
the README runs them.
"""

from __future__ import annotations

import json
import mailbox
import signal
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread

from hubprocess import HubProcess, eventually, free_port, hub_config, message, send
from mailhub.testing.downstream import DownstreamServer

pytestmark = [pytest.mark.integration]

TOKEN = "test-token-0123456789abcdef"


def archive_hub(tmp_path: Path, downstream: DownstreamServer, archive: str = "") -> tuple[HubProcess, int, int]:
    port, web = free_port(), free_port()
    text = hub_config(tmp_path / "spool.db", downstream.port, {"dallas": port}, retry_minutes=0.1)
    text = text.replace(
        f'smtp = "tcp:{port}:interface=127.0.0.1"\n',
        f'smtp = "tcp:{port}:interface=127.0.0.1"\nweb = "tcp:{web}:interface=127.0.0.1"\n',
    )
    text += (
        '[archive]\nplugin = "sqlite"\npath = "archive.db"\nretention_days = 30\n' + archive +
        '[web]\napi_tokens_file = "tokens"\n'
        "[smtp]\nmax_messages_per_minute_per_ip = 1000000\nmax_connections_per_ip = 100\n"
    )
    (tmp_path / "tokens").write_text(f"ops {TOKEN}\n")
    return HubProcess(tmp_path, text), port, web


async def cli_json(hub: HubProcess, *args: str) -> object:
    out = await deferToThread(hub.cli, *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def api(web: int, path: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{web}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest_twisted.ensureDeferred
async def test_archive_from_smtp_to_search_export_import_redeliver_and_audit(tmp_path, downstream):
    hub, port, web = archive_hub(tmp_path, downstream)
    hub.start()
    try:
        await hub.started(port)
        for i in range(3):
            code, _ = await send(port, message(f"invoice-{i}"), recipients=["alice@example.com", "bob@example.com"])
            assert code == 250
        code, _ = await send(port, message("lunch plans"), recipients=["bob@example.com"])
        assert code == 250

        async def archived() -> bool:
            found = await cli_json(hub, "archive", "search", "--domain", "example.com", "--json")
            return found["total"] == 4  # type: ignore[index]

        await eventually(archived, timeout=30, what="every message archived")
        alice = await cli_json(hub, "archive", "search", "--mailbox", "alice@example.com", "--json", "invoice")
        assert alice["total"] == 3  # type: ignore[index]
        assert all(s["mailboxes"] == ["alice@example.com"] for s in alice["items"])  # type: ignore[index]
        lunch = await cli_json(hub, "archive", "search", "--mailbox", "bob@example.com", "--json", "subject:lunch")
        [item] = lunch["items"]  # type: ignore[index]
        shown = await cli_json(hub, "archive", "show", item["id"], "--json")
        assert shown["subject"] == "lunch plans" and "Body of lunch plans." in shown["body"]  # type: ignore[index]
        raw = await deferToThread(hub.cli, "archive", "show", item["id"], "--raw")
        assert "Subject: lunch plans" in raw.stdout

        # Export alice's mail, import it as carol's history.
        mbox = tmp_path / "alice.mbox"
        out = await deferToThread(hub.cli, "archive", "export", "--mailbox", "alice@example.com", "--output", str(mbox))
        assert "3 messages" in out.stdout, out.stderr
        assert len(mailbox.mbox(str(mbox))) == 3
        zipped = tmp_path / "alice.zip"
        await deferToThread(hub.cli, "archive", "export", "--mailbox", "alice@example.com",
                            "--format", "eml-zip", "--output", str(zipped))
        assert len(zipfile.ZipFile(zipped).namelist()) == 3
        out = await deferToThread(hub.cli, "archive", "import", "--mbox", str(mbox), "--mailbox", "carol@example.com")
        assert "3 messages imported" in out.stdout, out.stderr
        carol = await cli_json(hub, "archive", "search", "--mailbox", "carol@example.com", "--json", "invoice")
        assert carol["total"] == 3  # type: ignore[index]

        # Re-deliver carol's history to her server.
        out = await deferToThread(hub.cli, "archive", "redeliver", "--mailbox", "carol@example.com", "--dry-run")
        assert "3 messages" in out.stdout
        before = len(downstream.messages)
        out = await deferToThread(hub.cli, "archive", "redeliver", "--mailbox", "carol@example.com", "invoice")
        assert "3 messages" in out.stdout, out.stderr
        await eventually(lambda: len(downstream.messages) == before + 3, timeout=30, what="re-delivered")
        assert all(m.recipients == ["carol@example.com"] for m in downstream.messages[before:])

        # The JSON API: a token is needed; with it, search and read.
        status, _ = await deferToThread(api, web, "/api/archive/search?q=invoice", None)
        assert status == 401
        status, body = await deferToThread(api, web, "/api/archive/search?mailbox=alice@example.com&q=invoice")
        assert status == 200 and json.loads(body)["total"] == 3
        status, body = await deferToThread(api, web, f"/api/archive/messages/{item['id']}?raw=1")
        assert status == 200 and b"Subject: lunch plans" in body
        status, _ = await deferToThread(api, web, f"/api/archive/messages/{item['id']}?mailbox=alice@example.com")
        assert status == 404  # not alice's

        # Legal hold, and every access in the audit log.
        await deferToThread(hub.cli, "archive", "hold", "--domain", "example.com", "--reason", "case 42")
        holds = await cli_json(hub, "archive", "holds", "--json")
        assert [h["domain"] for h in holds] == ["example.com"]  # type: ignore[union-attr,index]
        audit = await cli_json(hub, "archive", "audit", "--json", "--limit", "100")
        actions = {e["action"] for e in audit}  # type: ignore[union-attr,index]
        assert {"search", "read", "export", "import", "redeliver", "hold"} <= actions
        assert any(e["actor"] == "api:ops" for e in audit)  # type: ignore[union-attr,index]
    finally:
        await hub.stop()


@pytest.mark.parametrize("archive", ["", "yield_above = 1\nmax_lag = 10\n"], ids=["archiving", "yielding"])
@pytest_twisted.ensureDeferred
async def test_no_acknowledged_message_misses_the_archive_after_kill_9(tmp_path, downstream, archive):
    """
    Killed while mail arrives: after a restart every message that got 250 is
    archived, also when the archive was yielding to the burst (its entries
    put off in the spool) at the kill.
    """
    hub, port, _ = archive_hub(tmp_path, downstream, archive)
    hub.start()
    await hub.started(port)
    accepted: list[str] = []

    async def sender(worker: int) -> None:
        for i in range(200):
            tag = f"w{worker}-{i}"
            code, _ = await send(port, message(tag), recipients=[f"{tag}@example.com"])
            if code != 250:
                return
            accepted.append(tag)

    senders = gatherResults([ensureDeferred(sender(w)) for w in range(4)], consumeErrors=True)
    try:
        await eventually(lambda: len(accepted) >= 60, timeout=60, what="some mail accepted")
        if archive:
            await eventually(
                lambda: "archive yielding to the front door" in hub.log_path.read_text(), timeout=30,
                what="the archive yielding",
            )
    finally:
        hub.kill(signal.SIGKILL)
    await senders.addErrback(lambda f: None)
    hub.start()
    try:
        await hub.started(port)

        async def all_archived() -> bool:
            found = await cli_json(hub, "archive", "search", "--domain", "example.com", "--json", "--limit", "1")
            return found["total"] >= len(accepted)  # type: ignore[index]

        await eventually(all_archived, timeout=60, what="every acknowledged message archived")
        for tag in accepted:
            found = await cli_json(hub, "archive", "search", "--mailbox", f"{tag}@example.com", "--json")
            assert found["total"] == 1, tag  # type: ignore[index]
    finally:
        await hub.stop()


@pytest_twisted.ensureDeferred
async def test_redeliver_skip_delivered_sends_only_what_the_hub_did_not_deliver(tmp_path, downstream):
    """
    Two messages delivered, two archived while the server was down and then
    deleted from the queue: ``redeliver --skip-delivered`` re-spools the two
    the hub did not deliver, and once those are delivered, a second run
    would skip all four.
    """
    hub, port, _ = archive_hub(tmp_path, downstream)
    hub.start()
    try:
        await hub.started(port)
        for tag in ("delivered-1", "delivered-2"):
            code, _ = await send(port, message(tag), recipients=["alice@example.com"])
            assert code == 250
        await eventually(lambda: len(downstream.messages) == 2, timeout=30, what="first two delivered")

        await downstream.stop()
        for tag in ("lost-1", "lost-2"):
            code, _ = await send(port, message(tag), recipients=["alice@example.com"])
            assert code == 250

        async def archived() -> bool:
            found = await cli_json(hub, "archive", "search", "--mailbox", "alice@example.com", "--json")
            return found["total"] == 4  # type: ignore[index]

        await eventually(archived, timeout=30, what="all four archived")
        # The operator gives up on the queued copies (the server was rebuilt, say).
        queued = [e for e in await hub.queue() if not e["route"].startswith("archive:")]
        assert len(queued) == 2
        for e in queued:
            out = await deferToThread(hub.cli, "queue", "delete", e["id"])
            assert out.returncode == 0, out.stderr

        async def preview() -> dict:
            return await cli_json(  # type: ignore[return-value]
                hub, "archive", "redeliver", "--mailbox", "alice@example.com", "--skip-delivered", "--dry-run", "--json"
            )

        # The hub writes its delivery records in the background: wait for them.
        await eventually(lambda: ensureDeferred(_skips(preview, 2)), timeout=30, what="delivery records written")
        assert await preview() == {
            "scope": "mailbox alice@example.com", "selected": 4, "redelivered": 2, "skipped": 2, "dry_run": True,
        }
        text = await deferToThread(
            hub.cli, "archive", "redeliver", "--mailbox", "alice@example.com", "--skip-delivered", "--dry-run"
        )
        assert "4 messages of mailbox alice@example.com selected: 2 would be re-delivered, 2 skipped" in text.stdout

        await downstream.start(port=downstream.port)
        before = len(downstream.messages)
        done = await cli_json(hub, "archive", "redeliver", "--mailbox", "alice@example.com", "--skip-delivered", "--json")
        assert done == {
            "scope": "mailbox alice@example.com", "selected": 4, "redelivered": 2, "skipped": 2, "entries": 2,
            "dry_run": False,
        }
        await eventually(lambda: len(downstream.messages) == before + 2, timeout=30, what="re-delivered")
        subjects = sorted(m.message.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in downstream.messages[before:])
        assert subjects == [b"lost-1", b"lost-2"]
        assert all(m.recipients == ["alice@example.com"] for m in downstream.messages[before:])

        # What the re-delivery delivered is recorded too: a second run skips everything.
        await eventually(lambda: ensureDeferred(_skips(preview, 4)), timeout=30, what="re-deliveries recorded")
        audit = await cli_json(hub, "archive", "audit", "--action", "redeliver", "--json")
        assert "2 skipped as delivered" in audit[0]["detail"]  # type: ignore[index]
    finally:
        await hub.stop()


async def _skips(preview, count: int) -> bool:
    return (await preview())["skipped"] == count

"""
Drills (``mailhub.drill``): a real hub service (one node, SMTP and web
listeners on 127.0.0.1, a SQLite spool, the memory archive) sends a probe
through its own SMTP listener to a real downstream server and follows it:
accepted, archived, delivered.  A downstream that is down fails the drill at
``delivered`` (deferred) at once; ``mailhub drill`` exits non-zero naming
the step; a scheduled drill (``[drills] every``) shows in ``GET
/api/drills`` and in ``/metrics``; bad input is refused.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from hubprocess import BIN, HubProcess, eventually, free_port
from mailhub.config import ConfigError, load, parse
from mailhub.service import makeHubService

VIEWER = "viewer-token-0123456789abcdef"
OPERATOR = "operator-token-0123456789abcdef"


class Hub:
    """A ``HubService`` of one node (dallas) relaying example.com and example.org to ``downstream``."""

    def __init__(self, tmp_path: Path, downstream: Any, extra: str = "") -> None:
        self.smtp_port, self.web_port = free_port(), free_port()
        route = f"smtp:127.0.0.1:{downstream.port}"
        (tmp_path / "tokens").write_text(f"viewer {VIEWER}\nops {OPERATOR} operator\n")
        self.operator_file = tmp_path / "operator-token"
        self.operator_file.write_text(OPERATOR + "\n")
        self.path = tmp_path / "hub.toml"
        self.path.write_text(
            '[hub]\nhostname = "mx.hub.example"\n'
            f'outbound = "{route}"\n'
            '[store]\nplugin = "sqlite"\npath = "spool.db"\n'
            '[archive]\nplugin = "memory"\n'
            '[policy]\nplugin = "standard"\njitter = 0\n'
            "[delivery]\nmax_scan_interval = 1\n"
            f'[nodes.dallas]\nsmtp = "tcp:{self.smtp_port}:interface=127.0.0.1"\n'
            f'web = "tcp:{self.web_port}:interface=127.0.0.1"\n'
            f'[domains."example.com"]\nroute = "{route}"\n'
            f'[domains."example.org"]\nroute = "{route}"\n'
            '[web]\napi_tokens_file = "tokens"\n'
            + extra
        )
        self.service = makeHubService(load(str(self.path)), reactor)
        self.service.startService()
        self.url = f"http://127.0.0.1:{self.web_port}"

    async def call(self, method: str, path: str, body: Any = None, token: str | None = OPERATOR) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = json.dumps(body).encode() if body is not None else None
        response = await treq.request(method, self.url + path, data=data, headers=headers, persistent=False)
        content = await treq.content(response)
        try:
            return response.code, json.loads(content)
        except ValueError:
            return response.code, content.decode()


def _start(tmp_path: Path, downstream: Any, extra: str = "") -> Any:
    h = Hub(tmp_path, downstream, extra)
    yield h
    pytest_twisted.blockon(h.service.stopService())


@pytest.fixture
def hub(tmp_path: Path, downstream: Any) -> Any:
    yield from _start(tmp_path, downstream)


@pytest.fixture
def scheduled(tmp_path: Path, downstream: Any) -> Any:
    yield from _start(tmp_path, downstream, '[drills]\nevery = "1h"\ndomains = ["example.org"]\nto = "drills"\n')


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "mailhub"), *args], capture_output=True, text=True, timeout=60)


@pytest_twisted.ensureDeferred
async def test_a_drill_is_accepted_archived_and_delivered(hub: Hub, downstream: Any) -> None:
    code, result = await hub.call("POST", "/api/drills", {"domain": "example.com", "timeout": 20})
    assert code == 200, result
    assert result["ok"] is True and result["failed"] is None, result
    assert [s["step"] for s in result["steps"]] == ["accepted", "archived", "delivered"]
    assert all(s["ok"] and s["seconds"] is not None for s in result["steps"])
    seconds = [s["seconds"] for s in result["steps"]]
    assert seconds[0] <= seconds[2] <= result["duration"] < 20
    assert f"queued as {result['queue_id']}" in result["steps"][0]["detail"]
    assert result["recipient"] == "postmaster@example.com"
    (received,) = downstream.messages
    assert received.recipients == ["postmaster@example.com"] and received.sender == ""
    assert f"Subject: mailhub drill {result['id']}".encode() in received.message
    assert f"Message-ID: {result['message_id']}".encode() in received.message
    # The last result is kept; a read-only token may read it.
    code, listing = await hub.call("GET", "/api/drills", token=VIEWER)
    assert code == 200
    assert [d["id"] for d in listing["drills"]] == [result["id"]]


@pytest_twisted.ensureDeferred
async def test_a_drill_to_a_downstream_that_is_down_fails_at_delivered_at_once(hub: Hub, downstream: Any) -> None:
    downstream.mode = "down"
    code, result = await hub.call("POST", "/api/drills", {"domain": "example.com", "to": "ops@example.com",
                                                          "timeout": 30})
    assert code == 200, result
    assert result["ok"] is False and result["failed"] == "delivered", result
    accepted, archived, delivered = result["steps"]
    assert accepted["ok"] and archived["ok"]
    assert not delivered["ok"] and delivered["detail"].startswith("deferred: 4"), delivered
    assert delivered["seconds"] < 10  # seen deferred, not waited out
    # The probe stays in the spool, to be delivered when the server is back.
    code, shown = await hub.call("GET", f"/api/queue/entries/{result['queue_id']}")
    assert code == 200 and shown["recipients"][0]["address"] == "ops@example.com"


@pytest_twisted.ensureDeferred
async def test_mailhub_drill_exits_non_zero_naming_the_failed_step(hub: Hub, downstream: Any) -> None:
    done = await deferToThread(_cli, "drill", "example.org", "--url", hub.url, "--token-file",
                               str(hub.operator_file), "--timeout", "20")
    assert done.returncode == 0, done.stderr
    assert re.search(r"delivered\s+ok", done.stdout), done.stdout
    downstream.mode = "down"
    done = await deferToThread(_cli, "drill", "example.org", "--config", str(hub.path), "--node", "dallas",
                               "--timeout", "20", "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["failed"] == "delivered"
    assert "drill of example.org failed at delivered: deferred: 4" in done.stderr
    done = await deferToThread(_cli, "drill", "example.net", "--url", hub.url, "--token-file", str(hub.operator_file))
    assert done.returncode == 2
    assert "'example.net' is not a domain of the hub" in done.stderr


@pytest_twisted.ensureDeferred
async def test_a_drill_rejected_by_the_server_fails_at_delivered_and_bounces_nothing(hub: Hub, downstream: Any) -> None:
    downstream.mode = "reject"
    code, result = await hub.call("POST", "/api/drills", {"domain": "example.com", "timeout": 20})
    assert result["failed"] == "delivered", result
    assert result["steps"][-1]["detail"].startswith("failed: 550"), result
    # The null sender: no DSN is spooled for the probe, and its entry is gone.
    code, count = await hub.call("GET", "/api/queue/count", token=VIEWER, body=None)
    assert code == 200 and count["entries"] == 0, count


@pytest_twisted.ensureDeferred
async def test_a_drill_not_delivered_within_its_timeout_fails_at_delivered(hub: Hub, downstream: Any) -> None:
    downstream.delay = 3.0  # the server takes longer to answer the end of data than the drill waits
    code, result = await hub.call("POST", "/api/drills", {"domain": "example.com", "timeout": 1})
    assert code == 200, result
    assert result["failed"] == "delivered", result
    delivered = result["steps"][-1]
    assert delivered["seconds"] is None and delivered["detail"] == "not seen within 1 s"
    assert result["steps"][1]["step"] == "archived" and result["steps"][1]["ok"]


@pytest_twisted.ensureDeferred
async def test_a_drill_refused_at_accepted_names_that_step(hub: Hub) -> None:
    # Nothing listens there: the probe is never accepted.
    code, result = await hub.call("POST", "/api/drills", {"domain": "example.com", "smtp": f"127.0.0.1:{free_port()}",
                                                          "timeout": 5})
    assert code == 200, result
    assert result["failed"] == "accepted" and result["queue_id"] == ""
    assert [s["step"] for s in result["steps"]] == ["accepted"]
    assert result["steps"][0]["detail"].startswith("4")


@pytest_twisted.ensureDeferred
async def test_drill_requests_are_refused_without_an_operator_token_or_with_bad_input(hub: Hub, downstream: Any) -> None:
    for token in (None, "nope"):
        assert (await hub.call("GET", "/api/drills", token=token))[0] == 401
        assert (await hub.call("POST", "/api/drills", {"domain": "example.com"}, token=token))[0] == 401
    code, body = await hub.call("POST", "/api/drills", {"domain": "example.com"}, token=VIEWER)
    assert code == 403 and "operator token" in body["error"]
    for bad, says in (
        ({}, "domain is needed"),
        ({"domain": "example.net"}, "not a domain of the hub"),
        ({"domain": "example.com", "to": "someone@outside.example"}, "not in a domain of the hub"),
        ({"domain": "example.com", "to": "a b@example.com"}, "is not an address"),
        ({"domain": "example.com", "timeout": 0}, "timeout must be"),
        ({"domain": "example.com", "timeout": "soon"}, "timeout must be a number"),
        ({"domain": "example.com", "smtp": "host:port"}, "is not host:port"),
        ({"domain": "example.com", "bogus": 1}, "unknown field 'bogus'"),
        ({"domain": 5}, "domain must be a string"),
    ):
        code, body = await hub.call("POST", "/api/drills", bad)
        assert code == 400 and says in body["error"], (bad, body)
    code, body = await hub.call("DELETE", "/api/drills")
    assert code == 405
    assert downstream.messages == []


@pytest_twisted.ensureDeferred
async def test_a_scheduled_drill_shows_in_the_api_and_the_metrics(scheduled: Hub, downstream: Any) -> None:
    async def drilled() -> Any:
        code, listing = await scheduled.call("GET", "/api/drills", token=VIEWER)
        return listing["drills"] if code == 200 and listing["drills"] else None

    (result,) = await eventually(drilled, timeout=30, what="the scheduled drill's result")
    assert result["domain"] == "example.org" and result["recipient"] == "drills@example.org"
    assert result["ok"] is True, result
    response = await treq.get(scheduled.url + "/metrics", persistent=False)
    text = (await treq.content(response)).decode()
    assert 'mailhub_drill_last_ok{domain="example.org",node="dallas"} 1.0' in text, text
    success = re.search(r'mailhub_drill_last_success_timestamp\{domain="example.org",node="dallas"\} (\S+)', text)
    assert success is not None and abs(float(success.group(1)) - result["started"]) < 1
    for step in ("accepted", "archived", "delivered"):
        assert f'mailhub_drill_last_duration_seconds{{domain="example.org",node="dallas",step="{step}"}}' in text
    # A failed drill turns the gauge to 0 and keeps the last success's time.
    downstream.mode = "down"
    code, failed = await scheduled.call("POST", "/api/drills", {"domain": "example.org", "timeout": 20})
    assert failed["failed"] == "delivered"
    text = (await treq.content(await treq.get(scheduled.url + "/metrics", persistent=False))).decode()
    assert 'mailhub_drill_last_ok{domain="example.org",node="dallas"} 0.0' in text
    assert success.group(0) in text


_BASE = (
    b'[hub]\nhostname = "h.example"\n[store]\nplugin = "memory"\n[policy]\nplugin = "standard"\n'
    b'[nodes.a]\nsmtp = "tcp:2525"\n[domains."example.com"]\nroute = "smtp:mail.example.com:25"\n'
)


def test_the_drills_table_is_read_with_units_and_checked_strictly() -> None:
    config = parse(_BASE + b'[drills]\nevery = "30m"\ntimeout = 90\ndomains = ["Example.com"]\nto = "ops"\n',
                   endpoints=False)
    assert (config.drills.every, config.drills.timeout, config.drills.domains, config.drills.to) == (
        1800.0, 90.0, ("example.com",), "ops")
    assert parse(_BASE, endpoints=False).drills.every == 0  # no table: no scheduled drills
    with pytest.raises(ConfigError) as e:
        parse(_BASE + b'[drills]\nevery = "soon"\ntimeout = 0\ndomains = ["example.net"]\nto = "a@b.example"\nevry = 1\n',
              endpoints=False)
    text = str(e.value)
    for key in ("drills.every", "drills.timeout", "drills.domains[0]", "drills.to", 'drills.evry: unknown key (did you mean "every"?)'):
        assert key in text, (key, text)


@pytest_twisted.ensureDeferred
async def test_a_twistd_node_reloads_and_drills_on_the_cli_s_request(tmp_path: Path, downstream: Any) -> None:
    """``twistd mailhub`` as the README starts it; ``mailhub reload`` and ``mailhub drill`` with ``--node``."""
    smtp_port, web_port = free_port(), free_port()
    route = f"smtp:127.0.0.1:{downstream.port}"
    (tmp_path / "tokens").write_text(f"viewer {VIEWER}\nops {OPERATOR} operator\n")

    def config(*domains: str) -> str:
        return (
            f'[hub]\nhostname = "mx.hub.example"\noutbound = "{route}"\n'
            '[store]\nplugin = "sqlite"\npath = "spool.db"\n[archive]\nplugin = "sqlite"\npath = "archive.db"\n'
            '[drills]\nevery = "1h"\n'
            f'[nodes.dallas]\nsmtp = "tcp:{smtp_port}:interface=127.0.0.1"\nweb = "tcp:{web_port}:interface=127.0.0.1"\n'
            + "".join(f'[domains."{d}"]\nroute = "{route}"\n' for d in domains)
            + '[web]\napi_tokens_file = "tokens"\n'
        )

    hub = HubProcess(tmp_path, config("example.com"))
    hub.start()
    try:
        await hub.started(smtp_port)
        # The scheduled round at start: example.com, through the node itself.
        first = await eventually(lambda: [m for m in downstream.messages if m.recipients == ["postmaster@example.com"]],
                                 what="the scheduled drill's probe")
        assert b"Subject: mailhub drill " in first[0].message
        hub.config_path.write_text(config("example.com", "example.org"))
        done = await deferToThread(hub.cli, "reload", "--node", "dallas")
        assert done.returncode == 0, done.stderr
        assert "changed: domain example.org added" in done.stdout
        assert "needs a restart" not in done.stdout
        done = await deferToThread(hub.cli, "drill", "example.org", "--node", "dallas", "--to", "ops", "--json")
        assert done.returncode == 0, (done.stdout, done.stderr, hub.log())
        result = json.loads(done.stdout)
        assert [s["step"] for s in result["steps"] if s["ok"]] == ["accepted", "archived", "delivered"]
        assert any(m.recipients == ["ops@example.org"] for m in downstream.messages)
        assert f"drill {result['id']} of example.org through node dallas to ops@example.org: ok" in hub.log()
    finally:
        await hub.stop()

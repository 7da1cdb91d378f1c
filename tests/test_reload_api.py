"""
``POST /api/reload`` and ``mailhub reload --url``: a real hub service (one
node, its SMTP and web listeners on 127.0.0.1, a SQLite spool in a
temporary directory) reads its configuration file again when an operator
token asks, answers what changed (``200``) or the file's errors (``422``,
the running configuration kept), and refuses everyone else.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from hubprocess import BIN, free_port, message, send
from mailhub.config import load
from mailhub.service import makeHubService

VIEWER = "viewer-token-0123456789abcdef"
OPERATOR = "operator-token-0123456789abcdef"


class Hub:
    """A ``HubService`` of one node (dallas) with an admin API."""

    def __init__(self, tmp_path: Path, downstream: Any) -> None:
        self.smtp_port, self.web_port = free_port(), free_port()
        self.route = f"smtp:127.0.0.1:{downstream.port}"
        (tmp_path / "tokens").write_text(f"viewer {VIEWER}\nops {OPERATOR} operator\n")
        self.operator_file = tmp_path / "operator-token"
        self.operator_file.write_text(OPERATOR + "\n")
        self.path = tmp_path / "hub.toml"
        self.write()
        self.service = makeHubService(load(str(self.path)), reactor)
        self.service.startService()
        self.url = f"http://127.0.0.1:{self.web_port}"

    def write(self, domains: tuple[str, ...] = ("example.com",), extra: str = "") -> None:
        self.path.write_text(
            '[hub]\nhostname = "mx.hub.example"\n'
            f'outbound = "{self.route}"\n'
            '[store]\nplugin = "sqlite"\npath = "spool.db"\n'
            "[delivery]\nmax_scan_interval = 1\n"
            f'[nodes.dallas]\nsmtp = "tcp:{self.smtp_port}:interface=127.0.0.1"\n'
            f'web = "tcp:{self.web_port}:interface=127.0.0.1"\n'
            + "".join(f'[domains."{d}"]\nroute = "{self.route}"\n' for d in domains)
            + '[web]\napi_tokens_file = "tokens"\n'
            + extra
        )

    async def reload(self, token: str | None = OPERATOR, method: str = "POST") -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await treq.request(method, self.url + "/api/reload", headers=headers, persistent=False)
        return response.code, json.loads(await treq.content(response))


@pytest.fixture
def hub(tmp_path: Path, downstream: Any) -> Any:
    h = Hub(tmp_path, downstream)
    yield h
    pytest_twisted.blockon(h.service.stopService())


@pytest_twisted.ensureDeferred
async def test_reload_is_refused_without_a_token_and_with_a_read_only_one(hub: Hub) -> None:
    hub.write(domains=("example.com", "example.org"))
    for token in (None, "not-a-token", OPERATOR + "x"):
        code, body = await hub.reload(token)
        assert code == 401, (token, body)
    code, body = await hub.reload(VIEWER)
    assert code == 403
    assert "operator token" in body["error"]
    code, body = await hub.reload(method="GET")
    assert code == 405
    # Nothing was read: the new domain is still refused.
    assert list(hub.service.config.domains) == ["example.com"]
    assert hub.service.nodes["dallas"].config.route_for("example.org") is None


@pytest_twisted.ensureDeferred
async def test_reload_applies_a_changed_file_and_the_new_domain_is_accepted(hub: Hub, downstream: Any) -> None:
    code, _ = await send(hub.smtp_port, message("before"), recipients=["bob@example.org"])
    assert code == 550 or 500 <= code < 600
    hub.write(domains=("example.com", "example.org"))
    code, body = await hub.reload()
    assert code == 200, body
    assert body["ok"] is True and body["errors"] == []
    assert any(line.startswith("domain example.org added") for line in body["changes"]), body
    code, text = await send(hub.smtp_port, message("after"), recipients=["bob@example.org"])
    assert code == 250, text
    # Nothing changed since: a second reload says so.
    code, body = await hub.reload()
    assert (code, body["changes"], body["needs_restart"]) == (200, [], [])


@pytest_twisted.ensureDeferred
async def test_an_invalid_file_is_refused_with_422_and_the_running_configuration_stays(hub: Hub) -> None:
    hub.write(domains=("example.com", "example.org"), extra='[drills]\nevery = "often"\n[smtp]\nmax_recipints = 5\n')
    code, body = await hub.reload()
    assert code == 422, body
    assert body["ok"] is False
    assert "running configuration stays" in body["error"]
    assert any("drills.every" in line for line in body["errors"]), body
    assert any("smtp.max_recipints" in line and "max_recipients" in line for line in body["errors"]), body
    assert list(hub.service.config.domains) == ["example.com"]
    code, _ = await send(hub.smtp_port, message("still"), recipients=["bob@example.org"])
    assert code >= 500
    code, text = await send(hub.smtp_port, message("kept"), recipients=["alice@example.com"])
    assert code == 250, text


@pytest_twisted.ensureDeferred
async def test_the_openapi_document_describes_reload_and_drills(hub: Hub) -> None:
    response = await treq.get(hub.url + "/api/openapi.json", headers={"Authorization": f"Bearer {VIEWER}"},
                              persistent=False)
    document = json.loads(await treq.content(response))
    reload = document["paths"]["/api/reload"]["post"]
    assert {"200", "401", "403", "422"} <= set(reload["responses"])
    assert set(document["paths"]["/api/drills"]) == {"get", "post"}
    assert document["components"]["schemas"]["DrillRequest"]["required"] == ["domain"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "mailhub"), *args], capture_output=True, text=True, timeout=60)


@pytest_twisted.ensureDeferred
async def test_mailhub_reload_url_reports_changes_and_refusals(hub: Hub) -> None:
    hub.write(domains=("example.com", "example.org"))
    done = await deferToThread(_cli, "reload", "--url", hub.url, "--token-file", str(hub.operator_file))
    assert done.returncode == 0, done.stderr
    assert "changed: domain example.org added" in done.stdout
    hub.write(domains=("example.com", "example.org"), extra="[nonsense]\n")
    done = await deferToThread(_cli, "reload", "--url", hub.url, "--token-file", str(hub.operator_file), "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["ok"] is False
    assert "nonsense: unknown table" in done.stderr and "reload refused" in done.stderr
    # --node: the URL from the configuration, the operator token from [web] api_tokens_file.
    hub.write(domains=("example.com",))
    done = await deferToThread(_cli, "reload", "--config", str(hub.path), "--node", "dallas")
    assert done.returncode == 0, done.stderr
    assert "changed: domain example.org removed" in done.stdout
    done = await deferToThread(_cli, "reload", "--url", hub.url, "--token-file", str(hub.path.parent / "tokens"))
    assert done.returncode == 1
    assert "403" in done.stderr and "operator token" in done.stderr

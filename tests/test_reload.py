"""
``HubService.reload``: the configuration file read again into a hub that is
built (not listening), over the memory store.  What a reload applies
(domains, routes, pacing, recipient lists, ``[smtp]`` limits), what it keeps
until a restart, and a file with errors refused whole.  ``SIGHUP`` under a
real ``twistd`` is in ``test_lifecycle.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from mailhub.config import load
from mailhub.model import Address, Reply
from mailhub.service import HubService, ReloadResult, makeHubService

ROUTE = "smtp:127.0.0.1:2500"
OTHER = "smtp:127.0.0.1:2501"


def config_text(domains: str = "", smtp: str = "", delivery: str = "", node: str = "tcp:2525") -> str:
    return (
        '[hub]\nhostname = "mx.hub.example"\noutbound = "smtp:127.0.0.1:2500"\n'
        '[store]\nplugin = "memory"\n'
        f"[smtp]\nmax_recipients = 50\n{smtp}"
        f"[delivery]\nlease_seconds = 60\n{delivery}"
        f'[nodes.dallas]\nsmtp = "{node}:interface=127.0.0.1"\n'
        f'[domains."example.com"]\nroute = "{ROUTE}"\nmax_connections = 4\n'
        f"{domains}"
    )


def hub_from(tmp_path: Path, text: str) -> tuple[HubService, Path]:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    return makeHubService(load(str(path)), reactor), path


async def check(hub: HubService, address: str) -> Reply | None:
    result: Reply | None = await hub.nodes["dallas"].check_recipient(Address.parse(address))
    return result


@pytest_twisted.ensureDeferred
async def test_added_domain_and_changed_pacing_apply_at_once(tmp_path: Path) -> None:
    hub, path = hub_from(tmp_path, config_text())
    node = hub.nodes["dallas"]
    throttle = node.engine.throttle(ROUTE)
    assert throttle.maximum == 4
    assert (await check(hub, "bob@example.org")).code == 550  # type: ignore[union-attr]
    path.write_text(
        config_text(smtp="max_message_size = 1000\n").replace("max_connections = 4", "max_connections = 7\nmax_rate = 2")
        + f'[domains."example.org"]\nroute = "{OTHER}"\nrecipients = ["bob@example.org"]\n'
    )
    result = await hub.reload()
    assert result.ok and result.needs_restart == ()
    assert result.changes == (
        "smtp.max_message_size: 52428800 -> 1000",
        "domain example.com: max_connections 4 -> 7, max_rate (unset) -> 2",
        f"domain example.org added: route '{OTHER}', max_connections 10, recipients ['bob@example.org']",
    )
    assert await check(hub, "bob@example.org") is None
    assert (await check(hub, "carol@example.org")).code == 550  # type: ignore[union-attr]
    # The route's pacing: the same throttle (its state and counts), the new limits.
    assert node.engine.throttle(ROUTE) is throttle
    assert (throttle.maximum, throttle.rate) == (7, 2.0)  # the share: asked of the store (IRouteCoordination)
    assert node.smtp_factory.limits.max_message_size == 1000
    assert node.smtp_factory.limiter._limits.max_message_size == 1000
    assert hub.config.domains["example.org"].route == OTHER
    assert node.config is hub.config


@pytest_twisted.ensureDeferred
async def test_a_route_whose_options_changed_gets_a_new_transport(tmp_path: Path) -> None:
    hub, path = hub_from(tmp_path, config_text())
    node = hub.nodes["dallas"]
    before = node.transport_for(ROUTE)
    path.write_text(config_text().replace("max_connections = 4", "max_connections = 4\nconnect_timeout = 3"))
    result = await hub.reload()
    assert result.changes == ("domain example.com: connect_timeout (unset) -> 3",)
    after = node.transport_for(ROUTE)
    assert after is not before
    # No change: the same transport (its open connections) stays.
    assert (await hub.reload()).changes == ()
    assert node.transport_for(ROUTE) is after
    # Values as the file writes them (TOML), not as Python prints them.
    path.write_text(config_text().replace("max_connections = 4", 'max_connections = 4\nwarn_after = false\ntls = "required"'))
    changes = (await hub.reload()).changes
    assert changes == ('domain example.com: connect_timeout 3 -> (unset), warn_after (unset) -> false,'
                       ' tls (unset) -> "required"',), changes


@pytest_twisted.ensureDeferred
async def test_removed_domain_is_refused_from_then_on(tmp_path: Path) -> None:
    extra = f'[domains."example.org"]\nroute = "{OTHER}"\n'
    hub, path = hub_from(tmp_path, config_text(extra))
    assert await check(hub, "bob@example.org") is None
    path.write_text(config_text())
    result = await hub.reload()
    assert [line.split(":")[0] for line in result.changes] == ["domain example.org removed"]
    assert (await check(hub, "bob@example.org")).code == 550  # type: ignore[union-attr]
    assert await check(hub, "alice@example.com") is None


@pytest_twisted.ensureDeferred
async def test_what_needs_a_restart_keeps_its_running_value(tmp_path: Path) -> None:
    hub, path = hub_from(tmp_path, config_text())
    running = hub.config
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    path.write_text(
        config_text(
            smtp='tls_certificate = "cert.pem"\ntls_key = "key.pem"\n', delivery="heartbeat_seconds = 3\n",
            node="tcp:2600",
        ).replace('outbound = "smtp:127.0.0.1:2500"', 'outbound = "smtp:127.0.0.1:2502"')
        .replace('hostname = "mx.hub.example"', 'hostname = "mx2.hub.example"')
    )
    result = await hub.reload()
    assert result.ok
    assert set(result.needs_restart) == {
        "hub.hostname", "delivery.heartbeat_seconds", "nodes.dallas.smtp", "smtp.tls_certificate", "smtp.tls_key",
    }
    assert result.changes == ("hub.outbound: smtp:127.0.0.1:2500 -> smtp:127.0.0.1:2502",)
    config = hub.config
    assert config.outbound == "smtp:127.0.0.1:2502"
    assert (config.hostname, config.delivery, config.nodes) == (running.hostname, running.delivery, running.nodes)
    assert (config.smtp.tls_certificate, config.smtp.tls_key) == ("", "")


@pytest_twisted.ensureDeferred
async def test_a_file_with_errors_is_refused_whole(tmp_path: Path) -> None:
    hub, path = hub_from(tmp_path, config_text())
    running = hub.config
    path.write_text(
        config_text(f'[domains."example.org"]\nroute = "{OTHER}"\nmax_connections = "many"\n', smtp="max_recipent = 5\n")
    )
    result = await hub.reload()
    assert not result.ok and result.changes == ()
    assert result.errors == (
        f"{path}: smtp.max_recipent: unknown key (did you mean \"max_recipients\"?)",
        f'{path}: domains."example.org".max_connections: must be an integer, not str \'many\'',
    )
    assert hub.config is running and hub.nodes["dallas"].config is running
    assert (await check(hub, "bob@example.org")).code == 550  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_missing_recipients_file_refuses_the_reload(tmp_path: Path) -> None:
    hub, path = hub_from(tmp_path, config_text())
    running = hub.config
    path.write_text(config_text(f'[domains."example.org"]\nroute = "{OTHER}"\nrecipients_file = "gone.txt"\n'))
    result = await hub.reload()
    assert result.errors == (f'{path}: domains."example.org".recipients_file: no such file: {tmp_path}/gone.txt',)
    assert hub.config is running
    assert (await check(hub, "bob@example.org")).code == 550  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    hub, path = hub_from(tmp_path, config_text())
    path.unlink()
    result: ReloadResult = await hub.reload()
    assert result.errors == (f"{path}: (file): cannot read: No such file or directory",)
    json: dict[str, Any] = result.to_json()
    assert json == {"ok": False, "errors": list(result.errors), "changes": [], "needs_restart": []}

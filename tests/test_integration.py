"""
The hub as users run it: ``twistd -n mailhub`` in a subprocess, real sockets
on 127.0.0.1, a real SMTP client, and a real downstream SMTP server that the
test switches between accepting, deferring, rejecting, dropping and down.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread

from hubprocess import HubProcess, eventually, free_port, hub_config, message, send, sleep

pytestmark = pytest.mark.integration


class Running:
    def __init__(self, tmp_path, downstream, **config):
        self.ports = {"dallas": free_port(), "losangeles": free_port()}
        self.downstream = downstream
        text = hub_config(tmp_path / "spool.db", downstream.port, self.ports, **config)
        self.hub = HubProcess(tmp_path, text)

    async def start(self):
        self.hub.start()
        for port in self.ports.values():
            await self.hub.started(port)

    def subjects(self):
        return [m.message.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in self.downstream.messages]


@pytest.fixture
def running(tmp_path, downstream):
    hubs = []

    def make(**config):
        r = Running(tmp_path, downstream, **config)
        hubs.append(r)
        return r

    yield make
    for r in hubs:
        # A clean stop within the timeout is part of what is tested.
        pytest_twisted.blockon(ensureDeferred(r.hub.stop(signal.SIGTERM)))


@pytest_twisted.ensureDeferred
async def test_message_is_delivered_at_once_byte_for_byte(running, downstream):
    hub = running()
    await hub.start()
    data = message("immediate")
    code, _ = await send(hub.ports["dallas"], data)
    assert code == 250
    await eventually(lambda: len(downstream.messages) == 1, what="delivery")
    got = downstream.messages[0]
    assert got.sender == "someone@outside.example"
    assert got.recipients == ["alice@example.com"]
    # The hub adds its Received: line on top and changes nothing else.
    assert got.message.startswith(b"Received: from client.outside.example")
    assert got.message.endswith(data)
    assert b"\r\n..leading dot line\r\n" in got.raw
    assert await hub.hub.queue() == []


@pytest_twisted.ensureDeferred
async def test_relaying_for_other_domains_is_refused(running, downstream):
    hub = running()
    await hub.start()
    code, text = await send(hub.ports["losangeles"], message("relay"), recipients=["victim@elsewhere.example"])
    assert code == 550 and "5.7.1" in text
    code, text = await send(hub.ports["losangeles"], message("relay2"), recipients=["victim%elsewhere.example@example.com"])
    assert code == 550


@pytest_twisted.ensureDeferred
async def test_deferred_mail_is_spooled_retried_by_the_other_node_and_delivered(running, downstream):
    # retry_minutes = 0.1: each node retries every 6 s, the entry every 3 s.
    hub = running(retry_minutes=0.1)
    await hub.start()
    downstream.mode = "tempfail"
    code, _ = await send(hub.ports["dallas"], message("deferred"))
    assert code == 250
    entries = await eventually(hub.hub.queue, what="entry in the spool")
    entry_id = entries[0]["id"]

    async def two_attempts():
        shown = await hub.hub.show(entry_id)
        return shown if len(shown["attempt_log"]) >= 2 else None

    shown = await eventually(two_attempts, what="two attempts")
    nodes = [a["node"] for a in shown["attempt_log"]]
    assert nodes[:2] == ["dallas", "losangeles"]
    assert shown["attempt_log"][0]["replies"][0]["reply"].startswith("4")
    assert downstream.messages == []
    downstream.mode = "accept"
    await eventually(lambda: len(downstream.messages) == 1, what="delivery after recovery")
    assert hub.subjects() == ["deferred"]
    await eventually(lambda: _empty(hub), what="empty spool")


async def _empty(hub):
    return await hub.hub.queue() == []


@pytest_twisted.ensureDeferred
async def test_server_down_then_up_delivers_the_backlog(running, downstream):
    hub = running(retry_minutes=0.1)
    await hub.start()
    port = downstream.port
    await downstream.stop()
    for i in range(5):
        code, _ = await send(hub.ports["dallas" if i % 2 else "losangeles"], message(f"down-{i}"))
        assert code == 250
    entries = await eventually(hub.hub.queue, what="spooled entries")
    assert len(entries) == 5
    await downstream.start(port=port)
    await eventually(lambda: len(downstream.messages) == 5, what="backlog delivered")
    assert sorted(hub.subjects()) == [f"down-{i}" for i in range(5)]


@pytest_twisted.ensureDeferred
async def test_dropped_connection_defers(running, downstream):
    hub = running(retry_minutes=0.1)
    await hub.start()
    downstream.mode = "drop"
    code, _ = await send(hub.ports["dallas"], message("dropped"))
    assert code == 250
    entries = await eventually(hub.hub.queue, what="spooled entry")
    shown = await eventually(lambda: _with_attempt(hub, entries[0]["id"]), what="an attempt")
    assert shown["attempt_log"][0]["replies"][0]["reply"].startswith("4")
    downstream.mode = "accept"
    await eventually(lambda: len(downstream.messages) == 1, what="delivery")


async def _with_attempt(hub, entry_id):
    shown = await hub.hub.show(entry_id)
    return shown if shown["attempt_log"] else None


@pytest_twisted.ensureDeferred
async def test_rejected_recipient_bounces_a_dsn_to_the_sender(running, downstream):
    hub = running()
    await hub.start()
    # The organisation's server rejects alice; the DSN goes out through the
    # hub's outbound route (here the same test server) to the sender.
    downstream.recipient_replies = {"alice@example.com": "550 5.1.1 No such user"}
    code, _ = await send(hub.ports["dallas"], message("rejected"))
    assert code == 250
    dsn = await eventually(lambda: [m for m in downstream.messages if m.sender == ""], what="the DSN")
    assert dsn[0].recipients == ["someone@outside.example"]
    assert b"multipart/report" in dsn[0].message
    assert b"Final-Recipient: rfc822; alice@example.com" in dsn[0].message
    assert b"Status: 5.1.1" in dsn[0].message
    assert await hub.hub.queue() == []


@pytest_twisted.ensureDeferred
async def test_sigkill_under_load_loses_no_acknowledged_message(running, downstream, tmp_path):
    hub = running(retry_minutes=0.1)
    await hub.start()
    downstream.mode = "accept"
    downstream.delay = 0.02
    acknowledged: list[str] = []

    async def sender(worker: int):
        for i in range(1000):
            tag = f"load-{worker}-{i}"
            code, _ = await send(hub.ports["dallas" if worker % 2 else "losangeles"], message(tag))
            if code == 250:
                acknowledged.append(tag)
            elif code == 0:
                return

    senders = [ensureDeferred(sender(w)) for w in range(6)]
    await eventually(lambda: len(acknowledged) >= 60, what="some acknowledged messages")
    await hub.hub.stop(signal.SIGKILL)
    await gatherResults(senders)
    assert acknowledged
    hub.hub.start()
    for port in hub.ports.values():
        await hub.hub.started(port)

    def all_delivered():
        return set(acknowledged) <= set(hub.subjects())

    await eventually(all_delivered, timeout=60, what="every acknowledged message delivered")


@pytest_twisted.ensureDeferred
async def test_node_option_runs_one_node_of_the_configuration(tmp_path, downstream):
    ports = {"dallas": free_port(), "losangeles": free_port()}
    hub = HubProcess(tmp_path, hub_config(tmp_path / "spool.db", downstream.port, ports), node="dallas")
    hub.start()
    try:
        await hub.started(ports["dallas"])
        code, _ = await send(ports["dallas"], message("one-node"))
        assert code == 250
        code, text = await send(ports["losangeles"], message("nobody-there"))
        assert code == 0 and "refused" in text.lower()
        await eventually(lambda: len(downstream.messages) == 1, what="delivery by dallas")
    finally:
        await hub.stop()


@pytest_twisted.ensureDeferred
async def test_bad_configuration_stops_twistd_with_the_key_named(tmp_path, downstream):
    text = hub_config(tmp_path / "spool.db", downstream.port, {"dallas": free_port()})
    hub = HubProcess(tmp_path, text.replace("retry_minutes = 20", 'retry_minutes = "often"'))
    hub.start()
    code = await hub.stop(signal.SIGCONT, timeout=30)
    assert code != 0
    assert "policy.retry_minutes" in hub.log()


@pytest_twisted.ensureDeferred
async def test_embedding_example_runs_the_hub_inside_another_application(tmp_path, downstream):
    import subprocess

    from hubprocess import BIN

    ports = {"dallas": free_port(), "losangeles": free_port()}
    config = tmp_path / "hub.toml"
    config.write_text(hub_config(tmp_path / "spool.db", downstream.port, ports))
    web_port = free_port()
    tac = Path(__file__).parent.parent / "examples" / "embed.tac"
    env = {**os.environ, "MAILHUB_CONFIG": str(config), "APP_WEB": f"tcp:{web_port}:interface=127.0.0.1"}
    process = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(tmp_path / "app.log"),
                                "-y", str(tac)], cwd=tmp_path, env=env)
    try:
        hub = HubProcess(tmp_path, config.read_text(), name="unused")
        hub.process = process
        hub.log_path = tmp_path / "app.log"
        await hub.started(ports["losangeles"])
        code, _ = await send(ports["losangeles"], message("embedded"))
        assert code == 250
        await eventually(lambda: len(downstream.messages) == 1, what="delivery from the embedded hub")
    finally:
        process.terminate()
        while process.poll() is None:
            await sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_backlog_drains_paced_under_back_pressure_with_progress_visible(tmp_path, downstream):
    """
    An Exchange-like server that answers 452 4.3.1 above three concurrent
    connections: the backlog still drains by itself, the hub narrows its
    window, and ``mailhub status`` shows the progress per route.
    """
    ports = {"dallas": free_port()}
    web = free_port()
    text = hub_config(tmp_path / "spool.db", downstream.port, ports, retry_minutes=0.1)
    text = text.replace('smtp = "tcp:%d:interface=127.0.0.1"\n' % ports["dallas"],
                        'smtp = "tcp:%d:interface=127.0.0.1"\nweb = "tcp:%d:interface=127.0.0.1"\n' % (ports["dallas"], web))
    text = text.replace("max_connections = 4", "max_connections = 12\nbackpressure_pause = 1")
    hub = HubProcess(tmp_path, text)
    hub.start()
    try:
        await hub.started(ports["dallas"])
        await downstream.stop()
        sends = [ensureDeferred(send(ports["dallas"], message(f"backlog-{i}"))) for i in range(40)]
        codes = [code for code, _ in await gatherResults(sends)]
        assert codes == [250] * 40
        downstream.max_concurrent_connections = 3
        downstream.delay = 0.05
        await downstream.start(port=downstream.port)
        await eventually(lambda: len({m.message for m in downstream.messages}) == 40, timeout=90, what="backlog drained")
        out = await deferToThread(hub.cli, "status", "--json")
        status = json.loads(out.stdout)["dallas"]
        route = status["engine"]["routes"][f"smtp:127.0.0.1:{downstream.port}"]
        assert route["delivered"] >= 40
        assert route["window"] <= 12
        text_out = (await deferToThread(hub.cli, "status")).stdout
        assert "dallas:" in text_out and "delivered" in text_out
    finally:
        await hub.stop()

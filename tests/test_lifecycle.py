"""
A node's life as an operator sees it, with real ``twistd mailhub``
processes: the version, start-up failures (one line on stderr naming the
node and the key, exit status 1, no traceback), the start line, JSON logs,
a clean stop (``stopped``) against a kill (``DOWN``), and ``SIGHUP``
reloading the configuration file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from hubprocess import (
    BIN,
    HubProcess,
    eventually,
    free_port,
    hub_config,
    message,
    send,
    sleep,
)
from mailhub import __version__
from mailhub.testing.downstream import DownstreamServer

pytestmark = [pytest.mark.integration]

HEARTBEAT = 1.0
DELIVERY = f"[delivery]\nlease_seconds = 30\ntakeover_seconds = 5\nmax_scan_interval = 1\nheartbeat_seconds = {HEARTBEAT}\n"


def start_failure(tmp_path: Path, config: str, *extra: str) -> tuple[int, list[str], str]:
    """Run ``twistd -n mailhub`` that must fail: (exit status, stderr's lines, the log)."""
    path = tmp_path / "hub.toml"
    path.write_text(config)
    log = tmp_path / "hub.log"
    done = subprocess.run(
        [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(log), "mailhub", "--config", str(path), *extra],
        cwd="/", capture_output=True, text=True, timeout=60,
    )
    return done.returncode, done.stderr.splitlines(), log.read_text() if log.exists() else ""


def assert_one_line(status: int, lines: list[str], *words: str) -> str:
    assert status == 1, lines
    assert len(lines) == 1, lines
    [line] = lines
    assert line.startswith("mailhub: node dallas: "), line
    for word in words:
        assert word in line, (word, line)
    assert "Traceback" not in line
    return line


# -- --version ---------------------------------------------------------------


def test_version_from_both_commands() -> None:
    for command in ([str(BIN / "mailhub"), "--version"], [str(BIN / "twistd"), "mailhub", "--version"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/")
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"mailhub {__version__}\n", command


# -- start-up failures ---------------------------------------------------------


def test_port_in_use_is_one_line_and_status_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = hub_config(tmp_path / "spool.db", free_port(), {"dallas": port})
        status, lines, log = start_failure(tmp_path, config)
    line = assert_one_line(status, lines, "nodes.dallas.smtp", f"tcp:{port}:interface=127.0.0.1", "Address already in use")
    assert line.split("mailhub: ", 1)[1] in log  # the log says it too
    assert "Traceback" not in log


def test_unreachable_redis_is_one_line_and_status_1(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    store = f'[store]\nplugin = "redis"\nhost = "127.0.0.1"\nport = {closed}\ncommand_timeout = 1\nreconnect_max_delay = 0.5\n'
    config = hub_config(tmp_path / "unused.db", free_port(), {"dallas": free_port()}, store=store)
    started = time.monotonic()
    status, lines, log = start_failure(tmp_path, config)
    assert time.monotonic() - started < 30
    assert_one_line(status, lines, "store.host", f"cannot reach the spool store (redis 127.0.0.1:{closed})")
    assert "Traceback" not in log


def test_bad_certificate_is_one_line_and_status_1(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    extra = '[smtp]\ntls_certificate = "cert.pem"\ntls_key = "key.pem"\n'
    config = hub_config(tmp_path / "spool.db", free_port(), {"dallas": free_port()}, extra=extra)
    status, lines, _ = start_failure(tmp_path, config)
    assert_one_line(status, lines, "smtp.tls_certificate", str(tmp_path / "cert.pem"), "not a PEM certificate")


def test_configuration_error_is_one_line_per_error_and_status_1(tmp_path: Path) -> None:
    config = hub_config(tmp_path / "spool.db", free_port(), {"dallas": free_port()}, extra="[smtp]\nmax_recipents = 5\n")
    status, lines, _ = start_failure(tmp_path, config)
    assert status == 1
    # The file cannot be read into nodes: the line names the file and the key.
    assert lines == [
        f'mailhub: {tmp_path / "hub.toml"}: smtp.max_recipents: unknown key (did you mean "max_recipients"?)'
    ]


def test_unknown_log_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "hub.toml").write_text(hub_config(tmp_path / "spool.db", free_port(), {"dallas": free_port()}))
    done = subprocess.run(
        [str(BIN / "twistd"), "-n", "--pidfile=", "mailhub", "--config", str(tmp_path / "hub.toml"),
         "--log-format", "xml"], capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    # twistd prints the usage, then the error, on standard output.
    assert done.stdout.splitlines()[-1].endswith(": --log-format must be text or json, not 'xml'"), done.stdout


# -- stopping ------------------------------------------------------------------


def with_web(config: str, port: int) -> str:
    """``config`` with a web listener for the node listening for SMTP on ``port``: ``web = "tcp:..."``."""
    smtp = f'smtp = "tcp:{port}:interface=127.0.0.1"\n'
    return config.replace(smtp, f'{smtp}web = "tcp:{free_port()}:interface=127.0.0.1"\n')


def node_state(hub: HubProcess, name: str = "dallas") -> str:
    out = hub.cli("nodes", "--json")
    assert out.returncode == 0, out.stderr
    return str({r["name"]: r for r in json.loads(out.stdout)}[name]["state"])


@pytest_twisted.ensureDeferred
async def test_clean_stop_shows_stopped_and_a_kill_shows_down(tmp_path: Path) -> None:
    port = free_port()
    hub = HubProcess(tmp_path, with_web(hub_config(tmp_path / "spool.db", free_port(), {"dallas": port}, delivery=DELIVERY), port))
    hub.start()
    try:
        await hub.started(port)
        assert await deferToThread(node_state, hub) == "up"
        assert await hub.stop(signal.SIGTERM) == -signal.SIGTERM  # by its signal, after a clean shutdown
        # Stopped, and still stopped long after the heartbeat window.
        assert await deferToThread(node_state, hub) == "stopped"
        status = await deferToThread(hub.cli, "status")
        assert status.returncode == 1  # the node does not answer...
        assert status.stdout.startswith("dallas: stopped at "), status.stdout  # ...because it was stopped
        await sleep(4 * HEARTBEAT)
        assert await deferToThread(node_state, hub) == "stopped"
        text = await deferToThread(hub.cli, "nodes")
        assert text.stdout.splitlines()[1].split()[:2] == ["dallas", "stopped"]

        hub.start()
        await hub.started(port)
        assert await deferToThread(node_state, hub) == "up"  # a restart is up again
        await hub.stop(signal.SIGKILL)
        await eventually(lambda: deferToThread(node_state, hub).addCallback(lambda s: s == "DOWN"),
                         timeout=10, what="dallas DOWN after the kill")
    finally:
        await hub.stop(signal.SIGKILL)


# -- the start line and JSON logs ----------------------------------------------


class JsonHub(HubProcess):
    def command(self) -> list[str]:
        return [*super().command(), "--log-format", "json"]


def json_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest_twisted.ensureDeferred
async def test_json_log_has_the_start_line_and_entry_ids(tmp_path: Path, downstream: DownstreamServer) -> None:
    port = free_port()
    extra = '[archive]\nplugin = "sqlite"\npath = "archive.db"\n'
    config = with_web(hub_config(tmp_path / "spool.db", downstream.port, {"dallas": port}, extra=extra), port)
    web = config.split('web = "', 1)[1].split('"', 1)[0]
    hub = JsonHub(tmp_path, config)
    hub.start()
    try:
        await hub.started(port)
        code, reply = await send(port, message("json-1"))
        assert code == 250, reply
        entry = reply.rsplit(" ", 1)[1]
        await downstream.wait_for(1)

        def delivered() -> list[dict[str, Any]]:
            return [e for e in json_events(hub.log_path) if e.get("entry") == entry and "delivered" in e["text"]]

        [event] = await eventually(delivered, what="the delivery's JSON line")
    finally:
        await hub.stop()
    events = json_events(hub.log_path)  # every line is JSON
    assert event["route"] == f"smtp:127.0.0.1:{downstream.port}"
    assert event["level"] == "info" and event["log_namespace"] == "mailhub.delivery.engine.DeliveryEngine"
    [start] = [e for e in events if e["text"].startswith("node dallas started:")]
    assert start["text"] == (
        f"node dallas started: SMTP tcp:{port}:interface=127.0.0.1 (STARTTLS, certificate"
        f" {tmp_path}/tls/cert.pem, self-signed); web {web} (no TLS);"
        f" spool sqlite {tmp_path}/spool.db; archive sqlite {tmp_path}/archive.db; domains example.com"
    )
    assert not [e for e in events if "Starting factory" in e["text"] or "Stopping factory" in e["text"]]


# -- SIGHUP ----------------------------------------------------------------------


def log_lines(hub: HubProcess, marker: str) -> list[str]:
    return [line for line in hub.log_path.read_text().splitlines() if marker in line]


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_domains_and_refuses_an_invalid_file(tmp_path: Path, downstream: DownstreamServer) -> None:
    port = free_port()
    text = hub_config(tmp_path / "spool.db", downstream.port, {"dallas": port})
    hub = HubProcess(tmp_path, text)
    hub.start()
    try:
        await hub.started(port)
        code, _ = await send(port, message("before"), recipients=["bob@example.org"])
        assert code == 550  # not a domain of the hub yet

        added = (
            f'[domains."example.org"]\nroute = "smtp:127.0.0.1:{downstream.port}"\nmax_connections = 2\n'
            'recipients = ["bob@example.org"]\n'
        )
        moved = text.replace(f"tcp:{port}:", f"tcp:{free_port()}:")  # an endpoint: needs a restart
        hub.config_path.write_text(moved.replace("max_connections = 4", "max_connections = 6") + added)
        assert hub.process is not None
        hub.process.send_signal(signal.SIGHUP)
        await eventually(lambda: log_lines(hub, "configuration reloaded: domain example.org added"),
                         what="the reload's log line")
        assert hub.process.poll() is None  # SIGHUP no longer ends the node
        assert log_lines(hub, "configuration reloaded: domain example.com: max_connections 4 -> 6")
        [restart] = log_lines(hub, "needs a restart")
        assert "nodes.dallas.smtp changed" in restart
        code, reply = await send(port, message("after"), recipients=["bob@example.org"])
        assert code == 250, reply
        [received] = await downstream.wait_for(1)
        assert received.recipients == ["bob@example.org"]
        # The new domain's recipient list is in force.
        code, _ = await send(port, message("stranger"), recipients=["nobody@example.org"])
        assert code == 550

        # An invalid file: refused, one line per error, the running configuration stays.
        hub.config_path.write_text(
            moved + added.replace("max_connections = 2", 'max_connections = "many"') + "[smtp]\nmax_recipent = 5\n"
        )
        hub.process.send_signal(signal.SIGHUP)
        await eventually(lambda: log_lines(hub, "the running configuration stays"), what="the refusal")
        errors = log_lines(hub, "configuration not reloaded: ")
        assert len(errors) == 3, errors  # each error, then what it means
        assert "has 2 error(s); the running configuration stays" in errors[-1]
        assert any('domains."example.org".max_connections' in e for e in errors)
        assert any('smtp.max_recipent: unknown key (did you mean "max_recipients"?)' in e for e in errors)
        code, reply = await send(port, message("still"), recipients=["bob@example.org"])
        assert code == 250, reply
        assert hub.process.poll() is None
    finally:
        await hub.stop()
    log = hub.log_path.read_text()
    assert "Traceback" not in log
    assert "Starting factory" not in log


# -- the systemd unit ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_unit_exec_start_runs_a_node_and_reloads(tmp_path: Path) -> None:
    """The unit's ExecStart and ExecReload lines, as systemd would run them (venv and config paths swapped)."""
    unit = read_unit()
    port = free_port()
    config = tmp_path / "hub.toml"
    config.write_text(hub_config(tmp_path / "spool.db", free_port(), {"dallas": port}))
    variables = dict(kv.split("=", 1) for kv in unit["Environment"].split())
    assert variables["MAILHUB_CONFIG"] == "/etc/mailhub/hub.toml"
    variables["MAILHUB_CONFIG"] = str(config)
    command = exec_line(unit["ExecStart"], "dallas", variables)
    assert command[0] == "/opt/mailhub/.venv/bin/twistd"
    command[0] = str(BIN / "twistd")
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await eventually(lambda: process.poll() is not None or deferToThread(answers, port), what="the node")
        assert process.poll() is None
        reload_line = exec_line(unit["ExecReload"], "dallas", {**variables, "MAINPID": str(process.pid)})
        done = await deferToThread(subprocess.run, reload_line, timeout=30)
        assert done.returncode == 0
        await sleep(1.0)
        assert process.poll() is None
        assert unit["KillSignal"] == "SIGTERM"
        process.send_signal(signal.SIGTERM)
        status = await deferToThread(process.wait, float(unit["TimeoutStopSec"]))
        # twistd ends by the signal it stopped on, after its clean shutdown:
        # systemd counts a SIGTERM death as a clean exit.
        assert status == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.stdout is not None
    log = process.stdout.read().decode()  # --logfile=-: the journal
    assert "node dallas started: SMTP" in log
    assert f"configuration reloaded: {config}: no changes" in log
    assert "node dallas stopped" in log


UNIT = Path(__file__).parent.parent / "examples" / "systemd" / "mailhub@.service"
README = Path(__file__).parent.parent / "README.md"


def read_unit() -> dict[str, str]:
    """The unit's keys (the last value of each), its comments left out."""
    keys: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            keys[key.strip()] = value.strip()
    return keys


def exec_line(line: str, instance: str, variables: dict[str, str]) -> list[str]:
    """An Exec line's words as systemd makes them: ``%i`` and ``${VAR}``/``$VAR`` replaced."""
    def variable(match: re.Match[str]) -> str:
        return variables[match.group(1) or match.group(2)]

    return [re.sub(r"\$\{(\w+)\}|\$(\w+)", variable, word.replace("%i", instance)) for word in line.split()]


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(4).startswith(b"220")
    except OSError:
        return False


def install_steps() -> list[str]:
    """The shell lines of the README's "Install as a service" section."""
    text = README.read_text()
    section = text.split("\n## Install as a service\n", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in section.split("```sh\n")[1:]:
        lines += [line for line in block.split("```", 1)[0].splitlines() if line and not line.startswith("#")]
    return lines


def test_the_unit_uses_what_the_readme_creates() -> None:
    unit = read_unit()
    steps = install_steps()
    script = "\n".join(steps)
    assert "useradd --system" in script and unit["User"] == unit["Group"] == "mailhub"
    assert any(s.startswith("useradd --system") and s.split()[-1] == unit["User"] for s in steps)
    # The state directory (spool, archive, generated certificate) exists, is the user's, and is writable.
    state = unit["WorkingDirectory"]
    assert state in unit["ReadWritePaths"].split()
    assert f"install -d -o {unit['User']} -g {unit['Group']} -m 750 {state}" in script
    config_path = unit["Environment"].split("=", 1)[1]
    assert f"install -d -m 750 -g {unit['Group']} {os.path.dirname(config_path)}" in script
    assert f" {config_path}" in script  # the configuration is put where the unit reads it
    venv = unit["ExecStart"].split()[0].rsplit("/bin/", 1)[0]
    assert f"python3 -m venv {venv}" in script
    assert f"{venv}/bin/pip install ." in script
    assert "cp examples/systemd/mailhub@.service /etc/systemd/system/" in script
    assert not any(s.startswith("sudo ") for s in steps)  # the reader is root
    documentation = unit["Documentation"].removeprefix("file://")
    assert f" {documentation}" in script


def test_the_install_configuration_keeps_its_state_in_the_state_directory() -> None:
    """examples/systemd/hub.toml, put at the unit's path: spool, archive, certificate, session key are writable."""
    from mailhub.archive.accounts import secret_file
    from mailhub.config import parse
    from mailhub.smtp.tls import tls_files

    unit = read_unit()
    config = parse((UNIT.parent / "hub.toml").read_bytes(), unit["Environment"].split("=", 1)[1])
    writable = unit["ReadWritePaths"].split()

    def inside(path: str) -> bool:
        return any(os.path.commonpath([path, w]) == w for w in writable)

    cert, key, configured = tls_files(config)
    assert not configured and inside(cert) and inside(key)
    assert inside(secret_file(config))
    assert inside(os.path.join(config.config_dir, config.store["path"]))
    assert config.archive is not None and inside(os.path.join(config.config_dir, config.archive["path"]))
    assert list(config.nodes) == ["dallas"]  # the instance name the README starts


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # The unit as installed, with the venv's twistd where the README puts it
    # (verify checks that the command exists).
    unit = UNIT.read_text().replace("/opt/mailhub/.venv/bin/twistd", str(BIN / "twistd"))
    path = tmp_path / "mailhub@dallas.service"
    path.write_text(unit)
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "mailhub@dallas.service" not in done.stderr, done.stderr  # no warning about the unit itself

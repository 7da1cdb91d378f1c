"""
Run the hub as users do, for integration tests: ``twistd -n mailhub --config
FILE`` in a subprocess, on free ports of 127.0.0.1, with a real SMTP client.
"""

from __future__ import annotations

import inspect
import json
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hub_config(
    spool: Path,
    downstream_port: int,
    nodes: dict[str, int],
    retry_minutes: float = 20,
    lifetime_days: float = 7,
    extra: str = "",
    store: str | None = None,
    delivery: str | None = None,
) -> str:
    node_tables = "".join(f'[nodes.{name}]\nsmtp = "tcp:{port}:interface=127.0.0.1"\n' for name, port in nodes.items())
    default_delivery = "[delivery]\nlease_seconds = 30\ntakeover_seconds = 5\nmax_scan_interval = 1\n"
    store_table = store or f'[store]\nplugin = "sqlite"\npath = "{spool}"\n'
    return (
        '[hub]\nhostname = "mx.hub.example"\n'
        f'outbound = "smtp:127.0.0.1:{downstream_port}"\n'
        f"{store_table}"
        f'[policy]\nplugin = "standard"\nretry_minutes = {retry_minutes}\nlifetime_days = {lifetime_days}\njitter = 0\n'
        f"{delivery or default_delivery}"
        f"{node_tables}"
        f'[domains."example.com"]\nroute = "smtp:127.0.0.1:{downstream_port}"\nmax_connections = 4\n'
        f"{extra}"
    )


class HubProcess:
    """One ``twistd mailhub`` process."""

    def __init__(self, directory: Path, config: str, node: str | None = None, name: str = "hub") -> None:
        self.directory = directory
        self.config_path = directory / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = directory / f"{name}.log"
        self.node = node
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(self.log_path),
               "mailhub", "--config", str(self.config_path)]
        if self.node:
            cmd += ["--node", self.node]
        return cmd

    def start(self) -> None:
        # Started from an unrelated directory: twistd must find the plugin anywhere.
        self.process = subprocess.Popen(self.command(), cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def started(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"hub exited with {self.process.returncode}: {self.log()}")
            if await deferToThread(_answers, port):
                return
            await sleep(0.1)
        raise AssertionError(f"hub did not listen on {port} in {timeout} s: {self.log()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the hub and wait (blocking) for it to exit."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """
        Signal the hub and wait for it to exit while the reactor keeps running
        (the downstream server the hub may be talking to runs on it).
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"hub did not exit within {timeout} s of signal {sig}")
            await sleep(0.05)
        return self.process.returncode

    def log(self) -> str:
        text = self.log_path.read_text() if self.log_path.exists() else ""
        err = b""
        if self.process and self.process.poll() is not None and self.process.stderr:
            err = self.process.stderr.read()
        return text[-6000:] + err.decode(errors="replace")[-3000:]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return mailhub_cli(self.config_path, *args)

    async def queue(self) -> list[dict[str, Any]]:
        out = await deferToThread(self.cli, "queue", "list", "--json")
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout))

    async def show(self, entry_id: str) -> dict[str, Any]:
        out = await deferToThread(self.cli, "queue", "show", entry_id, "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))


def mailhub_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``mailhub COMMAND --config FILE ARGS...`` with the venv's entry point (blocking)."""
    return subprocess.run([str(BIN / "mailhub"), *args[:1], "--config", str(config), *args[1:]],
                          capture_output=True, text=True, timeout=60)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(4).startswith(b"220")
    except OSError:
        return False


def sleep(seconds: float) -> Any:
    return deferLater(reactor, seconds, lambda: None)


def message(tag: str, sender: str = "someone@outside.example", to: str = "alice@example.com") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {tag}\r\nMessage-ID: <{tag}@outside.example>\r\n\r\n"
        f"Body of {tag}.\r\n.leading dot line\r\n"
    ).encode()


def send_blocking(port: int, sender: str, recipients: list[str], data: bytes) -> tuple[int, str]:
    """Send one message with smtplib; returns the reply to DATA (or the error's)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.outside.example")
            client.mail(sender)
            for r in recipients:
                code, text = client.rcpt(r)
                if code >= 400:
                    return code, text.decode(errors="replace")
            code, text = client.data(data)
            return code, text.decode(errors="replace")
    except smtplib.SMTPResponseException as e:
        return e.smtp_code, e.smtp_error.decode(errors="replace")
    except (OSError, smtplib.SMTPException) as e:
        return 0, str(e)


async def send(port: int, data: bytes, sender: str = "someone@outside.example",
               recipients: list[str] | None = None) -> tuple[int, str]:
    return await deferToThread(send_blocking, port, sender, recipients or ["alice@example.com"], data)


async def eventually(check: Any, timeout: float = 30.0, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll ``check`` (a function, possibly async) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(interval)

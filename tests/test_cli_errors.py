"""
The ``mailhub`` command when what it talks to is not there: one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hubprocess import free_port, hub_config, mailhub_cli


@pytest.mark.parametrize("command", [("nodes",), ("route", "list"), ("queue", "count")])
def test_a_redis_that_does_not_answer_is_one_line(tmp_path: Path, command: tuple[str, ...]) -> None:
    # Nothing listens on the port: what an operator sees when Redis is down.
    store = f'[store]\nplugin = "redis"\nhost = "127.0.0.1"\nport = {free_port()}\ncommand_timeout = 1\n'
    path = tmp_path / "hub.toml"
    path.write_text(hub_config(tmp_path / "spool.db", free_port(), {"dallas": free_port()}, store=store))
    out = mailhub_cli(path, *command)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("mailhub: spool store unavailable: redis:"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_reload_of_a_broken_file_is_refused_as_the_node_would(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    text = hub_config(tmp_path / "spool.db", free_port(), {"dallas": free_port()})
    path.write_text(text.replace("max_connections = 4", 'max_connections = "lots"') + '[smtp]\nmax_recipents = 5\n')
    out = mailhub_cli(path, "reload", "--node", "dallas")
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "mailhub: reload refused: the hub keeps running its configuration"
    assert any("max_connections: must be an integer" in line for line in lines[1:])
    assert any("max_recipents" in line for line in lines[1:])
    assert "Traceback" not in out.stderr

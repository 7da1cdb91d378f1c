"""mailhub.memory: glibc's malloc tuned by ``twistd mailhub``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailhub import memory


class FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_sets_the_mmap_and_trim_thresholds() -> None:
    libc = FakeLibc()
    assert memory.keep_freed_memory(libc) is True
    assert libc.calls == [
        (memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD),
        (memory.M_TRIM_THRESHOLD, memory.TRIM_THRESHOLD),
    ]
    # A 100 KB message's buffers, and a few MB ones, stay on the heap.
    assert memory.MMAP_THRESHOLD >= 1024 * 1024
    assert memory.TRIM_THRESHOLD > memory.MMAP_THRESHOLD


def test_a_refusing_mallopt_is_reported() -> None:
    assert memory.keep_freed_memory(FakeLibc(answer=0)) is False


def test_no_mallopt_changes_nothing() -> None:
    assert memory.keep_freed_memory(object()) is False


def test_glibc_takes_the_settings() -> None:
    # Debian's glibc, as the hub runs on it; in a child process, as the
    # thresholds are process-wide.
    code = (
        "from mailhub.memory import keep_freed_memory;"
        "import sys; sys.exit(0 if keep_freed_memory() else 1)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_operators_settings_win() -> None:
    for name in memory.OPERATOR_SETTINGS:
        libc = FakeLibc()
        assert memory.keep_freed_memory(libc, environ={name: "131072"}) is False
        assert libc.calls == []


def test_twistd_mailhub_keeps_freed_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``twistd mailhub``'s makeService sets the thresholds; an embedded hub does not."""
    from mailhub import tap

    called: list[bool] = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: called.append(True) or True)
    installed: list[object] = []
    monkeypatch.setattr("mailhub.service.install_wake_signal", lambda hub, reactor: installed.append(hub))
    config = tmp_path / "hub.toml"
    config.write_text(
        '[hub]\nhostname = "mx.test"\n'
        '[store]\nplugin = "memory"\n'
        '[domains."example.com"]\nroute = "smtp:127.0.0.1:2525"\n'
        '[nodes.dallas]\nsmtp = "tcp:0:interface=127.0.0.1"\n'
    )
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    hub = tap.makeService(options)
    assert called == [True]
    assert installed == [hub]

    from mailhub.config import load
    from mailhub.service import makeHubService

    called.clear()
    makeHubService(load(str(config)))
    assert called == []

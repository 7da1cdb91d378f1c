"""mailhub.memory: glibc's malloc tuned by ``twistd mailhub``."""

from __future__ import annotations

import subprocess
import sys

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

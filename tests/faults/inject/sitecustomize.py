"""
An injected "disk full", for the disk-full faults where the suite cannot
mount a small ``tmpfs`` (no privilege to mount).

Python imports ``sitecustomize`` at start-up from the first directory of
``sys.path`` that has one: a hub started with this directory first on
``PYTHONPATH`` and with ``MAILHUB_FAULT_FULL_FLAG`` (a file's path) and
``MAILHUB_FAULT_FULL_UNDER`` (a directory) in its environment, and every
Python process it starts (the archive's worker), behaves as if the
filesystem under that directory were full while the flag file exists:

- SQLite databases opened under the directory fail every statement that
  writes (``INSERT``, ``UPDATE``, ``REPLACE``, ``DELETE``) with SQLite's
  ``SQLITE_FULL`` ("database or disk is full"), as SQLite itself does when
  a write needs a page the disk cannot give;
- ``os.pwrite`` to a file under it (the sqlite store's body log) fails with
  ``ENOSPC``.

Nothing else changes; without the two variables this module does nothing.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
from typing import Any

_FLAG = os.environ.get("MAILHUB_FAULT_FULL_FLAG")
_UNDER = os.environ.get("MAILHUB_FAULT_FULL_UNDER")
_WRITES = re.compile(r"\s*(?:WITH\b.*?\)\s*)?(INSERT|UPDATE|REPLACE|DELETE)\b", re.IGNORECASE | re.DOTALL)


def _full() -> bool:
    return _FLAG is not None and os.path.exists(_FLAG)


def _disk_full_error() -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    error.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
    return error


class _FullableConnection(sqlite3.Connection):
    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if _full() and _WRITES.match(sql):
            raise _disk_full_error()
        return super().execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if _full() and _WRITES.match(sql):
            raise _disk_full_error()
        return super().executemany(sql, *args)

    def executescript(self, script: str) -> sqlite3.Cursor:
        if _full() and any(_WRITES.match(s) for s in script.split(";")):
            raise _disk_full_error()
        return super().executescript(script)


if _FLAG and _UNDER:
    _under = os.path.realpath(_UNDER)
    _connect = sqlite3.connect
    _pwrite = os.pwrite

    def _connect_fullable(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        path = os.path.realpath(os.fspath(database)) if not str(database).startswith("file:") else ""
        if path.startswith(_under + os.sep) and "factory" not in kwargs:
            kwargs["factory"] = _FullableConnection
        return _connect(database, *args, **kwargs)

    def _pwrite_fullable(fd: int, data: Any, offset: int) -> int:
        if _full():
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.startswith(_under + os.sep):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _pwrite(fd, data, offset)

    sqlite3.connect = _connect_fullable  # type: ignore[assignment]
    os.pwrite = _pwrite_fullable

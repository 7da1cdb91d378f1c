"""Kept for old imports and for the entry points of installs made before
the ``sqlite`` archive became the package ``mailhub.plugins.sqlite.archive``:
use that."""

from mailhub.plugins.sqlite.archive import (
    SCHEMA_VERSION,
    SqliteArchive,
    SqliteArchivePlugin,
    plugin,
)

__all__ = ["SCHEMA_VERSION", "SqliteArchive", "SqliteArchivePlugin", "plugin"]

"""Kept for old imports and for the entry points of installs made before
the ``postgresql`` archive became the package ``mailhub.plugins.postgresql``:
use that."""

from mailhub.plugins.postgresql import (
    SCHEMA_VERSION,
    PostgresArchive,
    PostgresArchivePlugin,
    plugin,
)

__all__ = ["SCHEMA_VERSION", "PostgresArchive", "PostgresArchivePlugin", "plugin"]

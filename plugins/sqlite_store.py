"""Kept for old imports and for the entry points of installs made before
the ``sqlite`` store became the package ``mailhub.plugins.sqlite``: use that."""

from mailhub.plugins.sqlite import SqliteSpoolStore, SqliteStorePlugin, plugin

__all__ = ["SqliteSpoolStore", "SqliteStorePlugin", "plugin"]

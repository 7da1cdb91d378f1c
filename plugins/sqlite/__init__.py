"""
The ``sqlite`` spool store plugin: the embedded default, for nodes on one
host.  See ``store`` (the store, its ``[store]`` table and its queries),
``workers`` (the writer thread and group commit, the reader, the
checkpointer), ``bodylog`` (large bodies in segment files) and ``schema``
(tables, schema version and migrations).
"""

from .store import SqliteSpoolStore, SqliteStorePlugin, plugin

__all__ = ["SqliteSpoolStore", "SqliteStorePlugin", "plugin"]

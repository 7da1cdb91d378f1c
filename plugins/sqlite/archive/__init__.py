"""
The ``sqlite`` archive plugin: the embedded default, for hubs on one host.
See ``archive`` (the ``IArchive`` implementation, its jobs, the plugin and
its ``[archive]`` table), ``writer`` (the writer thread and group commit,
the reader), ``schema`` (tables, FTS5, schema version and migrations),
``search`` (the SQL of searches and the chunked walk of a full-text search)
and ``rows`` (how values are kept in rows).
"""

from .archive import SCHEMA_VERSION, SqliteArchive, SqliteArchivePlugin, plugin

__all__ = ["SCHEMA_VERSION", "SqliteArchive", "SqliteArchivePlugin", "plugin"]

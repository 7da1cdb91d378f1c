"""
The ``postgresql`` archive plugin: one PostgreSQL database that the nodes of
every site read and write.  See ``archive`` (the archive and the plugin),
``connection`` (its thread pool and psycopg connections), ``schema`` (tables,
schema version and migrations), ``search`` (text search: vectors, queries,
pages of matches), ``values`` (how values are kept in columns) and
``settings`` (the ``[archive]`` table).
"""

from .archive import PostgresArchive, PostgresArchivePlugin, plugin
from .schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "PostgresArchive", "PostgresArchivePlugin", "plugin"]

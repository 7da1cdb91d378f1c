"""
The in-memory plugins, for tests and trials: a spool store (``store``,
entry point ``mailhub.stores``: ``memory``) and an archive (``archive``,
``mailhub.archives``: ``memory``).  Nothing survives the process.
"""

from mailhub.plugins.memory.archive import MemoryArchive
from mailhub.plugins.memory.store import MemorySpoolStore

__all__ = ["MemoryArchive", "MemorySpoolStore"]

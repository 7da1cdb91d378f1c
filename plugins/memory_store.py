"""Kept for old imports and for the entry points of installs made before
the ``memory`` plugins became the package ``mailhub.plugins.memory``: use that."""

from mailhub.plugins.memory.store import MemorySpoolStore, plugin

__all__ = ["MemorySpoolStore", "plugin"]

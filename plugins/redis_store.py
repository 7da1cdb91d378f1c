"""Kept for old imports and for the entry points of installs made before
the ``redis`` store became the package ``mailhub.plugins.redis``: use that."""

from mailhub.plugins.redis import RedisSpoolStore, RedisStorePlugin, plugin

__all__ = ["RedisSpoolStore", "RedisStorePlugin", "plugin"]

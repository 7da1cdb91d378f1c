"""
The ``redis`` spool store plugin: one spool shared by nodes on several
hosts; see ``store`` (the store and its ``[store]`` table), ``scripts``
(the Lua scripts, in the ``.lua`` files beside it), ``connection``
(txredisapi, imported only when a store is made) and ``settings``.
"""

from .store import RedisSpoolStore, RedisStorePlugin, plugin

__all__ = ["RedisSpoolStore", "RedisStorePlugin", "plugin"]

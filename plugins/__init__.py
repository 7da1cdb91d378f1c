"""The built-in plugins, installed as the package ``mailhub.plugins``.

Each plugin is found through package entry points, exactly as a third party's
would be, and imports only ``mailhub.interfaces``, ``mailhub.model`` and the
helpers the core offers for plugin authors (``mailhub.smtp.client``, ...).  The
larger ones are packages split by responsibility (``smtp``, ``lmtp``, ``http``,
``sqlite``, ``redis``); the archives, the memory store and the standard policy
are single modules.  ``smtp_transport``, ``sqlite_store`` and ``redis_store``
only re-export their package, for old imports and for the entry points of
installs made before the split.
"""

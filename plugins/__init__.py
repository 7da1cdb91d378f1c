"""The built-in plugins, installed as the package ``mailhub.plugins``.

Each module is a dropin found through package entry points, exactly as a third
party's would be: they import only ``mailhub.interfaces``, ``mailhub.model`` and
the helpers the core offers for plugin authors.
"""

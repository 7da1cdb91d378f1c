"""
Find a plugin by name.

The core never imports a module of ``mailhub.plugins``: it asks for the name
the configuration gives, in one of the entry-point groups below.  Built-in
plugins are declared in ``setup.cfg`` exactly as a third party declares its own.

A plugin checks its own settings, at ``mailhub check-config`` and at start,
before the hub accepts a message (``mailhub.config`` asks it, through
``check_plugin_config``).  Both members are optional, and not declared on the
factory interfaces so that ``verifyObject`` does not require them:

- ``config_keys``: the keys the plugin reads from its table (``[store]``,
  ``[archive]``, ``[policy]``, or for a transport the keys of a route's
  ``[domains."..."]`` table besides the core's).  With it, any other key of
  the table is an error, with the closest known key suggested; without it,
  the plugin's table is not checked for unknown keys.
- ``check_config(config)``: checks the same mapping ``make`` takes (for a
  transport, with ``"target"``: the route's target is parsed here), without
  I/O, and raises ``ValueError("KEY: what is wrong")``, ``KEY`` as the table
  writes it (``path``; ``store.path`` is accepted too), or ``target`` for the
  route's target.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from mailhub.interfaces import IArchivePlugin, IPolicyPlugin, IStorePlugin, ITransportPlugin

GROUPS = {
    "mailhub.stores": IStorePlugin,
    "mailhub.transports": ITransportPlugin,
    "mailhub.policies": IPolicyPlugin,
    "mailhub.archives": IArchivePlugin,
}


class PluginNotFound(LookupError):
    """No plugin of that name in that group; the message lists those there are."""


def available(group: str) -> list[str]:
    """The names of the plugins installed in ``group``, sorted."""
    return sorted({ep.name for ep in entry_points(group=group)})


def load_plugin(group: str, name: str) -> Any:
    """
    Load the plugin ``name`` of entry-point ``group`` and check that it provides
    the group's factory interface.

    :raises PluginNotFound: naming the plugins that do exist.
    :raises TypeError: if the object found does not provide the interface.
    """
    iface = GROUPS[group]
    matches = [ep for ep in entry_points(group=group) if ep.name == name]
    if not matches:
        known = ", ".join(available(group)) or "none"
        raise PluginNotFound(f"no plugin {name!r} in {group} (installed: {known})")
    obj = matches[0].load()
    try:
        verifyObject(iface, obj)
    except Invalid as e:
        raise TypeError(f"plugin {name!r} in {group} does not provide {iface.__name__}: {e}")
    return obj


def declared_keys(plugin: Any) -> frozenset[str] | None:
    """The keys ``plugin`` declares for its table (``config_keys``), or ``None`` if it declares none."""
    keys = getattr(plugin, "config_keys", None)
    return None if keys is None else frozenset(keys)


def check_plugin_config(plugin: Any, config: Mapping[str, Any], table: str) -> tuple[str, str] | None:
    """
    Have ``plugin`` check ``config``, if it has a ``check_config``.

    :param config: what the plugin's ``make`` takes.
    :param table: the table's name as the configuration writes it
        (``"store"``), so that a key given as ``store.path`` is ``path``.
    :returns: ``None`` if the plugin finds nothing wrong (or has no check),
        else ``(key, what is wrong)``, ``key`` relative to the table (``""``
        when the plugin named none).
    """
    check = getattr(plugin, "check_config", None)
    if check is None:
        return None
    try:
        check(config)
    except ValueError as e:
        key, sep, what = str(e).partition(": ")
        if not sep or not key or " " in key:
            return "", str(e)
        return key.removeprefix(f"{table}."), what
    return None

"""
Find a plugin by name.

The core never imports a module of ``mailhub.plugins``: it asks for the name
the configuration gives, in one of the entry-point groups below.  Built-in
plugins are declared in ``setup.cfg`` exactly as a third party declares its own.
"""

from __future__ import annotations

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

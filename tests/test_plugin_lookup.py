"""Plugins are found by name through entry points, checked, and missing ones named."""

import pytest
from zope.interface.verify import verifyObject

from mailhub.interfaces import IDeliveryPolicy, ISpoolStore, ITransport
from mailhub.plugin import GROUPS, PluginNotFound, available, load_plugin


@pytest.mark.parametrize(
    "group, name",
    [
        ("mailhub.stores", "memory"),
        ("mailhub.stores", "sqlite"),
        ("mailhub.stores", "redis"),
        ("mailhub.transports", "smtp"),
        ("mailhub.policies", "standard"),
    ],
)
def test_every_builtin_plugin_is_found_and_provides_its_factory_interface(group, name):
    plugin = load_plugin(group, name)
    assert plugin.name == name
    assert verifyObject(GROUPS[group], plugin)


def test_unknown_plugin_error_lists_the_installed_ones():
    with pytest.raises(PluginNotFound) as info:
        load_plugin("mailhub.stores", "postgres")
    message = str(info.value)
    assert "'postgres'" in message
    for name in ("memory", "redis", "sqlite"):
        assert name in message


def test_available_lists_names_sorted():
    assert available("mailhub.stores") == sorted(available("mailhub.stores"))
    assert {"memory", "sqlite", "redis"} <= set(available("mailhub.stores"))


def test_made_objects_provide_their_interfaces(tmp_path):
    from twisted.internet import reactor

    store = load_plugin("mailhub.stores", "memory").make({"config_dir": str(tmp_path)}, reactor)
    assert verifyObject(ISpoolStore, store)
    policy = load_plugin("mailhub.policies", "standard").make({"nodes": ["a", "b"]}, reactor)
    assert verifyObject(IDeliveryPolicy, policy)
    transport = load_plugin("mailhub.transports", "smtp").make(
        {"target": "127.0.0.1:25", "hostname": "h.example"}, reactor
    )
    assert verifyObject(ITransport, transport)


def test_plugin_that_does_not_provide_the_interface_is_refused(monkeypatch):
    import mailhub.plugin as lookup

    class FakeEntryPoint:
        name = "broken"

        def load(self):
            return object()

    monkeypatch.setattr(lookup, "entry_points", lambda group: [FakeEntryPoint()])
    with pytest.raises(TypeError, match="does not provide IStorePlugin"):
        load_plugin("mailhub.stores", "broken")

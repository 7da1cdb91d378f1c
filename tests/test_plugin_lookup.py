"""Plugins are found by name through entry points, checked, and missing ones named."""

import pytest
from zope.interface.verify import verifyObject

from mailhub.interfaces import IDeliveryPolicy, ISpoolStore, ITransport
from mailhub.plugin import (
    GROUPS,
    PluginNotFound,
    available,
    check_plugin_config,
    declared_keys,
    load_plugin,
)


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


BUILTIN = [
    ("mailhub.stores", "memory"),
    ("mailhub.stores", "sqlite"),
    ("mailhub.stores", "redis"),
    ("mailhub.transports", "smtp"),
    ("mailhub.policies", "standard"),
    ("mailhub.archives", "memory"),
    ("mailhub.archives", "sqlite"),
    ("mailhub.archives", "postgresql"),
]


@pytest.mark.parametrize("group, name", BUILTIN)
def test_every_builtin_plugin_declares_the_keys_of_its_table(group, name):
    """So that a typo in its table is an error, not a default silently kept."""
    keys = declared_keys(load_plugin(group, name))
    assert keys is not None
    assert "plugin" not in keys  # the core's key, never a plugin's


@pytest.mark.parametrize(
    "group, name, config, key",
    [
        ("mailhub.stores", "sqlite", {"path": ""}, "path"),
        ("mailhub.stores", "redis", {"url": "http://x"}, "url"),
        ("mailhub.archives", "sqlite", {}, "path"),
        ("mailhub.archives", "postgresql", {"dsn": "host=db", "schema": "x" * 64}, "schema"),
        ("mailhub.policies", "standard", {"lifetime_days": 0}, "lifetime_days"),
        ("mailhub.transports", "smtp", {"target": "mail.example.com:0", "hostname": "h.example"}, "target"),
        ("mailhub.transports", "smtp", {"target": "mx", "hostname": "h.example", "tls": "always"}, "tls"),
    ],
)
def test_builtin_checks_name_the_key_relative_to_the_table(group, name, config, key):
    table = {"mailhub.stores": "store", "mailhub.archives": "archive", "mailhub.policies": "policy"}.get(group, "")
    problem = check_plugin_config(load_plugin(group, name), config, table)
    assert problem is not None and problem[0] == key, problem


@pytest.mark.parametrize(
    "group, name, config",
    [
        ("mailhub.stores", "sqlite", {"path": "s.db", "busy_timeout": 0}),
        ("mailhub.stores", "redis", {"url": "redis://:pw@db:6380/2", "wait_replicas": 1}),
        ("mailhub.archives", "sqlite", {"path": "a.db", "max_size_mb": 1.5}),
        ("mailhub.archives", "postgresql", {"host": "db", "dbname": "m", "port": 5433}),
        ("mailhub.policies", "standard", {"retry_minutes": 5, "nodes": ["a", "b"]}),
        ("mailhub.transports", "smtp", {"target": "[2001:db8::25]:25", "hostname": "h.example", "tls": "none"}),
    ],
)
def test_builtin_checks_accept_good_tables_without_io(group, name, config):
    assert check_plugin_config(load_plugin(group, name), config, "") is None


def test_check_plugin_config_without_a_check_or_without_a_key():
    class NoCheck:
        pass

    class Vague:
        def check_config(self, config):
            raise ValueError("something is off somewhere")

    assert check_plugin_config(NoCheck(), {"x": 1}, "store") is None
    assert check_plugin_config(Vague(), {}, "store") == ("", "something is off somewhere")
    assert declared_keys(NoCheck()) is None

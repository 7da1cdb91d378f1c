"""Configuration: what loads, and errors that name the file, the key and the problem."""

import subprocess
import sys
from pathlib import Path

import pytest

from mailhub.config import ConfigError, load, parse

EXAMPLES = Path(__file__).parent.parent / "examples"

GOOD = b"""
[hub]
hostname = "mx.hub.example"
[nodes.dallas]
smtp = "tcp:2525:interface=127.0.0.1"
[domains."Example.COM"]
route = "smtp:mail.example.com:25"
"""


def test_example_configs_load():
    for path in EXAMPLES.glob("*.toml"):
        config = load(str(path))
        assert config.nodes and config.domains, path


def test_defaults_are_the_embedded_default():
    config = parse(GOOD, "hub.toml")
    assert config.store["plugin"] == "sqlite"
    assert config.policy["plugin"] == "standard"
    assert config.outbound == "smtp:mx"
    assert config.route_for("EXAMPLE.com") == "smtp:mail.example.com:25"
    assert config.smtp.bare_line_endings == "reject"


@pytest.mark.parametrize(
    "text, key, words",
    [
        (GOOD.replace(b'hostname = "mx.hub.example"', b"hostname = 5"), "hub.hostname", "must be a string"),
        (GOOD.replace(b'route = "smtp:mail.example.com:25"', b'route = "nowhere"'), 'domains."Example.COM".route', "transport:target"),
        (GOOD + b"[smtp]\nmax_message_size = -1\n", "smtp.max_message_size", "greater than 0"),
        (GOOD + b"[smtp]\nbare_line_endings = \"maybe\"\n", "smtp.bare_line_endings", "'reject' or 'normalise'"),
        (GOOD + b"[smtp]\nidle_timeout = true\n", "smtp.idle_timeout", "not a boolean"),
        (GOOD + b"[bogus]\nx = 1\n", "bogus", "unknown table"),
        (GOOD.replace(b'smtp = "tcp:2525:interface=127.0.0.1"', b'smtp = "carrier-pigeon:1"'), "nodes.dallas.smtp", "not a Twisted endpoint"),
        (GOOD.replace(b'smtp = "tcp:2525:interface=127.0.0.1"', b'smpt = "tcp:1"'), "nodes.dallas.smpt", "unknown key"),
        (b"[hub]\nhostname='x'\n", "nodes", "missing"),
        (b"[hub\n", "(file)", "not valid TOML"),
    ],
)
def test_errors_name_file_key_and_problem(text, key, words):
    with pytest.raises(ConfigError) as info:
        parse(text, "/etc/mailhub/hub.toml")
    message = str(info.value)
    assert f"/etc/mailhub/hub.toml: {key}: " in message
    assert words in message


def test_all_errors_are_reported_at_once():
    text = GOOD.replace(b'hostname = "mx.hub.example"', b"hostname = 5") + b"[smtp]\nmax_recipients = 0\n"
    with pytest.raises(ConfigError) as info:
        parse(text, "hub.toml")
    assert [k for k, _ in info.value.errors] == ["hub.hostname", "smtp.max_recipients"]


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="nope.toml: \\(file\\): cannot read"):
        load("nope.toml")


def test_check_config_command_prints_resolved_config_or_errors(tmp_path):
    good = tmp_path / "good.toml"
    good.write_bytes(GOOD)
    out = subprocess.run([sys.executable, "-m", "mailhub.cli", "check-config", str(good)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'route = "smtp:mail.example.com:25"' in out.stdout
    assert 'plugin = "sqlite"' in out.stdout
    bad = tmp_path / "bad.toml"
    bad.write_bytes(GOOD + b"[smtp]\nmax_recipients = 'lots'\n")
    out = subprocess.run([sys.executable, "-m", "mailhub.cli", "check-config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert f"{bad}: smtp.max_recipients: must be an integer" in out.stderr


def test_smtp_security_keys_have_defaults_and_are_read():
    default = parse(GOOD, "hub.toml").smtp
    assert default.max_message_size == 50 * 1024 * 1024
    assert (default.require_tls, default.tls_certificate) == (False, "")
    text = GOOD + (
        b"[smtp]\nrequire_tls = true\nmax_connections = 7\nmax_connections_per_ip = 3\n"
        b"max_messages_per_connection = 4\nmax_messages_per_minute_per_ip = 5\nmax_header_size = 6\n"
        b"data_total_timeout = 8\n"
    )
    smtp = parse(text, "hub.toml").smtp
    assert (smtp.require_tls, smtp.max_connections, smtp.max_connections_per_ip) == (True, 7, 3)
    assert (smtp.max_messages_per_connection, smtp.max_messages_per_minute_per_ip) == (4, 5)
    assert (smtp.max_header_size, smtp.data_total_timeout) == (6, 8.0)


@pytest.mark.parametrize(
    "extra, key",
    [
        (b"max_connections_per_ip = 0\n", "smtp.max_connections_per_ip"),
        (b"require_tls = \"yes\"\n", "smtp.require_tls"),
        (b"max_header_size = \"big\"\n", "smtp.max_header_size"),
    ],
)
def test_smtp_security_key_errors_name_file_and_key(extra, key):
    with pytest.raises(ConfigError, match=f"/etc/hub.toml: {key}: "):
        parse(GOOD + b"[smtp]\n" + extra, "/etc/hub.toml")


def test_route_tls_keys_reach_the_transport_with_the_ca_file_made_absolute(tmp_path):
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    text = GOOD + b'tls = "required"\ntls_verify = true\ntls_ca_file = "ca.pem"\n'
    config = parse(text, str(tmp_path / "hub.toml"))
    options = config.route_options("smtp:mail.example.com:25")
    assert (options["tls"], options["tls_verify"]) == ("required", True)
    assert options["tls_ca_file"] == str(tmp_path / "ca.pem")


@pytest.mark.parametrize(
    "extra, key",
    [
        (b'tls = "always"\n', "tls"),
        (b'tls_verify = "yes"\n', "tls_verify"),
        (b'tls = "none"\ntls_verify = true\n', "tls_verify"),
        (b'tls_ca_file = "ca.pem"\n', "tls_ca_file"),
        (b'tls_verify = true\ntls_ca_file = "missing.pem"\n', "tls_ca_file"),
    ],
)
def test_route_tls_key_errors_name_file_and_key(extra, key):
    with pytest.raises(ConfigError, match=f'/etc/hub.toml: domains."Example.COM".{key}: '):
        parse(GOOD + extra, "/etc/hub.toml")


def test_check_config_output_is_toml_that_loads_to_the_same_configuration(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mailhub.cli", "check-config", str(EXAMPLES / "hub.toml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(out.stdout)
    again = load(str(resolved))
    original = load(str(EXAMPLES / "hub.toml"))
    assert again.smtp == original.smtp
    assert again.delivery == original.delivery
    assert again.domains == original.domains
    assert again.nodes == original.nodes


def test_check_config_prints_the_web_table_too(tmp_path):
    text = (EXAMPLES / "hub.toml").read_text()
    text += (
        '\n[web]\npublic_url = "https://mail.example.com/"\napi_tokens_file = "tokens"\n'
        'metrics_allow = ["10.0.0.0/8"]\ntrusted_proxies = ["127.0.0.1"]\n'
    ) if "\n[web]" not in text else ""
    config = tmp_path / "hub.toml"
    config.write_text(text)
    out = subprocess.run([sys.executable, "-m", "mailhub.cli", "check-config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "\n[web]\n" in out.stdout and 'public_url = "https://mail.example.com"' in out.stdout
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(out.stdout)
    assert load(str(resolved)).web == load(str(config)).web


# -- each part checks its own settings ----------------------------------------------


def error_lines(text: bytes, path: str = "hub.toml", endpoints: bool = True) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, path, endpoints)
    return str(info.value).splitlines()


@pytest.mark.parametrize(
    "text, line",
    [
        (GOOD + b"[smtp]\nmax_recipents = 5\n",
         'hub.toml: smtp.max_recipents: unknown key (did you mean "max_recipients"?)'),
        (GOOD.replace(b"[hub]\n", b'[hub]\noutbund = "smtp:mx"\n'),
         'hub.toml: hub.outbund: unknown key (did you mean "outbound"?)'),
        (GOOD + b"[delivery]\nlease_secs = 5\n",
         'hub.toml: delivery.lease_secs: unknown key (did you mean "lease_seconds"?)'),
        (GOOD + b'[web]\nsecret_fil = "s"\n',
         'hub.toml: web.secret_fil: unknown key (did you mean "secret_file"?)'),
        (GOOD.replace(b"[nodes.dallas]\n", b'[nodes.dallas]\nweeb = "tcp:0"\n'),
         'hub.toml: nodes.dallas.weeb: unknown key (did you mean "web"?)'),
        (GOOD + b"max_conections = 3\n",
         'hub.toml: domains."Example.COM".max_conections: unknown key (did you mean "max_connections"?)'),
        (GOOD + b'[archive]\nplugin = "memory"\nretention_day = 3\n',
         'hub.toml: archive.retention_day: unknown key (did you mean "retention_days"?)'),
        (GOOD + b'[domain."x.example"]\nroute = "smtp:x"\n',
         'hub.toml: domain: unknown table (did you mean "domains"?)'),
        (GOOD + b'[smtp]\n"max recipients" = 5\n',
         'hub.toml: smtp."max recipients": unknown key (did you mean "max_recipients"?)'),
    ],
)
def test_a_typo_in_a_core_table_is_one_line_naming_file_table_key_and_the_closest_key(text, line):
    assert error_lines(text) == [line]


def test_an_unknown_key_like_no_known_one_is_told_the_known_keys():
    text = GOOD.replace(b"[nodes.dallas]\n", b"[nodes.dallas]\nqqq = 1\n")
    assert error_lines(text) == ["hub.toml: nodes.dallas.qqq: unknown key (known: smtp, web)"]


@pytest.mark.parametrize(
    "table, key, suggested",
    [
        (b'[store]\nplugin = "sqlite"\npath = "s.db"\nbusy_timout = 1\n', "store.busy_timout", "busy_timeout"),
        (b'[store]\nplugin = "redis"\nkey_prefx = "h:"\n', "store.key_prefx", "key_prefix"),
        (b'[archive]\nplugin = "sqlite"\npath = "a.db"\nmax_size = 3\n', "archive.max_size", "max_size_mb"),
        (b'[archive]\nplugin = "postgresql"\ndsn = "host=db dbname=m"\npoolsize = 2\n', "archive.poolsize", "pool_size"),
        (b"[policy]\nretry_minute = 5\n", "policy.retry_minute", "retry_minutes"),
        (b"tls_verfy = true\n", 'domains."Example.COM".tls_verfy', "tls_verify"),
        (b"connect_timout = 5\n", 'domains."Example.COM".connect_timout', "connect_timeout"),
    ],
)
def test_a_typo_in_a_plugin_table_is_caught_by_the_plugin_keys(table, key, suggested):
    assert error_lines(GOOD + table) == [f'hub.toml: {key}: unknown key (did you mean "{suggested}"?)']


@pytest.mark.parametrize(
    "table, key",
    [
        (b'[store]\nplugin = "memory"\npath = "s.db"\n', "store.path"),
        (b'[archive]\nplugin = "memory"\npath = "a.db"\n', "archive.path"),
        (b'[store]\nplugin = "sqlite"\npath = "s.db"\nconfig_dir = "/tmp"\n', "store.config_dir"),
        (b'[policy]\nnodes = ["dallas"]\n', "policy.nodes"),
        (b'target = "127.0.0.1:26"\n', 'domains."Example.COM".target'),
    ],
)
def test_a_key_no_plugin_reads_is_refused_even_one_the_core_passes_to_it(table, key):
    [line] = error_lines(GOOD + table)
    assert line.startswith(f"hub.toml: {key}: unknown key (")


def test_the_archive_keys_the_core_reads_are_known_to_every_archive_plugin():
    for plugin in (b'plugin = "memory"\n', b'plugin = "sqlite"\npath = "a.db"\n'):
        text = GOOD + b"[archive]\n" + plugin + b"retention_days = 30\nmax_connections = 4\nexpire_every_minutes = 5\nnice = 10\n"
        assert parse(text, "hub.toml").archive is not None


@pytest.mark.parametrize(
    "table, key, words",
    [
        (b'[store]\nplugin = "sqlite"\n', "store.path", "needs a database file path"),
        (b'[store]\nplugin = "sqlite"\npath = "s.db"\nbusy_timeout = -1\n', "store.busy_timeout", "0 or more"),
        (b'[store]\nplugin = "redis"\nport = "x"\n', "store.port", "whole number"),
        (b'[store]\nplugin = "redis"\nsentinels = ["10.0.0.1:26379"]\n', "store.master", "Sentinel"),
        (b'[archive]\nplugin = "sqlite"\npath = "a.db"\nmax_size_mb = 0\n', "archive.max_size_mb", "more than 0"),
        (b'[archive]\nplugin = "postgresql"\npool_size = 2\n', "archive.dsn", "required"),
        (b'[archive]\nplugin = "postgresql"\ndsn = "host=db"\npool_size = 0\n', "archive.pool_size", "1 or more"),
        (b"[policy]\nretry_minutes = -1\n", "policy.retry_minutes", "greater than 0"),
        (b"[policy]\njitter = 1\n", "policy.jitter", "below 1"),
        (b'[policy]\nhold_on_reject_after_deferral = "no"\n', "policy.hold_on_reject_after_deferral", "true or false"),
        (b"connect_timeout = 0\n", 'domains."Example.COM".connect_timeout', "greater than 0"),
        (b'tls = "none"\ntls_verify = true\n', 'domains."Example.COM".tls_verify', "means nothing"),
    ],
)
def test_a_plugin_checks_the_values_of_its_table_when_the_config_is_read(table, key, words):
    [line] = error_lines(GOOD + table, "/etc/mailhub/hub.toml")
    assert line.startswith(f"/etc/mailhub/hub.toml: {key}: ")
    assert words in line


BAD_TARGET = GOOD.replace(b"smtp:mail.example.com:25", b"smtp:127.0.0.1:25x")


def test_a_route_target_is_parsed_by_its_transport_when_the_config_is_read():
    [line] = error_lines(BAD_TARGET)
    assert line.startswith('hub.toml: domains."Example.COM".route: ')
    assert "'127.0.0.1:25x'" in line


@pytest.mark.parametrize(
    "text, key, words",
    [
        (GOOD.replace(b'hostname = "mx.hub.example"', b'hostname = "mx.hub.example"\noutbound = "smtp:[::1"'),
         "hub.outbound", "'[::1'"),
        (GOOD.replace(b"smtp:mail.example.com:25", b"uucp:127.0.0.1:540"),
         'domains."Example.COM".route', "no plugin 'uucp' in mailhub.transports (installed: "),
        (GOOD.replace(b'hostname = "mx.hub.example"', b'hostname = "mx hub"'), "hub.hostname", "'mx hub'"),
    ],
)
def test_the_outbound_route_the_transport_name_and_the_ehlo_name_are_checked_too(text, key, words):
    lines = error_lines(text)
    assert lines and all(line.startswith(f"hub.toml: {key}: ") for line in lines), lines
    assert words in lines[0]


def test_check_config_refuses_a_bad_route_target_in_one_line(tmp_path):
    bad = tmp_path / "hub.toml"
    bad.write_bytes(BAD_TARGET)
    out = subprocess.run([sys.executable, "-m", "mailhub.cli", "check-config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    [line] = out.stderr.splitlines()
    assert line.startswith(f'{bad}: domains."Example.COM".route: ') and "25x" in line


def test_twistd_refuses_to_start_on_a_bad_route_target(tmp_path):
    from mailhub import tap

    config = tmp_path / "hub.toml"
    config.write_bytes(BAD_TARGET.replace(b'"tcp:2525:interface=127.0.0.1"', b'"tcp:0:interface=127.0.0.1"'))
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    with pytest.raises(SystemExit) as info:
        tap.makeService(options)
    assert f'{config}: domains."Example.COM".route: ' in str(info.value.code)


def test_without_endpoints_routes_are_not_checked_but_plugin_tables_are():
    assert parse(BAD_TARGET, "hub.toml", endpoints=False).domains
    text = BAD_TARGET + b'[store]\nplugin = "sqlite"\npath = "s.db"\nbusy_timout = 1\n'
    assert [line.split(":")[1].strip() for line in error_lines(text, endpoints=False)] == ["store.busy_timout"]


class ThirdPartyStore:
    """A store plugin as a third party may write one: ``config_keys`` and ``check_config`` are optional."""

    name = "thirdparty"

    def __init__(self, config_keys=None, check=None):
        if config_keys is not None:
            self.config_keys = config_keys
        if check is not None:
            self.check_config = check

    def make(self, config, reactor):
        raise AssertionError("never made while reading the configuration")


@pytest.fixture
def third_party(monkeypatch):
    """Install a store plugin ``thirdparty`` beside the real ones."""
    import importlib.metadata

    import mailhub.plugin as lookup

    installed = []

    class EntryPoint:
        name = "thirdparty"

        def load(self):
            return installed[0]

    def entry_points(group):
        found = list(importlib.metadata.entry_points(group=group))
        return found + [EntryPoint()] if group == "mailhub.stores" else found

    monkeypatch.setattr(lookup, "entry_points", entry_points)
    from zope.interface import directlyProvides

    from mailhub.interfaces import IStorePlugin

    def install(plugin):
        directlyProvides(plugin, IStorePlugin)
        installed.append(plugin)

    return install


def test_a_plugin_that_declares_no_keys_gets_its_table_unchecked(third_party):
    third_party(ThirdPartyStore())
    config = parse(GOOD + b'[store]\nplugin = "thirdparty"\nanything = 1\n', "hub.toml")
    assert config.store["anything"] == 1


def test_a_plugin_check_names_the_key_as_the_table_writes_it_with_or_without_the_table(third_party):
    seen = []

    def check(config):
        seen.append(dict(config))
        if config.get("colour") != "blue":
            raise ValueError(f"colour: must be blue, not {config.get('colour')!r}")
        if "shade" in config:
            raise ValueError("store.shade: is not for stores")

    third_party(ThirdPartyStore(config_keys={"colour", "shade"}, check=check))
    table = GOOD + b'[store]\nplugin = "thirdparty"\n'
    assert error_lines(table + b'colour = "red"\n') == ["hub.toml: store.colour: must be blue, not 'red'"]
    assert error_lines(table + b'colour = "blue"\nshade = 1\n') == ["hub.toml: store.shade: is not for stores"]
    assert error_lines(table + b'colour = "blue"\ncolor = 1\n') == [
        'hub.toml: store.color: unknown key (did you mean "colour"?)'
    ]
    parse(table + b'colour = "blue"\n', "/etc/mailhub/hub.toml")
    assert seen[-1] == {"plugin": "thirdparty", "colour": "blue", "config_dir": "/etc/mailhub"}


def test_configs_the_integration_tests_generate_pass():
    from hubprocess import hub_config

    redis = 'plugin = "redis"\nport = 6390\nkey_prefix = "hub:"\ncommand_timeout = 2\nreconnect_max_delay = 0.5\n'
    smtp = "[smtp]\nmax_messages_per_minute_per_ip = 1000000\nmax_connections_per_ip = 100\n"
    delivery = "[delivery]\nlease_seconds = 30\ntakeover_seconds = 2\nmax_scan_interval = 1\nheartbeat_seconds = 1\nprobe_seconds = 1\nshare_seconds = 0.5\n"
    for kwargs in ({}, {"retry_minutes": 0.1, "store": f"[store]\n{redis}", "delivery": delivery, "extra": smtp}):
        text = hub_config(Path("/tmp/spool.db"), 2500, {"dallas": 2525, "losangeles": 2526}, **kwargs)
        text += '[archive]\nplugin = "sqlite"\npath = "archive.db"\nretention_days = 30\n[web]\napi_tokens_file = "tokens"\n'
        assert parse(text.encode(), "hub.toml").domains


BENCH = Path(__file__).parent.parent / "bench"


def test_configs_the_benchmarks_generate_pass(tmp_path, monkeypatch):
    """bench/hub.py, bench/outage.py and bench/web.py, for each store and archive they write."""
    import importlib

    from mailhub.testing import redis_server

    class NoRedis:
        port = 6390

    monkeypatch.setattr(redis_server.RedisServer, "start", staticmethod(lambda directory: NoRedis()))
    monkeypatch.setattr(redis_server, "redis_server_binary", lambda: "redis-server")
    monkeypatch.syspath_prepend(str(BENCH))
    bench_hub, outage, web = (importlib.import_module(m) for m in ("hub", "outage", "web"))
    written = []
    for store in ("sqlite", "redis", "memory"):
        for archive in (True, False):
            hub = bench_hub.HubInstance(str(tmp_path / f"hub-{store}-{archive}"), [1, 2], 3, 4, store, archive)
            hub.setup()
            written.append(hub.config)
    in_process = bench_hub.HubInstance(str(tmp_path / "hub-inprocess"), [1], 3, 4, "sqlite", archive_options="processes = 0\n")
    in_process.setup()
    written.append(in_process.config)
    for store in ("sqlite", "redis"):
        hub = outage.Hub(str(tmp_path / f"outage-{store}"), store, 3, 4, 5)
        hub.setup()  # runs mailhub check-config itself, too
        written.append(hub.config)
    for i, table in enumerate(['plugin = "sqlite"\npath = "a.db"', 'plugin = "postgresql"\ndsn = "host=db"\npool_size = 4']):
        (tmp_path / f"web{i}").mkdir()
        written.append(str(web.hub_config(tmp_path / f"web{i}", table, 1, 2, "example.com")))
    for path in written:
        assert load(path).domains, path


def test_check_config_takes_the_file_with_c_as_the_other_commands_do(tmp_path):
    bad = tmp_path / "hub.toml"
    bad.write_bytes(GOOD + b"[smtp]\nmax_recipents = 5\n")
    out = subprocess.run([sys.executable, "-m", "mailhub.cli", "check-config", "-c", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr == f'{bad}: smtp.max_recipents: unknown key (did you mean "max_recipients"?)\n'


def test_check_config_prints_tables_as_toml_and_hides_secrets(tmp_path):
    from mailhub.config import describe

    path = tmp_path / "hub.toml"
    path.write_text(
        '[hub]\nhostname = "mx.example.com"\n'
        '[nodes.dallas]\nsmtp = "tcp:2525"\n'
        '[domains."example.com"]\nroute = "http:https://hooks.example.com/mail"\n'
        'headers = { Authorization = "Bearer s3cr3t-value", X-Tenant = "acme" }\n'
    )
    out = describe(load(str(path)))
    assert "s3cr3t-value" not in out
    line = next(x for x in out.splitlines() if x.startswith("headers = "))
    assert line == 'headers = {"Authorization" = "(hidden)", "X-Tenant" = "acme"}'
    # What it prints reads back as TOML.
    import tomllib

    assert tomllib.loads(line)["headers"]["X-Tenant"] == "acme"

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

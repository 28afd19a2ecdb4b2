"""Settings: one definition per setting (shmstream.config), parsed with units and ranges,
one-line errors, and the README's table generated from the same definitions."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest

from shmstream.cli import settings_doc
from shmstream.config import SettingError, Settings, env_name, spec_of, specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Variables that are wiring between shmstream's own processes, not settings.
INTERNAL_VARIABLES = {"SHMSTREAM_SUPERVISOR_PARENT", "SHMSTREAM_NAMESPACE_LOCK_FD",
                      "SHMSTREAM_NO_FUTEX", "SHMSTREAM_RELAY_SOCKET", "SHMSTREAM_RELAY_FD",
                      "SHMSTREAM_RELAY_READY_FD", "SHMSTREAM_RELAY_PARENT"}


@pytest.mark.parametrize(("name", "raw", "value"), [
    ("max_bytes", "4MiB", 4 * 1024 * 1024),
    ("max_bytes", "1M", 1024 * 1024),
    ("max_bytes", "512KiB", 512 * 1024),
    ("max_bytes", "1.5 MiB", 3 * 512 * 1024),
    ("max_bytes", "65536", 65536),
    ("max_bytes", "2MB", 2_000_000),
    ("ttl", "300s", 300.0),
    ("ttl", "5m", 300.0),
    ("ttl", "1h", 3600.0),
    ("ttl", "250ms", 0.25),
    ("ttl", "0.3", 0.3),
    ("ttl", "0", 0.0),
    ("upstream", "http://host:8081", "http://host:8081"),
    ("upstream", "http://host/v1", "http://host"),  # an OpenAI base_url
    ("upstream", "https://host/openai/v1/", "https://host/openai"),
    ("upstream", "none", None),
    ("backend", "redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("workers", "4", 4),
    ("log_level", "DEBUG", "debug"),
    ("bind", "[::1]:8080", "[::1]:8080"),
    ("bind", "unix:/run/shmstream.sock", "unix:/run/shmstream.sock"),
])
def test_values_parse_with_units(name, raw, value):
    settings = Settings.from_env({env_name(name): raw})
    assert getattr(settings, name) == value
    assert getattr(Settings.load({}, {name: raw}), name) == value  # the flag, the same way


@pytest.mark.parametrize(("name", "raw", "expected"), [
    ("ttl", "-1", "at least 0 s"),
    ("ttl", "soon", "a duration like 300s"),
    ("max_bytes", "abc", "a size like 4MiB"),
    ("max_bytes", "1.5", "a whole number of bytes"),
    ("max_bytes", "100", "at least 4 KiB"),
    ("workers", "abc", "a whole number"),
    ("workers", "0", "at least 1"),
    ("upstream", "notaurl", "http:// or https:// URL"),
    ("upstream", "ftp://example.com", "http:// or https:// URL"),
    ("upstream", "http://", "http:// or https:// URL"),
    ("backend", "memcached://x", "'shm' or a redis://"),
    ("namespace", "../etc", "letters, digits"),
    ("log_level", "loud", "one of debug, info"),
    ("gc_interval", "0", "at least"),
])
def test_a_bad_value_is_one_line_naming_the_setting_and_the_form(name, raw, expected):
    with pytest.raises(SettingError) as env_error:
        Settings.from_env({env_name(name): raw})
    message = str(env_error.value)
    assert message.startswith(f"{env_name(name)}=") and expected in message, message
    assert "\n" not in message
    with pytest.raises(SettingError) as flag_error:
        Settings.load({}, {name: raw})
    assert str(flag_error.value).startswith("--" + name.replace("_", "-") + "=")


def test_a_secret_is_never_echoed():
    with pytest.raises(SettingError) as error:
        Settings.load({}, {"api_key": None, "max_sessions": "x"})
    assert "x" in str(error.value)
    settings = Settings(api_key="s3cret", backend="redis://:pw@host:6379/0")
    assert "s3cret" not in settings.describe() and "pw" not in settings.describe()


def test_every_field_has_one_definition_and_round_trips_through_the_environment():
    for spec_field in dataclasses.fields(Settings):
        assert spec_of(spec_field) is not None, f"{spec_field.name} has no Spec"
    settings = Settings.load({}, {"max_bytes": "1M", "ttl": "0.3", "upstream": "http://h:1/v1",
                                  "workers": "3", "max_sessions": "7"})
    assert Settings.from_env(settings.to_env()) == settings
    assert settings.to_env()["SHMSTREAM_TTL"] == "0.3"
    assert Settings(graceful_timeout=30.0).to_env()["SHMSTREAM_GRACEFUL_TIMEOUT"] == "30"


def test_the_readme_table_is_generated_from_the_definitions():
    with open(os.path.join(ROOT, "README.md")) as readme:
        text = readme.read()
    assert settings_doc.current_block(text) == settings_doc.render_block(), (
        "README.md's settings table is stale: run "
        "`python -m shmstream.cli.settings_doc --write README.md`")


def test_every_variable_the_code_reads_is_a_defined_setting():
    read = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "shmstream")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as source:
                    read |= set(re.findall(r"SHMSTREAM_[A-Z_]+", source.read()))
    defined = {env_name(name) for name, _ in specs()}
    assert read - INTERNAL_VARIABLES - defined == set()

"""The config file: defaults, lookup order, and errors that name file, key and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from guestwarden.conf.loading import ConfigError, config_path, load_settings, parse_settings
from guestwarden.conf.settings import Settings, resolve_worker_count

P = Path("/etc/guestwarden/guestwarden.toml")


def parse(text: str) -> Settings:
    return parse_settings(text.encode(), P)


def test_defaults_are_the_documented_ones() -> None:
    s = parse("")
    assert s.uris == ("qemu:///system",)
    assert s.state_dir == "/var/lib/guestwarden"
    assert s.runtime_dir == "/run/guestwarden"
    assert s.workers == "auto"
    assert s.shutdown.persistent == ("save", "shutdown", "poweroff")
    assert s.shutdown.transient == ("shutdown", "poweroff")
    assert (s.shutdown.parallel_shutdown, s.shutdown.parallel_save) == (8, 1)
    assert s.shutdown.shutdown_timeout == 300
    assert s.shutdown.bypass_cache is False
    assert s.boot.on_boot == "restore"
    assert (s.boot.start_delay, s.boot.parallel_start) == (0, 4)
    assert (s.boot.sync_time, s.boot.sync_time_timeout) == (True, 60)


def test_a_full_file_is_read() -> None:
    s = parse('''
uris = ["qemu:///system", "test:///default"]
workers = 12
[shutdown]
persistent = ["shutdown", "poweroff"]
parallel_shutdown = 0
parallel_save = 3
shutdown_timeout = 45.5
bypass_cache = true
[boot]
on_boot = "ignore"
start_delay = 2
sync_time = false
''')
    assert s.workers == 12 and s.shutdown.parallel_shutdown == 0
    assert s.shutdown.persistent == ("shutdown", "poweroff")
    assert s.boot.on_boot == "ignore" and s.boot.start_delay == 2.0


@pytest.mark.parametrize(("text", "expected"), [
    ("colour = 1", ["unknown key 'colour'", "uris", "workers"]),
    ("[shutdown]\nparalel_save = 2", ["unknown key 'shutdown.paralel_save'",
                                      "parallel_save"]),
    ("[shutdown]\nparallel_save = 0", ["key shutdown.parallel_save", "from 1 to 256"]),
    ("workers = 0", ["key workers", '"auto"', "from 1 to 256"]),
    ("workers = \"lots\"", ["key workers", '"auto"']),
    ("[boot]\non_boot = \"always\"", ["key boot.on_boot", '"restore"', '"ignore"']),
    ("[shutdown]\ntransient = [\"save\", \"poweroff\"]",
     ["key shutdown.transient", "transient guests"]),
    ("[shutdown]\npersistent = [\"save\", \"hibernate\"]",
     ["key shutdown.persistent", "hibernate", '"poweroff"']),
    ("[shutdown]\npersistent = []", ["key shutdown.persistent", "at least 1"]),
    ("[shutdown]\nshutdown_timeout = -1", ["key shutdown.shutdown_timeout", "> 0"]),
    ("[boot]\nsync_time = \"yes\"", ["key boot.sync_time", "true or false"]),
    ("uris = []", ["key uris"]),
    ("state_dir = \"var/lib\"", ["key state_dir", "absolute path"]),
    ("shutdown = 5", ["key shutdown", "a table"]),
    ("uris = [", ["not valid TOML"]),
])
def test_bad_values_name_file_key_and_allowed_values(text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert str(P) in message
    for part in expected:
        assert part in message


def test_lookup_order_flag_then_environment_then_default() -> None:
    env = {"GUESTWARDEN_CONFIG": "/from/env.toml"}
    assert config_path("/from/flag.toml", env) == Path("/from/flag.toml")
    assert config_path(None, env) == Path("/from/env.toml")
    assert config_path(None, {}) == P


def test_missing_file_is_an_error_unless_it_is_the_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    assert load_settings(tmp_path / "nope.toml", missing_ok=True) == Settings()


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_bytes(b"uris = [\"\xff\"]")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_settings(path)


def test_auto_workers_cover_the_largest_bound() -> None:
    assert resolve_worker_count(parse("workers = 5"), 64) == 5
    assert resolve_worker_count(parse(""), 2) == 9  # parallel_shutdown 8 + 1
    assert resolve_worker_count(parse("[shutdown]\nparallel_shutdown = 2"), 2) == 5  # start 4
    assert resolve_worker_count(parse("[shutdown]\nparallel_shutdown = 500"), 2) == 64

"""libvirt-guests configs (real files) translated into guestwarden configs that load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guestwarden.conf.libvirt_guests import (
    DISTROS,
    VARIABLES,
    LibvirtGuestsConfig,
    LibvirtGuestsError,
    default_uri,
    defaults,
    distro_of,
    import_config,
    read_config,
)
from guestwarden.conf.loading import parse_settings
from guestwarden.conf.settings import Settings

DEBIAN_SCRIPT = Path("/usr/lib/libvirt/libvirt-guests.sh")
QEMU = ("qemu:///system", "libvirt's default for root")


def write(tmp_path: Path, text: str, directory: str = "sysconfig") -> Path:
    path = tmp_path / directory / "libvirt-guests"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def translate(tmp_path: Path, text: str, directory: str = "sysconfig",
              default: tuple[str, str] = QEMU) -> tuple[Settings, str, list[str]]:
    path = write(tmp_path, text, directory)
    toml, warnings = import_config(read_config(path), default)
    return parse_settings(toml.encode(), path), toml, warnings


def comments(toml: str) -> str:
    """The comments, joined into one line of text (they are wrapped)."""
    return " ".join(line[2:] for line in toml.splitlines() if line.startswith("# "))


def notes(toml: str) -> str:
    """The NOTE comments, joined into one line of text."""
    return " ".join(re.findall(r"NOTE: (.*?)(?= NOTE: |$)", comments(toml)))


def test_debian_defaults_are_those_of_the_installed_script() -> None:
    """The defaults claimed for Debian are what Debian 12's libvirt-guests.sh sets."""
    if not DEBIAN_SCRIPT.is_file():
        pytest.fail(f"{DEBIAN_SCRIPT} is missing: apt-get install libvirt-clients (make deps)",
                    pytrace=False)
    script = DEBIAN_SCRIPT.read_text()
    before_sourcing = script.split("default/libvirt-guests", 1)[0]
    found = dict(re.findall(r"(?m)^([A-Z_]+)=\"?([^\"\n]*)\"?$", before_sourcing))
    claimed = defaults("debian")
    for name, value in found.items():
        if name in claimed:
            assert claimed[name] == value, name
    assert {"URIS", "ON_BOOT", "ON_SHUTDOWN", "SHUTDOWN_TIMEOUT", "PARALLEL_SHUTDOWN",
            "START_DELAY", "BYPASS_CACHE", "SYNC_TIME"} <= set(found)


def test_every_distribution_has_a_default_for_every_variable() -> None:
    for distro in DISTROS:
        assert sorted(defaults(distro)) == sorted(VARIABLES)


def test_the_path_tells_whose_defaults_apply(tmp_path: Path) -> None:
    assert distro_of(Path("/etc/sysconfig/libvirt-guests")) == "fedora"
    assert distro_of(Path("/etc/conf.d/libvirt-guests")) == "fedora"
    assert distro_of(Path("/etc/default/libvirt-guests")) == "debian"
    elsewhere = tmp_path / "copy-of-libvirt-guests"
    elsewhere.write_text("ON_BOOT=start\n")
    with pytest.raises(LibvirtGuestsError, match="--distro"):
        read_config(elsewhere)
    assert read_config(elsewhere, "debian").values["ON_SHUTDOWN"] == "shutdown"


def test_an_empty_fedora_file_means_start_and_suspend(tmp_path: Path) -> None:
    settings, toml, warnings = translate(tmp_path, "# all defaults\n")
    assert warnings == []
    assert settings.uris == ("qemu:///system",)
    assert settings.boot.on_boot == "restore"
    assert settings.shutdown.persistent == ("save", "shutdown", "poweroff")
    assert settings.shutdown.transient == ("shutdown", "poweroff")
    assert settings.shutdown.parallel_save == 1
    assert settings.shutdown.shutdown_timeout == 300
    assert settings.shutdown.parallel_shutdown == Settings().shutdown.parallel_shutdown
    assert settings.boot.parallel_start == 1
    assert settings.boot.start_delay == 0
    assert settings.boot.sync_time is False
    assert settings.shutdown.bypass_cache is False
    said = notes(toml)
    assert "When a save fails, libvirt-guests tries nothing else" in said
    assert "does not touch transient guests" in said
    assert "waits for a save as long as it takes" in said
    assert '"default" is the URI libvirt picks' in said
    assert "ON_SHUTDOWN='suspend' (unset: the fedora default)" in toml


def test_an_empty_debian_file_means_ignore_and_shutdown(tmp_path: Path) -> None:
    settings, toml, _ = translate(tmp_path, "", directory="default")
    assert settings.boot.on_boot == "ignore"
    assert settings.shutdown.persistent == ("shutdown", "poweroff")
    assert settings.shutdown.transient == ("shutdown", "poweroff")
    assert settings.shutdown.parallel_shutdown == 1  # PARALLEL_SHUTDOWN=0 is serial
    assert settings.shutdown.shutdown_mode == "agent,acpi"
    said = notes(toml)
    assert "0 means one at a time in libvirt-guests but no bound at all" in said
    assert "libvirt-guests also deletes its list" in said
    assert "left to be killed when the host goes down" in said


def test_every_variable_set(tmp_path: Path) -> None:
    settings, toml, warnings = translate(tmp_path, (
        "URIS='qemu:///system xen:///system'\n"
        "ON_BOOT=start\n"
        "START_DELAY=1m\n"
        "ON_SHUTDOWN=shutdown\n"
        "PARALLEL_SHUTDOWN=5\n"
        "SHUTDOWN_TIMEOUT=120\n"
        "BYPASS_CACHE=1\n"
        "SYNC_TIME=1\n"
        "PERSISTENT_ONLY=default\n"
    ), directory="default")
    assert warnings == []
    assert settings.uris == ("qemu:///system", "xen:///system")
    assert settings.boot.on_boot == "restore"
    assert settings.boot.start_delay == 60
    assert settings.shutdown.parallel_shutdown == 5
    assert settings.shutdown.shutdown_timeout == 120
    assert settings.shutdown.bypass_cache is True
    assert settings.boot.sync_time is True
    said = notes(toml)
    assert "handles the URIs one after another" in said
    assert "gives each guest 120 s" in said  # one timeout for the batch in libvirt-guests
    assert "tries once, right after the start" in said
    assert "shuts transient guests down too" in comments(toml)


def test_shutdown_timeout_zero_is_forever_and_capped(tmp_path: Path) -> None:
    settings, toml, _ = translate(tmp_path, "ON_SHUTDOWN=shutdown\nSHUTDOWN_TIMEOUT=0\n")
    assert settings.shutdown.shutdown_timeout == 86400
    assert "waits forever" in notes(toml)


@pytest.mark.parametrize(("on_shutdown", "persistent_only", "words"), [
    ("suspend", "true", "does not touch transient guests"),
    ("suspend", "false", "also tries to save transient guests"),
    ("shutdown", "true", "leaves transient guests running"),
])
def test_persistent_only(tmp_path: Path, on_shutdown: str, persistent_only: str,
                         words: str) -> None:
    settings, toml, _ = translate(
        tmp_path, f"ON_SHUTDOWN={on_shutdown}\nPERSISTENT_ONLY={persistent_only}\n")
    assert settings.shutdown.transient == ("shutdown", "poweroff")
    assert words in notes(toml)


def test_values_libvirt_guests_reads_loosely_are_kept_and_flagged(tmp_path: Path) -> None:
    settings, _, warnings = translate(
        tmp_path, "ON_BOOT=yes\nON_SHUTDOWN=managedsave\nBYPASS_CACHE=no\nSYNC_TIME=yes\n")
    assert settings.boot.on_boot == "ignore"  # the script only tests for "start"
    assert settings.shutdown.persistent[0] == "save"  # ... and for "shutdown"
    assert settings.shutdown.bypass_cache is True  # ... and for "0"
    assert settings.boot.sync_time is True
    assert len(warnings) == 4
    assert all("line" in w and "libvirt-guests treats" in w for w in warnings)


def test_unknown_variables_are_listed_not_translated(tmp_path: Path) -> None:
    _, toml, warnings = translate(tmp_path, "CONNECT_RETRIES=10\nMY_NOTE=hello\n")
    assert "#   CONNECT_RETRIES='10' (line 1)" in toml
    assert "#   MY_NOTE='hello' (line 2)" in toml
    assert "connect_timeout" in comments(toml)
    assert len(warnings) == 2


def test_default_and_duplicate_uris_collapse(tmp_path: Path) -> None:
    conf = tmp_path / "libvirt.conf"
    conf.write_text('# the admin\'s default\nuri_default = "qemu:///custom"\n')
    uri = default_uri(conf)
    assert uri == ("qemu:///custom", f"uri_default in {conf} line 2")
    settings, toml, _ = translate(
        tmp_path, "URIS='default qemu:///custom lxc:/// lxc:///'\n", default=uri)
    assert settings.uris == ("qemu:///custom", "lxc:///")
    assert "is listed once" in comments(toml)
    assert default_uri(tmp_path / "missing.conf")[0] == "qemu:///system"


@pytest.mark.parametrize(("text", "words"), [
    ("URIS=''\n", "no URI at all"),
    ("SHUTDOWN_TIMEOUT=-5\n", "whole number"),
    ("ON_SHUTDOWN=shutdown\nPARALLEL_SHUTDOWN=many\n", "whole number"),
    ("ON_SHUTDOWN=shutdown\nPARALLEL_SHUTDOWN=5000\n", "at most 4096"),
    ("START_DELAY=soon\n", "seconds"),
    ("START_DELAY=2d\n", "at most 86400"),
    ("PERSISTENT_ONLY=yes\n", "true, false or default"),
    ("URIS=$MY_URIS\n", "variable reference"),
    ("ON_BOOT=start\nsource /etc/other\n", "shell command"),
])
def test_what_cannot_be_translated_names_file_line_and_value(
    tmp_path: Path, text: str, words: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(LibvirtGuestsError) as caught:
        import_config(read_config(path), QEMU)
    message = str(caught.value)
    assert message.startswith(f"{path} line "), message
    assert words in message


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LibvirtGuestsError, match="not found"):
        read_config(tmp_path / "sysconfig" / "libvirt-guests")


def test_comments_fit_the_width_of_the_packaged_config(tmp_path: Path) -> None:
    _, toml, _ = translate(tmp_path, "URIS='default xen:///system'\nSHUTDOWN_TIMEOUT=0\n")
    assert max(len(line) for line in toml.splitlines()) <= 88
    assert isinstance(read_config(write(tmp_path, "")), LibvirtGuestsConfig)

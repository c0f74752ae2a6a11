"""libvirt-guests' config, read without a shell and translated into guestwarden's TOML.

The translation keeps what libvirt-guests does when things go right and makes what
happens when they go wrong explicit: every key it writes says which variable it
comes from, and a ``# NOTE:`` comment marks each place where guestwarden cannot do
exactly the same (libvirt-guests' semantics are those of the script itself, e.g.
Debian's /usr/lib/libvirt/libvirt-guests.sh; PERSISTENT_ONLY exists only in newer
versions, older ones such as Debian 12's ignore it).

Unset variables take the defaults of the script that reads the file, and those
differ between distributions: upstream's script (Fedora, RHEL, openSUSE, Arch)
starts guests at boot and suspends them at shutdown, Debian's (and Ubuntu's)
ignores them at boot and shuts them down. The file does not say which script reads
it, but its path does -- each script reads only its own path (/etc/sysconfig or
/etc/conf.d upstream, /etc/default on Debian) -- so the path decides, and a file
anywhere else needs ``--distro``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from guestwarden.conf.libvirtconf import read_libvirt_conf
from guestwarden.conf.loading import ConfigError, parse_settings
from guestwarden.conf.shell import Assignment, ShellSyntaxError, parse_assignments

Distro = Literal["fedora", "debian"]
DISTROS: tuple[Distro, ...] = ("fedora", "debian")

SYSCONFIG_PATH = Path("/etc/sysconfig/libvirt-guests")
DEBIAN_PATH = Path("/etc/default/libvirt-guests")
LIST_PATH = Path("/var/lib/libvirt/libvirt-guests")
LIBVIRT_CONF = Path("/etc/libvirt/libvirt.conf")
FALLBACK_URI = "qemu:///system"

VARIABLES = ("URIS", "ON_BOOT", "START_DELAY", "ON_SHUTDOWN", "PARALLEL_SHUTDOWN",
             "SHUTDOWN_TIMEOUT", "BYPASS_CACHE", "SYNC_TIME", "PERSISTENT_ONLY")

_COMMON_DEFAULTS = (("URIS", "default"), ("START_DELAY", "0"), ("PARALLEL_SHUTDOWN", "0"),
                    ("SHUTDOWN_TIMEOUT", "300"), ("BYPASS_CACHE", "0"), ("SYNC_TIME", "0"),
                    ("PERSISTENT_ONLY", "default"))
_DISTRO_DEFAULTS: Mapping[Distro, tuple[tuple[str, str], ...]] = {
    "fedora": (("ON_BOOT", "start"), ("ON_SHUTDOWN", "suspend")),
    "debian": (("ON_BOOT", "ignore"), ("ON_SHUTDOWN", "shutdown")),
}
_DIR_DISTRO: Mapping[str, Distro] = {"sysconfig": "fedora", "conf.d": "fedora",
                                     "default": "debian"}


class LibvirtGuestsError(Exception):
    """A libvirt-guests file that cannot be taken over; the message is for people."""


def defaults(distro: Distro) -> dict[str, str]:
    """The values libvirt-guests.sh sets before it sources its config file."""
    return dict(_DISTRO_DEFAULTS[distro] + _COMMON_DEFAULTS)


@dataclass(frozen=True)
class LibvirtGuestsConfig:
    path: Path
    distro: Distro
    values: Mapping[str, str]
    """Every variable of ``VARIABLES``: from the file, else the distribution's default."""
    lines: Mapping[str, int]
    """Where the value in effect was set; a variable missing here has its default."""
    ignored: tuple[Assignment, ...]
    """Other variables of the file: libvirt-guests ignores them, or they have no
    equivalent here (e.g. CONNECT_RETRIES of some versions)."""

    def origin(self, name: str) -> str:
        line = self.lines.get(name)
        return f"line {line}" if line else f"unset: the {self.distro} default"

    def where(self, name: str) -> str:
        return f"{self.path} {self.origin(name)}: {name}={self.values[name]!r}"


def default_config_path() -> Path:
    """/etc/sysconfig/libvirt-guests if it exists, else /etc/default/libvirt-guests."""
    return SYSCONFIG_PATH if SYSCONFIG_PATH.exists() else DEBIAN_PATH


def distro_of(path: Path) -> Distro | None:
    """Whose script reads a file at this path, hence whose defaults apply."""
    return _DIR_DISTRO.get(path.parent.name)


def read_config(path: Path, distro: Distro | None = None) -> LibvirtGuestsConfig:
    if distro is None:
        distro = distro_of(path)
        if distro is None:
            raise LibvirtGuestsError(
                f"{path}: cannot tell whose defaults apply to variables it leaves unset "
                "(libvirt-guests.sh of Fedora and upstream reads /etc/sysconfig/"
                "libvirt-guests, Debian's reads /etc/default/libvirt-guests); give "
                "--distro fedora or --distro debian")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LibvirtGuestsError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LibvirtGuestsError(f"{path}: cannot read it: {exc}") from None
    try:
        assignments = parse_assignments(text)
    except ShellSyntaxError as exc:
        raise LibvirtGuestsError(f"{path} {exc}") from None
    values = defaults(distro)
    lines: dict[str, int] = {}
    ignored: dict[str, Assignment] = {}
    for item in assignments:  # the last assignment wins, as when the shell sources it
        if item.name in values:
            values[item.name] = item.value
            lines[item.name] = item.line
        else:
            ignored[item.name] = item
    return LibvirtGuestsConfig(path, distro, values, lines, tuple(ignored.values()))


def default_uri(libvirt_conf: Path = LIBVIRT_CONF) -> tuple[str, str]:
    """What libvirt-guests' ``default`` URI means here, and why (for a comment).

    libvirt-guests runs ``virsh`` without ``-c`` for it, so libvirt picks: its
    ``uri_default`` setting if there is one, else (for root with the QEMU driver
    installed, the hosts guestwarden is for) qemu:///system.
    """
    conf = read_libvirt_conf(libvirt_conf)
    setting = conf.settings.get("uri_default") if conf else None
    if setting is not None and isinstance(setting.value, str) and setting.value:
        return setting.value, f"uri_default in {libvirt_conf} line {setting.line}"
    return FALLBACK_URI, f"libvirt's default for root; {libvirt_conf} sets no uri_default"


def uri_list(cfg: LibvirtGuestsConfig, default: str) -> list[str]:
    """URIS split as the script's ``for uri in $URIS`` does, ``default`` resolved."""
    seen: list[str] = []
    for uri in cfg.values["URIS"].split():
        resolved = default if uri == "default" else uri
        if resolved not in seen:
            seen.append(resolved)
    if not seen:
        raise LibvirtGuestsError(f"{cfg.where('URIS')}: no URI at all, so libvirt-guests "
                                 "acts on no guest; guestwarden needs at least one URI")
    return seen


def import_config(cfg: LibvirtGuestsConfig, default: tuple[str, str]) -> tuple[str, list[str]]:
    """The guestwarden TOML for ``cfg`` and warnings for stderr.

    The text is checked by loading it as guestwarden's own config, so what is
    printed is always a config the daemon accepts.
    """
    uris = uri_list(cfg, default[0])
    # imported here: the translation module needs this module's types and parsers
    from guestwarden.conf.libvirt_guests_translation import Translation

    text, warnings = Translation(cfg, uris, default).render()
    try:
        parse_settings(text.encode(), Path("<translation>"))
    except ConfigError as exc:  # a bug here, never the user's file
        raise RuntimeError(f"the translation of {cfg.path} is not a valid config: {exc}\n"
                           f"{text}") from None
    return text, warnings


def whole_number(cfg: LibvirtGuestsConfig, name: str, high: int) -> int:
    """A whole number as the script's ``[ "$X" -gt N ]`` tests need one."""
    value = cfg.values[name].strip()
    if not re.fullmatch(r"\d+", value):
        raise LibvirtGuestsError(f"{cfg.where(name)}: expected a whole number >= 0 "
                                 "(libvirt-guests compares it with the shell's test)")
    number = int(value)
    if number > high:
        raise LibvirtGuestsError(f"{cfg.where(name)}: guestwarden allows at most {high}")
    return number


_SLEEP = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def sleep_seconds(cfg: LibvirtGuestsConfig, name: str, high: float) -> float:
    """A duration as ``sleep`` reads it (START_DELAY): seconds, maybe with a unit."""
    match = _SLEEP.fullmatch(cfg.values[name].strip())
    if match is None:
        raise LibvirtGuestsError(f"{cfg.where(name)}: expected seconds >= 0 as `sleep` "
                                 "takes them (e.g. 5, 2.5 or 1m)")
    seconds = float(match[1]) * _UNIT_S[match[2]]
    if seconds > high:
        raise LibvirtGuestsError(f"{cfg.where(name)}: guestwarden allows at most {high:g}s")
    return seconds


"""Dueling setups: something else on this host also saves or shuts down guests.

libvirt-guests.service and libvirt's in-daemon auto-shutdown (qemu.conf
``auto_shutdown_*``) act on the same guests at host shutdown as guestwarden, and
libvirt-guests starts them again at boot. Two of them at once race each other
("dueling actions", as libvirt's documentation calls it): a save fails because the
other one already paused the guest, a guest saved by one is cold-booted by the
other, each one's record of what it did is wrong. So while one is configured, the
daemon refuses to preserve or restore guests (and says why in its log and in
``guestwarden status``), unless the config's ``allow_dueling = true`` says the
admin made sure they do not meet.

What is checked, without systemctl (PID 1 need not be systemd, and the check must
not depend on D-Bus):

* libvirt-guests.service enabled: an enablement symlink
  ``{/etc,/run,/usr/lib}/systemd/system/*.{wants,requires}/libvirt-guests.service``,
  unless the unit is masked (``/etc`` or ``/run/systemd/system/libvirt-guests.service``
  pointing to /dev/null). An enabled unit runs at the next boot and, above all, its
  stop action runs at the next host shutdown.
* qemu.conf: ``auto_shutdown_try_save``, ``auto_shutdown_try_shutdown`` or
  ``auto_shutdown_poweroff`` set to anything but "none" (libvirt 11.2 and later).

The checks are re-read whenever guests are about to be acted on (a few stat calls),
so fixing the setup takes effect without restarting the daemon.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from guestwarden.conf.libvirtconf import read_libvirt_conf
from guestwarden.supervisor.runs import JobService, Run

log = logging.getLogger(__name__)

UNIT = "libvirt-guests.service"
UNIT_DIRS = ("etc/systemd/system", "run/systemd/system", "usr/lib/systemd/system")
MASK_DIRS = ("etc/systemd/system", "run/systemd/system")
QEMU_CONF = "etc/libvirt/qemu.conf"
AUTO_SHUTDOWN_KEYS = ("auto_shutdown_try_save", "auto_shutdown_try_shutdown",
                      "auto_shutdown_poweroff")
HOW_TO_ALLOW = "set allow_dueling = true in the config to act on guests anyway"


@dataclass(frozen=True)
class DuelingSources:
    """Where to look; ``root`` is "/" except in tests."""

    root: Path = Path("/")

    def unit_dirs(self) -> list[Path]:
        return [self.root / d for d in UNIT_DIRS]

    def qemu_conf(self) -> Path:
        return self.root / QEMU_CONF


def _masked(sources: DuelingSources) -> Path | None:
    for directory in MASK_DIRS:
        path = sources.root / directory / UNIT
        if path.is_symlink() and os.readlink(path) == "/dev/null":
            return path
    return None


def libvirt_guests_enabled(sources: DuelingSources) -> str | None:
    """Why libvirt-guests.service counts as enabled, or None."""
    if _masked(sources) is not None:
        return None
    # lexists: the link itself counts, wherever it points (under a test root its
    # absolute target would be looked up on the real host)
    links = sorted(
        link
        for directory in sources.unit_dirs()
        for pattern in ("*.wants", "*.requires")
        for link in (d / UNIT for d in directory.glob(pattern))
        if os.path.lexists(link)
    )
    if not links:
        return None
    return (f"{UNIT} is enabled ({links[0]}): at host shutdown it would suspend or shut "
            "down the same guests, and at boot start them; disable it (see the README, "
            f"\"Migrating from libvirt-guests\") or {HOW_TO_ALLOW}")


def libvirt_auto_shutdown(sources: DuelingSources) -> list[str]:
    """One line per ``auto_shutdown_*`` key of qemu.conf that is set to act."""
    conf = read_libvirt_conf(sources.qemu_conf())
    if conf is None:
        return []
    found = []
    for key in AUTO_SHUTDOWN_KEYS:
        setting = conf.settings.get(key)
        if setting is not None and setting.value != "none":
            found.append(
                f"libvirt's own auto-shutdown is on: {conf.path} line {setting.line} sets "
                f"{key} = {setting.value!r}, so libvirt would save or shut down guests "
                f"itself at host shutdown; set it to \"none\" (and restart the libvirt "
                f"daemon) or {HOW_TO_ALLOW}")
    return found


def find_dueling(sources: DuelingSources) -> tuple[str, ...]:
    enabled = libvirt_guests_enabled(sources)
    return ((enabled,) if enabled else ()) + tuple(libvirt_auto_shutdown(sources))


class DuelingGuard:
    """Decides whether the daemon may act on guests, and says so once per change."""

    def __init__(self, sources: DuelingSources) -> None:
        self.sources = sources
        self.reasons: tuple[str, ...] = ()
        self.allowed = False

    def refresh(self, *, allowed: bool) -> tuple[str, ...]:
        """Look again; log when the answer changed. Returns the reasons found."""
        reasons = find_dueling(self.sources)
        if reasons != self.reasons or (reasons and allowed != self.allowed):
            if not reasons:
                log.info("dueling setup gone: acting on guests again")
            for reason in reasons:
                if allowed:
                    log.warning("dueling setup, allowed by allow_dueling = true: %s", reason)
                else:
                    log.error("refusing to preserve or restore guests: %s", reason)
        self.reasons, self.allowed = reasons, allowed
        return reasons

    def refusal(self, action: str, *, allowed: bool) -> str | None:
        """Why ``action`` must not run now, or None."""
        reasons = self.refresh(allowed=allowed)
        if not reasons or allowed:
            return None
        return f"refusing to {action} guests: " + "; and ".join(reasons)

    def notes(self) -> tuple[str, ...]:
        """For ``guestwarden status``."""
        if self.allowed:
            return tuple(f"dueling setup allowed by allow_dueling = true: {r}"
                         for r in self.reasons)
        return tuple(f"refusing to preserve or restore guests: {r}" for r in self.reasons)


class RefusedRun(Run):
    """A run that acts on no guest and ends at once, failed, saying why.

    ``start_preserve``/``start_restore`` return one while the guard refuses, so that
    every trigger (logind, SIGTERM at host shutdown, the control socket) sees a run
    that ends -- and releases what it holds, such as logind's inhibitor -- instead of
    an exception. It writes no journal: nothing happened to any guest.
    """

    def __init__(self, jobs: JobService, kind: Literal["preserve", "restore"], reason: str,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.kind = kind  # before Run.__init__, which names the run after it
        super().__init__(jobs, wall_clock)
        self.reason = reason

    def write_journal(self) -> None:
        pass

    async def execute(self) -> None:
        self.ok = False
        self.detail = self.reason

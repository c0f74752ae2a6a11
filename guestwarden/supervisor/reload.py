"""What a reload (SIGHUP, ``guestwarden reload``) changes, and what it cannot change live.

Live, from the next run or request on (a run already going keeps the settings it
started with):

* ``on_service_stop``: read when SIGTERM arrives.
* ``uris``: workers open a connection per URI when a job first needs it.
* every ``[shutdown]`` key: each preserve (and plan) reads them when it starts.
* ``[boot]`` keys except ``on_boot``: each restore reads them when it starts.
* ``workers``: the pool is resized at once, as ``guestwarden workers N`` does.

Only after a restart (the old value stays in force until then, and the reply says so):

* ``state_dir``, ``runtime_dir``: the journal, the sockets and the lock are open.
* ``[boot] on_boot``: it is acted on once, when the daemon starts.
* every ``[advanced]`` key: the dispatcher's heartbeat and deadline timings and the
  workers' command lines are fixed when they are made; mixing old and new timings
  between the supervisor and its workers would be worse than either.
"""

from __future__ import annotations

from typing import Any

import msgspec

from guestwarden.conf.settings import Settings
from guestwarden.ipc.messages import SettingChange

RESTART_ONLY = frozenset({"state_dir", "runtime_dir", "boot.on_boot"})
RESTART_ONLY_SECTIONS = frozenset({"advanced"})


def flatten(settings: Settings) -> dict[str, Any]:
    """``{"uris": [...], "shutdown.parallel_save": 1, ...}``, the keys of the config file."""
    out: dict[str, Any] = {}
    for name, value in msgspec.structs.asdict(settings).items():
        if isinstance(value, msgspec.Struct):
            for key, inner in msgspec.structs.asdict(value).items():
                out[f"{name}.{key}"] = inner
        else:
            out[name] = value
    return out


def is_live(key: str) -> bool:
    return key not in RESTART_ONLY and key.split(".", 1)[0] not in RESTART_ONLY_SECTIONS


def show(value: Any) -> str:
    """A value as it would be written in the TOML file."""
    return msgspec.json.encode(list(value) if isinstance(value, tuple) else value).decode()


def diff_settings(old: Settings, new: Settings) -> tuple[SettingChange, ...]:
    before, after = flatten(old), flatten(new)
    return tuple(
        SettingChange(key=key, old=show(before[key]), new=show(after[key]), live=is_live(key))
        for key in before
        if before[key] != after[key]
    )


def effective_settings(old: Settings, new: Settings) -> Settings:
    """``new``, except that restart-only keys keep their ``old`` values."""
    boot = msgspec.structs.replace(new.boot, on_boot=old.boot.on_boot)
    return msgspec.structs.replace(new, state_dir=old.state_dir, runtime_dir=old.runtime_dir,
                                   advanced=old.advanced, boot=boot)


def describe_changes(changes: tuple[SettingChange, ...]) -> list[str]:
    """One line per change, for the log and the CLI."""
    lines = []
    for change in changes:
        when = ("in effect now" if change.live
                else f"needs a restart; {change.old} stays in force until then")
        lines.append(f"{change.key}: {change.old} -> {change.new} ({when})")
    return lines

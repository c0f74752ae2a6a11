"""The settings of guestwarden as frozen msgspec Structs.

These classes are the schema of ``guestwarden.toml``: a key that is not a field here
is an error, and the ``Meta`` constraints are what the error message offers as the
allowed values. The README's config reference is checked against them by a test.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from guestwarden.ipc.messages import ActionName, ShutdownMode

Seconds = Annotated[float, Meta(ge=0, le=86400)]
PositiveSeconds = Annotated[float, Meta(gt=0, le=86400)]
Chain = Annotated[tuple[ActionName, ...], Meta(min_length=1, max_length=3)]

DEFAULT_CONFIG_PATH = "/etc/guestwarden/guestwarden.toml"
CONFIG_ENV = "GUESTWARDEN_CONFIG"


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ShutdownSettings(_Section, frozen=True, kw_only=True):
    """``[shutdown]``: what preserve does to each running or paused guest."""

    persistent: Chain = ("save", "shutdown", "poweroff")
    transient: Chain = ("shutdown", "poweroff")
    parallel_shutdown: Annotated[int, Meta(ge=0, le=4096)] = 8
    parallel_save: Annotated[int, Meta(ge=1, le=256)] = 1
    shutdown_timeout: PositiveSeconds = 300.0
    save_timeout: PositiveSeconds = 900.0
    poweroff_timeout: PositiveSeconds = 60.0
    bypass_cache: bool = False
    shutdown_mode: ShutdownMode = "acpi"

    def __post_init__(self) -> None:
        for key in ("persistent", "transient"):
            chain = getattr(self, key)
            if len(set(chain)) != len(chain):
                raise ValueError(
                    f"{key}: an action may appear only once in a chain, got {list(chain)}"
                )
        if "save" in self.transient:
            raise ValueError(
                'transient: "save" is not possible for transient guests '
                "(libvirt keeps no managed-save image for them)"
            )


class BootSettings(_Section, frozen=True, kw_only=True):
    """``[boot]``: what a daemon starting after boot (or ``guestwarden restore``) does."""

    on_boot: Literal["restore", "ignore"] = "restore"
    start_delay: Seconds = 0.0
    parallel_start: Annotated[int, Meta(ge=1, le=256)] = 4
    start_timeout: PositiveSeconds = 300.0
    sync_time: bool = True
    sync_time_timeout: PositiveSeconds = 60.0


class AdvancedSettings(_Section, frozen=True, kw_only=True):
    """``[advanced]``: protocol timings; the defaults suit every host we know of."""

    heartbeat_interval: Annotated[float, Meta(ge=0.05, le=60)] = 1.0
    heartbeat_timeout: Annotated[float, Meta(ge=0.2, le=600)] = 10.0
    job_grace: Annotated[float, Meta(ge=0.1, le=3600)] = 15.0
    connect_timeout: PositiveSeconds = 30.0
    max_attempts: Annotated[int, Meta(ge=1, le=10)] = 2


class Settings(_Section, frozen=True, kw_only=True):
    """The whole configuration file."""

    uris: Annotated[tuple[str, ...], Meta(min_length=1)] = ("qemu:///system",)
    state_dir: str = "/var/lib/guestwarden"
    runtime_dir: str = "/run/guestwarden"
    workers: Literal["auto"] | Annotated[int, Meta(ge=1, le=256)] = "auto"
    shutdown: ShutdownSettings = msgspec.field(default_factory=ShutdownSettings)
    boot: BootSettings = msgspec.field(default_factory=BootSettings)
    advanced: AdvancedSettings = msgspec.field(default_factory=AdvancedSettings)

    def __post_init__(self) -> None:
        if len(set(self.uris)) != len(self.uris):
            raise ValueError(f"uris: each URI may appear only once, got {list(self.uris)}")
        for uri in self.uris:
            if not uri or any(c.isspace() for c in uri):
                raise ValueError(f"uris: expected libvirt URIs without spaces, got {uri!r}")
        for key in ("state_dir", "runtime_dir"):
            if not getattr(self, key).startswith("/"):
                raise ValueError(f"{key}: expected an absolute path, got {getattr(self, key)!r}")


def resolve_worker_count(settings: Settings, cpu_count: int | None) -> int:
    """How many worker processes to run.

    A worker runs one job at a time, and a graceful shutdown holds its worker while it
    waits for the guest to go off, so the pool must be at least as large as the
    largest bound for the bounds to be reachable; ``auto`` takes that plus one (so an
    inventory or poweroff is never queued behind waits), and at least the number of
    CPUs, capped at 64 (each worker is a ~30 MB process).
    """
    if isinstance(settings.workers, int):
        return settings.workers
    bounds = (
        settings.shutdown.parallel_shutdown or 32,
        settings.shutdown.parallel_save,
        settings.boot.parallel_start,
    )
    return max(2, min(64, max(max(bounds) + 1, cpu_count or 1)))
